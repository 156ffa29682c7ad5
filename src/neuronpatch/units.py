"""Where things live in the model: unit hooks, feature hooks and their order.

A *unit* is what gets patched (an MLP neuron, or one dimension of a residual
stream tensor); the *features* are what a head reads. Both are named by
TransformerLens compatibility-mode hook names. Whether a patch can reach the
features at all is a question of order in the forward pass, answered by
:func:`hook_order`.

Example:
    >>> unit_hook(2, "post")
    'blocks.2.mlp.hook_post'
    >>> feature_hook_for_layer(-1, n_layers=4), feature_hook_for_layer(2, n_layers=4)
    ('ln_final.hook_normalized', 'blocks.2.hook_resid_pre')
"""

from __future__ import annotations

import re
from typing import Any, Final

# layer_type (the seed's config key) → hook suffix under blocks.{L}.
UNIT_HOOKS: Final[dict[str, str]] = {
    "post": "mlp.hook_post",
    "mlp_post": "mlp.hook_post",
    "pre": "mlp.hook_pre",
    "mlp_pre": "mlp.hook_pre",
    "mlp_out": "hook_mlp_out",
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
}
# Units that live in the MLP's hidden layer (width d_mlp); the rest are d_model wide.
MLP_HIDDEN_TYPES: Final[frozenset[str]] = frozenset({"post", "mlp_post", "pre", "mlp_pre"})

# Position of a hook inside its block, in forward order.
_STAGES: Final[dict[str, int]] = {
    "hook_resid_pre": 0, "hook_in": 0,
    "ln1": 1, "attn": 1, "hook_attn_in": 1, "hook_q_input": 1, "hook_k_input": 1,
    "hook_v_input": 1,
    "hook_attn_out": 2,
    "hook_resid_mid": 3, "hook_mlp_in": 3,
    "ln2": 4, "mlp.hook_in": 4, "mlp.hook_pre": 4, "mlp.in": 4,
    "mlp.hook_post": 5, "mlp.out": 5,
    "hook_mlp_out": 6, "mlp.hook_out": 6,
    "hook_resid_post": 7, "hook_out": 7,
}
_BLOCK_RE: Final = re.compile(r"^blocks\.(\d+)\.(.+)$")


def unit_hook(layer: int, layer_type: str) -> str:
    """Hook name of a unit's activation tensor."""
    return f"blocks.{layer}.{UNIT_HOOKS[layer_type]}"


def unit_width(model: Any, layer_type: str) -> int:
    """How many units a layer type has in ``model`` (d_mlp for MLP neurons, else d_model)."""
    width = model.cfg.d_mlp if layer_type in MLP_HIDDEN_TYPES else model.cfg.d_model
    if width is None:
        raise ValueError(f"the model has no {layer_type} units (no MLP width in its config)")
    return int(width)


def feature_hook_for_layer(feature_layer: int, *, n_layers: int) -> str:
    """Hook whose value equals HF ``output_hidden_states[feature_layer]``.

    ``hidden_states[0]`` is the embedding output, ``hidden_states[i]`` the output
    of block ``i-1`` (the input of block ``i``), and the last entry the final
    hidden state *after* the final LayerNorm, exactly as HF returns it.
    """
    k = feature_layer + (n_layers + 1) if feature_layer < 0 else feature_layer
    if not 0 <= k <= n_layers:
        raise ValueError(f"feature_layer {feature_layer} out of range for {n_layers} layers")
    return "ln_final.hook_normalized" if k == n_layers else f"blocks.{k}.hook_resid_pre"


def hook_order(name: str, *, n_layers: int) -> tuple[int, int]:
    """A sortable (layer, stage) key for a hook: earlier in the forward sorts first.

    ``blocks.L.hook_resid_post`` and ``blocks.{L+1}.hook_resid_pre`` hold the same
    tensor and get the same key.

    Example:
        >>> hook_order("blocks.1.mlp.hook_post", n_layers=4) < hook_order(
        ...     "blocks.2.hook_resid_pre", n_layers=4)
        True
    """
    if name.startswith(("hook_embed", "hook_pos_embed", "embed.", "pos_embed.")):
        return (-1, 0)
    if name.startswith("ln_final."):
        return (n_layers, 0)
    if name.startswith(("unembed.", "hook_unembed")):
        return (n_layers, 1)
    m = _BLOCK_RE.match(name)
    if not m:
        raise ValueError(f"cannot place hook {name!r} in the forward pass")
    layer, rest = int(m.group(1)), m.group(2)
    if rest in ("hook_resid_post", "hook_out"):
        return (layer + 1, 0)
    for prefix, stage in sorted(_STAGES.items(), key=lambda kv: -len(kv[0])):
        if rest == prefix or rest.startswith(prefix + "."):
            return (layer, stage)
    raise ValueError(f"cannot place hook {name!r} in the forward pass")


def hook_layer(name: str) -> int | None:
    """The block index a ``blocks.L.*`` hook belongs to, else None."""
    m = _BLOCK_RE.match(name)
    return int(m.group(1)) if m else None
