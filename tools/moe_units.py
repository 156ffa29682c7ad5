"""Write docs/moe-units.md: which mixture-of-experts families serve expert neurons and router logits.

    python tools/moe_units.py            # rewrite docs/moe-units.md

For every causal-LM family the installed transformers can build as a tiny random model
(the conformance harness's models, :func:`neuronpatch.testing.tiny_model`) whose blocks
route tokens to experts, one probe per unit kind is run on the last mixture-of-experts
block: ``expert_post`` (neuron 1 of expert 0) and ``router`` (the logit of expert 1), set to
0 and 1 on six short inputs. A family *serves* the unit when the engine's load checks
pass and the patch is confirmed (the experts' output is the routing-weighted sum of each
expert's down projection; the router's first output is the logits of its weight);
otherwise the line says why, as the engine does. Exactness against a written-out
reference is tested on Mixtral, Qwen2-MoE and OLMoE (``tests/engine/test_expert_neurons.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "moe-units.md"
TEXTS = ["The cat sat on the mat today.", "Numbers 3 4 5 and more", "A quick one",
         "Transformers use attention mechanisms to process long sequences.", "Seven silver spoons",
         "Where did the river go?"]
UNITS = {"expert neuron": dict(layer_type="expert_post", target_neuron=1, target_expert=0),
         "router logit": dict(layer_type="router", target_neuron=1)}


def scan(root: Path) -> list[tuple[str, int, dict[str, str]]]:
    """``(model type, block, {unit kind: "served (route, k of 6 inputs routed)" or why not})``."""
    import transformers

    from neuronpatch import run_experiment
    from neuronpatch.conformance import candidate_types
    from neuronpatch.errors import NeuronpatchError
    from neuronpatch.models import load_model
    from neuronpatch.testing import tiny_model, write_head

    transformers.logging.set_verbosity_error()
    rows = []
    for mt in candidate_types():
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                path = tiny_model(root / mt, mt)
                model = load_model(str(path), device="cpu")
        except Exception:
            continue
        sparse = [L for L, s in enumerate(model.arch.moe or []) if s is not None]
        if not sparse:
            continue
        layer, cells = sparse[-1], {}
        for kind, cfg in UNITS.items():
            head = write_head(root / f"head-{mt}-{cfg['layer_type']}", path, target_layer=layer,
                              feature_layer=-1, **cfg)  # type: ignore[arg-type]
            try:
                res = run_experiment(head, TEXTS, set=[0.0, 1.0], device="cpu", model=model)
                routed = f", routed on {len(res.inputs)} of {len(TEXTS)} inputs"
                cells[kind] = f"served (route {res.method}{routed if kind == 'expert neuron' else ''})"
            except NeuronpatchError as e:
                msg = str(e)
                why = msg.split(" refused: ", 1)[-1] if " refused: " in msg else msg.split(": ", 1)[-1]
                cells[kind] = "refused: " + why.replace("|", "/")
        rows.append((mt, layer, cells))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=PAGE)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch
    import transformers

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = scan(Path(tmp))
    served = {k: sum(c[k].startswith("served") for _, _, c in rows) for k in UNITS}
    lines = [
        "# Mixture-of-experts units by family", "",
        f"Written by `python tools/moe_units.py` in {time.perf_counter() - t0:.0f} s with torch "
        f"{torch.__version__}, transformers {transformers.__version__}.", "",
        "Each family is a tiny random model (every parameter random); one probe per unit kind runs on "
        "its last mixture-of-experts block: an expert neuron (`layer_type: expert_post`, expert 0, "
        "neuron 1) and a router logit (`layer_type: router`, expert 1), set to 0 and 1 on six short "
        "inputs. *Served* means the engine's load checks passed and every patch was confirmed; "
        "exactness against a written-out reference is tested on Mixtral, Qwen2-MoE and OLMoE "
        "([expert neurons and routers](concepts/experts.md)). A refusal gives the engine's reason.", "",
        f"**Expert neurons served on {served['expert neuron']} of {len(rows)} families, router logits on "
        f"{served['router logit']}.**", "",
        "| family | block | expert neuron | router logit |", "| --- | ---: | --- | --- |",
        *(f"| {mt} | {layer} | {c['expert neuron']} | {c['router logit']} |" for mt, layer, c in rows),
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}: {len(rows)} families")


if __name__ == "__main__":
    main()
