"""Rebuild the demo heads in ``probes/heads/`` and the demo inputs, reproducibly.

Run ``python -m neuronpatch.demo.build_heads [--out probes]``. It

1. picks the most variable MLP neuron of layer 1 of ``neuronpatch-demo``
   (standard deviation of its last-token activation over corpus windows);
2. picks demo inputs from held-out windows on which that neuron is active, its
   activations spread evenly over its positive range (a silent neuron makes
   every ``scale`` patch a no-op);
3. trains the heads with :func:`neuronpatch.training.train_head`:

   ``demo_causal``       linear, reads hidden_states[L+1], interventional data
   ``demo_natural``      linear, reads hidden_states[L+1], natural data
   ``demo_final``        linear, reads hidden_states[-1] (after ln_f), interventional
   ``demo_upstream``     linear, reads hidden_states[L] (before the neuron), natural data
   ``demo_classifier``   classification (8 bins), reads hidden_states[L+1], interventional
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from neuronpatch.architecture import Site, attach
from neuronpatch.demo.corpus import split, text_windows
from neuronpatch.engine import collect
from neuronpatch.models import DEMO_MODEL, load_model
from neuronpatch.training import train_head

LAYER = 1
N_DEMO_INPUTS = 10


def most_variable_neuron(layer: int, *, n: int = 1000, seed: int = 123) -> tuple[int, float]:
    """The neuron of ``layer`` whose last-token activation varies most over corpus windows."""
    model = load_model(DEMO_MODEL)
    train, _ = split()
    texts = text_windows(train, n=n, min_words=4, max_words=24, seed=seed)
    rows = []

    def grab(act: torch.Tensor) -> None:
        rows.append(act[0, -1].clone())

    handle = attach(model.arch, Site("mlp_post", layer), grab, 1)
    try:
        with torch.inference_mode():
            for text in texts:  # one at a time: the last position is the last real token
                ids = model.tokenizer(text)["input_ids"][-(model.n_ctx or 10**9):]
                model.hf(torch.tensor([ids]))
    finally:
        handle.remove()
    sd = torch.stack(rows).std(0)
    best = int(sd.argmax())
    return best, float(sd[best])


def demo_inputs(neuron: int, *, k: int = N_DEMO_INPUTS, seed: int = 7) -> list[str]:
    """Held-out windows on which the neuron is active, spread over its range."""
    model = load_model(DEMO_MODEL)
    _, held = split()
    pool = text_windows(held, n=400, min_words=5, max_words=14, seed=seed)
    _, a = collect(model, pool, layer=LAYER, neuron=neuron, feature_layer=LAYER)
    # Targets evenly spaced over the neuron's positive range, so the inputs spread the
    # activation out instead of piling up in GELU's flat negative lobe.
    targets = torch.linspace(0.1, float(torch.quantile(a, 0.995)), k)
    return [pool[i] for i in closest_distinct(a, targets)]


def closest_distinct(values: torch.Tensor, targets: torch.Tensor) -> list[int]:
    """For each target in turn, the index of the value closest to it not picked before."""
    picks: list[int] = []
    for t in targets:
        order = (values - t).abs().argsort().tolist()
        picks.append(next(i for i in order if i not in picks))
    return picks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("probes"))
    ap.add_argument("--windows", type=int, default=3000)
    ap.add_argument("--inputs", action="store_true", help="also rewrite probes/inputs/demo.txt")
    args = ap.parse_args()
    neuron, sd = most_variable_neuron(LAYER)
    print(f"most variable neuron of layer {LAYER}: {neuron} (sd {sd:.3f})")
    if args.inputs:
        inputs = demo_inputs(neuron)
        (args.out / "inputs").mkdir(parents=True, exist_ok=True)
        (args.out / "inputs" / "demo.txt").write_text("\n".join(inputs) + "\n")
    # transformer_lens coordinates: feature_layer L reads block L's output (resid_post).
    heads = {
        "demo_causal": dict(feature_layer=LAYER, intervene=True),
        "demo_natural": dict(feature_layer=LAYER, intervene=False),
        "demo_final": dict(feature_layer=-1, intervene=True),
        "demo_upstream": dict(feature_layer=LAYER - 1, intervene=False),
        "demo_classifier": dict(feature_layer=LAYER, intervene=True,
                                head_type="classification", bins=8, hidden_dim=32),
    }
    for name, kw in heads.items():
        rep = train_head(model=DEMO_MODEL, layer=LAYER, neuron=neuron, windows=args.windows,
                         out=args.out / "heads" / name, progress=True, **kw)  # type: ignore[arg-type]
        acc = "" if rep.held_out_accuracy is None else f", accuracy {rep.held_out_accuracy:.3f}"
        print(f"{name}: held-out R² {rep.held_out_r2:.3f}{acc}")


if __name__ == "__main__":
    main()
