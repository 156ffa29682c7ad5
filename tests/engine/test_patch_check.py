"""Every patch is checked: a hook that never fires, or whose edit is discarded, is an error."""

from __future__ import annotations

from pathlib import Path

import pytest

from neuronpatch import architecture, run_experiment
from neuronpatch.errors import PatchError
from neuronpatch.testing import tiny_model, write_head

TEXTS = ["The cat sat on the mat.", "Numbers 3 4 5", "Machine learning models are hard."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("gpt2") / "m", "gpt2")


def _sabotage(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    real = architecture.attach

    def attach(arch, site, fn, batch):  # type: ignore[no-untyped-def]
        if fn.__name__ != "patch":
            return real(arch, site, fn, batch)
        if how == "never":  # registered, never fires
            class Handle:
                def remove(self) -> None:
                    pass
            return Handle()

        def discard(t):  # type: ignore[no-untyped-def]
            fn(t)  # runs, but its edit is thrown away (a no-op hook)
            return None
        return real(arch, site, discard, batch)

    monkeypatch.setattr(architecture, "attach", attach)


@pytest.mark.parametrize("method", ["kv", "full"])
@pytest.mark.parametrize("layer_type", ["post", "mlp_out", "resid_post"])
def test_a_discarded_patch_is_an_error_naming_hook_requested_and_observed(
        tmp_path, model_dir, monkeypatch, method, layer_type):
    head = write_head(tmp_path / "h", model_dir, target_layer=0, target_neuron=3, feature_layer=-1,
                      layer_type=layer_type)
    _sabotage(monkeypatch, "discard")
    with pytest.raises(PatchError) as e:
        run_experiment(head, TEXTS, set=[5.0, 7.0], device="cpu", method=method)
    msg = str(e.value)
    assert "column 3" in msg and "requested" in msg and "observed" in msg
    assert "did not take effect" in msg


def test_a_patch_hook_that_never_fires_is_an_error(tmp_path, model_dir, monkeypatch):
    head = write_head(tmp_path / "h", model_dir, target_layer=0, target_neuron=3, feature_layer=-1)
    _sabotage(monkeypatch, "never")
    with pytest.raises(PatchError, match="never ran"):
        run_experiment(head, TEXTS, set=[5.0], device="cpu", method="kv")


def test_an_honest_patch_passes_the_check(tmp_path, model_dir):
    head = write_head(tmp_path / "h", model_dir, target_layer=0, target_neuron=3, feature_layer=-1)
    res = run_experiment(head, TEXTS, set=[5.0, 7.0], device="cpu", method="full")
    assert res.patched_activation.ravel().tolist() == pytest.approx([5.0, 7.0] * 3, abs=1e-5)
