"""Rebuild the demo's latent heads and inputs: a causal and a correlational head for one latent.

Run ``python -m neuronpatch.demo.build_sae_heads [--out probes]`` after
``python -m neuronpatch.demo.train_sae``. It

1. picks a latent of ``neuronpatch-demo-sae`` (an SAE on ``blocks.1.hook_resid_post``) that
   fires on one kind of token: among latents active at the last token of 5–40% of held-out
   corpus windows, the one whose 30 strongest windows end on the fewest distinct tokens;
2. picks demo inputs from held-out windows on which it is active, spread over its range
   (``probes/inputs/sae_demo.txt``);
3. trains two heads with :func:`neuronpatch.training.train_head`:

   ``sae_causal``    linear, reads resid_post[1] (right after the latent), interventional data
   ``sae_upstream``  linear, reads resid_post[0] (before the latent), natural data: it can only
                     read the latent's causes
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch

from neuronpatch import dictionaries
from neuronpatch.demo.build_heads import closest_distinct
from neuronpatch.demo.corpus import split, text_windows
from neuronpatch.engine import collect
from neuronpatch.models import DEMO_MODEL, load_model
from neuronpatch.training import train_head

N_INPUTS = 10


def fitting(model: object, texts: list[str]) -> list[str]:
    """The windows that fit the model's context (dropped, not truncated, as training does)."""
    n_ctx = model.n_ctx or 10**9  # type: ignore[attr-defined]
    return [t for t in texts if len(model.tokenizer(t)["input_ids"]) <= n_ctx]  # type: ignore[attr-defined]


def last_tokens(model: object, texts: list[str]) -> list[str]:
    tok = model.tokenizer  # type: ignore[attr-defined]
    return [tok.decode(tok(t)["input_ids"][-1:]) for t in texts]


def pick_latent(seed: int = 5) -> tuple[int, list[str]]:
    """The latent whose strongest held-out windows end on the fewest distinct tokens."""
    model = load_model(DEMO_MODEL)
    sae = dictionaries.load(dictionaries.DEMO_SAE)
    _, held = split()
    texts = fitting(model, text_windows(held, n=1500, min_words=4, max_words=24, seed=seed))
    feats, _ = collect(model, texts, layer=1, neuron=0, layer_type="sae", sae=dictionaries.DEMO_SAE,
                       feature_layer=1)
    acts = sae.encode(feats - feats.mean(-1, keepdim=True))  # [n, d_sae], the latents at the last token
    density = (acts > 0).float().mean(0)
    tokens = last_tokens(model, texts)
    best, best_key, best_top = -1, (10**9, 0.0), []
    for i in ((density > 0.05) & (density < 0.4)).nonzero()[:, 0].tolist():
        top = acts[:, i].argsort(descending=True)[:30].tolist()
        counts = Counter(tokens[j] for j in top)
        key = (len(counts), -float(acts[top, i].mean()))
        if key < best_key:
            best, best_key, best_top = i, key, [t for t, _ in counts.most_common(5)]
    return best, best_top


def sae_inputs(latent: int, *, k: int = N_INPUTS, seed: int = 7) -> list[str]:
    """Held-out windows on which the latent is active, spread over its range."""
    model = load_model(DEMO_MODEL)
    _, held = split()
    pool = fitting(model, text_windows(held, n=600, min_words=5, max_words=14, seed=seed))
    _, a = collect(model, pool, layer=1, neuron=latent, layer_type="sae", sae=dictionaries.DEMO_SAE,
                   feature_layer=1)
    targets = torch.linspace(float(torch.quantile(a[a > 0], 0.05)), float(torch.quantile(a, 0.995)), k)
    return [pool[i] for i in closest_distinct(a, targets)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=Path("probes"))
    ap.add_argument("--windows", type=int, default=3000)
    args = ap.parse_args()
    latent, top = pick_latent()
    print(f"latent {latent} of {dictionaries.DEMO_SAE}: its strongest windows end on {top}")
    inputs = sae_inputs(latent)
    (args.out / "inputs").mkdir(parents=True, exist_ok=True)
    (args.out / "inputs" / "sae_demo.txt").write_text("\n".join(inputs) + "\n")
    heads = {"sae_causal": dict(feature_layer=1, intervene=True),
             "sae_upstream": dict(feature_layer=0, intervene=False)}
    for name, kw in heads.items():
        rep = train_head(model=DEMO_MODEL, layer=None, neuron=latent, windows=args.windows,
                         sae=Path(dictionaries.DEMO_SAE), out=args.out / "heads" / name, progress=True,
                         **kw)  # type: ignore[arg-type]
        print(f"{name}: held-out R² {rep.held_out_r2:.3f}")


if __name__ == "__main__":
    main()
