"""Hostile catalogue, bounded readers: every bad file is one line, fast and small.

Each case builds a hostile file, calls one reader of :mod:`neuronpatch.limits`
in a child process capped at 500 MB above its baseline (``tests/hostile/__init__.py``),
and asserts the exact one-line message: the file, the line where one is
meaningful, and what is allowed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.hostile import assert_bounded, assert_refused, run_bounded

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="bounds are measured with /proc and RLIMIT_AS")

GiB = 1024**3
NOT_REGULAR = "not a regular file; expected a regular file"
STREAM = " (write the stream to a file first)"


@dataclass(frozen=True)
class Case:
    call: str
    args: list[Any]
    message: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    error: str = "LimitError"


def _sparse(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)  # no disk used: the reader must refuse it on its size alone
    return path


def _loop(tmp: Path, name: str) -> Path:
    a, b = tmp / name, tmp / f"{name}.other"
    a.symlink_to(b)
    b.symlink_to(a)
    return a


def _fifo(tmp: Path) -> Path:
    p = tmp / "pipe"
    os.mkfifo(p)  # nobody writes: opening it for reading would block forever
    return p


TEXT = "neuronpatch.limits:read_text_bounded"
LINES = "neuronpatch.limits:read_lines_bounded"
JSON = "neuronpatch.limits:load_json_bounded"
YAML = "neuronpatch.limits:check_yaml_text"


# read_text_bounded: whole small files (head configs, baselines, probe files).
def text_dev_zero(tmp: Path) -> Case:
    return Case(TEXT, ["/dev/zero"], f"/dev/zero: head config is a character device, {NOT_REGULAR}{STREAM}",
                {"what": "head config"})


def text_directory(tmp: Path) -> Case:
    return Case(TEXT, [str(tmp)], f"{tmp}: head config is a directory, {NOT_REGULAR}",
                {"what": "head config"})


def text_fifo(tmp: Path) -> Case:
    p = _fifo(tmp)
    return Case(TEXT, [str(p)], f"{p}: probe file is a FIFO (named pipe), {NOT_REGULAR}{STREAM}",
                {"what": "probe file"})


def text_symlink_loop(tmp: Path) -> Case:
    p = _loop(tmp, "config.json")
    return Case(TEXT, [str(p)], f"{p}: head config is a symlink loop; expected a regular file",
                {"what": "head config"})


def text_self_symlink(tmp: Path) -> Case:
    p = tmp / "self.json"
    p.symlink_to(p)
    return Case(TEXT, [str(p)], f"{p}: baseline is a symlink loop; expected a regular file",
                {"what": "baseline"})


def text_broken_symlink(tmp: Path) -> Case:
    p = tmp / "dangling.yaml"
    p.symlink_to(tmp / "gone.yaml")
    return Case(TEXT, [str(p)], f"{p}: probe file is a broken symlink (its target {str(tmp / 'gone.yaml')!r} "
                "does not exist); expected a regular file", {"what": "probe file"})


def text_missing(tmp: Path) -> Case:
    return Case(TEXT, [str(tmp / "nope.json")], f"{tmp / 'nope.json'}: head config not found",
                {"what": "head config"})


def text_sparse_3gib(tmp: Path) -> Case:
    p = _sparse(tmp / "big.yaml", 3 * GiB)
    return Case(TEXT, [str(p)], f"{p}: probe file is 3.0 GiB, over the limit of 4.0 MiB; expected at most "
                "4194304 bytes (set NEURONPATCH_MAX_PROBE_FILE_BYTES to raise it)",
                {"what": "probe file", "max_bytes": {"limit": "PROBE_FILE_BYTES"}})


def text_over_explicit_limit(tmp: Path) -> Case:
    p = tmp / "c.json"
    p.write_text("{}" + " " * 2000)
    return Case(TEXT, [str(p)], f"{p}: head config is 2002 bytes, over the limit of 1024 bytes; expected at "
                "most 1024 bytes", {"what": "head config", "max_bytes": 1024})


def text_nul_byte(tmp: Path) -> Case:
    p = tmp / "n.probe.yaml"
    p.write_bytes(b"name: x\nhead: h\ninputs: [a\x00b]\n")
    return Case(TEXT, [str(p)], f"{p}:3: probe file holds the control character U+0000 (NUL) at column 11; "
                "expected text (tab, newline and carriage return are the only control characters "
                "allowed)", {"what": "probe file"})


def text_escape_sequence(tmp: Path) -> Case:
    p = tmp / "config.json"
    p.write_bytes(b'{\n  "a": "\x1b[31mred"\n}\n')
    return Case(TEXT, [str(p)], f"{p}:2: head config holds the control character U+001B (ESC) at column 9; "
                "expected text (tab, newline and carriage return are the only control characters "
                "allowed)", {"what": "head config"})


def text_not_utf8(tmp: Path) -> Case:
    p = tmp / "latin1.yaml"
    p.write_bytes("name: ok\nhead: caf\xe9\n".encode("latin-1"))
    return Case(TEXT, [str(p)], f"{p}:2: probe file is not UTF-8 text (byte 0xe9 at column 10); "
                "expected UTF-8", {"what": "probe file"})


def text_bad_env_override(tmp: Path) -> Case:
    p = tmp / "c.json"
    p.write_text("{}")
    return Case(TEXT, [str(p)], "NEURONPATCH_MAX_JSON_FILE_BYTES='lots' is invalid; expected a positive "
                "integer (the default is 16777216)", env={"NEURONPATCH_MAX_JSON_FILE_BYTES": "lots"})


# read_lines_bounded: inputs files, read lazily.
def lines_dev_zero(tmp: Path) -> Case:
    return Case(LINES, ["/dev/zero"], f"/dev/zero: inputs file is a character device, {NOT_REGULAR}{STREAM}")


def lines_fifo(tmp: Path) -> Case:
    p = _fifo(tmp)
    return Case(LINES, [str(p)], f"{p}: inputs file is a FIFO (named pipe), {NOT_REGULAR}{STREAM}")


def lines_directory(tmp: Path) -> Case:
    return Case(LINES, [str(tmp)], f"{tmp}: inputs file is a directory, {NOT_REGULAR}")


def lines_sparse_3gib(tmp: Path) -> Case:
    p = _sparse(tmp / "inputs.txt", 3 * GiB)
    return Case(LINES, [str(p)], f"{p}: inputs file is 3.0 GiB, over the limit of 64.0 MiB; expected at "
                "most 67108864 bytes (set NEURONPATCH_MAX_INPUTS_FILE_BYTES to raise it)")


def lines_too_many(tmp: Path) -> Case:
    p = tmp / "inputs.txt"
    p.write_text("a short input.\n" * 150_000)
    return Case(LINES, [str(p)], f"{p}:100001: inputs file has more than 100000 lines; expected at most "
                "100000 (set NEURONPATCH_MAX_INPUTS_FILE_LINES to raise it)")


def lines_limit_from_env(tmp: Path) -> Case:
    p = tmp / "inputs.txt"
    p.write_text("one\ntwo\nthree\n")
    return Case(LINES, [str(p)], f"{p}:3: inputs file has more than 2 lines; expected at most 2 "
                "(set NEURONPATCH_MAX_INPUTS_FILE_LINES to raise it)",
                env={"NEURONPATCH_MAX_INPUTS_FILE_LINES": "2"})


def lines_one_endless_line(tmp: Path) -> Case:
    p = tmp / "inputs.txt"
    p.write_bytes(b"x" * 5000)  # no newline at all: the reader still stops at the limit
    return Case(LINES, [str(p)], f"{p}: inputs file is 5000 bytes, over the limit of 4096 bytes; "
                "expected at most 4096 bytes", {"max_bytes": 4096})


def lines_nul_byte(tmp: Path) -> Case:
    p = tmp / "inputs.txt"
    p.write_bytes(b"fine\nalso fine\nbin\x00ary\n")
    return Case(LINES, [str(p)], f"{p}:3: inputs file holds the control character U+0000 (NUL) at column 4; "
                "expected text (tab, newline and carriage return are the only control characters "
                "allowed)")


def lines_not_utf8(tmp: Path) -> Case:
    p = tmp / "inputs.txt"
    p.write_bytes(b"fine\n\xff\xfeutf-16 junk\n")
    return Case(LINES, [str(p)], f"{p}:2: inputs file is not UTF-8 text (byte 0xff at column 1); "
                "expected UTF-8")


# load_json_bounded: config.json and baselines.
def json_nested_100k_lists(tmp: Path) -> Case:
    p = tmp / "config.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    return Case(JSON, [str(p)], f"{p}:1: head config nests deeper than 64 levels; expected at most 64 "
                "(set NEURONPATCH_MAX_JSON_DEPTH to raise it)", {"what": "head config"})


def json_nested_100k_objects(tmp: Path) -> Case:
    p = tmp / "config.json"
    p.write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    return Case(JSON, [str(p)], f"{p}:1: head config nests deeper than 64 levels; expected at most 64 "
                "(set NEURONPATCH_MAX_JSON_DEPTH to raise it)", {"what": "head config"})


def json_deep_on_line_70(tmp: Path) -> Case:
    p = tmp / "b.json"
    p.write_text("".join("  " * i + '{"k":\n' for i in range(80)) + "1" + "}" * 80)
    return Case(JSON, [str(p)], f"{p}:65: baseline nests deeper than 64 levels; expected at most 64 "
                "(set NEURONPATCH_MAX_JSON_DEPTH to raise it)", {"what": "baseline"})


def json_depth_from_env(tmp: Path) -> Case:
    p = tmp / "config.json"
    p.write_text('{"head_config": {"a": [1]}}')
    return Case(JSON, [str(p)], f"{p}:1: JSON file nests deeper than 2 levels; expected at most 2 "
                "(set NEURONPATCH_MAX_JSON_DEPTH to raise it)", env={"NEURONPATCH_MAX_JSON_DEPTH": "2"})


def json_directory(tmp: Path) -> Case:
    p = tmp / "config.json"
    p.mkdir()
    return Case(JSON, [str(p)], f"{p}: head config is a directory, {NOT_REGULAR}",
                {"what": "head config", "error": {"error": "HeadConfigError"}}, error="HeadConfigError")


def json_symlink_loop(tmp: Path) -> Case:
    p = _loop(tmp, "config.json")
    return Case(JSON, [str(p)], f"{p}: head config is a symlink loop; expected a regular file",
                {"what": "head config", "error": {"error": "HeadConfigError"}}, error="HeadConfigError")


def json_symlink_to_dev_zero(tmp: Path) -> Case:
    p = tmp / "config.json"
    p.symlink_to("/dev/zero")
    return Case(JSON, [str(p)], f"{p}: head config is a character device, {NOT_REGULAR}{STREAM}",
                {"what": "head config"})


def json_truncated(tmp: Path) -> Case:
    p = tmp / "config.json"
    p.write_text('{\n  "target_layer": 1,\n  "target_neuron": ')
    return Case(JSON, [str(p)], f"{p}: invalid JSON at line 3 column 20: Expecting value",
                {"what": "head config"})


# check_yaml_text: probe files, before PyYAML composes anything.
def yaml_10k_nested_flow_lists(tmp: Path) -> Case:
    return Case(YAML, ["expect: " + "[" * 10_000 + "]" * 10_000, "deep.probe.yaml"],
                "deep.probe.yaml:1: probe file nests deeper than 64 levels; expected at most 64 "
                "(set NEURONPATCH_MAX_YAML_DEPTH to raise it)")


def yaml_10k_nested_flow_maps(tmp: Path) -> Case:
    return Case(YAML, ["{a: " * 10_000 + "1" + "}" * 10_000, "deep.probe.yaml"],
                "deep.probe.yaml:1: probe file nests deeper than 64 levels; expected at most 64 "
                "(set NEURONPATCH_MAX_YAML_DEPTH to raise it)")


def yaml_deep_block_mappings(tmp: Path) -> Case:
    text = "".join(" " * i + f"k{i}:\n" for i in range(200)) + " " * 200 + "v\n"
    return Case(YAML, [text, "block.probe.yaml"],
                "block.probe.yaml:65: probe file nests deeper than 64 levels; expected at most 64 "
                "(set NEURONPATCH_MAX_YAML_DEPTH to raise it)")


def yaml_billion_laughs(tmp: Path) -> Case:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    return Case(YAML, ["\n".join(lines) + "\n", "lol.probe.yaml"],
                "lol.probe.yaml:1: YAML anchor '&a0' is not allowed in a probe file; expected plain "
                "values (write the value out where it is used)")


def yaml_alias_without_anchor(tmp: Path) -> Case:
    return Case(YAML, ["name: x\nhead: h\ninputs: *shared\n", "a.probe.yaml"],
                "a.probe.yaml:3: YAML alias '*shared' is not allowed in a probe file; expected plain "
                "values (write the value out where it is used)")


def yaml_merge_key(tmp: Path) -> Case:
    text = "name: x\nexpect:\n  <<: *base\n  slope: [0, 1]\n"
    return Case(YAML, [text, "m.probe.yaml"],
                "m.probe.yaml:3: YAML alias '*base' is not allowed in a probe file; expected plain "
                "values (write the value out where it is used)")


def yaml_nul_byte(tmp: Path) -> Case:
    return Case(YAML, ["name: x\nhead: h\ninputs:\n  - a\x00b\n", "n.probe.yaml"],
                "n.probe.yaml:4: probe file holds the control character U+0000 (NUL) at column 6; "
                "expected text (tab, newline and carriage return are the only control characters "
                "allowed)")


def yaml_noncharacter(tmp: Path) -> Case:
    return Case(YAML, ["name: x\ninputs: [\ufffe]\n", "u.probe.yaml"],
                "u.probe.yaml:2: probe file holds the control character U+FFFE at column 10; "
                "expected text (tab, newline and carriage return are the only control characters "
                "allowed)")


def yaml_too_many_values(tmp: Path) -> Case:
    text = "inputs:\n" + "".join(f"  - text {i}\n" for i in range(2000))
    return Case(YAML, [text, "many.probe.yaml"],
                "many.probe.yaml:999: probe file holds more than 1000 values; expected at most 1000 "
                "(set NEURONPATCH_MAX_YAML_NODES to raise it)", env={"NEURONPATCH_MAX_YAML_NODES": "1000"})


def yaml_over_size(tmp: Path) -> Case:
    return Case(YAML, ["inputs: [" + "x, " * 2_000_000 + "]\n", "huge.probe.yaml"],
                "huge.probe.yaml: probe file is 5.7 MiB, over the limit of 4.0 MiB; expected at most "
                "4194304 bytes (set NEURONPATCH_MAX_PROBE_FILE_BYTES to raise it)")


CASES: list[Callable[[Path], Case]] = [
    text_dev_zero, text_directory, text_fifo, text_symlink_loop, text_self_symlink, text_broken_symlink,
    text_missing, text_sparse_3gib, text_over_explicit_limit, text_nul_byte, text_escape_sequence,
    text_not_utf8, text_bad_env_override,
    lines_dev_zero, lines_fifo, lines_directory, lines_sparse_3gib, lines_too_many, lines_limit_from_env,
    lines_one_endless_line, lines_nul_byte, lines_not_utf8,
    json_nested_100k_lists, json_nested_100k_objects, json_deep_on_line_70, json_depth_from_env,
    json_directory, json_symlink_loop, json_symlink_to_dev_zero, json_truncated,
    yaml_10k_nested_flow_lists, yaml_10k_nested_flow_maps, yaml_deep_block_mappings, yaml_billion_laughs,
    yaml_alias_without_anchor, yaml_merge_key, yaml_nul_byte, yaml_noncharacter, yaml_too_many_values,
    yaml_over_size,
]


@pytest.mark.parametrize("build", CASES, ids=[c.__name__ for c in CASES])
def test_hostile_file_is_one_line(build: Callable[[Path], Case], tmp_path: Path) -> None:
    case = build(tmp_path)
    outcome = run_bounded(case.call, *case.args, env=case.env, **case.kwargs)
    assert_refused(outcome, case.error, case.message)


# What must keep working: the bounds refuse nothing a real file needs.
def test_brackets_inside_json_strings_do_not_count(tmp_path: Path) -> None:
    p = tmp_path / "config.json"
    p.write_text('{"note": "' + "[{" * 5000 + '", "quote": "a \\" [[["}')
    outcome = run_bounded(JSON, str(p))
    assert outcome.error is None, outcome.message
    assert_bounded(outcome)


def test_bom_and_blank_lines_are_kept_in_their_place(tmp_path: Path) -> None:
    from neuronpatch.limits import read_lines_bounded, read_text_bounded

    p = tmp_path / "inputs.txt"
    p.write_bytes("\ufeffThe cat sat.\r\n\n\tTabbed 猫 🐱\n".encode())
    assert read_lines_bounded(p) == ["The cat sat.", "", "\tTabbed 猫 🐱"]
    assert read_text_bounded(p).startswith("The cat")


def test_a_real_probe_file_passes_the_yaml_checks() -> None:
    from neuronpatch.limits import check_yaml_text

    root = Path(__file__).resolve().parents[2] / "probes"
    files = sorted(root.rglob("*.probe.yaml"))
    assert files
    for f in files:
        check_yaml_text(f.read_text(encoding="utf-8"), f)


def test_yaml_syntax_errors_are_left_to_the_loader() -> None:
    from neuronpatch.limits import check_yaml_text

    check_yaml_text("name: [unclosed\n", "s.probe.yaml")  # the probe loader reports it at its line



def test_errors_name_the_file_as_the_caller_shows_it(tmp_path: Path) -> None:
    from neuronpatch.errors import ProbeSpecError
    from neuronpatch.limits import load_json_bounded, read_lines_bounded, read_text_bounded

    p = tmp_path / "x.probe.yaml"
    p.write_bytes(b"name: x\n\x00\n")
    with pytest.raises(ProbeSpecError) as e:
        read_text_bounded(p, what="probe file", error=ProbeSpecError, display="probes/x.probe.yaml")
    assert str(e.value).startswith("probes/x.probe.yaml:2: probe file holds the control character U+0000")
    assert (e.value.path, e.value.line) == ("probes/x.probe.yaml", 2)  # type: ignore[attr-defined]
    with pytest.raises(ProbeSpecError, match=r"^inputs\.txt:2: inputs file holds"):
        read_lines_bounded(p, error=ProbeSpecError, display="inputs.txt")
    with pytest.raises(ProbeSpecError, match=r"^config\.json: head config is a directory"):
        load_json_bounded(tmp_path, what="head config", error=ProbeSpecError, display="config.json")
