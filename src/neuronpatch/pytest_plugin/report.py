"""The last step: how a test's verdict reaches the user, in pytest's own words.

Everything here reads what earlier steps produced and imports none of them:

* **the failure**: the full text of a failed probe (every expectation, the
  head, the notes, where the artifacts are) and a one-line *crash line*
  (``FILE:LINE: probe 'x': slope 0.201 not in [0.8, 1.2]``) that pytest shows
  for ``--tb=line`` and in the short summary, also under ``-vv``;
* **JUnit**: key metrics as ``record_property`` values, nothing else;
* **the run** (:class:`RunState`, controller side): each test's outcome is the
  one pytest itself reports (``pytest_report_teststatus``: passed, failed,
  error, skipped, xfailed, xpassed; a strict xpass is failed), counted for the
  ``neuronpatch:`` summary line and the HTML report. Records travel from
  xdist workers as an attribute of the test report (``report.neuronpatch``),
  never as JUnit properties;
* **the files** (controller side): an xdist worker writes nothing of ours on
  its own file system (it may be another machine, or run in another
  directory). It puts each test's summary.json and figures (PNG bytes, base64)
  in the test report (``report.neuronpatch_files``), and the controller writes
  them into *its* artifacts directory and stamps pytest's outcome into the
  summary, as the single pytest process does for its own tests.

A failed probe reads like this (no traceback; every line says where to look)::

    probe 'causal head tracks its neuron' failed: 1 of 2 expectations not met
      head: probes/heads/causal (unit blocks.0.mlp.hook_post[3], reads blocks.0.hook_resid_post)
      FAIL  slope      = 0.0874  expected [100, 200]  at probes/causal.probe.yaml:8
      pass  r_squared  = 1       expected ≥ 0.9       at probes/causal.probe.yaml:9
      artifacts: .neuronpatch/artifacts/probes_causal.probe.yaml_causal-1a2b3c4d/
        summary.json, baseline_correlation.png, scaling_experiment.png, ...
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from neuronpatch.errors import NeuronpatchError
from neuronpatch.names import FIGURES, safe_filename

if TYPE_CHECKING:
    from _pytest._code.code import ExceptionChainRepr

    from neuronpatch.probes.expectations import Outcome
    from neuronpatch.result import ExperimentResult

# Metrics copied into JUnit XML properties (record_property) for every probe and
# neuronpatch_expect call: numbers a JUnit consumer can chart, nothing else.
KEY_METRICS: tuple[str, ...] = (
    "slope", "intercept", "r_squared", "baseline_correlation", "weight_cosine", "rank",
)
# Figures of the current test, for pytest-html (set by probes and neuronpatch_expect).
FIGURES_KEY = pytest.StashKey[tuple[Path, ...]]()
# What the report shows about the current test (built by the steps that ran it).
RECORD_KEY = pytest.StashKey[dict[str, Any]]()
# The figures' PNG bytes of the current test, when they were not written here (an xdist worker).
FIGURE_DATA_KEY = pytest.StashKey[dict[str, bytes]]()
# Error texts of invalid probe documents, for the --collect-only summary.
INVALID_KEY = pytest.StashKey[list[str]]()
# Files an xdist worker made and hands to the controller with the next test report.
OUTBOX_KEY = pytest.StashKey[list[dict[str, Any]]]()
# What the controller tells its xdist workers (``workerinput``): where files go, where pytest started.
WORKER_INPUT = "neuronpatch"
# The figure files a test may carry.
FIGURE_FILES: tuple[str, ...] = FIGURES

# pytest's categories, failures first (the order of the HTML report).
OUTCOMES: tuple[str, ...] = ("error", "failed", "xpassed", "skipped", "xfailed", "passed")
# The order of pytest's own summary line.
_SUMMARY_ORDER: tuple[str, ...] = ("failed", "passed", "skipped", "xfailed", "xpassed", "error")

_MAX_NAME = 120


# ----- names and paths ---------------------------------------------------------------------


def ini(config: pytest.Config, key: str, expected: str) -> Any:
    """An ini value, or a usage error that names the ini key (pytest's own names neither).

    Example:
        >>> ini(config, "neuronpatch_batch_size", "a positive integer")   # doctest: +SKIP
        64
    """
    try:
        return config.getini(key)
    except (ValueError, TypeError, pytest.UsageError) as e:
        raise pytest.UsageError(f"ini key {key} is invalid ({e}); expected {expected}") from None


def flag(config: pytest.Config, name: str) -> bool:
    """A boolean option: the command line when given, else its ini key.

    Example:
        >>> flag(config, "update_baselines")     # doctest: +SKIP
        False
    """
    value = config.getoption(f"neuronpatch_{name}", None)
    if value is not None:
        return bool(value)
    return bool(ini(config, f"neuronpatch_{name}", "true or false"))


ALLOW_OUTSIDE = "--neuronpatch-allow-outside-rootdir"


def outside_rootdir(config: pytest.Config, path: str | os.PathLike[str]) -> Path | None:
    """Where ``path`` resolves (symlinks followed) when that is outside the rootdir; else None.

    None as well when ``--neuronpatch-allow-outside-rootdir`` (or its ini key) is on.
    A path that does not exist yet resolves through its nearest existing parent,
    so ``baselines/ -> /elsewhere`` makes ``baselines/a/t.json`` resolve outside.

    Example:
        >>> outside_rootdir(config, "probes/baselines/a/t.json")     # doctest: +SKIP
        PosixPath('/elsewhere/a/t.json')
    """
    if flag(config, "allow_outside_rootdir"):
        return None
    full = config.rootpath / path
    real = Path(os.path.realpath(full))
    root = Path(os.path.realpath(config.rootpath))
    return None if real.is_relative_to(root) else real


def outside_message(config: pytest.Config, path: str | os.PathLike[str], what: str,
                    also: str = "") -> str | None:
    """The one-line refusal of a path this plugin would write outside the rootdir, or None.

    ``also`` names another way to allow it (the option that names the path explicitly).

    Example:
        >>> outside_message(config, "baselines/a/t.json", "baseline file")    # doctest: +SKIP
        'baselines/a/t.json: baseline file resolves to /elsewhere/a/t.json, outside the rootdir ...'
    """
    real = outside_rootdir(config, path)
    if real is None:
        return None
    allow = f"{ALLOW_OUTSIDE} allows it" + (f", or {also}" if also else "")
    return (f"{user_path(config, config.rootpath / path)}: {what} resolves to {real}, outside the "
            f"rootdir {config.rootpath}; expected a path inside the repository ({allow})")


def report_target(config: pytest.Config) -> Path | None:
    """The HTML report's path: the flag (relative to the start directory) or the ini key."""
    value = config.getoption("neuronpatch_report", None)
    if value:
        return config.invocation_params.dir / value
    ini = str(config.getini("neuronpatch_report") or "").strip()
    return config.rootpath / ini if ini else None


def shown_path(path: str | os.PathLike[str], base: Path | None = None) -> str:
    """A path as the user should type it: relative to ``base`` (cwd) when that is shorter.

    Example:
        >>> shown_path("/tmp/x/a.png", Path("/tmp/x"))
        'a.png'
    """
    base = base or Path.cwd()
    path = Path(path)
    try:
        rel = os.path.relpath(path, base)
    except ValueError:  # another drive on Windows
        return str(path)
    return rel if len(rel) < len(str(path)) else str(path)


def controller(config: pytest.Config) -> dict[str, str] | None:
    """On an xdist worker: what the controller said (its artifacts root, rootdir, start directory).

    None in the process that holds the session (no xdist, or the controller itself).
    """
    info = getattr(config, "workerinput", {}).get(WORKER_INPUT)
    return info if isinstance(info, dict) else None


def start_dir(config: pytest.Config) -> Path:
    """Where the person started pytest: the controller's directory on an xdist worker."""
    info = controller(config)
    return Path(info["invocation_dir"]) if info else config.invocation_params.dir


def user_path(config: pytest.Config, path: str | os.PathLike[str]) -> str:
    """A path as the person who started pytest would type it.

    On an xdist worker that runs elsewhere (``--tx ...//chdir=DIR``, another
    machine) a path under the worker's rootdir is shown as the same path under
    the controller's, relative to where pytest was started, so messages read
    the same as in a run without workers.

    Example:
        >>> user_path(config, "/work/project/probes/a.probe.yaml")   # doctest: +SKIP
        'probes/a.probe.yaml'
    """
    info = controller(config)
    if info:
        full = Path(os.path.abspath(path))
        root = Path(os.path.abspath(config.rootpath))
        if full.is_relative_to(root):
            path = Path(info["rootdir"]) / full.relative_to(root)
    return shown_path(path, start_dir(config))


def stable_id(item: pytest.Item) -> str:
    """The test's node id without the ``@group`` that ``--dist loadgroup`` appends to it.

    Artifacts, baselines and saved fuzz examples are keyed by this, so they stay the same
    whichever way xdist distributes the tests.

    Example:
        >>> stable_id(item)     # doctest: +SKIP
        'probes/demo.probe.yaml::tracks'
    """
    probe_id = getattr(item, "probe_id", None)
    if isinstance(probe_id, str):
        return probe_id
    nodeid = item.nodeid
    mark = item.get_closest_marker("xdist_group")
    if mark is not None:
        group = mark.args[0] if mark.args else mark.kwargs.get("name", "default")
        if nodeid.endswith(f"@{group}"):
            return nodeid[: -len(group) - 1]
    return nodeid


def artifact_name(node_id: str) -> str:
    """A directory or file name for a node id: readable, filesystem-safe and unique.

    Characters outside ``[A-Za-z0-9._-]`` become ``_``; if that changed anything
    (or the name had to be shortened), a short hash of the original id keeps
    two ids that sanitize alike apart.

    Example:
        >>> artifact_name("probes/demo.probe.yaml::tracks")
        'probes_demo.probe.yaml_tracks-fcc53917'
        >>> artifact_name("plain-id")
        'plain-id'
    """
    return safe_filename(node_id, limit=_MAX_NAME, mark_changed=True)


# ----- what the runner hands over ------------------------------------------------------------


@dataclass(frozen=True)
class Artifacts:
    """What was written for one probe or test."""

    directory: Path
    summary: Path | None = None
    figures: tuple[Path, ...] = ()
    figure_error: str | None = None
    # The figures' PNG bytes by file name, when they go to the xdist controller instead of a file.
    figure_data: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """Outcomes of the expectations, the numbers behind them and where the evidence is.

    Attributes:
        outcomes: one per expectation.
        artifacts: where summary.json and the figures went.
        metrics: ``ExperimentResult.metrics()``.
        reasons: why a metric is undefined or trivial, by metric.
        controls: the negative controls (labels, slopes, R², intervals, specificity), or None.
        rounding: how far the run's dtype can move the fit, in words (reduced precision), or None.
    """

    outcomes: Sequence[Outcome]
    artifacts: Artifacts | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    reasons: Mapping[str, str] = field(default_factory=dict)
    controls: Mapping[str, Any] | None = None  # ControlResults.to_dict(): each control's fit
    rounding: str | None = None  # ExperimentResult.rounding_reading()

    @property
    def passed(self) -> bool:
        """Whether every expectation held."""
        return all(o.passed for o in self.outcomes)

    @property
    def status(self) -> str:
        """``pass``; ``fail`` when any expectation failed outright; else ``inconclusive``."""
        words = {o.status for o in self.outcomes}
        return "fail" if "fail" in words else "inconclusive" if "inconclusive" in words else "pass"


INCONCLUSIVE_MODES: tuple[str, ...] = ("fail", "skip", "xfail")


def inconclusive_mode(config: pytest.Config, probe_value: str | None = None) -> str:
    """What an inconclusive verdict becomes in pytest: the probe's key, else the ini key, else fail.

    Raises:
        pytest.UsageError: the ini value is not fail, skip or xfail.
    """
    if probe_value:
        return probe_value
    value = str(config.getini("neuronpatch_on_inconclusive") or "fail").strip()
    if value not in INCONCLUSIVE_MODES:
        raise pytest.UsageError(f"ini key neuronpatch_on_inconclusive = {value!r} is invalid; "
                                f"expected one of {', '.join(INCONCLUSIVE_MODES)}")
    return value


class ProbeFailed(NeuronpatchError, AssertionError):
    """A probe's (or a ``neuronpatch_expect`` call's) claims did not hold.

    ``str()`` is the whole report; ``crash`` the one line pytest shows for
    ``--tb=line`` and in the short summary, at ``path:line``.
    """

    def __init__(self, text: str, *, crash: str, path: str | None = None, line: int | None = None):
        super().__init__(text)
        self.crash = crash
        self.path = path
        self.line = line


class ProbeError(NeuronpatchError, RuntimeError):
    """A probe that could not run, or a probe document that is not valid (an ERROR)."""

    def __init__(self, text: str, *, crash: str, path: str | None = None, line: int | None = None):
        super().__init__(text)
        self.crash = crash
        self.path = path
        self.line = line


def split_source(source: str | None) -> tuple[str | None, int | None]:
    """``"file.yaml:12"`` → ``("file.yaml", 12)``.

    Example:
        >>> split_source("probes/a.probe.yaml:12"), split_source(None)
        (('probes/a.probe.yaml', 12), (None, None))
    """
    if not source:
        return None, None
    path, _, line = source.rpartition(":")
    if path and line.isdigit():
        return path, int(line)
    return source, None


def failure_repr(text: str, crash: str, path: str, line: int | None,
                 style: str | None = None) -> ExceptionChainRepr:
    """A pytest failure representation: the full ``text``, crash line ``path:line: crash``.

    Built from pytest's own representation classes, so ``--tb=line``, the
    short summary and pytest-xdist (which serializes exactly these) all see a
    crash location and a one-line message. With ``style="line"`` the body is
    left out: the crash line is the whole story.
    """
    from _pytest._code.code import (
        ExceptionChainRepr,
        ReprEntryNative,
        ReprFileLocation,
        ReprTraceback,
    )

    entries = [] if style == "line" or not text else [ReprEntryNative([text.rstrip("\n") + "\n"])]
    body = ReprTraceback(entries, None, "native")
    location = ReprFileLocation(path, line if line is not None else 0, crash)
    return ExceptionChainRepr([(body, location, None)])


# ----- words -----------------------------------------------------------------------------------


def _head_line(head: str, result: ExperimentResult | None) -> str:
    if result is None:
        return f"  head: {head}"
    unit = f"{result.unit_hook}[{result.target_neuron}]"
    return f"  head: {head} (unit {unit}, reads {result.feature_hook})"


def artifact_lines(artifacts: Artifacts | None, base: Path | None = None) -> list[str]:
    """Where the evidence is: the directory, then the file names (or why figures are missing).

    Example:
        >>> for line in artifact_lines(Artifacts(Path("/a/p"), Path("/a/p/summary.json")),
        ...                            Path("/a")):
        ...     print(line)
          artifacts: p/
            summary.json (figures not written: see --neuronpatch-figures)
    """
    if artifacts is None:
        return []
    names = [p.name for p in (artifacts.summary, *artifacts.figures) if p is not None]
    lines = [f"  artifacts: {shown_path(artifacts.directory, base)}{os.sep}"]
    listing = ", ".join(names)
    if artifacts.figure_error:
        listing += f" (figures not written: {artifacts.figure_error})"
    elif not artifacts.figures:
        listing += " (figures not written: see --neuronpatch-figures)"
    lines.append(f"    {listing}")
    return lines


def _num(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "undefined"
    return f"{float(value):.4g}"


def _interval(pair: Any) -> str:
    lo, hi = (pair or [None, None])[:2]
    return f"[{_num(lo)}, {_num(hi)}]"


# How many controls the failure text lists (largest |slope| first); summary.json has them all.
MAX_CONTROL_LINES = 5


def controls_lines(controls: Mapping[str, Any] | None, metrics: Mapping[str, Any]) -> list[str]:
    """The failure text's controls block: specificity, then the target and the strongest controls.

    Example:
        >>> for line in controls_lines({"controls": [{"label": "unit7", "slope": 0.1, "r_squared": 0.9,
        ...                              "slope_ci95": [0.05, 0.15]}], "specificity": 9.2,
        ...                              "specificity_ci95": [7.0, 12.0], "max_abs_control_slope": 0.1},
        ...                             {"slope": 0.92, "r_squared": 1.0, "slope_ci95": [0.9, 0.94]}):
        ...     print(line)
          controls: 1 unit; specificity 9.2, 95% CI [7, 12]; largest |control slope| 0.1
            target  slope 0.92  R² 1    95% CI [0.9, 0.94]
            unit7   slope 0.1   R² 0.9  95% CI [0.05, 0.15]
    """
    if not controls:
        return []
    each = list(controls.get("controls") or [])
    n_dir = sum(1 for c in each if c.get("kind") == "direction")
    n_unit = len(each) - n_dir
    kinds = ", ".join(k for k in (f"{n_unit} unit{'s' if n_unit != 1 else ''}" if n_unit else "",
                                  f"{n_dir} direction{'s' if n_dir != 1 else ''}" if n_dir else "") if k)
    head = (f"  controls: {kinds}; specificity {_num(controls.get('specificity'))}, "
            f"95% CI {_interval(controls.get('specificity_ci95'))}; "
            f"largest |control slope| {_num(controls.get('max_abs_control_slope'))}")

    def size(c: Mapping[str, Any]) -> float:
        v = c.get("slope")
        return -abs(v) if isinstance(v, (int, float)) and not math.isnan(v) else math.inf

    shown = sorted(each, key=size)[:MAX_CONTROL_LINES]
    rows = [("target", metrics.get("slope"), metrics.get("r_squared"), metrics.get("slope_ci95")),
            *[(str(c.get("label")), c.get("slope"), c.get("r_squared"), c.get("slope_ci95")) for c in shown]]
    cells = [(label, f"slope {_num(sl)}", f"R² {_num(r2)}", f"95% CI {_interval(ci)}")
             for label, sl, r2, ci in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = [head] + ["    " + "  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + c[3]
                      for c in cells]
    if len(each) > len(shown):
        lines.append(f"    ... and {len(each) - len(shown)} more (all in summary.json)")
    return lines


def probe_failure(
    title: str,
    verdict: Verdict,
    *,
    head: str | None = None,
    result: ExperimentResult | None = None,
    base: Path | None = None,
) -> str:
    """The full failure text of a probe (or of a ``neuronpatch_expect`` call).

    ``title`` names what failed, e.g. ``"probe 'demo'"`` or ``"test 'test_tracks'"``.

    Example:
        >>> from neuronpatch.probes import check
        >>> print(probe_failure("probe 'p'", Verdict(check({"slope": 0.3}, {"slope": [0.8, 1.2]}))))
        probe 'p' failed: 1 of 1 expectation not met
          FAIL  slope  = 0.3  expected [0.8, 1.2]
    """
    from neuronpatch.probes.expectations import failure_message

    text = failure_message(verdict.outcomes, title=f"{title} failed")
    first, *table = text.splitlines()
    lines = [first]
    if head is not None:
        lines.append(_head_line(head, result))
    lines += table
    lines += controls_lines(verdict.controls, verdict.metrics)
    if result is not None:
        lines += [f"  note: {note}" for note in result.notes]
    lines += artifact_lines(verdict.artifacts, base)
    return "\n".join(lines)


def crash_line(title: str, verdict: Verdict) -> tuple[str | None, int | None, str]:
    """``(file, line, "probe 'x': slope 0.201 not in [0.8, 1.2]")`` of the first failed claim.

    Example:
        >>> from neuronpatch.probes import check
        >>> crash_line("probe 'p'", Verdict(check({"slope": 0.3}, {"slope": [0.8, 1.2]})))
        (None, None, "probe 'p': slope 0.3 not in [0.8, 1.2]")
    """
    from neuronpatch.probes.expectations import crash_summary

    source, text = crash_summary(verdict.outcomes)
    path, line = split_source(source)
    return path, line, f"{title}: {text}"


def engine_error(title: str, head: str, exc: BaseException) -> str:
    """One line for a probe whose experiment could not run (bad head, bad input...).

    Example:
        >>> engine_error("p", "heads/x", ValueError("heads/x/config.json: missing"))
        "probe 'p' could not run (head heads/x): ValueError: heads/x/config.json: missing"
    """
    return f"probe {title!r} could not run (head {head}): {type(exc).__name__}: {exc}"


# ----- records: what the report and the summary line show --------------------------------


def _clean(value: Any) -> Any:
    """JSON-safe (NaN → None), so a record survives xdist and json alike."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy scalars
        return _clean(value.item())
    return str(value)


def make_record(
    *,
    kind: str,
    name: str,
    location: str | None,
    verdict: Verdict | None = None,
    head: str | None = None,
    baseline: Mapping[str, Any] | None = None,
    fuzz: str | None = None,
    suggestion: Mapping[str, float] | None = None,
    embed: bool = False,
) -> dict[str, Any]:
    """What the HTML report and the summary line know about one test (JSON-safe).

    Example:
        >>> make_record(kind="probe", name="p", location="a.probe.yaml:3")["kind"]
        'probe'
    """
    rec: dict[str, Any] = {"kind": kind, "name": name, "location": location, "head": head}
    if verdict is not None:
        rec["metrics"] = {k: verdict.metrics.get(k) for k in
                          ("slope", "intercept", "r_squared", "slope_ci95", "r_squared_ci95",
                           "baseline_correlation", "weight_cosine") if k in verdict.metrics}
        rec["reasons"] = dict(verdict.reasons)
        if verdict.rounding:
            rec["rounding"] = verdict.rounding
        rec["expectations"] = [
            {"metric": o.metric, "measured": o.measured_text, "expected": o.expected,
             "passed": o.passed, "where": o.source, "details": list(o.details), "status": o.status,
             "inputs_needed": o.inputs_needed}
            for o in verdict.outcomes
        ]
        rec["expectations_met"] = verdict.passed
        rec["verdict"] = verdict.status
        if verdict.controls is not None:
            rec["controls"] = dict(verdict.controls)
        art = verdict.artifacts
        if art is not None:
            rec["artifacts"] = str(art.directory)
            rec["figures"] = [p.name for p in art.figures]
            if art.summary is not None:
                rec["summary"] = str(art.summary)
            if art.figure_error:
                rec["figure_error"] = art.figure_error
            if embed:
                data = {p.name: art.figure_data.get(p.name) or (p.read_bytes() if p.is_file() else b"")
                        for p in art.figures}
                rec["embedded"] = {name: base64.b64encode(png).decode("ascii")
                                   for name, png in data.items() if png}
    if baseline is not None:
        rec["baseline"] = dict(baseline)
    if fuzz is not None:
        rec["fuzz"] = fuzz
    if suggestion is not None:
        rec["suggested_tolerance"] = dict(suggestion)
    return _clean(rec)


def record_metrics(item: pytest.Item, verdict: Verdict) -> None:
    """Key metrics into JUnit XML (``record_property``); figures for pytest-html.

    An undefined metric is written as ``undefined: <why>``.

    Example:
        >>> record_metrics(item, verdict)    # doctest: +SKIP
    """
    for name in KEY_METRICS:
        if name not in verdict.metrics:
            continue
        value = verdict.metrics[name]
        if isinstance(value, float) and math.isnan(value):
            value = f"undefined: {verdict.reasons.get(name, 'no data')}"
        item.user_properties.append((f"neuronpatch.{name}", value))
    for name, value in control_properties(verdict.controls):
        item.user_properties.append((name, value))
    if verdict.outcomes:
        item.user_properties.append(("neuronpatch.verdict", verdict.status))
    for o in verdict.outcomes:
        if o.inconclusive:
            lo, hi = o.interval or (math.nan, math.nan)
            item.user_properties.append((f"neuronpatch.inconclusive.{o.metric}",
                                         f"interval [{lo:.6g}, {hi:.6g}] vs {o.expected}; "
                                         f"inputs needed {o.inputs_needed}"))
    if verdict.artifacts is not None:
        item.user_properties.append(("neuronpatch.artifacts", str(verdict.artifacts.directory)))
        item.stash[FIGURES_KEY] = tuple(verdict.artifacts.figures)
        item.stash[FIGURE_DATA_KEY] = dict(verdict.artifacts.figure_data)


def control_properties(controls: Mapping[str, Any] | None) -> list[tuple[str, Any]]:
    """JUnit properties of the controls: numbers only (an undefined one is ``undefined``).

    Example:
        >>> control_properties({"controls": [{"label": "dir0", "slope": 0.1, "r_squared": 0.5,
        ...                     "slope_ci95": [0.0, 0.2]}], "specificity": 9.0,
        ...                     "specificity_ci95": [7.0, 12.0], "max_abs_control_slope": 0.1})[4:6]
        [('neuronpatch.control.dir0.slope', 0.1), ('neuronpatch.control.dir0.r_squared', 0.5)]
    """
    if not controls:
        return []

    def number(v: Any) -> Any:
        return "undefined" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v

    out: list[tuple[str, Any]] = []
    lo, hi = (controls.get("specificity_ci95") or [None, None])[:2]
    out += [("neuronpatch.specificity", number(controls.get("specificity"))),
            ("neuronpatch.specificity_ci95_lo", number(lo)), ("neuronpatch.specificity_ci95_hi", number(hi)),
            ("neuronpatch.max_abs_control_slope", number(controls.get("max_abs_control_slope")))]
    for c in controls.get("controls") or []:
        key = f"neuronpatch.control.{c.get('label')}"
        lo, hi = (c.get("slope_ci95") or [None, None])[:2]
        out += [(f"{key}.slope", number(c.get("slope"))), (f"{key}.r_squared", number(c.get("r_squared"))),
                (f"{key}.slope_ci95_lo", number(lo)), (f"{key}.slope_ci95_hi", number(hi))]
    return out


def html_extras(figures: Sequence[Path], data: Mapping[str, bytes] | None = None) -> list[dict[str, Any]]:
    """pytest-html extras embedding the figures (base64, so any report layout works).

    ``data`` holds the PNG bytes of figures that were not written here (an xdist worker).

    Example:
        >>> html_extras([])
        []
    """
    from pytest_html import extras

    out = []
    for path in figures:
        try:
            png = (data or {}).get(Path(path).name) or Path(path).read_bytes()
        except OSError:  # removed since; the report just lacks that picture
            continue
        data_b64 = base64.b64encode(png).decode("ascii")
        out.append(extras.png(data_b64, name=Path(path).stem))
    return out


# ----- worker side: the test report carries the record ----------------------------------------


def is_ours(item: pytest.Item) -> bool:
    """A probe (or invalid probe document), or a test that uses ``neuronpatch_expect``."""
    return item.get_closest_marker("neuronpatch") is not None or (
        "neuronpatch_expect" in getattr(item, "fixturenames", ()))


def outcome_of(report: pytest.TestReport, config: pytest.Config) -> str:
    """pytest's own category for one phase's report ("" for a passed setup or teardown)."""
    status = config.hook.pytest_report_teststatus(report=report, config=config)
    return str(status[0])


def on_makereport(item: pytest.Item, call: pytest.CallInfo[None], report: pytest.TestReport) -> None:
    """Give pytest a one-line crash line, attach the record and the files the test made.

    Runs after every other ``makereport`` (so after xfail handling). Stamping
    pytest's outcome into summary.json happens where the report arrives
    (:meth:`RunState.pytest_runtest_logreport`), which is the controller under xdist.
    """
    excinfo = call.excinfo
    if excinfo is not None and isinstance(excinfo.value, ProbeFailed) and not isinstance(
            report.longrepr, (str, tuple)) and hasattr(report.longrepr, "reprcrash"):
        if item.config.getoption("tbstyle", "auto") == "line":
            exc = excinfo.value
            report.longrepr = failure_repr("", exc.crash, exc.path or "", exc.line, "line")
        else:
            _one_line_crash(report, excinfo.value)
    outbox = item.config.stash.get(OUTBOX_KEY, None)
    if outbox:  # an xdist worker's files, for the controller to write
        report.neuronpatch_files = list(outbox)  # type: ignore[attr-defined]
        outbox.clear()
    if not is_ours(item):
        return
    stored = item.stash.get(RECORD_KEY, None)
    record: dict[str, Any] = {} if stored is None else {**stored}
    record.setdefault("kind", "probe" if item.get_closest_marker("neuronpatch") else "test")
    record.setdefault("nodeid", stable_id(item))  # shown without xdist's "@group"
    record.setdefault("name", item.name)
    path, line, _ = item.location
    record.setdefault("location", path if line is None else f"{path}:{line + 1}")
    report.neuronpatch = record  # type: ignore[attr-defined]  # travels through xdist as is
    figures = item.stash.get(FIGURES_KEY, ())
    if report.when == "call" and figures and getattr(item.config.option, "htmlpath", None):
        # pytest-html is writing
        extra = html_extras(figures, item.stash.get(FIGURE_DATA_KEY, None))
        report.extras = [*getattr(report, "extras", []), *extra]  # type: ignore[attr-defined]


def shipment(directory: str, summary: Mapping[str, Any], figures: Mapping[str, bytes]) -> dict[str, Any]:
    """One artifact directory as a worker hands it over: a relative path, the summary, PNGs."""
    return {"dir": directory, "summary": dict(summary),
            "figures": {name: base64.b64encode(png).decode("ascii") for name, png in figures.items()}}


_SAFE_PART = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


def write_shipments(root: Path, shipments: Any) -> list[str]:
    """Write the artifact directories a worker's report carries under ``root``; error lines.

    Each directory must be a relative path of safe names under ``root``, each
    figure one of the five figure files; anything else is refused by name.
    """
    from neuronpatch.artifacts import Bundle, write_bundle

    errors = []
    for item in shipments if isinstance(shipments, list) else []:
        rel = str(item.get("dir", "")) if isinstance(item, dict) else ""
        parts = rel.split("/")
        if not rel or not all(_SAFE_PART.match(part) for part in parts):
            errors.append(f"artifacts {rel!r} not written: expected a relative path of plain names")
            continue
        figures = item.get("figures") or {}
        bad = sorted(name for name in figures if name not in FIGURE_FILES)
        if bad or not isinstance(item.get("summary"), dict):
            errors.append(f"artifacts {rel!r} not written: unexpected files {bad or ['summary']}")
            continue
        try:
            pngs = {name: base64.b64decode(data, validate=True) for name, data in figures.items()}
            write_bundle(Bundle(item["summary"], pngs), root.joinpath(*parts))
        except (NeuronpatchError, OSError, ValueError) as e:
            errors.append(f"artifacts {rel!r} not written: {e}")
    return errors


def _one_line_crash(report: pytest.TestReport, exc: ProbeFailed) -> None:
    from _pytest._code.code import ReprFileLocation

    longrepr: Any = report.longrepr
    old = longrepr.reprcrash
    crash = ReprFileLocation(exc.path or (old.path if old else ""),
                             exc.line if exc.line is not None else (old.lineno if old else 0),
                             exc.crash)
    longrepr.reprcrash = crash
    chain = getattr(longrepr, "chain", None)
    if chain:
        tb, _, descr = chain[-1]
        chain[-1] = (tb, crash, descr)


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


# ----- controller side: the run ----------------------------------------------------------------


class RunState:
    """This session's tests, as pytest reported them (controller side).

    Registered as a plugin object per session, so it sees
    ``pytest_runtest_logreport`` for local and xdist-worker reports alike.
    """

    def __init__(self, config: pytest.Config, artifacts: Path | None = None) -> None:
        self.config = config
        self.artifacts = artifacts  # where the files workers hand over go
        self.worker = hasattr(config, "workerinput")
        self.tests: dict[str, dict[str, Any]] = {}
        self.report_path: Path | None = None
        self.file_errors: list[str] = []

    @pytest.hookimpl(tryfirst=True)
    def pytest_report_teststatus(self, report: pytest.TestReport, config: pytest.Config) -> Any:
        """INCONCLUSIVE in the terminal line, whatever pytest outcome it was given."""
        record = getattr(report, "neuronpatch", None)
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
        shipped = getattr(report, "neuronpatch_files", None)
        if shipped and self.artifacts is not None:
            self.file_errors += [f"{report.nodeid}: {e}" for e in write_shipments(self.artifacts, shipped)]
        record = getattr(report, "neuronpatch", None)
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
        if not line and not self.file_errors:
            return
        terminalreporter.write_sep("-", "neuronpatch")
        if line:
            terminalreporter.line(line)
        for text in more:
            terminalreporter.line(text)
        for error in self.file_errors:
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
