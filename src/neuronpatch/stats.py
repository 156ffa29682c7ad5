"""The numbers a patching experiment is judged by.

Patching a unit moves its activation by ``Δa`` and the head's prediction by
``Δp``. If the head *uses* the unit, ``Δp`` follows ``Δa``: the ordinary
least-squares fit of ``Δp`` on ``Δa``, pooled over every (input, intervention)
pair as the seed notebook does, gives

* ``slope``: prediction change per unit of activation change (≈1 tracks the
  unit, ≈0 ignores it, < 0 inverse);
* ``r_squared``: how consistently ``Δp`` follows ``Δa`` (1 is a straight line);
* ``intercept``: the prediction change with no activation change (≈0 unless
  the intervention also moves something else).

Per-input fits show whether the effect depends on context; the baseline
(unpatched) Pearson and Spearman correlations are the *correlational* view
that patching is meant to test; bootstrap intervals resample inputs, the unit
of independent evidence. Degenerate data never raises: the affected numbers are
NaN and ``reason`` says why, so a report can tell the user what to change.

Numbers that are defined but say nothing are treated the same way:

* an R² over fewer than 3 distinct activation changes is 1 *by construction*
  (a line through 2 points): it is NaN, with that reason;
* a prediction change below float noise (at most ``NOISE_RTOL`` of the
  prediction's own scale, e.g. a patch that cannot reach the read position)
  is *no effect*: slope and intercept exactly 0, R² undefined, never a "weak
  relation" of 1e-7.

Everything here is plain numpy/scipy on float64 arrays; no torch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats as sps

NAN = float("nan")

# Relative spread below which a quantity is treated as constant. float32 forward
# passes carry ~1e-7 relative noise, so "no change" never comes out as exactly 0.
CONSTANT_RTOL = 1e-6
CONSTANT_ATOL = 1e-9
# A prediction change no larger than this fraction of the prediction's scale is float
# noise of a float32 forward pass, not an effect.
NOISE_RTOL = 1e-6


@dataclass(frozen=True)
class Fit:
    """Least-squares line ``y ≈ slope·x + intercept`` with its diagnostics.

    Attributes:
        slope: OLS slope, NaN when ``x`` has no variance.
        intercept: OLS intercept.
        r_squared: coefficient of determination, NaN when ``y`` is constant.
        stderr: standard error of the slope (NaN with fewer than 3 points).
        p_value: two-sided p-value of slope ≠ 0 (t test, n − 2 dof).
        n: number of points.
        reason: why some numbers are NaN, or None.
    """

    slope: float
    intercept: float
    r_squared: float
    stderr: float
    p_value: float
    n: int
    reason: str | None = None


@dataclass(frozen=True)
class Correlation:
    """Baseline correlation between clean activations and clean predictions."""

    pearson_r: float
    pearson_p: float
    spearman_rho: float
    spearman_p: float
    n: int
    reason: str | None = None


@dataclass(frozen=True)
class Interval:
    """A two-sided confidence interval; NaN bounds come with a reason."""

    lo: float
    hi: float
    reason: str | None = None

    def as_list(self) -> list[float]:
        """``[lo, hi]``, as written to summary.json."""
        return [self.lo, self.hi]


def _is_constant(v: NDArray[np.float64]) -> bool:
    spread = float(np.ptp(v)) if v.size else 0.0
    return spread <= CONSTANT_ATOL + CONSTANT_RTOL * float(np.max(np.abs(v), initial=0.0))


def no_effect_reason(y: ArrayLike, y_scale: float | None) -> str | None:
    """Why ``y`` (prediction changes) is no effect at all, or None when it is one.

    Example:
        >>> no_effect_reason([1e-9, -2e-9], y_scale=3.0)  # doctest: +ELLIPSIS
        'no effect: the prediction moved by at most 2e-09, below float noise (1e-06 of ...'
        >>> no_effect_reason([0.1, 0.2], y_scale=3.0) is None
        True
    """
    if y_scale is None:
        return None
    ya = np.asarray(y, dtype=np.float64).ravel()
    biggest = float(np.max(np.abs(ya), initial=0.0))
    floor = NOISE_RTOL * max(abs(float(y_scale)), CONSTANT_ATOL)
    if biggest > floor:
        return None
    return (f"no effect: the prediction moved by at most {biggest:.3g}, below float noise "
            f"({NOISE_RTOL:g} of the prediction scale {abs(float(y_scale)):.3g})")


def _trivial_r2(x: NDArray[np.float64], y: NDArray[np.float64]) -> str | None:
    """R² is 1 by construction when the points sit on at most 2 distinct x values, one y each."""
    scale = float(np.max(np.abs(x), initial=0.0))
    keys = np.round(x / (scale * CONSTANT_RTOL + CONSTANT_ATOL)).astype(np.int64)
    groups = np.unique(keys)
    if groups.size > 2:
        return None
    if any(not _is_constant(y[keys == g]) for g in groups):
        return None
    return (f"R² = 1 by construction: {groups.size} distinct activation changes (a line "
            "through 2 points); use at least 3 intervention values")


def ols(x: ArrayLike, y: ArrayLike, *, y_scale: float | None = None) -> Fit:
    """Ordinary least squares of ``y`` on ``x``.

    Args:
        x: activation changes (any shape; flattened).
        y: prediction changes, same size as ``x``.
        y_scale: the size of the predictions themselves; a ``y`` below
            ``NOISE_RTOL`` of it is no effect (slope 0, R² undefined).

    Returns:
        The fit; never raises on degenerate data.

    Example:
        >>> f = ols([0, 1, 2], [1, 3, 5])
        >>> round(f.slope, 6), round(f.intercept, 6), round(f.r_squared, 6)
        (2.0, 1.0, 1.0)
        >>> ols([1, 1, 1], [0, 2, 4]).reason
        'activation change has no variance (every patch left the unit where it was)'
        >>> ols([0, 1, 2], [0, 1e-8, 2e-8], y_scale=1.0).slope
        0.0
    """
    xa = np.asarray(x, dtype=np.float64).ravel()
    ya = np.asarray(y, dtype=np.float64).ravel()
    if xa.shape != ya.shape:
        raise ValueError(f"x and y differ in size: {xa.size} vs {ya.size}")
    n = int(xa.size)
    if n < 2:
        return Fit(NAN, NAN, NAN, NAN, NAN, n, f"need at least 2 points, got {n}")
    if _is_constant(xa):
        return Fit(
            NAN, NAN, NAN, NAN, NAN, n,
            "activation change has no variance (every patch left the unit where it was)",
        )
    xm, ym = xa.mean(), ya.mean()
    dx, dy = xa - xm, ya - ym
    sxx = float(dx @ dx)
    sxy = float(dx @ dy)
    slope = sxy / sxx
    intercept = float(ym - slope * xm)
    if _is_constant(ya):
        # The prediction did not move: the slope is what it is (exactly 0 for a head
        # that cannot see the unit), but "fraction explained" is 0/0.
        return Fit(slope, intercept, NAN, NAN, NAN, n,
                   "prediction change is constant (the head's output did not respond)")
    if (why := no_effect_reason(ya, y_scale)) is not None:
        return Fit(0.0, 0.0, NAN, NAN, NAN, n, why)
    resid = dy - slope * dx
    ss_res = float(resid @ resid)
    ss_tot = float(dy @ dy)
    if (why := _trivial_r2(xa, ya)) is not None:
        return Fit(float(slope), intercept, NAN, NAN, NAN, n, why)
    r2 = 1.0 - ss_res / ss_tot
    if n > 2:
        stderr = math.sqrt(max(ss_res, 0.0) / (n - 2) / sxx)
        if stderr == 0.0:
            p = 0.0
        else:
            t = slope / stderr
            p = float(2 * sps.t.sf(abs(t), n - 2))
    else:
        stderr, p = NAN, NAN
    return Fit(float(slope), intercept, float(r2), float(stderr), p, n)


def per_input_fits(x: ArrayLike, y: ArrayLike, *, y_scale: float | None = None) -> list[Fit]:
    """One OLS fit per input (row) over its interventions (columns).

    Example:
        >>> fits = per_input_fits([[0, 1], [0, 2]], [[0, 2], [0, 1]])
        >>> [round(f.slope, 3) for f in fits], fits[0].reason[:22]
        ([2.0, 0.5], 'R² = 1 by construction')
    """
    xa = np.atleast_2d(np.asarray(x, dtype=np.float64))
    ya = np.atleast_2d(np.asarray(y, dtype=np.float64))
    return [ols(xa[i], ya[i], y_scale=y_scale) for i in range(xa.shape[0])]


def correlation(activations: ArrayLike, predictions: ArrayLike) -> Correlation:
    """Pearson and Spearman correlation of clean activations and predictions.

    Example:
        >>> c = correlation([1, 2, 3, 4], [2, 4, 6, 9])
        >>> round(c.pearson_r, 3), c.spearman_rho
        (0.994, 1.0)
    """
    a = np.asarray(activations, dtype=np.float64).ravel()
    p = np.asarray(predictions, dtype=np.float64).ravel()
    n = int(a.size)
    if n < 3:
        return Correlation(NAN, NAN, NAN, NAN, n, f"need at least 3 inputs, got {n}")
    if _is_constant(a):
        return Correlation(NAN, NAN, NAN, NAN, n,
                           "the unit's clean activation is the same on every input")
    if _is_constant(p):
        return Correlation(NAN, NAN, NAN, NAN, n,
                           "the head's clean prediction is the same on every input")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sps.ConstantInputWarning)
        pr = sps.pearsonr(a, p)
        sr = sps.spearmanr(a, p)
    return Correlation(float(pr.statistic), float(pr.pvalue), float(sr.statistic),
                       float(sr.pvalue), n)


def bootstrap_ci(
    x: ArrayLike,
    y: ArrayLike,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[Interval, Interval]:
    """Percentile bootstrap intervals for the pooled slope and R², resampling inputs.

    Rows of ``x``/``y`` are inputs, columns interventions. Each resample draws
    inputs with replacement and refits the pooled line; it is vectorised through
    per-input sufficient statistics, so 1000 resamples cost milliseconds.

    Returns:
        ``(slope_interval, r_squared_interval)``.

    Example:
        >>> rng = np.random.default_rng(1)
        >>> xs = rng.normal(size=(8, 5)); ys = 2 * xs
        >>> s, r = bootstrap_ci(xs, ys)
        >>> round(s.lo, 6), round(s.hi, 6), round(r.lo, 6)
        (2.0, 2.0, 1.0)
    """
    xa = np.atleast_2d(np.asarray(x, dtype=np.float64))
    ya = np.atleast_2d(np.asarray(y, dtype=np.float64))
    n_inputs = xa.shape[0]
    if n_inputs < 2:
        reason = f"a bootstrap over inputs needs at least 2 inputs, got {n_inputs}"
        return Interval(NAN, NAN, reason), Interval(NAN, NAN, reason)
    # Per-input sufficient statistics: count, Σx, Σy, Σxx, Σxy, Σyy.
    suff = np.stack([
        np.full(n_inputs, xa.shape[1], dtype=np.float64),
        xa.sum(1), ya.sum(1), (xa * xa).sum(1), (xa * ya).sum(1), (ya * ya).sum(1),
    ], axis=1)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_inputs, size=(n_resamples, n_inputs))
    counts = np.zeros((n_resamples, n_inputs))
    np.add.at(counts, (np.arange(n_resamples)[:, None], draws), 1.0)
    n, sx, sy, sxx, sxy, syy = (counts @ suff).T
    vxx = sxx - sx * sx / n
    vxy = sxy - sx * sy / n
    vyy = syy - sy * sy / n
    scale_x = np.maximum(sxx / n, 1e-300)
    scale_y = np.maximum(syy / n, 1e-300)
    ok_x = vxx / n > (CONSTANT_RTOL**2) * scale_x + CONSTANT_ATOL**2
    ok_y = vyy / n > (CONSTANT_RTOL**2) * scale_y + CONSTANT_ATOL**2
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(ok_x, vxy / vxx, np.nan)
        r2 = np.where(ok_x & ok_y, (vxy * vxy) / (vxx * vyy), np.nan)
    tail = (1.0 - level) / 2 * 100
    return (_percentile(slope, tail, "slope"), _percentile(r2, tail, "r_squared"))


def _percentile(samples: NDArray[np.float64], tail: float, what: str) -> Interval:
    valid = samples[np.isfinite(samples)]
    if valid.size < samples.size / 2:
        return Interval(NAN, NAN, f"{what} is undefined in most bootstrap resamples")
    lo, hi = np.percentile(valid, [tail, 100 - tail])
    return Interval(float(lo), float(hi))


def weight_cosine(weight: ArrayLike, direction: ArrayLike) -> tuple[float, str | None]:
    """Cosine between a linear head's weight vector and the unit's write direction.

    The write direction of an MLP neuron is its row of ``W_out``; of a
    residual-stream unit, the basis vector of its dimension.

    Returns:
        ``(cosine, reason)``; cosine is NaN, with a reason, for a zero vector.

    Example:
        >>> weight_cosine([1.0, 0.0], [2.0, 0.0])
        (1.0, None)
    """
    w = np.asarray(weight, dtype=np.float64).ravel()
    d = np.asarray(direction, dtype=np.float64).ravel()
    if w.shape != d.shape:
        return NAN, f"head weight has width {w.size} but the unit writes {d.size} dimensions"
    nw, nd = float(np.linalg.norm(w)), float(np.linalg.norm(d))
    if nw == 0.0 or nd == 0.0:
        return NAN, "zero weight or zero write direction"
    return float(w @ d / (nw * nd)), None


# ----- numerical error --------------------------------------------------------------
#
# A slope is a ratio of small differences of predictions, so the rounding of a forward pass
# in a reduced precision can move it far more than the dtype's epsilon suggests. The engine
# measures how far one row's prediction change can be off (``Rounding.row_error``: in
# bfloat16 and float16 by re-running an input in float32, see neuronpatch.engine); what that
# does to the fit follows exactly, in the worst case, from the least-squares formulas below.

# In float32 the engine's prediction changes match a float64 re-run to within 3.4e-6 of the
# prediction scale over the architecture matrix (benchmarks/bench_precision.py); a float32
# run reports that, rounded up, without re-running anything.
FLOAT32_ROW_RTOL = 4e-6
# R²'s bound is linear in the row error while the errors are this small against y's spread.
R2_LINEAR_SPREAD = 0.25


@dataclass(frozen=True)
class Rounding:
    """How far rounding in the run's dtype can move one row's prediction change.

    Attributes:
        dtype: the dtype the model ran in.
        row_error: bound on ``|Δp|``'s rounding error on any (input, intervention) row.
        method: how ``row_error`` was obtained, in words.
        inputs: the inputs re-run to measure it (none when it was not measured by a re-run).
        seconds: what measuring it cost.
    """

    dtype: str
    row_error: float
    method: str
    inputs: tuple[int, ...] = ()
    seconds: float = 0.0


def rounding_bounds(x: ArrayLike, y: ArrayLike, row_error: float) -> dict[str, float]:
    """How far the pooled slope, intercept and R² can move when each ``y`` is off by ``row_error``.

    Worst case over every sign pattern, from the least-squares formulas: the slope is
    ``Σ wⱼ yⱼ`` with ``wⱼ = (xⱼ − x̄)/Sxx``, so it moves by at most ``ε Σ|wⱼ|``; the
    intercept ``ȳ − slope·x̄`` by at most ``ε Σ|1/N − x̄ wⱼ|``. R² moves by at most
    ``ε Σ|∂R²/∂yⱼ|`` while the errors are small against the spread of ``y``
    (``ε √N ≤ R2_LINEAR_SPREAD · ‖y − ȳ‖``); beyond that, by the interval that ``|Sxy|``
    (moves by at most ``ε Σ|xⱼ − x̄|``) and ``‖y − ȳ‖`` (by at most ``ε √N``) allow.

    Example:
        >>> b = rounding_bounds([0, 1, 2, 3], [0, 1, 2, 3], 0.01)
        >>> round(b["slope"], 4), round(b["intercept"], 4)
        (0.008, 0.014)
    """
    xa = np.asarray(x, dtype=np.float64).ravel()
    ya = np.asarray(y, dtype=np.float64).ravel()
    eps = float(row_error)
    n = xa.size
    if n < 2 or not math.isfinite(eps):
        return {"slope": NAN, "intercept": NAN, "r_squared": NAN}
    if eps == 0.0:
        return {"slope": 0.0, "intercept": 0.0, "r_squared": 0.0}
    dx, dy = xa - xa.mean(), ya - ya.mean()
    sxx, sxy, norm_y = float(dx @ dx), float(dx @ dy), float(np.linalg.norm(dy))
    if sxx <= 0.0:
        return {"slope": NAN, "intercept": NAN, "r_squared": NAN}
    w = dx / sxx
    slope = eps * float(np.abs(w).sum())
    intercept = eps * float(np.abs(1.0 / n - xa.mean() * w).sum())
    shift_xy, shift_y = eps * float(np.abs(dx).sum()), eps * math.sqrt(n)
    if norm_y == 0.0 or sxy == 0.0:
        r2 = 1.0
    elif shift_y <= R2_LINEAR_SPREAD * norm_y:
        r2_now = sxy * sxy / (sxx * norm_y * norm_y)
        grad = 2.0 * r2_now * (dx / sxy - dy / (norm_y * norm_y))
        r2 = eps * float(np.abs(grad).sum())
    else:
        r2_now = sxy * sxy / (sxx * norm_y * norm_y)
        top = (abs(sxy) + shift_xy) ** 2 / (sxx * (norm_y - shift_y) ** 2) if norm_y > shift_y else 1.0
        bottom = max(abs(sxy) - shift_xy, 0.0) ** 2 / (sxx * (norm_y + shift_y) ** 2)
        r2 = max(min(top, 1.0) - r2_now, r2_now - bottom)
    return {"slope": slope, "intercept": intercept, "r_squared": r2}
