"""CI regression mode: baselines per probe, a run summary, and the HTML report.

``--neuronpatch-update-baselines`` writes each probe's measured metrics to its
baseline file. Later runs compare a probe with its baseline when the file
exists, when the probe has a ``baseline:`` key, or for every probe with
``--neuronpatch-baselines`` (ini ``neuronpatch_baselines = true``); a drift
fails with a table. A probe with no baseline file fails (or, with
``--neuronpatch-missing-baseline=skip``, is skipped) saying how to create one.

Workers (pytest-xdist, also ``--tx`` remote ones) send each probe's status and
report record through ``report.user_properties``, which xdist serializes; the
controller alone counts them, prints the summary line and writes the page.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from neuronpatch.pytest_plugin.collect import ProbeItem
    from neuronpatch.result import ExperimentResult

STATUS_PROP = "neuronpatch.status"
RECORD_PROP = "neuronpatch.record"
SUGGEST_PROP = "neuronpatch.suggested_tolerance"
MISSING_MODES = ("fail", "skip")


class RunState:
    """Statuses, records and suggestions of this session's probes (controller side).

    Registered as a plugin object per session, so it sees ``pytest_runtest_logreport``
    for local and xdist-worker reports alike, and leaves nothing behind.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.statuses: dict[str, str] = {}
        self.records: dict[str, dict[str, Any]] = {}
        self.suggestions: dict[str, dict[str, float]] = {}
        self.report_path: Path | None = None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        collect_report(self, report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.report_path = write_html(self)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        line = summary_line(self)
        if not line:
            return
        terminalreporter.write_sep("-", "neuronpatch")
        terminalreporter.line(line)
        for nodeid, tol in self.suggestions.items():
            terminalreporter.line(f"  suggested baseline.tolerance for {nodeid}: {tol}")
        if self.report_path is not None:
            terminalreporter.line(f"  HTML report: {self.report_path}")


def add_options(group: Any, parser: pytest.Parser) -> None:
    """The CI-mode command-line flags and ini keys."""
    group.addoption("--neuronpatch-update-baselines", action="store_true", default=False,
                    help="write each probe's measured metrics to its baseline file")
    group.addoption("--neuronpatch-baselines", action="store_true", default=None,
                    help="compare every probe with its baseline (not only those with baseline:)")
    group.addoption("--neuronpatch-missing-baseline", metavar="fail|skip", default=None,
                    help="what a probe without a baseline file does (default fail)")
    group.addoption("--neuronpatch-report", metavar="FILE.html", default=None,
                    help="write one self-contained HTML page with every probe and its figures")
    group.addoption("--neuronpatch-suggest-tolerances", action="store_true", default=False,
                    help="print baseline tolerances suggested by each probe's input noise")
    parser.addini("neuronpatch_baselines", type="bool", default=False,
                  help="compare every probe with its baseline")
    parser.addini("neuronpatch_missing_baseline", default="fail",
                  help="fail or skip a probe that has no baseline file")


def missing_mode(config: pytest.Config) -> str:
    value = config.getoption("neuronpatch_missing_baseline") or config.getini(
        "neuronpatch_missing_baseline") or "fail"
    if value not in MISSING_MODES:
        raise pytest.UsageError(f"--neuronpatch-missing-baseline = {value!r} is invalid; "
                                f"expected one of {', '.join(MISSING_MODES)}")
    return str(value)


def check_options(config: pytest.Config) -> None:
    """Fail the session once, up front, on a bad CI-mode option."""
    missing_mode(config)


def baseline_path(item: ProbeItem) -> Path:
    """``<probe dir>/baselines/<probe name>.json`` or the probe's ``baseline.file``."""
    spec = item.spec
    if spec.baseline is not None and spec.baseline.file:
        path = spec.path.parent / spec.baseline.file
        if item.name != spec.title:  # one head of a glob: keep files apart
            path = path.with_name(f"{path.stem}[{item.name[len(spec.title) + 1:-1]}]{path.suffix}")
        return path
    from neuronpatch.pytest_plugin.runner import artifact_name

    return spec.path.parent / "baselines" / f"{artifact_name(item.name)}.json"


def wanted(item: ProbeItem) -> bool:
    """Whether this probe takes part in baseline checks.

    It does when it has a ``baseline:`` key, when every probe is asked to
    (``--neuronpatch-baselines`` or the ini key), when baselines are being
    written, and when a baseline file for it already exists (once written,
    a probe stays under regression).
    """
    config = item.config
    return bool(item.spec.baseline is not None or config.getoption("neuronpatch_update_baselines")
                or config.getoption("neuronpatch_baselines") or config.getini("neuronpatch_baselines")
                or baseline_path(item).is_file())


@dataclass(frozen=True)
class BaselineCheck:
    """The outcome of a baseline check for one probe."""

    status: str  # ok | drifted | missing | updated
    path: Path
    message: str = ""
    drifts: list[dict[str, Any]] = field(default_factory=list)


def check_baseline(item: ProbeItem, result: ExperimentResult, metrics: dict[str, Any]) -> BaselineCheck:
    """Update or compare this probe's baseline."""
    from neuronpatch import baselines

    path = baseline_path(item)
    shown = path.relative_to(item.config.rootpath) if path.is_relative_to(item.config.rootpath) else path
    if item.config.getoption("neuronpatch_update_baselines"):
        base = baselines.make_baseline(item.name, metrics, head_dir=item.head_dir)
        baselines.write_baseline(path, base)
        return BaselineCheck("updated", path, f"baseline written: {shown}")
    base_or_none = baselines.read_baseline(path)
    if base_or_none is None:
        return BaselineCheck("missing", path, f"probe {item.name!r} has no baseline at {shown}; "
                             f"run pytest with {baselines.UPDATE_FLAG} to create it")
    tolerance = item.spec.baseline.tolerance if item.spec.baseline is not None else {}
    drifts = baselines.compare(metrics, base_or_none, tolerance)
    rows = [d.__dict__ for d in drifts]
    if all(d.ok for d in drifts):
        return BaselineCheck("ok", path, drifts=rows)
    text = baselines.explain(drifts, base_or_none, head_dir=item.head_dir, baseline_path=shown)
    return BaselineCheck("drifted", path, f"probe {item.name!r}: {text}", rows)


def suggestion(result: ExperimentResult) -> dict[str, float]:
    """Baseline tolerances suggested by the spread of the metrics over resampled inputs."""
    from neuronpatch.baselines import suggest_tolerances

    return suggest_tolerances(result.activation_change, result.prediction_change,
                              result.clean_activation, result.clean_prediction)


def make_record(item: ProbeItem, outcome: str, *, message: str = "",
                outcomes: list[dict[str, Any]] | None = None, metrics: dict[str, Any] | None = None,
                baseline: BaselineCheck | None = None, figures: tuple[Path, ...] = ()) -> str:
    """The JSON record the HTML report shows for this probe (figures embedded)."""
    from neuronpatch.report_html import encode_figures
    from neuronpatch.result import to_jsonable

    rec = {
        "nodeid": item.nodeid, "name": item.name, "outcome": outcome, "message": message,
        "head": str(item.head_dir), "metrics": metrics or {},
        "expectations": [
            {"metric": o.get("metric"), "measured": o.get("measured"), "expected": o.get("expected"),
             "passed": o.get("passed"), "where": o.get("source") or o.get("where")}
            for o in (outcomes or [])
        ],
        "baseline": None if baseline is None else {
            "path": str(baseline.path), "status": baseline.status, "drifts": baseline.drifts},
        "figures": encode_figures(figures),
    }
    return json.dumps(to_jsonable(rec))


# ----- controller side ------------------------------------------------------------------
def collect_report(st: RunState, report: pytest.TestReport) -> None:
    """Gather statuses and records from a (possibly remote) test report."""
    props = dict(report.user_properties)
    if STATUS_PROP in props and report.when == "call":
        st.statuses[report.nodeid] = str(props[STATUS_PROP])
    elif report.when == "setup" and report.failed and report.nodeid not in st.statuses and (
            "neuronpatch" in report.keywords):
        st.statuses[report.nodeid] = "error"
    if RECORD_PROP in props:
        st.records[report.nodeid] = json.loads(str(props[RECORD_PROP]))
    elif report.nodeid in st.statuses and report.nodeid not in st.records and report.when != "teardown":
        st.records[report.nodeid] = {"nodeid": report.nodeid, "name": report.nodeid.split("::")[-1],
                                     "outcome": st.statuses[report.nodeid],
                                     "message": str(report.longrepr or "")}
    if SUGGEST_PROP in props:
        st.suggestions[report.nodeid] = json.loads(str(props[SUGGEST_PROP]))


def summary_line(st: RunState) -> str | None:
    """``neuronpatch: N probes: a passed, b failed, c drifted, d missing baseline``."""
    if not st.statuses:
        return None
    counts: dict[str, int] = {}
    for s in st.statuses.values():
        counts[s] = counts.get(s, 0) + 1
    order = [("passed", "passed"), ("failed", "failed"), ("drifted", "drifted"),
             ("missing", "missing baseline"), ("updated", "baselines updated"),
             ("error", "errors"), ("skipped", "skipped")]
    parts = [f"{counts[k]} {label}" for k, label in order if counts.get(k)]
    return f"neuronpatch: {len(st.statuses)} probes: " + ", ".join(parts)


def write_html(st: RunState) -> Path | None:
    config = st.config
    target = config.getoption("neuronpatch_report")
    if not target or hasattr(config, "workerinput"):
        return None
    from neuronpatch.report_html import write_report

    outcome_names = {"missing": "missing-baseline", "updated": "passed"}
    records = []
    for nodeid, rec in st.records.items():
        rec = dict(rec)
        status = st.statuses.get(nodeid, rec.get("outcome", "passed"))
        rec["outcome"] = outcome_names.get(status, status)
        records.append(rec)
    return write_report(config.invocation_params.dir / target, records)
