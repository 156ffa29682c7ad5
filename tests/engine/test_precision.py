"""Numbers in reduced precision carry a measured rounding error, and verdicts respect it.

The reference for every claim here is independent of the engine: HF run input by input
with plain forward hooks in float32 (``tests/hf_oracle.py``), the slope fitted by numpy,
and the worst-case bounds checked against every sign pattern of the row errors.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from neuronpatch import run_experiment
from neuronpatch.engine import DEFAULT_INPUTS, float32_weights, weights_in
from neuronpatch.models import load_model
from neuronpatch.probes.expectations import Measurements, check
from neuronpatch.stats import rounding_bounds
from neuronpatch.testing import PRECISION_HEADS, tiny_model, write_head
from tests.engine.test_architectures import ARCHS
from tests.hf_oracle import Oracle, head_predict

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
SCALES = (0.0, 0.5, 1.5, 2.0, 3.0, 5.0, -1.0, 10.0)
# The matrix runs the seed notebook's first four inputs and six of the factors (the HF reference
# runs input by input: this keeps the fixture near 20 s on two cores).
MATRIX_INPUTS = DEFAULT_INPUTS[:4]
MATRIX_SCALES = SCALES[:6]
HEADS = PRECISION_HEADS


# ----- the bounds themselves ---------------------------------------------------------


def test_slope_and_intercept_bounds_are_the_worst_sign_pattern() -> None:
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=7), rng.normal(size=7)
    eps = 0.01
    got = rounding_bounds(x, y, eps)
    worst = {"slope": 0.0, "intercept": 0.0, "r_squared": 0.0}
    base = np.polyfit(x, y, 1)
    r2 = np.corrcoef(x, y)[0, 1] ** 2
    for signs in itertools.product((-1.0, 1.0), repeat=7):
        moved = np.polyfit(x, y + eps * np.array(signs), 1)
        worst["slope"] = max(worst["slope"], abs(moved[0] - base[0]))
        worst["intercept"] = max(worst["intercept"], abs(moved[1] - base[1]))
        worst["r_squared"] = max(worst["r_squared"],
                                 abs(np.corrcoef(x, y + eps * np.array(signs))[0, 1] ** 2 - r2))
    assert got["slope"] == pytest.approx(worst["slope"], rel=1e-9)
    assert got["intercept"] == pytest.approx(worst["intercept"], rel=1e-9)
    # R²'s bound is first order here (errors small against y's spread): within 5% of the truth.
    assert worst["r_squared"] <= got["r_squared"] * 1.05
    assert got["r_squared"] <= worst["r_squared"] * 1.05


def test_r_squared_bound_when_rounding_swamps_the_effect() -> None:
    x = np.repeat(np.linspace(-1, 1, 8)[None], 4, 0).ravel()
    y = 1e-3 * x  # the effect is a tenth of the rounding error
    got = rounding_bounds(x, y, 1e-2)
    assert got["r_squared"] == pytest.approx(1.0)  # R² 1 could be anything in [0, 1]
    assert got["slope"] > 1e-3


# ----- coverage over the architecture matrix -------------------------------------------


def _reference_fit(oracle: Oracle, head: Path, cfg: dict) -> dict[str, float]:
    """The float32 slope, intercept and R² from HF run directly, input by input, fitted by numpy."""
    full = {"head_type": "regression", "target_neuron": 5, **cfg}
    digits = oracle.digit_ids() if full["head_type"] == "token" else None
    xs, ys = [], []
    for text in MATRIX_INPUTS:
        read = len(oracle.ids(text)) - 1
        clean_a, _, clean_f = oracle.run(text, cfg=full, patch=([read], 1.0, 0.0))
        clean_p = head_predict(head, clean_f, digits)
        for s in MATRIX_SCALES:
            _, a, f = oracle.run(text, cfg=full, patch=([read], s, 0.0))
            assert a is not None
            xs.append(a - clean_a)
            ys.append(head_predict(head, f, digits) - clean_p)
    x, y = np.array(xs), np.array(ys)
    slope, intercept = np.polyfit(x, y, 1)
    return {"slope": float(slope), "intercept": float(intercept),
            "r_squared": float(np.corrcoef(x, y)[0, 1] ** 2)}


def _oracle_in(model_dir: Path, dtype: str) -> Oracle:
    """HF in float32 with the checkpoint's weights rounded to ``dtype``: the model a run in
    ``dtype`` computes with, in exact-enough arithmetic."""
    oracle = Oracle(model_dir)
    with torch.no_grad():
        for t in oracle.model.parameters():
            t.copy_(t.to(getattr(torch, dtype)).float())
    return oracle


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Every (architecture, head, reduced dtype) cell: the result and the float32 reference of
    the same (rounded) weights."""
    cells = []
    root = tmp_path_factory.mktemp("precision")
    for arch in ARCHS:
        model_dir = tiny_model(root / arch, arch)
        oracles = {dtype: _oracle_in(model_dir, dtype) for dtype in ("bfloat16", "float16")}
        for name, cfg in HEADS.items():
            cfg = dict(cfg)
            kw = {k: cfg.pop(k) for k in ("hidden_dim", "head_type") if k in cfg}
            head = write_head(root / f"{arch}-{name}", model_dir, target_neuron=5, **kw, **cfg)
            for dtype, oracle in oracles.items():
                want = _reference_fit(oracle, head, {**cfg, **{k: v for k, v in kw.items()
                                                                if k == "head_type"}})
                res = run_experiment(head, list(MATRIX_INPUTS), scale=list(MATRIX_SCALES), device="cpu",
                                     dtype=dtype)
                cells.append({"cell": f"{arch} {name} {dtype}", "result": res, "float32": want})
    return cells


def _missed(matrix: list[dict], metric: str) -> list[str]:
    out = []
    for c in matrix:
        got, want = getattr(c["result"], metric), c["float32"][metric]
        if np.isfinite(got) and np.isfinite(want) and abs(got - want) > c["result"].numerical_error[metric]:
            out.append(c["cell"])
    return out


def test_the_float32_fit_lies_within_the_reported_error(matrix: list[dict]) -> None:
    """Nearly every cell: the bound covers the dtype's arithmetic, not the rounding of a float32
    checkpoint's weights to bfloat16, which makes a slightly different model. On these four
    inputs and six factors, when this was written: 109 of 112 slopes, 111 of 112 intercepts and
    110 of 112 R² (benchmarks/bench_precision.py reports the count on eight inputs)."""
    assert len(matrix) == len(ARCHS) * len(HEADS) * 2
    for metric in ("slope", "intercept", "r_squared"):
        missed = _missed(matrix, metric)
        print(f"float32 {metric} within the reported error in {len(matrix) - len(missed)} of "
              f"{len(matrix)} cells; outside: {missed}")
        assert len(missed) <= 4, (metric, missed)


def test_the_error_is_honest_not_everything(matrix: list[dict]) -> None:
    # Errors are bounds, not a blanket: in most cells they are a small share of the slope.
    shares = [c["result"].numerical_error["slope"] / max(abs(c["result"].slope), 1e-12) for c in matrix]
    assert float(np.median(shares)) < 0.5
    assert all(c["result"].rounding.inputs for c in matrix)  # each measured by a re-run
    assert all(c["result"].rounding.dtype in ("bfloat16", "float16") for c in matrix)


def test_float32_rows_stay_within_the_float32_bound(tmp_path: Path) -> None:
    """The fixed float32 bound against a float64 run of the same weights, on three architectures."""
    for arch in ("gpt2", "llama", "qwen2"):
        model_dir = tiny_model(tmp_path / arch, arch)
        head = write_head(tmp_path / f"{arch}-head", model_dir, target_neuron=5, target_layer=1)
        model = load_model(model_dir, device="cpu")
        res = run_experiment(head, model=model, scale=list(SCALES))
        with weights_in(model, torch.float64):
            ref = run_experiment(head, model=model, scale=list(SCALES))
        gap = float(np.abs(res.prediction_change - ref.prediction_change).max())
        assert res.rounding is not None
        assert gap <= res.rounding.row_error, (arch, gap, res.rounding.row_error)


def test_float32_weights_cast_each_block_as_it_runs_and_restore_the_model_bit_for_bit(tmp_path: Path) -> None:
    model = load_model(tiny_model(tmp_path / "m", "llama"), device="cpu", dtype="bfloat16")
    before = {k: v.clone() for k, v in model.hf.state_dict().items()}
    ids = torch.tensor([[5, 9, 2, 7, 3]])
    seen: list[tuple[set[torch.dtype], set[torch.dtype]]] = []
    probe = model.arch.mlp_out_proj[1].register_forward_pre_hook(
        lambda mod, args: seen.append(({p.dtype for p in model.arch.blocks[1].parameters()},
                                       {p.dtype for p in model.arch.blocks[0].parameters()})))
    try:
        with float32_weights(model):
            assert all(p.dtype == torch.bfloat16 for p in model.hf.parameters())  # nothing cast until it runs
            with torch.inference_mode():
                lazy = model.hf(input_ids=ids).logits
        with weights_in(model, torch.float32), torch.inference_mode():
            eager = model.hf(input_ids=ids).logits
    finally:
        probe.remove()
    # While block 1 runs, its weights are float32 and block 0's are back in bfloat16.
    assert seen[0] == ({torch.float32}, {torch.bfloat16}) and len(seen) == 2
    assert lazy.dtype == torch.float32
    torch.testing.assert_close(lazy, eager, rtol=1e-6, atol=1e-6)
    after = model.hf.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_the_rerun_reuses_the_state_the_run_kept(tmp_path: Path) -> None:
    # In bfloat16 the rounding re-run of a folded kv batch starts from the prefix state the run
    # kept: block 0 (below the unit) computes once per run, for the run's own prefix pass.
    model = load_model(tiny_model(tmp_path / "m", "gpt2"), device="cpu", dtype="bfloat16")
    head = write_head(tmp_path / "h", tmp_path / "m", target_layer=1, target_neuron=5, feature_layer=-1)
    run_experiment(head, model=model, scale=list(SCALES))  # the growth check runs once
    calls: list[tuple[int, ...]] = []
    hook = model.arch.mlp_out_proj[0].register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape))
    try:
        res = run_experiment(head, model=model, scale=list(SCALES))
    finally:
        hook.remove()
    assert res.method == "kv" and res.rounding is not None and res.rounding.inputs
    assert "over their shared prefix state" in res.rounding.method
    assert len(calls) == 1 and calls[0][0] == len(DEFAULT_INPUTS)  # the run's prefix pass, all inputs


def test_bfloat16_serves_mlp_out_and_matches_float32_within_its_error(tmp_path: Path) -> None:
    # A block adds its writes in bfloat16: the site check must allow that rounding, or every
    # mlp_out / attn_out unit is refused in reduced precision.
    model_dir = tiny_model(tmp_path / "m", "gpt2")
    head = write_head(tmp_path / "h", model_dir, target_neuron=5, target_layer=1, layer_type="mlp_out",
                      feature_layer=1)
    low = run_experiment(head, device="cpu", dtype="bfloat16")
    ref = run_experiment(head, device="cpu", dtype="float32")
    assert abs(low.slope - ref.slope) <= low.numerical_error["slope"]


# ----- verdicts ------------------------------------------------------------------------


def test_a_bound_within_the_error_is_inconclusive_and_far_ones_decide() -> None:
    m = Measurements(values={"slope": -0.515}, numerical={"slope": 0.09}, precision="bfloat16")
    near, inside, outside = (check(m, {"slope": r})[0] for r in ([-0.55, -0.3], [-1, 0], [0.5, 1]))
    assert near.status == "inconclusive"
    assert near.measured_text == "-0.515 ± 0.09"
    assert near.details == ("inconclusive: bfloat16 rounding moves the slope by up to 0.09, across the "
                            "expected range's edge; run in float32 to decide",)
    assert (inside.status, outside.status) == ("pass", "fail")
    confident = check(Measurements(values={"slope": -0.515}, numerical={"slope": 0.09},
                                   precision="bfloat16", interval=lambda _m, _l: (-0.52, -0.51)),
                      {"slope": {"max": -0.5, "confidence": 0.95}})[0]
    assert confident.status == "inconclusive"  # the interval clears the edge, rounding does not


FOUR = ["The cat sat on the mat.", "Open the file before you read from it.",
        "This module provides access to the operating system.",
        "The result is a new list; the original is unchanged."]


def test_pytest_reports_a_bfloat16_claim_inside_its_error_as_inconclusive(pytester: pytest.Pytester) -> None:
    # demo_final on these four inputs in bfloat16: slope 0.865 ± 0.056 on an Intel Xeon, 0.866 ±
    # 0.072 on an AMD EPYC without AVX-512 (CPUs round bfloat16 matrix products differently);
    # float32: 0.869. Every claim below is decided the same way on both.
    run_experiment(ROOT / "probes" / "heads" / "demo_final", inputs=["warm up"], set=[0, 1])
    shutil.copytree(ROOT / "probes" / "heads" / "demo_final", pytester.path / "heads" / "demo_final")

    def probe(name: str, rng: str) -> str:
        return textwrap.dedent(f"""
            name: {name}
            head: heads/demo_final
            inputs: {json.dumps(FOUR)}
            interventions: {{set: [-0.5, 0, 0.5, 1, 1.5, 2, 2.5, 3]}}
            engine: {{dtype: bfloat16}}
            expect: {{slope: {rng}}}
            """).strip() + "\n"

    (pytester.path / "claims.probe.yaml").write_text(
        "---\n".join([probe("near", "{max: 0.9}"), probe("far", "{max: 1.2}"), probe("wrong", "{min: 1.2}")]))
    pytester.makefile(".toml", pyproject='[tool.pytest.ini_options]\nneuronpatch_figures = "none"\n')
    result = pytester.runpytest("-p", "no:cacheprovider", "-v", "--neuronpatch-report", "report.html")
    result.assert_outcomes(passed=1, failed=2)
    page = (pytester.path / "report.html").read_text()
    lines = re.findall(r"numerical error: slope 0\.86\d ± 0\.0[5-9]\d?, R² 0\.99\d ± 0\.00\d+ "
                       r"from bfloat16 rounding", page)
    assert len(lines) == 3 and len(set(lines)) == 1  # one line per probe, all the same run
    result.stdout.fnmatch_lines_random([
        "*INCONCLUSIVE  slope  = 0.86* ± 0.0*  expected ≤ 0.9*",
        "*bfloat16 rounding moves the slope by up to 0.0*, across the expected range's edge; "
        "run in float32 to decide*",
        "*FAIL  slope  = 0.86* ± 0.0*  expected ≥ 1.2*",
    ])
    summaries = [json.loads(p.read_text()) for p in
                 (pytester.path / ".neuronpatch" / "artifacts").glob("*/summary.json")]
    assert len(summaries) == 3
    for s in summaries:
        num = s["numerical_error"]
        assert num["dtype"] == "bfloat16" and len(num["inputs_rerun"]) == 1
        assert 0 < num["slope"] < 0.2 and num["row_error"] > 0
