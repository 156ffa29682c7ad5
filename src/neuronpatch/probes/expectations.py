"""Expectations: ranges that a patching experiment's metrics must fall in.

A probe file's ``expect:`` block and the plain-Python helpers :func:`expect`
and :func:`assert_in_range` share everything here: the range forms, the metric
names, the check and the wording of failures, so a claim reads and fails the
same way in YAML and in Python.

Range forms (all closed, all checked on floats):

=============================  =====================================
form                           holds when
=============================  =====================================
``[lo, hi]``                   ``lo ≤ x ≤ hi``
``{min: lo}``                  ``x ≥ lo``
``{max: hi}``                  ``x ≤ hi``
``{min: lo, max: hi}``         ``lo ≤ x ≤ hi``
``{approx: v, abs: t}``        ``|x − v| ≤ t``
``{approx: v, rel: r}``        ``|x − v| ≤ r·|v|`` (with ``abs`` too: the larger tolerance)
``{abs_max: t}``               ``|x| ≤ t``
``{abs_min: t}``               ``|x| ≥ t`` (with ``abs_max`` too: both)
=============================  =====================================

A metric is a scalar, a per-input list (every input must hold) or an interval
(``[lo, hi]``, which must lie inside the range). NaN never satisfies a range:
the outcome says why the number is undefined.

Only the standard library is imported here, so the pytest plugin can collect
probe files without loading numpy or torch.
"""

from __future__ import annotations

import difflib
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from neuronpatch.errors import NeuronpatchError, ProbeSpecError

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
    "expect",
    "failure_message",
    "format_outcomes",
    "parse_expectations",
]

Kind = Literal["scalar", "per_input", "interval"]

RANGE_FORMS = (
    "[lo, hi], {min: x}, {max: y}, {min: x, max: y}, {approx: v, abs: t}, "
    "{approx: v, rel: r}, {abs_max: t} or {abs_min: t}"
)


class ExpectationError(NeuronpatchError, AssertionError):
    """A measured metric lies outside its expected range (an AssertionError: a test failure)."""


@dataclass(frozen=True)
class Metric:
    """A number an experiment reports and an expectation can constrain.

    Attributes:
        name: the key in ``ExperimentResult.metrics()`` and in ``expect:``.
        kind: ``scalar``, ``per_input`` (one value per input) or ``interval`` (``[lo, hi]``).
        help: one line for docs and error messages.
        reason_key: where ``ExperimentResult.reasons`` explains a NaN of this metric.
    """

    name: str
    kind: Kind
    help: str
    reason_key: str | None = None


def _metrics(*items: Metric) -> dict[str, Metric]:
    return {m.name: m for m in items}


# Order is the order of the docs and of failure reports.
METRICS: dict[str, Metric] = _metrics(
    Metric("slope", "scalar", "pooled OLS slope of prediction change on activation change",
           "slope"),
    Metric("intercept", "scalar",
           "pooled OLS intercept (prediction change at no activation change)", "slope"),
    Metric("r_squared", "scalar", "R² of the pooled fit", "slope"),
    Metric("slope_stderr", "scalar", "standard error of the pooled slope", "slope"),
    Metric("slope_p_value", "scalar", "two-sided p-value of slope ≠ 0", "slope"),
    Metric("baseline_correlation", "scalar",
           "Pearson r of clean activation vs clean prediction over inputs", "baseline_correlation"),
    Metric("baseline_p_value", "scalar", "p-value of the baseline Pearson r",
           "baseline_correlation"),
    Metric("baseline_spearman", "scalar", "Spearman ρ of clean activation vs clean prediction",
           "baseline_correlation"),
    Metric("per_input_slope", "per_input", "each input's own slope (every input must hold)"),
    Metric("per_input_r2", "per_input", "each input's own R² (every input must hold)"),
    Metric("slope_ci95", "interval", "bootstrap 95% interval of the slope (must lie inside)",
           "slope_ci95"),
    Metric("r_squared_ci95", "interval", "bootstrap 95% interval of R² (must lie inside)",
           "r_squared_ci95"),
    Metric("weight_cosine", "scalar",
           "cosine of a linear head's weight and the unit's write direction"),
    Metric("mean_abs_prediction_change", "scalar", "mean |prediction change| over patched rows"),
    Metric("mean_abs_activation_change", "scalar", "mean |activation change| over patched rows"),
)

_NAN_HINTS = {
    "weight_cosine": "defined only for a linear head reading the residual stream",
}


# Names people reach for that spelling distance alone would not map (suggested, not accepted).
_LIKELY = {
    "r2": "r_squared", "rsquared": "r_squared", "r_square": "r_squared",
    "correlation": "baseline_correlation", "pearson": "baseline_correlation",
    "spearman": "baseline_spearman", "ci95": "slope_ci95", "slope_ci": "slope_ci95",
    "p_value": "slope_p_value", "stderr": "slope_stderr", "cosine": "weight_cosine",
}


def unknown_metric_message(name: str) -> str:
    """The one-line complaint about a metric name that does not exist.

    Example:
        >>> unknown_metric_message("slop")  # doctest: +ELLIPSIS
        "unknown metric 'slop' (did you mean 'slope'?); expected one of slope, intercept, ..."
    """
    close = [_LIKELY[name]] if name in _LIKELY else difflib.get_close_matches(name, METRICS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown metric {name!r}{hint}; expected one of {', '.join(METRICS)}"


# ----- ranges -----------------------------------------------------------------


def _fmt(x: float) -> str:
    """Shortest text that reads back as ``x`` (``0.8``, ``1e-06``, ``-inf``)."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    short = f"{x:g}"
    return short if float(short) == x else repr(x)


def _fmt_measured(x: float) -> str:
    return "NaN" if math.isnan(x) else f"{x:.6g}"


def _number(value: Any, what: str) -> float:
    # YAML turns `yes`/`no` into booleans; a bool bound is always a mistake.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProbeSpecError(f"{what} is {value!r} ({type(value).__name__}); expected a number")
    x = float(value)
    if math.isnan(x):
        raise ProbeSpecError(f"{what} is NaN; expected a number")
    return x


@dataclass(frozen=True)
class Range:
    """A closed set of allowed values: ``lo ≤ x ≤ hi`` and ``abs_lo ≤ |x| ≤ abs_hi``.

    Build one with :meth:`parse` from any of the range forms of probe files.

    Example:
        >>> r = Range.parse({"min": 0.9})
        >>> r.contains(0.95), r.contains(float("nan")), r.text
        (True, False, '≥ 0.9')
        >>> Range.parse({"approx": 1.0, "abs": 0.05}).text
        '1 ± 0.05'
    """

    lo: float = -math.inf
    hi: float = math.inf
    abs_lo: float = 0.0
    abs_hi: float = math.inf
    text: str = "any value"

    def contains(self, x: float) -> bool:
        """Whether ``x`` is allowed; NaN never is."""
        if math.isnan(x):
            return False
        return self.lo <= x <= self.hi and self.abs_lo <= abs(x) <= self.abs_hi

    def contains_interval(self, lo: float, hi: float) -> bool:
        """Whether the whole interval ``[lo, hi]`` lies inside the range."""
        if math.isnan(lo) or math.isnan(hi) or lo > hi:
            return False
        if not (self.lo <= lo and hi <= self.hi and max(abs(lo), abs(hi)) <= self.abs_hi):
            return False
        # |x| ≥ abs_lo for every x in [lo, hi]: the interval must not come near 0.
        nearest = 0.0 if lo <= 0.0 <= hi else min(abs(lo), abs(hi))
        return nearest >= self.abs_lo

    @classmethod
    def parse(cls, spec: Any) -> Range:
        """Turn a range form (list, mapping or :class:`Range`) into a Range.

        Raises:
            ProbeSpecError: the form is unknown, a bound is not a number, or the
                range is empty, inverted or has a negative tolerance. The message
                is ``<what is wrong>; expected <what is allowed>``.

        Example:
            >>> Range.parse([0.8, 1.2]).text
            '[0.8, 1.2]'
            >>> Range.parse({"abs_max": 1e-6}).contains(-5e-7)
            True
            >>> Range.parse([2, 1])
            Traceback (most recent call last):
            ...
            neuronpatch.errors.ProbeSpecError: range [2, 1] is inverted (lo > hi); expected lo < hi
        """
        if isinstance(spec, Range):
            return spec
        if isinstance(spec, (list, tuple)):
            return cls._from_pair(spec)
        if isinstance(spec, Mapping):
            return cls._from_mapping(spec)
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            raise ProbeSpecError(
                f"a bare number ({spec!r}) is not a range; expected a range such as "
                f"{{approx: {spec!r}, abs: 0.05}} or [lo, hi]"
            )
        raise ProbeSpecError(
            f"{spec!r} ({type(spec).__name__}) is not a range; expected {RANGE_FORMS}"
        )

    @classmethod
    def _from_pair(cls, spec: Sequence[Any]) -> Range:
        if len(spec) != 2:
            raise ProbeSpecError(
                f"a range list needs exactly 2 numbers, got {len(spec)}; expected [lo, hi]"
            )
        lo = _number(spec[0], "the lower bound")
        hi = _number(spec[1], "the upper bound")
        return cls._bounded(lo, hi, f"[{_fmt(lo)}, {_fmt(hi)}]")

    @classmethod
    def _bounded(cls, lo: float, hi: float, text: str) -> Range:
        if lo > hi:
            raise ProbeSpecError(f"range {text} is inverted (lo > hi); expected lo < hi")
        if lo == hi:
            raise ProbeSpecError(
                f"range {text} is empty (zero width); expected lo < hi "
                f"(for 'about {_fmt(lo)}' write {{approx: {_fmt(lo)}, abs: <tolerance>}})"
            )
        return cls(lo=lo, hi=hi, text=text)

    @classmethod
    def _from_mapping(cls, spec: Mapping[Any, Any]) -> Range:
        keys = set(spec)
        allowed = {"min", "max", "approx", "abs", "rel", "abs_max", "abs_min"}
        unknown = sorted(str(k) for k in keys - allowed)
        if unknown:
            close = difflib.get_close_matches(unknown[0], allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ProbeSpecError(
                f"unknown range key {unknown[0]!r}{hint}; expected {RANGE_FORMS}"
            )
        if not keys:
            raise ProbeSpecError(f"the range is empty ({{}}); expected {RANGE_FORMS}")
        v = {k: _number(spec[k], f"{k!r}") for k in keys}
        if keys <= {"min", "max"}:
            lo, hi = v.get("min", -math.inf), v.get("max", math.inf)
            if keys == {"min"}:
                return cls(lo=lo, text=f"≥ {_fmt(lo)}")
            if keys == {"max"}:
                return cls(hi=hi, text=f"≤ {_fmt(hi)}")
            return cls._bounded(lo, hi, f"[{_fmt(lo)}, {_fmt(hi)}]")
        if "approx" in keys and keys <= {"approx", "abs", "rel"}:
            return cls._approx(v)
        if keys <= {"abs_min", "abs_max"}:
            return cls._magnitude(v)
        raise ProbeSpecError(
            f"range keys {', '.join(sorted(keys))} cannot be combined; expected {RANGE_FORMS}"
        )

    @classmethod
    def _approx(cls, v: Mapping[str, float]) -> Range:
        center = v["approx"]
        if not math.isfinite(center):
            raise ProbeSpecError(f"'approx' is {_fmt(center)}; expected a finite number")
        if "abs" not in v and "rel" not in v:
            raise ProbeSpecError(
                f"{{approx: {_fmt(center)}}} has no tolerance; expected "
                f"{{approx: {_fmt(center)}, abs: t}} or {{approx: {_fmt(center)}, rel: r}}"
            )
        for key in ("abs", "rel"):
            if key in v and not (math.isfinite(v[key]) and v[key] >= 0):
                raise ProbeSpecError(
                    f"tolerance {key!r} is {_fmt(v[key])}; expected a finite number ≥ 0"
                )
        # As pytest.approx: with both tolerances, the larger one applies.
        tol = max(v.get("abs", 0.0), v.get("rel", 0.0) * abs(center))
        if tol == 0:
            raise ProbeSpecError(
                f"the tolerance around {_fmt(center)} is 0 (an empty range); expected abs > 0 "
                "or rel > 0 with approx ≠ 0"
            )
        parts = [f"{_fmt(center)} ± {_fmt(v['abs'])}" if "abs" in v else None,
                 f"{_fmt(center)} ± {_fmt(v['rel'] * 100)}%" if "rel" in v else None]
        text = " or ".join(p for p in parts if p)
        return cls(lo=center - tol, hi=center + tol, text=text)

    @classmethod
    def _magnitude(cls, v: Mapping[str, float]) -> Range:
        abs_lo, abs_hi = v.get("abs_min", 0.0), v.get("abs_max", math.inf)
        for key in ("abs_min", "abs_max"):
            if key in v and v[key] < 0:
                raise ProbeSpecError(f"{key!r} is {_fmt(v[key])}; expected a number ≥ 0")
        if "abs_max" in v and abs_hi == 0:
            raise ProbeSpecError(
                "{abs_max: 0} is an empty range (only exact 0); expected a tolerance > 0, "
                "e.g. {abs_max: 1e-9}"
            )
        if abs_lo >= abs_hi:
            raise ProbeSpecError(
                f"abs_min {_fmt(abs_lo)} is not below abs_max {_fmt(abs_hi)}; "
                "expected abs_min < abs_max"
            )
        if "abs_max" not in v:
            text = f"|x| ≥ {_fmt(abs_lo)}"
        elif "abs_min" not in v:
            text = f"|x| ≤ {_fmt(abs_hi)}"
        else:
            text = f"{_fmt(abs_lo)} ≤ |x| ≤ {_fmt(abs_hi)}"
        return cls(abs_lo=abs_lo, abs_hi=abs_hi, text=text)


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
    """

    values: Mapping[str, Any]
    reasons: Mapping[str, str] = field(default_factory=dict)
    labels: Sequence[str] = ()
    input_reasons: Sequence[str | None] = ()

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
            )
        raise TypeError(
            f"cannot check {type(measured).__name__}; expected an ExperimentResult or a dict "
            "of metrics"
        )

    def why_nan(self, metric: str) -> str:
        """Text explaining a NaN value of ``metric``."""
        info = METRICS.get(metric)
        reason = self.reasons.get(info.reason_key) if info and info.reason_key else None
        reason = reason or _NAN_HINTS.get(metric)
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
    """

    metric: str
    passed: bool
    measured: Any
    measured_text: str
    expected: str
    source: str | None = None
    details: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form, for summary.json (NaN stays float; the writer maps it to null)."""
        return {
            "metric": self.metric, "passed": self.passed, "measured": self.measured,
            "expected": self.expected, "source": self.source, "details": list(self.details),
        }


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
    """Every element must hold; a failure names the elements (and inputs) that did not."""
    if not values:
        return _verdict(exp, False, values, f"no {noun}")
    bad = [i for i, v in enumerate(values) if not exp.range.contains(v)]
    if not bad:
        text = (f"all {len(values)} {noun} in range "
                f"(min {_fmt_measured(min(values))}, max {_fmt_measured(max(values))})")
        return _verdict(exp, True, values, text)
    lines = []
    for i in bad[:5]:
        label = f" {_short(m.labels[i])!r}" if i < len(m.labels) else ""
        value = values[i]
        if math.isnan(value):
            why = m.input_reasons[i] if i < len(m.input_reasons) else None
            shown = f"NaN (undefined: {why})" if why else "NaN (undefined)"
        else:
            shown = _fmt_measured(value)
        lines.append(f"{noun}[{i}]{label} = {shown}")
    if len(bad) > 5:
        lines.append(f"... and {len(bad) - 5} more")
    return _verdict(exp, False, values, f"{len(bad)} of {len(values)} {noun} out of range", lines)


def _check_one(m: Measurements, exp: Expectation) -> Outcome:
    kind = METRICS[exp.metric].kind if exp.metric in METRICS else "scalar"
    if exp.metric not in m.values:
        return _verdict(exp, False, None, "not measured",
                        ["the experiment did not report this metric"])
    raw = m.values[exp.metric]
    if kind == "per_input":
        return _check_each([_float(v) for v in raw], exp, m, noun="inputs")
    if kind == "interval":
        lo, hi = (_float(v) for v in raw)
        text = f"[{_fmt_measured(lo)}, {_fmt_measured(hi)}]"
        if math.isnan(lo) or math.isnan(hi):
            return _verdict(exp, False, [lo, hi], text, [m.why_nan(exp.metric)])
        ok = exp.range.contains_interval(lo, hi)
        details = [] if ok else ["the whole interval must lie inside the expected range"]
        return _verdict(exp, ok, [lo, hi], text, details)
    value = _float(raw)
    details = [m.why_nan(exp.metric)] if math.isnan(value) else []
    return _verdict(exp, exp.range.contains(value), value, _fmt_measured(value), details)


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
        verdict = "pass" if o.passed else "FAIL"
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
    head = f"{title}: {head}" if title else head
    return "\n".join([head, *format_outcomes(outcomes)])


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

