"""Train the demo dictionary: a small ReLU SAE on ``neuronpatch-demo``'s residual stream.

Run ``python -m neuronpatch.demo.train_sae`` (seeded; a few minutes on a CPU). It reads
``blocks.1.hook_resid_post`` (block 1's output, in transformer_lens coordinates: centred
over d_model, the coordinates SAELens SAEs are trained in) at every position of corpus
windows, trains a standard SAE (``relu((x − b_dec) @ W_enc + b_enc) @ W_dec + b_dec``,
L1 penalty on the latents weighted by their decoder norms), and writes it in SAELens'
layout to ``src/neuronpatch/demo/sae/`` (``cfg.json`` + ``sae_weights.safetensors``), where
heads name it as ``sae: neuronpatch-demo-sae``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from neuronpatch.demo.corpus import split, text_windows
from neuronpatch.dictionaries import DEMO_SAE_DIR, save
from neuronpatch.models import DEMO_MODEL, load_model

LAYER = 1
HOOK = f"blocks.{LAYER}.hook_resid_post"
D_SAE = 512
L1 = 0.1
STEPS = 4000
BATCH = 1024
SEED = 0


def activations(n_windows: int = 3000, seed: int = SEED) -> torch.Tensor:
    """``[tokens, d_model]``: block ``LAYER``'s output at every position of corpus windows, centred."""
    model = load_model(DEMO_MODEL)
    train, _ = split()
    rows = []
    with torch.inference_mode():
        for text in text_windows(train, n=n_windows, min_words=4, max_words=32, seed=seed):
            ids = model.tokenizer(text)["input_ids"][-(model.n_ctx or 10**9):]
            hs = model.hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYER + 1][0]
            rows.append(hs - hs.mean(-1, keepdim=True))
    return torch.cat(rows).float()


def train(x: torch.Tensor, *, d_sae: int = D_SAE, l1: float = L1, steps: int = STEPS,
          seed: int = SEED) -> dict[str, torch.Tensor]:
    """The SAE's weights (SAELens names), trained with Adam on ``x``."""
    g = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    W_dec = torch.randn(d_sae, d, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * 0.1
    params = {"W_enc": W_dec.T.clone().requires_grad_(), "b_enc": torch.zeros(d_sae, requires_grad=True),
              "W_dec": W_dec.requires_grad_(), "b_dec": x.mean(0).clone().requires_grad_()}
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    scale = float(x.norm(dim=1).mean())
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (BATCH,), generator=g)
        xb = x[idx]
        acts = torch.relu((xb - params["b_dec"]) @ params["W_enc"] + params["b_enc"])
        recon = acts @ params["W_dec"] + params["b_dec"]
        mse = ((recon - xb) ** 2).sum(-1).mean() / scale**2
        sparsity = (acts * params["W_dec"].norm(dim=1)).sum(-1).mean() / scale
        loss = mse + l1 * sparsity
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 1000 == 0 or step == steps - 1:
            l0 = float((acts > 0).float().sum(-1).mean())
            mse = mse.detach()
            print(f"step {step:5d}  mse {float(mse):.4f}  L0 {l0:.1f}")
    return {k: v.detach() for k, v in params.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=DEMO_SAE_DIR)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--l1", type=float, default=L1)
    args = ap.parse_args(argv)
    torch.manual_seed(SEED)
    x = activations()
    print(f"{x.shape[0]} activations of {HOOK}")
    w = train(x, steps=args.steps, l1=args.l1)
    with torch.no_grad():
        acts = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
        recon = acts @ w["W_dec"] + w["b_dec"]
        explained = 1 - float(((recon - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
        l0 = float((acts > 0).float().sum(-1).mean())
        dead = int(((acts > 0).sum(0) == 0).sum())
    cfg = {"architecture": "standard", "d_in": x.shape[1], "d_sae": D_SAE, "hook_name": HOOK,
           "apply_b_dec_to_input": True, "normalize_activations": "none", "dtype": "float32",
           "device": "cpu", "model_name": DEMO_MODEL,
           "training": {"tokens": int(x.shape[0]), "steps": args.steps, "l1": args.l1, "seed": SEED,
                        "variance_explained": round(explained, 4), "l0": round(l0, 2), "dead_latents": dead}}
    save(args.out, cfg, w)
    print(f"variance explained {explained:.3f}, L0 {l0:.1f}, dead latents {dead}; wrote {args.out}")
    print(json.dumps(cfg["training"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
