"""Repository-wide pytest setup: offline Hugging Face, headless matplotlib.

These are set before any test imports transformers or matplotlib, so no test
can wait on the network or try to open a window.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


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
