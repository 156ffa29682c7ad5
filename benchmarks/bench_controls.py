"""What negative controls cost: the same probe with and without 8 controls (gpt2-small sizes).

Random weights at gpt2-small sizes (``bench_engine.make``), 8 inputs of 16–18
tokens, 8 scale factors, unit 481 of layer 8, in transformer_lens coordinates:

* ``final``: a linear head on the last block's output (the ``kv`` route);
* ``after``: a linear head on layer 8's own output, right after the unit (the
  ``linear`` shortcut, checked against one real patched run per column);

each with 8 unit controls (MLP neuron 481) or 8 random directions (residual
unit 481 of ``resid_post``). Every repetition draws fresh inputs for each
variant, so no cache is ever timed; the first repetition warms up. The ratio is
the median time with controls over the median time without (in brackets the
range of each repetition's own ratio), measured in the same process on the
same model: wall-clock time, and the process's CPU time (all its threads),
which other load on a shared machine disturbs far less.

    python benchmarks/bench_controls.py --repeats 5 [--threads 1] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_engine import FACTORS, SIZES, inputs, make

from neuronpatch import run_experiment
from neuronpatch.models import clear_cache, load_model
from neuronpatch.testing import write_head

CASES = {  # name: (layer_type, feature_layer, controls)
    "final, 8 unit controls": ("post", -1, {"units": {"random": 8, "seed": 0}}),
    "after, 8 unit controls": ("post", 8, {"units": {"random": 8, "seed": 0}}),
    "final, 8 directions": ("resid_post", -1, {"directions": {"random": 8, "seed": 0}}),
    "after, 8 directions": ("resid_post", 8, {"directions": {"random": 8, "seed": 0}}),
}


def _ratio(times: dict[str, list[float]]) -> str:
    """Median with ÷ median without, and the range of each repetition's own ratio."""
    paired = [w / o for w, o in zip(times["with"], times["without"], strict=True)]
    ratio = statistics.median(times["with"]) / statistics.median(times["without"])
    return f"**{ratio:.2f}** ({min(paired):.2f}–{max(paired):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--archs", nargs="+", default=["gpt2"], choices=list(SIZES))
    ap.add_argument("--batch-size", type=int, default=128, help="rows per forward (the API's default: 128)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads (1: CPU time is the work done, even on a busy machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("| architecture | head, controls | route | without s | with s | with ÷ without, wall (min–max) "
              "| with ÷ without, CPU time (min–max) |")
        print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
        for arch in args.archs:
            path = make(root, arch)
            model = load_model(str(path), device="cpu")
            for case, (layer_type, feature_layer, controls) in CASES.items():
                head = write_head(root / f"head-{arch}-{layer_type}-{feature_layer}", path, target_layer=8,
                                  target_neuron=481, layer_type=layer_type, feature_layer=feature_layer,
                                  coordinates="transformer_lens")
                rng = random.Random(1)
                wall: dict[str, list[float]] = {"without": [], "with": []}
                cpu: dict[str, list[float]] = {"without": [], "with": []}
                routes = set()
                for rep in range(args.repeats + 1):
                    for name in ("without", "with"):
                        texts = inputs(rng)  # fresh inputs every repetition and every variant
                        t0, c0 = time.perf_counter(), time.process_time()
                        res = run_experiment(head, texts, scale=FACTORS, model=model,
                                             batch_size=args.batch_size,
                                             controls=controls if name == "with" else None)
                        if rep:  # the first repetition warms up
                            wall[name].append(time.perf_counter() - t0)
                            cpu[name].append(time.process_time() - c0)
                        routes.add(res.method)
                without = statistics.median(wall["without"])
                print(f"| {arch} | {case} | {'/'.join(sorted(routes))} | {without:.3f} | "
                      f"{statistics.median(wall['with']):.3f} | {_ratio(wall)} | {_ratio(cpu)} |", flush=True)
            clear_cache()


if __name__ == "__main__":
    main()
