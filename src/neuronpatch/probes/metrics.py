"""The metrics an expectation can name: what each is, its kind, what explains a NaN.

The names are the keys of ``ExperimentResult.metrics()``. Kinds: a *scalar*
must lie in its range; a *per_input* list must hold for every input; an
*interval* ``[lo, hi]`` must lie entirely inside. Only the standard library is
imported here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

__all__ = ["CONFIDENCE_METRICS", "METRICS", "Metric", "nan_hint", "unknown_metric_message"]

Kind = Literal["scalar", "per_input", "interval"]


@dataclass(frozen=True)
class Metric:
    """A number an experiment reports and an expectation can constrain.

    Attributes:
        name: the key in ``ExperimentResult.metrics()`` and in ``expect:``.
        kind: ``scalar``, ``per_input`` (one value per input) or ``interval`` (``[lo, hi]``).
        help: one line for docs and error messages.
        reason_key: where ``ExperimentResult.reasons`` explains a NaN of this metric.
    """

    name: str
    kind: Kind
    help: str
    reason_key: str | None = None


def _metrics(*items: Metric) -> dict[str, Metric]:
    return {m.name: m for m in items}


# Order is the order of the docs and of failure reports.
METRICS: dict[str, Metric] = _metrics(
    Metric("slope", "scalar", "pooled OLS slope of prediction change on activation change",
           "slope"),
    Metric("intercept", "scalar",
           "pooled OLS intercept (prediction change at no activation change)", "slope"),
    Metric("r_squared", "scalar", "R² of the pooled fit", "r_squared"),
    Metric("slope_stderr", "scalar", "standard error of the pooled slope", "slope"),
    Metric("slope_p_value", "scalar", "two-sided p-value of slope ≠ 0", "slope"),
    Metric("baseline_correlation", "scalar",
           "Pearson r of clean activation vs clean prediction over inputs", "baseline_correlation"),
    Metric("baseline_p_value", "scalar", "p-value of the baseline Pearson r",
           "baseline_correlation"),
    Metric("baseline_spearman", "scalar", "Spearman ρ of clean activation vs clean prediction",
           "baseline_correlation"),
    Metric("per_input_slope", "per_input", "each input's own slope (every input must hold)",
           "per_input_slope"),
    Metric("per_input_r2", "per_input", "each input's own R² (every input must hold)",
           "per_input_r2"),
    Metric("slope_ci95", "interval", "bootstrap 95% interval of the slope (must lie inside)",
           "slope_ci95"),
    Metric("r_squared_ci95", "interval", "bootstrap 95% interval of R² (must lie inside)",
           "r_squared_ci95"),
    Metric("weight_cosine", "scalar",
           "cosine of a linear head's weight and the unit's write direction", "weight_cosine"),
    Metric("mean_abs_prediction_change", "scalar", "mean |prediction change| over patched rows"),
    Metric("mean_abs_activation_change", "scalar", "mean |activation change| over patched rows"),
    Metric("specificity", "scalar",
           "|target slope| / largest |control slope| (needs controls:)", "specificity"),
    Metric("specificity_ci95", "interval", "bootstrap 95% interval of specificity (must lie inside)",
           "specificity"),
    Metric("control_slope", "per_input", "each control unit's slope (every control must hold)",
           "control_slope"),
    Metric("rank", "scalar",
           "the target unit's rank among every unit of its layer by |slope| (1: the head reads it most)",
           "rank"),
    Metric("active_fraction", "scalar",
           "the share of inputs on which a dictionary latent is active (layer_type sae only)"),
)

# Metrics with a bootstrap interval at any level: an expectation on them may say `confidence: c`.
CONFIDENCE_METRICS: tuple[str, ...] = ("slope", "r_squared", "specificity")

# What explains a NaN when the result gave no reason of its own (e.g. a plain dict).
_NAN_HINTS = {
    "weight_cosine": "defined only for a linear head that reads the residual stream after the unit",
}


def nan_hint(metric: str) -> str | None:
    """The general reason a metric can be undefined, when nothing more specific is known.

    Example:
        >>> nan_hint("weight_cosine")
        'defined only for a linear head that reads the residual stream after the unit'
    """
    return _NAN_HINTS.get(metric)


# Names people reach for that spelling distance alone would not map (suggested, not accepted).
_LIKELY = {
    "r2": "r_squared", "rsquared": "r_squared", "r_square": "r_squared",
    "correlation": "baseline_correlation", "pearson": "baseline_correlation",
    "spearman": "baseline_spearman", "ci95": "slope_ci95", "slope_ci": "slope_ci95",
    "p_value": "slope_p_value", "stderr": "slope_stderr", "cosine": "weight_cosine",
}


def unknown_metric_message(name: str) -> str:
    """The one-line complaint about a metric name that does not exist.

    Example:
        >>> unknown_metric_message("slop")  # doctest: +ELLIPSIS
        "unknown metric 'slop' (did you mean 'slope'?); expected one of slope, intercept, ..."
    """
    close = [_LIKELY[name]] if name in _LIKELY else difflib.get_close_matches(name, METRICS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown metric {name!r}{hint}; expected one of {', '.join(METRICS)}"
