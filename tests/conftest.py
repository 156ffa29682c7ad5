"""Shared fixtures: one tiny offline model and heads with known causal slopes, per session."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class ProbeHeads:
    """Heads on one tiny GPT-2 whose slopes are known without running the engine.

    ``causal`` reads ``hidden_states[1]`` right after neuron 3 of layer 0 with a
    linear head, so its slope is ``w · W_out[3]`` (``causal_slope``, computed
    here from the weight files) and R² is 1. ``blind`` reads the residual
    stream before layer 1's neuron, so no patch reaches it: slope 0.
    """

    model: Path
    heads: Path  # directory holding causal/ and blind/
    causal_slope: float

    @property
    def causal(self) -> Path:
        return self.heads / "causal"

    @property
    def blind(self) -> Path:
        return self.heads / "blind"

    def copy_heads(self, dest: Path) -> Path:
        """Copy both heads under ``dest`` (for probe files that use relative paths and globs)."""
        shutil.copytree(self.heads, dest, dirs_exist_ok=True)
        return dest


@pytest.fixture(scope="session")
def probe_heads(tmp_path_factory: pytest.TempPathFactory) -> ProbeHeads:
    import torch

    from neuronpatch.testing import tiny_gpt2, write_head

    root = tmp_path_factory.mktemp("probe_heads")
    model = tiny_gpt2(root / "model", n_layer=2)
    heads = root / "heads"
    write_head(heads / "causal", model, target_layer=0, target_neuron=3, feature_layer=1,
               coordinates="hf")
    write_head(heads / "blind", model, target_layer=1, target_neuron=3, feature_layer=1,
               coordinates="hf")
    # The oracle, from the files alone: Δfeatures = Δa · W_out[3], prediction = w · features + b.
    w = torch.load(heads / "causal" / "head.pt", weights_only=True)["output.weight"][0]
    from safetensors.torch import load_file

    weights = load_file(str(model / "model.safetensors"))
    w_out = weights["transformer.h.0.mlp.c_proj.weight"][3]  # Conv1D: [d_mlp, d_model]
    _warm_up_outside_pytester(heads / "blind")
    return ProbeHeads(model=model, heads=heads, causal_slope=float(w @ w_out))


@pytest.fixture(autouse=True)
def _imports_before_pytester(request: pytest.FixtureRequest) -> None:
    """Every test that uses ``pytester`` gets the engine's imports done before pytester starts,
    and inner pytest runs that keep their tests in file order.

    pytester snapshots ``sys.modules`` when it is set up and restores the snapshot when the
    test ends, so whatever a test imports after that is dropped again: importing torch a
    second time in one process fails, and a dropped ``neuronpatch.models`` forgets its loaded
    models. Autouse fixtures are set up before the fixtures a test asks for, so this runs
    before ``pytester`` takes its snapshot whatever order the tests run in (``-p randomly``,
    xdist), not only when an earlier test happened to import them.

    The suite runs under pytest-randomly too; the inner runs of a test are part of its
    fixture, and their output is read in order, so they are not shuffled.
    """
    if "pytester" in request.fixturenames:
        request.getfixturevalue("probe_heads")
        request.getfixturevalue("pytester")  # (it clears PYTEST_ADDOPTS when it starts)
        request.getfixturevalue("monkeypatch").setenv("PYTEST_ADDOPTS", "-p no:randomly")


def _warm_up_outside_pytester(head: Path) -> None:
    # In-process pytester runs drop the modules an inner session imported, and
    # re-importing transformer_lens (pyarrow extension types) fails. One experiment
    # here imports everything a run needs and boots the model into the engine's cache.
    import importlib

    from neuronpatch.engine import run_experiment

    run_experiment(head, inputs=["warm up"], set=[0, 1])
    for name in ("neuronpatch.plots", "matplotlib.pyplot", "pytest_html.extras"):
        # pytest_html is optional: without it the pytest-html test is the only one affected
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
