"""Hostile catalogue, the command line: every mistake is ``neuronpatch: error: ...`` and exit 2.

Each case runs ``neuronpatch.cli.main`` in a child process bounded in time and
memory (``tests/hostile/__init__.py``) and asserts exit status 2, exactly one stderr line,
no traceback, and that torch was never imported: paths are checked before any work.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.hostile import assert_cli_refused, run_bounded

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="bounds are measured with /proc and RLIMIT_AS")

GiB = 1024**3
NOT_REGULAR = "not a regular file; expected a regular file"
STREAM = " (write the stream to a file first)"
MAIN = "neuronpatch.cli:main"
TRAIN = ["train-head", "--layer", "1", "--neuron", "3", "--feature-layer", "2"]


@dataclass(frozen=True)
class Case:
    argv: list[str]
    message: str
    env: dict[str, str] = field(default_factory=dict)


def _head(tmp: Path, config: str | None = '{"base_model_name": "neuronpatch-demo"}') -> Path:
    head = tmp / "head"
    head.mkdir()
    if config is not None:
        (head / "config.json").write_text(config)
    return head


def _run(head: Path, *extra: str, out: Path | None = None) -> list[str]:
    return ["run", str(head), *extra, "--out", str(out or head.parent / "out")]


# config.json as the user left it.
def config_is_a_directory(tmp: Path) -> Case:
    head = _head(tmp, None)
    (head / "config.json").mkdir()
    return Case(_run(head), f"{head / 'config.json'}: head config is a directory, {NOT_REGULAR}")


def config_nested_100k_levels(tmp: Path) -> Case:
    head = _head(tmp, '{"head_config": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return Case(_run(head), f"{head / 'config.json'}:1: head config nests deeper than 64 levels; expected at "
                "most 64 (set NEURONPATCH_MAX_JSON_DEPTH to raise it)")


def config_is_a_symlink_loop(tmp: Path) -> Case:
    head = _head(tmp, None)
    (head / "config.json").symlink_to(head / "config.json")
    return Case(_run(head), f"{head / 'config.json'}: head config is a symlink loop; expected a regular file")


def config_is_dev_zero(tmp: Path) -> Case:
    head = _head(tmp, None)
    (head / "config.json").symlink_to("/dev/zero")
    return Case(_run(head),
                f"{head / 'config.json'}: head config is a character device, {NOT_REGULAR}{STREAM}")


def config_holds_a_nul(tmp: Path) -> Case:
    head = _head(tmp, '{\n  "target_layer": 1,\n  "head_type": "regr\x00ession"\n}')
    return Case(_run(head), f"{head / 'config.json'}:3: head config holds the control character U+0000 (NUL) "
                "at column 21; expected text (tab, newline and carriage return are the only control "
                "characters allowed)")


def config_is_3_gib(tmp: Path) -> Case:
    head = _head(tmp, None)
    with (head / "config.json").open("wb") as f:
        f.truncate(3 * GiB)
    return Case(_run(head), f"{head / 'config.json'}: head config is 3.0 GiB, over the limit of 16.0 MiB; "
                "expected at most 16777216 bytes (set NEURONPATCH_MAX_JSON_FILE_BYTES to raise it)")


# Output paths, refused before a model loads.
def run_out_is_a_file(tmp: Path) -> Case:
    head, out = _head(tmp), tmp / "results.txt"
    out.write_text("precious\n")
    return Case(_run(head, out=out), f"{out}: --out is an existing file; expected a directory (or a path "
                "that does not exist yet)")


def run_out_under_a_file(tmp: Path) -> Case:
    head, blocker = _head(tmp), tmp / "results"
    blocker.write_text("precious\n")
    out = blocker / "run1" / "today"
    return Case(_run(head, out=out), f"{out}: --out cannot be created: {blocker} is a file, not a "
                "directory; move that file or choose another path")


def run_out_is_a_broken_symlink(tmp: Path) -> Case:
    head, out = _head(tmp), tmp / "out"
    out.symlink_to(tmp / "nowhere")
    return Case(_run(head, out=out), f"{out}: --out is a broken symlink; expected a directory (or a path "
                "that does not exist yet)")


def train_out_is_a_file(tmp: Path) -> Case:
    out = tmp / "head.pt"
    out.write_bytes(b"weights")
    return Case([*TRAIN, "--out", str(out)], f"{out}: --out is an existing file; expected a directory (or "
                "a path that does not exist yet)")


def train_out_under_a_file(tmp: Path) -> Case:
    (tmp / "heads").write_text("x")
    out = tmp / "heads" / "new"
    return Case([*TRAIN, "--out", str(out)], f"{out}: --out cannot be created: {tmp / 'heads'} is a file, "
                "not a directory; move that file or choose another path")


def train_corpus_is_dev_zero(tmp: Path) -> Case:
    return Case([*TRAIN, "--corpus", "/dev/zero", "--out", str(tmp / "h")],
                f"/dev/zero: corpus is a character device, {NOT_REGULAR}{STREAM}")


def train_corpus_is_a_directory(tmp: Path) -> Case:
    return Case([*TRAIN, "--corpus", str(tmp), "--out", str(tmp / "h")],
                f"{tmp}: corpus is a directory, {NOT_REGULAR}")


# --inputs, read lazily within bounds.
def inputs_dev_zero(tmp: Path) -> Case:
    return Case(_run(_head(tmp), "--inputs", "/dev/zero"),
                f"/dev/zero: inputs file is a character device, {NOT_REGULAR}{STREAM}")


def inputs_is_a_directory(tmp: Path) -> Case:
    return Case(_run(_head(tmp), "--inputs", str(tmp)), f"{tmp}: inputs file is a directory, {NOT_REGULAR}")


def inputs_is_a_fifo(tmp: Path) -> Case:
    fifo = tmp / "inputs.fifo"
    os.mkfifo(fifo)
    return Case(_run(_head(tmp), "--inputs", str(fifo)),
                f"{fifo}: inputs file is a FIFO (named pipe), {NOT_REGULAR}{STREAM}")


def inputs_missing(tmp: Path) -> Case:
    return Case(_run(_head(tmp), "--inputs", str(tmp / "in.txt")), f"{tmp / 'in.txt'}: inputs file not found")


def inputs_hold_a_nul(tmp: Path) -> Case:
    p = tmp / "in.txt"
    p.write_bytes(b"The cat sat.\n\x00\x00\x00\n")
    return Case(_run(_head(tmp), "--inputs", str(p)), f"{p}:2: inputs file holds the control character "
                "U+0000 (NUL) at column 1; expected text (tab, newline and carriage return are the only "
                "control characters allowed)")


def inputs_only_blank(tmp: Path) -> Case:
    p = tmp / "in.txt"
    p.write_text("\n   \n\t\n")
    return Case(_run(_head(tmp), "--inputs", str(p)),
                f"{p}: inputs file has no text (expected one input per line)")


def inputs_3_gib(tmp: Path) -> Case:
    p = tmp / "in.txt"
    with p.open("wb") as f:
        f.truncate(3 * GiB)
    return Case(_run(_head(tmp), "--inputs", str(p)), f"{p}: inputs file is 3.0 GiB, over the limit of "
                "64.0 MiB; expected at most 67108864 bytes "
                "(set NEURONPATCH_MAX_INPUTS_FILE_BYTES to raise it)")


def inputs_150k_lines(tmp: Path) -> Case:
    p = tmp / "in.txt"
    p.write_text("The cat sat on the mat.\n" * 150_000)
    return Case(_run(_head(tmp), "--inputs", str(p)), f"{p}:100001: inputs file has more than 100000 lines; "
                "expected at most 100000 (set NEURONPATCH_MAX_INPUTS_FILE_LINES to raise it)")


def inputs_utf16(tmp: Path) -> Case:
    p = tmp / "in.txt"
    p.write_bytes("The cat sat.\n".encode("utf-16"))
    return Case(_run(_head(tmp), "--inputs", str(p)),
                f"{p}:1: inputs file is not UTF-8 text (byte 0xff at column 1); expected UTF-8")


def inputs_limit_env_is_nonsense(tmp: Path) -> Case:
    p = tmp / "in.txt"
    p.write_text("The cat sat.\n")
    return Case(_run(_head(tmp), "--inputs", str(p)), "NEURONPATCH_MAX_INPUTS_FILE_LINES='0' is invalid; "
                "expected a positive integer (the default is 100000)",
                env={"NEURONPATCH_MAX_INPUTS_FILE_LINES": "0"})


CASES: list[Callable[[Path], Case]] = [
    config_is_a_directory, config_nested_100k_levels, config_is_a_symlink_loop, config_is_dev_zero,
    config_holds_a_nul, config_is_3_gib,
    run_out_is_a_file, run_out_under_a_file, run_out_is_a_broken_symlink, train_out_is_a_file,
    train_out_under_a_file, train_corpus_is_dev_zero, train_corpus_is_a_directory,
    inputs_dev_zero, inputs_is_a_directory, inputs_is_a_fifo, inputs_missing, inputs_hold_a_nul,
    inputs_only_blank, inputs_3_gib, inputs_150k_lines, inputs_utf16, inputs_limit_env_is_nonsense,
]


@pytest.mark.parametrize("build", CASES, ids=[c.__name__ for c in CASES])
def test_cli_mistake_is_one_line_and_exit_2(build: Callable[[Path], Case], tmp_path: Path) -> None:
    case = build(tmp_path)
    outcome = run_bounded(MAIN, case.argv, env=case.env)
    assert_cli_refused(outcome, case.message)
    assert not outcome.imported_torch  # refused before any work


def test_an_existing_out_file_survives(tmp_path: Path) -> None:
    case = run_out_is_a_file(tmp_path)
    run_bounded(MAIN, case.argv)
    assert (tmp_path / "results.txt").read_text() == "precious\n"


def test_cjk_and_emoji_inputs_print_no_glyph_warnings(tmp_path: Path) -> None:
    from neuronpatch.testing import tiny_gpt2, write_head

    model = tiny_gpt2(tmp_path / "tiny", n_layer=2)
    head = write_head(tmp_path / "head", model, target_layer=0, target_neuron=3, feature_layer=1)
    texts = ["猫がマットの上に座った。", "🐱 sat on the 🧶 mat.", "안녕하세요 세계", "Ελληνικά κείμενα"]
    argv = ["run", str(head), *[a for t in texts for a in ("--text", t)], "--out", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONWARNINGS": "default", "MPLBACKEND": "Agg", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "neuronpatch.cli", *argv], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Glyph" not in proc.stderr and "missing from font" not in proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(list((tmp_path / "out").glob("*.png"))) == 5


def test_limits_are_documented_in_the_readme_and_the_docs() -> None:
    from neuronpatch.limits import LIMITS

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert "## Safety and limits" in readme
    assert "(docs/safety.md)" in readme.split("## Safety and limits", 1)[1].split("\n## ", 1)[0]
    page = (root / "docs" / "safety.md").read_text(encoding="utf-8")
    assert page.startswith("# Safety and limits")
    for limit in LIMITS:
        assert limit.env in page
