"""Build tiny models and head artifacts for tests, offline.

No model hub is reachable from CI, so tests (ours and users') make a random
GPT-2 of a few thousand parameters in a temp dir and write heads for it in the
same artifact format that trained heads use.

Example:
    >>> from neuronpatch.testing import tiny_gpt2, write_head   # doctest: +SKIP
    >>> model_dir = tiny_gpt2(tmp_path / "model")
    >>> head_dir = write_head(tmp_path / "head", model_dir, target_layer=0,
    ...                       target_neuron=3, feature_layer=1)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

_TOKENIZER_TEXT = (
    "The cat sat on the mat. Machine learning models can be difficult to interpret. "
    "Transformers use attention mechanisms to process sequences. The quick brown fox "
    "jumps over the lazy dog. Numbers 0 1 2 3 4 5 6 7 8 9 and 10 20 30 appear here. "
)


# The architecture matrix: every family the engine is checked on against plain HF hooks
# (tests/engine/test_architectures.py) and measured on in reduced precision and on a GPU.
ARCHITECTURES: tuple[str, ...] = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma",
                                  "gemma2", "opt", "gptj", "phi", "phi3", "bloom", "gpt_bigcode")
# Head kinds whose rounding error is measured over the matrix (write_head keyword arguments):
# the final state, right after the unit's block, an MLP head on a residual unit, a token head.
PRECISION_HEADS: dict[str, dict[str, Any]] = {
    "final-post": dict(target_layer=1, layer_type="post", feature_layer=-1),
    "after-post": dict(target_layer=1, layer_type="post", feature_layer=1),
    "resid-silu": dict(target_layer=0, layer_type="resid_post", feature_layer=-1, hidden_dim=5,
                       head_config={"activation": "silu"}),
    "token": dict(target_layer=1, layer_type="post", head_type="token", activation_mean=0.3,
                  activation_std=0.8),
}


def tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer (digits are single tokens).

    The same recipe as the demo model's tokenizer, on a few sentences.
    """
    from neuronpatch.demo.train_model import train_tokenizer

    tok: PreTrainedTokenizerFast = train_tokenizer([_TOKENIZER_TEXT] * 4, vocab_size=vocab_size)
    return tok


def tiny_gpt2(
    path: str | Path,
    *,
    n_layer: int = 3,
    n_embd: int = 32,
    n_head: int = 4,
    n_inner: int | None = 64,
    n_positions: int = 128,
    seed: int = 0,
    config: GPT2Config | None = None,
) -> Path:
    """Write a random GPT-2 and its tokenizer to ``path``; return the path.

    Weights are drawn with a larger-than-default std so that activations vary
    visibly between inputs (a freshly initialised GPT-2 is nearly constant).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    cfg = config or GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_inner=n_inner,
        n_positions=n_positions, vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# Small sizes every architecture accepts, by the config's own attribute names. Sizes that
# only some families have (experts, MLA ranks, state-space and linear-attention widths, an
# attention indexer) are here too: a config keeps its default wherever it has no such name.
_TINY: dict[str, int] = dict(
    hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=64, max_position_embeddings=128, head_dim=8,
    n_inner=64, ffn_dim=64, ffn_hidden_size=64, rotary_dim=4, word_embed_proj_dim=32,
    # mixture of experts: 4 experts, 2 per token, narrow experts, one dense layer first
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2,
    moe_intermediate_size=16, shared_expert_intermediate_size=32, moe_shared_expert_intermediate_size=32,
    shared_intermediate_size=32, n_shared_experts=1, n_group=1, topk_group=1, first_k_dense_replace=1,
    num_dense_layers=1, moe_layer_freq=1, decoder_sparse_step=1,
    # multi-head latent attention (DeepSeek-V2/V3 and their kin)
    q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
    o_lora_rank=16, o_groups=2, index_head_dim=8, index_n_heads=2,
    # state-space mixers: inner width expand × hidden = 64 = heads × head width
    state_size=8, time_step_rank=4, mamba_d_state=8, mamba_n_heads=4, mamba_d_head=16, mamba_dt_rank=4,
    mamba_d_ssm=64, mamba_chunk_size=16, chunk_size=16, ssm_state_size=8, mamba_num_heads=4,
    mamba_head_dim=16, n_groups=1, mamba_n_groups=1,
    # linear attention (gated delta rule)
    linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
    # per-layer inputs and recurrent widths
    hidden_size_per_layer_input=8, lru_width=32, global_head_dim=8,
)
# Config attributes that list one entry per layer: kept to the tiny model's depth, with
# every kind the default list has (a hybrid keeps attention and mixer layers).
_PER_LAYER = ("layer_types", "layers_block_type", "block_types", "attention_layers")
# Families whose block pattern comes from other keys than a per-layer list.
_PATTERN: dict[str, dict[str, Any]] = {
    # attention at layer 1, experts at layer 1 (layers 0 and 2: Mamba mixer and dense MLP)
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "bamba": dict(attn_layer_indices=[1]),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1], [["global"], 1]]),
    "mamba2": dict(num_heads=8, head_dim=8),
    "gemma4_text": dict(num_kv_shared_layers=0),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv"]),  # its default is None
    "granitemoehybrid": dict(layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "zamba2": dict(hybrid_layer_ids=[1]),  # the shared transformer block's place, kept by hand
}


def _per_layer(values: list[Any], n: int) -> list[Any]:
    kinds = list(dict.fromkeys(map(str, values)))
    by_name = {str(v): v for v in values}
    if len(kinds) == 1 or len(values) <= n:
        return list(values[:n])
    return [by_name[kinds[i % len(kinds)]] for i in range(n)]


def tiny_config(model_type: str, tokenizer: Any = None) -> Any:
    """The config :func:`tiny_model` builds: tiny sizes set through each config's own names.

    Sizes go through the config class's constructor, so that attributes it derives
    (a ``head_dim`` property, a block pattern, a validated per-layer list) follow them.
    A config that wraps a text decoder (``text_config``) gets a tiny text decoder.
    """
    from transformers import AutoConfig

    tokenizer = tokenizer if tokenizer is not None else tiny_tokenizer()
    default = AutoConfig.for_model(model_type)
    if "text_config" in (getattr(type(default), "sub_configs", None) or {}):
        text = default.get_text_config()
        return type(default)(text_config=_tiny(text, str(text.model_type), tokenizer))  # type: ignore[call-arg]
    return _tiny(default, model_type, tokenizer)


def _tiny(default: Any, model_type: str, tokenizer: Any) -> Any:
    cls = type(default)
    n = _TINY["num_hidden_layers"]
    aliases = dict(getattr(cls, "attribute_map", {}) or {})
    names = set(default.to_dict()) | set(aliases)

    def settable_name(k: str) -> bool:
        prop = getattr(cls, aliases.get(k, k), None)
        return not isinstance(prop, property) or prop.fset is not None

    settable = {k for k in names if settable_name(k)}
    kw: dict[str, Any] = {k: v for k, v in _TINY.items() if k in settable}
    if "qk_rope_head_dim" in kw and "head_dim" in kw:
        kw["head_dim"] = kw["qk_rope_head_dim"]  # latent attention: head_dim is the rotary part
    if "kv_lora_rank" in kw and "num_key_value_heads" in kw:
        kw["num_key_value_heads"] = kw["num_attention_heads"]  # one latent, expanded per head
    kw["vocab_size"] = len(tokenizer)
    if "vocab_size_per_layer_input" in settable:
        kw["vocab_size_per_layer_input"] = len(tokenizer)
    kw.update(_PATTERN.get(model_type, {}))
    for key in _PER_LAYER:
        values = getattr(default, key, None)
        same = {key, aliases.get(key)} | {a for a, t in aliases.items() if t == key}
        if key in settable and isinstance(values, list) and values and not same & set(kw):
            kw[key] = _per_layer(values, n)
    if getattr(default, "sliding_window", None) is not None:
        kw["sliding_window"] = 5
    kw["bos_token_id"], kw["eos_token_id"] = tokenizer.bos_token_id, tokenizer.eos_token_id
    if "pad_token_id" in names:
        kw["pad_token_id"] = tokenizer.eos_token_id
    return cls(**kw)


def tiny_model(path: str | Path, model_type: str, *, seed: int = 0, std: float = 0.3) -> Path:
    """Write a tiny random causal LM of any HF architecture, with every parameter random.

    Norm gains and biases are random too (gain ``1 + N(0, std)``, bias ``N(0, std)``):
    default initialisation (gain 1, bias 0) hides code that drops them. Grouped-query
    attention (2 KV heads for 4 query heads) and a short sliding window are used where
    the architecture has them.

    Example:
        >>> tiny_model(tmp_path / "llama", "llama")   # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    cfg = tiny_config(model_type, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            is_norm = "norm" in name.lower() or "ln" in name.lower().split(".")[-2:][0]
            p.copy_(1.0 + noise if (is_norm and name.endswith("weight") and p.dim() == 1) else noise)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_head(
    path: str | Path,
    base_model: str | Path,
    *,
    target_layer: int,
    target_neuron: int,
    feature_layer: int = -1,
    layer_type: str = "post",
    head_type: str = "regression",
    state_dict: Mapping[str, torch.Tensor] | None = None,
    d_model: int | None = None,
    hidden_dim: int | None = None,
    n_classes: int | None = None,
    seed: int = 0,
    fmt: str = "pt",
    **extra: Any,
) -> Path:
    """Write a head artifact (config.json + head.pt or head.safetensors).

    Without ``state_dict`` the weights are random (seeded): a linear head, or
    hidden → GELU → output when ``hidden_dim`` is given. Extra keyword
    arguments go into config.json as they are (``bin_edges``, ``token_pos``...).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if d_model is None:
        mcfg = json.loads((Path(base_model) / "config.json").read_text())
        d_model = int(mcfg.get("n_embd") or mcfg.get("hidden_size") or mcfg["d_model"])
    out_dim = n_classes if head_type == "classification" else 1
    head_config: dict[str, Any] = dict(extra.pop("head_config", {}))
    if state_dict is None:
        g = torch.Generator().manual_seed(seed)
        sd: dict[str, torch.Tensor] = {}
        width = d_model
        if hidden_dim:
            sd["hidden.weight"] = torch.randn(hidden_dim, d_model, generator=g) / d_model**0.5
            sd["hidden.bias"] = torch.randn(hidden_dim, generator=g) * 0.1
            width = hidden_dim
        if head_type != "token":
            assert out_dim is not None, "classification heads need n_classes"
            sd["output.weight"] = torch.randn(out_dim, width, generator=g) / width**0.5
            sd["output.bias"] = torch.randn(out_dim, generator=g) * 0.1
        state_dict = sd
    if hidden_dim:
        head_config["hidden_dim"] = hidden_dim
    config = {
        "base_model_name": str(base_model),
        "target_layer": target_layer,
        "target_neuron": target_neuron,
        "layer_type": layer_type,
        "feature_layer": feature_layer,
        "head_type": head_type,
        "head_config": head_config,
        **extra,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.detach().clone().contiguous() for k, v in state_dict.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path / "head.safetensors"))
    else:
        torch.save(tensors, path / "head.pt")
    return path


def write_sae(
    path: str | Path,
    *,
    hook_name: str,
    d_in: int,
    d_sae: int = 16,
    architecture: str = "standard",
    hook_name_out: str | None = None,
    d_out: int | None = None,
    k: int = 8,
    apply_b_dec_to_input: bool = True,
    seed: int = 0,
    dead: tuple[int, ...] = (),
    alive: tuple[int, ...] = (),
) -> Path:
    """Write a random dictionary in SAELens' layout (``cfg.json`` + ``sae_weights.safetensors``).

    Every parameter is random (seeded). Encoder biases sit near 0 so that latents fire on
    some inputs and not on others; ``dead`` latents get a bias far below anything the
    inputs reach (inactive everywhere), ``alive`` ones a bias of +1 (active on most inputs).
    A transcoder (``architecture`` ending in
    ``transcoder``) writes at ``hook_name_out`` with ``d_out`` (default ``d_in``) wide rows.
    """
    from neuronpatch.dictionaries import save

    g = torch.Generator().manual_seed(seed)
    d_out = d_out or d_in

    def rnd(*shape: int, s: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * s

    w: dict[str, torch.Tensor] = {"W_enc": rnd(d_in, d_sae, s=d_in**-0.5), "W_dec": rnd(d_sae, d_out, s=0.5),
                                  "b_dec": rnd(d_out, s=0.3)}
    bias = rnd(d_sae, s=0.5)
    bias[list(dead)] = -1e4
    bias[list(alive)] = 1.0
    if architecture == "gated":
        w.update(b_gate=bias, r_mag=rnd(d_sae, s=0.3), b_mag=rnd(d_sae, s=0.5))
    else:
        w["b_enc"] = bias
    if architecture.startswith("jumprelu"):
        w["threshold"] = rnd(d_sae, s=0.3).abs()
    if architecture == "skip_transcoder":
        w["W_skip"] = rnd(d_out, d_in, s=d_in**-0.5)
    cfg: dict[str, Any] = {"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "hook_name": hook_name,
                           "apply_b_dec_to_input": apply_b_dec_to_input, "normalize_activations": "none",
                           "dtype": "float32", "device": "cpu"}
    if architecture == "topk":
        cfg["k"] = k
    if architecture.endswith("transcoder"):
        cfg.update(hook_name_out=hook_name_out, d_out=d_out)
    return save(path, cfg, w)
