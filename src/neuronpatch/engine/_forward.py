"""One forward pass: the model's own forward with hooks at sites, and the patched run built on it.

:func:`forward` is the only place the engine calls the model: every route, the
growth and shortcut checks, mean ablation and ranking go through it. It attaches
hooks at :mod:`~neuronpatch.architecture` sites for one call, lets a hook end the
pass once everything needed has been read (:class:`Stop`), and removes every
hook afterwards. :func:`run_rows` is the patched run: one :class:`Batch` of rows,
the unit patched in each, the patch read back and checked, and a typed
:class:`Capture` of what was read.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from neuronpatch import architecture
from neuronpatch.architecture import Site
from neuronpatch.coordinates import Plan
from neuronpatch.errors import PatchError

if TYPE_CHECKING:
    from neuronpatch.models import LoadedModel

# How far the unit may be from the requested value after a patch, relative to its
# scale, by the dtype the model runs in (one rounding of the patched value, and a
# little room for what the hook chain copies).
PATCH_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 1e-2, torch.float16: 2e-3}


class Stop(Exception):
    """Raised from a hook once everything needed has been read: the rest of the forward is skipped."""


# Per model class, read once rather than at every forward: whether it can compute logits
# for the last position only (``logits_to_keep``).
_KEEPS_ONE_LOGIT: dict[Any, bool] = {}


def forward_kwargs(model: LoadedModel) -> dict[str, Any]:
    """Keyword arguments every forward passes: a dict output, logits at the last position only."""
    cls = type(model.hf)
    if cls not in _KEEPS_ONE_LOGIT:
        _KEEPS_ONE_LOGIT[cls] = "logits_to_keep" in inspect.signature(cls.forward).parameters
    return {"return_dict": True, **({"logits_to_keep": 1} if _KEEPS_ONE_LOGIT[cls] else {})}


# --------------------------------------------------------------------------- row growth
@dataclass(frozen=True)
class Growth:
    """Where a batch of one row per input becomes ``m`` rows per input.

    Blocks below the unit compute the same values for every row of an input,
    so they run once per input; a forward pre-hook on each block from ``at``
    on repeats the hidden states and every per-input argument the model hands
    its blocks (mask, positions, rotary tables) ``m`` times. The blocks are the
    model's own; only their batch grows. ``names``: the block arguments that
    carry the batch, found once per model and block (:func:`neuronpatch.engine.growth`)
    and checked there against an ungrown run; None while they are being found
    (every argument whose first dimension is the batch grows, recorded in ``seen``).
    """

    at: int
    m: int
    names: frozenset[str | int] | None
    # A kv batch may enter at block ``at``: the blocks below it are replayed from a clean
    # pass over the whole input (:class:`Entry`), checked per model like the growth itself.
    enter: bool = False
    # An entered kv batch may also fold its rows into the sequence: one row per input whose
    # tokens are the ``m`` rows' suffixes side by side, each attending to the shared prefix
    # cache and to itself only (:func:`~neuronpatch.engine.folded_mask`), so the cache is
    # never repeated. Checked per model like the rest.
    fold: bool = False
    # Folded rows of an MLP neuron may enter above the unit's block: the block's clean output
    # plus each row's write (the output projection's own response to the neuron's change,
    # :func:`mlp_writes`), so the unit's block never runs for them either. Checked per model
    # like the rest (a norm after the MLP, or a scaled residual, fails it).
    above: bool = False
    seen: set[str | int] = field(default_factory=set)

    def folds(self, p: Plan) -> bool:
        """Whether a kv batch of plan ``p`` folds its rows (a token head reads logits at the
        last position only, so its rows cannot share one sequence)."""
        return self.fold and p.feature.kind != "logits"

    def rises(self, p: Plan, directions: Tensor | None) -> bool:
        """Whether a folded kv batch of plan ``p`` enters above the unit's block: its rows patch
        columns of an MLP's neurons (a direction control, or a dictionary's latent, writes
        along another vector)."""
        return (self.above and self.folds(p) and p.unit.kind == "mlp_post" and p.dictionary is None
                and directions is None)

    def hook(self, n: int) -> Callable[..., Any]:
        """A forward pre-hook that repeats each per-input block argument ``m`` times."""
        def grows(x: Any) -> bool:
            return isinstance(x, Tensor) and x.dim() >= 2 and x.shape[0] == n

        def grow(key: str | int, x: Any) -> Any:
            if self.names is not None and key not in self.names:
                return x
            if grows(x):
                self.seen.add(key)
                return x.repeat_interleave(self.m, 0)
            if isinstance(x, tuple) and x and all(grows(y) for y in x):  # rotary (cos, sin)
                self.seen.add(key)
                return tuple(y.repeat_interleave(self.m, 0) for y in x)
            if self.names is not None:
                for y in x if isinstance(x, tuple) else (x,):
                    if isinstance(y, Tensor) and y.dim() >= 2 and y.shape[0] not in (1, n * self.m):
                        raise RuntimeError(f"block argument {key!r} has a batch of {y.shape[0]}, "
                                           f"expected {n} inputs")
            return x

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return tuple(grow(i, a) for i, a in enumerate(args)), {k: grow(k, v) for k, v in kwargs.items()}

        return hook


def repeat_cache(cache: Any, m: int, grow: Growth | None, n_layers: int) -> None:
    """Repeat each input's prefix cache once per row (in place): in every layer, or from ``grow.at`` on."""
    if grow is None:
        cache.batch_repeat_interleave(m)
        return
    if len(cache.layers) != n_layers:
        raise RuntimeError("the cache does not hold one layer per block")
    for layer in cache.layers[grow.at:]:
        layer.batch_repeat_interleave(grow.m)


@dataclass(frozen=True)
class Entry:
    """What the blocks below ``at`` return for a kv batch's tokens, kept from a clean pass.

    A kv batch's rows are all clean below the unit's block, and a clean forward over
    each input's whole span (prefix and patched tokens, :func:`~neuronpatch.engine.entry_cache`)
    has already run those blocks on the patched tokens. For the batch's own forward each
    block below ``at`` answers with block ``at − 1``'s output kept from that pass instead
    of computing it again: the model's own forward runs from block ``at`` on, and the
    blocks below it cost nothing.
    """

    at: int
    output: Any  # block at − 1's return value, cut to the batch's tokens

    def replay(self, *args: Any, **kwargs: Any) -> Any:
        return self.output

    @classmethod
    def of(cls, at: int, output: Any, s: int, batch: tuple[int, int] | None = None) -> Entry:
        """The entry from block ``at − 1``'s return value, cut to its last ``s`` tokens.

        ``batch``: the ``[inputs, tokens]`` the output must have. Raises ``RuntimeError``
        unless it is a ``[batch, tokens, width]`` tensor, alone or first in a tuple of
        otherwise nothing (a block that also returns attention weights cannot be replayed).
        """
        many = isinstance(output, (tuple, list))
        t = output[0] if many else output
        if not isinstance(t, Tensor) or t.dim() != 3 or (batch is not None and tuple(t.shape[:2]) != batch):
            raise RuntimeError("the block's output is not a [batch, tokens, width] tensor")
        if many and any(x is not None for x in output[1:]):
            raise RuntimeError("the block returns more than its hidden states")
        cut = t[:, -s:].detach().clone()  # (not a view: the whole output would stay alive)
        return cls(at, type(output)([cut, *output[1:]]) if many else cut)

    def take(self, index: Sequence[int]) -> Entry:
        """The part of inputs ``index`` alone, in that order."""
        many = isinstance(self.output, (tuple, list))
        t = (self.output[0] if many else self.output)[list(index)]
        return Entry(self.at, type(self.output)([t, *self.output[1:]]) if many else t)

    def plus(self, moved: Tensor) -> Entry:
        """The same output with ``moved`` (of the same number of elements) added, in its dtype."""
        many = isinstance(self.output, (tuple, list))
        t = self.output[0] if many else self.output
        new = t + moved.reshape(t.shape).to(t.dtype)
        return Entry(self.at, type(self.output)([new, *self.output[1:]]) if many else new)

    def tiled(self, m: int) -> Entry:
        """The same output ``m`` times side by side along the tokens (for folded rows)."""
        many = isinstance(self.output, (tuple, list))
        t = (self.output[0] if many else self.output).repeat(1, m, 1)
        return Entry(self.at, type(self.output)([t, *self.output[1:]]) if many else t)


@contextlib.contextmanager
def _entered(model: LoadedModel, entry: Entry | None) -> Iterator[None]:
    """For one call, the blocks below ``entry.at`` answer with ``entry.output`` (an instance
    ``forward`` shadowing the class's, removed afterwards)."""
    blocks = model.arch.blocks[: entry.at] if entry is not None else []
    if any("forward" in vars(blk) for blk in blocks):
        raise RuntimeError("a block's forward is already replaced (e.g. by an offloading hook)")
    try:
        for blk in blocks:
            blk.forward = entry.replay  # type: ignore[union-attr]
        yield
    finally:
        for blk in blocks:
            vars(blk).pop("forward", None)


# --------------------------------------------------------------------------- the primitive
Tap = tuple[Site, Callable[[Tensor], Tensor | None]]
Mode = Literal["inference", "no_grad", "grad"]


def forward(model: LoadedModel, ids: Tensor, mask: Tensor, positions: Tensor, *,
            taps: Sequence[Tap] = (), cache: Any = None, grow: Growth | None = None,
            rows: int | None = None, until: Site | None = None, filled: int | None = None,
            mode: Mode = "inference", entry: Entry | None = None, fold: int = 1) -> Any:
    """Run the model's own forward on one batch with ``taps`` attached; hooks live only for this call.

    Args:
        ids, mask, positions: token rows ``[B, S]``, the attention mask (covering any cached
            prefix) and explicit position ids.
        taps: ``(site, fn)`` pairs, attached in order (hooks on one module run in the order
            they were registered); ``fn`` may return a replacement tensor or raise :class:`Stop`.
        cache: the model's own ``Cache`` to continue from and fill.
        grow: rows multiply at ``grow.at`` (see :class:`Growth`).
        rows: the batch the taps see (default ``B``, times ``grow.m`` with ``grow``).
        until: stop after this site has run (e.g. the last block, when only the cache is needed).
        filled: stop as soon as block ``filled`` has written its keys and values to ``cache``
            (:func:`_stopped_once_cached`): a pass that needs nothing else of that block skips
            its attention output and its MLP. ``until`` still stops a block that writes none.
        mode: ``inference`` (no autograd), ``no_grad`` (tensors a later backward may read) or
            ``grad``.
        entry: the blocks below ``entry.at`` replay a clean pass's output (see :class:`Entry`).
        fold: each row of ``ids`` holds ``fold`` rows side by side along the sequence; the
            taps see them unfolded, ``[B·fold, S/fold, width]`` (see :attr:`Growth.fold`).

    Returns:
        The model's output, or None when a hook stopped the pass early.
    """
    R = rows if rows is not None else ids.shape[0] * (grow.m if grow is not None else 1)
    handles = []
    if grow is not None:  # registered first (and prepended): the batch grows before any edit
        hook = grow.hook(ids.shape[0])
        handles += [blk.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)
                    for blk in model.arch.blocks[grow.at:]]
    if fold > 1:
        taps = [(site, _unfolded(fn, ids.shape[0], fold)) for site, fn in taps]
    try:
        handles += [architecture.attach(model.arch, site, fn, R) for site, fn in taps]
        if until is not None:
            handles.append(architecture.attach(model.arch, until, _stop, R))
        ctx = {"inference": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}[mode]
        cached = (_stopped_once_cached(cache, model.arch.blocks[filled]) if filled is not None
                  else contextlib.nullcontext())
        with ctx(), _entered(model, entry), cached:
            try:
                return model.hf(input_ids=ids, attention_mask=mask, position_ids=positions,
                                past_key_values=cache, use_cache=cache is not None, **forward_kwargs(model))
            except Stop:
                return None
    finally:
        for h in handles:
            h.remove()


def _unfolded(fn: Callable[[Tensor], Tensor | None], n: int, fold: int) -> Callable[[Tensor], Tensor | None]:
    """``fn`` seeing a folded ``[n, fold·s, width]`` tensor as ``[n·fold, s, width]`` (a view: row
    ``k·fold + j`` is input ``k``'s ``j``-th row, as ``repeat_interleave`` lays rows out)."""
    def unfolded(t: Tensor) -> Tensor | None:
        if t.dim() != 3 or t.shape[0] != n:
            return fn(t)  # already one row per row (a flattened tensor reshaped by the site)
        new = fn(t.reshape(n * fold, t.shape[1] // fold, t.shape[2]))
        return None if new is None else new.reshape(t.shape)
    return unfolded


def _stop(t: Tensor) -> None:
    raise Stop


@contextlib.contextmanager
def _stopped_once_cached(cache: Any, block: Any) -> Iterator[None]:
    """For one call, :class:`Stop` as soon as ``block`` has stored its keys and values in ``cache``.

    The model's attention hands them to its cache (``cache.update``) before it attends;
    after that nothing of the block reaches the cache. ``cache.update`` is shadowed on this
    instance only, and restored afterwards.
    """
    inside: list[bool] = []
    update = cache.update

    def stored(*args: Any, **kwargs: Any) -> Any:
        out = update(*args, **kwargs)
        if inside:
            raise Stop
        return out

    handle = block.register_forward_pre_hook(lambda module, args: inside.append(True))
    cache.update = stored
    try:
        yield
    finally:
        handle.remove()
        vars(cache).pop("update", None)


def last_block(model: LoadedModel) -> Site:
    """The last block's output: a prefix forward that only fills the cache stops there."""
    return Site("block_out", model.n_layers - 1)


# --------------------------------------------------------------------------- the patched run
@dataclass(frozen=True)
class Targets:
    """What each patched row of an input patches, in order.

    ``columns[j]``: the column of the unit's layer row ``j`` patches; ``directions[j]``:
    the direction control it patches along instead (an index into ``Plan.directions``),
    or None. A direction row's column is unused.
    """

    columns: tuple[int, ...]
    directions: tuple[int | None, ...]

    @classmethod
    def of_columns(cls, columns: Sequence[int]) -> Targets:
        return cls(tuple(int(c) for c in columns), (None,) * len(columns))

    @classmethod
    def of_directions(cls, k: int, column: int) -> Targets:
        """Direction controls ``0..k-1`` (``column``: any valid column, left as it is)."""
        return cls((column,) * k, tuple(range(k)))

    def __len__(self) -> int:
        return len(self.columns)

    def __add__(self, other: Targets) -> Targets:
        return Targets(self.columns + other.columns, self.directions + other.directions)

    def repeat(self, k: int) -> Targets:
        """Each row ``k`` times in a row (one per intervention)."""
        return Targets(tuple(c for c in self.columns for _ in range(k)),
                       tuple(d for d in self.directions for _ in range(k)))

    @property
    def on_direction(self) -> Tensor:
        """``[rows]`` bool: the rows that patch along a direction."""
        return torch.tensor([d is not None for d in self.directions], dtype=torch.bool)

    def tensors(self, n: int, device: Any) -> tuple[Tensor, Tensor]:
        """Per row of ``n`` inputs (these rows each): columns and direction indices (−1: none)."""
        cols = torch.tensor(self.columns, dtype=torch.long).repeat(n).to(device)
        dirs = torch.tensor([-1 if d is None else d for d in self.directions], dtype=torch.long)
        return cols, dirs.repeat(n).to(device)


@dataclass
class Batch:
    """Token rows for one patched forward: left-padded, with positions and where to patch/read."""

    ids: Tensor  # [B, S]: one row per row, or one per input with ``grow``
    mask: Tensor  # [B, P + S] attention mask including any cached prefix
    positions: Tensor  # [B, S]
    patch: Tensor  # [R, S] bool: positions to patch
    measure: Tensor  # [R] column of the measured unit value
    read: Tensor  # [R] column of the read position
    alpha: Tensor  # [R]
    beta: Tensor  # [R]
    cache: Any = None
    columns: Tensor | None = None  # [R] the column each row patches; None: the plan's
    directions: Tensor | None = None  # [R] the direction control each row patches (−1: none)
    grow: Growth | None = None  # ids hold one row per input; rows multiply at the unit's block
    entry: Entry | None = None  # the blocks below the unit's replay a clean pass (kv)
    fold: int = 1  # each row of ids holds this many rows side by side (kv; see Growth.fold)
    # The rows enter above the unit's block (Growth.above; ``entry`` holds that block's clean
    # output): the unit's site tensor at the rows' tokens, clean, one per row ``[R, S, width]``.
    unit: Tensor | None = None

    @property
    def rows(self) -> int:
        return int(self.alpha.shape[0])


@dataclass
class Capture:
    """What one patched forward read, one entry per row (a clean row per input among them)."""

    clean_unit: Tensor  # [R] the unit's clean value where it is measured
    patched_unit: Tensor  # [R] the value the intervention asked for there
    features: Tensor  # [R, width] in the head's coordinates
    guard: Tensor | None = None  # [R, width] features in hf coordinates (the coordinate guard)
    unit_row: Tensor | None = None  # [R, units] the whole layer where it is measured, before the patch
    # [R, S, x]: the experts every mixture-of-experts layer between the unit and the features
    # chose at each position from the row's patch on (−1 before it); None: no such layer seen.
    routes: Tensor | None = None
    prefix: Any = None  # a folded kv batch's shared state (engine.Prefix), for a later re-run


class Along:
    """The rows of a batch that patch along a direction control instead of a column.

    Such a row patches ``v = plan.directions[i]`` (unit norm, mean-zero): its value is
    ``v·t`` and its patch adds ``(target − v·t)·v`` to the tensor, in float64, written back
    in the tensor's dtype. No centring applies in either coordinate system (``v·1 = 0``;
    see :mod:`neuronpatch.controls`).
    """

    def __init__(self, p: Plan, directions: Tensor) -> None:
        self.rows = (directions >= 0).nonzero()[:, 0]
        self.index = directions[self.rows]  # which direction each of those rows patches
        self.v = p.directions.to(directions.device, torch.float64)[self.index]  # [rows, d_model]

    def __bool__(self) -> bool:
        return len(self.rows) > 0

    def value(self, t: Tensor) -> Tensor:
        """``[rows, positions]``: ``v·t`` of each direction row, float64."""
        return torch.einsum("rsd,rd->rs", t[self.rows].double(), self.v)

    def add(self, out: Tensor, delta: Tensor) -> None:
        """Add ``delta[row, position] · v`` to the direction rows of ``out`` (in place)."""
        moved = out[self.rows].double() + delta[..., None] * self.v[:, None, :]
        out[self.rows] = moved.to(out.dtype)


class Latents:
    """The patch of a dictionary's latents or an expert's neurons (``Plan.dictionary``): every row
    patches one of them.

    Row ``r``'s value is unit ``cols[r]`` of the tensor at the unit's site; its patch adds
    ``c · w`` to the tensor at the write site (the same site for an SAE; a transcoder's
    output; an expert's block output), ``w`` the unit's decoder row and ``c`` the
    coefficient the change writes: ``Δ`` for a latent, the routing weight times the neuron's
    change for an expert neuron (0 where the token is not routed to the expert). The
    reconstruction error, or every other expert, is kept. The patch is read back as the
    change of ``t·w / |w|²`` that the write made, against the ``c`` requested.
    """

    def __init__(self, p: Plan, cols: Tensor) -> None:
        self.p = p
        self.cols = cols
        self.w = p.dictionary.rows(cols).double()  # [R, d_out]
        self.w2 = (self.w * self.w).sum(-1).clamp_min(1e-30)  # [R]
        self.clean: Tensor | None = None  # [R, S] each row's unit, before the patch
        self.read: Tensor | None = None  # [R, S, width] the tensor the unit was read from
        self.coef: Tensor | None = None  # [R, S] what each row writes along its decoder row
        self.base: Tensor | None = None  # [R, S] t·w/|w|² before the write
        self.norm: Tensor | None = None  # [R, S] |t|/|w| before the write (the tolerance)
        self.dtype = torch.float32  # the dtype the tensor is written back in

    def value(self, t: Tensor) -> Tensor:
        """``[R, S]`` float32: each row's unit (NaN where an expert neuron does not exist)."""
        self.clean = self.p.latent_values(t, self.cols)
        self.read = t
        return self.clean

    def set_change(self, delta: Tensor) -> None:
        """The change ``delta [R, S]`` of each row's unit value the patch asks for (NaN-free where
        the unit exists; positions where it does not write nothing)."""
        assert self.read is not None
        d = self.p.dictionary
        gain = d.gain(self.read, self.cols)
        coef = d.written(self.read, self.cols, torch.nan_to_num(delta)) * gain
        self.coef = torch.where(gain.isnan(), torch.zeros_like(coef), coef)

    def project(self, t: Tensor) -> Tensor:
        return torch.einsum("rsd,rd->rs", t.double(), self.w) / self.w2[:, None]

    def add(self, t: Tensor) -> Tensor:
        """The written tensor ``t + c·w`` (``c`` set by :meth:`set_change`), in ``t``'s dtype."""
        assert self.coef is not None
        self.dtype = t.dtype  # (an expert neuron is read in float32, written in the model's dtype)
        self.base = self.project(t)
        self.norm = t.double().norm(dim=-1) / self.w2.sqrt()[:, None]
        return (t.double() + self.coef.double()[..., None] * self.w[:, None, :]).to(t.dtype)

    def observed(self, t: Tensor) -> Tensor:
        """``[R, S]``: what the write moved ``t·w/|w|²`` by."""
        assert self.base is not None
        return self.project(t) - self.base

    def offset(self, read: Tensor) -> Tensor:
        """``[R]``: the δ/d_model offset of each row's write at the read positions ``read [R]``
        (the written coefficient times the decoder row's sum; see ``Plan.latent_offset``)."""
        assert self.coef is not None
        ar = torch.arange(len(read), device=read.device)
        return self.coef[ar, read] * self.p.latent_offset(self.cols)

    def check(self, b: Batch, observed: Tensor | None) -> None:
        """Raise unless every patched position's write moved by what its row requested.

        Writing ``t + c·w`` back in the tensor's dtype rounds each coordinate once, which moves
        ``t·w/|w|²`` by at most the rounding times ``|t|/|w|``: the tolerance scales with it.
        """
        if observed is None or self.coef is None or self.norm is None:
            raise PatchError(f"the patch at {self.p.write_site} (unit {_latent_names(self.cols)}) was never "
                             "read back after the hook: it cannot be confirmed")
        requested = self.coef.double()
        rtol = PATCH_RTOL.get(self.dtype, 1e-5)
        scale = requested.abs() + observed.abs() + self.norm + 1.0
        err = torch.where(b.patch, (requested - observed).abs() / scale, torch.zeros_like(scale))
        worst = float(err.max()) if err.numel() else 0.0
        if not worst <= rtol:  # NaN fails too
            r, q = divmod(int(err.reshape(-1).argmax()), err.shape[1])
            raise PatchError(
                f"the patch at {self.p.write_site} of unit {int(self.cols[r])} did not take effect on row "
                f"{r} position {q}: requested a write of {float(requested[r, q]):.6g}, observed "
                f"{float(observed[r, q]):.6g} after the hook; the hook did not run or its edit was discarded")


def _latent_names(cols: Tensor) -> str:
    names = sorted({int(c) for c in cols.tolist()})
    return ", ".join(map(str, names[:8])) + (", ..." if len(names) > 8 else "")


@dataclass
class _Read:
    """What the hooks of one patched forward have seen so far (filled as the forward runs)."""

    clean: Tensor | None = None
    patched: Tensor | None = None
    unit_row: Tensor | None = None
    delta_read: Tensor | None = None  # [R] the patch's δ at the read position (0 on direction rows)
    requested: Tensor | None = None  # [R, S] the column the patch wrote
    observed: Tensor | None = None  # [R, S] the column read back after the patch
    early: bool = False  # the features were read before the unit: an upstream head
    along_requested: Tensor | None = None
    along_observed: Tensor | None = None
    along_norm: Tensor | None = None
    features: Tensor | None = None
    guard: Tensor | None = None
    routes: dict[int, Tensor] = field(default_factory=dict)


def _route_taps(model: LoadedModel, p: Plan, got: _Read) -> list[Tap]:
    """Read-only taps on the expert choice of every mixture-of-experts layer after the unit."""
    arch = model.arch
    if not arch.moe:
        return []
    after = p.unit.order(arch.n_layers)
    # (a router unit changes its own block's choice by design: only later blocks count)
    own = p.unit.layer if p.unit.kind == "router_in" else -1
    sites = [Site("route", L) for L, sparse in enumerate(arch.moe)
             if sparse is not None and Site("route", L).order(arch.n_layers) > after and own != L]

    def keep(L: int) -> Callable[[Tensor], None]:
        def fn(t: Tensor) -> None:
            got.routes[L] = t.detach().clone()
        return fn

    return [(site, keep(site.layer)) for site in sites]


def _routes(got: _Read, b: Batch) -> Tensor | None:
    if not got.routes:
        return None
    rows = [t for _, t in sorted(got.routes.items()) if t.shape[:2] == b.patch.shape]
    if not rows:
        return None
    out = torch.cat(rows, dim=-1)
    before = b.patch.cumsum(1) == 0  # positions before the row's first patch cannot differ
    return out.masked_fill(before[..., None].to(out.device), -1)


# A context the patched rows' forward runs in (the rounding measurement's float32 blocks).
RowsIn = Callable[[], contextlib.AbstractContextManager[None]]


def run_rows(model: LoadedModel, p: Plan, b: Batch, guard: Site | None = None, *,
             rows_in: RowsIn | None = None) -> Capture:
    """Run the model's own forward on ``b`` with the patch and capture hooks attached.

    ``guard``: a second feature site to read unchanged (the coordinate guard).
    ``rows_in``: a context the forward runs in (any prefix pass of the batch ran outside it).
    Every patch is checked: a second hook at the unit's site, after the patch,
    reads the column (or the direction's value) back; a patch that never ran, or
    left another value than the one requested, raises :class:`~neuronpatch.errors.PatchError`.
    Rows that enter above the unit's block (``b.unit``) are patched on the clean pass's
    tensor before the forward and reach the model as the block's output plus their write;
    that identity is what :attr:`Growth.above` checked for the model.
    """
    R = b.rows
    ar = torch.arange(R, device=model.device)
    got = _Read()
    n: Any = p.neuron if b.columns is None else b.columns
    along: Along | None = None
    if p.directions is not None and b.directions is not None:
        along = Along(p, b.directions) or None
    lat: Latents | None = None
    if p.dictionary is not None:
        lat = Latents(p, torch.full((R,), p.neuron, device=model.device) if b.columns is None else b.columns)
    logits = p.feature.kind == "logits"

    def have_all() -> bool:
        return (got.clean is not None and got.features is not None
                and (guard is None or got.guard is not None))

    def column(t: Tensor) -> Tensor:
        if b.columns is None:
            return t[..., n]
        return t.gather(-1, n[:, None, None].expand(-1, t.shape[1], 1))[..., 0]

    def patch(t: Tensor) -> Tensor | None:
        col = column(t) if lat is None else lat.value(t)  # a latent's value is its own column
        c = p.unit_value(col, t) if lat is None else col
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
            got.along_requested = a + a_delta
        got.clean, got.patched = clean, patched
        got.unit_row = p.layer_values(t[ar, b.measure])
        got.delta_read = delta[ar, b.read]  # direction rows: 0, they carry no δ/d offset
        new_col = (col.float() + delta).to(t.dtype)
        got.requested = new_col
        if lat is not None:
            lat.set_change(delta)
            got.delta_read = lat.offset(b.read)
        if have_all():
            got.early = True  # the features were read before the unit: an upstream head
            raise Stop
        if lat is not None:  # an SAE writes here; a transcoder at its output (``write`` below)
            return lat.add(t) if p.write is None else None
        out = t.clone()
        if b.columns is None:
            out[..., n] = new_col
        else:
            out.scatter_(-1, n[:, None, None].expand(-1, t.shape[1], 1), new_col[..., None])
        if along is not None:
            along.add(out, a_delta)
        return out

    def write(t: Tensor) -> Tensor:
        assert lat is not None
        return lat.add(t)

    def observe(t: Tensor) -> None:
        if lat is not None:
            got.observed = lat.observed(t)
            return
        got.observed = column(t).detach().clone()
        if along is not None:
            got.along_observed = along.value(t)
            got.along_norm = t[along.rows].double().norm(dim=-1)

    def all_rows(t: Tensor) -> Tensor:  # a site below the growth point still has one row per input
        return t if t.shape[0] == R else t.repeat_interleave(R // t.shape[0], 0)

    def capture(t: Tensor) -> None:
        got.features = p.read_features(all_rows(t)[ar, b.read], got.delta_read)
        if have_all():
            raise Stop  # nothing later in the forward can change what was read

    def capture_guard(t: Tensor) -> None:
        got.guard = all_rows(t)[ar, b.read].float()
        if have_all():
            raise Stop

    entry = b.entry
    taps: list[Tap] = []
    if b.unit is not None:  # the rows enter above the unit's block: patch its clean tensor here
        assert entry is not None and lat is None and along is None, "rows above the unit patch columns"
        patch(b.unit)
        assert got.requested is not None
        change = got.requested.float() - column(b.unit).float()  # [R, S]: 0 where not patched
        cols = torch.full((R,), p.neuron, device=model.device) if b.columns is None else b.columns
        distinct, which = torch.unique(cols, return_inverse=True)
        w = neuron_writes(model, p.unit.layer, distinct, b.unit.shape[-1])
        entry = entry.plus(change[..., None] * w[which][:, None, :])
    else:
        # Hooks on one module run in the order they were registered: patch, observe, capture.
        taps.append((p.unit, patch))
        if lat is not None and p.write is not None:
            taps.append((p.write, write))
        taps.append((p.write_site, observe))
    if not logits:
        taps.append((p.feature, capture))
    if guard is not None:
        taps.append((guard, capture_guard))
    taps += _route_taps(model, p, got)
    with rows_in() if rows_in is not None else contextlib.nullcontext():
        out = forward(model, b.ids, b.mask, b.positions, taps=taps, cache=b.cache, grow=b.grow, rows=R,
                      entry=entry, fold=b.fold)
    if logits and out is not None:
        got.features = out.logits[:, -1].float()
    if got.requested is None:
        raise PatchError(f"the patch hook at {p.unit} (column {_columns(p, b)}) never ran during the "
                         "forward pass: no row was patched, so no slope can be measured")
    missing = [name for name, value, wanted in (("features", got.features, True),
                                                ("guard", got.guard, guard is not None))
               if wanted and value is None]
    if missing:
        raise RuntimeError(f"sites {p.unit} / {p.feature} did not fire during the forward pass "
                           f"(missing {missing})")
    # (Rows above the unit's block have no hook to read back: the write's identity with the
    # patched block is what Growth.above checked for this model.)
    checked = b.unit is None and not got.early
    if checked and lat is not None:
        lat.check(b, got.observed)
    elif checked:
        _check_patch(p, b, got.observed, got.requested, skip=None if along is None else along.rows)
        if along is not None:
            assert got.along_requested is not None
            _check_along(p, b, along, got.along_requested, got.along_observed, got.along_norm,
                         got.requested.dtype)
    assert got.clean is not None and got.patched is not None and got.features is not None
    return Capture(got.clean, got.patched, got.features, got.guard, got.unit_row, _routes(got, b))


def mlp_writes(model: LoadedModel, layer: int, vectors: Tensor) -> Tensor:
    """``[k, d_model]`` float32: what block ``layer``'s MLP output projection writes per unit of
    each of ``vectors`` ``[k, neurons]`` added to its input (the module's own response; its
    bias cancels). A neuron's write is its one-hot vector's; a latent's, its decoder row's.
    """
    proj = model.arch.mlp_out_proj[layer]
    assert proj is not None, f"block {layer} has no MLP output projection"
    w = next(proj.parameters())
    e = torch.zeros(len(vectors) + 1, 1, vectors.shape[-1], dtype=w.dtype, device=w.device)
    e[1:, 0] = vectors.to(w.device, w.dtype)
    with torch.inference_mode():
        out = proj(e)[:, 0].float()
    return out[1:] - out[:1]


def neuron_writes(model: LoadedModel, layer: int, cols: Tensor, width: int) -> Tensor:
    """``[len(cols), d_model]``: :func:`mlp_writes` of a unit step of each neuron ``cols`` of ``width``."""
    steps = torch.zeros(len(cols), width, device=model.device)
    steps[torch.arange(len(cols)), cols.to(model.device)] = 1.0
    return mlp_writes(model, layer, steps)


def _columns(p: Plan, b: Batch) -> str:
    if b.columns is None:
        return str(p.neuron)
    dirs = b.directions.tolist() if b.directions is not None else [-1] * b.rows
    names = sorted({f"dir{d}" if d >= 0 else str(int(c)) for c, d in zip(b.columns.tolist(), dirs,
                                                                           strict=True)},
                   key=lambda s: (s.startswith("dir"), int(s.removeprefix("dir"))))
    return ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")


def _check_patch(p: Plan, b: Batch, observed: Tensor | None, requested: Tensor,
                 skip: Tensor | None = None) -> None:
    """Raise unless the unit holds, at every patched position, the value its row requested.

    ``skip``: rows that patch along a direction (checked by :func:`_check_along`).
    """
    if observed is None:
        raise PatchError(f"the unit at {p.unit} (column {_columns(p, b)}) was never read back after the "
                         "patch hook: the patch cannot be confirmed")
    rtol = PATCH_RTOL.get(requested.dtype, 1e-5)
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
        col = p.neuron if b.columns is None else int(b.columns[r])
        raise PatchError(
            f"the patch at {p.unit} column {col} did not take effect on row {r} position {q}: "
            f"requested {float(want[r, q]):.6g}, observed {float(have[r, q]):.6g} after the hook "
            f"(tolerance {rtol * scale:.3g}); the hook did not run or its edit was discarded")


def _check_along(p: Plan, b: Batch, along: Along, requested: Tensor, observed: Tensor | None,
                 norm: Tensor | None, dtype: torch.dtype) -> None:
    """Raise unless every direction row's value ``v·t`` is, where patched, what it requested.

    Writing the patched tensor back in its dtype rounds each coordinate once, which moves
    ``v·t`` by at most the rounding times ``|t|`` (``|v| = 1``): the tolerance scales with
    ``|t|`` at that position as well as with the values.
    """
    if observed is None or norm is None:
        raise PatchError(f"the unit at {p.unit} (directions {_columns(p, b)}) was never read back "
                         "after the patch hook: the patch cannot be confirmed")
    rtol = PATCH_RTOL.get(dtype, 1e-5)
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
