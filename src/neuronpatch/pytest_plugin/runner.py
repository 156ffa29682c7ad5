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
and the five figures of :mod:`neuronpatch.plots`. Distinct node ids map to
distinct directories. An xdist worker writes none of them: its artifacts root is
the controller's, and what it would write goes into the test report for the
controller to write (:func:`.channel.write_shipments`), so workers in another
directory or on another machine leave nothing behind and lose nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from neuronpatch._io import ensure_directory
from neuronpatch.errors import NeuronpatchError
from neuronpatch.names import ALL_FIGURES
from neuronpatch.pytest_plugin.channel import OUTBOX_KEY, shipment
from neuronpatch.pytest_plugin.options import (
    SETTINGS_KEY,
    Settings,
    flag,
    settings_from_config,
    start_dir,
    user_path,
)
from neuronpatch.pytest_plugin.outcomes import (
    RECORD_KEY,
    Artifacts,
    Verdict,
    artifact_name,
    make_record,
    record_metrics,
    stable_id,
)
from neuronpatch.pytest_plugin.report import ProbeFailed, crash_line, probe_failure

if TYPE_CHECKING:
    from neuronpatch.heads import Head
    from neuronpatch.probes.expectations import Expectation, Outcome
    from neuronpatch.result import ExperimentResult

# The notebook's five figures, and the controls figure of a probe with controls, as
# neuronpatch.plots writes them (stale copies are removed).
FIGURE_NAMES: tuple[str, ...] = ALL_FIGURES

RUNNER_KEY = pytest.StashKey["Runner"]()


def get_runner(config: pytest.Config) -> Runner:
    """The session's runner (one per process, so one per xdist worker).

    Example:
        >>> get_runner(request.config).run("heads/causal", set=[0, 1])   # doctest: +SKIP
    """
    runner = config.stash.get(RUNNER_KEY, None)
    if runner is None:
        settings = config.stash.get(SETTINGS_KEY, None) or settings_from_config(config)
        runner = config.stash[RUNNER_KEY] = Runner(settings)
        runner.outbox = config.stash.setdefault(OUTBOX_KEY, [])
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
        self._heads: dict[tuple[Path, str | Path | None], Head] = {}
        # Artifact directories made on an xdist worker, for the controller to write.
        self.outbox: list[dict[str, Any]] = []
        # Models this process loaded for the session: {"model", "seconds", "device", "dtype"}.
        self.loads: list[dict[str, Any]] = []
        self.warnings: list[str] = []  # one line each, shown at the end of the run
        self._cache: Any = None  # neuronpatch.cache.ResultCache, made on first use

    def cache_counts(self) -> list[int] | None:
        """``[hits, misses]`` of the result cache this session used; None when it used none."""
        return None if self._cache is None else [self._cache.hits, self._cache.misses]

    @property
    def cache(self) -> Any:
        """The session's :class:`neuronpatch.cache.ResultCache`, or None without ``--neuronpatch-cache``."""
        if self._cache is None and self.settings.cache is not None:
            from neuronpatch.cache import ResultCache

            self._cache = ResultCache(self.settings.cache, warn=self.warnings.append)
        return self._cache

    def _cache_key(self, head_dir: Path, inputs: Sequence[str] | None,
                   kwargs: Mapping[str, Any]) -> str | None:
        from neuronpatch.cache import Uncachable

        model = kwargs.get("model")
        model_dir: Path | None
        try:
            if isinstance(model, (str, Path)):  # a checkpoint named by the probe (``model:``)
                from neuronpatch.models import resolve_model_path

                model_dir = resolve_model_path(model)
            else:
                model_dir = getattr(model, "path", None)
            return str(self.cache.key(head_dir, inputs=inputs, options=kwargs, model_dir=model_dir))
        except (Uncachable, NeuronpatchError, OSError):
            return None  # it just runs (a head that cannot load says so there)

    def _options(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(kwargs)
        out.setdefault("device", self.settings.device)
        out.setdefault("dtype", self.settings.dtype)
        out.setdefault("batch_size", self.settings.batch_size)
        return out

    def is_cached(self, head_dir: str | Path, run_kwargs: Mapping[str, Any]) -> bool:
        """Whether the cache holds this experiment (so its model need not be loaded for it)."""
        if self.cache is None or "rank" in run_kwargs:  # a ranking always needs the model
            return False
        kwargs = self._options(run_kwargs)
        inputs = kwargs.pop("inputs", None)
        key = self._cache_key((self.settings.root / head_dir).resolve(), inputs, kwargs)
        return key is not None and self.cache.path(key).is_file()

    def load_head(self, path: str | Path, checkpoint: str | Path | None = None) -> Head:
        """Load a head directory once per session (errors are the engine's one-liners).

        A relative path is relative to pytest's rootdir (``Settings.root``); ``checkpoint``
        is the model the head runs against when a probe names one (``model:``).
        """
        key = (self.settings.root / path).resolve()
        if (key, checkpoint) not in self._heads:
            from neuronpatch.heads import load_head

            self._heads[key, checkpoint] = load_head(key, checkpoint=checkpoint)
        return self._heads[key, checkpoint]

    def model_of(self, head_dir: str | Path) -> str | None:
        """The base model a head directory's config.json names (read as JSON, no torch); None
        when it cannot be read (the probe then reports that itself, as an error of its own)."""
        from neuronpatch.limits import load_json_bounded

        try:
            raw = load_json_bounded(Path(self.settings.root / head_dir) / "config.json",
                                    what="head config")
        except NeuronpatchError:
            return None
        name = raw.get("base_model_name") if isinstance(raw, dict) else None
        return name if isinstance(name, str) and name else None

    def ensure_model(self, name: str, *, announce: Any = None, done: Any = None) -> None:
        """Load model ``name`` (session device and dtype) unless this process holds it already.

        ``announce(name)`` is called before a load, ``done(text)`` after it with
        ``done in 1.2 s`` or the error; the load is kept in :attr:`loads`. An
        error is not raised here: the probe that needs the model reports it.
        """
        import time

        from neuronpatch import models
        device, dtype = self.settings.device, self.settings.dtype
        if models.is_loaded(name, device=device, dtype=dtype):
            return
        if announce is not None:
            announce(name)
        start = time.perf_counter()
        try:
            import neuronpatch.engine  # noqa: F401  (the engine's own imports belong to this step too)

            models.load_model(name, device=device, dtype=dtype)
        except NeuronpatchError as e:
            if done is not None:
                done(f"failed: {str(e).splitlines()[0]}")
            return
        seconds = time.perf_counter() - start
        self.loads.append({"model": name, "seconds": round(seconds, 3), "device": device,
                           "dtype": dtype})
        if done is not None:
            done(f"done in {seconds:.1f} s")

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
        kwargs = self._options(kwargs)
        rank = kwargs.pop("rank", None)
        result = self._cached(head, inputs, kwargs)
        if rank is None:
            return result
        # Only when a probe asks for the rank metric: every unit of the target's layer, ranked
        # (never cached: it needs the model).
        from neuronpatch import rank_units

        if isinstance(head, (str, Path)):
            head = self.load_head(head, _named(kwargs))
        common = {k: kwargs[k] for k in ("model", "device", "dtype", "batch_size") if k in kwargs}
        ranking = rank_units(head, inputs, **common, **dict(rank))
        return dataclasses.replace(result, ranking=ranking, notes=(*result.notes, ranking.describe()))

    def _cached(self, head: Head | str | Path, inputs: Sequence[str] | None,
                kwargs: dict[str, Any]) -> ExperimentResult:
        """The engine's result, from the cache when it holds it (then nothing is loaded)."""
        key = None
        if self.cache is not None:  # a hit needs neither torch nor the model
            head_dir = (self.settings.root / head).resolve() if isinstance(head, (str, Path)) \
                else Path(head.path)
            key = self._cache_key(head_dir, inputs, kwargs)
            hit = None if key is None else self.cache.get(key, head_path=str(head_dir))
            if hit is not None:
                return hit
        from neuronpatch.engine import run_experiment

        if isinstance(head, (str, Path)):
            head = self.load_head(head, _named(kwargs))
        result = run_experiment(head, inputs, **kwargs)
        if key is not None:
            try:
                self.cache.put(key, result)
            except (OSError, NeuronpatchError) as e:
                self.warnings.append(f"neuronpatch cache: result not stored in {self.settings.cache}: {e}")
        return result

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
                       reasons=dict(measured.reasons), controls=controls,
                       rounding=result.rounding_reading())

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
        shipped = self._shipped_as(out)
        if shipped is None:
            ensure_directory(out, "artifacts directory")  # a file in the way: one line, not a traceback
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
            bundle = files.build_artifacts(result, extra=extra, figures=figures, title=title,
                                           expected=expected)
        except Exception as e:  # a broken plot must not mask the verdict
            if not figures:
                raise
            error = f"{type(e).__name__}: {e}"
            bundle = files.build_artifacts(result, extra={**extra, "figures_error": error}, figures=False)
        if shipped is not None:
            self.outbox.append(shipment(shipped, bundle.summary, bundle.figures))
            return Artifacts(directory=out, summary=out / "summary.json",
                             figures=tuple(out / name for name in bundle.figures),
                             figure_error=error, figure_data=dict(bundle.figures))
        for name in FIGURE_NAMES:  # a figure from an earlier run would be mistaken for this one's
            (out / name).unlink(missing_ok=True)
        written = files.write_bundle(bundle, out)
        return Artifacts(directory=written.directory, summary=written.summary,
                         figures=tuple(written.figures), figure_error=error)

    def _shipped_as(self, out: Path) -> str | None:
        """On an xdist worker, ``out`` relative to the artifacts root (POSIX) when it lies
        there: those files go to the controller. None: write here."""
        if not self.settings.ship:
            return None
        try:
            rel = out.relative_to(self.settings.artifacts)
        except ValueError:
            return None
        return rel.as_posix() if rel.parts else None


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
            source = f"{user_path(self._item.config, file)}:{lineno}"
        expectations = parse_expectations(ranges, source=source)
        self._calls += 1
        item = self._item
        # A second call in the same test gets its own directory instead of overwriting.
        node_id = stable_id(item) if self._calls == 1 else f"{stable_id(item)}#{self._calls}"
        verdict = self._runner.evaluate(result, expectations, node_id=node_id, title=item.name,
                                        source=source)
        record_metrics(item, verdict)
        base = start_dir(item.config)
        head = user_path(item.config, result.head_path)
        item.stash[RECORD_KEY] = make_record(
            kind="test", name=item.name, location=source, verdict=verdict, head=head,
            embed=flag(item.config, "report_embed"))
        if not verdict.passed:
            title = f"test {item.name!r}"
            where, number, crash = crash_line(title, verdict)
            raise ProbeFailed(probe_failure(title, verdict, head=head, result=result, base=base),
                              crash=crash, path=where, line=number)
        return list(verdict.outcomes)


def _named(kwargs: Mapping[str, Any]) -> str | Path | None:
    """The checkpoint a probe names (``model:`` as a name or path), or None."""
    model = kwargs.get("model")
    return model if isinstance(model, (str, Path)) else None
