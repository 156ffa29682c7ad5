"""The engine against independent oracles: HF run directly, and analytic identities."""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from neuronpatch import load_head, run_experiment
from neuronpatch.errors import InputError, UnsafeArtifactError
from neuronpatch.interventions import Intervention
from neuronpatch.testing import tiny_gpt2, write_head
from tests.hf_oracle import Oracle, head_predict

# Different lengths on purpose: padding must not change a number.
TEXTS = [
    "The cat sat on the mat.",
    "Machine learning models can be difficult to interpret, said the quick brown fox.",
    "Numbers 3 4 5",
    "Transformers use attention mechanisms to process sequences.",
    "A",
]
LAYER, NEURON = 1, 7


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gpt2(tmp_path_factory.mktemp("model") / "tiny", n_layer=3)


@pytest.fixture(scope="module")
def oracle(model_dir: Path) -> Oracle:
    return Oracle(model_dir)


def make_head(tmp: Path, model_dir: Path, name: str, **kw: object) -> Path:
    kw.setdefault("target_layer", LAYER)
    kw.setdefault("target_neuron", NEURON)
    return write_head(tmp / name, model_dir, **kw)  # type: ignore[arg-type]


def oracle_rows(oracle: Oracle, head_dir: Path, res, *, layer_type: str = "post",
                position: str | int = "last") -> tuple[np.ndarray, np.ndarray]:
    """Clean and patched predictions computed by the oracle for every row of ``res``."""
    cfg = json.loads((head_dir / "config.json").read_text())
    fl = cfg.get("feature_layer", -1)
    digits = ([oracle.tok.encode(d, add_special_tokens=False)[0] for d in "0123456789"]
              if cfg["head_type"] == "token" else None)
    layer, neuron = cfg["target_layer"], cfg["target_neuron"]
    clean, patched = [], []
    for text in res.inputs:
        n = len(oracle.ids(text)[0])
        read = n - 1
        hs, logits, _ = oracle.run(text, layer=layer, layer_type=layer_type, neuron=neuron)
        feats = logits[read] if digits else hs[fl][0, read]
        clean.append(head_predict(head_dir, feats, digits))
        pos = list(range(n)) if position == "all" else [read if position == "last" else position]
        mean = float(np.mean([
            oracle.run(t, layer=layer, layer_type=layer_type, neuron=neuron)[2][
                (len(oracle.ids(t)[0]) - 1) if position == "last" else position]
            for t in res.inputs
        ])) if any(iv.kind == "mean" for iv in res.interventions) else 0.0
        row = []
        for iv in res.interventions:
            alpha, beta = iv.affine(mean)
            hs, logits, _ = oracle.run(text, layer=layer, layer_type=layer_type, neuron=neuron,
                                       positions=pos, fn=lambda a, al=alpha, be=beta: a * al + be)
            feats = logits[read] if digits else hs[fl][0, read]
            row.append(head_predict(head_dir, feats, digits))
        patched.append(row)
    return np.array(clean), np.array(patched)


# --------------------------------------------------------------------------- features
@pytest.mark.parametrize("feature_layer", [0, 1, 2, 3, -1, -2])
def test_clean_features_equal_hf_hidden_states(tmp_path, model_dir, oracle, feature_layer):
    head = make_head(tmp_path, model_dir, "h", feature_layer=feature_layer)
    res = run_experiment(head, TEXTS, scale=[0.0, 2.0])
    clean, _ = oracle_rows(oracle, head, res)
    np.testing.assert_allclose(res.clean_prediction, clean, atol=1e-5)


def test_final_feature_layer_is_after_final_layernorm(tmp_path, model_dir, oracle):
    # hidden_states[-1] is post-ln_f; a head on it must not see the raw residual.
    head = make_head(tmp_path, model_dir, "h", feature_layer=-1)
    res = run_experiment(head, TEXTS[:2], scale=[1.0])
    hs, _, _ = oracle.run(TEXTS[0], layer=0, layer_type="post", neuron=0)
    ln = oracle.model.transformer.ln_f
    sd = torch.load(head / "head.pt", weights_only=True)
    post_ln = float(sd["output.weight"][0] @ hs[-1][0, -1] + sd["output.bias"][0])
    assert torch.allclose(ln(hs[-1]), ln(hs[-1]))  # sanity: a real module
    assert res.clean_prediction[0] == pytest.approx(post_ln, abs=1e-5)


# --------------------------------------------------------------------------- patching
HEAD_KINDS = {
    "linear": dict(),
    "mlp": dict(hidden_dim=16),
    "classification_bins": dict(head_type="classification", n_classes=4,
                                bin_edges=[-2.0, -0.5, 0.0, 0.5, 2.0]),
    "classification_argmax": dict(head_type="classification", n_classes=3),
    "token": dict(head_type="token"),
}


@pytest.mark.parametrize("kind", sorted(HEAD_KINDS))
@pytest.mark.parametrize("method", ["auto", "sparse", "recompute", "full"])
def test_patched_predictions_equal_hf_hooks(tmp_path, model_dir, oracle, kind, method):
    head = make_head(tmp_path, model_dir, kind, feature_layer=-1, **HEAD_KINDS[kind])
    res = run_experiment(head, TEXTS, set=[-1.0, 2.5], scale=[0.0, 3.0], method=method)
    clean, patched = oracle_rows(oracle, head, res)
    np.testing.assert_allclose(res.clean_prediction, clean, atol=1e-5)
    np.testing.assert_allclose(res.patched_prediction, patched, atol=1e-5)
    assert res.patched_prediction.shape == (len(TEXTS), 4)


@pytest.mark.parametrize("method", ["auto", "sparse", "recompute", "full"])
@pytest.mark.parametrize("feature_layer", [2, 3])
def test_every_intervention_kind_matches_hf(tmp_path, model_dir, oracle, method, feature_layer):
    head = make_head(tmp_path, model_dir, "h", feature_layer=feature_layer, hidden_dim=8)
    ivs = [Intervention("scale", 1.5), Intervention("set", 0.7), Intervention("zero"),
           Intervention("add", -0.4), Intervention("mean")]
    res = run_experiment(head, TEXTS, interventions=ivs, method=method)
    _, patched = oracle_rows(oracle, head, res)
    np.testing.assert_allclose(res.patched_prediction, patched, atol=1e-5)


@pytest.mark.parametrize("position", ["all", 0, 1])
@pytest.mark.parametrize("method", ["auto", "sparse", "recompute", "full"])
def test_positions_match_hf(tmp_path, model_dir, oracle, position, method):
    head = make_head(tmp_path, model_dir, "h", feature_layer=-1, hidden_dim=8)
    texts = [t for t in TEXTS if len(oracle.ids(t)[0]) > 2]
    res = run_experiment(head, texts, set=[0.0, 3.0], position=position, method=method)
    _, patched = oracle_rows(oracle, head, res, position=position)
    np.testing.assert_allclose(res.patched_prediction, patched, atol=1e-5)
    if position == "all" and method in ("auto", "sparse"):
        assert res.method == "recompute"  # every position changes: no sparse shortcut
    elif method == "auto":
        assert res.method == "sparse"


@pytest.mark.parametrize("layer_type", ["mlp_out", "resid_pre"])
def test_residual_units_match_hf(tmp_path, model_dir, oracle, layer_type):
    head = make_head(tmp_path, model_dir, "h", feature_layer=-1, layer_type=layer_type)
    res = run_experiment(head, TEXTS, set=[0.0, 1.0], add=[2.0])
    _, patched = oracle_rows(oracle, head, res, layer_type=layer_type)
    np.testing.assert_allclose(res.patched_prediction, patched, atol=1e-5)


# --------------------------------------------------------------------------- analytic
def test_linear_head_right_after_neuron_has_slope_w_dot_wout(tmp_path, model_dir, oracle):
    head = make_head(tmp_path, model_dir, "h", feature_layer=LAYER + 1)
    w = torch.load(head / "head.pt", weights_only=True)["output.weight"][0]
    # GPT-2's Conv1D stores c_proj as [d_mlp, d_model]: row n is the neuron's write vector.
    w_out = oracle.model.transformer.h[LAYER].mlp.c_proj.weight[NEURON].detach()
    expected = float(w @ w_out)
    for method in ("auto", "recompute", "full"):
        res = run_experiment(head, TEXTS, set=[-2.0, 0.0, 1.0, 3.0], method=method)
        assert res.slope == pytest.approx(expected, rel=1e-4, abs=1e-6), method
        assert res.r_squared == pytest.approx(1.0, abs=1e-6), method
        cos = float(w @ w_out / (w.norm() * w_out.norm()))
        assert res.metrics()["weight_cosine"] == pytest.approx(cos, abs=1e-6)


def test_linear_head_on_mlp_out_unit_has_slope_w_n(tmp_path, model_dir):
    head = make_head(tmp_path, model_dir, "h", feature_layer=LAYER + 1, layer_type="mlp_out")
    w = torch.load(head / "head.pt", weights_only=True)["output.weight"][0]
    res = run_experiment(head, TEXTS, set=[-1.0, 0.5, 2.0])
    assert res.method == "linear"
    assert res.slope == pytest.approx(float(w[NEURON]), rel=1e-4, abs=1e-6)
    assert res.r_squared == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("feature_layer", [0, 1])
@pytest.mark.parametrize("method", ["auto", "full"])
def test_head_reading_at_or_before_the_layer_has_slope_exactly_zero(
    tmp_path, model_dir, feature_layer, method
):
    head = make_head(tmp_path, model_dir, "h", feature_layer=feature_layer, hidden_dim=8)
    res = run_experiment(head, TEXTS, set=[-3.0, 0.0, 5.0], method=method)
    assert res.slope == 0.0
    assert np.all(res.prediction_change == 0.0)
    assert math.isnan(res.r_squared) and "constant" in res.fit.reason
    if method == "auto":
        assert res.method == "upstream"


# --------------------------------------------------------------------------- batching
def test_batched_equals_one_at_a_time(tmp_path, model_dir):
    head = make_head(tmp_path, model_dir, "h", feature_layer=-1, hidden_dim=8)
    ivs = dict(scale=[0.0, 0.5, 2.0], set=[1.0])
    together = run_experiment(head, TEXTS, batch_size=64, **ivs)
    tiny_batches = run_experiment(head, TEXTS, batch_size=1, **ivs)
    for field in ("clean_activation", "clean_prediction", "patched_activation", "patched_prediction"):
        np.testing.assert_allclose(getattr(together, field), getattr(tiny_batches, field), atol=1e-5)
    for i, text in enumerate(TEXTS):
        alone = run_experiment(head, [text], **ivs)
        np.testing.assert_allclose(alone.patched_prediction[0], together.patched_prediction[i],
                                   atol=1e-5)
        np.testing.assert_allclose(alone.clean_activation[0], together.clean_activation[i],
                                   atol=1e-5)


def test_deterministic(tmp_path, model_dir):
    head = make_head(tmp_path, model_dir, "h", feature_layer=-1)
    a = run_experiment(head, TEXTS, scale=[0.0, 2.0])
    b = run_experiment(head, TEXTS, scale=[0.0, 2.0])
    assert np.array_equal(a.patched_prediction, b.patched_prediction)
    assert a.slope_ci95.as_list() == b.slope_ci95.as_list()


def test_hooks_do_not_outlive_a_run(tmp_path, model_dir):
    from neuronpatch import load_model

    head = make_head(tmp_path, model_dir, "h", feature_layer=-1)
    model = load_model(model_dir)
    ids = torch.tensor([[1, 2, 3]])
    before = model(ids)
    run_experiment(head, TEXTS, set=[100.0], model=model)
    after = model(ids)
    assert torch.equal(before, after)
    assert all(len(hp._forward_hooks) == 0 for hp in model.hook_dict.values())


# --------------------------------------------------------------------------- notes & errors
def test_unmoved_unit_gives_nan_slope_with_reason(tmp_path, model_dir):
    head = make_head(tmp_path, model_dir, "h", feature_layer=-1)
    res = run_experiment(head, TEXTS, scale=[1.0])  # a patch that changes nothing
    assert math.isnan(res.slope) and "no variance" in res.fit.reason
    assert res.summary()["reasons"]["slope"] == res.fit.reason


def test_upstream_head_is_explained_in_notes(tmp_path, model_dir):
    head = make_head(tmp_path, model_dir, "h", feature_layer=LAYER)
    res = run_experiment(head, TEXTS, set=[0.0, 1.0])
    assert any("exactly 0" in n for n in res.notes)
    assert res.summary()["notes"] == list(res.notes)


def test_input_errors(tmp_path, model_dir):
    head = make_head(tmp_path, model_dir, "h")
    with pytest.raises(InputError, match=r"input 1 .* is empty"):
        run_experiment(head, ["ok", ""])
    with pytest.raises(InputError, match="context is 128 tokens"):
        run_experiment(head, ["word " * 200])
    with pytest.raises(InputError, match="position 40 is outside input 0"):
        run_experiment(head, ["short"], position=40)


def test_unsafe_pickle_is_refused_and_not_executed(tmp_path, model_dir):
    head = make_head(tmp_path, model_dir, "h")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(head / "head.pt", "wb") as f:
        pickle.dump({"output.weight": Evil()}, f)
    with pytest.raises(UnsafeArtifactError, match="refused to load"):
        load_head(head)
    assert not marker.exists()


# --------------------------------------------------------------------------- routes
ROUTES_BY_FEATURE = [(LAYER, ("upstream", "sparse", "recompute")),
                     (LAYER + 1, ("linear", "sparse", "recompute")),
                     (-1, ("sparse", "recompute"))]


@pytest.mark.parametrize("kind", sorted(HEAD_KINDS))
@pytest.mark.parametrize(("token_pos", "position"), [("last", None), ("last", 1), ("last", "all"),
                                                     (2, None), (2, 1), (2, 3)])
def test_every_route_equals_the_full_computation(tmp_path, model_dir, kind, token_pos, position):
    texts = [t for t in TEXTS if len(t) > 8]  # at least 4 tokens each, lengths differ
    for feature_layer, routes in ROUTES_BY_FEATURE:
        if kind == "token" and feature_layer != -1:
            continue
        head = make_head(tmp_path, model_dir, f"{kind}{feature_layer}", feature_layer=feature_layer,
                         token_pos=token_pos, **HEAD_KINDS[kind])
        kw = dict(set=[-1.0, 2.0], scale=[0.5], mean=True, position=position)
        full = run_experiment(head, texts, method="full", **kw)
        for route in routes:
            if route == "linear" and position is not None:
                continue  # linear only where the patch sits at the read position
            res = run_experiment(head, texts, method=route, batch_size=3, **kw)
            label = f"{kind} feature_layer={feature_layer} route={route}"
            np.testing.assert_allclose(res.patched_prediction, full.patched_prediction, atol=1e-5,
                                       err_msg=label)
            np.testing.assert_allclose(res.patched_activation, full.patched_activation, atol=1e-6,
                                       err_msg=label)


def test_patch_after_the_read_position_changes_nothing(tmp_path, model_dir):
    head = make_head(tmp_path, model_dir, "h", feature_layer=-1, token_pos=1)
    res = run_experiment(head, TEXTS[:2], set=[5.0, -5.0], position=3)
    assert np.all(res.prediction_change == 0.0)
    assert res.slope == 0.0


def test_linear_route_is_refused_when_patch_and_read_positions_differ(tmp_path, model_dir):
    head = make_head(tmp_path, model_dir, "h", feature_layer=LAYER + 1)
    assert run_experiment(head, TEXTS, set=[0.0, 1.0], position=0).method == "sparse"
    with pytest.raises(ValueError, match="at the patched position"):
        run_experiment(head, TEXTS, set=[0.0, 1.0], position=0, method="linear")


def test_clean_runs_are_shared_between_experiments(tmp_path, model_dir):
    from neuronpatch import load_model

    model = load_model(model_dir)
    calls = []
    handle = model.embed.register_forward_hook(lambda *a: calls.append(1))
    try:
        head = make_head(tmp_path, model_dir, "h", feature_layer=LAYER + 1)
        texts = ["A sentence nobody else in this file uses.", "And another one."]
        first = run_experiment(head, texts, set=[0.0, 1.0], model=model)
        assert len(calls) == 1  # one clean pass; the linear route needs no patched forward
        again = run_experiment(head, texts, scale=[0.5, 2.0], model=model)
        assert len(calls) == 1  # the clean run was reused
        np.testing.assert_array_equal(first.clean_prediction, again.clean_prediction)
    finally:
        handle.remove()


@pytest.mark.parametrize("feature_layer", [LAYER + 1, -1])
def test_transformer_lens_coordinates_opt_in(tmp_path, model_dir, oracle, feature_layer):
    plain = make_head(tmp_path, model_dir, "plain", feature_layer=feature_layer)
    folded = make_head(tmp_path, model_dir, "folded", feature_layer=feature_layer,
                       weight_processing="transformer_lens")
    res = run_experiment(folded, TEXTS, set=[0.0, 1.0, 2.0])
    full = run_experiment(folded, TEXTS, set=[0.0, 1.0, 2.0], method="full")
    np.testing.assert_allclose(res.patched_prediction, full.patched_prediction, atol=1e-5)
    hf = run_experiment(plain, TEXTS, set=[0.0, 1.0, 2.0])
    if feature_layer != -1:
        # Centring the writing weights moves residual-stream coordinates: the same head
        # reads other numbers. (After ln_f they agree here: a fresh GPT-2's ln_f is the
        # identity affine map, so folding it changes nothing.)
        assert np.abs(hf.clean_prediction - res.clean_prediction).max() > 1e-3
    clean, _ = oracle_rows(oracle, plain, hf)
    np.testing.assert_allclose(hf.clean_prediction, clean, atol=1e-5)


@pytest.mark.parametrize("feature_layer", [LAYER, LAYER + 1, -1])
def test_collect_with_set_values_matches_hf(model_dir, oracle, feature_layer):
    from neuronpatch import load_model
    from neuronpatch.engine import collect

    values = [float(v) for v in np.linspace(-2.0, 3.0, len(TEXTS))]
    feats, acts = collect(load_model(model_dir), TEXTS, layer=LAYER, neuron=NEURON,
                          feature_layer=feature_layer, set_values=values, batch_size=2)
    assert acts.tolist() == pytest.approx(values)
    for i, text in enumerate(TEXTS):
        last = len(oracle.ids(text)[0]) - 1
        hs, _, _ = oracle.run(text, layer=LAYER, layer_type="post", neuron=NEURON, positions=[last],
                              fn=lambda a, v=values[i]: torch.full_like(a, v))
        np.testing.assert_allclose(feats[i].numpy(), hs[feature_layer][0, last].numpy(), atol=1e-5)
