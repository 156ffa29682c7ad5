"""Where units and features live inside a Hugging Face decoder, found by name.

The engine never re-implements a model's forward. It runs the model's own
``forward`` and reads or edits tensors at a few *sites*, each the input or the
output of one of the model's own modules:

=============  ==========================================================
site           tensor (``[batch, pos, width]``)
=============  ==========================================================
``block_in``   the residual stream entering block L (HF ``hidden_states[L]``)
``attn_write`` what attention adds to the residual stream in block L
``mlp_in``     read only: the MLP's input (its norm's output, gain and bias
               included), the input of its first projection
``mlp_pre``    the MLP's pre-activation (gate projection for gated MLPs)
``mlp_post``   the MLP's neurons: the input of its output projection
``mlp_write``  what the MLP adds to the residual stream in block L
``block_out``  the residual stream leaving block L
``final_norm`` the final norm's output, gain and bias included
``router_in``  the input of a mixture-of-experts block's router (the hidden
               states it scores experts from; the experts get their own copy)
``route``      read only: the experts a mixture-of-experts block chose for
               each token (``[batch, pos, k]``, sorted), where the block
               hands its experts their indices
``expert_in``  read only: what a mixture-of-experts block hands its fused
               experts module: the tokens' hidden states, then each
               expert's routing weight (NaN where the token is not routed
               to it), ``[batch, pos, d_model + experts]``
=============  ==========================================================

Which module plays which part comes from TransformerLens's architecture
adapters (``component_mapping`` and the block's hook aliases), so every
architecture TransformerLens knows is described once, there. A site that an
architecture does not have as one module's tensor (the scaled residual writes
of Granite, the neurons of a mixture-of-experts MLP, which belong to single
experts: :mod:`neuronpatch.experts` serves those) is refused by name. A
mixture-of-experts block's output (routed
experts plus any shared expert) is its ``mlp_write``, the same write to the
residual stream as a dense MLP's; the block runs its own routing on whatever
reaches it, so a patch that changes a later layer's expert choice keeps it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from neuronpatch import tolerance
from neuronpatch.errors import ModelLoadError

SITE_KINDS: tuple[str, ...] = (
    "block_in", "attn_write", "router_in", "route", "mlp_in", "expert_in", "mlp_pre", "mlp_post", "mlp_write",
    "block_out",
    "final_norm",
    "logits",
)
# Forward order inside a block; block_out(L) comes before block_in(L + 1).
_TL_NAMES = {"block_in": "hook_resid_pre", "attn_write": "hook_attn_out", "mlp_in": "mlp.hook_in",
             "mlp_pre": "mlp.hook_pre",
             "mlp_post": "mlp.hook_post", "mlp_write": "hook_mlp_out", "block_out": "hook_resid_post"}
_STAGE = {"block_in": 0, "attn_write": 1, "router_in": 2, "route": 3, "mlp_in": 4, "expert_in": 5,
          "mlp_pre": 6, "mlp_post": 7, "mlp_write": 8, "block_out": 9}


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
        if self.kind == "route":
            return f"blocks.{self.layer}.mlp.gate.hook_out"
        if self.kind == "expert_in":
            return f"blocks.{self.layer}.mlp.experts.hook_in"
        if self.kind == "router_in":
            return f"blocks.{self.layer}.mlp.gate.hook_in"
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
    # Block -> its mixture-of-experts module (None: a dense MLP, or no MLP), and why a
    # site of one block is refused where the others have it ((kind, layer) -> why).
    moe: list[nn.Module | None] = field(default_factory=list)
    refused_at: dict[tuple[str, int], str] = field(default_factory=dict)
    # Why a left-padded batch does not give each input's own numbers (every unit refused), and
    # why the model's cache cannot continue a prefix (the kv route refused); None: checked, fine.
    batch_refused: str | None = None
    kv_refused: str | None = None
    # Why ``hf`` coordinates (features indexed into HF's ``hidden_states``) are refused.
    hf_refused: str | None = None

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    def check(self, site: Site) -> None:
        """Raise ``ModelLoadError`` when this architecture has no such site."""
        if self.batch_refused:
            raise ModelLoadError(f"{self.name}: refused: {self.batch_refused}")
        if site.kind in self.refused:
            why = self.refused[site.kind]
            raise ModelLoadError(f"{self.name}: the {site.kind} site is refused: {why}")
        if (site.kind, site.layer) in self.refused_at:
            why = self.refused_at[site.kind, site.layer]
            raise ModelLoadError(f"{self.name}: the {site.kind} site of block {site.layer} is refused: {why}")
        if site.kind in ("logits", "block_in", "block_out", "final_norm"):
            return
        if site.kind in ("route", "expert_in", "router_in"):
            if not self.moe or self.moe[site.layer] is None:
                raise ModelLoadError(f"{self.name}: block {site.layer} has no mixture of experts"
                                     + (" to route" if site.kind == "route" else " (layer_type expert_post "
                                        "and expert_pre name an expert of a mixture-of-experts block)"))
            return
        table = {"mlp_post": self.mlp_out_proj, "mlp_pre": self.mlp_pre_proj, "mlp_in": self.mlp_pre_proj,
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
    moe_model = mlp_b is not None and ("MoE" in type(mlp_b).__name__ or "Moe" in type(mlp_b).__name__)

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
    moe: list[nn.Module | None] = []
    refused_at: dict[tuple[str, int], str] = {}
    for L, block in enumerate(blocks):
        sparse = _get(block, mlp_b.name) if moe_model and mlp_b is not None else None
        if sparse is not None and not _is_sparse(sparse):
            sparse = None  # a dense layer of a mixture-of-experts model (DeepSeek's first layers)
        moe.append(sparse)
        dense = "dense_" if moe_model else ""
        out_p = path_of(f"mlp.{dense}out") if mlp_b is not None else None
        gate_p = path_of(f"mlp.{dense}gate") if mlp_b is not None else None
        in_p = path_of(f"mlp.{dense}in") if mlp_b is not None else None
        if sparse is not None:
            out_p = gate_p = in_p = None
            why = (f"block {L}'s MLP is a mixture of experts: its neurons belong to single experts "
                   "(layer_type expert_post or expert_pre with target_expert); its output (layer_type "
                   "mlp_out) and the residual units are served too")
            refused_at["mlp_post", L] = refused_at["mlp_pre", L] = why
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
        moe=moe, refused_at=refused_at,
    )


def _is_sparse(mlp: nn.Module) -> bool:
    """Whether an MLP module routes tokens to experts (has experts or a router of its own)."""
    return any(hasattr(mlp, name) for name in ("experts", "router", "input_linear"))


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
        many = isinstance(output, (tuple, list))  # GPT-1's attention returns a list
        t = output[0] if many else output
        new = fn(_as_bsd(t, batch))
        if new is None:
            return None
        new = new.reshape(t.shape)
        return type(output)([new, *output[1:]]) if many else new

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
    if k == "route":
        return _attach_route(arch, L, fn, batch)
    if k == "expert_in":
        return _attach_experts_in(arch, L, fn, batch)
    if k == "router_in":
        router = router_module(arch, L)
        assert router is not None, f"{arch.name} has no router module in block {L}"
        return router.register_forward_pre_hook(in_hook, with_kwargs=True)
    if k == "block_in":
        return arch.blocks[L].register_forward_pre_hook(in_hook, with_kwargs=True)
    if k == "block_out":
        return arch.blocks[L].register_forward_hook(out_hook)
    if k == "final_norm":
        if arch.final_norm is None:
            return arch.blocks[-1].register_forward_hook(out_hook)
        return arch.final_norm.register_forward_hook(out_hook)
    if k in ("mlp_post", "mlp_in"):
        mod = (arch.mlp_out_proj if k == "mlp_post" else arch.mlp_pre_proj)[L]
        assert mod is not None
        return mod.register_forward_pre_hook(in_hook, with_kwargs=True)
    table = {"mlp_pre": arch.mlp_pre_proj, "mlp_write": arch.mlp_write, "attn_write": arch.attn_write}
    mod = table[k][L]
    assert mod is not None, f"{arch.name} has no {k} site in block {L}"
    return mod.register_forward_hook(out_hook)


def _choice(x: Any) -> Tensor | None:
    """The expert indices among a module's arguments or outputs: an integer ``[tokens, k]`` tensor."""
    items = x if isinstance(x, (tuple, list)) else (x,)
    for t in items:
        if isinstance(t, Tensor) and t.dim() == 2 and not t.is_floating_point() and t.dtype != torch.bool:
            return t
    return None


def _attach_route(arch: Architecture, L: int, fn: Edit, batch: int) -> Any:
    """Read the experts block ``L`` chose for each token, where its module hands them over.

    Transformers' expert modules take ``(hidden_states, top_k_index, top_k_weights)``;
    elsewhere the router returns the indices. A family that passes neither (the
    indices stay inside one function) is not observed: ``fn`` is never called.
    """
    sparse = arch.moe[L] if arch.moe else None
    assert sparse is not None, f"{arch.name} has no mixture of experts in block {L}"

    def seen(idx: Tensor | None) -> None:
        if idx is not None and idx.shape[0] % batch == 0:
            fn(idx.reshape(batch, -1, idx.shape[-1]).sort(-1).values)

    experts = getattr(sparse, "experts", None)
    router = router_module(arch, L)

    def on_experts(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen(_choice(tuple(args[1:]) + tuple(kwargs.values())))

    def on_router(module: nn.Module, args: Any, output: Any) -> None:
        seen(_choice(output))

    handles = []
    if isinstance(experts, nn.Module):
        handles.append(experts.register_forward_pre_hook(on_experts, with_kwargs=True))
    elif router is not None:
        handles.append(router.register_forward_hook(on_router))
    return _Handles(handles)


def router_module(arch: Architecture, L: int) -> nn.Module | None:
    """Block ``L``'s router (its ``gate`` or ``router`` module), or None where the block has none."""
    sparse = arch.moe[L] if arch.moe and 0 <= L < len(arch.moe) else None
    return next((getattr(sparse, n) for n in ("gate", "router")
                 if isinstance(getattr(sparse, n, None), nn.Module)), None)


def experts_module(arch: Architecture, L: int) -> nn.Module | None:
    """Block ``L``'s fused experts module (the one handed ``(hidden_states, top_k_index,
    top_k_weights)``), or None where the block has none."""
    sparse = arch.moe[L] if arch.moe and 0 <= L < len(arch.moe) else None
    experts = getattr(sparse, "experts", None)
    return experts if isinstance(experts, nn.Module) else None


def expert_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(hidden_states [T, d], top_k_index [T, k], top_k_weights [T, k])`` from a call of an
    experts module, or None when its arguments are not that."""
    rest = tuple(args[1:]) + tuple(v for k, v in kwargs.items() if k != "hidden_states")
    hidden = args[0] if args else kwargs.get("hidden_states")
    idx = _choice(rest)
    if not isinstance(hidden, Tensor) or idx is None:
        return None
    weights = next((t for t in rest if isinstance(t, Tensor) and t.is_floating_point()
                    and t.shape == idx.shape), None)
    return None if weights is None else (hidden, idx, weights)


def _attach_experts_in(arch: Architecture, L: int, fn: Edit, batch: int) -> Any:
    """Hand ``fn`` what block ``L``'s experts module receives: hidden states, then each expert's
    routing weight (NaN where not routed), float32 ``[batch, pos, d + experts]``. Read only."""
    experts = experts_module(arch, L)
    assert experts is not None, f"{arch.name} has no fused experts module in block {L}"
    n_experts = int(getattr(experts, "num_experts"))  # noqa: B009 (a module attribute mypy cannot see)

    def on_experts(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        call = expert_call(args, kwargs)
        if call is None:
            raise RuntimeError(f"block {L}'s experts module was not handed (hidden_states, top_k_index, "
                               "top_k_weights)")
        hidden, idx, weights = call
        gates = torch.full((hidden.shape[0], n_experts + 1), torch.nan, device=hidden.device)
        # (an index of n_experts is a sentinel some implementations use for "no expert")
        gates.scatter_(1, idx.long().clamp(0, n_experts), weights.float())
        fn(_as_bsd(torch.cat([hidden.float(), gates[:, :n_experts]], -1), batch))

    return _Handles([experts.register_forward_pre_hook(on_experts, with_kwargs=True)])


class _Handles:
    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def verify(hf_model: nn.Module, arch: Architecture, *, rtol: float = tolerance.CHECK_RTOL) -> None:
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
    rtol = max(rtol, tolerance.check_rtol(dtype))
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
        return tolerance.close(b, a, rtol)

    def refuse(kinds: tuple[str, ...], why: str) -> None:
        for kind in kinds:
            arch.refused.setdefault(kind, why)

    for (kind, _layer), count in calls.items():
        if count > 1:  # one module used twice (a norm shared by embeddings and output, say)
            refuse((kind,), f"its module runs {count} times in one forward pass, so the site is ambiguous")

    if len(hs) != n + 1:
        refuse(("block_in", "block_out", "final_norm"),
               f"HF returns {len(hs)} hidden states for {n} blocks")
        check_batching(hf_model, arch)
        return
    if n > 1 and all(("block_out", L) in got and close(got["block_out", L], hs[L]) for L in range(n - 1)):
        # Mamba-style hidden_states: block L's output at index L, no embeddings entry. The
        # block sites are right; only hf coordinates, which index hidden_states, are not.
        arch.hf_refused = ("HF's hidden_states start at block 0's output (no embeddings entry), so hf "
                           "coordinates' feature_layer does not name the same tensor as in other models; "
                           "use transformer_lens coordinates")
        hs = [got["block_in", 0], *hs] if ("block_in", 0) in got else hs
    for L in range(n):
        if ("block_in", L) in got and not close(got["block_in", L], hs[L]):
            refuse(("block_in",), f"block {L}'s input is not HF's hidden_states[{L}]")
        if n - 1 > L and ("block_out", L) in got and not close(got["block_out", L], hs[L + 1]):
            refuse(("block_out",), f"block {L}'s output is not HF's hidden_states[{L + 1}]")
        keys = [("block_in", L), ("block_out", L), ("attn_write", L), ("mlp_write", L)]
        if all(k in got for k in keys):
            parts = [got[k] for k in keys]
            same = all(t.shape == parts[0].shape for t in parts)  # hyper-connections widen the stream
            if not same or not close(parts[0] + parts[2] + parts[3], parts[1]):
                refuse(("attn_write", "mlp_write"),
                       "a block's output is not its input plus its attention and MLP outputs")
    final = got.get(("final_norm", n))
    if final is None or not close(final, hs[-1]):
        refuse(("final_norm",), "HF's last hidden state is not the final norm's output")
    check_batching(hf_model, arch)


def check_batching(hf_model: nn.Module, arch: Architecture) -> None:
    """Check what the engine's batches assume, on two short inputs; refuse by name what fails.

    A left-padded batch (attention mask, positions counting real tokens) must give each
    input's logits alone, or every unit is refused (``batch_refused``). The model's own
    cache, filled over left-padded prefixes, repeated once per row and continued over
    the rest, must give them too, or the ``kv`` route is refused (``kv_refused``): a
    state-space or hybrid model whose cache cannot do that is served by ``full`` alone.
    """
    vocab = int(hf_model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
    first = next(hf_model.parameters())
    dev = first.device
    # Another batch shape rounds differently: ~1e-6 of the logits' scale in float32, ~1e-2 in
    # half precision. Padding that leaks into real tokens moves them by far more.
    rtol = 1e-4 if first.dtype in (torch.float32, torch.float64) else 5e-2

    def close(a: Tensor, b: Tensor) -> bool:
        return tolerance.close(b, a, rtol)

    rows = [[(7 * j + 3) % vocab for j in range(7)], [(5 * j + 11) % vocab for j in range(5)]]
    split = [4, 2]  # prefix lengths for the cache
    pad = vocab // 2 + 1  # masked out; not id 0, whose embedding row a model may keep at zero

    def padded(seqs: list[list[int]], before: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        width = max(len(r) for r in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, r in enumerate(seqs):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        return ids.to(dev), mask.to(dev), ((mask.cumsum(-1) - 1).clamp(min=0) + before).to(dev)

    try:
        with torch.inference_mode():
            alone = [hf_model(input_ids=torch.tensor([r], device=dev)).logits[0, -1].float() for r in rows]
            ids, mask, pos = padded(rows)
            batch = hf_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
    except Exception as e:
        arch.batch_refused = f"a left-padded batch fails in the model's own forward ({type(e).__name__}: {e})"
        return
    if not all(close(batch[i], alone[i]) for i in range(len(rows))):
        arch.batch_refused = ("a left-padded batch does not give each input's own numbers in the model's "
                              "own forward (the padding leaks into real tokens)")
        return
    try:
        from transformers import DynamicCache

        with torch.inference_mode():
            ids, mask, pos = padded([r[:q] for r, q in zip(rows, split, strict=True)])
            cache = DynamicCache(config=hf_model.config)  # type: ignore[arg-type]
            hf_model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                     use_cache=True)
            cache.batch_repeat_interleave(2)
            rest = [r[q:] for r, q in zip(rows, split, strict=True)]
            assert len({len(r) for r in rest}) == 1
            twice = lambda t: t.repeat_interleave(2, 0)  # noqa: E731
            sids = twice(torch.tensor(rest, device=dev))
            spos = twice(torch.tensor(split, device=dev)[:, None] + torch.arange(3, device=dev))
            smask = twice(torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype, device=dev)], 1))
            out = hf_model(input_ids=sids, attention_mask=smask, position_ids=spos, past_key_values=cache,
                           use_cache=True).logits[:, -1].float()
    except Exception as e:
        arch.kv_refused = (f"its cache cannot continue a left-padded prefix "
                           f"({type(e).__name__}: {str(e)[:120]})")
        return
    if not all(close(out[i], alone[i // 2]) for i in range(4)):
        arch.kv_refused = ("its cache, continued from a left-padded prefix, does not give the full "
                           "forward's numbers")
