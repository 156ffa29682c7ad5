"""`neuronpatch run`: the notebook as a command, and one clear line for bad input."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neuronpatch.cli import main
from neuronpatch.testing import tiny_gpt2, write_head

SEED_KEYS = {
    "model_path", "head_type", "target_layer", "target_neuron", "baseline_correlation", "slope",
    "intercept", "r_squared", "scaling_factors", "avg_activation_changes",
    "avg_prediction_changes", "per_input_sensitivity", "timestamp",
}
FIGURES = {"baseline_correlation.png", "scaling_experiment.png", "pred_vs_act_change_all.png",
           "pred_vs_act_regression.png", "per_input_sensitivity.png"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gpt2(tmp_path_factory.mktemp("m") / "tiny", n_layer=2)


@pytest.fixture
def head(tmp_path: Path, model_dir: Path) -> Path:
    return write_head(tmp_path / "head", model_dir, target_layer=0, target_neuron=3,
                      feature_layer=1, coordinates="hf")


def test_run_prints_the_notebook_tables_and_writes_artifacts(head, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(head), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for section in ("Baseline (8 inputs)", "Experiment scale=0.25", "Experiment scale=2",
                    "Regression of Δ prediction on Δ activation", "Per-input sensitivity",
                    "The cat sat on the mat.", "→ slope"):
        assert section in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary.keys() >= SEED_KEYS
    assert summary["scaling_factors"] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0]
    assert len(summary["per_input_sensitivity"]) == 8
    assert {p.name for p in out.glob("*.png")} == FIGURES
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A linear head right after the neuron: the printed slope is the analytic one.
    w = torch.load(head / "head.pt", weights_only=True)["output.weight"][0]
    from transformers import GPT2LMHeadModel

    model_dir = json.loads((head / "config.json").read_text())["base_model_name"]
    w_out = GPT2LMHeadModel.from_pretrained(model_dir).transformer.h[0].mlp.c_proj.weight[3]
    assert summary["slope"] == pytest.approx(float(w @ w_out.detach()), rel=1e-4)


def test_inputs_and_interventions_from_flags(head, tmp_path, capsys):
    inputs = tmp_path / "in.txt"
    inputs.write_text("One line here.\n\nAnother line, longer than the first one.\n")
    out = tmp_path / "o"
    rc = main(["run", str(head), "--inputs", str(inputs), "--set", "0", "2", "--zero",
               "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interventions"] == ["set=0", "set=2", "zero"]
    assert [r["text"] for r in summary["inputs"]] == ["One line here.",
                                                      "Another line, longer than the first one."]


@pytest.mark.parametrize("style", ["one flag", "repeated"])
def test_text_takes_several_texts_or_repeats(head, tmp_path, style):
    texts = ["The cat sat on the mat.", "A second sentence here.", "And a third one."]
    flags = ["--text", *texts] if style == "one flag" else [a for t in texts for a in ("--text", t)]
    out = tmp_path / "o"
    assert main(["run", str(head), *flags, "--set", "0", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [r["text"] for r in summary["inputs"]] == texts


@pytest.mark.parametrize("command", ["run", "rank", "train-head", "conformance"])
def test_an_argument_error_shows_the_subcommands_usage(command, tmp_path, capsys):
    given = {"run": [str(tmp_path)], "rank": [str(tmp_path)], "conformance": [],
             "train-head": ["--layer", "0", "--neuron", "1", "--feature-layer", "1", "--out", str(tmp_path)]}
    with pytest.raises(SystemExit) as exit_:
        main([command, *given[command], "--frobnicate", "7"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: neuronpatch {command} ")
    assert err.rstrip().endswith(f"neuronpatch {command}: error: unrecognized arguments: --frobnicate 7")


def _break(head: Path, how: str) -> list[str]:
    extra: list[str] = []
    if how == "missing dir":
        return [str(head.parent / "nope")]
    if how == "bad json":
        (head / "config.json").write_text('{"target_layer": 0,')
    elif how == "unsafe pickle":
        class Evil:
            def __reduce__(self):
                return (os.system, ("echo pwned",))
        (head / "head.pt").write_bytes(pickle.dumps({"output.weight": Evil()}))
    elif how == "shape mismatch":
        torch.save({"output.weight": torch.zeros(1, 7), "output.bias": torch.zeros(1)},
                   head / "head.pt")
    elif how == "nan weights":
        torch.save({"output.weight": torch.full((1, 32), float("nan")),
                    "output.bias": torch.zeros(1)}, head / "head.pt")
    elif how == "empty input":
        extra = ["--text", "   "]
    elif how == "over-long input":
        extra = ["--text", "word " * 300]
    return [str(head), *extra]


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing dir", "head directory not found"),
        ("bad json", "invalid JSON at line 1"),
        ("unsafe pickle", "refused to load"),
        ("shape mismatch", "input width"),
        ("nan weights", "NaN/inf"),
        ("empty input", "is empty"),
        ("over-long input", "context is 128 tokens"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(head, tmp_path, capsys, how, message):
    args = _break(head, how)
    assert main(["run", *args, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("neuronpatch: error: ")


def test_no_traceback_from_the_real_command(head, tmp_path):
    (head / "config.json").write_text("not json")
    proc = subprocess.run(
        [sys.executable, "-m", "neuronpatch.cli", "run", str(head)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"neuronpatch: error: {head / 'config.json'}: invalid JSON at line 1 column 1: "
        "Expecting value"
    ]
