"""How a probe's verdict reaches the user: failure text, JUnit properties, HTML extras.

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
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuronpatch.probes.expectations import ExpectationError, failure_message
from neuronpatch.pytest_plugin.runner import KEY_METRICS, Artifacts, Verdict

if TYPE_CHECKING:
    import pytest

    from neuronpatch.result import ExperimentResult


class ProbeFailed(ExpectationError):
    """A probe's (or a ``neuronpatch_expect`` call's) expectations did not hold."""


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
            summary.json (figures not written: disabled by --neuronpatch-figures)
    """
    if artifacts is None:
        return []
    names = [p.name for p in (artifacts.summary, *artifacts.figures) if p is not None]
    lines = [f"  artifacts: {shown_path(artifacts.directory, base)}{os.sep}"]
    listing = ", ".join(names)
    if artifacts.figure_error:
        listing += f" (figures not written: {artifacts.figure_error})"
    elif not artifacts.figures:
        listing += " (figures not written: disabled by --neuronpatch-figures)"
    lines.append(f"    {listing}")
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
    text = failure_message(verdict.outcomes, title=f"{title} failed")
    first, *table = text.splitlines()
    lines = [first]
    if head is not None:
        lines.append(_head_line(head, result))
    lines += table
    if result is not None:
        lines += [f"  note: {note}" for note in result.notes]
    lines += artifact_lines(verdict.artifacts, base)
    return "\n".join(lines)


def engine_error(title: str, head: str, exc: BaseException) -> str:
    """One line for a probe whose experiment could not run (bad head, bad input...).

    Example:
        >>> engine_error("p", "heads/x", ValueError("heads/x/config.json: missing"))
        "probe 'p' could not run (head heads/x): ValueError: heads/x/config.json: missing"
    """
    return f"probe {title!r} could not run (head {head}): {type(exc).__name__}: {exc}"


def record(item: pytest.Item, verdict: Verdict, figures_key: Any) -> None:
    """Put key metrics in the JUnit XML (``record_property``) and remember the figures.

    Example:
        >>> record(item, verdict, FIGURES_KEY)    # doctest: +SKIP
    """
    for name in KEY_METRICS:
        if name in verdict.metrics:
            item.user_properties.append((f"neuronpatch.{name}", verdict.metrics[name]))
    item.user_properties.append(("neuronpatch.passed", verdict.passed))
    if verdict.artifacts is not None:
        item.user_properties.append(("neuronpatch.artifacts", str(verdict.artifacts.directory)))
        item.stash[figures_key] = tuple(verdict.artifacts.figures)


def html_extras(figures: Sequence[Path]) -> list[dict[str, Any]]:
    """pytest-html extras embedding the figures (base64, so any report layout works).

    Example:
        >>> html_extras([])
        []
    """
    from pytest_html import extras

    out = []
    for path in figures:
        try:
            data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        except OSError:  # removed since; the report just lacks that picture
            continue
        out.append(extras.png(data, name=Path(path).stem))
    return out
