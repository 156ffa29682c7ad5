"""Range forms: the closed sets of values a metric may be claimed to lie in.

A probe file's ``expect:`` values, ``fuzz.expect`` and the Python helpers all
go through :meth:`Range.parse`, so a range reads and fails the same way
everywhere:

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

NaN never lies in a range. Only the standard library is imported here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from neuronpatch.errors import ProbeSpecError

__all__ = ["RANGE_FORMS", "Range", "format_bound", "format_measured"]

RANGE_FORMS = (
    "[lo, hi], {min: x}, {max: y}, {min: x, max: y}, {approx: v, abs: t}, "
    "{approx: v, rel: r}, {abs_max: t} or {abs_min: t}; any mapping may add confidence: c "
    "(e.g. {range: [lo, hi], confidence: 0.95})"
)


def format_bound(x: float) -> str:
    """Shortest text that reads back as ``x`` (``0.8``, ``1e-06``, ``-inf``).

    Example:
        >>> format_bound(0.8), format_bound(1e-6), format_bound(float("-inf"))
        ('0.8', '1e-06', '-inf')
    """
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    short = f"{x:g}"
    return short if float(short) == x else repr(x)


def format_measured(x: float) -> str:
    """A measured value as reports print it (6 significant digits, ``NaN``).

    Example:
        >>> format_measured(0.20134712), format_measured(float("nan"))
        ('0.201347', 'NaN')
    """
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
    confidence: float | None = None  # judge the metric's interval at this level: pass/fail/inconclusive

    def contains(self, x: float) -> bool:
        """Whether ``x`` is allowed; NaN never is."""
        if math.isnan(x):
            return False
        return self.lo <= x <= self.hi and self.abs_lo <= abs(x) <= self.abs_hi

    def excludes_interval(self, lo: float, hi: float) -> bool:
        """Whether no point of ``[lo, hi]`` lies inside the range (the claim is refuted)."""
        if math.isnan(lo) or math.isnan(hi) or lo > hi:
            return False
        if hi < self.lo or lo > self.hi:
            return True
        a, b = max(lo, self.lo), min(hi, self.hi)  # the part inside [self.lo, self.hi]
        near = 0.0 if a <= 0.0 <= b else min(abs(a), abs(b))
        far = max(abs(a), abs(b))
        return near > self.abs_hi or far < self.abs_lo

    def margin(self, x: float) -> float:
        """Distance from ``x`` to the nearest edge of the range (NaN when it has none)."""
        edges = [self.lo, self.hi, self.abs_hi, -self.abs_hi]
        if self.abs_lo > 0:
            edges += [self.abs_lo, -self.abs_lo]
        edges = [e for e in edges if math.isfinite(e)]
        return min((abs(x - e) for e in edges), default=math.nan)

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
        return cls._bounded(lo, hi, f"[{format_bound(lo)}, {format_bound(hi)}]")

    @classmethod
    def _bounded(cls, lo: float, hi: float, text: str) -> Range:
        if lo > hi:
            raise ProbeSpecError(f"range {text} is inverted (lo > hi); expected lo < hi")
        if lo == hi:
            raise ProbeSpecError(
                f"range {text} is empty (zero width); expected lo < hi "
                f"(for 'about {format_bound(lo)}' write {{approx: {format_bound(lo)}, abs: <tolerance>}})"
            )
        return cls(lo=lo, hi=hi, text=text)

    @classmethod
    def _from_mapping(cls, spec: Mapping[Any, Any]) -> Range:
        if "confidence" in spec:
            c = _number(spec["confidence"], "'confidence'")
            if not 0.5 <= c < 1.0:
                raise ProbeSpecError(f"'confidence' is {format_bound(c)}; expected a level in [0.5, 1), "
                                     "e.g. 0.95")
            rest = {k: v for k, v in spec.items() if k != "confidence"}
            if not rest:
                raise ProbeSpecError("'confidence' needs a range beside it; expected e.g. "
                                     "{range: [0.8, 1.2], confidence: 0.95}")
            inner = cls.parse(rest)
            text = f"{inner.text} at {format_bound(c * 100)}% confidence"
            return dataclasses.replace(inner, confidence=c, text=text)
        if "range" in spec:
            if set(spec) != {"range"}:
                extra = sorted(str(k) for k in set(spec) - {"range"})
                raise ProbeSpecError(f"'range' cannot be combined with {extra[0]!r}; expected "
                                     "{range: [lo, hi], confidence: c}")
            if not isinstance(spec["range"], (list, tuple)):
                raise ProbeSpecError(f"'range' is {spec['range']!r}; expected [lo, hi]")
            return cls._from_pair(spec["range"])
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
                return cls(lo=lo, text=f"≥ {format_bound(lo)}")
            if keys == {"max"}:
                return cls(hi=hi, text=f"≤ {format_bound(hi)}")
            return cls._bounded(lo, hi, f"[{format_bound(lo)}, {format_bound(hi)}]")
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
            raise ProbeSpecError(f"'approx' is {format_bound(center)}; expected a finite number")
        if "abs" not in v and "rel" not in v:
            raise ProbeSpecError(
                f"{{approx: {format_bound(center)}}} has no tolerance; expected "
                f"{{approx: {format_bound(center)}, abs: t}} or {{approx: {format_bound(center)}, rel: r}}"
            )
        for key in ("abs", "rel"):
            if key in v and not (math.isfinite(v[key]) and v[key] >= 0):
                raise ProbeSpecError(
                    f"tolerance {key!r} is {format_bound(v[key])}; expected a finite number ≥ 0"
                )
        # As pytest.approx: with both tolerances, the larger one applies.
        tol = max(v.get("abs", 0.0), v.get("rel", 0.0) * abs(center))
        if tol == 0:
            raise ProbeSpecError(
                f"the tolerance around {format_bound(center)} is 0 (an empty range); expected abs > 0 "
                "or rel > 0 with approx ≠ 0"
            )
        parts = [f"{format_bound(center)} ± {format_bound(v['abs'])}" if "abs" in v else None,
                 f"{format_bound(center)} ± {format_bound(v['rel'] * 100)}%" if "rel" in v else None]
        text = " or ".join(p for p in parts if p)
        return cls(lo=center - tol, hi=center + tol, text=text)

    @classmethod
    def _magnitude(cls, v: Mapping[str, float]) -> Range:
        abs_lo, abs_hi = v.get("abs_min", 0.0), v.get("abs_max", math.inf)
        for key in ("abs_min", "abs_max"):
            if key in v and v[key] < 0:
                raise ProbeSpecError(f"{key!r} is {format_bound(v[key])}; expected a number ≥ 0")
        if "abs_max" in v and abs_hi == 0:
            raise ProbeSpecError(
                "{abs_max: 0} is an empty range (only exact 0); expected a tolerance > 0, "
                "e.g. {abs_max: 1e-9}"
            )
        if abs_lo >= abs_hi:
            raise ProbeSpecError(
                f"abs_min {format_bound(abs_lo)} is not below abs_max {format_bound(abs_hi)}; "
                "expected abs_min < abs_max"
            )
        if "abs_max" not in v:
            text = f"|x| ≥ {format_bound(abs_lo)}"
        elif "abs_min" not in v:
            text = f"|x| ≤ {format_bound(abs_hi)}"
        else:
            text = f"{format_bound(abs_lo)} ≤ |x| ≤ {format_bound(abs_hi)}"
        return cls(abs_lo=abs_lo, abs_hi=abs_hi, text=text)
