"""Probe keys: one YAML document → a validated :class:`ProbeSpec`.

A probe file (``*.probe.yaml``) holds one probe, or several as YAML documents::

    name: demo head tracks its neuron
    head: heads/demo_causal            # relative to this file; a glob makes one probe per match
    inputs: [The cat sat on the mat.]  # or {file: inputs.txt}, one text a line
    interventions: {set: [-1, 0, 1, 2]}
    expect:
      slope: [0.8, 1.2]
      r_squared: {min: 0.9}
    marks: [slow]

Reading is strict, because a typo in a claim must never turn into a test that
silently checks nothing: unknown keys, wrong types, empty or inverted ranges and
unknown metrics are all refused.

This module is the schema alone: pydantic models, no file is read here. What a
document's keys point at (head directories, inputs files, the rootdir) is checked by
:mod:`neuronpatch.probes.resolver`, validation errors become ``FILE:LINE: key …``
lines in :mod:`neuronpatch.probes.diagnostics`, and :mod:`neuronpatch.probes.load`
runs the three over a probe file.

A new top-level key is one pydantic model class plus one field on
:class:`ProbeSpec`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from neuronpatch.errors import InterventionError, ProbeSpecError
from neuronpatch.interventions import Intervention, build, normalize
from neuronpatch.probes.diagnostics import describe
from neuronpatch.probes.documents import (
    PROBE_SUFFIXES,
    Document,
    is_probe_file,
    load_documents,
    name_problem,
    probe_stem,
)
from neuronpatch.probes.expectations import Expectation
from neuronpatch.probes.metrics import METRICS, unknown_metric_message
from neuronpatch.probes.ranges import Range

__all__ = [
    "PROBE_SUFFIXES",
    "Document",
    "Interventions",
    "MarkSpec",
    "ProbeSpec",
    "RankSpec",
    "is_probe_file",
    "load_documents",
    "probe_stem",
]

_MARK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")



# ----- field validators -------------------------------------------------------------


def _check_head(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty; expected the path of a head directory, relative to this file")
    return value


def _check_texts(value: list[str]) -> list[str]:
    for i, text in enumerate(value):
        if not text.strip():
            raise ValueError(f"inputs[{i}] is blank; expected non-empty texts")
    return value


def _check_position(value: Any) -> Any:
    if value is None or value in ("last", "all"):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(
        f"got {value!r}; expected 'last', 'all' or an integer token index (negative from the end)"
    )


def _check_metric(name: str) -> str:
    if name not in METRICS:
        raise ValueError(unknown_metric_message(name))
    return name


def _parse_range(value: Any) -> Range:
    try:
        return Range.parse(value)
    except ProbeSpecError as e:
        # pydantic wraps ValueError messages; ProbeSpecError is one, but keep it plain.
        raise ValueError(str(e)) from None


MetricName = Annotated[str, AfterValidator(_check_metric)]
RangeSpec = Annotated[Range, PlainValidator(_parse_range)]
Expectations = dict[MetricName, RangeSpec]
"""``expect:``: metric name → range; reused by future keys that check metrics (fuzz)."""


# ----- models -------------------------------------------------------------------------


class _Strict(BaseModel):
    # strict: YAML's `yes`, "1.0" and 1 must not silently become bools, floats or strings.
    model_config = ConfigDict(extra="forbid", strict=True)


class Interventions(_Strict):
    """``interventions:``: what the patch does to the unit (at least one kind).

    Example:
        >>> [i.label for i in Interventions(set=[0, 1], zero=True).as_list()]
        ['set=0', 'set=1', 'zero']
    """

    scale: list[float] = Field(default_factory=list, description="multiply the activation")
    set: list[float] = Field(default_factory=list, description="replace the activation")
    add: list[float] = Field(default_factory=list, description="add to the activation")
    zero: bool = Field(default=False, description="set the activation to 0")
    mean: bool = Field(default=False, description="set it to its mean over the inputs")

    @model_validator(mode="after")
    def _valid(self) -> Interventions:
        if not self.as_list():
            raise ValueError(
                "no intervention; expected at least one of scale: [...], set: [...], "
                "add: [...], zero: true, mean: true"
            )
        try:
            normalize(self.as_list())
        except InterventionError as e:
            raise ValueError(f"{e}; expected each value once and finite") from None
        return self

    def as_list(self) -> list[Intervention]:
        """The interventions in the engine's stable order."""
        return build(scale=self.scale, set=self.set, add=self.add, zero=self.zero, mean=self.mean)


class MarkSpec(_Strict):
    """One entry of ``marks:``, as pytest would get it from a decorator.

    ``slow`` (a registered mark by name), ``{skip: reason}``, ``{xfail: reason}``,
    ``{xfail: {reason: ..., strict: true}}``, ``{skipif: {condition: "sys.platform ==
    'win32'", reason: ...}}``, ``{timeout: 30}``, ``{filterwarnings: "ignore::UserWarning"}``,
    ``{usefixtures: [db]}``, and for any registered mark ``{name: value}`` (one
    argument), ``{name: [a, b]}`` (arguments) or ``{name: {args: [...], kwargs: {...}}}``.

    Example:
        >>> MarkSpec.model_validate({"timeout": 30}).args
        [30]
    """

    name: str
    reason: str | None = None
    strict: bool | None = None
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, value: Any) -> Any:
        allowed = ("a mark name (slow, skip, xfail, ...) or {name: argument}, e.g. {skip: reason}, "
                   "{xfail: {reason: text, strict: true}}, {skipif: {condition: text, reason: text}}, "
                   "{timeout: 30}, {name: {args: [...], kwargs: {...}}}")
        if isinstance(value, str):
            if not _MARK_NAME.match(value):
                raise ValueError(f"mark {value!r} is not a valid name; expected {allowed}")
            if value in _UNSUPPORTED_MARKS:
                raise ValueError(f"mark {value!r} does not apply to probes; expected {allowed}")
            if value in _MARKS_NEEDING_ARGS:
                raise ValueError(f"mark {value!r} needs an argument; expected {_MARKS_NEEDING_ARGS[value]}")
            return {"name": value}
        if isinstance(value, Mapping) and len(value) == 1:
            [(name, arg)] = value.items()
            if not isinstance(name, str) or not _MARK_NAME.match(name):
                raise ValueError(f"mark {name!r} is not a valid name; expected {allowed}")
            if name in _UNSUPPORTED_MARKS:
                raise ValueError(f"mark {name!r} does not apply to probes; expected {allowed}")
            return _mark_arguments(name, arg)
        raise ValueError(f"got {value!r}; expected {allowed}")


# Marks that make no sense on a probe item (they configure Python functions).
_UNSUPPORTED_MARKS = {"parametrize"}
# Marks whose plugins crash without arguments: the form they need.
_MARKS_NEEDING_ARGS = {
    "skipif": "{skipif: {condition: \"sys.platform == 'win32'\", reason: text}}",
    "timeout": "{timeout: seconds}",
    "filterwarnings": "{filterwarnings: \"ignore::DeprecationWarning\"} or a list of filters",
    "usefixtures": "{usefixtures: [fixture names]}",
}


def _mark_arguments(name: str, arg: Any) -> dict[str, Any]:
    """``{name: arg}`` as MarkSpec fields, checking the arguments of the marks we know."""
    if name in ("skip", "xfail"):
        if arg is None or isinstance(arg, str):
            return {"name": name, "reason": arg}
        if isinstance(arg, Mapping):
            keys = {"reason", "strict"} if name == "xfail" else {"reason"}
            extra = sorted(str(k) for k in set(arg) - keys)
            if extra:
                raise ValueError(f"unknown {name} option {extra[0]!r}; expected {', '.join(sorted(keys))}")
            return {"name": name, **arg}
        raise ValueError(f"mark {name!r} got {arg!r}; expected a reason (text) or "
                         f"{{reason: text{', strict: true' if name == 'xfail' else ''}}}")
    if name == "skipif":
        if not isinstance(arg, Mapping) or set(arg) != {"condition", "reason"}:
            raise ValueError(f"mark 'skipif' got {arg!r}; expected {_MARKS_NEEDING_ARGS['skipif']}")
        cond, reason = arg["condition"], arg["reason"]
        if not isinstance(cond, (str, bool)) or not isinstance(reason, str) or not reason.strip():
            raise ValueError("mark 'skipif' got a bad condition or reason; expected a condition (a "
                             "Python expression as text, or true/false) and a non-empty reason")
        if isinstance(cond, str):
            try:
                compile(cond, "<skipif condition>", "eval")
            except SyntaxError as e:
                raise ValueError(f"skipif condition {cond!r} is not a Python expression ({e.msg}); "
                                 "expected one such as \"sys.platform == 'win32'\"") from None
        return {"name": name, "args": [cond], "kwargs": {"reason": reason}}
    if name == "timeout":
        if isinstance(arg, bool) or not isinstance(arg, (int, float)) or not arg > 0:
            raise ValueError(f"mark 'timeout' got {arg!r}; expected a number of seconds > 0")
        return {"name": name, "args": [arg]}
    if name in ("filterwarnings", "usefixtures"):
        items = [arg] if isinstance(arg, str) else arg
        if not isinstance(items, list) or not items or not all(
                isinstance(i, str) and i.strip() for i in items):
            raise ValueError(f"mark {name!r} got {arg!r}; expected {_MARKS_NEEDING_ARGS[name]}")
        return {"name": name, "args": items}
    if isinstance(arg, Mapping):
        extra = sorted(str(k) for k in set(arg) - {"args", "kwargs"})
        if extra:
            raise ValueError(f"mark {name!r}: unknown key {extra[0]!r}; expected "
                             "{args: [...], kwargs: {...}}, a list of arguments or one argument")
        args, kwargs = arg.get("args", []), arg.get("kwargs", {})
        if not isinstance(args, list) or not isinstance(kwargs, Mapping):
            raise ValueError(f"mark {name!r}: bad args or kwargs; expected args a list and kwargs a "
                             "mapping")
        return {"name": name, "args": args, "kwargs": dict(kwargs)}
    return {"name": name, "args": arg if isinstance(arg, list) else [arg]}


# Baseline metrics (neuronpatch.baselines.METRICS), repeated so the schema stays light.
BASELINE_METRICS: tuple[str, ...] = (
    "slope", "intercept", "r_squared", "slope_ci95", "r_squared_ci95", "baseline_correlation",
    "per_input_slope", "per_input_r2", "weight_cosine",
)
# What a fuzz expectation can check: numbers of one generated input on its own.
FUZZ_METRICS: tuple[str, ...] = (
    "slope", "intercept", "r_squared", "activation", "prediction",
    "mean_abs_prediction_change", "mean_abs_activation_change",
)
FUZZ_INPUTS: tuple[str, ...] = ("sentences", "tokens", "mutations")


def _check_baseline_metric(name: str) -> str:
    if name not in BASELINE_METRICS:
        raise ValueError(f"{name!r} is not a baseline metric; expected one of "
                         + ", ".join(BASELINE_METRICS))
    return name


def _check_fuzz_metric(name: str) -> str:
    if name not in FUZZ_METRICS:
        raise ValueError(f"{name!r} cannot be checked on one generated input; expected one of "
                         + ", ".join(FUZZ_METRICS))
    return name


def _positive(value: float) -> float:
    if not value > 0:
        raise ValueError(f"got {value!r}; expected a tolerance > 0")
    return value


class BaselineSpec(_Strict):
    """``baseline:``: where this probe's golden metrics live and how far they may move.

    Example:
        >>> BaselineSpec(tolerance={"slope": 0.05}).tolerance
        {'slope': 0.05}
    """

    file: str | None = Field(default=None, description="relative to the probe file; default "
                             "baselines/<probe name>.json")
    tolerance: dict[Annotated[str, AfterValidator(_check_baseline_metric)],
                    Annotated[float, AfterValidator(_positive)]] = Field(default_factory=dict)

    @field_validator("file")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty; expected a JSON file path relative to this file")
        return value


class FuzzSpec(_Strict):
    """``fuzz:``: check ``expect`` on each input Hypothesis generates.

    Example:
        >>> FuzzSpec(expect={"slope": Range.parse({"min": 0.5})}).inputs
        'sentences'
    """

    inputs: str = Field(default="sentences", description="sentences | tokens | mutations")
    examples: Annotated[int, Field(ge=1, le=10_000)] = 25
    max_words: Annotated[int, Field(ge=1, le=200)] = 12
    expect: dict[Annotated[str, AfterValidator(_check_fuzz_metric)], RangeSpec]

    @field_validator("inputs")
    @classmethod
    def _known_inputs(cls, value: str) -> str:
        if value not in FUZZ_INPUTS:
            raise ValueError(f"got {value!r}; expected one of {', '.join(FUZZ_INPUTS)}")
        return value

    @field_validator("expect")
    @classmethod
    def _not_empty(cls, value: dict[str, Range]) -> dict[str, Range]:
        if not value:
            raise ValueError("no expectation; expected at least one metric: range")
        return value


class RankSpec(_Strict):
    """``rank:``: how the ``rank`` metric ranks every unit of the target's layer (all keys optional).

    Example:
        >>> RankSpec(top=10).as_kwargs()["top"]
        10
    """

    top: Annotated[int, Field(ge=1, le=1_000_000)] = Field(
        default=20, description="units the screen confirms by real patching")
    screen: Literal["auto", "always", "never"] = Field(
        default="auto", description="auto | always | never (patch every unit)")
    interventions: Interventions | None = Field(
        default=None, description="how each confirmed unit is patched; default scale: [0, 2]")

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``neuronpatch.rank_units``."""
        out: dict[str, Any] = {"top": self.top, "screen": self.screen}
        if self.interventions is not None:
            out["interventions"] = self.interventions.as_list()
        return out


class EngineSpec(_Strict):
    """How the engine runs this probe (each key optional; the session's options otherwise)."""

    route: Literal["auto", "upstream", "linear", "kv", "full"] | None = None
    device: Annotated[str | None, Field(min_length=1)] = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None


class RandomPick(_Strict):
    """``{random: k, seed: s}``: k controls drawn at random, reproducibly."""

    random: Annotated[int, Field(ge=1, description="how many")]
    seed: Annotated[int, Field(ge=0)] = 0


def _check_control_units(value: Any) -> Any:
    """``units:`` is ``{random: k, seed: s}`` or a non-empty list of distinct indices."""
    if value is None:
        return value
    if isinstance(value, Mapping):
        try:
            RandomPick.model_validate(value)
        except ValidationError as e:
            err = e.errors(include_url=False)[0]
            where = ".".join(str(x) for x in err["loc"])
            what = describe(err["input"]) if err["type"] != "extra_forbidden" else "unknown key"
            raise ValueError(f"{where + ': ' if where else ''}{what}; expected "
                             "{random: k, seed: s} with ints k >= 1 and s >= 0") from None
        return dict(value)
    if isinstance(value, list) and value and all(
            isinstance(u, int) and not isinstance(u, bool) and u >= 0 for u in value):
        if len(set(value)) != len(value):
            raise ValueError(f"{value!r} repeats a unit; expected distinct unit indices")
        return value
    raise ValueError(f"{describe(value)}; expected {{random: k, seed: s}} or a non-empty list of "
                     "unit indices (ints >= 0)")


class ControlsSpec(_Strict):
    """``controls:``: negative controls patched like the target (at least one kind).

    Example:
        >>> ControlsSpec.model_validate({"directions": {"random": 8, "seed": 0}}).as_dict()
        {'directions': {'random': 8, 'seed': 0}}
    """

    units: Annotated[Any, AfterValidator(_check_control_units), Field(
        description="{random: k, seed: s} or a list: other units of the same layer")] = None
    directions: RandomPick | None = Field(
        default=None, description="{random: k, seed: s}: random residual-space directions "
                                  "(residual-stream units only)")

    @model_validator(mode="after")
    def _something(self) -> ControlsSpec:
        if self.units is None and self.directions is None:
            raise ValueError("nothing to patch; expected units: {random: k, seed: s} or a list of "
                             "unit indices, and/or directions: {random: k, seed: s}")
        return self

    def as_dict(self) -> dict[str, Any]:
        """The form ``run_experiment(controls=...)`` takes."""
        out: dict[str, Any] = {}
        if self.units is not None:
            out["units"] = self.units
        if self.directions is not None:
            out["directions"] = self.directions.model_dump()
        return out


class ProbeSpec(_Strict):
    """One validated probe: which head, which inputs, which patches, which claims.

    Build it with :func:`parse_document` or :func:`load_probe_file`, which also
    attach the file, the line of every key and the resolved head directories.

    Example:
        >>> spec = load_probe_file("probes/demo.probe.yaml")[0]   # doctest: +SKIP
        >>> spec.title, [e.metric for e in spec.expectations]    # doctest: +SKIP
        ('demo head tracks its neuron', ['slope', 'r_squared'])
    """

    name: Annotated[str | None, Field(description="the test name; default the file name")] = None
    head: Annotated[str, AfterValidator(_check_head),
                    Field(description="a head directory or a glob, relative to this file")]
    inputs: Annotated[
        list[str] | None,
        AfterValidator(lambda v: v if v is None else _check_texts(v)),
        Field(min_length=1, description="a list of texts or {file: path}"),
    ] = None
    interventions: Interventions | None = None
    position: Annotated[str | int | None, BeforeValidator(_check_position)] = None
    engine: EngineSpec | None = None
    model: Annotated[str | None, Field(
        min_length=1, description="run the head against this checkpoint instead of its base_model_name: "
                                  "a model directory (relative to this file) or a model name")] = None
    expect: Expectations = Field(default_factory=dict)
    marks: list[MarkSpec] = Field(default_factory=list)
    baseline: BaselineSpec | None = None
    fuzz: FuzzSpec | None = None
    controls: ControlsSpec | None = Field(
        default=None, description="units: {random: k, seed: s} or a list (other units of the layer), "
                                  "and/or directions: {random: k, seed: s} (residual-space directions), "
                                  "patched the same way (metrics specificity, control_slope)")
    rank: RankSpec | None = Field(
        default=None, description="top: K, screen: auto|always|never, interventions: {...}: how the "
                                  "rank metric ranks every unit of the target's layer")
    on_inconclusive: Literal["fail", "skip", "xfail"] | None = Field(
        default=None, description="pytest outcome of an inconclusive verdict (default: ini "
                                  "neuronpatch_on_inconclusive, else fail)")

    _doc: Document | None = PrivateAttr(default=None)
    _heads: list[tuple[Path, str | None]] | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _fuzz_can_generate(self) -> ProbeSpec:
        """A fuzz block that could generate nothing runnable is refused here, not mid-run."""
        if self.fuzz is None:
            return self
        if self.fuzz.inputs == "mutations" and self.inputs is not None and not any(
                re.search(r"[A-Za-z]", text) for text in self.inputs):
            raise ValueError("fuzz.inputs is 'mutations' but no input has a word to mutate; "
                             "expected inputs with words, or fuzz.inputs: sentences")
        if isinstance(self.position, int) and self.position not in (0, -1):
            raise ValueError(f"position {self.position} with fuzz: a generated input can be shorter "
                             "than that; expected last, 0 or -1 when fuzzing")
        return self

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        if value is not None and (problem := name_problem(value)):
            raise ValueError(f"{problem}; expected a non-empty one-line name without '::'")
        return value

    # ----- what consumers read ---------------------------------------------------------
    @property
    def document(self) -> Document:
        """The YAML document this probe came from (file, lines)."""
        if self._doc is None:
            raise ProbeSpecError("this ProbeSpec was not built by parse_document()")
        return self._doc

    @property
    def path(self) -> Path:
        """The probe file."""
        return self.document.path

    @property
    def title(self) -> str:
        """``name`` or the default name (the file name, ``-N`` for later documents)."""
        return self.name or self.document.default_name

    def where(self, *loc: str | int) -> str:
        """``FILE:LINE`` of a key path, e.g. ``spec.where("expect", "slope")``."""
        return self.document.where(loc)

    @property
    def expectations(self) -> list[Expectation]:
        """The ``expect:`` block in file order, each with its ``file:line``."""
        return [Expectation(metric, rng, self.where("expect", metric))
                for metric, rng in self.expect.items()]

    def heads(self) -> list[tuple[Path, str | None]]:
        """``(head directory, label)`` per match; one pair with label None for a plain path.

        Resolved when the probe was parsed (:mod:`neuronpatch.probes.resolver`).
        """
        if self._heads is None:
            raise ProbeSpecError("this ProbeSpec was not built by parse_document()")
        return list(self._heads)

    def checkpoint(self) -> str | None:
        """``model:`` as the engine takes it: a directory beside this file as its absolute path,
        anything else (a model name) as written; None without ``model:``."""
        if self.model is None:
            return None
        local = self.path.parent / self.model
        return str(local.resolve()) if local.is_dir() else self.model

    def run_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``run_experiment`` (inputs, interventions, position)."""
        kwargs: dict[str, Any] = {}
        if self.inputs is not None:
            kwargs["inputs"] = list(self.inputs)
        if self.interventions is not None:
            kwargs["interventions"] = self.interventions.as_list()
        if self.position is not None:
            kwargs["position"] = self.position
        if self.engine is not None:
            if self.engine.route is not None:
                kwargs["method"] = self.engine.route
            if self.engine.device is not None:
                kwargs["device"] = self.engine.device
            if self.engine.dtype is not None:
                kwargs["dtype"] = self.engine.dtype
        if self.model is not None:
            kwargs["model"] = self.checkpoint()
        if self.controls is not None:
            kwargs["controls"] = self.controls.as_dict()
        if self.rank is not None or "rank" in self.expect:
            kwargs["rank"] = (self.rank or RankSpec()).as_kwargs()
        return kwargs
