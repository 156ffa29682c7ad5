"""README's demo table is what `make demo` prints: every number and verdict, from a real run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_rows() -> dict[str, list[str]]:
    """head -> [held-out R², baseline r, causal slope, R², verdict] from README's demo table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## What the demo shows"):]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        m = re.match(r"\| `(demo_\w+)` \|", line)
        if rows and not m:
            break  # the end of the first table
        if m:
            cells = [c.strip().strip("*") for c in line.strip("|").split("|")]
            rows[m.group(1)] = cells[3:8]
    return rows


def test_readme_demo_table_is_what_the_demo_prints(tmp_path, capsys):
    from neuronpatch.demo.run_demo import HEADS, main

    assert main(["--probes", str(ROOT / "probes"), "--out", str(tmp_path / "demo")]) == 0
    printed = {}
    for line in capsys.readouterr().out.splitlines():
        parts = line.split()
        if parts and parts[0] in HEADS and parts[0] not in printed:  # the table, not the figure list
            # head, reads, trained on, held-out R², baseline r, slope, R², verdict (the rest)
            printed[parts[0]] = [*parts[3:7], " ".join(parts[7:])]
    readme = _readme_rows()
    assert sorted(readme) == sorted(HEADS) == sorted(printed)
    assert readme == printed
