"""Controls in probe files, under real pytest runs: summary.json, JUnit, failure text, HTML, figure.

Slopes are checked against analytic values from the weight files, never against
the engine: ``causal`` reads ``hidden_states[1]`` right after neuron 3 of layer 0
with a linear head ``w``, so a unit control ``c`` has slope ``w · W_out[c]``;
``resid`` reads the very residual tensor it patches, so unit ``c`` has slope
``w_c`` and direction ``v`` has slope ``w · v``.
"""

from __future__ import annotations

import json
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import jsonschema
import pytest

pytest_plugins = ["pytester"]

INPUTS = ["The cat sat on the mat.", "Machine learning models", "The quick brown fox jumps"]


@pytest.fixture
def project(pytester: pytest.Pytester, probe_heads):
    from neuronpatch.testing import write_head

    probe_heads.copy_heads(pytester.path / "heads")
    # hf coordinates: feature_layer 1 is hidden_states[1], the output of block 0 (its resid_post).
    write_head(pytester.path / "heads" / "resid", probe_heads.model, target_layer=0, target_neuron=3,
               layer_type="resid_post", feature_layer=1, coordinates="hf", seed=5)
    return pytester


def _write(pytester: pytest.Pytester, name: str, text: str) -> Path:
    path = pytester.path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def _analytic(project: pytest.Pytester, probe_heads) -> dict[str, dict[str, float]]:
    import torch
    from safetensors.torch import load_file

    from neuronpatch.controls import random_directions

    weights = load_file(str(probe_heads.model / "model.safetensors"))
    w_out = weights["transformer.h.0.mlp.c_proj.weight"].double()  # Conv1D: [d_mlp, d_model]
    head = project.path / "heads"
    w = torch.load(head / "causal" / "head.pt", weights_only=True)["output.weight"][0].double()
    r = torch.load(head / "resid" / "head.pt", weights_only=True)["output.weight"][0].double()
    dirs = torch.from_numpy(random_directions(3, 0, r.numel()))
    return {"units": {f"unit{c}": float(w @ w_out[c]) for c in (1, 2, 5)},
            "directions": {"unit7": float(r[7]), **{f"dir{i}": float(dirs[i] @ r) for i in range(3)}}}


PROBES = f"""
name: units
head: heads/causal
inputs: {json.dumps(INPUTS)}
interventions: {{set: [-1, 0, 1, 2]}}
controls: {{units: [1, 2, 5]}}
expect:
  specificity: {{min: 1000}}
---
name: directions
head: heads/resid
inputs: {json.dumps(INPUTS)}
interventions: {{set: [-1, 0.5], add: [1]}}
controls:
  units: [7]
  directions: {{random: 3, seed: 0}}
expect:
  control_slope: {{abs_max: 1000}}
---
name: plain
head: heads/causal
inputs: {json.dumps(INPUTS)}
interventions: {{set: [-1, 0, 1, 2]}}
expect:
  r_squared: {{min: 0.99}}
"""


def test_each_controls_fit_reaches_summary_junit_failure_text_html_and_a_figure(project, probe_heads):
    from neuronpatch.artifacts import summary_schema

    want = _analytic(project, probe_heads)
    _write(project, "c.probe.yaml", PROBES)
    result = project.runpytest("-p", "no:cacheprovider", "--neuronpatch-artifacts", "arts",
                               "--neuronpatch-figures", "all", "--junitxml=junit.xml",
                               "--neuronpatch-report", "r.html")
    result.assert_outcomes(passed=2, failed=1)
    arts = {d.name.split("_", 2)[-1].rsplit("-", 1)[0]: d for d in (project.path / "arts").iterdir()}
    validator = jsonschema.Draft202012Validator(summary_schema())
    summaries = {}
    for name in ("units", "directions", "plain"):
        summary = json.loads((arts[name] / "summary.json").read_text())
        validator.validate(summary)
        summaries[name] = summary
        figures = {p.name for p in arts[name].glob("*.png")}
        assert ("controls.png" in figures) == (name != "plain"), name
        assert ("controls.png" in summary["figures"]) == (name != "plain"), name
    assert summaries["plain"]["controls"] is None
    for name in ("units", "directions"):
        got = {c["label"]: c for c in summaries[name]["controls"]["controls"]}
        assert list(got) == list(want[name])
        for label, slope in want[name].items():
            assert got[label]["slope"] == pytest.approx(slope, rel=1e-4, abs=1e-7), label
            assert got[label]["r_squared"] == pytest.approx(1.0, abs=1e-6), label
            lo, hi = got[label]["slope_ci95"]
            assert lo == pytest.approx(slope, rel=1e-4, abs=1e-7) and hi == pytest.approx(slope, rel=1e-4,
                                                                                          abs=1e-7)
    spec = summaries["units"]["controls"]["specificity"]
    assert spec == pytest.approx(abs(probe_heads.causal_slope) / max(map(abs, want["units"].values())),
                                 rel=1e-4)

    # The failure text: the specificity, then the target and its strongest controls.
    top = max(want["units"], key=lambda k: abs(want["units"][k]))
    result.stdout.re_match_lines([
        rf"  FAIL  specificity += {spec:.6g} .*",
        rf"  controls: 3 units; specificity {spec:.4g}, 95% CI \[.*\]; largest \|control slope\| .*",
        r"    target  +slope .* R² 1 .* 95% CI \[.*\]",
        rf"    {top} +slope {want['units'][top]:.4g} .*",
    ])

    # JUnit: numbers only, per control.
    cases = {c.get("name"): {p.get("name"): p.get("value") for p in c.iter("property")}
             for c in ET.parse(project.path / "junit.xml").iter("testcase")}
    props = cases["directions"]
    for label, slope in want["directions"].items():
        assert float(props[f"neuronpatch.control.{label}.slope"]) == pytest.approx(slope, rel=1e-4, abs=1e-7)
        assert float(props[f"neuronpatch.control.{label}.r_squared"]) == pytest.approx(1.0, abs=1e-6)
        float(props[f"neuronpatch.control.{label}.slope_ci95_lo"])
    assert float(cases["units"]["neuronpatch.specificity"]) == pytest.approx(spec)
    assert not any(k.startswith(("neuronpatch.control.", "neuronpatch.specificity")) for k in cases["plain"])

    # The HTML report: one controls table per probe with controls.
    page = (project.path / "r.html").read_text()
    assert page.count('<table class="controls">') == 2
    assert "<td>dir2</td><td>direction</td>" in page and "<td>unit5</td><td>unit</td>" in page
    assert page.count("controls.png") >= 2


def test_directions_on_an_mlp_neuron_are_an_error_at_the_controls_line(project):
    path = _write(project, "d.probe.yaml", f"""
        name: mlp directions
        head: heads/causal
        inputs: {json.dumps(INPUTS)}
        interventions: {{set: [0, 1]}}
        controls:
          directions: {{random: 2}}
        expect:
          slope: [0, 1]
    """)
    result = project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    line = next(i for i, t in enumerate(path.read_text().splitlines(), 1) if t.startswith("controls:"))
    result.stdout.re_match_lines([
        rf"d\.probe\.yaml:{line}: probe 'mlp directions' could not run \(head heads/causal\): "
        r"ControlsError: controls\.directions needs a residual-stream unit, but .*heads/causal/config\.json "
        r"has layer_type 'post' \(an MLP neuron\); expected controls\.units for MLP neurons, or a head whose "
        r"layer_type is one of resid_post, resid_pre, mlp_out, attn_out",
    ])


def test_a_control_slope_failure_names_the_controls_not_the_inputs(project, probe_heads):
    want = _analytic(project, probe_heads)["units"]
    _write(project, "s.probe.yaml", f"""
        name: controls stay flat
        head: heads/causal
        inputs: {json.dumps(INPUTS)}
        interventions: {{set: [-1, 0, 1, 2]}}
        controls: {{units: [1, 2, 5]}}
        expect:
          control_slope: {{abs_max: 1.0e-9}}
    """)
    result = project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.re_match_lines([
        r"  FAIL  control_slope +=  *3 of 3 controls out of range .*",
        rf"        controls\[0\] 'unit1' = {want['unit1']:.3g}\d*$",
        rf"        controls\[2\] 'unit5' = {want['unit5']:.3g}\d*$",
    ])
    assert "inputs[0]" not in result.stdout.str()


@pytest.mark.parametrize(("controls", "message"), [
    ("{directions: {random: 0}}",
     "key 'controls.directions.random': got 0 (an integer); expected a number >= 1"),
    ("{units: [1, 1]}", "key 'controls.units': [1, 1] repeats a unit; expected distinct unit indices"),
    ("{units: abc}", "key 'controls.units': got 'abc' (a string); expected {random: k, seed: s} or a "
                     "non-empty list of unit indices (ints >= 0)"),
    ("{}", "key 'controls': nothing to patch; expected units: {random: k, seed: s} or a list of unit "
           "indices, and/or directions: {random: k, seed: s}"),
    ("{direction: {random: 2}}", "key 'controls.direction': unknown key (did you mean 'directions'?); "
                                 "expected one of units, directions"),
])
def test_a_bad_controls_key_is_one_line_at_its_file_and_line(tmp_path, probe_heads, controls, message):
    from neuronpatch.errors import ProbeSpecError
    from neuronpatch.probes.load import load_probe_file

    probe_heads.copy_heads(tmp_path / "heads")
    path = tmp_path / "b.probe.yaml"
    path.write_text(f"head: heads/causal\ninterventions: {{set: [0, 1]}}\ncontrols: {controls}\n")
    with pytest.raises(ProbeSpecError) as e:
        load_probe_file(path, display="b.probe.yaml")
    assert str(e.value) == f"b.probe.yaml:3: {message}"
