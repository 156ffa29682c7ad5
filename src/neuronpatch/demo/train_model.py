"""Train the embedded ``neuronpatch-demo`` language model from the stdlib corpus.

The result is a small GPT-2-architecture model (4 layers, width 128) with its
own byte-level BPE tokenizer, saved as an ordinary Hugging Face directory, so
``GPT2LMHeadModel.from_pretrained`` / ``AutoTokenizer.from_pretrained`` and
TransformerLens's ``TransformerBridge.boot_transformers`` all load it offline.

Run it as::

    python -m neuronpatch.demo.train_model --out src/neuronpatch/demo/model

Training is seeded and stops at a fixed step count, so two runs on the same
machine and library versions give the same weights; the wall-clock budget is a
safety net for slow machines (``training.json`` records which limit stopped it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EOT = "<|endoftext|>"
DEFAULT_MAX_STEPS = 1000
DEFAULT_MINUTES = 4.0


def train_tokenizer(docs: Sequence[str], vocab_size: int, model_max_length: int = 128) -> Any:
    """Train a byte-level BPE tokenizer and wrap it for ``transformers``.

    Every byte is a base token, so each digit ``"0"``..``"9"`` is one token and
    nothing is ever out of vocabulary; ``<|endoftext|>`` doubles as BOS, EOS,
    UNK and padding, as in GPT-2.

    Args:
        docs: training texts.
        vocab_size: target vocabulary size, including the 256 byte tokens and ``<|endoftext|>``.
        model_max_length: the context length of the model the tokenizer serves.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.

    Example:
        >>> tok = train_tokenizer(["one two three"] * 10, vocab_size=300)
        >>> tok.decode(tok("two one")["input_ids"])
        'two one'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        model_max_length=model_max_length,
    )


def _token_stream(tokenizer: Any, docs: Sequence[str]) -> list[int]:
    # Documents are packed back to back, each followed by <|endoftext|>, as GPT-2 was trained.
    # The raw backend is used because whole documents exceed model_max_length on purpose.
    eot = tokenizer.convert_tokens_to_ids(EOT)
    stream: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(list(docs), add_special_tokens=False):
        stream.extend(encoding.ids)
        stream.append(eot)
    return stream


def _lm_loss(model: Any, batch: Any) -> Any:
    # Computed here rather than via labels=: same value, without HF's loss_type chatter.
    import torch.nn.functional as F

    logits = model(input_ids=batch).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def held_out_loss(model: Any, stream: Sequence[int], *, seq_len: int, max_blocks: int) -> float:
    """Mean next-token loss (nats/token) on consecutive, non-overlapping blocks of ``stream``.

    Args:
        model: a ``GPT2LMHeadModel``.
        stream: token ids.
        seq_len: block length.
        max_blocks: evaluate at most this many blocks (the first ones).

    Returns:
        The loss averaged over every predicted token.

    Example:
        >>> held_out_loss(model, ids, seq_len=128, max_blocks=100)  # doctest: +SKIP
        4.37
    """
    import torch

    n_blocks = min(max_blocks, len(stream) // seq_len)
    if n_blocks == 0:
        raise ValueError(f"held-out stream of {len(stream)} tokens is shorter than {seq_len}")
    data = torch.tensor(stream[: n_blocks * seq_len]).view(n_blocks, seq_len)
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for batch in data.split(32):
            # HF averages over the batch's predicted tokens; re-weight so blocks count equally.
            total += _lm_loss(model, batch).item() * len(batch)
    model.train(was_training)
    return total / n_blocks


def train(
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    minutes: float = DEFAULT_MINUTES,
    max_steps: int = DEFAULT_MAX_STEPS,
    vocab_size: int = 4096,
    n_layer: int = 4,
    n_embd: int = 128,
    n_head: int = 4,
    n_inner: int = 512,
    n_positions: int = 128,
    seq_len: int = 128,
    batch_size: int = 16,
    lr: float = 2e-3,
    warmup_steps: int = 100,
    weight_decay: float = 0.1,
    dropout: float = 0.0,
    max_documents: int | None = None,
    eval_blocks: int = 256,
    progress: bool = True,
) -> dict[str, Any]:
    """Train tokenizer and model on :func:`neuronpatch.demo.corpus.split` and save both.

    Args:
        out_dir: directory to write (created if needed; files in it are overwritten).
        seed: seeds the corpus split, the weight initialisation and the batch sampler.
        minutes: wall-clock budget for the optimisation loop; a safety net only.
        max_steps: optimiser steps; the learning-rate schedule spans exactly this many.
        vocab_size: BPE vocabulary size.
        n_layer: transformer blocks.
        n_embd: residual width.
        n_head: attention heads.
        n_inner: MLP width (the neurons heads predict).
        n_positions: context length of the model.
        seq_len: length of each training sequence (at most ``n_positions``).
        batch_size: sequences per step.
        lr: peak AdamW learning rate.
        warmup_steps: linear warm-up steps before the cosine decay.
        weight_decay: AdamW decay on matrices (not on biases, LayerNorms or embeddings).
        dropout: dropout everywhere in the model.
        max_documents: use only the first this-many train and held-out documents
            (for quick smoke runs); ``None`` uses the whole corpus.
        eval_blocks: most held-out blocks of ``seq_len`` tokens to score.
        progress: show a tqdm bar.

    Returns:
        The record also written to ``out_dir/training.json``.

    Example:
        >>> record = train("/tmp/tiny", max_steps=3, vocab_size=300, n_layer=1,
        ...                n_embd=32, n_head=2, n_inner=64, max_documents=50)  # doctest: +SKIP
        >>> record["steps"]                                                    # doctest: +SKIP
        3
    """
    import tokenizers
    import torch
    import transformers
    from tqdm.auto import tqdm
    from transformers import GPT2Config, GPT2LMHeadModel, get_cosine_schedule_with_warmup
    from transformers.utils import logging as hf_logging

    from neuronpatch.demo import corpus

    if seq_len > n_positions:
        raise ValueError(f"seq_len {seq_len} exceeds n_positions {n_positions}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    train_docs, held_docs = corpus.split(seed=seed)
    if max_documents is not None:
        train_docs, held_docs = train_docs[:max_documents], held_docs[:max_documents]
    tokenizer = train_tokenizer(train_docs, vocab_size, n_positions)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    train_stream = torch.tensor(_token_stream(tokenizer, train_docs))
    held_stream = _token_stream(tokenizer, held_docs)
    if len(train_stream) <= seq_len:
        raise ValueError(f"training stream of {len(train_stream)} tokens is too short")

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_inner=n_inner,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    model = GPT2LMHeadModel(config)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "wte" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "wte" in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
        betas=(0.9, 0.95),
    )
    schedule = get_cosine_schedule_with_warmup(optimizer, warmup_steps, max_steps)
    # A dedicated generator: the batch order depends on the seed only, not on model init.
    sampler = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len)

    recent: list[float] = []
    steps = 0
    stopped_by = "max_steps"
    budget = minutes * 60.0
    start = time.perf_counter()
    bar = tqdm(total=max_steps, disable=not progress, desc="training", unit="step")
    while steps < max_steps:
        if time.perf_counter() - start > budget:
            stopped_by = "time budget"
            break
        starts = torch.randint(0, len(train_stream) - seq_len, (batch_size,), generator=sampler)
        batch = train_stream[starts[:, None] + offsets]
        loss = _lm_loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        steps += 1
        recent = [*recent[-49:], loss.item()]
        bar.update(1)
        if steps % 10 == 0:
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
    bar.close()
    wall = time.perf_counter() - start

    held_loss = held_out_loss(model, held_stream, seq_len=seq_len, max_blocks=eval_blocks)
    uniform = math.log(len(tokenizer))
    model.eval()
    if not progress:
        hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards" bar
    try:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    finally:
        if not progress:
            hf_logging.enable_progress_bar()
    record: dict[str, Any] = {
        "seed": seed,
        "steps": steps,
        "max_steps": max_steps,
        "stopped_by": stopped_by,
        "tokens_seen": steps * batch_size * seq_len,
        "wall_time_s": round(wall, 1),
        "train_loss": round(sum(recent) / max(1, len(recent)), 4),
        "train_loss_note": "mean of the last 50 training batches, nats/token",
        "held_out_loss": round(held_loss, 4),
        "held_out_blocks": min(eval_blocks, len(held_stream) // seq_len),
        "uniform_baseline": round(uniform, 4),
        "vocab_size": len(tokenizer),
        "corpus": {
            "documents_train": len(train_docs),
            "documents_held_out": len(held_docs),
            "tokens_train": len(train_stream),
            "tokens_held_out": len(held_stream),
            "max_documents": max_documents,
        },
        "hyperparameters": {
            "n_layer": n_layer,
            "n_embd": n_embd,
            "n_head": n_head,
            "n_inner": n_inner,
            "n_positions": n_positions,
            "seq_len": seq_len,
            "batch_size": batch_size,
            "lr": lr,
            "warmup_steps": warmup_steps,
            "weight_decay": weight_decay,
            "dropout": dropout,
            "minutes": minutes,
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    for path in out.iterdir():
        # safetensors writes 0600; the directory ships inside a package, so make it world-readable.
        if path.is_file():
            path.chmod(0o644)
    return record


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m neuronpatch.demo.train_model --out DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--minutes",
        type=float,
        default=DEFAULT_MINUTES,
        help="wall-clock budget of the training loop (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=DEFAULT_MAX_STEPS,
        help="optimiser steps (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    # Training needs nothing from a hub; make any accidental lookup fail fast instead of hanging.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    record = train(args.out, seed=args.seed, minutes=args.minutes, max_steps=args.max_steps)
    print(
        f"steps {record['steps']} ({record['stopped_by']}), {record['tokens_seen']:,} tokens, "
        f"{record['wall_time_s']:.0f} s; train loss {record['train_loss']:.3f}, "
        f"held-out loss {record['held_out_loss']:.3f} nats/token vs uniform "
        f"ln({record['vocab_size']}) = {record['uniform_baseline']:.3f}"
    )
    print(f"saved to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
