"""CI regression mode under real pytest runs: baselines, drift, missing, xdist, HTML report."""

from __future__ import annotations

import json
import re
import textwrap

import pytest
import torch

pytest_plugins = ["pytester"]

PROBE = """
name: tracks
head: heads/causal
inputs: ["The cat sat on the mat.", "Machine learning models", "The quick brown fox jumps"]
interventions: {set: [-1, 0, 1, 2]}
baseline:
  tolerance: {slope: 0.001}
expect:
  r_squared: {min: 0.99}
---
name: blind
head: heads/blind
inputs: ["The cat sat on the mat.", "Machine learning models"]
interventions: {set: [0, 1]}
expect:
  slope: {abs_max: 1.0e-9}
"""
INI = '[tool.pytest.ini_options]\nneuronpatch_figures = "none"\n'


@pytest.fixture
def project(pytester: pytest.Pytester, probe_heads):
    probe_heads.copy_heads(pytester.path / "heads")
    pytester.makefile(".toml", pyproject=INI)
    (pytester.path / "ci.probe.yaml").write_text(textwrap.dedent(PROBE).lstrip())
    return pytester


def _scale_head(path, factor: float) -> None:
    sd = torch.load(path / "head.pt", weights_only=True)
    sd["output.weight"] = sd["output.weight"] * factor
    torch.save(sd, path / "head.pt")


def test_update_then_pass_then_drift_then_accept(project, probe_heads):
    missing = project.runpytest("-p", "no:cacheprovider")
    missing.assert_outcomes(passed=1, failed=1)
    missing.stdout.fnmatch_lines(["*has no baseline at baselines/ci/tracks.json; run pytest with "
                                  "--neuronpatch-update-baselines to create it*",
                                  "neuronpatch: 2 probes: 1 failed, 1 passed (1 missing baseline)"])
    project.runpytest("-p", "no:cacheprovider", "--neuronpatch-update-baselines").assert_outcomes(
        passed=2)
    saved = json.loads((project.path / "baselines" / "ci" / "tracks.json").read_text())
    assert saved["metrics"]["slope"] == pytest.approx(probe_heads.causal_slope, rel=1e-4)
    assert (project.path / "baselines" / "ci" / "blind.json").is_file()  # every probe gets one
    project.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)
    (project.path / "baselines" / "ci" / "blind.json").unlink()  # no baseline: key, no file: not checked
    project.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)

    _scale_head(project.path / "heads" / "causal", 1.5)
    drift = project.runpytest("-p", "no:cacheprovider")
    drift.assert_outcomes(passed=1, failed=1)
    text = drift.stdout.str()
    assert re.search(r"slope\s+-?\d\.\d+\s+-?\d\.\d+\s+\d\.\d+\s+0\.001\s+DRIFT", text), text
    assert "likely cause: the head changed" in text
    assert "to accept the new values, run pytest with --neuronpatch-update-baselines" in text
    assert "neuronpatch: 2 probes: 1 failed, 1 passed (1 drifted)" in text

    project.runpytest("-p", "no:cacheprovider", "--neuronpatch-update-baselines")
    project.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_missing_baseline_can_skip(project):
    res = project.runpytest("-p", "no:cacheprovider", "--neuronpatch-missing-baseline=skip", "-rs")
    res.assert_outcomes(passed=1, skipped=1)
    # the skip points at the probe in its file, not at the plugin's code
    res.stdout.fnmatch_lines(["SKIPPED [[]1[]] ci.probe.yaml:1: probe 'tracks' has no baseline*"])
    res.stdout.fnmatch_lines(["neuronpatch: 2 probes: 1 passed, 1 skipped (1 missing baseline)"])
    bad = project.runpytest("-p", "no:cacheprovider", "--neuronpatch-missing-baseline=maybe")
    bad.stderr.fnmatch_lines(["*--neuronpatch-missing-baseline = 'maybe' is invalid; "
                              "expected one of fail, skip*"])


def test_every_probe_opts_in_with_the_flag(project):
    res = project.runpytest("-p", "no:cacheprovider", "--neuronpatch-baselines")
    res.assert_outcomes(failed=2)  # neither has a baseline yet
    res.stdout.fnmatch_lines(["neuronpatch: 2 probes: 2 failed (2 missing baseline)"])


def test_xdist_run_equals_serial_run(project):
    project.runpytest("-p", "no:cacheprovider", "--neuronpatch-baselines",
                      "--neuronpatch-update-baselines")
    serial = {p.name: json.loads(p.read_text())["metrics"]
              for p in (project.path / "baselines" / "ci").iterdir()}
    res = project.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--neuronpatch-baselines",
                                       "--neuronpatch-update-baselines")
    res.assert_outcomes(passed=2)
    parallel = {p.name: json.loads(p.read_text())["metrics"]
                for p in (project.path / "baselines" / "ci").iterdir()}
    assert parallel == serial
    again = project.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--neuronpatch-baselines")
    again.assert_outcomes(passed=2)
    again.stdout.fnmatch_lines(["neuronpatch: 2 probes: 2 passed"])


def test_html_report_holds_every_probe_and_its_figures(project):
    project.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--neuronpatch-figures=all",
                                 "--neuronpatch-report=report.html")
    page = (project.path / "report.html").read_text()
    assert "ci.probe.yaml::tracks" in page and "ci.probe.yaml::blind" in page
    # five thumbnails per probe, linking to the PNG files in the artifacts directory
    links = re.findall(r'<a href="([^"]+\.png)"><img', page)
    assert len(links) == 10 and "data:image" not in page
    assert all((project.path / link).is_file() for link in links)
    assert page.index("no baseline") < page.index("ci.probe.yaml::blind")  # failures first
    embedded = project.runpytest("-p", "no:cacheprovider", "--neuronpatch-figures=all",
                                            "--neuronpatch-report=embedded.html",
                                            "--neuronpatch-report-embed")
    embedded.assert_outcomes(passed=1, failed=1)
    assert (project.path / "embedded.html").read_text().count("data:image/png;base64,") == 10


def test_suggested_tolerances_are_printed(project):
    res = project.runpytest("-p", "no:cacheprovider", "--neuronpatch-suggest-tolerances",
                            "--neuronpatch-missing-baseline=skip")
    res.stdout.fnmatch_lines(["*suggested baseline.tolerance for ci.probe.yaml::tracks: {'slope': *"])


def _files(root):
    """Every file under ``root`` (relative, POSIX), leaving out bytecode caches and pytester's
    own files (its HOME caches, the subprocess's stdout/stderr and basetemp)."""
    mine = {"__pycache__", ".cache", ".config", "stdout", "stderr"}
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and not mine & set(p.relative_to(root).parts)
                  and not p.relative_to(root).parts[0].startswith("runpytest"))


RECIPE_INI = """
[tool.pytest.ini_options]
testpaths = ["probes"]
neuronpatch_baselines = true
neuronpatch_report = "report.html"
"""
TRACKING = """
name: tracks
head: heads/head_a
inputs: {file: inputs/sentences.txt}
interventions: {set: [-1, 0, 1, 2]}
expect:
  r_squared: {min: 0.99}
---
name: ignores
head: heads/head_b
inputs: {file: inputs/sentences.txt}
interventions: {set: [-1, 0, 1, 2]}
expect:
  slope: {abs_max: 1.0e-9}
"""
REGRESSIONS = """
name: tracks
head: heads/head_a
inputs: {file: inputs/sentences.txt}
interventions: {scale: [0, 0.5, 1, 2]}
expect:
  r_squared: {min: 0.99}
"""


def test_the_readme_ci_recipe_loses_nothing(pytester, probe_heads, tmp_path_factory):
    # docs/ci.md "A CI recipe", as a fresh repository: two heads, a same-name probe in another file,
    # then a probe rename, every run on workers in another directory (as on other machines).
    import shutil

    probes = pytester.path / "probes"
    shutil.copytree(probe_heads.causal, probes / "heads" / "head_a")
    shutil.copytree(probe_heads.blind, probes / "heads" / "head_b")
    (probes / "inputs").mkdir()
    (probes / "inputs" / "sentences.txt").write_text(
        "The cat sat on the mat.\nMachine learning models\nThe quick brown fox jumps\n")
    (probes / "tracking.probe.yaml").write_text(textwrap.dedent(TRACKING).lstrip())
    (probes / "regressions.probe.yaml").write_text(textwrap.dedent(REGRESSIONS).lstrip())
    pytester.makefile(".toml", pyproject=RECIPE_INI)
    workers = tmp_path_factory.mktemp("workers")
    ours = [".neuronpatch", "report.html"]
    remote = ["-p", "no:cacheprovider", "-p", "xdist", "--tx", f"2*popen//chdir={workers}",
              "--dist", "loadgroup", f"--rsyncdir={pytester.path}",
              *(f"--rsyncignore={x}" for x in ours), "-W", "ignore::DeprecationWarning", str(probes)]
    baselines = probes / "baselines"

    def run(*extra):
        sent = [f for f in _files(pytester.path) if f.split("/")[0] not in ours]
        result = pytester.runpytest_subprocess(*remote, *extra)
        copy = workers / pytester.path.name
        assert _files(copy) == sent  # the workers' copy is what rsync sent: they wrote nothing
        assert not any(p.name in ("summary.json", "report.html") or p.suffix == ".png"
                       for p in workers.rglob("*"))
        return result

    first = run("--neuronpatch-update-baselines")
    first.assert_outcomes(passed=3)
    first.stdout.fnmatch_lines(["2 workers [[]3 items[]]", "3 baseline(s) written"])
    assert sorted(p.relative_to(baselines).as_posix() for p in baselines.rglob("*.json")) == [
        "regressions/tracks.json", "tracking/ignores.json", "tracking/tracks.json"]
    kept = (baselines / "regressions" / "tracks.json").read_bytes()

    tracking = probes / "tracking.probe.yaml"
    tracking.write_text(tracking.read_text().replace("name: tracks", "name: tracks its neuron"))
    renamed = run()
    renamed.assert_outcomes(passed=2, failed=1)  # no baseline yet: says how to make one
    renamed.stdout.fnmatch_lines([
        "*probe 'tracks its neuron' has no baseline at probes/baselines/tracking/tracks_its_neuron.json*",
        "1 stale baseline(s), no collected probe maps to them*", "  probes/baselines/tracking/tracks.json"])
    assert (baselines / "tracking" / "tracks.json").is_file()  # listed, never silently deleted

    accepted = run("--neuronpatch-update-baselines", "--neuronpatch-remove-stale-baselines")
    accepted.assert_outcomes(passed=3)
    accepted.stdout.fnmatch_lines(["1 stale baseline(s) removed: probes/baselines/tracking/tracks.json",
                                   "neuronpatch: 3 probes: 3 passed (3 baselines updated)"])
    assert (baselines / "regressions" / "tracks.json").read_bytes() == kept  # the namesake untouched
    nodes = {json.loads(p.read_text())["node"] for p in baselines.rglob("*.json")}
    assert nodes == {"probes/tracking.probe.yaml::tracks its neuron",
                     "probes/tracking.probe.yaml::ignores", "probes/regressions.probe.yaml::tracks"}
    arts = pytester.path / ".neuronpatch" / "artifacts"
    summaries = {json.loads(p.read_text())["probe"]["node_id"]: json.loads(p.read_text())
                 for p in arts.glob("*/summary.json")}
    assert set(summaries) >= nodes
    for node in nodes:
        assert summaries[node]["verdict"]["outcome"] == "passed"  # stamped by the controller
        assert len(summaries[node]["figures"]) == 5
    page = (pytester.path / "report.html").read_text()
    assert all(node in page for node in nodes) and "@" + str(probe_heads.model) not in page
    links = re.findall(r'<a href="([^"]+\.png)"><img', page)
    assert len(links) == 15 and all((pytester.path / link).is_file() for link in links)


@pytest.fixture(scope="module")
def second_model(tmp_path_factory):
    """A head on another tiny model (model B), so probes fall into two xdist groups."""
    from neuronpatch.testing import tiny_gpt2, write_head

    root = tmp_path_factory.mktemp("model_b")
    model = tiny_gpt2(root / "model_b", n_layer=2, seed=1)
    head = write_head(root / "head_b", model, target_layer=0, target_neuron=3, feature_layer=1,
                      coordinates="hf")
    return head, model


def test_loadgroup_runs_each_models_probes_on_one_worker(project, probe_heads, second_model):
    import shutil

    head_b, model_b = second_model
    shutil.copytree(head_b, project.path / "heads" / "b")
    probe = ("name: {name}\nhead: heads/{head}\ninputs: [The cat sat on the mat., A dog]\n"
             "interventions: {{set: [0, 1, 2]}}\nexpect:\n  r_squared: {{min: 0.0}}\n")
    docs = [probe.format(name=f"{head}{i}", head=head) for i in range(4) for head in ("causal", "b")]
    (project.path / "ci.probe.yaml").write_text("---\n".join(docs))  # models A, B, A, B, ...
    res = project.runpytest_subprocess("-p", "no:cacheprovider", "-p", "xdist", "-n", "2",
                                       "--dist", "loadgroup", "-v")
    res.assert_outcomes(passed=8)
    [line] = [x for x in res.stdout.lines if x.startswith("neuronpatch: models loaded: ")]
    # each model was loaded once, by one worker, which ran all of that model's probes
    assert line.count(str(probe_heads.model)) == 1 and line.count(str(model_b)) == 1, line
    workers = {}
    for x in res.stdout.lines:
        m = re.match(r"\[(gw\d)\] .*PASSED ci\.probe\.yaml::(causal|b)\d@", x)
        if m:
            workers.setdefault(m.group(2), set()).add(m.group(1))
    assert len(workers["causal"]) == 1 and len(workers["b"]) == 1, res.stdout.str()
    # artifacts and baselines keep the node id without xdist's "@group"
    saved = project.runpytest_subprocess("-p", "no:cacheprovider", "-p", "xdist", "-n", "2",
                                         "--dist", "loadgroup", "--neuronpatch-update-baselines",
                                         "--neuronpatch-figures=none")
    saved.assert_outcomes(passed=8)
    assert json.loads((project.path / "baselines" / "ci" / "b0.json").read_text())["node"] == \
        "ci.probe.yaml::b0"
    assert {p.name.split("-")[0] for p in (project.path / ".neuronpatch" / "artifacts").iterdir()} \
        == {f"ci.probe.yaml_{n}" for n in (*(f"causal{i}" for i in range(4)),
                                            *(f"b{i}" for i in range(4)))}


SLOW_DISK = """
import time

import neuronpatch.architecture as architecture

_verify = architecture.verify


def verify(*args, **kwargs):  # runs once per model load: a model on a slow disk
    time.sleep({seconds})
    return _verify(*args, **kwargs)


architecture.verify = verify


def pytest_runtest_setup(item):
    import neuronpatch.models

    print(f"LOADS-AT-SETUP {{item.name}} {{neuronpatch.models.load_count}}")
"""


def test_models_load_before_the_first_probe_and_say_so(project, probe_heads):
    project.makeconftest(SLOW_DISK.format(seconds=0))
    res = project.runpytest_subprocess("-p", "no:cacheprovider", "-s", "--durations=0")
    res.assert_outcomes(passed=1, failed=1)  # (tracks has no baseline yet)
    res.stdout.fnmatch_lines([
        f"neuronpatch: loading model {probe_heads.model} (cpu, float32) … done in *s",
        "*LOADS-AT-SETUP tracks 1",  # the model was loaded before the first probe's setup
        "*LOADS-AT-SETUP blind 1",
        f"neuronpatch: models loaded: {probe_heads.model} (*s)",
    ])


def test_a_slow_model_load_is_not_charged_to_the_first_probe(project):
    pytest.importorskip("pytest_timeout")
    # Loading takes longer than a test may; each probe alone (a tiny model) is far within it.
    project.makeconftest(SLOW_DISK.format(seconds=12))
    res = project.runpytest_subprocess("-p", "no:cacheprovider", "--timeout=8",
                                       "--neuronpatch-missing-baseline=skip")
    res.assert_outcomes(passed=1, skipped=1)
    assert "Timeout" not in res.stdout.str()
