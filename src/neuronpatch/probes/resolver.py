"""Probe keys that name files, resolved: head globs, inputs files, rootdir containment.

The schema (:mod:`neuronpatch.probes.schema`) checks what a document says; this module
checks what it points at, against the probe file's directory: that ``head:`` is a head
directory (or a glob that matches some), that ``inputs: {file: …}`` is a readable text
file (read within its limits, one input a line), and, when the caller names a rootdir,
that ``inputs.file`` and ``baseline.file`` resolve inside it. Each problem is a
``(key path, message)`` pair that :mod:`neuronpatch.probes.diagnostics` turns into a
``FILE:LINE: key …`` line.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuronpatch.probes.documents import Loc

GLOB_CHARS = re.compile(r"[*?\[]")


def head_dirs(base_dir: Path, head: str) -> list[tuple[Path, str | None]]:
    """Resolve a probe's ``head:`` (a path or a glob) against the probe file's directory.

    Returns:
        ``(directory, label)`` pairs; ``label`` is None for a plain path and the
        part the glob matched (e.g. ``demo_causal``) for a glob.

    Example:
        >>> head_dirs(Path("probes"), "heads/*")       # doctest: +SKIP
        [(PosixPath('probes/heads/demo_causal'), 'demo_causal'), ...]
    """
    target = base_dir / head
    if not GLOB_CHARS.search(head):
        return [(target, None)]
    parts = Path(head).parts
    fixed = next(i for i, p in enumerate(parts) if GLOB_CHARS.search(p))
    root = base_dir.joinpath(*parts[:fixed])
    matches = sorted(Path(p) for p in glob.glob(os.fspath(target), recursive=True))
    return [(p, p.relative_to(root).as_posix()) for p in matches
            if p.is_dir() and (p / "config.json").is_file()]


def check_head(value: str, base: Path) -> list[tuple[Path, str | None]]:
    """The head directories ``value`` names.

    Raises:
        ValueError: it names none, or a path that is not a head directory.
    """
    found = head_dirs(base, value)
    if GLOB_CHARS.search(value):
        if not found:
            raise ValueError(
                f"glob {value!r} matches no head directory under {base}; expected a glob "
                "that matches at least one directory holding config.json"
            )
        return found
    path = found[0][0]
    if not path.exists():
        raise ValueError(
            f"head directory {value!r} not found (looked for {path}); expected a head "
            "directory (config.json + weights) relative to this file"
        )
    if not path.is_dir():
        raise ValueError(f"{value!r} is a file; expected a head directory (config.json + weights)")
    if not (path / "config.json").is_file():
        raise ValueError(
            f"head directory {value!r} has no config.json; expected a head directory "
            "(config.json + head.pt or head.safetensors)"
        )
    return found


def check_inside_root(name: str, base: Path, root: str | os.PathLike[str] | None, what: str) -> None:
    """Refuse a path that resolves outside the rootdir (when the caller names one).

    Raises:
        ValueError: ``base / name`` resolves outside ``root``.
    """
    if root is None:
        return
    path = (base / name).resolve()
    if not path.is_relative_to(Path(root).resolve()):
        raise ValueError(
            f"{what} {name!r} resolves to {path}, outside the rootdir {root}; expected a path "
            "inside the repository (--neuronpatch-allow-outside-rootdir allows it)")


def read_inputs(value: Mapping[Any, Any], base: Path, root: str | os.PathLike[str] | None) -> list[str]:
    """The texts of ``inputs: {file: path}``, one a line, blank lines left out.

    Raises:
        ValueError: the mapping is malformed, or the file is missing, outside the rootdir,
            over its limits or holds no input.
    """
    keys = set(value)
    if keys != {"file"}:
        extra = sorted(str(k) for k in keys - {"file"})
        problem = f"unknown key {extra[0]!r}" if extra else "'file' is missing"
        raise ValueError(f"{problem}; expected a list of texts or {{file: path}}")
    name = value["file"]
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"file is {name!r}; expected the path of a text file, one input a line")
    check_inside_root(name, base, root, "inputs file")
    path = base / name
    if not path.exists() and not path.is_symlink():
        raise ValueError(
            f"inputs file {name!r} not found (looked for {path}); expected a text file "
            "relative to this file, one input a line"
        )
    from neuronpatch.limits import read_lines_bounded

    # Bounded and lazy: /dev/zero or a multi-GB file is refused, never read whole.
    texts = [line for line in read_lines_bounded(path, what=f"inputs file {name!r}", display=name)
             if line.strip()]
    if not texts:
        raise ValueError(f"inputs file {name!r} has no non-blank line; expected one input a line")
    return texts


@dataclass
class Resolved:
    """A document's data with its files read, what it points at, and what went wrong."""

    data: dict[str, Any]  # inputs: {file: …} replaced by its texts, or dropped when it failed
    heads: list[tuple[Path, str | None]] = field(default_factory=list)
    problems: list[tuple[Loc, str]] = field(default_factory=list)


def resolve(data: Mapping[str, Any], base: Path, root: str | os.PathLike[str] | None = None) -> Resolved:
    """Check and read what one document's keys point at, relative to ``base``.

    Keys of the wrong type are left as they are, for the schema to name.

    Example:
        >>> resolve({"head": "heads/demo_causal"}, Path("probes")).problems
        []
    """
    out = Resolved(dict(data))
    head = data.get("head")
    if isinstance(head, str) and head.strip():
        try:
            out.heads = check_head(head, base)
        except ValueError as e:
            out.problems.append((("head",), str(e)))
    inputs = data.get("inputs")
    if isinstance(inputs, Mapping):
        try:
            out.data["inputs"] = read_inputs(inputs, base, root)
        except ValueError as e:
            out.problems.append((("inputs",), str(e)))
            del out.data["inputs"]
    baseline = data.get("baseline")
    name = baseline.get("file") if isinstance(baseline, Mapping) else None
    if isinstance(name, str) and name.strip():
        try:
            check_inside_root(name, base, root, "baseline file")
        except ValueError as e:
            out.problems.append((("baseline", "file"), str(e)))
    return out
