"""An independent reference for the engine: HF transformers run directly, with its own hooks.

Nothing here imports neuronpatch's engine, architecture, coordinates or heads.
Each input is run alone (no padding, no batching, no cache) through the HF
model's full forward; patches are ordinary torch forward hooks on HF modules
found through a hand-written table below; features come from
``output_hidden_states`` (or a hook on the last block for its pre-norm output);
``transformer_lens`` coordinates come from the centring identities of a
LayerNorm model written out by hand. Head predictions are tensor algebra on
the state dict, written as the seed pipeline's ``ActivationPredictor`` defines them.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# model_type -> (blocks path, MLP output projection, MLP write, attention write), relative
# to the model / to each block. Written from each architecture's modeling file.
TABLE: dict[str, tuple[str, str, str, str]] = {
    "gpt2": ("transformer.h", "mlp.c_proj", "mlp", "attn"),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_4h_to_h", "mlp", "attention"),
    "llama": ("model.layers", "mlp.down_proj", "mlp", "self_attn"),
    "mistral": ("model.layers", "mlp.down_proj", "mlp", "self_attn"),
    "qwen2": ("model.layers", "mlp.down_proj", "mlp", "self_attn"),
    "qwen3": ("model.layers", "mlp.down_proj", "mlp", "self_attn"),
    "gemma": ("model.layers", "mlp.down_proj", "mlp", "self_attn"),
    "gemma2": ("model.layers", "mlp.down_proj", "post_feedforward_layernorm", "post_attention_layernorm"),
    "opt": ("model.decoder.layers", "fc2", "fc2", "self_attn"),
    "gptj": ("transformer.h", "mlp.fc_out", "mlp", "attn"),
    "phi": ("model.layers", "mlp.fc2", "mlp", "self_attn"),
    "phi3": ("model.layers", "mlp.down_proj", "mlp", "self_attn"),
    "bloom": ("transformer.h", "mlp.dense_4h_to_h", "mlp.dense_4h_to_h", "self_attention.dense"),
    "gpt_bigcode": ("transformer.h", "mlp.c_proj", "mlp", "attn"),
    # A norm after the MLP, and a residual add that scales the MLP's output (engine tests).
    "olmo2": ("model.layers", "mlp.down_proj", "post_feedforward_layernorm", "post_attention_layernorm"),
    "granite": ("model.layers", "mlp.down_proj", "mlp", "self_attn"),
    # Mixture-of-experts blocks: the sparse block's output (routed experts plus any shared
    # expert, gated) is what the block adds to the residual stream; no neuron layer of its own.
    "mixtral": ("model.layers", "", "mlp", "self_attn"),
    "qwen2_moe": ("model.layers", "", "mlp", "self_attn"),
    "olmoe": ("model.layers", "", "mlp", "self_attn"),
}
# Mixture-of-experts models: the module in each block whose forward returns
# (router logits, routing weights, chosen experts).
ROUTERS = {"mixtral": "mlp.gate", "qwen2_moe": "mlp.gate", "olmoe": "mlp.gate"}
# Mixture-of-experts models: each block's fused experts module (gate_up_proj [E, 2F, d] with
# the gate first, down_proj [E, d, F]), handed (hidden_states, top_k_index, top_k_weights).
EXPERTS = {"mixtral": "mlp.experts", "qwen2_moe": "mlp.experts", "olmoe": "mlp.experts"}
# LayerNorm (mean-subtracting) models; the rest use RMSNorm.
LAYERNORM = {"gpt2", "gpt_neox", "opt", "gptj", "phi", "bloom", "gpt_bigcode"}


class Oracle:
    """One model, run input by input, patched with plain forward hooks."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.type = self.model.config.model_type
        blocks, self.out_proj, self.mlp_w, self.attn_w = TABLE[self.type]
        self.blocks = self.model.get_submodule(blocks)
        self.ln = self.type in LAYERNORM
        self.d = self.model.get_input_embeddings().weight.shape[1]

    def ids(self, text: str) -> list[int]:
        return list(self.tok(text)["input_ids"])  # the tokenizer's defaults, as the pipeline

    def _site(self, layer: int, layer_type: str) -> tuple[Any, str]:
        block = self.blocks[layer]
        return {
            "post": (block.get_submodule(self.out_proj), "in"),
            "mlp_out": (block.get_submodule(self.mlp_w), "out"),
            "attn_out": (block.get_submodule(self.attn_w), "out"),
            "resid_post": (block, "out"),
            "resid_pre": (block, "in"),
        }[layer_type]

    def run(self, text: str, *, cfg: dict[str, Any], patch: tuple[list[int], float, float] | None = None,
            direction: torch.Tensor | None = None,
            latent: tuple[Any, torch.Tensor, bool] | None = None) -> tuple[float, float | None, torch.Tensor]:
        """(clean unit value at the measured position, patched value, features) for one input.

        ``patch``: (positions, alpha, beta); the unit value is measured at the first position
        (or at the read position when every position is patched).

        ``direction``: patch along ``v`` (a residual-space vector) instead of the column
        ``target_neuron``: the value is ``v`` dotted with the tensor (centred first in
        transformer_lens coordinates of a LayerNorm model), and the patch adds the change
        times ``v`` to the tensor. A column is the same with ``v = e_neuron``.

        ``latent``: ``(encode, w, transcoder)``: the value is ``encode(x)`` (``x [n, d]``, centred
        as above; a function ``[n, d] -> [n]``) and the patch adds the change times ``w``. With
        ``transcoder`` the value is read from the MLP module's own input (not centred) and the
        change is written to the site ``layer_type`` names.
        """
        coords = cfg.get("coordinates", "transformer_lens")
        layer, neuron, lt = cfg["target_layer"], cfg["target_neuron"], cfg.get("layer_type", "post")
        centre_unit = coords == "transformer_lens" and self.ln and lt != "post"
        ids = torch.tensor([self.ids(text)])
        n = ids.shape[1]
        read = n - 1 if cfg.get("token_pos", "last") == "last" else cfg["token_pos"] % n
        module, where = self._site(layer, lt)
        rec: dict[str, Any] = {}
        transcoder = latent is not None and latent[2]

        def edit(t: torch.Tensor) -> torch.Tensor:
            t3 = t.reshape(1, n, -1).clone()
            x = t3[0]
            if latent is not None:
                write = latent[1].to(x.dtype)
            elif direction is None:
                write = torch.zeros(x.shape[-1])
                write[neuron] = 1.0
            else:
                write = direction.to(x.dtype)
            xc = x - x.mean(-1, keepdim=True) if centre_unit else x
            if transcoder:
                c = latent[0](rec["mlp_in"])  # type: ignore[index]
            elif latent is not None:
                c = latent[0](xc)
            else:
                c = xc @ write
            rec["clean"] = c.clone()
            rec["write"] = write
            if patch is not None:
                positions, alpha, beta = patch
                delta = torch.zeros(n)
                for q in positions:
                    delta[q] = alpha * c[q] + beta - c[q]
                t3[0] = x + delta[:, None] * write[None, :]
                rec["delta"] = delta
            return t3.reshape(t.shape)

        if where == "in":
            def pre(m: Any, args: Any, kwargs: Any) -> Any:
                if args:
                    return (edit(args[0]), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}
            h = module.register_forward_pre_hook(pre, with_kwargs=True)
        else:
            def post(m: Any, args: Any, out: Any) -> Any:
                if isinstance(out, tuple):
                    return (edit(out[0]), *out[1:])
                return edit(out)
            h = module.register_forward_hook(post)
        if transcoder:
            mlp = self.blocks[layer].get_submodule("mlp")
            reads = mlp.register_forward_pre_hook(
                lambda m, a: rec.__setitem__("mlp_in", a[0].reshape(n, -1).detach().clone()))
        # The output of the block the features are read from, by a hook registered after the
        # patch's (HF's own hidden_states of a block can be recorded before a user's output hook
        # on that block has replaced its output).
        last_block: dict[str, torch.Tensor] = {}
        fl_read = cfg.get("feature_layer", -1) % len(self.blocks) if coords != "hf" else len(self.blocks) - 1
        h2 = self.blocks[fl_read].register_forward_hook(
            lambda m, a, o: last_block.__setitem__("x", (o[0] if isinstance(o, tuple) else o).detach()))
        try:
            with torch.no_grad():
                out = self.model(ids, output_hidden_states=True)
        finally:
            h.remove()
            h2.remove()
            if transcoder:
                reads.remove()
        if cfg["head_type"] == "token":
            feats = out.logits[0, read]
        else:
            fl = cfg.get("feature_layer", -1)
            if coords == "hf":
                feats = out.hidden_states[fl][0, read]
            else:
                x = last_block["x"].reshape(1, n, -1)[0]
                feats = x[read]
                if self.ln:
                    feats = feats - feats.mean()
                    if lt != "post" and "delta" in rec:
                        # The processed model never re-centres a patched residual tensor: what
                        # the patch wrote off-centre (its mean, δ·mean(write)) stays in the features.
                        feats = feats + rec["delta"][read] * rec["write"].mean()
        if patch is None:
            return float(rec["clean"][read]), None, feats.float()
        positions, alpha, beta = patch
        m = read if len(positions) > 1 else positions[0]
        c = float(rec["clean"][m])
        patched = alpha * c + beta if m in positions else c
        return c, patched, feats.float()

    def digit_ids(self) -> list[int]:
        return [self.tok.encode(str(i))[-1] for i in range(10)]

    def router_run(self, text: str, *, layer: int, expert: int, feature_layer: int,
                   patch: tuple[float, float] | None = None) -> tuple[float, torch.Tensor, list[int]]:
        """(the logit block ``layer``'s router gives ``expert`` at the last token, the last block's
        output there, the experts the block chose there) for one input.

        The router's routing is replaced, by a forward hook, with its computation written out
        from its own logits: ``patch`` ``(alpha, beta)`` sets the expert's logit at the last
        token to ``alpha·l + beta``, then softmax over the experts, the top k, and (Mixtral
        always; Qwen2-MoE and OLMoE where ``norm_topk_prob``) the top k renormalised to sum 1.
        """
        cfg = self.model.config
        k = cfg.num_experts_per_tok
        renorm = self.type == "mixtral" or bool(getattr(cfg, "norm_topk_prob", False))
        ids = torch.tensor([self.ids(text)])
        n = ids.shape[1]
        rec: dict[str, Any] = {}

        def routing(m: Any, args: Any, out: Any) -> Any:
            logits = out[0].clone()
            rec["clean"] = float(logits[n - 1, expert])
            if patch is not None:
                logits[n - 1, expert] = patch[0] * logits[n - 1, expert] + patch[1]
            probs = torch.softmax(logits.float(), dim=-1)
            top, idx = torch.topk(probs, k, dim=-1)
            if renorm:
                top = top / top.sum(-1, keepdim=True)
            if patch is None:  # the written-out routing is the router's own
                assert torch.equal(idx, out[2]) and torch.allclose(top.to(out[1].dtype), out[1], atol=1e-6)
            rec["chosen"] = sorted(int(e) for e in idx[n - 1])
            return logits, top.to(out[1].dtype), idx

        router = self.blocks[layer].get_submodule(ROUTERS[self.type])
        feats = self._last_token_output(ids, feature_layer, [router.register_forward_hook(routing)])
        return rec["clean"], feats, rec["chosen"]

    def _last_token_output(self, ids: torch.Tensor, feature_layer: int, hooks: list[Any]) -> torch.Tensor:
        """Block ``feature_layer``'s output at the last token of one forward with ``hooks`` (removed
        after)."""
        last: dict[str, torch.Tensor] = {}
        hooks = [*hooks, self.blocks[feature_layer % len(self.blocks)].register_forward_hook(
            lambda m, a, o: last.__setitem__("x", (o[0] if isinstance(o, tuple) else o).detach()))]
        try:
            with torch.no_grad():
                self.model(ids)
        finally:
            for h in hooks:
                h.remove()
        n = ids.shape[1]
        return last["x"].reshape(n, -1)[n - 1].float()

    def expert_run(self, text: str, *, layer: int, expert: int, neuron: int, pre: bool, feature_layer: int,
                   patch: tuple[float, float] | None = None,
                   routes: list[torch.Tensor] | None = None) -> tuple[float | None, torch.Tensor]:
        """(the expert neuron's clean value at the last token, or None where the token is not
        routed to ``expert``; the last block's output at the last token) for one input.

        The block's experts module is replaced, by a forward hook, with its computation written
        out token by token from the module's fused weights: for each token and each expert the
        router chose (the indices and weights the block hands its experts), ``act(x·W_gate) ·
        (x·W_up)`` through ``down_proj``, times the routing weight, summed. ``patch``
        ``(alpha, beta)`` sets the neuron (``pre``: the gate's pre-activation) to
        ``alpha·v + beta`` at the last token, if that token is routed to the expert.
        ``routes``: receives the experts each later block's router chose at the last token (sorted).
        """
        act = {"silu": F.silu, "gelu": F.gelu}[self.model.config.hidden_act]
        ids = torch.tensor([self.ids(text)])
        n = ids.shape[1]
        module = self.blocks[layer].get_submodule(EXPERTS[self.type])
        rec: dict[str, Any] = {}

        def written_out(m: Any, args: Any, kwargs: Any, out: Any) -> torch.Tensor:
            x, idx, w = args if len(args) == 3 else (args[0], kwargs["top_k_index"], kwargs["top_k_weights"])
            F_ = m.down_proj.shape[-1]
            y = torch.zeros_like(out)
            for t in range(x.shape[0]):
                for k in range(idx.shape[1]):
                    e = int(idx[t, k])
                    gu = m.gate_up_proj[e] @ x[t]
                    gate, up = gu[:F_].clone(), gu[F_:]
                    if e == expert and t == n - 1:
                        rec["clean"] = float(gate[neuron] if pre else act(gate[neuron]) * up[neuron])
                        if patch is not None and pre:
                            gate[neuron] = patch[0] * gate[neuron] + patch[1]
                    h = act(gate) * up
                    if e == expert and t == n - 1 and patch is not None and not pre:
                        h[neuron] = patch[0] * h[neuron] + patch[1]
                    y[t] += w[t, k] * (m.down_proj[e] @ h)
            rec["own"] = out.detach().clone()
            rec["written"] = y.detach().clone()
            return y

        later = list(self.blocks)[layer + 1:] if routes is not None else []
        hooks = [block.get_submodule(ROUTERS[self.type]).register_forward_hook(
            lambda m, a, out: routes.append(out[2].reshape(n, -1)[n - 1].sort().values))  # type: ignore[union-attr]
            for block in later]
        feats = self._last_token_output(ids, feature_layer,
                                        [*hooks, module.register_forward_hook(written_out, with_kwargs=True)])
        if patch is None:  # the written-out experts are the model's own
            err = float((rec["own"] - rec["written"]).abs().max())
            assert err <= 1e-5 * (float(rec["own"].abs().max()) + 1), f"written-out experts off by {err:.3g}"
        return rec.get("clean"), feats


def head_predict(head_dir: Path, feats: torch.Tensor, digit_ids: list[int] | None = None) -> float:
    """The seed pipeline's prediction for one feature vector, written out by hand."""
    cfg = json.loads((head_dir / "config.json").read_text())
    hc = cfg.get("head_config", {}) or {}
    if cfg["head_type"] == "token":
        assert digit_ids is not None
        p = torch.softmax(feats[digit_ids], 0)
        e = float(sum(i * p[i] for i in range(10)))
        if cfg.get("activation_mean") is not None and cfg.get("activation_std") is not None:
            e = (e / 9.0 * 4 - 2) * cfg["activation_std"] + cfg["activation_mean"]
        return e
    sd = torch.load(head_dir / "head.pt", weights_only=True)
    x = feats
    if "hidden.weight" in sd:
        act = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[hc.get("activation", "gelu")]
        x = act(sd["hidden.weight"] @ x + sd["hidden.bias"])
    out = sd["output.weight"] @ x + sd["output.bias"]
    if cfg["head_type"] == "regression":
        v = float(out[0])
        return v * hc["output_scale"] if hc.get("output_scale") is not None else v
    edges = cfg.get("bin_edges")
    if edges is None:
        return float(torch.argmax(out))
    centres = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    return float(torch.softmax(out, 0) @ torch.tensor(centres))
