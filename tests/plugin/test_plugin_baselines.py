"""Whose baseline is it: identity from the node id, update semantics, stale files, collisions."""

from __future__ import annotations

import json

import pytest

pytest_plugins = ["pytester"]

PROBE = """name: {name}
head: heads/causal
inputs: ["The cat sat on the mat.", "Machine learning models"]
interventions: {{set: [0, 1]}}
baseline: {{}}
expect:
  slope: {slope}
"""
INI = '[tool.pytest.ini_options]\nneuronpatch_figures = "none"\n'
Q = ("-p", "no:cacheprovider", "-p", "no:randomly")


@pytest.fixture
def project(pytester: pytest.Pytester, probe_heads):
    probe_heads.copy_heads(pytester.path / "heads")
    pytester.makefile(".toml", pyproject=INI)
    return pytester


def write(project: pytest.Pytester, file: str, name: str, slope: str = "{min: -1000}") -> None:
    (project.path / file).write_text(PROBE.format(name=name, slope=slope))


def test_same_name_in_two_files_gets_two_baselines_keyed_on_the_node_id(project):
    write(project, "a.probe.yaml", "tracks")
    write(project, "b.probe.yaml", "tracks")
    project.runpytest(*Q, "--neuronpatch-update-baselines").assert_outcomes(passed=2)
    a = json.loads((project.path / "baselines" / "a" / "tracks.json").read_text())
    b = json.loads((project.path / "baselines" / "b" / "tracks.json").read_text())
    assert (a["node"], b["node"]) == ("a.probe.yaml::tracks", "b.probe.yaml::tracks")
    # both compare against their own file: nothing drifts, nothing is stale
    again = project.runpytest(*Q)
    again.assert_outcomes(passed=2)
    assert "stale" not in again.stdout.str()


def test_two_probes_mapping_to_one_file_are_a_collection_error_naming_both(project):
    (project.path / "c.probe.yaml").write_text(
        PROBE.format(name="a b", slope="{min: -1000}") + "---\n"
        + PROBE.format(name="a_b", slope="{min: -1000}"))
    res = project.runpytest(*Q, "--neuronpatch-update-baselines")
    res.assert_outcomes(passed=1, errors=1)
    res.stdout.fnmatch_lines(["*c.probe.yaml:9: key 'name': probe 'c.probe.yaml::a_b' would share "
                              "the baseline file baselines/c/a_b.json with probe 'c.probe.yaml::a b'*"])


def test_update_writes_only_probes_whose_expectations_hold(project):
    write(project, "ok.probe.yaml", "holds")
    write(project, "bad.probe.yaml", "breaks", slope="{min: 1000}")
    res = project.runpytest(*Q, "--neuronpatch-update-baselines")
    res.assert_outcomes(passed=1, failed=1)  # the update still reports what failed
    assert (project.path / "baselines" / "ok" / "holds.json").is_file()
    assert not (project.path / "baselines" / "bad").exists()
    res.stdout.fnmatch_lines(["1 baseline(s) written",
                              "not updated: bad.probe.yaml::breaks: expectations failed (slope *"])
    every = project.runpytest(*Q, "--neuronpatch-update-all-baselines")
    every.assert_outcomes(passed=1, failed=1)
    assert (project.path / "baselines" / "bad" / "breaks.json").is_file()


def test_update_from_the_ini_key(project):
    project.makefile(".toml", pyproject=INI + "neuronpatch_update_baselines = true\n")
    write(project, "ok.probe.yaml", "holds")
    project.runpytest(*Q).assert_outcomes(passed=1)
    assert (project.path / "baselines" / "ok" / "holds.json").is_file()


def test_a_renamed_probe_leaves_a_stale_baseline_listed_then_removed_on_request(project):
    write(project, "a.probe.yaml", "old name")
    write(project, "gone.probe.yaml", "whatever")
    project.runpytest(*Q, "--neuronpatch-update-baselines").assert_outcomes(passed=2)
    write(project, "a.probe.yaml", "new name")
    (project.path / "gone.probe.yaml").rename(project.path / "moved.probe.yaml")
    (project.path / "baselines" / "a" / ".old_name.json.neuronpatch-tmp-1-x").write_text("{")
    res = project.runpytest(*Q, "--neuronpatch-missing-baseline=skip")
    res.assert_outcomes(skipped=2)
    res.stdout.fnmatch_lines(["2 stale baseline(s), no collected probe maps to them*",
                              "  baselines/a/old_name.json", "  baselines/gone/whatever.json"])
    assert (project.path / "baselines" / "a" / "old_name.json").is_file()  # listing deletes nothing
    removed = project.runpytest(*Q, "--neuronpatch-update-baselines",
                                "--neuronpatch-remove-stale-baselines")
    removed.assert_outcomes(passed=2)
    removed.stdout.fnmatch_lines(["2 stale baseline(s) removed: baselines/a/old_name.json, "
                                  "baselines/gone/whatever.json"])
    assert sorted(p.relative_to(project.path / "baselines").as_posix()
                  for p in (project.path / "baselines").rglob("*.json")) == [
        "a/new_name.json", "moved/whatever.json"]


# ----- hostile probe files: paths outside the rootdir, the alias bomb ------------------------


def test_baseline_and_inputs_files_outside_the_rootdir_are_errors_at_file_line(project):
    outside = project.path.parent / f"{project.path.name}-outside"
    outside.mkdir()
    (outside / "secrets.txt").write_text("root:x:0:0\n")
    rel = f"../{outside.name}"
    (project.path / "out.probe.yaml").write_text(
        PROBE.format(name="writes", slope="{min: -1000}").replace(
            "baseline: {}", f"baseline: {{file: {rel}/outside.json}}")
        + "---\n" + PROBE.format(name="reads", slope="{min: -1000}").replace(
            'inputs: ["The cat sat on the mat.", "Machine learning models"]',
            f"inputs: {{file: {rel}/secrets.txt}}"))
    res = project.runpytest(*Q, "--neuronpatch-update-baselines")
    res.assert_outcomes(errors=2)
    res.stdout.fnmatch_lines([
        f"*out.probe.yaml:5: key 'baseline.file': baseline file '{rel}/outside.json' resolves to "
        f"*, outside the rootdir *; expected a path inside the repository "
        "(--neuronpatch-allow-outside-rootdir allows it)*",
        f"*out.probe.yaml:11: key 'inputs': inputs file '{rel}/secrets.txt' resolves to *outside "
        "the rootdir*"])
    assert not (outside / "outside.json").exists()
    allowed = project.runpytest(*Q, "--neuronpatch-update-baselines",
                                "--neuronpatch-allow-outside-rootdir")
    allowed.assert_outcomes(passed=2)
    assert (outside / "outside.json").is_file()


def test_the_alias_bomb_is_refused_at_file_line_in_under_a_second(project):
    import time

    from neuronpatch.probes.load import iter_probe_file

    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    lines.append("head: *i")
    bomb = project.path / "bomb.probe.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    [(_, error)] = list(iter_probe_file(bomb))
    assert time.perf_counter() - start < 1.0
    assert str(error).startswith(f"{bomb}:1: YAML anchor '&a' is not allowed")
    res = project.runpytest(*Q, "--co")
    res.stdout.fnmatch_lines(["*bomb.probe.yaml:1: YAML anchor '&a' is not allowed in a probe file*"])


# ----- every option has a typed ini key; ini errors name the key ------------------------------


@pytest.mark.parametrize(("line", "message"), [
    ('neuronpatch_batch_size = "zero"', "ini key neuronpatch_batch_size is invalid (*'zero'); "
                                        "expected a positive integer"),
    ('neuronpatch_batch_size = "0"', "*ini key neuronpatch_batch_size = '0' is invalid; expected a "
                                     "positive integer*"),
    ('neuronpatch_baselines = "maybe"', "ini key neuronpatch_baselines is invalid (*'maybe'*); "
                                        "expected true or false"),
    ('neuronpatch_missing_baseline = "later"', "*ini key neuronpatch_missing_baseline = 'later' is "
                                               "invalid; expected one of fail, skip*"),
])
def test_a_bad_ini_value_names_the_ini_key(pytester: pytest.Pytester, line: str, message: str):
    pytester.makefile(".toml", pyproject=INI + line + "\n")
    pytester.makefile(".probe.yaml", p="head: nowhere\n")
    res = pytester.runpytest(*Q)
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines([f"*{message}"])


def test_report_and_flags_from_ini_keys(project):
    project.makefile(".toml", pyproject=INI + 'neuronpatch_report = "out/report.html"\n'
                     "neuronpatch_suggest_tolerances = true\nneuronpatch_batch_size = 1\n")
    write(project, "a.probe.yaml", "tracks")
    res = project.runpytest(*Q, "--neuronpatch-missing-baseline=skip")
    res.assert_outcomes(skipped=1)
    assert (project.path / "out" / "report.html").is_file()
    res.stdout.fnmatch_lines(["*suggested baseline.tolerance for a.probe.yaml::tracks*"])


# ----- marks with arguments ---------------------------------------------------------------

MARKED = """name: {name}
head: heads/causal
inputs: ["The cat sat on the mat."]
interventions: {{set: [0, 1]}}
marks: {marks}
"""
CONFTEST = """
import pytest

@pytest.fixture
def touched(pytestconfig):
    (pytestconfig.rootpath / "touched").write_text("yes")

def pytest_collection_modifyitems(items):
    for item in items:
        for m in item.iter_markers("owner"):
            print("OWNER", item.name, m.args, m.kwargs)
"""


def test_marks_with_arguments_reach_pytest(project):
    project.makefile(".toml", pyproject=INI + 'markers = ["owner(team): who owns the head"]\n')
    project.makeconftest(CONFTEST)
    (project.path / "m.probe.yaml").write_text("---\n".join([
        MARKED.format(name="skipped", marks="[{skipif: {condition: 'sys.platform != \"nowhere\"', "
                                            "reason: not on this platform}}]"),
        MARKED.format(name="kept", marks="[{skipif: {condition: 'sys.platform == \"nowhere\"', "
                                         "reason: never}}]"),
        MARKED.format(name="fixtures", marks="[{usefixtures: [touched]}, "
                                             "{filterwarnings: 'ignore::UserWarning'}]"),
        MARKED.format(name="owned", marks="[{owner: {args: [vision], kwargs: {since: 2024}}}]"),
    ]))
    res = project.runpytest(*Q, "-s", "-rs")
    res.assert_outcomes(passed=3, skipped=1)
    res.stdout.fnmatch_lines(["OWNER owned ('vision',) {'since': 2024}", "*not on this platform*"])
    assert (project.path / "touched").read_text() == "yes"


def test_unregistered_or_malformed_marks_are_errors_at_file_line_not_internal_errors(project):
    (project.path / "m.probe.yaml").write_text("---\n".join([
        MARKED.format(name="bare", marks="[timeout]"),
        MARKED.format(name="unknown", marks="[{nosuchmark: 3}]"),
    ]))
    res = project.runpytest(*Q)
    res.assert_outcomes(errors=2)
    assert "INTERNALERROR" not in res.stdout.str()
    res.stdout.fnmatch_lines([
        "*m.probe.yaml:5: key 'marks?0?': mark 'timeout' needs an argument; expected {timeout: seconds}",
        "*m.probe.yaml:11: key 'marks?0?': mark 'nosuchmark' is not registered*"])
