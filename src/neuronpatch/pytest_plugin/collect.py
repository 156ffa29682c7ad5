"""Probe files as pytest items.

:class:`ProbeFile` splits a ``*.probe.yaml`` into its YAML documents and makes
one :class:`ProbeItem` per probe (per document, and per head a ``head:`` glob
matches). A document that is not valid (YAML syntax, a duplicate key, the
schema, an unregistered mark) becomes one :class:`InvalidProbe` that errors
with *all* its ``FILE:LINE: key ...`` lines; the file's other documents still
run. Its node id is the one the fixed probe will have, so ``--lf`` reruns it.

A probe item runs in named steps, each handing the next plain values:

* **setup**: run the experiment (:mod:`.runner`); an engine error is an
  ERROR with one line, never a traceback into torch;
* **call**: check the expectations and write the artifacts (:mod:`.runner`),
  compare the baseline (:mod:`.ci`), fuzz (:mod:`.fuzz`), record what the
  report shows (:mod:`.report`), then pass, fail or skip.

Failures, errors and skips point at the probe file (``FILE:LINE``), so
``--tb=line`` and the short summary show where the claim was written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from neuronpatch.errors import ControlsError, NeuronpatchError, ProbeSpecError
from neuronpatch.probes.load import iter_probe_file
from neuronpatch.probes.schema import MarkSpec, ProbeSpec, probe_stem
from neuronpatch.pytest_plugin import ci
from neuronpatch.pytest_plugin.options import flag, inconclusive_mode, missing_mode, start_dir, user_path
from neuronpatch.pytest_plugin.outcomes import (
    INVALID_KEY,
    RECORD_KEY,
    Verdict,
    make_record,
    record_metrics,
    stable_id,
)
from neuronpatch.pytest_plugin.report import (
    ProbeError,
    ProbeFailed,
    crash_line,
    engine_error,
    failure_repr,
    probe_failure,
)
from neuronpatch.pytest_plugin.runner import get_runner

if TYPE_CHECKING:
    from _pytest._code.code import ExceptionInfo, TerminalRepr

    from neuronpatch.pytest_plugin.fuzz import FuzzOutcome
    from neuronpatch.result import ExperimentResult


def _registered_marks(config: pytest.Config) -> set[str]:
    # The same parsing as pytest's MarkGenerator: "name(args): help".
    return {line.split(":", 1)[0].split("(", 1)[0].strip() for line in config.getini("markers")}


def _mark_problems(spec: ProbeSpec, config: pytest.Config) -> list[str]:
    known = _registered_marks(config)
    problems = []
    for i, mark in enumerate(spec.marks):
        if mark.name not in known:
            # Unregistered marks only warn in pytest; in a probe file a typo would silently
            # escape `-m`, so it is an error that says how to register the mark.
            problems.append(
                f"{spec.where('marks', i)}: key 'marks[{i}]': mark {mark.name!r} is not "
                f"registered; expected a registered mark (add \"{mark.name}: ...\" to `markers` "
                "in your pytest configuration, or install the plugin that registers it) or one of "
                "skip, skipif, xfail, filterwarnings, usefixtures"
            )
    return problems


def _decorator(mark: MarkSpec) -> pytest.MarkDecorator:
    kwargs: dict[str, Any] = dict(mark.kwargs)
    if mark.reason is not None:
        kwargs["reason"] = mark.reason
    if mark.strict is not None:
        kwargs["strict"] = mark.strict
    decorator: pytest.MarkDecorator = getattr(pytest.mark, mark.name)
    # MarkDecorator(f) with one callable argument would decorate it; with_args never does.
    return decorator.with_args(*mark.args, **kwargs) if (mark.args or kwargs) else decorator


_GROUPS_KEY = pytest.StashKey[dict[Path, "str | None"]]()
_UNSAFE_GROUP = re.compile(r"[^A-Za-z0-9._/-]+")


def xdist_group(config: pytest.Config, spec: ProbeSpec, head_dir: Path) -> str | None:
    """Under ``--dist loadgroup``, the xdist group of a probe: by default the model its head names.

    Probes of one model then run on one worker, which loads that model once. The
    name is ``base_model_name`` as the head's config.json writes it (the same on
    every worker, wherever its copy of the project lies); an ``xdist_group``
    mark in the probe's ``marks`` names the group instead. None without
    loadgroup, or when the config cannot be read (the probe reports that itself).

    Example:
        >>> xdist_group(config, spec, Path("probes/heads/demo_causal"))   # doctest: +SKIP
        'neuronpatch-demo'
    """
    if not (getattr(config.option, "loadgroup", False) or config.getoption("dist", None) == "loadgroup"):
        return None
    for mark in spec.marks:
        if mark.name == "xdist_group":
            name = mark.args[0] if mark.args else mark.kwargs.get("name", "default")
            return _UNSAFE_GROUP.sub("_", str(name))[:200] or "default"
    groups = config.stash.setdefault(_GROUPS_KEY, {})
    if head_dir not in groups:
        from neuronpatch.limits import load_json_bounded

        try:
            raw = load_json_bounded(head_dir / "config.json", what="head config")
        except NeuronpatchError:
            raw = None
        name = raw.get("base_model_name") if isinstance(raw, dict) else None
        groups[head_dir] = _UNSAFE_GROUP.sub("_", name)[:200] if isinstance(name, str) and name else None
    return groups[head_dir]


class ProbeFile(pytest.File):
    """A ``*.probe.yaml`` / ``*.probe.yml`` file: one item per document and matched head."""

    def collect(self) -> Iterator[pytest.Item]:
        display = user_path(self.config, self.path)
        try:
            root = None if flag(self.config, "allow_outside_rootdir") else self.config.rootpath
            parsed = list(iter_probe_file(self.path, display=display, root=root))
        except ProbeSpecError as e:  # the file itself cannot be read
            yield InvalidProbe.from_parent(self, name=probe_stem(self.path), error=str(e), line=1)
            return
        for doc, spec in parsed:
            if isinstance(spec, ProbeSpecError):
                yield InvalidProbe.from_parent(self, name=doc.name_guess(), error=str(spec),
                                               line=doc.line)
                continue
            problems = _mark_problems(spec, self.config)
            if problems:
                yield InvalidProbe.from_parent(self, name=spec.title, error="\n".join(problems),
                                               line=doc.line)
                continue
            for head_dir, label in spec.heads():
                name = spec.title if label is None else f"{spec.title}[{label}]"
                group = xdist_group(self.config, spec, head_dir)
                # Under --dist loadgroup the node id ends in "@<group>", the form xdist's
                # scheduler reads (set here, as xdist's own suffix does not reach every pytest).
                grouped = {} if group is None else {"nodeid": f"{self.nodeid}::{name}@{group}"}
                item = ProbeItem.from_parent(self, name=name, spec=spec, head_dir=head_dir, **grouped)
                collision = ci.claim(self.config, spec, name, item.probe_id)
                if collision is None and ci.wanted(self.config, spec, name):
                    collision = ci.outside(self.config, spec, name)
                if collision is not None:
                    yield InvalidProbe.from_parent(self, name=name, error=collision, line=doc.line)
                    continue
                yield item


@dataclass(frozen=True)
class _Baseline:
    """What the baseline step found: a failure message, or a skip, or neither."""

    check: ci.BaselineCheck | None
    failure: str | None = None
    skip: str | None = None


class _OurFailures(pytest.Item):
    """Failures and errors of ours are shown as their text, at the probe file's line."""

    def repr_failure(
        self, excinfo: ExceptionInfo[BaseException], style: Any = None
    ) -> str | TerminalRepr:
        ours = self._ours(excinfo.value, style)
        return ours if ours is not None else super().repr_failure(excinfo, style=style)

    def _ours(self, exc: BaseException, style: Any) -> TerminalRepr | None:
        """Our failures as their text; a mistake a user can fix (a bad baseline, a file in the
        way) as one line at the probe file; anything else None (pytest's own traceback)."""
        if not isinstance(exc, NeuronpatchError):
            return None
        style = style or self.config.getoption("tbstyle", "auto")
        if isinstance(exc, (ProbeFailed, ProbeError)):
            return failure_repr(str(exc), exc.crash, exc.path or str(self.path), exc.line, style)
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        path, line, _ = self.reportinfo()
        return failure_repr(text, text, str(path), None if line is None else line + 1, style)

    # Setup errors go through _repr_failure_py (pytest calls repr_failure only for "call").
    def _repr_failure_py(
        self, excinfo: ExceptionInfo[BaseException], style: Any = None
    ) -> TerminalRepr:
        ours = self._ours(excinfo.value, style)
        return ours if ours is not None else super()._repr_failure_py(excinfo, style=style)

    def _skip_here(self, reason: str) -> None:
        # `_use_item_location`: the skip is reported at reportinfo() (the probe file's line).
        raise pytest.skip.Exception(reason, _use_item_location=True)


class ProbeItem(_OurFailures):
    """One probe run against one head directory."""

    def __init__(self, *, spec: ProbeSpec, head_dir: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.head_dir = head_dir
        # The node id without an xdist "@group": what artifacts, baselines and fuzz keys use.
        self.probe_id = f"{self.parent.nodeid}::{self.name}" if self.parent else self.nodeid
        self.result: ExperimentResult | None = None
        self.add_marker("neuronpatch")
        for mark in spec.marks:
            self.add_marker(_decorator(mark))
        # Fixtures as for a test function: autouse ones and `usefixtures` marks.
        self._fixtureinfo = self.session._fixturemanager.getfixtureinfo(node=self, func=None, cls=None)
        self.fixturenames = self._fixtureinfo.names_closure
        self.funcargs: dict[str, Any] = {}

    def needs_model(self) -> str | None:
        """The model this probe will run (its head's base model); None when the cache holds
        its result and it does not fuzz (so nothing needs loading for it)."""
        runner = get_runner(self.config)
        if self.spec.fuzz is None and runner.is_cached(self.head_dir, self.spec.run_kwargs()):
            return None
        return self.spec.checkpoint() or runner.model_of(self.head_dir)

    @property
    def head_text(self) -> str:
        """The head directory as the user would type it."""
        return user_path(self.config, self.head_dir)

    @property
    def display_path(self) -> str:
        """The probe file as messages name it."""
        return self.spec.document.display

    def setup(self) -> None:
        from _pytest.fixtures import TopRequest

        self._request = TopRequest(self, _ispytest=True)  # type: ignore[arg-type]
        self._request._fillfixtures()
        self.result = self.run_experiment()

    def runtest(self) -> None:
        verdict = self.check_expectations()
        baseline = self.check_baseline(verdict)
        fuzzed = self.fuzz()
        self.record(verdict, baseline, fuzzed)
        self.conclude(verdict, baseline, fuzzed)

    def teardown(self) -> None:
        self.result = None  # results hold arrays; do not keep one per item alive

    # ----- the steps -------------------------------------------------------------------
    def run_experiment(self) -> ExperimentResult:
        """The engine's result for this probe and head; an engine error is an ERROR."""
        path, line = self.display_path, self.spec.document.line
        try:
            return get_runner(self.config).run(self.head_dir, **self.spec.run_kwargs())
        except NeuronpatchError as e:
            message = engine_error(self.name, self.head_text, e)
            if isinstance(e, ControlsError) and self.spec.controls is not None:
                # controls this head cannot have (directions on an MLP neuron): at `controls:`
                message = f"{self.spec.where('controls')}: {message}"
                where, _, number = self.spec.where("controls").rpartition(":")
                path, line = where, int(number)
        # Outside the except block: the engine's exception chain is not printed.
        raise ProbeError(message, crash=message, path=path, line=line)

    def check_expectations(self) -> Verdict:
        """Check ``expect:`` and write the artifacts (summary.json, figures)."""
        assert self.result is not None, "setup() runs the experiment"
        verdict = get_runner(self.config).evaluate(
            self.result, self.spec.expectations, node_id=stable_id(self), title=self.name,
            source=self.spec.where(),
        )
        record_metrics(self, verdict)
        if verdict.artifacts is not None and verdict.artifacts.figure_error:
            self.warn(pytest.PytestWarning(
                f"neuronpatch: figures for {self.name!r} not written: "
                f"{verdict.artifacts.figure_error}"
            ))
        return verdict

    def check_baseline(self, verdict: Verdict) -> _Baseline:
        """Compare with (or write) the baseline, when this probe takes part."""
        if not ci.wanted(self.config, self.spec, self.name):
            return _Baseline(None)
        check = ci.check_baseline(self.config, self.spec, self.name, self.head_dir,
                                  dict(verdict.metrics), node_id=stable_id(self),
                                  expectations_hold=verdict.passed,
                                  why_not=crash_line("", verdict)[2].lstrip(": "))
        if check.status == "drifted":
            return _Baseline(check, failure=check.message)
        if check.status == "missing":
            if missing_mode(self.config) == "fail":
                return _Baseline(check, failure=check.message)
            return _Baseline(check, skip=check.message)
        return _Baseline(check)

    def fuzz(self) -> FuzzOutcome | None:
        """Run ``fuzz:`` (Hypothesis), when the probe has it."""
        if self.spec.fuzz is None:
            return None
        from neuronpatch.pytest_plugin import fuzz

        outcome = fuzz.run_fuzz(
            get_runner(self.config), self.head_dir, self.spec.fuzz, self.spec.run_kwargs(),
            fuzz_settings=fuzz.fuzz_settings(self.config), node_id=stable_id(self))
        fuzz.hand_to_hypothesis(self, outcome)  # --hypothesis-show-statistics, verbose examples
        return outcome

    def record(self, verdict: Verdict, baseline: _Baseline, fuzzed: FuzzOutcome | None) -> None:
        """What the report shows for this probe (travels to the controller)."""
        suggestion = None
        if flag(self.config, "suggest_tolerances") and self.result is not None:
            suggestion = ci.suggestion(self.result)
        self.stash[RECORD_KEY] = make_record(
            kind="probe", name=self.name, location=self.spec.where(), verdict=verdict,
            head=self.head_text, baseline=None if baseline.check is None else baseline.check.to_record(),
            fuzz=self._fuzz_text(fuzzed), suggestion=suggestion,
            embed=flag(self.config, "report_embed"),
        )

    def conclude(self, verdict: Verdict, baseline: _Baseline, fuzzed: FuzzOutcome | None) -> None:
        """Fail with every reason (the first as the crash line), skip, or pass."""
        title = f"probe {self.name!r}"
        messages: list[str] = []
        crashes: list[tuple[str | None, int | None, str]] = []
        doubt = verdict.status == "inconclusive" and inconclusive_mode(
            self.config, self.spec.on_inconclusive) != "fail"
        if not verdict.passed and not doubt:
            messages.append(probe_failure(title, verdict, head=self.head_text, result=self.result,
                                          base=start_dir(self.config)))
            crashes.append(crash_line(title, verdict))
        if baseline.failure:
            messages.append(baseline.failure)
            first = baseline.failure.splitlines()[0]
            crashes.append((self.display_path, self.spec.document.line, first))
        fuzz_text = self._fuzz_text(fuzzed)
        if fuzz_text is not None and fuzzed is not None and fuzzed.counterexample is not None:
            messages.append(fuzz_text)
            ce = fuzzed.counterexample
            fuzz_file, _, fuzz_line = self.spec.where("fuzz", "expect", ce.metric).rpartition(":")
            crashes.append((fuzz_file, int(fuzz_line), f"{title}: fuzz found {ce.metric} = {ce.value:.4g} "
                                             f"on {ce.text!r}, expected {ce.expected}"))
        if messages:
            crash_file, crash_no, crash = crashes[0]
            if len(crashes) > 1:
                crash += f" (+{len(crashes) - 1} more)"
            raise ProbeFailed("\n\n".join(messages), crash=crash,
                              path=crash_file or self.display_path, line=crash_no)
        if doubt:
            reason = f"INCONCLUSIVE {crash_line(title, verdict)[2]}"
            if inconclusive_mode(self.config, self.spec.on_inconclusive) == "xfail":
                pytest.xfail(reason)
            self._skip_here(reason)
        if baseline.skip:
            self._skip_here(baseline.skip)

    def _fuzz_text(self, fuzzed: FuzzOutcome | None) -> str | None:
        if fuzzed is None or fuzzed.counterexample is None or self.spec.fuzz is None:
            return None
        from neuronpatch.pytest_plugin import fuzz

        where = self.spec.where("fuzz", "expect", fuzzed.counterexample.metric)
        return fuzz.describe(fuzzed, self.spec.fuzz, where)

    def reportinfo(self) -> tuple[os.PathLike[str] | str, int | None, str]:
        return self.path, self.spec.document.line - 1, f"probe: {self.name}"


class InvalidProbe(_OurFailures):
    """A probe document that is not valid: errors with all its ``FILE:LINE`` lines."""

    def __init__(self, *, error: str, line: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.error = error
        self.line = line
        self.add_marker("neuronpatch")
        self.config.stash.setdefault(INVALID_KEY, []).append(error)

    def setup(self) -> None:
        lines = self.error.splitlines()
        first = lines[0]
        path, _, rest = first.partition(":")
        number, _, text = rest.partition(":")
        more = f" (+{len(lines) - 1} more)" if len(lines) > 1 else ""
        self.stash[RECORD_KEY] = make_record(kind="probe", name=self.name,
                                             location=f"{path}:{number}" if number.isdigit() else path)
        raise ProbeError(
            f"invalid probe {self.name!r}: {len(lines)} problem{'s' if len(lines) > 1 else ''}\n"
            + "\n".join(f"  {line}" for line in lines),
            crash=f"invalid probe {self.name!r}:{text}{more}" if number.isdigit() else first,
            path=path if number.isdigit() else str(self.path),
            line=int(number) if number.isdigit() else self.line,
        )

    def runtest(self) -> None:  # pragma: no cover - setup always fails
        pass

    def reportinfo(self) -> tuple[os.PathLike[str] | str, int | None, str]:
        return self.path, self.line - 1, f"invalid probe: {self.name}"
