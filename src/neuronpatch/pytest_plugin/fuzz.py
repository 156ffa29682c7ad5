"""``fuzz:`` in probe files: Hypothesis hunts for an input that breaks a claim.

Each Hypothesis example is a small *batch* of generated inputs, run through the
engine at once; ``fuzz.expect`` is checked on every input's own numbers (its
own slope, R², activation, ...). When one input breaks a claim, Hypothesis
shrinks the batch to that one input and the input to its plainest form, and
the report shows the minimal text, its tokens, its numbers, the claim it broke
and the figures of a run on that text alone.

Hypothesis's own pytest options apply as they do to ``@given`` tests:
``--hypothesis-profile`` picks the settings, ``--hypothesis-verbosity`` is laid
over them (``verbose`` reports every example tried), ``--hypothesis-seed`` is
honoured by Hypothesis itself, and ``--hypothesis-show-statistics`` prints each
fuzz probe's statistics. The last two work because a fuzz run collects what
Hypothesis's pytest plugin collects for a ``@given`` test (the statistics
callback and the reporter) and hands it to that plugin on the item, under the
attribute names it reads (:func:`hand_to_hypothesis`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from neuronpatch.probes.schema import FuzzSpec
    from neuronpatch.pytest_plugin.runner import Runner
    from neuronpatch.result import ExperimentResult

BATCH = 4  # generated inputs per engine run


class Counterexample(AssertionError):
    """A generated input on which a fuzz expectation failed."""

    def __init__(self, text: str, metric: str, value: float, expected: str, numbers: dict[str, float]):
        super().__init__(f"{metric} = {value:.6g} on {text!r}, expected {expected}")
        self.text, self.metric, self.value, self.expected, self.numbers = (
            text, metric, value, expected, numbers)


def input_metrics(res: ExperimentResult, i: int) -> dict[str, float]:
    """The numbers of input ``i`` alone (what ``fuzz.expect`` checks)."""
    row = res.per_input[i]
    return {
        "slope": row.slope, "intercept": row.fit.intercept, "r_squared": row.r2,
        "activation": row.clean_activation, "prediction": row.clean_prediction,
        "mean_abs_prediction_change": sum(abs(v) for v in row.prediction_change) / len(row.prediction_change),
        "mean_abs_activation_change": sum(abs(v) for v in row.activation_change) / len(row.activation_change),
    }


def strategy(spec: FuzzSpec, inputs: list[str] | None, tokenizer: Any, n_ctx: int) -> Any:
    """The Hypothesis strategy of one batch of generated texts."""
    from hypothesis import strategies as st

    from neuronpatch import strategies as ns
    from neuronpatch.engine import DEFAULT_INPUTS

    texts = list(inputs or DEFAULT_INPUTS)
    if spec.inputs == "sentences":
        one = ns.sentences(texts=texts, tokenizer=tokenizer, max_words=spec.max_words)
    elif spec.inputs == "mutations":
        one = ns.mutations(texts)
    else:
        one = ns.decoded(ns.token_ids(tokenizer, max_size=min(spec.max_words * 2, n_ctx)), tokenizer)
    return st.lists(one, min_size=1, max_size=BATCH)


@dataclass
class FuzzOutcome:
    """What a fuzz run found: nothing (``counterexample`` None) or a minimal failing input."""

    examples: int
    counterexample: Counterexample | None = None
    tokens: list[str] | None = None
    artifacts: Path | None = None
    replay: list[str] = field(default_factory=list)  # Hypothesis's seed / @reproduce_failure lines
    statistics: str | None = None  # Hypothesis's own description of the run
    reported: list[str] = field(default_factory=list)  # what Hypothesis reported (verbose: examples)


@dataclass(frozen=True)
class FuzzSettings:
    """Which Hypothesis settings a fuzz run uses, as the pytest options say.

    ``profile`` is ``--hypothesis-profile`` or, without it, ``neuronpatch-ci``
    when the ``CI`` environment variable is set and ``neuronpatch-dev``
    otherwise; ``verbosity`` is ``--hypothesis-verbosity`` laid over it;
    ``echo`` prints Hypothesis's reports as they come (``-s``), as Hypothesis's
    plugin does for ``@given`` tests.
    """

    profile: str
    verbosity: str | None = None
    echo: bool = False

    def describe(self) -> str:
        """``neuronpatch-dev`` or ``neuronpatch-dev (verbosity verbose)``, for the header."""
        return self.profile + (f" (verbosity {self.verbosity})" if self.verbosity else "")


def fuzz_settings(config: Any) -> FuzzSettings:
    """The fuzz settings a pytest session's options ask for (imports no Hypothesis).

    Example:
        >>> fuzz_settings(config).describe()     # doctest: +SKIP
        'neuronpatch-dev'
    """
    profile = config.getoption("hypothesis_profile", None)
    if not profile:  # as neuronpatch.strategies.default_profile() decides, without importing it
        ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
        profile = "neuronpatch-ci" if ci else "neuronpatch-dev"
    verbosity = config.getoption("hypothesis_verbosity", None) or None
    return FuzzSettings(str(profile), verbosity, config.getoption("capture", "fd") == "no")


def run_fuzz(runner: Runner, head_dir: Path, spec: FuzzSpec, run_kwargs: dict[str, Any],
             *, fuzz_settings: FuzzSettings, node_id: str) -> FuzzOutcome:
    """Run Hypothesis over generated inputs; return the shrunk counterexample, if any.

    Hypothesis's statistics and reports of the run come back in the outcome
    (``statistics``, ``reported``), labelled with ``node_id``.
    """
    from hypothesis import Verbosity, given, settings
    from hypothesis.reporting import default as print_report
    from hypothesis.reporting import with_reporter
    from hypothesis.statistics import collector, describe_statistics

    from neuronpatch.models import load_model
    from neuronpatch.probes.expectations import Range
    from neuronpatch.strategies import register_profiles

    register_profiles()
    head = runner.load_head(head_dir, run_kwargs.get("model"))
    model = load_model(run_kwargs.get("model") or head.config.base_model_name,
                       device=run_kwargs.get("device", runner.settings.device),
                       dtype=run_kwargs.get("dtype", runner.settings.dtype))
    # A ranking is the whole probe's claim, not one generated input's.
    kwargs = {k: v for k, v in run_kwargs.items() if k not in ("inputs", "rank", "model")}
    checks: dict[str, Range] = dict(spec.expect)
    seen = [0]

    def fuzz(texts: list[str]) -> None:  # Hypothesis names it in "Trying example: fuzz(...)"
        seen[0] += 1
        res = runner.run(head, texts, model=model, **kwargs)
        for i, text in enumerate(texts):
            numbers = input_metrics(res, i)
            for metric, rng in checks.items():
                value = numbers[metric]
                if math.isnan(value) or not rng.contains(value):
                    raise Counterexample(text, metric, value, rng.text, numbers)

    base = settings.get_profile(fuzz_settings.profile)
    if fuzz_settings.verbosity:
        base = settings(base, verbosity=Verbosity[fuzz_settings.verbosity])
    test = settings(base, max_examples=spec.examples)(
        given(strategy(spec, run_kwargs.get("inputs"), model.tokenizer, int(model.n_ctx or 1024)))(
            fuzz))
    # Each probe keeps its own saved counterexamples: key the example database on its node id
    # (Hypothesis would otherwise key every fuzz probe on this one inner function).
    test._hypothesis_internal_database_key = node_id.encode()
    stats: list[str] = []
    reported: list[str] = []

    def note_statistics(data: Any) -> None:
        stats.append(describe_statistics({**data, "nodeid": node_id}))

    def report(message: Any) -> None:
        text = message if isinstance(message, str) else repr(message)
        reported.append(text)
        if fuzz_settings.echo:
            print_report(text)

    try:
        # (Hypothesis types its collector variable as holding None; it holds this callback.)
        with cast(Any, collector).with_value(note_statistics), with_reporter(report):
            test()
    except Counterexample as found:
        replay = [line.strip() for note in getattr(found, "__notes__", [])
                  for line in str(note).splitlines() if "reproduce_failure" in line or "seed" in line]
        tokens = model.tokenizer.convert_ids_to_tokens(
            model.tokenizer.encode(found.text, add_special_tokens=False))
        out = runner.artifact_dir(node_id) / "fuzz_counterexample"
        res = runner.run(head, [found.text], model=model, **kwargs)
        runner.write_artifacts(res, out, probe={"name": f"counterexample of {node_id}",
                                               "node_id": f"{node_id}#fuzz", "source": None,
                                               "passed": False})
        return FuzzOutcome(seen[0], found, list(tokens), out, replay,
                           statistics=stats[-1] if stats else None, reported=reported)
    return FuzzOutcome(seen[0], statistics=stats[-1] if stats else None, reported=reported)


def hand_to_hypothesis(item: Any, outcome: FuzzOutcome) -> None:
    """Give Hypothesis's pytest plugin what it gathers from a ``@given`` test.

    Its ``pytest_runtest_makereport`` reads ``item.hypothesis_statistics`` (put
    on the teardown report, printed by ``--hypothesis-show-statistics``, also
    from xdist workers) and ``item.hypothesis_report_information`` (a
    "Hypothesis" section of the report: the examples tried, with
    ``--hypothesis-verbosity=verbose``).
    """
    if outcome.statistics:
        item.hypothesis_statistics = outcome.statistics
    if outcome.reported:
        item.hypothesis_report_information = "\n".join(outcome.reported)


def describe(outcome: FuzzOutcome, spec: FuzzSpec, where: str) -> str:
    """The failure text of a fuzz counterexample."""
    ce = outcome.counterexample
    assert ce is not None
    nums = ", ".join(f"{k} {v:.4g}" for k, v in ce.numbers.items())
    return "\n".join([
        f"fuzz ({spec.inputs}, up to {spec.examples} examples) found a counterexample, shrunk to:",
        f"  text:     {ce.text!r}",
        f"  tokens:   {outcome.tokens}",
        f"  broke:    {ce.metric} = {ce.value:.6g}, expected {ce.expected}  at {where}",
        f"  numbers:  {nums}",
        f"  figures:  {outcome.artifacts}/",
        *(f"  replay:   {line}" for line in outcome.replay),
    ])
