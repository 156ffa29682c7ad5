"""What reduced precision does to a slope, and what measuring it costs.

Two tables, written to ``docs/benchmarks/bench_precision.md``:

1. **Errors over the architecture matrix.** Tiny random models of 14 architectures
   (``neuronpatch.testing.tiny_model``: every parameter random, norm gains and biases
   included), four heads each (final state, right after the unit's block, an MLP head on a
   residual unit, a token head), the seed notebook's eight inputs and eight scale factors.
   Each head runs in float32, bfloat16 and float16, and in float64 (the same float32
   weights cast by hand). Per architecture and dtype: the largest slope error against the
   float64 run, relative to the slope; the largest reported error (``numerical_error``),
   relative to the slope; and in how many of the four heads the float64 slope lies within
   the reported error. For float32, the largest row error against float64 as a fraction of
   the prediction scale (what ``FLOAT32_ROW_RTOL`` rests on).
2. **Cost on the reference task.** Random weights at gpt2-small sizes, 8 fresh inputs of
   16 tokens per repetition, 8 scale factors, neuron 481 of layer 8, a linear head on the
   final state: the share of ``run_experiment``'s time spent measuring the rounding (the
   float32 re-run), median over repetitions, in bfloat16 and float16 on the CPU.

    python benchmarks/bench_precision.py [--repeats 5] [--archs gpt2 llama ...]

``--tiny``: the cost table on 2-layer d_model-64 models (a smoke test; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from bench_engine import FACTORS, SIZES, head_for, inputs, make
from benchreport import Report, add_out

from neuronpatch import load_model, run_experiment
from neuronpatch.engine import weights_in
from neuronpatch.errors import PatchError
from neuronpatch.models import clear_cache
from neuronpatch.testing import ARCHITECTURES, PRECISION_HEADS, tiny_model, write_head

ARCHS = list(ARCHITECTURES)
HEADS = PRECISION_HEADS
LOW = ("bfloat16", "float16")


def _float64(model, head: Path):  # type: ignore[no-untyped-def]
    """The same run with the float32 weights and buffers cast to float64 (restored after);
    None where the model's own code gives NaN in float64 (bloom and gemma2 in transformers 5)."""
    try:
        with weights_in(model, torch.float64):
            return run_experiment(head, model=model)
    except PatchError:  # NaN from the model's own float64 forward: the patch check refuses it
        return None


def matrix(report: Report, archs: list[str], root: Path) -> None:
    report.line("| architecture | float32: row error / prediction scale | "
                + " | ".join(f"{d}: slope error | {d}: reported | {d}: covered" for d in LOW) + " |")
    report.line("| --- | ---: |" + " ---: | ---: | ---: |" * len(LOW))
    covered = {d: 0 for d in LOW}
    cells = 0
    for arch in archs:
        model_dir = tiny_model(root / arch, arch)
        f32 = load_model(model_dir, device="cpu")
        row = {d: {"err": [], "rep": [], "cov": 0} for d in LOW}
        f32_rows: list[float] = []
        for name, cfg in HEADS.items():
            cfg = dict(cfg)
            kw = {k: cfg.pop(k) for k in ("hidden_dim", "head_type") if k in cfg}
            head = write_head(root / f"{arch}-{name}", model_dir, target_neuron=5, **kw, **cfg)
            base = run_experiment(head, model=f32)
            ref = _float64(f32, head)
            if ref is not None and np.all(np.isfinite(ref.prediction_change)):
                f32_rows.append(float(np.abs(base.prediction_change - ref.prediction_change).max())
                                / base.prediction_scale)
                want = ref.slope
            else:  # a float64 forward of this model gives NaN: the float32 run is the reference
                want = base.slope
            cells += 1
            for dtype in LOW:
                res = run_experiment(head, model=load_model(model_dir, device="cpu", dtype=dtype))
                err, rep = abs(res.slope - want), res.numerical_error["slope"]
                row[dtype]["err"].append(err / abs(want))
                row[dtype]["rep"].append(rep / abs(want))
                row[dtype]["cov"] += int(err <= rep)
                covered[dtype] += int(err <= rep)
        clear_cache()
        f32_text = f"{max(f32_rows):.1e}" if f32_rows else "n/a (float64 gives NaN)"
        cols = " | ".join(f"{max(row[d]['err']):.2%} | {max(row[d]['rep']):.2%} | "
                          f"{row[d]['cov']}/{len(HEADS)}" for d in LOW)
        report.line(f"| {arch} | {f32_text} | {cols} |")
    report.line()
    report.line("Slope error: the largest |slope − float64 slope| / |float64 slope| over the four heads; "
                "reported: the largest `numerical_error['slope']` / |float64 slope|; covered: heads whose "
                "float64 slope lies within the reported error. In all: "
                + ", ".join(f"{d} {covered[d]} of {cells}" for d in LOW) + ".")
    report.line()


def cost(report: Report, repeats: int, tiny: bool, root: Path) -> None:
    report.line("| dtype | run_experiment s (median) | rounding measured s (median) | share |")
    report.line("| --- | ---: | ---: | ---: |")
    path = make(root, "gpt2", tiny)
    head = head_for(root, path, "gpt2", tiny)
    rng = random.Random(1)
    for dtype in LOW:
        model = load_model(str(path), device="cpu", dtype=dtype)
        total, part, shares = [], [], []
        for rep in range(repeats + 1):
            texts = inputs(rng, 8, 16)  # fresh inputs every repetition
            t0 = time.perf_counter()
            res = run_experiment(head, texts, scale=FACTORS, model=model)
            took = time.perf_counter() - t0
            if rep:  # the first repetition warms up
                assert res.rounding is not None
                total.append(took)
                part.append(res.rounding.seconds)
                shares.append(res.rounding.seconds / took)
        report.line(f"| {dtype} | {statistics.median(total):.3f} | {statistics.median(part):.3f} | "
                    f"**{statistics.median(shares):.0%}** ({min(shares):.0%}–{max(shares):.0%}) |")
        clear_cache()
    report.line()
    report.line("Share: the rounding measurement's time over the whole run's, median over repetitions "
                "(in brackets the range).")


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--archs", nargs="+", default=ARCHS, choices=ARCHS)
    ap.add_argument("--tiny", action="store_true", help="the cost table on 2-layer models (a smoke test)")
    add_out(ap, "bench_precision")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)
    report = Report("bench_precision", args.out, argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        report.line("## Slope errors over the architecture matrix")
        report.line()
        matrix(report, args.archs, root)
        sizes = "2-layer d_model-64" if args.tiny else f"gpt2-small ({SIZES['gpt2']['n_layer']} layers)"
        report.line(f"## Cost of measuring it: the reference task, {sizes}, CPU, "
                    f"{torch.get_num_threads()} threads")
        report.line()
        cost(report, args.repeats, args.tiny, root)
    return report.write()


if __name__ == "__main__":
    main()
