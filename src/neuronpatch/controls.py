"""Negative controls: other units of the same layer, or random directions, patched the same way.

A head's slope on its unit says the head moves with the unit; it does not say
the head reads *this* unit. Controls answer that: each control gets the same
interventions (in its own activation units) as more patched rows over the
same clean run, and its own slope, R² and bootstrap interval.
``specificity`` = |target slope| / largest |control slope|, with a bootstrap
interval that resamples inputs jointly for target and controls.

Two kinds of control, in this order in every result:

``units``       other columns of the unit's layer: ``{random: k, seed: s}`` or a list
                of indices (labels ``unit17``, ...). For a dictionary latent, other
                latents of the same dictionary; ``random`` draws first from the latents
                active on the inputs (a latent that never fires cannot be scaled).
``directions``  ``{random: k, seed: s}``: k random directions of the residual space
                (labels ``dir0``, ``dir1``, ...), for residual-stream units only
                (``resid_post``, ``resid_pre``, ``mlp_out``, ``attn_out``).

A direction ``v`` (unit norm, and mean-zero: its coordinates sum to 0) is a unit
whose value is ``a = v·t`` for the tensor ``t`` the unit lives in. An
intervention maps it to ``α·a + β`` and adds the change ``δ = α·a + β − a``
times ``v`` to ``t``, so the value becomes exactly ``a + δ·|v|² = α·a + β``.

Why mean-zero. In ``transformer_lens`` coordinates of a LayerNorm model every
residual tensor is centred, ``t − mean(t)·1``. Because ``v·1 = 0``:

* the value is the same in both coordinate systems, ``v·(t − mean(t)·1) = v·t``;
* the patch keeps a centred tensor centred (``mean(δ·v) = 0``), so the centred
  value moves by exactly ``δ`` and the processed model sees exactly the HF
  patch, centred. A column patch instead adds ``δ`` to one coordinate, which
  leaves the centred stream off-centre by ``δ/d_model`` on every coordinate
  (the offset :mod:`neuronpatch.coordinates` describes); for a direction that
  offset is ``δ·mean(v) = 0``, so none applies.

In ``hf`` coordinates and in RMSNorm models nothing is centred and the same
directions are used, so a seed names the same directions everywhere
(:func:`random_directions`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from neuronpatch import stats
from neuronpatch.errors import ControlsError
from neuronpatch.units import EXPERT_TYPES, MLP_HIDDEN_TYPES, ROUTER, UNIT_SITES

RESAMPLES = 1000
SEED = 0
# Layer types whose unit lives in the residual space (d_model wide): directions apply.
RESIDUAL_TYPES: tuple[str, ...] = ("resid_post", "resid_pre", "mlp_out", "attn_out")
assert set(RESIDUAL_TYPES) == set(UNIT_SITES) - MLP_HIDDEN_TYPES
_FORMS = ("units: {random: k, seed: s} or a list of unit indices, and/or "
          "directions: {random: k, seed: s}")


def _random_pick(spec: Any, key: str, top: int) -> tuple[int, int]:
    """``{random: k, seed: s}`` → ``(k, s)``, with ``1 <= k <= top`` and ``s >= 0``."""
    if not isinstance(spec, Mapping) or "random" not in spec or set(spec) - {"random", "seed"}:
        raise ControlsError(f"controls.{key} is {spec!r}; expected {{random: k, seed: s}}")
    k, seed = spec["random"], spec.get("seed", 0)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= top:
        raise ControlsError(f"controls.{key}.random is {k!r}; expected an int in [1, {top}]")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ControlsError(f"controls.{key}.seed is {seed!r}; expected an int >= 0")
    return k, seed


def resolve_units(spec: Any, *, target: int, width: int, prefer: Sequence[int] | None = None) -> list[int]:
    """``{units: {random: k, seed: s}}``, ``{units: [..]}`` or a list → control columns.

    ``prefer``: units a random draw takes first (a dictionary's latents active on the inputs);
    the rest of the draw, if it needs more, comes from the other units.

    Raises:
        ControlsError: a unit outside ``[0, width)``, the target itself, or a bad form.
    """
    units = spec.get("units") if isinstance(spec, Mapping) else spec
    if isinstance(spec, Mapping) and set(spec) - {"units"}:
        extra = sorted(map(str, set(spec) - {"units"}))
        raise ControlsError(f"controls: {extra[0]!r} is not supported here; expected units: "
                            "{random: k, seed: s} or a list of unit indices")
    if isinstance(units, Mapping):
        k, seed = _random_pick(units, "units", width - 1)
        rng = np.random.default_rng(seed)
        first = sorted({int(u) for u in prefer or () if u != target and 0 <= u < width})
        if len(first) >= k:
            return sorted(int(u) for u in rng.choice(np.array(first), size=k, replace=False))
        pool = np.array([u for u in range(width) if u != target and u not in set(first)])
        return sorted([*first, *(int(u) for u in rng.choice(pool, size=k - len(first), replace=False))])
    if isinstance(units, Sequence) and not isinstance(units, str):
        out = []
        for u in units:
            if isinstance(u, bool) or not isinstance(u, int) or not 0 <= u < width or u == target:
                raise ControlsError(f"control unit {u!r} is invalid; expected an index in [0, {width - 1}] "
                                    f"other than the target {target}")
            out.append(int(u))
        if len(set(out)) != len(out) or not out:
            raise ControlsError(f"control units {list(units)!r}: expected distinct indices, at least one")
        return out
    raise ControlsError(f"controls {spec!r}: expected units: {{random: k, seed: s}} or a list of indices")


def random_directions(k: int, seed: int, d_model: int) -> NDArray[np.float64]:
    """``[k, d_model]``: k random directions, each of unit norm with coordinates summing to 0.

    Seeded (numpy's ``default_rng``): the same ``(k, seed, d_model)`` gives the same directions.

    Example:
        >>> v = random_directions(3, seed=0, d_model=8)
        >>> np.allclose(np.linalg.norm(v, axis=1), 1), np.allclose(v.sum(1), 0)
        (True, True)
    """
    g = np.random.default_rng(seed).standard_normal((k, d_model))
    g -= g.mean(axis=1, keepdims=True)
    return g / np.linalg.norm(g, axis=1, keepdims=True)


@dataclass(frozen=True)
class ControlSet:
    """What a run patches besides its target: unit columns first, then directions."""

    units: tuple[int, ...] = ()
    directions: NDArray[np.float64] | None = None  # [k, d_model], see random_directions
    seed: int | None = None  # the directions' seed

    @property
    def labels(self) -> tuple[str, ...]:
        n_dir = 0 if self.directions is None else len(self.directions)
        return (*(f"unit{u}" for u in self.units), *(f"dir{i}" for i in range(n_dir)))

    def __len__(self) -> int:
        return len(self.labels)


def resolve(spec: Any, *, target: int, width: int, d_model: int, layer_type: str,
            config: str | Path = "config.json", prefer: Sequence[int] | None = None) -> ControlSet:
    """A ``controls`` value (as in probe files, or a list of indices) → the controls to patch.

    ``prefer``: see :func:`resolve_units`.

    Raises:
        ControlsError: a bad form or value, or directions for an MLP neuron (one line each).

    Example:
        >>> cs = resolve({"directions": {"random": 2, "seed": 1}}, target=3, width=16, d_model=16,
        ...              layer_type="resid_post")
        >>> cs.labels, cs.directions.shape
        (('dir0', 'dir1'), (2, 16))
    """
    if not isinstance(spec, Mapping):
        return ControlSet(units=tuple(resolve_units(spec, target=target, width=width, prefer=prefer)))
    extra = sorted(map(str, set(spec) - {"units", "directions"}))
    if extra or not spec:
        what = f"{extra[0]!r} is not a controls key" if extra else "nothing to patch"
        raise ControlsError(f"controls: {what}; expected {_FORMS}")
    units: tuple[int, ...] = ()
    if spec.get("units") is not None:
        units = tuple(resolve_units({"units": spec["units"]}, target=target, width=width, prefer=prefer))
    if spec.get("directions") is None:
        if not units:
            raise ControlsError(f"controls: nothing to patch; expected {_FORMS}")
        return ControlSet(units=units)
    if layer_type not in RESIDUAL_TYPES:
        what, whats = (("an MLP neuron", "MLP neurons") if layer_type in MLP_HIDDEN_TYPES
                       else ("an expert neuron", "other neurons of the expert")
                       if layer_type in EXPERT_TYPES
                       else ("a router logit", "other experts' logits") if layer_type == ROUTER
                       else ("a dictionary latent", "dictionary latents"))
        raise ControlsError(
            f"controls.directions needs a residual-stream unit, but {config} has layer_type "
            f"{layer_type!r} ({what}); expected controls.units for {whats}, or a head whose "
            f"layer_type is one of {', '.join(RESIDUAL_TYPES)}")
    k, seed = _random_pick(spec["directions"], "directions", d_model - 1)
    return ControlSet(units=units, directions=random_directions(k, seed, d_model), seed=seed)


@dataclass(frozen=True)
class Control:
    """One control's fit."""

    label: str  # unit17, dir0, ...
    unit: int | None  # the column, for a unit control
    slope: float
    r_squared: float
    slope_ci95: list[float]
    r_squared_ci95: list[float]

    @property
    def kind(self) -> str:
        return "unit" if self.unit is not None else "direction"

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "unit": self.unit, "slope": self.slope,
                "r_squared": self.r_squared, "slope_ci95": self.slope_ci95,
                "r_squared_ci95": self.r_squared_ci95}


def _slope_samples(x: NDArray[np.float64], y: NDArray[np.float64],
                   draws: NDArray[np.int64]) -> NDArray[np.float64]:
    counts = np.zeros((draws.shape[0], x.shape[0]))
    np.add.at(counts, (np.arange(draws.shape[0])[:, None], draws), 1.0)
    suff = np.stack([np.full(x.shape[0], x.shape[1], dtype=np.float64), x.sum(1), y.sum(1),
                     (x * x).sum(1), (x * y).sum(1)], axis=1)
    n, sx, sy, sxx, sxy = (counts @ suff).T
    vxx, vxy = sxx - sx * sx / n, sxy - sx * sy / n
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(vxx > 1e-24 * np.maximum(sxx, 1e-300), vxy / vxx, np.nan)


@dataclass(frozen=True)
class ControlResults:
    """Every control's fit, and the target's specificity against them."""

    target_x: NDArray[np.float64]  # [inputs, interventions] the target's activation change
    target_y: NDArray[np.float64]
    xs: tuple[NDArray[np.float64], ...]  # per control
    ys: tuple[NDArray[np.float64], ...]
    units: tuple[int, ...]  # the unit controls' columns (the first len(units) controls)
    directions: NDArray[np.float64] | None = None  # [k, d_model]: the direction controls
    seed: int | None = None  # the directions' seed

    @property
    def labels(self) -> tuple[str, ...]:
        return ControlSet(self.units, self.directions, self.seed).labels

    @cached_property
    def controls(self) -> list[Control]:
        out = []
        columns = [*self.units, *[None] * (len(self.xs) - len(self.units))]
        for label, u, x, y in zip(self.labels, columns, self.xs, self.ys, strict=True):
            fit = stats.ols(x.ravel(), y.ravel())
            ci, r2 = stats.bootstrap_ci(x, y, n_resamples=RESAMPLES, seed=SEED)
            out.append(Control(label, u, fit.slope, fit.r_squared, ci.as_list(), r2.as_list()))
        return out

    @property
    def max_abs_slope(self) -> float:
        return max((abs(c.slope) for c in self.controls), default=math.nan)

    @property
    def specificity(self) -> float:
        target = abs(stats.ols(self.target_x.ravel(), self.target_y.ravel()).slope)
        top = self.max_abs_slope
        return target / top if top > 0 else (math.inf if target > 0 else math.nan)

    def specificity_interval(self, level: float = 0.95) -> list[float]:
        n = self.target_x.shape[0]
        if n < 2:
            return [math.nan, math.nan]
        draws = np.random.default_rng(SEED).integers(0, n, size=(RESAMPLES, n))
        t = np.abs(_slope_samples(self.target_x, self.target_y, draws))
        per = [_slope_samples(x, y, draws) for x, y in zip(self.xs, self.ys, strict=True)]
        c = np.max(np.abs(np.stack(per)), axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = t / c
        ratio = ratio[np.isfinite(ratio)]
        if ratio.size < RESAMPLES / 2:
            return [math.nan, math.nan]
        tail = (1 - level) / 2 * 100
        return [float(np.percentile(ratio, tail)), float(np.percentile(ratio, 100 - tail))]

    def to_dict(self) -> dict[str, Any]:
        """What summary.json holds under ``controls`` (the directions by seed, not by value)."""
        n_dir = 0 if self.directions is None else len(self.directions)
        return {"units": list(self.units),
                "directions": None if not n_dir else {"random": n_dir, "seed": self.seed},
                "controls": [c.to_dict() for c in self.controls], "specificity": self.specificity,
                "specificity_ci95": self.specificity_interval(), "max_abs_control_slope": self.max_abs_slope}
