"""State-space and hybrid decoders: residual units and MLP neurons through the ``full`` route.

Mamba (no attention, no MLP), Jamba and Bamba (Mamba and attention layers, with MLPs),
Falcon-H1 (Mamba and attention side by side in every block), Nemotron-H (one mixer per
block) and Qwen3-Next (gated delta-rule linear attention, experts), tiny and fully
random. Their caches cannot continue a left-padded prefix, so ``kv`` is refused by name
and ``auto`` takes ``full``: the model's own forward, every row from the start. The
reference is HF run input by input with plain forward hooks on HF modules, features
read from a hook on the feature block (Mamba's ``hidden_states`` have no embeddings
entry, so nothing here indexes them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from neuronpatch import run_experiment
from neuronpatch.errors import InputError, ModelLoadError
from neuronpatch.interventions import Intervention
from neuronpatch.testing import tiny_model, write_head
from tests.hf_oracle import head_predict

# model_type -> (blocks, {block index: the MLP output projection in that block})
TABLE: dict[str, tuple[str, dict[int, str]]] = {
    "mamba": ("backbone.layers", {}),
    "jamba": ("model.layers", {0: "feed_forward.down_proj", 2: "feed_forward.down_proj"}),
    "bamba": ("model.layers", {1: "feed_forward.down_proj"}),
    "falcon_h1": ("model.layers", {1: "feed_forward.down_proj"}),
    "nemotron_h": ("model.layers", {}),
    "qwen3_next": ("model.layers", {}),
}
TEXTS = ["The cat sat on the mat today.", "Numbers 3 4 5 and more", "A quick one",
         "Transformers use attention mechanisms to process long sequences."]
IVS = (Intervention("scale", 0.0), Intervention("scale", 2.5), Intervention("set", 1.5),
       Intervention("add", -0.75))


class Reference:
    """One model, input by input, the unit patched and the features read by plain hooks."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.type = self.model.config.model_type
        self.blocks = self.model.get_submodule(TABLE[self.type][0])

    def predict(self, head: Path, text: str, cfg: dict[str, Any], affine: tuple[float, float]) -> float:
        ids = torch.tensor([list(self.tok(text)["input_ids"])])
        n = ids.shape[1]
        layer, lt = cfg["target_layer"], cfg["layer_type"]
        block = self.blocks[layer]

        def edit(t: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            c = t[0, n - 1, 5]
            t[0, n - 1, 5] = affine[0] * c + affine[1]
            return t

        if lt == "resid_post":
            h = block.register_forward_hook(
                lambda m, a, o: (edit(o[0]), *o[1:]) if isinstance(o, tuple) else edit(o))
        else:
            module = block if lt == "resid_pre" else block.get_submodule(TABLE[self.type][1][layer])

            def pre(m: Any, args: Any, kwargs: Any) -> Any:
                if args:
                    return (edit(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}
            h = module.register_forward_pre_hook(pre, with_kwargs=True)
        seen: dict[str, torch.Tensor] = {}
        fl = cfg.get("feature_layer", -1) % len(self.blocks)
        h2 = self.blocks[fl].register_forward_hook(
            lambda m, a, o: seen.__setitem__("x", (o[0] if isinstance(o, tuple) else o).detach()))
        try:
            with torch.no_grad():
                out = self.model(ids)
        finally:
            h.remove()
            h2.remove()
        if cfg.get("head_type") == "token":
            digits = [self.tok.encode(str(i))[-1] for i in range(10)]
            return head_predict(head, out.logits[0, n - 1].float(), digits)
        return head_predict(head, seen["x"][0, n - 1].float())


@pytest.fixture(scope="module", params=sorted(TABLE))
def hybrid(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Reference]:
    path = tiny_model(tmp_path_factory.mktemp(request.param) / "model", request.param)
    return path, Reference(path)


def _cases(model_type: str) -> dict[str, dict[str, Any]]:
    cases: dict[str, dict[str, Any]] = {
        "resid_post": dict(target_layer=1, layer_type="resid_post", feature_layer=2),
        "resid_pre-token": dict(target_layer=1, layer_type="resid_pre", head_type="token"),
    }
    for layer in TABLE[model_type][1]:
        cases[f"post-{layer}"] = dict(target_layer=layer, layer_type="post", feature_layer=-1, hidden_dim=5)
    return cases


def test_residual_units_and_mlp_neurons_match_hf(hybrid: tuple[Path, Reference], tmp_path: Path) -> None:
    model_dir, ref = hybrid
    for name, cfg in _cases(ref.type).items():
        cfg = dict(cfg)
        kw = {k: cfg.pop(k) for k in ("hidden_dim", "head_type") if k in cfg}
        head = write_head(tmp_path / name, model_dir, target_neuron=5, seed=3, **kw, **cfg)
        full_cfg = {**cfg, **{k: v for k, v in kw.items() if k == "head_type"}}
        clean = np.array([ref.predict(head, t, full_cfg, (1.0, 0.0)) for t in TEXTS])
        want = np.array([[ref.predict(head, t, full_cfg, iv.affine()) for iv in IVS] for t in TEXTS])
        scale = max(1.0, float(np.abs(want).max()))
        for route in ("auto", "full"):
            res = run_experiment(head, TEXTS, interventions=IVS, method=route, device="cpu")
            assert res.method in ("full", "linear"), (name, res.method)  # never kv
            for what, got, w in (("clean", res.clean_prediction, clean),
                                 ("patched", res.patched_prediction, want)):
                err = float(np.abs(got - w).max())
                assert err <= 1e-5 * scale, f"{ref.type} {name} {route}: {what} prediction off by {err:.3g}"


def test_kv_is_refused_by_name_where_the_cache_cannot_continue(hybrid: tuple[Path, Reference],
                                                                tmp_path: Path) -> None:
    model_dir, _ = hybrid
    head = write_head(tmp_path / "h", model_dir, target_layer=1, target_neuron=5, layer_type="resid_post")
    with pytest.raises(InputError, match=r"route 'kv' cannot serve \w+ForCausalLM: its cache"):
        run_experiment(head, TEXTS[:2], set=[1.0], method="kv", device="cpu")


def test_units_a_block_does_not_have_are_refused_by_name(tmp_path: Path) -> None:
    model_dir = tiny_model(tmp_path / "mamba", "mamba")
    for layer_type, match in (("post", "MambaForCausalLM.*MLP"), ("mlp_out", "block 1 has no mlp_write site"),
                              ("attn_out", "block 1 has no attn_write site")):
        head = write_head(tmp_path / layer_type, model_dir, target_layer=1, target_neuron=5,
                          layer_type=layer_type)
        with pytest.raises(ModelLoadError, match=match):
            run_experiment(head, TEXTS[:1], set=[1.0], device="cpu")
    head = write_head(tmp_path / "hf", model_dir, target_layer=1, target_neuron=5, layer_type="resid_post",
                      feature_layer=2, coordinates="hf")
    with pytest.raises(ModelLoadError, match="hf coordinates are refused"):
        run_experiment(head, TEXTS[:1], set=[1.0], device="cpu")
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "mamba"


def test_a_model_whose_padding_leaks_is_refused_by_name(tmp_path: Path) -> None:
    """RWKV runs left padding into its recurrent state: every unit is refused, never served wrong."""
    model_dir = tiny_model(tmp_path / "rwkv", "rwkv")
    head = write_head(tmp_path / "h", model_dir, target_layer=1, target_neuron=5, layer_type="resid_post")
    with pytest.raises(ModelLoadError, match="left-padded batch does not give each input's own numbers"):
        run_experiment(head, TEXTS[:1], set=[1.0], device="cpu")
