"""Engine speed as ratios to one clean forward, all measured in one run.

Reference task (DESIGN.md): a gpt2-small-sized GPT-2 with random weights
(``GPT2Config()``, no download), 8 inputs of 16 tokens, 8 scale factors,
neuron 481 of layer 8, a linear head on the final hidden state.

Contenders, each timed as the median of ``--repeats`` runs after a warm-up:

* ``floor``: one clean batched forward of the 8 inputs (``GPT2LMHeadModel``);
* ``notebook loop``: the seed notebook's method on HF directly: per input and
  factor, one hooked forward to read the activation and one to predict;
* ``engine (full)``: ``run_experiment(method="full")``, every patched row a
  whole forward;
* ``engine (auto)``: ``run_experiment()``, the route the engine picks.

Usage: ``python benchmarks/bench_engine.py [--repeats 5] [--inputs 8] [--scale-inputs 256]``.
Prints a Markdown table for README. Machines are noisy: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from neuronpatch import load_head, load_model, run_experiment
from neuronpatch.engine import clear_clean_cache
from neuronpatch.testing import tiny_tokenizer, write_head

LAYER, NEURON = 8, 481
FACTORS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
WORDS = ("the", "cat", "sat", "on", "mat", "machine", "learning", "models", "can", "be",
         "difficult", "to", "interpret", "transformers", "use", "attention", "mechanisms",
         "process", "sequences", "quick", "brown", "fox", "jumps", "over", "lazy", "dog")


def make_model(root: Path) -> Path:
    path = root / "gpt2-small-random"
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(path)  # 124M params, random
    tok.save_pretrained(path)
    return path


def make_inputs(model_dir: Path, n: int, n_tokens: int = 16, seed: int = 0) -> list[str]:
    """``n`` texts of exactly ``n_tokens`` tokens each."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    g = torch.Generator().manual_seed(seed)
    texts = []
    while len(texts) < n:
        words: list[str] = []
        while len(tok.encode(" ".join(words), add_special_tokens=False)) < n_tokens:
            words.append(WORDS[int(torch.randint(len(WORDS), (1,), generator=g))])
        text = " ".join(words)
        if len(tok.encode(text, add_special_tokens=False)) == n_tokens:
            texts.append(text)
    return texts


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def notebook_loop(hf: GPT2LMHeadModel, ids: list[torch.Tensor], w: torch.Tensor,
                  b: torch.Tensor) -> list[float]:
    """The seed's method, run on HF: two full forwards per (input, factor)."""
    act_module = hf.transformer.h[LAYER].mlp.act
    preds = []
    for x in ids:
        pos = x.shape[1] - 1
        for f in FACTORS:
            def patch(m, i, o, f=f, pos=pos):
                o = o.clone()
                o[0, pos, NEURON] = o[0, pos, NEURON] * f
                return o

            h = act_module.register_forward_hook(patch)
            try:
                with torch.no_grad():
                    hf(x)  # forward 1: read the patched activation
                    out = hf(x, output_hidden_states=True)  # forward 2: the prediction
            finally:
                h.remove()
            preds.append(float(out.hidden_states[-1][0, pos] @ w + b))
    return preds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--inputs", type=int, default=8)
    ap.add_argument("--scale-inputs", type=int, default=0,
                    help="also time N/4, N/2 and N inputs x 8 factors, each in a fresh process, "
                         "with its peak RSS")
    ap.add_argument("--engine-only", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--head-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine_only:
        engine_only(args.engine_only, args.model_dir, args.head_dir)
        return
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_model(root)
        head_dir = write_head(root / "head", model_dir, target_layer=LAYER, target_neuron=NEURON,
                              feature_layer=-1)
        texts = make_inputs(model_dir, args.inputs)
        model = load_model(model_dir)
        head = load_head(head_dir)
        hf = GPT2LMHeadModel.from_pretrained(model_dir).eval()
        ids = [torch.tensor([model.tokenizer.encode(t, add_special_tokens=False)]) for t in texts]
        batch = torch.cat(ids)
        sd = torch.load(head_dir / "head.pt", weights_only=True)
        w, b = sd["output.weight"][0], sd["output.bias"][0]

        def floor() -> None:
            with torch.inference_mode():
                hf(batch)

        def engine(inputs: list[str], **kw: object) -> object:
            clear_clean_cache()  # time the clean pass too, as a first run would
            return run_experiment(head, inputs, scale=FACTORS, model=model, **kw)  # type: ignore[arg-type]

        rows = {
            "floor: one clean batched forward": median_time(floor, args.repeats),
            "notebook loop (HF, 2 forwards per input x factor)": median_time(
                lambda: notebook_loop(hf, ids, w, b), max(1, args.repeats // 2)),
            "engine, method=full": median_time(lambda: engine(texts, method="full"), args.repeats),
            "engine, method=recompute": median_time(lambda: engine(texts, method="recompute"),
                                                    args.repeats),
            "engine, auto": median_time(lambda: engine(texts), args.repeats),
        }
        auto = engine(texts)
        # The engine and the loop must agree before their times mean anything.
        loop_preds = torch.tensor(notebook_loop(hf, ids, w, b)).reshape(len(texts), len(FACTORS))
        err = float((loop_preds - torch.from_numpy(auto.patched_prediction)).abs().max())
        floor_t = rows["floor: one clean batched forward"]
        loop_t = rows["notebook loop (HF, 2 forwards per input x factor)"]
        print(f"\n{len(texts)} inputs x {len(FACTORS)} scale factors, gpt2-small size, "
              f"layer {LAYER} neuron {NEURON}, linear head on hidden_states[-1]; "
              f"engine route: {auto.method}; max |engine - loop| prediction = {err:.2e}\n")
        print("| run | median s | x floor | loop / this |")
        print("| --- | ---: | ---: | ---: |")
        for name, t in rows.items():
            print(f"| {name} | {t:.3f} | {t / floor_t:.2f} | {loop_t / t:.1f} |")
        if args.scale_inputs:
            # Fresh processes, so peak RSS is the engine's alone (model + one experiment).
            print("\n| inputs x 8 factors | engine s | peak RSS MB |\n| --- | ---: | ---: |")
            for n in (args.scale_inputs // 4, args.scale_inputs // 2, args.scale_inputs):
                proc = subprocess.run(
                    [sys.executable, __file__, "--engine-only", str(n), "--model-dir", str(model_dir),
                     "--head-dir", str(head_dir)], capture_output=True, text=True, check=True)
                secs, rss = proc.stdout.split()[-2:]
                print(f"| {n} | {float(secs):.2f} | {float(rss):.0f} |")


def engine_only(n: int, model_dir: Path, head_dir: Path) -> None:
    """Time one experiment on ``n`` inputs in this process; print seconds and peak RSS (MB)."""
    texts = make_inputs(model_dir, n, seed=1)
    model = load_model(model_dir)
    head = load_head(head_dir)
    t0 = time.perf_counter()
    run_experiment(head, texts, scale=FACTORS, model=model)
    secs = time.perf_counter() - t0
    print(secs, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


if __name__ == "__main__":
    main()
