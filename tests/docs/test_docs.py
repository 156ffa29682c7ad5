"""Every example in README.md and docs/ runs as written.

* a ```python block that defines ``test_*`` functions is a test module: it runs
  under pytest (with the plugin's fixtures) in a project laid out like this
  repository (``probes/heads``, ``probes/inputs``), and every test must pass;
* any other ```python block runs as a script from the repository root;
* a ```yaml block that is a probe (it has a ``head:``) runs as a probe file in
  ``probes/``, where its relative paths point.

Blocks are found by a plain Markdown fence scan; a block marked
``<!-- not run: reason -->`` on the line above is skipped with that reason, and a probe
marked ``<!-- fails: reason -->`` is an example of a failure: it runs and must fail (the
output printed under it is checked against a run by tests/docs/test_demo_readme.py).
"""

from __future__ import annotations

import re
import runpy
import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
_FENCE = re.compile(r"^(?:<!-- (?P<mark>not run|fails): (?P<why>[^>]*) -->\n)?```(?P<lang>\w+)\n"
                    r"(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks(lang: str) -> list:
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in _FENCE.finditer(text):
            if m.group("lang") != lang:
                continue
            line = text.count("\n", 0, m.start("body")) + 1
            marks = [pytest.mark.skip(reason=m.group("why"))] if m.group("mark") == "not run" else []
            fails = m.group("mark") == "fails"
            name = doc.relative_to(ROOT).as_posix()
            out.append(pytest.param(m.group("body"), fails, id=f"{name}:{line}", marks=marks))
    return out


def _project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A project with this repository's demo heads and inputs, as a user's would look."""
    for sub in ("heads", "inputs"):
        shutil.copytree(ROOT / "probes" / sub, pytester.path / "probes" / sub)
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\nneuronpatch_figures = "none"\n')
    return pytester


@pytest.fixture(autouse=True)
def _warm(probe_heads):
    """In-process pytester runs need the engine's imports done outside them (tests/conftest.py)."""


PYTHON = blocks("python")
PROBES = [p for p in blocks("yaml") if re.search(r"^head:", p.values[0], re.MULTILINE)]
FAILING = [p for p in PROBES if p.values[1]]


def test_the_docs_have_examples_to_run():
    assert len(PYTHON) >= 3 and len(PROBES) >= 3
    assert 1 <= len(FAILING) < len(PROBES) - 3  # examples of failures are the exception


@pytest.mark.parametrize(("code", "fails"), PYTHON)
def test_python_example_runs_as_written(code, fails, pytester, monkeypatch):
    assert not fails, "only probe examples may be marked as failing"
    if re.search(r"^def test_", code, re.MULTILINE):
        project = _project(pytester)
        project.makepyfile(test_doc_example=code)
        result = project.runpytest("-p", "no:cacheprovider", "-p", "no:randomly")
        outcomes = result.parseoutcomes()
        assert result.ret == 0 and outcomes.get("passed", 0) >= 1, result.stdout.str()[-3000:]
    else:
        script = pytester.path / "doc_example.py"
        script.write_text(code)
        monkeypatch.chdir(ROOT)
        runpy.run_path(str(script), run_name="__main__")


@pytest.mark.parametrize(("probe", "fails"), PROBES)
def test_probe_example_runs_as_written(probe, fails, pytester):
    project = _project(pytester)
    (project.path / "probes" / "doc_example.probe.yaml").write_text(probe)
    result = project.runpytest("-p", "no:cacheprovider", "probes")
    outcomes = result.parseoutcomes()
    if fails:  # an example of a failure: it fails, as a failure, not as an error
        assert result.ret == 1 and outcomes.get("failed", 0) >= 1, result.stdout.str()[-3000:]
        assert not outcomes.get("errors") and not outcomes.get("passed"), result.stdout.str()[-3000:]
    else:
        assert result.ret == 0 and outcomes.get("passed", 0) >= 1, result.stdout.str()[-3000:]
