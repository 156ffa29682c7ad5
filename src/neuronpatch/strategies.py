"""Hypothesis strategies for the inputs of a patching experiment.

A causal claim checked on eight hand-picked sentences may fail on the ninth.
These strategies generate inputs to hunt for that ninth sentence, and shrink a
counterexample toward short, plain text:

* :func:`sentences`: sentences of words from a vocabulary (a probe's own
  inputs' words plus the model's whole-word tokens);
* :func:`token_ids`: valid token ids for a model (special tokens excluded);
* :func:`mutations`: a given text with words inserted, deleted or swapped.

Importing this module imports Hypothesis only. Settings profiles for CI and
local runs are registered by :func:`register_profiles` (the pytest plugin calls
it); nothing is loaded at import time, so ``--hypothesis-profile`` still wins.

Example:
    >>> from hypothesis import given
    >>> from neuronpatch.strategies import sentences
    >>> @given(text=sentences(words=["cat", "sat", "mat"], max_words=5))
    ... def test_text(text):
    ...     assert text.endswith(".")
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

CI_PROFILE = "neuronpatch-ci"
DEV_PROFILE = "neuronpatch-dev"
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")
_PLAIN_TOKEN = re.compile(r"^Ġ([A-Za-z]{2,15})$")


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name}={value!r} must be an integer")
    if value < lo:
        raise InvalidArgument(f"{name}={value!r} must be at least {lo}")
    return value


def _plainness(word: str) -> tuple[int, bool, str]:
    # Shrinking goes toward the first element of sampled_from: short, lower-case words.
    return (len(word), not word.islower(), word)


def vocabulary(*, texts: Sequence[str] = (), tokenizer: Any = None, max_words: int = 2000
               ) -> tuple[str, ...]:
    """Words from ``texts`` and the tokenizer's whole-word tokens, plainest first.

    Whole-word tokens are byte-level BPE tokens made of a leading space (``Ġ``)
    and 2 to 15 letters: each is one token after a space, so generated
    sentences stay close to the model's own units.

    Example:
        >>> vocabulary(texts=["The cat sat.", "A cat ran"])
        ('A', 'cat', 'ran', 'sat', 'The')
    """
    _check_int("max_words", max_words, 1)
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(_WORD.findall(text))
    if tokenizer is not None:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        for token in vocab:
            m = _PLAIN_TOKEN.match(token)
            if m:
                counts[m.group(1)] += 0  # present, without outranking the texts' own words
    words = sorted(counts, key=lambda w: (-counts[w], *_plainness(w)))[:max_words]
    return tuple(sorted(words, key=_plainness))


def sentences(
    *,
    words: Sequence[str] | None = None,
    texts: Sequence[str] = (),
    tokenizer: Any = None,
    min_words: int = 1,
    max_words: int = 12,
    end: str | None = ".",
) -> st.SearchStrategy[str]:
    """Sentences of ``min_words`` to ``max_words`` words, capitalised, ending in ``end``.

    Args:
        words: the vocabulary; default :func:`vocabulary` of ``texts`` and ``tokenizer``.
        texts: texts whose words join the vocabulary (a probe's inputs).
        tokenizer: an HF tokenizer whose whole-word tokens join the vocabulary.
        min_words: fewest words (at least 1).
        max_words: most words.
        end: text appended to the sentence (``None`` for nothing).

    Example:
        >>> s = sentences(words=["cat", "sat"], max_words=3)
        >>> s.example().endswith(".")   # doctest: +SKIP
        True
    """
    _check_int("min_words", min_words, 1)
    _check_int("max_words", max_words, 1)
    if max_words < min_words:
        raise InvalidArgument(f"max_words={max_words} is less than min_words={min_words}")
    vocab = tuple(sorted(set(words), key=_plainness)) if words is not None else vocabulary(
        texts=texts, tokenizer=tokenizer)
    vocab = tuple(w for w in vocab if w.strip())
    if not vocab:
        raise InvalidArgument("the vocabulary is empty - pass words=[...], texts=[...] or a "
                              "tokenizer with whole-word tokens")
    suffix = end or ""

    def join(ws: list[str]) -> str:
        text = " ".join(ws)
        return text[:1].upper() + text[1:] + suffix

    return st.lists(st.sampled_from(vocab), min_size=min_words, max_size=max_words).map(join)


def _tokenizer_of(obj: Any) -> tuple[Any, int | None]:
    if hasattr(obj, "arch") and hasattr(obj, "tokenizer"):  # a neuronpatch LoadedModel
        return obj.tokenizer, obj.n_ctx
    return obj, None


def token_ids(
    tokenizer_or_model: Any, *, min_size: int = 1, max_size: int = 32, allow_special: bool = False
) -> st.SearchStrategy[list[int]]:
    """Lists of valid token ids for a tokenizer (or a model, whose context caps ``max_size``).

    Example:
        >>> ids = token_ids(tokenizer, max_size=8)   # doctest: +SKIP
    """
    _check_int("min_size", min_size, 1)
    _check_int("max_size", max_size, 1)
    tok, n_ctx = _tokenizer_of(tokenizer_or_model)
    if n_ctx is not None:
        max_size = min(max_size, n_ctx)  # documented clamp: a longer input cannot run at all
    if max_size < min_size:
        raise InvalidArgument(f"max_size={max_size} is less than min_size={min_size}")
    size = len(tok)
    special = set() if allow_special else set(getattr(tok, "all_special_ids", []))
    allowed = [i for i in range(size) if i not in special]
    if not allowed:
        raise InvalidArgument("the tokenizer has no non-special tokens")
    return st.lists(st.sampled_from(allowed), min_size=min_size, max_size=max_size)


def decoded(ids: st.SearchStrategy[list[int]], tokenizer_or_model: Any) -> st.SearchStrategy[str]:
    """Texts decoded from token ids (the engine takes texts); blank texts are skipped.

    Decoding and re-encoding need not give back the same ids; the text is what runs.
    """
    tok, _ = _tokenizer_of(tokenizer_or_model)
    return ids.map(lambda xs: tok.decode(xs)).filter(lambda t: bool(t.strip()))


def mutations(texts: Sequence[str], *, words: Sequence[str] | None = None, max_edits: int = 3
              ) -> st.SearchStrategy[str]:
    """One of ``texts`` with up to ``max_edits`` word insertions, deletions or swaps.

    Shrinks toward the first text, unchanged. A text keeps at least one word.

    Example:
        >>> m = mutations(["The cat sat on the mat."], max_edits=2)
    """
    _check_int("max_edits", max_edits, 0)
    sources = [t for t in texts if t.split()]
    if not sources:
        raise InvalidArgument("texts must hold at least one non-empty text to mutate")
    vocab = tuple(words) if words is not None else vocabulary(texts=sources)
    if not vocab:
        raise InvalidArgument("no words to insert - pass words=[...]")
    edit = st.tuples(st.sampled_from(("insert", "delete", "swap")), st.integers(0, 10_000),
                     st.sampled_from(vocab))

    def apply(args: tuple[str, list[tuple[str, int, str]]]) -> str:
        text, edits = args
        ws = text.split()
        for kind, at, word in edits:
            if kind == "insert":
                ws.insert(at % (len(ws) + 1), word)
            elif kind == "delete" and len(ws) > 1:
                del ws[at % len(ws)]
            elif kind == "swap" and len(ws) > 1:
                i = at % (len(ws) - 1)
                ws[i], ws[i + 1] = ws[i + 1], ws[i]
        return " ".join(ws)

    return st.tuples(st.sampled_from(sources), st.lists(edit, max_size=max_edits)).map(apply)


def register_profiles() -> None:
    """Register the ``neuronpatch-ci`` and ``neuronpatch-dev`` settings profiles (idempotent).

    ``neuronpatch-ci``: derandomized (the same examples every run), no deadline,
    no example database, slow-data health checks off. ``neuronpatch-dev``: no
    deadline, with the example database, so past failures replay first.
    """
    slow = [HealthCheck.too_slow, HealthCheck.data_too_large]
    # Derived from Hypothesis's own defaults, not from whatever profile is loaded now (a
    # verbose one, say), so that these profiles mean the same in every session.
    default = settings.get_profile("default")
    settings.register_profile(CI_PROFILE, parent=default, derandomize=True, deadline=None,
                              database=None, suppress_health_check=slow, print_blob=True)
    settings.register_profile(DEV_PROFILE, parent=default, deadline=None, suppress_health_check=slow)


def default_profile() -> str:
    """``neuronpatch-ci`` when the ``CI`` environment variable is set, else ``neuronpatch-dev``."""
    ci = os.environ.get("CI", "").strip().lower()
    return CI_PROFILE if ci not in ("", "0", "false", "no") else DEV_PROFILE
