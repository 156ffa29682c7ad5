"""How long ``pytest --collect-only`` takes on many probe files, and that it imports no torch.

Usage: ``python benchmarks/bench_collect.py [--files 100] [--repeats 3]``. Each run is a
fresh ``python -m pytest --collect-only`` process over ``--files`` probe files on the
demo heads; it prints, as a table, the median wall time of the whole process and
pytest's own collection time, and the heavy modules (torch, transformer_lens,
matplotlib) that collection imported (there should be none). There is no floor
here: nothing runs a model.
"""

from __future__ import annotations

import argparse
import ast
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchreport import Report, add_out

ROOT = Path(__file__).resolve().parents[1]
PROBE = "name: p{i}\nhead: heads/demo_causal\ninterventions: {{set: [0, 1]}}\nexpect:\n  slope: [0.8, 1.2]\n"
CHECK = ("import sys, pytest; pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider']); "
         "print('HEAVY', [m for m in ('torch', 'transformer_lens', 'matplotlib') if m in sys.modules])")


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--files", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    add_out(ap, "bench_collect")
    args = ap.parse_args(argv)
    report = Report("bench_collect", args.out, argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(ROOT / "probes" / "heads", root / "heads")
        for i in range(args.files):
            (root / f"p{i}.probe.yaml").write_text(PROBE.format(i=i))
        walls, collected = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHECK], cwd=root, capture_output=True,
                                 text=True, check=False)
            walls.append(time.perf_counter() - t0)
            m = re.search(r"collected in ([\d.]+)s", out.stdout)
            collected.append(float(m.group(1)) if m else float("nan"))
        last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    if not last.startswith("HEAVY "):
        raise SystemExit(f"pytest --collect-only failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    heavy = ", ".join(ast.literal_eval(last.removeprefix("HEAVY "))) or "none"
    report.line("| probe files | runs | pytest's collection s (median) | whole process s (median) | "
                "heavy modules imported |")
    report.line("| ---: | ---: | ---: | ---: | --- |")
    report.line(f"| {args.files} | {args.repeats} | {statistics.median(collected):.2f} | "
                f"{statistics.median(walls):.2f} | {heavy} |")
    return report.write()


if __name__ == "__main__":
    main()
