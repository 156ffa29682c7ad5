"""Expert neurons in probe files, under a real pytest run.

The per-input slopes are checked against the analytic value from the weight files and the
router's own output, never against the engine: the head reads block 1's output in hf
coordinates, right where block 1's experts write, so a neuron of expert ``e`` moves the
features by ``g · Δ · down_proj[e][:, f]`` (``g`` the token's routing weight) and a linear
head's per-input slope is ``g · (w · down_proj[e][:, f])``.
"""

from __future__ import annotations

import json
import textwrap

import pytest

pytest_plugins = ["pytester"]

INPUTS = ["The cat sat on the mat.", "Machine learning models", "The quick brown fox jumps",
          "Numbers 3 4 5", "Where did the river go?", "Seven silver spoons"]
NEURON = 5


def test_an_expert_neuron_probe_reports_its_slopes_and_the_inputs_left_out(pytester):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neuronpatch.testing import tiny_model, write_head

    model_dir = tiny_model(pytester.path / "model", "mixtral")
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    chosen = []  # per input: {expert: routing weight} at the last token of block 1, the router's own
    seen: dict = {}
    h = hf.model.layers[1].mlp.gate.register_forward_hook(lambda m, a, out: seen.update(out=out))
    for text in INPUTS:
        with torch.no_grad():
            hf(torch.tensor([tok(text)["input_ids"]]))
        _, weights, index = seen["out"]
        chosen.append({int(e): float(w) for e, w in zip(index[-1], weights[-1], strict=True)})
    h.remove()
    expert = next(e for e in range(4) if 2 <= sum(e in c for c in chosen) < len(INPUTS))
    for name, layer in (("reads", 1), ("before", 0)):
        write_head(pytester.path / "heads" / name, model_dir, target_layer=1, target_neuron=NEURON,
                   layer_type="expert_post", target_expert=expert, feature_layer=layer + 1, coordinates="hf",
                   seed=5)
    w = torch.load(pytester.path / "heads" / "reads" / "head.pt", weights_only=True)["output.weight"][0]
    column = hf.model.layers[1].mlp.experts.down_proj[expert][:, NEURON].detach()
    per_unit = float(w @ column)
    (pytester.path / "e.probe.yaml").write_text(textwrap.dedent(f"""
        name: reads
        head: heads/reads
        inputs: {json.dumps(INPUTS)}
        interventions: {{set: [0, 1, 2]}}
        controls: {{units: [1, 2]}}
        expect:
          per_input_r2: {{min: 0.9999}}
        ---
        name: before
        head: heads/before
        inputs: {json.dumps(INPUTS)}
        interventions: {{set: [0, 1, 2]}}
        expect:
          slope: {{abs_max: 1e-9}}
        """).lstrip("\n"))
    result = pytester.runpytest("-p", "no:cacheprovider", "--neuronpatch-artifacts", "arts")
    result.assert_outcomes(passed=2)
    summary = next(p for p in (pytester.path / "arts").rglob("summary.json") if "reads" in str(p))
    data = json.loads(summary.read_text())
    routed = [t for t, c in zip(INPUTS, chosen, strict=True) if expert in c]
    assert data["layer_type"] == "expert_post" and data["target_expert"] == expert
    assert data["unit_hook"] == f"blocks.1.mlp.experts.{expert}.hook_post"
    assert data["unrouted_inputs"] == [t for t in INPUTS if t not in routed]
    assert [x["text"] for x in data["per_input_sensitivity"]] == routed
    for x in data["per_input_sensitivity"]:
        want = chosen[INPUTS.index(x["text"])][expert] * per_unit
        assert abs(x["slope"] - want) <= 1e-4 * max(1.0, abs(want)), (x["text"], x["slope"], want)
    assert data["routing_changed"] is None  # the head reads before any later layer routes
    assert any("not routed at the patched token" in n for n in data["notes"])


@pytest.fixture(autouse=True)
def _no_cache_dir(monkeypatch):
    monkeypatch.delenv("NEURONPATCH_CACHE", raising=False)
