"""The failure text: how a failed probe reads, in pytest's own words.

* **the failure**: the full text of a failed probe (every expectation, the
  head, the controls, the notes, where the artifacts are) and a one-line
  *crash line* (``FILE:LINE: probe 'x': slope 0.201 not in [0.8, 1.2]``) that
  pytest shows for ``--tb=line`` and in the short summary, also under ``-vv``;
* **the exceptions** a probe raises: :class:`ProbeFailed` (its claims did not
  hold) and :class:`ProbeError` (it could not run, or its document is invalid).

A failed probe reads like this (no traceback; every line says where to look)::

    probe 'causal head tracks its neuron' failed: 1 of 2 expectations not met
      head: probes/heads/causal (unit blocks.0.mlp.hook_post[3], reads blocks.0.hook_resid_post)
      FAIL  slope      = 0.0874  expected [100, 200]  at probes/causal.probe.yaml:8
      pass  r_squared  = 1       expected ≥ 0.9       at probes/causal.probe.yaml:9
      artifacts: .neuronpatch/artifacts/probes_causal.probe.yaml_causal-1a2b3c4d/
        summary.json, baseline_correlation.png, scaling_experiment.png, ...
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from neuronpatch.errors import NeuronpatchError
from neuronpatch.pytest_plugin.options import shown_path
from neuronpatch.pytest_plugin.outcomes import Artifacts, Verdict

if TYPE_CHECKING:
    from _pytest._code.code import ExceptionChainRepr

    from neuronpatch.result import ExperimentResult


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


# ----- the crash line pytest shows -------------------------------------------------------------


def shorten_crash(item: pytest.Item, call: pytest.CallInfo[None], report: pytest.TestReport) -> None:
    """Give pytest a one-line crash line for a :class:`ProbeFailed`.

    Runs after every other ``makereport`` (so after xfail handling).
    """
    excinfo = call.excinfo
    if excinfo is not None and isinstance(excinfo.value, ProbeFailed) and not isinstance(
            report.longrepr, (str, tuple)) and hasattr(report.longrepr, "reprcrash"):
        if item.config.getoption("tbstyle", "auto") == "line":
            exc = excinfo.value
            report.longrepr = failure_repr("", exc.crash, exc.path or "", exc.line, "line")
        else:
            _one_line_crash(report, excinfo.value)


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
