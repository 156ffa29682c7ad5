"""Dictionary latents as units, against an independent reference.

The reference is ``tests/hf_oracle.py`` (the HF model run input by input with its own
forward hooks) with each SAE's encoder written out below from SAELens' definitions, not
from neuronpatch's code: the latent's value is the encoding of the hooked tensor (centred
in transformer_lens coordinates of a LayerNorm model), and a patch adds the change times
the latent's decoder row. Every parameter of model and dictionary is random.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from neuronpatch import run_experiment
from neuronpatch.errors import HeadConfigError
from neuronpatch.interventions import Intervention
from neuronpatch.testing import tiny_model, write_head, write_sae
from tests.hf_oracle import Oracle, head_predict

ARCHS = ("gpt2", "gpt_neox", "llama")
TEXTS = ["The cat sat on the mat today.", "Numbers 3 4 5 and more", "A quick one",
         "Transformers use attention mechanisms to process long sequences."]
IVS = (Intervention("scale", 0.0), Intervention("scale", 2.5), Intervention("set", 1.5),
       Intervention("add", -0.75))
LATENT = 3

# name: (architecture, hook, oracle layer_type, head config, routes)
CASES: dict[str, tuple[str, str, str, dict, tuple[str, ...]]] = {
    "standard-resid_pre": ("standard", "blocks.1.hook_resid_pre", "resid_pre",
                           dict(feature_layer=-1), ("auto", "kv", "full")),
    "gated-resid_post-mlp-head": ("gated", "blocks.0.hook_resid_post", "resid_post",
                                  dict(feature_layer=-1, hidden_dim=5), ("auto", "kv", "full")),
    "jumprelu-mlp_out": ("jumprelu", "blocks.1.hook_mlp_out", "mlp_out", dict(feature_layer=2),
                         ("auto", "kv", "full")),
    "topk-attn_out-hf": ("topk", "blocks.1.hook_attn_out", "attn_out",
                         dict(feature_layer=-1, coordinates="hf"), ("auto", "kv", "full")),
    "jumprelu-resid_post-linear": ("jumprelu", "blocks.1.hook_resid_post", "resid_post",
                                   dict(feature_layer=1), ("auto", "linear", "kv")),
    "transcoder-mlp": ("jumprelu_transcoder", "blocks.1.mlp.hook_in", "mlp_out", dict(feature_layer=-1),
                       ("auto", "kv", "full")),
    "transcoder-linear": ("transcoder", "blocks.1.mlp.hook_in", "mlp_out", dict(feature_layer=1),
                          ("auto", "linear", "kv")),
    # The skip connection is part of the transcoder's reconstruction, kept with its error.
    "skip_transcoder-mlp-mid": ("skip_transcoder", "blocks.0.mlp.hook_in", "mlp_out",
                                dict(feature_layer=1, hidden_dim=4), ("auto", "kv", "full")),
}


def encoder(sae: Path, i: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Latent ``i`` of ``x [n, d_in]``, written out from SAELens' definitions."""
    cfg = json.loads((sae / "cfg.json").read_text())
    w = load_file(str(sae / "sae_weights.safetensors"))
    arch = cfg["architecture"]

    def f(x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if cfg.get("apply_b_dec_to_input") and "transcoder" not in arch:
            x = x - w["b_dec"]
        if arch == "gated":
            gate = x @ w["W_enc"] + w["b_gate"]
            mag = x @ (w["W_enc"] * torch.exp(w["r_mag"])) + w["b_mag"]
            acts = (gate > 0).float() * torch.relu(mag)
        else:
            pre = x @ w["W_enc"] + w["b_enc"]
            if arch in ("standard", "transcoder", "skip_transcoder"):
                acts = torch.relu(pre)
            elif arch in ("jumprelu", "jumprelu_transcoder"):
                acts = torch.relu(pre) * (pre > w["threshold"]).float()
            else:  # topk: the k largest pre-activations, through a ReLU; the rest 0
                vals, idx = pre.topk(cfg["k"], dim=-1)
                acts = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        return acts[:, i]

    return f


def reference(oracle: Oracle, head: Path, sae: Path, cfg: dict, ivs: tuple, every: bool = False,
              mean: float = 0.0) -> tuple:
    w = load_file(str(sae / "sae_weights.safetensors"))["W_dec"][LATENT]
    transcoder = "transcoder" in json.loads((sae / "cfg.json").read_text())["architecture"]
    latent = (encoder(sae, LATENT), w, transcoder)
    clean_a, clean_p, act, pred = [], [], [], []
    for text in TEXTS:
        read = len(oracle.ids(text)) - 1
        where = list(range(read + 1)) if every else [read]
        c, _, f = oracle.run(text, cfg=cfg, patch=(where, 1.0, 0.0), latent=latent)
        clean_a.append(c)
        clean_p.append(head_predict(head, f))
        row_a, row_p = [], []
        for iv in ivs:
            alpha, beta = iv.affine(mean)
            _, pa, pf = oracle.run(text, cfg=cfg, patch=(where, alpha, beta), latent=latent)
            row_a.append(pa)
            row_p.append(head_predict(head, pf))
        act.append(row_a)
        pred.append(row_p)
    return np.array(clean_a), np.array(clean_p), np.array(act), np.array(pred)


@pytest.fixture(scope="module", params=ARCHS)
def arch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Oracle]:
    path = tiny_model(tmp_path_factory.mktemp(request.param) / "model", request.param)
    return path, Oracle(path)


def _d_model(model_dir: Path) -> int:
    m = json.loads((model_dir / "config.json").read_text())
    return int(m.get("n_embd") or m.get("hidden_size"))


def _setup(tmp: Path, model_dir: Path, case: str) -> tuple[Path, Path, dict]:
    sae_arch, hook, lt, head_cfg, _ = CASES[case]
    d = _d_model(model_dir)
    layer = int(hook.split(".")[1])
    out = f"blocks.{layer}.hook_mlp_out" if "transcoder" in sae_arch else None
    sae = write_sae(tmp / "sae", hook_name=hook, d_in=d, architecture=sae_arch, hook_name_out=out, seed=7,
                    alive=(LATENT,))
    head_cfg = dict(head_cfg)
    hidden = head_cfg.pop("hidden_dim", None)
    head = write_head(tmp / "head", model_dir, target_layer=layer, target_neuron=LATENT, layer_type="sae",
                      sae="../sae", hidden_dim=hidden, seed=3, **head_cfg)
    ocfg = {"head_type": "regression", "target_layer": layer, "target_neuron": LATENT, "layer_type": lt,
            **head_cfg}
    return sae, head, ocfg


@pytest.mark.parametrize("case", sorted(CASES))
def test_latents_match_the_hf_reference(arch: tuple[Path, Oracle], case: str, tmp_path: Path) -> None:
    model_dir, oracle = arch
    sae, head, ocfg = _setup(tmp_path, model_dir, case)
    want = reference(oracle, head, sae, ocfg, IVS)
    assert (want[0] > 0).any(), "the test latent should fire on some input"
    scale = max(1.0, float(np.abs(want[3]).max()))
    for route in CASES[case][4]:
        res = run_experiment(head, TEXTS, interventions=IVS, method=route, device="cpu")
        if route != "auto":
            assert res.method == route
        got = (res.clean_activation, res.clean_prediction, res.patched_activation, res.patched_prediction)
        for name, g, w in zip(("clean latent", "clean prediction", "latent", "prediction"), got, want,
                              strict=True):
            err = float(np.abs(np.asarray(g) - w).max())
            assert err <= 1e-5 * max(scale, float(np.abs(w).max())), (
                f"{case} route {route} ({res.method}): {name} off by {err:.3g}")


@pytest.mark.parametrize("case", ["jumprelu-mlp_out", "transcoder-mlp"])
def test_every_position_patched(arch: tuple[Path, Oracle], case: str, tmp_path: Path) -> None:
    model_dir, oracle = arch
    sae, head, ocfg = _setup(tmp_path, model_dir, case)
    want = reference(oracle, head, sae, ocfg, IVS, every=True)
    res = run_experiment(head, TEXTS, interventions=IVS, position="all", device="cpu")
    assert res.method == "full"
    scale = max(1.0, float(np.abs(want[3]).max()))
    got = (res.clean_activation, res.clean_prediction, res.patched_activation, res.patched_prediction)
    for g, w in zip(got, want, strict=True):
        assert float(np.abs(np.asarray(g) - w).max()) <= 1e-5 * scale


@pytest.mark.parametrize("case", ["gated-resid_post-mlp-head", "topk-attn_out-hf"])
def test_zero_and_mean_ablation(arch: tuple[Path, Oracle], case: str, tmp_path: Path) -> None:
    """Mean ablation sets the latent to its mean over the inputs (of the clean latent, here)."""
    model_dir, oracle = arch
    sae, head, ocfg = _setup(tmp_path, model_dir, case)
    ivs = (Intervention("zero"), Intervention("mean"))
    clean = reference(oracle, head, sae, ocfg, ())[0]
    want = reference(oracle, head, sae, ocfg, ivs, mean=float(np.mean(clean)))
    res = run_experiment(head, TEXTS, interventions=ivs, device="cpu")
    scale = max(1.0, float(np.abs(want[3]).max()))
    got = (res.clean_activation, res.clean_prediction, res.patched_activation, res.patched_prediction)
    for g, w in zip(got, want, strict=True):
        assert float(np.abs(np.asarray(g) - w).max()) <= 1e-5 * scale


def test_unpatched_run_is_exactly_the_models_own(arch: tuple[Path, Oracle], tmp_path: Path) -> None:
    """The error term: with the latent patched to its own value, the features are the clean ones."""
    model_dir, oracle = arch
    _sae, head, ocfg = _setup(tmp_path, model_dir, "standard-resid_pre")
    res = run_experiment(head, TEXTS, scale=[1.0], add=[0.0], method="full", device="cpu")
    np.testing.assert_array_equal(res.patched_prediction, np.repeat(res.clean_prediction[:, None], 2, 1))
    # ... and the clean prediction is the unpatched model's (the HF run without any hook).
    for i, text in enumerate(TEXTS):
        _, _, f = oracle.run(text, cfg={**ocfg, "layer_type": "resid_pre"})
        want = head_predict(head, f)
        assert abs(want - res.clean_prediction[i]) <= 1e-5 * max(1.0, abs(want))


def test_an_inactive_latent_under_scale_says_so(tmp_path: Path) -> None:
    model_dir = tiny_model(tmp_path / "model", "gpt2")
    sae = write_sae(tmp_path / "sae", hook_name="blocks.1.hook_resid_pre", d_in=32, dead=(LATENT,))
    head = write_head(tmp_path / "head", model_dir, target_layer=1, target_neuron=LATENT, layer_type="sae",
                      sae=str(sae), feature_layer=-1)
    res = run_experiment(head, TEXTS, scale=[0.0, 2.0], device="cpu")
    assert res.active_inputs == 0
    text = "\n".join(res.interpretation())
    assert "active on 0 of 4 inputs" in text and "cannot" in text
    assert "ignores" not in text
    # Set can move it: the slope is then measured.
    res = run_experiment(head, TEXTS, set=[0.0, 1.0, 2.0], device="cpu")
    assert res.active_inputs == 0 and np.isfinite(res.slope) and res.slope != 0


def test_bad_dictionaries_are_refused_by_name(tmp_path: Path) -> None:
    model_dir = tiny_model(tmp_path / "model", "gpt2")
    sae = write_sae(tmp_path / "sae", hook_name="blocks.1.hook_resid_pre", d_in=32)
    cfg_path = sae / "cfg.json"
    good = json.loads(cfg_path.read_text())

    def head_with(**change: object) -> str:
        cfg_path.write_text(json.dumps({**good, **change}))
        with pytest.raises(HeadConfigError) as e:
            h = write_head(tmp_path / "head", model_dir, target_layer=1, target_neuron=LATENT,
                           layer_type="sae", sae=str(sae))
            run_experiment(h, TEXTS[:1], set=[1.0], device="cpu")
        return str(e.value)

    assert "'architecture' = 'crosscoder'" in head_with(architecture="crosscoder")
    assert "ln2.hook_normalized" in head_with(hook_name="blocks.1.ln2.hook_normalized")
    assert "'normalize_activations'" in head_with(normalize_activations="layer_norm")
    assert "'d_in' = 31" in head_with(d_in=31)
    cfg_path.write_text(json.dumps(good))
    with pytest.raises(HeadConfigError, match="'target_layer' = 0"):
        h = write_head(tmp_path / "head2", model_dir, target_layer=0, target_neuron=1, layer_type="sae",
                       sae=str(sae))
        run_experiment(h, TEXTS[:1], set=[1.0], device="cpu")


def _oracle_slope(oracle: Oracle, head: Path, sae: Path, ocfg: dict, latent: int, ivs: tuple) -> float:
    w = load_file(str(sae / "sae_weights.safetensors"))["W_dec"][latent]
    transcoder = "transcoder" in json.loads((sae / "cfg.json").read_text())["architecture"]
    spec = (encoder(sae, latent), w, transcoder)
    xs, ys = [], []
    for text in TEXTS:
        read = len(oracle.ids(text)) - 1
        c, _, f = oracle.run(text, cfg=ocfg, patch=([read], 1.0, 0.0), latent=spec)
        p0 = head_predict(head, f)
        for iv in ivs:
            alpha, beta = iv.affine()
            _, pa, pf = oracle.run(text, cfg=ocfg, patch=([read], alpha, beta), latent=spec)
            xs.append(pa - c)
            ys.append(head_predict(head, pf) - p0)
    x, y = np.array(xs), np.array(ys)
    x0 = x - x.mean()
    return float(x0 @ (y - y.mean()) / (x0 @ x0))


@pytest.mark.parametrize("case", ["jumprelu-resid_post-linear", "transcoder-mlp"])
def test_rank_over_latents_matches_patching_each(case: str, tmp_path: Path) -> None:
    """Every latent's slope in the ranking is the slope of patching it alone (the HF reference)."""
    from neuronpatch.rank import rank_units

    model_dir = tiny_model(tmp_path / "model", "gpt2")
    oracle = Oracle(model_dir)
    sae, head, ocfg = _setup(tmp_path, model_dir, case)
    ivs = (Intervention("set", 0.0), Intervention("set", 2.0))
    res = rank_units(head, TEXTS, interventions=ivs, top=16, device="cpu")
    assert res.method == ("exact" if case.endswith("linear") else "screen")
    assert res.target == LATENT and len(res.exact_slope) == 16 and bool(res.patched.all())
    for i in range(16):
        want = _oracle_slope(oracle, head, sae, ocfg, i, ivs)
        assert abs(res.exact_slope[i] - want) <= 1e-4 * max(1.0, abs(want)), (i, res.exact_slope[i], want)
    order = sorted(range(16), key=lambda i: -abs(res.exact_slope[i]))
    assert res.target_rank == 1 + sum(abs(res.exact_slope[i]) > abs(res.exact_slope[LATENT]) for i in order)


def test_controls_draw_active_latents_and_match_patching_each(tmp_path: Path) -> None:
    model_dir = tiny_model(tmp_path / "model", "gpt2")
    oracle = Oracle(model_dir)
    sae, head, ocfg = _setup(tmp_path, model_dir, "standard-resid_pre")
    ivs = (Intervention("set", 0.0), Intervention("add", 1.0))
    res = run_experiment(head, TEXTS, interventions=ivs, controls={"units": {"random": 3, "seed": 1}},
                         device="cpu")
    assert res.controls is not None
    active = set()
    for i in range(16):
        f = encoder(sae, i)
        for text in TEXTS:
            read = len(oracle.ids(text)) - 1
            c, _, _ = oracle.run(text, cfg=ocfg, patch=([read], 1.0, 0.0), latent=(f, torch.zeros(32), False))
            if c != 0:
                active.add(i)
    drawn = list(res.controls.units)
    assert len(drawn) == 3 and LATENT not in drawn
    assert set(drawn) <= active or active - {LATENT} <= set(drawn)
    for c in res.controls.controls:
        assert c.unit is not None
        want = _oracle_slope(oracle, head, sae, ocfg, c.unit, ivs)
        assert abs(c.slope - want) <= 1e-4 * max(1.0, abs(want)), (c.unit, c.slope, want)
