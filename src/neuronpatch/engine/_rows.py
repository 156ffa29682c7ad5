"""Patched rows, built two ways: every row from the start (``full``), or over a prefix cache (``kv``).

Both build one :class:`~neuronpatch.engine.Batch` per call and run it through
:func:`~neuronpatch.engine.run_rows`; :func:`layer_rows` reads the unit's whole
layer for mean ablation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from neuronpatch.architecture import Site
from neuronpatch.coordinates import Plan
from neuronpatch.engine._forward import (
    Batch,
    Capture,
    Growth,
    Stop,
    Targets,
    forward,
    last_block,
    repeat_cache,
    run_rows,
)
from neuronpatch.engine._inputs import Encoded, left_pad, pad_id

if TYPE_CHECKING:
    from neuronpatch.models import LoadedModel


def _targets(targets: Targets | None, n: int, device: object) -> tuple[Tensor | None, Tensor | None]:
    if targets is None:
        return None, None
    cols, dirs = targets.tensors(n, device)
    return cols, (dirs if bool((dirs >= 0).any()) else None)


def full_rows(model: LoadedModel, p: Plan, enc: Encoded, idx: Sequence[int], affine: Tensor,
              guard: Site | None = None, targets: Targets | None = None,
              grow: Growth | None = None) -> Capture:
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
    return run_rows(model, p, b, guard)


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


def kv_rows(model: LoadedModel, p: Plan, enc: Encoded, idx: Sequence[int], affine: Tensor,
            guard: Site | None = None, targets: Targets | None = None,
            grow: Growth | None = None, prefix: tuple[Any, Tensor, Tensor] | None = None) -> Capture:
    """One prefix forward keeps the model's cache; each row re-runs only patch..read.

    Every input in ``idx`` has one patched position at or before its read
    position, and the same number of tokens from the patch to the read position.
    The prefix cache is repeated once per row, in every layer or (with ``grow``)
    only in the layers from the unit's block on, where the rows differ.
    ``prefix``: the ``(cache, mask, lengths)`` of :func:`prefix_cache` over these inputs'
    tokens before the patch, kept from an earlier pass (it is repeated in place).
    """
    m = affine.shape[1]
    dev = model.device
    first = [enc.patch_pos[i][0] for i in idx]
    prefixes = [enc.ids[i][:q] for i, q in zip(idx, first, strict=True)]
    suffixes = [enc.ids[i][q: enc.read_pos[i] + 1] for i, q in zip(idx, first, strict=True)]
    s = len(suffixes[0])
    assert all(len(x) == s for x in suffixes) and all(prefixes), "one suffix length, non-empty prefixes"
    cache, pmask, lengths = prefix_cache(model, prefixes) if prefix is None else prefix
    repeat_cache(cache, m, grow, model.n_layers)
    sids = torch.tensor(suffixes, dtype=torch.long, device=dev)
    spos = lengths[:, None] + torch.arange(s, device=dev)[None, :]
    smask = torch.cat([pmask, torch.ones(len(idx), s, dtype=pmask.dtype, device=dev)], dim=1)
    patch = torch.zeros(len(idx) * m, s, dtype=torch.bool, device=dev)
    patch[:, 0] = True
    R = len(idx) * m
    rep = lambda t: t.repeat_interleave(m, 0)  # noqa: E731
    tokens = (lambda t: t) if grow is not None else rep
    cols, dirs = _targets(targets, len(idx), dev)
    b = Batch(ids=tokens(sids), mask=tokens(smask), positions=tokens(spos), patch=patch,
              measure=torch.zeros(R, dtype=torch.long, device=dev),
              read=torch.full((R,), s - 1, dtype=torch.long, device=dev),
              alpha=affine[..., 0].reshape(-1).to(dev), beta=affine[..., 1].reshape(-1).to(dev), cache=cache,
              columns=cols, directions=dirs, grow=grow)
    return run_rows(model, p, b, guard)


def layer_rows(model: LoadedModel, p: Plan, enc: Encoded, idx: Sequence[int]) -> list[Tensor]:
    """Every unit of the layer at every patched position of each input (for ``mean``).

    One tensor ``[positions, units]`` per input, in the unit's own coordinates.
    """
    ids, mask, pos = left_pad([enc.ids[i] for i in idx], pad_id(model), model.device)
    seen: list[Tensor] = []

    def grab(t: Tensor) -> None:
        seen.append(p.layer_values(t))
        raise Stop

    forward(model, ids, mask, pos, taps=[(p.unit, grab)])
    S = ids.shape[1]
    return [seen[0][k, S - len(enc.ids[i]):][enc.patch_pos[i]].cpu() for k, i in enumerate(idx)]
