"""Dictionaries: sparse autoencoders (SAEs) and transcoders, read from SAELens' on-disk layout.

A head may predict a *latent* of a dictionary instead of a neuron (``layer_type: sae``,
``sae: PATH``, ``target_neuron`` the latent's index). The dictionary is a directory with
``cfg.json`` and ``sae_weights.safetensors``, as SAELens saves it:

``architecture``
    ``standard`` (ReLU), ``gated``, ``jumprelu``, ``topk`` (an SAE: reads and writes at
    ``hook_name``), or ``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder`` (reads at
    ``hook_name``, writes at ``hook_name_out``). Anything else is refused by name.
``d_in``, ``d_sae`` (and ``d_out`` for transcoders), ``hook_name`` (top level, or in
    ``metadata``), ``apply_b_dec_to_input``, ``normalize_activations`` (``none`` only),
    ``k`` for ``topk``.

Weights (``[d_in, d_sae]`` ``W_enc``, ``b_enc``, ``[d_sae, d_out]`` ``W_dec``, ``b_dec``;
``threshold`` for JumpReLU; ``b_gate``, ``r_mag``, ``b_mag`` for gated) are read with
``safetensors``, never a pickle.

A latent's value is the dictionary's encoding of the tensor at its hook, in the head's
coordinates (SAELens SAEs are trained on TransformerLens-processed activations: the
engine's default). A patch changes that value by ``Δ`` and adds ``Δ · W_dec[i]`` to the
tensor at the write hook, keeping the dictionary's reconstruction error (what SAELens'
``use_error_term`` does): an unpatched run is exactly the model's own, and a patch changes
only what the latent writes. Whether it would change which *other* latents fire, were
the dictionary re-run on the patched tensor, is not modelled: the error term keeps them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from neuronpatch.architecture import Site
from neuronpatch.errors import HeadConfigError, config_error
from neuronpatch.names import DICTIONARY_FILES

SAE_ARCHITECTURES: tuple[str, ...] = ("standard", "gated", "jumprelu", "topk")
TRANSCODER_ARCHITECTURES: tuple[str, ...] = ("transcoder", "skip_transcoder", "jumprelu_transcoder")
CONFIG_FILE, WEIGHTS_FILE = DICTIONARY_FILES
# The dictionary shipped with the package: an SAE on neuronpatch-demo's blocks.1.hook_resid_post
# (trained by ``python -m neuronpatch.demo.train_sae``), named so in a head's ``sae``.
DEMO_SAE = "neuronpatch-demo-sae"
DEMO_SAE_DIR = Path(__file__).parent / "demo" / "sae"

# TransformerLens hook names → sites. ``mlp.hook_in`` (the MLP's own input, its norm's gain
# and bias included) is read only: a transcoder's input.
_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_mlp_out|hook_attn_out|"
                   r"mlp\.hook_post|mlp\.hook_in)$")
_SITES = {"hook_resid_pre": "block_in", "hook_resid_post": "block_out", "hook_mlp_out": "mlp_write",
          "hook_attn_out": "attn_write", "mlp.hook_post": "mlp_post", "mlp.hook_in": "mlp_in"}
_READ_ONLY = frozenset({"mlp_in"})
_WHY_NOT = {
    "ln2.hook_normalized": "a norm's output before its gain, which TransformerLens folds into the MLP: "
                           "not a tensor the model computes; use blocks.L.mlp.hook_in (the MLP's input)",
    "hook_resid_mid": "not one module's tensor in the HF model",
}
_WEIGHTS = {
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    "gated": ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"),
    "transcoder": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "skip_transcoder": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu_transcoder": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
}


@dataclass(frozen=True)
class DictionaryConfig:
    """The validated ``cfg.json`` of a dictionary directory."""

    path: Path
    architecture: str
    d_in: int
    d_sae: int
    d_out: int
    read: Site  # where the latents are encoded from
    write: Site  # where a latent's change is written (the read site for an SAE)
    hook_name: str
    apply_b_dec_to_input: bool = False
    k: int | None = None  # topk

    @property
    def transcoder(self) -> bool:
        return self.architecture in TRANSCODER_ARCHITECTURES

    @property
    def activation(self) -> str:
        """``relu``, ``jumprelu``, ``gated`` or ``topk``: how the pre-activations become latents."""
        return {"standard": "relu", "transcoder": "relu", "skip_transcoder": "relu",
                "jumprelu_transcoder": "jumprelu"}.get(self.architecture, self.architecture)


def _site(hook: Any, where: Path, key: str, *, read: bool) -> Site:
    m = _HOOK.match(hook) if isinstance(hook, str) else None
    if m is None or (not read and _SITES[m.group(2)] in _READ_ONLY):
        tail = hook.split(".", 2)[-1] if isinstance(hook, str) and hook.startswith("blocks.") else None
        why = f" ({tail}: {_WHY_NOT[tail]})" if tail in _WHY_NOT else ""
        allowed = "hook_resid_pre|hook_resid_post|hook_mlp_out|hook_attn_out|mlp.hook_post" + (
            "|mlp.hook_in (transcoder input)" if read else "")
        raise config_error(where, key, hook, f"a TransformerLens hook blocks.L.{allowed}{why}")
    return Site(_SITES[m.group(2)], int(m.group(1)))


def _positive(raw: dict[str, Any], key: str, where: Path) -> int:
    v = raw.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise config_error(where, key, v if key in raw else "<missing>", "a positive integer")
    return v


def resolve(sae: str | Path, relative_to: Path) -> Path:
    """Where a head's ``sae`` value points: the shipped demo dictionary by name, an absolute
    path, or a path relative to ``relative_to`` (the head's directory)."""
    if str(sae) == DEMO_SAE:
        return DEMO_SAE_DIR
    return Path(sae) if Path(sae).is_absolute() else relative_to / sae


def read_config(path: str | Path) -> DictionaryConfig:
    """Read and validate a dictionary directory's ``cfg.json`` (weights are not read).

    Raises:
        HeadConfigError: a missing file, an unknown architecture or hook, a bad value.
    """
    path = DEMO_SAE_DIR if str(path) == DEMO_SAE else Path(path)
    where = path / CONFIG_FILE
    if not where.is_file():
        raise HeadConfigError(f"{path}: not a dictionary directory (no {CONFIG_FILE}; SAELens' layout "
                              f"is {CONFIG_FILE} + {WEIGHTS_FILE})")
    try:
        raw = json.loads(where.read_text())
    except (OSError, ValueError) as e:
        raise HeadConfigError(f"{where}: not readable JSON ({e})") from e
    if not isinstance(raw, dict):
        raise HeadConfigError(f"{where}: expected a JSON object at the top level")
    arch = raw.get("architecture", "standard")
    every = SAE_ARCHITECTURES + TRANSCODER_ARCHITECTURES
    if arch not in every:
        raise config_error(where, "architecture", arch, "one of " + ", ".join(every))
    act = raw.get("activation_fn_str", raw.get("activation_fn"))
    kwargs = raw.get("activation_fn_kwargs") or {}
    if arch == "standard" and act == "topk":  # older SAELens: a standard SAE with a topk activation
        arch, raw = "topk", {**raw, "k": raw.get("k", kwargs.get("k"))}
    elif act not in (None, "relu") and arch in ("standard", "transcoder", "skip_transcoder"):
        raise config_error(where, "activation_fn_str", act, "relu (or topk)")
    norm = raw.get("normalize_activations", "none")
    if norm not in ("none", None):
        raise config_error(where, "normalize_activations", norm,
                           "none (a run-time normalisation makes a latent's write depend on the input's "
                           "norm; fold it into the weights first)")
    meta: dict[str, Any] = raw["metadata"] if isinstance(raw.get("metadata"), dict) else {}
    hook = raw.get("hook_name", meta.get("hook_name"))
    if raw.get("hook_head_index", meta.get("hook_head_index")) is not None:
        raise config_error(where, "hook_head_index", raw.get("hook_head_index", meta.get("hook_head_index")),
                           "null (per-head SAEs are not served)")
    read = _site(hook, where, "hook_name", read=arch in TRANSCODER_ARCHITECTURES)
    d_in, d_sae = _positive(raw, "d_in", where), _positive(raw, "d_sae", where)
    if arch in TRANSCODER_ARCHITECTURES:
        hook_out = raw.get("hook_name_out", meta.get("hook_name_out"))
        write = _site(hook_out, where, "hook_name_out", read=False)
        if write.order(10**6) <= read.order(10**6):
            raise config_error(where, "hook_name_out", hook_out,
                               f"a hook after {hook} (the transcoder's input)")
        d_out = _positive(raw, "d_out", where) if "d_out" in raw else d_in
    else:
        write, d_out = read, d_in
    k = None
    if arch == "topk":
        k = _positive(raw, "k", where)
        if k > d_sae:
            raise config_error(where, "k", k, f"at most d_sae = {d_sae}")
        if raw.get("rescale_acts_by_decoder_norm"):
            raise config_error(where, "rescale_acts_by_decoder_norm", True, "false")
    b_dec_in = raw.get("apply_b_dec_to_input", False)
    if not isinstance(b_dec_in, bool):
        raise config_error(where, "apply_b_dec_to_input", b_dec_in, "true or false")
    return DictionaryConfig(path=path, architecture=arch, d_in=d_in, d_sae=d_sae, d_out=d_out, read=read,
                            write=write, hook_name=str(hook),
                            apply_b_dec_to_input=b_dec_in and arch not in TRANSCODER_ARCHITECTURES, k=k)


class RowWrites:
    """A set of units whose every change ``Δ`` writes ``Δ`` times the unit's own row, the same at
    every token: a dictionary's latents, a router's logits. (An expert's neurons are not:
    :class:`~neuronpatch.experts.ExpertNeurons` scales each write by the token's routing weight.)

    The engine asks every unit set for ``encode``, ``rows``, ``W_dec`` and these.
    """

    linear = True  # a change writes the same direction at every token (the linear route may serve it)
    routed = False  # every unit exists at every token
    sparse = False  # most units are zero on most tokens (see ExperimentResult.active_inputs)
    width: int

    def gain(self, t: Tensor, cols: Tensor | None = None) -> Tensor:
        """``[..., S]``: what a write is scaled by at each token of ``t``: 1."""
        return torch.ones(t.shape[:-1], device=t.device)

    def write_scale(self, t: Tensor) -> Tensor:
        """``[..., width]``: what a change of 1 in each unit writes along its row at each token: 1."""
        return torch.ones(*t.shape[:-1], self.width, device=t.device)

    def written(self, t: Tensor, cols: Tensor, delta: Tensor) -> Tensor:
        """``[R, S]``: the change a unit's value change ``delta`` writes along its row: ``delta``."""
        return delta


class Dictionary(RowWrites):
    """A loaded dictionary: its latents from a tensor, and each latent's decoder row.

    Weights are float32 on ``device``; tensors are encoded in float32.
    """

    sparse = True

    def __init__(self, cfg: DictionaryConfig, weights: dict[str, Tensor]) -> None:
        self.cfg = cfg
        self.w = weights
        self.width = cfg.d_sae

    @property
    def W_dec(self) -> Tensor:
        return self.w["W_dec"]

    def pre(self, x: Tensor, cols: Tensor | None = None, *, gate: bool = False) -> Tensor:
        """Pre-activations ``[..., d_sae]``; with ``cols [R]`` (``x [R, S, d_in]``) only column
        ``cols[r]`` of row ``r``: ``[R, S]``. Gated: the magnitude path, or with ``gate`` the gate."""
        w = self.w
        x = x.float()
        if self.cfg.apply_b_dec_to_input:
            x = x - w["b_dec"]
        if gate:
            W, b = w["W_enc"], w["b_gate"]
        elif self.cfg.activation == "gated":
            W, b = w["W_enc"] * torch.exp(w["r_mag"]), w["b_mag"]
        else:
            W, b = w["W_enc"], w["b_enc"]
        if cols is None:
            return x @ W + b
        return torch.einsum("rsd,dr->rs", x, W[:, cols]) + b[cols][:, None]

    def encode(self, x: Tensor, cols: Tensor | None = None) -> Tensor:
        """Latent values of ``x [..., d_in]``: ``[..., d_sae]``, or ``[R, S]`` with ``cols [R]``.

        Example (a ReLU SAE is ``relu((x − b_dec·apply) @ W_enc + b_enc)``)::

            >>> d.encode(torch.zeros(1, 1, d.cfg.d_in)).shape   # doctest: +SKIP
            torch.Size([1, 1, 16])
        """
        act = self.cfg.activation
        if act == "topk":  # which latents are in the top k depends on all of them
            pre = self.pre(x)
            top = pre.topk(self.cfg.k or 1, dim=-1)
            out = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
            if cols is None:
                return out
            return out.gather(-1, cols[:, None, None].expand(-1, out.shape[1], 1))[..., 0]
        pre = self.pre(x, cols)
        if act == "relu":
            return pre.relu()
        if act == "jumprelu":
            th = self.w["threshold"] if cols is None else self.w["threshold"][cols][:, None]
            return pre.relu() * (pre > th)
        return pre.relu() * (self.pre(x, cols, gate=True) > 0)  # gated

    def rows(self, cols: Tensor) -> Tensor:
        """``[R, d_out]``: the decoder row of each row's latent."""
        return self.W_dec[cols]

    def label(self, i: int) -> str:
        return f"latent {i}"

    @property
    def hook(self) -> str:
        """The TransformerLens hook the latents are read from."""
        return self.cfg.hook_name



_LOADED: dict[tuple[str, float, str], Dictionary] = {}


def load(path: str | Path, device: torch.device | str = "cpu") -> Dictionary:
    """Load a dictionary directory (``cfg.json`` + ``sae_weights.safetensors``), checked, on ``device``.

    Loaded once per directory, file time and device.

    Raises:
        HeadConfigError: a bad config, a missing or unreadable weights file, a missing tensor
            or one of the wrong shape.
    """
    cfg = read_config(path)
    wfile = cfg.path / WEIGHTS_FILE
    if not wfile.is_file():
        raise HeadConfigError(f"{cfg.path}: no {WEIGHTS_FILE} (SAELens' layout is {CONFIG_FILE} + "
                              f"{WEIGHTS_FILE})")
    key = (str(wfile), wfile.stat().st_mtime, str(device))
    if key in _LOADED:
        return _LOADED[key]
    from safetensors.torch import load_file

    try:
        raw = load_file(str(wfile))
    except Exception as e:
        raise HeadConfigError(f"{wfile}: not a readable safetensors file ({e})") from e
    shapes = {"W_enc": (cfg.d_in, cfg.d_sae), "W_dec": (cfg.d_sae, cfg.d_out), "b_dec": (cfg.d_out,)}
    weights: dict[str, Tensor] = {}
    for name in _WEIGHTS[cfg.architecture]:
        if name not in raw:
            raise HeadConfigError(f"{wfile}: no tensor {name!r} (a {cfg.architecture} dictionary has "
                                  f"{', '.join(_WEIGHTS[cfg.architecture])})")
        want = shapes.get(name, (cfg.d_sae,))
        if tuple(raw[name].shape) != want:
            raise HeadConfigError(f"{wfile}: tensor {name!r} has shape {tuple(raw[name].shape)}; expected "
                                  f"{want} (from {CONFIG_FILE}: d_in {cfg.d_in}, d_sae {cfg.d_sae}"
                                  + (f", d_out {cfg.d_out}" if cfg.transcoder else "") + ")")
        weights[name] = raw[name].to(device=device, dtype=torch.float32)
    out = _LOADED[key] = Dictionary(cfg, weights)
    return out


def save(path: str | Path, cfg: dict[str, Any], weights: dict[str, Tensor]) -> Path:
    """Write a dictionary in SAELens' layout (``cfg.json`` + ``sae_weights.safetensors``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in weights.items()}
    save_file(tensors, str(path / WEIGHTS_FILE))
    return path
