"""``make demo``: correlation versus causation on the shipped demo heads.

Every demo head predicts the same neuron of ``neuronpatch-demo`` well from
the same inputs (high baseline correlation), yet patching the neuron shows
which heads actually *use* it. Run ``python -m neuronpatch.demo.run_demo``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from neuronpatch.artifacts import write_artifacts
from neuronpatch.engine import run_experiment

HEADS = ("demo_causal", "demo_final", "demo_natural", "demo_upstream", "demo_classifier")
# Set values over the neuron's natural range: a scale patch cannot move a silent neuron.
SET_VALUES = (-0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)


def _verdict(slope: float, r2: float) -> str:
    if math.isnan(slope):
        return "undefined"
    if slope == 0.0:
        return "IGNORES the neuron (slope exactly 0)"
    if abs(slope) < 0.3:
        return "barely uses the neuron"
    if abs(slope - 1) <= 0.25 and (math.isnan(r2) or r2 >= 0.8):
        return "TRACKS the neuron" + (", less consistently (R² < 0.9)" if r2 < 0.9 else "")
    return "partly uses the neuron"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--probes", type=Path, default=Path("probes"))
    ap.add_argument("--out", type=Path, default=Path(".neuronpatch/demo"))
    args = ap.parse_args(argv)
    texts = (args.probes / "inputs" / "demo.txt").read_text().splitlines()
    print(f"neuronpatch demo: {len(texts)} inputs from {args.probes / 'inputs' / 'demo.txt'}, "
          f"the neuron set to {list(SET_VALUES)} at the last token\n")
    header = (f"{'head':<16} {'reads':<14} {'trained on':<15} {'held-out R²':>11} "
              f"{'baseline r':>10} {'causal slope':>12} {'R²':>9}  verdict")
    print(header)
    print("-" * len(header))
    figures = []
    for name in HEADS:
        head_dir = args.probes / "heads" / name
        cfg = json.loads((head_dir / "config.json").read_text())
        res = run_experiment(head_dir, texts, set=list(SET_VALUES))
        art = write_artifacts(res, args.out / name, title=name)
        figures.append((name, art.directory))
        training = cfg.get("training", {})
        fl = cfg["feature_layer"]
        reads = (f"hidden_states[{fl}]" if cfg.get("coordinates") == "hf"
                 else f"resid_post[{fl}]")
        # An R² needs the prediction to move: where it cannot (slope exactly 0) it is undefined.
        r2 = f"{'undefined':>9}" if math.isnan(res.r_squared) else f"{res.r_squared:9.3f}"
        print(f"{name:<16} {reads:<14} {training.get('data', '?'):<15} "
              f"{training.get('held_out_r2', math.nan):>11.3f} {res.baseline_correlation:>10.3f} "
              f"{res.slope:>12.3f} {r2}  {_verdict(res.slope, res.r_squared)}")
    print("\nEvery head correlates with the neuron; only patching shows which ones use it.")
    print("Figures (summary.json and five PNGs each):")
    for name, directory in figures:
        print(f"  {name:<16} {directory}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
