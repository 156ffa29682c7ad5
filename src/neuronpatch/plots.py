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
  (the eight most sensitive inputs), all panels on the same axes.
* ``controls.png`` (only for a run with controls): the target's slope among its
  negative controls', each with its 95% bootstrap interval and R², the band of
  slopes no larger than the largest control's, and the specificity in the title.

Every change-vs-change figure carries the references a reader needs: the
ideal slope 1 ("tracks the unit") and slope 0 ("ignores it") through the
origin, the same scale on both axes (so a slope of 0.2 looks like 0.2), and
the measured slope with its expected range in the title. The regression
figure draws the fit with its 95% confidence band. A head that reads before
its unit is titled "no causal path: slope exactly 0", never "R² = nan"; an
undefined statistic is shown with its reason.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas,
never through pyplot: no global state, no window, safe in worker processes.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Annotation
from matplotlib.ticker import ScalarFormatter
from matplotlib.transforms import Bbox

from neuronpatch.names import CONTROLS_FIGURE, FIGURES
from neuronpatch.result import ExperimentResult
from neuronpatch.stats import Fit

if TYPE_CHECKING:
    from neuronpatch.rank import RankResult

MAX_PANELS = 8


def _short(text: str, n: int = 24) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _fit(fig: Figure, text: str, fontsize: float = 12.0) -> str:
    """``text`` with each line wrapped to fit the figure: a title must not run off its edges.

    A title is centred over its axes, which can sit off the figure's centre (a legend beside
    them), so lines are kept to about 80% of the figure's width at ~0.6 em per character.
    """
    chars = max(20, int(0.8 * fig.get_figwidth() * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.fill(line, chars) for line in text.split("\n"))


def _title(res: ExperimentResult, title: str | None) -> str:
    who = title or Path(res.head_path).name
    unit = f"latent {res.target_neuron}" if res.layer_type == "sae" else f"N{res.target_neuron}"
    return f"{who} · L{res.target_layer} {unit} ({res.layer_type})"


def _fmt(x: float, digits: int = 3) -> str:
    return "undefined" if math.isnan(x) else f"{x:.{digits}f}"


NO_PATH = "no causal path: slope exactly 0"


def zero_width(lo: float, hi: float) -> bool:
    """A bootstrap interval that every resample of the inputs left at one value."""
    return math.isfinite(lo) and math.isfinite(hi) and hi - lo <= 1e-9 * max(1.0, abs(lo))


def interval_text(lo: float, hi: float, digits: int = 3, *, what: str = "slope") -> str:
    """``95% CI [0.9, 0.94]``; a zero-width interval says why it has no width.

    The interval is a bootstrap over inputs: when every input's points lie on one line,
    every resample gives the same fit, and the interval is one value.

    Example:
        >>> interval_text(0.921, 0.921)
        '95% CI [0.921, 0.921] (zero width: every input gives the same slope)'
    """
    text = f"95% CI [{lo:.{digits}f}, {hi:.{digits}f}]"
    if zero_width(lo, hi):
        text += f" (zero width: every input gives the same {what})"
    return text


def _verdict_line(res: ExperimentResult, expected: Mapping[str, str]) -> str:
    """``slope 0.921 (expected [0.8, 1.2]) · R² 1.000``, or why there is no slope."""
    if res.reads_before_unit:
        return f"{NO_PATH} (the head reads {res.feature_hook}, before {res.unit_hook})"
    fit = res.fit
    if math.isnan(fit.slope):
        return f"slope undefined: {fit.reason}"
    slope = f"slope {fit.slope:.3f}"
    if "slope" in expected:
        slope += f" (expected {expected['slope']})"
    if math.isnan(fit.r_squared):
        r2 = "R² undefined" + (": no effect" if (fit.reason or "").startswith("no effect")
                               else f" ({fit.reason})" if fit.reason else "")
    else:
        r2 = f"R² {fit.r_squared:.3f}"
        if "r_squared" in expected:
            r2 += f" (expected {expected['r_squared']})"
    return f"{slope} · {r2}"


def _same_scale(ax: Axes, *arrays: np.ndarray) -> None:
    """One span on both axes, around 0, so slopes look like what they are."""
    values = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays] + [np.zeros(1)])
    values = values[np.isfinite(values)]
    lo, hi = float(values.min()), float(values.max())
    pad = 0.08 * (hi - lo) or 1.0
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)


def _references(ax: Axes, *, labels: bool = True) -> None:
    """The ideal slope 1 and slope 0, through the origin."""
    ax.axline((0.0, 0.0), slope=1.0, color="tab:green", ls="--", lw=1, alpha=0.7,
              label="slope 1 (tracks the unit)" if labels else None)
    ax.axline((0.0, 0.0), slope=0.0, color="0.4", ls=":", lw=1, alpha=0.8,
              label="slope 0 (ignores it)" if labels else None)


def _style(ax: Axes, xlabel: str, ylabel: str, *, zero_lines: bool = False) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if zero_lines:
        ax.axvline(0, color="k", lw=0.6, alpha=0.3)


def _fit_line(ax: Axes, x: np.ndarray, fit: Fit, **kw: object) -> bool:
    """Draw ``fit`` over the range of ``x``; False when the fit is undefined."""
    if math.isnan(fit.slope) or x.size == 0:
        return False
    xs = np.array([x.min(), x.max()]) if np.ptp(x) > 0 else np.array([x.min() - 1, x.max() + 1])
    ax.plot(xs, fit.slope * xs + fit.intercept, **kw)  # type: ignore[arg-type]
    return True


def _baseline(fig: Figure, res: ExperimentResult, title: str | None,
              expected: Mapping[str, str]) -> None:
    ax = fig.add_subplot()
    a, p = res.clean_activation, res.clean_prediction
    ax.scatter(a, p, s=70, alpha=0.85, color="tab:blue", label="inputs (clean run)")
    _number_inputs(fig, ax, a, p, res.inputs)
    b = res.baseline
    from neuronpatch.stats import ols

    if b.reason is None:
        _fit_line(ax, a, ols(a, p), color="tab:red", ls="--",
                  label=f"linear fit (r = {b.pearson_r:.3f}, p = {b.pearson_p:.2g})")
        sub = f"Pearson r = {b.pearson_r:.3f}, Spearman ρ = {b.spearman_rho:.3f}"
    else:
        sub = f"correlation undefined: {b.reason}"
    ax.set_title(_fit(fig, f"{_title(res, title)}\nclean activation vs prediction · {sub}"))
    _style(ax, "unit activation (clean)", "head prediction (clean)")
    ax.legend(loc="best")


# Inputs beyond this many are left unnumbered on the baseline figure: their key would not fit.
MAX_NUMBERED_INPUTS = 20


def _number_inputs(fig: Figure, ax: Axes, a: np.ndarray, p: np.ndarray, texts: Sequence[str]) -> None:
    """Each point numbered as its input, and a key of the numbers beside the axes.

    Whole texts beside the points ran off the figure's edge and over each other; a number
    is short, points near the right edge are numbered on their left, and the key sits
    outside the axes, where the constrained layout makes room for it.
    """
    if not 0 < len(texts) <= MAX_NUMBERED_INPUTS:
        return
    labels = [ax.annotate(str(i), (a[i], p[i]), fontsize=8, xytext=(5, 4), textcoords="offset points")
              for i in range(len(texts))]
    handles = [Line2D([], [], linestyle="none") for _ in texts]
    fig.legend(handles, [f"{i}  {_short(t, 28)}" for i, t in enumerate(texts)], loc="outside right upper",
               title="inputs", fontsize=7, title_fontsize=8, handlelength=0, handletextpad=0,
               frameon=False)
    _place_labels(fig, ax, labels)


# Where a point's number may go, in points from the point: upper right first, then around it.
_LABEL_SPOTS = ((5, 4), (5, -11), (-5, 4), (-5, -11), (0, 7), (0, -15), (8, -4), (-8, -4))


def _place_labels(fig: Figure, ax: Axes, labels: list[Annotation]) -> None:
    """Move each label to the first spot around its point that stays inside the axes and off
    the labels placed before it (measured once the layout is done; a label with no free
    spot keeps the first one that stays inside)."""
    fig.canvas.draw()  # the constrained layout settles the axes' size first
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    inside = ax.get_window_extent(renderer)
    placed: list[Bbox] = []

    def put(label: Annotation, spot: tuple[int, int]) -> Bbox:
        label.xyann = spot
        label.set_horizontalalignment("left" if spot[0] > 0 else "right" if spot[0] < 0 else "center")
        return label.get_window_extent(renderer)

    for label in labels:
        fits = []
        for spot in _LABEL_SPOTS:
            box = put(label, spot)
            if (box.x0 >= inside.x0 and box.x1 <= inside.x1 and box.y0 >= inside.y0
                    and box.y1 <= inside.y1):
                fits.append(spot)
                if not any(box.overlaps(other) for other in placed):
                    break
        else:
            put(label, fits[0] if fits else _LABEL_SPOTS[0])
        placed.append(label.get_window_extent(renderer))


def _scaling(fig: Figure, res: ExperimentResult, title: str | None,
             expected: Mapping[str, str]) -> None:
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
    fig.suptitle(_fit(fig, f"{_title(res, title)}: effect of each intervention\n"
                           f"{_verdict_line(res, expected)}"))


def _all_points(fig: Figure, res: ExperimentResult, title: str | None,
                expected: Mapping[str, str]) -> None:
    ax = fig.add_subplot()
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    n = len(res.interventions)
    for k, iv in enumerate(res.interventions):
        ax.scatter(res.activation_change[:, k], res.prediction_change[:, k], s=45, alpha=0.8,
                   color=cmap(k / max(n - 1, 1)), label=iv.label)
    _references(ax)
    _same_scale(ax, res.activation_change, res.prediction_change)
    ax.set_title(_fit(fig, f"{_title(res, title)}\n{len(res.inputs)} inputs × {n} interventions · "
                           f"{_verdict_line(res, expected)}"))
    _style(ax, "activation change (patched − clean)", "prediction change (patched − clean)",
           zero_lines=True)
    ax.legend(title="intervention", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)


def _band(x: np.ndarray, y: np.ndarray, fit: Fit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fit's 95% confidence band (of the mean) over the range of ``x``."""
    from scipy import stats as sps

    xs = np.linspace(float(x.min()), float(x.max()), 50)
    n = x.size
    dx = x - x.mean()
    sxx = float(dx @ dx)
    resid = y - (fit.slope * x + fit.intercept)
    s2 = float(resid @ resid) / max(n - 2, 1)
    half = sps.t.ppf(0.975, max(n - 2, 1)) * np.sqrt(s2 * (1 / n + (xs - x.mean()) ** 2 / sxx))
    line = fit.slope * xs + fit.intercept
    return xs, line - half, line + half


def _regression(fig: Figure, res: ExperimentResult, title: str | None,
                expected: Mapping[str, str]) -> None:
    ax = fig.add_subplot()
    x, y = res.activation_change.ravel(), res.prediction_change.ravel()
    ax.scatter(x, y, s=30, alpha=0.6, color="tab:blue", label="(input, intervention)")
    _references(ax)
    fit, ci = res.fit, res.slope_ci95
    if _fit_line(ax, x, fit, color="tab:red", lw=2, label="pooled OLS fit"):
        if x.size > 2 and np.ptp(x) > 0 and not math.isnan(fit.r_squared):
            xs, lo, hi = _band(x, y, fit)
            ax.fill_between(xs, lo, hi, color="tab:red", alpha=0.2, label="95% band of the fit")
        eq = f"Δpred = {fit.slope:.4f}·Δact {'+' if fit.intercept >= 0 else '−'} {abs(fit.intercept):.4f}"
        ax.annotate(eq, xy=(0.03, 0.95), xycoords="axes fraction", va="top", fontsize=10,
                    bbox={"boxstyle": "round", "fc": "white", "alpha": 0.9})
    else:
        ax.annotate(f"no fit: {fit.reason}", xy=(0.03, 0.95), xycoords="axes fraction", va="top",
                    fontsize=9, wrap=True, bbox={"boxstyle": "round", "fc": "white", "alpha": 0.9})
    if res.reads_before_unit:
        ax.annotate(NO_PATH, xy=(0.5, 0.5), xycoords="axes fraction", ha="center", fontsize=13,
                    color="0.3", bbox={"boxstyle": "round", "fc": "white", "alpha": 0.9})
    _same_scale(ax, x, y)
    ci_text = "" if math.isnan(ci.lo) else ", " + interval_text(ci.lo, ci.hi)
    ax.set_title(_fit(fig, f"{_title(res, title)}\n{_verdict_line(res, expected)}{ci_text}"))
    _style(ax, "activation change", "prediction change", zero_lines=True)
    ax.legend(loc="lower right", fontsize=8)


def _per_input(fig: Figure, res: ExperimentResult, title: str | None,
               expected: Mapping[str, str]) -> None:
    rows = sorted(res.per_input, key=lambda r: -abs(r.slope) if not math.isnan(r.slope) else 1.0)
    shown = rows[:MAX_PANELS]
    n_rows = max(1, math.ceil(len(shown) / 2))
    # Shared axes: every panel on the same scale, so sensitivities compare at a glance.
    axes = np.atleast_1d(fig.subplots(n_rows, 2, squeeze=False, sharex=True, sharey=True).ravel())
    xs = [np.array(r.activation_change) for r in shown]
    ys = [np.array(r.prediction_change) for r in shown]
    for ax, r, x, y in zip(axes, shown, xs, ys, strict=False):
        ax.scatter(x, y, s=20, alpha=0.8, color="tab:blue")
        _references(ax, labels=False)
        _fit_line(ax, x, r.fit, color="tab:red")
        r2 = (f"R² {r.r2:.3f}" if not math.isnan(r.r2) else
              "R² = 1 by construction" if "by construction" in (r.fit.reason or "") else
              "no effect" if (r.fit.reason or "").startswith("no effect") else "R² undefined")
        ax.set_title(f"{_short(r.text, 36)}\nslope {_fmt(r.slope, 3)}, {r2}", fontsize=8)
        ax.grid(alpha=0.3)
    if shown:
        _same_scale(axes[0], *xs, *ys)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    for ax in axes[-2:]:
        ax.set_xlabel("Δ activation")
    for ax in axes[::2]:
        ax.set_ylabel("Δ prediction")
    what = f"{len(shown)} of {len(rows)} inputs, most sensitive first" if len(rows) > len(shown) \
        else "each input's own fit, most sensitive first"
    wanted = f" · expected per-input slope {expected['per_input_slope']}" \
        if "per_input_slope" in expected else ""
    lines = "green dashed: slope 1, grey dotted: slope 0"
    fig.suptitle(_fit(fig, f"{_title(res, title)}: per-input sensitivity ({what}){wanted}\n"
                           f"{_verdict_line(res, expected)} · {lines}", 10), fontsize=10)


def _controls(fig: Figure, res: ExperimentResult, title: str | None,
              expected: Mapping[str, str]) -> None:
    """The target's slope among its controls' (95% intervals), target on top."""
    ctl = res.controls
    ax = fig.add_subplot()
    each = ctl.controls
    rows = [("target", "target", res.slope, res.slope_ci95.as_list(), res.r_squared),
            *[(c.label, c.kind, c.slope, c.slope_ci95, c.r_squared) for c in each]]
    # kind → (colour, marker, marker size, legend label)
    style = {"target": ("tab:red", "D", 8.0, "target"), "unit": ("tab:blue", "o", 6.0, "unit controls"),
             "direction": ("tab:purple", "s", 6.0, "direction controls")}
    ys = np.arange(len(rows))[::-1].astype(float)
    top = ctl.max_abs_slope
    if math.isfinite(top):
        ax.axvspan(-top, top, color="0.88", zorder=0,
                   label=f"|slope| ≤ largest control's ({top:.3g})")
    ax.axvline(0.0, color="k", lw=0.8, alpha=0.5)
    if math.isfinite(res.slope):
        ax.axvline(res.slope, color="tab:red", ls="--", lw=1, alpha=0.6)
    seen: set[str] = set()
    for y, (_label, kind, slope, ci, _r2) in zip(ys, rows, strict=True):
        if not math.isfinite(slope):
            ax.annotate("slope undefined", (0.0, y), fontsize=8, va="center", color="0.3")
            continue
        colour, marker, size, name = style[kind]
        lo, hi = ci
        err = ([[slope - lo], [hi - slope]] if math.isfinite(lo) and math.isfinite(hi) else None)
        ax.errorbar([slope], [y], xerr=err, fmt=marker, color=colour, ms=size, capsize=3, lw=1.5,
                    label=None if kind in seen else name)
        seen.add(kind)
    ax.set_yticks(ys, [f"{label}  (R² {_fmt(r2, 2)})" for label, _, _, _, r2 in rows], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel("causal slope (Δ prediction per unit of Δ activation), 95% bootstrap interval")
    ax.grid(axis="x", alpha=0.3)
    lo, hi = ctl.specificity_interval()
    spec = (f"specificity {_fmt(ctl.specificity, 3)}"
            + (f" (95% CI [{_fmt(lo, 3)}, {_fmt(hi, 3)}])" if math.isfinite(lo) else "")
            + (f", expected {expected['specificity']}" if "specificity" in expected else ""))
    wanted = (f" · expected control slopes {expected['control_slope']}"
              if "control_slope" in expected else "")
    n_units = len(ctl.units)
    kinds = ", ".join(x for x in (f"{n_units} units" if n_units else "",
                                  f"{len(each) - n_units} directions" if len(each) > n_units else "") if x)
    ax.set_title(_fit(fig, f"{_title(res, title)}\nthe target among its controls ({kinds}) · {spec}{wanted}",
                      10), fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # never over a unit


_Draw = Callable[[Figure, ExperimentResult, "str | None", Mapping[str, str]], None]
_DRAW: dict[str, tuple[_Draw, tuple[float, float]]] = {
    "baseline_correlation.png": (_baseline, (8, 5.5)),
    "scaling_experiment.png": (_scaling, (11, 4.8)),
    "pred_vs_act_change_all.png": (_all_points, (8.5, 6.5)),
    "pred_vs_act_regression.png": (_regression, (8, 6.5)),
    "per_input_sensitivity.png": (_per_input, (8, 9)),
    CONTROLS_FIGURE: (_controls, (10, 0.0)),  # height: one row per unit, see render()
}


def render(result: ExperimentResult, name: str, *, title: str | None = None,
           expected: Mapping[str, str] | None = None) -> Figure:
    """Draw one of :data:`FIGURES` and return the (unsaved) figure.

    ``expected`` (metric → range text, as probe outcomes print it) goes into titles.

    Example:
        >>> fig = render(res, "pred_vs_act_regression.png")    # doctest: +SKIP
    """
    draw, size = _DRAW[name]
    if name == CONTROLS_FIGURE:
        if result.controls is None:
            raise ValueError(f"{CONTROLS_FIGURE} needs a result with controls")
        size = (size[0], 2.2 + 0.32 * (len(result.controls.controls) + 1))
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    draw(fig, result, title, expected or {})
    return fig


def write_figures(
    result: ExperimentResult, out_dir: str | Path, *, title: str | None = None, dpi: int = 80,
    expected: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write the five PNG figures of ``result`` into ``out_dir`` (and ``controls.png`` with controls).

    Args:
        result: an experiment's result.
        out_dir: directory (created if needed).
        title: name shown in titles; default the head directory's name.
        dpi: resolution.
        expected: metric → expected range text, shown beside the measured values.

    Returns:
        The paths written, in :data:`FIGURES` order, then :data:`CONTROLS_FIGURE` if written.

    Example:
        >>> paths = write_figures(res, "out/demo_causal")    # doctest: +SKIP
        >>> [p.name for p in paths] == list(FIGURES)         # doctest: +SKIP
        True
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    names = FIGURES + ((CONTROLS_FIGURE,) if result.controls is not None else ())
    for name in names:
        fig = render(result, name, title=title, expected=expected)
        path = out / name
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths


def render_rank(res: RankResult) -> Figure:
    """Every unit's |slope| in rank order, the confirmed units' exact |slope| over it, the target marked.

    The line is the screen's |slope| of every unit, sorted (or the exact one where every
    unit has it); dots are the exact |slope| of the units patched for real, at their
    place in that order; the head's target unit is drawn in red.
    """
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    basis = res.screen_slope if res.screen_slope is not None else res.exact_slope
    key = np.abs(np.where(np.isnan(basis), 0.0, basis))
    order = np.argsort(-key, kind="stable")
    place = np.empty_like(order)
    place[order] = np.arange(1, order.size + 1)
    what = "screen (first order)" if res.screen_slope is not None else "exact"
    ax.plot(np.arange(1, order.size + 1), key[order], color="tab:blue", lw=1.2,
            label=f"|slope| of every unit, {what}")
    if res.screen_slope is not None:
        done = np.flatnonzero(res.patched)
        ax.scatter(place[done], np.abs(res.exact_slope[done]), s=22, color="tab:orange", zorder=3,
                   label=f"|exact slope| of the {done.size} units patched for real")
    if res.target is not None:
        t = res.target
        y = abs(float(res.slope[t])) if math.isfinite(float(res.slope[t])) else 0.0
        ax.scatter([place[t]], [y], s=90, marker="*", color="tab:red", zorder=4,
                   label=f"target unit {t}: rank {res.target_rank} of {res.width}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel(f"units of {res.unit_hook}, by |{'screen ' if res.screen_slope is not None else ''}slope|"
                  " (log scale)")
    ax.set_ylabel("|Δ prediction / Δ activation|")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    head = Path(res.head_path).name
    line = f"{head} · {res.unit_hook} ({res.width} units) · method {res.method}"
    if res.method == "upstream":
        line += f" · {NO_PATH} for every unit"
    elif res.screen_slope is not None and math.isfinite(res.rank_correlation):
        line += f" · Spearman ρ screen vs exact (top {len(res.confirmed)}) {res.rank_correlation:.2f}"
    ax.set_title(line, fontsize=9)
    return fig


def write_rank_figure(res: RankResult, path: str | Path, *, dpi: int = 80) -> Path:
    """Write :func:`render_rank` to ``path`` (PNG); returns the path.

    Example:
        >>> write_rank_figure(rank_units("probes/heads/demo_causal"), "out/rank.png")  # doctest: +SKIP
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_rank(res).savefig(path, dpi=dpi)
    return path


def figure_bytes(
    result: ExperimentResult, *, title: str | None = None, dpi: int = 80,
    expected: Mapping[str, str] | None = None,
) -> dict[str, bytes]:
    """The figures as PNG bytes, by file name, in :data:`FIGURES` order (then
    :data:`CONTROLS_FIGURE` with controls); nothing is written.

    The same bytes :func:`write_figures` would write: for a process that hands its
    figures to another one to write (an xdist worker to the controller).

    Example:
        >>> list(figure_bytes(res)) == list(FIGURES)          # doctest: +SKIP
        True
    """
    import io

    out = {}
    for name in FIGURES + ((CONTROLS_FIGURE,) if result.controls is not None else ()):
        fig = render(result, name, title=title, expected=expected)
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=dpi, format="png")
        out[name] = buffer.getvalue()
    return out
