"""Baseline files: round trip, atomic writes, drift tables and their causes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from neuronpatch import baselines
from neuronpatch.errors import BaselineError

METRICS = {"slope": 0.92123456789, "intercept": -0.001, "r_squared": 1.0,
           "slope_ci95": [0.9, 0.95], "per_input_slope": [0.9, 0.93, float("nan")],
           "weight_cosine": float("nan"), "not_recorded": 3.0}


@pytest.fixture
def head(tmp_path):
    d = tmp_path / "head"
    d.mkdir()
    (d / "config.json").write_text('{"a": 1}')
    (d / "head.pt").write_bytes(b"weights")
    return d


def test_round_trip_is_sorted_and_diff_friendly(tmp_path, head):
    b = baselines.make_baseline("probe one", METRICS, head_dir=head)
    path = baselines.write_baseline(tmp_path / "b" / "probe.json", b)
    text = path.read_text()
    data = json.loads(text)
    assert list(data) == sorted(data) and list(data["metrics"]) == sorted(data["metrics"])
    assert data["metrics"]["slope"] == 0.92123457  # rounded: quiet diffs
    assert data["metrics"]["weight_cosine"] is None and "not_recorded" not in data["metrics"]
    assert set(data["versions"]) >= {"neuronpatch", "torch", "transformer_lens"}
    assert data["head_hash"] == baselines.head_hash(head)
    assert baselines.read_baseline(path) == b


def test_crash_mid_write_keeps_the_old_baseline(tmp_path, head, monkeypatch):
    path = tmp_path / "probe.json"
    old = baselines.make_baseline("p", METRICS, head_dir=head)
    baselines.write_baseline(path, old)
    new = baselines.make_baseline("p", {**METRICS, "slope": 5.0}, head_dir=head)

    def crash(fd):
        raise OSError("disk died")

    import neuronpatch._io

    monkeypatch.setattr(neuronpatch._io.os, "fsync", crash)
    with pytest.raises(OSError, match="disk died"):
        baselines.write_baseline(path, new)
    assert baselines.read_baseline(path) == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head", "probe.json"]  # no temp file


def test_missing_and_malformed_baselines(tmp_path):
    assert baselines.read_baseline(tmp_path / "none.json") is None
    bad = tmp_path / "bad.json"
    bad.write_text('{"metrics": {}}')
    with pytest.raises(BaselineError, match="--neuronpatch-update-baselines"):
        baselines.read_baseline(bad)


def test_compare_flags_drift_beyond_tolerance(head):
    b = baselines.make_baseline("p", METRICS, head_dir=head)
    same = baselines.compare(METRICS, b)
    assert all(d.ok for d in same)
    moved = baselines.compare({**METRICS, "slope": 0.95, "per_input_slope": [0.9, 0.93]}, b,
                              {"slope": 0.01})
    by = {d.metric: d for d in moved}
    assert not by["slope"].ok and by["slope"].difference == pytest.approx(0.0287654, abs=1e-6)
    assert by["slope"].tolerance == 0.01
    assert not by["per_input_slope"].ok and math.isinf(by["per_input_slope"].difference)
    assert by["intercept"].ok


def test_explain_says_the_head_changed(head, tmp_path):
    b = baselines.make_baseline("p", METRICS, head_dir=head)
    (head / "head.pt").write_bytes(b"other weights")
    drifts = baselines.compare({**METRICS, "slope": 0.5}, b)
    text = baselines.explain(drifts, b, head_dir=head, baseline_path=tmp_path / "p.json")
    assert "1 metric(s) drifted" in text
    assert "slope" in text and "0.9212" in text and "DRIFT" in text
    assert "the head changed" in text
    assert "--neuronpatch-update-baselines" in text


def test_explain_says_the_library_changed(head, tmp_path):
    b = baselines.make_baseline("p", METRICS, head_dir=head)
    old = baselines.Baseline(b.probe, b.metrics, b.head_hash, {**b.versions, "torch": "1.0"})
    text = baselines.explain(baselines.compare({**METRICS, "slope": 0.5}, old), old,
                             head_dir=head, baseline_path="p.json")
    assert "the library changed (torch 1.0 →" in text and "head changed" not in text


def test_suggested_tolerances_follow_the_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 6))
    quiet = baselines.suggest_tolerances(x, 0.9 * x + rng.normal(0, 0.01, x.shape), x[:, 0], x[:, 0])
    noisy = baselines.suggest_tolerances(x, 0.9 * x + rng.normal(0, 0.5, x.shape), x[:, 0], x[:, 0])
    assert quiet["slope"] < noisy["slope"]
    assert all(v > 0 for v in quiet.values())
    assert baselines._round_up(0.0123) == 0.02
