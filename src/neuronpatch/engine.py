"""The patching engine: does a prediction head *use* the unit it predicts?

Activation patching answers a causal question that correlation cannot. For
each input we record the unit's clean activation ``a`` and the head's clean
prediction ``p``; then we overwrite the unit (``a ↦ α·a + β``: scale, set, zero,
add or mean-ablate) at the patched position, let the change flow through the
rest of the model up to where the head reads its features, and record the new
prediction ``p'``. If the head reads the unit, ``p' − p`` follows ``a' − a``.

Every number comes from the model's own forward (its own attention, positions,
norms and cache); the engine only reads and edits tensors at the sites of
:mod:`neuronpatch.architecture`, and turns them into the head's coordinates
with the identities of :mod:`neuronpatch.coordinates`. Routes, cheapest first:

``upstream``  the head reads before the unit: nothing can change, so the slope
              is exactly 0 (checked once with a real patched run);
``linear``    the head reads the residual stream right after the unit, at the
              patched position: patched features are the clean ones plus
              ``Δa`` times the unit's write direction (checked once against a
              real patched run; on a mismatch the engine steps aside to ``kv``);
``kv``        one forward over every input's prefix (the tokens before the
              patch) keeps the model's own KV cache; each input's cache is
              repeated once per intervention plus once clean, and only the
              positions from the patch to the read position are run again;
``full``      every row, every position, from the start (the reference, and
              what ``position: all`` needs).

In ``kv`` and ``full``, an input's rows are identical below the unit's block,
so those blocks run once per input and the rows multiply at the unit's block
(:class:`Growth`; the cache is repeated only from there on). Whether a model's
blocks take a grown batch is checked once per model, block and feature site
against ungrown rows; where it does not hold, every row runs every block.

Inputs are left-padded with explicit ``position_ids`` and an attention mask,
so a batch gives the numbers each input gives alone. Hooks live only inside
one call. Everything is deterministic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from neuronpatch import architecture, coordinates
from neuronpatch.architecture import Site
from neuronpatch.coordinates import Plan
from neuronpatch.errors import InputError, PatchError
from neuronpatch.heads import Head, load_head
from neuronpatch.interventions import Intervention, build, normalize
from neuronpatch.models import load_model
from neuronpatch.result import ExperimentResult
from neuronpatch.stats import weight_cosine
from neuronpatch.units import MLP_HIDDEN_TYPES

if TYPE_CHECKING:
    from neuronpatch.models import LoadedModel

Method = Literal["auto", "upstream", "linear", "kv", "full"]
METHODS: tuple[str, ...] = ("auto", "upstream", "linear", "kv", "full")

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

# Bytes the repeated prefix cache of one kv batch may take (keys and values of every layer);
# it bounds peak memory, since the cache is repeated once per patched row.
KV_CACHE_BYTES = 128 * 2**20
# A unit whose clean activation is this small cannot be moved by scaling.
_SILENT = 1e-6
# How far a shortcut route may be from a real patched run before it steps aside
# (relative to the features' scale; float32 noise is ~1e-6).
_CHECK_RTOL = 1e-4
# How far the unit may be from the requested value after a patch, relative to its
# scale, by the dtype the model runs in (one rounding of the patched value, and a
# little room for what the hook chain copies).
_PATCH_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 2e-3}


class _Stop(Exception):
    """Raised from a capture hook once everything needed has been read."""


# --------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Encoded:
    """Tokenized inputs with the positions the experiment uses."""

    ids: list[list[int]]
    read_pos: list[int]
    patch_pos: list[list[int]]  # patched positions per input
    measure_pos: list[int]  # where the unit's activation change is measured


def tokenize(model: LoadedModel, text: str, prepend_bos: bool | None) -> list[int]:
    """Token ids as the seed pipeline makes them: the HF tokenizer with its defaults.

    ``prepend_bos`` True/False overrides whether a BOS token starts the input.
    """
    tok = model.tokenizer
    if prepend_bos is None:
        return [int(i) for i in tok(text)["input_ids"]]
    ids = [int(i) for i in tok(text, add_special_tokens=False)["input_ids"]]
    if prepend_bos:
        bos = tok.bos_token_id
        if bos is None:
            raise InputError("prepend_bos is true but the tokenizer has no BOS token")
        ids = [int(bos), *ids]
    return ids


def encode(
    model: LoadedModel,
    texts: Sequence[str],
    *,
    prepend_bos: bool | None,
    token_pos: str | int,
    position: str | int,
) -> Encoded:
    """Tokenize and resolve positions.

    Raises:
        InputError: an empty input, one longer than the model's context, or a
            position outside an input.
    """
    n_ctx = model.n_ctx
    ids_all, read, patch, measure = [], [], [], []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"input {i} is {type(text).__name__}, expected a string")
        if not text.strip():
            raise InputError(f"input {i} ({text!r}) is empty; every input needs at least one token")
        ids = tokenize(model, text, prepend_bos)
        if not ids:
            raise InputError(f"input {i} ({text!r}) has no tokens")
        if n_ctx is not None and len(ids) > n_ctx:
            raise InputError(f"input {i} ({_short(text)!r}) has {len(ids)} tokens; the model's "
                             f"context is {n_ctx} tokens")
        n = len(ids)
        r = _resolve(token_pos, n, what="token_pos", i=i, text=text)
        if position == "all":
            p, m = list(range(n)), r
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


# --------------------------------------------------------------------------- one pass
@dataclass
class _Rows:
    """What a pass measured, one row per (input, intervention) plus a clean row per input."""

    clean_unit: Tensor  # [rows] the unit's clean value where it is measured
    patched_unit: Tensor  # [rows] the value the intervention asked for there
    features: Tensor  # [rows, width] in the head's coordinates
    guard: Tensor | None = None  # [rows, width] features in hf coordinates (the guard)
    unit_row: Tensor | None = None  # [rows, units] the whole layer where it is measured, before the patch


@dataclass
class _Batch:
    """Token rows for one forward: left-padded, with positions and where to patch/read."""

    ids: Tensor  # [R, S]
    mask: Tensor  # [R, P + S] attention mask including any cached prefix
    positions: Tensor  # [R, S]
    patch: Tensor  # [R, S] bool: positions to patch
    measure: Tensor  # [R] column of the measured unit value
    read: Tensor  # [R] column of the read position
    alpha: Tensor  # [R]
    beta: Tensor  # [R]
    cache: Any = None
    neuron: Tensor | None = None  # [R] the column each row patches (controls); None: the plan's
    grow: Growth | None = None  # ids hold one row per input; rows multiply at the unit's block


@dataclass(frozen=True)
class Growth:
    """Where a batch of one row per input becomes ``m`` rows per input.

    Blocks below the unit compute the same values for every row of an input,
    so they run once per input; a forward pre-hook on each block from ``at``
    on repeats the hidden states and every per-input argument the model hands
    its blocks (mask, positions, rotary tables) ``m`` times. The blocks are the
    model's own; only their batch grows. ``names``: the block arguments that
    carry the batch, found once per model and block by :func:`_growth` and
    checked there against an ungrown run; None while they are being found
    (every argument whose first dimension is the batch grows, recorded in ``seen``).
    """

    at: int
    m: int
    names: frozenset[str | int] | None
    seen: set[str | int] = field(default_factory=set)


def _grow_hook(g: Growth, n: int) -> Any:
    """A forward pre-hook that repeats each per-input block argument ``g.m`` times."""
    def grows(x: Any) -> bool:
        return isinstance(x, Tensor) and x.dim() >= 2 and x.shape[0] == n

    def grow(key: str | int, x: Any) -> Any:
        if g.names is not None and key not in g.names:
            return x
        if grows(x):
            g.seen.add(key)
            return x.repeat_interleave(g.m, 0)
        if isinstance(x, tuple) and x and all(grows(y) for y in x):  # rotary (cos, sin)
            g.seen.add(key)
            return tuple(y.repeat_interleave(g.m, 0) for y in x)
        if g.names is not None:
            for y in x if isinstance(x, tuple) else (x,):
                if isinstance(y, Tensor) and y.dim() >= 2 and y.shape[0] not in (1, n * g.m):
                    raise RuntimeError(f"block argument {key!r} has a batch of {y.shape[0]}, "
                                       f"expected {n} inputs")
        return x

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return tuple(grow(i, a) for i, a in enumerate(args)), {k: grow(k, v) for k, v in kwargs.items()}

    return hook


# Per model class, read once rather than at every forward: whether it can compute logits
# for the last position only (``logits_to_keep``).
_KEEPS_ONE_LOGIT: dict[Any, bool] = {}


def _forward_kwargs(model: LoadedModel) -> dict[str, Any]:
    cls = type(model.hf)
    if cls not in _KEEPS_ONE_LOGIT:
        _KEEPS_ONE_LOGIT[cls] = "logits_to_keep" in inspect.signature(cls.forward).parameters
    return {"return_dict": True, **({"logits_to_keep": 1} if _KEEPS_ONE_LOGIT[cls] else {})}


class _Along:
    """The rows of a batch that patch along a direction instead of a column (direction controls).

    A row whose column is ``d_model + i`` patches ``p.directions[i] = v`` (unit norm,
    mean-zero): its value is ``v·t`` and its patch adds ``(target − v·t)·v`` to the tensor,
    in float64, written back in the tensor's dtype. No centring applies in either
    coordinate system (``v·1 = 0``; see :mod:`neuronpatch.controls`).
    """

    def __init__(self, p: Plan, n: Tensor) -> None:
        self.rows = (n >= p.d_model).nonzero()[:, 0]
        self.index = n[self.rows] - p.d_model  # which direction each of those rows patches
        self.v = p.directions.to(n.device, torch.float64)[self.index]  # [rows, d_model]

    def __bool__(self) -> bool:
        return len(self.rows) > 0

    def value(self, t: Tensor) -> Tensor:
        """``[rows, positions]``: ``v·t`` of each direction row, float64."""
        return torch.einsum("rsd,rd->rs", t[self.rows].double(), self.v)

    def add(self, out: Tensor, delta: Tensor) -> None:
        """Add ``delta[row, position] · v`` to the direction rows of ``out`` (in place)."""
        moved = out[self.rows].double() + delta[..., None] * self.v[:, None, :]
        out[self.rows] = moved.to(out.dtype)


def _run(model: LoadedModel, p: Plan, b: _Batch, guard: Site | None = None) -> _Rows:
    """Run the model's own forward on ``b`` with the patch and capture hooks attached.

    ``guard``: a second feature site to read unchanged (the coordinate guard).
    Every patch is checked: a second hook at the unit's site, after the patch,
    reads the column (or the direction's value) back; a patch that never ran, or
    left another value than the one requested, raises :class:`~neuronpatch.errors.PatchError`.
    """
    R = b.alpha.shape[0]
    ar = torch.arange(R, device=model.device)
    got: dict[str, Tensor] = {}
    n: Any = p.neuron if b.neuron is None else b.neuron.to(model.device)
    along: _Along | None = None
    if p.directions is not None and b.neuron is not None:
        along = _Along(p, n)
        n = torch.where(n >= p.d_model, p.neuron, n)  # direction rows leave every column to _Along
        along = along or None
    wanted = {"clean", "features"} | ({"guard"} if guard is not None else set())

    def column(t: Tensor) -> Tensor:
        if b.neuron is None:
            return t[..., n]
        return t.gather(-1, n[:, None, None].expand(-1, t.shape[1], 1))[..., 0]

    def done() -> None:
        if wanted <= got.keys():
            raise _Stop  # nothing later in the forward can change what was read

    def patch(t: Tensor) -> Tensor:
        col = column(t).float()
        c = col - t.float().mean(-1) if p.centre_unit else col
        target = b.alpha[:, None] * c + b.beta[:, None]
        delta = torch.where(b.patch, target - c, torch.zeros_like(c))
        clean = c[ar, b.measure]
        patched = torch.where(b.patch[ar, b.measure], target[ar, b.measure], clean)
        if along is not None:
            rows, m = along.rows, b.measure[along.rows]
            k = torch.arange(len(rows), device=rows.device)
            a = along.value(t)
            a_target = b.alpha[rows, None].double() * a + b.beta[rows, None].double()
            a_delta = torch.where(b.patch[rows], a_target - a, torch.zeros_like(a))
            delta[rows] = 0.0
            clean[rows] = a[k, m].float()
            patched[rows] = torch.where(b.patch[rows, m], a_target[k, m], a[k, m]).float()
            got["along_requested"] = a + a_delta
        got["clean"], got["patched"] = clean, patched
        row = t[ar, b.measure].float()
        got["unit_row"] = row - row.mean(-1, keepdim=True) if p.centre_unit else row
        got["delta_read"] = delta[ar, b.read]  # direction rows: 0, they carry no δ/d offset
        new_col = (col + delta).to(t.dtype)
        got["requested"] = new_col
        if wanted <= got.keys():
            got["early"] = new_col  # the features were read before the unit: an upstream head
            raise _Stop
        out = t.clone()
        if b.neuron is None:
            out[..., n] = new_col
        else:
            out.scatter_(-1, n[:, None, None].expand(-1, t.shape[1], 1), new_col[..., None])
        if along is not None:
            along.add(out, a_delta)
        return out

    def observe(t: Tensor) -> None:
        got["observed"] = column(t).detach().clone()
        if along is not None:
            got["along_observed"] = along.value(t)
            got["along_norm"] = t[along.rows].double().norm(dim=-1)

    def rows(t: Tensor) -> Tensor:  # a site below the growth point still has one row per input
        return t if t.shape[0] == R else t.repeat_interleave(R // t.shape[0], 0)

    def capture(t: Tensor) -> None:
        f = rows(t)[ar, b.read].float()
        if p.centre_features:
            f = f - f.mean(-1, keepdim=True)
        if p.offset:
            f = f + (got["delta_read"] / p.d_model)[:, None]
        got["features"] = f
        done()

    def capture_guard(t: Tensor) -> None:
        got["guard"] = rows(t)[ar, b.read].float()
        done()

    # Hooks on one module run in the order they were registered: patch, observe, capture.
    handles = []
    if b.grow is not None:  # registered first (and prepended): the batch grows before any edit
        hook = _grow_hook(b.grow, b.ids.shape[0])
        handles += [blk.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
                    for blk in model.arch.blocks[b.grow.at:]]
    handles += [architecture.attach(model.arch, p.unit, patch, R),
                architecture.attach(model.arch, p.unit, observe, R)]
    if p.feature.kind != "logits":
        handles.append(architecture.attach(model.arch, p.feature, capture, R))
    if guard is not None:
        handles.append(architecture.attach(model.arch, guard, capture_guard, R))
    try:
        with torch.inference_mode(), contextlib.suppress(_Stop):
            out = model.hf(input_ids=b.ids, attention_mask=b.mask, position_ids=b.positions,
                           past_key_values=b.cache, use_cache=b.cache is not None, **_forward_kwargs(model))
            if p.feature.kind == "logits":
                got["features"] = out.logits[:, -1].float()
    finally:
        for h in handles:
            h.remove()
    if "requested" not in got:
        raise PatchError(f"the patch hook at {p.unit} (column {_columns(p, b)}) never ran during the "
                         "forward pass: no row was patched, so no slope can be measured")
    missing = wanted - got.keys()
    if missing:
        raise RuntimeError(f"sites {p.unit} / {p.feature} did not fire during the forward pass "
                           f"(missing {sorted(missing)})")
    if "early" not in got:
        _check_patch(p, b, got.get("observed"), got["requested"],
                     skip=None if along is None else along.rows)
        if along is not None:
            _check_along(p, b, along, got["along_requested"], got.get("along_observed"),
                         got.get("along_norm"), got["requested"].dtype)
    return _Rows(got["clean"], got["patched"], got["features"], got.get("guard"), got["unit_row"])


def _columns(p: Plan, b: _Batch) -> str:
    if b.neuron is None:
        return str(p.neuron)
    cols = sorted({int(x) for x in b.neuron.tolist()})
    names = [f"dir{c - p.d_model}" if p.directions is not None and c >= p.d_model else str(c)
             for c in cols]
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")


def _check_patch(p: Plan, b: _Batch, observed: Tensor | None, requested: Tensor,
                 skip: Tensor | None = None) -> None:
    """Raise unless the unit holds, at every patched position, the value its row requested.

    ``skip``: rows that patch along a direction (checked by :func:`_check_along`).
    """
    if observed is None:
        raise PatchError(f"the unit at {p.unit} (column {_columns(p, b)}) was never read back after the "
                         "patch hook: the patch cannot be confirmed")
    rtol = _PATCH_RTOL.get(requested.dtype, 1e-5)
    want, have = requested.float(), observed.float().to(requested.device)
    mask = b.patch
    if skip is not None:
        mask = mask.clone()
        mask[skip] = False
    scale = float(want.abs().max()) + float(have.abs().max()) + 1.0
    err = torch.where(mask, (want - have).abs(), torch.zeros_like(want))
    worst = float(err.max()) if err.numel() else 0.0
    if not worst <= rtol * scale:  # NaN fails too
        r, q = divmod(int(err.reshape(-1).argmax()), err.shape[1])
        col = p.neuron if b.neuron is None else int(b.neuron[r])
        raise PatchError(
            f"the patch at {p.unit} column {col} did not take effect on row {r} position {q}: "
            f"requested {float(want[r, q]):.6g}, observed {float(have[r, q]):.6g} after the hook "
            f"(tolerance {rtol * scale:.3g}); the hook did not run or its edit was discarded")


def _check_along(p: Plan, b: _Batch, along: _Along, requested: Tensor, observed: Tensor | None,
                 norm: Tensor | None, dtype: torch.dtype) -> None:
    """Raise unless every direction row's value ``v·t`` is, where patched, what it requested.

    Writing the patched tensor back in its dtype rounds each coordinate once, which moves
    ``v·t`` by at most the rounding times ``|t|`` (``|v| = 1``): the tolerance scales with
    ``|t|`` at that position as well as with the values.
    """
    if observed is None or norm is None:
        raise PatchError(f"the unit at {p.unit} (directions {_columns(p, b)}) was never read back "
                         "after the patch hook: the patch cannot be confirmed")
    rtol = _PATCH_RTOL.get(dtype, 1e-5)
    scale = requested.abs() + observed.abs() + norm + 1.0
    mask = b.patch[along.rows]
    err = torch.where(mask, (requested - observed).abs() / scale, torch.zeros_like(scale))
    worst = float(err.max()) if err.numel() else 0.0
    if not worst <= rtol:  # NaN fails too
        r, q = divmod(int(err.reshape(-1).argmax()), err.shape[1])
        raise PatchError(
            f"the patch at {p.unit} along direction dir{int(along.index[r])} did not take effect on "
            f"row {int(along.rows[r])} position {q}: requested {float(requested[r, q]):.6g}, observed "
            f"{float(observed[r, q]):.6g} after the hook (tolerance {rtol * float(scale[r, q]):.3g}); "
            "the hook did not run or its edit was discarded")


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[Tensor, Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _pad_id(model: LoadedModel) -> int:
    tok = model.tokenizer
    for cand in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
        if cand is not None:
            return int(cand)
    return 0


# --------------------------------------------------------------------------- routes
def _full_rows(model: LoadedModel, p: Plan, enc: Encoded, idx: Sequence[int], affine: Tensor,
               guard: Site | None = None, neurons: Tensor | None = None, grow: Growth | None = None) -> _Rows:
    """Every row from the start: inputs × (interventions) in one left-padded batch.

    ``affine[k, j]`` is ``(α, β)`` of row ``j`` of input ``idx[k]``. With ``grow``, the
    tokens go in once per input and the rows multiply at the unit's block.
    """
    m = affine.shape[1]
    dev = model.device
    ends = [max(enc.read_pos[i], enc.measure_pos[i], max(enc.patch_pos[i])) + 1 for i in idx]
    rows = [enc.ids[i][:e] for i, e in zip(idx, ends, strict=True)]
    ids, mask, pos = _left_pad(rows, _pad_id(model), dev)
    S = ids.shape[1]
    pads = [S - len(r) for r in rows]
    patch = torch.zeros(len(idx), S, dtype=torch.bool)
    for k, i in enumerate(idx):
        for q in enc.patch_pos[i]:
            patch[k, pads[k] + q] = True
    measure = torch.tensor([pads[k] + enc.measure_pos[i] for k, i in enumerate(idx)])
    read = torch.tensor([pads[k] + enc.read_pos[i] for k, i in enumerate(idx)])
    rep = lambda t: t.repeat_interleave(m, 0)  # noqa: E731
    tokens = (lambda t: t) if grow is not None else rep
    b = _Batch(ids=tokens(ids), mask=tokens(mask), positions=tokens(pos), patch=rep(patch).to(dev),
               measure=rep(measure).to(dev), read=rep(read).to(dev),
               alpha=affine[..., 0].reshape(-1).to(dev), beta=affine[..., 1].reshape(-1).to(dev),
               neuron=None if neurons is None else neurons.repeat(len(idx)), grow=grow)
    return _run(model, p, b, guard)


def _kv_rows(model: LoadedModel, p: Plan, enc: Encoded, idx: Sequence[int], affine: Tensor,
             guard: Site | None = None, neurons: Tensor | None = None, grow: Growth | None = None) -> _Rows:
    """One prefix forward keeps the model's cache; each row re-runs only patch..read.

    Every input in ``idx`` has one patched position at or before its read
    position, and the same number of tokens from the patch to the read position.
    The prefix cache is repeated once per row, in every layer or (with ``grow``)
    only in the layers from the unit's block on, where the rows differ.
    """
    from transformers import DynamicCache

    m = affine.shape[1]
    dev = model.device
    first = [enc.patch_pos[i][0] for i in idx]
    prefixes = [enc.ids[i][:q] for i, q in zip(idx, first, strict=True)]
    suffixes = [enc.ids[i][q: enc.read_pos[i] + 1] for i, q in zip(idx, first, strict=True)]
    s = len(suffixes[0])
    assert all(len(x) == s for x in suffixes) and all(prefixes), "one suffix length, non-empty prefixes"
    pids, pmask, ppos = _left_pad(prefixes, _pad_id(model), dev)
    cache = DynamicCache(config=model.hf.config)
    with torch.inference_mode():
        model.hf(input_ids=pids, attention_mask=pmask, position_ids=ppos, past_key_values=cache,
                 use_cache=True, **_forward_kwargs(model))
    if grow is None:
        cache.batch_repeat_interleave(m)
    else:
        if len(cache.layers) != model.n_layers:
            raise RuntimeError("the cache does not hold one layer per block")
        for layer in cache.layers[grow.at:]:
            layer.batch_repeat_interleave(m)  # type: ignore[union-attr]
    lengths = torch.tensor([len(x) for x in prefixes], device=dev)
    sids = torch.tensor(suffixes, dtype=torch.long, device=dev)
    spos = lengths[:, None] + torch.arange(s, device=dev)[None, :]
    smask = torch.cat([pmask, torch.ones(len(idx), s, dtype=pmask.dtype, device=dev)], dim=1)
    patch = torch.zeros(len(idx) * m, s, dtype=torch.bool, device=dev)
    patch[:, 0] = True
    R = len(idx) * m
    rep = lambda t: t.repeat_interleave(m, 0)  # noqa: E731
    tokens = (lambda t: t) if grow is not None else rep
    b = _Batch(ids=tokens(sids), mask=tokens(smask), positions=tokens(spos), patch=patch,
               measure=torch.zeros(R, dtype=torch.long, device=dev),
               read=torch.full((R,), s - 1, dtype=torch.long, device=dev),
               alpha=affine[..., 0].reshape(-1).to(dev), beta=affine[..., 1].reshape(-1).to(dev), cache=cache,
               neuron=None if neurons is None else neurons.repeat(len(idx)), grow=grow)
    return _run(model, p, b, guard)


# Per model, then per (block, feature site): the block arguments that carry the batch, or None
# where growing the batch at that block does not reproduce an ungrown run. The feature site is
# part of the key because code after the last block (a reshape to the input's batch) can differ.
_GROWTH: weakref.WeakKeyDictionary[Any, dict[tuple[int, str], frozenset[str | int] | None]] = (
    weakref.WeakKeyDictionary())


def _growth(model: LoadedModel, p: Plan) -> frozenset[str | int] | None:
    """Whether rows may multiply at the unit's block on this model, and which arguments grow.

    Checked once per model, block and feature site on a small padded batch, through both the
    full and the kv paths: grown and ungrown runs must give the same features.
    A model whose blocks take per-input state some other way (Bloom's ALiBi
    table, a cache with layers not one per block) fails the check and keeps
    one row per row all the way up.
    """
    at = p.unit.layer
    if at < 1 or p.upstream:
        return None
    known = _GROWTH.setdefault(model.hf, {})
    key = (at, str(p.feature))
    if key not in known:
        known[key] = _check_growth(model, p, at)
    return known[key]


def _check_growth(model: LoadedModel, p: Plan, at: int) -> frozenset[str | int] | None:
    vocab = model.vocab_size
    ids = [[(7 * j + 3) % vocab for j in range(7)], [(5 * j + 11) % vocab for j in range(5)]]
    enc = Encoded(ids=ids, read_pos=[6, 4], patch_pos=[[3], [1]], measure_pos=[3, 1])
    affine = torch.tensor([[1.0, 0.0], [2.0, 0.5], [0.0, 1.0]]).expand(2, -1, -1).contiguous()
    seen: set[str | int] = set()
    try:
        for rows in (_full_rows, _kv_rows):
            want = rows(model, p, enc, [0, 1], affine)
            g = Growth(at, affine.shape[1], None)
            have = rows(model, p, enc, [0, 1], affine, grow=g)
            scale = float(want.features.abs().max()) + 1.0
            if not float((want.features - have.features).abs().max()) <= _CHECK_RTOL * scale:
                return None
            seen |= g.seen
    except Exception:
        return None
    return frozenset(seen)


def _unit_rows(model: LoadedModel, p: Plan, enc: Encoded, idx: Sequence[int]) -> list[Tensor]:
    """Every unit of the layer at every patched position of each input (for ``mean``).

    One tensor ``[positions, units]`` per input, in the unit's own coordinates.
    """
    ids, mask, pos = _left_pad([enc.ids[i] for i in idx], _pad_id(model), model.device)
    got: dict[str, Tensor] = {}

    def grab(t: Tensor) -> None:
        rows = t.float()
        got["rows"] = rows - rows.mean(-1, keepdim=True) if p.centre_unit else rows
        raise _Stop

    handle = architecture.attach(model.arch, p.unit, grab, ids.shape[0])
    try:
        with torch.inference_mode(), contextlib.suppress(_Stop):
            model.hf(input_ids=ids, attention_mask=mask, position_ids=pos, **_forward_kwargs(model))
    finally:
        handle.remove()
    S = ids.shape[1]
    return [got["rows"][k, S - len(enc.ids[i]):][enc.patch_pos[i]].cpu() for k, i in enumerate(idx)]


# --------------------------------------------------------------------------- routing
@dataclass(frozen=True)
class Route:
    """The route the patched rows take, and why."""

    method: str
    reason: str


def _write_directions(model: LoadedModel, p: Plan, enc: Encoded, columns: Sequence[int]) -> Tensor | None:
    """``[len(columns), width]``: the features' change per unit of each column's change.

    A constant vector per unit when every input is patched at its read position
    and the features are the residual stream right after the unit's write (or
    the unit itself); None otherwise. For MLP neurons it is the output
    projection's own response to a unit step (its bias cancels).
    """
    if p.upstream or any(pp != [r] for pp, r in zip(enc.patch_pos, enc.read_pos, strict=True)):
        return None
    u, f, n_layers = p.unit, p.feature, model.n_layers
    after = ((f.kind == "block_out" and f.layer == u.layer)
             or (f.kind == "block_in" and f.layer == u.layer + 1))
    cols = torch.tensor(list(columns), dtype=torch.long)
    if u.kind == "mlp_post" and after:
        proj = model.arch.mlp_out_proj[u.layer]
        assert proj is not None  # checked when the plan was made
        w = next(proj.parameters())
        e = torch.zeros(len(cols) + 1, 1, model.unit_width(True), dtype=w.dtype, device=w.device)
        e[torch.arange(1, len(cols) + 1), 0, cols.to(w.device)] = 1
        with torch.inference_mode():
            out = proj(e)[:, 0].float()
        directions = out[1:] - out[:1]
        if p.centre_features:
            directions = directions - directions.mean(-1, keepdim=True)
        return directions
    same = f == u or (u.kind == "block_out" and f.kind == "block_in" and f.layer == u.layer + 1)
    if (u.kind in ("mlp_write", "block_out") and after) or (u.kind == "block_in" and same) or same:
        if f.kind == "final_norm" or f.layer >= n_layers:
            return None
        # A residual coordinate: centred features move by Δ·(e_c − 1/d), and the δ/d offset
        # of transformer_lens coordinates gives the 1/d back.
        return torch.eye(model.d_model, device=model.device)[cols.to(model.device)]
    return None


def _linear_direction(model: LoadedModel, p: Plan, enc: Encoded) -> Tensor | None:
    """The target unit's write direction (:func:`_write_directions` for its column)."""
    d = _write_directions(model, p, enc, [p.neuron])
    return None if d is None else d[0]


def choose_route(model: LoadedModel, p: Plan, enc: Encoded, method: str) -> Route:
    """Pick the cheapest exact route, or check that a forced one can serve.

    Raises:
        InputError: a forced route cannot serve this experiment.
    """
    if method not in METHODS:
        raise InputError(f"route {method!r} is unknown; expected one of {', '.join(METHODS)}")
    single = all(len(pp) == 1 for pp in enc.patch_pos)
    invisible = single and all(pp[0] > r for pp, r in zip(enc.patch_pos, enc.read_pos, strict=True))
    linear = _linear_direction(model, p, enc) is not None
    options = {
        "upstream": (p.upstream or invisible,
                     f"the head reads {p.feature}, before {p.unit}" if p.upstream
                     else "every patch comes after the read position"),
        "linear": (linear, f"the head reads {p.feature} right after {p.unit}, at the patched position"),
        "kv": (single, "one patched position per input: the model's own KV cache serves the prefix"),
        "full": (True, "every row re-run from the start" + ("" if single else " (position: all)")),
    }
    if method == "auto":
        for name in ("upstream", "linear", "kv", "full"):
            ok, why = options[name]
            if ok:
                return Route(name, why)
    ok, why = options[method]
    if not ok:
        need = {"upstream": "a head that reads before the unit",
                "linear": "a head reading the residual stream right after the unit, at the patched position",
                "kv": "one patched position per input (not position: all)"}[method]
        raise InputError(f"route {method!r} cannot serve this experiment: it needs {need}")
    return Route(method, f"forced; {why}")


def _patched(model: LoadedModel, p: Plan, enc: Encoded, idx: list[int], affine: Tensor, route: str,
             guard: Site | None, neurons: Tensor | None = None) -> _Rows:
    """Rows for inputs ``idx``: for each, a clean row then one per intervention.

    ``neurons[j]``: the column row ``j`` of every input patches (controls); None: the plan's.
    """
    names = _growth(model, p) if affine.shape[1] > 1 else None
    grow = None if names is None else Growth(p.unit.layer, affine.shape[1], names)
    if route == "full" or any(len(enc.patch_pos[i]) != 1 for i in idx):
        return _full_rows(model, p, enc, idx, affine, guard, neurons, grow)
    # kv: group inputs by how many tokens lie from the patch to the read position.
    groups: dict[int, list[int]] = {}
    direct: list[int] = []
    for k, i in enumerate(idx):
        q, r = enc.patch_pos[i][0], enc.read_pos[i]
        if q == 0 or q > r:
            direct.append(k)  # nothing to cache before the patch, or the patch is invisible
        else:
            groups.setdefault(r - q + 1, []).append(k)
    parts: list[tuple[list[int], _Rows]] = []
    if direct:
        parts.append((direct, _full_rows(model, p, enc, [idx[k] for k in direct], affine[direct], guard,
                                         neurons, grow)))
    for ks in groups.values():
        parts.append((ks, _kv_rows(model, p, enc, [idx[k] for k in ks], affine[ks], guard, neurons, grow)))
    return _merge(parts, len(idx), affine.shape[1])


def _merge(parts: list[tuple[list[int], _Rows]], n: int, m: int) -> _Rows:
    if len(parts) == 1 and parts[0][0] == list(range(n)):
        return parts[0][1]
    first = parts[0][1]

    def gather(get: Any) -> Tensor | None:
        if get(first) is None:
            return None
        out = torch.empty(n, m, *get(first).shape[1:])
        for ks, rows in parts:
            out[ks] = get(rows).reshape(len(ks), m, *get(rows).shape[1:]).cpu()
        return out.reshape(n * m, *out.shape[2:])

    clean, patched, features = (gather(lambda r, a=a: getattr(r, a))
                                for a in ("clean_unit", "patched_unit", "features"))
    assert clean is not None and patched is not None and features is not None
    return _Rows(clean, patched, features, gather(lambda r: r.guard), gather(lambda r: r.unit_row))


def _chunks(n: int, size: int) -> Iterator[list[int]]:
    for lo in range(0, n, size):
        yield list(range(lo, min(n, lo + size)))


@dataclass
class _Measured:
    clean_act: Tensor  # [n]
    clean_feat: Tensor  # [n, width]
    act: Tensor  # [n, n_iv]
    feat: Tensor  # [n, n_iv, width]
    guard_feat: Tensor | None  # [n, width] hf-coordinate clean features
    row_clean: Tensor | None = None  # [n, n_iv] each patched row's own unit, before its patch


def measure(model: LoadedModel, p: Plan, enc: Encoded, affine: Tensor, route: Route, *,
            batch_size: int, guard: Site | None = None, progress: Any = None,
            neurons: Sequence[int] | None = None) -> _Measured:
    """Clean and patched activations and features for every input and intervention.

    ``affine[i, j]`` is ``(α, β)`` of intervention ``j`` on input ``i``. ``neurons[j]``:
    the column intervention ``j`` patches (control units: more patched rows over the
    same clean row); default the plan's unit.
    """
    n, n_iv = affine.shape[:2]
    columns = [p.neuron] * n_iv if neurons is None else list(neurons)
    cols = None if neurons is None else torch.tensor([p.neuron, *neurons], dtype=torch.long,
                                                     device=model.device)
    m = n_iv + 1
    identity = torch.tensor([1.0, 0.0]).expand(n, 1, 2)
    full_affine = torch.cat([identity, affine], dim=1)  # row 0 of each input: clean
    shortcut = route.method in ("upstream", "linear")
    per_chunk = max(1, batch_size // (1 if shortcut else m))
    if route.method == "kv":
        # A kv row runs only its suffix (patch..read), not the whole input: ``batch_size`` counts
        # rows of full length, so as many suffix rows fit as carry the same number of tokens.
        longest = max(len(ids) for ids in enc.ids)
        # (An input patched at its first token, or after its read position, runs in full.)
        suffix = max(r - pp[0] + 1 if 0 < pp[0] <= r else len(ids)
                     for pp, r, ids in zip(enc.patch_pos, enc.read_pos, enc.ids, strict=True))
        per_chunk = max(1, batch_size * longest // (m * suffix))
        # The prefix cache is repeated once per row (from the unit's block on, when rows grow
        # there): bound its bytes, not just its rows.
        layers = model.n_layers - (p.unit.layer if _growth(model, p) is not None else 0)
        row_bytes = longest * layers * model.d_model * 2 * model.hf.dtype.itemsize
        per_chunk = max(1, min(per_chunk, KV_CACHE_BYTES // max(1, m * row_bytes)))
    # Rows that patch along a direction control (column d_model + i), when there are any.
    on_dir = (torch.tensor(columns) >= p.d_model) if p.directions is not None else None
    directions = None
    if route.method == "linear":
        # One write direction per distinct column, then one per row of the experiment.
        plain = [c for c in columns if on_dir is None or c < p.d_model]
        distinct = sorted(set(plain))
        found = _write_directions(model, p, enc, distinct)
        assert found is not None
        directions = torch.empty(len(columns), found.shape[-1])
        plain_rows = torch.ones(len(columns), dtype=torch.bool) if on_dir is None else ~on_dir
        directions[plain_rows] = found.cpu()[torch.tensor([distinct.index(c) for c in plain],
                                                          dtype=torch.long)]
        if on_dir is not None and bool(on_dir.any()):
            directions[on_dir] = _direction_writes(model, p, enc)[torch.tensor(columns)[on_dir] - p.d_model]
    clean_act, clean_feat, act, feat, guards, row_clean = [], [], [], [], [], []
    for idx in _chunks(n, per_chunk):
        if shortcut:
            rows = _patched(model, p, enc, idx, identity[idx], "kv", guard)
            assert rows.unit_row is not None
            c_feat, every = rows.features.cpu(), rows.unit_row.cpu()
            before = _row_values(p, every, columns, on_dir)  # [k, n_iv] each row's own unit, clean
            new = before * affine[idx, :, 0] + affine[idx, :, 1]
            if directions is None:  # upstream: nothing the head reads can change
                f = c_feat[:, None, :].expand(-1, n_iv, -1)
            else:
                f = c_feat[:, None, :] + (new - before)[..., None] * directions
            clean_act.append(rows.clean_unit.cpu())
            clean_feat.append(c_feat)
            act.append(new)
            feat.append(f)
            row_clean.append(before)
            if rows.guard is not None:
                guards.append(rows.guard.cpu())
        else:
            rows = _patched(model, p, enc, idx, full_affine[idx], route.method, guard, cols)
            k = len(idx)
            cu = rows.clean_unit.reshape(k, m).cpu()
            row_clean.append(cu[:, 1:])
            pu = rows.patched_unit.reshape(k, m).cpu()
            fe = rows.features.reshape(k, m, -1).cpu()
            clean_act.append(cu[:, 0])
            clean_feat.append(fe[:, 0])
            act.append(pu[:, 1:])
            feat.append(fe[:, 1:])
            if rows.guard is not None:
                guards.append(rows.guard.reshape(k, m, -1)[:, 0].cpu())
        if progress is not None:
            progress.update(len(idx) * n_iv)
    return _Measured(torch.cat(clean_act), torch.cat(clean_feat), torch.cat(act), torch.cat(feat),
                     torch.cat(guards) if guards else None, torch.cat(row_clean))


def _row_values(p: Plan, every: Tensor, columns: Sequence[int], on_dir: Tensor | None) -> Tensor:
    """``[inputs, rows]``: each row's own unit, clean, from the whole layer ``every`` ``[inputs, width]``.

    A column row reads its column; a direction row reads ``v·every`` (mean-zero ``v``: the
    same whether ``every`` is centred or not).
    """
    index = torch.tensor(list(columns), dtype=torch.long)
    if on_dir is None or not bool(on_dir.any()):
        return every[:, index]
    out = torch.empty(every.shape[0], len(index))
    out[:, ~on_dir] = every[:, index[~on_dir]]
    along = p.directions.to(torch.float64)[index[on_dir] - p.d_model]  # [rows, d_model]
    out[:, on_dir] = (every.double() @ along.T).float()
    return out


def _direction_writes(model: LoadedModel, p: Plan, enc: Encoded) -> Tensor:
    """``[k, width]``: the features' change per unit of change along each direction control.

    A change ``Δ`` along ``v`` moves the tensor by ``Δ·v = Σ_c Δ·v_c·e_c``, so by linearity
    the features move by ``Δ·Σ_c v_c·w_c`` (``w_c``: column ``c``'s write direction,
    :func:`_write_directions`). In transformer_lens coordinates ``w_c`` holds the
    ``δ/d_model`` offset of a column patch on every coordinate; summed with weights ``v_c``
    it is ``mean(v) = 0``, as a direction patch carries no offset.
    """
    w = _write_directions(model, p, enc, range(p.d_model))
    assert w is not None and p.directions is not None
    return (p.directions.to(w.device, torch.float64) @ w.double()).float().cpu()


def _check_shortcut(model: LoadedModel, p: Plan, enc: Encoded, affine: Tensor, route: Route,
                    got: _Measured, neurons: Sequence[int] | None = None) -> str | None:
    """Compare a shortcut route with a real patched run on the first input; None if they agree.

    With ``neurons`` (controls) every column is checked, each with its own patched rows.
    """
    real = measure(model, p, enc, affine[:1], Route("kv", "check"), batch_size=affine.shape[1] + 1,
                   neurons=neurons)
    want, have = real.feat[0], got.feat[0]
    scale = float(want.abs().max()) + 1.0
    err = float((want - have).abs().max())
    if err > _CHECK_RTOL * scale:
        return (f"route {route.method!r} does not hold for this model: a real patched run differs from "
                f"it by {err:.3g} on input 0 (the write path is not linear, e.g. a norm after the MLP)")
    return None


# --------------------------------------------------------------------------- API
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
    model: LoadedModel | None = None,
    batch_size: int = 128,
    device: str = "auto",
    dtype: str = "float32",
    method: Method = "auto",
    progress: bool = False,
    controls: Any = None,
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
        model: a loaded model to use instead of loading the head's base model.
        batch_size: rows per forward pass, counted at full input length (a kv row that
            runs only the tokens from the patch to the read position counts for less); bounds
            memory, together with a bound on the bytes of the repeated KV cache.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:0"``...
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the model.
        method: ``"auto"`` picks the cheapest exact route; the others force one
            (``"full"`` is the slow reference).
        progress: show a progress bar over patched rows.
        controls: other units of the same layer and type, or random residual-space
            directions, patched with the same interventions as more rows over the
            same clean run: a list of indices, or a mapping with ``"units"``
            (``{"random": k, "seed": s}`` or a list) and/or ``"directions"``
            (``{"random": k, "seed": s}``; residual-stream units only, see
            :mod:`neuronpatch.controls`). Their fits land in ``result.controls``
            (and the ``specificity``, ``control_slope`` metrics).

    Returns:
        The :class:`~neuronpatch.result.ExperimentResult`.

    Example:
        >>> res = run_experiment("probes/heads/demo_causal",          # doctest: +SKIP
        ...                      inputs=["The cat sat on the mat."], set=[0, 1, 2])
        >>> round(res.slope, 2), round(res.r_squared, 2)              # doctest: +SKIP
    """
    if not isinstance(head, Head):
        head = load_head(head)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size {batch_size!r} is invalid; expected a positive integer")
    cfg = head.config
    if model is None:
        model = load_model(cfg.base_model_name, device=device, dtype=dtype)
    head.check_model(model)
    texts = list(DEFAULT_INPUTS if inputs is None else inputs)
    if interventions is None:
        given = build(scale=scale or (), set=set or (), add=add or (), zero=zero, mean=mean)
        ivs = normalize(given or None)
    else:
        ivs = normalize(interventions)
    pos = cfg.token_pos if position is None else position
    enc = encode(model, texts, prepend_bos=cfg.prepend_bos, token_pos=cfg.token_pos, position=pos)
    p = coordinates.plan(cfg, model, where=head.config_path)
    route = choose_route(model, p, enc, method)
    digit_ids = torch.tensor(head.digit_token_ids(model)) if cfg.head_type == "token" else None
    n, k = len(texts), len(ivs)
    width = model.unit_width(cfg.layer_type in MLP_HIDDEN_TYPES)
    cset = None
    if controls is not None:
        from neuronpatch import controls as ctl

        cset = ctl.resolve(controls, target=p.neuron, width=width, d_model=model.d_model,
                           layer_type=cfg.layer_type, config=head.config_path)
    units = list(cset.units) if cset is not None else []
    n_dir = 0 if cset is None or cset.directions is None else len(cset.directions)
    if n_dir:
        assert cset is not None and cset.directions is not None and width == model.d_model
        # Direction i rides as column d_model + i (see _Along).
        p = dataclasses.replace(p, directions=torch.from_numpy(cset.directions))
    columns = [p.neuron, *units, *(model.d_model + i for i in range(n_dir))]
    means = torch.zeros(width + n_dir)  # indexed by column (direction i: column d_model + i)
    if any(iv.kind == "mean" for iv in ivs):
        # Mean ablation needs each unit's mean over *all* inputs before any row is patched;
        # a control is mean-ablated to its own mean (a direction's: v · the layer's mean).
        seen = [r for idx in _chunks(n, batch_size) for r in _unit_rows(model, p, enc, idx)]
        means[:width] = torch.cat(seen).mean(0)
        if n_dir:
            means[width:] = (p.directions @ means[:width].double()).float()
    # The experiment's rows: the target's interventions, then each control's, in its own units.
    affine = torch.tensor([iv.affine(float(means[c])) for c in columns for iv in ivs], dtype=torch.float32)
    affine = affine[None].expand(n, -1, -1).contiguous()
    neurons = [c for c in columns for _ in ivs] if len(columns) > 1 else None
    guard = _guard_site(head, model, p)

    bar = _progress(n * k * len(columns), progress)
    allg = measure(model, p, enc, affine, route, batch_size=batch_size, guard=guard, progress=bar,
                   neurons=neurons)
    bar.close()
    if route.method in ("upstream", "linear"):
        mismatch = _check_shortcut(model, p, enc, affine, route, allg, neurons)
        if mismatch is not None:
            if method != "auto":
                raise InputError(mismatch)
            route = choose_route(model, p, enc, "kv" if all(len(x) == 1 for x in enc.patch_pos) else "full")
            route = Route(route.method, f"{mismatch}; stepped aside to {route.method}")
            allg = measure(model, p, enc, affine, route, batch_size=batch_size, guard=guard, neurons=neurons)
    got = _Measured(allg.clean_act, allg.clean_feat, allg.act[:, :k], allg.feat[:, :k], allg.guard_feat)

    clean_pred = head.predict(got.clean_feat, digit_ids)
    flat = got.feat.reshape(n * k, -1)
    patched_pred = head.predict(flat, digit_ids).reshape(n, k)
    # Rows whose features did not move get the clean prediction bit for bit.
    unmoved = (got.feat == got.clean_feat[:, None]).all(-1)
    pred = torch.where(unmoved, clean_pred[:, None], patched_pred)
    notes = _notes(texts, got.clean_act, ivs, p, route)
    if guard is not None and got.guard_feat is not None:
        note = _coordinate_guard(head, got, clean_pred)
        if note:
            notes.append(note)
    control_results = None
    if cset is not None:
        from neuronpatch.controls import ControlResults

        assert allg.row_clean is not None
        rest = allg.feat[:, k:]
        preds = head.predict(rest.reshape(-1, rest.shape[-1]), digit_ids).reshape(n, -1)
        still = (rest == allg.clean_feat[:, None]).all(-1)
        preds = torch.where(still, clean_pred[:, None], preds)
        dy = (preds - clean_pred[:, None]).double().numpy()
        dx = (allg.act[:, k:] - allg.row_clean[:, k:]).double().numpy()
        xs = tuple(dx[:, j * k:(j + 1) * k] for j in range(len(cset)))
        ys = tuple(dy[:, j * k:(j + 1) * k] for j in range(len(cset)))
        tx = (got.act - got.clean_act[:, None]).double().numpy()
        ty = (pred - clean_pred[:, None]).double().numpy()
        control_results = ControlResults(tx, ty, xs, ys, cset.units, cset.directions, cset.seed)
    cos = math.nan
    if head.linear_weight is not None and not p.upstream:
        direction = _linear_direction(model, p, enc)
        if direction is not None:
            cos = weight_cosine(head.linear_weight.numpy(), direction.cpu().numpy())[0]
    return ExperimentResult(
        head_path=str(head.path),
        model_name=cfg.base_model_name,
        head_type=cfg.head_type,
        target_layer=cfg.target_layer,
        target_neuron=cfg.target_neuron,
        layer_type=cfg.layer_type,
        unit_hook=str(p.unit),
        feature_hook=str(p.feature),
        token_pos=cfg.token_pos,
        patch_position=str(pos),
        method=route.method,
        inputs=tuple(texts),
        n_tokens=tuple(len(ids) for ids in enc.ids),
        positions=tuple(enc.measure_pos),
        interventions=tuple(ivs),
        clean_activation=got.clean_act.double().numpy(),
        clean_prediction=clean_pred.double().numpy(),
        patched_activation=got.act.double().numpy(),
        patched_prediction=pred.double().numpy(),
        write_direction_cosine=cos,
        notes=tuple(notes),
        controls=control_results,
    )


def _guard_site(head: Head, model: LoadedModel, p: Plan) -> Site | None:
    """The hf-coordinate feature site, when the head's coordinates were assumed, not written."""
    cfg = head.config
    if cfg.coordinates_given or cfg.head_type == "token" or cfg.feature_hook:
        return None
    try:
        site = coordinates.feature_site(cfg, model.n_layers, "hf", head.config_path)
    except Exception:
        return None
    return None if site == p.feature else site


def _coordinate_guard(head: Head, got: _Measured, clean_pred: Tensor) -> str | None:
    """Warn when the head predicts its unit clearly better in hf coordinates."""
    if len(clean_pred) < 5:
        return None  # too few inputs for a correlation to say anything
    act = got.clean_act.double()
    r_tl = _pearson(act, clean_pred.double())
    assert got.guard_feat is not None
    r_hf = _pearson(act, head.predict(got.guard_feat).double())
    if math.isfinite(r_hf) and r_hf > 0.8 and (not math.isfinite(r_tl) or r_hf > r_tl + 0.3):
        msg = (f"{head.config_path}: the head predicts its unit better in hf coordinates (baseline r "
               f"{r_hf:.3f}) than in the assumed transformer_lens coordinates (r {r_tl:.3f}); if it was "
               'trained on HF hidden states, add "coordinates": "hf" to config.json')
        warnings.warn(msg, UserWarning, stacklevel=3)
        return msg
    return None


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else math.nan


def _notes(texts: Sequence[str], clean_act: Tensor, ivs: Sequence[Intervention], p: Plan,
           route: Route) -> list[str]:
    notes = [f"route {route.method}: {route.reason}"]
    if route.method == "upstream" and p.upstream:
        notes.append(f"the head reads {p.feature}, before {p.unit}: no patch of the unit can reach "
                     "it, so its causal slope is exactly 0")
    silent = [i for i, a in enumerate(clean_act.tolist()) if abs(a) < _SILENT]
    if silent and any(iv.kind == "scale" for iv in ivs):
        which = ", ".join(f"{i} ({_short(texts[i], 24)!r})" for i in silent[:5])
        more = f" and {len(silent) - 5} more" if len(silent) > 5 else ""
        notes.append(f"the unit is ~0 on {len(silent)} of {len(texts)} inputs ({which}{more}): "
                     "scale patches cannot move it there; use set or add interventions")
    return notes


def collect(
    model: LoadedModel,
    texts: Sequence[str],
    *,
    layer: int,
    neuron: int,
    layer_type: str = "post",
    feature_layer: int = -1,
    coordinates_: str = "transformer_lens",
    set_values: Sequence[float] | None = None,
    batch_size: int = 128,
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
        ...                       layer=1, neuron=301, feature_layer=1)
    """
    from neuronpatch.heads import HeadConfig

    cfg = HeadConfig(base_model_name="<collect>", target_layer=layer, target_neuron=neuron,
                     layer_type=layer_type, feature_layer=feature_layer, coordinates=coordinates_,
                     coordinates_given=True)
    enc = encode(model, texts, prepend_bos=None, token_pos="last", position="last")
    p = coordinates.plan(cfg, model)
    if set_values is not None and len(set_values) != len(texts):
        raise ValueError(f"{len(set_values)} set_values for {len(texts)} texts")
    n = len(texts)
    bar = _progress(n, progress, desc="collecting")
    if set_values is None:
        affine = torch.tensor([[[1.0, 0.0]]]).expand(n, 1, 2)
    else:
        values = torch.tensor([float(v) for v in set_values])
        affine = torch.stack([torch.zeros(n), values], dim=-1)[:, None, :]
    route = choose_route(model, p, enc, "auto")
    if route.method == "upstream":
        route = Route("kv", "collect")
    got = measure(model, p, enc, affine.contiguous(), route, batch_size=batch_size, progress=bar)
    bar.close()
    return got.feat[:, 0], got.act[:, 0]
