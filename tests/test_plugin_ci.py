"""CI regression mode under real pytest runs: baselines, drift, missing, xdist, HTML report."""

from __future__ import annotations

import json
import re
import textwrap

import pytest
import torch

pytest_plugins = ["pytester"]

PROBE = """
name: tracks
head: heads/causal
inputs: ["The cat sat on the mat.", "Machine learning models", "The quick brown fox jumps"]
interventions: {set: [-1, 0, 1, 2]}
baseline:
  tolerance: {slope: 0.001}
expect:
  r_squared: {min: 0.99}
---
name: blind
head: heads/blind
inputs: ["The cat sat on the mat.", "Machine learning models"]
interventions: {set: [0, 1]}
expect:
  slope: {abs_max: 1.0e-9}
"""
INI = '[tool.pytest.ini_options]\nneuronpatch_figures = "none"\n'


@pytest.fixture
def project(pytester: pytest.Pytester, probe_heads):
    probe_heads.copy_heads(pytester.path / "heads")
    pytester.makefile(".toml", pyproject=INI)
    (pytester.path / "ci.probe.yaml").write_text(textwrap.dedent(PROBE).lstrip())
    return pytester


def _scale_head(path, factor: float) -> None:
    sd = torch.load(path / "head.pt", weights_only=True)
    sd["output.weight"] = sd["output.weight"] * factor
    torch.save(sd, path / "head.pt")


def test_update_then_pass_then_drift_then_accept(project, probe_heads):
    missing = project.runpytest("-p", "no:cacheprovider")
    missing.assert_outcomes(passed=1, failed=1)
    missing.stdout.fnmatch_lines(["*has no baseline at baselines/ci/tracks.json; run pytest with "
                                  "--neuronpatch-update-baselines to create it*",
                                  "neuronpatch: 2 probes: 1 failed, 1 passed (1 missing baseline)"])
    project.runpytest("-p", "no:cacheprovider", "--neuronpatch-update-baselines").assert_outcomes(
        passed=2)
    saved = json.loads((project.path / "baselines" / "ci" / "tracks.json").read_text())
    assert saved["metrics"]["slope"] == pytest.approx(probe_heads.causal_slope, rel=1e-4)
    assert (project.path / "baselines" / "ci" / "blind.json").is_file()  # every probe gets one
    project.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)
    (project.path / "baselines" / "ci" / "blind.json").unlink()  # no baseline: key, no file: not checked
    project.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)

    _scale_head(project.path / "heads" / "causal", 1.5)
    drift = project.runpytest("-p", "no:cacheprovider")
    drift.assert_outcomes(passed=1, failed=1)
    text = drift.stdout.str()
    assert re.search(r"slope\s+-?\d\.\d+\s+-?\d\.\d+\s+\d\.\d+\s+0\.001\s+DRIFT", text), text
    assert "likely cause: the head changed" in text
    assert "to accept the new values, run pytest with --neuronpatch-update-baselines" in text
    assert "neuronpatch: 2 probes: 1 failed, 1 passed (1 drifted)" in text

    project.runpytest("-p", "no:cacheprovider", "--neuronpatch-update-baselines")
    project.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_missing_baseline_can_skip(project):
    res = project.runpytest("-p", "no:cacheprovider", "--neuronpatch-missing-baseline=skip", "-rs")
    res.assert_outcomes(passed=1, skipped=1)
    # the skip points at the probe in its file, not at the plugin's code
    res.stdout.fnmatch_lines(["SKIPPED [[]1[]] ci.probe.yaml:1: probe 'tracks' has no baseline*"])
    res.stdout.fnmatch_lines(["neuronpatch: 2 probes: 1 passed, 1 skipped (1 missing baseline)"])
    bad = project.runpytest("-p", "no:cacheprovider", "--neuronpatch-missing-baseline=maybe")
    bad.stderr.fnmatch_lines(["*--neuronpatch-missing-baseline = 'maybe' is invalid; "
                              "expected one of fail, skip*"])


def test_every_probe_opts_in_with_the_flag(project):
    res = project.runpytest("-p", "no:cacheprovider", "--neuronpatch-baselines")
    res.assert_outcomes(failed=2)  # neither has a baseline yet
    res.stdout.fnmatch_lines(["neuronpatch: 2 probes: 2 failed (2 missing baseline)"])


def test_xdist_run_equals_serial_run(project):
    project.runpytest("-p", "no:cacheprovider", "--neuronpatch-baselines",
                      "--neuronpatch-update-baselines")
    serial = {p.name: json.loads(p.read_text())["metrics"]
              for p in (project.path / "baselines" / "ci").iterdir()}
    res = project.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--neuronpatch-baselines",
                                       "--neuronpatch-update-baselines")
    res.assert_outcomes(passed=2)
    parallel = {p.name: json.loads(p.read_text())["metrics"]
                for p in (project.path / "baselines" / "ci").iterdir()}
    assert parallel == serial
    again = project.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--neuronpatch-baselines")
    again.assert_outcomes(passed=2)
    again.stdout.fnmatch_lines(["neuronpatch: 2 probes: 2 passed"])


def test_html_report_holds_every_probe_and_its_figures(project):
    project.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--neuronpatch-figures=all",
                                 "--neuronpatch-report=report.html")
    page = (project.path / "report.html").read_text()
    assert "ci.probe.yaml::tracks" in page and "ci.probe.yaml::blind" in page
    # five thumbnails per probe, linking to the PNG files in the artifacts directory
    links = re.findall(r'<a href="([^"]+\.png)"><img', page)
    assert len(links) == 10 and "data:image" not in page
    assert all((project.path / link).is_file() for link in links)
    assert page.index("no baseline") < page.index("ci.probe.yaml::blind")  # failures first
    embedded = project.runpytest("-p", "no:cacheprovider", "--neuronpatch-figures=all",
                                            "--neuronpatch-report=embedded.html",
                                            "--neuronpatch-report-embed")
    embedded.assert_outcomes(passed=1, failed=1)
    assert (project.path / "embedded.html").read_text().count("data:image/png;base64,") == 10


def test_suggested_tolerances_are_printed(project):
    res = project.runpytest("-p", "no:cacheprovider", "--neuronpatch-suggest-tolerances",
                            "--neuronpatch-missing-baseline=skip")
    res.stdout.fnmatch_lines(["*suggested baseline.tolerance for ci.probe.yaml::tracks: {'slope': *"])
