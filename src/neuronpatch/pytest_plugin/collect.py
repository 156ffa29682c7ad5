"""Probe files as pytest items.

:class:`ProbeFile` turns a ``*.probe.yaml`` into one :class:`ProbeItem` per
probe (per YAML document, and per head a ``head:`` glob matches). Each item:

* **setup** runs the experiment: an engine error (bad head, bad input) is an
  ERROR of that test with one line, never a traceback into torch;
* **call** checks the expectations, writes the artifacts and fails with a
  report of every expectation (``FAIL``/``pass``, value, range, ``file:line``)
  and where the figures are.

A document that does not follow the schema becomes an :class:`InvalidProbe`
item that errors with the ``FILE:LINE: key ...`` lines: pytest stops a whole
session on a collection error, and one broken probe file must not keep the
others from running. Its node id is the one the fixed probe will have, so
``--lf`` reruns it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from neuronpatch.errors import NeuronpatchError, ProbeSpecError
from neuronpatch.probes.schema import MarkSpec, ProbeSpec, iter_probe_file, probe_stem
from neuronpatch.pytest_plugin import ci, report
from neuronpatch.pytest_plugin.runner import FIGURES_KEY, INVALID_KEY, get_runner

if TYPE_CHECKING:
    from _pytest._code.code import ExceptionInfo, TerminalRepr

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
                "in your pytest configuration) or one of skip, xfail"
            )
    return problems


def _decorator(mark: MarkSpec) -> pytest.MarkDecorator:
    kwargs: dict[str, Any] = {}
    if mark.reason is not None:
        kwargs["reason"] = mark.reason
    if mark.strict is not None:
        kwargs["strict"] = mark.strict
    decorator: pytest.MarkDecorator = getattr(pytest.mark, mark.name)
    return decorator(**kwargs) if kwargs else decorator


class ProbeFile(pytest.File):
    """A ``*.probe.yaml`` / ``*.probe.yml`` file: one item per probe and matched head."""

    def _display(self) -> str:
        return report.shown_path(self.path, self.config.invocation_params.dir)

    def collect(self) -> Iterator[pytest.Item]:
        display = self._display()
        try:
            parsed = list(iter_probe_file(self.path, display=display))
        except ProbeSpecError as e:
            yield InvalidProbe.from_parent(self, name=probe_stem(self.path), error=str(e), line=1)
            return
        for doc, spec in parsed:
            if isinstance(spec, ProbeSpecError):
                yield InvalidProbe.from_parent(
                    self, name=doc.name_guess(), error=str(spec), line=doc.line
                )
                continue
            problems = _mark_problems(spec, self.config)
            if problems:
                yield InvalidProbe.from_parent(
                    self, name=spec.title, error="\n".join(problems), line=doc.line
                )
                continue
            for head_dir, label in spec.heads():
                name = spec.title if label is None else f"{spec.title}[{label}]"
                yield ProbeItem.from_parent(self, name=name, spec=spec, head_dir=head_dir)


class ProbeItem(pytest.Item):
    """One probe run against one head directory."""

    def __init__(self, *, spec: ProbeSpec, head_dir: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.head_dir = head_dir
        self.result: ExperimentResult | None = None
        self.add_marker("neuronpatch")
        for mark in spec.marks:
            self.add_marker(_decorator(mark))

    @property
    def head_text(self) -> str:
        """The head directory as the user would type it."""
        return report.shown_path(self.head_dir, self.config.invocation_params.dir)

    def setup(self) -> None:
        try:
            self.result = get_runner(self.config).run(self.head_dir, **self.spec.run_kwargs())
        except NeuronpatchError as e:
            message = report.engine_error(self.name, self.head_text, e)
        else:
            return
        # Outside the except block: the engine's exception chain is not printed.
        pytest.fail(message, pytrace=False)

    def runtest(self) -> None:
        assert self.result is not None, "setup() runs the experiment"
        runner = get_runner(self.config)
        verdict = runner.evaluate(
            self.result, self.spec.expectations, node_id=self.nodeid, title=self.name,
            source=self.spec.where(),
        )
        report.record(self, verdict, FIGURES_KEY)
        if verdict.artifacts is not None and verdict.artifacts.figure_error:
            self.warn(pytest.PytestWarning(
                f"neuronpatch: figures for {self.name!r} not written: "
                f"{verdict.artifacts.figure_error}"
            ))
        messages: list[str] = []
        status = "passed"
        if not verdict.passed:
            status = "failed"
            messages.append(report.probe_failure(
                f"probe {self.name!r}", verdict, head=self.head_text, result=self.result,
                base=self.config.invocation_params.dir,
            ))
        check = None
        if ci.wanted(self):
            check = ci.check_baseline(self, self.result, dict(verdict.metrics))
            if check.status == "drifted":
                status = "drifted" if status == "passed" else status
                messages.append(check.message)
            elif check.status == "missing":
                status = "missing" if status == "passed" else status
                if ci.missing_mode(self.config) == "fail":
                    messages.append(check.message)
            elif check.status == "updated":
                status = "updated" if status == "passed" else status
        if self.spec.fuzz is not None:
            from neuronpatch.pytest_plugin import fuzz

            found = fuzz.run_fuzz(
                get_runner(self.config), self.head_dir, self.spec.fuzz, self.spec.run_kwargs(),
                profile=self.config.getoption("hypothesis_profile", None), node_id=self.nodeid)
            if found.counterexample is not None:
                status = "failed"
                where = self.spec.where("fuzz", "expect", found.counterexample.metric)
                messages.append(fuzz.describe(found, self.spec.fuzz, where))
        if self.config.getoption("neuronpatch_suggest_tolerances"):
            import json

            self.user_properties.append((ci.SUGGEST_PROP, json.dumps(ci.suggestion(self.result))))
        self.user_properties.append((ci.STATUS_PROP, status))
        if self.config.getoption("neuronpatch_report"):
            self.user_properties.append((ci.RECORD_PROP, ci.make_record(
                self, status, message="\n\n".join(messages),
                outcomes=[o.to_dict() for o in verdict.outcomes], metrics=dict(verdict.metrics),
                baseline=check, figures=self.stash.get(FIGURES_KEY, ()))))
        if messages:
            raise report.ProbeFailed("\n\n".join(messages))
        if check is not None and check.status == "missing":
            pytest.skip(check.message)

    def teardown(self) -> None:
        self.result = None  # results hold arrays; do not keep one per item alive

    def repr_failure(
        self, excinfo: ExceptionInfo[BaseException], style: Any = None
    ) -> str | TerminalRepr:
        if isinstance(excinfo.value, report.ProbeFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[os.PathLike[str] | str, int | None, str]:
        return self.path, self.spec.document.line - 1, f"probe: {self.name}"


class InvalidProbe(pytest.Item):
    """A probe document that does not follow the schema: errors with its ``FILE:LINE`` lines."""

    def __init__(self, *, error: str, line: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.error = error
        self.line = line
        self.add_marker("neuronpatch")
        self.config.stash.setdefault(INVALID_KEY, []).append(error)

    def setup(self) -> None:
        pytest.fail(self.error, pytrace=False)

    def runtest(self) -> None:  # pragma: no cover - setup always fails
        pass

    def reportinfo(self) -> tuple[os.PathLike[str] | str, int | None, str]:
        return self.path, self.line - 1, f"invalid probe: {self.name}"
