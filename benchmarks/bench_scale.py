"""Time and peak memory of the engine as the number of inputs grows (gpt2-small sizes).

Each size runs in a fresh process, so peak RSS is that run's own:

    python benchmarks/bench_scale.py --inputs 64 128 256
"""

from __future__ import annotations

import argparse
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(model_dir: str, n: int) -> None:
    from bench_engine import FACTORS, inputs

    from neuronpatch import run_experiment
    from neuronpatch.models import load_model
    from neuronpatch.testing import write_head

    model = load_model(model_dir, device="cpu")
    head = write_head(Path(model_dir).parent / f"head-{n}", model_dir, target_layer=8, target_neuron=481,
                      feature_layer=-1)
    texts = inputs(random.Random(n), n)
    t0 = time.perf_counter()
    res = run_experiment(head, texts, scale=FACTORS, model=model)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"| {n} | {seconds:.2f} | {seconds / n * 1000:.1f} | {rss:.0f} | {res.method} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    from bench_engine import make

    with tempfile.TemporaryDirectory() as tmp:
        path = make(Path(tmp), "gpt2")
        print("| inputs (× 8 factors) | engine s | ms per input | peak RSS MB | route |")
        print("| ---: | ---: | ---: | ---: | --- |")
        for n in args.inputs:
            subprocess.run([sys.executable, __file__, "--child", str(path), str(n)], check=True,
                           cwd=Path(__file__).parent)


if __name__ == "__main__":
    main()
