"""Expectations: a patching experiment's metrics checked against ranges, and the verdict in words.

A probe file's ``expect:`` block and the plain-Python helpers :func:`expect`
and :func:`assert_in_range` share everything here (and the range forms of
:mod:`neuronpatch.probes.ranges`, the metric names of
:mod:`neuronpatch.probes.metrics`), so a claim reads and fails the same way
in YAML and in Python.

A metric is a scalar, a per-input list (every input must hold) or an interval
(``[lo, hi]``, which must lie inside the range). NaN never satisfies a range:
the outcome says why the number is undefined, and so does a statistic that is
trivial (an R² of 1 by construction) or an effect below float noise.

Only the standard library is imported here, so the pytest plugin can collect
probe files without loading numpy or torch.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from neuronpatch.errors import NeuronpatchError, ProbeSpecError
from neuronpatch.names import FULL_PRECISION
from neuronpatch.probes.metrics import CONFIDENCE_METRICS, METRICS, Metric, nan_hint, unknown_metric_message
from neuronpatch.probes.ranges import RANGE_FORMS, Range, format_measured

__all__ = [
    "METRICS",
    "RANGE_FORMS",
    "Expectation",
    "ExpectationError",
    "Measurements",
    "Metric",
    "Outcome",
    "Range",
    "assert_in_range",
    "caller_source",
    "check",
    "crash_summary",
    "expect",
    "failure_message",
    "format_outcomes",
    "parse_expectations",
]


class ExpectationError(NeuronpatchError, AssertionError):
    """A measured metric lies outside its expected range (an AssertionError: a test failure)."""


@dataclass(frozen=True)
class Expectation:
    """One claim: ``metric`` lies in ``range``; ``source`` says where it was written."""

    metric: str
    range: Range
    source: str | None = None


# ----- measurements -------------------------------------------------------------


@dataclass(frozen=True)
class Measurements:
    """The numbers an expectation is checked against, with what explains them.

    Attributes:
        values: metric name → value (``ExperimentResult.metrics()``).
        reasons: why a metric is NaN (``ExperimentResult.reasons``), by reason key.
        labels: the input texts, to name inputs in per-input failures.
        input_reasons: per input, why its own fit is NaN (or None).
        numerical: metric → how far rounding in the run's dtype can move it
            (``ExperimentResult.numerical_error``); a range edge within it is inconclusive.
        precision: the dtype the model ran in, to say whose rounding it is.
    """

    values: Mapping[str, Any]
    reasons: Mapping[str, str] = field(default_factory=dict)
    labels: Sequence[str] = ()
    input_reasons: Sequence[str | None] = ()
    interval: Callable[[str, float], Sequence[float]] | None = None  # (metric, level) → [lo, hi]
    control_labels: Sequence[str] = ()  # unit17, dir0, ...: to name controls in control_slope failures
    numerical: Mapping[str, float] = field(default_factory=dict)
    precision: str | None = None

    @classmethod
    def of(cls, measured: Any) -> Measurements:
        """Accept Measurements, an ExperimentResult (anything with ``.metrics()``) or a dict.

        Example:
            >>> Measurements.of({"slope": 1.0}).values["slope"]
            1.0
        """
        if isinstance(measured, Measurements):
            return measured
        if isinstance(measured, Mapping):
            return cls(values=measured)
        if callable(getattr(measured, "metrics", None)):
            per_input = getattr(measured, "per_input", ())
            return cls(
                values=measured.metrics(),
                reasons=dict(getattr(measured, "reasons", {}) or {}),
                labels=tuple(getattr(measured, "inputs", ()) or ()),
                input_reasons=tuple(getattr(getattr(r, "fit", None), "reason", None)
                                    for r in per_input),
                interval=getattr(measured, "interval", None),
                control_labels=tuple(getattr(getattr(measured, "controls", None), "labels", ()) or ()),
                numerical=dict(getattr(measured, "numerical_error", None) or {}),
                precision=getattr(getattr(measured, "rounding", None), "dtype", None),
            )
        raise TypeError(
            f"cannot check {type(measured).__name__}; expected an ExperimentResult or a dict "
            "of metrics"
        )

    def why_nan(self, metric: str) -> str:
        """Text explaining a NaN value of ``metric``."""
        info = METRICS.get(metric)
        reason = self.reasons.get(info.reason_key) if info and info.reason_key else None
        reason = reason or nan_hint(metric)
        return f"NaN (undefined: {reason})" if reason else "NaN (undefined)"


# ----- checking -------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """The verdict on one expectation.

    Attributes:
        metric: the metric name.
        passed: whether the measured value satisfies the range.
        measured: the raw measured value (float, list or ``[lo, hi]``).
        measured_text: the value as reports print it.
        expected: the range as reports print it.
        source: ``file:line`` of the expectation, if known.
        details: extra lines (why a value is NaN, which inputs failed).
        inconclusive: with ``confidence``, the interval straddles the range's edge:
            neither confirmed nor refuted (``passed`` is False).
        interval: with ``confidence``, the metric's ``[lo, hi]`` at that level.
        inputs_needed: for an inconclusive outcome, how many inputs the observed
            spread suggests would decide it (the interval shrinks as 1/√n).
    """

    metric: str
    passed: bool
    measured: Any
    measured_text: str
    expected: str
    source: str | None = None
    details: tuple[str, ...] = ()
    inconclusive: bool = False
    interval: tuple[float, float] | None = None
    inputs_needed: int | None = None

    def _replace_interval(self, interval: tuple[float, float], need: int | None) -> Outcome:
        return dataclasses.replace(self, interval=interval, inputs_needed=need)

    @property
    def status(self) -> str:
        """``pass``, ``fail`` or ``inconclusive``."""
        return "pass" if self.passed else "inconclusive" if self.inconclusive else "fail"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, for summary.json (NaN stays float; the writer maps it to null)."""
        out = {
            "metric": self.metric, "passed": self.passed, "measured": self.measured,
            "expected": self.expected, "source": self.source, "details": list(self.details),
            "status": self.status,
        }
        if self.interval is not None:
            out["interval"] = list(self.interval)
            out["inputs_needed"] = self.inputs_needed
        return out


def parse_expectations(
    expectations: Mapping[str, Any] | Iterable[Expectation], source: str | None = None
) -> list[Expectation]:
    """``{metric: range form}`` → :class:`Expectation` objects (Expectations pass through).

    Raises:
        ProbeSpecError: an unknown metric or a malformed range, naming the metric.

    Example:
        >>> parse_expectations({"slope": [0.8, 1.2]})[0].range.text
        '[0.8, 1.2]'
    """
    if isinstance(expectations, Mapping):
        out = []
        for name, spec in expectations.items():
            if name not in METRICS:
                raise ProbeSpecError(unknown_metric_message(name))
            try:
                rng = Range.parse(spec)
            except ProbeSpecError as e:
                raise ProbeSpecError(f"expectation {name!r}: {e}") from None
            if rng.confidence is not None and name not in CONFIDENCE_METRICS:
                raise ProbeSpecError(f"expectation {name!r}: 'confidence' needs a metric with a bootstrap "
                                     f"interval; expected one of {', '.join(CONFIDENCE_METRICS)}")
            out.append(Expectation(name, rng, source))
        return out
    return list(expectations)


def _short(text: str, n: int = 32) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _float(x: Any) -> float:
    return math.nan if x is None else float(x)


def _verdict(
    exp: Expectation, passed: bool, measured: Any, text: str, details: Sequence[str] = ()
) -> Outcome:
    return Outcome(metric=exp.metric, passed=passed, measured=measured, measured_text=text,
                   expected=exp.range.text, source=exp.source, details=tuple(details))


def _check_each(values: list[float], exp: Expectation, m: Measurements, *, noun: str) -> Outcome:
    """Every element must hold; a failure names the elements (inputs, or controls) that did not."""
    labels, reasons = (m.control_labels, ()) if noun == "controls" else (m.labels, m.input_reasons)
    if not values:
        return _verdict(exp, False, values, f"no {noun}")
    bad = [i for i, v in enumerate(values) if not exp.range.contains(v)]
    if not bad:
        text = (f"all {len(values)} {noun} in range "
                f"(min {format_measured(min(values))}, max {format_measured(max(values))})")
        return _verdict(exp, True, values, text)
    lines = []
    for i in bad[:5]:
        label = f" {_short(labels[i])!r}" if i < len(labels) else ""
        value = values[i]
        if math.isnan(value):
            why = reasons[i] if i < len(reasons) else None
            shown = f"NaN (undefined: {why})" if why else "NaN (undefined)"
        else:
            shown = format_measured(value)
        lines.append(f"{noun}[{i}]{label} = {shown}")
    if len(bad) > 5:
        lines.append(f"... and {len(bad) - 5} more")
    return _verdict(exp, False, values, f"{len(bad)} of {len(values)} {noun} out of range", lines)


def _check_confident(m: Measurements, exp: Expectation) -> Outcome:
    """Pass when the interval lies inside the range, fail when wholly outside, else inconclusive."""
    level = exp.range.confidence
    assert level is not None
    value = _float(m.values.get(exp.metric))
    text = format_measured(value)
    if m.interval is None or exp.metric not in CONFIDENCE_METRICS:
        why = (f"no interval for {exp.metric} at {level:g}: 'confidence' needs one of "
               f"{', '.join(CONFIDENCE_METRICS)}")
        return _verdict(exp, False, value, text, [why])
    lo, hi = (_float(v) for v in m.interval(exp.metric, level))
    pct = f"{level * 100:g}%"
    shown = _with_rounding(m, exp.metric, format_measured(value))
    text = f"{shown} ({pct} interval [{format_measured(lo)}, {format_measured(hi)}])"
    if math.isnan(lo) or math.isnan(hi):
        return _verdict(exp, False, value, text, [m.why_nan(exp.metric)])
    doubt = _rounding_doubt(m, exp, lo, hi)
    if doubt is not None and (exp.range.contains_interval(lo, hi) or exp.range.excludes_interval(lo, hi)):
        out = _verdict(exp, False, value, text, [doubt])
        return dataclasses.replace(out, inconclusive=True, interval=(lo, hi))
    if exp.range.contains_interval(lo, hi):
        return _verdict(exp, True, value, text)._replace_interval((lo, hi), None)
    if exp.range.excludes_interval(lo, hi):
        why = f"the whole {pct} interval lies outside the expected range"
        out = _verdict(exp, False, value, text, [why])
        return out._replace_interval((lo, hi), None)
    n = len(m.labels)
    margin = exp.range.margin(value)
    need = _inputs_needed(value, lo, hi, margin, n)
    if need is not None and need > _DECIDABLE * n:
        need = None  # so many inputs that no one would run them: say why instead of the number
    more = (f"about {need} inputs would decide it at this spread (now {n})" if need
            else f"more inputs would hardly decide it: the estimate sits {format_measured(margin)} from "
                 "the range's edge, well inside its own interval; move the bound or test a larger effect")
    out = _verdict(exp, False, value, text,
                   [f"inconclusive: the {pct} interval straddles the expected range's edge; {more}"])
    return dataclasses.replace(out, inconclusive=True, interval=(lo, hi), inputs_needed=need)


# An estimate of the inputs that would decide a claim is shown only up to this many times the
# inputs it ran on; beyond, the estimate sits so close to the edge that the number misleads.
_DECIDABLE = 100


def _inputs_needed(value: float, lo: float, hi: float, margin: float, n: int) -> int | None:
    """Inputs at which an interval of this spread (shrinking as 1/√n) would clear the edge."""
    half = max(value - lo, hi - value)
    if n < 1 or not math.isfinite(margin) or margin <= 0 or not math.isfinite(half):
        return None
    return max(n + 1, math.ceil(n * (half / margin) ** 2))


def _check_one(m: Measurements, exp: Expectation) -> Outcome:
    kind = METRICS[exp.metric].kind if exp.metric in METRICS else "scalar"
    if exp.metric not in m.values:
        return _verdict(exp, False, None, "not measured",
                        ["the experiment did not report this metric"])
    if exp.range.confidence is not None:
        return _check_confident(m, exp)
    raw = m.values[exp.metric]
    if kind == "per_input":
        noun = "controls" if exp.metric == "control_slope" else "inputs"
        return _check_each([_float(v) for v in raw], exp, m, noun=noun)
    if kind == "interval":
        lo, hi = (_float(v) for v in raw)
        text = f"[{format_measured(lo)}, {format_measured(hi)}]"
        if math.isnan(lo) or math.isnan(hi):
            return _verdict(exp, False, [lo, hi], text, [m.why_nan(exp.metric)])
        ok = exp.range.contains_interval(lo, hi)
        details = [] if ok else ["the whole interval must lie inside the expected range"]
        return _verdict(exp, ok, [lo, hi], text, details)
    value = _float(raw)
    if math.isnan(value):
        return _verdict(exp, False, value, format_measured(value), [m.why_nan(exp.metric)])
    text = _with_rounding(m, exp.metric, format_measured(value))
    doubt = _rounding_doubt(m, exp, value, value)
    if doubt is not None:
        return dataclasses.replace(_verdict(exp, False, value, text, [doubt]), inconclusive=True)
    return _verdict(exp, exp.range.contains(value), value, text)


def _with_rounding(m: Measurements, metric: str, text: str) -> str:
    """``text ± error`` when the run's dtype is a reduced one and the metric has an error."""
    err = m.numerical.get(metric)
    reduced = m.precision is not None and m.precision not in FULL_PRECISION
    if not reduced or err is None or not math.isfinite(err) or err == 0:
        return text
    return f"{text} ± {err:.2g}"


def _rounding_doubt(m: Measurements, exp: Expectation, lo: float, hi: float) -> str | None:
    """Why the claim is inconclusive when rounding can carry ``[lo, hi]`` across a range edge."""
    err = m.numerical.get(exp.metric)
    if err is None or not math.isfinite(err) or err <= 0 or math.isnan(lo) or math.isnan(hi):
        return None
    wide = (lo - err, hi + err)
    if exp.range.contains_interval(*wide) or exp.range.excludes_interval(*wide):
        return None
    dtype = m.precision or "the model's dtype"
    advice = ("run in float32 to decide" if dtype not in FULL_PRECISION
              else "this close to the edge rounding decides it: move the bound")
    return (f"inconclusive: {dtype} rounding moves the {exp.metric} by up to {err:.2g}, "
            f"across the expected range's edge; {advice}")


def check(
    measured: Any, expectations: Mapping[str, Any] | Iterable[Expectation]
) -> list[Outcome]:
    """Check every expectation against the measured metrics; never raises on a miss.

    Args:
        measured: an ``ExperimentResult``, a ``metrics()`` dict, or :class:`Measurements`.
        expectations: ``{metric: range form}`` or :class:`Expectation` objects.

    Returns:
        One :class:`Outcome` per expectation, in the given order.

    Raises:
        ProbeSpecError: an unknown metric or a malformed range (mapping form only).

    Example:
        >>> [o.passed for o in check({"slope": 0.95, "r_squared": 0.5},
        ...                          {"slope": [0.8, 1.2], "r_squared": {"min": 0.9}})]
        [True, False]
    """
    m = Measurements.of(measured)
    return [_check_one(m, e) for e in parse_expectations(expectations, None)]


# ----- reporting ------------------------------------------------------------------


def format_outcomes(outcomes: Sequence[Outcome], *, indent: str = "  ") -> list[str]:
    """Lines of a table: failures first, then passes; each with value, range and source.

    Example:
        >>> print("\\n".join(format_outcomes(check({"slope": 0.3}, {"slope": [0.8, 1.2]}))))
          FAIL  slope  = 0.3  expected [0.8, 1.2]
    """
    ordered = [o for o in outcomes if not o.passed] + [o for o in outcomes if o.passed]
    if not ordered:
        return []
    w_name = max(len(o.metric) for o in ordered)
    w_value = max(len(o.measured_text) for o in ordered)
    w_exp = max(len(o.expected) for o in ordered)
    lines = []
    for o in ordered:
        verdict = {"pass": "pass", "fail": "FAIL", "inconclusive": "INCONCLUSIVE"}[o.status]
        line = (f"{indent}{verdict}  {o.metric:<{w_name}}  = {o.measured_text:<{w_value}}  "
                f"expected {o.expected:<{w_exp}}")
        if o.source:
            line += f"  at {o.source}"
        lines.append(line.rstrip())
        lines.extend(f"{indent}{' ' * 6}{d}" for d in o.details)
    return lines


def failure_message(outcomes: Sequence[Outcome], *, title: str | None = None) -> str:
    """A multi-line message: the title line, then the outcome table.

    Example:
        >>> print(failure_message(check({"slope": 0.3}, {"slope": [0.8, 1.2]})))
        1 of 1 expectation not met
          FAIL  slope  = 0.3  expected [0.8, 1.2]
    """
    failed = sum(not o.passed for o in outcomes)
    noun = "expectation" if len(outcomes) == 1 else "expectations"
    head = f"{failed} of {len(outcomes)} {noun} not met"
    doubtful = sum(o.inconclusive for o in outcomes)
    if doubtful:
        head += f" ({doubtful} inconclusive)"
    head = f"{title}: {head}" if title else head
    return "\n".join([head, *format_outcomes(outcomes)])


def crash_summary(outcomes: Sequence[Outcome]) -> tuple[str | None, str]:
    """The first failed expectation in one line, and where it was written.

    This is what pytest shows as the crash line (``--tb=line``, the short
    summary): ``slope 0.201 not in [0.8, 1.2]``, with ``(+1 more)`` when others
    failed too, and the reason when the value is undefined.

    Example:
        >>> crash_summary(check({"slope": 0.201, "r_squared": 0.5},
        ...                     {"slope": [0.8, 1.2], "r_squared": {"min": 0.9}}))
        (None, 'slope 0.201 not in [0.8, 1.2] (+1 more)')
    """
    failed = [o for o in outcomes if not o.passed]
    if not failed:
        return None, "all expectations met"
    first = failed[0]
    if first.inconclusive:
        need = f"; ~{first.inputs_needed} inputs would decide it" if first.inputs_needed else ""
        text = f"{first.metric} inconclusive: {first.measured_text} straddles {first.expected}{need}"
        if len(failed) > 1:
            text += f" (+{len(failed) - 1} more)"
        return first.source, text
    measured = first.measured_text
    if first.details and measured.startswith("NaN"):
        measured = first.details[0]
    kind = METRICS[first.metric].kind if first.metric in METRICS else "scalar"
    if kind == "per_input" or measured.startswith(("no ", "not ")):
        text = f"{first.metric}: {measured} (expected {first.expected})"
    elif first.expected.startswith("["):
        text = f"{first.metric} {measured} not in {first.expected}"
    else:
        text = f"{first.metric} {measured}, expected {first.expected}"
    if len(failed) > 1:
        text += f" (+{len(failed) - 1} more)"
    return first.source, text


def caller_source(depth: int = 1) -> str | None:
    """``file:line`` of the caller ``depth`` frames up: the user's line that stated a claim.

    Example:
        >>> caller_source(0).endswith(":1")    # doctest: +SKIP
        True
    """
    try:
        frame = sys._getframe(depth + 1)
    except ValueError:  # pragma: no cover - shallower stack than expected
        return None
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


def expect(result: Any, /, **ranges: Any) -> list[Outcome]:
    """Assert that an experiment's metrics lie in the given ranges (probe-file semantics).

    Args:
        result: an ``ExperimentResult`` (or a ``metrics()`` dict).
        **ranges: metric name → range form, as under ``expect:`` in a probe file.

    Returns:
        The outcomes (all passed).

    Raises:
        ExpectationError: some metric is out of range; the message lists every
            expectation with measured value, range and the calling line.
        ProbeSpecError: an unknown metric or malformed range.

    Example:
        >>> expect({"slope": 0.95, "r_squared": 0.99}, slope=[0.8, 1.2], r_squared={"min": 0.9})
        ... # doctest: +ELLIPSIS
        [Outcome(metric='slope', passed=True, ...), Outcome(metric='r_squared', passed=True, ...)]
    """
    __tracebackhide__ = True
    if not ranges:
        raise ProbeSpecError(
            "expect() got no expectations; expected metric=range keywords, e.g. slope=[0.8, 1.2]"
        )
    source = caller_source(1)
    exps = [Expectation(e.metric, e.range, source) for e in parse_expectations(ranges, None)]
    outcomes = [_check_one(Measurements.of(result), e) for e in exps]
    if not all(o.passed for o in outcomes):
        raise ExpectationError(failure_message(outcomes))
    return outcomes


def assert_in_range(value: Any, range: Any, *, name: str = "value") -> Outcome:
    """Assert one number (or every element of a list) lies in a range form.

    ``name`` may be a metric name (then its kind applies: per-input lists hold
    for every element, ``*_ci95`` intervals must lie inside) or any label.

    Raises:
        ExpectationError: out of range or NaN, with the same message as probe files.
        ProbeSpecError: a malformed range.

    Example:
        >>> assert_in_range(0.93, {"approx": 1, "abs": 0.1}, name="slope").passed
        True
        >>> assert_in_range(float("nan"), [0, 1], name="slope")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        neuronpatch.probes.expectations.ExpectationError: 1 of 1 expectation not met
          FAIL  slope  = NaN  expected [0, 1]  at ...
                NaN (undefined)
    """
    __tracebackhide__ = True
    rng = Range.parse(range)
    exp = Expectation(name, rng, caller_source(1))
    if name not in METRICS and isinstance(value, (list, tuple)):
        # A list under a free-form name: every element must hold, as for per-input metrics.
        outcome = _check_each([_float(v) for v in value], exp, Measurements(values={}),
                              noun="values")
    else:
        outcome = _check_one(Measurements(values={name: value}), exp)
    if not outcome.passed:
        raise ExpectationError(failure_message([outcome]))
    return outcome

