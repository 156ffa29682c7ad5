"""Head artifacts: every config error names file, key, value and what is allowed."""

from __future__ import annotations

import json
import re
import shutil
import textwrap
from pathlib import Path

import pytest
import torch

from neuronpatch import load_head, run_experiment
from neuronpatch.errors import HeadConfigError
from neuronpatch.testing import tiny_gpt2, write_head

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_gpt2(tmp_path_factory.mktemp("m") / "tiny", n_layer=2)


def edit_config(head: Path, **changes: object) -> None:
    cfg = json.loads((head / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (head / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"target_layer": "one"}, r"key 'target_layer' = 'one' is invalid; expected an integer"),
        ({"target_neuron": None}, r"key 'target_neuron' = '<missing>'"),
        ({"layer_type": "mlp"}, r"key 'layer_type' = 'mlp' is invalid; expected one of post"),
        ({"head_type": "ranking"}, r"key 'head_type' = 'ranking' .* regression, classification, token"),
        ({"token_pos": "first"}, r"key 'token_pos' = 'first' .* 'last' or an integer"),
        ({"weight_processing": "fold"}, r"key 'weight_processing' = 'fold'"),
        ({"head_config": {"dropout": 1.5}}, r"key 'head_config.dropout' = 1.5 .* \[0, 1\)"),
        ({"head_config": {"activaton": "relu"}}, r"key 'head_config.activaton' .* did you mean 'activation'"),
        ({"head_config": {"temperature": 2}}, r"key 'head_config.temperature' .* no such key"),
        ({"head_config": {"activation": "tanh"}},
         r"key 'head_config.activation' = 'tanh' .* gelu, relu, silu"),
        ({"head_config": {"class_name": "ClassificationHead"}}, r"'RegressionHead' for head_type"),
        ({"feature_layr": 2}, r"key 'feature_layr' .* did you mean 'feature_layer'"),
        ({"coordinates": "tl"}, r"key 'coordinates' = 'tl' .* transformer_lens, hf"),
        ({"weight_processing": "none", "coordinates": "transformer_lens"}, r"agreement with coordinates"),
        ({"base_model_name": ""}, r"key 'base_model_name'"),
    ],
)
def test_config_errors_at_load(tmp_path, model_dir, changes, pattern):
    head = write_head(tmp_path / "h", model_dir, target_layer=0, target_neuron=1)
    edit_config(head, **changes)
    with pytest.raises(HeadConfigError, match=pattern) as info:
        load_head(head)
    assert str(head / "config.json") in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("changes", "pattern"),
    [
        ({"target_layer": 5}, r"key 'target_layer' = 5 is invalid; expected an int in \[0, 1\]"),
        ({"target_neuron": 64}, r"key 'target_neuron' = 64 .* \[0, 63\]"),
        ({"feature_layer": 7}, r"key 'feature_layer' = 7 .* \[-2, 1\] \(transformer_lens"),
        ({"feature_layer": 7, "coordinates": "hf"}, r"key 'feature_layer' = 7 .* \[-3, 2\] \(hf"),
        ({"feature_hook": "blocks.9.nothing"}, r"key 'feature_hook' = 'blocks.9.nothing'"),
    ],
)
def test_config_errors_against_the_model(tmp_path, model_dir, changes, pattern):
    head = write_head(tmp_path / "h", model_dir, target_layer=0, target_neuron=1)
    edit_config(head, **changes)
    with pytest.raises(HeadConfigError, match=pattern):
        run_experiment(head, ["The cat."])


def test_bin_edges_must_match_classes(tmp_path, model_dir):
    head = write_head(tmp_path / "h", model_dir, target_layer=0, target_neuron=1,
                      head_type="classification", n_classes=3, bin_edges=[0.0, 1.0, 2.0])
    with pytest.raises(HeadConfigError, match=r"'bin_edges' = \[0.0, 1.0, 2.0\] .* 4 edges"):
        load_head(head)
    edit_config(head, bin_edges=[0.0, 2.0, 1.0, 3.0])
    with pytest.raises(HeadConfigError, match="strictly increasing"):
        load_head(head)


def test_weight_problems(tmp_path, model_dir):
    head = write_head(tmp_path / "h", model_dir, target_layer=0, target_neuron=1)
    sd = torch.load(head / "head.pt", weights_only=True)
    sd["output.weight"][0, 0] = float("nan")
    torch.save(sd, head / "head.pt")
    with pytest.raises(HeadConfigError, match="NaN/inf"):
        load_head(head)
    sd["output.weight"] = torch.zeros(1, 5)
    torch.save(sd, head / "head.pt")
    with pytest.raises(HeadConfigError, match=r"input width.* 5 .* 32 \(d_model"):
        run_experiment(head, ["The cat."])


def test_missing_and_malformed_files(tmp_path, model_dir):
    with pytest.raises(HeadConfigError, match="head directory not found"):
        load_head(tmp_path / "nope")
    head = write_head(tmp_path / "h", model_dir, target_layer=0, target_neuron=1)
    (head / "config.json").write_text("{bad json")
    with pytest.raises(HeadConfigError, match="invalid JSON at line 1"):
        load_head(head)
    head2 = write_head(tmp_path / "h2", model_dir, target_layer=0, target_neuron=1)
    (head2 / "head.pt").unlink()
    with pytest.raises(HeadConfigError, match=r"no head\.pt or head\.safetensors"):
        load_head(head2)


def test_safetensors_head_equals_pt_head(tmp_path, model_dir):
    a = write_head(tmp_path / "a", model_dir, target_layer=0, target_neuron=1, seed=3)
    b = write_head(tmp_path / "b", model_dir, target_layer=0, target_neuron=1, seed=3,
                   fmt="safetensors")
    ra = run_experiment(a, ["The cat sat."], set=[0.0, 1.0])
    rb = run_experiment(b, ["The cat sat."], set=[0.0, 1.0])
    # Same numbers; the last bits may differ with the tensors' memory alignment.
    assert abs(ra.patched_prediction - rb.patched_prediction).max() < 1e-6


def test_token_head_resolves_digits_through_the_tokenizer(tmp_path, model_dir):
    from transformers import AutoTokenizer

    head = write_head(tmp_path / "t", model_dir, target_layer=0, target_neuron=1, head_type="token")
    tok = AutoTokenizer.from_pretrained(model_dir)
    expected = tuple(tok.encode(d, add_special_tokens=False)[0] for d in "0123456789")
    from neuronpatch import load_model

    ids = load_head(head).digit_token_ids(load_model(model_dir))
    assert ids == expected
    assert ids != tuple(range(48, 58))  # not ASCII codes


# ----- heads from the seed pipeline's unfrozen runs ----------------------------------------------
def _pipeline_run(tmp_path, probe_heads, unfreezing):
    """A run laid out as the seed pipeline writes it: models/<run>/best_model/ and its metrics."""
    import shutil

    run = tmp_path / "models" / "run1"
    shutil.copytree(probe_heads.causal, run / "best_model")
    if unfreezing is not ...:
        metrics = {"best_val_loss": 0.12, **({} if unfreezing is None else {"unfreezing": unfreezing})}
        (run / "training_metrics.json").write_text(json.dumps(metrics))
    return run / "best_model"


def test_a_head_from_an_unfrozen_run_is_refused_by_name(tmp_path, probe_heads):
    from neuronpatch.errors import UnfrozenHeadError

    head = _pipeline_run(tmp_path, probe_heads, {"strategy": "after_target", "unfrozen_params": 21254400})
    with pytest.raises(UnfrozenHeadError) as info:
        load_head(head)
    metrics = head.resolve().parent / "training_metrics.json"
    assert str(info.value) == (
        f"{head}: this head was trained with the base model's layers unfrozen ({metrics}: "
        "unfreezing.strategy = after_target, 21,254,400 parameters); the pipeline saved only the "
        "head, so on the original model its numbers mean nothing; to read it on the fine-tuned "
        "model, name that checkpoint (probe key model:, --model, or model= in the API)")


def _fine_tuned(probe_heads, dest, factor: float = 2.0):
    """A second checkpoint of the probe model: W_out[3] of layer 0 times ``factor``, the rest equal.

    The causal head's slope on it is ``factor`` times its slope on the base model, from the
    files alone (Δfeatures = Δa · W_out[3])."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(probe_heads.model, dest)
    weights = load_file(str(dest / "model.safetensors"))
    weights["transformer.h.0.mlp.c_proj.weight"][3] *= factor
    save_file(weights, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_a_head_runs_against_another_checkpoint_by_path(tmp_path, probe_heads):
    from neuronpatch import run_experiment

    tuned = _fine_tuned(probe_heads, tmp_path / "tuned")
    base = run_experiment(probe_heads.causal, set=[0, 1, 2], device="cpu")
    other = run_experiment(probe_heads.causal, set=[0, 1, 2], device="cpu", model=str(tuned))
    assert base.slope == pytest.approx(probe_heads.causal_slope, rel=1e-4)
    assert other.slope == pytest.approx(2 * probe_heads.causal_slope, rel=1e-4)
    assert other.model_name == str(tuned) and other.summary()["base_model"] == str(tuned)


def test_an_unfrozen_head_reads_on_the_fine_tuned_checkpoint(tmp_path, probe_heads):
    from neuronpatch import run_experiment

    head = _pipeline_run(tmp_path, probe_heads, {"strategy": "after_target", "unfrozen_params": 100})
    tuned = _fine_tuned(probe_heads, tmp_path / "tuned")
    res = run_experiment(head, set=[0, 1, 2], device="cpu", model=tuned)
    assert res.slope == pytest.approx(2 * probe_heads.causal_slope, rel=1e-4)
    with pytest.raises(HeadConfigError, match="unfrozen"):  # on the base model it is still refused
        run_experiment(head, set=[0, 1, 2], device="cpu", model=str(probe_heads.model))


def test_a_checkpoint_of_other_shapes_is_refused_naming_it(tmp_path, probe_heads):
    from neuronpatch import run_experiment
    from neuronpatch.testing import tiny_gpt2

    wide = tiny_gpt2(tmp_path / "wide", n_layer=2, n_embd=48)
    with pytest.raises(HeadConfigError, match=rf"d_model of {re.escape(str(wide))}"):
        run_experiment(probe_heads.causal, set=[0, 1], device="cpu", model=str(wide))


@pytest.mark.parametrize("unfreezing", [{"strategy": "none", "unfrozen_params": 0}, None, ...],
                         ids=["frozen", "no unfreezing key", "no metrics file"])
def test_a_head_from_a_frozen_run_reads_as_before(tmp_path, probe_heads, unfreezing):
    head = load_head(_pipeline_run(tmp_path, probe_heads, unfreezing))
    assert head.config.target_neuron == 3


def test_malformed_training_metrics_are_one_line(tmp_path, probe_heads):
    head = _pipeline_run(tmp_path, probe_heads, "after_target")
    with pytest.raises(HeadConfigError, match=r"training_metrics.json: key 'unfreezing' = 'after_target' "
                                              r"is invalid; expected an object"):
        load_head(head)
    (head.parent / "training_metrics.json").write_text("{not json")
    with pytest.raises(HeadConfigError, match=r"training_metrics\.json") as info:
        load_head(head)
    assert "\n" not in str(info.value)


def test_the_cli_and_pytest_refuse_an_unfrozen_head_in_one_line(tmp_path, probe_heads, pytester, capsys):
    from neuronpatch.cli import main

    head = _pipeline_run(tmp_path, probe_heads, {"strategy": "all", "unfrozen_params": 1000})
    assert main(["run", str(head), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("neuronpatch: error: ") and err.count("\n") == 1
    assert "unfreezing.strategy = all, 1,000 parameters" in err and not (tmp_path / "out").exists()

    pytester.makefile(".probe.yaml", p=f"name: unfrozen\nhead: {head}\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--neuronpatch-allow-outside-rootdir")
    result.assert_outcomes(errors=1)
    assert "Traceback" not in result.stdout.str()
    result.stdout.re_match_lines([r"probe 'unfrozen' could not run \(head .*\): UnfrozenHeadError: .*"
                                  r"unfreezing.strategy = all, 1,000 parameters.*mean nothing.*"])


def test_a_head_path_one_typo_off_gets_a_suggestion(tmp_path, probe_heads):
    import shutil

    shutil.copytree(probe_heads.causal, tmp_path / "demo_causal")
    with pytest.raises(HeadConfigError) as info:
        load_head(tmp_path / "demo_casual")
    assert str(info.value) == (f"{tmp_path / 'demo_casual'}: head directory not found; "
                               f"did you mean {tmp_path / 'demo_causal'}?")
    with pytest.raises(HeadConfigError) as info:
        load_head(tmp_path / "something_else")
    assert str(info.value) == f"{tmp_path / 'something_else'}: head directory not found"


def test_a_probe_file_and_the_cli_name_another_checkpoint(tmp_path, probe_heads, pytester, capsys):
    """`model:` in a probe file and `--model` on the CLI run a head against a second checkpoint;
    the summary, the cache key and the baseline record which one ran."""
    from neuronpatch.cli import main

    tuned = _fine_tuned(probe_heads, pytester.path / "tuned")
    head = _pipeline_run(pytester.path, probe_heads, {"strategy": "after_target", "unfrozen_params": 100})
    assert main(["run", str(head), "--model", str(tuned), "--set", "0", "1", "2", "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["slope"] == pytest.approx(2 * probe_heads.causal_slope, rel=1e-4)
    assert summary["base_model"] == str(tuned)
    capsys.readouterr()

    rel = head.relative_to(pytester.path)
    pytester.makefile(".probe.yaml", p=textwrap.dedent(f"""
        name: tuned
        head: {rel}
        model: tuned
        interventions: {{set: [0, 1, 2]}}
        expect: {{slope: [{2 * probe_heads.causal_slope - 1e-3}, {2 * probe_heads.causal_slope + 1e-3}]}}
        baseline: {{file: base.json}}
        """))
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\nneuronpatch_figures = "none"\n'
                                         'neuronpatch_device = "cpu"\n')
    result = pytester.runpytest("-p", "no:cacheprovider", "--neuronpatch-update-baselines",
                                "--neuronpatch-cache", "cache")
    result.assert_outcomes(passed=1)
    assert json.loads((pytester.path / "base.json").read_text())["model"] == str(tuned.resolve())
    # Warm: the cache key is the tuned checkpoint's, so the result is read back, not re-measured.
    again = pytester.runpytest("-p", "no:cacheprovider", "--neuronpatch-cache", "cache")
    again.assert_outcomes(passed=1)
    again.stdout.fnmatch_lines(["*cache cache: 1 hit, 0 misses*"])
    # Another checkpoint is another key: measured again, and the baseline names the change.
    _fine_tuned(probe_heads, pytester.path / "tuned3", factor=3.0)
    probe = (pytester.path / "p.probe.yaml").read_text().replace("model: tuned", "model: tuned3")
    (pytester.path / "p.probe.yaml").write_text(probe)
    other = pytester.runpytest("-p", "no:cacheprovider", "--neuronpatch-cache", "cache")
    other.assert_outcomes(failed=1)
    other.stdout.fnmatch_lines(["*cache cache: 0 hits, 1 miss*"])
    other.stdout.fnmatch_lines([f"*the model changed (the baseline ran {tuned.resolve()}, this run "
                                f"{(pytester.path / 'tuned3').resolve()})*"])
