"""Controls against the independent reference: each control equals patching it alone with plain hooks.

One ``run_experiment(..., controls=...)`` patches the target and every control as
more rows over one clean run. Each control's slope, R² and interval must equal
what ``tests/hf_oracle.py`` gives patching that unit (or that direction) alone:
HF run input by input, plain forward hooks, the centring identities written out
by hand, each control mean-ablated to its own mean computed there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from neuronpatch import run_experiment
from neuronpatch.controls import random_directions, resolve
from neuronpatch.errors import ControlsError, InputError, PatchError
from neuronpatch.testing import tiny_model, write_head
from tests.hf_oracle import Oracle, head_predict

TEXTS = ["The cat sat on the mat.", "Numbers 3 4 5 6", "Machine learning models are hard to read.",
         "A quick one"]
ARCHS = ["gpt2", "gpt_neox", "llama"]
DIRS = {"random": 3, "seed": 1}

# name: (head config, controls, the route the experiment must take)
CASES: dict[str, tuple[dict, dict, str]] = {
    # a head on the final state: the kv route
    "kv-post": (dict(target_layer=0, layer_type="post", feature_layer=-1), {"units": [5, 9]}, "kv"),
    # (a unit above block 0: the rows multiply at its block, where blocks below run once per input)
    "kv-resid_post": (dict(target_layer=1, layer_type="resid_post", feature_layer=-1),
                      {"units": [5, 9], "directions": DIRS}, "kv"),
    "kv-attn_out-hf": (dict(target_layer=1, layer_type="attn_out", feature_layer=-1, coordinates="hf"),
                       {"directions": {"random": 2, "seed": 4}}, "kv"),
    # a head right after the unit's layer: the linear shortcut
    "linear-post": (dict(target_layer=0, layer_type="post", feature_layer=0), {"units": [5, 9]}, "linear"),
    "linear-mlp_out": (dict(target_layer=1, layer_type="mlp_out", feature_layer=1),
                       {"units": [5], "directions": DIRS}, "linear"),
}


@pytest.fixture(scope="module", params=ARCHS)
def arch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Oracle]:
    path = tiny_model(tmp_path_factory.mktemp(request.param) / "model", request.param)
    return path, Oracle(path)


def _affine(iv, mean: float) -> tuple[float, float]:
    """(α, β) of one intervention, written out here rather than taken from the engine."""
    return {"set": (0.0, iv.value), "add": (1.0, iv.value), "scale": (iv.value, 0.0),
            "zero": (0.0, 0.0), "mean": (0.0, mean)}[iv.kind]


def _oracle_points(oracle: Oracle, head: Path, cfg: dict, ivs, *, neuron: int | None = None,
                   direction: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Activation and prediction changes ``[inputs, interventions]`` of one unit patched alone."""
    cfg = {**cfg, "target_neuron": cfg["target_neuron"] if neuron is None else neuron}
    clean = []
    for text in TEXTS:
        pos = [len(oracle.ids(text)) - 1]
        c, _, f = oracle.run(text, cfg=cfg, patch=(pos, 1.0, 0.0), direction=direction)
        clean.append((c, head_predict(head, f), pos))
    mean = float(np.mean([c for c, _, _ in clean]))  # this unit's own mean over the inputs
    dx, dy = [], []
    for text, (c, p, pos) in zip(TEXTS, clean, strict=True):
        row_x, row_y = [], []
        for iv in ivs:
            alpha, beta = _affine(iv, mean)
            _, pa, pf = oracle.run(text, cfg=cfg, patch=(pos, alpha, beta), direction=direction)
            row_x.append(pa - c)
            row_y.append(head_predict(head, pf) - p)
        dx.append(row_x)
        dy.append(row_y)
    return np.array(dx), np.array(dy)


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Slope and R² of the pooled least-squares line, by the textbook formulas."""
    x, y = x.ravel(), y.ravel()
    slope = float(((x - x.mean()) @ (y - y.mean())) / ((x - x.mean()) @ (x - x.mean())))
    resid = y - y.mean() - slope * (x - x.mean())
    return slope, float(1 - (resid @ resid) / ((y - y.mean()) @ (y - y.mean())))


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_control_equals_the_reference_patching_it_alone(arch, case, tmp_path):
    from neuronpatch import stats

    model_dir, oracle = arch
    hcfg, controls, route = CASES[case]
    head = write_head(tmp_path / "h", model_dir, target_neuron=3, seed=2, **hcfg)
    res = run_experiment(head, TEXTS, set=[-1.0, 0.5], add=[0.75], scale=[2.0], mean=True, device="cpu",
                         controls=controls)
    assert res.method == route
    cfg = {"head_type": "regression", **json.loads((head / "config.json").read_text())}
    n_units = len(controls.get("units", []))
    dirs = controls.get("directions")
    n_dirs = dirs["random"] if dirs else 0
    labels = [f"unit{u}" for u in controls.get("units", [])] + [f"dir{i}" for i in range(n_dirs)]
    got = res.controls.controls
    assert [c.label for c in got] == labels
    if dirs:
        d = int(oracle.d)
        want_v = random_directions(dirs["random"], dirs["seed"], d)
        np.testing.assert_array_equal(res.controls.directions, want_v)
    target = _oracle_points(oracle, head, cfg, res.interventions)
    for c in got:
        if c.unit is not None:
            x, y = _oracle_points(oracle, head, cfg, res.interventions, neuron=c.unit)
        else:
            v = torch.tensor(res.controls.directions[int(c.label[3:])], dtype=torch.float32)
            x, y = _oracle_points(oracle, head, cfg, res.interventions, direction=v)
        slope, r2 = _fit(x, y)
        assert c.slope == pytest.approx(slope, rel=1e-4, abs=1e-6), c.label
        assert c.r_squared == pytest.approx(r2, rel=1e-4, abs=1e-6), c.label
        # The interval is the bootstrap of these very points (inputs resampled).
        ci, _ = stats.bootstrap_ci(x, y, n_resamples=1000, seed=0)
        assert c.slope_ci95 == pytest.approx(ci.as_list(), rel=1e-3, abs=1e-6), c.label
    assert res.slope == pytest.approx(_fit(*target)[0], rel=1e-4, abs=1e-6)
    m = res.metrics()
    assert m["control_slope"] == [c.slope for c in got]
    assert m["specificity"] == pytest.approx(abs(res.slope) / max(abs(c.slope) for c in got))
    assert len(got) == n_units + n_dirs


@pytest.mark.parametrize("coordinates", ["transformer_lens", "hf"])
def test_a_linear_head_on_the_patched_site_moves_by_its_weight_along_the_direction(tmp_path, coordinates):
    """Analytic: a head reading the residual site it patches has slope ``w·v`` per direction.

    And ``w_c`` per unit control: in transformer_lens coordinates of a LayerNorm model the
    centred column moves by ``δ(e_c − 1/d)`` and the offset gives ``δ/d`` back, while the
    mean-zero direction moves the centred stream by exactly ``δ·v`` with no offset.
    """
    model = tiny_model(tmp_path / "m", "gpt2")
    # The output of block 1: resid_post[1] in transformer_lens coordinates, hidden_states[2] in hf.
    head = write_head(tmp_path / "h", model, target_layer=1, target_neuron=3, layer_type="resid_post",
                      feature_layer=1 if coordinates == "transformer_lens" else 2, coordinates=coordinates)
    res = run_experiment(head, TEXTS, set=[-1.0, 2.0], add=[0.5], device="cpu", method="full",
                         controls={"units": [7], "directions": {"random": 4, "seed": 9}})
    w = torch.load(head / "head.pt", weights_only=True)["output.weight"][0].double().numpy()
    want = [w[7], *(random_directions(4, 9, w.size) @ w)]
    assert [c.slope for c in res.controls.controls] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert all(c.r_squared == pytest.approx(1.0, abs=1e-6) for c in res.controls.controls)


def test_random_directions_are_seeded_unit_norm_and_mean_zero():
    a = random_directions(5, seed=3, d_model=64)
    assert np.array_equal(a, random_directions(5, seed=3, d_model=64))
    assert not np.allclose(a, random_directions(5, seed=4, d_model=64))
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0) and np.allclose(a.sum(1), 0.0, atol=1e-12)
    cs = resolve({"units": {"random": 2, "seed": 0}, "directions": {"random": 5, "seed": 3}}, target=1,
                 width=64, d_model=64, layer_type="mlp_out")
    assert cs.labels[2:] == ("dir0", "dir1", "dir2", "dir3", "dir4") and len(cs.units) == 2
    assert np.array_equal(cs.directions, a)


def test_random_units_are_seeded_and_exclude_the_target():
    from neuronpatch.controls import resolve_units

    a = resolve_units({"units": {"random": 8, "seed": 1}}, target=3, width=64)
    assert a == resolve_units({"units": {"random": 8, "seed": 1}}, target=3, width=64)
    assert len(set(a)) == 8 and 3 not in a
    with pytest.raises(InputError, match="other than the target"):
        resolve_units([3], target=3, width=64)


def test_directions_on_an_mlp_neuron_are_refused_in_one_line(tmp_path):
    model = tiny_model(tmp_path / "m", "gpt2")
    head = write_head(tmp_path / "h", model, target_layer=0, target_neuron=3, feature_layer=-1)
    with pytest.raises(ControlsError) as e:
        run_experiment(head, TEXTS[:2], set=[0.0, 1.0], device="cpu", controls={"directions": DIRS})
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("controls.directions needs a residual-stream unit, but ")
    assert f"{head / 'config.json'} has layer_type 'post'" in msg
    assert "resid_post, resid_pre, mlp_out, attn_out" in msg and "controls.units" in msg


@pytest.mark.parametrize(("spec", "message"), [
    ({"directions": {"random": 0}}, "controls.directions.random is 0; expected an int in [1, 31]"),
    ({"directions": {"random": 32}}, "controls.directions.random is 32; expected an int in [1, 31]"),
    ({"directions": {"random": 2, "seed": -1}}, "controls.directions.seed is -1; expected an int >= 0"),
    ({"directions": 3}, "controls.directions is 3; expected {random: k, seed: s}"),
    ({"direction": {"random": 2}}, "controls: 'direction' is not a controls key; expected units"),
    ({}, "controls: nothing to patch"),
])
def test_bad_control_specs_are_one_line_each(spec, message):
    with pytest.raises(ControlsError) as e:
        resolve(spec, target=3, width=32, d_model=32, layer_type="resid_post")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_a_direction_patch_that_is_discarded_is_an_error(tmp_path, monkeypatch):
    from neuronpatch import engine

    model = tiny_model(tmp_path / "m", "gpt2")
    head = write_head(tmp_path / "h", model, target_layer=0, target_neuron=3, feature_layer=-1,
                      layer_type="resid_post")
    monkeypatch.setattr(engine.Along, "add", lambda self, out, delta: None)  # the edit never lands
    with pytest.raises(PatchError) as e:
        run_experiment(head, TEXTS, set=[5.0], device="cpu", controls={"directions": DIRS})
    msg = str(e.value)
    assert "along direction dir" in msg and "requested" in msg and "observed" in msg
    assert "did not take effect" in msg

