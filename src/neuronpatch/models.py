"""Loading models: TransformerLens bridges over HF checkpoints, offline, cached.

``load_model`` boots a TransformerLens 4 ``TransformerBridge`` and switches on
compatibility mode for the classic hook names (``blocks.L.mlp.hook_post``...).
By default no weight processing is applied (no LayerNorm folding, no
centring), so residual-stream values are HF's own ``output_hidden_states``:
the coordinates prediction heads are trained in. A head config may opt into
TransformerLens coordinates with ``"weight_processing": "transformer_lens"``.

Nothing here touches the network: HF offline mode is switched on before
transformers is imported, and names resolve to a local directory, a snapshot
already in the local HF cache, or the embedded ``neuronpatch-demo`` model.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from neuronpatch.errors import ModelLoadError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

DEMO_MODEL = "neuronpatch-demo"
DEMO_MODEL_DIR = Path(__file__).parent / "demo" / "model"
WeightProcessing = Literal["none", "transformer_lens"]
WEIGHT_PROCESSING: tuple[str, ...] = ("none", "transformer_lens")

_CACHE: dict[tuple[str, str, str], Any] = {}
_LOCK = threading.Lock()
# How many times a model was actually booted; tests and the plugin check "one load".
load_count = 0


def _go_offline() -> None:
    # Must happen before transformers/huggingface_hub read their settings.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def resolve_model_path(name: str | os.PathLike[str]) -> Path:
    """Find a model locally: a directory, the embedded demo, or the HF cache.

    Raises:
        ModelLoadError: nothing local matches; the message lists what was tried.

    Example:
        >>> resolve_model_path("neuronpatch-demo").name
        'model'
    """
    text = os.fspath(name)
    if text == DEMO_MODEL:
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise ModelLoadError(f"the embedded model {DEMO_MODEL!r} is missing from {DEMO_MODEL_DIR}")
        return DEMO_MODEL_DIR
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {path} has no config.json")
        return path.resolve()
    _go_offline()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=text, local_files_only=True))
    except Exception as e:  # any failure here means "not available offline"
        raise ModelLoadError(
            f"model {text!r} not found: it is not a local directory, not {DEMO_MODEL!r}, "
            "and not in the local Hugging Face cache (neuronpatch never downloads)"
        ) from e


def load_model(
    name: str | os.PathLike[str] = DEMO_MODEL,
    *,
    device: str = "cpu",
    weight_processing: str = "none",
) -> TransformerBridge:
    """Boot (once per process) a TransformerBridge in compatibility mode.

    Args:
        name: local directory, HF id present in the local cache, or ``"neuronpatch-demo"``.
        device: torch device string.
        weight_processing: ``"none"`` (HF coordinates) or ``"transformer_lens"``.

    Returns:
        The bridge, in eval mode. The same object for the same arguments.

    Example:
        >>> model = load_model("neuronpatch-demo")       # doctest: +SKIP
        >>> model.cfg.n_layers                            # doctest: +SKIP
        4
    """
    global load_count
    if weight_processing not in WEIGHT_PROCESSING:
        raise ModelLoadError(
            f"weight_processing {weight_processing!r} is unknown; expected one of "
            f"{', '.join(WEIGHT_PROCESSING)}"
        )
    path = resolve_model_path(name)
    key = (str(path), device, weight_processing)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        _go_offline()
        from transformer_lens.model_bridge import TransformerBridge
        from transformers.utils import logging as hf_logging

        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar in CLI output
        try:
            bridge = TransformerBridge.boot_transformers(str(path), device=device)
            bridge.enable_compatibility_mode(no_processing=weight_processing == "none")
        except Exception as e:
            raise ModelLoadError(f"could not boot model {os.fspath(name)!r} from {path}: {e}") from e
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        bridge.eval()
        for p in bridge.parameters():
            p.requires_grad_(False)
        _CACHE[key] = bridge
        load_count += 1
        return bridge


def clear_cache() -> None:
    """Forget every loaded model (tests use this to count loads)."""
    with _LOCK:
        _CACHE.clear()
