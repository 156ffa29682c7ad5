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
which other load on a shared machine disturbs far less. Beside it, each
variant's median wall time divided by the median honest floor
(``bench_engine.floor``: one clean batched forward of the 8 inputs through the
decoder stack alone, no LM head), timed in the same repetitions on fresh inputs.

    python benchmarks/bench_controls.py --repeats 5 [--threads 1] [--batch-size 128]

``--tiny``: 2-layer d_model-64 models (a smoke test; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_engine import FACTORS, SIZES, floor, inputs, make, target
from benchreport import Report, add_out

from neuronpatch import load_model, run_experiment
from neuronpatch.models import clear_cache
from neuronpatch.testing import write_head

CASES = {  # name: (layer_type, read after the unit's own layer, controls)
    "final, 8 unit controls": ("post", False, {"units": {"random": 8, "seed": 0}}),
    "after, 8 unit controls": ("post", True, {"units": {"random": 8, "seed": 0}}),
    "final, 8 directions": ("resid_post", False, {"directions": {"random": 8, "seed": 0}}),
    "after, 8 directions": ("resid_post", True, {"directions": {"random": 8, "seed": 0}}),
}


def _ratio(times: dict[str, list[float]]) -> str:
    """Median with ÷ median without, and the range of each repetition's own ratio."""
    paired = [w / o for w, o in zip(times["with"], times["without"], strict=True)]
    ratio = statistics.median(times["with"]) / statistics.median(times["without"])
    return f"**{ratio:.2f}** ({min(paired):.2f}–{max(paired):.2f})"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--archs", nargs="+", default=["gpt2"], choices=list(SIZES))
    ap.add_argument("--batch-size", type=int, default=128, help="rows per forward (the API's default: 128)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads (1: CPU time is the work done, even on a busy machine)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), metavar="CASE",
                    help=f"which variants to time (default all: {'; '.join(CASES)})")
    ap.add_argument("--tiny", action="store_true", help="2-layer d_model-64 models (a smoke test)")
    add_out(ap, "bench_controls")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = Report("bench_controls", args.out, argv)
    layer, neuron = target(args.tiny)
    report.line("| architecture | head, controls | route | floor s | without s | with s | without × floor | "
                "with × floor | with ÷ without, wall (min–max) | with ÷ without, CPU time (min–max) |")
    report.line("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for arch in args.archs:
            path = make(root, arch, args.tiny)
            model = load_model(str(path), device="cpu")
            for case in args.cases:
                layer_type, after, controls = CASES[case]
                feature_layer = layer if after else -1
                head = write_head(root / f"head-{path.name}-{layer_type}-{feature_layer}", path,
                                  target_layer=layer, target_neuron=neuron, layer_type=layer_type,
                                  feature_layer=feature_layer, coordinates="transformer_lens")
                rng = random.Random(1)
                wall: dict[str, list[float]] = {"floor": [], "without": [], "with": []}
                cpu: dict[str, list[float]] = {"floor": [], "without": [], "with": []}
                routes = set()
                for rep in range(args.repeats + 1):
                    for name in ("floor", "without", "with"):
                        texts = inputs(rng)  # fresh inputs every repetition and every variant
                        t0, c0 = time.perf_counter(), time.process_time()
                        if name == "floor":
                            floor(model, texts)
                        else:
                            res = run_experiment(head, texts, scale=FACTORS, model=model,
                                                 batch_size=args.batch_size,
                                                 controls=controls if name == "with" else None)
                            routes.add(res.method)
                        if rep:  # the first repetition warms up
                            wall[name].append(time.perf_counter() - t0)
                            cpu[name].append(time.process_time() - c0)
                fl, without, with_ = (statistics.median(wall[k]) for k in ("floor", "without", "with"))
                report.line(f"| {arch} | {case} | {'/'.join(sorted(routes))} | {fl:.3f} | {without:.3f} | "
                            f"{with_:.3f} | {without / fl:.2f} | {with_ / fl:.2f} | {_ratio(wall)} | "
                            f"{_ratio(cpu)} |")
            clear_cache()
    return report.write()


if __name__ == "__main__":
    main()
