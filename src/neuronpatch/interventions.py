"""Interventions as data: what a patch does to one unit's activation.

An :class:`Intervention` says *how* the activation ``a`` of the unit is
replaced at the patched position(s); the engine applies it inside a forward
hook. Keeping them as plain, hashable data lets probe files, the CLI and the
Python API describe the same experiment the same way.

=========  ======================================
kind       new activation
=========  ======================================
``scale``  ``a * value``
``set``    ``value``
``zero``   ``0``
``add``    ``a + value``
``mean``   mean of ``a`` over the experiment's inputs
=========  ======================================
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from neuronpatch.errors import InterventionError

Kind = Literal["scale", "set", "zero", "add", "mean"]
KINDS: tuple[Kind, ...] = ("scale", "set", "zero", "add", "mean")
# Kinds that carry a number; ``zero`` and ``mean`` do not.
_VALUED: frozenset[str] = frozenset({"scale", "set", "add"})

# The seed notebook's scaling experiment.
DEFAULT_SCALES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


@dataclass(frozen=True)
class Intervention:
    """One patch of a unit's activation.

    Example:
        >>> Intervention("scale", 0.5).label
        'scale=0.5'
        >>> Intervention("zero").label
        'zero'
    """

    kind: Kind
    value: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InterventionError(
                f"intervention kind {self.kind!r} is unknown; expected one of {', '.join(KINDS)}"
            )
        if self.kind in _VALUED:
            if self.value is None or isinstance(self.value, bool):
                raise InterventionError(f"intervention {self.kind!r} needs a numeric value")
            value = float(self.value)
            if not math.isfinite(value):
                raise InterventionError(
                    f"intervention {self.kind!r} value {self.value!r} is invalid; "
                    "expected a finite number"
                )
            object.__setattr__(self, "value", value)
        elif self.value is not None:
            raise InterventionError(f"intervention {self.kind!r} takes no value, got {self.value!r}")

    def affine(self, mean: float = 0.0) -> tuple[float, float]:
        """The patch as ``a ↦ alpha·a + beta``; every kind is affine in ``a``.

        Args:
            mean: the mean activation over the experiment's inputs (used by ``mean``).

        Example:
            >>> Intervention("add", 2).affine(), Intervention("set", 3).affine()
            ((1.0, 2.0), (0.0, 3.0))
        """
        v = 0.0 if self.value is None else self.value
        return {
            "scale": (v, 0.0),
            "set": (0.0, v),
            "zero": (0.0, 0.0),
            "add": (1.0, v),
            "mean": (0.0, mean),
        }[self.kind]

    @property
    def label(self) -> str:
        """Short human-readable name, used in tables, plots and summary.json."""
        return self.kind if self.value is None else f"{self.kind}={self.value:g}"


def build(
    *,
    scale: Iterable[float] = (),
    set: Iterable[float] = (),
    add: Iterable[float] = (),
    zero: bool = False,
    mean: bool = False,
) -> list[Intervention]:
    """Turn keyword lists (as in probe files and the CLI) into interventions.

    Order is stable: scales, sets, adds, then zero and mean.

    Example:
        >>> [i.label for i in build(scale=[0, 2], zero=True)]
        ['scale=0', 'scale=2', 'zero']
    """
    out = [Intervention("scale", v) for v in scale]
    out += [Intervention("set", v) for v in set]
    out += [Intervention("add", v) for v in add]
    if zero:
        out.append(Intervention("zero"))
    if mean:
        out.append(Intervention("mean"))
    return out


def normalize(interventions: Sequence[Intervention] | None) -> list[Intervention]:
    """Default to the seed's eight scale factors; reject an empty list and duplicates.

    Example:
        >>> len(normalize(None))
        8
    """
    if interventions is None:
        return [Intervention("scale", f) for f in DEFAULT_SCALES]
    items = list(interventions)
    if not items:
        raise InterventionError("no interventions given; expected at least one of scale/set/add/zero/mean")
    seen: set[Intervention] = set()
    for item in items:
        if not isinstance(item, Intervention):
            raise InterventionError(f"{item!r} is not an Intervention")
        if item in seen:
            raise InterventionError(f"intervention {item.label} is listed twice")
        seen.add(item)
    return items
