"""Bounded readers: every file a user hands neuronpatch is read within a limit.

neuronpatch runs in CI jobs on files people edit by hand: probe files, head
configs, baselines, input lists. Any of them may be endless (``/dev/zero``),
huge, a FIFO, a directory, a symlink loop, nested 100,000 levels deep, a YAML
alias bomb, or binary junk. Each of those must end in one error line that names
the file, the line where one is meaningful, and what is allowed: never a hang,
an exhausted machine, or a ``RecursionError``.

The rules, in the order they are checked:

1. Only regular files are read. Directories, devices, FIFOs and sockets are
   refused after ``stat`` and before ``open`` (opening a FIFO can block, opening
   a device can have effects); symlink loops are refused by name.
2. A file over its byte limit is refused before it is read; a file that grows
   while it is read (or lies about its size, like ``/proc``) is cut off at the
   limit, never read whole.
3. Text is UTF-8 without control characters other than tab, newline and
   carriage return; the first offender is reported at ``FILE:LINE``.
4. JSON and YAML nesting is measured on the text *before* a recursive parser
   walks it; YAML anchors and aliases are refused (probe files need none, and
   they are how an alias bomb expands a few hundred bytes into gigabytes).

Each limit is a :class:`Limit`: a documented default that a user who needs more
raises with an environment variable (``NEURONPATCH_MAX_INPUTS_FILE_LINES=500000``),
which the CLI and the pytest plugin both honour. A caller can also pass an
explicit number. Errors are :class:`~neuronpatch.errors.LimitError` unless the
caller names a narrower class with ``error=`` (``HeadConfigError`` for a head's
``config.json``, ``BaselineError`` for a baseline): the message is the same one line.

Example:
    >>> from neuronpatch.limits import load_json_bounded
    >>> load_json_bounded("probes/heads/demo_causal/config.json")["head_type"]  # doctest: +SKIP
    'regression'
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuronpatch.errors import LimitError, NeuronpatchError

__all__ = [
    "CORPUS_FILE_BYTES",
    "INPUTS_FILE_BYTES",
    "INPUTS_FILE_LINES",
    "JSON_DEPTH",
    "JSON_FILE_BYTES",
    "LIMITS",
    "PROBE_FILE_BYTES",
    "YAML_DEPTH",
    "YAML_NODES",
    "Limit",
    "check_regular_file",
    "check_yaml_text",
    "load_json_bounded",
    "read_lines_bounded",
    "read_text_bounded",
]

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limit:
    """One documented bound, with the environment variable that raises it.

    Example:
        >>> JSON_DEPTH.default, JSON_DEPTH.env
        (64, 'NEURONPATCH_MAX_JSON_DEPTH')
    """

    env: str
    default: int
    unit: str
    applies_to: str

    def get(self) -> int:
        """The limit in force: the environment variable when set, else the default.

        Raises:
            LimitError: the environment variable is not a positive integer.
        """
        raw = os.environ.get(self.env)
        if raw is None or raw.strip() == "":
            return self.default
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            value = 0
        if value <= 0:
            raise LimitError(f"{self.env}={raw!r} is invalid; expected a positive integer "
                             f"(the default is {self.default})")
        return value


# Probe files are a few KB; 4 MiB holds thousands of inline inputs.
PROBE_FILE_BYTES = Limit("NEURONPATCH_MAX_PROBE_FILE_BYTES", 4 * MiB, "bytes", "a probe file")
# Probe files nest 4-6 levels. PyYAML composes recursively (about three Python
# frames a level), so the bound must stay well inside Python's recursion limit.
YAML_DEPTH = Limit("NEURONPATCH_MAX_YAML_DEPTH", 64, "levels", "a probe file's nesting")
# Values (scalars and collections) in one probe file.
YAML_NODES = Limit("NEURONPATCH_MAX_YAML_NODES", 200_000, "values", "a probe file")
# An inputs file (one text a line): every line is a forward pass, so 100,000 is already a day of CPU.
INPUTS_FILE_BYTES = Limit("NEURONPATCH_MAX_INPUTS_FILE_BYTES", 64 * MiB, "bytes", "an inputs file")
INPUTS_FILE_LINES = Limit("NEURONPATCH_MAX_INPUTS_FILE_LINES", 100_000, "lines", "an inputs file")
# config.json and baseline files: a few KB; metadata from training pipelines may add some.
JSON_FILE_BYTES = Limit("NEURONPATCH_MAX_JSON_FILE_BYTES", 16 * MiB, "bytes",
                        "a config.json or baseline file")
JSON_DEPTH = Limit("NEURONPATCH_MAX_JSON_DEPTH", 64, "levels",
                   "a config.json or baseline file's nesting")
# train-head --corpus: plain text read whole.
CORPUS_FILE_BYTES = Limit("NEURONPATCH_MAX_CORPUS_FILE_BYTES", 256 * MiB, "bytes", "a training corpus")

LIMITS: tuple[Limit, ...] = (PROBE_FILE_BYTES, YAML_DEPTH, YAML_NODES, INPUTS_FILE_BYTES,
                             INPUTS_FILE_LINES, JSON_FILE_BYTES, JSON_DEPTH, CORPUS_FILE_BYTES)

ErrorClass = type[NeuronpatchError]

# C0 controls except tab, LF and CR; DEL; C1 controls.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# What PyYAML's reader accepts, minus NEL (U+0085): anything else makes it raise
# ReaderError while the loader is being built, before any line number is known.
_YAML_UNPRINTABLE = re.compile("[^\x09\x0a\x0d\x20-\x7e\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_CONTROL_NAMES = {0x00: "NUL", 0x07: "BEL", 0x08: "backspace", 0x0B: "vertical tab",
                  0x0C: "form feed", 0x1B: "ESC", 0x7F: "DEL", 0x85: "NEL"}
# A JSON string (skipped) or one bracket (counted).
_JSON_BRACKETS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def _resolve(limit: int | Limit | None, default: Limit) -> tuple[int, str]:
    """The number in force and, for a :class:`Limit`, how to raise it."""
    limit = default if limit is None else limit
    if isinstance(limit, Limit):
        return limit.get(), f" (set {limit.env} to raise it)"
    return int(limit), ""


def _size(n: int) -> str:
    if n >= 1024 * MiB:
        return f"{n / (1024 * MiB):.1f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n} bytes"


def _char(ch: str) -> str:
    code = ord(ch)
    name = _CONTROL_NAMES.get(code) or unicodedata.name(ch, "")
    return f"U+{code:04X}" + (f" ({name})" if name else "")


def _raise(error: ErrorClass, message: str, path: object, line: int | None = None) -> None:
    err = error(message)
    err.path = str(path)  # type: ignore[attr-defined]  # for callers that re-word the message
    err.line = line  # type: ignore[attr-defined]
    raise err


@contextmanager
def _shown_as(path: Path, display: str | os.PathLike[str] | None) -> Iterator[None]:
    """Name the file as ``display`` (the path as the user wrote it) in any error raised inside."""
    try:
        yield
    except NeuronpatchError as e:
        message, prefix = str(e), str(path)
        if display is None or getattr(e, "path", None) != prefix or not message.startswith(prefix):
            raise
        err = type(e)(os.fspath(display) + message[len(prefix):])
        err.path = os.fspath(display)  # type: ignore[attr-defined]
        err.line = getattr(e, "line", None)  # type: ignore[attr-defined]
        raise err from None


def _kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _stat_regular(path: Path, what: str, error: ErrorClass) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            _raise(error, f"{path}: {what} is a broken symlink (its target "
                          f"{os.readlink(path)!r} does not exist); expected a regular file", path)
        _raise(error, f"{path}: {what} not found", path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            _raise(error, f"{path}: {what} is a symlink loop; expected a regular file", path)
        if e.errno == errno.ENAMETOOLONG:
            _raise(error, f"{path}: {what} path is too long for this file system", path)
        _raise(error, f"{path}: cannot read {what}: {e.strerror}", path)
    kind = _kind(st.st_mode)
    if kind is not None:
        shown = kind if kind.startswith("not") else f"is {kind}"
        _raise(error, f"{path}: {what} {shown}, not a regular file; expected a regular file"
                      + (" (write the stream to a file first)" if "FIFO" in shown or "device" in shown
                         else ""), path)
    return st


def _check_size(path: Path, what: str, size: int, max_bytes: int, hint: str, error: ErrorClass) -> None:
    if size > max_bytes:
        _raise(error, f"{path}: {what} is {_size(size)}, over the limit of {_size(max_bytes)}; "
                      f"expected at most {max_bytes} bytes{hint}", path)


def check_regular_file(path: str | Path, *, max_bytes: int | Limit, what: str = "file",
                       error: ErrorClass = LimitError) -> int:
    """Refuse ``path`` unless it is a regular file within ``max_bytes``; nothing is read.

    For callers that read the file themselves (``train-head --corpus``).

    Returns:
        The file's size in bytes.

    Example:
        >>> check_regular_file("/dev/zero", max_bytes=1024, what="corpus")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        neuronpatch.errors.LimitError: /dev/zero: corpus is a character device, not a regular file; ...
    """
    path = Path(path)
    limit, hint = _resolve(max_bytes, JSON_FILE_BYTES)
    st = _stat_regular(path, what, error)
    _check_size(path, what, st.st_size, limit, hint, error)
    return st.st_size


def _open_regular(path: Path, what: str, max_bytes: int, hint: str, error: ErrorClass) -> int:
    """An fd on a regular file within the limit (checked before and after opening)."""
    st = _stat_regular(path, what, error)
    _check_size(path, what, st.st_size, max_bytes, hint, error)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP:
            _raise(error, f"{path}: {what} is a symlink loop; expected a regular file", path)
        _raise(error, f"{path}: cannot read {what}: {e.strerror}", path)
    st = os.fstat(fd)  # the path may have been swapped between stat and open
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        _raise(error, f"{path}: {what} is {_kind(st.st_mode)}, not a regular file; "
                      "expected a regular file", path)
    return fd


def _check_text(text: str, path: Path, what: str, error: ErrorClass, *,
                pattern: re.Pattern[str] = _CONTROL, first_line: int = 1) -> None:
    m = pattern.search(text)
    if m is None:
        return
    line = first_line + text.count("\n", 0, m.start())
    col = m.start() - (text.rfind("\n", 0, m.start()) + 1) + 1
    _raise(error, f"{path}:{line}: {what} holds the control character {_char(m.group())} at column "
                  f"{col}; expected text (tab, newline and carriage return are the only control "
                  "characters allowed)", path, line)


def _decode(data: bytes, path: Path, what: str, error: ErrorClass, first_line: int = 1) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data.count(b"\n", 0, e.start)
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        _raise(error, f"{path}:{line}: {what} is not UTF-8 text (byte 0x{data[e.start]:02x} at "
                      f"column {col}); expected UTF-8", path, line)
    return text


def read_text_bounded(path: str | Path, *, max_bytes: int | Limit | None = None, what: str = "file",
                      error: ErrorClass = LimitError, display: str | os.PathLike[str] | None = None) -> str:
    """Read a whole UTF-8 text file that is regular and at most ``max_bytes`` long.

    Args:
        path: the file.
        max_bytes: a number, or a :class:`Limit` (default :data:`JSON_FILE_BYTES`).
        what: how messages name the file ("probe file", "head config").
        error: the :class:`NeuronpatchError` subclass to raise.
        display: how messages name the file, when not as ``path`` (a path relative to pytest's rootdir).

    Returns:
        The text, without a leading byte-order mark.

    Raises:
        LimitError (or ``error``): missing, not a regular file, a symlink loop,
            over the limit, not UTF-8, or holding a control character (``FILE:LINE``).

    Example:
        >>> read_text_bounded("/dev/zero", max_bytes=1024, what="head config")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        neuronpatch.errors.LimitError: /dev/zero: head config is a character device, not a regular file; ...
    """
    path = Path(path)
    with _shown_as(path, display):
        return _read_text(path, max_bytes, what, error)


def _read_text(path: Path, max_bytes: int | Limit | None, what: str, error: ErrorClass) -> str:
    limit, hint = _resolve(max_bytes, JSON_FILE_BYTES)
    fd = _open_regular(path, what, limit, hint, error)
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)  # never more than the limit, whatever stat said
        except OSError as e:
            _raise(error, f"{path}: cannot read {what}: {e.strerror}", path)
    if len(data) > limit:
        _raise(error, f"{path}: {what} is over the limit of {_size(limit)}; expected at most "
                      f"{limit} bytes{hint}", path)
    text = _decode(data, path, what, error).removeprefix("\ufeff")
    _check_text(text, path, what, error)
    return text


def _lines(path: Path, what: str, max_bytes: int, bytes_hint: str, max_lines: int, lines_hint: str,
           error: ErrorClass) -> Iterator[str]:
    fd = _open_regular(path, what, max_bytes, bytes_hint, error)
    total = 0
    with os.fdopen(fd, "rb") as f:
        for number in range(1, max_lines + 2):
            raw = f.readline(max_bytes - total + 1)
            if not raw:
                return
            total += len(raw)
            if total > max_bytes:
                _raise(error, f"{path}:{number}: {what} is over the limit of {_size(max_bytes)}; "
                              f"expected at most {max_bytes} bytes{bytes_hint}", path, number)
            if number > max_lines:
                _raise(error, f"{path}:{number}: {what} has more than {max_lines} lines; expected "
                              f"at most {max_lines}{lines_hint}", path, number)
            text = _decode(raw, path, what, error, first_line=number).rstrip("\r\n")
            if number == 1:
                text = text.removeprefix("\ufeff")
            _check_text(text, path, what, error, first_line=number)
            yield text


def read_lines_bounded(path: str | Path, *, max_bytes: int | Limit | None = None,
                       max_lines: int | Limit | None = None, what: str = "inputs file",
                       error: ErrorClass = LimitError,
                       display: str | os.PathLike[str] | None = None) -> list[str]:
    """Read a text file one line at a time, within a byte and a line limit.

    Lines are read lazily, so an endless or multi-GB file stops at the limit
    instead of filling memory; special files are refused before they are opened.

    Args:
        path: the file (one text a line).
        max_bytes: a number or a :class:`Limit` (default :data:`INPUTS_FILE_BYTES`).
        max_lines: a number or a :class:`Limit` (default :data:`INPUTS_FILE_LINES`).
        what: how messages name the file.
        error: the :class:`NeuronpatchError` subclass to raise.
        display: how messages name the file, when not as ``path``.

    Returns:
        Every line without its line ending, blank ones included (so that an
        index plus one is the line number); callers drop blanks as they see fit.

    Example:
        >>> read_lines_bounded("/dev/zero", what="inputs file")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        neuronpatch.errors.LimitError: /dev/zero: inputs file is a character device, not a regular file; ...
    """
    path = Path(path)
    nbytes, bytes_hint = _resolve(max_bytes, INPUTS_FILE_BYTES)
    nlines, lines_hint = _resolve(max_lines, INPUTS_FILE_LINES)
    with _shown_as(path, display):
        return list(_lines(path, what, nbytes, bytes_hint, nlines, lines_hint, error))


def _json_depth_error(text: str, path: Path, what: str, max_depth: int, hint: str,
                      error: ErrorClass) -> None:
    depth = 0
    for m in _JSON_BRACKETS.finditer(text):
        tok = m.group()
        if tok in "[{":
            depth += 1
            if depth > max_depth:
                line = 1 + text.count("\n", 0, m.start())
                _raise(error, f"{path}:{line}: {what} nests deeper than {max_depth} levels; "
                              f"expected at most {max_depth}{hint}", path, line)
        elif tok in "]}":
            depth -= 1


def load_json_bounded(path: str | Path, *, max_bytes: int | Limit | None = None,
                      max_depth: int | Limit | None = None, what: str = "JSON file",
                      error: ErrorClass = LimitError, display: str | os.PathLike[str] | None = None) -> Any:
    """Parse a JSON file after checking its size, its bytes and its nesting depth.

    The depth is measured on the text (brackets outside strings) before
    ``json.loads`` recurses into it, so a file nested 100,000 levels deep is one
    error line, not a ``RecursionError``.

    Args:
        path: the file.
        max_bytes: default :data:`JSON_FILE_BYTES`.
        max_depth: default :data:`JSON_DEPTH`.
        what: how messages name the file ("head config", "baseline").
        error: the :class:`NeuronpatchError` subclass to raise.
        display: how messages name the file, when not as ``path``.

    Raises:
        LimitError (or ``error``): as :func:`read_text_bounded`, or too deep
            (``FILE:LINE``), or invalid JSON (``FILE: invalid JSON at line L column C: ...``).

    Example:
        >>> cfg = load_json_bounded("head/config.json", what="head config",
        ...                         error=HeadConfigError)            # doctest: +SKIP
    """
    path = Path(path)
    with _shown_as(path, display):
        return _load_json(path, max_bytes, max_depth, what, error)


def _load_json(path: Path, max_bytes: int | Limit | None, max_depth: int | Limit | None, what: str,
               error: ErrorClass) -> Any:
    depth, depth_hint = _resolve(max_depth, JSON_DEPTH)
    text = _read_text(path, max_bytes, what, error)
    _json_depth_error(text, path, what, depth, depth_hint, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        _raise(error, f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}", path, e.lineno)
    except RecursionError:  # only when a caller raised the depth past what Python can recurse
        _raise(error, f"{path}: {what} nests too deep for Python's JSON parser; expected at most "
                      f"{JSON_DEPTH.default} levels", path)


def check_yaml_text(text: str, path: str | Path, *, max_bytes: int | Limit | None = None,
                    max_depth: int | Limit | None = None, max_nodes: int | Limit | None = None,
                    what: str = "probe file", error: ErrorClass = LimitError) -> None:
    """Check YAML text before a parser walks it: size, characters, depth, values, aliases.

    Call it between reading a probe file and building a YAML loader. It finds,
    at ``FILE:LINE``: text over ``max_bytes``; a character PyYAML's reader would
    refuse (NUL, other controls, U+FFFE); nesting deeper than ``max_depth`` (a few
    KB of ``[`` would otherwise end in ``RecursionError``); more than ``max_nodes``
    values; any anchor (``&a``) or alias (``*a``), which probe files do not
    need and which an alias bomb is built from. Everything is done with PyYAML's
    scanner, which does not recurse, and stops at the first problem. Syntax
    errors are left to the loader, which reports them with its own line.

    Args:
        text: the file's text (as :func:`read_text_bounded` returns it).
        path: how messages name the file (the path as the user wrote it).
        max_bytes: default :data:`PROBE_FILE_BYTES`.
        max_depth: default :data:`YAML_DEPTH`.
        max_nodes: default :data:`YAML_NODES`.
        what: how messages name the file.
        error: the :class:`NeuronpatchError` subclass to raise (``ProbeSpecError``).

    Example:
        >>> check_yaml_text("a: &x [1]\\nb: *x\\n", "p.probe.yaml")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        neuronpatch.errors.LimitError: p.probe.yaml:1: YAML anchor '&x' is not allowed in a probe file; ...
    """
    import yaml

    nbytes, bytes_hint = _resolve(max_bytes, PROBE_FILE_BYTES)
    depth_limit, depth_hint = _resolve(max_depth, YAML_DEPTH)
    node_limit, node_hint = _resolve(max_nodes, YAML_NODES)
    size = len(text.encode("utf-8", "surrogatepass"))
    _check_size(Path(path), what, size, nbytes, bytes_hint, error)
    _check_text(text, Path(path), what, error, pattern=_YAML_UNPRINTABLE)

    loader_cls = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's scanner is ~20x faster
    opening = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken,
               yaml.FlowMappingStartToken, yaml.FlowSequenceStartToken)
    closing = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)
    depth = nodes = 0
    try:
        for token in yaml.scan(text, Loader=loader_cls):
            line = token.start_mark.line + 1
            if isinstance(token, opening):
                depth += 1
                nodes += 1
                if depth > depth_limit:
                    _raise(error, f"{path}:{line}: {what} nests deeper than {depth_limit} levels; "
                                  f"expected at most {depth_limit}{depth_hint}", path, line)
            elif isinstance(token, closing):
                depth -= 1
            elif isinstance(token, yaml.ScalarToken):
                nodes += 1
            elif isinstance(token, (yaml.AnchorToken, yaml.AliasToken)):
                sigil, kind = ("&", "anchor") if isinstance(token, yaml.AnchorToken) else ("*", "alias")
                _raise(error, f"{path}:{line}: YAML {kind} '{sigil}{token.value}' is not allowed in "
                              f"{what if what.startswith(('a ', 'an ', 'the ')) else 'a ' + what}; "
                              "expected plain values (write the value out where it is used)", path, line)
            if nodes > node_limit:
                _raise(error, f"{path}:{line}: {what} holds more than {node_limit} values; expected "
                              f"at most {node_limit}{node_hint}", path, line)
    except yaml.YAMLError:
        return  # a syntax error: the loader reports it with its line
