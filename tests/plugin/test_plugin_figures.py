"""Each probe's five figures: written, valid PNGs, in the failure report, in pytest-html."""

from __future__ import annotations

import io
import json
import sys
import types

import pytest

pytest_plugins = ["pytester"]

FIGURES = {"baseline_correlation.png", "scaling_experiment.png", "pred_vs_act_change_all.png",
           "pred_vs_act_regression.png", "per_input_sensitivity.png"}

PROBES = """
name: passes
head: heads/causal
inputs: [The cat sat on the mat., Machine learning models, The quick brown fox]
interventions: {set: [-1, 0, 1, 2]}
expect:
  r_squared: {min: 0.99}
---
name: fails
head: heads/causal
inputs: [The cat sat on the mat., Machine learning models, The quick brown fox]
interventions: {set: [-1, 0, 1, 2]}
expect:
  slope: [100, 200]
"""


@pytest.fixture
def project(pytester: pytest.Pytester, probe_heads):
    probe_heads.copy_heads(pytester.path / "heads")
    (pytester.path / "figs.probe.yaml").write_text(PROBES)
    return pytester


def artifact_dirs(root):
    return {d.name.split("_", 2)[-1].rsplit("-", 1)[0]: d for d in root.iterdir()}


@pytest.fixture
def plots():
    import neuronpatch.plots

    return neuronpatch.plots


def test_every_probe_writes_five_valid_pngs_and_the_report_lists_them(project, plots):
    import matplotlib.image

    result = project.runpytest("-p", "no:cacheprovider", "--neuronpatch-artifacts", "arts",
                               "--neuronpatch-figures", "all")
    result.assert_outcomes(passed=1, failed=1)
    dirs = artifact_dirs(project.path / "arts")
    assert set(dirs) == {"passes", "fails"}
    for directory in dirs.values():
        assert {p.name for p in directory.glob("*.png")} == FIGURES
        for png in directory.glob("*.png"):
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            height, width = matplotlib.image.imread(png).shape[:2]
            assert height > 50 and width > 50
        summary = json.loads((directory / "summary.json").read_text())
        assert set(summary["figures"]) == FIGURES
    result.stdout.re_match_lines([
        r"  artifacts: arts/figs\.probe\.yaml_fails-\w+/",
        r"    summary\.json, .*per_input_sensitivity\.png.*",
    ])


def test_by_default_figures_are_drawn_for_failures_and_for_the_report(project, plots):
    result = project.runpytest("-p", "no:cacheprovider", "--neuronpatch-artifacts", "arts")
    result.assert_outcomes(passed=1, failed=1)
    dirs = artifact_dirs(project.path / "arts")
    assert not list(dirs["passes"].glob("*.png"))  # nothing will show them
    assert {p.name for p in dirs["fails"].glob("*.png")} == FIGURES
    result = project.runpytest("-p", "no:cacheprovider", "--neuronpatch-artifacts", "arts",
                               "--neuronpatch-report", "r.html")
    assert {p.name for p in dirs["passes"].glob("*.png")} == FIGURES  # the report shows them


def test_figures_only_for_failures_when_asked(project, plots):
    result = project.runpytest("-p", "no:cacheprovider", "--neuronpatch-artifacts", "arts",
                               "--neuronpatch-figures", "failed")
    result.assert_outcomes(passed=1, failed=1)
    dirs = artifact_dirs(project.path / "arts")
    assert not list(dirs["passes"].glob("*.png"))
    assert {p.name for p in dirs["fails"].glob("*.png")} == FIGURES


@pytest.fixture
def stub_plots(monkeypatch):
    """A neuronpatch.plots that writes the five figures as tiny real PNGs (fast, no engine)."""
    import matplotlib.pyplot as plt

    def figure_bytes(result, title=None, expected=None):
        out = {}
        for name in FIGURES:
            fig, ax = plt.subplots(figsize=(1, 1))
            ax.plot(result.activation_change.ravel(), result.prediction_change.ravel(), ".")
            buffer = io.BytesIO()
            fig.savefig(buffer, dpi=20, format="png")
            plt.close(fig)
            out[name] = buffer.getvalue()
        return out

    stub = types.ModuleType("neuronpatch.plots")
    stub.figure_bytes = figure_bytes  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "neuronpatch.plots", stub)


def test_pytest_html_report_embeds_the_figures(project, stub_plots):
    result = project.runpytest("-p", "no:cacheprovider", "--html=report.html",
                               "--self-contained-html")
    result.assert_outcomes(passed=1, failed=1)
    html = (project.path / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 * len(FIGURES)
    assert "per_input_sensitivity" in html


def test_a_plotting_failure_never_hides_the_verdict(project, monkeypatch):
    broken = types.ModuleType("neuronpatch.plots")

    def figure_bytes(*args, **kwargs):
        raise RuntimeError("no display")

    broken.figure_bytes = figure_bytes  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "neuronpatch.plots", broken)
    project.makefile(".toml", pyproject='[tool.pytest.ini_options]\n'
                     'filterwarnings = ["default::pytest.PytestWarning"]\n')
    result = project.runpytest("-p", "no:cacheprovider", "--neuronpatch-artifacts", "arts",
                               "--neuronpatch-figures", "all")
    result.assert_outcomes(passed=1, failed=1, warnings=2)
    result.stdout.fnmatch_lines_random([
        "    summary.json (figures not written: RuntimeError: no display)",
        "*PytestWarning: neuronpatch: figures for 'passes' not written: RuntimeError: no display",
    ])
    summary = json.loads((artifact_dirs(project.path / "arts")["passes"] / "summary.json")
                         .read_text())
    assert summary["figures_error"] == "RuntimeError: no display"
    assert summary["figures"] == []
