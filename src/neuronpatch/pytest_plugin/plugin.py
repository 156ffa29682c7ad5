"""pytest entry point (``pytest11``): options, probe-file collection, fixtures, hooks.

The plugin is the first step of one way through: ``plugin`` → ``collect``
(probe files → items) → ``runner`` (engine, expectations, artifacts) → ``ci``
(baselines) → ``report`` (the failure text); ``session`` loads the models before
the tests and tells the run's outcomes at the end (summary line, HTML report).
What they share lies below them: ``options`` (every flag and ini key, the typed
settings, paths), ``channel`` (the one way xdist workers send the controller what
they made) and ``outcomes`` (verdicts, artifacts, records, JUnit, stash keys).
Imports go one way, down this list: ``plugin``, ``session``, ``collect``,
``runner``, ``ci``, ``report``, ``options``, ``channel``, ``outcomes``.

Loading this module imports nothing but pytest, the standard library and those
light modules, and it changes nothing for suites without probe files: probe
files are parsed by ``collect`` (pydantic, yaml) only when pytest meets one,
and the engine (torch) only when a probe or fixture runs.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from neuronpatch.names import PROBE_SUFFIXES
from neuronpatch.pytest_plugin import channel, ci, options, report, session
from neuronpatch.pytest_plugin.options import SETTINGS_KEY, settings_from_config

if TYPE_CHECKING:
    from neuronpatch.pytest_plugin.runner import ExpectFixture, Runner

Header = str | list[str]  # what one plugin's pytest_report_header returns


def pytest_addoption(parser: pytest.Parser) -> None:
    options.add_options(parser)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # Before Hypothesis's own plugin loads `--hypothesis-profile=neuronpatch-ci`, the
    # profile must exist; Hypothesis is imported only when one of ours is asked for.
    profile = config.getoption("hypothesis_profile", None)
    if isinstance(profile, str) and profile.startswith("neuronpatch-"):
        from neuronpatch.strategies import register_profiles

        register_profiles()
    # Validate options up front so a typo fails the session once, not every probe.
    config.stash[SETTINGS_KEY] = settings_from_config(config)
    options.check_options(config)
    # What xdist workers send reaches the controller through one channel.
    config.pluginmanager.register(channel.Channel(config, config.stash[SETTINGS_KEY].artifacts),
                                  "neuronpatch-channel")
    # Outcomes, the summary line and the HTML report live on a per-session object.
    config.pluginmanager.register(session.RunState(config), "neuronpatch-run-state")
    config.pluginmanager.register(ci.BaselineSession(config), "neuronpatch-baselines")
    config.pluginmanager.register(session.ModelLoading(config), "neuronpatch-model-loading")
    config.addinivalue_line("markers", "neuronpatch: a causal probe from a *.probe.yaml file")


@pytest.hookimpl(wrapper=True)
def pytest_report_header(config: pytest.Config) -> Generator[None, list[Header], list[Header]]:
    """One line saying how probes will run: device, dtype, artifacts, baselines, fuzz settings.

    Hypothesis's own header line (``hypothesis profile 'default'``, under ``-v``) names the
    profile its ``@given`` tests use, not the one fuzz probes use; it is folded into this
    line, so the header names both profiles once, each with what it applies to.
    """
    from neuronpatch.pytest_plugin.fuzz import fuzz_settings  # standard library only

    lines = yield
    ours = _header_line(config)
    fuzz = fuzz_settings(config)
    # Hypothesis names a profile laid over with --hypothesis-verbosity "<profile>-with-<v>-verbosity"
    same_as_fuzz = {f"profile {name!r}"
                    for name in (fuzz.profile, f"{fuzz.profile}-with-{fuzz.verbosity}-verbosity")}
    kept: list[Header] = []
    for entry in lines:
        group = [entry] if isinstance(entry, str) else list(entry)
        for line in [x for x in group if x.startswith("hypothesis profile ")]:
            theirs = line.removeprefix("hypothesis ")
            same = theirs.split(" -> ", 1)[0] in same_as_fuzz
            ours += (" (the same for Hypothesis @given tests)" if same
                     else f" (Hypothesis @given tests: {theirs})")
            group.remove(line)
        if group:
            kept.append(group)
    return [*kept, [ours]]


def _header_line(config: pytest.Config) -> str:
    from neuronpatch.pytest_plugin.fuzz import fuzz_settings

    s = config.stash[SETTINGS_KEY]
    baselines = ("update" if options.flag(config, "update_baselines")
                 or options.flag(config, "update_all_baselines") else "compare where present")
    try:
        artifacts = s.artifacts.relative_to(config.rootpath)
    except ValueError:
        artifacts = s.artifacts
    cache = "" if s.cache is None else f", cache {options.user_path(config, s.cache)}"
    return (f"neuronpatch: device {s.device}, dtype {s.dtype}, artifacts {artifacts}, "
            f"baselines {baselines}, fuzz profile {fuzz_settings(config).describe()}{cache}")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.name.endswith(PROBE_SUFFIXES):
        from neuronpatch.pytest_plugin.collect import ProbeFile

        return ProbeFile.from_parent(parent, path=file_path)
    return None


# tryfirst: the outermost wrapper, so it sees the report after xfail handling.
@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    rep = yield
    report.shorten_crash(item, call, rep)  # the one-line crash line of a failed probe
    channel.send(item, rep)  # the record and files the test made travel with its report
    return rep


@pytest.fixture(scope="session")
def neuronpatch_runner(request: pytest.FixtureRequest) -> Runner:
    """Session-wide runner: ``neuronpatch_runner.run(head, inputs=..., set=[...])``.

    Heads and models load once per session (and xdist worker); a relative head
    path is relative to pytest's rootdir.
    """
    from neuronpatch.pytest_plugin.runner import get_runner

    return get_runner(request.config)


@pytest.fixture
def neuronpatch_expect(request: pytest.FixtureRequest, neuronpatch_runner: Runner) -> ExpectFixture:
    """``neuronpatch_expect(result, slope=[0.8, 1.2], ...)``: probe-file checks in Python.

    Also writes the test's artifacts, records its metrics and puts the test in
    the ``neuronpatch:`` summary and the HTML report, as a probe does.
    """
    from neuronpatch.pytest_plugin.runner import ExpectFixture

    return ExpectFixture(request.node, neuronpatch_runner)


@pytest.fixture
def neuronpatch_artifacts_dir(request: pytest.FixtureRequest, neuronpatch_runner: Runner) -> Path:
    """This test's artifact directory (not created until something is written).

    Under xdist it is the controller's directory: what neuronpatch writes there
    travels to the controller, which writes it.
    """
    return neuronpatch_runner.artifact_dir(request.node.nodeid)
