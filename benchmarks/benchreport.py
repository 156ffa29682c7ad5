"""The one way every benchmark prints its table and writes it to ``docs/benchmarks/``.

A :class:`Report` prints each line as it is measured and, at the end, writes
the same lines to its markdown file under a header that says which command
produced them, when, with which torch and how many threads, and the machine's
load average (``os.getloadavg()``) at the start and at the end of the run: so
the numbers in the docs are exactly the ones the script printed, and a reader
can see how busy the machine was.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks"


def add_out(ap: argparse.ArgumentParser, name: str) -> None:
    """``--out PATH``, by default ``docs/benchmarks/<name>.md``."""
    ap.add_argument("--out", type=Path, default=DOCS / f"{name}.md",
                    help=f"markdown file the table is written to (default docs/benchmarks/{name}.md)")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _threads() -> str:
    torch = sys.modules.get("torch")  # never import torch just to say this (bench_collect measures imports)
    if torch is None:
        return "torch not used in this process"
    return f"{torch.get_num_threads()} torch threads"


def _torch_version() -> str:
    torch = sys.modules.get("torch")
    if torch is not None:
        return str(torch.__version__)
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "not installed"


class Report:
    """Lines printed as they come, then written with a header to ``out``."""

    def __init__(self, title: str, out: Path, argv: list[str] | None = None) -> None:
        self.title = title
        self.out = Path(out)
        script = f"benchmarks/{title}.py"  # called by import (the tests): main(argv)
        if argv is None:
            argv = sys.argv[1:]
            path = Path(sys.argv[0]).resolve()
            script = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
        self.command = shlex.join(["python", script, *argv])
        self.started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        self.load_start = _load()
        self.lines: list[str] = []

    def line(self, text: str = "") -> None:
        """Print one line of the table (or a note under it) and keep it for the file."""
        print(text, flush=True)
        self.lines.append(text)

    def write(self) -> Path:
        """Write the header and every line printed so far to ``out``; return its path."""
        header = (f"Produced by `{self.command}` on {self.started}; torch {_torch_version()}, "
                  f"{_threads()}, {os.cpu_count()} CPUs; load average (1, 5, 15 min) "
                  f"{self.load_start} at the start, {_load()} at the end.")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(f"# {self.title}\n\n{header}\n\n" + "\n".join(self.lines) + "\n")
        print(f"\n{header}\nwritten to {self.out}", flush=True)
        return self.out
