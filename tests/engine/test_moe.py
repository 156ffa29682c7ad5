"""Mixture-of-experts decoders: block-level units against HF run directly, and routing kept.

Mixtral (routed experts only), Qwen2-MoE (a gated shared expert beside the routed ones)
and OLMoE, tiny and with every parameter random (norm gains included). The sparse
block's output (``mlp_out``), attention's output and the residual stream are units as
in a dense model; every route that claims a case is forced and compared with
``tests/hf_oracle.py`` (HF input by input, plain forward hooks). A patch that changes a
later layer's expert choice keeps the model's own routing, and the engine's count of
such rows is checked against the routers' own outputs read by plain hooks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from neuronpatch import run_experiment
from neuronpatch.errors import ModelLoadError
from neuronpatch.interventions import Intervention
from neuronpatch.testing import tiny_model, write_head
from tests.engine.test_architectures import IVS, TEXTS, _reference
from tests.hf_oracle import ROUTERS, Oracle

MOE = ["mixtral", "qwen2_moe", "olmoe"]

# name: (head config, position, routes that must serve it)
CASES: dict[str, tuple[dict, str | int, tuple[str, ...]]] = {
    "tl-final-mlp_out": (dict(target_layer=1, layer_type="mlp_out", feature_layer=-1), "last",
                         ("auto", "kv", "full")),
    "tl-after-mlp_out": (dict(target_layer=1, layer_type="mlp_out", feature_layer=1), "last",
                         ("auto", "linear", "kv", "full")),
    "tl-attn_out-mlp-head": (dict(target_layer=1, layer_type="attn_out", feature_layer=2, hidden_dim=6,
                                  head_config={"activation": "relu", "output_scale": 1.7}), "last",
                             ("auto", "kv", "full")),
    "tl-resid_post-earlier": (dict(target_layer=0, layer_type="resid_post", feature_layer=-1), 1,
                              ("auto", "kv", "full")),
    "hf-resid_pre-classifier": (dict(target_layer=1, layer_type="resid_pre", feature_layer=-1,
                                     coordinates="hf", head_type="classification", n_classes=4,
                                     bin_edges=[-2.0, -0.5, 0.0, 0.5, 2.0]), -2, ("auto", "kv", "full")),
    "token-mlp_out": (dict(target_layer=0, layer_type="mlp_out", head_type="token"), "last",
                      ("auto", "kv", "full")),
    "tl-all-positions-mlp_out": (dict(target_layer=1, layer_type="mlp_out", feature_layer=-1), "all",
                                 ("auto", "full")),
    "tl-upstream-mlp_out": (dict(target_layer=2, layer_type="mlp_out", feature_layer=1), "last",
                            ("auto", "upstream", "kv")),
}


@pytest.fixture(scope="module", params=MOE)
def moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Oracle]:
    path = tiny_model(tmp_path_factory.mktemp(request.param) / "model", request.param)
    return path, Oracle(path)


def test_tiny_models_are_sparse_and_fully_random(moe: tuple[Path, Oracle]) -> None:
    _, oracle = moe
    model = oracle.model
    names = [n for n, _ in model.named_parameters()]
    assert any("experts" in n for n in names), "the tiny model must have experts"
    if oracle.type == "qwen2_moe":
        assert any("shared_expert" in n for n in names)
    for name, p in model.named_parameters():
        assert not torch.all(p == 0) and not torch.all(p == 1), f"{name} is not random"


@pytest.mark.parametrize("case", sorted(CASES))
def test_moe_block_units_match_the_hf_reference(moe: tuple[Path, Oracle], case: str, tmp_path: Path) -> None:
    model_dir, oracle = moe
    cfg, position, routes = CASES[case]
    cfg = dict(cfg)
    head_kw = {k: cfg.pop(k) for k in ("hidden_dim", "n_classes", "head_type") if k in cfg}
    head = write_head(tmp_path / "head", model_dir, target_neuron=5, seed=3, **head_kw, **cfg)
    full_cfg = {**cfg, **{k: v for k, v in head_kw.items() if k == "head_type"}}
    want = _reference(oracle, head, full_cfg, position, IVS)
    scale = max(1.0, float(np.abs(want[3]).max()))
    for route in routes:
        res = run_experiment(head, TEXTS, interventions=IVS, position=position, method=route, device="cpu")
        got = (res.clean_activation, res.clean_prediction, res.patched_activation, res.patched_prediction)
        for name, g, w in zip(("clean activation", "clean prediction", "activation", "prediction"),
                              got, want, strict=True):
            err = float(np.abs(np.asarray(g) - w).max())
            assert err <= 1e-5 * max(scale, float(np.abs(w).max())), (
                f"{case} route {route} ({res.method}): {name} off by {err:.3g}")


def test_a_moe_layers_dense_neurons_are_refused_by_name(moe: tuple[Path, Oracle], tmp_path: Path) -> None:
    model_dir, _ = moe
    head = write_head(tmp_path / "head", model_dir, target_layer=1, target_neuron=5, layer_type="post")
    with pytest.raises(ModelLoadError, match=r"mixture of experts.*mlp_out"):
        run_experiment(head, TEXTS[:1], set=[1.0], device="cpu")


def _oracle_rerouted(oracle: Oracle, text: str, layer: int, neuron: int, value: float) -> bool:
    """Whether setting resid_post ``layer``:``neuron`` at the last token changes a later router's choice.

    Plain forward hooks: one on block ``layer`` sets the unit, one on each later block's
    router keeps its chosen experts (its own output), compared with a clean run.
    """
    ids = torch.tensor([oracle.ids(text)])
    n = ids.shape[1]

    def run(patch: bool) -> list[torch.Tensor]:
        chosen: list[torch.Tensor] = []
        hooks = []
        if patch:
            def edit(m: object, a: object, out: object) -> object:
                t = (out[0] if isinstance(out, tuple) else out).clone()
                t[0, n - 1, neuron] = value
                return (t, *out[1:]) if isinstance(out, tuple) else t
            hooks.append(oracle.blocks[layer].register_forward_hook(edit))
        for block in list(oracle.blocks)[layer + 1:]:
            router = block.get_submodule(ROUTERS[oracle.type])
            hooks.append(router.register_forward_hook(
                lambda m, a, out: chosen.append(out[2].reshape(n, -1)[n - 1].sort().values)))
        try:
            with torch.no_grad():
                oracle.model(ids)
        finally:
            for h in hooks:
                h.remove()
        return chosen

    return any(not torch.equal(c, p) for c, p in zip(run(False), run(True), strict=True))


def test_a_patch_that_reroutes_later_layers_is_kept_and_counted(moe: tuple[Path, Oracle],
                                                                tmp_path: Path) -> None:
    """Setting a residual unit far off its range flips later routing; the numbers stay exact."""
    model_dir, oracle = moe
    cfg = dict(target_layer=0, layer_type="resid_post", feature_layer=-1)
    head = write_head(tmp_path / "head", model_dir, target_neuron=5, seed=3, **cfg)
    ivs = (Intervention("set", 40.0), Intervention("scale", 1.0))
    want = _reference(oracle, head, {**cfg, "head_type": "regression"}, "last", ivs)
    flips = sum(_oracle_rerouted(oracle, t, 0, 5, 40.0) for t in TEXTS)
    assert flips > 0, "the test needs a patch that changes a later layer's routing"
    for route in ("kv", "full"):
        res = run_experiment(head, TEXTS, interventions=ivs, method=route, device="cpu")
        scale = max(1.0, float(np.abs(want[3]).max()))
        err = float(np.abs(res.patched_prediction - want[3]).max())
        assert err <= 1e-5 * scale, f"route {route}: prediction off by {err:.3g}"
        note = next(x for x in res.notes if x.startswith("routing:"))
        # The identity rows (scale 1) never reroute; the set rows reroute where the oracle saw it.
        assert note.startswith(f"routing: {flips} of {2 * len(TEXTS)} patched rows"), note


def test_a_patch_after_every_router_reports_no_rerouting(tmp_path: Path) -> None:
    model_dir = tiny_model(tmp_path / "model", "mixtral")
    head = write_head(tmp_path / "head", model_dir, target_layer=2, target_neuron=5,
                      layer_type="resid_post", feature_layer=-1)
    res = run_experiment(head, TEXTS, set=[40.0], method="kv", device="cpu")
    assert not any(x.startswith("routing:") for x in res.notes), res.notes
