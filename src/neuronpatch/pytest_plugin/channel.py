"""The one way results travel between an xdist controller and its workers.

An xdist worker writes nothing of ours on its own file system (it may be
another machine, or run in another directory), and what it counts dies with it.
Everything it made goes to the controller through this module, in one of two
messages, and nowhere else:

* **with each test report**: the attribute ``report.neuronpatch``, a dict with
  the test's ``record`` (what the summary line, the HTML report and the
  baseline check read, the baseline to write included) and the ``files`` the
  test made (each artifact directory's summary.json and figures, PNG bytes in
  base64). The controller writes the files into *its* artifacts directory
  (:class:`Channel`), as the single pytest process does for its own tests;
* **when the worker finishes**: ``workeroutput["neuronpatch"]``, a dict of what
  the worker's steps hand over at the end (its stale baselines, the models it
  loaded, its cache counts and warnings), by kind (:func:`send_at_end`,
  :func:`from_workers`).

The other way, once: the controller tells each worker where files go and where
pytest was started (``workerinput["neuronpatch"]``, :func:`controller`).
Without xdist the same messages go from the process to itself.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from neuronpatch.errors import NeuronpatchError
from neuronpatch.names import FIGURES
from neuronpatch.pytest_plugin.outcomes import (
    FIGURE_DATA_KEY,
    FIGURES_KEY,
    RECORD_KEY,
    html_extras,
    is_ours,
    stable_id,
)

# Files an xdist worker made and hands to the controller with the next test report.
OUTBOX_KEY = pytest.StashKey[list[dict[str, Any]]]()
# What the controller tells its xdist workers (``workerinput``): where files go, where pytest started.
WORKER_INPUT = "neuronpatch"
# What a worker hands over when it finishes (``workeroutput``), by kind.
WORKER_OUTPUT = "neuronpatch"
# The figure files a test may carry.
FIGURE_FILES: tuple[str, ...] = FIGURES

_CHANNEL_KEY = pytest.StashKey["Channel"]()


# ----- controller to worker, once ----------------------------------------------------------------


def controller(config: pytest.Config) -> dict[str, str] | None:
    """On an xdist worker: what the controller said (its artifacts root, rootdir, start directory).

    None in the process that holds the session (no xdist, or the controller itself).
    """
    info = getattr(config, "workerinput", {}).get(WORKER_INPUT)
    return info if isinstance(info, dict) else None


# ----- worker to controller: with each test report ------------------------------------------------


def send(item: pytest.Item, report: pytest.TestReport) -> None:
    """Attach the test's record and the files it made to its report (``report.neuronpatch``).

    Runs after every other ``makereport`` (so after xfail handling). Stamping
    pytest's outcome into summary.json happens where the report arrives
    (:meth:`.session.RunState.pytest_runtest_logreport`), which is the controller under xdist.
    """
    message: dict[str, Any] = {}
    outbox = item.config.stash.get(OUTBOX_KEY, None)
    if outbox:  # an xdist worker's files, for the controller to write
        message["files"] = list(outbox)
        outbox.clear()
    ours = is_ours(item)
    if ours:
        stored = item.stash.get(RECORD_KEY, None)
        record: dict[str, Any] = {} if stored is None else {**stored}
        record.setdefault("kind", "probe" if item.get_closest_marker("neuronpatch") else "test")
        record.setdefault("nodeid", stable_id(item))  # shown without xdist's "@group"
        record.setdefault("name", item.name)
        path, line, _ = item.location
        record.setdefault("location", path if line is None else f"{path}:{line + 1}")
        message["record"] = record
    if message:
        report.neuronpatch = message  # type: ignore[attr-defined]  # travels through xdist as is
    if not ours:
        return
    figures = item.stash.get(FIGURES_KEY, ())
    if report.when == "call" and figures and getattr(item.config.option, "htmlpath", None):
        # pytest-html is writing
        extra = html_extras(figures, item.stash.get(FIGURE_DATA_KEY, None))
        report.extras = [*getattr(report, "extras", []), *extra]  # type: ignore[attr-defined]


def record_of(report: pytest.TestReport) -> dict[str, Any] | None:
    """The record a test report carries (None for a test that is not ours)."""
    message = getattr(report, "neuronpatch", None)
    record = message.get("record") if isinstance(message, dict) else None
    return record if isinstance(record, dict) else None


def files_of(report: pytest.TestReport) -> Any:
    """The artifact directories a worker's test report carries (see :func:`shipment`)."""
    message = getattr(report, "neuronpatch", None)
    return message.get("files") if isinstance(message, dict) else None


def shipment(directory: str, summary: Mapping[str, Any], figures: Mapping[str, bytes]) -> dict[str, Any]:
    """One artifact directory as a worker hands it over: a relative path, the summary, PNGs."""
    return {"dir": directory, "summary": dict(summary),
            "figures": {name: base64.b64encode(png).decode("ascii") for name, png in figures.items()}}


_SAFE_PART = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


def write_shipments(root: Path, shipments: Any) -> list[str]:
    """Write the artifact directories a worker's report carries under ``root``; error lines.

    Each directory must be a relative path of safe names under ``root``, each
    figure one of the five figure files; anything else is refused by name.
    """
    from neuronpatch.artifacts import Bundle, write_bundle

    errors = []
    for item in shipments if isinstance(shipments, list) else []:
        rel = str(item.get("dir", "")) if isinstance(item, dict) else ""
        parts = rel.split("/")
        if not rel or not all(_SAFE_PART.match(part) for part in parts):
            errors.append(f"artifacts {rel!r} not written: expected a relative path of plain names")
            continue
        figures = item.get("figures") or {}
        bad = sorted(name for name in figures if name not in FIGURE_FILES)
        if bad or not isinstance(item.get("summary"), dict):
            errors.append(f"artifacts {rel!r} not written: unexpected files {bad or ['summary']}")
            continue
        try:
            pngs = {name: base64.b64decode(data, validate=True) for name, data in figures.items()}
            write_bundle(Bundle(item["summary"], pngs), root.joinpath(*parts))
        except (NeuronpatchError, OSError, ValueError) as e:
            errors.append(f"artifacts {rel!r} not written: {e}")
    return errors


# ----- worker to controller: when the worker finishes ----------------------------------------


def send_at_end(config: pytest.Config, kind: str, value: Any) -> None:
    """On an xdist worker: hand ``value`` to the controller when this worker finishes."""
    config.workeroutput.setdefault(WORKER_OUTPUT, {})[kind] = value  # type: ignore[attr-defined]


def from_workers(config: pytest.Config, kind: str) -> dict[str, Any]:
    """On the controller: what each finished worker sent of ``kind``, by worker id (``gw0``...)."""
    channel = config.stash.get(_CHANNEL_KEY, None)
    return {} if channel is None else dict(channel.received.get(kind, {}))


# ----- the controller's end ------------------------------------------------------------------------


class Channel:
    """The controller's end (registered once per pytest process).

    It tells each xdist worker where files go, writes the files that test reports
    carry under the artifacts root (before any other plugin reads the report), and
    keeps what each worker sends when it finishes.
    """

    def __init__(self, config: pytest.Config, artifacts: Path | None = None) -> None:
        self.config = config
        self.artifacts = artifacts  # where the files workers hand over go
        self.worker = hasattr(config, "workerinput")
        self.file_errors: list[str] = []
        self.received: dict[str, dict[str, Any]] = {}  # kind -> worker id -> value
        config.stash[_CHANNEL_KEY] = self

    @pytest.hookimpl(optionalhook=True)
    def pytest_configure_node(self, node: Any) -> None:
        """xdist controller: tell each worker where files go (the worker writes none itself)."""
        config = node.config
        node.workerinput[WORKER_INPUT] = {
            "artifacts": str(self.artifacts),
            "rootdir": str(config.rootpath),
            "invocation_dir": str(config.invocation_params.dir),
        }

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.worker:
            return
        shipped = files_of(report)
        if shipped and self.artifacts is not None:
            self.file_errors += [f"{report.nodeid}: {e}" for e in write_shipments(self.artifacts, shipped)]

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        """xdist: a worker finished; keep what it sent."""
        sent = getattr(node, "workeroutput", {}).get(WORKER_OUTPUT)
        if isinstance(sent, dict):
            for kind, value in sent.items():
                self.received.setdefault(str(kind), {})[str(node.gateway.id)] = value


def file_errors(config: pytest.Config) -> list[str]:
    """The controller's lines about files a worker sent that could not be written."""
    channel = config.stash.get(_CHANNEL_KEY, None)
    return [] if channel is None else list(channel.file_errors)
