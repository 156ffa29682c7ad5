"""Engine speed as multiples of one clean batched HF forward, on three architectures.

Reference task: 8 inputs of 16–18 tokens, 8 scale factors, neuron 481 of layer 8,
a linear head on the final state (transformer_lens coordinates), random weights
at gpt2-small / pythia-160m sizes (and a Llama of that size with grouped-query
attention). Every repetition draws fresh inputs, so no cache is ever timed.

    python benchmarks/bench_engine.py --repeats 5

Columns, each as a multiple of the floor (one clean batched HF forward of the 8
inputs): the engine's default route; a hand-written pass of HF forward hooks
over all 64 patched rows at once; nnsight (the optional ``bench`` extra), one
trace with one invoke per scale factor; the seed notebook's loop (a clean and a
patched forward per input and factor).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from neuronpatch import run_experiment
from neuronpatch.models import clear_cache, load_model
from neuronpatch.testing import tiny_tokenizer, write_head

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "quick", "brown", "fox", "jumps", "over", "lazy",
         "model", "learns", "attention", "numbers", "three", "four", "five", "and", "machine",
         "learning", "transformers", "process", "sequences", "researchers", "study"]
SIZES = {
    "gpt2": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024),
    "gpt_neox": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, max_position_embeddings=2048),
    "llama": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                  intermediate_size=3072, max_position_embeddings=2048),
}
FACTORS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]


def make(root: Path, arch: str) -> Path:
    tok = tiny_tokenizer()
    cfg = AutoConfig.for_model(arch, vocab_size=50304, **SIZES[arch])
    cfg.bos_token_id = cfg.eos_token_id = tok.eos_token_id
    torch.manual_seed(0)
    path = root / arch
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def inputs(rng: random.Random, n: int = 8, n_tokens: int = 16) -> list[str]:
    """``n`` fresh random sentences of about ``n_tokens`` tokens (the demo-style tokenizer)."""
    tok = _tokenizer()
    out = []
    for _ in range(n):
        words: list[str] = []
        while len(tok(" ".join(words) + ".")["input_ids"]) < n_tokens:
            words.append(rng.choice(WORDS))
        out.append(" ".join(words) + ".")
    return out


_TOK: list = []


def _tokenizer():
    if not _TOK:
        _TOK.append(tiny_tokenizer())
    return _TOK[0]


def _left_padded(model, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of ``texts``, left-padded to one length."""
    rows = [model.tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def _scaling(factor):
    """A forward pre-hook scaling neuron 481 at the last position by ``factor`` (per row or one)."""
    def pre(m, args):
        x = args[0].clone()
        x[:, -1, 481] *= factor
        return (x,)
    return pre


def floor(model, texts: list[str]) -> None:
    ids, mask = _left_padded(model, texts)
    with torch.inference_mode():
        model.hf(input_ids=ids, attention_mask=mask)


def hooks_pass(model, texts: list[str]) -> None:
    """64 patched rows (8 inputs × 8 factors) in one forward with a plain HF hook."""
    ids, mask = _left_padded(model, [t for t in texts for _ in FACTORS])
    h = model.arch.mlp_out_proj[8].register_forward_pre_hook(
        _scaling(torch.tensor(FACTORS * len(texts))))
    try:
        with torch.inference_mode():
            model.hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    finally:
        h.remove()


def _envoy(lm, model, module):
    """nnsight's proxy for one of the model's modules, walked down its dotted path."""
    env = lm
    for part in next(name for name, m in model.hf.named_modules() if m is module).split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def nnsight_pass(model, lm, texts: list[str]) -> None:
    """One nnsight trace, one invoke per factor over the 8 inputs, reading the final state."""
    ids, mask = _left_padded(model, texts)
    saved = []
    with torch.inference_mode(), lm.trace() as tracer:
        for f in FACTORS:
            with tracer.invoke({"input_ids": ids, "attention_mask": mask}):
                x = _envoy(lm, model, model.arch.mlp_out_proj[8]).input
                x[:, -1, 481] = x[:, -1, 481] * f
                last = _envoy(lm, model, model.arch.blocks[-1])
                saved.append(last.output[0][:, -1].save() if isinstance(last.output, tuple)
                             else last.output[:, -1].save())


def seed_loop(model, texts: list[str]) -> None:
    """The notebook's way: per input and factor, a clean forward and a patched forward."""
    proj = model.arch.mlp_out_proj[8]
    for text in texts:
        ids = torch.tensor([model.tokenizer(text)["input_ids"]])
        for f in FACTORS:
            with torch.inference_mode():
                model.hf(ids, output_hidden_states=True)
            h = proj.register_forward_pre_hook(_scaling(f))
            try:
                with torch.inference_mode():
                    model.hf(ids, output_hidden_states=True)
            finally:
                h.remove()


def _ratio(times: list[float], floor_s: float) -> str:
    return f"{statistics.median(times) / floor_s:.2f}" if times else "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--archs", nargs="+", default=list(SIZES))
    ap.add_argument("--columns", nargs="+", default=["engine", "hooks", "nnsight", "seed"],
                    help="which columns to time besides the floor (the rest print as '–')")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("| architecture | floor s | engine × floor (min–max) | HF hooks, one pass | "
              "nnsight, one trace | seed loop | route |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
        for arch in args.archs:
            path = make(root, arch)
            model = load_model(str(path), device="cpu")
            head = write_head(root / f"head-{arch}", path, target_layer=8, target_neuron=481,
                              feature_layer=-1, coordinates="transformer_lens")
            rng = random.Random(1)
            try:
                from nnsight import LanguageModel

                lm = LanguageModel(model.hf, tokenizer=model.tokenizer)
            except ImportError:
                lm = None
            columns = ["floor", *args.columns]
            times: dict[str, list[float]] = {name: [] for name in columns}
            route = ""
            for rep in range(args.repeats + 1):
                for name in columns:
                    if name == "nnsight" and lm is None:
                        continue
                    texts = inputs(rng)  # fresh inputs every repetition and every column
                    t0 = time.perf_counter()
                    if name == "floor":
                        floor(model, texts)
                    elif name == "engine":
                        route = run_experiment(head, texts, scale=FACTORS, model=model).method
                    elif name == "hooks":
                        hooks_pass(model, texts)
                    elif name == "nnsight":
                        nnsight_pass(model, lm, texts)
                    else:
                        seed_loop(model, texts)
                    if rep:  # the first repetition warms up
                        times[name].append(time.perf_counter() - t0)
            fl = statistics.median(times["floor"])
            r = {name: _ratio(ts, fl) for name, ts in times.items()}
            for name in ("engine", "hooks", "nnsight", "seed"):
                r.setdefault(name, "–")
            span = (f" ({min(times['engine']) / fl:.2f}–{max(times['engine']) / fl:.2f})"
                    if times.get("engine") else "")
            print(f"| {arch} | {fl:.3f} | {r['engine']}{span} | {r['hooks']} | {r['nnsight']} | "
                  f"{r['seed']} | {route} |", flush=True)
            clear_cache()


if __name__ == "__main__":
    main()
