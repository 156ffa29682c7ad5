"""Time and peak memory of the engine as the number of inputs grows (gpt2-small sizes).

The reference task of ``bench_engine.py`` (16–18 tokens, 8 scale factors,
neuron 481 of layer 8, a linear head on the final state in transformer_lens
coordinates) on 64, 128 and 256 inputs. Each size runs in a fresh process, so
its peak RSS (``ru_maxrss``) is that run's own:

    python benchmarks/bench_scale.py --inputs 64 128 256

Columns: the engine's wall time; milliseconds per input, and that as a multiple
of the smallest size's (1.00 all the way down means time linear in the inputs);
the engine's time over the honest floor (``bench_engine.floor``: one clean
batched forward of the same inputs through the decoder stack alone, no LM head,
the median of 3 runs after the engine on the same inputs); peak RSS after
loading the model and after the engine run (read before the floor runs, so it
is the engine's peak). Before the timed run the engine and the floor each warm
up once on 8 other inputs (no result is cached across different inputs); the
engine's run is timed once per size.

``--tiny``: a 2-layer d_model-64 model (a smoke test; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchreport import Report, add_out


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # (KiB on Linux)


def child(model_dir: str, n: int, tiny: bool) -> None:
    from bench_engine import FACTORS, floor, head_for, inputs

    from neuronpatch import load_model, run_experiment

    model = load_model(model_dir, device="cpu")
    head = head_for(Path(model_dir).parent / f"n{n}", Path(model_dir), "gpt2", tiny)
    loaded = _rss_mb()
    warm = inputs(random.Random(-n), 8)
    run_experiment(head, warm, scale=FACTORS, model=model)  # warm-up on other inputs
    floor(model, warm)
    texts = inputs(random.Random(n), n)
    t0 = time.perf_counter()
    res = run_experiment(head, texts, scale=FACTORS, model=model)
    seconds = time.perf_counter() - t0
    peak = _rss_mb()
    floors = []
    for _ in range(3):
        t0 = time.perf_counter()
        floor(model, texts)
        floors.append(time.perf_counter() - t0)
    floor_s = statistics.median(floors)
    print(json.dumps({"n": n, "seconds": seconds, "floor": floor_s, "loaded_mb": loaded, "peak_mb": peak,
                      "route": res.method}))


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer d_model-64 model (a smoke test)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    add_out(ap, "bench_scale")
    args = ap.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), args.tiny)
        return args.out
    from bench_engine import make

    report = Report("bench_scale", args.out, argv)
    report.line("| inputs (× 8 factors) | engine s | ms per input | per input ÷ smallest size's | "
                "engine × floor | floor s | RSS after load MB | peak RSS MB | route |")
    report.line("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        path = make(Path(tmp), "gpt2", args.tiny)
        first = None
        for n in args.inputs:
            done = subprocess.run([sys.executable, __file__, "--child", str(path), str(n),
                                   *(["--tiny"] if args.tiny else [])],
                                  check=True, cwd=Path(__file__).parent, capture_output=True, text=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            per = r["seconds"] / n * 1000
            first = per if first is None else first
            report.line(f"| {n} | {r['seconds']:.2f} | {per:.1f} | {per / first:.2f} | "
                        f"{r['seconds'] / r['floor']:.2f} | {r['floor']:.3f} | {r['loaded_mb']:.0f} | "
                        f"{r['peak_mb']:.0f} | {r['route']} |")
    return report.write()


if __name__ == "__main__":
    main()
