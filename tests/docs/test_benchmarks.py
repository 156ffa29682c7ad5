"""The benchmark scripts run end to end on tiny models and write their tables; the floor is honest.

Each script's ``main`` runs on a tiny configuration (``--tiny``: 2-layer models
with d_model 64; one repetition) with ``--out`` in a temporary folder, and the
file it wrote must hold the header and the table with the expected columns and
finite positive ratios. No timing bound is ever asserted: these numbers mean
nothing, only that the measuring path works.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import random
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    """Import a benchmark script by name (they import each other as top-level modules).

    ``--threads 1`` (which a script may set) is undone afterwards.
    """
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    threads = torch.get_num_threads()

    def load(name: str) -> ModuleType:
        return sys.modules[name] if name in sys.modules else importlib.import_module(name)

    yield load
    torch.set_num_threads(threads)


def table(path: Path, script: str) -> list[dict[str, str]]:
    """The rows of the markdown table in ``path``, after checking its header line."""
    text = path.read_text()
    assert text.startswith(f"# {script}\n"), text[:200]
    assert f"Produced by `python benchmarks/{script}.py " in text
    assert "torch " in text and "load average (1, 5, 15 min)" in text and " at the end." in text
    lines = [x for x in text.splitlines() if x.startswith("|")]
    cells = [[c.strip() for c in x.strip("|").split("|")] for x in lines]
    head, sep, *rows = cells
    assert all(set(c) <= set("-: ") for c in sep)
    assert rows, text
    return [dict(zip(head, r, strict=True)) for r in rows]


def number(cell: str) -> float:
    """The leading number of a cell such as ``**2.61** (2.50–2.70)``."""
    m = re.match(r"\**(-?[\d.]+)", cell)
    assert m, f"no number in {cell!r}"
    return float(m.group(1))


def positive(row: dict[str, str], *columns: str) -> None:
    """Ratios: finite and positive."""
    for col in columns:
        x = number(row[col])
        assert math.isfinite(x) and x > 0, (col, row[col])


def measured(row: dict[str, str], *columns: str) -> None:
    """Seconds and megabytes: finite, not negative (a tiny model's run can print as 0.00 s)."""
    for col in columns:
        x = number(row[col])
        assert math.isfinite(x) and x >= 0, (col, row[col])


def test_bench_engine_writes_its_table(bench, tmp_path):
    out = tmp_path / "engine.md"
    columns = ["engine", "hooks", "seed"]
    if importlib.util.find_spec("nnsight") is not None:
        columns.append("nnsight")
    bench("bench_engine").main(["--tiny", "--archs", "gpt2", "--repeats", "2", "--reference-repeats", "1",
                                "--tokens", "16", "64",
                                "--threads", "1", "--columns", *columns, "--out", str(out)])
    rows = table(out, "bench_engine")
    assert [(r["architecture"], r["tokens"]) for r in rows] == [("gpt2", "16"), ("gpt2", "64")]
    for r in rows:
        measured(r, "floor s")
        positive(r, "engine × floor (min–max)", "HF hooks, one pass × floor", "seed loop × floor")
        if "nnsight" in columns:
            positive(r, "nnsight, one trace × floor")
        assert r["route"]


def test_bench_rank_writes_its_table(bench, tmp_path):
    out = tmp_path / "rank.md"
    bench("bench_rank").main(["--tiny", "--repeats", "1", "--out", str(out)])
    (row,) = table(out, "bench_rank")
    measured(row, "floor s")
    positive(row, "rank top 20 × floor (min–max)", "CPU time × floor", "rank top 1 × floor")
    assert math.isfinite(number(row["top 20 − top 1 × floor"]))  # a difference: may be negative in noise
    assert row["method"] == "screen"


def test_bench_controls_writes_its_table(bench, tmp_path):
    out = tmp_path / "controls.md"
    bench("bench_controls").main(["--tiny", "--repeats", "1", "--cases", "final, 8 unit controls",
                                  "--out", str(out)])
    (row,) = table(out, "bench_controls")
    measured(row, "floor s", "without s", "with s")
    positive(row, "without × floor", "with × floor",
             "with ÷ without, wall (min–max)", "with ÷ without, CPU time (min–max)")


def test_bench_scale_writes_its_table(bench, tmp_path):
    out = tmp_path / "scale.md"
    bench("bench_scale").main(["--tiny", "--inputs", "3", "--out", str(out)])  # (one size: a process each)
    (row,) = table(out, "bench_scale")
    assert row["inputs (× 8 factors)"] == "3" and row["per input ÷ smallest size's"] == "1.00"
    measured(row, "engine s", "ms per input", "floor s")
    positive(row, "engine × floor", "RSS after load MB", "peak RSS MB")
    assert number(row["peak RSS MB"]) >= number(row["RSS after load MB"])


def test_bench_cache_writes_its_table(bench, tmp_path):
    probe = tmp_path / "one.probe.yaml"
    probe.write_text(f"name: one\nhead: {ROOT / 'probes' / 'heads' / 'demo_causal'}\n"
                     "interventions: {set: [0, 1]}\nexpect:\n  slope: [0.8, 1.2]\n")
    out = tmp_path / "cache.md"
    bench("bench_cache").main(["--repeats", "1", "--probes", str(probe), "--out", str(out)])
    rows = table(out, "bench_cache")
    assert [r["repetition"] for r in rows] == ["1", "median"]
    measured(rows[0], "cold s", "warm s")
    positive(rows[0], "warm / cold")
    assert rows[0]["cache (warm run)"].startswith("1 hit")


def test_bench_collect_writes_its_table(bench, tmp_path):
    out = tmp_path / "collect.md"
    bench("bench_collect").main(["--files", "2", "--repeats", "1", "--out", str(out)])
    (row,) = table(out, "bench_collect")
    measured(row, "pytest's collection s (median)", "whole process s (median)")
    assert row["heavy modules imported"] == "none"


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama"])
def test_the_floor_never_runs_the_lm_head(bench, tmp_path, arch):
    import torch

    from neuronpatch import load_model
    from neuronpatch.testing import tiny_model

    be = bench("bench_engine")
    model = load_model(str(tiny_model(tmp_path / arch, arch)), device="cpu")
    fired: list[int] = []
    handle = model.hf.get_output_embeddings().register_forward_hook(lambda *a: fired.append(1))
    try:
        texts = be.inputs(random.Random(0), 3, 6)
        state = be.floor(model, texts)
        assert fired == []
        ids, mask, pos = be.left_padded(model, texts)
        assert state.shape == (*ids.shape, model.d_model)
        # The same final state as the causal-LM class computes (the padding and positions are right).
        with torch.inference_mode():
            full = model.hf(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True)
        assert fired == [1]
        last = mask.bool()
        torch.testing.assert_close(state[last], full.hidden_states[-1][last], rtol=1e-4, atol=1e-5)
        # The token head's floor runs the LM head at one position only.
        logits = be.token_floor(model, texts)
        assert fired == [1, 1] and logits.shape == (len(texts), 1, model.vocab_size)
    finally:
        handle.remove()


def test_benchmarks_use_only_public_names_of_neuronpatch():
    import ast

    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        tree = ast.parse(script.read_text())
        modules: set[str] = set()  # local names bound to anything imported from neuronpatch
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("neuronpatch"):
                parts = [*(node.module or "").split("."), *(a.name for a in node.names)]
                assert not any(p.startswith("_") for p in parts), (script.name, parts)
                modules.update(a.asname or a.name for a in node.names)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("neuronpatch"):
                        assert not any(p.startswith("_") for p in a.name.split(".")), (script.name, a.name)
                        modules.add(a.asname or a.name.split(".")[0])
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and isinstance(node.value, ast.Name) and node.value.id in modules):
                raise AssertionError(f"{script.name}:{node.lineno}: {node.value.id}.{node.attr}")


def _rows_after(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after ``heading``, as lists of cells."""
    rows: list[list[str]] = []
    for line in text.split(heading, 1)[1].splitlines():
        if line.startswith("|"):
            if not line.startswith("| ---"):
                rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows[1:]  # the first row is the header


def test_bench_precision_writes_its_tables(bench, tmp_path):
    out = tmp_path / "precision.md"
    bench("bench_precision").main(["--tiny", "--archs", "llama", "--repeats", "1", "--out", str(out)])
    text = out.read_text()
    assert text.startswith("# bench_precision\n")
    assert "Produced by `python benchmarks/bench_precision.py " in text
    matrix = _rows_after(text, "## Slope errors over the architecture matrix")
    assert [r[0] for r in matrix[:1]] == ["llama"]
    for r in matrix[:1]:
        assert all(c.endswith("%") for c in (r[2], r[3], r[5], r[6])), r
        assert r[4].endswith("/4") and r[7].endswith("/4"), r
    assert "bfloat16 " in text and " of 4." in text  # the coverage sentence counts the cells
    cost = _rows_after(text, "## Cost of measuring it")
    assert [r[0] for r in cost] == ["bfloat16", "float16"]
    for r in cost:
        measured({"run": r[1], "part": r[2]}, "run", "part")
        assert r[3].startswith("**") and "%" in r[3]


def test_bench_device_runs_on_the_cpu_as_a_smoke_test(bench, tmp_path):
    out = tmp_path / "device.md"
    bench("bench_device").main(["--device", "cpu", "--tiny", "--archs", "gpt2", "--repeats", "1",
                                "--out", str(out)])
    text = out.read_text()
    numbers = _rows_after(text, "## Numbers on CPU")
    assert [r[0] for r in numbers] == ["gpt2"]
    assert all(float(r[1]) <= 1e-4 and r[5] == "yes" for r in numbers), numbers
    speed = _rows_after(text, "## Speed on CPU")
    assert len(speed) == 4 and all(r[5] in ("kv", "linear", "full") for r in speed), speed
    for r in speed:
        positive({"e": r[3], "h": r[4]}, "e", "h")
    assert "rank_units s" in text
