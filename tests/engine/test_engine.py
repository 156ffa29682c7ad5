"""Engine identities and behaviour (the architecture matrix holds the HF-reference checks)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from neuronpatch import load_head, run_experiment
from neuronpatch.errors import HeadConfigError, InputError, ModelLoadError, UnsafeArtifactError
from neuronpatch.testing import tiny_model, write_head

TEXTS = ["The cat sat on the mat.", "Numbers 3 4 5", "A",
         "Machine learning models can be difficult to interpret, said the quick brown fox."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("gpt2") / "m", "gpt2")


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_tl_head_right_after_neuron_has_the_centred_write_slope(tmp_path, model_dir):
    # transformer_lens coordinates of a LayerNorm model: slope = w · (W_out[n] − mean(W_out[n])).
    head = write_head(tmp_path / "h", model_dir, target_layer=1, target_neuron=7, feature_layer=1)
    w = torch.load(head / "head.pt", weights_only=True)["output.weight"][0].double()
    w_out = _weights(model_dir)["transformer.h.1.mlp.c_proj.weight"][7].double()  # Conv1D: [d_mlp, d]
    res = run_experiment(head, TEXTS, scale=[0, 0.5, 2, 3], device="cpu")
    assert res.method == "linear"
    assert res.slope == pytest.approx(float(w @ (w_out - w_out.mean())), rel=1e-4)
    assert res.r_squared == pytest.approx(1.0, abs=1e-6)


def test_hf_head_right_after_neuron_has_the_raw_write_slope(tmp_path, model_dir):
    head = write_head(tmp_path / "h", model_dir, target_layer=1, target_neuron=7, feature_layer=2,
                      coordinates="hf")
    w = torch.load(head / "head.pt", weights_only=True)["output.weight"][0].double()
    w_out = _weights(model_dir)["transformer.h.1.mlp.c_proj.weight"][7].double()
    res = run_experiment(head, TEXTS, scale=[0, 2], device="cpu")
    assert res.slope == pytest.approx(float(w @ w_out), rel=1e-4)


@pytest.mark.parametrize("coordinates", ["transformer_lens", "hf"])
def test_mlp_out_unit_slope_is_w_n_in_both_coordinates(tmp_path, model_dir, coordinates):
    fl = 1 if coordinates == "transformer_lens" else 2
    head = write_head(tmp_path / "h", model_dir, target_layer=1, target_neuron=4, feature_layer=fl,
                      layer_type="mlp_out", coordinates=coordinates)
    w = torch.load(head / "head.pt", weights_only=True)["output.weight"][0]
    res = run_experiment(head, TEXTS, set=[-1, 0, 1, 2], device="cpu", method="kv")
    assert res.slope == pytest.approx(float(w[4]), rel=1e-4)


def test_tl_head_right_after_its_unit_is_not_upstream(tmp_path, model_dir):
    # feature_layer == target_layer reads the block's resid_post: after the unit.
    head = write_head(tmp_path / "h", model_dir, target_layer=1, target_neuron=7, feature_layer=1)
    res = run_experiment(head, TEXTS, scale=[0, 2], device="cpu")
    assert res.method != "upstream" and abs(res.slope) > 1e-3


def test_head_before_the_unit_has_slope_exactly_zero(tmp_path, model_dir):
    head = write_head(tmp_path / "h", model_dir, target_layer=2, target_neuron=7, feature_layer=1)
    res = run_experiment(head, TEXTS, scale=[0, 2], device="cpu")
    assert res.method == "upstream"
    assert np.array_equal(res.patched_prediction, np.repeat(res.clean_prediction[:, None], 2, 1))
    assert any("route upstream" in n for n in res.notes)


def test_batched_equals_one_at_a_time(tmp_path, model_dir):
    head = write_head(tmp_path / "h", model_dir, target_layer=0, target_neuron=3, feature_layer=-1,
                      hidden_dim=8)
    together = run_experiment(head, TEXTS, scale=[0, 2], add=[1], device="cpu")
    for i, text in enumerate(TEXTS):
        alone = run_experiment(head, [text], scale=[0, 2], add=[1], device="cpu")
        np.testing.assert_allclose(alone.patched_prediction[0], together.patched_prediction[i],
                                   rtol=1e-5, atol=1e-6)


def test_forcing_a_route_that_cannot_serve_is_an_error(tmp_path, model_dir):
    head = write_head(tmp_path / "h", model_dir, target_layer=0, target_neuron=3, feature_layer=-1)
    with pytest.raises(InputError, match="route 'linear' cannot serve"):
        run_experiment(head, TEXTS, scale=[0, 2], method="linear", device="cpu")
    with pytest.raises(InputError, match="route 'kv' cannot serve"):
        run_experiment(head, TEXTS, scale=[0, 2], position="all", method="kv", device="cpu")


def test_bfloat16_runs_close_to_float32(tmp_path, model_dir):
    head = write_head(tmp_path / "h", model_dir, target_layer=0, target_neuron=3, feature_layer=-1)
    f32 = run_experiment(head, TEXTS, scale=[0, 2], device="cpu")
    bf16 = run_experiment(head, TEXTS, scale=[0, 2], device="cpu", dtype="bfloat16")
    scale = float(np.abs(f32.patched_prediction).max()) + 1
    assert float(np.abs(bf16.patched_prediction - f32.patched_prediction).max()) < 0.1 * scale


def test_unsafe_pickle_is_refused_and_not_executed(tmp_path, model_dir):
    head = write_head(tmp_path / "h", model_dir, target_layer=0, target_neuron=3)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(head / "head.pt", "wb") as f:
        pickle.dump({"output.weight": Evil()}, f)
    with pytest.raises(UnsafeArtifactError):
        load_head(head)
    assert not marker.exists()


def test_two_weight_files_need_the_config_to_choose(tmp_path, model_dir):
    head = write_head(tmp_path / "h", model_dir, target_layer=0, target_neuron=3)
    write_head(tmp_path / "h", model_dir, target_layer=0, target_neuron=3, fmt="safetensors", seed=9)
    with pytest.raises(HeadConfigError, match=r"both head\.pt and head\.safetensors"):
        load_head(head)
    cfg = json.loads((head / "config.json").read_text())
    (head / "config.json").write_text(json.dumps({**cfg, "weights": "head.safetensors"}))
    assert load_head(head).weights["output.weight"].shape[0] == 1


def test_seed_pipeline_config_keys_are_read(tmp_path, model_dir):
    head = write_head(tmp_path / "h", model_dir, target_layer=0, target_neuron=3, hidden_dim=4,
                      head_config={"class_name": "RegressionHead", "input_dim": 32, "dropout": 0.1,
                                   "activation": "relu", "output_scale": 2.0},
                      d_model=32, activation_mean=None, activation_std=None)
    h = load_head(head)
    assert (h.config.activation, h.config.output_scale, h.config.coordinates) == ("relu", 2.0,
                                                                                   "transformer_lens")
    x = torch.randn(3, 32)
    sd = h.weights
    want = (torch.relu(x @ sd["hidden.weight"].T + sd["hidden.bias"]) @ sd["output.weight"].T
            + sd["output.bias"])[:, 0] * 2.0
    torch.testing.assert_close(h.predict(x), want)


def test_bidirectional_model_is_refused_by_name(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    path = tmp_path / "bert"
    BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, vocab_size=100)).save_pretrained(path)
    from neuronpatch.models import load_model

    with pytest.raises(ModelLoadError, match="bert model, which is not a causal"):
        load_model(str(path), device="cpu")


def test_collect_with_set_values_writes_the_value(model_dir):
    from neuronpatch.engine import collect
    from neuronpatch.models import load_model

    model = load_model(str(model_dir), device="cpu")
    _, acts = collect(model, TEXTS, layer=0, neuron=3, feature_layer=1, set_values=[0.5, 1, 2, 3])
    assert acts.tolist() == [0.5, 1.0, 2.0, 3.0]


def test_a_site_that_disagrees_with_hf_is_refused_by_name(model_dir):
    # A wrong module for the final norm (or one that runs twice) must be refused, never read.
    from transformers import AutoModelForCausalLM

    from neuronpatch.architecture import Site, describe, verify

    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    arch = describe(hf)
    verify(hf, arch)
    assert arch.refused == {}
    arch.final_norm = arch.blocks[0]
    verify(hf, arch)
    assert "final_norm" in arch.refused
    with pytest.raises(ModelLoadError, match="the final_norm site is refused"):
        arch.check(Site("final_norm", arch.n_layers))


def test_conformance_command_writes_exact_and_refused_rows(tmp_path):
    from neuronpatch.cli import main

    out = tmp_path / "conformance.md"
    assert main(["conformance", "--arch", "gpt2", "--arch", "bert", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| gpt2 | 34/34 |" in text
    assert "| bert | 0/1 |" in text and "not a causal attention decoder" in text
    assert "Cells off: 0." in text


def test_cache_budget_splits_batches_without_changing_a_number(tmp_path, model_dir):
    head = write_head(tmp_path / "h", model_dir, target_layer=0, target_neuron=3, feature_layer=-1)
    whole = run_experiment(head, TEXTS, scale=[0, 2], add=[1], device="cpu")
    # One input per prefix forward.
    split = run_experiment(head, TEXTS, scale=[0, 2], add=[1], device="cpu", kv_cache_bytes=1)
    assert whole.method == split.method == "kv"
    np.testing.assert_allclose(split.patched_prediction, whole.patched_prediction, rtol=1e-5, atol=1e-6)


def test_a_kv_pass_runs_no_block_after_the_one_the_head_reads(tmp_path):
    # The head reads block 1's output: no pass, prefix or rows, needs block 2 of 3.
    from neuronpatch.models import load_model

    path = tiny_model(tmp_path / "m", "gpt2")
    head = write_head(tmp_path / "h", path, target_layer=1, target_neuron=3, feature_layer=1)
    model = load_model(str(path), device="cpu")
    run_experiment(load_head(head), TEXTS, scale=[0, 2], model=model, method="kv")  # the growth check
    calls: list[int] = []
    hook = model.arch.mlp_out_proj[2].register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        kv = run_experiment(load_head(head), TEXTS, scale=[0, 2], model=model, method="kv")
    finally:
        hook.remove()
    assert kv.method == "kv" and calls == []
    full = run_experiment(load_head(head), TEXTS, scale=[0, 2], model=model, method="full")
    np.testing.assert_allclose(kv.patched_prediction, full.patched_prediction, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("arch", "dtype", "layer_type", "rises"), [
    ("gpt2", "float32", "post", True), ("gpt_neox", "float32", "post", True),
    ("llama", "float32", "post", True),
    ("llama", "bfloat16", "post", False),  # reduced precision keeps the patched block's own rounding
    ("llama", "float32", "resid_post", False), ("llama", "float32", "attn_out", False),  # not a neuron
    ("olmo2", "float32", "post", False),  # a norm between the MLP and the residual add
    ("granite", "float32", "post", False),  # the MLP's output scaled before the add (made 0.5 below)
])
def test_neuron_rows_rise_above_the_unit_block_only_where_its_write_is_the_projections(
        tmp_path, arch, dtype, layer_type, rises):
    # Folded kv rows of an MLP neuron start above the unit's block from its clean output plus
    # the output projection's response to the neuron's change. Whether that reproduces the
    # patched block is checked once per model: a norm after the MLP, or a scaled residual add,
    # fails it and the rows run the unit's block. Either way the predictions are HF's own.
    from neuronpatch import coordinates, engine
    from neuronpatch.models import load_model
    from tests.hf_oracle import Oracle, head_predict

    path = tiny_model(tmp_path / "m", arch)
    if arch == "granite":
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "residual_multiplier": 0.5}))
    head = write_head(tmp_path / "h", path, target_layer=1, target_neuron=3, feature_layer=-1,
                      layer_type=layer_type)
    model = load_model(str(path), device="cpu", dtype=dtype)
    grow = engine.growth(model, coordinates.plan(load_head(head).config, model), 3)
    assert grow is not None and grow.fold and grow.above is rises
    texts = TEXTS[:2]
    oracle = Oracle(path)
    cfg = {"head_type": "regression", "layer_type": layer_type, "target_layer": 1, "target_neuron": 3,
           "feature_layer": -1}
    # Patched at the read token, and at token 1, where the tokens after it see the patch.
    for position in ("last", 1):
        res = run_experiment(load_head(head), texts, scale=[0, 2], model=model, method="kv",
                             position=position)
        if dtype != "float32":
            continue  # (reduced precision against HF: tests/engine/test_precision.py)
        want = np.array([[head_predict(head, oracle.run(t, cfg=cfg, patch=(
            [len(oracle.ids(t)) - 1 if position == "last" else position], a, 0.0))[2]) for a in (0.0, 2.0)]
            for t in texts])
        np.testing.assert_allclose(res.patched_prediction, want, rtol=1e-5,
                                   atol=1e-5 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize(("arch", "grows"), [("gpt2", True), ("llama", True), ("bloom", False)])
@pytest.mark.parametrize("method", ["kv", "full"])
def test_blocks_below_the_unit_run_once_per_input(tmp_path, arch, grows, method):
    # Patched rows differ only from the unit's block on: below it each input runs once, and
    # the rows multiply at the unit's block. In kv the rows of an MLP neuron enter above the
    # unit's block (its clean output plus the neuron's write): the blocks up to the unit's
    # run only the clean pass over whole inputs, and the rows go on folded side by side, one
    # sequence per input. Of the last block the clean pass keeps only the cache. Bloom hands its
    # blocks an ALiBi table with heads folded into the batch, so the check refuses growth there
    # and every row runs every block.
    from neuronpatch.models import load_model

    path = tiny_model(tmp_path / "m", arch)
    head = write_head(tmp_path / "h", path, target_layer=1, target_neuron=3, feature_layer=-1)
    model = load_model(str(path), device="cpu")
    texts = TEXTS[:2]
    # The first run checks, once for this model and block, that growing reproduces plain rows.
    run_experiment(load_head(head), texts, scale=[0, 2, 3], device="cpu", model=model, method=method)
    # What each block really computes: its MLP's input (a replayed block never reaches it).
    seen: dict[int, set[tuple[int, int]]] = {0: set(), 1: set(), 2: set()}
    hooks = [model.arch.mlp_out_proj[i].register_forward_pre_hook(
        lambda mod, args, i=i: seen[i].add(tuple(args[0].shape[:2]))) for i in (0, 1, 2)]
    try:
        res = run_experiment(load_head(head), texts, scale=[0, 2, 3], device="cpu", model=model,
                             method=method)
    finally:
        for h in hooks:
            h.remove()
    rows = len(texts) * 4  # each input: a clean row and three patched ones
    assert res.method == method
    if method == "kv" and grows:
        longest = max(len(model.tokenizer(t)["input_ids"]) for t in texts)
        assert seen[0] == {(len(texts), longest)}  # the clean pass, nothing more
        # The unit's block: the clean pass, and its projection's response to a step of the neuron
        # (against zero) that the rows add to the block's clean output.
        assert seen[1] == {(len(texts), longest), (1 + 1, 1)}
        # The last block: the clean pass stops once it has stored its keys and values (the rows
        # read nothing else of it), so its MLP runs only for the four rows of one token, folded.
        assert seen[2] == {(len(texts), 4)}
    else:
        assert (max(b for b, _ in seen[0]) == len(texts)) is grows
        assert max(b for b, _ in seen[1]) == rows
    # The same rows with every row through every block (tests/engine/test_architectures.py holds the
    # grown routes against the HF reference on 14 architectures).
    plain = run_experiment(load_head(head), texts, scale=[0, 2, 3], device="cpu", model=model, method=method,
                           grow_rows=False)
    np.testing.assert_allclose(res.patched_prediction, plain.patched_prediction, rtol=1e-4, atol=1e-5)
