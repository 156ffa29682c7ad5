"""Conformance: which architectures the engine serves exactly, measured, not assumed.

For every causal-LM architecture the installed transformers can build as a tiny
random model (every parameter random, norm gains and biases included; sizes set
through each config's constructor, see :func:`neuronpatch.testing.tiny_config`)
and TransformerLens describes, each head kind, on an MLP neuron or on a
block-level unit (the MLP's or attention's write, the residual stream: what a
mixture-of-experts or state-space block has too), is run through every route that
claims it and compared with a reference that shares none of the engine's
batching, padding, caching or coordinate code: the HF model's full forward on
one input at a time, the unit edited by a forward hook, features taken from
``output_hidden_states`` (or the last block's output), and the
``transformer_lens`` centring identities written out here. The sites
themselves come from the same TransformerLens adapters as the engine's; the
test suite's 14-architecture matrix checks those against a hand-written module
table.

    neuronpatch conformance --out docs/conformance.md

Architectures that cannot be built or described are listed as refused, with
the reason; nothing is reported exact unless it matched.
"""

from __future__ import annotations

import contextlib
import io
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neuronpatch.architecture import Site, attach
from neuronpatch.interventions import Intervention

TEXTS = ("The cat sat on the mat today.", "Numbers 3 4 5 and more", "A quick one",
         "Transformers use attention mechanisms to process long sequences.")
IVS = (Intervention("scale", 0.0), Intervention("scale", 2.5), Intervention("set", 1.5))
TOLERANCE = 1e-5  # relative to the predictions' scale
MAX_TINY_PARAMS = 2_000_000
# name: (config keys, routes that claim the case). The unit is an MLP neuron unless the
# name says otherwise; the block-level units (the MLP's and attention's writes, the
# residual stream) are what a mixture-of-experts or state-space block has too.
HEADS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "linear head, final state": (dict(target_layer=1, feature_layer=-1), ("kv", "full")),
    "linear head, right after the unit": (dict(target_layer=1, feature_layer=1), ("linear", "kv", "full")),
    "MLP head, mid-stack": (dict(target_layer=0, feature_layer=2, hidden_dim=6,
                                 head_config={"activation": "relu", "output_scale": 1.5}), ("kv", "full")),
    "head before the unit": (dict(target_layer=2, feature_layer=1), ("upstream", "kv")),
    "token head": (dict(target_layer=1, head_type="token"), ("kv", "full")),
    "mlp_out unit, final state": (dict(target_layer=1, feature_layer=-1, layer_type="mlp_out"),
                                  ("kv", "full")),
    "attn_out unit, MLP head, mid-stack": (dict(target_layer=1, feature_layer=2, layer_type="attn_out",
                                                hidden_dim=6, head_config={"activation": "silu"}),
                                           ("kv", "full")),
    "resid_pre unit, token head": (dict(target_layer=1, layer_type="resid_pre", head_type="token"),
                                   ("kv", "full")),
}
# layer_type -> the site it patches (the conformance reference's own small table)
_UNIT_SITE = {"post": "mlp_post", "mlp_out": "mlp_write", "attn_out": "attn_write", "resid_pre": "block_in",
              "resid_post": "block_out"}
COORDINATES = ("transformer_lens", "hf")


@dataclass
class Cell:
    architecture: str
    coordinates: str
    head: str
    route: str
    error: float | None  # None: refused
    reason: str = ""


def candidate_types() -> list[str]:
    """Model types with a causal-LM class in transformers and an adapter in TransformerLens."""
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    ArchitectureAdapterFactory.discover_entry_points()
    known = ArchitectureAdapterFactory._adapters
    return sorted(mt for mt, cls in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if cls in known)


def _reference(model: Any, cfg: dict[str, Any], text: str, patch: tuple[float, float] | None,
               predict: Callable[[torch.Tensor], float], digits: list[int] | None) -> tuple[float, float]:
    """(unit value as the head's coordinates see it, prediction) for one input, one forward."""
    hf, arch = model.hf, model.arch
    coords = cfg["coordinates"]
    lt = cfg.get("layer_type", "post")
    # transformer_lens coordinates of a LayerNorm model: a residual unit is its tensor's
    # column minus the tensor's mean, and the patch's δ stays in the (centred) features.
    centre = coords == "transformer_lens" and arch.layernorm and lt != "post"
    ids = torch.tensor([model.tokenizer(text)["input_ids"]])
    n = ids.shape[1]
    got: dict[str, Any] = {"delta": 0.0}

    def edit(t: torch.Tensor) -> torch.Tensor:
        x = t[0, n - 1].float()
        col = x[5] - x.mean() if centre else x[5]
        got["clean"] = float(col)
        if patch is None:
            return t
        out = t.clone()
        delta = col * (patch[0] - 1) + patch[1]
        got["delta"] = float(delta)
        out[0, n - 1, 5] = (x[5] + delta).to(t.dtype)
        return out

    last: dict[str, torch.Tensor] = {}

    def keep_last(m: Any, a: Any, o: Any) -> None:
        last["x"] = (o[0] if isinstance(o, (tuple, list)) else o).detach()

    handles = [attach(arch, Site(_UNIT_SITE[lt], cfg["target_layer"]), edit, 1),
               arch.blocks[-1].register_forward_hook(keep_last)]
    try:
        with torch.no_grad():
            out = hf(ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    if digits is not None:
        feats = out.logits[0, n - 1].float()
    elif coords == "hf":
        feats = out.hidden_states[cfg["feature_layer"]][0, n - 1].float()
    else:
        L = cfg["feature_layer"] % len(arch.blocks)
        x = last["x"][0] if len(arch.blocks) - 1 == L else out.hidden_states[L + 1][0]
        feats = x[n - 1].float()
        if arch.layernorm:
            feats = feats - feats.mean()
            if centre:
                feats = feats + got["delta"] / feats.shape[0]
    value = got["clean"] if patch is None else got["clean"] * patch[0] + patch[1]
    return value, predict(feats)


def check_architecture(model_type: str, root: Path) -> list[Cell]:
    """Every (coordinates, head, route) cell for one architecture."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from neuronpatch.coordinates import plan
    from neuronpatch.engine import run_experiment
    from neuronpatch.heads import load_head
    from neuronpatch.models import clear_cache, load_model
    from neuronpatch.testing import tiny_model, write_head

    if MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, "").endswith("ForConditionalGeneration"):
        return [Cell(model_type, "-", "-", "-", None, "multimodal: not a text-only causal LM")]
    try:
        with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            size = _tiny_size(model_type)
            if size > MAX_TINY_PARAMS:
                return [Cell(model_type, "-", "-", "-", None,
                             f"its config does not shrink to a tiny model ({size:,} parameters)")]
            path = tiny_model(root / model_type, model_type)
            model = load_model(str(path), device="cpu")
    except Exception as e:
        return [Cell(model_type, "-", "-", "-", None, _first_line(e))]
    cells: list[Cell] = []
    try:
        for coords in COORDINATES:
            for head_name, (spec, routes) in HEADS.items():
                spec = dict(spec)
                if coords == "hf" and "feature_layer" in spec and spec["feature_layer"] >= 0:
                    spec["feature_layer"] += 1  # the same tensor: hidden_states[L + 1] is block L's output
                kw = {k: spec.pop(k) for k in ("hidden_dim", "head_type") if k in spec}
                head_dir = write_head(root / f"{model_type}-{coords}-{len(cells)}", path, target_neuron=5,
                                      seed=3, coordinates=coords, **kw, **spec)
                head = load_head(head_dir)
                try:
                    head.check_model(model)
                    plan(head.config, model)
                except Exception as e:
                    cells += [Cell(model_type, coords, head_name, r, None, _first_line(e)) for r in routes]
                    continue
                cfg = {**spec, "coordinates": coords, "feature_layer": spec.get("feature_layer", -1)}
                digits = list(head.digit_token_ids(model)) if kw.get("head_type") == "token" else None
                dt = None if digits is None else torch.tensor(digits)

                def predict(f: torch.Tensor, head: Any = head, dt: Any = dt) -> float:
                    return float(head.predict(f[None], dt)[0])

                want = []
                for text in TEXTS:
                    for iv in IVS:
                        want.append(_reference(model, cfg, text, iv.affine(), predict, digits)[1])
                scale = max(1.0, max(abs(w) for w in want))
                for route in routes:
                    try:
                        res = run_experiment(head, list(TEXTS), interventions=IVS, method=route,  # type: ignore[arg-type]
                                             model=model)
                        got = res.patched_prediction.reshape(-1)
                        err = max(abs(float(g) - w) for g, w in zip(got, want, strict=True)) / scale
                        cells.append(Cell(model_type, coords, head_name, route, err))
                    except Exception as e:
                        cells.append(Cell(model_type, coords, head_name, route, None, _first_line(e)))
    except Exception as e:
        cells.append(Cell(model_type, "-", "-", "-", None, _first_line(e)))
    finally:
        clear_cache()
    return cells


def _tiny_size(model_type: str) -> int:
    """Parameters of the tiny model, counted on the meta device (nothing allocated)."""
    from transformers import AutoModelForCausalLM

    from neuronpatch.testing import tiny_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(model_type))
    return sum(p.numel() for p in model.parameters())


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{type(e).__name__}: {text[:160]}"


def render(cells: list[Cell], seconds: float) -> str:
    """docs/conformance.md: a summary per architecture, then every cell."""
    import transformer_lens
    import transformers

    try:
        tl_version = transformer_lens.__version__
    except AttributeError:
        from importlib.metadata import version

        tl_version = version("transformer_lens")
    by_arch: dict[str, list[Cell]] = {}
    for c in cells:
        by_arch.setdefault(c.architecture, []).append(c)
    exact = [a for a, cs in by_arch.items()
             if all(c.error is not None and c.error <= TOLERANCE for c in cs)]
    served = [a for a, cs in by_arch.items()
              if any(c.error is not None for c in cs)
              and all(c.error is None or c.error <= TOLERANCE for c in cs)]
    off = [c for c in cells if c.error is not None and c.error > TOLERANCE]
    lines = [
        "# Conformance",
        "",
        f"Written by `neuronpatch conformance` in {seconds:.0f} s with torch {torch.__version__}, "
        f"transformers {transformers.__version__}, TransformerLens {tl_version}.",
        "",
        "Each architecture is a tiny random model with every parameter random (norm gains and "
        "biases included). Each cell forces one route and compares every patched prediction "
        f"with an input-by-input HF forward (see `src/neuronpatch/conformance.py`); *exact* "
        f"means the largest error is at most {TOLERANCE:g} of the predictions' scale. A refused "
        "cell names why; nothing refused is ever run with wrong numbers.",
        "",
        f"**{len(served)} of {len(by_arch)} architectures served exactly** (every cell exact or "
        f"refused by name, none off); {len(exact)} of them exact in every cell; "
        f"{len(by_arch) - len(served)} refused entirely. Cells off: {len(off)}.",
        "",
        "| architecture | cells exact | largest error | refused or off |",
        "| --- | ---: | ---: | --- |",
    ]
    for arch, cs in by_arch.items():
        ok = [c for c in cs if c.error is not None and c.error <= TOLERANCE]
        worst = max((c.error for c in cs if c.error is not None), default=math.nan)
        bad = [c for c in cs if c not in ok]
        why = "; ".join(sorted({(c.reason or f"off by {c.error:.2g}") + (
            f" ({c.head}, {c.route})" if c.head != "-" else "") for c in bad}))[:300]
        lines.append(f"| {arch} | {len(ok)}/{len(cs)} | {worst:.1e} | {why} |")
    lines += ["", "## Every cell", "", "| architecture | coordinates | head | route | result |",
              "| --- | --- | --- | --- | --- |"]
    for c in cells:
        if c.head == "-":
            continue
        res = f"exact ({c.error:.1e})" if c.error is not None and c.error <= TOLERANCE else (
            f"OFF ({c.error:.2g})" if c.error is not None else f"refused: {c.reason}")
        lines.append(f"| {c.architecture} | {c.coordinates} | {c.head} | {c.route} | {res} |")
    return "\n".join(lines) + "\n"


def run(out: Path, types: list[str] | None = None, progress: Callable[[str], None] = print) -> list[Cell]:
    """Check every candidate architecture and write the table to ``out``."""
    start = time.perf_counter()
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory() as tmp:
        for mt in types or candidate_types():
            got = check_architecture(mt, Path(tmp))
            cells += got
            ok = sum(c.error is not None and c.error <= TOLERANCE for c in got)
            progress(f"{mt}: {ok}/{len(got)} cells exact")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(cells, time.perf_counter() - start))
    return cells
