"""How far rounding in the model's dtype moves a prediction change, measured on the run itself.

A slope is a ratio of small differences of predictions. In bfloat16 a prediction carries a
relative rounding error near 2⁻⁸, and a prediction *change* a thousand times smaller than the
prediction is then mostly rounding: over tiny random models of 14 architectures, bfloat16
slopes differ from float32 ones by 0.1% to 50%. So every result carries a bound on one row's
rounding error, measured, and :mod:`neuronpatch.stats` turns it into bounds on the fit.

In bfloat16 and float16 the engine re-runs the inputs whose activation changes spread widest
(one input in sixteen, at least one): their patched rows' own forward, with every module it
reaches cast to float32 (an exact cast; :func:`float32_weights`), over the state the rows
share (prefix cache; hidden states below the unit's block) in the model's dtype, kept from
the run where the route allows (:attr:`Measured.states`). It takes the largest difference
between the two runs' prediction changes on those rows. A float32
run is not re-run: its bound is a fixed fraction of the prediction scale, measured against
float64 (see :data:`neuronpatch.stats.FLOAT32_ROW_RTOL`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from neuronpatch.coordinates import Plan
from neuronpatch.engine._inputs import Encoded
from neuronpatch.engine._routes import Budget, Measured, Route, measure
from neuronpatch.engine._rows import Prefix, kv_rows
from neuronpatch.names import FULL_PRECISION
from neuronpatch.stats import FLOAT32_ROW_RTOL, Rounding

if TYPE_CHECKING:
    from neuronpatch.models import LoadedModel

# One input re-run in float32 for every this many inputs (at least one).
INPUTS_PER_RERUN = 16


def dtype_name(model: LoadedModel) -> str:
    """``"float32"``, ``"bfloat16"``...: the dtype the model's weights are in."""
    return str(next(model.hf.parameters()).dtype).removeprefix("torch.")


@contextmanager
def float32_weights(model: LoadedModel) -> Iterator[None]:
    """Inside the block, the model runs with its own weights and buffers cast to float32.

    Casting bfloat16 or float16 to float32 is exact, so the block runs the same model with
    float32 arithmetic; the original tensors are put back untouched. The cast is done one
    block at a time, as the forward reaches it (a forward pre-hook casts the block's tensors,
    a forward hook puts them back), and likewise for each module outside the blocks (final
    norm, head): only one block's float32 copy exists at any moment, so its memory is
    reused from block to block, and blocks the forward never reaches are never cast.
    Casting the whole model at once costs a fresh allocation twice its size, which on the
    CPU took most of the measurement's time. A plain embedding table is not cast: a lookup
    copies rows, so its output is cast instead, to the same values, and whatever enters a
    block is cast up (a kv batch's rows enter with their prefix's hidden states, computed
    outside the block in the model's dtype).

    A tensor used outside its own module's forward stays in its dtype: in an elementwise
    operation with float32 activations it is promoted exactly; in a matrix product it
    raises, and :func:`measure_rounding` then casts the whole model (:func:`weights_in`).
    """
    blocks = model.arch.blocks
    units: list[tuple[Any, list[Tensor]]] = [
        (blk, [t for t in (*blk.parameters(), *blk.buffers()) if t.is_floating_point()]) for blk in blocks]
    lookups = []  # plain embedding tables: their output is cast instead
    inside = {id(m) for blk in blocks for m in blk.modules()}
    for mod in (m for m in model.hf.modules() if id(m) not in inside):
        if type(mod) is torch.nn.Embedding and mod.max_norm is None:
            lookups.append(mod)
            continue
        own = [t for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False))
               if t.is_floating_point()]
        if own:
            units.append((mod, own))
    saved: dict[int, list[Tensor]] = {}
    # float32 buffers by shape and strides, reused from block to block (every block has the same
    # shapes): fresh memory for each block's copy would be paid for again in page faults.
    free: dict[tuple[Any, ...], list[Tensor]] = {}
    lent: dict[int, list[Tensor]] = {}

    def cast(tensors: list[Tensor]) -> Callable[..., None]:
        def pre(module: Any, args: Any) -> None:
            if id(module) in saved or "forward" in vars(module):  # (a replayed block computes nothing)
                return
            saved[id(module)] = [t.data for t in tensors]
            lent[id(module)] = []
            for t in tensors:
                pool = free.get((t.shape, t.stride(), t.device), [])
                buf = pool.pop() if pool else torch.empty_strided(t.shape, t.stride(), dtype=torch.float32,
                                                                  device=t.device)
                lent[id(module)].append(buf.copy_(t.data))
                t.data = buf
        return pre

    def put_back(module: Any, tensors: list[Tensor]) -> None:
        if id(module) not in saved:
            return
        for t, data in zip(tensors, saved.pop(id(module)), strict=True):
            t.data = data
        for buf in lent.pop(id(module), ()):
            free.setdefault((buf.shape, buf.stride(), buf.device), []).append(buf)

    def restore(tensors: list[Tensor]) -> Callable[..., None]:
        def post(module: Any, args: Any, output: Any) -> None:
            put_back(module, tensors)
        return post

    def up(x: Any) -> Any:
        if isinstance(x, Tensor) and x.is_floating_point():
            return x.float()
        return tuple(up(y) for y in x) if isinstance(x, tuple) else x

    def entering(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return tuple(up(a) for a in args), {k: up(v) for k, v in kwargs.items()}

    def rows_in_float32(module: Any, args: Any, output: Tensor) -> Tensor:
        return output.float()

    handles = []
    try:
        for mod, tensors in units:
            handles.append(mod.register_forward_pre_hook(cast(tensors)))
            handles.append(mod.register_forward_hook(restore(tensors), always_call=True))
        handles += [mod.register_forward_hook(rows_in_float32) for mod in lookups]
        handles += [blk.register_forward_pre_hook(entering, with_kwargs=True) for blk in blocks]
        yield
    finally:
        for h in handles:
            h.remove()
        for mod, tensors in units:  # whatever a stopped forward left cast
            put_back(mod, tensors)


@contextmanager
def weights_in(model: LoadedModel, dtype: torch.dtype) -> Iterator[None]:
    """The model's floating weights and buffers cast to ``dtype`` inside the block, restored after."""
    tensors = [t for t in (*model.hf.parameters(), *model.hf.buffers()) if t.is_floating_point()]
    saved = [t.data for t in tensors]
    try:
        for t in tensors:
            t.data = t.data.to(dtype)
        yield
    finally:
        for t, data in zip(tensors, saved, strict=True):
            t.data = data


def inputs_to_rerun(model: LoadedModel, n: int) -> int:
    """How many of ``n`` inputs :func:`measure_rounding` re-runs (0 in float32 and float64)."""
    return 0 if dtype_name(model) in FULL_PRECISION else max(1, n // INPUTS_PER_RERUN)


def measure_rounding(model: LoadedModel, p: Plan, enc: Encoded, affine: Tensor, route: Route,
                     predict: Callable[[Tensor], Tensor], dx: NDArray[np.float64],
                     dy: NDArray[np.float64], prediction_scale: float, *, budget: Budget,
                     states: dict[int, Prefix] | None = None) -> Rounding:
    """The rounding bound of one row's prediction change for this run.

    Args:
        affine: ``[n, k, 2]``, the target's interventions as the run applied them.
        predict: features ``[rows, width]`` → predictions ``[rows]`` (the head).
        dx, dy: ``[n, k]`` the run's activation and prediction changes.
        prediction_scale: the largest prediction (clean or patched) in absolute value.
        states: the run's shared state of the inputs it kept (:attr:`Measured.states`); an
            input found there is not run again up to its rows.
    """
    dtype = dtype_name(model)
    if route.method == "upstream":
        return Rounding(dtype, 0.0, "none: the head reads before the unit, so every prediction "
                                    "change is exactly 0")
    if dtype in FULL_PRECISION:
        return Rounding(dtype, FLOAT32_ROW_RTOL * prediction_scale,
                        f"{FLOAT32_ROW_RTOL:g} of the prediction scale: the largest float32 − float64 "
                        "difference over the architecture matrix, rounded up")
    start = time.perf_counter()
    n = dx.shape[0]
    count = inputs_to_rerun(model, n)
    spread = np.ptp(dx, axis=1)
    idx = [int(i) for i in np.argsort(-spread, kind="stable")[:count]]
    # Every row of an input shares its state: the prefix's cache and, below the unit's block,
    # the patched tokens' hidden states. Rounding there moves where the change is evaluated,
    # not the change (measured: coverage in docs/precision.md), so only the rows' own forward
    # re-runs in float32, over that state in the model's dtype: the state the run kept for
    # the input where it did (folded kv batches), else computed again. The linear route
    # computes write directions outside any block's forward: it re-runs the whole model.
    sub = enc.select(idx)
    rows = affine[idx].contiguous()
    got = None
    how = "the rows' own forward in float32 over their shared prefix state in the model's dtype"
    try:
        if route.method == "kv" and states and all(i in states for i in idx):
            got = _rows_again(model, p, enc, idx, rows, states, budget)  # the state the run kept
        elif route.method in ("kv", "full"):
            got = measure(model, p, sub, rows, route, budget=budget, rows_in=lambda: float32_weights(model))
    except RuntimeError:  # a weight used outside its module's forward, in a matrix product
        got = None
    if got is None:
        how = "the same weights in float32"
        with weights_in(model, torch.float32):
            got = measure(model, p, sub, rows, route, budget=budget)
    clean = predict(got.clean_feat).double()
    patched = predict(got.feat.reshape(-1, got.feat.shape[-1])).double().reshape(len(idx), -1)
    ref = (patched - clean[:, None]).numpy()
    err = float(np.max(np.abs(dy[idx] - ref)))
    which = ", ".join(str(i) for i in idx)
    noun = "input" if len(idx) == 1 else "inputs"
    return Rounding(dtype, err, f"measured against a re-run of {noun} {which} with {how}: the largest "
                                "difference of one prediction change",
                    tuple(idx), time.perf_counter() - start)


def _rows_again(model: LoadedModel, p: Plan, enc: Encoded, idx: list[int], affine: Tensor,
                states: dict[int, Prefix], budget: Budget) -> Measured:
    """Inputs ``idx``'s rows once more, in float32, over the shared state the run kept for them."""
    k = affine.shape[1]
    clean, feats = [], []
    for j, i in enumerate(idx):
        full = torch.cat([torch.tensor([[[1.0, 0.0]]]), affine[j: j + 1]], dim=1)
        got = kv_rows(model, p, enc, [i], full, grow=budget.growth(model, p, k + 1), prefix=states[i],
                      rows_in=lambda: float32_weights(model))
        fe = got.features.reshape(1, k + 1, -1).cpu()
        clean.append(fe[:, 0])
        feats.append(fe[:, 1:])
    clean_feat = torch.cat(clean)
    return Measured(torch.empty(0), clean_feat, torch.empty(0), torch.cat(feats), None)
