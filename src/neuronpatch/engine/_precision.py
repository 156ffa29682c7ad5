"""How far rounding in the model's dtype moves a prediction change, measured on the run itself.

A slope is a ratio of small differences of predictions. In bfloat16 a prediction carries a
relative rounding error near 2⁻⁸, and a prediction *change* a thousand times smaller than the
prediction is then mostly rounding: over tiny random models of 14 architectures, bfloat16
slopes differ from float32 ones by 0.1% to 50%. So every result carries a bound on one row's
rounding error, measured, and :mod:`neuronpatch.stats` turns it into bounds on the fit.

In bfloat16 and float16 the engine re-runs the inputs whose activation changes spread widest
(one input in sixteen, at least one) with the same weights cast to float32 (an exact cast)
through the same route, and takes the largest difference between the two runs' prediction
changes on those rows. A float32 run is not re-run: its bound is a fixed fraction of the
prediction scale, measured against float64 (see :data:`neuronpatch.stats.FLOAT32_ROW_RTOL`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from neuronpatch.coordinates import Plan
from neuronpatch.engine._inputs import Encoded
from neuronpatch.engine._routes import Budget, Route, measure
from neuronpatch.names import FULL_PRECISION
from neuronpatch.stats import FLOAT32_ROW_RTOL, Rounding

if TYPE_CHECKING:
    from neuronpatch.models import LoadedModel

# One input re-run in float32 for every this many inputs (at least one).
INPUTS_PER_RERUN = 16


def dtype_name(model: LoadedModel) -> str:
    """``"float32"``, ``"bfloat16"``...: the dtype the model's weights are in."""
    return str(next(model.hf.parameters()).dtype).removeprefix("torch.")


def float32_weights(model: LoadedModel) -> AbstractContextManager[None]:
    """The model's own weights and buffers cast to float32 inside the block, restored after.

    Casting bfloat16 or float16 to float32 is exact, so the block runs the same model with
    float32 arithmetic; the original tensors are put back untouched.
    """
    return weights_in(model, torch.float32)


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


def measure_rounding(model: LoadedModel, p: Plan, enc: Encoded, affine: Tensor, route: Route,
                     predict: Callable[[Tensor], Tensor], dx: NDArray[np.float64],
                     dy: NDArray[np.float64], prediction_scale: float, *, budget: Budget) -> Rounding:
    """The rounding bound of one row's prediction change for this run.

    Args:
        affine: ``[n, k, 2]``, the target's interventions as the run applied them.
        predict: features ``[rows, width]`` → predictions ``[rows]`` (the head).
        dx, dy: ``[n, k]`` the run's activation and prediction changes.
        prediction_scale: the largest prediction (clean or patched) in absolute value.
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
    count = max(1, n // INPUTS_PER_RERUN)
    spread = np.ptp(dx, axis=1)
    idx = [int(i) for i in np.argsort(-spread, kind="stable")[:count]]
    with float32_weights(model):
        got = measure(model, p, enc.select(idx), affine[idx].contiguous(), route, budget=budget)
    clean = predict(got.clean_feat).double()
    rows = predict(got.feat.reshape(-1, got.feat.shape[-1])).double().reshape(len(idx), -1)
    ref = (rows - clean[:, None]).numpy()
    err = float(np.max(np.abs(dy[idx] - ref)))
    which = ", ".join(str(i) for i in idx)
    noun = "input" if len(idx) == 1 else "inputs"
    return Rounding(dtype, err, f"measured against a float32 re-run of {noun} {which} with the same "
                                "weights: the largest difference of one prediction change",
                    tuple(idx), time.perf_counter() - start)

