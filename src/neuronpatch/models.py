"""Loading models: Hugging Face causal decoders, offline, cached per process.

A model is the HF ``AutoModelForCausalLM`` itself, run by its own code, plus
its tokenizer and an :class:`~neuronpatch.architecture.Architecture` that says
which of its modules hold each site. Names resolve, in order, to the embedded
``neuronpatch-demo`` model, a local directory, a TransformerLens model name or
alias (``gpt2``, ``pythia-70m``) mapped to its HF id, and an HF id already in
the local cache. Nothing here touches the network.

Only causal decoders are served: an encoder (BERT) or an encoder-decoder is
refused at load, by name, because patching assumes that no position sees a
later one. State-space and hybrid decoders are causal and load; what their
forward or cache cannot do exactly is refused by name (see ``architecture``).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuronpatch.errors import ModelLoadError

if TYPE_CHECKING:  # (torch loads with the first model, not with this module: the result
    # cache resolves model paths without it)
    from neuronpatch.architecture import Architecture

DEMO_MODEL = "neuronpatch-demo"
DEMO_MODEL_DIR = Path(__file__).parent / "demo" / "model"
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")

_CACHE: dict[tuple[str, str, str], LoadedModel] = {}
_LOCK = threading.Lock()
# How many times a model was actually loaded; tests and the plugin check "one load".
load_count = 0

# Model types whose attention is not causal. (State-space, recurrent and hybrid decoders are
# causal: they load, and what their forward or cache cannot do exactly is refused by name at
# load, see ``architecture.check_batching``.)
_NOT_CAUSAL_DECODERS = ("bert", "roberta", "modernbert", "deberta", "electra", "albert", "distilbert",
                        "xlm-roberta", "camembert")


@dataclass
class LoadedModel:
    """A causal decoder ready for patching."""

    hf: Any  # transformers.PreTrainedModel
    tokenizer: Any
    arch: Architecture
    name: str
    path: Path
    device: Any  # torch.device
    dtype: Any  # torch.dtype

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers

    @property
    def d_model(self) -> int:
        return int(self.hf.get_input_embeddings().weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.hf.get_output_embeddings().weight.shape[0])

    @property
    def n_ctx(self) -> int | None:
        cfg = self.hf.config
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
            v = getattr(cfg, key, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    def unit_width(self, mlp: bool) -> int:
        """Width of the MLP's neurons (``mlp``) or of the residual stream."""
        if self.arch.batch_refused:
            raise ModelLoadError(f"{self.arch.name}: refused: {self.arch.batch_refused}")
        if not mlp:
            return self.d_model
        proj = next((m for m in self.arch.mlp_out_proj if m is not None), None)
        if proj is None:
            why = next(iter(self.arch.refused_at.values()), None) or self.arch.refused.get("mlp_post")
            raise ModelLoadError(f"{self.arch.name}: " + (
                f"MLP neurons are refused: {why}" if why else
                "no MLP output projection found: this model has no MLP neurons (layer_type post/pre); "
                "residual units (resid_pre, resid_post) are served"))
        w: Any = proj.weight
        # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
        return int(w.shape[0] if type(proj).__name__ == "Conv1D" else w.shape[1])


def _go_offline() -> None:
    # Must happen before transformers/huggingface_hub read their settings.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def resolve_model_path(name: str | os.PathLike[str]) -> Path:
    """Find a model locally: the embedded demo, a directory, or the HF cache.

    TransformerLens names and aliases (``gpt2-small``, ``pythia-70m``) are mapped
    to their HF ids first.

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
    tried = [f"local directory {path}"]
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {path} has no config.json")
        return path.resolve()
    _go_offline()
    candidates = []
    official = _official_name(text)
    if official is not None:
        candidates.append(official)
        tried.append(f"TransformerLens name {text!r} → {official!r}")
    if text not in candidates:
        candidates.append(text)
    from huggingface_hub import snapshot_download

    for repo in candidates:
        try:
            return Path(snapshot_download(repo_id=repo, local_files_only=True))
        except Exception:  # any failure here means "not available offline"
            tried.append(f"HF cache {repo!r}")
    raise ModelLoadError(f"model {text!r} not found (neuronpatch never downloads); tried: "
                         + "; ".join(tried) + f"; and the embedded {DEMO_MODEL!r}")


def _official_name(name: str) -> str | None:
    try:
        from transformer_lens.supported_models import get_official_model_name

        return str(get_official_model_name(name))
    except Exception:
        return None


def resolve_device(device: str = "auto") -> Any:
    """``"auto"`` is CUDA when available, else CPU; anything else as torch reads it."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"device {device!r} is invalid; expected auto, cpu, cuda or cuda:N") from e


def resolve_dtype(dtype: str = "float32") -> Any:
    import torch

    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is invalid; expected one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def load_model(
    name: str | os.PathLike[str] = DEMO_MODEL,
    *,
    device: str = "auto",
    dtype: str = "float32",
) -> LoadedModel:
    """Load (once per process) a causal decoder and describe its sites.

    Args:
        name: ``"neuronpatch-demo"``, a local directory, a TransformerLens name, or
            an HF id present in the local cache.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:0"``...
        dtype: ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``.

    Returns:
        The :class:`LoadedModel`, in eval mode; the same object for the same arguments.

    Raises:
        ModelLoadError: not found locally, not a causal decoder, or not described
            by TransformerLens; the message names the model.

    Example:
        >>> model = load_model("neuronpatch-demo", device="cpu")   # doctest: +SKIP
        >>> model.n_layers                                          # doctest: +SKIP
        4
    """
    global load_count
    path = resolve_model_path(name)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    key = (str(path), str(dev), dtype)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        _go_offline()
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        from neuronpatch.architecture import describe, verify

        try:
            config = AutoConfig.from_pretrained(path)
        except Exception as e:
            raise ModelLoadError(
                f"could not read the config of model {os.fspath(name)!r} at {path}: {e}") from e
        _refuse_non_causal(config, os.fspath(name))
        bar_was_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bar in CLI output
        try:
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise ModelLoadError(f"could not load model {os.fspath(name)!r} from {path}: {e}") from e
        finally:
            if bar_was_on:
                hf_logging.enable_progress_bar()
        hf.to(dev).eval()
        for p in hf.parameters():
            p.requires_grad_(False)
        arch = describe(hf)
        verify(hf, arch)  # sites that disagree with HF's own outputs are refused by name
        model = LoadedModel(hf=hf, tokenizer=tokenizer, arch=arch, name=os.fspath(name), path=path,
                            device=dev, dtype=dt)
        _CACHE[key] = model
        load_count += 1
        return model


def is_loaded(name: str | os.PathLike[str] = DEMO_MODEL, *, device: str = "auto",
              dtype: str = "float32") -> bool:
    """Whether :func:`load_model` would return a model it already holds (no loading).

    Example:
        >>> is_loaded("neuronpatch-demo", device="cpu")   # doctest: +SKIP
        False
    """
    try:
        key = (str(resolve_model_path(name)), str(resolve_device(device)), dtype)
    except ModelLoadError:
        return False
    with _LOCK:
        return key in _CACHE


def _refuse_non_causal(config: Any, name: str) -> None:
    mt = str(getattr(config, "model_type", ""))
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(f"model {name!r} ({mt}) is an encoder-decoder; neuronpatch patches "
                             "causal decoders only")
    if mt in _NOT_CAUSAL_DECODERS or mt.endswith("bert"):
        raise ModelLoadError(f"model {name!r} is a {mt} model, which is not a causal attention decoder "
                             "(bidirectional); neuronpatch patches causal decoders only")


def clear_cache() -> None:
    """Forget every loaded model (tests use this to count loads)."""
    with _LOCK:
        _CACHE.clear()
