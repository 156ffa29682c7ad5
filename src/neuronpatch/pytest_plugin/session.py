"""The session: the models it loads and its tests' outcomes, told at the end of the run.

* **model loading** (:class:`ModelLoading`): each model a probe needs loads in a
  step of its own, before the tests that need it, saying so;
* **the run** (:class:`RunState`, controller side): each test's outcome is the
  one pytest itself reports (``pytest_report_teststatus``: passed, failed,
  error, skipped, xfailed, xpassed; a strict xpass is failed), stamped into the
  test's summary.json, counted for the ``neuronpatch:`` summary line and listed
  in the HTML report. Records arrive through :mod:`.channel` (from xdist
  workers, or from this process), never as JUnit properties.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from neuronpatch.pytest_plugin.channel import file_errors, from_workers, record_of, send_at_end
from neuronpatch.pytest_plugin.options import report_target, user_path
from neuronpatch.pytest_plugin.outcomes import INVALID_KEY
from neuronpatch.pytest_plugin.runner import RUNNER_KEY, get_runner

# The order of pytest's own summary line.
_SUMMARY_ORDER: tuple[str, ...] = ("failed", "passed", "skipped", "xfailed", "xpassed", "error")


# ----- the run (controller side) -----------------------------------------------------------------


def outcome_of(report: pytest.TestReport, config: pytest.Config) -> str:
    """pytest's own category for one phase's report ("" for a passed setup or teardown)."""
    status = config.hook.pytest_report_teststatus(report=report, config=config)
    return str(status[0])


def _reason(report: pytest.TestReport) -> list[str]:
    if hasattr(report, "wasxfail"):
        return [f"xfail: {report.wasxfail}"] if report.wasxfail else ["xfail"]
    if report.failed or report.skipped:
        crash = getattr(report.longrepr, "reprcrash", None)
        if crash is not None:
            return [str(crash.message)]
        if isinstance(report.longrepr, tuple):
            return [str(report.longrepr[2])]
    return []


def stamp_summary(path: Path, outcome: str, reasons: Sequence[str]) -> None:
    """Put pytest's outcome (and why) into a summary.json's ``verdict``."""
    from neuronpatch._io import atomic_write_text

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    verdict = data.setdefault("verdict", {})
    verdict["outcome"] = outcome
    verdict["reasons"] = [*reasons, *[r for r in verdict.get("reasons", []) if r not in reasons]]
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


class RunState:
    """This session's tests, as pytest reported them (controller side).

    Registered as a plugin object per session, so it sees
    ``pytest_runtest_logreport`` for local and xdist-worker reports alike.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.worker = hasattr(config, "workerinput")
        self.tests: dict[str, dict[str, Any]] = {}
        self.report_path: Path | None = None

    @pytest.hookimpl(tryfirst=True)
    def pytest_report_teststatus(self, report: pytest.TestReport, config: pytest.Config) -> Any:
        """INCONCLUSIVE in the terminal line, whatever pytest outcome it was given."""
        record = record_of(report)
        if report.when != "call" or not record or record.get("verdict") != "inconclusive":
            return None
        if hasattr(report, "wasxfail"):
            return "xfailed", "i", ("INCONCLUSIVE (xfail)", {"yellow": True})
        if report.skipped:
            return "skipped", "i", ("INCONCLUSIVE (skip)", {"yellow": True})
        if report.failed:
            return "failed", "I", ("INCONCLUSIVE", {"red": True})
        return None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.worker:
            return
        record = record_of(report)
        if record is None:
            return
        if report.when == "call" and record.get("summary"):
            stamp_summary(Path(record["summary"]), outcome_of(report, self.config), _reason(report))
        entry = self.tests.setdefault(report.nodeid, {"nodeid": report.nodeid, "outcome": None})
        entry.update({k: v for k, v in record.items() if v is not None or k not in entry})
        category = outcome_of(report, self.config)
        if report.when == "teardown":
            if category == "error":
                entry["outcome"] = "error"
                entry["message"] = _longrepr_text(report)
        elif category:
            entry["outcome"] = category
            if report.failed or report.skipped or category in ("xfailed", "xpassed"):
                entry["message"] = _longrepr_text(report)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        self.report_path = self.write_html()

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        invalid = self.config.stash.get(INVALID_KEY, [])
        if invalid and self.config.option.collectonly:
            terminalreporter.section("neuronpatch: invalid probe files", sep="=", red=True)
            for text in invalid:
                terminalreporter.line(text)
        line = summary_line(self.tests.values())
        # Lines other steps add to this section (the models each process loaded).
        more = [text for name in ("neuronpatch-model-loading",)
                for text in getattr(self.config.pluginmanager.get_plugin(name), "lines", list)()]
        errors = file_errors(self.config)  # files a worker sent that could not be written
        if not line and not errors:
            return
        terminalreporter.write_sep("-", "neuronpatch")
        if line:
            terminalreporter.line(line)
        for text in more:
            terminalreporter.line(text)
        for error in errors:
            terminalreporter.line(error, red=True)
        for nodeid, entry in self.tests.items():
            if entry.get("suggested_tolerance"):
                terminalreporter.line(f"  suggested baseline.tolerance for {entry.get('nodeid', nodeid)}: "
                                      f"{entry['suggested_tolerance']}")
        if self.report_path is not None:
            terminalreporter.line(f"  HTML report: {self.report_path}")

    def write_html(self) -> Path | None:
        target = report_target(self.config)
        if target is None or hasattr(self.config, "workerinput"):
            return None
        from neuronpatch.report_html import write_report

        records = [dict(e) for e in self.tests.values() if e.get("outcome")]
        return write_report(target, records)


def _longrepr_text(report: pytest.TestReport) -> str:
    if hasattr(report, "wasxfail") and report.passed:
        return f"XPASS: {report.wasxfail}" if report.wasxfail else "XPASS"
    if isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    return str(report.longrepr or "")


def summary_line(entries: Any) -> str | None:
    """``neuronpatch: 6 probes: 3 failed, 1 passed, 1 skipped, 1 xfailed, 1 xpassed``.

    The counts are pytest's; baseline states are details of them, in brackets.

    Example:
        >>> summary_line([{"kind": "probe", "outcome": "failed", "baseline": {"status": "drifted"}},
        ...               {"kind": "test", "outcome": "passed"}])
        'neuronpatch: 2 tests (1 probe): 1 failed, 1 passed (1 drifted)'
    """
    done = [e for e in entries if e.get("outcome")]
    if not done:
        return None
    counts: dict[str, int] = {}
    for e in done:
        counts[e["outcome"]] = counts.get(e["outcome"], 0) + 1
    parts = []
    for key in _SUMMARY_ORDER:
        n = counts.get(key, 0)
        if n:
            parts.append(f"{n} {'errors' if key == 'error' and n > 1 else key}")
    details: dict[str, int] = {}
    labels = {"drifted": "drifted", "missing": "missing baseline", "updated": "baselines updated",
              "not-updated": "baselines not updated"}
    for e in done:
        status = (e.get("baseline") or {}).get("status")
        if status in labels:
            details[labels[status]] = details.get(labels[status], 0) + 1
    extra = f" ({', '.join(f'{n} {k}' for k, n in details.items())})" if details else ""
    probes = sum(1 for e in done if e.get("kind") == "probe")
    if probes == len(done):
        who = f"{probes} probe{'s' if probes != 1 else ''}"
    elif probes == 0:
        who = f"{len(done)} test{'s' if len(done) != 1 else ''}"
    else:
        who = f"{len(done)} tests ({probes} probe{'s' if probes != 1 else ''})"
    return f"neuronpatch: {who}: " + ", ".join(parts) + extra


# ----- model loading -----------------------------------------------------------------------------


class ModelLoading:
    """Models load in a step of their own, before the tests that need them, saying so.

    A model's load is not part of any test: it would be charged to the first
    probe that uses the model (its setup time, ``--durations``, a
    ``--timeout``). In the process that runs the tests itself, every model the
    collected probes need is loaded before the first test, one line each::

        neuronpatch: loading model neuronpatch-demo (cpu, float32) … done in 1.2 s

    A probe whose result the cache holds needs no model. An xdist worker learns
    its tests one by one, so it loads a model just before the first test that
    needs it, outside that test (before pytest's runtest protocol, and so before
    pytest-timeout's timer, starts). The end of the run lists what each process
    loaded, the cache's hits and misses, and warnings (workers send theirs to
    the controller)::

        neuronpatch: models loaded: gw0: neuronpatch-demo (1.2 s); gw1: ...
        neuronpatch: cache .neuronpatch/cache: 9 hits, 2 misses
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.worker = hasattr(config, "workerinput")
        self.by_worker: dict[str, dict[str, Any]] = {}

    @staticmethod
    def _needs(item: pytest.Item) -> str | None:
        need = getattr(item, "needs_model", None)
        if not callable(need) or item.get_closest_marker("skip") is not None:
            return None
        name = need()
        return name if isinstance(name, str) else None

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> Any:
        if not self.worker and not self.config.option.collectonly:
            names = dict.fromkeys(n for n in map(self._needs, session.items) if n is not None)
            if names:
                runner = get_runner(self.config)
                tr = self.config.pluginmanager.get_plugin("terminalreporter")
                for name in names:
                    runner.ensure_model(name, announce=self._announce(tr), done=self._done(tr))
        return (yield)

    def _announce(self, tr: Any) -> Any:
        settings = get_runner(self.config).settings

        def announce(name: str) -> None:
            if tr is not None and tr.verbosity >= 0:
                tr.ensure_newline()
                tr.write(f"neuronpatch: loading model {name} ({settings.device}, {settings.dtype}) … ",
                         flush=True)
        return announce

    @staticmethod
    def _done(tr: Any) -> Any:
        def done(text: str) -> None:
            if tr is not None and tr.verbosity >= 0:
                tr.line(text)
        return done

    # Outermost: before pytest's protocol (setup, call, teardown) and any timer around it.
    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None) -> Any:
        name = self._needs(item)
        if name is not None:
            get_runner(self.config).ensure_model(name)
        return (yield)

    def _mine(self) -> dict[str, Any]:
        runner = self.config.stash.get(RUNNER_KEY, None)
        if runner is None:
            return {}
        return {"loads": list(runner.loads), "warnings": list(runner.warnings),
                "cache": runner.cache_counts()}

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.worker:  # what it loaded, counted and warned about, for the controller
            send_at_end(self.config, "steps", self._mine())
        else:
            self.by_worker["-"] = self._mine()

    def lines(self) -> list[str]:
        """The end-of-run lines (printed in the ``neuronpatch`` section of the summary)."""
        if self.worker:
            return []
        out, parts = [], []
        hits = misses = 0
        counted = False
        by_worker = {**{k: v for k, v in from_workers(self.config, "steps").items() if isinstance(v, dict)},
                     **self.by_worker}
        for worker, mine in sorted(by_worker.items()):
            loads = mine.get("loads") or []
            if loads:
                text = ", ".join(f"{x['model']} ({x['seconds']:.1f} s)" for x in loads)
                parts.append(text if worker == "-" else f"{worker}: {text}")
            if mine.get("cache") is not None:
                counted = True
                hits, misses = hits + mine["cache"][0], misses + mine["cache"][1]
        if parts:
            out.append("neuronpatch: models loaded: " + "; ".join(parts))
        cache = get_runner(self.config).settings.cache
        if cache is not None and counted:
            out.append(f"neuronpatch: cache {user_path(self.config, cache)}: {hits} hit"
                       f"{'s' if hits != 1 else ''}, {misses} miss{'es' if misses != 1 else ''}")
        for mine in by_worker.values():
            out += list(mine.get("warnings") or [])
        return out
