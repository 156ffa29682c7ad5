"""Writing a result to disk: summary.json and the five figures.

One function serves the CLI (``neuronpatch run --out DIR``) and the pytest
plugin (one directory per probe), so both produce the same files. Every
summary.json follows the JSON Schema that ships in the package
(``neuronpatch/schemas/summary.schema.json``, :func:`summary_schema`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuronpatch._io import atomic_write_bytes, atomic_write_text, ensure_directory
from neuronpatch.result import ExperimentResult, to_jsonable


def summary_schema() -> dict[str, Any]:
    """The JSON Schema every summary.json follows (shipped in the package).

    Example:
        >>> summary_schema()["title"]
        'neuronpatch summary.json'
    """
    from importlib.resources import files

    text = files("neuronpatch").joinpath("schemas", "summary.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@dataclass(frozen=True)
class Artifacts:
    """Where a result's files went."""

    directory: Path
    summary: Path
    figures: tuple[Path, ...]


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename): a crash never leaves half a file."""
    atomic_write_text(path, json.dumps(to_jsonable(data), indent=2, allow_nan=False) + "\n")


@dataclass(frozen=True)
class Bundle:
    """A result's files in memory: the summary (JSON-safe) and the figures' PNG bytes."""

    summary: dict[str, Any]
    figures: dict[str, bytes]


def build_artifacts(
    result: ExperimentResult,
    *,
    extra: Mapping[str, Any] | None = None,
    figures: bool = True,
    title: str | None = None,
    expected: Mapping[str, str] | None = None,
) -> Bundle:
    """What :func:`write_artifacts` writes, without writing it (see :func:`write_bundle`)."""
    drawn: dict[str, bytes] = {}
    if figures:
        from neuronpatch.plots import figure_bytes  # matplotlib only when figures are wanted

        drawn = figure_bytes(result, title=title, expected=expected)
    summary = result.summary()
    summary["figures"] = list(drawn)
    if extra:
        summary.update(extra)
    return Bundle(to_jsonable(summary), drawn)


def write_bundle(bundle: Bundle, out_dir: str | Path) -> Artifacts:
    """Write a :class:`Bundle` into ``out_dir``: each file atomically, the summary last."""
    out = Path(out_dir)
    ensure_directory(out, "artifacts directory")
    paths = tuple(atomic_write_bytes(out / name, data) for name, data in bundle.figures.items())
    write_json(out / "summary.json", bundle.summary)
    return Artifacts(out, out / "summary.json", paths)


def write_artifacts(
    result: ExperimentResult,
    out_dir: str | Path,
    *,
    extra: Mapping[str, Any] | None = None,
    figures: bool = True,
    title: str | None = None,
    expected: Mapping[str, str] | None = None,
) -> Artifacts:
    """Write ``summary.json`` (plus ``extra`` keys) and the figures into ``out_dir``.

    ``expected`` (metric → range text) goes into the figures' titles.

    Example:
        >>> art = write_artifacts(res, "out/demo_causal")      # doctest: +SKIP
        >>> art.summary.name, len(art.figures)                  # doctest: +SKIP
        ('summary.json', 5)
    """
    ensure_directory(Path(out_dir), "artifacts directory")  # before the figures take their time
    return write_bundle(build_artifacts(result, extra=extra, figures=figures, title=title,
                                        expected=expected), out_dir)
