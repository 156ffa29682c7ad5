"""The engine on a GPU: the same numbers as on the CPU, and its speed against the floor there.

Run on a machine with CUDA (a few minutes); writes ``docs/benchmarks/bench_device.md``.

1. **Numbers.** Tiny random models of 14 architectures (every parameter random), a
   linear head on the final state, the seed notebook's inputs: CUDA float32 against CPU
   float32 (largest gap over clean and patched activations and predictions, relative to
   the prediction scale; must be ≤ 1e-4), and CUDA bfloat16's slope against CPU
   float32's, with the error the bfloat16 result reports (must cover it).
2. **Speed.** Random weights at gpt2-small sizes (float32) and at about 1B parameters
   in a Llama shape (bfloat16), a linear head on the final state, neuron 481 of a layer
   two thirds up, 8 scale factors: ``run_experiment`` against the decoder-stack floor
   (one clean batched forward, no LM head) and one batched HF hook pass over every
   patched row, for 8 × 16, 64 × 64 and 256 × 64 inputs × tokens, fresh inputs every
   repetition; and ``rank_units`` over that layer (screen, top 8 confirmed).

    python benchmarks/bench_device.py [--device cuda] [--repeats 3]

``--tiny``: 2-layer d_model-64 models and small input counts (a smoke test that runs on the
CPU too; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_engine import FACTORS, VOCAB, WORDS
from benchreport import Report, add_out
from transformers import AutoConfig, AutoModelForCausalLM

from neuronpatch import load_model, rank_units, run_experiment
from neuronpatch.models import clear_cache
from neuronpatch.testing import ARCHITECTURES, tiny_model, tiny_tokenizer, write_head

ARCHS = list(ARCHITECTURES)
SHAPES = {  # name: (model_type, config sizes, dtype)
    "gpt2-small": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024), "float32"),
    "llama-1B": ("llama", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                               num_key_value_heads=8, intermediate_size=8192,
                               max_position_embeddings=2048), "bfloat16"),
}
TINY_SHAPES = {
    "gpt2-tiny": ("gpt2", dict(n_embd=64, n_layer=3, n_head=4, n_positions=256), "float32"),
    "llama-tiny": ("llama", dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=256,
                                 max_position_embeddings=256), "bfloat16"),
}
LOADS = [(8, 16), (64, 64), (256, 64)]
TINY_LOADS = [(4, 8), (8, 16)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], Any]) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def numbers(report: Report, device: str, root: Path, archs: list[str]) -> None:
    report.line("| architecture | float32 gap / prediction scale | bfloat16 slope | float32 slope (CPU) | "
                "bfloat16 reported error | covered |")
    report.line("| --- | ---: | ---: | ---: | ---: | --- |")
    for arch in archs:
        model_dir = tiny_model(root / arch, arch)
        head = write_head(root / f"{arch}-head", model_dir, target_layer=1, target_neuron=5, feature_layer=-1)
        cpu = run_experiment(head, device="cpu")
        gpu = run_experiment(head, device=device)
        scale = max(1.0, float(np.abs(cpu.patched_prediction).max()))
        gap = max(float(np.abs(getattr(gpu, n) - getattr(cpu, n)).max()) for n in
                  ("clean_activation", "clean_prediction", "patched_activation", "patched_prediction"))
        low = run_experiment(head, device=device, dtype="bfloat16")
        err = low.numerical_error["slope"]
        ok = "yes" if abs(low.slope - cpu.slope) <= err else "**no**"
        report.line(f"| {arch} | {gap / scale:.1e} | {low.slope:.4g} | {cpu.slope:.4g} | {err:.2g} | {ok} |")
        clear_cache()
    report.line()


def _make(root: Path, name: str, model_type: str, sizes: dict[str, int], dtype: str) -> Path:
    tok = tiny_tokenizer()
    cfg = AutoConfig.for_model(model_type, vocab_size=VOCAB, **sizes)
    cfg.bos_token_id = cfg.eos_token_id = tok.eos_token_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    path = root / name
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    return path


def _texts(rng: random.Random, n: int, n_tokens: int) -> list[str]:
    # Words of the demo tokenizer are about one token each.
    return [" ".join(rng.choice(WORDS) for _ in range(n_tokens - 1)) + "." for _ in range(n)]


def _batch(model: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = [model.tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(model.device), mask.to(model.device), pos.to(model.device)


def _floor(model: Any, texts: list[str]) -> None:
    ids, mask, pos = _batch(model, texts)
    with torch.inference_mode():
        model.hf.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)


def _hooks(model: Any, texts: list[str], layer: int, neuron: int) -> None:
    """Every patched row (inputs × factors) in one forward of the decoder stack, plain hooks."""
    ids, mask, pos = _batch(model, [t for t in texts for _ in FACTORS])
    factors = torch.tensor(FACTORS * len(texts), device=model.device, dtype=model.hf.dtype)

    def pre(m: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0].clone()
        x[:, -1, neuron] *= factors
        return (x, *args[1:])

    h = model.arch.mlp_out_proj[layer].register_forward_pre_hook(pre)
    try:
        with torch.inference_mode():
            model.hf.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    finally:
        h.remove()


def _shape(report: Report, dev: torch.device, root: Path, name: str, spec: tuple[str, dict[str, int], str],
           repeats: int, tiny: bool) -> str:
    """The speed rows of one model shape; returns its ranking row."""
    model_type, sizes, dtype = spec
    path = _make(root, name, model_type, sizes, dtype)
    model = load_model(str(path), device=str(dev), dtype=dtype)
    layer = model.n_layers * 2 // 3
    neuron = 481 % model.unit_width(True)
    head = write_head(root / f"head-{name}", path, target_layer=layer, target_neuron=neuron, feature_layer=-1)
    rng = random.Random(1)

    def engine(texts: list[str], into: list[Any]) -> None:
        into.append(run_experiment(head, texts, scale=FACTORS, model=model))

    for n, n_tokens in (TINY_LOADS if tiny else LOADS):
        times: dict[str, list[float]] = {"floor": [], "engine": [], "hooks": []}
        got: list[Any] = []
        for rep in range(repeats + 1):
            for col in times:
                texts = _texts(rng, n, n_tokens)  # fresh inputs every repetition and column
                if col == "floor":
                    took = _timed(dev, functools.partial(_floor, model, texts))
                elif col == "engine":
                    took = _timed(dev, functools.partial(engine, texts, got))
                else:
                    try:
                        took = _timed(dev, functools.partial(_hooks, model, texts, layer, neuron))
                    except torch.OutOfMemoryError:  # every row at once may not fit: say so
                        torch.cuda.empty_cache()
                        took = float("nan")
                if rep:  # the first repetition warms up
                    times[col].append(took)
        fl = statistics.median(times["floor"])
        ratio = {k: statistics.median(v) / fl for k, v in times.items()}
        report.line(f"| {name} ({dtype}) | {n} × {n_tokens} | {fl:.4f} | {ratio['engine']:.2f} | "
                    f"{ratio['hooks']:.2f} | {got[-1].method} |")
    texts = _texts(rng, 8, 16)
    fl = statistics.median(_timed(dev, functools.partial(_floor, model, texts)) for _ in range(3))
    took = _timed(dev, functools.partial(rank_units, head, texts, model=model, top=8))
    return f"| {name} ({dtype}) | {layer} | {took:.3f} | {took / fl:.1f} |"


def speed(report: Report, device: str, root: Path, repeats: int, tiny: bool) -> None:
    report.line("| model | inputs × tokens | floor s | engine × floor | hooks pass × floor | route |")
    report.line("| --- | --- | ---: | ---: | ---: | --- |")
    dev = torch.device(device)
    rank_lines = []
    for name, spec in (TINY_SHAPES if tiny else SHAPES).items():
        rank_lines.append(_shape(report, dev, root, name, spec, repeats, tiny))
        clear_cache()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    report.line()
    report.line("| model | layer ranked | rank_units s (top 8, 8 × 16) | × floor |")
    report.line("| --- | ---: | ---: | ---: |")
    for line in rank_lines:
        report.line(line)
    report.line()


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="torch device (default cuda)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--archs", nargs="+", default=ARCHS, choices=ARCHS,
                    help="architectures of the numbers table (default all 14)")
    ap.add_argument("--tiny", action="store_true", help="tiny models and loads (a smoke test)")
    add_out(ap, "bench_device")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_device: no CUDA device here (torch.cuda.is_available() is False); "
                         "run it on a machine with a GPU, or pass --device cpu --tiny for a smoke test")
    report = Report("bench_device", args.out, argv)
    where = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else "CPU"
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        report.line(f"## Numbers on {where}")
        report.line()
        numbers(report, args.device, root, args.archs)
        report.line(f"## Speed on {where}")
        report.line()
        speed(report, args.device, root, args.repeats, args.tiny)
    return report.write()


if __name__ == "__main__":
    main()
