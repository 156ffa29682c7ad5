"""An independent reference for the engine: plain HF transformers and its own hooks.

Nothing here imports neuronpatch's engine, units or heads. Each input is run
alone (no padding, no batching) through ``GPT2LMHeadModel`` with
``output_hidden_states=True``; patches are applied with ordinary torch forward
hooks on HF modules; head predictions are written out with tensor algebra from
the state dict. If the engine and this file agree, both the hook placement and
the head maths are right.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, GPT2LMHeadModel


class Oracle:
    def __init__(self, model_dir: Path) -> None:
        self.model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
        self.tok = AutoTokenizer.from_pretrained(model_dir)

    def ids(self, text: str) -> torch.Tensor:
        return torch.tensor([self.tok.encode(text, add_special_tokens=False)])

    def _patch_hooks(
        self, layer: int, layer_type: str, neuron: int, positions: list[int],
        fn: Callable[[torch.Tensor], torch.Tensor], record: dict[str, Any],
    ) -> list[Any]:
        block = self.model.transformer.h[layer]

        def patch(t: torch.Tensor) -> torch.Tensor:
            t = t.clone()
            col = t[0, :, neuron]
            for p in positions:
                col[p] = fn(col[p])
            t[0, :, neuron] = col
            record.setdefault("values", []).append(t[0, :, neuron].clone())
            return t

        if layer_type == "post":
            # GPT2MLP: c_fc -> act -> c_proj; the neuron is the output of `act`.
            return [block.mlp.act.register_forward_hook(lambda m, i, o: patch(o))]
        if layer_type == "mlp_out":
            return [block.mlp.register_forward_hook(lambda m, i, o: patch(o))]
        if layer_type == "resid_pre":
            def pre(m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                return (patch(args[0]), *args[1:]), kwargs
            return [block.register_forward_pre_hook(pre, with_kwargs=True)]
        raise NotImplementedError(layer_type)

    def run(
        self, text: str, *, layer: int, layer_type: str, neuron: int,
        positions: list[int] | None = None,
        fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """Hidden states, logits and the unit's column for one input (patched if fn)."""
        record: dict[str, Any] = {}
        ids = self.ids(text)
        handles = []
        fn_ = fn if fn is not None else (lambda a: a)
        handles = self._patch_hooks(layer, layer_type, neuron,
                                    positions if positions is not None else [], fn_, record)
        try:
            with torch.no_grad():
                out = self.model(ids, output_hidden_states=True)
        finally:
            for h in handles:
                h.remove()
        return out.hidden_states, out.logits[0], record["values"][0]


def head_predict(head_dir: Path, features: torch.Tensor, logits_digits: list[int] | None = None) -> float:
    """The head's prediction for one feature vector, written out by hand."""
    cfg = json.loads((head_dir / "config.json").read_text())
    if cfg["head_type"] == "token":
        assert logits_digits is not None
        p = torch.softmax(features[logits_digits], 0)
        return float(sum(i * p[i] for i in range(10)))
    sd = torch.load(head_dir / "head.pt", weights_only=True)
    x = features
    if "hidden.weight" in sd:
        x = torch.nn.functional.gelu(sd["hidden.weight"] @ x + sd["hidden.bias"])
    out = sd["output.weight"] @ x + sd["output.bias"]
    if cfg["head_type"] == "regression":
        return float(out[0])
    edges = cfg.get("bin_edges")
    if edges is None:
        return float(torch.argmax(out))
    centres = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
    return float(torch.softmax(out, 0) @ torch.tensor(centres))
