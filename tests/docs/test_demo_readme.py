"""README's demo table is what `make demo` prints, and the printed output the docs show is what
a run prints: every number and verdict, from a real run."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]


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


# Printed output in the docs, run: a ```` ``` ```` block under ``<!-- output of: pytest ARGS -->``
# is what ``pytest ARGS`` prints in a project laid out like this repository's ``probes/``, where
# every probe block of the same page that opens with ``# probes/NAME.probe.yaml`` is that file.
# Each line of the block must be a line of the run's output (times and the rest left out).
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_OUTPUT = re.compile(r"^<!-- output of: pytest (?P<args>[^>]*?) -->\n```\n(?P<body>.*?)^```$",
                     re.MULTILINE | re.DOTALL)
_PROBE_FILE = re.compile(r"^```yaml\n(?P<body># (?P<path>probes/[\w.-]+\.probe\.yaml)\n.*?)^```$",
                         re.MULTILINE | re.DOTALL)


def _outputs() -> list:
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in _OUTPUT.finditer(text):
            line = text.count("\n", 0, m.start("body")) + 1
            out.append(pytest.param(doc, m.group("args").split(), m.group("body"),
                                    id=f"{doc.relative_to(ROOT).as_posix()}:{line}"))
    return out


def test_the_readme_shows_a_failure_checked_against_a_run():
    assert any(p.values[0].name == "README.md" for p in _outputs())


@pytest.mark.parametrize(("doc", "args", "printed"), _outputs())
def test_printed_output_in_the_docs_is_what_a_run_prints(doc, args, printed, pytester, probe_heads):
    for sub in ("heads", "inputs"):
        shutil.copytree(ROOT / "probes" / sub, pytester.path / "probes" / sub)
    files = {m.group("path"): m.group("body") for m in _PROBE_FILE.finditer(doc.read_text(encoding="utf-8"))}
    assert args[0] in files, f"{doc.name}: no probe block opens with '# {args[0]}'"
    for path, body in files.items():
        (pytester.path / path).write_text(body, encoding="utf-8")
    result = pytester.runpytest("-p", "no:cacheprovider", *args)
    ran = {line.rstrip() for line in result.stdout.lines}
    missing = [line for line in printed.splitlines() if line.rstrip() not in ran]
    assert not missing, "\n".join(["not printed by the run:", *missing, "--- the run:", result.stdout.str()])
