"""Probe files as YAML documents: split, read safely, every key's line recorded.

A probe file holds one probe or several, separated by ``---``. The file is
split into documents *before* any YAML is parsed, so a syntax error, a
duplicate key or a Python tag in one document is that document's problem
only: the others still parse and run. This module is the one place where
probe-file text meets the YAML parser (bounds on what is parsed belong here).

Reading is safe and strict: a ``SafeLoader`` subclass (no Python tags, no
object construction) that records every duplicated key instead of keeping the
last one silently, and reads ``1e-6`` as a number (YAML 1.1 would read a
string). Every key path's line is kept, so messages and expectation outcomes
point at the line the user wrote.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from neuronpatch.errors import ProbeSpecError
from neuronpatch.limits import PROBE_FILE_BYTES, check_yaml_text, read_text_bounded
from neuronpatch.names import PROBE_SUFFIXES

__all__ = [
    "PROBE_SUFFIXES",
    "Document",
    "is_probe_file",
    "load_documents",
    "name_problem",
    "probe_stem",
    "split_documents",
]


Loc = tuple[str | int, ...]

# A document marker is `---` or `...` at the very start of a line, followed by a space
# or the end of the line. YAML forbids these inside scalars, so a line-based split is exact.
_START = re.compile(r"^---(?:[ \t]|$)")
_END = re.compile(r"^\.\.\.(?:[ \t]|$)")
_NAME_LINE = re.compile(r"^name:[ \t]*(?P<value>\S.*?)[ \t]*(?:#.*)?$", re.MULTILINE)


def is_probe_file(path: str | os.PathLike[str]) -> bool:
    """Whether a file name is a probe file (``*.probe.yaml`` or ``*.probe.yml``).

    Example:
        >>> is_probe_file("probes/demo.probe.yaml"), is_probe_file("config.yaml")
        (True, False)
    """
    return os.fspath(path).endswith(PROBE_SUFFIXES)


def probe_stem(path: str | os.PathLike[str]) -> str:
    """The file name without its probe suffix: the default probe name.

    Example:
        >>> probe_stem("probes/demo.probe.yaml")
        'demo'
    """
    name = Path(path).name
    for suffix in PROBE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def name_problem(name: str) -> str | None:
    """What is wrong with a probe name, or None.

    Example:
        >>> name_problem("a::b")
        "'a::b' contains '::' or a line break (they separate pytest node ids)"
    """
    if not name.strip():
        return "is empty"
    if "::" in name or "\n" in name:
        return f"{name!r} contains '::' or a line break (they separate pytest node ids)"
    return None


def split_documents(text: str) -> list[tuple[int, str]]:
    """Cut a probe file's text into documents, before any YAML is parsed.

    Returns:
        ``(first line, text)`` per chunk, 1-based lines; a chunk may hold only
        comments (it is dropped later).

    Example:
        >>> [line for line, _ in split_documents("a: 1\\n---\\nb: 2\\n")]
        [1, 2]
    """
    chunks: list[tuple[int, list[str]]] = [(1, [])]
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        if _START.match(line):
            chunks.append((number, [line]))
        elif _END.match(line):
            chunks[-1][1].append(line)
            chunks.append((number + 1, []))
        else:
            chunks[-1][1].append(line)
    return [(start, "".join(lines)) for start, lines in chunks if "".join(lines).strip()]


class _ProbeLoader(yaml.SafeLoader):
    """SafeLoader that records duplicate keys (every one) instead of keeping the last."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.problems: list[tuple[int, str]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if first is not None:
                self.problems.append((line, f"key {key!r}: duplicate key (first defined at line "
                                            f"{first}); expected each key once per mapping"))
            else:
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads `1e-6` as a string: a float needs a dot there. Tolerances are
# written that way all the time, so accept the YAML 1.2 / Python spelling too.
_ProbeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _record_lines(node: yaml.Node, path: Loc, out: dict[Loc, int]) -> None:
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = (*path, str(key_node.value))
                out[key] = key_node.start_mark.line + 1
                _record_lines(value_node, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record_lines(item, (*path, i), out)


@dataclass(frozen=True)
class Document:
    """One YAML document of a probe file, with the line of every key path.

    Attributes:
        path: the probe file (absolute).
        display: how messages name the file (usually relative to the rootdir).
        index: 0-based position among the file's non-empty documents.
        count: number of non-empty documents in the file.
        data: the parsed YAML value (None when the document is not valid YAML).
        lines: key path (``("expect", "slope")``, ``("inputs", 2)``) → 1-based line.
        problems: ``(line, text)`` of what the YAML reader refused (syntax errors,
            duplicate keys, tags); the schema adds its own problems to these.
        text: the document's own text.
    """

    path: Path
    display: str
    index: int
    count: int
    data: Any
    lines: Mapping[Loc, int] = field(default_factory=dict)
    problems: tuple[tuple[int, str], ...] = ()
    text: str = ""

    @property
    def line(self) -> int:
        """First line of the document."""
        return self.lines.get((), 1)

    @property
    def parsed(self) -> bool:
        """Whether the YAML itself could be read (duplicate keys aside)."""
        return self.data is not None

    @property
    def default_name(self) -> str:
        """The file's stem, with ``-N`` for the N-th document of a multi-document file."""
        stem = probe_stem(self.path)
        return stem if self.index == 0 else f"{stem}-{self.index + 1}"

    def line_of(self, loc: Loc) -> int:
        """Line of the longest prefix of ``loc`` that the file spells out."""
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return self.line

    def where(self, loc: Loc = ()) -> str:
        """``FILE:LINE`` of a key path."""
        return f"{self.display}:{self.line_of(loc)}"

    def problem_lines(self) -> list[str]:
        """The YAML reader's problems as ``FILE:LINE: ...`` lines."""
        return [f"{self.display}:{line}: {text}" for line, text in self.problems]

    def name_guess(self) -> str:
        """The probe's name if the document spells one sensibly, else the default name.

        For a document that is not valid YAML the ``name:`` line is read as text,
        so the broken probe keeps the node id it will have once fixed.
        """
        name: Any = None
        if isinstance(self.data, Mapping):
            name = self.data.get("name")
        elif self.data is None and (m := _NAME_LINE.search(self.text)):
            name = m.group("value").strip("'\"")
        if isinstance(name, str) and name.strip() and name_problem(name) is None:
            return name
        return self.default_name


def _first_content_line(start: int, text: str) -> int:
    for offset, line in enumerate(text.splitlines()):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and not _START.match(line):
            return start + offset
    return start


def _read_bounded_chunk(start: int, text: str, shown: str,
                        ) -> tuple[Any, dict[Loc, int], list[tuple[int, str]], bool]:
    """Depth, node count and anchors/aliases are bounded before PyYAML builds anything."""
    try:
        check_yaml_text("\n" * (start - 1) + text, shown, error=ProbeSpecError)
    except ProbeSpecError as e:
        line = getattr(e, "line", None) or _first_content_line(start, text)
        message = str(e).split(": ", 1)[1] if str(e).startswith(shown) else str(e)
        message = message.split(": ", 1)[1] if message.split(": ", 1)[0].isdigit() else message
        return None, {(): _first_content_line(start, text)}, [(line, message)], False
    return _read_chunk(start, text)


def _read_chunk(start: int, text: str) -> tuple[Any, dict[Loc, int], list[tuple[int, str]], bool]:
    """Parse one chunk: (data, lines, problems, empty). Line numbers are the file's."""
    # Leading newlines put the parser's marks on the file's own line numbers.
    loader = _ProbeLoader("\n" * (start - 1) + text)
    lines: dict[Loc, int] = {}
    data: Any = None
    empty = True
    try:
        node = loader.get_single_node()
        if node is not None:
            _record_lines(node, (), lines)
            data = loader.construct_document(node)
            empty = data is None and not loader.problems
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else _first_content_line(start, text)
        problem = e.problem or e.context or "invalid YAML"
        if isinstance(e, yaml.constructor.ConstructorError):
            problem += " (probe files are read with a safe loader: no Python tags)"
        return None, {(): _first_content_line(start, text)}, [(line, f"invalid YAML: {problem}")], False
    except yaml.YAMLError as e:
        return None, {(): _first_content_line(start, text)}, [(start, f"invalid YAML: {e}")], False
    finally:
        loader.dispose()
    return data, lines, list(loader.problems), empty


def load_documents(path: str | os.PathLike[str], *, display: str | None = None) -> list[Document]:
    """Read a probe file into documents; a broken document carries its problems.

    Empty documents (nothing but comments) are dropped.

    Raises:
        ProbeSpecError: the file cannot be read at all (``FILE: ...``).

    Example:
        >>> docs = load_documents("probes/demo.probe.yaml")   # doctest: +SKIP
        >>> docs[0].where(("expect", "slope"))                # doctest: +SKIP
        'probes/demo.probe.yaml:12'
    """
    path = Path(path)
    shown = display or os.fspath(path)
    # Size, special files, NUL and control bytes: checked before anything parses the file.
    text = read_text_bounded(path, max_bytes=PROBE_FILE_BYTES, what="probe file", error=ProbeSpecError,
                             display=shown)
    found = []
    for start, chunk in split_documents(text):
        data, lines, problems, empty = _read_bounded_chunk(start, chunk, shown)
        if not empty:
            found.append((data, lines, problems, chunk))
    return [
        Document(path=path.resolve(), display=shown, index=i, count=len(found), data=data,
                 lines=lines, problems=tuple(problems), text=chunk)
        for i, (data, lines, problems, chunk) in enumerate(found)
    ]
