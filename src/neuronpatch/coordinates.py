"""Coordinates: which tensors a head's numbers refer to, as a plan for the engine.

A head config names a unit (``target_layer``, ``target_neuron``, ``layer_type``)
and features (``feature_layer``) in one of two coordinate systems:

``transformer_lens`` (the default; the seed pipeline's)
    The model as ``HookedTransformer.from_pretrained`` processes it (LayerNorm
    folded, writing weights centred). ``feature_layer`` L is the output of block
    L (``resid_post``; −1 is the last block, *before* the final norm). For
    LayerNorm models every residual-stream tensor is the HF tensor minus its
    mean over d_model, and a patch of δ on such a centred coordinate adds δ/d_model
    to every coordinate the features hold at that position (the processed model
    never re-centres). MLP neurons are unchanged; RMSNorm models are not centred.
``hf``
    The unprocessed HF model. ``feature_layer`` i is ``output_hidden_states[i]``:
    0 the embeddings, the last entry the final norm's output with its gain and bias.

Both are computed from the HF model's own forward and these identities; the
engine consumes the :class:`Plan` and never asks again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from neuronpatch import units
from neuronpatch.architecture import Site
from neuronpatch.errors import ModelLoadError, config_error

if TYPE_CHECKING:
    from torch import Tensor

    from neuronpatch.models import LoadedModel


class HeadConfig(Protocol):
    """What a plan needs from a head's config (``heads.HeadConfig`` has it; no import needed)."""

    @property
    def head_type(self) -> str: ...
    @property
    def feature_hook(self) -> str | None: ...
    @property
    def feature_layer(self) -> int: ...
    @property
    def coordinates(self) -> str: ...
    @property
    def layer_type(self) -> str: ...
    @property
    def target_layer(self) -> int: ...
    @property
    def target_neuron(self) -> int: ...
    @property
    def sae(self) -> str | None: ...
    @property
    def target_expert(self) -> int | None: ...

_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_mlp_out|hook_attn_out)$")
_HOOK_SITES = {"hook_resid_pre": "block_in", "hook_resid_post": "block_out",
               "hook_mlp_out": "mlp_write", "hook_attn_out": "attn_write"}


@dataclass(frozen=True)
class Plan:
    """Where to patch and where to read, and how to turn HF tensors into the head's coordinates."""

    coordinates: str
    unit: Site
    neuron: int
    feature: Site
    centre_unit: bool  # the unit's value is its tensor minus the tensor's mean
    centre_features: bool
    offset: bool  # a patch of δ adds δ/d_model to the features at the patched position
    upstream: bool  # the features are computed before the unit: no patch can reach them
    d_model: int
    # Direction controls ([k, d_model] float64 tensor; see neuronpatch.controls), set by the
    # engine: a patched row whose ``Targets`` entry names direction ``i`` patches along
    # ``directions[i]``.
    directions: Any = field(default=None, compare=False, repr=False)
    # A dictionary's latents (neuronpatch.dictionaries.Dictionary) when the unit is a latent, or
    # an expert's neurons (neuronpatch.experts.ExpertNeurons): ``unit`` is where they are
    # encoded from, ``write`` where a change is added.
    dictionary: Any = field(default=None, compare=False, repr=False)
    write: Site | None = None

    @property
    def write_site(self) -> Site:
        """Where a patch edits the tensor: the unit's site, or a transcoder's output."""
        return self.write or self.unit

    @property
    def unit_hook(self) -> str:
        """The unit's layer as TransformerLens names it (an expert's neurons:
        ``blocks.L.mlp.experts.E.hook_post``; a router's logits: ``blocks.L.mlp.gate.hook_out``)."""
        return str(self.unit) if self.dictionary is None else self.dictionary.hook

    def describe(self) -> str:
        unit = f"{self.unit}:{self.neuron}"
        if self.dictionary is not None:
            unit = f"{self.unit} {self.dictionary.label(self.neuron)}"
            unit += f" → {self.write}" if self.write else ""
        return f"{unit} → {self.feature} ({self.coordinates} coordinates)"

    # The coordinate transforms, in one place: routes and ranking call these and never
    # centre or offset a tensor themselves. ``t`` is a site's tensor ``[..., width]``.
    def layer_values(self, t: Tensor) -> Tensor:
        """Every unit of the layer in the unit's coordinates (float32; centred where they are)."""
        row = t.float()
        row = row - row.mean(-1, keepdim=True) if self.centre_unit else row
        return row if self.dictionary is None else self.dictionary.encode(row)

    def latent_values(self, t: Tensor, cols: Tensor) -> Tensor:
        """``[R, S]``: latent ``cols[r]`` of each row of ``t [R, S, width]`` (centred first where the
        unit's tensor is)."""
        row = t.float()
        row = row - row.mean(-1, keepdim=True) if self.centre_unit else row
        return self.dictionary.encode(row, cols)

    def latent_offset(self, cols: Tensor) -> Tensor:
        """``[R]``: what a latent's change of 1 adds to the mean of the written tensor, times
        ``d_model`` (a column's patch: 1): the δ/d_model offset of transformer_lens coordinates."""
        return self.dictionary.rows(cols).float().sum(-1)

    def unit_value(self, column: Tensor, t: Tensor) -> Tensor:
        """One column of ``t`` (already taken out, ``t[..., c]``) in the unit's coordinates."""
        col = column.float()
        return col - t.float().mean(-1) if self.centre_unit else col

    def read_features(self, t: Tensor, delta: Tensor | None = None) -> Tensor:
        """The head's features from the feature site's tensor ``[rows, width]``.

        ``delta [rows]``: the change a patch made to a centred coordinate at this position;
        in transformer_lens coordinates it adds ``delta / d_model`` to every feature (the
        processed model never re-centres), and nothing in other coordinates.
        """
        f = t.float()
        if self.centre_features:
            f = f - f.mean(-1, keepdim=True)
        if self.offset and delta is not None:
            f = f + (delta.float() / self.d_model)[:, None]
        return f


def unit_site(cfg: HeadConfig) -> Site:
    """The site the unit is read at (a dictionary's: where its latents are encoded from)."""
    if cfg.layer_type == units.DICTIONARY:
        from neuronpatch import dictionaries

        assert cfg.sae is not None
        return dictionaries.read_config(cfg.sae).read
    if cfg.layer_type in units.EXPERT_TYPES:
        return Site("expert_in", cfg.target_layer)
    if cfg.layer_type == units.ROUTER:
        return Site("router_in", cfg.target_layer)
    return Site(units.UNIT_SITES[cfg.layer_type], cfg.target_layer)


def feature_site(cfg: HeadConfig, n_layers: int, coordinates: str | None = None,
                 where: Path = Path("config.json")) -> Site:
    """The site a head reads, in ``coordinates`` (default: the head's own)."""
    coords = coordinates or cfg.coordinates
    if cfg.head_type == "token":
        return Site("logits", n_layers)
    if cfg.feature_hook:
        m = _HOOK_RE.match(cfg.feature_hook)
        if m and int(m.group(1)) < n_layers:
            return Site(_HOOK_SITES[m.group(2)], int(m.group(1)))
        if cfg.feature_hook in ("ln_final.hook_out", "ln_final") and coords == "hf":
            return Site("final_norm", n_layers)
        raise config_error(where, "feature_hook", cfg.feature_hook,
                           f"blocks.L.hook_resid_pre|hook_resid_post|hook_mlp_out|hook_attn_out with L "
                           f"in [0, {n_layers - 1}]" + (", or ln_final.hook_out" if coords == "hf" else ""))
    fl = cfg.feature_layer
    if coords == "transformer_lens":
        k = fl + n_layers if fl < 0 else fl
        if not 0 <= k < n_layers:
            raise config_error(where, "feature_layer", fl,
                               f"a block index in [-{n_layers}, {n_layers - 1}] (transformer_lens "
                               "coordinates: the block's resid_post)")
        return Site("block_out", k)
    k = fl + n_layers + 1 if fl < 0 else fl
    if not 0 <= k <= n_layers:
        raise config_error(where, "feature_layer", fl,
                           f"an index into hidden_states in [-{n_layers + 1}, {n_layers}] (hf coordinates)")
    return Site("final_norm", n_layers) if k == n_layers else Site("block_in", k)


def plan(cfg: HeadConfig, model: LoadedModel, coordinates: str | None = None,
         where: Path = Path("config.json")) -> Plan:
    """Turn a head config and a model into the engine's plan.

    Raises:
        HeadConfigError: the features do not exist in this model.
        ModelLoadError: the architecture has no such site (refused by name).
    """
    coords = coordinates or cfg.coordinates
    n_layers = model.n_layers
    unit = unit_site(cfg)
    feature = feature_site(cfg, n_layers, coords, where)
    model.arch.check(unit)
    model.arch.check(feature)
    dictionary: Any = None
    write: Site | None = None
    if cfg.layer_type == units.DICTIONARY:
        from neuronpatch import dictionaries

        assert cfg.sae is not None
        dictionary = dictionaries.load(cfg.sae, model.device)
        if dictionary.cfg.transcoder:
            write = dictionary.cfg.write
            model.arch.check(write)
    elif cfg.layer_type in units.EXPERT_TYPES:
        from neuronpatch import experts

        assert cfg.target_expert is not None
        dictionary = experts.load(model, unit.layer, cfg.target_expert, units.EXPERT_TYPES[cfg.layer_type])
        write = dictionary.write
        model.arch.check(write)
    elif cfg.layer_type == units.ROUTER:
        from neuronpatch import experts

        dictionary = experts.load_router(model, unit.layer)  # read and written at the router's input
    if coords == "hf" and model.arch.hf_refused and cfg.head_type != "token" and not cfg.feature_hook:
        raise ModelLoadError(f"{model.arch.name}: hf coordinates are refused: {model.arch.hf_refused}")
    centring = coords == "transformer_lens" and model.arch.layernorm
    centre_unit = centring and unit.kind in units.RESIDUAL_SITES
    centre_features = centring and feature.kind in units.RESIDUAL_SITES
    upstream = feature.order(n_layers) < unit.order(n_layers)
    # A patch writes off-centre where it edits a centred residual tensor (a transcoder: its output).
    written = centring and (write or unit).kind in units.RESIDUAL_SITES
    return Plan(coordinates=coords, unit=unit, neuron=cfg.target_neuron, feature=feature,
                centre_unit=centre_unit, centre_features=centre_features,
                offset=written and centre_features and not upstream, upstream=upstream,
                d_model=model.d_model, dictionary=dictionary, write=write)
