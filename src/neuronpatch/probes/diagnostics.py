"""A probe document's problems as lines a person can act on: ``FILE:LINE: key 'x': …; expected …``.

Pydantic's validation errors (of :mod:`neuronpatch.probes.schema`'s models) and the resolver's
problems (:mod:`neuronpatch.probes.resolver`) become one line each, at the line of the
key they are about, naming what is wrong and what is allowed (with the closest spelling
of an unknown key).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from neuronpatch.probes.documents import Document, Loc
from neuronpatch.probes.ranges import RANGE_FORMS

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


def key_text(loc: Loc) -> str:
    """``expect.slope``, ``inputs[2]``: a key path as a probe file spells it.

    Example:
        >>> key_text(("inputs", 2)), key_text(("expect", "slope"))
        ('inputs[2]', 'expect.slope')
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<document>"


def _model_at(top: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The model class whose keys live at ``loc`` under ``top`` (for 'expected one of ...')."""
    model = top
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


def describe(value: Any) -> str:
    """``got 'x' (a string)``: a value as the line that refuses it shows it."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping", type(None): "null"}.get(type(value),
                                                                        type(value).__name__)
    return f"got {text} ({kind})" if value is not None else "got null"


def key_problem(doc: Document, loc: Loc, text: str) -> tuple[int, str]:
    """``(line, "key 'x': text")`` of a problem with the key at ``loc``."""
    return doc.line_of(loc), f"key {key_text(loc)!r}: {text}"


def error_line(doc: Document, err: Mapping[str, Any], model: type[BaseModel]) -> tuple[int, str]:
    """``(line, "key 'x': what is wrong; expected ...")`` of one pydantic error of ``model``."""
    loc: Loc = tuple(p for p in err["loc"] if p != "[key]")
    kind = err["type"]
    if kind == "extra_forbidden":
        parent = loc[:-1]
        at = _model_at(model, parent)
        allowed = list(at.model_fields) if at else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        text = f"unknown key{hint}; expected one of {', '.join(allowed)}"
    elif kind == "missing":
        at = _model_at(model, loc[:-1])
        info = at.model_fields.get(str(loc[-1])) if at else None
        what = info.description if info and info.description else "a value"
        text = f"required key is missing; expected {what}"
    elif kind == "value_error":
        text = str(err.get("ctx", {}).get("error", err["msg"]))
        if "; expected" not in text:
            text += f"; expected {RANGE_FORMS}" if loc[:1] == ("expect",) else ""
    elif kind in ("greater_than_equal", "less_than_equal"):
        bound = err.get("ctx", {}).get("ge" if kind == "greater_than_equal" else "le")
        sign = ">=" if kind == "greater_than_equal" else "<="
        text = f"{describe(err['input'])}; expected a number {sign} {bound}"
    elif kind == "too_short":
        text = f"{describe(err['input'])}; expected at least 1 item"
    elif kind in _EXPECTED:
        text = f"{describe(err['input'])}; expected {_EXPECTED[kind]}"
    else:
        text = f"{err['msg']}"
    return key_problem(doc, loc, text)


def joined(doc: Document, problems: list[tuple[int, str]]) -> str:
    """Every problem of a document, one ``FILE:LINE: …`` line each, in line order."""
    return "\n".join(f"{doc.display}:{line}: {text}" for line, text in sorted(set(problems)))
