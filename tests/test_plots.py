"""Figures: five valid PNGs for ordinary and degenerate results, no warnings, no pyplot state."""

from __future__ import annotations

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


def test_regression_figure_states_slope_ci_and_equation():
    res = linear_case()
    text = _texts(render(res, "pred_vs_act_regression.png", title="my head"))
    assert f"slope = {res.slope:.4f}" in text and f"R² = {res.r_squared:.4f}" in text
    assert f"95% CI [{res.slope_ci95.lo:.3f}, {res.slope_ci95.hi:.3f}]" in text
    assert f"Δpred = {res.slope:.4f}·Δact" in text
    assert "my head · L1 N7 (post)" in text


def test_per_input_panels_show_the_most_sensitive_eight():
    res = linear_case(13)
    text = _texts(render(res, "per_input_sensitivity.png"))
    assert "8 of 13 inputs" in text
    top = sorted(res.per_input, key=lambda r: -abs(r.slope))[0]
    assert f"slope {top.slope:.4f}" in text
