"""Names shared across the package: file suffixes, figure and marker file names, safe file names.

One place for what several modules must spell alike. It imports only the standard
library, so the pytest plugin can use it without loading anything heavy.

Example:
    >>> safe_filename("probes/a.probe.yaml::tracks [x]", limit=120, mark_changed=True)
    'probes_a.probe.yaml_tracks_x-314f0d5f'
    >>> safe_filename("tracks[demo_causal]", limit=100)
    'tracks_demo_causal'
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

# A dictionary directory (SAELens' layout): its config, then its weights.
DICTIONARY_FILES: Final[tuple[str, str]] = ("cfg.json", "sae_weights.safetensors")

# A probe file is a file whose name ends in one of these.
PROBE_SUFFIXES: Final[tuple[str, ...]] = (".probe.yaml", ".probe.yml")

# The seed notebook's five figures, as neuronpatch.plots draws and names them.
FIGURES: Final[tuple[str, ...]] = (
    "baseline_correlation.png",
    "scaling_experiment.png",
    "pred_vs_act_change_all.png",
    "pred_vs_act_regression.png",
    "per_input_sensitivity.png",
)
# Drawn beside FIGURES when a result has negative controls.
CONTROLS_FIGURE: Final = "controls.png"
ALL_FIGURES: Final[tuple[str, ...]] = (*FIGURES, CONTROLS_FIGURE)

# The file that says a directory is a neuronpatch result cache.
CACHE_MARKER: Final = "neuronpatch-cache.json"

# Dtypes whose rounding the engine bounds by a measured constant (stats.FLOAT32_ROW_RTOL);
# the others (bfloat16, float16) are reduced precisions, measured by a float32 re-run, whose
# error every reading states.
FULL_PRECISION: Final[tuple[str, ...]] = ("float32", "float64")

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_filename(name: str, *, limit: int, mark_changed: bool = False) -> str:
    """``name`` as one file name: every run of other characters than ``A-Za-z0-9._-`` is
    ``_``, leading and trailing dots and underscores are dropped, and a name cut to
    ``limit`` characters ends in ``-`` and 8 hex digits of its SHA-1, so two long names stay
    apart. ``mark_changed`` adds that digest to every name the sanitising changed too, so
    two names that sanitise alike (``a b`` and ``a_b``) stay apart as well.
    """
    safe = _UNSAFE.sub("_", name).strip("._") or "probe"
    if len(safe) <= limit and (safe == name or not mark_changed):
        return safe
    return f"{safe[:limit]}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:8]}"
