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

import itertools
import json
import math
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from neuronpatch import units
from neuronpatch.errors import HeadConfigError, UnsafeArtifactError, config_error
from neuronpatch.models import WEIGHT_PROCESSING

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

HEAD_TYPES: tuple[str, ...] = ("regression", "classification", "token")
_KNOWN_HEAD_CONFIG = frozenset({"hidden_dim", "dropout", "digit_tokens", "n_classes", "output_dim"})


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
    prepend_bos: bool = False
    head_type: str = "regression"
    hidden_dim: int | None = None
    dropout: float = 0.0
    digit_tokens: tuple[int, ...] | None = None
    bin_edges: tuple[float, ...] | None = None
    weight_processing: str = "none"
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


def parse_config(raw: Mapping[str, Any], where: Path) -> HeadConfig:
    """Validate a config.json mapping (model-independent checks).

    Example:
        >>> parse_config({"base_model_name": "m", "target_layer": 1, "target_neuron": 4},
        ...              Path("h/config.json")).layer_type
        'post'
    """
    if not isinstance(raw, Mapping):
        raise HeadConfigError(f"{where}: expected a JSON object at the top level, got {type(raw).__name__}")
    name = raw.get("base_model_name")
    if not isinstance(name, str) or not name:
        raise config_error(where, "base_model_name", name,
                           "a model name: local directory, HF id or 'neuronpatch-demo'")
    layer = _int(raw, "target_layer", where)
    neuron = _int(raw, "target_neuron", where)
    layer_type = raw.get("layer_type", "post")
    if layer_type not in units.UNIT_HOOKS:
        raise config_error(where, "layer_type", layer_type, "one of " + ", ".join(units.UNIT_HOOKS))
    feature_layer = _int(raw, "feature_layer", where, default=-1, allow_negative=True)
    feature_hook = raw.get("feature_hook")
    if feature_hook is not None and (not isinstance(feature_hook, str) or not feature_hook):
        raise config_error(where, "feature_hook", feature_hook,
                           "a hook name such as 'blocks.2.hook_resid_pre'")
    token_pos = raw.get("token_pos", "last")
    if not (token_pos == "last" or (isinstance(token_pos, int) and not isinstance(token_pos, bool))):
        raise config_error(where, "token_pos", token_pos, "'last' or an integer position")
    prepend_bos = raw.get("prepend_bos", False)
    if not isinstance(prepend_bos, bool):
        raise config_error(where, "prepend_bos", prepend_bos, "true or false")
    head_type = raw.get("head_type", "regression")
    if head_type not in HEAD_TYPES:
        raise config_error(where, "head_type", head_type, "one of " + ", ".join(HEAD_TYPES))
    hc = raw.get("head_config", {}) or {}
    if not isinstance(hc, Mapping):
        raise config_error(where, "head_config", hc, "an object")
    hidden_dim = hc.get("hidden_dim")
    if hidden_dim is not None and (isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int)
                                   or hidden_dim < 1):
        raise config_error(where, "head_config.hidden_dim", hidden_dim, "a positive integer or null")
    dropout = hc.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise config_error(where, "head_config.dropout", dropout, "a number in [0, 1)")
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
    wp = raw.get("weight_processing", "none")
    if wp not in WEIGHT_PROCESSING:
        raise config_error(where, "weight_processing", wp, "one of " + ", ".join(WEIGHT_PROCESSING))
    known = {"base_model_name", "target_layer", "target_neuron", "layer_type", "feature_layer",
             "feature_hook", "token_pos", "prepend_bos", "head_type", "head_config", "bin_edges",
             "weight_processing"}
    extra = {k: v for k, v in raw.items() if k not in known}
    extra.update({f"head_config.{k}": v for k, v in hc.items() if k not in _KNOWN_HEAD_CONFIG})
    return HeadConfig(
        base_model_name=name, target_layer=layer, target_neuron=neuron, layer_type=layer_type,
        feature_layer=feature_layer, feature_hook=feature_hook, token_pos=token_pos,
        prepend_bos=prepend_bos, head_type=head_type, hidden_dim=hidden_dim,
        dropout=float(dropout), digit_tokens=digits, bin_edges=edges, weight_processing=wp,
        extra=extra,
    )


def _load_weights(path: Path) -> dict[str, Tensor]:
    pt, st = path / "head.pt", path / "head.safetensors"
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
        self.weights = {k: v.float() for k, v in weights.items()}
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
            if cfg.bin_edges is not None and len(cfg.bin_edges) != n_out + 1:
                raise config_error(self.config_path, "bin_edges", list(cfg.bin_edges),
                                   f"{n_out + 1} edges (n_classes + 1; the head has {n_out} classes)")

    # ------------------------------------------------------------------ model
    def feature_hook(self, n_layers: int) -> str:
        """The hook whose values this head reads (logits for token heads)."""
        if self.config.head_type == "token":
            return "unembed.hook_out"
        if self.config.feature_hook:
            return self.config.feature_hook
        try:
            return units.feature_hook_for_layer(self.config.feature_layer, n_layers=n_layers)
        except ValueError:
            raise config_error(self.config_path, "feature_layer", self.config.feature_layer,
                               f"an index into hidden_states in [-{n_layers + 1}, {n_layers}]") from None

    def check_model(self, model: TransformerBridge) -> None:
        """Validate what depends on the model: layer, unit index, widths, digit tokens."""
        cfg, mcfg, where = self.config, model.cfg, self.config_path
        n_layers = int(mcfg.n_layers)
        if not 0 <= cfg.target_layer < n_layers:
            raise config_error(where, "target_layer", cfg.target_layer, f"an int in [0, {n_layers - 1}]")
        width = units.unit_width(model, cfg.layer_type)
        if not 0 <= cfg.target_neuron < width:
            raise config_error(where, "target_neuron", cfg.target_neuron,
                               f"an int in [0, {width - 1}] (the width of {cfg.layer_type})")
        hook = self.feature_hook(n_layers)
        if hook not in model.hook_dict:
            raise config_error(where, "feature_hook", hook, "a hook name of this model (see model.hook_dict)")
        if self.input_dim is not None and self.input_dim != int(mcfg.d_model) and not cfg.feature_hook:
            raise self._bad("input width", self.input_dim,
                            f"{int(mcfg.d_model)} (d_model of {cfg.base_model_name})")
        if cfg.head_type == "token":
            ids = self.digit_token_ids(model)
            vocab = int(mcfg.d_vocab)
            if any(i >= vocab for i in ids):
                raise config_error(where, "head_config.digit_tokens", list(ids), f"ids below d_vocab={vocab}")

    def digit_token_ids(self, model: TransformerBridge) -> tuple[int, ...]:
        """Token ids of "0".."9": from the config, else resolved through the tokenizer."""
        if self.config.digit_tokens is not None:
            return self.config.digit_tokens
        ids = []
        for d in "0123456789":
            enc = model.tokenizer.encode(d, add_special_tokens=False)
            if len(enc) != 1:
                raise config_error(self.config_path, "head_config.digit_tokens", None,
                                   f"explicit ids: the tokenizer splits {d!r} into {len(enc)} tokens")
            ids.append(enc[0])
        return tuple(ids)

    # ---------------------------------------------------------------- forward
    def predict(self, features: Tensor, digit_ids: Tensor | None = None) -> Tensor:
        """Predictions for a batch of feature vectors.

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
            probs = torch.softmax(x[:, digit_ids], dim=-1)
            return probs @ torch.arange(10, dtype=probs.dtype)
        if "hidden.weight" in w:
            x = F.gelu(F.linear(x, w["hidden.weight"], w["hidden.bias"]))
        out = F.linear(x, w["output.weight"], w["output.bias"])
        if cfg.head_type == "regression":
            return out[:, 0]
        if cfg.bin_edges is None:
            return out.argmax(-1).to(out.dtype)
        edges = torch.tensor(cfg.bin_edges, dtype=out.dtype)
        centres = (edges[:-1] + edges[1:]) / 2
        return torch.softmax(out, dim=-1) @ centres


def load_head(path: str | Path) -> Head:
    """Load and validate a head directory.

    Raises:
        HeadConfigError: missing files, bad JSON, a bad key or shape (one-line message).
        UnsafeArtifactError: ``head.pt`` is a pickle that would run code; it is not run.

    Example:
        >>> head = load_head("probes/heads/demo_causal")    # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_dir():
        raise HeadConfigError(f"{path}: head directory not found")
    cfg_path = path / "config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise HeadConfigError(f"{cfg_path}: missing (a head directory needs config.json)") from None
    except json.JSONDecodeError as e:
        raise HeadConfigError(f"{cfg_path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    config = parse_config(raw, cfg_path)
    if config.head_type == "token" and not (path / "head.pt").exists() and not (
        path / "head.safetensors"
    ).exists():
        weights: dict[str, Tensor] = {}
    else:
        weights = _load_weights(path)
    return Head(path.resolve(), config, weights)
