"""Probe-file schema: strict validation, one line per problem, with file, line and key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from neuronpatch.errors import ProbeSpecError
from neuronpatch.interventions import Intervention
from neuronpatch.probes import load_probe_file
from neuronpatch.probes.documents import load_documents
from neuronpatch.probes.load import iter_probe_file


@pytest.fixture
def probe_dir(tmp_path: Path) -> Path:
    # Head directories only need a config.json to pass collection-time checks.
    for name in ("causal", "blind"):
        (tmp_path / "heads" / name).mkdir(parents=True)
        (tmp_path / "heads" / name / "config.json").write_text("{}")
    (tmp_path / "heads" / "not_a_head").mkdir()
    (tmp_path / "inputs.txt").write_text("The cat sat.\n\nA second text.\n")
    return tmp_path


def write(directory: Path, text: str, name: str = "p.probe.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def error_of(path: Path) -> str:
    with pytest.raises(ProbeSpecError) as info:
        load_probe_file(path, display=path.name)
    return str(info.value)


def test_a_full_probe_parses_with_lines_for_every_expectation(probe_dir):
    path = write(probe_dir, """
        name: causal head tracks its neuron
        head: heads/causal
        inputs: {file: inputs.txt}
        interventions:
          scale: [0, 0.5, 2]
          set: [1]
          zero: true
        position: all
        expect:
          slope: [0.8, 1.2]
          r_squared: {min: 0.9}
          intercept: {abs_max: 1e-6}
        marks: [slow, {xfail: not yet}]
    """)
    [spec] = load_probe_file(path, display="p.probe.yaml")
    assert spec.title == "causal head tracks its neuron"
    assert spec.heads() == [(probe_dir / "heads" / "causal", None)]
    assert spec.inputs == ["The cat sat.", "A second text."]
    kwargs = spec.run_kwargs()
    assert [iv.label for iv in kwargs["interventions"]] == [
        "scale=0", "scale=0.5", "scale=2", "set=1", "zero"]
    assert kwargs["position"] == "all"
    assert [(e.metric, e.range.text, e.source) for e in spec.expectations] == [
        ("slope", "[0.8, 1.2]", "p.probe.yaml:10"),
        ("r_squared", "≥ 0.9", "p.probe.yaml:11"),
        ("intercept", "|x| ≤ 1e-06", "p.probe.yaml:12"),  # `1e-6` is a float, not a string
    ]
    assert [(m.name, m.reason) for m in spec.marks] == [("slow", None), ("xfail", "not yet")]


def test_minimal_probe_uses_engine_defaults(probe_dir):
    [spec] = load_probe_file(write(probe_dir, "head: heads/causal\n", name="minimal.probe.yml"))
    assert spec.title == "minimal"
    assert spec.run_kwargs() == {}  # the engine's seed sentences and scale factors
    assert spec.expectations == []


def test_multi_document_file_gives_one_probe_per_document_with_default_names(probe_dir):
    path = write(probe_dir, """
        head: heads/causal
        ---
        name: named
        head: heads/blind
        ---
        head: heads/blind
        ---
    """, name="multi.probe.yaml")
    assert [s.title for s in load_probe_file(path)] == ["multi", "named", "multi-3"]


def test_head_glob_lists_each_head_directory(probe_dir):
    [spec] = load_probe_file(write(probe_dir, "head: heads/*\n"))
    # not_a_head has no config.json, so the glob skips it
    assert spec.heads() == [(probe_dir / "heads" / "blind", "blind"),
                            (probe_dir / "heads" / "causal", "causal")]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("head: heads/causal\nexpect:\n  slope: [2, 1]\n",
         "p.probe.yaml:3: key 'expect.slope': range [2, 1] is inverted (lo > hi); "
         "expected lo < hi"),
        ("head: heads/causal\nexpect:\n  slope: [1, 1]\n",
         "p.probe.yaml:3: key 'expect.slope': range [1, 1] is empty (zero width); "
         "expected lo < hi"),
        ("head: heads/causal\nexpect:\n  r_squared: {}\n",
         "p.probe.yaml:3: key 'expect.r_squared': the range is empty ({}); expected [lo, hi]"),
        ("head: heads/causal\nexpect:\n  slope: 1.0\n",
         "p.probe.yaml:3: key 'expect.slope': a bare number (1.0) is not a range; expected a "
         "range such as {approx: 1.0, abs: 0.05} or [lo, hi]"),
        ("head: heads/causal\nexpect:\n  slop: [0, 1]\n",
         "p.probe.yaml:3: key 'expect.slop': unknown metric 'slop' (did you mean 'slope'?); "
         "expected one of slope, intercept, r_squared,"),
        ("head: heads/causal\ncolour: red\n",
         "p.probe.yaml:2: key 'colour': unknown key; expected one of name, head, inputs, "
         "interventions, position, engine, model, expect, marks"),
        ("head: heads/causal\nexpects: {}\n",
         "p.probe.yaml:2: key 'expects': unknown key (did you mean 'expect'?); expected one of"),
        ("head: heads/causal\ninterventions:\n  scale: [0, 1]\n  zeros: true\n",
         "p.probe.yaml:4: key 'interventions.zeros': unknown key (did you mean 'zero'?); "
         "expected one of scale, set, add, zero, mean"),
        ("head: heads/causal\nname: 42\n",
         "p.probe.yaml:2: key 'name': got 42 (an integer); expected a string"),
        ("head: heads/causal\ninputs:\n  - fine\n  - 3\n",
         "p.probe.yaml:4: key 'inputs[1]': got 3 (an integer); expected a string"),
        ("head: heads/causal\ninputs: []\n",
         "p.probe.yaml:2: key 'inputs': got [] (a list); expected at least 1 item"),
        ("head: heads/causal\ninterventions: {scale: [0, yes]}\n",
         "p.probe.yaml:2: key 'interventions.scale[1]': got True (a boolean); expected a number"),
        ("head: heads/causal\ninterventions: {zero: false}\n",
         "p.probe.yaml:2: key 'interventions': no intervention; expected at least one of"),
        ("head: heads/causal\ninterventions: {scale: [1, 1]}\n",
         "p.probe.yaml:2: key 'interventions': intervention scale=1 is listed twice"),
        ("head: heads/causal\nposition: middle\n",
         "p.probe.yaml:2: key 'position': got 'middle'; expected 'last', 'all' or an integer"),
        ("head: heads/causal\nmarks: [timeout]\n",
         "p.probe.yaml:2: key 'marks[0]': mark 'timeout' needs an argument; expected {timeout: seconds}"),
        ("head: heads/causal\nmarks: [{timeout: soon}]\n",
         "p.probe.yaml:2: key 'marks[0]': mark 'timeout' got 'soon'; expected a number of seconds > 0"),
        ("head: heads/causal\nmarks: [{skipif: {condition: 'sys.platform ==', reason: r}}]\n",
         "p.probe.yaml:2: key 'marks[0]': skipif condition 'sys.platform ==' is not a Python expression"),
        ("head: heads/causal\nmarks: [{skipif: yes}]\n",
         "p.probe.yaml:2: key 'marks[0]': mark 'skipif' got True; expected {skipif: {condition:"),
        ("head: heads/causal\nmarks: [parametrize]\n",
         "p.probe.yaml:2: key 'marks[0]': mark 'parametrize' does not apply to probes"),
        ("name: x\n",
         "p.probe.yaml:1: key 'head': required key is missing; expected a head directory or "
         "a glob, relative to this file"),
        ("head: heads/missing\n",
         "p.probe.yaml:1: key 'head': head directory 'heads/missing' not found (looked for "),
        ("head: heads/not_a_head\n",
         "p.probe.yaml:1: key 'head': head directory 'heads/not_a_head' has no config.json"),
        ("head: nothing/*\n",
         "p.probe.yaml:1: key 'head': glob 'nothing/*' matches no head directory under "),
        ("head: heads/causal\ninputs: {file: nope.txt}\n",
         "p.probe.yaml:2: key 'inputs': inputs file 'nope.txt' not found (looked for "),
        ("head: heads/causal\ninputs: {path: inputs.txt}\n",
         "p.probe.yaml:2: key 'inputs': unknown key 'path'; expected a list of texts or "
         "{file: path}"),
        ("name: 'a::b'\nhead: heads/causal\n",
         "p.probe.yaml:1: key 'name': 'a::b' contains '::'"),
        ("- head: heads/causal\n",
         "p.probe.yaml:1: the document: got [{'head': 'heads/causal'}] (a list); expected a "
         "mapping of probe keys"),
    ],
)
def test_each_problem_names_file_line_key_and_what_is_allowed(probe_dir, body, expected):
    message = error_of(write(probe_dir, body))
    assert expected in message
    assert "; expected" in message


def test_all_problems_of_a_document_are_reported_in_line_order(probe_dir):
    message = error_of(write(probe_dir, """
        head: heads/missing
        expect:
          slope: [2, 1]
          r2: [0, 1]
        extra: 1
    """))
    assert [line.split(": key ")[0] for line in message.splitlines()] == [
        "p.probe.yaml:1", "p.probe.yaml:3", "p.probe.yaml:4", "p.probe.yaml:5"]


def test_duplicate_keys_are_errors_with_both_lines(probe_dir):
    message = error_of(write(probe_dir, """
        head: heads/causal
        expect:
          slope: [0, 1]
          r_squared: {min: 0.5}
          slope: [0.5, 2]
    """))
    assert message == ("p.probe.yaml:5: key 'slope': duplicate key (first defined at line 3); "
                       "expected each key once per mapping")


def test_yaml_syntax_errors_point_at_the_line(probe_dir):
    message = error_of(write(probe_dir, "head: heads/causal\nexpect:\n  slope: [0, 1\n"))
    assert message.startswith("p.probe.yaml:4: invalid YAML: ")


def test_python_tags_are_refused_not_constructed(probe_dir):
    message = error_of(write(probe_dir, "head: !!python/object/apply:os.system ['echo hi']\n"))
    assert message.startswith("p.probe.yaml:1: invalid YAML: ")
    assert "safe loader" in message


def test_one_broken_document_leaves_the_others_usable(probe_dir):
    path = write(probe_dir, """
        name: good
        head: heads/causal
        ---
        name: bad
        head: heads/causal
        expect: {slope: [3, 1]}
        ---
        name: good
        head: heads/blind
    """)
    results = [(doc.name_guess(), spec) for doc, spec in iter_probe_file(path, display="p")]
    assert results[0][0] == "good" and not isinstance(results[0][1], Exception)
    assert results[1][0] == "bad" and "p:6: key 'expect.slope'" in str(results[1][1])
    # a repeated name would make two tests with one id
    assert "p:8: key 'name': 'good' is already the name of the probe at p:1" in str(results[2][1])


def test_documents_record_the_line_of_every_key(probe_dir):
    [doc] = load_documents(write(probe_dir, """
        head: heads/causal
        inputs:
          - one
          - two
        expect:
          per_input_slope: {min: 0.5}
    """))
    assert doc.lines[("inputs", 1)] == 4
    assert doc.lines[("expect", "per_input_slope")] == 6
    assert doc.line_of(("expect", "per_input_slope", "min")) == 6  # falls back to the key


def test_interventions_are_engine_interventions(probe_dir):
    [spec] = load_probe_file(write(probe_dir, """
        head: heads/causal
        interventions: {add: [0.5], mean: true}
    """))
    assert spec.run_kwargs()["interventions"] == [Intervention("add", 0.5), Intervention("mean")]


@pytest.mark.parametrize(("body", "message"), [
    ('inputs: ["...", "12 34"]\nfuzz: {inputs: mutations, expect: {slope: {min: 0}}}',
     "no input has a word to mutate"),
    ("position: 7\nfuzz: {expect: {slope: {min: 0}}}", "position 7 with fuzz"),
])
def test_fuzzing_that_could_generate_nothing_runnable_is_refused_at_collection(probe_dir, body, message):
    path = write(probe_dir, "name: f\nhead: heads/causal\n" + body + "\n")
    assert message in error_of(path)
