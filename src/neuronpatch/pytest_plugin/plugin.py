"""pytest entry point (``pytest11``): options, probe-file collection, fixtures, hooks.

The plugin is the first step of one way through: ``plugin`` → ``collect``
(probe files → items) → ``runner`` (engine, expectations, artifacts) → ``ci``
(baselines) → ``report`` (failure text, JUnit, summary line, HTML). No module
imports one before it.

Loading this module imports nothing but pytest, the standard library and the
light ``runner``/``ci``/``report`` steps, and it changes nothing for suites
without probe files: probe files are parsed by ``collect`` (pydantic, yaml)
only when pytest meets one, and the engine (torch) only when a probe or
fixture runs.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from neuronpatch.names import PROBE_SUFFIXES
from neuronpatch.pytest_plugin import ci, report
from neuronpatch.pytest_plugin.runner import SETTINGS_KEY, ModelLoading, settings_from_config

if TYPE_CHECKING:
    from neuronpatch.pytest_plugin.runner import ExpectFixture, Runner

Header = str | list[str]  # what one plugin's pytest_report_header returns



def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("neuronpatch", "neuronpatch: causal probes of prediction heads")
    options = [
        ("artifacts", "DIR",
         "where each probe's summary.json and figures go, one directory per test "
         "(default .neuronpatch/artifacts under the rootdir)"),
        ("device", "DEVICE", "torch device for the models: auto (CUDA when available), cpu, cuda:N "
                             "(default cpu)"),
        ("dtype", "float32|bfloat16|float16", "dtype of the models (default float32)"),
        ("batch-size", "N", "rows per forward pass in the engine (default 64)"),
        ("figures", "auto|all|failed|none",
         "which tests draw the five figures (default auto: failed tests, and every test "
         "when an HTML report is written)"),
    ]
    for name, metavar, text in options:
        group.addoption(f"--neuronpatch-{name}", metavar=metavar, default=None, help=text)
        if name == "batch-size":
            parser.addini("neuronpatch_batch_size", help=text, type="int", default=None)
        else:
            parser.addini(f"neuronpatch_{name.replace('-', '_')}", help=text, default="")
    cache_help = ("reuse results of experiments whose model, head, inputs, options and library "
                  "versions are unchanged, from DIR (default .neuronpatch/cache under the rootdir; "
                  "write --neuronpatch-cache=DIR with '=')")
    group.addoption("--neuronpatch-cache", metavar="DIR", nargs="?", const="", default=None,
                    help=cache_help)
    parser.addini("neuronpatch_cache", default="",
                  help=cache_help + "; in the ini file: a directory (relative to the rootdir), "
                       "true for the default, or false")
    ci.add_options(group, parser)
    parser.addini("neuronpatch_on_inconclusive", default="fail",
                  help="pytest outcome of a probe whose only misses are inconclusive "
                       "(confidence: an interval straddling the range): fail, skip or xfail")


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
    # Outcomes, the summary line and the HTML report live on a per-session object.
    config.pluginmanager.register(report.RunState(config, config.stash[SETTINGS_KEY].artifacts),
                                  "neuronpatch-run-state")
    config.pluginmanager.register(ci.BaselineSession(config), "neuronpatch-baselines")
    config.pluginmanager.register(ModelLoading(config), "neuronpatch-model-loading")
    config.addinivalue_line("markers", "neuronpatch: a causal probe from a *.probe.yaml file")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """xdist controller: tell each worker where files go (the worker writes none itself)."""
    config = node.config
    node.workerinput[report.WORKER_INPUT] = {
        "artifacts": str(config.stash[SETTINGS_KEY].artifacts),
        "rootdir": str(config.rootpath),
        "invocation_dir": str(config.invocation_params.dir),
    }


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
    baselines = ("update" if report.flag(config, "update_baselines")
                 or report.flag(config, "update_all_baselines") else "compare where present")
    try:
        artifacts = s.artifacts.relative_to(config.rootpath)
    except ValueError:
        artifacts = s.artifacts
    cache = "" if s.cache is None else f", cache {report.user_path(config, s.cache)}"
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
    report.on_makereport(item, call, rep)
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
