"""Hostile catalogue, baselines: a broken baseline is one line naming the file and the fix.

Each case breaks a baseline (or the place it lives) and reads or writes it in
a child process bounded in time and memory (``tests/hostile/__init__.py``).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from neuronpatch import baselines
from neuronpatch.errors import BaselineError
from tests.hostile import assert_refused, run_bounded

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="bounds are measured with /proc and RLIMIT_AS")

READ = "neuronpatch.baselines:read_baseline"
WRITE = "tests.hostile.test_hostile_baselines:write_one"
FIX = "delete it and regenerate it with --neuronpatch-update-baselines"
GOOD = {"format": 1, "probe": "p", "head_hash": "sha256:0", "versions": {"torch": "2.13.0"},
        "metrics": {"slope": 0.9, "per_input_slope": [0.8, None]}}


def write_one(path: str) -> str:
    """Write a small baseline at ``path`` (called in the child process)."""
    b = baselines.Baseline("p", {"slope": 1.0}, "sha256:0", {})
    return str(baselines.write_baseline(path, b))


@dataclass(frozen=True)
class Case:
    call: str
    path: Path
    message: str


def _baseline(tmp: Path, content: str | bytes | dict[str, Any]) -> Path:
    path = tmp / "baselines" / "p00.json"
    path.parent.mkdir(exist_ok=True)
    if isinstance(content, dict):
        content = json.dumps(content)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)
    return path


def corrupted_truncated(tmp: Path) -> Case:
    text = json.dumps(GOOD, indent=2)
    p = _baseline(tmp, text[: len(text) // 2])
    return Case(READ, p, f"{p}: invalid JSON at line 6 column 22: Expecting ',' delimiter; {FIX}")


def corrupted_binary(tmp: Path) -> Case:
    p = _baseline(tmp, b"\x89PNG\r\n\x1a\n\x00\x00")
    return Case(READ, p, f"{p}:1: baseline is not UTF-8 text (byte 0x89 at column 1); expected UTF-8; {FIX}")


def corrupted_nul_padding(tmp: Path) -> Case:
    # What a file system can leave after a power cut: the right size, zeros inside.
    p = _baseline(tmp, b"\x00" * 64)
    return Case(READ, p, f"{p}:1: baseline holds the control character U+0000 (NUL) at column 1; expected "
                f"text (tab, newline and carriage return are the only control characters allowed); {FIX}")


def empty_file(tmp: Path) -> Case:
    p = _baseline(tmp, b"")
    return Case(READ, p, f"{p}: invalid JSON at line 1 column 1: Expecting value; {FIX}")


def future_format(tmp: Path) -> Case:
    p = _baseline(tmp, {**GOOD, "format": 2})
    return Case(READ, p, f"{p}: baseline format 2 was written by a newer neuronpatch; this version reads "
                "format 1: upgrade neuronpatch, or regenerate it with --neuronpatch-update-baselines")


def unknown_format(tmp: Path) -> Case:
    p = _baseline(tmp, {**GOOD, "format": "v1"})
    return Case(READ, p, f"{p}: not a neuronpatch baseline of format 1 (has format 'v1'); {FIX}")


def no_format(tmp: Path) -> Case:
    p = _baseline(tmp, {"metrics": {}})
    return Case(READ, p, f"{p}: not a neuronpatch baseline of format 1 (has no 'format' key); {FIX}")


def not_an_object(tmp: Path) -> Case:
    p = _baseline(tmp, "[1, 2, 3]")
    return Case(READ, p, f"{p}: not a neuronpatch baseline (a JSON list, expected an object with 'format' "
                f"and 'metrics'); {FIX}")


def metrics_not_an_object(tmp: Path) -> Case:
    p = _baseline(tmp, {**GOOD, "metrics": [0.9]})
    return Case(READ, p, f"{p}: key 'metrics' = [0.9] is invalid; expected an object of metric values; {FIX}")


def nan_metric(tmp: Path) -> Case:
    p = _baseline(tmp, json.dumps({**GOOD, "metrics": {"slope": math.nan}}))
    return Case(READ, p, f"{p}: metric 'slope' holds nan; a baseline holds finite numbers, or null where a "
                f"metric is undefined; {FIX}")


def infinite_per_input(tmp: Path) -> Case:
    p = _baseline(tmp, json.dumps({**GOOD, "metrics": {"per_input_slope": [0.5, -math.inf]}}))
    return Case(READ, p, f"{p}: metric 'per_input_slope' holds -inf; a baseline holds finite numbers, or "
                f"null where a metric is undefined; {FIX}")


def string_metric(tmp: Path) -> Case:
    p = _baseline(tmp, {**GOOD, "metrics": {"r_squared": "high"}})
    return Case(READ, p, f"{p}: metric 'r_squared' holds 'high'; a baseline holds finite numbers, or null "
                f"where a metric is undefined; {FIX}")


def versions_not_an_object(tmp: Path) -> Case:
    p = _baseline(tmp, {**GOOD, "versions": ["torch"]})
    return Case(READ, p, f"{p}: key 'versions' = ['torch'] is invalid; expected an object of package "
                f"versions; {FIX}")


def nested_100k(tmp: Path) -> Case:
    p = _baseline(tmp, '{"format": 1, "metrics": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return Case(READ, p, f"{p}:1: baseline nests deeper than 64 levels; expected at most 64 (set "
                f"NEURONPATCH_MAX_JSON_DEPTH to raise it); {FIX}")


def baselines_dir_is_a_file(tmp: Path) -> Case:
    (tmp / "baselines").write_text("I am not a directory\n")
    p = tmp / "baselines" / "p00.json"
    return Case(READ, p, f"{p}: cannot hold a baseline: {tmp / 'baselines'} is a file, not a directory; "
                "move that file away, or give the probe a baseline.file elsewhere")


def write_into_a_file(tmp: Path) -> Case:
    (tmp / "baselines").write_text("I am not a directory\n")
    p = tmp / "baselines" / "p00.json"
    return Case(WRITE, p, f"{p}: cannot hold a baseline: {tmp / 'baselines'} is a file, not a directory; "
                "move that file away, or give the probe a baseline.file elsewhere")


def write_over_a_directory(tmp: Path) -> Case:
    p = tmp / "baselines" / "p00.json"
    p.mkdir(parents=True)
    return Case(WRITE, p, f"cannot write the baseline: {p}: is a directory; expected a file path to write "
                "(move the directory away)")


def baseline_is_a_directory(tmp: Path) -> Case:
    p = tmp / "baselines" / "p00.json"
    p.mkdir(parents=True)
    return Case(READ, p, f"{p}: baseline is a directory, not a regular file; expected a regular file; {FIX}")


def baseline_is_a_symlink_loop(tmp: Path) -> Case:
    p = tmp / "baselines" / "p00.json"
    p.parent.mkdir()
    p.symlink_to(p)
    return Case(READ, p, f"{p}: baseline is a symlink loop; expected a regular file; {FIX}")


def baseline_is_dev_zero(tmp: Path) -> Case:
    p = tmp / "baselines" / "p00.json"
    p.parent.mkdir()
    p.symlink_to("/dev/zero")
    return Case(READ, p, f"{p}: baseline is a character device, not a regular file; expected a regular file "
                f"(write the stream to a file first); {FIX}")


CASES: list[Callable[[Path], Case]] = [
    corrupted_truncated, corrupted_binary, corrupted_nul_padding, empty_file, future_format, unknown_format,
    no_format, not_an_object, metrics_not_an_object, nan_metric, infinite_per_input, string_metric,
    versions_not_an_object, nested_100k, baselines_dir_is_a_file, write_into_a_file, write_over_a_directory,
    baseline_is_a_directory, baseline_is_a_symlink_loop, baseline_is_dev_zero,
]


@pytest.mark.parametrize("build", CASES, ids=[c.__name__ for c in CASES])
def test_broken_baseline_is_one_line(build: Callable[[Path], Case], tmp_path: Path) -> None:
    case = build(tmp_path)
    outcome = run_bounded(case.call, str(case.path), cwd=Path(__file__).resolve().parents[2])
    assert_refused(outcome, "BaselineError", case.message)


def test_a_missing_baseline_is_still_none(tmp_path: Path) -> None:
    assert baselines.read_baseline(tmp_path / "baselines" / "p00.json") is None


def test_an_undefined_metric_does_not_blame_the_inputs(tmp_path: Path) -> None:
    head = tmp_path / "head"
    head.mkdir()
    (head / "config.json").write_text("{}")
    was = baselines.make_baseline("p", {"slope": float("nan"), "r_squared": 1.0}, head_dir=head)
    path = baselines.write_baseline(tmp_path / "p.json", was)
    read = baselines.read_baseline(path)
    assert read is not None and read.metrics["slope"] is None  # written as null, read back as undefined
    drifts = baselines.compare({"slope": 0.9, "r_squared": 1.0}, read)
    text = baselines.explain(drifts, read, head_dir=head, baseline_path=path)
    assert "likely cause: slope is undefined (NaN) in the baseline only" in text
    assert "inputs or interventions changed" not in text


def test_baseline_errors_are_value_errors_for_callers_who_do_not_know_us(tmp_path: Path) -> None:
    p = _baseline(tmp_path, {**GOOD, "format": 99})
    with pytest.raises(ValueError, match="newer neuronpatch"):
        baselines.read_baseline(p)
    with pytest.raises(BaselineError):
        baselines.read_baseline(p)
