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

import contextlib
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

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

Method = Literal["auto", "upstream", "linear", "sparse", "recompute", "full"]
METHODS: tuple[str, ...] = ("auto", "upstream", "linear", "sparse", "recompute", "full")

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


def plan(head: Head, model: TransformerBridge, method: str = "auto", position: str | int = "last",
         *, patch_is_read: bool = True) -> Plan:
    """Choose hooks and the cheapest exact route for ``head`` on ``model``.

    ``patch_is_read`` says that every input is patched exactly at the position
    the head reads; only then does a patch reach the features linearly.
    """
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
    linear = patch_is_read and direction is not None and feature.endswith("hook_resid_pre") and (
        (feat_order == after and cfg.layer_type in ("post", "mlp_post", "mlp_out", "resid_post"))
        or (feat_order == unit_order and cfg.layer_type == "resid_pre")
    )
    # Recomputing only the patched position onward needs one patched position, a causal
    # model, and absolute position embeddings (already inside the saved residual stream).
    standard = (model.cfg.positional_embedding_type == "standard"
                and getattr(model.cfg, "attention_dir", "causal") == "causal")
    sparse = position != "all" and standard
    if method == "auto":
        method = ("upstream" if upstream else "linear" if linear
                  else "sparse" if sparse else "recompute")
    elif method == "upstream" and not upstream:
        raise ValueError(f"method 'upstream' needs a head that reads before {unit}; it reads {feature}")
    elif method == "linear" and not linear:
        raise ValueError(f"method 'linear' needs a head reading the residual stream right after "
                         f"{unit}, at the patched position")
    elif method == "sparse" and not sparse:
        method = "recompute"  # e.g. position "all": every position changes, recompute them all
    if method == "recompute" and not standard:
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
        # One block's W_out, not model.W_out: that stacks every layer's matrix first.
        return model.blocks[layer].mlp.W_out[neuron].detach().float().clone()
    if layer_type in ("pre", "mlp_pre"):
        return None
    e = torch.zeros(int(model.cfg.d_model))
    e[neuron] = 1.0
    return e


@dataclass
class _Clean:
    """What the clean pass keeps per input (cropped to what the patched rows need)."""

    unit: list[Tensor]  # [n_tokens] the unit's activation at every position
    features: list[Tensor]  # [width] features (or logits) at the read position
    resid: list[Tensor]  # [n_tokens, d_model] residual entering the start block
    kv: list[dict[int, tuple[Tensor, Tensor]]]  # layer -> clean (k, v) [heads, p, d_head]


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
    with torch.inference_mode(), model.hooks(fwd_hooks=fwd_hooks), contextlib.suppress(_Stop):
        forward()


def _last_block(p: Plan, n_layers: int) -> int:
    """The last block a patched row must run through before its features are read."""
    layer = units.hook_layer(p.feature_hook)
    if layer is None:
        return n_layers - 1  # ln_final / unembed: every block
    order = units.hook_order(p.feature_hook, n_layers=n_layers)
    return layer - 1 if order == (layer, 0) else layer  # resid_pre L is block L-1's output


def _clean_pass(
    model: TransformerBridge, p: Plan, enc: Encoded, chunk: range, *, stop_at_unit: bool = False
) -> _Clean:
    """One batched clean forward over ``chunk`` of the inputs, capturing what is needed."""
    n_layers = int(model.cfg.n_layers)
    n_heads, d_head = int(model.cfg.n_heads), int(model.cfg.d_head)
    wanted: dict[str, str] = {"unit": p.unit_hook}
    if not stop_at_unit:
        wanted["features"] = p.feature_hook
        if p.method in ("recompute", "sparse"):
            wanted["resid"] = f"blocks.{p.start_layer}.hook_resid_pre"
        if p.method == "sparse":
            # Every block the patched rows enter needs the clean prefix keys/values.
            for layer in range(p.start_layer, max(p.start_layer, _last_block(p, n_layers)) + 1):
                wanted[f"k{layer}"] = f"blocks.{layer}.attn.hook_k"
                wanted[f"v{layer}"] = f"blocks.{layer}.attn.hook_v"
    read = tuple(enc.read_pos[i] for i in chunk)
    rows = tuple(tuple(enc.ids[i]) for i in chunk)
    # What each capture is called in the clean-run cache: same hook, same slice, same tensor.
    names = {key: (key if key in ("unit", "features") else "full", hook,
                   p.neuron if key == "unit" else read if key == "features" else None)
             for key, hook in wanted.items()}
    store = _clean_store(model, rows)
    missing = {key: hook for key, hook in wanted.items() if names[key] not in store}
    if missing:
        got: dict[str, Tensor] = {}
        read_t = torch.tensor(read)

        def grab(key: str) -> Callable[..., None]:
            def hook(act: Tensor, hook: Any) -> None:
                if key == "unit":
                    got[key] = act[..., p.neuron].detach().clone()
                elif key == "features":
                    got[key] = act[torch.arange(act.shape[0]), read_t].detach().clone()
                else:
                    got[key] = act.detach().clone()
                if len(got) == len(missing):
                    raise _Stop  # nothing later in the forward is needed

            return hook

        tokens = _pad(rows, 0)
        _run_to(model, [(hook, grab(key)) for key, hook in missing.items()],
                lambda: model(tokens, return_type=None))
        for key, tensor in got.items():
            store[names[key]] = tensor
        _evict(model)
    got = {key: store[names[key]] for key in wanted}
    clean = _Clean([], [], [], [])
    for k, i in enumerate(chunk):
        n = len(enc.ids[i])
        clean.unit.append(got["unit"][k, :n])
        if stop_at_unit:
            continue
        clean.features.append(got["features"][k])
        if "resid" in got:
            clean.resid.append(got["resid"][k, :n])
        kv: dict[int, tuple[Tensor, Tensor]] = {}
        prefix = enc.patch_pos[i][0]
        for key in wanted:
            if key.startswith("k"):
                layer = int(key[1:])
                # [pos, heads, d_head] (or [pos, d_model]) → [heads, prefix, d_head]
                kk, vv = got[key][k, :prefix], got[f"v{layer}"][k, :prefix]
                kv[layer] = (kk.reshape(prefix, n_heads, d_head).transpose(0, 1),
                             vv.reshape(prefix, n_heads, d_head).transpose(0, 1))
        clean.kv.append(kv)
    return clean


# Clean runs are shared by every experiment on the same model and token rows (probes on
# one head and input set, a mean-ablation pre-pass, repeated runs): per model, an LRU of
# captured tensors keyed by the rows, bounded in bytes.
CLEAN_CACHE_BYTES = 256 * 2**20
_CLEAN_CACHE: weakref.WeakKeyDictionary[Any, OrderedDict[Any, dict[Any, Tensor]]] = (
    weakref.WeakKeyDictionary())


def _clean_store(model: TransformerBridge, rows: tuple[tuple[int, ...], ...]) -> dict[Any, Tensor]:
    per_model = _CLEAN_CACHE.setdefault(model, OrderedDict())
    store = per_model.setdefault(rows, {})
    per_model.move_to_end(rows)
    return store


def _evict(model: TransformerBridge) -> None:
    per_model = _CLEAN_CACHE[model]
    size = sum(t.numel() * t.element_size() for s in per_model.values() for t in s.values())
    while size > CLEAN_CACHE_BYTES and len(per_model) > 1:
        _, dropped = per_model.popitem(last=False)
        size -= sum(t.numel() * t.element_size() for t in dropped.values())


def clear_clean_cache() -> None:
    """Forget every cached clean run (for benchmarks that time the clean pass itself)."""
    _CLEAN_CACHE.clear()


class _PrefixCache:
    """Stands in for a KV cache: prepends the clean run's keys/values of earlier positions.

    The bridge's attention calls ``update(k, v, layer_idx)`` with the keys and
    values of the positions being computed and attends over what it returns,
    with a causal mask offset by the prefix length.
    """

    def __init__(self, kv: dict[int, tuple[Tensor, Tensor]]) -> None:
        self.kv = kv

    def update(self, k: Tensor, v: Tensor, layer_idx: int, *args: Any, **kwargs: Any
               ) -> tuple[Tensor, Tensor]:
        pk, pv = self.kv[layer_idx]
        return torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)


def _patch_hook(neuron: int, mask: Tensor, target: Tensor, out: dict[str, Tensor]
                ) -> Callable[..., Tensor]:
    """A hook writing ``target`` into the unit at the masked positions of each row.

    Targets are computed from the clean run (``α·a_clean + β``), so the change
    in activation is exact: a patch that changes nothing changes nothing.
    """

    def hook(act: Tensor, hook: Any) -> Tensor:
        patched = act.clone()
        patched[..., neuron] = torch.where(mask, target.to(act.dtype), act[..., neuron])
        out["patched"] = torch.ones(())
        if "features" in out:  # the head read before the unit: nothing later matters
            raise _Stop
        return patched

    return hook


def _patched_rows(
    model: TransformerBridge,
    p: Plan,
    enc: Encoded,
    chunk: range,
    clean: _Clean,
    affine: Tensor,
    batch_size: int,
) -> tuple[Tensor, Tensor]:
    """Patched activations ``[n, n_iv]`` and features ``[n * n_iv, width]`` for a chunk.

    ``affine[k, j]`` is ``(α, β)`` of intervention ``j`` on input ``chunk[k]``.
    """
    n_iv = affine.shape[1]
    # Rows sharing a prefix/suffix shape can share a forward (sparse route).
    pairs = [(k, j) for k in range(len(chunk)) for j in range(n_iv)]
    if p.method == "sparse":
        pairs.sort(key=lambda kj: (enc.patch_pos[chunk[kj[0]]][0], enc.read_pos[chunk[kj[0]]]))
    acts = torch.empty(len(chunk), n_iv)
    feats: list[Tensor] = [torch.empty(0)] * (len(chunk) * n_iv)
    for rows in _row_batches(pairs, batch_size, p, enc, chunk):
        kk = [k for k, _ in rows]
        alpha, beta = affine[kk, [j for _, j in rows]].unbind(-1)
        clean_at = torch.stack([clean.unit[k][enc.measure_pos[chunk[k]]] for k in kk])
        clean_f = torch.stack([clean.features[k] for k in kk])
        new = clean_at * alpha + beta  # the unit's patched value where it is measured
        if p.method == "upstream":
            f = clean_f  # the head reads before the unit: nothing to run
        elif p.method == "linear":
            assert p.direction is not None
            f = clean_f + (new - clean_at)[:, None] * p.direction
        else:
            f = _forward_rows(model, p, enc, chunk, clean, kk, alpha, beta, clean_f)
        for r, (k, j) in enumerate(rows):
            acts[k, j] = new[r]
            feats[k * n_iv + j] = f[r]
    return acts, torch.stack(feats)


def _row_batches(
    pairs: list[tuple[int, int]], size: int, p: Plan, enc: Encoded, chunk: range
) -> Iterator[list[tuple[int, int]]]:
    """Bounded batches of rows; for the sparse route, rows of one prefix/suffix shape."""
    batch: list[tuple[int, int]] = []
    shape: tuple[int, int] | None = None
    for k, j in pairs:
        i = chunk[k]
        this = (enc.patch_pos[i][0], enc.read_pos[i]) if p.method == "sparse" else (0, 0)
        if batch and (len(batch) == size or this != shape):
            yield batch
            batch = []
        batch.append((k, j))
        shape = this
    if batch:
        yield batch


def _forward_rows(
    model: TransformerBridge,
    p: Plan,
    enc: Encoded,
    chunk: range,
    clean: _Clean,
    kk: list[int],
    alpha: Tensor,
    beta: Tensor,
    clean_f: Tensor,
) -> Tensor:
    """Features of patched rows, run through the model (``sparse``, ``recompute``, ``full``)."""
    ii = [chunk[k] for k in kk]
    cache: _PrefixCache | None = None
    if p.method == "sparse":
        first, read0 = enc.patch_pos[ii[0]][0], enc.read_pos[ii[0]]
        if read0 < first:
            return clean_f  # patched after the read position: causally invisible to the head
        # Only positions first..read change; earlier ones come from the clean run's K/V.
        width = read0 - first + 1
        mask = torch.zeros(len(ii), width, dtype=torch.bool)
        mask[:, 0] = True
        unit = torch.stack([clean.unit[k][first : read0 + 1] for k in kk])
        read = torch.full((len(ii),), width - 1)
        x = torch.stack([clean.resid[k][first : read0 + 1] for k in kk])
        cache = _PrefixCache({
            layer: (torch.stack([clean.kv[k][layer][0] for k in kk]),
                    torch.stack([clean.kv[k][layer][1] for k in kk]))
            for layer in clean.kv[kk[0]]
        })
    else:
        lengths = [len(enc.ids[i]) for i in ii]
        width = max(lengths)
        mask = torch.zeros(len(ii), width, dtype=torch.bool)
        unit = torch.zeros(len(ii), width)
        for r, (k, i) in enumerate(zip(kk, ii, strict=True)):
            mask[r, enc.patch_pos[i]] = True
            unit[r, : lengths[r]] = clean.unit[k]
        read = torch.tensor([enc.read_pos[i] for i in ii])
        if p.method == "recompute":
            x = torch.zeros(len(ii), width, int(model.cfg.d_model))
            for r, k in enumerate(kk):
                x[r, : lengths[r]] = clean.resid[k]
    target = unit * alpha[:, None] + beta[:, None]
    out: dict[str, Tensor] = {}

    def capture(act: Tensor, hook: Any) -> None:
        out["features"] = act[torch.arange(act.shape[0]), read].detach().clone()
        if "patched" in out:
            raise _Stop  # the rest of the forward cannot change what the head reads

    hooks: list[tuple[str, Callable[..., Any]]] = [
        (p.unit_hook, _patch_hook(p.neuron, mask, target, out)), (p.feature_hook, capture)]
    if p.method == "full":
        tokens = _pad([enc.ids[i] for i in ii], 0)
        _run_to(model, hooks, lambda: model(tokens, return_type=None))
    else:
        _run_to(model, hooks, lambda: _blocks_from(model, x, p.start_layer, cache))
    if "features" not in out or "patched" not in out:
        raise RuntimeError(f"hooks {p.unit_hook} / {p.feature_hook} did not fire during the patched run")
    return out["features"]


def _blocks_from(model: TransformerBridge, x: Tensor, start: int, cache: _PrefixCache | None) -> None:
    """The forward pass from block ``start`` on, through ln_final and unembed."""
    kwargs = {} if cache is None else {"past_key_values": cache}
    for block in model.blocks[start:]:
        y = block(x, **kwargs)
        x = y[0] if isinstance(y, tuple) else y
    model.unembed(model.ln_final(x))


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool, desc: str = "patched rows") -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    # delay: runs that finish within a second print no bar at all.
    return tqdm(total=total, desc=desc, unit="row", leave=False, delay=1.0)


def run_experiment(
    head: Head | str | Path,
    inputs: Sequence[str] | None = None,
    *,
    scale: Sequence[float] | None = None,
    set: Sequence[float] | None = None,
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
        raise InputError(f"batch_size {batch_size} is invalid; expected a positive integer")
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
    patch_is_read = all(pp == [r] for pp, r in zip(enc.patch_pos, enc.read_pos, strict=True))
    p = plan(head, model, method, pos, patch_is_read=patch_is_read)
    digit_ids = torch.tensor(head.digit_token_ids(model)) if cfg.head_type == "token" else None
    n = len(texts)
    mean_act = 0.0
    if any(iv.kind == "mean" for iv in ivs):
        # Mean ablation needs the mean over *all* inputs before any row is patched.
        units_ = [u for c in _batches(n, batch_size)
                  for u in _clean_pass(model, p, enc, c, stop_at_unit=True).unit]
        mean_act = float(torch.cat([u[pp] for u, pp in zip(units_, enc.patch_pos, strict=True)]).mean())
    affine = torch.tensor([iv.affine(mean_act) for iv in ivs], dtype=torch.float32)  # [n_iv, 2]

    # Stream over inputs: memory holds one chunk's clean run and patched rows at a time.
    clean_act = torch.empty(n)
    clean_pred = torch.empty(n)
    act = torch.empty(n, len(ivs))
    pred = torch.empty(n, len(ivs))
    bar = _progress(n * len(ivs), progress)
    for chunk in _batches(n, batch_size):
        clean = _clean_pass(model, p, enc, chunk)
        idx = torch.tensor(list(chunk))
        clean_act[idx] = torch.stack([clean.unit[k][enc.measure_pos[i]] for k, i in enumerate(chunk)])
        clean_f = torch.stack(clean.features)
        clean_pred[idx] = head.predict(clean_f, digit_ids)
        a, f = _patched_rows(model, p, enc, chunk, clean,
                             affine.expand(len(chunk), -1, -1), batch_size)
        act[idx] = a
        f = f.reshape(len(chunk), len(ivs), -1)
        patched_pred = head.predict(f.flatten(0, 1), digit_ids).reshape(len(chunk), len(ivs))
        # Rows whose features did not move get the clean prediction bit for bit, rather
        # than the same number through a differently shaped matmul (1e-8 apart).
        unmoved = (f == clean_f[:, None]).all(-1)
        pred[idx] = torch.where(unmoved, clean_pred[idx][:, None], patched_pred)
        bar.update(len(chunk) * len(ivs))
    bar.close()

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
        patched_activation=act.double().numpy(),
        patched_prediction=pred.double().numpy(),
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


def collect(
    model: TransformerBridge,
    texts: Sequence[str],
    *,
    layer: int,
    neuron: int,
    layer_type: str = "post",
    feature_layer: int = -1,
    set_values: Sequence[float] | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Features at the last token and the unit's activation there, for each text.

    This is what a head is trained on. With ``set_values``, text ``i`` is run
    with the unit *set* to ``set_values[i]`` at its last token (interventional
    data: the unit's value is independent of its causes), through the same
    exact routes as :func:`run_experiment`.

    Returns:
        ``(features [n, d_model], activations [n])``.

    Example:
        >>> feats, acts = collect(load_model("neuronpatch-demo"), ["The cat sat."],  # doctest: +SKIP
        ...                       layer=1, neuron=43, feature_layer=2)
    """
    from neuronpatch.heads import HeadConfig

    d_model = int(model.cfg.d_model)
    # A zero head stands in for "whatever reads these features": only its hooks matter.
    cfg = HeadConfig(base_model_name="<collect>", target_layer=layer, target_neuron=neuron,
                     layer_type=layer_type, feature_layer=feature_layer)
    reader = Head(Path("<collect>"), cfg, {"output.weight": torch.zeros(1, d_model),
                                          "output.bias": torch.zeros(1)})
    reader.check_model(model)
    enc = encode(model, texts, prepend_bos=False, token_pos="last", position="last")
    p = plan(reader, model, "auto", "last")
    if set_values is not None and len(set_values) != len(texts):
        raise ValueError(f"{len(set_values)} set_values for {len(texts)} texts")
    feats, acts = [], []
    bar = _progress(len(texts), progress, desc="collecting")
    for chunk in _batches(len(texts), batch_size):
        clean = _clean_pass(model, p, enc, chunk)
        clean_f = torch.stack(clean.features)
        clean_a = torch.stack([clean.unit[k][enc.read_pos[i]] for k, i in enumerate(chunk)])
        if set_values is None:
            feats.append(clean_f)
            acts.append(clean_a)
        else:
            # One "set" intervention per text, with its own value: α = 0, β = value.
            value = torch.tensor([float(set_values[i]) for i in chunk])
            affine = torch.stack([torch.zeros_like(value), value], dim=-1)[:, None, :]
            a, f = _patched_rows(model, p, enc, chunk, clean, affine, batch_size)
            feats.append(f)
            acts.append(a[:, 0])
        bar.update(len(chunk))
    bar.close()
    return torch.cat(feats), torch.cat(acts)
