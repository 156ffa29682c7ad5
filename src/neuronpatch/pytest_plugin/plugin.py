"""pytest entry point (``pytest11``): options, probe-file collection, fixtures.

Loading this module imports nothing but pytest and the standard library, and it
changes nothing for suites without probe files: probe files are parsed by
``collect`` (pydantic, yaml) only when pytest meets one, and the engine (torch)
only when a probe or fixture runs.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from neuronpatch.pytest_plugin import ci
from neuronpatch.pytest_plugin.runner import (
    FIGURES_KEY,
    INVALID_KEY,
    SETTINGS_KEY,
    settings_from_config,
)

if TYPE_CHECKING:
    from neuronpatch.pytest_plugin.runner import ExpectFixture, Runner

# Same as neuronpatch.probes.schema.PROBE_SUFFIXES, repeated so that loading the plugin
# does not import the schema (pydantic, yaml).
PROBE_SUFFIXES = (".probe.yaml", ".probe.yml")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("neuronpatch", "neuronpatch: causal probes of prediction heads")
    options = [
        ("artifacts", "DIR",
         "where each probe's summary.json and figures go, one directory per test "
         "(default .neuronpatch/artifacts under the rootdir)"),
        ("device", "DEVICE", "torch device for the models (default cpu)"),
        ("batch-size", "N", "rows per forward pass in the engine (default 64)"),
        ("figures", "all|failed|none", "which tests write the five figures (default all)"),
    ]
    for name, metavar, text in options:
        group.addoption(f"--neuronpatch-{name}", metavar=metavar, default=None, help=text)
        parser.addini(f"neuronpatch_{name.replace('-', '_')}", help=text, default="")
    ci.add_options(group, parser)


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
    ci.check_options(config)
    # Run statuses, the summary line and the HTML report live on a per-session object.
    config.pluginmanager.register(ci.RunState(config), "neuronpatch-run-state")
    config.addinivalue_line("markers", "neuronpatch: a causal probe from a *.probe.yaml file")


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Collector | None:
    if file_path.name.endswith(PROBE_SUFFIXES):
        from neuronpatch.pytest_plugin.collect import ProbeFile

        return ProbeFile.from_parent(parent, path=file_path)
    return None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    figures = item.stash.get(FIGURES_KEY, ())
    # Only when pytest-html is writing a report (--html): embedding costs time.
    if figures and report.when == "call" and getattr(item.config.option, "htmlpath", None):
        from neuronpatch.pytest_plugin.report import html_extras

        report.extras = [*getattr(report, "extras", []), *html_extras(figures)]  # type: ignore[attr-defined]
    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    invalid = config.stash.get(INVALID_KEY, [])
    if invalid and config.option.collectonly:
        terminalreporter.section("neuronpatch: invalid probe files", sep="=", red=True)
        for text in invalid:
            terminalreporter.line(text)


@pytest.fixture(scope="session")
def neuronpatch_runner(request: pytest.FixtureRequest) -> Runner:
    """Session-wide runner: ``neuronpatch_runner.run(head, inputs=..., set=[...])``.

    Heads and models load once per session (and xdist worker).
    """
    from neuronpatch.pytest_plugin.runner import get_runner

    return get_runner(request.config)


@pytest.fixture
def neuronpatch_expect(request: pytest.FixtureRequest, neuronpatch_runner: Runner) -> ExpectFixture:
    """``neuronpatch_expect(result, slope=[0.8, 1.2], ...)``: probe-file checks in Python.

    Also writes the test's artifacts and records its metrics, as a probe does.
    """
    from neuronpatch.pytest_plugin.runner import ExpectFixture

    return ExpectFixture(request.node, neuronpatch_runner)


@pytest.fixture
def neuronpatch_artifacts_dir(request: pytest.FixtureRequest, neuronpatch_runner: Runner) -> Path:
    """This test's artifact directory (not created until something is written)."""
    return neuronpatch_runner.artifact_dir(request.node.nodeid)
