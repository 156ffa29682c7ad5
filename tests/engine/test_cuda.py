"""The engine on CUDA: the same numbers as on the CPU in float32, and honest errors in bfloat16.

Skipped, saying why, where torch sees no CUDA device (CI has none). On a machine with one,
``benchmarks/bench_device.py`` runs the same comparison over the whole architecture matrix
and times the engine there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from neuronpatch import run_experiment
from neuronpatch.engine import KV_CACHE_BYTES, kv_cache_budget
from neuronpatch.testing import tiny_model, write_head
from tests.engine.test_architectures import ARCHS

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device on this machine (torch.cuda.is_available() is False)")


def test_the_kv_budget_comes_from_the_device() -> None:
    assert kv_cache_budget("cpu") == KV_CACHE_BYTES
    assert kv_cache_budget("cuda:0", free_bytes=64 * 2**30) == 8 * 2**30
    assert kv_cache_budget("cuda:0", free_bytes=2**20) == KV_CACHE_BYTES  # never below the CPU's


@needs_cuda
def test_cuda_budget_reads_the_free_memory() -> None:
    free, _total = torch.cuda.mem_get_info()
    assert kv_cache_budget("cuda") == max(KV_CACHE_BYTES, free // 8)


@needs_cuda
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_matches_the_cpu(arch: str, tmp_path: Path) -> None:
    model_dir = tiny_model(tmp_path / arch, arch)
    head = write_head(tmp_path / "head", model_dir, target_layer=1, target_neuron=5, feature_layer=-1)
    cpu = run_experiment(head, device="cpu")
    gpu = run_experiment(head, device="cuda")
    scale = max(1.0, float(np.abs(cpu.patched_prediction).max()))
    for name in ("clean_activation", "clean_prediction", "patched_activation", "patched_prediction"):
        gap = float(np.abs(getattr(gpu, name) - getattr(cpu, name)).max())
        assert gap <= 1e-4 * scale, (arch, name, gap)
    low = run_experiment(head, device="cuda", dtype="bfloat16")
    assert abs(low.slope - cpu.slope) <= low.numerical_error["slope"], (arch, low.slope, cpu.slope)
