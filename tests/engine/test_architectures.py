"""The engine against an independent reference, on tiny random models of 14 architectures.

Every parameter of every model is random, norm gains and biases included. For
each case, every route that claims it is forced in turn and each prediction is
compared with ``tests/hf_oracle.py`` (HF run input by input, plain forward
hooks, the centring identities written out by hand).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from neuronpatch import run_experiment
from neuronpatch.errors import InputError
from neuronpatch.interventions import Intervention
from neuronpatch.testing import ARCHITECTURES, tiny_model, write_head
from tests.hf_oracle import Oracle, head_predict

ARCHS = list(ARCHITECTURES)
TEXTS = ["The cat sat on the mat today.", "Numbers 3 4 5 and more", "A quick one",
         "Transformers use attention mechanisms to process long sequences."]
# Architectures whose MLP output passes through a norm before the residual add.
NONLINEAR_WRITE = {"gemma2"}


def arch_type(model_dir: Path) -> str:
    import json

    return json.loads((model_dir / "config.json").read_text())["model_type"]


IVS = (Intervention("scale", 0.0), Intervention("scale", 2.5), Intervention("set", 1.5),
       Intervention("add", -0.75))

# name: (head config, position, routes that must serve it)
CASES: dict[str, tuple[dict, str | int, tuple[str, ...]]] = {
    "tl-final-post": (dict(target_layer=1, layer_type="post", feature_layer=-1), "last",
                      ("auto", "kv", "full")),
    "tl-after-post": (dict(target_layer=1, layer_type="post", feature_layer=1), "last",
                      ("auto", "linear", "kv", "full")),
    "tl-after-mlp_out-relu": (dict(target_layer=1, layer_type="mlp_out", feature_layer=1, hidden_dim=6,
                                   head_config={"activation": "relu", "output_scale": 1.7}), "last",
                              ("auto", "kv", "full")),
    "tl-resid_post-silu-earlier": (dict(target_layer=0, layer_type="resid_post", feature_layer=-1,
                                        hidden_dim=5, head_config={"activation": "silu"}), 1,
                                   ("auto", "kv", "full")),
    "tl-attn_out-classifier-neg": (dict(target_layer=1, layer_type="attn_out", feature_layer=2,
                                        head_type="classification", n_classes=4,
                                        bin_edges=[-2.0, -0.5, 0.0, 0.5, 2.0]), -2, ("auto", "kv", "full")),
    "tl-upstream": (dict(target_layer=2, layer_type="post", feature_layer=1), "last",
                    ("auto", "upstream", "kv")),
    "hf-final-norm": (dict(target_layer=1, layer_type="post", feature_layer=-1, coordinates="hf"), "last",
                      ("auto", "kv", "full")),
    "hf-mid-mlp_out": (dict(target_layer=0, layer_type="mlp_out", feature_layer=2, coordinates="hf"), "last",
                       ("auto", "kv", "full")),
    "token": (dict(target_layer=1, layer_type="post", head_type="token", activation_mean=0.3,
                   activation_std=0.8), "last", ("auto", "kv", "full")),
    "tl-all-positions": (dict(target_layer=1, layer_type="post", feature_layer=-1), "all", ("auto", "full")),
}


@pytest.fixture(scope="module", params=ARCHS)
def arch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Oracle]:
    path = tiny_model(tmp_path_factory.mktemp(request.param) / "model", request.param)
    return path, Oracle(path)


def _reference(oracle: Oracle, head: Path, cfg: dict, position: str | int, ivs: tuple) -> tuple:
    digits = oracle.digit_ids() if cfg.get("head_type") == "token" else None
    full_cfg = {"head_type": "regression", "layer_type": "post", **cfg, "target_neuron": 5}
    clean_a, clean_p, act, pred = [], [], [], []
    for text in TEXTS:
        n = len(oracle.ids(text))
        read = n - 1
        pos = list(range(n)) if position == "all" else [read if position == "last" else position % n]
        c, _, f = oracle.run(text, cfg=full_cfg, patch=(pos, 1.0, 0.0))
        clean_a.append(c)
        clean_p.append(head_predict(head, f, digits))
        row_a, row_p = [], []
        for iv in ivs:
            alpha, beta = iv.affine()
            _, pa, pf = oracle.run(text, cfg=full_cfg, patch=(pos, alpha, beta))
            row_a.append(pa)
            row_p.append(head_predict(head, pf, digits))
        act.append(row_a)
        pred.append(row_p)
    return np.array(clean_a), np.array(clean_p), np.array(act), np.array(pred)


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_route_matches_the_hf_reference(arch: tuple[Path, Oracle], case: str, tmp_path: Path) -> None:
    model_dir, oracle = arch
    cfg, position, routes = CASES[case]
    cfg = dict(cfg)
    head_kw = {k: cfg.pop(k) for k in ("hidden_dim", "n_classes", "head_type") if k in cfg}
    head = write_head(tmp_path / "head", model_dir, target_neuron=5, seed=3, **head_kw, **cfg)
    full_cfg = {**cfg, **{k: v for k, v in head_kw.items() if k == "head_type"}}
    want = _reference(oracle, head, full_cfg, position, IVS)
    scale = max(1.0, float(np.abs(want[3]).max()))
    for route in routes:
        if route == "linear" and arch_type(model_dir) in NONLINEAR_WRITE:
            # A norm after the MLP: the linear shortcut must refuse to serve, not answer wrongly.
            with pytest.raises(InputError, match="does not hold for this model"):
                run_experiment(head, TEXTS, interventions=IVS, position=position, method=route,
                               device="cpu")
            continue
        res = run_experiment(head, TEXTS, interventions=IVS, position=position, method=route, device="cpu")
        got = (res.clean_activation, res.clean_prediction, res.patched_activation, res.patched_prediction)
        for name, g, w in zip(("clean activation", "clean prediction", "activation", "prediction"),
                              got, want, strict=True):
            err = float(np.abs(np.asarray(g) - w).max())
            assert err <= 1e-5 * max(scale, float(np.abs(w).max())), (
                f"{case} route {route} ({res.method}): {name} off by {err:.3g}")
