"""summary.json has fixed types and a verdict; the JSON Schema shipped in the package says so."""

from __future__ import annotations

import json

import jsonschema
import pytest

from neuronpatch.artifacts import summary_schema, write_artifacts
from tests.results.test_plots import linear_case


@pytest.fixture(scope="module")
def validator():
    return jsonschema.Draft202012Validator(summary_schema())


def test_the_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(summary_schema())


def test_a_summary_validates_and_its_types_are_fixed(tmp_path, validator):
    res = linear_case()
    summary = json.loads(write_artifacts(res, tmp_path, figures=False).summary.read_text())
    validator.validate(summary)
    assert isinstance(summary["scaling_factors"], list)
    assert all(isinstance(f, float) for f in summary["scaling_factors"])
    assert [r["index"] for r in summary["inputs"]] == list(range(len(res.inputs)))
    assert [r["text"] for r in summary["per_input_sensitivity"]] == list(res.inputs)
    assert summary["verdict"]["outcome"] is None and summary["verdict"]["reading"]


@pytest.mark.parametrize("broken", [
    {"scaling_factors": "scale=0.5"},             # a string where a list belongs
    {"per_input_sensitivity": {"a text": {}}},    # keyed by text, as before
    {"verdict": {"outcome": "fine"}},             # not one of pytest's outcomes
])
def test_the_schema_rejects_the_old_shapes(tmp_path, validator, broken):
    summary = json.loads(write_artifacts(linear_case(), tmp_path, figures=False).summary.read_text())
    summary.update(broken)
    assert list(validator.iter_errors(summary))


def test_controls_are_in_the_summary_with_their_fits_and_validate(tmp_path, validator):
    from tests.results.test_plots import controls_case

    res = controls_case()
    summary = json.loads(write_artifacts(res, tmp_path, figures=False).summary.read_text())
    validator.validate(summary)
    ctl = summary["controls"]
    assert [c["label"] for c in ctl["controls"]] == ["unit3", "unit11", "dir0", "dir1"]
    assert [c["kind"] for c in ctl["controls"]] == ["unit", "unit", "direction", "direction"]
    assert [c["unit"] for c in ctl["controls"]] == [3, 11, None, None]
    assert ctl["directions"] == {"random": 2, "seed": 0} and ctl["units"] == [3, 11]
    for c, fit in zip(ctl["controls"], res.controls.controls, strict=True):
        assert (c["slope"], c["r_squared"], c["slope_ci95"]) == (fit.slope, fit.r_squared, fit.slope_ci95)
        assert c["slope_ci95"][0] <= c["slope"] <= c["slope_ci95"][1]
    assert ctl["specificity"] == pytest.approx(abs(res.slope) / 0.3, rel=0.05)
    plain = json.loads(write_artifacts(linear_case(), tmp_path / "plain", figures=False).summary.read_text())
    assert plain["controls"] is None
    validator.validate(plain)


@pytest.mark.parametrize("broken", [
    {"kind": "neuron"},            # not unit or direction
    {"slope_ci95": [0.1]},         # an interval is a pair
    {"label": None},
])
def test_the_schema_rejects_malformed_controls(tmp_path, validator, broken):
    from tests.results.test_plots import controls_case

    summary = json.loads(write_artifacts(controls_case(), tmp_path, figures=False).summary.read_text())
    summary["controls"]["controls"][0].update(broken)
    assert list(validator.iter_errors(summary))
