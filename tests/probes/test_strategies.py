"""Hypothesis strategies: valid inputs for the model, eager argument checks, shrinking, profiles."""

from __future__ import annotations

import pytest
from hypothesis import find, given, settings
from hypothesis.errors import InvalidArgument

from neuronpatch import strategies as ns

TEXTS = ["The cat sat on the mat.", "Machine learning models can be difficult to interpret."]


@pytest.fixture(scope="module")
def model(probe_heads):
    from neuronpatch import load_model

    return load_model(probe_heads.model)


def test_sentences_are_valid_inputs_for_the_model(model, probe_heads):
    from neuronpatch import run_experiment

    seen = []

    @settings(max_examples=15, deadline=None, database=None)
    @given(text=ns.sentences(texts=TEXTS, tokenizer=model.tokenizer, max_words=6))
    def check(text):
        seen.append(text)
        words = text[:-1].split()
        assert 1 <= len(words) <= 6 and text.endswith(".")
        assert 1 <= len(model.tokenizer.encode(text)) <= model.n_ctx

    check()
    res = run_experiment(probe_heads.causal, seen[:4], set=[0, 1], model=model)
    assert res.patched_prediction.shape == (len(seen[:4]), 2)


def test_token_ids_are_in_range_and_not_special(model):
    specials = set(model.tokenizer.all_special_ids)

    @settings(max_examples=30, deadline=None, database=None)
    @given(ids=ns.token_ids(model, max_size=500))
    def check(ids):
        assert 1 <= len(ids) <= model.n_ctx  # clamped to the context
        assert all(0 <= i < len(model.tokenizer) and i not in specials for i in ids)

    check()


def test_mutations_stay_close_and_never_empty():
    @settings(max_examples=50, deadline=None, database=None)
    @given(text=ns.mutations(TEXTS, max_edits=2))
    def check(text):
        assert text.split()
        source = min(TEXTS, key=lambda t: abs(len(t.split()) - len(text.split())))
        assert abs(len(text.split()) - len(source.split())) <= 2

    check()


def test_shrinking_goes_to_short_plain_inputs():
    words = ns.vocabulary(texts=TEXTS)
    three = find(ns.sentences(texts=TEXTS), lambda s: len(s.split()) >= 3)
    assert three == f"{words[0].capitalize()} {words[0]} {words[0]}."
    assert find(ns.mutations(TEXTS), lambda t: True) == TEXTS[0]


def test_ci_profile_is_deterministic():
    hypothesis_ci = settings.get_profile("ci")
    ns.register_profiles()
    assert settings.get_profile("ci") is hypothesis_ci  # a name we never take

    def examples() -> list[str]:
        out: list[str] = []

        @settings(settings.get_profile(ns.CI_PROFILE), max_examples=20)
        @given(text=ns.sentences(texts=TEXTS))
        def record(text):
            out.append(text)

        record()
        return out

    assert examples() == examples()
    assert settings.get_profile(ns.CI_PROFILE).derandomize is True


def test_default_profile_follows_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert ns.default_profile() == "neuronpatch-ci"
    monkeypatch.setenv("CI", "")
    assert ns.default_profile() == "neuronpatch-dev"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ns.sentences(words=["a"], min_words=0), "min_words=0 must be at least 1"),
        (lambda: ns.sentences(words=["a"], min_words=3, max_words=2),
         "max_words=2 is less than min_words=3"),
        (lambda: ns.sentences(words=[]), "the vocabulary is empty"),
        (lambda: ns.sentences(words=["a"], max_words="3"), "max_words='3' must be an integer"),
        (lambda: ns.mutations([]), "texts must hold at least one non-empty text"),
        (lambda: ns.mutations(TEXTS, max_edits=-1), "max_edits=-1 must be at least 0"),
    ],
)
def test_arguments_are_checked_eagerly(call, message):
    with pytest.raises(InvalidArgument, match=message):
        call()
