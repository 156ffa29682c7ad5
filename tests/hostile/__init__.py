"""Run one hostile case in a fresh interpreter, bounded in time and memory.

Every case of the hostile catalogue (``tests/hostile/test_hostile_*.py``) calls one
function of neuronpatch in a child process that has imported that function's
module, then caps its own address space at what it uses plus
:data:`MEMORY_MB` (``RLIMIT_AS``) before the call. A regression that reads
``/dev/zero`` whole or expands an alias bomb therefore dies of ``MemoryError``
in the child instead of exhausting the test machine, and the case reports the
call's time and peak-RSS growth, which the catalogue bounds by
:data:`SECONDS` and :data:`MEMORY_MB`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SECONDS = 2.0  # a case that should fail fast fails within this
MEMORY_MB = 500  # ... and grows the process by less than this

_CHILD = r"""
import importlib, json, os, resource, sys, time

spec = json.loads(open(sys.argv[1]).read())
module, _, name = spec["call"].partition(":")
target = getattr(importlib.import_module(module), name)
limits = importlib.import_module("neuronpatch.limits")

def resolve(v):
    if isinstance(v, dict) and set(v) == {"limit"}:
        return getattr(limits, v["limit"])
    if isinstance(v, dict) and set(v) == {"error"}:
        return getattr(importlib.import_module("neuronpatch.errors"), v["error"])
    return v

args = [resolve(a) for a in spec["args"]]
kwargs = {k: resolve(v) for k, v in spec["kwargs"].items()}

def vm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0

headroom = spec["memory_mb"] * 1024 * 1024
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
cap = vm_bytes() + headroom
if hard != resource.RLIM_INFINITY:
    cap = min(cap, hard)
resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {"returned": None, "error": None, "classes": [], "message": None}
t0 = time.perf_counter()
try:
    out["returned"] = repr(target(*args, **kwargs))[:2000]
except BaseException as e:
    out["error"] = type(e).__name__
    out["classes"] = [c.__name__ for c in type(e).__mro__]
    out["message"] = str(e)
out["seconds"] = time.perf_counter() - t0
out["rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
out["imported_torch"] = "torch" in sys.modules
sys.stdout.flush()
sys.stderr.flush()
with open(spec["result"], "w") as f:
    json.dump(out, f)
"""


@dataclass(frozen=True)
class Outcome:
    """What one bounded call did."""

    returned: str | None
    error: str | None
    classes: list[str]
    message: str | None
    seconds: float
    rss_growth_mb: float
    imported_torch: bool
    stdout: str
    stderr: str


def run_bounded(call: str, *args: Any, env: dict[str, str] | None = None, memory_mb: int = MEMORY_MB,
                cwd: Path | None = None, **kwargs: Any) -> Outcome:
    """Call ``module:function(*args, **kwargs)`` in a child process within ``memory_mb``.

    Arguments must be JSON; ``{"limit": "JSON_DEPTH"}`` stands for
    ``neuronpatch.limits.JSON_DEPTH`` and ``{"error": "BaselineError"}`` for that class.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="hostile-") as d:
        spec_path, result = Path(d) / "spec.json", Path(d) / "result.json"
        spec_path.write_text(json.dumps({"call": call, "args": list(args), "kwargs": kwargs,
                                         "memory_mb": memory_mb, "result": str(result)}))
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("NEURONPATCH_MAX_")}
        child_env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg"})
        child_env.update(env or {})
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(spec_path)], capture_output=True,
                              text=True, timeout=120, env=child_env, cwd=cwd,
                              stdin=subprocess.DEVNULL)
        assert result.exists(), f"the child died (status {proc.returncode}):\n{proc.stderr[-3000:]}"
        data = json.loads(result.read_text())
    return Outcome(stdout=proc.stdout, stderr=proc.stderr, **data)


def assert_refused(outcome: Outcome, error: str, message: str) -> None:
    """The call raised ``error`` (a NeuronpatchError) with exactly ``message``, fast and small."""
    assert outcome.error == error, (outcome.error, outcome.message, outcome.returned)
    assert "NeuronpatchError" in outcome.classes
    assert outcome.message == message
    assert "\n" not in message
    assert_bounded(outcome)


def assert_cli_refused(outcome: Outcome, message: str) -> None:
    """``neuronpatch.cli.main`` returned 2 and printed exactly one error line, no traceback."""
    assert outcome.error is None, (outcome.error, outcome.message)
    assert outcome.returned == "2", (outcome.returned, outcome.stderr[-2000:])
    assert "Traceback" not in outcome.stderr + outcome.stdout
    assert outcome.stderr == f"neuronpatch: error: {message}\n"
    assert_bounded(outcome)


def assert_bounded(outcome: Outcome) -> None:
    assert outcome.seconds < SECONDS, f"took {outcome.seconds:.2f} s"
    assert outcome.rss_growth_mb < MEMORY_MB, f"grew by {outcome.rss_growth_mb:.0f} MB"
