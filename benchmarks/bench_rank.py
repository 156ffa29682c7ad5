"""Ranking every unit of a layer, as a multiple of one clean batched HF forward.

Reference task: the 3,072 MLP neurons of layer 8 of a random model at gpt2-small
sizes, a linear head on the final state (transformer_lens coordinates, the last
block's output), 8 inputs of 16–18 tokens: the screen (one forward and one
backward pass) and the exact confirmation of its top 20 (``scale: [0, 2]``, as
control rows over one clean run). Every repetition draws fresh inputs.

    python benchmarks/bench_rank.py --repeats 5 [--archs gpt2 gpt_neox llama] [--exhaustive]

Columns, each as a multiple of the floor (one clean batched forward of the 8
inputs, as in bench_engine.py, timed right before and right after each ranking on
its own fresh inputs; the median over repetitions of those per-repetition ratios):
the whole ranking in wall time and in CPU time, and the two parts of it (the
screen pass; the confirmation of the top 20). ``--exhaustive`` also times, once,
what ranking by patching every unit for real costs (``screen="never"``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_engine import SIZES, floor, inputs, make

from neuronpatch import rank as rank_mod
from neuronpatch.models import clear_cache, load_model
from neuronpatch.rank import rank_units
from neuronpatch.testing import write_head

TOP = 20


class _Clock:
    """Wall and CPU seconds of one call."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> _Clock:
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c


def _timed(store: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            store[name] = store.get(name, 0.0) + time.perf_counter() - t0
    return wrapper


def _med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--archs", nargs="+", default=["gpt2"], choices=list(SIZES))
    ap.add_argument("--exhaustive", action="store_true", help="also time patching every unit (once)")
    args = ap.parse_args()
    parts: dict[str, float] = {}
    # Time the two parts of the ranking where they happen.
    rank_mod._Job.clean = _timed(parts, "screen", rank_mod._Job.clean)  # type: ignore[method-assign]
    rank_mod._Job.confirm = _timed(parts, "confirm", rank_mod._Job.confirm)  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"| architecture | floor s | rank × floor (min–max) | CPU time × floor | screen pass | "
              f"confirm top {TOP} | method | exhaustive × floor |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
        for arch in args.archs:
            path = make(root, arch)
            model = load_model(str(path), device="cpu")
            head = write_head(root / f"head-{arch}", path, target_layer=8, target_neuron=481,
                              feature_layer=-1, coordinates="transformer_lens")
            rng = random.Random(2)
            floors: list[float] = []
            ratios: dict[str, list[float]] = {"rank": [], "cpu": [], "screen": [], "confirm": []}
            method = ""
            for rep in range(args.repeats + 1):
                # Each repetition: floor, ranking, floor, each on fresh inputs; the ranking is
                # divided by the mean of the floors around it (the machine's speed drifts).
                before, ranked, after = _Clock(), _Clock(), _Clock()
                with before:
                    floor(model, inputs(rng))
                texts = inputs(rng)
                parts.clear()
                with ranked:
                    method = rank_units(head, texts, top=TOP, model=model).method
                with after:
                    floor(model, inputs(rng))
                if rep:  # the first repetition warms up
                    fl, fl_cpu = (before.wall + after.wall) / 2, (before.cpu + after.cpu) / 2
                    floors.append(fl)
                    ratios["rank"].append(ranked.wall / fl)
                    ratios["cpu"].append(ranked.cpu / fl_cpu)
                    ratios["screen"].append(parts.get("screen", 0.0) / fl)
                    ratios["confirm"].append(parts.get("confirm", 0.0) / fl)
            fl = statistics.median(floors)
            exhaustive = "n/a"
            if args.exhaustive:
                with before:
                    floor(model, inputs(rng))
                with ranked:
                    rank_units(head, inputs(rng), top=TOP, model=model, screen="never")
                with after:
                    floor(model, inputs(rng))
                exhaustive = f"{ranked.wall / ((before.wall + after.wall) / 2):.0f}"
            r = ratios["rank"]
            print(f"| {arch} | {fl:.3f} | **{_med(r)}** ({min(r):.2f}–{max(r):.2f}) | "
                  f"{_med(ratios['cpu'])} | {_med(ratios['screen'])} | {_med(ratios['confirm'])} | "
                  f"{method} | {exhaustive} |",
                  flush=True)
            clear_cache()


if __name__ == "__main__":
    main()
