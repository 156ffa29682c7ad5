"""Repository-wide pytest setup: offline Hugging Face, headless matplotlib.

These are set before any test imports transformers or matplotlib, so no test
can wait on the network or try to open a window.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

# Under pytest-xdist each worker takes its share of the cores for torch's thread pool, unless
# the caller chose a thread count. Two workers with a thread per core each oversubscribe the
# machine, and OpenMP's spinning threads then wait on each other: on a fresh clone on 2 quiet
# cores the suite took 338 s with two threads per worker against 220 s with one, and far
# longer when other jobs loaded the machine. This is set before anything imports torch.
# `make test-threads` runs the tests that compare routes and batch shapes again in one
# process at torch's default thread count.
_workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
if _workers and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(_workers)))


import time  # noqa: E402  (the environment above must be set before anything else loads)
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _every_summary_written_follows_the_schema(tmp_path_factory, request):
    """Every summary.json this session wrote (pytester runs included) validates."""
    started = time.time() - 1
    yield
    import json

    import jsonschema

    from neuronpatch.artifacts import summary_schema

    validator = jsonschema.Draft202012Validator(summary_schema())
    roots = [tmp_path_factory.getbasetemp(), request.config.rootpath / ".neuronpatch"]
    problems = []
    for root in roots:
        for path in Path(root).rglob("summary.json"):
            if path.stat().st_mtime < started:
                continue
            for error in validator.iter_errors(json.loads(path.read_text(encoding="utf-8"))):
                where = "/".join(map(str, error.absolute_path)) or "<root>"
                problems.append(f"{path}: {where}: {error.message}")
    assert not problems, "summary.json files that break the schema:\n" + "\n".join(problems[:20])
