"""Probe files: YAML documents → validated :class:`ProbeSpec` objects, with line numbers.

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
silently checks nothing: unknown keys, duplicate keys, wrong types, empty or
inverted ranges, unknown metrics, a missing head directory or inputs file are
all :class:`~neuronpatch.errors.ProbeSpecError`, one line each, in the form
``FILE:LINE: key 'expect.slope': <what is wrong>; expected <what is allowed>``.

YAML is read with a ``SafeLoader`` subclass (no Python tags, no object
construction) that also rejects duplicate keys and records the line of every
key, so errors and expectation outcomes point at the line the user wrote.

A new top-level key is one pydantic model class plus one field on
:class:`ProbeSpec` (planned: ``baseline:`` and ``fuzz:``).
"""

from __future__ import annotations

import difflib
import glob
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from neuronpatch.errors import InterventionError, ProbeSpecError
from neuronpatch.interventions import Intervention, build, normalize
from neuronpatch.probes.expectations import (
    METRICS,
    RANGE_FORMS,
    Expectation,
    Range,
    unknown_metric_message,
)

__all__ = [
    "PROBE_SUFFIXES",
    "Document",
    "Interventions",
    "MarkSpec",
    "ProbeSpec",
    "is_probe_file",
    "load_documents",
    "load_probe_file",
    "parse_document",
]

PROBE_SUFFIXES: tuple[str, ...] = (".probe.yaml", ".probe.yml")

Loc = tuple[str | int, ...]

_GLOB_CHARS = re.compile(r"[*?\[]")
_MARK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Marks that make no sense on a probe item (they configure Python functions).
_UNSUPPORTED_MARKS = {"parametrize", "usefixtures", "skipif"}


def is_probe_file(path: str | os.PathLike[str]) -> bool:
    """Whether a file name is a probe file (``*.probe.yaml`` or ``*.probe.yml``).

    Example:
        >>> is_probe_file("probes/demo.probe.yaml"), is_probe_file("config.yaml")
        (True, False)
    """
    return os.fspath(path).endswith(PROBE_SUFFIXES)


def probe_stem(path: str | os.PathLike[str]) -> str:
    """The file name without its probe suffix: the default probe name.

    Example:
        >>> probe_stem("probes/demo.probe.yaml")
        'demo'
    """
    name = Path(path).name
    for suffix in PROBE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


# ----- YAML with line numbers -----------------------------------------------------


class _YamlProblem(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _ProbeLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if first is not None:
                raise _YamlProblem(
                    line, f"key {key!r}: duplicate key (first defined at line {first}); "
                    "expected each key once per mapping"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads `1e-6` as a string: a float needs a dot there. Tolerances are
# written that way all the time, so accept the YAML 1.2 / Python spelling too.
_ProbeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _record_lines(node: yaml.Node, path: Loc, out: dict[Loc, int]) -> None:
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = (*path, str(key_node.value))
                out[key] = key_node.start_mark.line + 1
                _record_lines(value_node, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _record_lines(item, (*path, i), out)


@dataclass(frozen=True)
class Document:
    """One YAML document of a probe file, with the line of every key path.

    Attributes:
        path: the probe file (absolute).
        display: how messages name the file (usually relative to the rootdir).
        index: 0-based position among the file's non-empty documents.
        count: number of non-empty documents in the file.
        data: the parsed YAML value.
        lines: key path (``("expect", "slope")``, ``("inputs", 2)``) → 1-based line.
    """

    path: Path
    display: str
    index: int
    count: int
    data: Any
    lines: Mapping[Loc, int] = field(default_factory=dict)

    @property
    def line(self) -> int:
        """First line of the document."""
        return self.lines.get((), 1)

    @property
    def default_name(self) -> str:
        """The file's stem, with ``-N`` for the N-th document of a multi-document file."""
        stem = probe_stem(self.path)
        return stem if self.index == 0 else f"{stem}-{self.index + 1}"

    def line_of(self, loc: Loc) -> int:
        """Line of the longest prefix of ``loc`` that the file spells out."""
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                return self.lines[loc[:n]]
        return self.line

    def where(self, loc: Loc = ()) -> str:
        """``FILE:LINE`` of a key path."""
        return f"{self.display}:{self.line_of(loc)}"

    def name_guess(self) -> str:
        """The probe's name if the document spells one sensibly, else the default name."""
        if isinstance(self.data, Mapping):
            name = self.data.get("name")
            if isinstance(name, str) and name.strip() and _name_problem(name) is None:
                return name
        return self.default_name


def load_documents(path: str | os.PathLike[str], *, display: str | None = None) -> list[Document]:
    """Read a probe file into documents (empty documents are dropped).

    Raises:
        ProbeSpecError: the file cannot be read, is not valid YAML, uses a tag
            the safe loader refuses, or repeats a key (``FILE:LINE: ...``).

    Example:
        >>> docs = load_documents("probes/demo.probe.yaml")   # doctest: +SKIP
        >>> docs[0].where(("expect", "slope"))                # doctest: +SKIP
        'probes/demo.probe.yaml:12'
    """
    path = Path(path)
    shown = display or os.fspath(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProbeSpecError(f"{shown}: cannot read probe file: {e}") from e
    loader = _ProbeLoader(text)
    found: list[tuple[Any, dict[Loc, int]]] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:  # pragma: no cover - check_node said there is one
                break
            lines: dict[Loc, int] = {}
            _record_lines(node, (), lines)
            data = loader.construct_document(node)
            if data is not None:
                found.append((data, lines))
    except _YamlProblem as e:
        raise ProbeSpecError(f"{shown}:{e.line}: {e.message}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = e.problem or e.context or "invalid YAML"
        if isinstance(e, yaml.constructor.ConstructorError):
            problem += " (probe files are read with a safe loader: no Python tags)"
        raise ProbeSpecError(f"{shown}:{line}: invalid YAML: {problem}") from None
    except yaml.YAMLError as e:
        raise ProbeSpecError(f"{shown}:1: invalid YAML: {e}") from None
    finally:
        loader.dispose()
    return [
        Document(path=path.resolve(), display=shown, index=i, count=len(found), data=data,
                 lines=lines)
        for i, (data, lines) in enumerate(found)
    ]


# ----- field validators -------------------------------------------------------------


def _base_dir(info: ValidationInfo) -> Path:
    context = info.context or {}
    return Path(context.get("base_dir", "."))


def _name_problem(name: str) -> str | None:
    if not name.strip():
        return "is empty"
    if "::" in name or "\n" in name:
        return f"{name!r} contains '::' or a line break (they separate pytest node ids)"
    return None


def head_dirs(base_dir: Path, head: str) -> list[tuple[Path, str | None]]:
    """Resolve a probe's ``head:`` (a path or a glob) against the probe file's directory.

    Returns:
        ``(directory, label)`` pairs; ``label`` is None for a plain path and the
        part the glob matched (e.g. ``demo_causal``) for a glob.

    Example:
        >>> head_dirs(Path("probes"), "heads/*")       # doctest: +SKIP
        [(PosixPath('probes/heads/demo_causal'), 'demo_causal'), ...]
    """
    target = base_dir / head
    if not _GLOB_CHARS.search(head):
        return [(target, None)]
    parts = Path(head).parts
    fixed = next(i for i, p in enumerate(parts) if _GLOB_CHARS.search(p))
    root = base_dir.joinpath(*parts[:fixed])
    matches = sorted(Path(p) for p in glob.glob(os.fspath(target), recursive=True))
    return [(p, p.relative_to(root).as_posix()) for p in matches
            if p.is_dir() and (p / "config.json").is_file()]


def _check_head(value: str, info: ValidationInfo) -> str:
    base = _base_dir(info)
    if not value.strip():
        raise ValueError("is empty; expected the path of a head directory, relative to this file")
    found = head_dirs(base, value)
    if _GLOB_CHARS.search(value):
        if not found:
            raise ValueError(
                f"glob {value!r} matches no head directory under {base}; expected a glob "
                "that matches at least one directory holding config.json"
            )
        return value
    path = found[0][0]
    if not path.exists():
        raise ValueError(
            f"head directory {value!r} not found (looked for {path}); expected a head "
            "directory (config.json + weights) relative to this file"
        )
    if not path.is_dir():
        raise ValueError(f"{value!r} is a file; expected a head directory (config.json + weights)")
    if not (path / "config.json").is_file():
        raise ValueError(
            f"head directory {value!r} has no config.json; expected a head directory "
            "(config.json + head.pt or head.safetensors)"
        )
    return value


def _read_inputs(value: Any, info: ValidationInfo) -> Any:
    if not isinstance(value, Mapping):
        return value
    keys = set(value)
    if keys != {"file"}:
        extra = sorted(str(k) for k in keys - {"file"})
        problem = f"unknown key {extra[0]!r}" if extra else "'file' is missing"
        raise ValueError(f"{problem}; expected a list of texts or {{file: path}}")
    name = value["file"]
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"file is {name!r}; expected the path of a text file, one input a line")
    path = _base_dir(info) / name
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(
            f"inputs file {name!r} not found (looked for {path}); expected a text file "
            "relative to this file, one input a line"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"inputs file {name!r} cannot be read ({e}); expected UTF-8 text") from e
    texts = [line for line in text.splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"inputs file {name!r} has no non-blank line; expected one input a line")
    return texts


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
    """One entry of ``marks:``: ``slow``, ``skip``, ``{skip: reason}``, ``{xfail: reason}``,
    ``{xfail: {reason: ..., strict: true}}``."""

    name: str
    reason: str | None = None
    strict: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, value: Any) -> Any:
        allowed = ("a mark name (slow, skip, xfail, ...), {skip: reason}, {xfail: reason} "
                   "or {xfail: {reason: text, strict: true}}")
        if isinstance(value, str):
            if not _MARK_NAME.match(value):
                raise ValueError(f"mark {value!r} is not a valid name; expected {allowed}")
            if value in _UNSUPPORTED_MARKS:
                raise ValueError(f"mark {value!r} does not apply to probes; expected {allowed}")
            return {"name": value}
        if isinstance(value, Mapping) and len(value) == 1:
            [(name, arg)] = value.items()
            if name not in ("skip", "xfail"):
                raise ValueError(
                    f"mark {name!r} takes no arguments in a probe file; expected {allowed}"
                )
            if arg is None or isinstance(arg, str):
                return {"name": name, "reason": arg}
            if isinstance(arg, Mapping):
                keys = {"reason", "strict"} if name == "xfail" else {"reason"}
                extra = sorted(str(k) for k in set(arg) - keys)
                if extra:
                    raise ValueError(
                        f"unknown {name} option {extra[0]!r}; expected {', '.join(sorted(keys))}"
                    )
                return {"name": name, **arg}
        raise ValueError(f"got {value!r}; expected {allowed}")


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
        BeforeValidator(_read_inputs),
        AfterValidator(lambda v: v if v is None else _check_texts(v)),
        Field(min_length=1, description="a list of texts or {file: path}"),
    ] = None
    interventions: Interventions | None = None
    position: Annotated[str | int | None, BeforeValidator(_check_position)] = None
    expect: Expectations = Field(default_factory=dict)
    marks: list[MarkSpec] = Field(default_factory=list)
    baseline: BaselineSpec | None = None
    fuzz: FuzzSpec | None = None

    _doc: Document | None = PrivateAttr(default=None)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str | None) -> str | None:
        if value is not None and (problem := _name_problem(value)):
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
        """``(head directory, label)`` per match; one pair with label None for a plain path."""
        return head_dirs(self.path.parent, self.head)

    def run_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``run_experiment`` (inputs, interventions, position)."""
        kwargs: dict[str, Any] = {}
        if self.inputs is not None:
            kwargs["inputs"] = list(self.inputs)
        if self.interventions is not None:
            kwargs["interventions"] = self.interventions.as_list()
        if self.position is not None:
            kwargs["position"] = self.position
        return kwargs


# ----- pydantic errors → one line each ---------------------------------------------------

_EXPECTED = {
    "string_type": "a string",
    "float_type": "a number",
    "int_type": "an integer",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "int_from_float": "an integer",
    "finite_number": "a finite number",
}


def _key_text(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<document>"


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The model class whose keys live at ``loc`` (for 'expected one of ...')."""
    model: type[BaseModel] = ProbeSpec
    for part in loc:
        info = model.model_fields.get(str(part))
        if info is None:
            return None
        annotation = info.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping", type(None): "null"}.get(type(value),
                                                                        type(value).__name__)
    return f"got {text} ({kind})" if value is not None else "got null"


def _error_line(doc: Document, err: Mapping[str, Any]) -> tuple[int, str]:
    loc: Loc = tuple(p for p in err["loc"] if p != "[key]")
    kind = err["type"]
    key = _key_text(loc)
    if kind == "extra_forbidden":
        parent = loc[:-1]
        model = _model_at(parent)
        allowed = list(model.model_fields) if model else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        text = f"unknown key{hint}; expected one of {', '.join(allowed)}"
    elif kind == "missing":
        model = _model_at(loc[:-1])
        info = model.model_fields.get(str(loc[-1])) if model else None
        what = info.description if info and info.description else "a value"
        text = f"required key is missing; expected {what}"
    elif kind == "value_error":
        text = str(err.get("ctx", {}).get("error", err["msg"]))
        if "; expected" not in text:
            text += f"; expected {RANGE_FORMS}" if loc[:1] == ("expect",) else ""
    elif kind == "too_short":
        text = f"{_describe(err['input'])}; expected at least 1 item"
    elif kind in _EXPECTED:
        text = f"{_describe(err['input'])}; expected {_EXPECTED[kind]}"
    else:
        text = f"{err['msg']}"
    return doc.line_of(loc), f"{doc.display}:{doc.line_of(loc)}: key {key!r}: {text}"


def parse_document(doc: Document) -> ProbeSpec:
    """Validate one document into a :class:`ProbeSpec`.

    Raises:
        ProbeSpecError: every problem of the document, one ``FILE:LINE: key ...``
            line each, in line order.

    Example:
        >>> [spec.title for spec in map(parse_document, load_documents(p))]  # doctest: +SKIP
        ['demo head tracks its neuron']
    """
    if not isinstance(doc.data, Mapping):
        raise ProbeSpecError(
            f"{doc.where()}: the document: {_describe(doc.data)}; expected a mapping of probe "
            f"keys ({', '.join(ProbeSpec.model_fields)})"
        )
    bad_keys = [k for k in doc.data if not isinstance(k, str)]
    if bad_keys:
        raise ProbeSpecError(
            f"{doc.where()}: key {bad_keys[0]!r} is not a string; expected one of "
            f"{', '.join(ProbeSpec.model_fields)}"
        )
    try:
        spec = ProbeSpec.model_validate(doc.data, context={"base_dir": doc.path.parent})
    except ValidationError as e:
        lines = sorted({_error_line(doc, err) for err in e.errors(include_url=False)})
        raise ProbeSpecError("\n".join(text for _, text in lines)) from None
    spec._doc = doc
    return spec


def iter_probe_file(
    path: str | os.PathLike[str], *, display: str | None = None
) -> Iterator[tuple[Document, ProbeSpec | ProbeSpecError]]:
    """Each document with its spec, or the error that document has (the others still parse).

    Raises:
        ProbeSpecError: the file as a whole is unreadable or not YAML.

    Example:
        >>> for doc, spec in iter_probe_file("probes/demo.probe.yaml"):   # doctest: +SKIP
        ...     print(doc.name_guess(), isinstance(spec, ProbeSpec))
    """
    names: dict[str, str] = {}
    for doc in load_documents(path, display=display):
        try:
            spec = parse_document(doc)
        except ProbeSpecError as e:
            yield doc, e
            continue
        if spec.title in names:
            yield doc, ProbeSpecError(
                f"{spec.where('name')}: key 'name': {spec.title!r} is already the name of the "
                f"probe at {names[spec.title]}; expected a unique name per file"
            )
            continue
        names[spec.title] = spec.where()
        yield doc, spec


def load_probe_file(path: str | os.PathLike[str], *, display: str | None = None) -> list[ProbeSpec]:
    """Parse every probe of a file; the first broken document raises.

    Raises:
        ProbeSpecError: one-line-per-problem message naming file, line and key.

    Example:
        >>> [s.title for s in load_probe_file("probes/demo.probe.yaml")]   # doctest: +SKIP
        ['demo head tracks its neuron']
    """
    specs = []
    for _, spec in iter_probe_file(path, display=display):
        if isinstance(spec, ProbeSpecError):
            raise spec
        specs.append(spec)
    return specs
