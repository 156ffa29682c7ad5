"""Prediction heads: loading the seed's artifact format and running it.

A head directory holds ``config.json`` and ``head.pt`` (a state dict, read with
``torch.load(weights_only=True)``) or ``head.safetensors``. Three head types:

* ``regression``: ``output`` Linear (or ``hidden`` Linear → GELU → ``output``)
  to one number;
* ``classification``: the same body to class logits; the prediction is
  ``Σ softmax(logits)·bin_centre`` when ``bin_edges`` are given, else the argmax
  class index;
* ``token``: no weights; the LM's own next-token logits at the read position,
  restricted to the ten digit tokens, give ``Σ i·p_i``.

Dropout is the identity at evaluation time, so it only appears in the config.
Every key is validated on load; what depends on the model (layer range, unit
width, feature width, digit tokens) is checked by :meth:`Head.check_model`.
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
import pickle
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from neuronpatch import units
from neuronpatch.errors import HeadConfigError, UnsafeArtifactError, config_error
from neuronpatch.limits import load_json_bounded

if TYPE_CHECKING:
    from neuronpatch.models import LoadedModel

HEAD_TYPES: tuple[str, ...] = ("regression", "classification", "token")
COORDINATES: tuple[str, ...] = ("transformer_lens", "hf")
ACTIVATIONS: tuple[str, ...] = ("gelu", "relu", "silu")
# The seed pipeline's head classes, checked against head_type.
_CLASS_NAMES = {"RegressionHead": "regression", "ClassificationHead": "classification",
                "TokenPredictionHead": "token"}
# head_config keys: honoured, checked against the weights or the model, or training-only.
_HEAD_CONFIG_KEYS = frozenset({"hidden_dim", "dropout", "activation", "output_scale", "digit_tokens",
                               "class_name", "input_dim", "num_classes", "class_weights"})
# Top-level keys: read, checked, or metadata the seed pipeline writes.
_TOP_KEYS = frozenset({"base_model_name", "target_layer", "target_neuron", "layer_type", "feature_layer",
                       "feature_hook", "token_pos", "prepend_bos", "head_type", "head_config", "bin_edges",
                       "coordinates", "weight_processing", "activation_mean", "activation_std", "d_model",
                       "weights", "sae", "target_expert"})
# Keys some pipelines add as records; never read, never warned about.
_QUIET_KEYS = frozenset({"timestamp", "created_at", "description", "version", "metrics", "training",
                         "training_config", "train_config", "dataset", "notes", "git_commit", "seed",
                         "neuronpatch"})
_OLD_WEIGHT_PROCESSING = {"transformer_lens": "transformer_lens", "none": "hf"}


@dataclass(frozen=True)
class HeadConfig:
    """The validated content of a head's config.json."""

    base_model_name: str
    target_layer: int
    target_neuron: int
    layer_type: str = "post"
    feature_layer: int = -1
    feature_hook: str | None = None
    token_pos: str | int = "last"
    prepend_bos: bool | None = None  # None: whatever the tokenizer does by default
    head_type: str = "regression"
    hidden_dim: int | None = None
    dropout: float = 0.0
    activation: str = "gelu"
    output_scale: float | None = None
    digit_tokens: tuple[int, ...] | None = None
    bin_edges: tuple[float, ...] | None = None
    coordinates: str = "transformer_lens"
    coordinates_given: bool = False  # False: the default was assumed (see the engine's guard)
    activation_mean: float | None = None
    activation_std: float | None = None
    d_model: int | None = None
    input_dim: int | None = None
    num_classes: int | None = None
    weights_file: str | None = None
    sae: str | None = None  # layer_type sae: the dictionary's directory (resolved against the head's)
    target_expert: int | None = None  # layer_type expert_post / expert_pre: which expert of the block
    extra: Mapping[str, Any] = field(default_factory=dict)


def _int(cfg: Mapping[str, Any], key: str, where: Path, *, default: Any = ..., lo: int = 0,
         allow_negative: bool = False) -> Any:
    if key not in cfg:
        if default is ...:
            raise config_error(where, key, "<missing>", "an integer (the key is required)")
        return default
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise config_error(where, key, v, "an integer")
    if v < lo and not allow_negative:
        raise config_error(where, key, v, f"an integer >= {lo}")
    return v


def _number(cfg: Mapping[str, Any], key: str, where: Path, shown: str) -> float | None:
    v = cfg.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise config_error(where, shown, v, "a finite number or null")
    return float(v)


def _unknown_key(key: str, known: frozenset[str], where: Path, shown: str) -> HeadConfigError | None:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    if close:
        return config_error(where, shown, key, f"a known key: did you mean {close[0]!r}?")
    return None


def parse_config(raw: Mapping[str, Any], where: Path) -> HeadConfig:
    """Validate a config.json mapping (model-independent checks).

    A key that could change a number is never ignored: unknown ``head_config``
    keys are errors, and an unknown top-level key close to a known one is an
    error that suggests the spelling; other unknown top-level keys are kept in
    ``extra`` and warned about once.

    Example:
        >>> parse_config({"base_model_name": "m", "target_layer": 1, "target_neuron": 4},
        ...              Path("h/config.json")).coordinates
        'transformer_lens'
    """
    if not isinstance(raw, Mapping):
        raise HeadConfigError(f"{where}: expected a JSON object at the top level, got {type(raw).__name__}")
    for key in raw:
        if key not in _TOP_KEYS and key not in _QUIET_KEYS:
            err = _unknown_key(key, _TOP_KEYS, where, key)
            if err is not None:
                raise err
    name = raw.get("base_model_name")
    if not isinstance(name, str) or not name:
        raise config_error(where, "base_model_name", name,
                           "a model name: local directory, HF id, TransformerLens name or 'neuronpatch-demo'")
    neuron = _int(raw, "target_neuron", where)
    layer_type = raw.get("layer_type", "post")
    if layer_type not in units.LAYER_TYPES:
        raise config_error(where, "layer_type", layer_type, "one of " + ", ".join(units.LAYER_TYPES))
    sae, layer = _dictionary(raw, layer_type, where)
    expert = _int(raw, "target_expert", where, default=None)
    if layer_type in units.EXPERT_TYPES and expert is None:
        raise config_error(where, "target_expert", "<missing>",
                           f"the index of the expert whose neuron layer_type {layer_type!r} names")
    if layer_type not in units.EXPERT_TYPES and expert is not None:
        raise config_error(where, "target_expert", expert, f"no target_expert for layer_type {layer_type!r} "
                           "(it names an expert for layer_type " + " or ".join(units.EXPERT_TYPES) + ")")
    feature_layer = _int(raw, "feature_layer", where, default=-1, allow_negative=True)
    feature_hook = raw.get("feature_hook")
    if feature_hook is not None and (not isinstance(feature_hook, str) or not feature_hook):
        raise config_error(where, "feature_hook", feature_hook,
                           "a hook name such as 'blocks.2.hook_resid_post'")
    token_pos = raw.get("token_pos", "last")
    if not (token_pos == "last" or (isinstance(token_pos, int) and not isinstance(token_pos, bool))):
        raise config_error(where, "token_pos", token_pos, "'last' or an integer position")
    prepend_bos = raw.get("prepend_bos")
    if prepend_bos is not None and not isinstance(prepend_bos, bool):
        raise config_error(where, "prepend_bos", prepend_bos, "true, false or null (the tokenizer's default)")
    head_type = raw.get("head_type", "regression")
    if head_type not in HEAD_TYPES:
        raise config_error(where, "head_type", head_type, "one of " + ", ".join(HEAD_TYPES))
    coords, given = _coordinates(raw, where)
    hc = raw.get("head_config", {}) or {}
    if not isinstance(hc, Mapping):
        raise config_error(where, "head_config", hc, "an object")
    for key in hc:
        if key not in _HEAD_CONFIG_KEYS:
            err = _unknown_key(key, _HEAD_CONFIG_KEYS, where, f"head_config.{key}")
            raise err or config_error(where, f"head_config.{key}", hc[key],
                                      "no such key; head_config takes "
                                      + ", ".join(sorted(_HEAD_CONFIG_KEYS)))
    hidden_dim = hc.get("hidden_dim")
    if hidden_dim is not None and (isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int)
                                   or hidden_dim < 1):
        raise config_error(where, "head_config.hidden_dim", hidden_dim, "a positive integer or null")
    dropout = hc.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise config_error(where, "head_config.dropout", dropout, "a number in [0, 1)")
    activation = hc.get("activation", "gelu")
    if activation not in ACTIVATIONS:
        raise config_error(where, "head_config.activation", activation, "one of " + ", ".join(ACTIVATIONS))
    output_scale = _number(hc, "output_scale", where, "head_config.output_scale")
    class_name = hc.get("class_name")
    if class_name is not None and _CLASS_NAMES.get(class_name) != head_type:
        expected = next(k for k, v in _CLASS_NAMES.items() if v == head_type)
        raise config_error(where, "head_config.class_name", class_name,
                           f"{expected!r} for head_type {head_type!r}")
    input_dim = hc.get("input_dim")
    if input_dim is not None and (isinstance(input_dim, bool) or not isinstance(input_dim, int)
                                  or input_dim < 1):
        raise config_error(where, "head_config.input_dim", input_dim, "a positive integer")
    num_classes = hc.get("num_classes")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 2):
        raise config_error(where, "head_config.num_classes", num_classes, "an integer >= 2")
    d_model = raw.get("d_model")
    if d_model is not None and (isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1):
        raise config_error(where, "d_model", d_model, "a positive integer")
    digits = hc.get("digit_tokens")
    if digits is not None:
        if (not isinstance(digits, list) or len(digits) != 10
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in digits)):
            raise config_error(where, "head_config.digit_tokens", digits,
                               "a list of 10 token ids (for the digits 0..9)")
        digits = tuple(digits)
    edges = raw.get("bin_edges")
    if edges is not None:
        ok = (isinstance(edges, list) and len(edges) >= 2
              and all(isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e)
                      for e in edges))
        if not ok:
            raise config_error(where, "bin_edges", edges, "a list of at least 2 finite numbers")
        if any(b <= a for a, b in itertools.pairwise(edges)):
            raise config_error(where, "bin_edges", edges, "strictly increasing numbers")
        if head_type != "classification":
            raise config_error(where, "bin_edges", edges, f"no bin_edges for head_type {head_type!r}")
        edges = tuple(float(e) for e in edges)
    mean = _number(raw, "activation_mean", where, "activation_mean")
    std = _number(raw, "activation_std", where, "activation_std")
    if std is not None and std < 0:
        raise config_error(where, "activation_std", std, "a number >= 0")
    weights_file = raw.get("weights")
    if weights_file is not None and weights_file not in ("head.pt", "head.safetensors"):
        raise config_error(where, "weights", weights_file, "'head.pt' or 'head.safetensors'")
    extra = {k: v for k, v in raw.items() if k not in _TOP_KEYS and k not in _QUIET_KEYS}
    if extra:
        warnings.warn(f"{where}: unknown key(s) {', '.join(sorted(extra))} are not read", UserWarning,
                      stacklevel=2)
    return HeadConfig(
        base_model_name=name, target_layer=layer, target_neuron=neuron, layer_type=layer_type,
        feature_layer=feature_layer, feature_hook=feature_hook, token_pos=token_pos,
        prepend_bos=prepend_bos, head_type=head_type, hidden_dim=hidden_dim,
        dropout=float(dropout), activation=activation, output_scale=output_scale, digit_tokens=digits,
        bin_edges=edges, coordinates=coords, coordinates_given=given, activation_mean=mean,
        activation_std=std, d_model=d_model, input_dim=input_dim, num_classes=num_classes,
        weights_file=weights_file, sae=sae, target_expert=expert, extra=extra,
    )


def _dictionary(raw: Mapping[str, Any], layer_type: str, where: Path) -> tuple[str | None, int]:
    """``(sae, target_layer)``: the dictionary's directory (relative to the head's) and its layer."""
    sae = raw.get("sae")
    if layer_type != units.DICTIONARY:
        if sae is not None:
            raise config_error(where, "sae", sae,
                               f"no sae for layer_type {layer_type!r} (use layer_type: sae)")
        return None, _int(raw, "target_layer", where)
    if not isinstance(sae, str) or not sae:
        raise config_error(where, "sae", sae if "sae" in raw else "<missing>",
                           "the path of a dictionary directory (cfg.json + sae_weights.safetensors), "
                           "relative to the head's directory, or neuronpatch-demo-sae")
    from neuronpatch import dictionaries

    path = dictionaries.resolve(sae, where.parent)
    layer = dictionaries.read_config(path).read.layer
    given = _int(raw, "target_layer", where, default=layer)
    if given != layer:
        raise config_error(where, "target_layer", given, f"{layer} (the layer of the dictionary's hook) "
                           "or no target_layer")
    return str(path), layer


def _coordinates(raw: Mapping[str, Any], where: Path) -> tuple[str, bool]:
    coords = raw.get("coordinates")
    if coords is not None and coords not in COORDINATES:
        raise config_error(where, "coordinates", coords, "one of " + ", ".join(COORDINATES))
    old = raw.get("weight_processing")
    if old is not None:
        if old not in _OLD_WEIGHT_PROCESSING:
            raise config_error(where, "weight_processing", old,
                               "'transformer_lens' or 'none' (old spelling; write 'coordinates' instead)")
        if coords is not None and _OLD_WEIGHT_PROCESSING[old] != coords:
            raise config_error(where, "weight_processing", old,
                               f"agreement with coordinates={coords!r} (or drop weight_processing)")
        coords = _OLD_WEIGHT_PROCESSING[old]
    return (coords or "transformer_lens"), coords is not None


def _load_weights(path: Path, named: str | None = None) -> dict[str, Tensor]:
    pt, st = path / "head.pt", path / "head.safetensors"
    if named is None and pt.is_file() and st.is_file():
        raise HeadConfigError(f"{path}: holds both head.pt and head.safetensors; set \"weights\" in "
                              "config.json to the one to use, or remove the other")
    if named == "head.pt":
        st = path / "<not used>"
    elif named == "head.safetensors":
        pt = path / "<not used>"
    if st.is_file():
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(st)))
        except Exception as e:
            raise HeadConfigError(f"{st}: not a readable safetensors file ({e})") from e
    if pt.is_file():
        try:
            with warnings.catch_warnings():
                # torch warns about pickle protocols before refusing; the refusal is what counts.
                warnings.simplefilter("ignore", UserWarning)
                obj = torch.load(pt, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # weights_only=True refused something that would have to run code to load.
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnsafeArtifactError(
                f"{pt}: refused to load: the file is a pickle that needs code execution, "
                f"not a plain state dict ({first[:160]})"
            ) from e
        except Exception as e:
            raise HeadConfigError(f"{pt}: not a readable torch state dict ({type(e).__name__}: {e})") from e
        if not isinstance(obj, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
        ):
            raise HeadConfigError(f"{pt}: expected a state dict (a mapping of names to tensors), "
                                  f"got {type(obj).__name__}")
        return dict(obj)
    raise HeadConfigError(f"{path}: no head.pt or head.safetensors in the head directory")


class Head:
    """A loaded, validated prediction head.

    Example:
        >>> head = load_head("probes/heads/demo_causal")    # doctest: +SKIP
        >>> head.config.target_layer, head.name             # doctest: +SKIP
        (1, 'demo_causal')
    """

    def __init__(self, path: Path, config: HeadConfig, weights: Mapping[str, Tensor]) -> None:
        self.path = path
        self.config = config
        # A pipeline classifier also saves its training-only class_weights buffer.
        self.weights = {k: v.float() for k, v in weights.items() if k != "class_weights"}
        self._check_weights()

    @property
    def name(self) -> str:
        """The head directory's name."""
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def input_dim(self) -> int | None:
        """Width of the features the head reads (None for token heads)."""
        if self.config.head_type == "token":
            return None
        first = self.weights.get("hidden.weight", self.weights.get("output.weight"))
        assert first is not None
        return int(first.shape[1])

    @property
    def linear_weight(self) -> Tensor | None:
        """The weight vector of a linear regression head (no hidden layer), else None."""
        if self.config.head_type == "regression" and "hidden.weight" not in self.weights:
            return self.weights["output.weight"][0]
        return None

    def _bad(self, key: str, value: object, allowed: str) -> HeadConfigError:
        return config_error(self.path / "head.pt", key, value, allowed)

    def _check_weights(self) -> None:
        cfg, w = self.config, self.weights
        for key, t in w.items():
            if not torch.isfinite(t).all():
                raise self._bad(key, f"tensor with {int((~torch.isfinite(t)).sum())} NaN/inf values",
                                "finite numbers")
        if cfg.head_type == "token":
            return
        expected = {"output.weight", "output.bias"}
        if cfg.hidden_dim is not None or "hidden.weight" in w:
            expected |= {"hidden.weight", "hidden.bias"}
        missing, unknown = expected - w.keys(), w.keys() - expected
        if missing:
            raise self._bad("state dict", sorted(w), f"keys {sorted(expected)} (missing {sorted(missing)})")
        if unknown:
            raise self._bad("state dict", sorted(w),
                            f"only keys {sorted(expected)} (unexpected {sorted(unknown)})")
        out_w, out_b = w["output.weight"], w["output.bias"]
        if out_w.ndim != 2 or out_b.shape != (out_w.shape[0],):
            raise self._bad("output.weight/output.bias", (tuple(out_w.shape), tuple(out_b.shape)),
                            "shapes (n_out, width) and (n_out,)")
        if "hidden.weight" in w:
            hw, hb = w["hidden.weight"], w["hidden.bias"]
            if hw.ndim != 2 or hb.shape != (hw.shape[0],) or out_w.shape[1] != hw.shape[0]:
                raise self._bad("hidden.weight/hidden.bias", (tuple(hw.shape), tuple(hb.shape)),
                                f"shapes (hidden, d_model) and (hidden,) with hidden = "
                                f"output.weight width {out_w.shape[1]}")
            if cfg.hidden_dim is not None and hw.shape[0] != cfg.hidden_dim:
                raise config_error(self.config_path, "head_config.hidden_dim", cfg.hidden_dim,
                                   f"{hw.shape[0]} (the width of hidden.weight in the weights)")
        n_out = out_w.shape[0]
        if cfg.head_type == "regression" and n_out != 1:
            raise self._bad("output.weight", tuple(out_w.shape), "one output row for a regression head")
        if cfg.head_type == "classification":
            if n_out < 2:
                raise self._bad("output.weight", tuple(out_w.shape), "at least 2 classes")
            if cfg.num_classes is not None and cfg.num_classes != n_out:
                raise config_error(self.config_path, "head_config.num_classes", cfg.num_classes,
                                   f"{n_out} (the classes in output.weight)")
            if cfg.bin_edges is not None and len(cfg.bin_edges) != n_out + 1:
                raise config_error(self.config_path, "bin_edges", list(cfg.bin_edges),
                                   f"{n_out + 1} edges (n_classes + 1; the head has {n_out} classes)")

    # ------------------------------------------------------------------ model
    def check_model(self, model: LoadedModel) -> None:
        """Validate what depends on the model: layer, unit index, widths, digit tokens."""
        cfg, where = self.config, self.config_path
        n_layers = model.n_layers
        if not 0 <= cfg.target_layer < n_layers:
            raise config_error(where, "target_layer", cfg.target_layer, f"an int in [0, {n_layers - 1}]")
        width = unit_width(cfg, model)
        if not 0 <= cfg.target_neuron < width:
            raise config_error(where, "target_neuron", cfg.target_neuron,
                               f"an int in [0, {width - 1}] (the width of {cfg.layer_type})")
        check_layers(cfg, n_layers, where)  # the feature layer / hook
        d_model = model.d_model
        for key, value in (("d_model", cfg.d_model), ("head_config.input_dim", cfg.input_dim)):
            if value is not None and value != d_model:
                raise config_error(where, key, value, f"{d_model} (d_model of {model.name})")
        if self.input_dim is not None and self.input_dim != d_model:
            raise self._bad("input width", self.input_dim, f"{d_model} (d_model of {model.name})")
        if cfg.head_type == "token":
            ids = self.digit_token_ids(model)
            vocab = model.vocab_size
            if any(i >= vocab for i in ids):
                raise config_error(where, "head_config.digit_tokens", list(ids),
                                   f"ids below the vocabulary size {vocab}")

    def digit_token_ids(self, model: LoadedModel) -> tuple[int, ...]:
        """Token ids of "0".."9": from the config, else as the seed pipeline finds them.

        The pipeline takes ``tokenizer.encode(str(i))[-1]``: the last id, with the
        tokenizer's default special tokens.
        """
        if self.config.digit_tokens is not None:
            return self.config.digit_tokens
        return tuple(int(model.tokenizer.encode(str(d))[-1]) for d in range(10))

    # ---------------------------------------------------------------- forward
    def predict(self, features: Tensor, digit_ids: Tensor | None = None) -> Tensor:
        """Predictions for a batch of feature vectors, as the seed pipeline computes them.

        Regression and classification: dropout (the identity at evaluation) →
        [``hidden`` → ``activation``] → ``output`` (× ``output_scale`` for
        regression). Token heads: the expectation of the digit under the softmax
        over the ten digit logits, mapped onto ``[mean − 2·std, mean + 2·std]``
        when ``activation_mean`` and ``activation_std`` are given.

        Args:
            features: ``[rows, width]`` features; for token heads, ``[rows, vocab]`` logits.
            digit_ids: the ten digit token ids (token heads only).

        Returns:
            ``[rows]`` float predictions.
        """
        cfg, w = self.config, self.weights
        x = features.float()
        if cfg.head_type == "token":
            assert digit_ids is not None, "token heads need digit_ids"
            probs = torch.softmax(x[:, digit_ids.to(x.device)], dim=-1)
            value = probs @ torch.arange(10, dtype=probs.dtype, device=probs.device)
            if cfg.activation_mean is not None and cfg.activation_std is not None:
                value = (value / 9.0 * 4.0 - 2.0) * cfg.activation_std + cfg.activation_mean
            return value
        if "hidden.weight" in w:
            x = _ACTIVATION_FNS[cfg.activation](F.linear(x, w["hidden.weight"], w["hidden.bias"]))
        out = F.linear(x, w["output.weight"], w["output.bias"])
        if cfg.head_type == "regression":
            out = out[:, 0]
            return out * cfg.output_scale if cfg.output_scale is not None else out
        if cfg.bin_edges is None:
            return out.argmax(-1).to(out.dtype)
        edges = torch.tensor(cfg.bin_edges, dtype=out.dtype)
        centres = (edges[:-1] + edges[1:]) / 2
        return torch.softmax(out, dim=-1) @ centres


_ACTIVATION_FNS: dict[str, Callable[[Tensor], Tensor]] = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


def unit_width(cfg: HeadConfig, model: LoadedModel) -> int:
    """How many units the head's layer holds: neurons, residual coordinates or latents.

    Raises:
        HeadConfigError: a dictionary whose input does not fit the model.
    """
    if cfg.layer_type in units.EXPERT_TYPES:
        from neuronpatch import experts

        assert cfg.target_expert is not None
        return experts.load(model, cfg.target_layer, cfg.target_expert,
                            units.EXPERT_TYPES[cfg.layer_type]).width
    if cfg.layer_type == units.ROUTER:
        from neuronpatch import experts

        return experts.load_router(model, cfg.target_layer).width
    if cfg.layer_type != units.DICTIONARY:
        return model.unit_width(cfg.layer_type in units.MLP_HIDDEN_TYPES)
    from neuronpatch import dictionaries

    assert cfg.sae is not None
    d = dictionaries.read_config(cfg.sae)
    widths = {"d_in": (d.d_in, d.read), "d_out": (d.d_out, d.write)}
    for key, (have, site) in widths.items():
        want = model.unit_width(site.kind in ("mlp_post",))
        if have != want:
            raise config_error(d.path / dictionaries.CONFIG_FILE, key, have,
                               f"{want} (the width of {site} in {model.name})")
    return d.d_sae


def load_head(path: str | Path, *, checkpoint: str | Path | None = None) -> Head:
    """Load and validate a head directory.

    ``checkpoint``: the model the head will run against when it is not the head's own
    ``base_model_name``; a head from an unfrozen pipeline run is then read (on the model
    it names, such a head is refused: see :func:`check_frozen_run`).

    Raises:
        HeadConfigError: missing files, bad JSON, a bad key or shape (one-line message).
        UnsafeArtifactError: ``head.pt`` is a pickle that would run code; it is not run.

    Example:
        >>> head = load_head("probes/heads/demo_causal")    # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_dir():
        raise HeadConfigError(f"{path}: head directory not found{_did_you_mean(path)}")
    cfg_path = path / "config.json"
    if not cfg_path.exists() and not cfg_path.is_symlink():
        raise HeadConfigError(f"{cfg_path}: missing (a head directory needs config.json)")
    # Bounded: size, nesting depth and special files are refused in one line.
    raw = load_json_bounded(cfg_path, what="head config", error=HeadConfigError)
    config = parse_config(raw, cfg_path)
    if checkpoint is None or same_model(checkpoint, config.base_model_name):
        check_frozen_run(path)
    if config.head_type == "token" and not (path / "head.pt").exists() and not (
        path / "head.safetensors"
    ).exists():
        weights: dict[str, Tensor] = {}
    else:
        weights = _load_weights(path, config.weights_file)
    return Head(path.resolve(), config, weights)


def check_layers(cfg: HeadConfig, n_layers: int, where: Path) -> None:
    """Validate what depends only on the model's number of blocks: target and feature layer.

    :meth:`Head.check_model` calls it with the loaded model; the command line calls
    it with the layer count of the model's config.json, before any weights load.

    Raises:
        HeadConfigError: ``target_layer``, ``feature_layer`` or ``feature_hook`` out of range.

    Example:
        >>> cfg = load_head("probes/heads/demo_causal").config             # doctest: +SKIP
        >>> check_layers(cfg, 4, Path("config.json"))                      # doctest: +SKIP
    """
    from neuronpatch import coordinates

    if not 0 <= cfg.target_layer < n_layers:
        raise config_error(where, "target_layer", cfg.target_layer, f"an int in [0, {n_layers - 1}]")
    coordinates.feature_site(cfg, n_layers, where=where)  # raises on a bad feature_layer / feature_hook


# The seed pipeline writes a run as ``models/<run>/best_model/`` (config.json, head.pt) with
# ``models/<run>/training_metrics.json`` beside it; an unfrozen run records its strategy there.
TRAINING_METRICS = "training_metrics.json"


def check_frozen_run(head_dir: Path) -> None:
    """Refuse a head whose pipeline run fine-tuned the base model instead of training the head.

    With ``--unfreeze all|after_target|from_layer|selective`` the seed pipeline keeps the head
    at its random initialisation, trains the base model's layers and saves only the head; it
    records the strategy in ``training_metrics.json`` beside the head directory
    (``"unfreezing": {"strategy": ..., "unfrozen_params": ...}``). On the original base model
    such a head's numbers mean nothing. A frozen run (``strategy: none``), a metrics file
    without ``unfreezing``, or no metrics file read as before.

    Raises:
        UnfrozenHeadError: the run was unfrozen (the message names the file, the strategy and
            how many parameters were trained).
        HeadConfigError: the metrics file is not readable JSON, or its ``unfreezing`` is malformed.

    Example:
        >>> check_frozen_run(Path("models/run/best_model"))                  # doctest: +SKIP
    """
    from neuronpatch.errors import UnfrozenHeadError

    metrics = head_dir.resolve().parent / TRAINING_METRICS
    if not metrics.exists():
        return
    raw = load_json_bounded(metrics, what="training metrics", error=HeadConfigError)
    unfreezing = raw.get("unfreezing") if isinstance(raw, dict) else None
    if unfreezing is None:
        return
    if not isinstance(unfreezing, dict):
        raise config_error(metrics, "unfreezing", unfreezing, 'an object such as {"strategy": "none"}')
    strategy = unfreezing.get("strategy", "none")
    if strategy in (None, "none", False):
        return
    params = unfreezing.get("unfrozen_params")
    count = (f", {params:,} parameters" if isinstance(params, int) and not isinstance(params, bool)
             else "")
    raise UnfrozenHeadError(
        f"{head_dir}: this head was trained with the base model's layers unfrozen ({metrics}: "
        f"unfreezing.strategy = {strategy}{count}); the pipeline saved only the head, so on the "
        "original model its numbers mean nothing; to read it on the fine-tuned model, name that "
        "checkpoint (probe key model:, --model, or model= in the API)")


def same_model(a: str | Path, b: str | Path) -> bool:
    """Whether two model names or paths resolve to the same local model (unresolvable: by name).

    Example:
        >>> same_model("neuronpatch-demo", "neuronpatch-demo")
        True
    """
    from neuronpatch.errors import ModelLoadError
    from neuronpatch.models import resolve_model_path

    if os.fspath(a) == os.fspath(b):
        return True
    try:
        return resolve_model_path(a) == resolve_model_path(b)
    except ModelLoadError:
        return False


def _did_you_mean(path: Path) -> str:
    """``; did you mean X?`` for a sibling head directory one typo away, else ``""``."""
    import difflib

    try:
        siblings = sorted(p.name for p in path.parent.iterdir()
                          if p.is_dir() and (p / "config.json").is_file())
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, siblings, n=1, cutoff=0.8)
    return f"; did you mean {path.parent / close[0]}?" if close else ""
