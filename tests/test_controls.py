"""Control units: more patched rows over one clean run, each equal to patching that unit alone."""

from __future__ import annotations

import json

import pytest

from neuronpatch import load_head, run_experiment
from neuronpatch.errors import InputError
from neuronpatch.testing import tiny_model, write_head

TEXTS = ["The cat sat on the mat.", "Numbers 3 4 5 6", "Machine learning models are hard to read."]


@pytest.mark.parametrize(("arch", "feature_layer", "route"), [
    ("gpt2", -1, "kv"), ("gpt_neox", -1, "kv"), ("llama", -1, "kv"),
    # The head reads right after the unit's layer: controls ride the linear shortcut.
    ("gpt2", 0, "linear"), ("llama", 0, "linear"),
])
def test_each_control_slope_equals_a_run_on_that_unit(tmp_path, arch, feature_layer, route):
    model = tiny_model(tmp_path / "m", arch)
    head = write_head(tmp_path / "h", model, target_layer=0, target_neuron=3, feature_layer=feature_layer)
    res = run_experiment(head, TEXTS, set=[-1.0, 0.5], mean=True, device="cpu", controls=[5, 9])
    assert res.method == route
    assert [c.unit for c in res.controls.controls] == [5, 9]
    cfg = json.loads((head / "config.json").read_text())
    for c in res.controls.controls:
        cfg["target_neuron"] = c.unit
        (head / "config.json").write_text(json.dumps(cfg))
        # Alone, through the full route: each control is mean-ablated to its own mean.
        alone = run_experiment(load_head(head), TEXTS, set=[-1.0, 0.5], mean=True, device="cpu",
                               method="full")
        assert c.slope == pytest.approx(alone.slope, rel=1e-4, abs=1e-6)
        assert c.r_squared == pytest.approx(alone.r_squared, rel=1e-4, abs=1e-6)
    m = res.metrics()
    assert m["specificity"] == pytest.approx(abs(res.slope) / max(abs(s) for s in m["control_slope"]))
    lo, hi = m["specificity_ci95"]
    assert lo <= hi


def test_random_controls_are_seeded_and_exclude_the_target(tmp_path):
    from neuronpatch.controls import resolve_units

    a = resolve_units({"units": {"random": 8, "seed": 1}}, target=3, width=64)
    assert a == resolve_units({"units": {"random": 8, "seed": 1}}, target=3, width=64)
    assert len(set(a)) == 8 and 3 not in a
    with pytest.raises(InputError, match="other than the target"):
        resolve_units([3], target=3, width=64)
