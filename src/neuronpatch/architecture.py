"""Where units and features live inside a Hugging Face decoder, found by name.

The engine never re-implements a model's forward. It runs the model's own
``forward`` and reads or edits tensors at a few *sites*, each the input or the
output of one of the model's own modules:

=============  ==========================================================
site           tensor (``[batch, pos, width]``)
=============  ==========================================================
``block_in``   the residual stream entering block L (HF ``hidden_states[L]``)
``attn_write`` what attention adds to the residual stream in block L
``mlp_pre``    the MLP's pre-activation (gate projection for gated MLPs)
``mlp_post``   the MLP's neurons: the input of its output projection
``mlp_write``  what the MLP adds to the residual stream in block L
``block_out``  the residual stream leaving block L
``final_norm`` the final norm's output, gain and bias included
=============  ==========================================================

Which module plays which part comes from TransformerLens's architecture
adapters (``component_mapping`` and the block's hook aliases), so every
architecture TransformerLens knows is described once, there. A site that an
architecture does not have as one module's tensor (the scaled residual writes
of Granite, the experts of a mixture-of-experts MLP) is refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from neuronpatch.errors import ModelLoadError

SITE_KINDS: tuple[str, ...] = (
    "block_in", "attn_write", "mlp_pre", "mlp_post", "mlp_write", "block_out", "final_norm", "logits",
)
# Forward order inside a block; block_out(L) comes before block_in(L + 1).
_TL_NAMES = {"block_in": "hook_resid_pre", "attn_write": "hook_attn_out", "mlp_pre": "mlp.hook_pre",
             "mlp_post": "mlp.hook_post", "mlp_write": "hook_mlp_out", "block_out": "hook_resid_post"}
_STAGE = {"block_in": 0, "attn_write": 1, "mlp_pre": 2, "mlp_post": 3, "mlp_write": 4, "block_out": 5}


@dataclass(frozen=True)
class Site:
    """One tensor in the forward pass: a kind and a block index."""

    kind: str
    layer: int

    def order(self, n_layers: int) -> tuple[int, int]:
        """A sortable key: a site that the forward computes later sorts later."""
        if self.kind == "final_norm":
            return (n_layers, 0)
        if self.kind == "logits":
            return (n_layers, 1)
        return (self.layer, _STAGE[self.kind])

    def __str__(self) -> str:
        """The TransformerLens hook name that holds this tensor (in its own coordinates)."""
        if self.kind in _TL_NAMES:
            return f"blocks.{self.layer}.{_TL_NAMES[self.kind]}"
        return "ln_final.hook_out" if self.kind == "final_norm" else "unembed.hook_out"


@dataclass
class Architecture:
    """The modules of one loaded model that hold each site."""

    name: str  # HF architecture class, e.g. "LlamaForCausalLM"
    blocks: list[nn.Module]
    final_norm: nn.Module | None
    layernorm: bool  # LayerNorm (mean-subtracting) norms, as opposed to RMSNorm
    parallel: bool  # attention and MLP read the same residual (GPT-J, NeoX, Phi)
    mlp_out_proj: list[nn.Module | None]
    mlp_pre_proj: list[nn.Module | None]
    mlp_write: list[nn.Module | None]
    attn_write: list[nn.Module | None]
    refused: dict[str, str] = field(default_factory=dict)  # site kind -> why

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def check(self, site: Site) -> None:
        """Raise ``ModelLoadError`` when this architecture has no such site."""
        if site.kind in self.refused:
            why = self.refused[site.kind]
            raise ModelLoadError(f"{self.name}: the {site.kind} site is refused: {why}")
        if site.kind in ("logits", "block_in", "block_out", "final_norm"):
            return
        table = {"mlp_post": self.mlp_out_proj, "mlp_pre": self.mlp_pre_proj,
                 "mlp_write": self.mlp_write, "attn_write": self.attn_write}[site.kind]
        if table[site.layer] is None:
            raise ModelLoadError(f"{self.name}: block {site.layer} has no {site.kind} site")


def _get(root: nn.Module, path: str | None) -> nn.Module | None:
    if not path:
        return None
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _join(*parts: str | None) -> str:
    return ".".join(p for p in parts if p)


def describe(hf_model: nn.Module) -> Architecture:
    """Find every site of ``hf_model`` through TransformerLens's adapter for its class.

    Raises:
        ModelLoadError: the architecture is not a causal decoder TransformerLens knows,
            or its blocks are not where the adapter says.
    """
    config = hf_model.config
    arch = (getattr(config, "architectures", None) or [type(hf_model).__name__])[0]
    if type(hf_model).__name__ != arch:
        arch = type(hf_model).__name__
    adapter = _adapter(config, arch)
    mapping = adapter.component_mapping or {}
    blocks_b = mapping.get("blocks")
    if blocks_b is None:
        raise ModelLoadError(f"{arch}: TransformerLens's adapter names no blocks")
    blocks_mod = _get(hf_model, blocks_b.name)
    if not isinstance(blocks_mod, nn.ModuleList):
        raise ModelLoadError(f"{arch}: no block list at {blocks_b.name!r}")
    blocks = list(blocks_mod)
    ln_b = mapping.get("ln_final")
    final_norm = _get(hf_model, ln_b.name) if ln_b is not None else None
    norm_type = str(getattr(adapter.cfg, "normalization_type", "") or "")
    layernorm = norm_type.startswith("LN")
    sub = blocks_b.submodules or {}
    block_cls = type(blocks_b).__name__
    refused: dict[str, str] = {}
    aliases = dict(getattr(blocks_b, "hook_aliases", {}) or {})
    if "Scaled" in block_cls:
        why = "the block scales attention and MLP outputs inline before adding them"
        refused["mlp_write"] = refused["attn_write"] = why
    mlp_b = sub.get("mlp")
    if mlp_b is not None and ("MoE" in type(mlp_b).__name__ or "Moe" in type(mlp_b).__name__):
        refused["mlp_post"] = refused["mlp_pre"] = "the MLP is a mixture of experts"
        refused["mlp_write"] = "the MLP is a mixture of experts"

    def path_of(alias: str) -> str | None:
        # "mlp.out" -> adapter names of mlp, then its "out" submodule.
        comp, parts = None, []
        node_subs = sub
        for key in alias.split("."):
            comp = node_subs.get(key) if node_subs else None
            if comp is None:
                return None
            parts.append(comp.name)
            node_subs = comp.submodules or {}
        return _join(*parts) or None

    def site_path(alias_key: str, default: str) -> str | None:
        target = aliases.get(alias_key, default)
        if isinstance(target, list):
            target = target[0]
        if not isinstance(target, str) or not target.endswith(".hook_out"):
            return None
        return path_of(target[: -len(".hook_out")])

    mlp_out, mlp_pre, mlp_w, attn_w = [], [], [], []
    for block in blocks:
        out_p = path_of("mlp.out") if mlp_b is not None else None
        gate_p = path_of("mlp.gate") if mlp_b is not None else None
        in_p = path_of("mlp.in") if mlp_b is not None else None
        mlp_out.append(_get(block, out_p))
        mlp_pre.append(_get(block, gate_p) if gate_p else _get(block, in_p))
        w = site_path("hook_mlp_out", "mlp.hook_out")
        mlp_w.append(_get(block, w) if w else None)
        a = site_path("hook_attn_out", "attn.hook_out")
        attn_w.append(_get(block, a) if a else None)
    if mlp_b is not None and "JointGateUp" in type(mlp_b).__name__:
        refused["mlp_pre"] = "gate and up projections are one fused matrix"
    if mlp_b is not None and mlp_b.name is None and "mlp_write" not in refused and aliases.get(
            "hook_mlp_out") is None:
        refused["mlp_write"] = "the MLP has no module of its own"
    return Architecture(
        name=arch, blocks=blocks, final_norm=final_norm, layernorm=layernorm,
        parallel="Parallel" in block_cls or bool(getattr(adapter.cfg, "parallel_attn_mlp", False)),
        mlp_out_proj=mlp_out, mlp_pre_proj=mlp_pre, mlp_write=mlp_w, attn_write=attn_w, refused=refused,
    )


def _adapter(config: Any, arch: str) -> Any:
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_config_from_hf

    ArchitectureAdapterFactory.discover_entry_points()
    if arch not in ArchitectureAdapterFactory._adapters:
        raise ModelLoadError(f"{arch}: TransformerLens has no architecture adapter for this model class")
    try:
        bridge_cfg = build_bridge_config_from_hf(config, arch, arch, torch.float32)
        return ArchitectureAdapterFactory.select_architecture_adapter(bridge_cfg)
    except Exception as e:
        raise ModelLoadError(f"{arch}: TransformerLens could not describe this model ({e})") from e


# --------------------------------------------------------------------------- hooks
Edit = Callable[[Tensor], Tensor | None]
"""Called with a site's tensor viewed as ``[batch, pos, width]``; returns a replacement or None."""


def _as_bsd(t: Tensor, batch: int) -> Tensor:
    # Some models (OPT) flatten [batch, pos] before their MLP.
    return t if t.dim() == 3 else t.reshape(batch, -1, t.shape[-1])


def attach(arch: Architecture, site: Site, fn: Edit, batch: int) -> Any:
    """Register ``fn`` at ``site``; returns a handle with ``remove()``.

    ``fn`` sees the tensor as ``[batch, pos, width]`` and may return a tensor of
    that shape to replace it in the forward pass.
    """
    def swap_out(output: Any) -> Any:
        t = output[0] if isinstance(output, tuple) else output
        new = fn(_as_bsd(t, batch))
        if new is None:
            return None
        new = new.reshape(t.shape)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def out_hook(module: nn.Module, args: Any, output: Any) -> Any:
        return swap_out(output)

    def in_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            t = args[0]
            new = fn(_as_bsd(t, batch))
            return None if new is None else ((new.reshape(t.shape), *args[1:]), kwargs)
        t = kwargs["hidden_states"]
        new = fn(_as_bsd(t, batch))
        if new is None:
            return None
        return args, {**kwargs, "hidden_states": new.reshape(t.shape)}

    k, L = site.kind, site.layer
    if k == "block_in":
        return arch.blocks[L].register_forward_pre_hook(in_hook, with_kwargs=True)
    if k == "block_out":
        return arch.blocks[L].register_forward_hook(out_hook)
    if k == "final_norm":
        if arch.final_norm is None:
            return arch.blocks[-1].register_forward_hook(out_hook)
        return arch.final_norm.register_forward_hook(out_hook)
    if k == "mlp_post":
        mod = arch.mlp_out_proj[L]
        assert mod is not None
        return mod.register_forward_pre_hook(in_hook, with_kwargs=True)
    table = {"mlp_pre": arch.mlp_pre_proj, "mlp_write": arch.mlp_write, "attn_write": arch.attn_write}
    mod = table[k][L]
    assert mod is not None, f"{arch.name} has no {k} site in block {L}"
    return mod.register_forward_hook(out_hook)


def verify(hf_model: nn.Module, arch: Architecture, *, rtol: float = 1e-4) -> None:
    """Check the site map against the model's own outputs; refuse (by name) what disagrees.

    One short forward with ``output_hidden_states``: each block's input must be
    HF's ``hidden_states[L]``, each block's output ``hidden_states[L + 1]``, the
    final norm's output the last entry, and a block's output must be its input
    plus its attention and MLP writes. A site that fails is added to
    ``arch.refused`` with the reason, so nothing is ever patched or read there.

    ``rtol`` is relative to the larger tensor's scale; in bfloat16 and float16 it widens to
    four of the dtype's epsilons, because the block adds its two writes to the residual
    stream in that dtype (two roundings), while the checks above compare equal tensors.
    """
    dtype = next(hf_model.parameters()).dtype
    rtol = max(rtol, 4 * torch.finfo(dtype).eps)
    got: dict[tuple[str, int], Tensor] = {}
    calls: dict[tuple[str, int], int] = {}
    handles = []

    def keep(key: tuple[str, int]) -> Edit:
        def fn(t: Tensor) -> None:
            got[key] = t.detach().float().clone()
            calls[key] = calls.get(key, 0) + 1
        return fn

    n = arch.n_layers
    for L in range(n):
        for kind in ("block_in", "block_out", "attn_write", "mlp_write"):
            if kind in arch.refused:
                continue
            table = {"attn_write": arch.attn_write, "mlp_write": arch.mlp_write}.get(kind)
            if table is not None and table[L] is None:
                continue
            handles.append(attach(arch, Site(kind, L), keep((kind, L)), 1))
    handles.append(attach(arch, Site("final_norm", n), keep(("final_norm", n)), 1))
    vocab = int(hf_model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
    ids = (torch.arange(6) * 7 + 3)[None] % vocab
    try:
        with torch.inference_mode():
            out = hf_model(input_ids=ids.to(next(hf_model.parameters()).device), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hs = [h.float() for h in out.hidden_states]

    def close(a: Tensor, b: Tensor) -> bool:
        return a.shape == b.shape and float((a - b).abs().max()) <= rtol * (float(b.abs().max()) + 1.0)

    def refuse(kinds: tuple[str, ...], why: str) -> None:
        for kind in kinds:
            arch.refused.setdefault(kind, why)

    for (kind, _layer), count in calls.items():
        if count > 1:  # one module used twice (a norm shared by embeddings and output, say)
            refuse((kind,), f"its module runs {count} times in one forward pass, so the site is ambiguous")

    if len(hs) != n + 1:
        refuse(("block_in", "block_out", "final_norm"),
               f"HF returns {len(hs)} hidden states for {n} blocks")
        return
    for L in range(n):
        if ("block_in", L) in got and not close(got["block_in", L], hs[L]):
            refuse(("block_in",), f"block {L}'s input is not HF's hidden_states[{L}]")
        if n - 1 > L and ("block_out", L) in got and not close(got["block_out", L], hs[L + 1]):
            refuse(("block_out",), f"block {L}'s output is not HF's hidden_states[{L + 1}]")
        keys = [("block_in", L), ("block_out", L), ("attn_write", L), ("mlp_write", L)]
        if all(k in got for k in keys):
            total = got["block_in", L] + got["attn_write", L] + got["mlp_write", L]
            if not close(total, got["block_out", L]):
                refuse(("attn_write", "mlp_write"),
                       "a block's output is not its input plus its attention and MLP outputs")
    final = got.get(("final_norm", n))
    if final is None or not close(final, hs[n]):
        refuse(("final_norm",), "HF's last hidden state is not the final norm's output")
