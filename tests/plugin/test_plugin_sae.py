"""Dictionary latents in probe files, under a real pytest run.

The slope is checked against the analytic value from the weight files, never against the
engine: the head ``latent`` reads ``hidden_states[1]`` (the output of block 0, in hf
coordinates), right where an SAE on ``blocks.0.hook_resid_post`` writes, so a latent's slope
is ``w · W_dec[i]`` for the head's linear weight ``w``.
"""

from __future__ import annotations

import json
import textwrap

import pytest

pytest_plugins = ["pytester"]

INPUTS = ["The cat sat on the mat.", "Machine learning models", "The quick brown fox jumps",
          "Numbers 3 4 5"]


def test_a_latent_probe_reports_its_slope_and_says_when_scaling_cannot_move_it(pytester, probe_heads):
    import torch
    from safetensors.torch import load_file

    from neuronpatch.testing import write_head, write_sae

    sae = write_sae(pytester.path / "sae", hook_name="blocks.0.hook_resid_post", d_in=32, dead=(4,),
                    alive=(2,))
    for name, latent in (("latent", 2), ("dead", 4)):
        write_head(pytester.path / "heads" / name, probe_heads.model, target_layer=0, target_neuron=latent,
                   layer_type="sae", sae="../../sae", feature_layer=1, coordinates="hf", seed=5)
    w = torch.load(pytester.path / "heads" / "latent" / "head.pt", weights_only=True)["output.weight"][0]
    slope = float(w @ load_file(str(sae / "sae_weights.safetensors"))["W_dec"][2])
    (pytester.path / "s.probe.yaml").write_text(textwrap.dedent(f"""
        name: latent
        head: heads/latent
        inputs: {json.dumps(INPUTS)}
        interventions: {{set: [0, 1, 2]}}
        controls: {{units: {{random: 2, seed: 0}}}}
        expect:
          slope: [{slope - 1e-4}, {slope + 1e-4}]
          r_squared: {{min: 0.999}}
        ---
        name: dead-scaled
        head: heads/dead
        inputs: {json.dumps(INPUTS)}
        interventions: {{scale: [0, 2]}}
        expect:
          slope: {{abs_max: 0.01}}
        ---
        name: dead-set
        head: heads/dead
        inputs: {json.dumps(INPUTS)}
        interventions: {{set: [0, 2]}}
        expect:
          active_fraction: {{max: 0}}
        """).lstrip("\n"))
    result = pytester.runpytest("-p", "no:cacheprovider", "--neuronpatch-artifacts", "arts")
    result.assert_outcomes(passed=2, failed=1)
    # A slope of 0 on a latent that never fired is not "ignores it": the probe fails and says why.
    result.stdout.fnmatch_lines(["*the latent is active on 0 of 4 inputs: scale patches cannot move*"])
    summary = next(p for p in (pytester.path / "arts").rglob("summary.json") if "dead-set" in str(p))
    data = json.loads(summary.read_text())
    assert data["layer_type"] == "sae" and data["metrics"]["active_fraction"] == 0
    assert data["unit_hook"] == "blocks.0.hook_resid_post"


@pytest.fixture(autouse=True)
def _no_cache_dir(monkeypatch):
    monkeypatch.delenv("NEURONPATCH_CACHE", raising=False)
