"""The five figures of a patching experiment (the seed notebook's, made readable).

* ``baseline_correlation.png``: clean activation vs clean prediction per input:
  the *correlational* view that patching puts to the test.
* ``scaling_experiment.png``: per intervention, the mean change of activation and
  of prediction (with the spread over inputs), and the path the mean point takes
  through (activation, prediction) space.
* ``pred_vs_act_change_all.png``: every (input, intervention) point, coloured by
  intervention.
* ``pred_vs_act_regression.png``: the same points with the pooled OLS line; its
  slope is the causal effect.
* ``per_input_sensitivity.png``: one small panel per input with its own fit
  (the eight most sensitive inputs).

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas,
never through pyplot: no global state, no window, safe in worker processes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from neuronpatch.result import ExperimentResult
from neuronpatch.stats import Fit

FIGURES: tuple[str, ...] = (
    "baseline_correlation.png",
    "scaling_experiment.png",
    "pred_vs_act_change_all.png",
    "pred_vs_act_regression.png",
    "per_input_sensitivity.png",
)
MAX_PANELS = 8


def _short(text: str, n: int = 24) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _title(res: ExperimentResult, title: str | None) -> str:
    who = title or Path(res.head_path).name
    return f"{who} · L{res.target_layer} N{res.target_neuron} ({res.layer_type})"


def _fmt(x: float, digits: int = 3) -> str:
    return "nan" if math.isnan(x) else f"{x:.{digits}f}"


def _style(ax: Axes, xlabel: str, ylabel: str, *, zero_lines: bool = False) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if zero_lines:
        ax.axhline(0, color="k", ls="--", lw=0.8, alpha=0.4)
        ax.axvline(0, color="k", ls="--", lw=0.8, alpha=0.4)


def _fit_line(ax: Axes, x: np.ndarray, fit: Fit, **kw: object) -> bool:
    """Draw ``fit`` over the range of ``x``; False when the fit is undefined."""
    if math.isnan(fit.slope) or x.size == 0:
        return False
    xs = np.array([x.min(), x.max()]) if np.ptp(x) > 0 else np.array([x.min() - 1, x.max() + 1])
    ax.plot(xs, fit.slope * xs + fit.intercept, **kw)  # type: ignore[arg-type]
    return True


def _baseline(fig: Figure, res: ExperimentResult, title: str | None) -> None:
    ax = fig.add_subplot()
    a, p = res.clean_activation, res.clean_prediction
    ax.scatter(a, p, s=70, alpha=0.85, color="tab:blue", label="inputs (clean run)")
    for i, text in enumerate(res.inputs):
        ax.annotate(_short(text), (a[i], p[i]), fontsize=8, xytext=(5, 4), textcoords="offset points")
    b = res.baseline
    from neuronpatch.stats import ols

    if b.reason is None:
        _fit_line(ax, a, ols(a, p), color="tab:red", ls="--",
                  label=f"linear fit (r = {b.pearson_r:.3f}, p = {b.pearson_p:.2g})")
        sub = f"Pearson r = {b.pearson_r:.3f}, Spearman ρ = {b.spearman_rho:.3f}"
    else:
        sub = f"correlation undefined: {b.reason}"
    ax.set_title(f"{_title(res, title)}\nclean activation vs prediction · {sub}")
    _style(ax, "unit activation (clean)", "head prediction (clean)")
    ax.legend(loc="best")


def _scaling(fig: Figure, res: ExperimentResult, title: str | None) -> None:
    left, right = fig.subplots(1, 2)
    dact, dpred = res.activation_change, res.prediction_change
    all_scale = all(iv.kind == "scale" for iv in res.interventions)
    xs = (np.array([iv.value for iv in res.interventions], dtype=float) if all_scale
          else np.arange(len(res.interventions), dtype=float))
    left.errorbar(xs, dact.mean(0), yerr=dact.std(0), fmt="-o", color="tab:blue", capsize=3,
                  label="activation change")
    left.errorbar(xs, dpred.mean(0), yerr=dpred.std(0), fmt="-o", color="tab:red", capsize=3,
                  label="prediction change")
    left.axhline(0, color="k", ls="--", lw=0.8, alpha=0.4)
    if all_scale:
        left.axvline(1.0, color="k", ls=":", lw=0.8, alpha=0.5)
        xlabel = "scale factor"
    else:
        left.set_xticks(xs, [iv.label for iv in res.interventions], rotation=30, ha="right")
        xlabel = "intervention"
    left.set_title("mean change over inputs (bars: ±1 sd)")
    _style(left, xlabel, "change from clean run")
    left.legend(loc="best")

    a0, p0 = res.clean_activation.mean(), res.clean_prediction.mean()
    pa, pp = a0 + dact.mean(0), p0 + dpred.mean(0)
    right.plot(pa, pp, "-o", color="tab:green", label="patched (mean over inputs)")
    right.plot([a0], [p0], "ko", ms=9, label="clean (mean over inputs)")
    for k, iv in enumerate(res.interventions):
        right.annotate(iv.label, (pa[k], pp[k]), fontsize=8, xytext=(5, 4), textcoords="offset points")
    right.set_title("path in activation-prediction space")
    _style(right, "mean unit activation", "mean head prediction")
    right.legend(loc="best")
    fig.suptitle(f"{_title(res, title)}: effect of each intervention")


def _all_points(fig: Figure, res: ExperimentResult, title: str | None) -> None:
    ax = fig.add_subplot()
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    n = len(res.interventions)
    for k, iv in enumerate(res.interventions):
        ax.scatter(res.activation_change[:, k], res.prediction_change[:, k], s=45, alpha=0.8,
                   color=cmap(k / max(n - 1, 1)), label=iv.label)
    ax.set_title(f"{_title(res, title)}\nprediction change vs activation change, "
                 f"{len(res.inputs)} inputs × {n} interventions")
    _style(ax, "activation change (patched − clean)", "prediction change (patched − clean)",
           zero_lines=True)
    ax.legend(title="intervention", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)


def _regression(fig: Figure, res: ExperimentResult, title: str | None) -> None:
    ax = fig.add_subplot()
    x, y = res.activation_change.ravel(), res.prediction_change.ravel()
    ax.scatter(x, y, s=35, alpha=0.6, color="tab:blue", label="(input, intervention)")
    fit, ci = res.fit, res.slope_ci95
    if _fit_line(ax, x, fit, color="tab:red", lw=2, label="pooled OLS fit"):
        eq = f"Δpred = {fit.slope:.4f}·Δact {'+' if fit.intercept >= 0 else '−'} {abs(fit.intercept):.4f}"
        ax.annotate(eq, xy=(0.03, 0.95), xycoords="axes fraction", va="top", fontsize=11,
                    bbox={"boxstyle": "round", "fc": "white", "alpha": 0.9})
    else:
        ax.annotate(f"no fit: {fit.reason}", xy=(0.03, 0.95), xycoords="axes fraction", va="top",
                    fontsize=10, wrap=True, bbox={"boxstyle": "round", "fc": "white", "alpha": 0.9})
    ax.set_title(f"{_title(res, title)}\nslope = {_fmt(fit.slope, 4)} "
                 f"(95% CI [{_fmt(ci.lo)}, {_fmt(ci.hi)}]), R² = {_fmt(fit.r_squared, 4)}")
    _style(ax, "activation change", "prediction change", zero_lines=True)
    ax.legend(loc="lower right")


def _per_input(fig: Figure, res: ExperimentResult, title: str | None) -> None:
    rows = sorted(res.per_input, key=lambda r: -abs(r.slope) if not math.isnan(r.slope) else 1.0)
    shown = rows[:MAX_PANELS]
    n_rows = max(1, math.ceil(len(shown) / 2))
    axes = np.atleast_1d(fig.subplots(n_rows, 2, squeeze=False).ravel())
    for ax, r in zip(axes, shown, strict=False):
        x, y = np.array(r.activation_change), np.array(r.prediction_change)
        ax.scatter(x, y, s=25, alpha=0.8, color="tab:blue")
        _fit_line(ax, x, r.fit, color="tab:red")
        ax.set_title(f"{_short(r.text, 36)}\nslope {_fmt(r.slope, 4)}, R² {_fmt(r.r2, 3)}", fontsize=9)
        _style(ax, "Δ activation", "Δ prediction", zero_lines=True)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    what = f"{len(shown)} of {len(rows)} inputs, most sensitive first" if len(rows) > len(shown) \
        else "each input's own fit, most sensitive first"
    fig.suptitle(f"{_title(res, title)}: per-input sensitivity ({what})")


_DRAW: dict[str, tuple[Callable[[Figure, ExperimentResult, str | None], None], tuple[float, float]]] = {
    "baseline_correlation.png": (_baseline, (10, 6.5)),
    "scaling_experiment.png": (_scaling, (13, 5.5)),
    "pred_vs_act_change_all.png": (_all_points, (10.5, 7)),
    "pred_vs_act_regression.png": (_regression, (10, 7)),
    "per_input_sensitivity.png": (_per_input, (12, 12)),
}


def render(result: ExperimentResult, name: str, *, title: str | None = None) -> Figure:
    """Draw one of :data:`FIGURES` and return the (unsaved) figure.

    Example:
        >>> fig = render(res, "pred_vs_act_regression.png")    # doctest: +SKIP
    """
    draw, size = _DRAW[name]
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    draw(fig, result, title)
    return fig


def write_figures(
    result: ExperimentResult, out_dir: str | Path, *, title: str | None = None, dpi: int = 110,
    expected: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write the five PNG figures of ``result`` into ``out_dir``.

    Args:
        result: an experiment's result.
        out_dir: directory (created if needed).
        title: name shown in titles; default the head directory's name.
        dpi: resolution.

    Returns:
        The paths written, in :data:`FIGURES` order.

    Example:
        >>> paths = write_figures(res, "out/demo_causal")    # doctest: +SKIP
        >>> [p.name for p in paths] == list(FIGURES)         # doctest: +SKIP
        True
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in FIGURES:
        fig = render(result, name, title=title)
        path = out / name
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths
