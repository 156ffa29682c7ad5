"""Probe files under real pytest runs (pytester): verdicts, reports, errors, marks, ids, options.

The heads come from ``probe_heads`` (tests/conftest.py): ``causal`` has the
analytic slope ``w · W_out[3]`` with R² = 1, ``blind`` reads before its unit
(slope 0). Ranges are built around those oracles, so pass and fail are known
without running the engine first.
"""

from __future__ import annotations

import json
import re
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

INPUTS = ["The cat sat on the mat.", "Machine learning models", "The quick brown fox jumps"]
SETS = "{set: [-1, 0, 1, 2]}"

INI = """
[tool.pytest.ini_options]
markers = ["slow: takes a while"]
neuronpatch_figures = "none"
"""


@pytest.fixture
def project(pytester: pytest.Pytester, probe_heads):
    """A pytester dir with heads/causal, heads/blind and a pyproject registering `slow`."""
    probe_heads.copy_heads(pytester.path / "heads")
    pytester.makefile(".toml", pyproject=INI)
    return pytester


def probe_file(pytester: pytest.Pytester, name: str, text: str) -> Path:
    path = pytester.path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def line_of(path: Path, needle: str) -> int:
    """1-based line of the first line containing ``needle`` (the oracle for file:line)."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def causal_probe(slope_range: str, name: str = "causal", extra: str = "") -> str:
    return f"""
        name: {name}
        head: heads/causal
        inputs: {json.dumps(INPUTS)}
        interventions: {SETS}
        expect:
          slope: {slope_range}
          r_squared: {{min: 0.99}}
        {extra}
    """


def test_passing_and_failing_probes_in_one_multi_document_file(project, probe_heads):
    s = probe_heads.causal_slope
    path = probe_file(project, "claims.probe.yaml", f"""
        name: tracks its neuron
        head: heads/causal
        inputs: {json.dumps(INPUTS)}
        interventions: {SETS}
        expect:
          slope: {{approx: {s!r}, abs: 1.0e-4}}
          r_squared: {{min: 0.99}}
          per_input_slope: {{approx: {s!r}, abs: 1.0e-4}}
          slope_ci95: [{s - 0.01!r}, {s + 0.01!r}]
        ---
        name: claims a huge slope
        head: heads/causal
        inputs: {json.dumps(INPUTS)}
        interventions: {SETS}
        expect:
          r_squared: {{min: 0.99}}
          slope: [100, 200]
          per_input_slope: {{min: 100}}
        ---
        name: blind head ignores its neuron
        head: heads/blind
        interventions: {SETS}
        expect:
          slope: {{abs_max: 1.0e-6}}
    """)
    result = project.runpytest("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(passed=2, failed=1)
    out = result.stdout.str()
    # The custom report: no traceback, every expectation with value, range and file:line.
    assert "Traceback" not in out and "engine.py" not in out
    slope_line = line_of(path, "slope: [100, 200]")
    r2_line = slope_line - 1  # r_squared is the key right above, in the same document
    per_input_line = slope_line + 1
    result.stdout.re_match_lines([
        r"probe 'claims a huge slope' failed: 2 of 3 expectations not met",
        r"  head: heads/causal \(unit blocks\.0\.mlp\.hook_post\[3\], reads .*\)",
        rf"  FAIL  slope +  = {re.escape(f'{s:.6g}')} +expected \[100, 200\] +"
        rf"at claims\.probe\.yaml:{slope_line}",
        rf"  FAIL  per_input_slope  = 3 of 3 inputs out of range +expected ≥ 100 +"
        rf"at claims\.probe\.yaml:{per_input_line}",
        rf"        inputs\[0\] 'The cat sat on the mat\.' = {re.escape(f'{s:.6g}')}",
        rf"  pass  r_squared +  = 1 +expected ≥ 0\.99 +at claims\.probe\.yaml:{r2_line}",
        r"  artifacts: \.neuronpatch/artifacts/claims\.probe\.yaml_claims_a_huge_slope-\w+/",
        r"    summary\.json \(figures not written: see --neuronpatch-figures\)",
    ])
    result.stdout.fnmatch_lines(["FAILED claims.probe.yaml::claims a huge slope - probe *"])


def test_artifacts_hold_summary_with_outcomes(project, probe_heads):
    probe_file(project, "a.probe.yaml", causal_probe("[100, 200]", name="big"))
    result = project.runpytest("-p", "no:cacheprovider", "--neuronpatch-artifacts", "out")
    result.assert_outcomes(failed=1)
    [directory] = (project.path / "out").iterdir()
    assert directory.name.startswith("a.probe.yaml_big-")
    summary = json.loads((directory / "summary.json").read_text())
    # the seed's keys, plus the outcomes of this probe's expectations
    assert summary["target_layer"] == 0 and summary["target_neuron"] == 3
    assert summary["slope"] == pytest.approx(probe_heads.causal_slope, abs=1e-5)
    assert [(e["metric"], e["passed"], e["expected"]) for e in summary["expectations"]] == [
        ("slope", False, "[100, 200]"), ("r_squared", True, "≥ 0.99")]
    assert summary["expectations"][0]["source"] == "a.probe.yaml:6"
    assert summary["probe"]["name"] == "big" and summary["probe"]["passed"] is False


def test_an_engine_error_is_one_line_and_an_error_not_a_failure(project, probe_heads):
    from neuronpatch.testing import write_head

    write_head(project.path / "heads" / "bad", probe_heads.model, target_layer=0,
               target_neuron=999, feature_layer=1)
    probe_file(project, "bad.probe.yaml", """
        name: bad head
        head: heads/bad
        ---
        name: too long
        head: heads/causal
        inputs: ["%s"]
    """ % ("word " * 200))
    result = project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=2)
    out = result.stdout.str()
    assert "Traceback" not in out and "The above exception" not in out
    result.stdout.re_match_lines([
        r"_+ ERROR at setup of probe: bad head _+",
        r"probe 'bad head' could not run \(head heads/bad\): HeadConfigError: .*target_neuron.*",
        r"_+ ERROR at setup of probe: too long _+",
        r"probe 'too long' could not run \(head heads/causal\): InputError: input 0 .* tokens.*",
    ])


def test_a_broken_probe_file_never_stops_the_others(project):
    broken = probe_file(project, "broken.probe.yaml", """
        name: broken
        head: heads/causal
        expect:
          slope: [1, 0]
        colour: red
    """)
    probe_file(project, "syntax.probe.yaml", "head: heads/causal\nexpect: {slope: [0, 1\n")
    probe_file(project, "good.probe.yaml", "head: heads/blind\ninterventions: {set: [0, 1]}\n")
    result = project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines([
        "*ERROR at setup of invalid probe: broken*",
        "invalid probe 'broken': 2 problems",
        f"  broken.probe.yaml:{line_of(broken, 'slope')}: key 'expect.slope': range [1, 0] is "
        "inverted (lo > hi); expected lo < hi",
        f"  broken.probe.yaml:{line_of(broken, 'colour')}: key 'colour': unknown key; expected "
        "one of name, head, inputs, interventions, position, engine, model, expect, marks, baseline, fuzz, "
        "controls, rank, on_inconclusive",
        "*ERROR at setup of invalid probe: syntax*",
        "  syntax.probe.yaml:3: invalid YAML: *",
    ])


def test_one_broken_document_is_one_item_and_the_others_run(project):
    path = probe_file(project, "multi.probe.yaml", """
        name: first
        head: heads/blind
        interventions: {set: [0, 1]}
        ---
        name: second
        head: heads/causal
        expect: {slope: [0, 1}
        ---
        name: third
        head: heads/blind
        interventions: {set: [0, 1]}
        interventions: {set: [0, 2]}
        expect: {slop: [0, 1]}
        colour: red
        ---
        name: fourth
        head: heads/blind
        interventions: {set: [0, 1]}
    """)
    result = project.runpytest("-p", "no:cacheprovider", "-v")
    result.assert_outcomes(passed=2, errors=2)
    out = result.stdout.str()
    # The broken documents keep the ids the fixed probes will have.
    result.stdout.fnmatch_lines_random([
        "multi.probe.yaml::first PASSED*", "multi.probe.yaml::fourth PASSED*",
        "multi.probe.yaml::second ERROR*", "multi.probe.yaml::third ERROR*",
    ])
    # Every problem of the third document, each with its own line, in line order.
    dup, slop, colour = (line_of(path, "interventions: {set: [0, 2]}"), line_of(path, "slop:"),
                         line_of(path, "colour"))
    result.stdout.fnmatch_lines([
        "invalid probe 'third': 3 problems",
        f"  multi.probe.yaml:{dup}: key 'interventions': duplicate key (first defined at line "
        f"{dup - 1}); expected each key once per mapping",
        f"  multi.probe.yaml:{slop}: key 'expect.slop': unknown metric 'slop'*",
        f"  multi.probe.yaml:{colour}: key 'colour': unknown key*",
    ])
    assert f"multi.probe.yaml:{line_of(path, 'slope: [0, 1}')}: invalid YAML" in out


def test_collect_only_lists_every_probe_and_the_invalid_ones(project):
    probe_file(project, "many.probe.yml", """
        head: heads/*
        ---
        name: second
        head: heads/causal
        ---
        name: oops
        head: heads/causal
        expect: {slop: [0, 1]}
    """)
    result = project.runpytest("-p", "no:cacheprovider", "--collect-only", "-q")
    # pytest-randomly may shuffle the items; the listing is a set
    result.stdout.fnmatch_lines_random([
        "many.probe.yml::many[[]blind[]]",
        "many.probe.yml::many[[]causal[]]",
        "many.probe.yml::second",
        "many.probe.yml::oops",
    ])
    result.stdout.fnmatch_lines([
        "*neuronpatch: invalid probe files*",
        "many.probe.yml:8: key 'expect.slop': unknown metric 'slop' (did you mean 'slope'?)*",
    ])


def test_globs_name_each_head_and_k_selects_by_name(project):
    probe_file(project, "fleet.probe.yaml", """
        name: whole fleet
        head: heads/*
        interventions: {set: [0, 1]}
        expect:
          intercept: {abs_max: 1.0e-5}
    """)
    result = project.runpytest("-p", "no:cacheprovider", "-v", "-k", "fleet and causal")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["fleet.probe.yaml::whole fleet[[]causal[]] PASSED*"])
    assert "whole fleet[blind]" not in result.stdout.str()


def test_marks_skip_xfail_slow_and_unregistered(project):
    probe_file(project, "marks.probe.yaml", causal_probe("[100, 200]", name="known bug",
                                                         extra="marks: [{xfail: head untrained}]"))
    more = probe_file(project, "more.probe.yaml", """
        name: skipped
        head: heads/causal
        marks: [{skip: no time}]
        ---
        name: slow one
        head: heads/blind
        interventions: {set: [0, 1]}
        marks: [slow]
        ---
        name: typo mark
        head: heads/blind
        marks: [slwo]
    """)
    result = project.runpytest("-p", "no:cacheprovider", "-rsx", "-m", "not slow")
    result.assert_outcomes(xfailed=1, skipped=1, errors=1, deselected=1)
    result.stdout.fnmatch_lines_random([
        "XFAIL marks.probe.yaml::known bug - head untrained",
        "SKIPPED [[]1[]] more.probe.yaml*: no time",
        f"  more.probe.yaml:{line_of(more, 'slwo')}: key 'marks[[]0[]]': mark 'slwo' is not "
        "registered; expected a registered mark*",
    ])
    result = project.runpytest("-p", "no:cacheprovider", "-m", "slow")
    result.assert_outcomes(passed=1, deselected=3)


def test_xfail_strict_turns_an_unexpected_pass_into_a_failure(project, probe_heads):
    s = probe_heads.causal_slope
    probe_file(project, "x.probe.yaml", causal_probe(
        f"{{approx: {s!r}, abs: 1.0e-4}}", name="fixed now",
        extra="marks: [{xfail: {reason: was broken, strict: true}}]"))
    result = project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*XPASS(strict)*was broken*"])


def test_last_failed_reruns_only_the_failed_probe(project):
    probe_file(project, "lf.probe.yaml", """
        name: ok
        head: heads/blind
        interventions: {set: [0, 1]}
        expect: {slope: {abs_max: 1.0e-6}}
        ---
        name: nope
        head: heads/blind
        interventions: {set: [0, 1]}
        expect: {slope: {min: 1}}
    """)
    project.runpytest().assert_outcomes(passed=1, failed=1)
    result = project.runpytest("--lf", "-v")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["run-last-failure: rerun previous 1 failure",
                                 "lf.probe.yaml::nope FAILED*"])


def test_junit_xml_carries_key_metrics(project, probe_heads):
    probe_file(project, "j.probe.yaml", causal_probe("[100, 200]", name="junit"))
    result = project.runpytest("-p", "no:cacheprovider", "--junitxml=report.xml")
    result.assert_outcomes(failed=1)
    tree = ET.parse(project.path / "report.xml")
    props = {p.get("name"): p.get("value") for p in tree.iter("property")}
    assert float(props["neuronpatch.slope"]) == pytest.approx(probe_heads.causal_slope, abs=1e-5)
    assert float(props["neuronpatch.r_squared"]) == pytest.approx(1.0, abs=1e-6)
    assert props["neuronpatch.artifacts"].endswith(tuple("0123456789abcdef"))
    # metrics only: no transport data, no internal status
    assert set(props) == {"neuronpatch.slope", "neuronpatch.intercept", "neuronpatch.r_squared",
                          "neuronpatch.baseline_correlation", "neuronpatch.weight_cosine",
                          "neuronpatch.artifacts", "neuronpatch.verdict"}
    [case] = tree.iter("testcase")
    assert case.get("name") == "junit"


def test_options_come_from_the_ini_file_and_the_command_line_wins(project):
    project.makefile(".toml", pyproject=INI + 'neuronpatch_artifacts = "from_ini"\n'
                     'neuronpatch_batch_size = "2"\n')
    probe_file(project, "o.probe.yaml", "head: heads/blind\ninterventions: {set: [0, 1]}\n")
    project.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
    assert (project.path / "from_ini").is_dir()
    project.runpytest("-p", "no:cacheprovider", "--neuronpatch-artifacts", "from_cli",
                      "--neuronpatch-batch-size", "1", "--neuronpatch-device", "cpu"
                      ).assert_outcomes(passed=1)
    assert (project.path / "from_cli").is_dir()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--neuronpatch-batch-size", "0"],
         "--neuronpatch-batch-size = '0' is invalid; expected a positive integer*"),
        (["--neuronpatch-figures", "some"],
         "--neuronpatch-figures = 'some' is invalid; expected one of auto, all, failed, none"),
    ],
)
def test_bad_option_values_stop_the_session_once(project, args, message):
    result = project.runpytest("-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: {message}"])


def test_help_lists_the_options_and_ini_keys(project):
    result = project.runpytest("--help")
    result.stdout.fnmatch_lines_random([
        "*--neuronpatch-artifacts=DIR*", "*--neuronpatch-device=DEVICE*",
        "*--neuronpatch-batch-size=N*", "*neuronpatch_artifacts (string):*",
        "*neuronpatch_batch_size (int):*", "*neuronpatch_report (string):*",
        "*neuronpatch_update_baselines (bool):*", "*neuronpatch_suggest_tolerances (bool):*",
        "*neuronpatch_report_embed (bool):*", "*neuronpatch_remove_stale_baselines (bool):*",
    ])


def test_engine_key_forces_a_route_and_dtype(project, probe_heads):
    s = probe_heads.causal_slope
    probe_file(project, "engine.probe.yaml", f"""
        name: full route in float32
        head: heads/causal
        inputs: {json.dumps(INPUTS)}
        interventions: {SETS}
        engine: {{route: full, dtype: float32}}
        expect:
          slope: {{approx: {s!r}, abs: 1.0e-4}}
        ---
        name: a linear route cannot serve a head far from its unit
        head: heads/blind
        inputs: {json.dumps(INPUTS)}
        interventions: {SETS}
        engine: {{route: linear}}
        ---
        name: bad dtype
        head: heads/causal
        engine: {{dtype: float64}}
    """)
    result = project.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(["*route 'linear' cannot serve*"])
    result.stdout.fnmatch_lines(
        ["*engine.probe.yaml:17: key 'engine.dtype'*'float32', 'bfloat16' or 'float16'*"])


def test_dtype_option_is_checked(project):
    probe_file(project, "c.probe.yaml", causal_probe("[0, 1]"))
    result = project.runpytest("--neuronpatch-dtype=float8")
    result.stderr.fnmatch_lines(["*--neuronpatch-dtype = 'float8' is invalid; expected float32*"])


@pytest.mark.parametrize("case", ["corrupt baseline", "artifacts path is a file"])
def test_user_mistakes_in_files_fail_in_one_line_without_traceback(project, case):
    extra = "baseline: {file: base.json}" if case == "corrupt baseline" else ""
    probe_file(project, "p.probe.yaml", causal_probe("[-100, 100]", extra=extra))
    (project.path / "base.json").write_text('{"format": 1, "metr')
    (project.path / "blocker").write_text("a file where a directory belongs")
    args = ["--neuronpatch-artifacts", "blocker/arts"] if case == "artifacts path is a file" else []
    result = project.runpytest("-p", "no:randomly", *args)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "Traceback" not in out, out
    assert "site-packages" not in out and "src/neuronpatch" not in out, out
    want = "base.json: invalid JSON" if case == "corrupt baseline" else "blocker is a file, not a directory"
    assert sum(want in line for line in out.splitlines()) >= 1


def test_header_says_how_probes_run(project):
    probe_file(project, "c.probe.yaml", causal_probe("[0, 1]"))
    result = project.runpytest("--collect-only", "--neuronpatch-dtype=bfloat16",
                               "--hypothesis-profile=neuronpatch-ci")
    result.stdout.fnmatch_lines(["neuronpatch: device cpu, dtype bfloat16, artifacts .neuronpatch/artifacts, "
                                 "baselines compare where present, fuzz profile neuronpatch-ci"])
