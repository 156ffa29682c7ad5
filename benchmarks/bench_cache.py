"""Cold against warm runs of the demo probe suite with the result cache (``--neuronpatch-cache``).

Each repetition starts from an empty cache directory: a cold run (every probe
measured and stored), then a warm run on that directory (every result read
back), each in a fresh pytest process, as CI runs them:

    python benchmarks/bench_cache.py --repeats 3          # as on a workstation
    python benchmarks/bench_cache.py --repeats 3 --ci     # as in CI (CI=1: derandomized fuzzing)

Without ``CI`` fuzzing uses the ``neuronpatch-dev`` profile, whose generated
inputs differ from run to run, so those engine runs miss; with ``CI=1`` the
``neuronpatch-ci`` profile generates the same inputs every run.

It prints one table row per repetition (wall seconds of the whole pytest
process, imports and model load included) and the warm/cold ratio, and checks
that the warm run wrote the same metrics as the cold one. ``--probes`` runs
other probe files than ``probes/`` (the tests run one small probe). There is no
floor here: the ratio is warm over cold.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchreport import Report, add_out

ROOT = Path(__file__).resolve().parents[1]


def suite(cache: Path, artifacts: Path, ci: bool, probes: list[str]) -> tuple[float, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg"}
    env.pop("CI", None)
    if ci:
        env["CI"] = "1"
    cmd = [sys.executable, "-m", "pytest", *probes, "-p", "no:cacheprovider", "-q",
           f"--neuronpatch-cache={cache}", f"--neuronpatch-artifacts={artifacts}"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}")
    line = next((x for x in done.stdout.splitlines() if x.startswith("neuronpatch: cache ")), "")
    return seconds, line


def metrics(artifacts: Path) -> dict[str, object]:
    return {p.parent.name: json.loads(p.read_text())["metrics"]
            for p in sorted(artifacts.glob("*/summary.json"))}


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ci", action="store_true", help="run as CI does (CI=1)")
    ap.add_argument("--probes", nargs="+", default=["probes"],
                    help="probe files or folders to run (default probes/, relative to the repository)")
    add_out(ap, "bench_cache")
    args = ap.parse_args(argv)
    report = Report("bench_cache", args.out, argv)
    colds, warms = [], []
    report.line("| repetition | cold s | warm s | warm / cold | cache (warm run) |")
    report.line("| ---: | ---: | ---: | ---: | --- |")
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "cache"
            cold, _ = suite(cache, Path(tmp) / "cold", args.ci, args.probes)
            warm, line = suite(cache, Path(tmp) / "warm", args.ci, args.probes)
            if metrics(Path(tmp) / "cold") != metrics(Path(tmp) / "warm"):
                raise SystemExit("the warm run's metrics differ from the cold run's")
        colds.append(cold)
        warms.append(warm)
        counts = line.rsplit(":", 1)[-1].strip()
        report.line(f"| {i + 1} | {cold:.1f} | {warm:.1f} | {warm / cold:.2f} | {counts} |")
    report.line(f"| median | {statistics.median(colds):.1f} | {statistics.median(warms):.1f} | "
                f"{statistics.median(warms) / statistics.median(colds):.2f} | |")
    return report.write()


if __name__ == "__main__":
    main()
