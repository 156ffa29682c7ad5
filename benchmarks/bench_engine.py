"""Engine speed as multiples of the honest floor, on three architectures.

Reference task: 8 inputs of 16–18 tokens (``--tokens 64``: 64–66), 8 scale
factors, neuron 481 of layer 8, a linear regression head on the final state
(transformer_lens coordinates: the last block's output, before the final norm),
random weights at gpt2-small / pythia-160m sizes (and a Llama of that size with
grouped-query attention). Every repetition draws fresh inputs for every column,
so no cache is ever timed; the first repetition warms up.

    python benchmarks/bench_engine.py --repeats 11 --reference-repeats 3 --tokens 16 64

**The floor** (:func:`floor`) is the cheapest forward that yields the head's
features: one clean batched forward of the 8 inputs through the decoder stack
alone (``model.hf.base_model``: embeddings, blocks, final norm; no LM head),
left-padded like the engine, with explicit ``position_ids``, under
``torch.inference_mode()``. The causal-LM class would also compute logits at
every position (50,304 wide here, about a third of the work), which no
regression head reads; timing against it would flatter every column. For a
token head the floor would be the LM head at one position (:func:`token_floor`,
``logits_to_keep=1``); the reference task does not use it.

Columns, each the median over the repetitions of its time divided by that repetition's
floor (timed just before it, on other fresh inputs: pairing the two cancels the drift of a
shared machine's speed between repetitions). The floor and the engine are timed every
repetition (``--repeats``); the three reference columns, 6–30× slower and there to show how
far ahead the engine is, in the first ``--reference-repeats`` of them only:

* ``engine``: ``neuronpatch.run_experiment`` (its default route; the route is
  shown in the last column);
* ``hooks``: a hand-written plain-PyTorch pass: the 64 patched rows (8 inputs ×
  8 factors) in one forward of the decoder stack, a forward pre-hook scaling the
  neuron per row and a forward hook reading the last block's output at the last
  position;
* ``nnsight``: (the optional ``bench`` extra) one nnsight trace on the decoder
  stack with one invoke over the same 64 rows, reading the last block's output.
  nnsight's generic ``NNsight`` wrapper cannot batch several invokes, and the
  one-invoke-per-factor idiom needs its ``LanguageModel``, which runs the LM head
  at every position; so it gets one invoke of 64 rows. nnsight replaces the
  ``forward`` of every module it wraps, so it wraps a copy of the decoder stack
  and the other columns never run through it;
* ``seed``: the seed notebook's loop: per input and factor, a clean and a
  patched unbatched forward of the decoder stack with ``output_hidden_states``
  (as the notebook read its features), no LM head.

``--tiny`` builds 2-layer models with d_model 64 (neuron 48 of layer 0) so the
script's whole path runs in seconds (the tests); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from benchreport import Report, add_out
from transformers import AutoConfig, AutoModelForCausalLM

from neuronpatch import load_model, run_experiment
from neuronpatch.models import clear_cache
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
TINY_SIZES = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "gpt_neox": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=256, max_position_embeddings=256),
    "llama": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=256, max_position_embeddings=256),
}
VOCAB = 50304  # (the tiny models too: the tokenizer's end-of-text id is 50256)
LAYER, NEURON = 8, 481  # the unit patched (MLP neuron)
TINY_LAYER, TINY_NEURON = 0, 48  # (layer 0 of 2: the final state is a block later, as at 8 of 12)
FACTORS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]


def target(tiny: bool = False) -> tuple[int, int]:
    """The (layer, neuron) patched at the reference sizes, or in the ``--tiny`` models."""
    return (TINY_LAYER, TINY_NEURON) if tiny else (LAYER, NEURON)


def make(root: Path, arch: str, tiny: bool = False) -> Path:
    """A random causal LM of ``arch`` at the reference sizes (or tiny), saved under ``root``."""
    tok = tiny_tokenizer()
    cfg = AutoConfig.for_model(arch, vocab_size=VOCAB, **(TINY_SIZES if tiny else SIZES)[arch])
    cfg.bos_token_id = cfg.eos_token_id = tok.eos_token_id
    torch.manual_seed(0)
    path = root / (f"{arch}-tiny" if tiny else arch)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def head_for(root: Path, path: Path, arch: str, tiny: bool = False) -> Path:
    """The reference head: linear regression on the final state, transformer_lens coordinates."""
    layer, neuron = target(tiny)
    return write_head(root / f"head-{path.name}", path, target_layer=layer, target_neuron=neuron,
                      feature_layer=-1, coordinates="transformer_lens")


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


_TOK: list[Any] = []


def _tokenizer() -> Any:
    if not _TOK:
        _TOK.append(tiny_tokenizer())
    return _TOK[0]


def left_padded(model: Any, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, attention mask and position ids of ``texts``, left-padded like the engine."""
    rows = [model.tokenizer(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def decoder(model: Any) -> torch.nn.Module:
    """The decoder stack of a loaded model without its LM head (``GPT2Model``, ``LlamaModel``...).

    ``model.hf.base_model`` for gpt2, gpt_neox and llama under transformers 5
    (``get_decoder()`` returns the same module for these three).
    """
    return model.hf.base_model


def floor(model: Any, texts: list[str]) -> torch.Tensor:
    """The honest floor of a regression head: one clean batched forward of the decoder stack.

    The cheapest forward that yields the head's features: embeddings, blocks and
    final norm over the left-padded batch, with explicit ``position_ids``, no
    KV cache and no LM head. Returns the final hidden state (so the work cannot
    be skipped).
    """
    ids, mask, pos = left_padded(model, texts)
    with torch.inference_mode():
        return decoder(model)(input_ids=ids, attention_mask=mask, position_ids=pos,
                              use_cache=False).last_hidden_state


def token_floor(model: Any, texts: list[str]) -> torch.Tensor:
    """The honest floor of a token head: the same forward plus the LM head at one position.

    A token head reads the logits at its read position only, so the LM head runs
    at the last position (``logits_to_keep=1``), never over every position.
    Unused by the reference task (its head is a regression head); provided so a
    token-head benchmark divides by the right thing.
    """
    ids, mask, pos = left_padded(model, texts)
    with torch.inference_mode():
        return model.hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                        logits_to_keep=1).logits


def _scaling(factor: Any, neuron: int) -> Any:
    """A forward pre-hook scaling ``neuron`` at the last position by ``factor`` (per row or one)."""
    def pre(m: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0].clone()
        x[:, -1, neuron] *= factor
        return (x, *args[1:])
    return pre


def _reading(store: list[torch.Tensor]) -> Any:
    """A forward hook keeping a block's output at the last position (the final state)."""
    def hook(m: Any, args: Any, out: Any) -> None:
        store.append((out[0] if isinstance(out, tuple) else out)[:, -1])
    return hook


def hooks_pass(model: Any, texts: list[str], tiny: bool = False) -> torch.Tensor:
    """64 patched rows (8 inputs × 8 factors) in one forward of the decoder stack with plain hooks."""
    layer, neuron = target(tiny)
    ids, mask, pos = left_padded(model, [t for t in texts for _ in FACTORS])
    got: list[torch.Tensor] = []
    handles = [model.arch.mlp_out_proj[layer].register_forward_pre_hook(
                   _scaling(torch.tensor(FACTORS * len(texts)), neuron)),
               model.arch.blocks[-1].register_forward_hook(_reading(got))]
    try:
        with torch.inference_mode():
            decoder(model)(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return got[0]


def nnsight_wrapper(model: Any) -> Any:
    """nnsight's generic wrapper around a copy of the decoder stack (None without nnsight)."""
    try:
        from nnsight import NNsight
    except ImportError:
        return None
    return NNsight(copy.deepcopy(decoder(model)))


def _path(model: Any, module: torch.nn.Module) -> str:
    return next(name for name, m in decoder(model).named_modules() if m is module)


def _envoy(nn: Any, dotted: str) -> Any:
    """nnsight's proxy for one module of the wrapped copy, walked down its dotted path."""
    env = nn
    for part in dotted.split("."):
        env = env[int(part)] if part.isdigit() else getattr(env, part)
    return env


def nnsight_pass(model: Any, nn: Any, texts: list[str], tiny: bool = False) -> torch.Tensor:
    """One nnsight trace, one invoke over the 64 rows, reading the last block's output."""
    layer, neuron = target(tiny)
    ids, mask, pos = left_padded(model, [t for t in texts for _ in FACTORS])
    factors = torch.tensor(FACTORS * len(texts))
    proj, last = _path(model, model.arch.mlp_out_proj[layer]), _path(model, model.arch.blocks[-1])
    with torch.inference_mode(), nn.trace(input_ids=ids, attention_mask=mask, position_ids=pos,
                                          use_cache=False):
        x = _envoy(nn, proj).input
        x[:, -1, neuron] = x[:, -1, neuron] * factors
        out = _envoy(nn, last).output
        saved = (out[0] if isinstance(out, tuple) else out)[:, -1].save()
    return saved


def seed_loop(model: Any, texts: list[str], tiny: bool = False) -> None:
    """The notebook's way: per input and factor, a clean and a patched unbatched forward."""
    layer, neuron = target(tiny)
    proj = model.arch.mlp_out_proj[layer]
    for text in texts:
        ids = torch.tensor([model.tokenizer(text)["input_ids"]])
        for f in FACTORS:
            with torch.inference_mode():
                decoder(model)(ids, use_cache=False, output_hidden_states=True)
            h = proj.register_forward_pre_hook(_scaling(f, neuron))
            try:
                with torch.inference_mode():
                    decoder(model)(ids, use_cache=False, output_hidden_states=True)
            finally:
                h.remove()


COLUMNS = ("engine", "hooks", "nnsight", "seed")
HEADER = ("| architecture | tokens | floor s | engine × floor (min–max) | HF hooks, one pass × floor | "
          "nnsight, one trace × floor | seed loop × floor | route |")


def _ratios(times: list[float], floors: list[float]) -> list[float]:
    """Each repetition's time over that repetition's floor (a column timed in fewer
    repetitions, over the floors of those)."""
    return [t / f for t, f in zip(times, floors, strict=False)]


def _ratio(times: list[float], floors: list[float]) -> str:
    return f"{statistics.median(_ratios(times, floors)):.2f}" if times else "n/a"


REFERENCES = ("hooks", "nnsight", "seed")


def measure(model: Any, head: Path, nn: Any, n_tokens: int, repeats: int, columns: list[str],
            tiny: bool, rng: random.Random, reference_repeats: int | None = None
            ) -> tuple[dict[str, list[float]], str]:
    """Seconds per repetition of the floor and each column, on fresh inputs each time.

    The reference columns run in the first ``reference_repeats`` repetitions only (default all).
    """
    names = ["floor", *columns]
    times: dict[str, list[float]] = {name: [] for name in names}
    route = ""
    last_reference = repeats if reference_repeats is None else reference_repeats
    for rep in range(repeats + 1):
        for name in names:
            if (name == "nnsight" and nn is None) or (name in REFERENCES and rep > last_reference):
                continue
            texts = inputs(rng, 8, n_tokens)  # fresh inputs every repetition and every column
            t0 = time.perf_counter()
            if name == "floor":
                floor(model, texts)
            elif name == "engine":
                route = run_experiment(head, texts, scale=FACTORS, model=model).method
            elif name == "hooks":
                hooks_pass(model, texts, tiny)
            elif name == "nnsight":
                nnsight_pass(model, nn, texts, tiny)
            else:
                seed_loop(model, texts, tiny)
            if rep:  # the first repetition warms up
                times[name].append(time.perf_counter() - t0)
    return times, route


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--reference-repeats", type=int, default=None,
                    help="time the hooks, nnsight and seed columns in this many repetitions only "
                         "(the first ones; default all)")
    ap.add_argument("--archs", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--tokens", type=int, nargs="+", default=[16],
                    help="tokens per input (at least; default 16, the 16–18-token reference task)")
    ap.add_argument("--columns", nargs="+", default=list(COLUMNS), choices=COLUMNS,
                    help="which columns to time besides the floor (the rest print as '–')")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads (default: torch's own choice)")
    ap.add_argument("--tiny", action="store_true", help="2-layer d_model-64 models (a smoke test)")
    add_out(ap, "bench_engine")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = Report("bench_engine", args.out, argv)
    report.line(HEADER)
    report.line("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for arch in args.archs:
            path = make(root, arch, args.tiny)
            model = load_model(str(path), device="cpu")
            head = head_for(root, path, arch, args.tiny)
            nn = nnsight_wrapper(model) if "nnsight" in args.columns else None
            for n_tokens in args.tokens:
                times, route = measure(model, head, nn, n_tokens, args.repeats, args.columns, args.tiny,
                                       random.Random(1), args.reference_repeats)
                fl = statistics.median(times["floor"])
                r = {name: _ratio(ts, times["floor"]) for name, ts in times.items()}
                for name in COLUMNS:
                    r.setdefault(name, "–")
                each = _ratios(times.get("engine", []), times["floor"])
                span = f" ({min(each):.2f}–{max(each):.2f})" if each else ""
                report.line(f"| {arch} | {n_tokens} | {fl:.3f} | {r['engine']}{span} | {r['hooks']} | "
                            f"{r['nnsight']} | {r['seed']} | {route} |")
            del nn
            clear_cache()
    if "nnsight" in args.columns:
        try:
            import nnsight
        except ImportError:
            report.line("\nnnsight is not installed (the `bench` extra): its column reads n/a.")
        else:
            report.line(f"\nnnsight {nnsight.__version__}.")
    return report.write()


if __name__ == "__main__":
    main()
