"""Negative controls: other units of the same layer and type, patched the same way.

A head's slope on its unit says the head moves with the unit; it does not say
the head reads *this* unit. Controls answer that: each control unit gets the
same interventions (in its own activation units) as more patched rows over the
same clean run, and its own slope, R² and bootstrap interval.
``specificity`` = |target slope| / largest |control slope|, with a bootstrap
interval that resamples inputs jointly for target and controls.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from neuronpatch import stats
from neuronpatch.errors import InputError

RESAMPLES = 1000
SEED = 0


def resolve_units(spec: Any, *, target: int, width: int) -> list[int]:
    """``{units: {random: k, seed: s}}``, ``{units: [..]}`` or a list → control columns.

    Raises:
        InputError: a unit outside ``[0, width)``, the target itself, or a bad form.
    """
    units = spec.get("units") if isinstance(spec, Mapping) else spec
    if isinstance(spec, Mapping) and set(spec) - {"units"}:
        extra = sorted(set(spec) - {"units"})
        raise InputError(f"controls: {extra[0]!r} is not supported here; expected units: "
                         "{random: k, seed: s} or a list of unit indices")
    if isinstance(units, Mapping):
        k, seed = units.get("random"), units.get("seed", 0)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k < width:
            raise InputError(f"controls.units.random is {k!r}; expected an int in [1, {width - 1}]")
        rng = np.random.default_rng(int(seed))
        pool = np.array([u for u in range(width) if u != target])
        return sorted(int(u) for u in rng.choice(pool, size=k, replace=False))
    if isinstance(units, Sequence) and not isinstance(units, str):
        out = []
        for u in units:
            if isinstance(u, bool) or not isinstance(u, int) or not 0 <= u < width or u == target:
                raise InputError(f"control unit {u!r} is invalid; expected an index in [0, {width - 1}] "
                                 f"other than the target {target}")
            out.append(int(u))
        if len(set(out)) != len(out) or not out:
            raise InputError(f"control units {list(units)!r}: expected distinct indices, at least one")
        return out
    raise InputError(f"controls {spec!r}: expected units: {{random: k, seed: s}} or a list of indices")


@dataclass(frozen=True)
class Control:
    """One control unit's fit."""

    unit: int
    slope: float
    r_squared: float
    slope_ci95: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "slope": self.slope, "r_squared": self.r_squared,
                "slope_ci95": self.slope_ci95}


def _slope_samples(x: NDArray[np.float64], y: NDArray[np.float64],
                   draws: NDArray[np.int64]) -> NDArray[np.float64]:
    counts = np.zeros((draws.shape[0], x.shape[0]))
    np.add.at(counts, (np.arange(draws.shape[0])[:, None], draws), 1.0)
    suff = np.stack([np.full(x.shape[0], x.shape[1], dtype=np.float64), x.sum(1), y.sum(1),
                     (x * x).sum(1), (x * y).sum(1)], axis=1)
    n, sx, sy, sxx, sxy = (counts @ suff).T
    vxx, vxy = sxx - sx * sx / n, sxy - sx * sy / n
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(vxx > 1e-24 * np.maximum(sxx, 1e-300), vxy / vxx, np.nan)


@dataclass(frozen=True)
class ControlResults:
    """Every control's fit, and the target's specificity against them."""

    target_x: NDArray[np.float64]  # [inputs, interventions] the target's activation change
    target_y: NDArray[np.float64]
    xs: tuple[NDArray[np.float64], ...]  # per control
    ys: tuple[NDArray[np.float64], ...]
    units: tuple[int, ...]

    @property
    def controls(self) -> list[Control]:
        out = []
        for u, x, y in zip(self.units, self.xs, self.ys, strict=True):
            fit = stats.ols(x.ravel(), y.ravel())
            ci, _ = stats.bootstrap_ci(x, y, n_resamples=RESAMPLES, seed=SEED)
            out.append(Control(u, fit.slope, fit.r_squared, ci.as_list()))
        return out

    @property
    def max_abs_slope(self) -> float:
        return max((abs(c.slope) for c in self.controls), default=math.nan)

    @property
    def specificity(self) -> float:
        target = abs(stats.ols(self.target_x.ravel(), self.target_y.ravel()).slope)
        top = self.max_abs_slope
        return target / top if top > 0 else (math.inf if target > 0 else math.nan)

    def specificity_interval(self, level: float = 0.95) -> list[float]:
        n = self.target_x.shape[0]
        if n < 2:
            return [math.nan, math.nan]
        draws = np.random.default_rng(SEED).integers(0, n, size=(RESAMPLES, n))
        t = np.abs(_slope_samples(self.target_x, self.target_y, draws))
        per = [_slope_samples(x, y, draws) for x, y in zip(self.xs, self.ys, strict=True)]
        c = np.max(np.abs(np.stack(per)), axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = t / c
        ratio = ratio[np.isfinite(ratio)]
        if ratio.size < RESAMPLES / 2:
            return [math.nan, math.nan]
        tail = (1 - level) / 2 * 100
        return [float(np.percentile(ratio, tail)), float(np.percentile(ratio, 100 - tail))]

    def to_dict(self) -> dict[str, Any]:
        return {"units": [c.to_dict() for c in self.controls], "specificity": self.specificity,
                "specificity_ci95": self.specificity_interval(), "max_abs_control_slope": self.max_abs_slope}
