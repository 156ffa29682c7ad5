"""Verdicts that admit doubt: `confidence: c` gives pass, fail or inconclusive, through pytest.

demo_final's slope on four inputs has the 95% interval [0.854, 0.884] (0.861 and
[0.852, 0.872] on all ten): `{max: 0.88}` is inconclusive on four inputs and passes
on ten; `{max: 0.9}` passes and `{max: 0.8}` fails on four.
"""

from __future__ import annotations

import json
import shutil
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
FOUR = ["The cat sat on the mat.", "Open the file before you read from it.",
        "This module provides access to the operating system.",
        "The result is a new list; the original is unchanged."]


def _probe(name: str, rng: str, extra: str = "", inputs: str | None = None) -> str:
    return textwrap.dedent(f"""
        name: {name}
        head: heads/demo_final
        inputs: {inputs or json.dumps(FOUR)}
        interventions: {{set: [-0.5, 0, 0.5, 1, 1.5, 2, 2.5, 3]}}
        expect: {{slope: {rng}}}
        {extra}
        """).strip() + "\n"


@pytest.fixture(scope="module")
def warm() -> None:
    # In-process pytester runs must find every module already imported (see conftest).
    import importlib

    from neuronpatch.engine import run_experiment

    run_experiment(ROOT / "probes" / "heads" / "demo_final", inputs=["warm up"], set=[0, 1])
    for name in ("neuronpatch.plots", "matplotlib.pyplot", "jsonschema"):
        importlib.import_module(name)


@pytest.fixture
def suite(pytester: pytest.Pytester, warm: None) -> pytest.Pytester:
    shutil.copytree(ROOT / "probes" / "heads" / "demo_final", pytester.path / "heads" / "demo_final")
    shutil.copy(ROOT / "probes" / "inputs" / "demo.txt", pytester.path / "demo.txt")
    docs = [
        _probe("passes", "{max: 0.9, confidence: 0.95}"),
        _probe("fails", "{max: 0.8, confidence: 0.95}"),
        _probe("doubt default", "{max: 0.88, confidence: 0.95}"),
        _probe("doubt fail", "{max: 0.88, confidence: 0.95}", "on_inconclusive: fail"),
        _probe("doubt skip", "{max: 0.88, confidence: 0.95}", "on_inconclusive: skip"),
        _probe("doubt xfail", "{max: 0.88, confidence: 0.95}", "on_inconclusive: xfail"),
        _probe("decided by ten", "{max: 0.88, confidence: 0.95}", inputs="{file: demo.txt}"),
    ]
    (pytester.path / "claims.probe.yaml").write_text("---\n".join(docs))
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\nneuronpatch_figures = "none"\n')
    return pytester


def _summaries(path: Path) -> dict[str, dict]:
    out = {}
    for f in (path / ".neuronpatch" / "artifacts").glob("*/summary.json"):
        data = json.loads(f.read_text())
        out[data["probe"]["name"]] = data
    return out


def test_each_verdict_and_each_on_inconclusive(suite: pytest.Pytester) -> None:
    result = suite.runpytest("-p", "no:cacheprovider", "-v", "-rA", "--junitxml=junit.xml")
    # passes, decided by ten: passed; fails, doubt default, doubt fail: failed; skip; xfail.
    result.assert_outcomes(passed=2, failed=3, skipped=1, xfailed=1)
    out = result.stdout.str()
    result.stdout.fnmatch_lines_random([
        "*claims.probe.yaml::doubt default INCONCLUSIVE*",
        "*claims.probe.yaml::doubt fail INCONCLUSIVE*",
        "*claims.probe.yaml::doubt skip INCONCLUSIVE (skip)*",
        "*claims.probe.yaml::doubt xfail INCONCLUSIVE (xfail)*",
        "*claims.probe.yaml::fails FAILED*",
        "*claims.probe.yaml::passes PASSED*",
        "*claims.probe.yaml::decided by ten PASSED*",
    ])
    assert "slope inconclusive: 0.8685" in out and "inputs would decide it" in out
    data = _summaries(suite.path)
    assert data["passes"]["verdict"]["conclusion"] == "pass"
    assert data["fails"]["verdict"]["conclusion"] == "fail"
    assert data["decided by ten"]["verdict"]["conclusion"] == "pass"
    for name, outcome in [("doubt default", "failed"), ("doubt fail", "failed"),
                          ("doubt skip", "skipped"), ("doubt xfail", "xfailed")]:
        v = data[name]["verdict"]
        assert v["conclusion"] == "inconclusive" and v["outcome"] == outcome, (name, v)
        assert v["inputs_needed"] > 4
        e = data[name]["expectations"][0]
        assert e["status"] == "inconclusive" and e["interval"][0] < 0.88 < e["interval"][1]
    # The schema admits the new keys.
    import jsonschema
    schema = json.loads((ROOT / "src/neuronpatch/schemas/summary.schema.json").read_text())
    for d in data.values():
        jsonschema.validate(d, schema)
    verdicts = {c.get("name"): {p.get("name"): p.get("value") for p in c.iter("property")}
                for c in ET.parse(suite.path / "junit.xml").iter("testcase")}
    assert verdicts["doubt skip"]["neuronpatch.verdict"] == "inconclusive"
    assert "neuronpatch.inconclusive.slope" in verdicts["doubt xfail"]
    assert verdicts["passes"]["neuronpatch.verdict"] == "pass"


def test_ini_sets_the_default_and_a_probe_key_overrides_it(suite: pytest.Pytester) -> None:
    suite.makefile(".toml", pyproject='[tool.pytest.ini_options]\nneuronpatch_figures = "none"\n'
                                      'neuronpatch_on_inconclusive = "skip"\n')
    result = suite.runpytest("-p", "no:cacheprovider", "-k", "doubt")
    # default → skip (ini), fail → failed, skip → skipped, xfail → xfailed
    result.assert_outcomes(failed=1, skipped=2, xfailed=1)


def test_confidence_on_a_metric_without_an_interval_is_a_spec_error() -> None:
    from neuronpatch.errors import ProbeSpecError
    from neuronpatch.probes.expectations import parse_expectations

    with pytest.raises(ProbeSpecError, match="needs a metric with a bootstrap interval"):
        parse_expectations({"intercept": {"max": 1, "confidence": 0.95}})
    with pytest.raises(ProbeSpecError, match="expected a level"):
        parse_expectations({"slope": {"max": 1, "confidence": 95}})
