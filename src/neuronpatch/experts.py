"""Expert neurons: the hidden units of one expert of a mixture-of-experts block.

In transformers 5 a block's experts are one fused module: ``gate_up_proj``
(``[E, 2F, d]``, or ``[E, d, 2F]`` where the class says its weights are
transposed), ``down_proj`` and a gate function (``_apply_gate``: ``act(gate) ·
up``) shared by every expert. There is no module per expert to hook. A head may
still name one neuron of one expert (``layer_type: expert_post`` or
``expert_pre``, ``target_expert: e``, ``target_neuron: f``; TransformerLens
would call it ``blocks.L.mlp.experts.e.hook_post``).

The neuron exists only on tokens routed to expert ``e``. There its value is
``h_f = _apply_gate(x · W_gate_up[e])_f`` (``expert_pre``: the gate column
before the activation), with ``x`` the hidden states the block hands its experts
and the gate function the model's own. Expert ``e`` adds ``w_e · down_e(h)`` to the
block's output, ``w_e`` the token's routing weight; ``down_e`` is linear, so a
change of ``h_f`` by ``Δ`` adds ``w_e · Δ · down_e[:, f]`` to the block's output and
nothing else. The engine patches so (:class:`ExpertNeurons` is read like a
transcoder: read at the experts' input, written at the block's output) and the
rest of the forward, later routing included, is the model's own.

Which family lays its experts out so is checked once per model and block
(:func:`load`): the block's own output must be ``Σ_k w_k · down_{e_k}(h_{e_k})`` on a
short input, or expert neurons of that model are refused by name.

A block's router is a unit too (``layer_type: router``, ``target_neuron: e``): the logit
it gives expert ``e``, ``x · W_router[e]`` (:class:`RouterLogits`). A patch adds
``Δ · u_e`` to the router's own input, ``u_e`` the column of ``W_router``'s pseudo-inverse
with ``W_router · u_e = e_e``: expert ``e``'s logit moves by ``Δ``, every other logit stays,
and the router's own softmax and top-k decide the routing from there (the experts still
get the unpatched hidden states).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from neuronpatch.architecture import Site, expert_call, experts_module, router_module
from neuronpatch.dictionaries import RowWrites
from neuronpatch.errors import ModelLoadError
from neuronpatch.tolerance import check_rtol, close

if TYPE_CHECKING:
    from neuronpatch.models import LoadedModel


class ExpertNeurons:
    """The neurons of expert ``expert`` of block ``layer``, as a unit kind the engine patches.

    It has what :class:`~neuronpatch.dictionaries.Dictionary` has (``encode``, ``rows``,
    ``W_dec``), read from the ``expert_in`` site (hidden states and routing weights) and
    written at the block's output (``mlp_write``), plus the routing weight a write is
    scaled by (:meth:`gain`) and, for ``expert_pre``, the neuron's change that a change of
    its pre-activation makes (:meth:`written`). Weights are float32 copies of one expert's.
    """

    linear = False  # a change's write depends on the token's routing weight: no constant direction
    routed = True  # a neuron exists only at tokens routed to its expert
    sparse = False

    def __init__(self, module: nn.Module, layer: int, expert: int, pre: bool, d_model: int) -> None:
        self.module = module
        self.layer, self.expert, self.pre, self.d_model = layer, expert, pre, d_model
        self.read = Site("expert_in", layer)
        self.write = Site("mlp_write", layer)
        self.transposed = bool(getattr(module, "is_transposed", False))
        self.concatenated = bool(getattr(module, "is_concatenated", True))
        weights: Any = module  # (fused parameters, checked by load)
        gu = weights.gate_up_proj[expert].detach().float()
        self.w_in = gu if self.transposed else gu.T  # [d, 2F]
        bias = getattr(module, "gate_up_proj_bias", None) if getattr(module, "has_bias", False) else None
        self.b_in = None if bias is None else bias[expert].detach().float()
        down = weights.down_proj[expert].detach().float()
        self.w_out = down if self.transposed else down.T  # [F, d]
        self.width = int(self.w_out.shape[0])

    @property
    def hook(self) -> str:
        """TransformerLens's name for this expert's neurons."""
        return f"blocks.{self.layer}.mlp.experts.{self.expert}.hook_{'pre' if self.pre else 'post'}"

    def label(self, i: int) -> str:
        return f"expert {self.expert} neuron {i}"

    @property
    def W_dec(self) -> Tensor:
        """``[F, d]``: what each neuron writes per unit of change, before the routing weight."""
        return self.w_out

    def gate_column(self, cols: Tensor) -> Tensor:
        """Where neuron ``cols`` sits among the fused projection's ``2F`` outputs (its gate)."""
        return cols if self.concatenated else 2 * cols

    def projection(self, t: Tensor) -> Tensor:
        """``[..., 2F]``: the fused gate-and-up projection of the hidden states in ``t``."""
        x = t[..., : self.d_model].float()
        out = x @ self.w_in
        return out if self.b_in is None else out + self.b_in

    def apply_gate(self, gu: Tensor) -> Tensor:
        """The model's own gate function on ``[..., 2F]`` (float32 in, float32 out)."""
        shape = gu.shape
        out: Tensor = self.module._apply_gate(gu.reshape(-1, shape[-1]))  # type: ignore[operator]
        return out.reshape(*shape[:-1], -1)

    def gain(self, t: Tensor, cols: Tensor | None = None) -> Tensor:
        """The routing weight of this expert at each token of ``t`` (NaN: not routed there)."""
        return t[..., self.d_model + self.expert].float()

    def encode(self, t: Tensor, cols: Tensor | None = None) -> Tensor:
        """Neuron values (NaN where the token is not routed to the expert): ``[..., F]``, or
        ``[R, S]`` with ``cols [R]`` (``t [R, S, d + E]``)."""
        gu = self.projection(t)
        if self.pre:
            F = self.width
            every = gu[..., :F] if self.concatenated else gu[..., 0::2]
        else:
            every = self.apply_gate(gu)
        every = every.masked_fill(self.gain(t).isnan()[..., None], torch.nan)
        if cols is None:
            return every
        return every.gather(-1, cols[:, None, None].expand(-1, every.shape[1], 1))[..., 0]

    def written(self, t: Tensor, cols: Tensor, delta: Tensor) -> Tensor:
        """``[R, S]``: how much neuron ``cols[r]``'s output changes when its value changes by
        ``delta`` (``expert_post``: ``delta``; ``expert_pre``: the gate function's own answer
        to the changed pre-activation, minus its clean one)."""
        if not self.pre:
            return delta
        gu = self.projection(t)
        moved = gu.clone()
        g = self.gate_column(cols)[:, None, None].expand(-1, gu.shape[1], 1)
        moved.scatter_add_(-1, g, delta.float()[..., None])
        out = cols[:, None, None].expand(-1, gu.shape[1], 1)
        return (self.apply_gate(moved).gather(-1, out) - self.apply_gate(gu).gather(-1, out))[..., 0]

    def write_scale(self, t: Tensor) -> Tensor:
        """``[..., F]``: what a change of 1 in each neuron's value writes along its down-projection
        column at each token: the routing weight (0 where not routed), times, for ``expert_pre``,
        the gate function's slope there (its own autograd)."""
        gain = torch.nan_to_num(self.gain(t), nan=0.0)[..., None]
        if not self.pre:
            return gain.expand(*gain.shape[:-1], self.width)
        with torch.enable_grad():
            gu = self.projection(t).detach().requires_grad_(True)
            (d,) = torch.autograd.grad(self.apply_gate(gu).sum(), gu)
        return gain * d[..., self.gate_column(torch.arange(self.width, device=d.device))]

    def rows(self, cols: Tensor) -> Tensor:
        """``[R, d]``: what neuron ``cols[r]`` writes per unit of its value (before the routing weight)."""
        return self.w_out[cols]


class RouterLogits(RowWrites):
    """The logits block ``layer``'s router gives each expert, as a unit kind the engine patches.

    Read and written at the router's input (``router_in``), like a sparse autoencoder's
    latents at its hook: the encoder is the router's own weight, the decoder row of expert
    ``e`` the pseudo-inverse column ``u_e`` (``W · u_e = e_e``, so a change of ``Δ`` moves
    that logit alone).
    """

    def __init__(self, module: nn.Module, layer: int, weight: Tensor, bias: Tensor | None) -> None:
        self.module = module
        self.layer = layer
        self.read = self.write = Site("router_in", layer)
        self.weight = weight.detach().float()  # [E, d]
        self.bias = None if bias is None else bias.detach().float()
        self.u = torch.linalg.pinv(self.weight.double()).T.float()  # [E, d]: W · u_e = e_e
        self.width = int(self.weight.shape[0])

    @property
    def hook(self) -> str:
        return f"blocks.{self.layer}.mlp.gate.hook_out"

    def label(self, i: int) -> str:
        return f"router logit of expert {i}"

    @property
    def W_dec(self) -> Tensor:
        return self.u

    def encode(self, t: Tensor, cols: Tensor | None = None) -> Tensor:
        """Every expert's logit ``[..., E]``, or ``[R, S]`` with ``cols [R]`` (``t [R, S, d]``)."""
        out = t.float() @ self.weight.T
        out = out if self.bias is None else out + self.bias
        if cols is None:
            return out
        return out.gather(-1, cols[:, None, None].expand(-1, out.shape[1], 1))[..., 0]

    def rows(self, cols: Tensor) -> Tensor:
        return self.u[cols]


def load_router(model: LoadedModel, layer: int) -> RouterLogits:
    """Block ``layer``'s router logits as units, checked on first use.

    Raises:
        ModelLoadError: the block has no router, or its router's first output is not the
            logits of one weight (``x · Wᵀ (+ b)``), or its weight's rows are dependent (no
            direction then moves one logit alone); refused by name.
    """
    arch = model.arch
    module = router_module(arch, layer)
    name = f"{arch.name}: block {layer}"
    if module is None:
        raise ModelLoadError(f"{name} has no router (layer_type router names the logit a mixture-of-experts "
                             "block's router gives one expert)")
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    bias = bias if isinstance(bias, Tensor) else None
    why = None
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != model.d_model:
        why = f"its router ({type(module).__name__}) has no [experts, d_model] weight"
    elif int(torch.linalg.matrix_rank(weight.detach().double())) < weight.shape[0]:
        why = "its router's weight has dependent rows, so no change of its input moves one logit alone"
    else:
        known = _ROUTERS_CHECKED.setdefault(model.hf, {})
        if layer not in known:
            known[layer] = _check_router(model, module, RouterLogits(module, layer, weight, bias))
        why = known[layer]
    if why is not None:
        raise ModelLoadError(f"{name}: router logits are refused: {why}")
    assert isinstance(weight, Tensor)
    return RouterLogits(module, layer, weight, bias)


def _one_call(model: LoadedModel, module: nn.Module) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """``(args, kwargs, first output)`` of ``module``'s call in the model's forward on a short input."""
    seen: dict[str, Any] = {}

    def before(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["args"], seen["kwargs"] = args, kwargs

    def after(mod: nn.Module, args: Any, output: Any) -> None:
        seen["out"] = output[0] if isinstance(output, (tuple, list)) else output

    hooks = [module.register_forward_pre_hook(before, with_kwargs=True), module.register_forward_hook(after)]
    ids = (torch.arange(12) * 11 + 5)[None] % model.vocab_size
    try:
        with torch.inference_mode():
            model.hf(input_ids=ids.to(model.device))
    finally:
        for hook in hooks:
            hook.remove()
    return seen.get("args", ()), seen.get("kwargs", {}), seen.get("out")


def _agree(got: Tensor, want: Tensor) -> bool:
    """``got`` (one row per token) is ``want`` up to the rounding of ``got``'s dtype."""
    return close(want.double(), got.reshape(-1, got.shape[-1]).double(), check_rtol(got.dtype))


def _check_router(model: LoadedModel, module: nn.Module, unit: RouterLogits) -> str | None:
    """Whether the router's first output is ``unit.encode`` of its input, on a short input."""
    args, kwargs, out = _one_call(model, module)
    x = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(x, Tensor) or not isinstance(out, Tensor):
        return "its router is not called with the hidden states, or returns no logits"
    if not _agree(out, unit.encode(x.reshape(-1, x.shape[-1]))):
        return "its router's first output is not the logits x · Wᵀ of its own weight"
    return None


# model.hf -> block -> why its expert neurons are refused (None: checked, served)
_CHECKED: weakref.WeakKeyDictionary[Any, dict[int, str | None]] = weakref.WeakKeyDictionary()
_ROUTERS_CHECKED: weakref.WeakKeyDictionary[Any, dict[int, str | None]] = weakref.WeakKeyDictionary()


def load(model: LoadedModel, layer: int, expert: int, pre: bool) -> ExpertNeurons:
    """Expert ``expert``'s neurons in block ``layer`` of ``model``, checked on first use.

    Raises:
        ModelLoadError: the block has no fused experts module, the expert does not exist, or
            the block's own output is not the sum the patch relies on (refused by name).
    """
    arch = model.arch
    module = experts_module(arch, layer)
    name = f"{arch.name}: block {layer}"
    if module is None:
        raise ModelLoadError(f"{name} has no fused experts module (layer_type expert_post and expert_pre "
                             "name a neuron of one expert of a mixture-of-experts block)")
    why = _why_not(module)
    if why is None:
        known = _CHECKED.setdefault(model.hf, {})
        if layer not in known:
            known[layer] = _check(model, layer, module)
        why = known[layer]
    if why is not None:
        raise ModelLoadError(f"{name}: expert neurons are refused: {why}; the block's output (layer_type "
                             "mlp_out) and the residual units are served")
    n = int(module.num_experts)  # type: ignore[arg-type]
    if not 0 <= expert < n:
        raise ModelLoadError(f"{name} has {n} experts; target_expert {expert} is not one of 0..{n - 1}")
    return ExpertNeurons(module, layer, expert, pre, model.d_model)


def _why_not(module: nn.Module) -> str | None:
    """Why a fused experts module's layout is not one the patch can read, by name (None: it is)."""
    kind = type(module).__name__
    if not all(isinstance(getattr(module, n, None), Tensor) for n in ("gate_up_proj", "down_proj")):
        return f"its experts module ({kind}) does not hold fused gate_up_proj and down_proj weights"
    if not hasattr(module, "_apply_gate") or not getattr(module, "has_gate", True):
        return f"its experts module ({kind}) has no gate function of transformers' experts interface"
    if getattr(module, "has_post_expert_norm", False):
        return (f"its experts module ({kind}) normalises each expert's output, so a neuron's write is "
                "not linear")
    if not isinstance(getattr(module, "num_experts", None), int):
        return f"its experts module ({kind}) does not say how many experts it has"
    return None


def _check(model: LoadedModel, layer: int, module: nn.Module) -> str | None:
    """Whether the block's own experts output is ``Σ_k w_k · down_{e_k}(h_{e_k}) (+ bias)`` on a
    short input."""
    args, kwargs, out = _one_call(model, module)
    call = expert_call(args, kwargs) if args or kwargs else None
    if call is None or not isinstance(out, Tensor):
        return "its experts module is not called with (hidden_states, top_k_index, top_k_weights)"
    hidden, idx, weights = call
    n = int(module.num_experts)  # type: ignore[arg-type]
    want = torch.zeros(hidden.shape[0], model.d_model, dtype=torch.float64, device=hidden.device)
    down_bias = getattr(module, "down_proj_bias", None) if getattr(module, "has_bias", False) else None
    for e in range(n):
        rows, k = (idx == e).nonzero(as_tuple=True)
        if not len(rows):
            continue
        unit = ExpertNeurons(module, layer, e, False, model.d_model)
        h = unit.apply_gate(unit.projection(hidden[rows].float()))
        y = h.double() @ unit.w_out.double()
        if down_bias is not None:
            y = y + down_bias[e].double()
        want.index_add_(0, rows, y * weights[rows, k].double()[:, None])
    if not _agree(out, want):
        return ("the block's experts output is not the routing-weighted sum of each expert's down "
                "projection of _apply_gate(gate_up_proj · x)")
    return None
