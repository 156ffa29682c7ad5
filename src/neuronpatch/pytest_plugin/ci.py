"""CI regression mode: each probe's metrics against its baseline file.

``--neuronpatch-update-baselines`` writes each probe's measured metrics to its
baseline file. Later runs compare a probe with its baseline when the file
exists, when the probe has a ``baseline:`` key, or for every probe with
``--neuronpatch-baselines`` (ini ``neuronpatch_baselines = true``); a drift
fails with a table. A probe with no baseline file fails (or, with
``--neuronpatch-missing-baseline=skip``, is skipped) saying how to create one.

This step takes plain values (the probe's spec, name, head and metrics), so it
knows nothing of items; what it finds goes to :mod:`.report` as a record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from neuronpatch.pytest_plugin.report import artifact_name

if TYPE_CHECKING:
    from neuronpatch.probes.schema import ProbeSpec
    from neuronpatch.result import ExperimentResult

MISSING_MODES = ("fail", "skip")


def add_options(group: Any, parser: pytest.Parser) -> None:
    """The CI-mode command-line flags and ini keys."""
    group.addoption("--neuronpatch-update-baselines", action="store_true", default=False,
                    help="write each probe's measured metrics to its baseline file")
    group.addoption("--neuronpatch-baselines", action="store_true", default=None,
                    help="compare every probe with its baseline (not only those with baseline:)")
    group.addoption("--neuronpatch-missing-baseline", metavar="fail|skip", default=None,
                    help="what a probe without a baseline file does (default fail)")
    group.addoption("--neuronpatch-report", metavar="FILE.html", default=None,
                    help="write one HTML page: an overview table of every probe and test that "
                         "uses neuronpatch_expect, then details, figures linked from the artifacts")
    group.addoption("--neuronpatch-report-embed", action="store_true", default=False,
                    help="embed the figures in the HTML page instead of linking them")
    group.addoption("--neuronpatch-suggest-tolerances", action="store_true", default=False,
                    help="print baseline tolerances suggested by each probe's input noise")
    parser.addini("neuronpatch_baselines", type="bool", default=False,
                  help="compare every probe with its baseline")
    parser.addini("neuronpatch_missing_baseline", default="fail",
                  help="fail or skip a probe that has no baseline file")


def missing_mode(config: pytest.Config) -> str:
    """``fail`` or ``skip``: what a probe without a baseline file does."""
    value = config.getoption("neuronpatch_missing_baseline") or config.getini(
        "neuronpatch_missing_baseline") or "fail"
    if value not in MISSING_MODES:
        raise pytest.UsageError(f"--neuronpatch-missing-baseline = {value!r} is invalid; "
                                f"expected one of {', '.join(MISSING_MODES)}")
    return str(value)


def check_options(config: pytest.Config) -> None:
    """Fail the session once, up front, on a bad CI-mode option."""
    missing_mode(config)


def baseline_path(spec: ProbeSpec, name: str) -> Path:
    """``<probe dir>/baselines/<probe name>.json`` or the probe's ``baseline.file``.

    ``name`` is the test's name: the probe's title, with ``[head]`` for one
    head of a ``head:`` glob (whose files are kept apart).
    """
    if spec.baseline is not None and spec.baseline.file:
        path = spec.path.parent / spec.baseline.file
        if name != spec.title:  # one head of a glob: keep files apart
            path = path.with_name(f"{path.stem}[{name[len(spec.title) + 1:-1]}]{path.suffix}")
        return path
    return spec.path.parent / "baselines" / f"{artifact_name(name)}.json"


def wanted(config: pytest.Config, spec: ProbeSpec, name: str) -> bool:
    """Whether this probe takes part in baseline checks.

    It does when it has a ``baseline:`` key, when every probe is asked to
    (``--neuronpatch-baselines`` or the ini key), when baselines are being
    written, and when a baseline file for it already exists (once written,
    a probe stays under regression).
    """
    return bool(spec.baseline is not None or config.getoption("neuronpatch_update_baselines")
                or config.getoption("neuronpatch_baselines") or config.getini("neuronpatch_baselines")
                or baseline_path(spec, name).is_file())


@dataclass(frozen=True)
class BaselineCheck:
    """The outcome of a baseline check for one probe."""

    status: str  # ok | drifted | missing | updated
    path: Path
    message: str = ""
    drifts: list[dict[str, Any]] = field(default_factory=list)

    def to_record(self) -> dict[str, Any]:
        """What the report shows: path, status and the drift rows."""
        return {"path": str(self.path), "status": self.status, "drifts": self.drifts}


def check_baseline(config: pytest.Config, spec: ProbeSpec, name: str, head_dir: Path,
                   metrics: dict[str, Any]) -> BaselineCheck:
    """Update or compare this probe's baseline."""
    from neuronpatch import baselines

    path = baseline_path(spec, name)
    shown = path.relative_to(config.rootpath) if path.is_relative_to(config.rootpath) else path
    if config.getoption("neuronpatch_update_baselines"):
        base = baselines.make_baseline(name, metrics, head_dir=head_dir)
        baselines.write_baseline(path, base)
        return BaselineCheck("updated", path, f"baseline written: {shown}")
    base_or_none = baselines.read_baseline(path)
    if base_or_none is None:
        return BaselineCheck("missing", path, f"probe {name!r} has no baseline at {shown}; "
                             f"run pytest with {baselines.UPDATE_FLAG} to create it")
    tolerance = spec.baseline.tolerance if spec.baseline is not None else {}
    drifts = baselines.compare(metrics, base_or_none, tolerance)
    rows = [d.__dict__ for d in drifts]
    if all(d.ok for d in drifts):
        return BaselineCheck("ok", path, drifts=rows)
    text = baselines.explain(drifts, base_or_none, head_dir=head_dir, baseline_path=shown)
    return BaselineCheck("drifted", path, f"probe {name!r}: {text}", rows)


def suggestion(result: ExperimentResult) -> dict[str, float]:
    """Baseline tolerances suggested by the spread of the metrics over resampled inputs."""
    from neuronpatch.baselines import suggest_tolerances

    return suggest_tolerances(result.activation_change, result.prediction_change,
                              result.clean_activation, result.clean_prediction)
