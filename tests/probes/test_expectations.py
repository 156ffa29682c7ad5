"""Ranges, checks and failure wording shared by probe files and plain-Python tests."""

from __future__ import annotations

import math
import re
import sys
from types import SimpleNamespace

import pytest

from neuronpatch.errors import NeuronpatchError, ProbeSpecError
from neuronpatch.probes import (
    METRICS,
    ExpectationError,
    Measurements,
    Range,
    assert_in_range,
    check,
    expect,
)

pytest_plugins = ["pytester"]

NAN = float("nan")


# ----- range forms ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "inside", "outside", "text"),
    [
        ([0.8, 1.2], [0.8, 1.0, 1.2], [0.79, 1.21], "[0.8, 1.2]"),
        ((0, 1), [0, 0.5, 1], [-0.1, 1.1], "[0, 1]"),
        ({"min": 0.9}, [0.9, 5, math.inf], [0.89, -1], "≥ 0.9"),
        ({"max": 0.05}, [0.05, -3], [0.051], "≤ 0.05"),
        ({"min": -1, "max": 1}, [-1, 1], [-1.01, 1.01], "[-1, 1]"),
        ({"approx": 1, "abs": 0.05}, [0.95, 1.05], [0.94, 1.06], "1 ± 0.05"),
        ({"approx": 2, "rel": 0.1}, [1.8, 2.2], [1.79, 2.21], "2 ± 10%"),
        # with both tolerances the larger one applies, as in pytest.approx
        ({"approx": 10, "abs": 0.5, "rel": 0.2}, [8, 12], [7.9, 12.1], "10 ± 0.5 or 10 ± 20%"),
        ({"abs_max": 1e-6}, [0, -1e-6, 1e-6], [2e-6, -2e-6], "|x| ≤ 1e-06"),
        ({"abs_min": 0.1}, [0.1, -0.1, 7], [0, 0.05, -0.09], "|x| ≥ 0.1"),
        ({"abs_min": 0.1, "abs_max": 1}, [0.5, -0.5], [0, 2, -2], "0.1 ≤ |x| ≤ 1"),
    ],
)
def test_range_forms_are_closed_intervals(spec, inside, outside, text):
    rng = Range.parse(spec)
    assert rng.text == text
    assert all(rng.contains(x) for x in inside)
    assert not any(rng.contains(x) for x in outside)
    assert not rng.contains(NAN)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([2, 1], "range [2, 1] is inverted (lo > hi); expected lo < hi"),
        ([1, 1], "range [1, 1] is empty (zero width); expected lo < hi"),
        ({"min": 3, "max": 1}, "range [3, 1] is inverted"),
        ([1], "a range list needs exactly 2 numbers, got 1; expected [lo, hi]"),
        ([], "needs exactly 2 numbers, got 0"),
        ({}, "the range is empty ({}); expected [lo, hi], {min: x}"),
        ({"minimum": 1}, "unknown range key 'minimum' (did you mean 'min'?); expected [lo, hi]"),
        ({"min": 0, "abs_max": 1}, "range keys abs_max, min cannot be combined; expected"),
        ({"approx": 1}, "{approx: 1} has no tolerance; expected {approx: 1, abs: t}"),
        ({"approx": 1, "abs": -0.1}, "tolerance 'abs' is -0.1; expected a finite number ≥ 0"),
        ({"approx": 0, "rel": 0.1}, "the tolerance around 0 is 0 (an empty range)"),
        ({"abs_max": 0}, "{abs_max: 0} is an empty range"),
        ({"abs_min": 2, "abs_max": 1}, "abs_min 2 is not below abs_max 1"),
        ([True, 2], "the lower bound is True (bool); expected a number"),
        (["0.5", 2], "the lower bound is '0.5' (str); expected a number"),
        ([NAN, 1], "the lower bound is NaN; expected a number"),
        (1.0, "a bare number (1.0) is not a range; expected a range such as {approx: 1.0, abs"),
        ("0.5..1", "'0.5..1' (str) is not a range; expected [lo, hi]"),
    ],
)
def test_malformed_ranges_say_what_is_wrong_and_what_is_allowed(spec, message):
    with pytest.raises(ProbeSpecError) as info:
        Range.parse(spec)
    assert message in str(info.value)
    assert "; expected" in str(info.value)


def test_intervals_must_lie_inside_the_range():
    rng = Range.parse([0.7, 1.3])
    assert rng.contains_interval(0.8, 1.2)
    assert not rng.contains_interval(0.6, 1.2)
    assert not rng.contains_interval(NAN, 1.0)
    # |x| ≥ 0.5 fails for an interval that straddles 0 even though both ends pass.
    assert not Range.parse({"abs_min": 0.5}).contains_interval(-1, 1)
    assert Range.parse({"abs_min": 0.5}).contains_interval(0.6, 2)


# ----- check ------------------------------------------------------------------------


def test_check_reports_measured_expected_and_verdict():
    outcomes = check(
        {"slope": 0.95, "r_squared": 0.5, "intercept": -0.01},
        {"slope": [0.8, 1.2], "r_squared": {"min": 0.9}, "intercept": {"abs_max": 0.05}},
    )
    assert [(o.metric, o.passed) for o in outcomes] == [
        ("slope", True), ("r_squared", False), ("intercept", True)
    ]
    assert outcomes[1].measured == 0.5
    assert outcomes[1].measured_text == "0.5"
    assert outcomes[1].expected == "≥ 0.9"


def test_nan_always_fails_with_the_reason():
    measured = Measurements(
        values={"slope": NAN, "weight_cosine": NAN},
        reasons={"slope": "activation change has no variance"},
    )
    slope, cosine = check(measured, {"slope": {"abs_max": 1e9}, "weight_cosine": {"min": -1}})
    assert not slope.passed and not cosine.passed
    assert slope.details == ("NaN (undefined: activation change has no variance)",)
    assert "linear head" in cosine.details[0]


def test_per_input_metrics_must_hold_for_every_input_and_name_the_failures():
    measured = Measurements(
        values={"per_input_slope": [1.0, 0.2, NAN, 0.9]},
        labels=("The cat sat on the mat.", "A second input that is rather long indeed",
                "third", "fourth"),
        input_reasons=(None, None, "no activation change", None),
    )
    [out] = check(measured, {"per_input_slope": {"min": 0.5}})
    assert not out.passed
    assert out.measured_text == "2 of 4 inputs out of range"
    assert out.details == (
        "inputs[1] 'A second input that is rather l…' = 0.2",
        "inputs[2] 'third' = NaN (undefined: no activation change)",
    )
    [ok] = check({"per_input_slope": [0.6, 0.9]}, {"per_input_slope": {"min": 0.5}})
    assert ok.passed and ok.measured_text == "all 2 inputs in range (min 0.6, max 0.9)"


def test_interval_metric_passes_only_inside():
    outs = check({"slope_ci95": [0.75, 1.4]}, {"slope_ci95": [0.7, 1.3]})
    assert not outs[0].passed
    assert outs[0].measured_text == "[0.75, 1.4]"
    assert "whole interval" in outs[0].details[0]
    assert check({"slope_ci95": [0.75, 1.2]}, {"slope_ci95": [0.7, 1.3]})[0].passed


def test_a_metric_the_experiment_did_not_report_fails():
    [out] = check({}, {"slope": [0, 1]})
    assert not out.passed and out.measured_text == "not measured"


def test_unknown_metric_suggests_the_right_name():
    suggestion = r"unknown metric 'r2' \(did you mean 'r_squared'\?\); expected one of slope"
    with pytest.raises(ProbeSpecError, match=suggestion):
        check({"slope": 1.0}, {"r2": [0, 1]})
    with pytest.raises(ProbeSpecError, match="did you mean 'slope'"):
        check({"slope": 1.0}, {"slop": [0, 1]})


def test_check_reads_a_result_object():
    result = SimpleNamespace(
        metrics=lambda: {"slope": NAN, "per_input_slope": [NAN]},
        reasons={"slope": "the unit never moved"},
        inputs=("only input",),
        per_input=(SimpleNamespace(fit=SimpleNamespace(reason="constant")),),
    )
    slope, per_input = check(result, {"slope": [0, 1], "per_input_slope": [0, 1]})
    assert slope.details == ("NaN (undefined: the unit never moved)",)
    assert per_input.details == ("inputs[0] 'only input' = NaN (undefined: constant)",)


def test_every_metric_of_the_engine_is_known():
    # The keys of ExperimentResult.metrics(), as documented in DESIGN.md and the issue.
    engine_keys = {
        "slope", "intercept", "r_squared", "slope_stderr", "slope_p_value",
        "baseline_correlation", "baseline_p_value", "baseline_spearman", "per_input_slope",
        "per_input_r2", "slope_ci95", "r_squared_ci95", "weight_cosine",
        "mean_abs_prediction_change", "mean_abs_activation_change",
        "control_slope", "specificity", "specificity_ci95",  # with controls (issue 17)
        "rank",  # when a probe asks for it (issue 17)
        "active_fraction",  # for a dictionary latent (issue 22)
    }
    assert set(METRICS) == engine_keys
    assert {m.name for m in METRICS.values() if m.kind == "per_input"} == {
        "per_input_slope", "per_input_r2", "control_slope"}
    assert {m.name for m in METRICS.values() if m.kind == "interval"} == {
        "slope_ci95", "r_squared_ci95", "specificity_ci95"}


# ----- plain-Python helpers ---------------------------------------------------------------


def test_expect_passes_quietly_and_returns_outcomes():
    outcomes = expect({"slope": 1.0, "r_squared": 0.99}, slope=[0.8, 1.2], r_squared={"min": 0.9})
    assert all(o.passed for o in outcomes)


def test_expect_failure_lists_every_expectation_with_the_calling_line():
    with pytest.raises(ExpectationError) as info:
        expect({"slope": 0.3, "r_squared": 0.99}, slope=[0.8, 1.2], r_squared={"min": 0.9})
    line = sys._getframe().f_lineno - 1
    text = str(info.value)
    lines = text.splitlines()
    assert lines[0] == "1 of 2 expectations not met"
    assert lines[1].split() == ["FAIL", "slope", "=", "0.3", "expected", "[0.8,", "1.2]", "at",
                                f"{__file__}:{line}"]
    assert lines[2].split()[:4] == ["pass", "r_squared", "=", "0.99"]
    # An AssertionError and a NeuronpatchError: both `except` styles catch it.
    assert isinstance(info.value, AssertionError)
    assert isinstance(info.value, NeuronpatchError)


def test_expect_needs_at_least_one_claim():
    with pytest.raises(ProbeSpecError, match="no expectations"):
        expect({"slope": 1.0})


def test_assert_in_range_uses_the_same_wording():
    assert assert_in_range(0.93, {"approx": 1, "abs": 0.1}, name="slope").passed
    with pytest.raises(ExpectationError) as info:
        assert_in_range(2.0, [0, 1], name="my number")
    assert info.value.args[0].splitlines()[1].split()[:6] == [
        "FAIL", "my", "number", "=", "2", "expected"]
    with pytest.raises(ExpectationError, match=r"values\[1\] = 5"):
        assert_in_range([0.5, 5], [0, 1], name="slopes")
    with pytest.raises(ExpectationError, match="NaN"):
        assert_in_range(NAN, {"min": 0})


def test_failures_point_at_the_users_test_not_the_helper(pytester: pytest.Pytester):
    pytester.makepyfile(
        """
        from neuronpatch.probes import expect

        def test_claim():
            expect({"slope": 0.1}, slope=[0.8, 1.2])
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    assert 'expect({"slope": 0.1}, slope=[0.8, 1.2])' in text
    assert "def expect(" not in text  # __tracebackhide__: no frames of ours
    assert "FAIL  slope  = 0.1  expected [0.8, 1.2]  at " in text


def _doubtful(value: float, lo: float, hi: float, n: int = 4):
    from neuronpatch.probes.expectations import Measurements, check

    m = Measurements(values={"slope": value}, labels=[f"input {i}" for i in range(n)],
                     interval=lambda metric, level: (lo, hi))
    (out,) = check(m, {"slope": {"max": 0.88, "confidence": 0.95}})
    assert out.inconclusive and not out.passed
    return out


def test_an_inconclusive_claim_says_how_many_inputs_would_decide_it():
    out = _doubtful(0.8686, 0.8541, 0.8846)
    assert out.inputs_needed == 8
    assert "about 8 inputs would decide it at this spread (now 4)" in out.details[0]


def test_an_estimate_on_the_bound_gets_advice_not_an_absurd_count():
    # 1e-7 from the bound: the 1/sqrt(n) estimate would be billions of inputs.
    out = _doubtful(0.8800001, 0.85, 0.91)
    assert out.inputs_needed is None
    assert "more inputs would hardly decide it: the estimate sits 1e-07 from the range's edge" in \
        out.details[0]
    assert not re.search(r"\d{7,}", out.details[0])
