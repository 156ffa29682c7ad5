"""Every place neuronpatch states an outcome agrees with pytest's own, serial and under xdist.

One suite holds a test of each outcome pytest knows (passed, failed, error,
skipped, xfailed, xpassed, and a strict xpass, which pytest fails), once as
probes and once as hand-written tests using ``neuronpatch_expect``. pytest's
own counts are the oracle; the ``neuronpatch:`` line, the HTML report,
summary.json and JUnit XML must say the same.
"""

from __future__ import annotations

import json
import re
import textwrap
import xml.etree.ElementTree as ET

import pytest

pytest_plugins = ["pytester"]

INI = """
[tool.pytest.ini_options]
neuronpatch_figures = "none"
"""

# Slope of heads/blind is exactly 0; its probes pass with {abs_max: 1e-9} and fail with {min: 1}.
PROBES = """
name: passes
head: heads/blind
interventions: {set: [0, 1, 2]}
expect: {slope: {abs_max: 1.0e-9}}
---
name: fails
head: heads/blind
interventions: {set: [0, 1, 2]}
expect: {slope: {min: 1}}
---
name: errors
head: heads/bad
interventions: {set: [0, 1, 2]}
---
name: skipped
head: heads/blind
marks: [{skip: not today}]
---
name: xfails
head: heads/blind
interventions: {set: [0, 1, 2]}
expect: {slope: {min: 1}}
marks: [{xfail: known}]
---
name: xpasses
head: heads/blind
interventions: {set: [0, 1, 2]}
expect: {slope: {abs_max: 1.0e-9}}
marks: [{xfail: fixed already}]
---
name: strict xpass
head: heads/blind
interventions: {set: [0, 1, 2]}
expect: {slope: {abs_max: 1.0e-9}}
marks: [{xfail: {reason: must fail, strict: true}}]
"""

TESTS = """
import pytest

BLIND = "heads/blind"


def run(runner):
    return runner.run(BLIND, inputs=["a b c", "d e f", "g h i"], set=[0, 1, 2])


def test_passes(neuronpatch_runner, neuronpatch_expect):
    neuronpatch_expect(run(neuronpatch_runner), slope={"abs_max": 1e-9})


def test_fails(neuronpatch_runner, neuronpatch_expect):
    neuronpatch_expect(run(neuronpatch_runner), slope={"min": 1})


@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")


def test_errors(broken, neuronpatch_expect):
    pass


@pytest.mark.skip(reason="not today")
def test_skipped(neuronpatch_expect):
    pass


@pytest.mark.xfail(reason="known")
def test_xfails(neuronpatch_runner, neuronpatch_expect):
    neuronpatch_expect(run(neuronpatch_runner), slope={"min": 1})


@pytest.mark.xfail(reason="fixed?")
def test_xpasses(neuronpatch_runner, neuronpatch_expect):
    neuronpatch_expect(run(neuronpatch_runner), slope={"abs_max": 1e-9})


@pytest.mark.xfail(reason="must fail", strict=True)
def test_strict_xpass(neuronpatch_runner, neuronpatch_expect):
    neuronpatch_expect(run(neuronpatch_runner), slope={"abs_max": 1e-9})
"""

EXPECTED = {"passed": 1, "failed": 2, "errors": 1, "skipped": 1, "xfailed": 1, "xpassed": 1}
# Per test name, the outcome pytest gives it (the names are shared by both suites).
BY_NAME = {"passes": "passed", "fails": "failed", "errors": "error", "skipped": "skipped",
           "xfails": "xfailed", "xpasses": "xpassed", "strict xpass": "failed",
           "strict_xpass": "failed"}


@pytest.fixture
def suite(pytester: pytest.Pytester, probe_heads):
    probe_heads.copy_heads(pytester.path / "heads")
    (pytester.path / "heads" / "bad").mkdir()
    (pytester.path / "heads" / "bad" / "config.json").write_text("{}")  # the engine refuses it
    pytester.makefile(".toml", pyproject=INI)
    (pytester.path / "outcomes.probe.yaml").write_text(textwrap.dedent(PROBES).lstrip())
    (pytester.path / "test_outcomes.py").write_text(TESTS)
    return pytester


def _name(nodeid: str) -> str:
    return nodeid.split("::")[-1].removeprefix("test_")


def check_agreement(result: pytest.RunResult, path, what: str) -> None:
    """pytest's counts are the oracle for the summary line, HTML, summary.json and JUnit."""
    counts = {k: 2 * v for k, v in EXPECTED.items()}  # probes and hand-written tests
    result.assert_outcomes(**counts)
    result.stdout.fnmatch_lines([
        "neuronpatch: 14 tests (7 probes): 4 failed, 2 passed, 2 skipped, 2 xfailed, "
        "2 xpassed, 2 errors"])
    # HTML: one overview row per test, each with pytest's outcome.
    page = (path / "report.html").read_text()
    rows = re.findall(r'<tr[^>]*><td><a href="#t\d+">([^<]+)</a></td><td><span class="badge"[^>]*>'
                      r"(\w+)</span>", page)
    assert len(rows) == 14, (what, rows)
    for name, outcome in rows:
        assert outcome == BY_NAME[name.removeprefix("test_")], (what, name, outcome)
    # summary.json of every test that ran its experiment carries pytest's outcome.
    stamped = {}
    for summary in (path / ".neuronpatch" / "artifacts").glob("*/summary.json"):
        data = json.loads(summary.read_text())
        stamped[data["probe"]["node_id"]] = data["verdict"]["outcome"]
    assert len(stamped) == 10, (what, stamped)  # all but the error and the skip, twice
    for nodeid, outcome in stamped.items():
        assert outcome == BY_NAME[_name(nodeid)], (what, nodeid, outcome)
    # JUnit: pytest's own outcome per case, our metrics only (no status, no record).
    tree = ET.parse(path / "junit.xml")
    for case in tree.iter("testcase"):
        props = {p.get("name") for p in case.iter("property")}
        assert not props & {"neuronpatch.status", "neuronpatch.record", "neuronpatch.passed"}
        assert all(p.startswith("neuronpatch.") for p in props)
    assert (path / "junit.xml").stat().st_size < 20_000


ARGS = ("-p", "no:cacheprovider", "--neuronpatch-report=report.html", "--junitxml=junit.xml")


def test_every_outcome_agrees_with_pytest_serial(suite):
    result = suite.runpytest(*ARGS)
    check_agreement(result, suite.path, "serial")


def test_every_outcome_agrees_with_pytest_under_xdist(suite):
    result = suite.runpytest_subprocess(*ARGS, "-n", "2")
    check_agreement(result, suite.path, "-n 2")


def test_crash_lines_point_at_the_claim_and_fit_tb_line_and_vv(suite):
    probe_path = suite.path / "outcomes.probe.yaml"
    lines = probe_path.read_text().splitlines()
    fails_line = next(i for i, t in enumerate(lines, 1) if "slope: {min: 1}" in t)
    result = suite.runpytest("-p", "no:cacheprovider", "--tb=line", "-k", "fails and not xfails")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines_random([
        f"outcomes.probe.yaml:{fails_line}: probe 'fails': slope 0, expected ≥ 1",
        "test_outcomes.py:16: test 'test_fails': slope 0, expected ≥ 1",
    ])
    assert "FAIL  slope" not in result.stdout.str()  # no report body under --tb=line
    # -vv keeps each short-summary line to one line (pytest prints the full crash message there).
    verbose = suite.runpytest("-p", "no:cacheprovider", "-vv", "-rfEs")
    summary = verbose.stdout.str().split("short test summary info")[1].splitlines()[1:-1]
    assert len(summary) == 8, summary  # 4 failed, 2 errors, 2 skipped: one line each
    for line in summary:
        assert line.startswith(("FAILED", "ERROR", "SKIPPED")), line
    assert "SKIPPED [1] outcomes.probe.yaml: not today" in summary, summary


def test_skips_and_errors_point_at_the_probe_file(suite):
    result = suite.runpytest("-p", "no:cacheprovider", "-rsE", "outcomes.probe.yaml")
    out = result.stdout.str()
    assert "collect.py" not in out and "report.py" not in out
    result.stdout.fnmatch_lines_random([
        # pytest folds skips by mark per file, without a line (as for Python tests)
        "SKIPPED [[]1[]] outcomes.probe.yaml: not today",
        "ERROR outcomes.probe.yaml::errors - probe 'errors' could not run*",
    ])
