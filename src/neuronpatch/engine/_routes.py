"""Routes: the cheapest exact way to get every patched row's features, and the budgets that bound it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from neuronpatch.architecture import Site
from neuronpatch.coordinates import Plan
from neuronpatch.engine._forward import Capture, Growth, RowsIn, Targets, mlp_writes, neuron_writes
from neuronpatch.engine._growth import growth
from neuronpatch.engine._inputs import Encoded, chunks
from neuronpatch.engine._rows import Prefix, full_rows, kv_rows
from neuronpatch.errors import InputError
from neuronpatch.tolerance import agree

if TYPE_CHECKING:
    from neuronpatch.models import LoadedModel

METHODS: tuple[str, ...] = ("auto", "upstream", "linear", "kv", "full")

# Bytes the prefix cache of one kv batch may take on the CPU (keys and values of every layer,
# times the rows where it is repeated per row); it bounds peak memory. Measured with
# benchmarks/bench_scale.py at 256 inputs of gpt2-small: peak RSS 1.11 GB at 40 MiB, 1.22 GB
# at 48 MiB, the time the same; 40 MiB still holds bench_engine's 8 inputs of 64 tokens.
KV_CACHE_BYTES = 40 * 2**20
# On a GPU the budget is this share of the device's free memory when the run starts.
KV_CACHE_GPU_SHARE = 1 / 8


def kv_cache_budget(device: torch.device | str, free_bytes: int | None = None) -> int:
    """The default ``kv_cache_bytes`` on ``device``: :data:`KV_CACHE_BYTES` on the CPU; on a GPU
    :data:`KV_CACHE_GPU_SHARE` of its free memory (``free_bytes``, by default asked of CUDA),
    never less than the CPU's.

    Example:
        >>> kv_cache_budget("cpu") == KV_CACHE_BYTES
        True
        >>> kv_cache_budget("cuda:0", free_bytes=80 * 2**30) // 2**30
        10
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return KV_CACHE_BYTES
    if free_bytes is None:
        free_bytes, _total = torch.cuda.mem_get_info(dev)
    return max(KV_CACHE_BYTES, int(free_bytes * KV_CACHE_GPU_SHARE))


@dataclass(frozen=True)
class Budget:
    """What bounds one forward: rows at full input length, and bytes of repeated prefix cache.

    ``grow``: let rows multiply at the unit's block where the model allows it (the
    default; False runs every row through every block, the plain reference).
    """

    batch_size: int = 128
    kv_cache_bytes: int = KV_CACHE_BYTES
    grow: bool = True

    def cache_bytes(self, model: LoadedModel, enc: Encoded, from_layer: int = 0) -> int:
        """Bytes of one input's prefix cache: keys and values of the layers from ``from_layer`` on."""
        layers = model.n_layers - from_layer
        return enc.longest * layers * model.d_model * 2 * model.hf.dtype.itemsize

    def kv_inputs(self, model: LoadedModel, p: Plan, enc: Encoded, m: int, suffix: int, *,
                  kept: bool = False) -> int:
        """Inputs per kv batch with ``m`` rows each running ``suffix`` tokens.

        ``batch_size`` counts rows of full length, so as many suffix rows fit as carry the
        same number of tokens; the prefix cache is repeated once per row (from the unit's
        block on, when rows grow there; never, when they fold), so its bytes are bounded too.
        ``kept``: the rows continue a prefix cache kept from an earlier pass without an
        :class:`~neuronpatch.engine.Entry`, which is repeated per row (they cannot fold).
        """
        per = max(1, self.batch_size * enc.longest // (m * suffix))
        grown = self.growth(model, p, m)
        folds = grown is not None and grown.folds(p) and not kept
        copies = 1 if folds else m  # folded rows share their input's cache (kv_rows)
        row_bytes = self.cache_bytes(model, enc, p.unit.layer if grown is not None and copies > 1 else 0)
        return max(1, min(per, self.kv_cache_bytes // max(1, copies * row_bytes)))

    def growth(self, model: LoadedModel, p: Plan, m: int) -> Growth | None:
        """The :class:`~neuronpatch.engine.Growth` for ``m`` rows per input, or None."""
        return growth(model, p, m) if self.grow else None


@dataclass(frozen=True)
class Route:
    """The route the patched rows take, and why."""

    method: str
    reason: str


def write_directions(model: LoadedModel, p: Plan, enc: Encoded, columns: Sequence[int]) -> Tensor | None:
    """``[len(columns), width]``: the features' change per unit of each column's change.

    A constant vector per unit when every input is patched at its read position
    and the features are the residual stream right after the unit's write (or
    the unit itself); None otherwise. For MLP neurons it is the output
    projection's own response to a unit step (its bias cancels).
    """
    if p.upstream or any(pp != [r] for pp, r in zip(enc.patch_pos, enc.read_pos, strict=True)):
        return None
    if p.dictionary is not None and not p.dictionary.linear:
        return None  # an expert neuron's write is scaled by each token's routing weight
    u, f, n_layers = p.write_site, p.feature, model.n_layers
    after = ((f.kind == "block_out" and f.layer == u.layer)
             or (f.kind == "block_in" and f.layer == u.layer + 1))
    cols = torch.tensor(list(columns), dtype=torch.long)
    # A latent writes its decoder row where a column writes its unit vector.
    latent = None if p.dictionary is None else p.dictionary.rows(cols.to(model.device)).float()
    if u.kind == "mlp_post" and after:
        w = (neuron_writes(model, u.layer, cols, model.unit_width(True)) if latent is None
             else mlp_writes(model, u.layer, latent))
        return p.read_features(w)  # centred where the features are
    same = f == u or (u.kind == "block_out" and f.kind == "block_in" and f.layer == u.layer + 1)
    if (u.kind in ("mlp_write", "block_out") and after) or (u.kind == "block_in" and same) or same:
        if f.kind == "final_norm" or f.layer >= n_layers:
            return None
        # A residual coordinate: centred features move by Δ·(e_c − 1/d), and the δ/d offset
        # of transformer_lens coordinates gives the 1/d back (a latent: Δ·(w − mean w), and
        # Δ·mean w back).
        if latent is not None:
            return latent
        return torch.eye(model.d_model, device=model.device)[cols.to(model.device)]
    return None


def direction_writes(model: LoadedModel, p: Plan, enc: Encoded) -> Tensor:
    """``[k, width]``: the features' change per unit of change along each direction control.

    A change ``Δ`` along ``v`` moves the tensor by ``Δ·v = Σ_c Δ·v_c·e_c``, so by linearity
    the features move by ``Δ·Σ_c v_c·w_c`` (``w_c``: column ``c``'s write direction,
    :func:`write_directions`). In transformer_lens coordinates ``w_c`` holds the
    ``δ/d_model`` offset of a column patch on every coordinate; summed with weights ``v_c``
    it is ``mean(v) = 0``, as a direction patch carries no offset.
    """
    w = write_directions(model, p, enc, range(p.d_model))
    assert w is not None and p.directions is not None
    return (p.directions.to(w.device, torch.float64) @ w.double()).float().cpu()


def choose_route(model: LoadedModel, p: Plan, enc: Encoded, method: str) -> Route:
    """Pick the cheapest exact route, or check that a forced one can serve.

    Raises:
        InputError: a forced route cannot serve this experiment.
    """
    if method not in METHODS:
        raise InputError(f"route {method!r} is unknown; expected one of {', '.join(METHODS)}")
    single = all(len(pp) == 1 for pp in enc.patch_pos)
    invisible = single and all(pp[0] > r for pp, r in zip(enc.patch_pos, enc.read_pos, strict=True))
    linear = write_directions(model, p, enc, [p.neuron]) is not None
    options = {
        "upstream": (p.upstream or invisible,
                     f"the head reads {p.feature}, before {p.unit}" if p.upstream
                     else "every patch comes after the read position"),
        "linear": (linear, f"the head reads {p.feature} right after {p.unit}, at the patched position"),
        "kv": (single and not model.arch.kv_refused,
               "one patched position per input: the model's own KV cache serves the prefix"),
        "full": (True, "every row re-run from the start" + ("" if single else " (position: all)")),
    }
    if method == "auto":
        for name in ("upstream", "linear", "kv", "full"):
            ok, why = options[name]
            if ok:
                return Route(name, why)
    ok, why = options[method]
    if not ok:
        need = {"upstream": "a head that reads before the unit",
                "linear": "a head reading the residual stream right after the unit, at the patched position",
                "kv": "one patched position per input (not position: all)"}[method]
        if method == "kv" and single and model.arch.kv_refused:
            raise InputError(f"route 'kv' cannot serve {model.arch.name}: {model.arch.kv_refused}; "
                             "use route full (or auto)")
        raise InputError(f"route {method!r} cannot serve this experiment: it needs {need}")
    return Route(method, f"forced; {why}")


def patched_rows(model: LoadedModel, p: Plan, enc: Encoded, idx: list[int], affine: Tensor, route: str,
                 guard: Site | None, targets: Targets | None = None, budget: Budget = Budget(), *,
                 rows_in: RowsIn | None = None) -> Capture:
    """Rows for inputs ``idx``: for each, a clean row then one per intervention.

    ``targets``: what each row of every input patches (controls); None: the plan's unit.
    """
    grow = budget.growth(model, p, affine.shape[1])
    if route == "full" or model.arch.kv_refused or any(len(enc.patch_pos[i]) != 1 for i in idx):
        return full_rows(model, p, enc, idx, affine, guard, targets, grow, rows_in=rows_in)
    # kv: group inputs by how many tokens lie from the patch to the read position.
    groups: dict[int, list[int]] = {}
    direct: list[int] = []
    for k, i in enumerate(idx):
        q, r = enc.patch_pos[i][0], enc.read_pos[i]
        if q == 0 or q > r:
            direct.append(k)  # nothing to cache before the patch, or the patch is invisible
        else:
            groups.setdefault(r - q + 1, []).append(k)
    parts: list[tuple[list[int], Capture]] = []
    if direct:
        parts.append((direct, full_rows(model, p, enc, [idx[k] for k in direct], affine[direct], guard,
                                        targets, grow, rows_in=rows_in)))
    for ks in groups.values():
        parts.append((ks, kv_rows(model, p, enc, [idx[k] for k in ks], affine[ks], guard, targets, grow,
                                  rows_in=rows_in)))
    return _merge(parts, len(idx), affine.shape[1])


def _merge(parts: list[tuple[list[int], Capture]], n: int, m: int) -> Capture:
    if len(parts) == 1 and parts[0][0] == list(range(n)):
        return parts[0][1]
    first = parts[0][1]

    def gather(get: Any) -> Tensor | None:
        if get(first) is None:
            return None
        out = torch.empty(n, m, *get(first).shape[1:])
        for ks, rows in parts:
            out[ks] = get(rows).reshape(len(ks), m, *get(rows).shape[1:]).cpu()
        return out.reshape(n * m, *out.shape[2:])

    clean, patched, features = (gather(lambda r, a=a: getattr(r, a))
                                for a in ("clean_unit", "patched_unit", "features"))
    assert clean is not None and patched is not None and features is not None
    routes = None
    if all(rows.routes is not None for _, rows in parts):
        # Rows of different parts span different positions; all end at the read position.
        width = {rows.routes.shape[-1] for _, rows in parts if rows.routes is not None}
        if len(width) == 1:
            S = max(rows.routes.shape[1] for _, rows in parts if rows.routes is not None)
            routes = torch.full((n, m, S, width.pop()), -1, dtype=torch.long)
            for ks, rows in parts:
                r = rows.routes
                assert r is not None
                routes[ks, :, S - r.shape[1]:] = r.reshape(len(ks), m, *r.shape[1:]).cpu().long()
            routes = routes.reshape(n * m, S, -1)
    return Capture(clean, patched, features, gather(lambda r: r.guard), gather(lambda r: r.unit_row), routes)


@dataclass
class Measured:
    """Every input's clean run and its patched rows, as a route measured them."""

    clean_act: Tensor  # [n]
    clean_feat: Tensor  # [n, width]
    act: Tensor  # [n, rows]
    feat: Tensor  # [n, rows, width]
    guard_feat: Tensor | None  # [n, width] hf-coordinate clean features
    row_clean: Tensor | None = None  # [n, rows] each patched row's own unit, before its patch
    # [n, rows] bool: the row's patch changed the expert choice of a mixture-of-experts layer
    # between the unit and the features (at some position); None: not observed (no such
    # layer, a family whose expert indices are not handed over, or a shortcut route).
    rerouted: Tensor | None = None
    # input → the state its rows shared (engine.Prefix), for the inputs ``measure(keep=...)``
    # asked to keep; only folded kv batches have one.
    states: dict[int, Prefix] = field(default_factory=dict)


def measure(model: LoadedModel, p: Plan, enc: Encoded, affine: Tensor, route: Route, *,
            budget: Budget = Budget(), guard: Site | None = None, progress: Any = None,
            targets: Targets | None = None, rows_in: RowsIn | None = None, keep: int = 0,
            judged: int | None = None) -> Measured:
    """Clean and patched activations and features for every input and intervention.

    ``affine[i, j]`` is ``(α, β)`` of row ``j`` on input ``i``. ``targets``: what row ``j``
    patches (control units and directions: more patched rows over the same clean row);
    default the plan's unit. ``rows_in``: a context the patched rows' forwards run in, not
    their prefix passes (``kv`` and ``full``; see :func:`~neuronpatch.engine.run_rows`).
    ``keep``: keep the shared state (:attr:`Measured.states`) of this many inputs, those whose
    activation changes over their first ``judged`` rows (default all) spread widest, ties to
    the earlier input.
    """
    n, n_rows = affine.shape[:2]
    every = Targets.of_columns([p.neuron]) + targets if targets is not None else None
    m = n_rows + 1
    identity = torch.tensor([1.0, 0.0]).expand(n, 1, 2)
    full_affine = torch.cat([identity, affine], dim=1)  # row 0 of each input: clean
    shortcut = route.method in ("upstream", "linear")
    per_chunk = max(1, budget.batch_size // (1 if shortcut else m))
    if route.method == "kv":
        # An input patched at its first token, or after its read position, runs in full.
        suffix = max(r - pp[0] + 1 if 0 < pp[0] <= r else len(ids)
                     for pp, r, ids in zip(enc.patch_pos, enc.read_pos, enc.ids, strict=True))
        per_chunk = budget.kv_inputs(model, p, enc, m, suffix)
    directions = _linear_writes(model, p, enc, targets, n_rows) if route.method == "linear" else None
    clean_act, clean_feat, act, feat, guards, row_clean = [], [], [], [], [], []
    rerouted: list[Tensor] | None = [] if not shortcut else None
    widest: list[tuple[float, int, Any]] = []  # (−spread, input, its state) of the inputs kept so far
    for idx in chunks(n, per_chunk):
        if shortcut:
            rows = patched_rows(model, p, enc, idx, identity[idx], "kv", guard, budget=budget)
            assert rows.unit_row is not None
            c_feat = rows.features.cpu()
            before = _row_values(p, rows.unit_row.cpu(), targets, n_rows)  # [k, rows] each row's unit
            new = before * affine[idx, :, 0] + affine[idx, :, 1]
            if directions is None:  # upstream: nothing the head reads can change
                f = c_feat[:, None, :].expand(-1, n_rows, -1)
            else:
                f = c_feat[:, None, :] + (new - before)[..., None] * directions
            clean_act.append(rows.clean_unit.cpu())
            clean_feat.append(c_feat)
            act.append(new)
            feat.append(f)
            row_clean.append(before)
            if rows.guard is not None:
                guards.append(rows.guard.cpu())
        else:
            rows = patched_rows(model, p, enc, idx, full_affine[idx], route.method, guard, every, budget,
                                rows_in=rows_in)
            k = len(idx)
            cu = rows.clean_unit.reshape(k, m).cpu()
            row_clean.append(cu[:, 1:])
            pu = rows.patched_unit.reshape(k, m).cpu()
            fe = rows.features.reshape(k, m, -1).cpu()
            clean_act.append(cu[:, 0])
            clean_feat.append(fe[:, 0])
            act.append(pu[:, 1:])
            feat.append(fe[:, 1:])
            if rows.guard is not None:
                guards.append(rows.guard.reshape(k, m, -1)[:, 0].cpu())
            if keep and rows.prefix is not None:
                changes = (pu[:, 1: 1 + (judged or n_rows)] - cu[:, :1]).double()
                spread = (changes.max(1).values - changes.min(1).values).tolist()
                widest = sorted(widest + [(-spread[j], i, (rows.prefix, j)) for j, i in enumerate(idx)],
                                key=lambda w: w[:2])[:keep]
                # Copy out the kept inputs' state now, so the chunk's cache can go.
                widest = [(w[0], w[1], w[2][0].select(model, w[2][1]) if isinstance(w[2], tuple) else w[2])
                          for w in widest]
            if rows.routes is None or rerouted is None:
                rerouted = None
            else:
                r = rows.routes.reshape(k, m, -1).cpu()
                rerouted.append((r[:, 1:] != r[:, :1]).any(-1))  # each row against its input's clean row
        del rows  # (a folded batch's prefix cache goes before the next chunk's is built)
        if progress is not None:
            progress.update(len(idx) * n_rows)
    return Measured(torch.cat(clean_act), torch.cat(clean_feat), torch.cat(act), torch.cat(feat),
                    torch.cat(guards) if guards else None, torch.cat(row_clean),
                    torch.cat(rerouted) if rerouted else None, {i: state for _, i, state in widest})


def _linear_writes(model: LoadedModel, p: Plan, enc: Encoded, targets: Targets | None, n_rows: int) -> Tensor:
    """``[rows, width]``: each row's write direction (one per distinct column, computed once)."""
    t = targets if targets is not None else Targets.of_columns([p.neuron] * n_rows)
    on_dir = t.on_direction
    plain = [c for c, d in zip(t.columns, t.directions, strict=True) if d is None]
    distinct = sorted(set(plain))
    found = write_directions(model, p, enc, distinct)
    assert found is not None
    out = torch.empty(len(t), found.shape[-1])
    out[~on_dir] = found.cpu()[torch.tensor([distinct.index(c) for c in plain], dtype=torch.long)]
    if bool(on_dir.any()):
        index = torch.tensor([d for d in t.directions if d is not None], dtype=torch.long)
        out[on_dir] = direction_writes(model, p, enc)[index]
    return out


def _row_values(p: Plan, every: Tensor, targets: Targets | None, n_rows: int) -> Tensor:
    """``[inputs, rows]``: each row's own unit, clean, from the whole layer ``every`` ``[inputs, width]``.

    A column row reads its column; a direction row reads ``v·every`` (mean-zero ``v``: the
    same whether ``every`` is centred or not).
    """
    t = targets if targets is not None else Targets.of_columns([p.neuron] * n_rows)
    on_dir = t.on_direction
    index = torch.tensor(t.columns, dtype=torch.long)
    if not bool(on_dir.any()):
        return every[:, index]
    out = torch.empty(every.shape[0], len(index))
    out[:, ~on_dir] = every[:, index[~on_dir]]
    which = torch.tensor([d for d in t.directions if d is not None], dtype=torch.long)
    along = p.directions.to(torch.float64)[which]  # [rows, d_model]
    out[:, on_dir] = (every.double() @ along.T).float()
    return out


def check_shortcut(model: LoadedModel, p: Plan, enc: Encoded, affine: Tensor, route: Route,
                   got: Measured, targets: Targets | None = None, budget: Budget = Budget()) -> str | None:
    """Compare a shortcut route with a real patched run on the first input; None if they agree.

    With ``targets`` (controls) every column and direction is checked, each with its own rows.
    """
    real = measure(model, p, enc, affine[:1], Route("kv", "check"),
                   budget=Budget(affine.shape[1] + 1, budget.kv_cache_bytes, budget.grow), targets=targets)
    err = agree(real.feat[0], got.feat[0])
    if err is not None:
        return (f"route {route.method!r} does not hold for this model: a real patched run differs from "
                f"it by {err:.3g} on input 0 (the write path is not linear, e.g. a norm after the MLP)")
    return None
