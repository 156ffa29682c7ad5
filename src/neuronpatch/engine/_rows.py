"""Patched rows, built two ways: every row from the start (``full``), or over a prefix cache (``kv``).

Both build one :class:`~neuronpatch.engine.Batch` per call and run it through
:func:`~neuronpatch.engine.run_rows`; :func:`layer_rows` reads the unit's whole
layer for mean ablation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from neuronpatch.architecture import Site
from neuronpatch.coordinates import Plan
from neuronpatch.engine._forward import (
    Batch,
    Capture,
    Entry,
    Growth,
    RowsIn,
    Stop,
    Targets,
    forward,
    last_block,
    repeat_cache,
    run_rows,
)
from neuronpatch.engine._inputs import Encoded, chunks, left_pad, pad_id, short
from neuronpatch.errors import InputError

if TYPE_CHECKING:
    from neuronpatch.models import LoadedModel


def _targets(targets: Targets | None, n: int, device: object) -> tuple[Tensor | None, Tensor | None]:
    if targets is None:
        return None, None
    cols, dirs = targets.tensors(n, device)
    return cols, (dirs if bool((dirs >= 0).any()) else None)


def full_rows(model: LoadedModel, p: Plan, enc: Encoded, idx: Sequence[int], affine: Tensor,
              guard: Site | None = None, targets: Targets | None = None,
              grow: Growth | None = None, *, rows_in: RowsIn | None = None) -> Capture:
    """Every row from the start: inputs × (interventions) in one left-padded batch.

    ``affine[k, j]`` is ``(α, β)`` of row ``j`` of input ``idx[k]``; ``targets``: what each
    row patches (default the plan's unit). With ``grow``, the tokens go in once per input
    and the rows multiply at the unit's block.
    """
    m = affine.shape[1]
    dev = model.device
    ends = [max(enc.read_pos[i], enc.measure_pos[i], max(enc.patch_pos[i])) + 1 for i in idx]
    rows = [enc.ids[i][:e] for i, e in zip(idx, ends, strict=True)]
    ids, mask, pos = left_pad(rows, pad_id(model), dev)
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
    cols, dirs = _targets(targets, len(idx), dev)
    b = Batch(ids=tokens(ids), mask=tokens(mask), positions=tokens(pos), patch=rep(patch).to(dev),
              measure=rep(measure).to(dev), read=rep(read).to(dev),
              alpha=affine[..., 0].reshape(-1).to(dev), beta=affine[..., 1].reshape(-1).to(dev),
              columns=cols, directions=dirs, grow=grow)
    return run_rows(model, p, b, guard, rows_in=rows_in)


def prefix_cache(model: LoadedModel, prefixes: Sequence[Sequence[int]], *,
                 keep_grad: bool = False) -> tuple[Any, Tensor, Tensor]:
    """The model's own ``DynamicCache`` over left-padded ``prefixes``: ``(cache, mask, lengths)``.

    The forward stops after the last block (the cache is complete there; the final
    norm and the LM head would only be thrown away). ``keep_grad``: run without inference
    mode, so a later backward may read the cache.
    """
    from transformers import DynamicCache

    dev = model.device
    ids, mask, pos = left_pad(prefixes, pad_id(model), dev)
    cache = DynamicCache(config=model.hf.config)
    forward(model, ids, mask, pos, cache=cache, until=last_block(model),
            mode="no_grad" if keep_grad else "inference")
    lengths = torch.tensor([len(x) for x in prefixes], dtype=torch.long, device=dev)
    return cache, mask, lengths


@dataclass
class Prefix:
    """The state a kv batch's rows share: the prefix cache over left-padded inputs, its mask
    ``[inputs, P]`` and lengths, and, where the rows enter at the unit's block, the :class:`Entry`."""

    cache: Any
    mask: Tensor
    lengths: Tensor
    entry: Entry | None = None
    # Rows entering above the unit's block (``entry`` is then that block's output): the unit's
    # site tensor at each input's suffix tokens, clean, ``[inputs, s, width]``.
    unit: Tensor | None = None

    def select(self, model: LoadedModel, k: int) -> Prefix:
        """Input ``k``'s own copy, cut back to the prefix (tokens the rows appended are dropped)."""
        from transformers import DynamicCache

        P = self.mask.shape[1]
        cache = DynamicCache(config=model.hf.config)
        for i, layer in enumerate(self.cache.layers):
            if layer.is_initialized:
                cache.update(layer.keys[k: k + 1, ..., :P, :].clone(),
                             layer.values[k: k + 1, ..., :P, :].clone(), i)
        entry = None if self.entry is None else self.entry.take([k])
        unit = None if self.unit is None else self.unit[k: k + 1]
        return Prefix(cache, self.mask[k: k + 1], self.lengths[k: k + 1], entry, unit)


def entry_cache(model: LoadedModel, prefixes: Sequence[Sequence[int]], suffixes: Sequence[Sequence[int]],
                at: int, last: int | None = None, unit: Site | None = None) -> Prefix:
    """One clean forward over each input's prefix and suffix: the prefix cache and an :class:`Entry`.

    Every suffix has the same length ``s``. The cache is cut back to the prefix (the
    suffix's keys and values are the rows' to write), and block ``at − 1``'s output at
    the suffix tokens is kept, so a kv batch over these suffixes may start at block
    ``at``. ``last``: the last block whose cache the rows read (default the model's last);
    the pass stops as soon as that block has stored its keys and values (its attention
    output and MLP would only be thrown away). ``unit``: the rows enter above the unit's
    block instead (:attr:`Growth.above`): block ``at``'s output is kept, and the tensor at
    ``unit`` at the suffix tokens. Returns them as a :class:`Prefix`.

    Raises:
        RuntimeError: the model's cache or block outputs are not of a kind this can cut
            (the growth check then keeps the plain kv pass for the model).
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    s = len(suffixes[0])
    dev = model.device
    ids, mask, pos = left_pad([[*a, *b] for a, b in zip(prefixes, suffixes, strict=True)], pad_id(model), dev)
    kept: list[Any] = []
    at_unit: list[Tensor] = []

    def keep(module: Any, args: Any, output: Any) -> None:
        kept.append(output)

    def keep_unit(t: Tensor) -> None:
        at_unit.append(t[:, -s:].detach().clone())

    cache = DynamicCache(config=model.hf.config)
    kept_at = at - 1 if unit is None else at
    stop = last_block(model) if last is None else Site("block_out", last)
    handle = model.arch.blocks[kept_at].register_forward_hook(keep)
    try:
        # Of the last block only its cache is read (the rows run it again at the suffix), so the
        # pass stops once that block has stored its keys and values, unless it is the kept block.
        forward(model, ids, mask, pos, cache=cache, taps=[] if unit is None else [(unit, keep_unit)],
                until=stop, filled=stop.layer if kept_at < stop.layer else None)
    finally:
        handle.remove()
    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        raise RuntimeError("the model's cache has layers other than plain full-attention ones")
    cache.crop(-s)
    lengths = torch.tensor([len(x) for x in prefixes], dtype=torch.long, device=dev)
    entry = Entry.of(at if unit is None else at + 1, kept[0], s, (ids.shape[0], ids.shape[1]))
    return Prefix(cache, mask[:, :-s], lengths, entry, at_unit[0] if unit is not None else None)


def kv_rows(model: LoadedModel, p: Plan, enc: Encoded, idx: Sequence[int], affine: Tensor,
            guard: Site | None = None, targets: Targets | None = None,
            grow: Growth | None = None, prefix: Prefix | None = None, *,
            rows_in: RowsIn | None = None) -> Capture:
    """One prefix forward keeps the model's cache; each row re-runs only patch..read.

    Every input in ``idx`` has one patched position at or before its read
    position, and the same number of tokens from the patch to the read position.
    The prefix cache is repeated once per row, in every layer or (with ``grow``)
    only in the layers from the unit's block on, where the rows differ. With
    ``grow.enter`` the prefix pass also runs the suffix clean (:func:`entry_cache`) and the
    rows start at the unit's block: the blocks below it never run for them (with
    ``grow.above``, folded rows of MLP neurons start above it, :meth:`Growth.rises`).
    ``prefix``: the state of an earlier pass over these inputs' tokens before the patch
    (:func:`prefix_cache`, or a folded batch's ``Capture.prefix``; it is used up).
    ``rows_in``: a context the rows' forward runs in, not the prefix pass (:func:`run_rows`).
    A folded batch hands its state back as ``Capture.prefix``.
    """
    m = affine.shape[1]
    dev = model.device
    first = [enc.patch_pos[i][0] for i in idx]
    prefixes = [enc.ids[i][:q] for i, q in zip(idx, first, strict=True)]
    suffixes = [enc.ids[i][q: enc.read_pos[i] + 1] for i, q in zip(idx, first, strict=True)]
    s = len(suffixes[0])
    assert all(len(x) == s for x in suffixes) and all(prefixes), "one suffix length, non-empty prefixes"
    cols, dirs = _targets(targets, len(idx), dev)
    if prefix is None and grow is not None and grow.enter:
        rise = p.unit if grow.rises(p, dirs) else None
        prefix = entry_cache(model, prefixes, suffixes, grow.at, _last_read(model, p), rise)
    elif prefix is None:
        prefix = Prefix(*prefix_cache(model, prefixes))
    cache, pmask, lengths, entry, unit = prefix.cache, prefix.mask, prefix.lengths, prefix.entry, prefix.unit
    sids = torch.tensor(suffixes, dtype=torch.long, device=dev)
    spos = lengths[:, None] + torch.arange(s, device=dev)[None, :]
    R = len(idx) * m
    patch = torch.zeros(R, s, dtype=torch.bool, device=dev)
    patch[:, 0] = True
    rows = dict(patch=patch, measure=torch.zeros(R, dtype=torch.long, device=dev),
                read=torch.full((R,), s - 1, dtype=torch.long, device=dev),
                alpha=affine[..., 0].reshape(-1).to(dev), beta=affine[..., 1].reshape(-1).to(dev),
                cache=cache, columns=cols, directions=dirs)
    if entry is not None and grow is not None and grow.folds(p):
        # One row per input holding its m rows side by side: the prefix cache is shared.
        b = Batch(ids=sids.repeat(1, m), mask=folded_mask(model, pmask, m, s), positions=spos.repeat(1, m),
                  entry=entry.tiled(m), fold=m, unit=None if unit is None else unit.repeat_interleave(m, 0),
                  **rows)
        got = run_rows(model, p, b, guard, rows_in=rows_in)
        got.prefix = prefix
        return got
    if unit is not None:
        raise ValueError("rows that enter above the unit's block must fold")
    if entry is not None and grow is None:
        raise ValueError("rows that enter at the unit's block need its Growth")
    repeat_cache(cache, m, grow, model.n_layers)
    smask = torch.cat([pmask, torch.ones(len(idx), s, dtype=pmask.dtype, device=dev)], dim=1)
    tokens = (lambda t: t) if grow is not None else (lambda t: t.repeat_interleave(m, 0))
    b = Batch(ids=tokens(sids), mask=tokens(smask), positions=tokens(spos), grow=grow, entry=entry, **rows)
    return run_rows(model, p, b, guard, rows_in=rows_in)


def _last_read(model: LoadedModel, p: Plan) -> int:
    """The last block the rows run before their features are read (whose cache they need)."""
    f = p.feature
    if f.kind in ("final_norm", "logits"):
        return model.n_layers - 1
    return max(p.unit.layer, f.layer - 1 if f.kind == "block_in" else f.layer)


def folded_mask(model: LoadedModel, pmask: Tensor, m: int, s: int) -> Tensor:
    """The attention mask of ``m`` rows of ``s`` tokens folded side by side after a shared prefix.

    ``[inputs, 1, m·s, P + m·s]``: each token sees the prefix's real tokens (``pmask``) and
    the tokens of its own row up to itself, never another row's; in the form the model's
    attention takes a prepared mask (boolean for ``sdpa``, additive for ``eager``).

    Raises:
        RuntimeError: the model's attention takes no prepared mask.
    """
    n, P = pmask.shape
    q = torch.arange(m * s, device=pmask.device)
    own = (q[:, None] // s == q[None, :] // s) & (q[None, :] <= q[:, None])  # [m·s, m·s]
    seen = torch.cat([pmask.bool()[:, None, None, :].expand(n, 1, m * s, P),
                      own.expand(n, 1, m * s, m * s)], dim=-1)
    impl = model.hf.config._attn_implementation
    if impl == "sdpa":
        return seen
    if impl == "eager":
        dtype = model.hf.dtype
        blocked = torch.zeros(seen.shape, dtype=dtype, device=seen.device)
        return blocked.masked_fill(~seen, torch.finfo(dtype).min)
    raise RuntimeError(f"attention {impl!r} takes no prepared mask")


def _at_unit(model: LoadedModel, p: Plan, enc: Encoded, idx: Sequence[int],
             read: Callable[[Tensor], Tensor]) -> list[Tensor]:
    """``read`` of the unit's site tensor, one clean forward of inputs ``idx`` stopped there: one
    tensor ``[tokens, ...]`` per input, its own tokens only (the padding cut off)."""
    ids, mask, pos = left_pad([enc.ids[i] for i in idx], pad_id(model), model.device)
    seen: list[Tensor] = []

    def grab(t: Tensor) -> None:
        seen.append(read(t))
        raise Stop

    forward(model, ids, mask, pos, taps=[(p.unit, grab)])
    S = ids.shape[1]
    return [seen[0][k, S - len(enc.ids[i]):] for k, i in enumerate(idx)]


def layer_rows(model: LoadedModel, p: Plan, enc: Encoded, idx: Sequence[int]) -> list[Tensor]:
    """Every unit of the layer at every patched position of each input (for ``mean``).

    One tensor ``[positions, units]`` per input, in the unit's own coordinates.
    """
    rows = _at_unit(model, p, enc, idx, p.layer_values)
    return [r[enc.patch_pos[i]].cpu() for r, i in zip(rows, idx, strict=True)]



def routed_only(model: LoadedModel, p: Plan, enc: Encoded, texts: Sequence[str], batch_size: int, *,
                where: Any = "the head") -> tuple[list[str], list[str]]:
    """``(kept, left out)``: the inputs where the unit exists at the measured position, and the
    rest. Every unit exists everywhere except an expert neuron, which exists only at tokens
    routed to its expert.

    Raises:
        InputError: the unit exists on none of the inputs.
    """
    if p.dictionary is None or not p.dictionary.routed:
        return list(texts), []
    there: list[bool] = []
    for idx in chunks(len(texts), batch_size):
        exists = _at_unit(model, p, enc, idx, lambda t: p.dictionary.gain(t).isfinite())
        there += [bool(e[enc.measure_pos[i]]) for e, i in zip(exists, idx, strict=True)]
    kept = [t for t, ok in zip(texts, there, strict=True) if ok]
    if not kept:
        d = p.dictionary
        raise InputError(f"{where}: expert {d.expert} of block {d.layer} is not routed at the patched token "
                         f"of any of the {len(texts)} inputs, so its neuron never exists there: nothing to "
                         "patch")
    return kept, [t for t, ok in zip(texts, there, strict=True) if not ok]


def unrouted_note(p: Plan, kept: Sequence[str], left_out: Sequence[str]) -> str:
    """The note that says which inputs :func:`routed_only` left out, and why."""
    d = p.dictionary
    return (f"routing: expert {d.expert} not routed at the patched token on {len(left_out)} of "
            f"{len(kept) + len(left_out)} inputs; left out (its neurons do not exist there): "
            + ", ".join(repr(short(t)) for t in left_out[:3]) + (", ..." if len(left_out) > 3 else ""))
