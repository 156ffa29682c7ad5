"""Unit types: the seed's ``layer_type`` names and the site each one lives at.

A *unit* is what gets patched: one MLP neuron (``post``, ``pre``) or one
dimension of a tensor the residual stream carries (``mlp_out``, ``attn_out``,
``resid_pre``, ``resid_post``), or one latent of a dictionary (``sae``: a sparse
autoencoder or transcoder, whose file names its own sites; see
:mod:`neuronpatch.dictionaries`), or one neuron of one expert of a
mixture-of-experts block (``expert_post``, ``expert_pre`` with ``target_expert``),
or the logit such a block's router gives one expert (``router``, ``target_neuron``
the expert; see :mod:`neuronpatch.experts`). See :mod:`neuronpatch.architecture` for sites.

Example:
    >>> UNIT_SITES["mlp_out"], UNIT_SITES["post"]
    ('mlp_write', 'mlp_post')
"""

from __future__ import annotations

from typing import Final

# layer_type (the seed's config key) → site kind in the model.
UNIT_SITES: Final[dict[str, str]] = {
    "post": "mlp_post",
    "mlp_post": "mlp_post",
    "pre": "mlp_pre",
    "mlp_pre": "mlp_pre",
    "mlp_out": "mlp_write",
    "attn_out": "attn_write",
    "resid_pre": "block_in",
    "resid_post": "block_out",
}
# layer_type of a dictionary's latents: the dictionary (``sae: PATH``) names the sites.
DICTIONARY: Final[str] = "sae"
# layer_type of an expert's neurons (``target_expert: e``) → whether it is the pre-activation.
EXPERT_TYPES: Final[dict[str, bool]] = {"expert_post": False, "expert_pre": True}
# layer_type of a mixture-of-experts router's logits (target_neuron: the expert).
ROUTER: Final[str] = "router"
# Every layer_type a head may name.
LAYER_TYPES: Final[tuple[str, ...]] = (*UNIT_SITES, DICTIONARY, *EXPERT_TYPES, ROUTER)
# Units that belong to one set of their own (a dictionary, an expert, a router): controls and
# ranking stay within the head's own set.
OWN_SET_TYPES: Final[frozenset[str]] = frozenset({DICTIONARY, *EXPERT_TYPES, ROUTER})
# Units that live in the MLP's hidden layer (width d_mlp); the rest are d_model wide.
MLP_HIDDEN_TYPES: Final[frozenset[str]] = frozenset({"post", "mlp_post", "pre", "mlp_pre"})
# Sites that are residual-stream coordinates (centred in transformer_lens coordinates of
# LayerNorm models).
RESIDUAL_SITES: Final[frozenset[str]] = frozenset(
    {"block_in", "block_out", "attn_write", "mlp_write", "final_norm"})
