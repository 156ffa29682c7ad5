"""Undefined or trivial statistics say why, everywhere, and a claim on them fails with that reason.

Each case is built so the answer is known without the code: two points always
lie on a line (R² = 1 by construction), a correlation needs three inputs, a
prediction change of 1e-8 on predictions of size 1 is float noise, a head that
reads before its unit has no write direction to compare with.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from neuronpatch.interventions import Intervention
from neuronpatch.probes import check
from tests.results.test_plots import SCALES, make_result

SETS = [Intervention("set", v) for v in (0.0, 1.0, 2.0, 3.0)]


def _failed_with(res, metric, rng, needle):
    [outcome] = check(res, {metric: rng})
    assert not outcome.passed
    assert any(needle in d for d in outcome.details), outcome.details
    return outcome


def test_an_effect_below_float_noise_is_no_effect():
    rng = np.random.default_rng(0)
    act = np.linspace(1.0, 2.0, 5)
    dact = np.tile([-1.0, 0.0, 1.0, 2.0], (5, 1))
    res = make_result(act, dact, rng.normal(0, 1e-8, dact.shape), SETS, pred=np.full(5, 1.5))
    assert res.slope == 0.0 and res.intercept == 0.0  # not a "weak relation" of 1e-8
    assert math.isnan(res.r_squared)
    assert res.reasons["r_squared"].startswith("no effect")
    assert res.slope_ci95.as_list() == [0.0, 0.0]
    _failed_with(res, "r_squared", {"min": 0.5}, "no effect")
    assert any("no effect" in line for line in res.interpretation())
    assert res.summary()["reasons"]["r_squared"].startswith("no effect")
    # per input too
    assert all(r.slope == 0.0 and math.isnan(r.r2) for r in res.per_input)


def test_a_small_real_effect_is_still_an_effect():
    act = np.linspace(1.0, 2.0, 5)
    dact = np.tile([-1.0, 0.0, 1.0, 2.0], (5, 1))
    res = make_result(act, dact, 1e-4 * dact, SETS, pred=np.full(5, 1.5))
    assert res.slope == pytest.approx(1e-4) and res.r_squared == pytest.approx(1.0)


def test_per_input_fits_on_two_points_have_no_r_squared():
    act = np.linspace(1.0, 2.0, 4)
    ivs = [Intervention("set", 0.0), Intervention("set", 3.0)]
    dact = np.stack([0.0 - act, 3.0 - act], axis=1)
    res = make_result(act, dact, 0.9 * dact, ivs)
    assert all(math.isnan(r) for r in res.metrics()["per_input_r2"])
    assert "by construction" in res.reasons["per_input_r2"]
    outcome = _failed_with(res, "per_input_r2", {"min": 0.9}, "by construction")
    assert outcome.measured_text == "4 of 4 inputs out of range"
    # the pooled fit has 4 distinct activation changes per intervention: R² is defined
    assert res.r_squared == pytest.approx(1.0)


def test_a_correlation_over_two_inputs_says_why():
    res = make_result(np.array([1.0, 2.0]), np.ones((2, 8)) * np.arange(8), np.ones((2, 8)), SCALES)
    assert math.isnan(res.baseline_correlation)
    _failed_with(res, "baseline_correlation", {"min": 0.5}, "need at least 3 inputs, got 2")


def test_no_variance_in_the_activation_change_says_why():
    res = make_result(np.ones(4), np.zeros((4, 8)), np.zeros((4, 8)), SCALES)
    _failed_with(res, "slope", [0.8, 1.2], "activation change has no variance")


def test_weight_cosine_only_where_the_head_reads_after_the_unit():
    act = np.linspace(1.0, 2.0, 4)
    dact = np.tile([-1.0, 0.0, 1.0, 2.0], (4, 1))
    after = dataclasses.replace(make_result(act, dact, 0.9 * dact, SETS), write_direction_cosine=0.8)
    assert after.metrics()["weight_cosine"] == 0.8 and "weight_cosine" not in after.reasons
    upstream = dataclasses.replace(make_result(act, dact, np.zeros_like(dact), SETS),
                                   method="upstream", write_direction_cosine=0.8)
    assert math.isnan(upstream.metrics()["weight_cosine"])
    _failed_with(upstream, "weight_cosine", {"min": 0.5}, "reads at or before the unit")
    assert upstream.interpretation()[0].startswith("no causal path: slope exactly 0")
