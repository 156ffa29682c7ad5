"""Inputs: texts to token rows, the positions an experiment patches and reads, left padding."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from neuronpatch.errors import InputError

if TYPE_CHECKING:
    from neuronpatch.models import LoadedModel

# The seed notebook's eight test sentences: the default inputs.
DEFAULT_INPUTS: tuple[str, ...] = (
    "The cat sat on the mat.",
    "Machine learning models can be difficult to interpret.",
    "Transformers use attention mechanisms to process sequences.",
    "Neural networks have revolutionized artificial intelligence research.",
    "The quick brown fox jumps over the lazy dog.",
    "Researchers work to make AI systems more transparent and explainable.",
    "Scientists study the complex patterns in large language models.",
    "Mechanistic interpretability aims to understand how neural networks work internally.",
)


@dataclass(frozen=True)
class Encoded:
    """Tokenized inputs with the positions the experiment uses."""

    ids: list[list[int]]
    read_pos: list[int]
    patch_pos: list[list[int]]  # patched positions per input
    measure_pos: list[int]  # where the unit's activation change is measured

    def first(self) -> Encoded:
        """Input 0 alone (what the route checks patch for real)."""
        return self.select([0])

    def select(self, idx: Sequence[int]) -> Encoded:
        """The inputs ``idx``, in that order."""
        return Encoded([self.ids[i] for i in idx], [self.read_pos[i] for i in idx],
                       [self.patch_pos[i] for i in idx], [self.measure_pos[i] for i in idx])

    @property
    def longest(self) -> int:
        """Tokens in the longest input."""
        return max(len(ids) for ids in self.ids)


def tokenize(model: LoadedModel, text: str, prepend_bos: bool | None) -> list[int]:
    """Token ids as the seed pipeline makes them: the HF tokenizer with its defaults.

    ``prepend_bos`` True/False overrides whether a BOS token starts the input.
    """
    tok = model.tokenizer
    if prepend_bos is None:
        return [int(i) for i in tok(text)["input_ids"]]
    ids = [int(i) for i in tok(text, add_special_tokens=False)["input_ids"]]
    if prepend_bos:
        bos = tok.bos_token_id
        if bos is None:
            raise InputError("prepend_bos is true but the tokenizer has no BOS token")
        ids = [int(bos), *ids]
    return ids


def encode(
    model: LoadedModel,
    texts: Sequence[str],
    *,
    prepend_bos: bool | None,
    token_pos: str | int,
    position: str | int,
) -> Encoded:
    """Tokenize and resolve positions.

    Raises:
        InputError: an empty input, one longer than the model's context, or a
            position outside an input.
    """
    n_ctx = model.n_ctx
    ids_all, read, patch, measure = [], [], [], []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"input {i} is {type(text).__name__}, expected a string")
        if not text.strip():
            raise InputError(f"input {i} ({text!r}) is empty; every input needs at least one token")
        ids = tokenize(model, text, prepend_bos)
        if not ids:
            raise InputError(f"input {i} ({text!r}) has no tokens")
        if n_ctx is not None and len(ids) > n_ctx:
            raise InputError(f"input {i} ({short(text)!r}) has {len(ids)} tokens; the model's "
                             f"context is {n_ctx} tokens")
        n = len(ids)
        r = _resolve(token_pos, n, what="token_pos", i=i, text=text)
        if position == "all":
            p, m = list(range(n)), r
        else:
            one = _resolve(position, n, what="position", i=i, text=text)
            p, m = [one], one
        ids_all.append(ids)
        read.append(r)
        patch.append(p)
        measure.append(m)
    if not ids_all:
        raise InputError("no inputs given; expected at least one text")
    return Encoded(ids_all, read, patch, measure)


def _resolve(pos: str | int, n: int, *, what: str, i: int, text: str) -> int:
    if pos == "last":
        return n - 1
    if isinstance(pos, bool) or not isinstance(pos, int):
        raise InputError(f"{what} {pos!r} is invalid; expected 'last', 'all' or an integer")
    p = pos + n if pos < 0 else pos
    if not 0 <= p < n:
        raise InputError(f"{what} {pos} is outside input {i} ({short(text)!r}, {n} tokens)")
    return p


def short(text: str, n: int = 40) -> str:
    """``text`` cut to ``n`` characters for a message."""
    return text if len(text) <= n else text[: n - 1] + "…"


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Token rows left-padded to one width: ``(ids, attention mask, position ids)``.

    Positions count real tokens only, so a padded row gives the numbers it gives alone.
    """
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def pad_id(model: LoadedModel) -> int:
    """The token that fills padding (masked out, so any id serves): pad, else EOS, else BOS."""
    tok = model.tokenizer
    for cand in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
        if cand is not None:
            return int(cand)
    return 0


def chunks(n: int, size: int) -> Iterator[list[int]]:
    """``range(n)`` in consecutive lists of at most ``size``."""
    for lo in range(0, n, size):
        yield list(range(lo, min(n, lo + size)))
