"""Training prediction heads in the seed's artifact format.

A head learns to predict one unit's activation at the last token of a text
from the residual stream read at ``feature_layer``. Two ways to collect the
training pairs:

* **natural**: run each text and record (features, activation). A head trained
  this way learns whatever predicts the unit best, which is mostly the unit's
  *causes*: it can score a high R² and still ignore the unit itself.
* **interventional** (``intervene=True``): on each text, *set* the unit to a
  random value at the last token and record the resulting features with that
  value as the target. The unit's value is then independent of its causes, so
  the only way to predict it is to read what it writes.

Linear regression heads are fitted in closed form (ridge); heads with a hidden
layer, and classification heads, are trained with Adam on full batches.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from neuronpatch import units
from neuronpatch.engine import collect
from neuronpatch.errors import InputError
from neuronpatch.models import load_model

HELD_OUT_FRACTION = 0.2


@dataclass(frozen=True)
class TrainReport:
    """What training measured; printed by the CLI and stored in config.json."""

    out_dir: Path
    n_train: int
    n_held_out: int
    train_r2: float
    held_out_r2: float
    train_accuracy: float | None
    held_out_accuracy: float | None
    activation_mean: float
    activation_std: float

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}

    @property
    def warnings(self) -> list[str]:
        """What a user must not overlook (a held-out R² below 0 predicts worse than the mean).

        Example:
            >>> TrainReport(Path("h"), 80, 20, 0.3, -5.72, None, None, 1.0, 0.5).warnings[0][:33]
            'held-out R² -5.72 < 0: the head p'
        """
        out = []
        if self.held_out_r2 < 0:
            out.append(
                f"held-out R² {self.held_out_r2:.2f} < 0: the head predicts held-out activations "
                "worse than their mean does; try more --windows, a different --feature-layer or "
                "a linear head (no --hidden-dim)")
        return out


def log(message: str) -> None:
    """Print a line above any progress bar (through tqdm's writer), never glued to it.

    Example:
        >>> log("Trained a head")
        Trained a head
    """
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stdout)


def corpus_windows(corpus: Path | None, *, n: int, seed: int, min_words: int = 4,
                   max_words: int = 24) -> list[str]:
    """Text windows from the demo corpus, or from a text file (documents split by blank lines)."""
    from neuronpatch.demo.corpus import documents, text_windows

    if corpus is None:
        docs = documents()
    else:
        try:
            raw = corpus.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"--corpus {corpus}: cannot read ({e})") from e
        docs = [" ".join(block.split()) for block in raw.split("\n\n") if block.strip()]
    docs = [d for d in docs if len(d.split()) >= min_words]
    if not docs:
        raise InputError(f"--corpus {corpus or 'demo'}: no document has at least {min_words} "
                         "words; nothing to train on")
    return text_windows(docs, n=n, min_words=min_words, max_words=max_words, seed=seed)


def _r2(y: Tensor, pred: Tensor) -> float:
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return math.nan if ss_tot == 0 else 1.0 - ss_res / ss_tot


def _ridge(x: Tensor, y: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Closed-form ridge regression (intercept not penalised), in float64."""
    xd, yd = x.double(), y.double()
    xm, ym = xd.mean(0), yd.mean()
    xc = xd - xm
    gram = xc.T @ xc + alpha * torch.eye(xc.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, xc.T @ (yd - ym))
    b = ym - xm @ w
    return w.float(), b.float().reshape(1)


def _fit_torch(
    x: Tensor, target: Tensor, *, hidden_dim: int | None, n_out: int, classify: bool,
    epochs: int, seed: int, progress: bool,
) -> dict[str, Tensor]:
    torch.manual_seed(seed)
    d = x.shape[1]
    # Standardise inside the fit, then fold the scaling into the first layer's weights.
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    layers: list[torch.nn.Module] = []
    width = d
    if hidden_dim:
        layers += [torch.nn.Linear(d, hidden_dim), torch.nn.GELU()]
        width = hidden_dim
    layers.append(torch.nn.Linear(width, n_out))
    net = torch.nn.Sequential(*layers)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    steps = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="training", unit="epoch", leave=False, delay=1.0)
    for _ in steps:
        opt.zero_grad()
        out = net(z)
        loss = F.cross_entropy(out, target) if classify else F.mse_loss(out[:, 0], target)
        loss.backward()
        opt.step()
    first = net[0]
    assert isinstance(first, torch.nn.Linear)
    w1 = first.weight.detach() / sd
    b1 = first.bias.detach() - w1 @ mu
    if hidden_dim:
        last = net[2]
        assert isinstance(last, torch.nn.Linear)
        return {"hidden.weight": w1, "hidden.bias": b1,
                "output.weight": last.weight.detach().clone(), "output.bias": last.bias.detach().clone()}
    return {"output.weight": w1, "output.bias": b1}


def check_arguments(*, layer: int, feature_layer: int, layer_type: str = "post",
                    head_type: str = "regression", bins: int = 8, windows: int | None = 3000,
                    coordinates: str = "transformer_lens", n_layers: int | None = None) -> None:
    """Refuse a bad ``train-head`` argument in one line; the layers too when ``n_layers`` is known.

    :func:`train_head` calls it before the model loads (``n_layers`` None) and
    after; the command line calls it with the layer count of the model's
    config.json, so ``--windows 0`` or ``--layer 99`` costs no model load.
    ``windows`` None: the caller gives its own texts.

    Raises:
        InputError: the flag, its value and what is allowed.

    Example:
        >>> check_arguments(layer=99, feature_layer=2, n_layers=4)
        Traceback (most recent call last):
        neuronpatch.errors.InputError: --layer 99 is invalid; expected an int in [0, 3]
    """
    if head_type not in ("regression", "classification"):
        raise InputError(f"--type {head_type!r} is invalid; expected regression or classification")
    if layer_type not in units.LAYER_TYPES:
        raise InputError(f"--layer-type {layer_type!r} is invalid; expected one of "
                         + ", ".join((*units.UNIT_SITES, units.ROUTER)) + " (or --sae PATH --latent I)")
    if layer_type in units.EXPERT_TYPES:
        raise InputError(f"--layer-type {layer_type} is not trained by train-head: an expert neuron exists "
                         "only on the tokens routed to its expert, so most training windows have no target; "
                         "write the head's config.json with target_expert and train it on routed tokens")
    if coordinates not in ("transformer_lens", "hf"):
        raise InputError(f"--coordinates {coordinates!r} is invalid; expected transformer_lens or hf")
    if head_type == "classification" and bins < 2:
        raise InputError(f"--bins {bins} is invalid; expected at least 2")
    if windows is not None and windows < 10:
        raise InputError(f"--windows {windows} is invalid; expected at least 10")
    if n_layers is None:
        return
    if not 0 <= layer < n_layers:
        raise InputError(f"--layer {layer} is invalid; expected an int in [0, {n_layers - 1}]")
    if coordinates == "hf" and not -(n_layers + 1) <= feature_layer <= n_layers:
        raise InputError(f"--feature-layer {feature_layer} is invalid; expected an int in "
                         f"[-{n_layers + 1}, {n_layers}] (an index into hidden_states)")
    if coordinates == "transformer_lens" and not -n_layers <= feature_layer < n_layers:
        raise InputError(f"--feature-layer {feature_layer} is invalid; expected an int in "
                         f"[-{n_layers}, {n_layers - 1}] (a block whose resid_post is read)")


def dictionary_layer(sae: Path, layer: int | None) -> int:
    """The layer of a dictionary's hook; ``layer``, when given, must be it.

    Raises:
        InputError: ``layer`` is another layer; HeadConfigError: not a dictionary.
    """
    from neuronpatch import dictionaries

    own = dictionaries.read_config(sae).read.layer
    if layer is not None and layer != own:
        raise InputError(f"--layer {layer} is invalid with --sae {sae}: the dictionary reads block {own} "
                         "(drop --layer)")
    return own


def train_head(
    *,
    model: str,
    layer: int | None,
    neuron: int,
    feature_layer: int,
    out: Path,
    layer_type: str = "post",
    head_type: str = "regression",
    hidden_dim: int | None = None,
    bins: int = 8,
    intervene: bool = False,
    corpus: Path | None = None,
    windows: int = 3000,
    ridge_alpha: float = 1.0,
    epochs: int = 300,
    seed: int = 0,
    texts: Sequence[str] | None = None,
    coordinates: str = "transformer_lens",
    progress: bool = False,
    sae: Path | None = None,
) -> TrainReport:
    """Collect training pairs, fit a head, write ``config.json`` + ``head.pt`` to ``out``.

    ``sae``: a dictionary directory (SAELens' layout): the head predicts latent ``neuron`` of
    it (``layer_type`` sae; ``layer`` is the dictionary's).

    Raises:
        InputError: a flag out of range for the model, or an empty corpus.

    Example:
        >>> rep = train_head(model="neuronpatch-demo", layer=1, neuron=43,  # doctest: +SKIP
        ...                  feature_layer=2, out=Path("heads/mine"), intervene=True)
        >>> round(rep.held_out_r2, 2)                                        # doctest: +SKIP
    """
    if sae is not None:
        layer, layer_type = dictionary_layer(sae, layer), units.DICTIONARY
    if layer is None:
        raise InputError("train_head needs a layer (or a dictionary: sae)")
    block: int = layer

    def check(n_layers: int | None) -> None:
        check_arguments(layer=block, feature_layer=feature_layer, layer_type=layer_type,
                        head_type=head_type, bins=bins, windows=None if texts is not None else windows,
                        coordinates=coordinates, n_layers=n_layers)

    check(None)  # what needs no model, before it loads
    bridge = load_model(model)
    n_layers = bridge.n_layers
    from neuronpatch.heads import HeadConfig, unit_width

    unit = HeadConfig(base_model_name=model, target_layer=layer, target_neuron=neuron, layer_type=layer_type,
                      sae=None if sae is None else str(sae))
    width = unit_width(unit, bridge)
    check(n_layers)
    if not 0 <= neuron < width:
        flag, what = (("--latent", f"the latents of {sae}") if sae
                      else ("--neuron", f"the width of {layer_type}"))
        raise InputError(f"{flag} {neuron} is invalid; expected an int in [0, {width - 1}] "
                         f"({what} in {model})")
    data = list(texts) if texts is not None else corpus_windows(corpus, n=windows, seed=seed)
    # Windows of symbol-heavy text can outgrow the context; they are dropped, not truncated,
    # so every target is the activation at the window's own last token.
    n_ctx = bridge.n_ctx or 10**9
    data = [t for t in data if t.strip() and 0 < len(bridge.tokenizer(t)["input_ids"]) <= n_ctx]
    if not data:
        raise InputError("no training texts fit the model's context")

    kw = dict(layer=layer, neuron=neuron, layer_type=layer_type, feature_layer=feature_layer,
              coordinates_=coordinates, progress=progress, sae=unit.sae)
    natural_x, natural_y = collect(bridge, data, **kw)  # type: ignore[arg-type]
    if intervene:
        # Values drawn independently of the text, over the unit's natural range widened by
        # its width on each side: a wide spread of the written value against the clean
        # residual's own variation is what lets the head single the unit out.
        rng = np.random.default_rng(seed)
        lo, hi = float(natural_y.min()), float(natural_y.max())
        span = max(hi - lo, 1e-3)
        values = rng.uniform(lo - span, hi + span, size=len(data)).tolist()
        x, y = collect(bridge, data, set_values=values, **kw)  # type: ignore[arg-type]
    else:
        x, y = natural_x, natural_y

    order = np.random.default_rng(seed + 1).permutation(len(data))
    n_held = max(1, round(HELD_OUT_FRACTION * len(data)))
    held, train = torch.from_numpy(order[:n_held]), torch.from_numpy(order[n_held:])
    if len(train) < 2:
        raise InputError(f"only {len(data)} training texts; need at least 3")

    config: dict[str, Any] = {
        "base_model_name": model, "target_layer": layer, "target_neuron": neuron,
        "layer_type": layer_type, "feature_layer": feature_layer, "token_pos": "last",
        "coordinates": coordinates, "head_type": head_type,
        "head_config": {"hidden_dim": hidden_dim, "dropout": 0.0},
    }
    if sae is not None:  # relative to the head's directory, as the head reads it (or the demo's name)
        from neuronpatch.dictionaries import DEMO_SAE

        config["sae"] = DEMO_SAE if str(sae) == DEMO_SAE else os.path.relpath(Path(sae).resolve(),
                                                                            Path(out).resolve())
    acc_train = acc_held = None
    if head_type == "regression":
        if hidden_dim:
            sd = _fit_torch(x[train], y[train], hidden_dim=hidden_dim, n_out=1, classify=False,
                            epochs=epochs, seed=seed, progress=progress)
        else:
            w, b = _ridge(x[train], y[train], ridge_alpha)
            sd = {"output.weight": w[None, :], "output.bias": b}
    else:
        # Bin edges from activation quantiles: each class holds about as many examples.
        qs = torch.quantile(y[train].double(), torch.linspace(0, 1, bins + 1, dtype=torch.float64))
        edges = torch.unique(qs).float()
        if len(edges) < 3:
            raise InputError(f"the unit takes too few distinct values for {bins} bins")
        labels = torch.bucketize(y, edges[1:-1])
        sd = _fit_torch(x[train], labels[train], hidden_dim=hidden_dim, n_out=len(edges) - 1,
                        classify=True, epochs=epochs, seed=seed, progress=progress)
        config["bin_edges"] = [float(e) for e in edges]

    from neuronpatch.heads import Head, parse_config

    out.mkdir(parents=True, exist_ok=True)
    head = Head(out, parse_config(config, out / "config.json"), sd)
    pred = head.predict(x)
    if head_type == "classification":
        labels = torch.bucketize(y, torch.tensor(config["bin_edges"][1:-1]))
        logits = F.linear(F.gelu(F.linear(x, sd["hidden.weight"], sd["hidden.bias"]))
                          if hidden_dim else x, sd["output.weight"], sd["output.bias"])
        hit = (logits.argmax(-1) == labels).float()
        acc_train, acc_held = float(hit[train].mean()), float(hit[held].mean())
    report = TrainReport(
        out_dir=out, n_train=len(train), n_held_out=len(held),
        train_r2=_r2(y[train], pred[train]), held_out_r2=_r2(y[held], pred[held]),
        train_accuracy=acc_train, held_out_accuracy=acc_held,
        activation_mean=float(natural_y.mean()), activation_std=float(natural_y.std()),
    )
    config["training"] = {
        "data": "interventional" if intervene else "natural",
        "corpus": str(corpus) if corpus else "neuronpatch demo corpus",
        "windows": len(data), "seed": seed,
        **{k: v for k, v in report.as_dict().items() if k != "out_dir"},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    torch.save({k: v.contiguous() for k, v in sd.items()}, out / "head.pt")
    return report
