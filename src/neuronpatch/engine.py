"""The patching engine: does a prediction head *use* the unit it predicts?

Activation patching answers a causal question that correlation cannot. For
each input we record the unit's clean activation ``a`` and the head's clean
prediction ``p``; then we overwrite the unit (``a ↦ α·a + β``: scale, set, zero,
add or mean-ablate) at the patched position, let the change flow through the
rest of the model up to where the head reads its features, and record the new
prediction ``p'``. If the head reads the unit, ``p' − p`` follows ``a' − a``.

How the work is laid out (never one full forward per (input, value), as a
hand-written loop would):

1. **One clean pass** over the inputs, right-padded into batches. In a causal
   model no real position attends to a later one, so right padding changes no
   number at a real position; the last *real* token of each row is read. The
   pass stops as soon as the last hook it needs has fired.
2. **The patched rows** (inputs × interventions) then go through the model
   together, in chunks of ``batch_size`` rows, by the cheapest exact route:

   ``upstream``  the head reads at or before the unit: nothing can change, no
                 forward at all, the slope is exactly 0;
   ``linear``    the head reads the residual stream right after the unit: the
                 patched features are the clean ones plus ``Δa`` times the
                 unit's write direction, no forward at all;
   ``recompute`` restart from the residual stream entering the unit's block
                 (saved by the clean pass) and stop where the features are read;
   ``full``      a whole forward per patched row (reference and fallback).

Hooks are only attached inside ``model.hooks(...)`` contexts and never outlive
a call. Everything is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from neuronpatch import units
from neuronpatch.errors import InputError
from neuronpatch.heads import Head, load_head
from neuronpatch.interventions import Intervention, build, normalize
from neuronpatch.models import load_model
from neuronpatch.result import ExperimentResult
from neuronpatch.stats import weight_cosine

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

Method = Literal["auto", "upstream", "linear", "recompute", "full"]
METHODS: tuple[str, ...] = ("auto", "upstream", "linear", "recompute", "full")

# The seed notebook's eight test sentences: the default inputs.
DEFAULT_INPUTS: tuple[str, ...] = (
    "The cat sat on the mat.",
    "Machine learning models can be difficult to interpret.",
    "Transformers use attention mechanisms to process sequences.",
    "Neural networks have revolutionized artificial intelligence research.",
    "The quick brown fox jumps over the lazy dog.",
    "Researchers work to make AI systems more transparent and explainable.",
    "Scientists study the complex patterns in large language models.",
    "Mechanistic interpretability aims to understand how neural networks work internally.",
)

# A unit whose clean activation is this small cannot be moved by scaling.
_SILENT = 1e-6


class _Stop(Exception):
    """Raised from a capture hook once everything needed has been read."""


@dataclass(frozen=True)
class Encoded:
    """Tokenized inputs with the positions the experiment uses."""

    ids: list[list[int]]
    read_pos: list[int]
    patch_pos: list[list[int]]  # patched positions per input
    measure_pos: list[int]  # where the unit's activation change is measured


def encode(
    model: TransformerBridge,
    texts: Sequence[str],
    *,
    prepend_bos: bool,
    token_pos: str | int,
    position: str | int,
) -> Encoded:
    """Tokenize with the model's own HF tokenizer and resolve positions.

    Raises:
        InputError: an empty input, one longer than the model's context, or a
            position outside an input.
    """
    tok = model.tokenizer
    n_ctx = int(model.cfg.n_ctx)
    ids_all, read, patch, measure = [], [], [], []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"input {i} is {type(text).__name__}, expected a string")
        ids = list(tok.encode(text, add_special_tokens=False))
        if prepend_bos:
            if tok.bos_token_id is None:
                raise InputError("prepend_bos is true but the tokenizer has no BOS token")
            ids = [int(tok.bos_token_id), *ids]
        if not ids or not text.strip():
            raise InputError(f"input {i} ({text!r}) is empty; every input needs at least one token")
        if len(ids) > n_ctx:
            raise InputError(f"input {i} ({_short(text)!r}) has {len(ids)} tokens; the model's "
                             f"context is {n_ctx} tokens")
        n = len(ids)
        r = _resolve(token_pos, n, what="token_pos", i=i, text=text)
        if position == "all":
            p = list(range(n))
            m = r
        else:
            one = _resolve(position, n, what="position", i=i, text=text)
            p, m = [one], one
        ids_all.append(ids)
        read.append(r)
        patch.append(p)
        measure.append(m)
    if not ids_all:
        raise InputError("no inputs given; expected at least one text")
    return Encoded(ids_all, read, patch, measure)


def _resolve(pos: str | int, n: int, *, what: str, i: int, text: str) -> int:
    if pos == "last":
        return n - 1
    if isinstance(pos, bool) or not isinstance(pos, int):
        raise InputError(f"{what} {pos!r} is invalid; expected 'last', 'all' or an integer")
    p = pos + n if pos < 0 else pos
    if not 0 <= p < n:
        raise InputError(f"{what} {pos} is outside input {i} ({_short(text)!r}, {n} tokens)")
    return p


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


@dataclass(frozen=True)
class Plan:
    """Where to patch, where to read, and which route the patched rows take."""

    unit_hook: str
    neuron: int
    feature_hook: str
    start_layer: int
    method: str
    direction: Tensor | None  # the unit's write direction in the residual stream


def plan(head: Head, model: TransformerBridge, method: str = "auto") -> Plan:
    """Choose hooks and the cheapest exact route for ``head`` on ``model``."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown; expected one of {', '.join(METHODS)}")
    cfg = head.config
    n_layers = int(model.cfg.n_layers)
    unit = units.unit_hook(cfg.target_layer, cfg.layer_type)
    feature = head.feature_hook(n_layers)
    direction = write_direction(model, cfg.target_layer, cfg.target_neuron, cfg.layer_type)
    unit_order = units.hook_order(unit, n_layers=n_layers)
    feat_order = units.hook_order(feature, n_layers=n_layers)
    upstream = feat_order < unit_order
    # Straight after the unit, in the residual stream, with nothing nonlinear between.
    after = (cfg.target_layer + 1, 0)
    linear = direction is not None and feature.endswith("hook_resid_pre") and (
        (feat_order == after and cfg.layer_type in ("post", "mlp_post", "mlp_out", "resid_post"))
        or (feat_order == unit_order and cfg.layer_type == "resid_pre")
    )
    if method == "auto":
        method = "upstream" if upstream else "linear" if linear else "recompute"
    elif method == "upstream" and not upstream:
        raise ValueError(f"method 'upstream' needs a head that reads before {unit}; it reads {feature}")
    elif method == "linear" and not linear:
        raise ValueError(f"method 'linear' needs a head reading the residual stream right after {unit}")
    if method == "recompute" and model.cfg.positional_embedding_type != "standard":
        method = "full"  # blocks of rotary models need position embeddings passed in
    return Plan(unit, cfg.target_neuron, feature, cfg.target_layer, method, direction)


def write_direction(
    model: TransformerBridge, layer: int, neuron: int, layer_type: str
) -> Tensor | None:
    """The residual-stream direction a unit writes to (None for pre-activations).

    An MLP neuron writes its row of ``W_out``; a residual-stream unit is its own
    basis vector.
    """
    if layer_type in ("post", "mlp_post"):
        return model.W_out[layer, neuron].detach().float().clone()
    if layer_type in ("pre", "mlp_pre"):
        return None
    e = torch.zeros(int(model.cfg.d_model))
    e[neuron] = 1.0
    return e


@dataclass
class _Clean:
    """What the clean pass keeps per input (cropped to the input's length)."""

    unit: list[Tensor]  # [n_tokens] the unit's activation at every position
    features: list[Tensor]  # [width] features (or logits) at the read position
    resid: list[Tensor]  # [n_tokens, d_model] residual entering the start block, if needed


def _batches(n: int, size: int) -> Iterator[range]:
    for lo in range(0, n, size):
        yield range(lo, min(n, lo + size))


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _run_to(
    model: TransformerBridge,
    fwd_hooks: list[tuple[str, Callable[..., Any]]],
    forward: Callable[[], Any],
) -> None:
    """Run ``forward`` with hooks attached; a capture hook may end it early."""
    with torch.inference_mode(), model.hooks(fwd_hooks=fwd_hooks):
        try:
            forward()
        except _Stop:
            pass


def _clean_pass(
    model: TransformerBridge, p: Plan, enc: Encoded, batch_size: int, *, need_resid: bool
) -> _Clean:
    wanted = {"unit": p.unit_hook, "features": p.feature_hook}
    if need_resid:
        wanted["resid"] = f"blocks.{p.start_layer}.hook_resid_pre"
    clean = _Clean([], [], [])
    for chunk in _batches(len(enc.ids), batch_size):
        rows = [enc.ids[i] for i in chunk]
        read = torch.tensor([enc.read_pos[i] for i in chunk])
        got: dict[str, Tensor] = {}

        def grab(key: str, got: dict[str, Tensor] = got, read: Tensor = read) -> Callable[..., None]:
            def hook(act: Tensor, hook: Any) -> None:
                if key == "unit":
                    got[key] = act[..., p.neuron].detach().clone()
                elif key == "features":
                    got[key] = act[torch.arange(act.shape[0]), read].detach().clone()
                else:
                    got[key] = act.detach().clone()
                if len(got) == len(wanted):
                    raise _Stop  # nothing later in the forward is needed

            return hook

        tokens = _pad(rows, 0)
        hooks = [(name, grab(key)) for key, name in wanted.items()]
        _run_to(model, hooks, lambda tokens=tokens: model(tokens, return_type=None))
        for k, i in enumerate(chunk):
            n = len(enc.ids[i])
            clean.unit.append(got["unit"][k, :n])
            clean.features.append(got["features"][k])
            if need_resid:
                clean.resid.append(got["resid"][k, :n])
    return clean


def _patch_hook(
    neuron: int, mask: Tensor, alpha: Tensor, beta: Tensor, measure: Tensor, out: dict[str, Tensor]
) -> Callable[..., Tensor]:
    """A hook setting ``a ↦ α·a + β`` at the masked positions of each row."""

    def hook(act: Tensor, hook: Any) -> Tensor:
        col = act[..., neuron]
        new = torch.where(mask, col * alpha[:, None] + beta[:, None], col)
        patched = act.clone()
        patched[..., neuron] = new
        out["activation"] = new[torch.arange(new.shape[0]), measure].detach().clone()
        if "features" in out:  # the head read before the unit: nothing later matters
            raise _Stop
        return patched

    return hook


def _patched_rows(
    model: TransformerBridge,
    head: Head,
    p: Plan,
    enc: Encoded,
    clean: _Clean,
    ivs: Sequence[Intervention],
    mean_act: float,
    batch_size: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Patched activations and features for every (input, intervention) row."""
    n_in, n_iv = len(enc.ids), len(ivs)
    affine = torch.tensor([iv.affine(mean_act) for iv in ivs], dtype=torch.float32)  # [n_iv, 2]
    pairs = [(i, j) for i in range(n_in) for j in range(n_iv)]
    acts = torch.empty(n_in, n_iv)
    feats: list[Tensor | None] = [None] * len(pairs)
    bar = _progress(len(pairs), progress)
    for chunk in _batches(len(pairs), batch_size):
        rows = [pairs[k] for k in chunk]
        ii = [i for i, _ in rows]
        alpha, beta = affine[[j for _, j in rows]].unbind(-1)
        measure = torch.tensor([enc.measure_pos[i] for i in ii])
        clean_at = torch.stack([clean.unit[i][enc.measure_pos[i]] for i in ii])
        if p.method in ("upstream", "linear"):
            # No forward: the unit's new value is the intervention applied to its clean value.
            new = clean_at * alpha + beta
            if p.method == "upstream":
                f = torch.stack([clean.features[i] for i in ii])
            else:
                assert p.direction is not None
                f = torch.stack([clean.features[i] for i in ii]) + (new - clean_at)[:, None] * p.direction
        else:
            new, f = _forward_rows(model, p, enc, clean, ii, alpha, beta, measure)
        for k, (i, j) in zip(chunk, rows, strict=True):
            acts[i, j] = new[k - chunk.start]
            feats[k] = f[k - chunk.start]
        bar.update(len(rows))
    bar.close()
    digit_ids = (torch.tensor(head.digit_token_ids(model)) if head.config.head_type == "token"
                 else None)
    preds = torch.cat([
        head.predict(torch.stack([t for t in feats[c.start:c.stop] if t is not None]), digit_ids)
        for c in _batches(len(feats), max(batch_size, 1))
    ])
    return acts.double().numpy(), preds.reshape(n_in, n_iv).double().numpy()


def _forward_rows(
    model: TransformerBridge,
    p: Plan,
    enc: Encoded,
    clean: _Clean,
    ii: list[int],
    alpha: Tensor,
    beta: Tensor,
    measure: Tensor,
) -> tuple[Tensor, Tensor]:
    """Run patched rows through the model (``recompute`` or ``full``)."""
    lengths = [len(enc.ids[i]) for i in ii]
    width = max(lengths)
    mask = torch.zeros(len(ii), width, dtype=torch.bool)
    for r, i in enumerate(ii):
        mask[r, enc.patch_pos[i]] = True
    read = torch.tensor([enc.read_pos[i] for i in ii])
    out: dict[str, Tensor] = {}

    def capture(act: Tensor, hook: Any) -> None:
        out["features"] = act[torch.arange(act.shape[0]), read].detach().clone()
        if "activation" in out:
            raise _Stop  # the rest of the forward cannot change what the head reads

    hooks = [(p.unit_hook, _patch_hook(p.neuron, mask, alpha, beta, measure, out)),
             (p.feature_hook, capture)]
    if p.method == "full":
        tokens = _pad([enc.ids[i] for i in ii], 0)
        _run_to(model, hooks, lambda: model(tokens, return_type=None))
    else:
        x = torch.zeros(len(ii), width, int(model.cfg.d_model))
        for r, i in enumerate(ii):
            x[r, : lengths[r]] = clean.resid[i]
        _run_to(model, hooks, lambda: _blocks_from(model, x, p.start_layer))
    if "features" not in out or "activation" not in out:
        raise RuntimeError(f"hooks {p.unit_hook} / {p.feature_hook} did not fire during the patched run")
    return out["activation"], out["features"]


def _blocks_from(model: TransformerBridge, x: Tensor, start: int) -> None:
    """The forward pass from block ``start`` on, through ln_final and unembed."""
    for block in model.blocks[start:]:
        y = block(x)
        x = y[0] if isinstance(y, tuple) else y
    model.unembed(model.ln_final(x))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="patched rows", unit="row", leave=False)


def run_experiment(
    head: Head | str | Path,
    inputs: Sequence[str] | None = None,
    *,
    scale: Sequence[float] | None = None,
    set: Sequence[float] | None = None,  # noqa: A002 - mirrors the probe-file key
    add: Sequence[float] | None = None,
    zero: bool = False,
    mean: bool = False,
    interventions: Sequence[Intervention] | None = None,
    position: str | int | None = None,
    model: TransformerBridge | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    method: Method = "auto",
    progress: bool = False,
) -> ExperimentResult:
    """Patch a head's unit on each input and measure how the prediction moves.

    Args:
        head: a loaded :class:`Head` or the path of a head directory.
        inputs: texts to run; defaults to the seed notebook's eight sentences.
        scale, set, add, zero, mean: interventions by kind (as in probe files).
            With none of them (and no ``interventions``), the notebook's eight
            scale factors are used.
        interventions: explicit :class:`Intervention` objects (instead of the above).
        position: where to patch: ``"last"`` real token, ``"all"`` positions, or
            an index (negative counts from the end); default the head's ``token_pos``.
        model: a bridge to use instead of loading the head's base model.
        batch_size: rows per forward pass; bounds memory.
        device: torch device for the model.
        method: ``"auto"`` picks the cheapest exact route; the others force one
            (``"full"`` is the slow reference).
        progress: show a progress bar over patched rows.

    Returns:
        The :class:`~neuronpatch.result.ExperimentResult`.

    Example:
        >>> res = run_experiment("probes/heads/demo_causal",          # doctest: +SKIP
        ...                      inputs=["The cat sat on the mat."], set=[0, 1, 2])
        >>> round(res.slope, 2), round(res.r_squared, 2)              # doctest: +SKIP
    """
    if not isinstance(head, Head):
        head = load_head(head)
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size} is invalid; expected a positive integer")
    cfg = head.config
    if model is None:
        model = load_model(cfg.base_model_name, device=device, weight_processing=cfg.weight_processing)
    head.check_model(model)
    texts = list(DEFAULT_INPUTS if inputs is None else inputs)
    if interventions is None:
        given = build(scale=scale or (), set=set or (), add=add or (), zero=zero, mean=mean)
        ivs = normalize(given or None)
    else:
        ivs = normalize(interventions)
    pos = cfg.token_pos if position is None else position
    enc = encode(model, texts, prepend_bos=cfg.prepend_bos, token_pos=cfg.token_pos, position=pos)
    p = plan(head, model, method)
    clean = _clean_pass(model, p, enc, batch_size, need_resid=p.method == "recompute")
    digit_ids = torch.tensor(head.digit_token_ids(model)) if cfg.head_type == "token" else None
    clean_act = torch.stack([u[m] for u, m in zip(clean.unit, enc.measure_pos, strict=True)])
    clean_pred = head.predict(torch.stack(clean.features), digit_ids)
    patched_mean = torch.cat([u[pp] for u, pp in zip(clean.unit, enc.patch_pos, strict=True)])
    mean_act = float(patched_mean.mean())
    act, pred = _patched_rows(model, head, p, enc, clean, ivs, mean_act, batch_size, progress)

    cos = math.nan
    if head.linear_weight is not None and p.direction is not None and not cfg.feature_hook:
        cos = weight_cosine(head.linear_weight.numpy(), p.direction.numpy())[0]
    return ExperimentResult(
        head_path=str(head.path),
        model_name=cfg.base_model_name,
        head_type=cfg.head_type,
        target_layer=cfg.target_layer,
        target_neuron=cfg.target_neuron,
        layer_type=cfg.layer_type,
        unit_hook=p.unit_hook,
        feature_hook=p.feature_hook,
        token_pos=cfg.token_pos,
        patch_position=str(pos),
        method=p.method,
        inputs=tuple(texts),
        n_tokens=tuple(len(ids) for ids in enc.ids),
        positions=tuple(enc.measure_pos),
        interventions=tuple(ivs),
        clean_activation=clean_act.double().numpy(),
        clean_prediction=clean_pred.double().numpy(),
        patched_activation=act,
        patched_prediction=pred,
        write_direction_cosine=cos,
        notes=tuple(_notes(texts, clean_act, ivs, p)),
    )


def _notes(texts: Sequence[str], clean_act: Tensor, ivs: Sequence[Intervention], p: Plan) -> list[str]:
    notes = []
    if p.method == "upstream":
        notes.append(f"the head reads {p.feature_hook}, at or before {p.unit_hook}: no patch of "
                     "the unit can reach it, so its causal slope is exactly 0")
    silent = [i for i, a in enumerate(clean_act.tolist()) if abs(a) < _SILENT]
    if silent and any(iv.kind == "scale" for iv in ivs):
        which = ", ".join(f"{i} ({_short(texts[i], 24)!r})" for i in silent[:5])
        more = f" and {len(silent) - 5} more" if len(silent) > 5 else ""
        notes.append(f"the unit is ~0 on {len(silent)} of {len(texts)} inputs ({which}{more}): "
                     "scale patches cannot move it there; use set or add interventions")
    return notes
