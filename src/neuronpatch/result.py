"""What one patching experiment measured: plain numbers, no tensors.

:class:`ExperimentResult` is the engine's output and everything downstream
(CLI tables, figures, probe expectations, baselines) reads only this. Arrays
are float64 numpy arrays indexed ``[input]`` or ``[input, intervention]``.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
from numpy.typing import NDArray

from neuronpatch import stats
from neuronpatch.interventions import Intervention
from neuronpatch.names import FULL_PRECISION

# Bootstrap settings are part of the result's identity: same data, same intervals.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class InputResult:
    """One input's view of the experiment (a row of the result)."""

    text: str
    n_tokens: int
    position: int
    clean_activation: float
    clean_prediction: float
    activation_change: tuple[float, ...]
    prediction_change: tuple[float, ...]
    fit: stats.Fit

    @property
    def slope(self) -> float:
        """This input's own OLS slope over the interventions."""
        return self.fit.slope

    @property
    def r2(self) -> float:
        """This input's own R² over the interventions."""
        return self.fit.r_squared


@dataclass(frozen=True)
class ExperimentResult:
    """Clean and patched activations and predictions, and the statistics on them.

    Example:
        >>> from neuronpatch import load_head, run_experiment   # doctest: +SKIP
        >>> res = run_experiment(load_head("probes/heads/demo_causal"),
        ...                      inputs=["The cat sat on the mat."], scale=[0, 1, 2])
        >>> res.slope, res.r_squared                             # doctest: +SKIP
    """

    head_path: str
    model_name: str
    head_type: str
    target_layer: int
    target_neuron: int
    layer_type: str
    unit_hook: str
    feature_hook: str
    token_pos: str | int
    patch_position: str
    method: str
    inputs: tuple[str, ...]
    n_tokens: tuple[int, ...]
    positions: tuple[int, ...]
    interventions: tuple[Intervention, ...]
    clean_activation: NDArray[np.float64]
    clean_prediction: NDArray[np.float64]
    patched_activation: NDArray[np.float64]
    patched_prediction: NDArray[np.float64]
    write_direction_cosine: float = math.nan
    notes: tuple[str, ...] = ()
    controls: Any = None  # neuronpatch.controls.ControlResults when the probe asked for controls
    ranking: Any = None  # neuronpatch.rank.RankResult when the probe asked for the target's rank
    rounding: stats.Rounding | None = None  # how far the dtype's rounding can move a row's Δp
    target_expert: int | None = None  # layer_type expert_post / expert_pre: the expert
    # Inputs left out of the fit: the expert was not routed at their patched token, so the
    # neuron does not exist there (an expert neuron only).
    unrouted_inputs: tuple[str, ...] = ()
    # Patched rows whose patch changed the expert choice of a later mixture-of-experts layer
    # (None: no such layer between the unit and the features, or not observable there).
    routing_changed: int | None = None
    created: str = field(default_factory=lambda: _dt.datetime.now().isoformat(timespec="seconds"))

    # ----- derived arrays -------------------------------------------------
    @property
    def activation_change(self) -> NDArray[np.float64]:
        """Patched minus clean activation, ``[input, intervention]``."""
        return self.patched_activation - self.clean_activation[:, None]

    @property
    def prediction_change(self) -> NDArray[np.float64]:
        """Patched minus clean prediction, ``[input, intervention]``."""
        return self.patched_prediction - self.clean_prediction[:, None]

    # ----- statistics (computed once, on first use) -------------------------
    @property
    def prediction_scale(self) -> float:
        """The size of the head's predictions; effects below float noise of it are no effect."""
        values = np.concatenate([np.abs(self.clean_prediction).ravel(),
                                 np.abs(self.patched_prediction).ravel()])
        return float(np.max(values, initial=0.0))

    @property
    def reads_before_unit(self) -> bool:
        """Whether the head reads at or before the unit (the engine's ``upstream`` route)."""
        return self.method == "upstream"

    @property
    def active_inputs(self) -> int | None:
        """On how many inputs a dictionary latent was active (non-zero) where it was measured.

        None for a neuron or a residual coordinate. A latent that is zero on an input (below
        its threshold, outside the top k) can be set there but not scaled.
        """
        if self.layer_type != "sae":
            return None
        return int(np.count_nonzero(self.clean_activation))

    @property
    def sparsity_reason(self) -> str | None:
        """Why the slope means nothing: a scale-only run on a latent inactive on most inputs."""
        active, n = self.active_inputs, len(self.inputs)
        if active is None or 2 * active >= n or any(iv.kind != "scale" for iv in self.interventions):
            return None
        return (f"the latent is active on {active} of {n} inputs: scale patches cannot move an inactive "
                "latent, so this run cannot tell whether the head reads it; use set or add interventions")

    @cached_property
    def fit(self) -> stats.Fit:
        """Pooled OLS of prediction change on activation change (no effect below float noise).

        Undefined (NaN, with the reason) for a scale-only run on a latent inactive on most
        inputs: a slope of 0 there would read as "ignores it" when nothing was moved.
        """
        why = self.sparsity_reason
        if why is not None:
            nan = math.nan
            return stats.Fit(nan, nan, nan, nan, nan, int(self.activation_change.size), why)
        return stats.ols(self.activation_change, self.prediction_change,
                         y_scale=self.prediction_scale)

    @cached_property
    def numerical_error(self) -> dict[str, float]:
        """How far rounding in the run's dtype can move ``slope``, ``intercept`` and ``r_squared``.

        Empty when the result carries no :class:`~neuronpatch.stats.Rounding`. Zero when the
        fit is no effect (the slope is then exactly 0 by decision, not by arithmetic).
        """
        if self.rounding is None:
            return {}
        if self.fit.reason and self.fit.reason.startswith("no effect"):
            return {"slope": 0.0, "intercept": 0.0, "r_squared": 0.0}
        return stats.rounding_bounds(self.activation_change, self.prediction_change,
                                     self.rounding.row_error)

    @cached_property
    def baseline(self) -> stats.Correlation:
        """Correlation of clean activations and clean predictions over inputs."""
        return stats.correlation(self.clean_activation, self.clean_prediction)

    @cached_property
    def _intervals(self) -> tuple[stats.Interval, stats.Interval]:
        if self.sparsity_reason is not None:
            why = self.sparsity_reason
            return stats.Interval(math.nan, math.nan, why), stats.Interval(math.nan, math.nan, why)
        if self.fit.slope == 0.0 and self.fit.reason and self.fit.reason.startswith("no effect"):
            # No effect is exactly 0 in every resample; R² has nothing to explain.
            return stats.Interval(0.0, 0.0), stats.Interval(math.nan, math.nan, self.fit.reason)
        return stats.bootstrap_ci(
            self.activation_change, self.prediction_change,
            n_resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED,
        )

    @property
    def slope_ci95(self) -> stats.Interval:
        """Bootstrap 95% interval of the pooled slope (inputs resampled)."""
        return self._intervals[0]

    @property
    def r_squared_ci95(self) -> stats.Interval:
        """Bootstrap 95% interval of the pooled R² (inputs resampled)."""
        return self._intervals[1]

    def interval(self, metric: str, level: float = 0.95) -> list[float]:
        """Bootstrap interval of ``slope``, ``r_squared`` (or ``specificity``) at ``level``.

        The same resamples as ``slope_ci95`` (same seed), so level 0.95 gives the same numbers.
        """
        if metric == "specificity":
            return self.controls.specificity_interval(level) if self.controls is not None else [math.nan] * 2
        if metric not in ("slope", "r_squared"):
            raise KeyError(f"no bootstrap interval for {metric!r}; expected slope or r_squared")
        which = 0 if metric == "slope" else 1
        no_effect = self.fit.slope == 0.0 and (self.fit.reason or "").startswith("no effect")
        if level == 0.95 or no_effect:
            return self._intervals[which].as_list()
        pair = stats.bootstrap_ci(self.activation_change, self.prediction_change,
                                  n_resamples=BOOTSTRAP_RESAMPLES, seed=BOOTSTRAP_SEED, level=level)
        return pair[which].as_list()

    @property
    def slope(self) -> float:
        return self.fit.slope

    @property
    def intercept(self) -> float:
        return self.fit.intercept

    @property
    def r_squared(self) -> float:
        return self.fit.r_squared

    @property
    def baseline_correlation(self) -> float:
        """Pearson r of clean activation vs clean prediction (the seed's number)."""
        return self.baseline.pearson_r

    @cached_property
    def per_input(self) -> tuple[InputResult, ...]:
        """Per-input rows: text, position, clean values, changes and own fit."""
        fits = stats.per_input_fits(self.activation_change, self.prediction_change,
                                    y_scale=self.prediction_scale)
        dact, dpred = self.activation_change, self.prediction_change
        return tuple(
            InputResult(
                text=t, n_tokens=self.n_tokens[i], position=self.positions[i],
                clean_activation=float(self.clean_activation[i]),
                clean_prediction=float(self.clean_prediction[i]),
                activation_change=tuple(float(v) for v in dact[i]),
                prediction_change=tuple(float(v) for v in dpred[i]),
                fit=fits[i],
            )
            for i, t in enumerate(self.inputs)
        )

    @property
    def weight_cosine(self) -> float:
        """Cosine of a linear head's weight and the unit's write direction; NaN where it means nothing.

        Only a head that reads *after* the unit can be compared with the unit's
        write direction; for a head that reads before it there is no causal path.
        """
        return math.nan if self.reads_before_unit else self.write_direction_cosine

    @property
    def reasons(self) -> dict[str, str]:
        """Why a statistic is undefined (NaN) or trivial, keyed by metric name."""
        out: dict[str, str] = {}
        fit = self.fit
        if fit.reason and math.isnan(fit.slope):
            out["slope"] = out["intercept"] = fit.reason
        if fit.reason and math.isnan(fit.r_squared):
            out["r_squared"] = fit.reason
        if fit.reason and math.isnan(fit.stderr):
            out["slope_stderr"] = out["slope_p_value"] = fit.reason
        elif math.isnan(fit.stderr):
            out["slope_stderr"] = out["slope_p_value"] = f"needs at least 3 points, got {fit.n}"
        for key in ("baseline_correlation", "baseline_p_value", "baseline_spearman"):
            if self.baseline.reason:
                out[key] = self.baseline.reason
        for key, interval in (("slope_ci95", self.slope_ci95), ("r_squared_ci95", self.r_squared_ci95)):
            if interval.reason:
                out[key] = interval.reason
        for key, attr in (("per_input_slope", "slope"), ("per_input_r2", "r_squared")):
            undefined = [r for r in self.per_input if math.isnan(getattr(r.fit, attr))]
            if undefined:
                why = undefined[0].fit.reason or "undefined"
                out[key] = f"undefined on {len(undefined)} of {len(self.per_input)} inputs: {why}"
        if math.isnan(self.weight_cosine):
            out["weight_cosine"] = (
                "the head reads at or before the unit: no causal path, no write direction to "
                "compare" if self.reads_before_unit else
                "defined only for a linear head that reads the residual stream after the unit")
        if self.ranking is not None and self.ranking.target_rank is None:
            out["rank"] = (f"the ranked layer ({self.ranking.unit_hook}) does not hold the head's "
                           "target unit")
        return out

    def interpretation(self) -> list[str]:
        """Plain-language reading of slope and R², as the seed notebook explains them.

        Also says why any other statistic is undefined or trivial.
        """
        if self.reads_before_unit:
            lines = [f"no causal path: slope exactly 0 (the head reads {self.feature_hook}, at or "
                     f"before {self.unit_hook})"]
        else:
            lines = interpret(self.slope, self.r_squared, self.fit.reason)
        rounding = self.rounding_reading()
        if rounding:
            lines.append(rounding)
        shown = {"slope", "intercept", "r_squared", "slope_stderr", "slope_p_value"}
        for key, why in self.reasons.items():
            if (key not in shown and not key.startswith("baseline_")) or key == "baseline_correlation":
                lines.append(f"{key} undefined: {why}")
        return lines

    def rounding_reading(self) -> str | None:
        """``slope −0.515 ± 0.09, R² 0.93 ± 0.05 from bfloat16 rounding``, when it is worth saying.

        Said for every run in a reduced precision, and in float32 when rounding can move the
        slope by 1% or more; None otherwise.
        """
        err, r = self.numerical_error, self.rounding
        if r is None or not err or r.row_error == 0 or not math.isfinite(self.slope):
            return None
        slope_err = err.get("slope", math.nan)
        small = math.isfinite(slope_err) and slope_err < 0.01 * abs(self.slope)
        if r.dtype in FULL_PRECISION and small:
            return None
        parts = [f"slope {self.slope:.3g} ± {slope_err:.2g}"]
        if math.isfinite(self.r_squared):
            parts.append(f"R² {self.r_squared:.3g} ± {err['r_squared']:.2g}")
        return f"{', '.join(parts)} from {r.dtype} rounding ({r.method})"

    def metrics(self) -> dict[str, Any]:
        """The numbers probe expectations and baselines are checked against.

        Scalars are floats (NaN when undefined), ``per_input_*`` are lists with
        one value per input, ``*_ci95`` are ``[lo, hi]``.
        """
        return {
            "slope": self.slope,
            "intercept": self.intercept,
            "r_squared": self.r_squared,
            "slope_stderr": self.fit.stderr,
            "slope_p_value": self.fit.p_value,
            "baseline_correlation": self.baseline.pearson_r,
            "baseline_p_value": self.baseline.pearson_p,
            "baseline_spearman": self.baseline.spearman_rho,
            "per_input_slope": [r.slope for r in self.per_input],
            "per_input_r2": [r.r2 for r in self.per_input],
            "slope_ci95": self.slope_ci95.as_list(),
            "r_squared_ci95": self.r_squared_ci95.as_list(),
            "weight_cosine": self.weight_cosine,
            "mean_abs_prediction_change": float(np.mean(np.abs(self.prediction_change))),
            "mean_abs_activation_change": float(np.mean(np.abs(self.activation_change))),
            **({} if self.controls is None else {
                "specificity": self.controls.specificity,
                "specificity_ci95": self.controls.specificity_interval(),
                "control_slope": [c.slope for c in self.controls.controls],
            }),
            **({} if self.ranking is None else {"rank": _rank_value(self.ranking)}),
            **({} if self.active_inputs is None else {
                "active_fraction": self.active_inputs / max(1, len(self.inputs))}),
        }

    def summary(self) -> dict[str, Any]:
        """The content of summary.json: the seed notebook's keys plus new ones.

        NaN is written as ``null`` (JSON has no NaN) by :func:`to_jsonable`.
        """
        labels = [iv.label for iv in self.interventions]
        summary: dict[str, Any] = {
            # --- the seed notebook's keys ---
            "model_path": self.head_path,
            "head_type": self.head_type,
            "target_layer": self.target_layer,
            "target_neuron": self.target_neuron,
            "baseline_correlation": self.baseline_correlation,
            "slope": self.slope,
            "intercept": self.intercept,
            "r_squared": self.r_squared,
            # Always a list of floats: the factors of the scale interventions (none: []).
            "scaling_factors": [float(iv.value) for iv in self.interventions
                                if iv.kind == "scale" and iv.value is not None],
            "avg_activation_changes": self.activation_change.mean(0).tolist(),
            "avg_prediction_changes": self.prediction_change.mean(0).tolist(),
            # One entry per input, by index (texts need not be unique).
            "per_input_sensitivity": [
                {"index": i, "text": r.text, "slope": r.slope, "r2": r.r2, "points": r.fit.n,
                 "reason": r.fit.reason}
                for i, r in enumerate(self.per_input)
            ],
            "timestamp": self.created,
            # --- new ---
            "base_model": self.model_name,
            "layer_type": self.layer_type,
            "unit_hook": self.unit_hook,
            "feature_hook": self.feature_hook,
            "token_pos": self.token_pos,
            "patch_position": self.patch_position,
            "engine_method": self.method,
            "interventions": labels,
            "metrics": self.metrics(),
            "baseline": {
                "pearson_r": self.baseline.pearson_r, "pearson_p": self.baseline.pearson_p,
                "spearman_rho": self.baseline.spearman_rho,
                "spearman_p": self.baseline.spearman_p,
            },
            "inputs": [
                {
                    "index": i, "text": r.text, "n_tokens": r.n_tokens, "position": r.position,
                    "clean_activation": r.clean_activation,
                    "clean_prediction": r.clean_prediction,
                    "activation_change": list(r.activation_change),
                    "prediction_change": list(r.prediction_change),
                    "slope": r.slope, "r2": r.r2, "reason": r.fit.reason,
                }
                for i, r in enumerate(self.per_input)
            ],
            "reasons": self.reasons,
            # How far rounding in the run's dtype can move the fit (null: not measured).
            "numerical_error": None if self.rounding is None else {
                "dtype": self.rounding.dtype, "method": self.rounding.method,
                "row_error": self.rounding.row_error, "inputs_rerun": list(self.rounding.inputs),
                "seconds": self.rounding.seconds, **self.numerical_error,
            },
            "notes": list(self.notes),
            # Mixture-of-experts models: the expert an expert neuron belongs to, the inputs left
            # out because it was not routed at their patched token, and how many patched rows
            # changed a later layer's expert choice (null: not an expert neuron / not observed).
            "target_expert": self.target_expert,
            "unrouted_inputs": list(self.unrouted_inputs),
            "routing_changed": self.routing_changed,
            # Each control's slope, R² and intervals, and the specificity (null: no controls).
            "controls": None if self.controls is None else self.controls.to_dict(),
            **({} if self.ranking is None else {"ranking": self.ranking.summary()}),
            # Outside pytest nothing was claimed: no outcome, only the reading.
            "verdict": {"outcome": None, "expectations_met": None, "reasons": [],
                        "reading": self.interpretation()},
        }
        return to_jsonable(summary)


def _rank_value(ranking: Any) -> float:
    rank = ranking.target_rank
    return math.nan if rank is None else float(rank)


def interpret(slope: float, r_squared: float, reason: str | None = None) -> list[str]:
    """Read a slope and R² the way the seed notebook does.

    Example:
        >>> interpret(0.97, 0.99)[1]
        'R² 0.990: strong, consistent relation'
    """
    if math.isnan(slope):
        return [f"slope undefined: {reason or 'no usable data'}"]
    if abs(slope - 1.0) <= 0.2:
        lines = [f"slope {slope:.3f} ≈ 1: the head tracks the unit (a unit of activation moves "
                 "the prediction by about one unit)"]
    elif abs(slope) <= 0.1:
        lines = [f"slope {slope:.3f} ≈ 0: the head ignores the unit (patching it barely moves "
                 "the prediction)"]
    elif slope < 0:
        lines = [f"slope {slope:.3f} < 0: the head is inversely related to the unit"]
    elif slope < 1:
        lines = [f"slope {slope:.3f}: the head uses the unit only partly"]
    else:
        lines = [f"slope {slope:.3f} > 1: the head over-responds to the unit"]
    if math.isnan(r_squared):
        lines.append(f"R² undefined: {reason or 'constant data'}")
    elif r_squared >= 0.8:
        lines.append(f"R² {r_squared:.3f}: strong, consistent relation")
    elif r_squared >= 0.5:
        lines.append(f"R² {r_squared:.3f}: moderate relation")
    else:
        lines.append(f"R² {r_squared:.3f}: weak or inconsistent relation")
    return lines


def to_jsonable(obj: Any) -> Any:
    """Recursively convert numpy scalars/arrays and NaN/inf to JSON-safe values (NaN → None)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
