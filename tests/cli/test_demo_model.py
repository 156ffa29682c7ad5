"""The embedded demo model: it loads offline, it learned something, and its corpus is stable."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

# Loading a local directory needs no hub; offline mode makes any stray lookup fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from neuronpatch.demo import corpus

MODEL_DIR = Path(corpus.__file__).parent / "model"
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model() -> Any:
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(MODEL_DIR).eval()


def _mean_loss(model: Any, blocks: Any) -> float:
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(input_ids=blocks).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks[:, 1:].reshape(-1)).item()


def test_shipped_directory_is_complete_and_small() -> None:
    names = {p.name for p in MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training.json"} <= names
    assert sum(p.stat().st_size for p in MODEL_DIR.iterdir()) < 8_000_000
    record = json.loads((MODEL_DIR / "training.json").read_text())
    assert record["held_out_loss"] < record["uniform_baseline"]


def test_loads_offline_with_plain_hf(model: Any, tokenizer: Any) -> None:
    cfg = model.config
    shape = (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_inner, cfg.n_positions)
    assert shape == (4, 128, 4, 512, 128)
    assert cfg.vocab_size == len(tokenizer)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == cfg.bos_token_id == eot
    ids = tokenizer("The value of the argument", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], cfg.vocab_size)


def test_held_out_loss_beats_uniform_by_two_nats(model: Any, tokenizer: Any) -> None:
    import torch

    _, held_out = corpus.split()
    eot = tokenizer.convert_tokens_to_ids(EOT)
    stream: list[int] = []
    for doc in held_out:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eot]
        if len(stream) >= 20 * 64:
            break
    blocks = torch.tensor(stream[: 20 * 64]).view(20, 64)
    loss = _mean_loss(model, blocks)
    uniform = math.log(len(tokenizer))
    assert loss < uniform - 2.0, f"held-out loss {loss:.3f} vs uniform {uniform:.3f}"


def test_greedy_generation_extends_the_prompt(model: Any, tokenizer: Any) -> None:
    ids = tokenizer("Return the", return_tensors="pt")["input_ids"]
    out = model.generate(
        ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    text = tokenizer.decode(out[0])
    assert text.startswith("Return the") and len(text) > len("Return the")


@pytest.mark.parametrize("digit", list("0123456789"))
def test_each_digit_is_one_token(tokenizer: Any, digit: str) -> None:
    assert len(tokenizer(digit, add_special_tokens=False)["input_ids"]) == 1
    assert len(tokenizer(" " + digit, add_special_tokens=False)["input_ids"]) == 1


def test_documents_are_deterministic_and_clean() -> None:
    docs = corpus.documents()
    assert docs == corpus.documents()
    assert len(docs) > 1000
    assert len(set(docs)) == len(docs)
    assert all(d == d.strip() and "  " not in d and "\n" not in d for d in docs)
    assert all(len(d.split()) >= corpus.MIN_DOCUMENT_WORDS for d in docs)


def test_split_is_deterministic_disjoint_and_complete() -> None:
    train, held_out = corpus.split()
    assert (train, held_out) == corpus.split()
    assert set(train).isdisjoint(held_out)
    assert sorted(train + held_out) == sorted(corpus.documents())
    assert 0.05 < len(held_out) / (len(train) + len(held_out)) < 0.15
    assert corpus.split(seed=1) != (train, held_out)
    with pytest.raises(ValueError):
        corpus.split(held_out_fraction=1.0)


def test_text_windows_count_bounds_and_determinism() -> None:
    train, _ = corpus.split()
    windows = corpus.text_windows(train, n=200, min_words=5, max_words=30, seed=3)
    assert len(windows) == 200
    assert all(5 <= len(w.split()) <= 30 for w in windows)
    # Contiguous and on word boundaries: each window is a run of whole words of one document.
    padded = [f" {d} " for d in train]
    assert all(any(f" {w} " in d for d in padded) for w in windows[:50])
    assert windows == corpus.text_windows(train, n=200, min_words=5, max_words=30, seed=3)
    assert windows != corpus.text_windows(train, n=200, min_words=5, max_words=30, seed=4)
    assert corpus.text_windows(train, n=0, min_words=5, max_words=30, seed=3) == []
    with pytest.raises(ValueError):
        corpus.text_windows(["too short"], n=1, min_words=5, max_words=30, seed=0)
    with pytest.raises(ValueError):
        corpus.text_windows(train, n=1, min_words=10, max_words=5, seed=0)


def test_train_end_to_end_on_a_tiny_budget(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from neuronpatch.demo.train_model import train

    record = train(
        tmp_path,
        max_steps=3,
        vocab_size=300,
        n_layer=1,
        n_embd=32,
        n_head=2,
        n_inner=64,
        n_positions=32,
        seq_len=32,
        batch_size=4,
        warmup_steps=1,
        max_documents=20,
        eval_blocks=4,
        progress=False,
    )
    assert record["steps"] == 3 and record["stopped_by"] == "max_steps"
    assert json.loads((tmp_path / "training.json").read_text()) == record
    tok = AutoTokenizer.from_pretrained(tmp_path)
    lm = GPT2LMHeadModel.from_pretrained(tmp_path)
    assert lm.config.vocab_size == len(tok) == record["vocab_size"]
    assert math.isfinite(record["held_out_loss"])
    ids = tok("The value 7", return_tensors="pt")["input_ids"]
    assert lm(input_ids=ids).logits.shape[-1] == len(tok)
