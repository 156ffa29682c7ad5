"""Ranking every unit of a layer, against the independent HF reference (tests/hf_oracle.py).

Every slope here is compared with the oracle patching that one unit alone (HF run
input by input, plain forward hooks, the centring identities written by hand), or
with a number computed from the weight files. Models are tiny and random in every
parameter (norm gains and biases included).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import neuronpatch.rank  # noqa: F401  (imported outside pytester's in-process runs, see conftest)
from neuronpatch import rank_units
from neuronpatch.cli import main
from neuronpatch.errors import InputError
from neuronpatch.testing import tiny_gpt2, tiny_model, write_head
from tests.hf_oracle import Oracle, head_predict

pytest_plugins = ["pytester"]

TEXTS = ["The cat sat on the mat today.", "Numbers 3 4 5 and more", "A quick one"]
SCALES = (0.0, 2.0)  # the ranking's default interventions: scale 0 and scale 2
ARCHS = ["gpt2", "gpt_neox", "llama"]


@pytest.fixture(scope="module", params=ARCHS)
def arch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Oracle]:
    path = tiny_model(tmp_path_factory.mktemp(request.param) / "model", request.param)
    return path, Oracle(path)


def _ols_slope(x: list[float], y: list[float]) -> float:
    xa, ya = np.asarray(x) - np.mean(x), np.asarray(y) - np.mean(y)
    return float(xa @ ya / (xa @ xa))


class Slope(float):
    """An oracle slope that knows its float32 noise: prediction noise over the activation change."""

    noise: float


def oracle_slope(oracle: Oracle, head: Path, cfg: dict, unit: int, texts: list[str] = TEXTS) -> Slope:
    """The slope of patching ``unit`` alone (scale 0 and 2 at the read token), by the oracle."""
    cfg = {**cfg, "target_neuron": unit}
    digits = oracle.digit_ids() if cfg["head_type"] == "token" else None
    xs, ys, preds = [], [], []
    for text in texts:
        read = len(oracle.ids(text)) - 1
        clean, _, f = oracle.run(text, cfg=cfg, patch=([read], 1.0, 0.0))
        p0 = head_predict(head, f, digits)
        for s in SCALES:
            _, new, pf = oracle.run(text, cfg=cfg, patch=([read], s, 0.0))
            p = head_predict(head, pf, digits)
            xs.append(new - clean)
            ys.append(p - p0)
            preds += [p, p0]
    out = Slope(_ols_slope(xs, ys))
    # A float32 forward moves a prediction by ~1e-6 of its size; over a small activation change
    # that is a visible error of the slope, on either side of the comparison.
    out.noise = 1e-5 * max(abs(p) for p in preds) / float(np.sqrt(np.mean(np.square(xs))))
    return out


def oracle_gradient(oracle: Oracle, head: Path, cfg: dict, unit: int, h: float = 1e-2,
                    texts: list[str] = TEXTS) -> float:
    """Mean over inputs of a central finite difference of the prediction in the unit, by the oracle."""
    cfg = {**cfg, "target_neuron": unit}
    digits = oracle.digit_ids() if cfg["head_type"] == "token" else None
    grads = []
    for text in texts:
        read = len(oracle.ids(text)) - 1
        _, _, up = oracle.run(text, cfg=cfg, patch=([read], 1.0, h))
        _, _, down = oracle.run(text, cfg=cfg, patch=([read], 1.0, -h))
        grads.append((head_predict(head, up, digits) - head_predict(head, down, digits)) / (2 * h))
    return float(np.mean(grads))


def _head(tmp: Path, model: Path, cfg: dict) -> tuple[Path, dict]:
    cfg = dict(cfg)
    kw = {k: cfg.pop(k) for k in ("hidden_dim", "head_type", "n_classes") if k in cfg}
    head = write_head(tmp, model, target_neuron=5, seed=3, **kw, **cfg)
    full = {"head_type": kw.get("head_type", "regression"), "layer_type": "post", **cfg}
    return head, full


def _close(got: float, want: float, scale: float, rtol: float = 1e-4) -> bool:
    return abs(got - want) <= rtol * max(abs(want), scale) + getattr(want, "noise", 0.0)


# ----- exact: the head reads right after the layer -------------------------------------------------
EXACT = {
    "post, linear head": dict(target_layer=1, layer_type="post", feature_layer=1),
    "post, MLP head": dict(target_layer=1, layer_type="post", feature_layer=1, hidden_dim=6,
                           head_config={"activation": "silu", "output_scale": 1.5}),
    "mlp_out (residual, centred), linear head": dict(target_layer=1, layer_type="mlp_out", feature_layer=1),
}


@pytest.mark.parametrize("case", list(EXACT))
def test_exact_slopes_equal_patching_each_unit_alone(arch, case, tmp_path):
    model, oracle = arch
    head, cfg = _head(tmp_path / "head", model, EXACT[case])
    res = rank_units(head, TEXTS, top=3, device="cpu")
    assert res.method == "exact" and res.patched.all() and res.screen_slope is None
    slopes = res.exact_slope
    scale = float(np.abs(slopes).max())
    if case == "post, linear head":
        units = list(range(res.width))  # every unit: cheap on a tiny model
    else:  # the extremes, the target, the ends and one in the middle
        mags = np.abs(slopes)
        units = sorted({0, res.width - 1, 5, res.width // 2, int(mags.argmax()), int(mags.argmin())})
    want = {u: oracle_slope(oracle, head, cfg, u) for u in units}
    bad = {u: (float(slopes[u]), w) for u, w in want.items() if not _close(float(slopes[u]), w, scale)}
    assert not bad, f"{case}: unit: (ranked, oracle) {bad}"
    if len(units) == res.width:
        mags = np.abs([want[u] for u in units])
        assert res.target_rank == int((mags >= mags[5] * (1 - 1e-6)).sum())
    # R² of a linear head on a linear write path is 1.
    if "linear" in case:
        assert np.allclose(res.exact_r_squared, 1.0, atol=1e-6)


def test_on_a_linear_path_the_first_order_screen_is_exact(arch, tmp_path):
    model, _ = arch
    head, _ = _head(tmp_path / "head", model, EXACT["post, linear head"])
    exact = rank_units(head, TEXTS, top=3, device="cpu")
    screened = rank_units(head, TEXTS, top=3, device="cpu", screen="always")
    assert screened.method == "screen"
    assert screened.screen_slope is not None
    np.testing.assert_allclose(screened.screen_slope, exact.exact_slope, rtol=1e-4,
                               atol=1e-5 * float(np.abs(exact.exact_slope).max()))
    assert screened.target_rank == exact.target_rank


# ----- screen: anywhere else -----------------------------------------------------------------------
SCREEN = {
    "post, final state": dict(target_layer=1, layer_type="post", feature_layer=-1),
    "attn_out, mid-stack, MLP head": dict(target_layer=1, layer_type="attn_out", feature_layer=2,
                                          hidden_dim=5),
    # Block 0: the confirmation's rows run every block (they multiply only above block 0).
    "mlp_out, block 0, final state": dict(target_layer=0, layer_type="mlp_out", feature_layer=-1),
}
SCREEN_GPT2 = {
    "post, hf final norm": dict(target_layer=1, layer_type="post", feature_layer=-1, coordinates="hf"),
    "post, token head": dict(target_layer=1, layer_type="post", head_type="token", activation_mean=0.3,
                             activation_std=0.8),
}


def _check_screen(model: Path, oracle: Oracle, case: str, cfg_in: dict, tmp: Path) -> None:
    head, cfg = _head(tmp / "head", model, cfg_in)
    res = rank_units(head, TEXTS, top=4, device="cpu")
    assert res.method == "screen" and res.screen_slope is not None
    assert len(res.confirmed) == 4
    # The screen's top 4 are its 4 largest |screen slope|, and they (and the target) are patched.
    assert set(res.confirmed) == set(np.argsort(-np.abs(res.screen_slope))[:4].tolist())
    patched = set(np.flatnonzero(res.patched).tolist())
    assert patched == set(res.confirmed) | {5}
    scale = float(np.nanmax(np.abs(res.exact_slope)))
    for u in sorted(patched):
        want = oracle_slope(oracle, head, cfg, u)
        assert _close(float(res.exact_slope[u]), want, scale), (case, u, res.exact_slope[u], want)
    # The screen is ∂prediction/∂unit, averaged over inputs: a finite difference of the oracle.
    for u in res.confirmed[:2]:
        want = oracle_gradient(oracle, head, cfg, u)
        got = float(res.screen_slope[u])
        assert _close(got, want, scale, rtol=3e-3), (case, u, got, want)
    # Ranks: exact slopes where patched, screen slopes elsewhere.
    basis = np.where(res.patched, np.abs(res.exact_slope), np.abs(res.screen_slope))
    assert res.target_rank == int((basis >= basis[5]).sum())


@pytest.mark.parametrize("case", list(SCREEN))
def test_screen_top_units_are_confirmed_by_real_patching(arch, case, tmp_path):
    model, oracle = arch
    _check_screen(model, oracle, case, SCREEN[case], tmp_path)


@pytest.mark.parametrize("case", list(SCREEN_GPT2))
def test_screen_on_final_norm_and_token_heads(case, tmp_path):
    model = tiny_model(tmp_path / "model", "gpt2")
    _check_screen(model, Oracle(model), case, SCREEN_GPT2[case], tmp_path)


@pytest.mark.parametrize("budget", ["pieces", "none"])
def test_screen_confirmation_in_pieces_or_without_the_kept_cache(tmp_path, budget):
    # The screen keeps its prefix caches, and the read token's hidden states entering the unit's
    # block, for the confirmation's rows. With a cache budget that holds the prefixes, the rows
    # continue the kept cache, entering at the unit's block (folded side by side: nothing is
    # repeated, so the budget needs no pieces); with no budget at all nothing is kept and
    # engine.measure runs the prefixes again. Every number still matches the oracle. What
    # block 0 computes tells the two apart: the screen's one prefix pass, or one more per input.
    from neuronpatch.models import load_model

    path = tiny_model(tmp_path / "model", "gpt_neox")
    oracle = Oracle(path)
    head, cfg = _head(tmp_path / "head", path, SCREEN["post, final state"])
    longest = max(len(oracle.ids(t)) for t in TEXTS)
    prefixes = len(TEXTS) * longest * 3 * 32 * 2 * 4  # keys and values of 3 layers, d_model 32, float32
    model = load_model(path, device="cpu")
    budget_bytes = prefixes if budget == "pieces" else 1
    rank_units(head, TEXTS, top=4, model=model, kv_cache_bytes=budget_bytes)  # the growth check runs once
    shapes: list[tuple[int, int]] = []
    hook = model.arch.mlp_out_proj[0].register_forward_pre_hook(
        lambda mod, args: shapes.append(tuple(args[0].shape[:2])))
    try:
        res = rank_units(head, TEXTS, top=4, model=model, kv_cache_bytes=budget_bytes)
    finally:
        hook.remove()
    prefix_runs = sum(1 for _, s in shapes if s > 1)
    one_input_one_token = sum(1 for b, s in shapes if (b, s) == (1, 1))
    assert prefix_runs == (1 if budget == "pieces" else 1 + len(TEXTS))
    # One read-token pass, the screen's over every input; no confirmation row below the unit's block.
    assert one_input_one_token == 0 and shapes.count((len(TEXTS), 1)) == 1
    assert len(shapes) == prefix_runs + 1
    scale = float(np.nanmax(np.abs(res.exact_slope)))
    for u in np.flatnonzero(res.patched).tolist():
        assert _close(float(res.exact_slope[u]), oracle_slope(oracle, head, cfg, u), scale)


def test_a_one_token_input_is_screened_and_confirmed_with_the_others(tmp_path):
    # "The" is one token: nothing before its read position to cache.
    model = tiny_model(tmp_path / "model", "llama")
    oracle = Oracle(model)
    texts = [*TEXTS, "The"]
    assert len(oracle.ids("The")) == 1
    head, cfg = _head(tmp_path / "head", model, SCREEN["post, final state"])
    res = rank_units(head, texts, top=3, device="cpu")
    scale = float(np.nanmax(np.abs(res.exact_slope)))
    for u in np.flatnonzero(res.patched).tolist():
        assert _close(float(res.exact_slope[u]), oracle_slope(oracle, head, cfg, u, texts), scale)
    u = res.confirmed[0]
    assert _close(float(res.screen_slope[u]), oracle_gradient(oracle, head, cfg, u, texts=texts), scale,
                  rtol=3e-3)


# ----- planted units -------------------------------------------------------------------------------
def _gpt2_out_rows(model: Path, layer: int) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(model / "model.safetensors"))[f"transformer.h.{layer}.mlp.c_proj.weight"]


def test_a_head_aligned_with_one_units_write_direction_ranks_it_first(tmp_path):
    model = tiny_gpt2(tmp_path / "model", n_layer=2)
    w_out = _gpt2_out_rows(model, 0)  # [d_mlp, d_model]: neuron u writes w_out[u]
    u = int(w_out.norm(dim=1).argmax())  # |w_out[u]|² ≥ |w_out[u]·w_out[v]| for every v
    sd = {"output.weight": w_out[u][None].clone(), "output.bias": torch.zeros(1)}
    planted = write_head(tmp_path / "planted", model, target_layer=0, target_neuron=u, feature_layer=1,
                         coordinates="hf", state_dict=sd)
    res = rank_units(planted, TEXTS, device="cpu")
    assert res.method == "exact" and res.target_rank == 1 and res.units[0].unit == u
    # Every slope is w·w_out[v], from the weight file alone.
    np.testing.assert_allclose(res.exact_slope, (w_out @ w_out[u]).numpy(), rtol=1e-4, atol=1e-6)
    # The same head claiming another neuron: that neuron's rank, from the weight file alone.
    v = int((w_out @ w_out[u]).abs().argmin())
    other = write_head(tmp_path / "other", model, target_layer=0, target_neuron=v, feature_layer=1,
                       coordinates="hf", state_dict=sd)
    mags = (w_out @ w_out[u]).abs()
    assert rank_units(other, TEXTS, device="cpu").target_rank == int((mags >= mags[v]).sum()) > 1


def test_a_unit_planted_to_dominate_the_final_state_ranks_first_through_the_screen(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model(tmp_path / "model", "gpt2")
    weights = load_file(str(model / "model.safetensors"))
    u = 11
    row = weights["transformer.h.1.mlp.c_proj.weight"][u]
    row *= 25.0  # neuron 11 writes 25× as hard, and the head reads along what it writes
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    sd = {"output.weight": (row - row.mean())[None] / 25.0, "output.bias": torch.zeros(1)}
    head = write_head(tmp_path / "head", model, target_layer=1, target_neuron=u, feature_layer=-1,
                      state_dict=sd)
    res = rank_units(head, TEXTS, top=5, device="cpu")
    assert res.method == "screen" and res.target_rank == 1 and res.confirmed[0] == u
    want = oracle_slope(Oracle(model), head, {"head_type": "regression", "target_layer": 1,
                                              "layer_type": "post", "feature_layer": -1}, u)
    assert res.exact_slope[u] == pytest.approx(want, rel=1e-4)
    others = np.abs(np.delete(np.where(res.patched, res.exact_slope, res.screen_slope), u))
    assert abs(want) > 3 * others.max()


# ----- the rest --------------------------------------------------------------------------------------
def test_a_head_reading_before_the_layer_ranks_nothing(tmp_path):
    model = tiny_gpt2(tmp_path / "model", n_layer=2)
    head = write_head(tmp_path / "head", model, target_layer=1, target_neuron=3, feature_layer=0)
    res = rank_units(head, TEXTS, device="cpu")
    assert res.method == "upstream"
    assert not res.exact_slope.any()
    assert res.target_rank == res.width  # every unit ties at 0: none stands out
    assert "every slope is exactly 0" in res.notes[0]


@pytest.mark.parametrize("nudge, moves", [(1e-7, False), (1e-2, True)])
def test_the_upstream_check_tolerates_rounding_not_a_real_move(tmp_path, nudge, moves):
    """Rows computed in another batch shape round differently (matrix kernels split work by
    thread count); the upstream check must call that rounding, not a move, yet still catch a
    real one. A plain forward hook on the feature block nudges every row but the first by a
    per-row relative amount: float32 rounding at ``1e-7``, a real change at ``1e-2``."""
    from neuronpatch.models import load_model

    path = tiny_gpt2(tmp_path / "model", n_layer=2)
    head = write_head(tmp_path / "head", path, target_layer=1, target_neuron=3, feature_layer=0)
    model = load_model(path, device="cpu")

    def nudge_rows(module, args, out):
        t = out[0] if isinstance(out, tuple) else out
        rows = torch.arange(t.shape[0], dtype=t.dtype)[:, None, None]
        t = t * (1 + nudge * rows)
        return (t, *out[1:]) if isinstance(out, tuple) else t

    handle = model.hf.transformer.h[0].register_forward_hook(nudge_rows)
    try:
        if moves:
            with pytest.raises(RuntimeError, match="moved its prediction"):
                rank_units(head, TEXTS, model=model)
        else:
            res = rank_units(head, TEXTS, model=model)
            assert res.method == "upstream" and not res.exact_slope.any()
    finally:
        handle.remove()


def test_a_norm_after_the_mlp_sends_the_exact_method_to_the_screen(tmp_path):
    model = tiny_model(tmp_path / "model", "gemma2")  # post_feedforward_layernorm after the MLP
    head, cfg = _head(tmp_path / "head", model, EXACT["post, linear head"])
    res = rank_units(head, TEXTS, top=3, device="cpu")
    assert res.method == "screen"
    assert any("does not hold for this model" in n for n in res.notes)
    oracle = Oracle(model)
    scale = float(np.nanmax(np.abs(res.exact_slope)))
    for u in np.flatnonzero(res.patched):
        assert _close(float(res.exact_slope[u]), oracle_slope(oracle, head, cfg, int(u)), scale)


def test_another_layer_has_no_target(tmp_path):
    model = tiny_gpt2(tmp_path / "model", n_layer=3)
    head = write_head(tmp_path / "head", model, target_layer=1, target_neuron=3, feature_layer=-1)
    res = rank_units(head, TEXTS, layer=0, layer_type="mlp_out", top=3, device="cpu")
    assert res.target is None and res.target_rank is None and res.width == 32
    assert res.unit_hook == "blocks.0.hook_mlp_out"
    assert json.loads(json.dumps(res.to_dict()))["target_rank"] is None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"layer": 7}, "layer 7 is invalid; expected an int in [0, 1]"),
    ({"layer_type": "mlp_hidden"}, "layer type 'mlp_hidden' is unknown; expected one of post"),
    ({"top": 0}, "top 0 is invalid; expected a positive integer"),
    ({"screen": "sometimes"}, "screen 'sometimes' is invalid; expected one of auto, always, never"),
    ({"batch_size": 0}, "batch_size 0 is invalid"),
])
def test_bad_arguments_are_one_line(tmp_path, kwargs, message):
    model = tiny_gpt2(tmp_path / "model", n_layer=2)
    head = write_head(tmp_path / "head", model, target_layer=0, target_neuron=3, feature_layer=1)
    with pytest.raises(InputError) as info:
        rank_units(head, TEXTS, device="cpu", **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_an_argmax_classifier_cannot_be_screened(tmp_path):
    model = tiny_gpt2(tmp_path / "model", n_layer=2)
    head = write_head(tmp_path / "head", model, target_layer=0, target_neuron=3, feature_layer=-1,
                      head_type="classification", n_classes=4)
    with pytest.raises(InputError, match=r"argmax classification head .* no gradient"):
        rank_units(head, TEXTS, device="cpu")
    assert rank_units(head, TEXTS, device="cpu", screen="never", top=3).method == "patched"


def test_every_units_fit_is_the_fit_a_run_reports():
    # Slopes and R² of many units at once are stats.ols's numbers, degenerate cases included
    # (no activation change, no prediction change, noise-level change, two distinct changes).
    from neuronpatch import stats
    from neuronpatch.rank import _Job

    rng = np.random.default_rng(0)
    dact = rng.normal(size=(60, 5, 2))
    dpred = dact * rng.normal(size=(60, 1, 1)) + 0.01 * rng.normal(size=(60, 5, 2))
    dact[3] = 0.0
    dpred[4] = 0.0
    dpred[5] = 1e-12
    dact[6, :, 0], dact[6, :, 1], dpred[6, :, 0], dpred[6, :, 1] = 1.0, -1.0, 0.5, -0.5
    clean = rng.normal(size=5)
    slopes, r2 = _Job.fits(None, dact, dpred, clean)  # type: ignore[arg-type]
    for u in range(60):
        scale = max(np.abs(clean).max(), np.abs(clean[:, None] + dpred[u]).max())
        fit = stats.ols(dact[u], dpred[u], y_scale=scale)
        np.testing.assert_allclose([slopes[u], r2[u]], [fit.slope, fit.r_squared], rtol=1e-12, atol=1e-12)
    assert np.isnan(slopes[3]) and np.isnan(r2[4]) and slopes[5] == 0.0 and np.isnan(r2[6])


# ----- the command line ------------------------------------------------------------------------------
def test_cli_prints_the_table_and_writes_json_and_figure(tmp_path, capsys):
    model = tiny_gpt2(tmp_path / "model", n_layer=2)
    head = write_head(tmp_path / "head", model, target_layer=0, target_neuron=3, feature_layer=-1)
    out = tmp_path / "out"
    code = main(["rank", str(head), "--top", "4", "--out", str(out), "--device", "cpu",
                 "--text", TEXTS[0], "--text", TEXTS[1], "--text", TEXTS[2]])
    assert code == 0
    text = capsys.readouterr().out
    data = json.loads((out / "rank.json").read_text())
    assert data["method"] == "screen" and data["target"] == 3 and len(data["units"]) == 64
    api = rank_units(head, TEXTS, top=4, device="cpu")
    assert data["target_rank"] == api.target_rank
    assert [u["unit"] for u in data["units"][:4]] == [u.unit for u in api.units[:4]]
    assert f"Target    unit 3: rank {api.target_rank} of 64" in text
    assert "◀ target" in text and "Spearman ρ" in text
    top_line = next(line for line in text.splitlines() if line.strip().startswith("1 "))
    assert str(api.units[0].unit) in top_line
    assert (out / "rank.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    model = tiny_gpt2(tmp_path / "model", n_layer=2)
    head = write_head(tmp_path / "head", model, target_layer=0, target_neuron=3, feature_layer=1)
    capsys.readouterr()
    assert main(["rank", str(head), "--layer", "5", "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "neuronpatch: error: layer 5 is invalid; expected an int in [0, 1]"
    (tmp_path / "file").write_text("x")
    assert main(["rank", str(head), "--out", str(tmp_path / "file")]) == 2
    assert "--out is an existing file" in capsys.readouterr().err


# ----- the probe expectation -------------------------------------------------------------------------
PROBES = """
name: planted unit ranks first
head: heads/planted
inputs: [The cat sat on the mat today., Numbers 3 4 5 and more, A quick one]
interventions: {set: [0, 1, 2]}
expect:
  rank: {max: 1}
---
name: another unit does not
head: heads/other
inputs: [The cat sat on the mat today., Numbers 3 4 5 and more, A quick one]
interventions: {set: [0, 1, 2]}
rank: {top: 5}
expect:
  rank: {max: 1}
"""


@pytest.fixture
def rank_project(pytester: pytest.Pytester, probe_heads):
    model = probe_heads.model  # tiny GPT-2, 2 layers, loaded once outside pytester
    w_out = _gpt2_out_rows(model, 0)
    u = int(w_out.norm(dim=1).argmax())
    v = int((w_out @ w_out[u]).abs().argmin())
    sd = {"output.weight": w_out[u][None].clone(), "output.bias": torch.zeros(1)}
    for name, target in (("planted", u), ("other", v)):
        write_head(pytester.path / "heads" / name, model, target_layer=0, target_neuron=target,
                   feature_layer=1, coordinates="hf", state_dict=sd)
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\nneuronpatch_figures = "none"\n')
    (pytester.path / "rank.probe.yaml").write_text(textwrap.dedent(PROBES).lstrip())
    mags = (w_out @ w_out[u]).abs()
    return pytester, int((mags >= mags[v]).sum())


def test_rank_expectation_passes_and_fails_through_pytest(rank_project):
    pytester, other_rank = rank_project
    result = pytester.runpytest("-p", "no:cacheprovider", "--junitxml=junit.xml")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([
        f"*FAIL  rank * = {other_rank} * expected ≤ 1*",
    ])
    summaries = {json.loads(p.read_text())["probe"]["name"]: json.loads(p.read_text())
                 for p in (pytester.path / ".neuronpatch" / "artifacts").glob("*/summary.json")}
    ok, bad = summaries["planted unit ranks first"], summaries["another unit does not"]
    assert ok["metrics"]["rank"] == 1 and ok["ranking"]["method"] == "exact"
    assert bad["metrics"]["rank"] == other_rank and bad["ranking"]["top"] == 5
    import jsonschema

    from neuronpatch.artifacts import summary_schema

    for summary in (ok, bad):
        jsonschema.Draft202012Validator(summary_schema()).validate(summary)
    assert 'name="neuronpatch.rank" value="1.0"' in (pytester.path / "junit.xml").read_text()


def test_a_probe_without_rank_computes_no_ranking(rank_project, monkeypatch):
    pytester, _ = rank_project
    (pytester.path / "rank.probe.yaml").write_text(textwrap.dedent("""
        name: slope only
        head: heads/planted
        inputs: [The cat sat on the mat today.]
        interventions: {set: [0, 1, 2]}
        expect: {slope: {min: 0}}
    """).lstrip())

    def refuse(*args, **kwargs):
        raise AssertionError("ranked without being asked")

    monkeypatch.setattr("neuronpatch.rank.rank_units", refuse)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_bad_rank_options_are_collection_errors(rank_project):
    pytester, _ = rank_project
    (pytester.path / "rank.probe.yaml").write_text(textwrap.dedent("""
        name: bad
        head: heads/planted
        rank: {top: 0, colour: red}
        expect: {rank: {max: 1}}
    """).lstrip())
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "rank.probe.yaml:3: key 'rank.top'" in out and "rank.probe.yaml:3: key 'rank.colour'" in out
