"""The patching engine: does a prediction head *use* the unit it predicts?

Activation patching answers a causal question that correlation cannot. For
each input we record the unit's clean activation ``a`` and the head's clean
prediction ``p``; then we overwrite the unit (``a ↦ α·a + β``: scale, set, zero,
add or mean-ablate) at the patched position, let the change flow through the
rest of the model up to where the head reads its features, and record the new
prediction ``p'``. If the head reads the unit, ``p' − p`` follows ``a' − a``.

Every number comes from the model's own forward (its own attention, positions,
norms and cache); the engine only reads and edits tensors at the sites of
:mod:`neuronpatch.architecture`, and turns them into the head's coordinates
with the identities of :mod:`neuronpatch.coordinates`. Routes, cheapest first:

``upstream``  the head reads before the unit: nothing can change, so the slope
              is exactly 0 (checked once with a real patched run);
``linear``    the head reads the residual stream right after the unit, at the
              patched position: patched features are the clean ones plus
              ``Δa`` times the unit's write direction (checked once against a
              real patched run; on a mismatch the engine steps aside to ``kv``);
``kv``        one clean forward over every input keeps the model's own KV cache (cut back
              to the tokens before the patch) and the patched tokens' hidden states below
              the unit's block; the rows run only the positions from the patch to the
              read position, from the unit's block on (an MLP neuron's: from the block
              above, with the neuron's write added), side by side in one sequence per
              input over its shared cache (or, where a model does not allow that, with
              the cache repeated per row);
``full``      every row, every position, from the start (the reference, and
              what ``position: all`` needs).

``kv`` is refused by name where the model's own cache cannot continue a left-padded
prefix once repeated per row (state-space and hybrid decoders today; checked at load,
see :func:`neuronpatch.architecture.check_batching`); ``full`` serves them. In a
mixture-of-experts model every block routes whatever reaches it, so a patch that
changes a later layer's expert choice keeps the model's own routing; ``kv`` and
``full`` read each such layer's choice (the ``route`` site) and a note says how many
patched rows changed it.

In ``kv`` and ``full``, an input's rows are identical below the unit's block,
so those blocks run once per input and the rows multiply at the unit's block
(:class:`Growth`; the cache is repeated only from there on). In ``kv`` the prefix
pass runs the patched tokens too, clean, so the rows enter at the unit's block and
the blocks below it never run for them (:class:`Entry`); it stops in the last block the
rows read as soon as that block has stored its keys and values, since its attention
output and MLP there would only be thrown away. Rows of an MLP neuron (in
float32 or float64) enter above it: an MLP is per token and its output projection is
linear, so the patched block's output is its clean output plus the change times the
projection's own response to a step of the neuron (:func:`mlp_writes`), and the unit's
block never runs for them either. Whether a model's blocks take a grown batch, an
entered one, and one entered above the unit's block, is checked once per model, block
and feature site against ungrown rows; where it does not hold (a norm after the MLP, a
scaled residual add), the rows run from the unit's block, or every block.

The package, in the order data flows through it:

``_inputs``   texts to token rows and positions (:func:`encode`), left padding;
``_forward``  :func:`forward`, the one call into the model (hooks at sites for one
              pass, stopped once everything is read), and :func:`run_rows`, the
              patched run over a :class:`Batch` that returns a :class:`Capture`;
``_rows``     batches built two ways: from the start (:func:`full_rows`) or over a
              prefix cache (:func:`kv_rows`);
``_growth``   whether rows may multiply at the unit's block (:func:`growth`), checked
              within :mod:`neuronpatch.tolerance`, as every shortcut is;
``_routes``   :func:`choose_route`, :func:`measure` under a :class:`Budget`, the
              write directions of the ``linear`` route and its check;
``_precision`` how far the dtype's rounding moves a prediction change
              (:func:`measure_rounding`: a float32 re-run of a few inputs in bfloat16
              and float16, under :func:`float32_weights`);
``_api``      :func:`run_experiment` and :func:`collect`.

Coordinates (centring, the δ/d_model offset) are the :class:`~neuronpatch.coordinates.Plan`'s
methods; the engine calls them and never centres a tensor itself.

Inputs are left-padded with explicit ``position_ids`` and an attention mask,
so a batch gives the numbers each input gives alone. Hooks live only inside
one call. Everything is deterministic.
"""

from neuronpatch.engine._api import (
    SILENT,
    Method,
    check_batch_size,
    collect,
    progress_bar,
    run_experiment,
)
from neuronpatch.engine._forward import (
    PATCH_RTOL,
    Along,
    Batch,
    Capture,
    Entry,
    Growth,
    Stop,
    Tap,
    Targets,
    forward,
    forward_kwargs,
    last_block,
    mlp_writes,
    repeat_cache,
    run_rows,
)
from neuronpatch.engine._growth import growth
from neuronpatch.engine._inputs import (
    DEFAULT_INPUTS,
    Encoded,
    chunks,
    encode,
    left_pad,
    pad_id,
    short,
    tokenize,
)
from neuronpatch.engine._precision import (
    INPUTS_PER_RERUN,
    dtype_name,
    float32_weights,
    inputs_to_rerun,
    measure_rounding,
    weights_in,
)
from neuronpatch.engine._routes import (
    KV_CACHE_BYTES,
    METHODS,
    Budget,
    Measured,
    Route,
    check_shortcut,
    choose_route,
    direction_writes,
    kv_cache_budget,
    measure,
    patched_rows,
    write_directions,
)
from neuronpatch.engine._rows import (
    Prefix,
    entry_cache,
    folded_mask,
    full_rows,
    kv_rows,
    layer_rows,
    prefix_cache,
    routed_only,
    unrouted_note,
)

__all__ = [
    "DEFAULT_INPUTS",
    "INPUTS_PER_RERUN",
    "KV_CACHE_BYTES",
    "METHODS",
    "PATCH_RTOL",
    "SILENT",
    "Along",
    "Batch",
    "Budget",
    "Capture",
    "Encoded",
    "Entry",
    "Growth",
    "Measured",
    "Method",
    "Prefix",
    "Route",
    "Stop",
    "Tap",
    "Targets",
    "check_batch_size",
    "check_shortcut",
    "choose_route",
    "chunks",
    "collect",
    "direction_writes",
    "dtype_name",
    "encode",
    "entry_cache",
    "float32_weights",
    "folded_mask",
    "forward",
    "forward_kwargs",
    "full_rows",
    "growth",
    "inputs_to_rerun",
    "kv_cache_budget",
    "kv_rows",
    "last_block",
    "layer_rows",
    "left_pad",
    "measure",
    "measure_rounding",
    "mlp_writes",
    "pad_id",
    "patched_rows",
    "prefix_cache",
    "progress_bar",
    "repeat_cache",
    "routed_only",
    "run_experiment",
    "run_rows",
    "short",
    "tokenize",
    "unrouted_note",
    "weights_in",
    "write_directions",
]
