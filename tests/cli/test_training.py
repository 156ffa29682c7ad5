"""`neuronpatch train-head` and the shipped demo heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neuronpatch import load_head, run_experiment
from neuronpatch.cli import main
from neuronpatch.testing import tiny_gpt2
from neuronpatch.training import train_head

ROOT = Path(__file__).resolve().parents[2]
DEMO_INPUTS = (ROOT / "probes" / "inputs" / "demo.txt").read_text().splitlines()
SET_VALUES = [-0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
CORPUS = "\n\n".join(
    " ".join(f"word{(i * 7 + j) % 23} the cat sat on mat number {j % 10}" for j in range(12))
    for i in range(40)
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gpt2(tmp_path_factory.mktemp("m") / "tiny", n_layer=2)


@pytest.mark.parametrize("intervene", [False, True])
def test_train_head_writes_a_loadable_artifact(tmp_path, model_dir, capsys, intervene):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    out = tmp_path / "head"
    args = ["train-head", "--model", str(model_dir), "--layer", "0", "--neuron", "5",
            "--feature-layer", "0", "--corpus", str(corpus), "--windows", "200", "--out", str(out)]
    assert main(args + (["--intervene"] if intervene else [])) == 0
    printed = capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert f"held-out {cfg['training']['held_out_r2']:.4f}" in printed
    assert cfg["training"]["data"] == ("interventional" if intervene else "natural")
    head = load_head(out)
    # transformer_lens coordinates (the default): feature_layer 0 is block 0's output.
    assert head.config.target_neuron == 5 and head.config.feature_layer == 0
    assert head.config.coordinates == "transformer_lens" and cfg["coordinates"] == "transformer_lens"
    # The head really predicts the neuron on held-out style text.
    assert cfg["training"]["held_out_r2"] > 0.5
    res = run_experiment(out, ["the cat sat on mat number 3", "word5 the cat"], set=[0.0, 1.0])
    assert res.method == "linear"


def test_interventional_training_makes_the_head_track_the_unit(tmp_path, model_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    from safetensors.torch import load_file

    w_out = load_file(str(model_dir / "model.safetensors"))["transformer.h.0.mlp.c_proj.weight"][5]
    w_out = w_out - w_out.mean()  # transformer_lens coordinates of a LayerNorm model: centred
    rep = train_head(model=str(model_dir), layer=0, neuron=5, feature_layer=0, corpus=corpus,
                     windows=300, intervene=True, out=tmp_path / "h")
    w = load_head(rep.out_dir).linear_weight
    assert w is not None
    # The analytic slope of a linear head right after the unit is w·(W_out[n] − mean); trained on
    # interventions it should be close to 1.
    assert 0.7 < float(w @ w_out) < 1.3


def test_classification_head_gets_quantile_bin_edges(tmp_path, model_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    rep = train_head(model=str(model_dir), layer=0, neuron=5, feature_layer=1, corpus=corpus,
                     windows=200, head_type="classification", bins=4, out=tmp_path / "c",
                     epochs=50)
    cfg = json.loads((rep.out_dir / "config.json").read_text())
    edges = cfg["bin_edges"]
    assert len(edges) == 5 and edges == sorted(edges)
    assert rep.held_out_accuracy is not None
    assert load_head(rep.out_dir).config.bin_edges == tuple(edges)


def test_train_head_for_a_latent(tmp_path, model_dir, capsys):
    """--sae PATH --latent I: the head predicts the latent, and the head's config names the dictionary."""
    from neuronpatch.testing import write_sae

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    sae = write_sae(tmp_path / "sae", hook_name="blocks.0.hook_resid_post", d_in=32, alive=(2,))
    out = tmp_path / "head"
    args = ["train-head", "--model", str(model_dir), "--sae", str(sae), "--latent", "2",
            "--feature-layer", "1",
            "--corpus", str(corpus), "--windows", "200", "--intervene", "--out", str(out)]
    assert main(args) == 0
    assert f"latent 2 of {sae}" in capsys.readouterr().out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layer_type"] == "sae" and cfg["sae"] == "../sae" and cfg["target_layer"] == 0
    assert cfg["training"]["held_out_r2"] > 0.5
    res = run_experiment(out, ["the cat sat on mat number 3", "word5 the cat"], set=[0.0, 1.0, 2.0])
    assert res.layer_type == "sae" and res.active_inputs is not None
    assert 0.5 < res.slope < 1.5
    # Flags that do not go together are refused in one line.
    assert main(["train-head", "--sae", str(sae), "--neuron", "3", "--feature-layer", "1",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--sae PATH needs --latent I" in capsys.readouterr().err
    assert main(["train-head", "--model", str(model_dir), "--sae", str(sae), "--latent", "2", "--layer", "1",
                 "--feature-layer", "1", "--out", str(tmp_path / "y")]) == 2
    assert "the dictionary reads block 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--neuron", "999"], "--neuron 999 is invalid; expected an int in [0, 63]"),
        (["--layer", "7"], "--layer 7 is invalid; expected an int in [0, 1]"),
        (["--corpus", "EMPTY"], "no document has at least 4 words; nothing to train on"),
    ],
)
def test_train_head_refuses_nonsense(tmp_path, model_dir, capsys, extra, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    args = {"--layer": "0", "--neuron": "5"}
    rest: list[str] = []
    it = iter(extra)
    for flag in it:
        value = next(it)
        if flag in args:
            args[flag] = value
        else:
            rest += [flag, str(empty) if value == "EMPTY" else value]
    argv = ["train-head", "--model", str(model_dir), "--feature-layer", "1",
            "--out", str(tmp_path / "o"), *[x for kv in args.items() for x in kv], *rest]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


# ------------------------------------------------------------------ the shipped demo heads
def test_upstream_demo_head_correlates_but_has_slope_exactly_zero():
    res = run_experiment(ROOT / "probes/heads/demo_upstream", DEMO_INPUTS, set=SET_VALUES)
    assert res.slope == 0.0
    assert abs(res.baseline_correlation) >= 0.5


def test_causal_demo_head_slope_is_in_the_readme_range():
    res = run_experiment(ROOT / "probes/heads/demo_causal", DEMO_INPUTS, set=SET_VALUES)
    assert 0.8 <= res.slope <= 1.2  # docs/getting-started.md: "slope lies in 0.8–1.2"
    assert res.r_squared > 0.99
    assert abs(res.baseline_correlation) >= 0.5


def test_natural_demo_head_correlates_yet_barely_uses_the_neuron():
    res = run_experiment(ROOT / "probes/heads/demo_natural", DEMO_INPUTS, set=SET_VALUES)
    assert res.baseline_correlation > 0.9
    assert res.slope < 0.4


def _fake_report(held_out_r2: float):
    from neuronpatch.training import TrainReport

    return TrainReport(Path("h"), 80, 20, 0.31, held_out_r2, None, None, 1.0, 0.5)


TRAIN_ARGS = ["train-head", "--layer", "1", "--neuron", "301", "--feature-layer", "2", "--out", "h"]


def test_a_negative_held_out_r2_is_a_warning_and_min_r2_fails(monkeypatch, capsys):
    import neuronpatch.training as training

    monkeypatch.setattr(training, "train_head", lambda **kw: _fake_report(-5.72))
    assert main(TRAIN_ARGS) == 0
    err = capsys.readouterr().err
    assert "warning: held-out R² -5.72 < 0: the head predicts held-out activations worse" in err
    assert main([*TRAIN_ARGS, "--min-r2", "0.5"]) == 1
    assert "error: held-out R² -5.7200 is below --min-r2 0.5" in capsys.readouterr().err
    monkeypatch.setattr(training, "train_head", lambda **kw: _fake_report(0.9))
    assert main([*TRAIN_ARGS, "--min-r2", "0.5"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_train_head_logs_through_the_progress_bar_writer(monkeypatch):
    import tqdm.auto

    import neuronpatch.training as training

    written = []
    monkeypatch.setattr(training, "train_head", lambda **kw: _fake_report(0.9))
    monkeypatch.setattr(tqdm.auto.tqdm, "write", classmethod(lambda cls, s, **kw: written.append(s)))
    assert main(TRAIN_ARGS) == 0
    assert any(line.startswith("Trained a regression head") for line in written)
    assert any("held-out 0.9000" in line for line in written)
