"""The opt-in result cache: warm runs reuse results bit for bit, every changed key part misses,
and what is stored is plain data, read within bounds."""

from __future__ import annotations

import json
import shutil
import textwrap

import numpy as np
import pytest

from neuronpatch import cache as nc

pytest_plugins = ["pytester"]

PROBE = """
name: tracks
head: heads/causal
inputs: ["The cat sat on the mat.", "Machine learning models", "The quick brown fox jumps"]
interventions: {set: [-1, 0, 1, 2]}
controls: {units: [0, 1]}
expect:
  r_squared: {min: 0.99}
---
name: blind
head: heads/blind
inputs: ["The cat sat on the mat.", "Machine learning models"]
interventions: {set: [0, 1]}
expect:
  slope: {abs_max: 1.0e-9}
"""


@pytest.fixture
def project(pytester: pytest.Pytester, probe_heads):
    """Heads on a copy of the tiny model (so a test may change its weights)."""
    from neuronpatch.testing import write_head

    model = shutil.copytree(probe_heads.model, pytester.path / "model")
    write_head(pytester.path / "heads" / "causal", model, target_layer=0, target_neuron=3,
               feature_layer=1, coordinates="hf")
    write_head(pytester.path / "heads" / "blind", model, target_layer=1, target_neuron=3,
               feature_layer=1, coordinates="hf")
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\nneuronpatch_figures = "none"\n')
    (pytester.path / "c.probe.yaml").write_text(textwrap.dedent(PROBE).lstrip())
    return pytester


def run(project, *args):
    return project.runpytest("-p", "no:cacheprovider", "--neuronpatch-cache=cache", *args)


def measured(project) -> dict:
    """Each probe's summary.json, less what says when or how it was measured."""
    out = {}
    for path in (project.path / ".neuronpatch" / "artifacts").glob("*/summary.json"):
        data = json.loads(path.read_text())
        for key in ("timestamp", "notes", "verdict", "expectations", "probe"):
            data.pop(key, None)
        out[path.parent.name] = data
    return out


def test_a_warm_run_reuses_every_result_bit_for_bit(project):
    cold = run(project, "--neuronpatch-update-baselines")
    cold.assert_outcomes(passed=2)
    cold.stdout.fnmatch_lines(["neuronpatch: device cpu, *, fuzz profile *, cache cache",
                               "neuronpatch: cache cache: 0 hits, 2 misses"])
    first = measured(project)
    warm = run(project, "-v")
    warm.assert_outcomes(passed=2)
    warm.stdout.fnmatch_lines(["neuronpatch: cache cache: 2 hits, 0 misses"])
    assert "neuronpatch: loading model" not in warm.stdout.str()  # no model needed at all
    assert "models loaded" not in warm.stdout.str()
    assert measured(project) == first  # every metric and array, bitwise (JSON floats round-trip)
    assert first and all(d["metrics"]["slope"] is not None for d in first.values())
    notes = json.loads(next((project.path / ".neuronpatch" / "artifacts").glob(
        "c.probe.yaml_tracks*/summary.json")).read_text())["notes"]
    assert notes[-1].startswith("read from the neuronpatch cache")


def _edit(path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize("change", ["model weights", "head", "inputs", "interventions", "options",
                                    "library version"])
def test_any_changed_key_part_misses(project, change, monkeypatch):
    run(project).assert_outcomes(passed=2)
    probe = project.path / "c.probe.yaml"
    if change == "model weights":
        from safetensors.torch import load_file, save_file

        weights = load_file(str(project.path / "model" / "model.safetensors"))
        weights["transformer.h.0.mlp.c_proj.weight"][3, 0] += 1.0  # the tracked neuron's output
        save_file(weights, str(project.path / "model" / "model.safetensors"), metadata={"format": "pt"})
    elif change == "head":
        import torch

        sd = torch.load(project.path / "heads" / "causal" / "head.pt", weights_only=True)
        sd["output.weight"] = sd["output.weight"] * 2
        torch.save(sd, project.path / "heads" / "causal" / "head.pt")
    elif change == "inputs":
        _edit(probe, '"Machine learning models", "The quick', '"Machine learning models!", "The quick')
    elif change == "interventions":
        _edit(probe, "{set: [-1, 0, 1, 2]}", "{set: [-1, 0, 1, 3]}")
    elif change == "options":
        _edit(probe, "controls: {units: [0, 1]}\n", "controls: {units: [0, 1]}\nengine: {route: full}\n")
    else:
        real = nc.versions()
        monkeypatch.setattr(nc, "versions", lambda: {**real, "torch": real["torch"] + "+other"})
    again = run(project)
    again.assert_outcomes(passed=2)
    # the changed probe misses; the blind probe misses too where the change reaches it
    hits = 0 if change in ("model weights", "library version") else 1
    again.stdout.fnmatch_lines([f"neuronpatch: cache cache: {hits} hit*, {2 - hits} miss*"])


def test_a_corrupt_entry_is_ignored_with_one_warning_and_rewritten(project):
    run(project).assert_outcomes(passed=2)
    entries = sorted((project.path / "cache").glob("*/*.npz"))
    assert len(entries) == 2
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # cut short by a full disk, say
    broken = run(project)
    broken.assert_outcomes(passed=2)
    warnings = [line for line in broken.stdout.lines if line.startswith("neuronpatch cache: ignored")]
    assert len(warnings) == 1, broken.stdout.str()
    assert str(entries[0]) in warnings[0] and "it will be measured and written again" in warnings[0]
    broken.stdout.fnmatch_lines(["neuronpatch: cache cache: 1 hit, 1 miss"])
    run(project).stdout.fnmatch_lines(["neuronpatch: cache cache: 2 hits, 0 misses"])


def test_an_entry_that_would_unpickle_is_refused_not_run(tmp_path, probe_heads):
    import pickle

    cache = nc.ResultCache(tmp_path / "c")
    key = "ab" * 32
    cache.path(key).parent.mkdir(parents=True)

    class Boom:
        def __reduce__(self):
            return (print, ("unpickled!",))

    arrays = {"meta": np.array([Boom()], dtype=object)}
    np.savez(cache.path(key), **arrays, allow_pickle=True)
    assert pickle.dumps(Boom())  # it is a real pickle payload
    warned: list[str] = []
    cache.warn = warned.append
    assert cache.get(key) is None
    assert len(warned) == 1 and "not a cache entry" in warned[0]


def test_entries_are_bounded_before_they_are_read(tmp_path):
    cache = nc.ResultCache(tmp_path / "c")
    key = "cd" * 32
    cache.path(key).parent.mkdir(parents=True)
    cache.path(key).write_bytes(b"\0" * 2048)
    with pytest.raises(nc.CorruptEntry, match="over the limit"):
        nc.read_entry(cache.path(key), max_bytes=1024)
    fifo = tmp_path / "c" / "ef" / ("ef" * 32 + ".npz")
    fifo.parent.mkdir()
    import os

    os.mkfifo(fifo)
    with pytest.raises(nc.CorruptEntry):
        nc.read_entry(fifo)  # refused after stat, never opened (it would block)


def test_results_round_trip_through_arrays_exactly(probe_heads):
    from neuronpatch import run_experiment

    res = run_experiment(probe_heads.causal, inputs=["The cat sat.", "A dog ran far away."],
                         set=[0, 1, 2.5], device="cpu", controls={"units": [0, 1, 2]})
    back = nc.from_arrays(nc.to_arrays(res))
    np.testing.assert_equal(back.metrics(), res.metrics())  # exact, NaN where NaN
    assert json.dumps(back.summary(), sort_keys=True) == json.dumps(res.summary(), sort_keys=True)
    assert back.controls is not None and back.controls.units == (0, 1, 2)


def test_a_directory_that_is_not_a_cache_is_refused(project):
    (project.path / "elsewhere").mkdir()
    (project.path / "elsewhere" / "notes.txt").write_text("mine")
    res = project.runpytest("-p", "no:cacheprovider", "--neuronpatch-cache=elsewhere")
    assert res.ret == pytest.ExitCode.USAGE_ERROR
    res.stderr.fnmatch_lines(["*--neuronpatch-cache = '*elsewhere' is a directory of other files "
                              "(no neuronpatch-cache.json); expected an empty or new directory*"])
    assert (project.path / "elsewhere" / "notes.txt").read_text() == "mine"


def test_the_ini_key_turns_the_cache_on(project):
    project.makefile(".toml", pyproject='[tool.pytest.ini_options]\nneuronpatch_figures = "none"\n'
                     'neuronpatch_cache = "true"\n')
    project.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)
    assert len(list((project.path / ".neuronpatch" / "cache").glob("*/*.npz"))) == 2
    res = project.runpytest("-p", "no:cacheprovider")
    res.stdout.fnmatch_lines(["neuronpatch: cache .neuronpatch/cache: 2 hits, 0 misses"])


def test_direction_controls_round_trip_through_arrays_exactly(tmp_path):
    from neuronpatch import run_experiment
    from neuronpatch.testing import tiny_model, write_head

    model = tiny_model(tmp_path / "m", "gpt2")
    head = write_head(tmp_path / "h", model, target_layer=1, target_neuron=3, layer_type="resid_post")
    res = run_experiment(head, inputs=["The cat sat.", "A dog ran far away."], set=[0, 1, 2.5], device="cpu",
                         controls={"units": [0], "directions": {"random": 2, "seed": 4}})
    back = nc.from_arrays(nc.to_arrays(res))
    assert json.dumps(back.summary(), sort_keys=True) == json.dumps(res.summary(), sort_keys=True)
    assert back.controls is not None and back.controls.labels == res.controls.labels
    np.testing.assert_array_equal(back.controls.directions, res.controls.directions)


def test_expert_neuron_results_round_trip_through_arrays_exactly(tmp_path):
    """The inputs an expert neuron left out and the rows that rerouted a later layer are kept."""
    from neuronpatch import run_experiment
    from neuronpatch.testing import tiny_model, write_head

    model = tiny_model(tmp_path / "m", "mixtral")
    texts = ["The cat sat.", "A dog ran far away.", "Numbers 3 4 5 and more", "Seven silver spoons",
             "Where did the river go?", "one two three"]
    for expert in range(4):
        head = write_head(tmp_path / f"h{expert}", model, target_layer=0, target_neuron=3,
                          layer_type="expert_post", target_expert=expert)
        res = run_experiment(head, inputs=texts, set=[0, 40.0], device="cpu")
        if res.unrouted_inputs:
            break
    assert res.unrouted_inputs and res.routing_changed is not None and res.target_expert == expert
    back = nc.from_arrays(nc.to_arrays(res))
    assert json.dumps(back.summary(), sort_keys=True) == json.dumps(res.summary(), sort_keys=True)
    assert (back.unrouted_inputs, back.routing_changed) == (res.unrouted_inputs, res.routing_changed)
