"""Whether rows may multiply at the unit's block on a model: checked once per model, block and site."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch

from neuronpatch.coordinates import Plan
from neuronpatch.engine._forward import Growth
from neuronpatch.engine._inputs import Encoded
from neuronpatch.engine._rows import full_rows, kv_rows
from neuronpatch.tolerance import agree, check_rtol

if TYPE_CHECKING:
    from neuronpatch.models import LoadedModel

# Per model, then per (block, feature site, unit kind, dictionary or not): the block arguments
# that carry the batch (None where growing the batch at that block does not reproduce an
# ungrown run), whether a kv batch may enter at that block, fold its rows there, and enter
# above it. The feature site is part of the key because code after the last block (a reshape
# to the input's batch) can differ; the unit, because only an MLP neuron's rows rise above.
_Found = tuple[frozenset[str | int] | None, bool, bool, bool]
_Key = tuple[int, str, str, bool]
_GROWTH: weakref.WeakKeyDictionary[Any, dict[_Key, _Found]] = weakref.WeakKeyDictionary()


def growth(model: LoadedModel, p: Plan, m: int) -> Growth | None:
    """How ``m`` rows per input multiply at the unit's block on this model, or None where they may not.

    Checked once per model, block and feature site on a small padded batch, through both the
    full and the kv paths: grown and ungrown runs must give the same features. The same
    check decides whether a kv batch may enter at the unit's block (:class:`Entry`), fold
    its rows along the sequence (:attr:`Growth.fold`) and, for an MLP neuron in float32 or
    float64, enter above the unit's block with the neuron's write (:attr:`Growth.above`).
    A model whose blocks take per-input state some other way (Bloom's ALiBi
    table, a cache with layers not one per block) fails the check and keeps
    one row per row all the way up.
    """
    at = p.unit.layer
    if m < 2 or at < 1 or p.upstream:
        return None
    known = _GROWTH.setdefault(model.hf, {})
    key = (at, str(p.feature), p.unit.kind, p.dictionary is None)
    if key not in known:
        known[key] = _check(model, p, at)
    names, enter, fold, above = known[key]
    return None if names is None else Growth(at, m, names, enter, fold, above)


def _check(model: LoadedModel, p: Plan, at: int) -> _Found:
    vocab = model.vocab_size
    ids = [[(7 * j + 3) % vocab for j in range(7)], [(5 * j + 11) % vocab for j in range(5)]]
    enc = Encoded(ids=ids, read_pos=[6, 4], patch_pos=[[3], [1]], measure_pos=[3, 1])
    affine = torch.tensor([[1.0, 0.0], [2.0, 0.5], [0.0, 1.0]]).expand(2, -1, -1).contiguous()
    m = affine.shape[1]
    rtol = check_rtol(model.hf.dtype)
    seen: set[str | int] = set()
    want = None
    try:
        for rows in (full_rows, kv_rows) if not model.arch.kv_refused else (full_rows,):
            want = rows(model, p, enc, [0, 1], affine)
            g = Growth(at, m, None)
            have = rows(model, p, enc, [0, 1], affine, grow=g)
            if agree(want.features, have.features, rtol) is not None:
                return None, False, False, False
            seen |= g.seen
    except Exception:
        return None, False, False, False
    names = frozenset(seen)
    if model.arch.kv_refused or want is None:
        return names, False, False, False

    def holds(grow: Growth) -> bool:  # ``want``: the kv path's ungrown rows
        try:
            have = kv_rows(model, p, enc, [0, 1], affine, grow=grow)
        except Exception:
            return False
        return agree(want.features, have.features, rtol) is None

    enter = holds(Growth(at, m, names, enter=True))
    fold = enter and holds(Growth(at, m, names, enter=True, fold=True))
    above = Growth(at, m, names, enter=True, fold=True, above=True)
    # Rows above the unit's block skip the model's own rounding of the patched block, so only
    # where rounding is float32's or finer (the reduced-precision error is measured on the block).
    rises = fold and above.rises(p, None) and model.hf.dtype in (torch.float32, torch.float64)
    return names, enter, fold, rises and holds(above)
