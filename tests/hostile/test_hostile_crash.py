"""Hostile catalogue, crash leftovers: a ``kill -9`` mid-write leaves a named temporary file
that the next writer removes and that nothing ever reads as a baseline."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neuronpatch import baselines
from neuronpatch._io import (
    STALE_TEMPORARY_SECONDS,
    atomic_write_text,
    clean_stale_temporaries,
    is_temporary,
)

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs kill -9")

# Stops the writer after its temporary file is complete, before the rename, and says so.
_STALLED_WRITER = r"""
import sys, time
import neuronpatch._io as io

def stall(fd):
    print("stalled", flush=True)
    time.sleep(120)

io.os.fsync = stall
io.atomic_write_text(sys.argv[1], sys.argv[2])
"""
_WRITER = "import sys, neuronpatch._io as io; io.atomic_write_text(sys.argv[1], 'other')"


def _kill_mid_write(path: Path, text: str) -> int:
    with subprocess.Popen([sys.executable, "-c", _STALLED_WRITER, str(path), text],
                          stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "stalled\n"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)  # reaped: its pid is gone, not a zombie
    assert proc.returncode == -signal.SIGKILL
    return proc.pid


def _baseline(slope: float) -> baselines.Baseline:
    return baselines.Baseline("p", {"slope": slope}, "sha256:0", {})


def test_kill_9_mid_write_leaves_a_named_leftover_that_the_next_run_removes(tmp_path: Path) -> None:
    directory = tmp_path / "baselines"
    path = baselines.write_baseline(directory / "p00.json", _baseline(0.5))
    pid = _kill_mid_write(path, _baseline(9.0).to_json())

    leftovers = [p for p in directory.iterdir() if p.name != "p00.json"]
    assert len(leftovers) == 1
    assert re.fullmatch(rf"\.p00\.json\.neuronpatch-tmp-{pid}-[a-z0-9_]+", leftovers[0].name)
    assert '"slope": 9.0' in leftovers[0].read_text()  # complete JSON: the kind that must not count
    # The old baseline is intact, is the only one listed, and the leftover reads as nothing.
    assert baselines.read_baseline(path) == _baseline(0.5)
    assert baselines.baseline_files(directory) == [path]
    assert is_temporary(leftovers[0])

    # The next process to write into the directory removes it, whatever it writes.
    subprocess.run([sys.executable, "-c", _WRITER, str(directory / "p01.json")], check=True, timeout=60)
    assert sorted(p.name for p in directory.iterdir()) == ["p00.json", "p01.json"]


def test_repeated_kills_never_pile_up_leftovers(tmp_path: Path) -> None:
    path = baselines.write_baseline(tmp_path / "p00.json", _baseline(0.5))
    pids = [_kill_mid_write(path, _baseline(float(i)).to_json()) for i in range(4)]
    # Each writer removed its dead predecessor's file before it was killed in turn.
    leftovers = [p for p in tmp_path.iterdir() if is_temporary(p)]
    assert [p.name.split("-")[-2] for p in leftovers] == [str(pids[-1])]
    assert clean_stale_temporaries(tmp_path) == leftovers
    assert [p.name for p in tmp_path.iterdir()] == ["p00.json"]
    assert baselines.read_baseline(path) == _baseline(0.5)


def _age(path: Path, seconds: float) -> Path:
    t = time.time() - seconds
    os.utime(path, (t, t))
    return path


def test_a_live_writers_fresh_temporary_is_kept_and_an_old_one_removed(tmp_path: Path) -> None:
    me = os.getpid()
    fresh = tmp_path / f".a.json.neuronpatch-tmp-{me}-k3j9a_2x"
    old = tmp_path / f".b.json.neuronpatch-tmp-{me}-zz9a_2xq"
    fresh.write_text("{}")
    old.write_text("{}")
    _age(old, STALE_TEMPORARY_SECONDS + 5)  # the pid may have been reused since
    assert clean_stale_temporaries(tmp_path) == [old]
    assert fresh.exists()


def test_a_dead_writers_temporary_goes_at_once(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    leftover = tmp_path / f".p.json.neuronpatch-tmp-{gone.pid}-abcdefgh"
    leftover.write_text("{}")
    assert clean_stale_temporaries(tmp_path) == [leftover]


def test_older_releases_temporaries_go_when_old(tmp_path: Path) -> None:
    fresh = tmp_path / ".p00.json.k3j9a_2x.tmp"  # what tempfile.mkstemp made before
    old = tmp_path / ".summary.json.ab_cd123.tmp"
    fresh.write_text("{}")
    old.write_text("{}")
    _age(old, STALE_TEMPORARY_SECONDS + 5)
    assert clean_stale_temporaries(tmp_path) == [old]
    assert baselines.baseline_files(tmp_path) == []


def test_nothing_else_is_touched(tmp_path: Path) -> None:
    keep = [".gitkeep", "p00.json", ".p00.json.bak", "notes.tmp", ".x.json.neuronpatch-tmp-1-abc.orig"]
    for name in keep:
        (tmp_path / name).write_text("x")
        _age(tmp_path / name, 3600)
    (tmp_path / ".d.json.neuronpatch-tmp-1-abc").mkdir()  # a directory, not a leftover
    (tmp_path / ".l.json.neuronpatch-tmp-1-abc").symlink_to(tmp_path / "p00.json")  # a link: not ours
    assert clean_stale_temporaries(tmp_path, max_age_s=0) == []
    assert len(list(tmp_path.iterdir())) == len(keep) + 2
    assert clean_stale_temporaries(tmp_path / "missing") == []


def test_a_long_file_name_still_gets_a_temporary_the_file_system_accepts(tmp_path: Path) -> None:
    path = tmp_path / ("n" * 240 + ".json")
    atomic_write_text(path, "{}\n")
    assert path.read_text() == "{}\n"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
