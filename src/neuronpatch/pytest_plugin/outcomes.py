"""What a test leaves behind: its verdict, its artifacts, its record and its JUnit properties.

Everything here is plain data about one test, shared by the steps that make it
(``collect``, ``runner``) and the ones that show it (``report``, ``session``):

* **the verdict** (:class:`Verdict`): each expectation's outcome, the numbers
  behind them and where the evidence went (:class:`Artifacts`);
* **names**: the node id artifacts, baselines and saved fuzz examples are keyed
  by (:func:`stable_id`) and the directory name of a test's artifacts
  (:func:`artifact_name`);
* **the record** (:func:`make_record`): what the summary line and the HTML
  report know about a test, JSON-safe so that it travels through xdist;
* **JUnit**: key metrics as ``record_property`` values, nothing else
  (:func:`record_metrics`), and the figures for pytest-html (:func:`html_extras`);
* **the stash keys** under which each test keeps them until its report is made.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from neuronpatch.names import safe_filename

if TYPE_CHECKING:
    from neuronpatch.probes.expectations import Outcome

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

# pytest's categories, failures first (the order of the HTML report).
OUTCOMES: tuple[str, ...] = ("error", "failed", "xpassed", "skipped", "xfailed", "passed")

_MAX_NAME = 120


# ----- names -----------------------------------------------------------------------------------


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


def is_ours(item: pytest.Item) -> bool:
    """A probe (or invalid probe document), or a test that uses ``neuronpatch_expect``."""
    return item.get_closest_marker("neuronpatch") is not None or (
        "neuronpatch_expect" in getattr(item, "fixturenames", ()))
