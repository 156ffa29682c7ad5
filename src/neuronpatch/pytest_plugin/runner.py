"""The object behind the ``neuronpatch_runner`` fixture: run, check, write artifacts.

One :class:`Runner` per pytest session (and per xdist worker). It imports the
engine on first use, so loading the plugin or collecting probe files never
imports torch; models are cached by the engine per process and heads here, so
a session loads each model once.

The path a probe takes, in functions anyone can call (the CLI, a baseline
check, a fuzz loop)::

    result   = runner.run(head_dir, **spec.run_kwargs())           # engine
    verdict  = runner.evaluate(result, spec.expectations, node_id=...)  # check + artifacts
    message  = report.probe_failure(...)                             # words

A relative head path given to :meth:`Runner.run` (``"probes/heads/x"``) is
resolved against pytest's rootdir, never the current directory, so
``cd tests && pytest`` finds the same heads.

Artifacts go to ``<artifacts root>/<sanitized node id>/``: ``summary.json``
(the result's summary plus the expectation outcomes under ``"expectations"``)
and the five figures of :func:`neuronpatch.plots.write_figures`. Distinct node
ids map to distinct directories, so parallel workers never write the same file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import pytest

from neuronpatch._io import ensure_directory
from neuronpatch.pytest_plugin.report import (
    RECORD_KEY,
    Artifacts,
    ProbeFailed,
    Verdict,
    artifact_name,
    crash_line,
    flag,
    make_record,
    probe_failure,
    record_metrics,
    report_target,
    shown_path,
)
from neuronpatch.pytest_plugin.report import (
    ini as read_ini,
)

if TYPE_CHECKING:
    from neuronpatch.heads import Head
    from neuronpatch.probes.expectations import Expectation, Outcome
    from neuronpatch.result import ExperimentResult

FigureMode = Literal["auto", "all", "failed", "none"]
FIGURE_MODES: tuple[str, ...] = ("auto", "all", "failed", "none")
DEFAULT_ARTIFACTS = ".neuronpatch/artifacts"

# The notebook's five figures, and the controls figure of a probe with controls, as
# neuronpatch.plots writes them (stale copies are removed).
FIGURE_NAMES: tuple[str, ...] = (
    "baseline_correlation.png",
    "scaling_experiment.png",
    "pred_vs_act_change_all.png",
    "pred_vs_act_regression.png",
    "per_input_sensitivity.png",
    "controls.png",
)

SETTINGS_KEY = pytest.StashKey["Settings"]()
RUNNER_KEY = pytest.StashKey["Runner"]()


@dataclass(frozen=True)
class Settings:
    """Session options (``--neuronpatch-*`` flags or ``neuronpatch_*`` ini keys).

    Example:
        >>> Settings(artifacts=Path(".neuronpatch/artifacts")).figures
        'auto'
    """

    artifacts: Path
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 64
    figures: FigureMode = "auto"
    root: Path = Path()
    report: bool = False  # an HTML report (ours or pytest-html's) will show the figures


def settings_from_config(config: pytest.Config) -> Settings:
    """Read the options: command line first, then the ini key, then the default.

    A relative ``--neuronpatch-artifacts`` is relative to where pytest was started;
    a relative ``neuronpatch_artifacts`` ini value to the rootdir.

    Raises:
        pytest.UsageError: a bad batch size or figures mode (names the option).

    Example:
        >>> settings_from_config(config).device     # doctest: +SKIP
        'cpu'
    """

    def option(flag: str, ini: str) -> tuple[str | None, str]:
        value = config.getoption(flag.lstrip("-").replace("-", "_"))
        if value is not None:
            return value, flag
        raw = read_ini(config, ini, "a positive integer" if ini.endswith("batch_size") else "a string")
        ini_value = "" if raw is None else str(raw).strip()
        return (ini_value or None), f"ini key {ini}"

    artifacts, where = option("--neuronpatch-artifacts", "neuronpatch_artifacts")
    if artifacts is None:
        root = config.rootpath / DEFAULT_ARTIFACTS
    elif where.startswith("--"):
        root = config.invocation_params.dir / artifacts
    else:
        root = config.rootpath / artifacts
    device = option("--neuronpatch-device", "neuronpatch_device")[0] or "cpu"
    dtype, where = option("--neuronpatch-dtype", "neuronpatch_dtype")
    dtype = dtype or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise pytest.UsageError(f"{where} = {dtype!r} is invalid; expected float32, bfloat16 or float16")
    raw_batch, where = option("--neuronpatch-batch-size", "neuronpatch_batch_size")
    batch_size = 64
    if raw_batch is not None:
        try:
            batch_size = int(raw_batch)
        except ValueError:
            batch_size = 0
        if batch_size < 1:
            raise pytest.UsageError(
                f"{where} = {raw_batch!r} is invalid; expected a positive integer (rows per "
                "forward pass)"
            )
    figures, where = option("--neuronpatch-figures", "neuronpatch_figures")
    figures = figures or "auto"
    if figures not in FIGURE_MODES:
        raise pytest.UsageError(
            f"{where} = {figures!r} is invalid; expected one of {', '.join(FIGURE_MODES)}"
        )
    return Settings(artifacts=root, device=device, dtype=dtype, batch_size=batch_size,
                    figures=cast(FigureMode, figures), root=config.rootpath,
                    report=bool(report_target(config) is not None
                                or getattr(config.option, "htmlpath", None)))


def get_runner(config: pytest.Config) -> Runner:
    """The session's runner (one per process, so one per xdist worker).

    Example:
        >>> get_runner(request.config).run("heads/causal", set=[0, 1])   # doctest: +SKIP
    """
    runner = config.stash.get(RUNNER_KEY, None)
    if runner is None:
        settings = config.stash.get(SETTINGS_KEY, None) or settings_from_config(config)
        runner = config.stash[RUNNER_KEY] = Runner(settings)
    return runner


class Runner:
    """Runs experiments for probes and fixtures; loads each head (and model) once.

    Example:
        >>> def test_tracks(neuronpatch_runner):                     # doctest: +SKIP
        ...     res = neuronpatch_runner.run("heads/causal", inputs=["The cat sat."],
        ...                                  set=[0, 1, 2])
        ...     assert 0.8 < res.slope < 1.2
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._heads: dict[Path, Head] = {}

    def load_head(self, path: str | Path) -> Head:
        """Load a head directory once per session (errors are the engine's one-liners).

        A relative path is relative to pytest's rootdir (``Settings.root``).
        """
        key = (self.settings.root / path).resolve()
        if key not in self._heads:
            from neuronpatch.heads import load_head

            self._heads[key] = load_head(key)
        return self._heads[key]

    def run(
        self,
        head: Head | str | Path,
        inputs: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> ExperimentResult:
        """Run one patching experiment with the session's device and batch size.

        Args:
            head: a head directory (loaded once per session) or a loaded head.
            inputs: the texts; default the engine's eight seed sentences.
            **kwargs: anything :func:`neuronpatch.run_experiment` takes (``scale``,
                ``set``, ``add``, ``zero``, ``mean``, ``interventions``, ``position``,
                ``model``; ``device`` and ``batch_size`` override the session's), and
                ``rank``: keyword arguments of :func:`neuronpatch.rank_units` (``top``,
                ``screen``, ``interventions``), to rank every unit of the target's layer
                (the ``rank`` metric).

        Returns:
            The engine's :class:`~neuronpatch.result.ExperimentResult`.

        Example:
            >>> res = runner.run("heads/causal", inputs=["a b"], set=[0, 1])  # doctest: +SKIP
        """
        from neuronpatch.engine import run_experiment

        if isinstance(head, (str, Path)):
            head = self.load_head(head)
        kwargs.setdefault("device", self.settings.device)
        kwargs.setdefault("dtype", self.settings.dtype)
        kwargs.setdefault("batch_size", self.settings.batch_size)
        rank = kwargs.pop("rank", None)
        result = run_experiment(head, inputs, **kwargs)
        if rank is None:
            return result
        # Only when a probe asks for the rank metric: every unit of the target's layer, ranked.
        from neuronpatch import rank_units

        common = {k: kwargs[k] for k in ("model", "device", "dtype", "batch_size") if k in kwargs}
        ranking = rank_units(head, inputs, **common, **dict(rank))
        return dataclasses.replace(result, ranking=ranking, notes=(*result.notes, ranking.describe()))

    # ----- check + artifacts -------------------------------------------------------
    def artifact_dir(self, node_id: str) -> Path:
        """``<artifacts root>/<sanitized node id>``."""
        return self.settings.artifacts / artifact_name(node_id)

    def evaluate(
        self,
        result: ExperimentResult,
        expectations: Mapping[str, Any] | Iterable[Expectation],
        *,
        node_id: str,
        title: str | None = None,
        source: str | None = None,
    ) -> Verdict:
        """Check expectations and write this test's artifacts; never raises on a miss.

        Example:
            >>> v = runner.evaluate(res, {"slope": [0.8, 1.2]}, node_id="t.py::t")  # doctest: +SKIP
            >>> v.passed, v.artifacts.directory                                    # doctest: +SKIP
        """
        from neuronpatch.probes.expectations import Measurements, check

        measured = Measurements.of(result)
        outcomes = check(measured, expectations)
        passed = all(o.passed for o in outcomes)
        figures = self.wants_figures(passed)
        probe = {"name": title, "node_id": node_id, "source": source, "passed": passed}
        artifacts = self.write_artifacts(
            result, self.artifact_dir(node_id), outcomes=outcomes, probe=probe, figures=figures
        )
        controls = result.controls.to_dict() if result.controls is not None else None
        return Verdict(outcomes=outcomes, artifacts=artifacts, metrics=measured.values,
                       reasons=dict(measured.reasons), controls=controls)

    def wants_figures(self, passed: bool) -> bool:
        """Whether this test's figures are drawn (drawing dominates a probe's time).

        ``auto`` (the default) draws them for a failed test, and for every test
        when an HTML report will show them; ``all`` always; ``failed`` only for
        failures; ``none`` never.
        """
        mode = self.settings.figures
        if mode == "auto":
            return not passed or self.settings.report
        return mode == "all" or (mode == "failed" and not passed)

    def write_artifacts(
        self,
        result: ExperimentResult,
        out_dir: str | Path,
        *,
        outcomes: Sequence[Outcome] = (),
        probe: Mapping[str, Any] | None = None,
        figures: bool = True,
    ) -> Artifacts:
        """Write ``summary.json`` (with outcomes under ``"expectations"``) and the figures.

        A plotting failure does not hide the verdict: it is returned as
        ``figure_error`` (and written to summary.json) for the report to show.

        Example:
            >>> runner.write_artifacts(res, "out/probe").summary   # doctest: +SKIP
            PosixPath('out/probe/summary.json')
        """
        from neuronpatch import artifacts as files

        out = Path(out_dir)
        ensure_directory(out, "artifacts directory")  # a file in the way: one line, not a traceback
        for name in FIGURE_NAMES:  # a figure from an earlier run would be mistaken for this one's
            (out / name).unlink(missing_ok=True)
        extra: dict[str, Any] = {"expectations": [o.to_dict() for o in outcomes]}
        if probe is not None:
            extra["probe"] = dict(probe)
        if outcomes:
            failed = [o for o in outcomes if not o.passed]
            doubt = [o for o in outcomes if o.inconclusive]
            extra["verdict"] = {
                "outcome": None,  # pytest's word, stamped in once the test has a report
                "conclusion": ("fail" if any(o.status == "fail" for o in outcomes)
                               else "inconclusive" if doubt else "pass"),
                "inputs_needed": max((o.inputs_needed or 0 for o in doubt), default=None) or None,
                "expectations_met": not failed,
                "reasons": [_reason_line(o) for o in failed],
                "reading": result.interpretation(),
            }
        title = probe.get("name") if probe else None
        expected = {o.metric: o.expected for o in outcomes}
        error = None
        try:
            written = files.write_artifacts(result, out, extra=extra, figures=figures, title=title,
                                            expected=expected)
        except Exception as e:  # a broken plot must not mask the verdict
            if not figures:
                raise
            error = f"{type(e).__name__}: {e}"
            written = files.write_artifacts(
                result, out, extra={**extra, "figures_error": error}, figures=False
            )
        return Artifacts(directory=written.directory, summary=written.summary,
                         figures=tuple(written.figures), figure_error=error)


def _reason_line(outcome: Outcome) -> str:
    where = f" at {outcome.source}" if outcome.source else ""
    why = f" ({outcome.details[0]})" if outcome.details else ""
    return f"{outcome.metric} = {outcome.measured_text}, expected {outcome.expected}{where}{why}"


class ExpectFixture:
    """The ``neuronpatch_expect`` fixture: :func:`~neuronpatch.probes.expect` for a test,
    plus what a probe gets: artifacts, JUnit metrics, a row in the report, figures in pytest-html.

    Example:
        >>> def test_tracks(neuronpatch_runner, neuronpatch_expect):   # doctest: +SKIP
        ...     res = neuronpatch_runner.run("heads/causal", set=[0, 1, 2])
        ...     neuronpatch_expect(res, slope=[0.8, 1.2], r_squared={"min": 0.9})
    """

    def __init__(self, item: pytest.Item, runner: Runner) -> None:
        self._item = item
        self._runner = runner
        self._calls = 0

    def __call__(self, result: ExperimentResult, /, **ranges: Any) -> list[Outcome]:
        """Check ``metric=range`` keywords; raise with the probe-style report on a miss."""
        __tracebackhide__ = True
        from neuronpatch.errors import ProbeSpecError
        from neuronpatch.probes.expectations import caller_source, parse_expectations

        if not ranges:
            raise ProbeSpecError(
                "neuronpatch_expect() got no expectations; expected metric=range keywords, "
                "e.g. slope=[0.8, 1.2]"
            )
        source = caller_source(1)
        if source is not None:  # as the user types it: relative to where pytest was started
            file, _, lineno = source.rpartition(":")
            source = f"{shown_path(file, self._item.config.invocation_params.dir)}:{lineno}"
        expectations = parse_expectations(ranges, source=source)
        self._calls += 1
        item = self._item
        # A second call in the same test gets its own directory instead of overwriting.
        node_id = item.nodeid if self._calls == 1 else f"{item.nodeid}#{self._calls}"
        verdict = self._runner.evaluate(result, expectations, node_id=node_id, title=item.name,
                                        source=source)
        record_metrics(item, verdict)
        base = item.config.invocation_params.dir
        head = shown_path(result.head_path, base)
        item.stash[RECORD_KEY] = make_record(
            kind="test", name=item.name, location=source, verdict=verdict, head=head,
            embed=flag(item.config, "report_embed"))
        if not verdict.passed:
            title = f"test {item.name!r}"
            where, number, crash = crash_line(title, verdict)
            raise ProbeFailed(probe_failure(title, verdict, head=head, result=result, base=base),
                              crash=crash, path=where, line=number)
        return list(verdict.outcomes)
