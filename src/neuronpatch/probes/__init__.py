"""Probe files and expectations: declarative causal claims about a head and its unit.

``schema`` turns ``*.probe.yaml`` files into validated :class:`ProbeSpec`
objects (with the line of every key); ``expectations`` checks an experiment's
metrics against ranges and words the verdict. Neither imports torch or numpy,
so collecting probe files stays cheap.

Example:
    >>> from neuronpatch.probes import expect
    >>> expect({"slope": 0.97, "r_squared": 0.99}, slope=[0.8, 1.2], r_squared={"min": 0.9})
    ... # doctest: +ELLIPSIS
    [Outcome(metric='slope', passed=True, ...), Outcome(metric='r_squared', passed=True, ...)]
"""

from __future__ import annotations

from neuronpatch.probes.expectations import (
    METRICS,
    Expectation,
    ExpectationError,
    Measurements,
    Outcome,
    Range,
    assert_in_range,
    check,
    expect,
    failure_message,
    format_outcomes,
)
from neuronpatch.probes.schema import ProbeSpec, is_probe_file, load_probe_file

__all__ = [
    "METRICS",
    "Expectation",
    "ExpectationError",
    "Measurements",
    "Outcome",
    "ProbeSpec",
    "Range",
    "assert_in_range",
    "check",
    "expect",
    "failure_message",
    "format_outcomes",
    "is_probe_file",
    "load_probe_file",
]
