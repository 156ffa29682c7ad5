"""The experiment API: :func:`run_experiment` (a head's causal slope) and :func:`collect` (training data)."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor

from neuronpatch import coordinates
from neuronpatch.architecture import Site
from neuronpatch.coordinates import Plan
from neuronpatch.engine._forward import Targets
from neuronpatch.engine._inputs import DEFAULT_INPUTS, chunks, encode, short
from neuronpatch.engine._precision import inputs_to_rerun, measure_rounding
from neuronpatch.engine._routes import (
    Budget,
    Measured,
    Route,
    check_shortcut,
    choose_route,
    kv_cache_budget,
    measure,
    write_directions,
)
from neuronpatch.engine._rows import layer_rows, routed_only, unrouted_note
from neuronpatch.errors import InputError
from neuronpatch.heads import Head, load_head, unit_width
from neuronpatch.interventions import Intervention, build, normalize
from neuronpatch.models import load_model
from neuronpatch.result import ExperimentResult
from neuronpatch.stats import weight_cosine

if TYPE_CHECKING:
    from neuronpatch.models import LoadedModel

Method = Literal["auto", "upstream", "linear", "kv", "full"]

# A unit whose clean activation is this small cannot be moved by scaling.
SILENT = 1e-6


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool, desc: str = "patched rows") -> Any:
    """A tqdm bar over ``total`` rows when ``enabled`` (drawn only past a second), else a no-op."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    # delay: runs that finish within a second print no bar at all.
    return tqdm(total=total, desc=desc, unit="row", leave=False, delay=1.0)


def check_batch_size(batch_size: Any) -> None:
    """Raise :class:`InputError` unless ``batch_size`` is a positive integer."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size {batch_size!r} is invalid; expected a positive integer")


def run_experiment(
    head: Head | str | Path,
    inputs: Sequence[str] | None = None,
    *,
    scale: Sequence[float] | None = None,
    set: Sequence[float] | None = None,
    add: Sequence[float] | None = None,
    zero: bool = False,
    mean: bool = False,
    interventions: Sequence[Intervention] | None = None,
    position: str | int | None = None,
    model: LoadedModel | str | Path | None = None,
    batch_size: int = 128,
    device: str = "auto",
    dtype: str = "float32",
    method: Method = "auto",
    progress: bool = False,
    controls: Any = None,
    kv_cache_bytes: int | None = None,
    grow_rows: bool = True,
) -> ExperimentResult:
    """Patch a head's unit on each input and measure how the prediction moves.

    Args:
        head: a loaded :class:`Head` or the path of a head directory.
        inputs: texts to run; defaults to the seed notebook's eight sentences.
        scale, set, add, zero, mean: interventions by kind (as in probe files).
            With none of them (and no ``interventions``), the notebook's eight
            scale factors are used.
        interventions: explicit :class:`Intervention` objects (instead of the above).
        position: where to patch: ``"last"`` real token, ``"all"`` positions, or
            an index (negative counts from the end); default the head's ``token_pos``.
        model: the model to run against instead of the head's ``base_model_name``: a loaded
            model, or a checkpoint's name or path (loaded with ``device`` and ``dtype``), such
            as the fine-tuned model of an unfrozen pipeline run. Its shapes must fit the head;
            the result's ``model_name`` says which checkpoint ran.
        batch_size: rows per forward pass, counted at full input length (a kv row that
            runs only the tokens from the patch to the read position counts for less); bounds
            memory, together with ``kv_cache_bytes``.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:0"``...
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the model.
        method: ``"auto"`` picks the cheapest exact route; the others force one
            (``"full"`` is the slow reference).
        progress: show a progress bar over patched rows.
        controls: other units of the same layer and type, or random residual-space
            directions, patched with the same interventions as more rows over the
            same clean run: a list of indices, or a mapping with ``"units"``
            (``{"random": k, "seed": s}`` or a list) and/or ``"directions"``
            (``{"random": k, "seed": s}``; residual-stream units only, see
            :mod:`neuronpatch.controls`). Their fits land in ``result.controls``
            (and the ``specificity``, ``control_slope`` metrics).
        kv_cache_bytes: bytes the repeated prefix cache of one kv batch may take; default
            40 MiB on the CPU and an eighth of the free memory on a GPU (:func:`kv_cache_budget`).
        grow_rows: let patched rows multiply at the unit's block (blocks below it run once
            per input) where the model allows it; False runs every row through every block.

    Returns:
        The :class:`~neuronpatch.result.ExperimentResult`.

    Example:
        >>> res = run_experiment("probes/heads/demo_causal",          # doctest: +SKIP
        ...                      inputs=["The cat sat on the mat."], set=[0, 1, 2])
        >>> round(res.slope, 2), round(res.r_squared, 2)              # doctest: +SKIP
    """
    named = model if isinstance(model, (str, Path)) else None
    if not isinstance(head, Head):
        head = load_head(head, checkpoint=named)
    check_batch_size(batch_size)
    cfg = head.config
    if model is None or isinstance(model, (str, Path)):
        model = load_model(named or cfg.base_model_name, device=device, dtype=dtype)
    if kv_cache_bytes is None:
        kv_cache_bytes = kv_cache_budget(model.device)
    budget = Budget(batch_size, kv_cache_bytes, grow_rows)
    head.check_model(model)
    texts = list(DEFAULT_INPUTS if inputs is None else inputs)
    if interventions is None:
        given = build(scale=scale or (), set=set or (), add=add or (), zero=zero, mean=mean)
        ivs = normalize(given or None)
    else:
        ivs = normalize(interventions)
    pos = cfg.token_pos if position is None else position
    enc = encode(model, texts, prepend_bos=cfg.prepend_bos, token_pos=cfg.token_pos, position=pos)
    p = coordinates.plan(cfg, model, where=head.config_path)
    # An expert neuron exists only where its expert is routed: the other inputs are left out.
    texts, unrouted = routed_only(model, p, enc, texts, batch_size, where=head.config_path)
    if unrouted:
        enc = encode(model, texts, prepend_bos=cfg.prepend_bos, token_pos=cfg.token_pos, position=pos)
    route = choose_route(model, p, enc, method)
    digit_ids = torch.tensor(head.digit_token_ids(model)) if cfg.head_type == "token" else None
    n, k = len(texts), len(ivs)
    width = unit_width(cfg, model)
    cset = None
    if controls is not None:
        from neuronpatch import controls as ctl

        prefer = None
        if p.dictionary is not None and p.dictionary.sparse:  # random: latents active here first
            seen = [r for idx in chunks(n, batch_size) for r in layer_rows(model, p, enc, idx)]
            prefer = torch.cat(seen).ne(0).any(0).nonzero()[:, 0].tolist()
        cset = ctl.resolve(controls, target=p.neuron, width=width, d_model=model.d_model,
                           layer_type=cfg.layer_type, config=head.config_path, prefer=prefer)
    n_dir = 0 if cset is None or cset.directions is None else len(cset.directions)
    if n_dir:
        assert cset is not None and cset.directions is not None and width == model.d_model
        p = dataclasses.replace(p, directions=torch.from_numpy(cset.directions))
    # What each group of rows patches: the target, each control unit, each control direction.
    units = Targets.of_columns([p.neuron, *(cset.units if cset is not None else [])])
    every = units + Targets.of_directions(n_dir, p.neuron)
    means = torch.zeros(width)
    dir_means = torch.zeros(n_dir)
    if any(iv.kind == "mean" for iv in ivs):
        # Mean ablation needs each unit's mean over *all* inputs before any row is patched;
        # a control is mean-ablated to its own mean (a direction's: v · the layer's mean).
        seen = [r for idx in chunks(n, batch_size) for r in layer_rows(model, p, enc, idx)]
        means = torch.cat(seen).mean(0)
        if n_dir:
            dir_means = (p.directions @ means.double()).float()
    # The experiment's rows: the target's interventions, then each control's, in its own units.
    centres = [float(means[c]) if d is None else float(dir_means[d])
               for c, d in zip(every.columns, every.directions, strict=True)]
    affine = torch.tensor([iv.affine(c) for c in centres for iv in ivs], dtype=torch.float32)
    affine = affine[None].expand(n, -1, -1).contiguous()
    targets = every.repeat(k) if len(every) > 1 else None
    guard = _guard_site(head, model, p)

    bar = progress_bar(n * k * len(every), progress)
    # The inputs the rounding measurement re-runs keep their shared state (reduced precision).
    keep = inputs_to_rerun(model, n)
    allg = measure(model, p, enc, affine, route, budget=budget, guard=guard, progress=bar, targets=targets,
                   keep=keep, judged=k)
    bar.close()
    if route.method in ("upstream", "linear"):
        mismatch = check_shortcut(model, p, enc, affine, route, allg, targets, budget)
        if mismatch is not None:
            if method != "auto":
                raise InputError(mismatch)
            kv = all(len(x) == 1 for x in enc.patch_pos) and not model.arch.kv_refused
            route = choose_route(model, p, enc, "kv" if kv else "full")
            route = Route(route.method, f"{mismatch}; stepped aside to {route.method}")
            allg = measure(model, p, enc, affine, route, budget=budget, guard=guard, targets=targets,
                           keep=keep, judged=k)
    got = Measured(allg.clean_act, allg.clean_feat, allg.act[:, :k], allg.feat[:, :k], allg.guard_feat)

    clean_pred = head.predict(got.clean_feat, digit_ids)
    flat = got.feat.reshape(n * k, -1)
    patched_pred = head.predict(flat, digit_ids).reshape(n, k)
    # Rows whose features are the clean ones by construction (the upstream route hands the
    # clean features on) get the clean prediction bit for bit, so their change is exactly 0.
    unmoved = (got.feat == got.clean_feat[:, None]).all(-1)
    pred = torch.where(unmoved, clean_pred[:, None], patched_pred)
    tx = (got.act - got.clean_act[:, None]).double().numpy()
    ty = (pred - clean_pred[:, None]).double().numpy()
    pred_scale = float(torch.cat([clean_pred.abs(), pred.abs().reshape(-1)]).max())
    rounding = measure_rounding(model, p, enc, affine[:, :k], route,
                                lambda f: head.predict(f, digit_ids), tx, ty, pred_scale, budget=budget,
                                states=allg.states)
    notes = _notes(texts, got.clean_act, ivs, p, route)
    if unrouted:
        notes.append(unrouted_note(p, texts, unrouted))
    changed = None
    if allg.rerouted is not None:
        changed = int(allg.rerouted[:, :k].sum())
        notes.append(f"routing: {changed} of {n * k} patched rows changed the expert choice of a later "
                     "mixture-of-experts layer (kept: it is the model's own routing)")
    elif route.method in ("kv", "full") and any(
            sparse is not None and p.unit.order(model.n_layers) < Site("route", L).order(model.n_layers)
            < p.feature.order(model.n_layers) for L, sparse in enumerate(model.arch.moe)):
        notes.append(f"routing: not observed: {model.arch.name}'s experts module is not handed the expert "
                     "indices, so whether a patch changed a later layer's expert choice is not counted")
    if guard is not None and got.guard_feat is not None:
        note = _coordinate_guard(head, got, clean_pred)
        if note:
            notes.append(note)
    control_results = None
    if cset is not None:
        from neuronpatch.controls import ControlResults

        assert allg.row_clean is not None
        rest = allg.feat[:, k:]
        preds = head.predict(rest.reshape(-1, rest.shape[-1]), digit_ids).reshape(n, -1)
        still = (rest == allg.clean_feat[:, None]).all(-1)
        preds = torch.where(still, clean_pred[:, None], preds)
        dy = (preds - clean_pred[:, None]).double().numpy()
        dx = (allg.act[:, k:] - allg.row_clean[:, k:]).double().numpy()
        xs = tuple(dx[:, j * k:(j + 1) * k] for j in range(len(cset)))
        ys = tuple(dy[:, j * k:(j + 1) * k] for j in range(len(cset)))
        control_results = ControlResults(tx, ty, xs, ys, cset.units, cset.directions, cset.seed)
    cos = math.nan
    if head.linear_weight is not None and not p.upstream:
        direction = write_directions(model, p, enc, [p.neuron])
        if direction is not None:
            cos = weight_cosine(head.linear_weight.numpy(), direction[0].cpu().numpy())[0]
    return ExperimentResult(
        head_path=str(head.path),
        model_name=cfg.base_model_name if named is None else str(named),
        head_type=cfg.head_type,
        target_layer=cfg.target_layer,
        target_neuron=cfg.target_neuron,
        layer_type=cfg.layer_type,
        unit_hook=p.unit_hook,
        feature_hook=str(p.feature),
        token_pos=cfg.token_pos,
        patch_position=str(pos),
        method=route.method,
        inputs=tuple(texts),
        n_tokens=tuple(len(ids) for ids in enc.ids),
        positions=tuple(enc.measure_pos),
        interventions=tuple(ivs),
        clean_activation=got.clean_act.double().numpy(),
        clean_prediction=clean_pred.double().numpy(),
        patched_activation=got.act.double().numpy(),
        patched_prediction=pred.double().numpy(),
        write_direction_cosine=cos,
        notes=tuple(notes),
        controls=control_results,
        rounding=rounding,
        target_expert=cfg.target_expert,
        unrouted_inputs=tuple(unrouted),
        routing_changed=changed,
    )


def _guard_site(head: Head, model: LoadedModel, p: Plan) -> Site | None:
    """The hf-coordinate feature site, when the head's coordinates were assumed, not written."""
    cfg = head.config
    if cfg.coordinates_given or cfg.head_type == "token" or cfg.feature_hook:
        return None
    try:
        site = coordinates.feature_site(cfg, model.n_layers, "hf", head.config_path)
    except Exception:
        return None
    return None if site == p.feature else site


def _coordinate_guard(head: Head, got: Measured, clean_pred: Tensor) -> str | None:
    """Warn when the head predicts its unit clearly better in hf coordinates."""
    if len(clean_pred) < 5:
        return None  # too few inputs for a correlation to say anything
    act = got.clean_act.double()
    r_tl = _pearson(act, clean_pred.double())
    assert got.guard_feat is not None
    r_hf = _pearson(act, head.predict(got.guard_feat).double())
    if math.isfinite(r_hf) and r_hf > 0.8 and (not math.isfinite(r_tl) or r_hf > r_tl + 0.3):
        msg = (f"{head.config_path}: the head predicts its unit better in hf coordinates (baseline r "
               f"{r_hf:.3f}) than in the assumed transformer_lens coordinates (r {r_tl:.3f}); if it was "
               'trained on HF hidden states, add "coordinates": "hf" to config.json')
        warnings.warn(msg, UserWarning, stacklevel=3)
        return msg
    return None


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else math.nan


def _notes(texts: Sequence[str], clean_act: Tensor, ivs: Sequence[Intervention], p: Plan,
           route: Route) -> list[str]:
    notes = [f"route {route.method}: {route.reason}"]
    if route.method == "upstream" and p.upstream:
        notes.append(f"the head reads {p.feature}, before {p.unit}: no patch of the unit can reach "
                     "it, so its causal slope is exactly 0")
    if p.dictionary is not None and p.dictionary.sparse:
        active = int(torch.count_nonzero(clean_act))
        notes.append(f"sparsity: latent {p.neuron} of {p.dictionary.cfg.path} is active on {active} of "
                     f"{len(texts)} inputs; the dictionary's reconstruction error is kept, so a patch "
                     "changes only what this latent writes")
    silent = [i for i, a in enumerate(clean_act.tolist()) if abs(a) < SILENT]
    if silent and any(iv.kind == "scale" for iv in ivs):
        which = ", ".join(f"{i} ({short(texts[i], 24)!r})" for i in silent[:5])
        more = f" and {len(silent) - 5} more" if len(silent) > 5 else ""
        notes.append(f"the unit is ~0 on {len(silent)} of {len(texts)} inputs ({which}{more}): "
                     "scale patches cannot move it there; use set or add interventions")
    return notes


def collect(
    model: LoadedModel,
    texts: Sequence[str],
    *,
    layer: int,
    neuron: int,
    layer_type: str = "post",
    feature_layer: int = -1,
    coordinates_: str = "transformer_lens",
    set_values: Sequence[float] | None = None,
    batch_size: int = 128,
    progress: bool = False,
    sae: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Features at the last token and the unit's activation there, for each text.

    This is what a head is trained on. With ``set_values``, text ``i`` is run
    with the unit *set* to ``set_values[i]`` at its last token (interventional
    data: the unit's value is independent of its causes), through the same
    exact routes as :func:`run_experiment`. ``sae``: a dictionary directory (``layer_type``
    sae; ``neuron`` the latent).

    Returns:
        ``(features [n, d_model], activations [n])``.

    Example:
        >>> feats, acts = collect(load_model("neuronpatch-demo"), ["The cat sat."],  # doctest: +SKIP
        ...                       layer=1, neuron=301, feature_layer=1)
    """
    from neuronpatch.heads import HeadConfig

    cfg = HeadConfig(base_model_name="<collect>", target_layer=layer, target_neuron=neuron,
                     layer_type=layer_type, feature_layer=feature_layer, coordinates=coordinates_,
                     coordinates_given=True, sae=sae)
    enc = encode(model, texts, prepend_bos=None, token_pos="last", position="last")
    p = coordinates.plan(cfg, model)
    if set_values is not None and len(set_values) != len(texts):
        raise ValueError(f"{len(set_values)} set_values for {len(texts)} texts")
    n = len(texts)
    bar = progress_bar(n, progress, desc="collecting")
    if set_values is None:
        affine = torch.tensor([[[1.0, 0.0]]]).expand(n, 1, 2)
    else:
        values = torch.tensor([float(v) for v in set_values])
        affine = torch.stack([torch.zeros(n), values], dim=-1)[:, None, :]
    route = choose_route(model, p, enc, "auto")
    if route.method == "upstream":
        route = Route("kv", "collect")
    got = measure(model, p, enc, affine.contiguous(), route, budget=Budget(batch_size), progress=bar)
    bar.close()
    return got.feat[:, 0], got.act[:, 0]
