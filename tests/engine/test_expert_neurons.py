"""Expert neurons of mixture-of-experts blocks against HF run directly, with the experts written out.

Mixtral, Qwen2-MoE (a gated shared expert beside the routed ones) and OLMoE, tiny
and with every parameter random. The reference (``tests/hf_oracle.py``) replaces a
block's fused experts module by its computation written out token by token, with the
neuron patched there; the engine reads the neuron from the experts' input and adds
the change, times the routing weight, along the neuron's down-projection column.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from neuronpatch import run_experiment
from neuronpatch.errors import HeadConfigError, InputError, ModelLoadError
from neuronpatch.interventions import Intervention
from neuronpatch.testing import tiny_model, write_head
from tests.hf_oracle import Oracle, head_predict

MOE = ["mixtral", "qwen2_moe", "olmoe"]
TEXTS = ["The cat sat on the mat today.", "Numbers 3 4 5 and more", "A quick one",
         "Transformers use attention mechanisms to process long sequences.", "one two three four",
         "Where did the river go?", "Seven silver spoons", "It rained all week in the hills."]
IVS = (Intervention("scale", 0.0), Intervention("scale", 2.5), Intervention("set", 1.5),
       Intervention("add", -0.75))
LAYER, NEURON = 1, 5


@pytest.fixture(scope="module", params=MOE)
def moe(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Oracle]:
    path = tiny_model(tmp_path_factory.mktemp(request.param) / "model", request.param)
    return path, Oracle(path)


def _routed(oracle: Oracle, expert: int, pre: bool = False) -> list[bool]:
    return [oracle.expert_run(t, layer=LAYER, expert=expert, neuron=NEURON, pre=pre, feature_layer=-1)[0]
            is not None for t in TEXTS]


def _expert_routed_on_some(oracle: Oracle) -> int:
    """An expert the last token is routed to on some inputs and not on others."""
    for e in range(oracle.model.config.num_experts if hasattr(oracle.model.config, "num_experts")
                   else oracle.model.config.num_local_experts):
        r = _routed(oracle, e)
        if 2 <= sum(r) < len(r):
            return e
    raise AssertionError("the test needs an expert routed on some inputs and not others")


@pytest.mark.parametrize("layer_type", ["expert_post", "expert_pre"])
def test_expert_neurons_match_the_written_out_reference(moe: tuple[Path, Oracle], layer_type: str,
                                                        tmp_path: Path) -> None:
    model_dir, oracle = moe
    pre = layer_type == "expert_pre"
    expert = _expert_routed_on_some(oracle)
    head = write_head(tmp_path / "head", model_dir, target_layer=LAYER, target_neuron=NEURON,
                      layer_type=layer_type, target_expert=expert, feature_layer=-1, hidden_dim=6, seed=3)
    want_clean, want_pred, kept = [], [], []
    for text in TEXTS:
        clean, _ = oracle.expert_run(text, layer=LAYER, expert=expert, neuron=NEURON, pre=pre,
                                         feature_layer=-1)
        if clean is None:
            continue
        kept.append(text)
        want_clean.append(clean)
        row = []
        for iv in IVS:
            alpha, beta = iv.affine(0.0)
            _, f = oracle.expert_run(text, layer=LAYER, expert=expert, neuron=NEURON, pre=pre,
                                     feature_layer=-1, patch=(alpha, beta))
            row.append(head_predict(head, f))
        want_pred.append(row)
    want = np.array(want_pred)
    scale = max(1.0, float(np.abs(want).max()))
    for route in ("auto", "kv", "full"):
        res = run_experiment(head, TEXTS, interventions=IVS, method=route, device="cpu")
        assert list(res.inputs) == kept, route
        assert set(res.unrouted_inputs) == set(TEXTS) - set(kept)
        assert res.target_expert == expert and res.method in ("kv", "full")
        assert any(f"expert {expert} not routed at the patched token on {len(TEXTS) - len(kept)} of "
                   f"{len(TEXTS)} inputs" in note for note in res.notes), res.notes
        err_a = float(np.abs(res.clean_activation - np.array(want_clean)).max())
        top = max(1.0, float(np.abs(want_clean).max()))
        assert err_a <= 1e-5 * top, f"{route}: clean value off by {err_a:.3g}"
        err = float(np.abs(res.patched_prediction - want).max())
        assert err <= 1e-5 * scale, f"{route} ({res.method}): prediction off by {err:.3g}"


def test_an_expert_never_routed_at_the_patched_token_is_an_error(moe: tuple[Path, Oracle],
                                                                tmp_path: Path) -> None:
    model_dir, oracle = moe
    text = TEXTS[0]
    experts = range(4)
    absent = next(e for e in experts
                  if oracle.expert_run(text, layer=LAYER, expert=e, neuron=NEURON, pre=False,
                                       feature_layer=-1)[0] is None)
    head = write_head(tmp_path / "head", model_dir, target_layer=LAYER, target_neuron=NEURON,
                      layer_type="expert_post", target_expert=absent)
    with pytest.raises(InputError, match=rf"expert {absent} of block {LAYER} is not routed"):
        run_experiment(head, [text], set=[1.0], device="cpu")


def test_head_configs_name_the_expert(tmp_path: Path) -> None:
    model_dir = tiny_model(tmp_path / "model", "mixtral")
    head = write_head(tmp_path / "h1", model_dir, target_layer=1, target_neuron=5, layer_type="expert_post")
    with pytest.raises(HeadConfigError, match=r"target_expert.*<missing>"):
        run_experiment(head, TEXTS[:1], set=[1.0], device="cpu")
    head = write_head(tmp_path / "h2", model_dir, target_layer=1, target_neuron=5, target_expert=1)
    with pytest.raises(HeadConfigError, match=r"target_expert.*no target_expert for layer_type 'post'"):
        run_experiment(head, TEXTS[:1], set=[1.0], device="cpu")
    head = write_head(tmp_path / "h3", model_dir, target_layer=1, target_neuron=5, layer_type="expert_post",
                      target_expert=9)
    with pytest.raises(ModelLoadError, match=r"has 4 experts; target_expert 9"):
        run_experiment(head, TEXTS[:1], set=[1.0], device="cpu")
    head = write_head(tmp_path / "h4", model_dir, target_layer=1, target_neuron=999, layer_type="expert_post",
                      target_expert=1)
    with pytest.raises(HeadConfigError, match=r"target_neuron.*\[0, 63\] \(the width of expert_post"):
        run_experiment(head, TEXTS[:1], set=[1.0], device="cpu")


def test_expert_neurons_of_a_dense_model_are_refused_by_name(tmp_path: Path) -> None:
    model_dir = tiny_model(tmp_path / "model", "llama")
    head = write_head(tmp_path / "head", model_dir, target_layer=1, target_neuron=5, layer_type="expert_post",
                      target_expert=0)
    with pytest.raises(ModelLoadError, match=r"block 1 has no fused experts module"):
        run_experiment(head, TEXTS[:1], set=[1.0], device="cpu")
    head = write_head(tmp_path / "router", model_dir, target_layer=1, target_neuron=0, layer_type="router")
    with pytest.raises(ModelLoadError, match=r"block 1 has no router"):
        run_experiment(head, TEXTS[:1], set=[1.0], device="cpu")


def _oracle_slope(oracle: Oracle, head: Path, expert: int, neuron: int, pre: bool, ivs: tuple) -> float:
    """Pooled OLS slope of Δprediction on Δneuron over the routed inputs, patching one neuron."""
    xs, ys = [], []
    for text in TEXTS:
        c, f = oracle.expert_run(text, layer=LAYER, expert=expert, neuron=neuron, pre=pre, feature_layer=-1)
        if c is None:
            continue
        p0 = head_predict(head, f)
        for iv in ivs:
            alpha, beta = iv.affine(0.0)
            _, pf = oracle.expert_run(text, layer=LAYER, expert=expert, neuron=neuron, pre=pre,
                                      feature_layer=-1, patch=(alpha, beta))
            xs.append(alpha * c + beta - c)
            ys.append(head_predict(head, pf) - p0)
    x, y = np.array(xs), np.array(ys)
    x0 = x - x.mean()
    return float(x0 @ (y - y.mean()) / (x0 @ x0))


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Oracle]:
    path = tiny_model(tmp_path_factory.mktemp("olmoe") / "model", "olmoe")
    return path, Oracle(path)


@pytest.mark.parametrize("layer_type", ["expert_post", "expert_pre"])
def test_rank_over_an_experts_neurons_matches_patching_each(olmoe: tuple[Path, Oracle], layer_type: str,
                                                             tmp_path: Path) -> None:
    """The screen's gradient (through the routing weight, and the gate's slope for ``expert_pre``)
    is the slope of a small patch of each neuron; the confirmed slopes are the reference's."""
    from neuronpatch.rank import rank_units

    model_dir, oracle = olmoe
    pre = layer_type == "expert_pre"
    expert = _expert_routed_on_some(oracle)
    head = write_head(tmp_path / "head", model_dir, target_layer=LAYER, target_neuron=NEURON,
                      layer_type=layer_type, target_expert=expert, feature_layer=-1, hidden_dim=6, seed=3)
    width = oracle.model.config.intermediate_size
    small = (Intervention("add", -1e-2), Intervention("add", 1e-2))
    res = rank_units(head, TEXTS, interventions=small, top=width, device="cpu")
    assert res.method == "screen" and res.target == NEURON and bool(res.patched.all())
    assert len(res.inputs) == sum(_routed(oracle, expert)) and any("not routed" in n for n in res.notes)
    assert res.screen_slope is not None
    scale = float(np.abs(res.exact_slope).max())
    err = float(np.abs(res.screen_slope - res.exact_slope).max())
    assert err <= 0.02 * scale, f"screen off the small-patch slopes by {err:.3g} (largest slope {scale:.3g})"
    ivs = (Intervention("set", 0.0), Intervention("set", 2.0))
    res = rank_units(head, TEXTS, interventions=ivs, top=3, device="cpu")
    for i in {*res.confirmed, NEURON}:
        want = _oracle_slope(oracle, head, expert, i, pre, ivs)
        assert abs(res.exact_slope[i] - want) <= 1e-4 * max(1.0, abs(want)), (i, res.exact_slope[i], want)


def test_controls_over_an_experts_neurons_match_patching_each(olmoe: tuple[Path, Oracle],
                                                              tmp_path: Path) -> None:
    model_dir, oracle = olmoe
    expert = _expert_routed_on_some(oracle)
    head = write_head(tmp_path / "head", model_dir, target_layer=LAYER, target_neuron=NEURON,
                      layer_type="expert_post", target_expert=expert, feature_layer=-1, hidden_dim=6, seed=3)
    ivs = (Intervention("set", 0.0), Intervention("add", 1.0))
    res = run_experiment(head, TEXTS, interventions=ivs, controls={"units": [2, 11]}, device="cpu")
    assert res.controls is not None and [c.label for c in res.controls.controls] == ["unit2", "unit11"]
    for control, neuron in zip(res.controls.controls, (2, 11), strict=True):
        want = _oracle_slope(oracle, head, expert, neuron, False, ivs)
        assert abs(control.slope - want) <= 1e-4 * max(1.0, abs(want)), (neuron, control.slope, want)


def test_an_expert_neuron_patch_that_reroutes_a_later_layer_is_kept_and_counted(
        moe: tuple[Path, Oracle], tmp_path: Path) -> None:
    """Setting an expert neuron far off its range changes the next block's expert choice on
    some inputs; the engine keeps the model's routing and counts those rows as the routers do."""
    model_dir, oracle = moe
    layer = 0  # block 0's experts; blocks 1 and 2 route after it
    expert = next(e for e in range(4) if sum(
        oracle.expert_run(t, layer=layer, expert=e, neuron=NEURON, pre=False, feature_layer=-1)[0] is not None
        for t in TEXTS) >= 3)
    head = write_head(tmp_path / "head", model_dir, target_layer=layer, target_neuron=NEURON,
                      layer_type="expert_post", target_expert=expert, feature_layer=-1, seed=3)
    ivs = (Intervention("set", 60.0), Intervention("scale", 1.0))
    flips, preds = 0, []
    for text in TEXTS:
        clean_routes: list = []
        c, _ = oracle.expert_run(text, layer=layer, expert=expert, neuron=NEURON, pre=False,
                                 feature_layer=-1, routes=clean_routes)
        if c is None:
            continue
        row = []
        for iv in ivs:
            routes: list = []
            _, f = oracle.expert_run(text, layer=layer, expert=expert, neuron=NEURON, pre=False,
                                     feature_layer=-1, patch=iv.affine(0.0), routes=routes)
            flips += any(not bool((a == b).all()) for a, b in zip(clean_routes, routes, strict=True))
            row.append(head_predict(head, f))
        preds.append(row)
    assert flips > 0, "the test needs a patch that changes a later layer's routing"
    want = np.array(preds)
    for route in ("kv", "full"):
        res = run_experiment(head, TEXTS, interventions=ivs, method=route, device="cpu")
        err = float(np.abs(res.patched_prediction - want).max())
        top = max(1.0, float(np.abs(want).max()))
        assert err <= 1e-5 * top, f"route {route}: prediction off by {err:.3g}"
        assert res.routing_changed == flips, (route, res.routing_changed, flips)


@pytest.mark.parametrize("expert", [1, 2])
def test_a_router_logit_matches_the_written_out_routing(moe: tuple[Path, Oracle], expert: int,
                                                        tmp_path: Path) -> None:
    """``layer_type: router``: the logit the router gives one expert, patched where the router
    reads it, so the model's own softmax and top-k route from the patched logit."""
    model_dir, oracle = moe
    head = write_head(tmp_path / "head", model_dir, target_layer=LAYER, target_neuron=expert,
                      layer_type="router", feature_layer=-1, hidden_dim=6, seed=3)
    ivs = (Intervention("set", -6.0), Intervention("set", 6.0), Intervention("scale", 0.5),
           Intervention("add", 0.25))
    want_clean, want_pred, flips = [], [], 0
    for text in TEXTS:
        clean, _, chosen = oracle.router_run(text, layer=LAYER, expert=expert, feature_layer=-1)
        want_clean.append(clean)
        row = []
        for iv in ivs:
            _, f, now = oracle.router_run(text, layer=LAYER, expert=expert, feature_layer=-1,
                                          patch=iv.affine(0.0))
            flips += now != chosen
            row.append(head_predict(head, f))
        want_pred.append(row)
    assert flips > 0, "the test needs a patch that changes the block's own routing"
    want = np.array(want_pred)
    for route in ("auto", "kv", "full"):
        res = run_experiment(head, TEXTS, interventions=ivs, method=route, device="cpu")
        assert res.unit_hook == f"blocks.{LAYER}.mlp.gate.hook_out" and not res.unrouted_inputs
        err_a = float(np.abs(res.clean_activation - np.array(want_clean)).max())
        assert err_a <= 1e-5 * max(1.0, float(np.abs(want_clean).max())), f"{route}: logit off by {err_a:.3g}"
        err = float(np.abs(res.patched_prediction - want).max())
        top = max(1.0, float(np.abs(want).max()))
        assert err <= 1e-5 * top, f"{route} ({res.method}): prediction off by {err:.3g}"


def test_router_logits_rank_and_control_over_the_routers_own_experts(olmoe: tuple[Path, Oracle],
                                                                     tmp_path: Path) -> None:
    from neuronpatch.rank import rank_units

    model_dir, oracle = olmoe
    head = write_head(tmp_path / "head", model_dir, target_layer=LAYER, target_neuron=1, layer_type="router",
                      feature_layer=-1, hidden_dim=6, seed=3)
    ivs = (Intervention("set", -4.0), Intervention("set", 4.0))
    res = rank_units(head, TEXTS, interventions=ivs, top=4, device="cpu")
    assert len(res.exact_slope) == oracle.model.config.num_experts and res.target == 1
    ctl = run_experiment(head, TEXTS, interventions=ivs, controls={"units": [2]}, device="cpu")
    assert ctl.controls is not None
    for e, got in ((1, ctl.slope), (2, ctl.controls.controls[0].slope)):
        assert abs(res.exact_slope[e] - got) <= 1e-5 * max(1.0, abs(got)), (e, res.exact_slope[e], got)
    xs, ys = [], []
    for text in TEXTS:
        c, f0, _ = oracle.router_run(text, layer=LAYER, expert=2, feature_layer=-1)
        for iv in ivs:
            a, b = iv.affine(0.0)
            _, f, _ = oracle.router_run(text, layer=LAYER, expert=2, feature_layer=-1, patch=(a, b))
            xs.append(a * c + b - c)
            ys.append(head_predict(head, f) - head_predict(head, f0))
    x, y = np.array(xs), np.array(ys)
    want = float((x - x.mean()) @ (y - y.mean()) / ((x - x.mean()) @ (x - x.mean())))
    assert abs(ctl.controls.controls[0].slope - want) <= 1e-4 * max(1.0, abs(want))
    with pytest.raises(InputError, match="router's logits over its own router"):
        rank_units(head, TEXTS, interventions=ivs, layer=0, device="cpu")


@pytest.mark.parametrize("layer_type", ["expert_post", "expert_pre", "router"])
def test_mixture_of_experts_units_run_in_bfloat16_with_their_rounding_measured(olmoe: tuple[Path, Oracle],
                                                                               layer_type: str,
                                                                               tmp_path: Path) -> None:
    """The unit is read in float32 and written back in bfloat16: the patch check holds at the
    written tensor's dtype, and the result carries its measured rounding error."""
    model_dir, oracle = olmoe
    extra = {} if layer_type == "router" else {"target_expert": _expert_routed_on_some(oracle)}
    head = write_head(tmp_path / "head", model_dir, target_layer=LAYER, target_neuron=2,
                      layer_type=layer_type, feature_layer=-1, seed=3, **extra)
    res = run_experiment(head, TEXTS, set=[-1.0, 0.0, 1.0, 2.0], dtype="bfloat16", device="cpu")
    assert res.rounding is not None and res.rounding.dtype == "bfloat16"
    np.testing.assert_allclose(res.patched_activation, np.broadcast_to([-1.0, 0.0, 1.0, 2.0],
                                                                       res.patched_activation.shape))
    assert np.isfinite(res.slope) and np.isfinite(res.numerical_error["slope"])
