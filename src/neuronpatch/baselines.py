"""Golden files for CI: a probe's measured metrics, and how far a new run drifted.

A baseline is a small JSON file, sorted and indented so a code review can read
its diff. Besides the metrics it records the head's content hash and the
versions of neuronpatch, torch and transformer_lens, so a drift report can say
*why* numbers moved: the head changed, the libraries changed, or neither (then
the probe's inputs or interventions did).

Files are written atomically (temp file, then rename): a crash mid-write leaves
the previous baseline intact, and the temporary file a ``kill -9`` leaves behind
is never read or listed as a baseline (:func:`baseline_files`). Files are read
within the bounds of :mod:`neuronpatch.limits`; every problem with one is a
:class:`BaselineError` of one line that names the file and the fix. Nothing
here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from neuronpatch._io import atomic_write_text, is_temporary
from neuronpatch.errors import BaselineError, OutputPathError
from neuronpatch.limits import JSON_DEPTH, JSON_FILE_BYTES, load_json_bounded
from neuronpatch.names import DICTIONARY_FILES

FORMAT = 1
# The metrics a baseline records and compares.
METRICS: tuple[str, ...] = (
    "slope", "intercept", "r_squared", "slope_ci95", "r_squared_ci95", "baseline_correlation",
    "per_input_slope", "per_input_r2", "weight_cosine",
)
# Absolute tolerances when a probe names none. Intervals and per-input values move
# more with small changes than the pooled numbers do.
DEFAULT_TOLERANCE: dict[str, float] = {
    "slope": 0.02, "intercept": 0.02, "r_squared": 0.02, "baseline_correlation": 0.02,
    "weight_cosine": 0.01, "slope_ci95": 0.05, "r_squared_ci95": 0.05,
    "per_input_slope": 0.05, "per_input_r2": 0.05,
}
UPDATE_FLAG = "--neuronpatch-update-baselines"
_DIGITS = 8  # enough for any tolerance; fewer digits keep diffs quiet


def versions() -> dict[str, str]:
    """Installed versions of the packages whose changes can move a number."""
    out = {}
    for name in ("neuronpatch", "torch", "transformer_lens", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def head_hash(head_dir: str | Path) -> str:
    """SHA-256 of a head directory's config.json and weights (file names and bytes).

    A head on a dictionary's latent (``layer_type: sae``) includes the dictionary's
    ``cfg.json`` and weights: a changed dictionary is a changed head.

    Example:
        >>> head_hash("probes/heads/demo_causal")[:7]     # doctest: +SKIP
        'sha256:'
    """
    h = hashlib.sha256()
    root = Path(head_dir)
    for name in ("config.json", "head.pt", "head.safetensors"):
        path = root / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    try:
        cfg = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        cfg = None
    sae = cfg.get("sae") if isinstance(cfg, dict) and cfg.get("layer_type") == "sae" else None
    if isinstance(sae, str) and sae:
        for name in DICTIONARY_FILES:
            path = Path(sae) / name if Path(sae).is_absolute() else root / sae / name
            if path.is_file():
                h.update(b"sae/" + name.encode() + b"\0" + path.read_bytes() + b"\0")
    return "sha256:" + h.hexdigest()


def _clean(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return None if not math.isfinite(f) else round(f, _DIGITS)
    return value


@dataclass(frozen=True)
class Baseline:
    """A baseline file's content."""

    probe: str
    metrics: dict[str, Any]
    head_hash: str
    versions: dict[str, str]
    format: int = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        data = {"format": self.format, "probe": self.probe, "head_hash": self.head_hash,
                "versions": self.versions, "metrics": self.metrics, **self.extra}
        return json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"


def make_baseline(probe: str, metrics: Mapping[str, Any], *, head_dir: str | Path,
                  extra: Mapping[str, Any] | None = None) -> Baseline:
    """Build the baseline of a run from its metrics (only :data:`METRICS` are kept)."""
    kept = {k: _clean(metrics[k]) for k in METRICS if k in metrics}
    return Baseline(probe, kept, head_hash(head_dir), versions(), extra=dict(extra or {}))


def write_baseline(path: str | Path, baseline: Baseline) -> Path:
    """Write atomically: a crash mid-write leaves the previous baseline intact.

    Raises:
        BaselineError: the path cannot be written (a file stands where the
            ``baselines`` directory belongs, or a directory where the file does).
    """
    path = Path(path)
    check_place(path)
    try:
        return atomic_write_text(path, baseline.to_json())
    except OutputPathError as e:
        raise BaselineError(f"cannot write the baseline: {e}") from e


def check_place(path: Path) -> None:
    """Refuse a baseline path under a file (``baselines`` is a file) in one line."""
    for parent in path.parents:
        if parent.is_dir():
            return
        if os.path.lexists(parent):
            raise BaselineError(
                f"{path}: cannot hold a baseline: {parent} is a file, not a directory; move that "
                "file away, or give the probe a baseline.file elsewhere")


def baseline_files(directory: str | Path) -> list[Path]:
    """The baseline files in ``directory``, sorted: ``*.json``, never a crash's temporary file.

    For whatever lists baselines that no probe uses: a temporary file left by a
    killed writer (see :mod:`neuronpatch._io`) is neither a baseline nor a stale one.

    Example:
        >>> baseline_files("probes/baselines")[:1]              # doctest: +SKIP
        [PosixPath('probes/baselines/demo_causal-1f2e3d4c.json')]
    """
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if p.suffix == ".json" and not p.name.startswith(".") and not is_temporary(p)
                  and p.is_file())


def _bad_metric(name: str, value: Any) -> str | None:
    """Why ``value`` cannot be a recorded metric, or None when it can."""
    if isinstance(value, list):
        for v in value:
            why = _bad_metric(name, v)
            if why is not None:
                return why
        return None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"metric {name!r} holds {value!r}"
    if not math.isfinite(value):
        return f"metric {name!r} holds {value!r}"
    return None


def read_baseline(path: str | Path) -> Baseline | None:
    """The baseline at ``path``, or None when there is none.

    The file is read within :data:`neuronpatch.limits.JSON_FILE_BYTES` and
    :data:`~neuronpatch.limits.JSON_DEPTH`; special files and symlink loops are refused.

    Raises:
        BaselineError: the file exists but is not a baseline this version reads
            (one line naming the file and the fix).
    """
    path = Path(path)
    check_place(path)
    if not os.path.lexists(path):
        return None
    fix = f"delete it and regenerate it with {UPDATE_FLAG}"
    try:
        data = load_json_bounded(path, max_bytes=JSON_FILE_BYTES, max_depth=JSON_DEPTH,
                                 what="baseline", error=BaselineError)
    except BaselineError as e:
        raise BaselineError(f"{e}; {fix}") from None
    if not isinstance(data, dict):
        raise BaselineError(f"{path}: not a neuronpatch baseline (a JSON {type(data).__name__}, "
                            f"expected an object with 'format' and 'metrics'); {fix}")
    fmt = data.get("format")
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > FORMAT:
        raise BaselineError(f"{path}: baseline format {fmt} was written by a newer neuronpatch; this "
                            f"version reads format {FORMAT}: upgrade neuronpatch, or regenerate it "
                            f"with {UPDATE_FLAG}")
    if fmt != FORMAT or "metrics" not in data:
        what = "has no 'format' key" if "format" not in data else (
            f"has format {fmt!r}" if fmt != FORMAT else "has no 'metrics' key")
        raise BaselineError(f"{path}: not a neuronpatch baseline of format {FORMAT} ({what}); {fix}")
    metrics = data["metrics"]
    if not isinstance(metrics, dict):
        raise BaselineError(f"{path}: key 'metrics' = {_short(metrics)} is invalid; expected an object "
                            f"of metric values; {fix}")
    for name, value in metrics.items():
        why = _bad_metric(name, value)
        if why is not None:
            raise BaselineError(f"{path}: {why}; a baseline holds finite numbers, or null where a "
                                f"metric is undefined; {fix}")
    vers = data.get("versions", {})
    if not isinstance(vers, dict):
        raise BaselineError(f"{path}: key 'versions' = {_short(vers)} is invalid; expected an object "
                            f"of package versions; {fix}")
    known = {"format", "probe", "head_hash", "versions", "metrics"}
    return Baseline(str(data.get("probe", "")), dict(metrics), str(data.get("head_hash", "")),
                    {str(k): str(v) for k, v in vers.items()}, FORMAT,
                    {k: v for k, v in data.items() if k not in known})


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


@dataclass(frozen=True)
class Drift:
    """One metric compared with its baseline."""

    metric: str
    baseline: Any
    now: Any
    difference: float
    tolerance: float
    ok: bool


def _diff(a: Any, b: Any) -> float:
    """Largest absolute difference; inf when shapes differ or only one side is undefined."""
    if isinstance(a, list) or isinstance(b, list):
        if not (isinstance(a, list) and isinstance(b, list)) or len(a) != len(b):
            return math.inf
        return max((_diff(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return math.inf
    return abs(float(a) - float(b))


def compare(metrics: Mapping[str, Any], baseline: Baseline,
            tolerance: Mapping[str, float] | None = None) -> list[Drift]:
    """Compare a run's metrics with a baseline, metric by metric.

    Args:
        metrics: the run's metrics (``ExperimentResult.metrics()``).
        baseline: what was recorded.
        tolerance: absolute tolerance per metric; missing ones use :data:`DEFAULT_TOLERANCE`.

    Example:
        >>> b = Baseline("p", {"slope": 1.0}, "h", {})
        >>> [d.ok for d in compare({"slope": 1.05}, b, {"slope": 0.1})]
        [True]
    """
    tol = {**DEFAULT_TOLERANCE, **(tolerance or {})}
    out = []
    for name in METRICS:
        if name not in baseline.metrics:
            continue
        now = _clean(metrics.get(name))
        was = baseline.metrics[name]
        d = _diff(now, was)
        out.append(Drift(name, was, now, d, tol[name], d <= tol[name]))
    return out


def _undefined(v: Any) -> bool:
    if isinstance(v, list):
        return any(_undefined(x) for x in v)
    return v is None or (isinstance(v, float) and not math.isfinite(v))


def _show(v: Any) -> str:
    if isinstance(v, list):
        inner = ", ".join(_show(x) for x in v[:4])
        return f"[{inner}{', …' if len(v) > 4 else ''}]"
    return "undefined" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def explain(drifts: Sequence[Drift], baseline: Baseline, *, head_dir: str | Path,
            baseline_path: str | Path, model: str | None = None) -> str:
    """A drift report: the table, the likely cause, and how to accept the new values.

    ``model``: the checkpoint this run used when the probe names one (``model:``); a baseline
    records it, so a change of checkpoint is named as a cause.
    """
    bad = [d for d in drifts if not d.ok]
    rows = [("metric", "baseline", "now", "difference", "tolerance", "")]
    for d in drifts:
        rows.append((d.metric, _show(d.baseline), _show(d.now),
                     "∞" if math.isinf(d.difference) else f"{d.difference:.4g}", f"{d.tolerance:g}",
                     "DRIFT" if not d.ok else "ok"))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines = [f"{len(bad)} metric(s) drifted from the baseline {baseline_path}:"]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    now_hash, now_versions = head_hash(head_dir), versions()
    causes = []
    if baseline.head_hash and baseline.head_hash != now_hash:
        causes.append("the head changed (its config/weights hash differs from the baseline's)")
    then = baseline.extra.get("model")
    if then != model:
        causes.append(f"the model changed (the baseline ran {then or 'the base model'}, this run "
                      f"{model or 'the base model'})")
    changed = [f"{k} {baseline.versions.get(k)} → {v}" for k, v in now_versions.items()
               if baseline.versions.get(k) not in (None, v)]
    if changed:
        causes.append("the library changed (" + ", ".join(changed) + ")")
    undefined = [d for d in bad if _undefined(d.baseline) != _undefined(d.now)]
    for d in undefined:
        side = "in the baseline" if _undefined(d.baseline) else "in this run"
        causes.append(f"{d.metric} is undefined (NaN) {side} only")
    if not causes:
        causes.append("same head and library versions: the probe's inputs or interventions changed")
    lines.append("likely cause: " + "; ".join(causes))
    lines.append(f"to accept the new values, run pytest with {UPDATE_FLAG}")
    return "\n".join(lines)


def suggest_tolerances(activation_change: np.ndarray, prediction_change: np.ndarray,
                       clean_activation: np.ndarray, clean_prediction: np.ndarray, *,
                       n_resamples: int = 500, seed: int = 0, k: float = 3.0) -> dict[str, float]:
    """Tolerances from the metrics' spread when the inputs are resampled.

    The engine is deterministic, so repeated runs on one machine do not move a
    number; what does move them is *which* inputs a probe happens to use. Each
    tolerance is ``k`` times the bootstrap standard deviation of its metric,
    rounded up to one significant digit.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = rng.normal(size=(8, 4)); y = 0.9 * x + rng.normal(0, .1, (8, 4))
        >>> sorted(suggest_tolerances(x, y, x[:, 0], y[:, 0]))
        ['baseline_correlation', 'intercept', 'r_squared', 'slope']
    """
    from neuronpatch.stats import correlation, ols

    x, y = np.atleast_2d(activation_change), np.atleast_2d(prediction_change)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {"slope": [], "intercept": [], "r_squared": [],
                                       "baseline_correlation": []}
    n = x.shape[0]
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        fit = ols(x[idx], y[idx])
        samples["slope"].append(fit.slope)
        samples["intercept"].append(fit.intercept)
        samples["r_squared"].append(fit.r_squared)
        samples["baseline_correlation"].append(correlation(clean_activation[idx],
                                                           clean_prediction[idx]).pearson_r)
    out = {}
    for name, vals in samples.items():
        arr = np.asarray(vals, dtype=float)
        arr = arr[np.isfinite(arr)]
        sd = float(arr.std()) if arr.size > 1 else 0.0
        out[name] = _round_up(max(k * sd, 1e-4))
    return out


def _round_up(x: float) -> float:
    exp = math.floor(math.log10(x))
    step = 10.0 ** exp
    return round(math.ceil(x / step) * step, max(0, -exp))
