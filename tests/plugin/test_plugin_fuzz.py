"""`fuzz:` in probe files: a true claim passes, a false one is falsified with a minimal input."""

from __future__ import annotations

import textwrap

import pytest

from neuronpatch import strategies as ns

pytest_plugins = ["pytester"]

INPUTS = ["The cat sat on the mat.", "Machine learning models", "The quick brown fox jumps"]


@pytest.fixture
def project(pytester: pytest.Pytester, probe_heads):
    probe_heads.copy_heads(pytester.path / "heads")
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\nneuronpatch_figures = "none"\n')
    return pytester


def write(project, expect: str, examples: int = 10) -> None:
    (project.path / "fuzz.probe.yaml").write_text(textwrap.dedent(f"""
        name: fuzzed
        head: heads/causal
        inputs: {INPUTS}
        interventions: {{set: [-1, 0, 1, 2]}}
        fuzz:
          inputs: sentences
          examples: {examples}
          max_words: 6
          expect:
            {expect}
    """).lstrip())


def test_a_true_claim_passes(project, probe_heads):
    s = probe_heads.causal_slope
    # A linear head right after its neuron has the same slope on every input: w · W_out[n].
    write(project, f"slope: [{s - 1e-4}, {s + 1e-4}]")
    project.runpytest("-p", "no:cacheprovider", "--hypothesis-profile=neuronpatch-ci").assert_outcomes(
        passed=1)


def test_a_false_claim_is_falsified_with_a_minimal_example(project, probe_heads):
    write(project, "slope: {max: -100}")  # false on every input: shrinking must reach the simplest
    res = project.runpytest("-p", "no:cacheprovider", "--hypothesis-profile=neuronpatch-ci")
    res.assert_outcomes(failed=1)
    from neuronpatch import load_model

    words = ns.vocabulary(texts=INPUTS, tokenizer=load_model(probe_heads.model).tokenizer)
    minimal = f"{words[0].capitalize()}."
    out = res.stdout.str()
    assert "fuzz (sentences, up to 10 examples) found a counterexample, shrunk to:" in out
    assert f"text:     {minimal!r}" in out
    assert "broke:    slope = " in out and "expected ≤ -100  at fuzz.probe.yaml:10" in out
    assert "tokens:   [" in out and "figures:  " in out


def test_ci_profile_runs_see_the_same_examples(project, probe_heads):
    write(project, "activation: {max: -100}", examples=5)
    texts = []
    for _ in range(2):
        res = project.runpytest("-p", "no:cacheprovider", "--hypothesis-profile=neuronpatch-ci")
        texts.append([line for line in res.stdout.lines if "text:" in line])
    assert texts[0] == texts[1] and texts[0]


def test_hand_written_property_test_with_the_session_runner(project, probe_heads):
    (project.path / "test_prop.py").write_text(textwrap.dedent(f"""
        from hypothesis import given, settings
        from neuronpatch.strategies import sentences

        @settings(max_examples=5, deadline=None)
        @given(text=sentences(words=["cat", "sat", "mat", "dog"], max_words=5))
        def test_head_tracks_its_neuron(neuronpatch_runner, text):
            res = neuronpatch_runner.run("heads/causal", inputs=[text], set=[0, 1, 2])
            assert abs(res.slope - {probe_heads.causal_slope!r}) < 1e-4
    """))
    res = project.runpytest("-p", "no:cacheprovider", "test_prop.py")
    res.assert_outcomes(passed=1)  # no health-check error: the runner is session-scoped


# A documented example on the shipped demo head: the claim "neuron 301 fires (≥ 1.5) at the
# end of every sentence" holds on the seed notebook's eight sentences (1.82 to 2.50), and a
# plain probe on them would pass. Fuzzing finds a short sentence where it does not, shrinks
# it, and reports it.
def test_fuzzing_finds_what_the_eight_sentences_miss(pytester):
    from pathlib import Path

    from neuronpatch import run_experiment
    from neuronpatch.engine import DEFAULT_INPUTS

    head = Path(__file__).resolve().parents[2] / "probes" / "heads" / "demo_causal"
    seed = run_experiment(head, list(DEFAULT_INPUTS), set=[0, 3])
    assert seed.clean_activation.min() >= 1.5  # the eight sentences never break the claim
    (pytester.path / "fires.probe.yaml").write_text(textwrap.dedent(f"""
        name: neuron fires on every sentence
        head: {head}
        interventions: {{set: [0, 3]}}
        fuzz:
          inputs: sentences
          examples: 30
          expect:
            activation: {{min: 1.5}}
    """).lstrip())
    res = pytester.runpytest("-p", "no:cacheprovider", "--hypothesis-profile=neuronpatch-ci")
    res.assert_outcomes(failed=1)
    text_line = next(line for line in res.stdout.lines if line.strip().startswith("text:"))
    shrunk = text_line.split("text:", 1)[1].strip().strip("'\"")
    assert len(shrunk.split()) <= 2  # shrunk to a short sentence
    check = run_experiment(head, [shrunk], set=[0, 3])
    assert check.clean_activation[0] < 1.5  # and it really breaks the claim
    res.stdout.fnmatch_lines(["*broke:    activation = *, expected ≥ 1.5  at fires.probe.yaml:8*"])


def test_each_fuzz_probe_keeps_its_own_saved_counterexamples(project):
    # Two false claims in one file: each must get its own example-database key (its node id),
    # so fuzzing one never overwrites the other's saved counterexample, which replays first.
    body = textwrap.dedent(f"""
        head: heads/causal
        inputs: {INPUTS}
        interventions: {{set: [-1, 0, 1, 2]}}
        fuzz:
          examples: 5
          max_words: 4
          expect:
            activation: {{max: -100}}
    """).lstrip()
    (project.path / "two.probe.yaml").write_text("name: f\n" + body + "---\nname: g\n" + body)
    from hypothesis import Phase, settings
    from hypothesis.database import InMemoryExampleDatabase

    db = InMemoryExampleDatabase()
    # (no shrinking: what is saved is what this test is about, and shrinking is slow)
    settings.register_profile("fuzz-db-test", deadline=None, database=db,
                              phases=[Phase.explicit, Phase.reuse, Phase.generate])
    args = ("-p", "no:cacheprovider", "--hypothesis-profile=fuzz-db-test")
    project.runpytest(*args, "-k", "f").assert_outcomes(failed=1)
    f_key = b"two.probe.yaml::f"
    saved_f = set(db.data.get(f_key, ()))
    assert saved_f, sorted(db.data)
    project.runpytest(*args, "-k", "g").assert_outcomes(failed=1)  # fuzz the other probe
    assert set(db.data.get(b"two.probe.yaml::g", ())), sorted(db.data)
    assert set(db.data[f_key]) == saved_f  # f's counterexample survived g's run untouched
    again = project.runpytest(*args, "-k", "f", "--hypothesis-show-statistics")
    again.assert_outcomes(failed=1)
    # and f replays it first: Hypothesis's reuse phase ran the saved example, and it failed
    again.stdout.fnmatch_lines(["two.probe.yaml::f:", "*- during reuse phase*",
                                "*- 0 passing, 1 failing, and 0 invalid test cases"])


def test_a_falsified_claim_prints_what_replays_it(project):
    write(project, "slope: {max: -100}", examples=5)
    res = project.runpytest("-p", "no:cacheprovider", "--hypothesis-profile=neuronpatch-ci")
    res.assert_outcomes(failed=1)
    assert any("replay:" in line and "reproduce_failure" in line for line in res.stdout.lines)


def test_hypothesis_show_statistics_reports_each_fuzz_probe(project, probe_heads):
    s = probe_heads.causal_slope
    write(project, f"slope: [{s - 1e-4}, {s + 1e-4}]", examples=4)
    res = project.runpytest("-p", "no:cacheprovider", "--hypothesis-profile=neuronpatch-ci",
                            "--hypothesis-show-statistics")
    res.assert_outcomes(passed=1)
    # Hypothesis's own statistics, under its own section, labelled with the probe's node id
    res.stdout.fnmatch_lines([
        "*Hypothesis Statistics*",
        "fuzz.probe.yaml::fuzzed:",
        "*- during generate phase (*seconds):",
        "*- Typical runtimes: *",
        "*- 4 passing, 0 failing, and 0 invalid test cases",
        "*- Stopped because settings.max_examples=4*",
    ])


def test_the_header_names_each_hypothesis_profile_once_in_one_line(project, probe_heads, monkeypatch):
    # In a fresh process (Hypothesis's current profile is process-wide), without CI set:
    # @given tests run under Hypothesis's 'default', fuzz probes under neuronpatch-dev.
    monkeypatch.delenv("CI", raising=False)
    write(project, "slope: [-10, 10]", examples=2)
    for args, profiles in [
        ((), "fuzz profile neuronpatch-dev (Hypothesis @given tests: profile 'default')"),
        (("--hypothesis-profile=neuronpatch-ci",),
         "fuzz profile neuronpatch-ci (the same for Hypothesis @given tests)"),
    ]:
        result = project.runpytest_subprocess("-p", "no:cacheprovider", "-v", "--co", *args)
        assert not [line for line in result.outlines if line.startswith("hypothesis profile")]
        [line] = [line for line in result.outlines if line.startswith("neuronpatch: device")]
        assert line.endswith(profiles), line


def test_hypothesis_verbosity_verbose_shows_every_example(project, probe_heads):
    s = probe_heads.causal_slope
    write(project, f"slope: [{s - 1e-4}, {s + 1e-4}]", examples=3)
    args = ("-p", "no:cacheprovider", "--hypothesis-profile=neuronpatch-ci",
            "--hypothesis-verbosity=verbose")
    shown = project.runpytest(*args, "-s")  # as Hypothesis does for @given tests: printed with -s
    shown.assert_outcomes(passed=1)
    # Hypothesis's own words for each example ("Test case: fuzz(texts=[...])")
    assert shown.stdout.str().count("Test case: fuzz(") >= 3, shown.stdout.str()
    shown.stdout.fnmatch_lines(["neuronpatch: *fuzz profile neuronpatch-ci (verbosity verbose)"
                                " (the same for Hypothesis @given tests)"])
    captured = project.runpytest(*args, "-rP")  # and otherwise kept as the report's section
    captured.stdout.fnmatch_lines(["*-- Hypothesis --*", "Test case: fuzz(", "    texts=[*"])
    quiet = project.runpytest("-p", "no:cacheprovider", "--hypothesis-profile=neuronpatch-ci", "-s")
    assert "Test case: fuzz(" not in quiet.stdout.str()
