"""Probe files and expectations: declarative causal claims about a head and its unit.

Where to look: ``documents`` (a probe file split into YAML documents, with the
line of every key), ``resolver`` (head globs, inputs files, the rootdir),
``schema`` (the probe keys → :class:`ProbeSpec`, pydantic alone), ``diagnostics``
(problems → ``FILE:LINE: key …`` lines), ``load`` (the three over a file),
``ranges`` (the range forms), ``metrics`` (the metric names and kinds) and
``expectations`` (checking metrics against ranges, and the verdict in words).
None imports torch or numpy; names are imported on first use, so importing
``expectations`` alone does not load pydantic or yaml.

Example:
    >>> from neuronpatch.probes import expect
    >>> expect({"slope": 0.97, "r_squared": 0.99}, slope=[0.8, 1.2], r_squared={"min": 0.9})
    ... # doctest: +ELLIPSIS
    [Outcome(metric='slope', passed=True, ...), Outcome(metric='r_squared', passed=True, ...)]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from neuronpatch.probes.documents import is_probe_file
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
    from neuronpatch.probes.load import load_probe_file
    from neuronpatch.probes.schema import ProbeSpec

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

_HOME = {"ProbeSpec": "neuronpatch.probes.schema", "is_probe_file": "neuronpatch.probes.documents",
         "load_probe_file": "neuronpatch.probes.load"}


def __getattr__(name: str) -> Any:
    if name in __all__:
        import importlib

        return getattr(importlib.import_module(_HOME.get(name, "neuronpatch.probes.expectations")), name)
    raise AttributeError(f"module 'neuronpatch.probes' has no attribute {name!r}")
