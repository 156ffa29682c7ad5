"""The plugin is cheap and invisible until a probe runs (subprocess pytest runs, fresh imports)."""

from __future__ import annotations

import json

import pytest

pytest_plugins = ["pytester"]

HEAVY = ("torch", "transformer_lens", "transformers", "matplotlib", "numpy")
# jaxtyping's own pytest plugin (installed with transformer_lens) and pytest-randomly (which
# reseeds numpy) import numpy; keep them out so the check is about neuronpatch alone.
QUIET = ("-p", "no:cacheprovider", "-p", "no:jaxtyping", "-p", "no:randomly")

# A conftest that reports which modules the session imported by the end of collection.
SPY = """
import json, sys

def pytest_collection_finish(session):
    loaded = sorted(m for m in {heavy!r} + ("pydantic", "yaml", "neuronpatch.pytest_plugin.collect")
                    if m in sys.modules)
    print("LOADED=" + json.dumps(loaded))
"""


def loaded_modules(result: pytest.RunResult) -> list[str]:
    [line] = [s for s in result.stdout.lines if s.startswith("LOADED=")]
    return json.loads(line.removeprefix("LOADED="))


def test_collecting_probe_files_imports_no_torch_no_transformer_lens_no_matplotlib(
    pytester: pytest.Pytester,
):
    (pytester.path / "heads" / "h").mkdir(parents=True)
    (pytester.path / "heads" / "h" / "config.json").write_text("{}")
    for i in range(20):
        (pytester.path / f"p{i}.probe.yaml").write_text(
            "head: heads/h\nexpect:\n  slope: [0.8, 1.2]\n---\nname: two\nhead: heads/*\n"
        )
    pytester.makeconftest(SPY.format(heavy=HEAVY))
    result = pytester.runpytest_subprocess("--collect-only", "-q", *QUIET)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["40 tests collected*"])
    loaded = loaded_modules(result)
    assert not set(loaded) & set(HEAVY), loaded
    assert "pydantic" in loaded  # the schema did run


def test_suites_without_probe_files_do_not_even_load_the_schema(pytester: pytest.Pytester):
    pytester.makepyfile("def test_plain():\n    assert True\n")
    pytester.makeconftest(SPY.format(heavy=HEAVY))
    result = pytester.runpytest_subprocess("-s", *QUIET)
    result.assert_outcomes(passed=1)
    loaded = loaded_modules(result)
    assert not set(loaded) & {*HEAVY, "pydantic", "neuronpatch.pytest_plugin.collect"}, loaded
    # and nothing of ours is written for a suite that never ran a probe
    assert not (pytester.path / ".neuronpatch").exists()


def test_the_plugin_is_registered_through_its_entry_point(pytester: pytest.Pytester):
    result = pytester.runpytest_subprocess("--co", "-q", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(["*no tests collected*"])
    # pytest lists entry-point plugins by distribution name in its header
    header = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    header.stdout.fnmatch_lines(["plugins:*neuronpatch-*"])
