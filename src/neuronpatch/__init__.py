"""neuronpatch: a causal test harness for neuron-prediction heads.

Importing the package is cheap: the engine (and torch) load on first use of
``load_head``, ``load_model`` or ``run_experiment``.

Example:
    >>> from neuronpatch import run_experiment                  # doctest: +SKIP
    >>> res = run_experiment("probes/heads/demo_causal", set=[0, 1, 2, 4])
    >>> res.slope, res.r_squared, res.baseline_correlation
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from neuronpatch.errors import NeuronpatchError
from neuronpatch.interventions import Intervention

__version__ = "0.1.0"

__all__ = [
    "ExperimentResult",
    "Head",
    "Intervention",
    "NeuronpatchError",
    "RankResult",
    "__version__",
    "load_head",
    "load_model",
    "rank_units",
    "run_experiment",
]

if TYPE_CHECKING:
    from neuronpatch.engine import run_experiment
    from neuronpatch.heads import Head, load_head
    from neuronpatch.models import load_model
    from neuronpatch.rank import RankResult, rank_units
    from neuronpatch.result import ExperimentResult

# Public names that need torch live in modules imported on first access (PEP 562),
# so `import neuronpatch` (and the pytest plugin) stay light.
_LAZY = {
    "run_experiment": "neuronpatch.engine",
    "rank_units": "neuronpatch.rank",
    "RankResult": "neuronpatch.rank",
    "Head": "neuronpatch.heads",
    "load_head": "neuronpatch.heads",
    "load_model": "neuronpatch.models",
    "ExperimentResult": "neuronpatch.result",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'neuronpatch' has no attribute {name!r}")
