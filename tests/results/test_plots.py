"""Figures: five valid PNGs for ordinary and degenerate results, no warnings, no pyplot state."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from neuronpatch.interventions import Intervention
from neuronpatch.plots import FIGURES, render, write_figures
from neuronpatch.result import ExperimentResult

PNG = b"\x89PNG\r\n\x1a\n"


def make_result(act: np.ndarray, dact: np.ndarray, dpred: np.ndarray,
                ivs: list[Intervention], pred: np.ndarray | None = None) -> ExperimentResult:
    n = act.shape[0]
    pred = act * 0.9 if pred is None else pred
    return ExperimentResult(
        head_path="/heads/demo_causal", model_name="m", head_type="regression", target_layer=1,
        target_neuron=7, layer_type="post", unit_hook="blocks.1.mlp.hook_post",
        feature_hook="blocks.2.hook_resid_pre", token_pos="last", patch_position="last",
        method="linear", inputs=tuple(f"input number {i} with some words" for i in range(n)),
        n_tokens=(5,) * n, positions=(4,) * n, interventions=tuple(ivs),
        clean_activation=act, clean_prediction=pred,
        patched_activation=act[:, None] + dact, patched_prediction=pred[:, None] + dpred,
    )


SCALES = [Intervention("scale", f) for f in (0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2)]


def linear_case(n: int = 8) -> ExperimentResult:
    rng = np.random.default_rng(0)
    act = rng.uniform(0.2, 2.0, n)
    factors = np.array([iv.value for iv in SCALES])
    dact = act[:, None] * (factors - 1)
    return make_result(act, dact, 0.9 * dact + rng.normal(0, 0.01, dact.shape), SCALES)


CASES = {
    "linear": linear_case,
    "many inputs": lambda: linear_case(13),
    "no activation change": lambda: make_result(np.ones(4), np.zeros((4, 8)), np.zeros((4, 8)), SCALES),
    "constant prediction": lambda: make_result(
        np.linspace(0, 1, 5), np.tile(np.linspace(-1, 1, 8), (5, 1)), np.zeros((5, 8)), SCALES,
        pred=np.full(5, 0.3)),
    "single input": lambda: make_result(np.array([1.0]), np.linspace(-1, 1, 8)[None],
                                        np.linspace(-1, 1, 8)[None], SCALES),
    "one intervention": lambda: make_result(np.linspace(0, 1, 4), np.ones((4, 1)), np.ones((4, 1)),
                                            [Intervention("set", 2.0)]),
    "mixed kinds": lambda: make_result(
        np.linspace(0.5, 1, 3), np.array([[-1.0, 1, 0.5]] * 3), np.array([[-0.9, 1.1, 0.4]] * 3),
        [Intervention("zero"), Intervention("set", 2), Intervention("add", 0.5)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_five_valid_pngs(tmp_path, case):
    paths = write_figures(CASES[case](), tmp_path)  # pyproject: warnings are errors
    assert [p.name for p in paths] == list(FIGURES)
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == PNG
        assert len(data) > 10_000
        img = imread(p)
        assert img.shape[0] > 300 and img.shape[1] > 300


def test_figures_leave_pyplot_alone(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    write_figures(linear_case(), tmp_path)
    assert plt.get_fignums() == before


def _texts(fig) -> str:
    parts = [t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text"))]
    return "\n".join(p for p in parts if isinstance(p, str))


def test_undefined_fit_is_explained_on_the_regression_figure():
    res = CASES["no activation change"]()
    assert np.isnan(res.slope)
    text = _texts(render(res, "pred_vs_act_regression.png"))
    assert f"no fit: {res.fit.reason}" in text
    assert "pooled OLS fit" not in text  # no line drawn for an undefined fit


def test_regression_figure_states_slope_expected_range_ci_and_equation():
    res = linear_case()
    fig = render(res, "pred_vs_act_regression.png", title="my head",
                 expected={"slope": "[0.8, 1.2]", "r_squared": "≥ 0.9"})
    [ax] = fig.axes
    title = ax.get_title()
    assert f"slope {res.slope:.3f} (expected [0.8, 1.2])" in title
    assert f"R² {res.r_squared:.3f} (expected ≥ 0.9)" in title
    assert f"95% CI [{res.slope_ci95.lo:.3f}, {res.slope_ci95.hi:.3f}]" in title
    assert "my head · L1 N7 (post)" in title
    assert f"Δpred = {res.slope:.4f}·Δact" in _texts(fig)


def test_a_zero_width_interval_says_why_on_the_figure_and_in_the_cli_report():
    from neuronpatch.cli import format_report
    from neuronpatch.plots import interval_text

    assert interval_text(0.9, 0.94) == "95% CI [0.900, 0.940]"
    act = np.linspace(0.5, 2.0, 6)
    factors = np.array([iv.value for iv in SCALES])
    dact = act[:, None] * (factors - 1)
    res = make_result(act, dact, 0.921 * dact, SCALES)  # every input on one line: slope 0.921 each
    assert res.slope_ci95.lo == pytest.approx(res.slope_ci95.hi)
    why = "(zero width: every input gives the same slope)"
    title = " ".join(render(res, "pred_vs_act_regression.png").axes[0].get_title().split())
    assert f"95% CI [0.921, 0.921] {why}" in title
    report = format_report(res)
    assert f"95% CI [0.9210, 0.9210] {why}" in report
    assert "(zero width: every input gives the same R²)" in report
    assert "zero width" not in format_report(linear_case())  # noise between inputs: a real interval


def _reference_slopes(ax) -> set[float]:
    """Slopes of the reference lines through the origin (matplotlib's axline objects)."""
    from matplotlib.lines import Line2D

    out = set()
    for line in ax.get_lines():
        if isinstance(line, Line2D) and getattr(line, "_slope", None) is not None:
            assert tuple(line._xy1) == (0.0, 0.0)
            out.add(float(line._slope))
    return out


@pytest.mark.parametrize("name", ["pred_vs_act_regression.png", "pred_vs_act_change_all.png"])
def test_change_figures_have_slope_1_and_0_references_on_one_scale(name):
    res = make_result(np.linspace(0.5, 2, 6), np.tile([-3.0, 0.0, 3.0], (6, 1)),
                      0.2 * np.tile([-3.0, 0.0, 3.0], (6, 1)), SCALES[:3])
    [ax, *_] = render(res, name).axes
    assert _reference_slopes(ax) == {0.0, 1.0}
    labels = ax.get_legend_handles_labels()[1]
    assert "slope 1 (tracks the unit)" in labels and "slope 0 (ignores it)" in labels
    # Same span on both axes: a slope of 0.2 is drawn at 0.2, not stretched to fill the box.
    assert ax.get_xlim() == ax.get_ylim()


def test_the_fit_has_its_95_percent_band():
    from matplotlib.collections import PolyCollection

    res = linear_case()
    [ax] = render(res, "pred_vs_act_regression.png").axes
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert [b.get_label() for b in bands] == ["95% band of the fit"]
    # at every x the band has a lower and an upper edge around the fitted line
    verts = bands[0].get_paths()[0].vertices
    edges: dict[float, list[float]] = {}
    for vx, vy in verts:
        edges.setdefault(round(float(vx), 9), []).append(float(vy))
    pairs = {vx: ys for vx, ys in edges.items() if len(ys) >= 2}
    assert len(pairs) >= 10
    for vx, ys in pairs.items():
        assert min(ys) < res.slope * vx + res.intercept < max(ys)


def test_per_input_panels_share_their_axes_and_show_the_most_sensitive_eight():
    res = linear_case(13)
    fig = render(res, "per_input_sensitivity.png", expected={"per_input_slope": "[0.8, 1.2]"})
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 8
    assert len({ax.get_xlim() for ax in visible}) == 1 and len({ax.get_ylim() for ax in visible}) == 1
    assert all(_reference_slopes(ax) == {0.0, 1.0} for ax in visible)
    text = _texts(fig)
    assert "8 of 13 inputs" in text and "expected per-input slope [0.8, 1.2]" in text
    top = sorted(res.per_input, key=lambda r: -abs(r.slope))[0]
    assert f"slope {top.slope:.3f}" in text


def test_an_upstream_head_says_there_is_no_causal_path_never_nan():
    act = np.linspace(0.5, 2, 5)
    dact = np.tile([-1.0, 0.0, 1.0, 2.0], (5, 1))
    import dataclasses

    res = dataclasses.replace(make_result(act, dact, np.zeros_like(dact), SETS4), method="upstream")
    for name in FIGURES:
        text = _texts(render(res, name))
        assert "nan" not in text.lower().replace("nanosecond", ""), name
    assert "no causal path: slope exactly 0" in render(res, "pred_vs_act_regression.png").axes[0].get_title()


def test_trivial_per_input_r2_is_named_in_its_panel():
    act = np.linspace(0.5, 2, 3)
    dact = np.stack([0 - act, 3 - act], axis=1)
    res = make_result(act, dact, 0.9 * dact, [Intervention("set", 0.0), Intervention("set", 3.0)])
    assert "R² = 1 by construction" in _texts(render(res, "per_input_sensitivity.png"))


SETS4 = [Intervention("set", v) for v in (0.0, 1.0, 2.0, 3.0)]


def controls_case(n: int = 8) -> ExperimentResult:
    """linear_case with two unit and two direction controls of known slopes (0.1, −0.3, 0.05, 0)."""
    import dataclasses

    from neuronpatch.controls import ControlResults, random_directions

    res = linear_case(n)
    rng = np.random.default_rng(1)
    x = res.activation_change
    xs = tuple(x * (1 + 0.1 * k) for k in range(4))
    slopes = (0.1, -0.3, 0.05, 0.0)
    ys = tuple(s * xk + rng.normal(0, 0.002, x.shape) for s, xk in zip(slopes, xs, strict=True))
    ctl = ControlResults(x, res.prediction_change, xs, ys, (3, 11), random_directions(2, 0, 16), 0)
    return dataclasses.replace(res, controls=ctl)


def test_with_controls_a_sixth_figure_shows_the_target_among_them(tmp_path):
    paths = write_figures(controls_case(), tmp_path)
    assert [p.name for p in paths] == [*FIGURES, "controls.png"]
    assert paths[-1].read_bytes()[:8] == PNG and imread(paths[-1]).shape[0] > 200
    assert "controls.png" not in {p.name for p in write_figures(linear_case(), tmp_path / "plain")}


def test_the_controls_figure_draws_each_slope_with_its_interval_and_the_target_on_top():
    from matplotlib.container import ErrorbarContainer

    res = controls_case()
    fig = render(res, "controls.png", title="h", expected={"specificity": "≥ 5"})
    [ax] = fig.axes
    ticks = [t.get_text() for t in ax.get_yticklabels()]
    assert [t.split("  ")[0] for t in ticks] == ["target", "unit3", "unit11", "dir0", "dir1"]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    rows = [("target", res.slope, res.slope_ci95.as_list())] + [
        (c.label, c.slope, c.slope_ci95) for c in res.controls.controls]
    assert len(bars) == len(rows)
    ys = sorted((float(b.lines[0].get_ydata()[0]) for b in bars), reverse=True)
    for bar, (label, slope, (lo, hi)), y in zip(bars, rows, ys, strict=True):
        assert float(bar.lines[0].get_xdata()[0]) == pytest.approx(slope), label
        assert float(bar.lines[0].get_ydata()[0]) == y  # drawn top to bottom, target first
        seg = bar.lines[2][0].get_segments()[0]  # the horizontal interval
        assert sorted(float(v) for v in seg[:, 0]) == pytest.approx([lo, hi]), label
    title = ax.get_title()
    spec = res.controls.specificity
    assert f"specificity {spec:.3f}" in title and "expected ≥ 5" in title
    assert "2 units, 2 directions" in title
    labels = ax.get_legend_handles_labels()[1]
    assert any(lab.startswith("|slope| ≤ largest control's (0.3") for lab in labels)


@pytest.mark.parametrize("head", ["demo_causal", "demo_upstream", "demo_classifier"])
def test_every_figure_keeps_its_text_on_the_canvas(head):
    # At the default size, no title, label or annotation runs off the figure (a long verdict
    # line on an upstream head once clipped both edges of its title).
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from neuronpatch import plots, run_experiment

    root = Path(__file__).resolve().parents[2] / "probes"
    texts = (root / "inputs" / "demo.txt").read_text().splitlines()
    res = run_experiment(root / "heads" / head, texts, set=[-0.5, 0, 0.5, 1, 1.5, 2, 2.5, 3],
                         controls={"units": {"random": 3, "seed": 0}}, device="cpu")
    for name in (*plots.FIGURES, plots.CONTROLS_FIGURE):
        fig = plots.render(res, name, title=head)
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        renderer = canvas.get_renderer()
        boxes = [(f"axes {i}", ax.get_tightbbox(renderer)) for i, ax in enumerate(fig.axes)]
        boxes += [(t.get_text(), t.get_window_extent(renderer)) for t in fig.texts if t.get_text()]
        boxes += [(f"legend {i}", leg.get_window_extent(renderer)) for i, leg in enumerate(fig.legends)]
        width, height = fig.bbox.width, fig.bbox.height
        off = [(what, box.bounds) for what, box in boxes if box is not None and (
            box.x0 < -0.5 or box.y0 < -0.5 or box.x1 > width + 0.5 or box.y1 > height + 0.5)]
        assert not off, f"{name}: text outside the {width:.0f}x{height:.0f} canvas: {off}"
        # Labels beside points stay inside their axes, off each other and off the figure's legends.
        for ax in fig.axes if name == "baseline_correlation.png" else ():
            inside = ax.get_window_extent(renderer)
            labels = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts if t.get_text()]
            outside = [text for text, box in labels if not (
                box.x0 >= inside.x0 - 0.5 and box.x1 <= inside.x1 + 0.5
                and box.y0 >= inside.y0 - 0.5 and box.y1 <= inside.y1 + 0.5)]
            assert not outside, f"{name}: labels past the edge of their axes: {outside}"
            legends = [leg.get_window_extent(renderer) for leg in fig.legends]
            assert not any(inside.overlaps(leg) for leg in legends), f"{name}: a legend covers the axes"
        if name == "baseline_correlation.png":
            [ax] = fig.axes
            numbers = [(t.get_text(), t.get_window_extent(renderer)) for t in ax.texts]
            assert sorted(text for text, _ in numbers) == sorted(str(i) for i in range(len(texts)))
            clash = [(x, y) for i, (x, a) in enumerate(numbers) for y, b in numbers[i + 1:] if a.overlaps(b)]
            assert not clash, f"{name}: input labels over each other: {clash}"
            [key] = fig.legends  # the numbers' key: each input's number and its text, shortened
            shown = [t.get_text() for t in key.get_texts()]
            assert len(shown) == len(texts)
            for i, (line, text) in enumerate(zip(shown, texts, strict=True)):
                assert line == f"{i}  {text}" or (line.startswith(f"{i}  {text[:20]}") and line.endswith("…"))
