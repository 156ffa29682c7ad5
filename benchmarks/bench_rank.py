"""Ranking every unit of a layer, as a multiple of the honest floor.

Reference task: the 3,072 MLP neurons of layer 8 of a random model at gpt2-small
sizes, a linear head on the final state (transformer_lens coordinates, the last
block's output), 8 inputs of 16–18 tokens, ``rank_units(..., top=20,
screen="always")``: the screen (one forward and one backward pass) and the exact
confirmation of its top 20 (``scale: [0, 2]``, as control rows over one clean
run). Every repetition draws fresh inputs.

    python benchmarks/bench_rank.py --repeats 5 [--archs gpt2 gpt_neox llama] [--exhaustive]

The floor is ``bench_engine.floor``: one clean batched forward of the 8 inputs
through the decoder stack alone (no LM head), timed right before and right after
each ranking on its own fresh inputs; each ranking is divided by the mean of the
two floors around it, and the table shows the median over repetitions of those
ratios: the whole ranking in wall time and in CPU time.

Only public names of neuronpatch are used, so the screen pass and the
confirmation are not timed apart (that needed wrapping private functions of
``neuronpatch.rank``). Instead the same ranking with ``top=1`` is timed too (the
screen plus the confirmation of one unit and the target); the difference
between the two is shown as an estimate of what confirming the other units of
the top 20 costs. ``--exhaustive`` also times, once, what ranking by patching
every unit for real costs (``screen="never"``).

``--tiny``: 2-layer d_model-64 models (a smoke test; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_engine import SIZES, floor, head_for, inputs, make
from benchreport import Report, add_out

from neuronpatch import load_model, rank_units
from neuronpatch.models import clear_cache

TOP = 20


class _Clock:
    """Wall and CPU seconds of one block."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> _Clock:
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c


def _med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f}"


def _between_floors(model: Any, head: Path, rng: random.Random, top: int,
                    screen: str) -> tuple[float, float, float, str]:
    """One ranking timed between two floors, each on fresh inputs.

    Returns (wall ratio, CPU ratio, mean floor seconds, method): the ranking over
    the mean of the two floors around it (the machine's speed drifts).
    """
    before, ranked, after = _Clock(), _Clock(), _Clock()
    with before:
        floor(model, inputs(rng))
    texts = inputs(rng)
    with ranked:
        method = rank_units(head, texts, top=top, model=model, screen=screen).method
    with after:
        floor(model, inputs(rng))
    fl, fl_cpu = (before.wall + after.wall) / 2, (before.cpu + after.cpu) / 2
    return ranked.wall / fl, ranked.cpu / fl_cpu, fl, method


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--archs", nargs="+", default=["gpt2"], choices=list(SIZES))
    ap.add_argument("--exhaustive", action="store_true", help="also time patching every unit (once)")
    ap.add_argument("--tiny", action="store_true", help="2-layer d_model-64 models (a smoke test)")
    add_out(ap, "bench_rank")
    args = ap.parse_args(argv)
    report = Report("bench_rank", args.out, argv)
    report.line(f"| architecture | floor s | rank top {TOP} × floor (min–max) | CPU time × floor | "
                f"rank top 1 × floor | top {TOP} − top 1 × floor | method | exhaustive × floor |")
    report.line("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for arch in args.archs:
            path = make(root, arch, args.tiny)
            model = load_model(str(path), device="cpu")
            head = head_for(root, path, arch, args.tiny)
            rng = random.Random(2)
            floors: list[float] = []
            ratios: dict[str, list[float]] = {"rank": [], "cpu": [], "top1": []}
            for rep in range(args.repeats + 1):
                wall, cpu, fl, method = _between_floors(model, head, rng, TOP, "always")
                top1, _, _, _ = _between_floors(model, head, rng, 1, "always")
                if rep:  # the first repetition warms up
                    floors.append(fl)
                    ratios["rank"].append(wall)
                    ratios["cpu"].append(cpu)
                    ratios["top1"].append(top1)
            fl = statistics.median(floors)
            exhaustive = "n/a"
            if args.exhaustive:
                exhaustive = f"{_between_floors(model, head, rng, TOP, 'never')[0]:.0f}"
            r = ratios["rank"]
            confirm = statistics.median(r) - statistics.median(ratios["top1"])
            report.line(f"| {arch} | {fl:.3f} | **{_med(r)}** ({min(r):.2f}–{max(r):.2f}) | "
                        f"{_med(ratios['cpu'])} | {_med(ratios['top1'])} | {confirm:.2f} | "
                        f"{method} | {exhaustive} |")
            clear_cache()
    return report.write()


if __name__ == "__main__":
    main()
