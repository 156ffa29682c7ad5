"""How close two computations of the same numbers must be: one rule for every check.

Two routes, two batch shapes or two thread counts compute the same numbers with their
matrix products split differently, so they round differently. Every check in neuronpatch
compares such numbers within a tolerance relative to the scale of what it compares,
never bit for bit; a wrong shortcut, site or layout is off by far more.
"""

from __future__ import annotations

from typing import Any

import torch

# How far a shortcut (a route, grown rows, a site read another way) may be from the real
# computation, relative to the scale. Float32 rounding between batch shapes and thread
# counts is ~1e-6 of the scale.
CHECK_RTOL = 1e-4


def check_rtol(dtype: torch.dtype) -> float:
    """:data:`CHECK_RTOL`, widened to four of ``dtype``'s epsilons in reduced precision.

    Another batch shape rounds every matrix product differently; in bfloat16 that moves
    the features of a 12-layer gpt2-small by 6e-3 of their scale (measured), against 5e-7
    in float32.
    """
    return max(CHECK_RTOL, 4 * torch.finfo(dtype).eps)


def agree(want: Any, have: Any, rtol: float = CHECK_RTOL) -> float | None:
    """The largest difference of ``have`` from ``want``, or None when it is within ``rtol``
    of the scale (``want``'s largest magnitude, plus one)."""
    scale = float(want.abs().max()) + 1.0
    err = float((want - have).abs().max())
    return None if err <= rtol * scale else err


def close(want: Any, have: Any, rtol: float = CHECK_RTOL) -> bool:
    """Whether ``have`` has ``want``'s shape and :func:`agree`\\ s with it."""
    return tuple(want.shape) == tuple(have.shape) and agree(want, have, rtol) is None
