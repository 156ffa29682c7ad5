"""Hostile catalogue, the residue: writes through a symlink to outside the repository, a killed
writer's leftovers in the next compare run, and refusals that need no model load.

The plugin cases run pytest in a child process on a case directory (``repo/``)
beside the place a symlink leads to (``elsewhere/``), and assert one error
line, the exit status, no traceback, nothing written under ``elsewhere/``,
and a bound on time and memory; refused before a model loads, torch is never
imported. The command-line cases run ``neuronpatch.cli.main`` through
``tests/hostile/__init__.py`` and check that no model was loaded.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from neuronpatch._io import STALE_TEMPORARY_SECONDS, is_temporary
from tests.hostile import MEMORY_MB, run_bounded

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="bounds are measured with /proc and RLIMIT_AS")

ROOT = Path(__file__).resolve().parents[2]
PYTEST_SECONDS = 20.0  # a pytest child that refuses at configure or collection, on a busy machine
ALLOW = "--neuronpatch-allow-outside-rootdir"
INI = '[tool.pytest.ini_options]\nneuronpatch_figures = "none"\n'
PROBE = """name: tracks
head: heads/h
inputs: ["The cat sat on the mat.", "Machine learning models"]
interventions: {set: [0, 1]}
baseline: {}
expect:
  slope: {min: -1000}
"""
Q = ("-p", "no:cacheprovider", "-p", "no:randomly", "-q")

_PYTEST_CHILD = r"""
import json, resource, sys, time
import pytest

argv, result = json.loads(sys.argv[1]), sys.argv[2]
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
status = int(pytest.main(argv))
sys.stdout.flush()
sys.stderr.flush()
with open(result, "w") as f:
    json.dump({"status": status, "seconds": time.perf_counter() - t0,
               "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024,
               "imported_torch": "torch" in sys.modules}, f)
"""


@dataclass(frozen=True)
class Run:
    """What one pytest child did."""

    status: int
    seconds: float
    rss_growth_mb: float
    imported_torch: bool
    stdout: str
    stderr: str


def run_pytest(repo: Path, *args: str, timeout: float = 300, env: dict[str, str] | None = None) -> Run:
    """``pytest *args`` in a child process started in ``repo`` (its rootdir)."""
    result = repo.parent / f"result-{time.monotonic_ns()}.json"
    child_env = {k: v for k, v in os.environ.items()
                 if not k.startswith(("PYTEST_", "NEURONPATCH_MAX_")) and k != "COV_CORE_SOURCE"}
    child_env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg",
                      "PYTHONPATH": str(ROOT)}, **(env or {}))
    proc = subprocess.run([sys.executable, "-c", _PYTEST_CHILD, json.dumps([*Q, *args]), str(result)],
                          cwd=repo, capture_output=True, text=True, timeout=timeout, env=child_env,
                          stdin=subprocess.DEVNULL)
    assert result.exists(), f"the child died (status {proc.returncode}):\n{proc.stderr[-3000:]}"
    data = json.loads(result.read_text())
    result.unlink()
    return Run(stdout=proc.stdout, stderr=proc.stderr, **data)


def _project(tmp: Path, head: Path | None = None) -> tuple[Path, Path]:
    """``repo/`` (a probe file with a baseline, a head) and ``elsewhere/`` beside it."""
    repo, elsewhere = tmp / "repo", tmp / "elsewhere"
    (repo / "probes").mkdir(parents=True)
    elsewhere.mkdir()
    (repo / "pyproject.toml").write_text(INI)
    if head is None:  # enough for collection: refusals come before a model is needed
        (repo / "probes" / "heads" / "h").mkdir(parents=True)
        (repo / "probes" / "heads" / "h" / "config.json").write_text(
            '{"base_model_name": "neuronpatch-demo", "target_layer": 1, "target_neuron": 3}')
    else:
        import shutil

        shutil.copytree(head, repo / "probes" / "heads" / "h")
    (repo / "probes" / "p.probe.yaml").write_text(PROBE)
    return repo, elsewhere


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# ----- 1. writes through a symlink to outside the rootdir ----------------------------------------


@dataclass(frozen=True)
class Case:
    args: list[str]
    message: str
    status: int  # 1: a collection error of the probe; 4: a usage error of the session
    allowed_by: list[str] = field(default_factory=lambda: [ALLOW])


def _outside(repo: Path, shown: str, what: str, real: Path, also: str = "") -> str:
    allow = f"{ALLOW} allows it" + (f", or {also}" if also else "")
    return (f"{shown}: {what} resolves to {real}, outside the rootdir {repo}; expected a path inside the "
            f"repository ({allow})")


def baselines_dir_links_outside_on_update(repo: Path, elsewhere: Path) -> Case:
    (repo / "probes" / "baselines").symlink_to(elsewhere)
    return Case(["--neuronpatch-update-baselines"], "probes/p.probe.yaml:1: " + _outside(
        repo, "probes/baselines/p/tracks.json", "baseline file", elsewhere / "p" / "tracks.json"), 1)


def baselines_dir_links_outside_on_compare(repo: Path, elsewhere: Path) -> Case:
    (repo / "probes" / "baselines").symlink_to(elsewhere)
    return Case([], "probes/p.probe.yaml:1: " + _outside(
        repo, "probes/baselines/p/tracks.json", "baseline file", elsewhere / "p" / "tracks.json"), 1)


def baselines_stem_dir_links_outside(repo: Path, elsewhere: Path) -> Case:
    (repo / "probes" / "baselines").mkdir()
    (repo / "probes" / "baselines" / "p").symlink_to(elsewhere)
    return Case(["--neuronpatch-update-baselines"], "probes/p.probe.yaml:1: " + _outside(
        repo, "probes/baselines/p/tracks.json", "baseline file", elsewhere / "tracks.json"), 1)


def default_artifacts_link_outside(repo: Path, elsewhere: Path) -> Case:
    (repo / ".neuronpatch").symlink_to(elsewhere)
    return Case([], _outside(repo, ".neuronpatch/artifacts", "the artifacts directory",
                             elsewhere / "artifacts", "name it with --neuronpatch-artifacts DIR"), 4,
                [ALLOW, f"--neuronpatch-artifacts={elsewhere / 'artifacts'}"])


def ini_artifacts_link_outside(repo: Path, elsewhere: Path) -> Case:
    (repo / "out").symlink_to(elsewhere)
    (repo / "pyproject.toml").write_text(INI + 'neuronpatch_artifacts = "out/art"\n')
    return Case([], _outside(repo, "out/art", "the artifacts directory (ini key neuronpatch_artifacts)",
                             elsewhere / "art", "name it with --neuronpatch-artifacts DIR"), 4,
                [ALLOW, f"--neuronpatch-artifacts={elsewhere / 'art'}"])


def default_cache_links_outside(repo: Path, elsewhere: Path) -> Case:
    (repo / ".neuronpatch").mkdir()
    (repo / ".neuronpatch" / "cache").symlink_to(elsewhere)
    return Case(["--neuronpatch-cache"], _outside(repo, ".neuronpatch/cache", "the result cache", elsewhere,
                                                  "name it with --neuronpatch-cache=DIR"), 4,
                [ALLOW, f"--neuronpatch-cache={elsewhere}"])


def ini_cache_links_outside(repo: Path, elsewhere: Path) -> Case:
    (repo / "c").symlink_to(elsewhere)
    (repo / "pyproject.toml").write_text(INI + 'neuronpatch_cache = "c/cache"\n')
    return Case([], _outside(repo, "c/cache", "the result cache (ini key neuronpatch_cache)",
                             elsewhere / "cache", "name it with --neuronpatch-cache=DIR"), 4,
                [ALLOW, f"--neuronpatch-cache={elsewhere / 'cache'}"])


def ini_report_links_outside(repo: Path, elsewhere: Path) -> Case:
    (repo / "reports").symlink_to(elsewhere)
    (repo / "pyproject.toml").write_text(INI + 'neuronpatch_report = "reports/probes.html"\n')
    return Case([], _outside(repo, "reports/probes.html", "the HTML report (ini key neuronpatch_report)",
                             elsewhere / "probes.html", "name it with --neuronpatch-report FILE.html"), 4,
                [ALLOW, f"--neuronpatch-report={elsewhere / 'probes.html'}"])


CASES: list[Callable[[Path, Path], Case]] = [
    baselines_dir_links_outside_on_update, baselines_dir_links_outside_on_compare,
    baselines_stem_dir_links_outside, default_artifacts_link_outside, ini_artifacts_link_outside,
    default_cache_links_outside, ini_cache_links_outside, ini_report_links_outside,
]


@pytest.mark.parametrize("build", CASES, ids=[c.__name__ for c in CASES])
def test_a_write_through_a_link_to_outside_is_one_line(build: Callable[[Path, Path], Case],
                                                       tmp_path: Path) -> None:
    repo, elsewhere = _project(tmp_path)
    case = build(repo, elsewhere)
    run = run_pytest(repo, *case.args)
    out = run.stdout + run.stderr
    assert run.status == case.status, out[-3000:]
    assert "Traceback" not in out
    if case.status == 4:  # pytest's usage error: the one line on stderr
        assert run.stderr.strip() == f"ERROR: {case.message}", run.stderr
    else:  # the probe's error, once, as a line of its own
        assert [line.strip() for line in run.stdout.splitlines() if line.strip() == case.message] == [
            case.message], run.stdout
    assert _files(elsewhere) == []  # nothing written (or removed) through the link
    assert not run.imported_torch  # refused before a model loads
    assert run.seconds < PYTEST_SECONDS, f"took {run.seconds:.1f} s"
    assert run.rss_growth_mb < MEMORY_MB, f"grew by {run.rss_growth_mb:.0f} MB"
    # The flag (or the option that names the path itself) lets it through: no refusal left.
    for allow in case.allowed_by:
        allowed = run_pytest(repo, *case.args, allow, "--co")
        assert allowed.status == 0, (allow, allowed.stdout[-2000:], allowed.stderr[-2000:])
        assert "outside the rootdir" not in allowed.stdout + allowed.stderr


def test_stale_baselines_behind_a_link_are_listed_not_removed(tmp_path: Path) -> None:
    repo, elsewhere = _project(tmp_path)
    (repo / "probes" / "p.probe.yaml").write_text(PROBE.replace("baseline: {}\n", ""))
    (repo / "probes" / "baselines").mkdir()
    (repo / "probes" / "baselines" / "gone").symlink_to(elsewhere)
    (elsewhere / "old.json").write_text('{"format": 1, "metrics": {}}\n')
    run = run_pytest(repo, "--co", "--neuronpatch-remove-stale-baselines")
    assert run.status == 0, run.stdout[-3000:]
    assert "probes/baselines/gone/old.json: not removed: " + _outside(
        repo, "probes/baselines/gone/old.json", "stale baseline", elsewhere / "old.json") in run.stdout
    assert _files(elsewhere) == ["old.json"]


# ----- 2. a killed writer's leftovers go with the next run of any kind --------------------------

# Stops the baseline write of the run it is loaded into after its temporary file is complete,
# before the rename, and says so in a file; the test then kills the run with SIGKILL.
_STALL = r"""
import os, time

_fsync = os.fsync


def _stall(fd):
    name = os.readlink(f"/proc/self/fd/{fd}")
    if ".neuronpatch-tmp-" in name and "baselines" in name and os.environ.get("NEURONPATCH_TEST_STALL"):
        with open(os.environ["NEURONPATCH_TEST_STALL"], "w") as f:
            f.write(name)
        time.sleep(300)
    return _fsync(fd)


os.fsync = _stall
"""


def test_kill_9_mid_update_then_a_compare_run_removes_the_leftover(tmp_path: Path, probe_heads) -> None:
    repo, _ = _project(tmp_path, probe_heads.causal)
    (repo / "conftest.py").write_text(_STALL)
    first = run_pytest(repo, "--neuronpatch-update-baselines")
    assert first.status == 0, first.stdout[-3000:]
    folder = repo / "probes" / "baselines" / "p"
    assert _files(folder) == ["tracks.json"]
    written = (folder / "tracks.json").read_text()

    # A real update run, killed while its temporary file is complete but not renamed.
    stalled = tmp_path / "stalled"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg",
           "NEURONPATCH_TEST_STALL": str(stalled), "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if not k.startswith("PYTEST_")}
    with subprocess.Popen([sys.executable, "-m", "pytest", *Q, "--neuronpatch-update-baselines"], cwd=repo,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        try:
            deadline = time.monotonic() + 240
            while not stalled.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            assert stalled.exists(), f"the writer never reached its baseline (status {proc.poll()})"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    [leftover] = [name for name in _files(folder) if name != "tracks.json"]
    assert leftover.startswith(f".tracks.json.neuronpatch-tmp-{proc.pid}-") and is_temporary(leftover)
    assert (folder / "tracks.json").read_text() == written  # the old baseline is intact

    # The next run only compares: it writes no baseline, yet the dead writer's file goes,
    # and it is never read, counted or listed as a (stale) baseline.
    compare = run_pytest(repo, "-rA")
    assert compare.status == 0, compare.stdout[-3000:]
    assert _files(folder) == ["tracks.json"]
    assert "stale" not in compare.stdout and "neuronpatch-tmp" not in compare.stdout
    assert (folder / "tracks.json").read_text() == written


def test_a_live_writers_temporary_survives_a_compare_run(tmp_path: Path) -> None:
    repo, _ = _project(tmp_path)
    folder = repo / "probes" / "baselines" / "p"
    folder.mkdir(parents=True)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"]) as live:
        try:
            mine = folder / f".tracks.json.neuronpatch-tmp-{live.pid}-k3j9a_2x"
            mine.write_text("{")
            run = run_pytest(repo, "--co")
            assert run.status == 0, run.stdout[-3000:]
            assert mine.exists()  # its writer is alive and the file is fresh: not ours to remove
        finally:
            live.kill()
    assert not run.imported_torch


def test_a_killed_first_cache_write_does_not_make_the_cache_foreign(tmp_path: Path) -> None:
    from neuronpatch.cache import MARKER, ResultCache

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    cache = tmp_path / "cache"
    cache.mkdir()
    marker_leftover = cache / f".{MARKER}.neuronpatch-tmp-{gone.pid}-abcdefgh"
    marker_leftover.write_text('{"format"')  # the first put() was killed writing the marker

    # The pytest option accepts the directory (a leftover is not someone else's file) ...
    repo, _ = _project(tmp_path / "case")
    run = run_pytest(repo, f"--neuronpatch-cache={cache}", "--co")
    assert run.status == 0, run.stderr[-3000:]
    # ... and so does the cache, which removes the leftover before it looks.
    ResultCache(cache)
    assert _files(cache) == []


def test_a_cache_lookup_removes_dead_writers_entries_and_reads_none(tmp_path: Path) -> None:
    from neuronpatch.cache import MARKER, ResultCache

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    cache = tmp_path / "cache"
    (cache / "ab").mkdir(parents=True)
    (cache / MARKER).write_text('{"format": 2}\n')
    key = "ab" + "0" * 62
    dead = cache / "ab" / f".{key}.npz.neuronpatch-tmp-{gone.pid}-abcdefgh"
    dead.write_bytes(b"PK\x03\x04")
    old = cache / "ab" / f".{key}.npz.neuronpatch-tmp-{os.getpid()}-zzzzzzzz"  # a live pid, but old
    old.write_bytes(b"PK")
    t = time.time() - STALE_TEMPORARY_SECONDS - 5
    os.utime(old, (t, t))
    results = ResultCache(cache)
    assert results.get(key) is None and results.misses == 1
    assert _files(cache) == ["ab", MARKER]


# ----- 3. refusals that need no model load -------------------------------------------------------

MAIN = "tests.hostile.test_hostile_residue:cli_without_loading"
CLI_SECONDS = 15.0  # the tokenizer and torch's import on a busy machine; a model load is what is out


def cli_without_loading(argv: list[str]) -> str:
    """``neuronpatch.cli.main(argv)`` and how many models it loaded (called in the child process)."""
    from neuronpatch import cli, models

    status = cli.main(argv)
    return json.dumps({"status": status, "models_loaded": models.load_count})


@dataclass(frozen=True)
class CliCase:
    argv: list[str]
    message: str


def _n_layers(model: Path) -> int:
    return int(json.loads((model / "config.json").read_text())["n_layer"])


def _tokens(model: Path, text: str) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model)(text)["input_ids"])


def run_position_outside_the_input(tmp: Path, heads) -> CliCase:
    n = _tokens(heads.model, "The cat sat.")
    return CliCase(["run", str(heads.causal), "--text", "The cat sat.", "--position", "999",
                    "--out", str(tmp / "out")],
                   f"position 999 is outside input 0 ('The cat sat.', {n} tokens)")


def run_target_layer_beyond_the_model(tmp: Path, heads) -> CliCase:
    import shutil

    head = shutil.copytree(heads.causal, tmp / "head")
    cfg = json.loads((head / "config.json").read_text())
    cfg["target_layer"] = 99
    (head / "config.json").write_text(json.dumps(cfg))
    return CliCase(["run", str(head), "--out", str(tmp / "out")],
                   f"{head.resolve() / 'config.json'}: key 'target_layer' = 99 is invalid; expected an "
                   f"int in [0, {_n_layers(heads.model) - 1}]")


def train_zero_windows(tmp: Path, heads) -> CliCase:
    return CliCase(["train-head", "--model", str(heads.model), "--layer", "0", "--neuron", "3",
                    "--feature-layer", "1", "--windows", "0", "--out", str(tmp / "h")],
                   "--windows 0 is invalid; expected at least 10")


def train_layer_beyond_the_model(tmp: Path, heads) -> CliCase:
    return CliCase(["train-head", "--model", str(heads.model), "--layer", "99", "--neuron", "3",
                    "--feature-layer", "1", "--out", str(tmp / "h")],
                   f"--layer 99 is invalid; expected an int in [0, {_n_layers(heads.model) - 1}]")


CLI_CASES = [run_position_outside_the_input, run_target_layer_beyond_the_model, train_zero_windows,
             train_layer_beyond_the_model]


@pytest.mark.parametrize("build", CLI_CASES, ids=[c.__name__ for c in CLI_CASES])
def test_a_typo_costs_no_model_load(build: Callable[..., CliCase], tmp_path: Path, probe_heads) -> None:
    case = build(tmp_path, probe_heads)
    outcome = run_bounded(MAIN, case.argv, cwd=ROOT, memory_mb=4096)  # torch maps GiBs of address space
    assert outcome.error is None, (outcome.error, outcome.message, outcome.stderr[-2000:])
    assert outcome.returned is not None
    returned = json.loads(ast.literal_eval(outcome.returned))  # the repr of a JSON string
    assert returned == {"status": 2, "models_loaded": 0}, outcome.stderr[-2000:]
    assert "Traceback" not in outcome.stderr + outcome.stdout
    assert outcome.stderr == f"neuronpatch: error: {case.message}\n"
    assert outcome.seconds < CLI_SECONDS, f"took {outcome.seconds:.1f} s"
    assert not (tmp_path / "out").exists() and not (tmp_path / "h").exists()
