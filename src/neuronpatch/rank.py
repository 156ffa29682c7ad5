"""Which units of a layer does a head read? Every unit ranked by |slope|.

A head's slope on its own unit says it moves with that unit; ranking every
unit of the layer says whether that unit is the one it reads *most*. The slope
of unit ``u`` is the head's prediction change per unit of ``u``'s activation
change, as :func:`neuronpatch.run_experiment` measures it for its target.

Methods, cheapest that is exact first:

``upstream``  the head reads before the layer: every slope is exactly 0
              (checked with a real patched run).
``exact``     the head reads the residual stream right after the layer, at the
              patched position: each unit's patched features are the clean ones
              plus ``Δa`` times its write direction (the model's own output
              projection), so every unit's slope follows from the clean run (one
              matrix product for a linear regression head, ``head.predict`` in
              chunks otherwise). Checked against a real patched run of the top
              units; where it does not hold (a norm after the MLP) the screen
              takes over.
``screen``    anywhere else: the tokens before the read position run once into
              the model's own KV cache; the read token runs again through the
              model's own forward with a zero tensor added at the layer (the only
              thing that requires a gradient: the weights are frozen for the pass,
              so backward runs from the head down to the layer and computes no
              weight gradient), and one backward gives ∂prediction/∂unit for every
              unit and input. A unit's *screen slope* is the mean of that gradient
              over the inputs: a first-order estimate. The top ``top`` units by
              |screen slope| (and the head's target unit) are then patched for
              real, as rows over one clean row per input that continue from the
              same KV cache (``engine.measure`` re-runs the prefixes instead when
              the caches do not fit in ``engine.KV_CACHE_BYTES``), and their *exact*
              slopes and R² are reported beside the screen's, with the Spearman
              correlation of the two over the top.
``patched``   ``screen="never"`` where ``exact`` cannot serve: every unit
              patched for real (costly on a large layer).

**Rank** is a unit's position by |slope|, where the slope is the exact one
for every unit that was patched (or computed exactly) and the screen's estimate
for the rest; a unit's rank is the number of units whose |slope| is at least
its own (so ties, e.g. all zeros, share the worst place). With the screen,
the target's rank is therefore exact against the confirmed top units and
first-order against the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from neuronpatch import coordinates, engine, stats, units
from neuronpatch.coordinates import Plan
from neuronpatch.errors import InputError
from neuronpatch.heads import Head, load_head
from neuronpatch.interventions import Intervention, build, normalize
from neuronpatch.models import load_model
from neuronpatch.tolerance import agree

if TYPE_CHECKING:
    from neuronpatch.models import LoadedModel

SCREENS: tuple[str, ...] = ("auto", "always", "never")
# The confirmation's default interventions: ablate the unit and double it.
DEFAULT_INTERVENTIONS: tuple[Intervention, ...] = (Intervention("scale", 0.0), Intervention("scale", 2.0))
# Units checked against a real patched run when slopes are computed exactly.
_CHECKED = 8
# Floats one chunk of patched features may hold when a non-linear head is applied to them.
_CHUNK_FLOATS = 2**24
# Columns one call of the write-direction helper computes at once.
_DIRECTION_CHUNK = 1024
# What stats.ols treats as constant (its own thresholds).
_RTOL, _ATOL = stats.CONSTANT_RTOL, stats.CONSTANT_ATOL


@dataclass(frozen=True)
class RankedUnit:
    """One row of the ranking table."""

    unit: int
    rank: int
    screen_slope: float | None  # the screen's first-order slope (None where no screen ran)
    exact_slope: float | None  # the patched (or exactly computed) slope; None where not patched
    exact_r_squared: float | None

    @property
    def slope(self) -> float:
        """The slope the rank is based on: exact where there is one, else the screen's."""
        if self.exact_slope is not None:
            return self.exact_slope
        return math.nan if self.screen_slope is None else self.screen_slope

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "rank": self.rank, "screen_slope": self.screen_slope,
                "exact_slope": self.exact_slope, "exact_r_squared": self.exact_r_squared}


@dataclass(frozen=True)
class RankResult:
    """Every unit of one layer ranked by how strongly the head's prediction follows it.

    Arrays are indexed by unit. ``exact_slope`` / ``exact_r_squared`` are NaN
    where a unit was not patched (``patched`` False); ``screen_slope`` is None
    when no screen ran.
    """

    head_path: str
    model_name: str
    layer: int
    layer_type: str
    unit_hook: str
    feature_hook: str
    method: str
    target: int | None  # the head's target unit, when it belongs to the ranked layer
    top: int
    interventions: tuple[str, ...]
    inputs: tuple[str, ...]
    screen_slope: NDArray[np.float64] | None
    exact_slope: NDArray[np.float64]
    exact_r_squared: NDArray[np.float64]
    patched: NDArray[np.bool_]
    confirmed: tuple[int, ...]  # the screen's top units, patched for real (exact: the top by slope)
    notes: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        """How many units the layer has."""
        return int(self.exact_slope.shape[0])

    @property
    def slope(self) -> NDArray[np.float64]:
        """Per unit, the slope its rank is based on: exact where patched, else the screen's."""
        if self.screen_slope is None:
            return self.exact_slope
        return np.where(self.patched, self.exact_slope, self.screen_slope)

    @property
    def ranks(self) -> NDArray[np.int64]:
        """Per unit, how many units have an |slope| at least its own (1 = read most)."""
        key = np.abs(self.slope)
        key = np.where(np.isnan(key), -1.0, key)  # an undefined slope ranks last
        ordered = np.sort(key)
        return (key.size - np.searchsorted(ordered, key, side="left")).astype(np.int64)

    @property
    def target_rank(self) -> int | None:
        """The head's target unit's rank, or None when the ranked layer is not its own."""
        return None if self.target is None else int(self.ranks[self.target])

    @property
    def rank_correlation(self) -> float:
        """Spearman ρ of |screen slope| and |exact slope| over the confirmed top units.

        NaN without a screen, or with fewer than 3 confirmed units.
        """
        if self.screen_slope is None or len(self.confirmed) < 3:
            return math.nan
        idx = list(self.confirmed)
        a, b = np.abs(self.screen_slope[idx]), np.abs(self.exact_slope[idx])
        ok = np.isfinite(a) & np.isfinite(b)
        if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
            return math.nan
        from scipy.stats import spearmanr

        return float(spearmanr(a[ok], b[ok])[0])

    @property
    def sign_agreement(self) -> float:
        """Fraction of the confirmed top units whose screen and exact slopes have the same sign."""
        if self.screen_slope is None or not self.confirmed:
            return math.nan
        idx = list(self.confirmed)
        return float(np.mean(np.sign(self.screen_slope[idx]) == np.sign(self.exact_slope[idx])))

    @property
    def units(self) -> list[RankedUnit]:
        """Every unit, best rank first (ties by unit index)."""
        ranks = self.ranks
        order = sorted(range(self.width), key=lambda u: (int(ranks[u]), u))
        return [self.unit(u, ranks) for u in order]

    def unit(self, u: int, ranks: NDArray[np.int64] | None = None) -> RankedUnit:
        """The table row of unit ``u``."""
        ranks = self.ranks if ranks is None else ranks
        screen = None if self.screen_slope is None else _num(self.screen_slope[u])
        exact = _num(self.exact_slope[u]) if self.patched[u] else None
        r2 = _num(self.exact_r_squared[u]) if self.patched[u] else None
        return RankedUnit(u, int(ranks[u]), screen, exact, r2)

    def head_rows(self, k: int | None = None) -> list[RankedUnit]:
        """The ``k`` best-ranked units (default ``top``)."""
        return self.units[: self.top if k is None else k]

    def describe(self, k: int = 3) -> str:
        """One line: the target's rank and the units read most (for reports)."""
        best = ", ".join(f"{r.unit} (slope {r.slope:.4g})" for r in self.units[:k])
        who = (f"unit {self.target} ranks {self.target_rank} of {self.width}" if self.target is not None
               else f"{self.width} units")
        return f"rank ({self.method}): {who} in {self.unit_hook}; read most: {best}"

    def summary(self) -> dict[str, Any]:
        """The short form for summary.json: the top units and the target, not every unit."""
        rows = self.head_rows()
        if self.target is not None and all(r.unit != self.target for r in rows):
            rows.append(self.unit(self.target))
        return {
            "method": self.method, "unit_hook": self.unit_hook, "target": self.target,
            "target_rank": self.target_rank, "units_in_layer": self.width, "top": self.top,
            "rank_correlation": self.rank_correlation, "interventions": list(self.interventions),
            "units": [r.to_dict() for r in rows], "notes": list(self.notes),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (NaN as null): the content of ``rank.json``."""
        from neuronpatch.result import to_jsonable

        return to_jsonable({
            "head_path": self.head_path, "model_name": self.model_name, "layer": self.layer,
            "layer_type": self.layer_type, "unit_hook": self.unit_hook, "feature_hook": self.feature_hook,
            "method": self.method, "target": self.target, "target_rank": self.target_rank,
            "units_in_layer": self.width, "top": self.top, "confirmed": list(self.confirmed),
            "rank_correlation": self.rank_correlation, "sign_agreement": self.sign_agreement,
            "interventions": list(self.interventions), "inputs": list(self.inputs),
            "rank_basis": ("exact slope where the unit was patched or computed exactly, else the "
                           "screen's first-order slope; rank = units with |slope| at least as large"),
            "notes": list(self.notes),
            "units": [u.to_dict() for u in self.units],
        })


def _num(x: Any) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


# --------------------------------------------------------------------------- API
def rank_units(
    head: Head | str | Path,
    inputs: Sequence[str] | None = None,
    *,
    layer: int | None = None,
    layer_type: str | None = None,
    top: int = 20,
    scale: Sequence[float] | None = None,
    set: Sequence[float] | None = None,
    add: Sequence[float] | None = None,
    zero: bool = False,
    mean: bool = False,
    interventions: Sequence[Intervention] | None = None,
    model: LoadedModel | str | Path | None = None,
    device: str = "auto",
    dtype: str = "float32",
    batch_size: int = 128,
    screen: str = "auto",
    kv_cache_bytes: int | None = None,
) -> RankResult:
    """Rank every unit of a layer by |slope| of the head's prediction on it.

    Args:
        head: a loaded :class:`Head` or a head directory.
        inputs: texts; default the seed notebook's eight sentences. Each is
            patched at the head's ``token_pos`` (where it reads).
        layer, layer_type: the layer to rank (default the head's target layer and type).
        top: how many units the screen confirms by real patching (and the table shows).
        scale, set, add, zero, mean, interventions: how a unit is patched for its
            exact slope, as in :func:`neuronpatch.run_experiment`; default
            ``scale: [0, 2]``. A linear regression head's exact slope does not
            depend on them.
        model, device, dtype, batch_size, kv_cache_bytes: as in :func:`neuronpatch.run_experiment`
            (the screen keeps its prefix caches for the confirmation when they fit in
            ``kv_cache_bytes``, in pieces when their repeated rows do not).
        screen: ``auto`` (exact where the write path allows, else the screen),
            ``always`` (screen and confirm even where exact is possible) or
            ``never`` (exact, else patch every unit for real).

    Returns:
        A :class:`RankResult`.

    Raises:
        InputError: a bad layer, layer type, ``top``, ``screen`` or batch size;
            a screen on a head without a gradient (an argmax classifier).

    Example:
        >>> res = rank_units("probes/heads/demo_causal", top=10)   # doctest: +SKIP
        >>> res.target_rank, res.units[0]                          # doctest: +SKIP
    """
    if not isinstance(head, Head):
        head = load_head(head, checkpoint=model if isinstance(model, (str, Path)) else None)
    engine.check_batch_size(batch_size)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise InputError(f"top {top!r} is invalid; expected a positive integer (units to confirm)")
    if screen not in SCREENS:
        raise InputError(f"screen {screen!r} is invalid; expected one of {', '.join(SCREENS)}")
    cfg = head.config
    if model is None or isinstance(model, (str, Path)):
        model = load_model(model or cfg.base_model_name, device=device, dtype=dtype)
    head.check_model(model)
    lt = cfg.layer_type if layer_type is None else layer_type
    if lt not in units.LAYER_TYPES:
        raise InputError(f"layer type {lt!r} is unknown; expected one of {', '.join(units.LAYER_TYPES)}")
    L = cfg.target_layer if layer is None else layer
    if isinstance(L, bool) or not isinstance(L, int) or not 0 <= L < model.n_layers:
        raise InputError(f"layer {L!r} is invalid; expected an int in [0, {model.n_layers - 1}]")
    own_set = units.OWN_SET_TYPES  # units ranked over the head's own set only
    if (lt in own_set or cfg.layer_type in own_set) and (lt, L) != (cfg.layer_type, cfg.target_layer):
        # A dictionary's latents are ranked over the head's own dictionary, an expert's neurons
        # over the head's own expert, a router's logits over the head's own router.
        raise InputError(f"layer {L} {lt} cannot be ranked for {head.config_path}: latents are ranked over "
                         "the head's own dictionary (layer_type sae, its layer), an expert's neurons over "
                         "the head's own expert, a router's logits over its own router, neurons over a "
                         "layer of the model")
    own = cfg.target_layer == L and (lt == cfg.layer_type if lt in own_set else (
        cfg.layer_type not in own_set and units.UNIT_SITES[lt] == units.UNIT_SITES[cfg.layer_type]))
    target = cfg.target_neuron if own else None
    rcfg = dataclasses.replace(cfg, target_layer=L, layer_type=lt, target_neuron=target or 0)
    p = coordinates.plan(rcfg, model, where=head.config_path)
    if interventions is None:
        given = build(scale=scale or (), set=set or (), add=add or (), zero=zero, mean=mean)
        ivs = normalize(given or list(DEFAULT_INTERVENTIONS))
    else:
        ivs = normalize(interventions)
    texts = list(engine.DEFAULT_INPUTS if inputs is None else inputs)
    enc = engine.encode(model, texts, prepend_bos=cfg.prepend_bos, token_pos=cfg.token_pos,
                        position=cfg.token_pos)
    # An expert's neurons exist only where the expert is routed: the other inputs are left out.
    texts, unrouted = engine.routed_only(model, p, enc, texts, batch_size, where=head.config_path)
    if unrouted:
        enc = engine.encode(model, texts, prepend_bos=cfg.prepend_bos, token_pos=cfg.token_pos,
                            position=cfg.token_pos)
    digit_ids = torch.tensor(head.digit_token_ids(model)) if cfg.head_type == "token" else None
    if kv_cache_bytes is None:
        kv_cache_bytes = engine.kv_cache_budget(model.device)
    job = _Job(head, model, p, enc, ivs, digit_ids, engine.Budget(batch_size, kv_cache_bytes), top, target)

    exact_possible = not p.upstream and _directions_exist(model, p, enc)
    notes: list[str] = []
    if p.upstream:
        out = job.upstream()
    elif exact_possible and screen != "always":
        out = job.exact()
        if out.mismatch is not None:
            notes.append(out.mismatch)
            out = job.screen() if screen == "auto" else job.patched()
    elif screen == "never":
        out = job.patched()
    else:
        out = job.screen()
    notes = [*out.notes, *notes]
    if unrouted:
        notes.append(engine.unrouted_note(p, texts, unrouted))
    silent = int(np.sum(out.patched & np.isnan(out.exact_slope)))
    if silent:
        notes.append(f"{silent} patched unit(s) have an undefined slope (the interventions did not move "
                     "them on any input, e.g. scaling a silent unit); they rank last: use add or set")
    return RankResult(
        head_path=str(head.path), model_name=cfg.base_model_name, layer=L, layer_type=lt,
        unit_hook=p.unit_hook, feature_hook=str(p.feature), method=out.method, target=target, top=top,
        interventions=tuple(iv.label for iv in ivs), inputs=tuple(texts),
        screen_slope=out.screen, exact_slope=out.exact_slope, exact_r_squared=out.exact_r2,
        patched=out.patched, confirmed=tuple(out.confirmed), notes=tuple(notes),
    )


def _directions_exist(model: LoadedModel, p: Plan, enc: engine.Encoded) -> bool:
    return engine.write_directions(model, p, enc, [0]) is not None


# --------------------------------------------------------------------------- the work
@dataclass
class _Outcome:
    method: str
    screen: NDArray[np.float64] | None
    exact_slope: NDArray[np.float64]
    exact_r2: NDArray[np.float64]
    patched: NDArray[np.bool_]
    confirmed: list[int]
    notes: list[str]
    mismatch: str | None = None


@dataclass
class _Kept:
    """One chunk's prefix cache, kept from the screen for the confirmation's patched rows."""

    idx: list[int]
    cache: Any  # the model's own DynamicCache over each input's tokens before the read position
    mask: Tensor  # [B, P] its attention mask (left-padded)
    lengths: Tensor  # [B] real prefix lengths (the read token's position)
    # The read token's hidden states entering the unit's block (engine.Entry), where the model
    # lets rows enter there: the confirmation's rows then start at the unit's block, folded.
    entry: Any = None


@dataclass
class _Clean:
    features: Tensor  # [n, width] the head's features, clean
    unit_row: Tensor  # [n, units] every unit of the layer at the patched position, clean
    grad: Tensor | None  # [n, units] ∂prediction/∂unit (the screen)
    kept: list[_Kept] | None = None  # every chunk's prefix cache, when it was kept


@dataclass
class _Job:
    head: Head
    model: LoadedModel
    p: Plan
    enc: engine.Encoded
    ivs: list[Intervention]
    digit_ids: Tensor | None
    budget: engine.Budget
    top: int
    target: int | None

    # ----- helpers -----------------------------------------------------------------
    def predict(self, features: Tensor) -> Tensor:
        return self.head.predict(features, self.digit_ids)

    def affine(self, means: Tensor, columns: Sequence[int]) -> Tensor:
        """``[len(columns) * n_iv, 2]``: each column's interventions, in its own units."""
        return torch.tensor([iv.affine(float(means[c])) for c in columns for iv in self.ivs],
                            dtype=torch.float32)

    def fits(self, dact: NDArray[np.float64], dpred: NDArray[np.float64],
             clean_pred: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Per unit (first axis), the pooled OLS slope and R² over inputs × interventions.

        The numbers of :func:`neuronpatch.stats.ols` (as a run's own fit): computed for every
        unit at once, and by ``stats.ols`` itself for the units whose data are degenerate
        (no activation change, no or noise-level prediction change, two distinct changes).
        """
        U = dact.shape[0]
        x, y = dact.reshape(U, -1), dpred.reshape(U, -1)
        base = float(np.max(np.abs(clean_pred), initial=0.0))
        scale = np.maximum(base, np.abs(clean_pred[None, :, None] + dpred).reshape(U, -1).max(1))
        dx, dy = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
        sxx, sxy, syy = (dx * dx).sum(1), (dx * dy).sum(1), (dy * dy).sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            slopes = sxy / sxx
            r2 = 1.0 - ((dy - slopes[:, None] * dx) ** 2).sum(1) / syy
        odd = _constant(x) | _constant(y)
        odd |= np.abs(y).max(1) <= stats.NOISE_RTOL * np.maximum(scale, _ATOL)
        steps = np.abs(x).max(1, keepdims=True) * _RTOL + _ATOL
        keys = np.sort(np.round(x / steps), axis=1)
        odd |= (np.diff(keys, axis=1) != 0).sum(1) + 1 <= 2
        for k in np.flatnonzero(odd):
            fit = stats.ols(x[k], y[k], y_scale=float(scale[k]))
            slopes[k], r2[k] = fit.slope, fit.r_squared
        return slopes, r2

    def rows_per_input(self) -> int:
        """Patched rows per input in the confirmation (the top units and the target), plus the clean one."""
        return (self.top + (self.target is not None)) * len(self.ivs) + 1

    def clean(self, grad: bool) -> _Clean:
        """The clean pass (with the screen's gradient when ``grad``) over every input.

        With ``grad``, each chunk's prefix cache is kept for the confirmation's patched
        rows when every input has tokens before its read position and all the caches
        together fit in the budget's ``kv_cache_bytes``.
        """
        n = len(self.enc.ids)
        keep = grad and all(r > 0 for r in self.enc.read_pos) and \
            n * self.budget.cache_bytes(self.model, self.enc) <= self.budget.kv_cache_bytes
        feats, rows, grads, kept = [], [], [], []
        for idx in engine.chunks(n, self.budget.batch_size):
            f, r, g, k = _pass(self.model, self.p, self.enc, idx, self.head if grad else None,
                               self.digit_ids, keep=keep)
            feats.append(f)
            rows.append(r)
            if g is not None:
                grads.append(g)
            if k is not None:
                kept.append(k)
        return _Clean(torch.cat(feats), torch.cat(rows), torch.cat(grads) if grads else None,
                      kept if keep else None)

    def confirm(self, columns: list[int], means: Tensor, enc: engine.Encoded | None = None,
                kept: list[_Kept] | None = None) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Patch ``columns`` for real, as control rows over one clean row per input: slopes and R².

        With ``kept`` the rows continue from the screen's prefix caches; otherwise
        :func:`engine.measure` runs the prefixes again.
        """
        enc = self.enc if enc is None else enc
        n, k = len(enc.ids), len(self.ivs)
        affine = self.affine(means, columns)[None].expand(n, -1, -1).contiguous()
        targets = engine.Targets.of_columns(columns).repeat(k)
        if kept is None:
            got = engine.measure(self.model, self.p, enc, affine, engine.Route("kv", "rank confirmation"),
                                 budget=self.budget, targets=targets)
            assert got.row_clean is not None
            clean_feat, feat, act, before = got.clean_feat, got.feat, got.act, got.row_clean
        else:
            # As engine.measure sizes kv batches: each row runs one token (the read token).
            per = self.budget.kv_inputs(self.model, self.p, enc, len(targets) + 1, 1,
                                        kept=any(c.entry is None for c in kept))
            parts = [_cached_rows(self.model, self.p, enc, part, affine[part.idx], targets, self.budget)
                     for c in kept for part in _split(c, per)]
            clean_feat, feat, act, before = (torch.cat([q[j] for q in parts]) for j in range(4))
        clean_pred = self.predict(clean_feat)
        pred = self.predict(feat.reshape(-1, feat.shape[-1])).reshape(n, -1)
        still = (feat == clean_feat[:, None]).all(-1)  # rows that did not move keep the clean prediction
        pred = torch.where(still, clean_pred[:, None], pred)
        dpred = (pred - clean_pred[:, None]).double().numpy().reshape(n, len(columns), k)
        dact = (act - before).double().numpy().reshape(n, len(columns), k)
        return self.fits(dact.transpose(1, 0, 2), dpred.transpose(1, 0, 2), clean_pred.double().numpy())

    def real_features(self, columns: list[int], means: Tensor) -> tuple[Tensor, Tensor]:
        """Input 0's clean features and patched features (``[len(columns) * n_iv, width]``) from a
        real patched run of ``columns``."""
        first = self.enc.first()
        affine = self.affine(means, columns)[None].contiguous()
        targets = engine.Targets.of_columns(columns).repeat(len(self.ivs))
        got = engine.measure(self.model, self.p, first, affine, engine.Route("kv", "check"),
                             budget=self.budget, targets=targets)
        return got.clean_feat[0], got.feat[0]

    def width_and_means(self, unit_row: Tensor) -> tuple[int, Tensor]:
        return int(unit_row.shape[1]), unit_row.mean(0)

    # ----- methods -----------------------------------------------------------------
    def upstream(self) -> _Outcome:
        c = self.clean(grad=False)
        width, means = self.width_and_means(c.unit_row)
        cols = _checked_columns(self.target, list(range(min(_CHECKED, width))))
        clean, feats = self.real_features(cols, means)
        # The patched rows ran in another batch shape than the clean one, so they may round
        # differently (thread counts split matrix kernels differently): compare within the
        # tolerance every route check uses, never bit for bit.
        moved = sorted({cols[j // len(self.ivs)] for j in range(feats.shape[0])
                        if agree(clean, feats[j]) is not None})
        if moved:
            raise RuntimeError(f"the head reads {self.p.feature}, before {self.p.unit}, yet a real patched "
                               f"run of unit(s) {moved} moved its prediction")
        zeros = np.zeros(width)
        return _Outcome("upstream", None, zeros, np.full(width, np.nan), np.ones(width, dtype=bool), [],
                        [f"the head reads {self.p.feature}, before {self.p.unit}: no unit of the layer can "
                         "reach it, so every slope is exactly 0 and no unit stands out"])

    def exact(self) -> _Outcome:
        c = self.clean(grad=False)
        width, means = self.width_and_means(c.unit_row)
        dirs = torch.cat([d for lo in range(0, width, _DIRECTION_CHUNK)
                          if (d := engine.write_directions(
                              self.model, self.p, self.enc,
                              list(range(lo, min(width, lo + _DIRECTION_CHUNK))))) is not None]).float().cpu()
        feats = c.features.cpu()
        clean_pred = self.predict(feats)
        alpha = torch.tensor([iv.affine(0.0)[0] for iv in self.ivs])  # [k]
        beta = torch.tensor([[iv.affine(float(means[u]))[1] for u in range(width)] for iv in self.ivs])
        rows = c.unit_row.cpu()  # [n, U]
        dact = (alpha[None, :, None] - 1) * rows[:, None, :] + beta[None]  # [n, k, U]
        w = self.head.linear_weight
        if w is not None:
            gain = dirs @ w.float()
            if self.head.config.output_scale is not None:
                gain = gain * self.head.config.output_scale
            dpred = dact * gain
            slopes_exact: NDArray[np.float64] | None = gain.double().numpy()
        else:
            dpred = torch.empty_like(dact)
            n, k = dact.shape[:2]
            step = max(1, _CHUNK_FLOATS // max(1, n * k * feats.shape[1]))
            for lo in range(0, width, step):
                hi = min(width, lo + step)
                f = feats[:, None, None, :] + dact[:, :, lo:hi, None] * dirs[None, None, lo:hi]
                dpred[:, :, lo:hi] = self.predict(f.reshape(-1, f.shape[-1])).reshape(n, k, hi - lo) - \
                    clean_pred[:, None, None]
            slopes_exact = None
        da = dact.permute(2, 0, 1).double().numpy()
        dp = dpred.permute(2, 0, 1).double().numpy()
        slopes, r2 = self.fits(da, dp, clean_pred.double().numpy())
        if slopes_exact is not None:
            slopes = slopes_exact  # w·direction: the slope whatever the interventions
        order = _by_magnitude(slopes)
        cols = _checked_columns(self.target, order[: min(self.top, _CHECKED)])
        mismatch = self.check(cols, means, feats[0], rows[0], dirs)
        notes = [f"exact: the head reads {self.p.feature} right after {self.p.unit} at the patched "
                 "position, so each unit's patched features are the clean ones plus Δa times its write "
                 "direction; checked against a real patched run of units " + ", ".join(map(str, cols))]
        return _Outcome("exact", None, slopes, r2, np.ones(width, dtype=bool), order[: self.top], notes,
                        mismatch)

    def check(self, cols: list[int], means: Tensor, feat0: Tensor, row0: Tensor, dirs: Tensor) -> str | None:
        """Compare the exact features of input 0 with a real patched run; None when they agree."""
        _, have = self.real_features(cols, means)
        aff = self.affine(means, cols)  # [C * k, 2]
        col_index = torch.tensor([c for c in cols for _ in self.ivs])
        before = row0[col_index]
        new = before * aff[:, 0] + aff[:, 1]
        want = feat0[None] + (new - before)[:, None] * dirs[col_index]
        err = agree(have, want)
        if err is not None:
            return (f"the exact method does not hold for this model: a real patched run differs from it by "
                    f"{err:.3g} on input 0 (the write path is not linear, e.g. a norm after the MLP)")
        return None

    def screen(self) -> _Outcome:
        if self.head.config.head_type == "classification" and self.head.config.bin_edges is None:
            raise InputError(f"{self.head.config_path}: an argmax classification head (no bin_edges) has no "
                             "gradient, so the screen cannot rank units for it; expected bin_edges, a layer "
                             "the head reads right after (exact), or screen='never' (patch every unit)")
        c = self.clean(grad=True)
        assert c.grad is not None
        width, means = self.width_and_means(c.unit_row)
        screen = c.grad.double().mean(0).numpy()
        order = _by_magnitude(screen)
        confirmed = order[: self.top]
        cols = _checked_columns(self.target, confirmed)
        slopes, r2 = self.confirm(cols, means, kept=c.kept)
        exact, r2s = np.full(width, np.nan), np.full(width, np.nan)
        patched = np.zeros(width, dtype=bool)
        exact[cols], r2s[cols], patched[cols] = slopes, r2, True
        notes = [f"screen: ∂prediction/∂unit of every unit from one backward pass (first order), mean over "
                 f"{len(self.enc.ids)} inputs; the top {len(confirmed)} by |screen slope|"
                 + ("" if self.target is None or self.target in confirmed else " and the target")
                 + " patched for real"]
        return _Outcome("screen", screen, exact, r2s, patched, confirmed, notes)

    def patched(self) -> _Outcome:
        c = self.clean(grad=False)
        width, means = self.width_and_means(c.unit_row)
        exact, r2s = np.full(width, np.nan), np.full(width, np.nan)
        step = max(1, self.budget.batch_size // len(self.ivs))
        for lo in range(0, width, step):
            cols = list(range(lo, min(width, lo + step)))
            exact[cols], r2s[cols] = self.confirm(cols, means)
        order = _by_magnitude(exact)
        return _Outcome("patched", None, exact, r2s, np.ones(width, dtype=bool), order[: self.top],
                        [f"patched: every one of the {width} units patched for real"])


def _constant(v: NDArray[np.float64]) -> NDArray[np.bool_]:
    """Per row, whether stats.ols would call it constant."""
    return np.asarray(v.max(1) - v.min(1) <= _ATOL + _RTOL * np.abs(v).max(1))


def _by_magnitude(slopes: NDArray[np.float64]) -> list[int]:
    key = np.abs(slopes)
    key = np.where(np.isnan(key), -1.0, key)
    return [int(u) for u in np.argsort(-key, kind="stable")]


def _checked_columns(target: int | None, cols: Sequence[int]) -> list[int]:
    out = list(cols)
    if target is not None and target not in out:
        out.append(target)
    return out


# --------------------------------------------------------------------------- one pass
@contextlib.contextmanager
def _frozen(module: torch.nn.Module) -> Iterator[None]:
    """No parameter requires a gradient inside: backward computes no weight gradient."""
    flags = [(prm, prm.requires_grad) for prm in module.parameters()]
    try:
        for prm, _ in flags:
            prm.requires_grad_(False)
        yield
    finally:
        for prm, flag in flags:
            prm.requires_grad_(flag)


def _pass(model: LoadedModel, p: Plan, enc: engine.Encoded, idx: list[int], head: Head | None,
          digit_ids: Tensor | None, *, keep: bool = False,
          ) -> tuple[Tensor, Tensor, Tensor | None, _Kept | None]:
    """One clean forward of inputs ``idx`` up to where the head reads.

    Returns the head's features ``[B, width]`` and the whole unit layer ``[B, units]`` at
    each input's patched (= read) position, in the head's coordinates; with ``head``, also
    ∂prediction/∂unit ``[B, units]`` from one backward pass through a zero tensor added at
    the unit's site (the only tensor that requires a gradient); with ``keep`` (every input
    has a prefix), the prefix cache for later patched rows.

    The tokens before the read position run first, without gradients, into the model's
    own KV cache; only the read token runs with the hooks (and the gradient): nothing
    before it can depend on a patch there.
    """
    split = [k for k, i in enumerate(idx) if enc.read_pos[i] > 0]
    alone = [k for k, i in enumerate(idx) if enc.read_pos[i] == 0]
    if not alone:
        return _read_token(model, p, enc, idx, head, digit_ids, cached=True, keep=keep)
    assert not keep, "a kept cache needs every input to have tokens before its read position"
    parts = [(alone, _read_token(model, p, enc, [idx[k] for k in alone], head, digit_ids, cached=False))]
    if split:
        parts.append((split, _read_token(model, p, enc, [idx[k] for k in split], head, digit_ids,
                                         cached=True)))
    order = torch.tensor([k for ks, _ in parts for k in ks]).argsort()
    f = torch.cat([got[0] for _, got in parts])[order]
    r = torch.cat([got[1] for _, got in parts])[order]
    grads = [got[2] for _, got in parts if got[2] is not None]
    g = torch.cat(grads)[order] if grads else None
    return f, r, g, None


@dataclass
class _Screened:
    """What the read token's hooks have seen so far."""

    unit_row: Tensor | None = None
    z: Tensor | None = None  # the zero added at the unit's site (the screen's only gradient leaf)
    features: Tensor | None = None
    scale: Tensor | None = None  # [B, units] a dictionary unit's write per unit of change (write_scale)


def _read_token(model: LoadedModel, p: Plan, enc: engine.Encoded, idx: list[int], head: Head | None,
                digit_ids: Tensor | None, *, cached: bool, keep: bool = False,
                ) -> tuple[Tensor, Tensor, Tensor | None, _Kept | None]:
    import copy

    dev = model.device
    B = len(idx)
    cache, kept = None, None
    if cached:
        # Not inference mode: the read token's backward reads this cache.
        cache, pmask, lengths = engine.prefix_cache(model, [enc.ids[i][: enc.read_pos[i]] for i in idx],
                                                    keep_grad=True)
        if keep:
            kept = _Kept(list(idx), copy.deepcopy(cache), pmask, lengths)
        ids = torch.tensor([[enc.ids[i][enc.read_pos[i]]] for i in idx], dtype=torch.long, device=dev)
        mask = torch.cat([pmask, torch.ones(B, 1, dtype=pmask.dtype, device=dev)], dim=1)
        pos = lengths[:, None]
    else:
        ids, mask, pos = engine.left_pad([enc.ids[i][: enc.read_pos[i] + 1] for i in idx],
                                         engine.pad_id(model), dev)
    got = _Screened()
    grad = head is not None

    def unit(t: Tensor) -> Tensor | None:
        got.unit_row = p.layer_values(t[:, -1].detach())
        if grad and p.dictionary is not None:  # what each unit's change writes along its row
            got.scale = p.dictionary.write_scale(t[:, -1].detach())
        if got.features is not None:
            raise engine.Stop  # the head read before the unit (upstream): all there is to see
        if not grad or p.write is not None:
            return None
        return perturb(t)

    def perturb(t: Tensor) -> Tensor:
        # A zero added where the unit writes (a transcoder: its output); its gradient is the
        # prediction's per unit of each column there (a latent's: that times its decoder row).
        z = torch.zeros(B, t.shape[-1], dtype=t.dtype, device=t.device, requires_grad=True)
        got.z = z
        return torch.cat([t[:, :-1], (t[:, -1] + z)[:, None]], dim=1)

    def capture(t: Tensor) -> None:
        # transformer_lens coordinates: a patch of δ adds δ/d_model to the features there.
        got.features = p.read_features(t[:, -1], None if got.z is None else got.z.sum(-1))
        if got.unit_row is not None:
            raise engine.Stop  # nothing later in the forward can change what was read

    taps: list[engine.Tap] = [(p.unit, unit)]
    if grad and p.write is not None:
        taps.append((p.write, perturb))
    if p.feature.kind != "logits":
        taps.append((p.feature, capture))
    entering: list[Any] = []  # the read token's hidden states entering the unit's block
    at = p.unit.layer
    hook = (model.arch.blocks[at - 1].register_forward_hook(lambda mod, args, out: entering.append(out))
            if kept is not None and at >= 1 else None)
    with _frozen(model.hf) if grad else contextlib.nullcontext():
        try:
            out = engine.forward(model, ids, mask, pos, taps=taps, cache=cache,
                                 mode="grad" if grad else "inference")
        finally:
            if hook is not None:
                hook.remove()
        if kept is not None and entering:
            try:
                kept.entry = engine.Entry.of(at, entering[0], 1, (B, 1))
            except RuntimeError:
                kept.entry = None  # a block that cannot be replayed: the rows run from block 0
        if p.feature.kind == "logits" and out is not None:
            got.features = out.logits[:, -1].float()
        if got.unit_row is None or got.features is None:
            raise RuntimeError(f"sites {p.unit} / {p.feature} did not fire during the forward pass")
        g = None
        if grad:
            assert head is not None
            pred = head.predict(got.features, digit_ids)
            if got.z is None or not pred.requires_grad:
                g = torch.zeros_like(got.unit_row)  # nothing the head reads depends on the unit
            else:
                (g,) = torch.autograd.grad(pred.sum(), got.z)
                g = g.float()
                if p.dictionary is not None:  # ∂prediction/∂latent = ∂prediction/∂tensor · W_dec[i]
                    assert got.scale is not None
                    g = (g @ p.dictionary.W_dec.T) * got.scale.to(g.device)
    return got.features.detach().cpu(), got.unit_row.cpu(), None if g is None else g.cpu(), kept


def _split(kept: _Kept, per: int) -> Iterator[_Kept]:
    """``kept`` in pieces of at most ``per`` inputs, each with its own copy of their caches."""
    import copy

    if len(kept.idx) <= per:
        yield kept
        return
    for lo in range(0, len(kept.idx), per):
        sel = list(range(lo, min(len(kept.idx), lo + per)))
        cache = copy.deepcopy(kept.cache)
        cache.batch_select_indices(torch.tensor(sel, device=kept.mask.device))
        entry = None if kept.entry is None else kept.entry.take(sel)
        yield _Kept([kept.idx[k] for k in sel], cache, kept.mask[sel], kept.lengths[sel], entry)


def _cached_rows(model: LoadedModel, p: Plan, enc: engine.Encoded, kept: _Kept, affine: Tensor,
                 targets: engine.Targets, budget: engine.Budget) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Patched rows of the read token over a kept prefix cache: engine.kv_rows, as measure runs it.

    ``affine[k, j]``: (α, β) of row ``j`` of input ``kept.idx[k]``, patching ``targets[j]``;
    a clean row comes first for each input. Where the engine allows it for this model (its
    :class:`~neuronpatch.engine.Growth` check), the rows enter at the unit's block with the
    read token's hidden states the screen kept (``kept.entry``) and run there folded side by
    side over the shared cache, or multiply there with the cache repeated from there on;
    otherwise every row runs every block. Returns clean features
    ``[B, width]``, patched features ``[B, M, width]``, each row's patched unit value and its
    own clean value ``[B, M]``.
    """
    B, M = affine.shape[:2]
    m = M + 1
    full = torch.cat([torch.tensor([1.0, 0.0]).expand(B, 1, 2), affine], dim=1)
    every = engine.Targets.of_columns([p.neuron]) + targets  # the clean row first
    grow = budget.growth(model, p, m)
    entry = kept.entry if grow is not None and grow.enter else None
    rows = engine.kv_rows(model, p, enc, kept.idx, full, targets=every, grow=grow,
                          prefix=engine.Prefix(kept.cache, kept.mask, kept.lengths, entry))
    kept.cache = None  # repeated in place: no longer the prefix cache
    feats = rows.features.reshape(B, m, -1).cpu()
    clean_unit = rows.clean_unit.reshape(B, m).cpu()
    patched = rows.patched_unit.reshape(B, m).cpu()
    return feats[:, 0], feats[:, 1:], patched[:, 1:], clean_unit[:, 1:]
