"""CI regression mode: each probe's metrics against its baseline file.

A baseline belongs to one probe, identified by its node id: the probe file's
path relative to the rootdir plus the probe's name. Its default file is
``<probe dir>/baselines/<probe file stem>/<probe name>.json`` (the name with
characters outside ``[A-Za-z0-9._-]`` turned into ``_``), so two files that
both hold a probe ``tracks`` never share a baseline; a probe's
``baseline.file`` overrides it. Two probes that would still map to one file
(two names that sanitise alike, or one ``baseline.file`` twice) are a
collection error naming both.

``--neuronpatch-update-baselines`` records the measured metrics of each probe
whose expectations hold; the others are listed at the end with why
(``--neuronpatch-update-all-baselines`` records them too). Later runs compare
a probe with its baseline when the file exists, when the probe has a
``baseline:`` key, or for every probe with ``--neuronpatch-baselines``; a drift
fails with a table. Baseline files no collected probe maps to are listed at
the end of every run and removed with ``--neuronpatch-remove-stale-baselines``.

Workers only *measure*: the baseline's content travels in the test report and
the process that holds the session (the xdist controller, or the one pytest
process) writes it, atomically, relative to its own rootdir.

This step takes plain values (the probe's spec, name, head and metrics), so it
knows nothing of items; what it finds goes into the test's record (:mod:`.outcomes`).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from neuronpatch.names import PROBE_SUFFIXES, safe_filename
from neuronpatch.pytest_plugin.channel import from_workers, record_of, send_at_end
from neuronpatch.pytest_plugin.options import flag, outside_message

if TYPE_CHECKING:
    from neuronpatch.probes.schema import ProbeSpec
    from neuronpatch.result import ExperimentResult

OWNERS_KEY = pytest.StashKey[dict[str, str]]()  # baseline path (rootdir-relative) -> node id
SCANNED_KEY = pytest.StashKey[set[Path]]()  # baselines/<stem> directories of collected files
_MAX_NAME = 100


def baseline_name(name: str) -> str:
    """A probe name as a file name: readable, without path separators or NUL.

    Example:
        >>> baseline_name("causal head tracks its neuron")
        'causal_head_tracks_its_neuron'
        >>> baseline_name("tracks[demo_causal]")
        'tracks_demo_causal'
    """
    return safe_filename(name, limit=_MAX_NAME)


def probe_stem(path: Path) -> str:
    """``a.probe.yaml`` -> ``a``."""
    for suffix in PROBE_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def default_dir(probe_file: Path) -> Path:
    """Where a probe file's baselines go by default: ``baselines/<file stem>/`` beside it."""
    return probe_file.parent / "baselines" / probe_stem(probe_file)


def baseline_path(spec: ProbeSpec, name: str) -> Path:
    """``<probe dir>/baselines/<file stem>/<probe name>.json`` or the probe's ``baseline.file``.

    ``name`` is the test's name: the probe's title, with ``[head]`` for one
    head of a ``head:`` glob (whose files are kept apart).
    """
    if spec.baseline is not None and spec.baseline.file:
        path = spec.path.parent / spec.baseline.file
        if name != spec.title:  # one head of a glob: keep files apart
            path = path.with_name(f"{path.stem}[{name[len(spec.title) + 1:-1]}]{path.suffix}")
        return path
    return default_dir(spec.path) / f"{baseline_name(name)}.json"


def rel(config: pytest.Config, path: Path) -> str:
    """A baseline path as the report carries it: relative to the rootdir (POSIX) when inside."""
    import os

    full = Path(os.path.abspath(path))
    root = Path(os.path.abspath(config.rootpath))
    return full.relative_to(root).as_posix() if full.is_relative_to(root) else str(full)


def claim(config: pytest.Config, spec: ProbeSpec, name: str, node_id: str) -> str | None:
    """Register this probe's baseline file; the collision message when another probe has it."""
    owners = config.stash.setdefault(OWNERS_KEY, {})
    config.stash.setdefault(SCANNED_KEY, set()).add(default_dir(spec.path))
    path = baseline_path(spec, name)
    key = rel(config, path)
    other = owners.setdefault(key, node_id)
    if other == node_id:
        return None
    explicit = spec.baseline is not None and spec.baseline.file
    where = spec.where("baseline", "file") if explicit else spec.where("name")
    key_name = "baseline.file" if explicit else "name"
    return (f"{where}: key '{key_name}': probe {node_id!r} would share the baseline file {key} "
            f"with probe {other!r}; expected one baseline per probe: rename one of them or give it "
            "a baseline.file of its own")


def outside(config: pytest.Config, spec: ProbeSpec, name: str) -> str | None:
    """The collection error of a baseline file that resolves outside the rootdir, or None.

    ``baseline.file`` is checked when the probe file is read; this catches the
    default ``baselines/`` directory (or any folder on the way) being a symlink
    to somewhere else, before a model loads, in every mode: such a baseline would
    be written, or its folder cleaned, through the link. Only probes that take
    part in baseline checks (:func:`wanted`) are asked.
    """
    message = outside_message(config, baseline_path(spec, name), "baseline file")
    if message is None:
        return None
    explicit = spec.baseline is not None and spec.baseline.file
    where = spec.where("baseline", "file") if explicit else spec.where("name")
    return f"{where}: {message}"


def baseline_folders(config: pytest.Config) -> set[Path]:
    """The folders baselines of the collected probe files live in (and the stale scan looks at).

    ``baselines/<stem>/`` of each collected probe file, the ``baselines/`` above
    it and its other ``<stem>`` folders, and the folder of each ``baseline.file``.
    """
    folders: set[Path] = set()
    for folder in config.stash.get(SCANNED_KEY, set()):
        folders.add(folder)
        root = folder.parent
        if root.is_dir():
            folders.add(root)
            folders.update(sub for sub in root.iterdir() if sub.is_dir() and not sub.is_symlink())
    for key in config.stash.get(OWNERS_KEY, {}):
        folders.add((config.rootpath / key).parent)
    return folders


def clean_leftovers(config: pytest.Config) -> list[Path]:
    """Remove the temporary files killed baseline writers left in the collected probes' folders.

    Runs in every run that collects probe files (a compare run too, not only an
    update), before any baseline is read or listed. A temporary file is removed
    only when its writer is dead or it is older than a live write can be (see
    :func:`neuronpatch._io.clean_stale_temporaries`); folders that resolve
    outside the rootdir are left alone (nothing is written there).
    """
    from neuronpatch._io import clean_stale_temporaries

    removed: list[Path] = []
    for folder in sorted(baseline_folders(config)):
        if folder.is_dir() and outside_message(config, folder, "baseline folder") is None:
            removed += clean_stale_temporaries(folder)
    return removed


def stale_baselines(config: pytest.Config) -> list[str]:
    """Baseline files (rootdir-relative) in the collected probe files' folders that no probe maps to.

    Looked at: ``baselines/<stem>/`` of each collected probe file, the
    ``baselines/<stem>/`` folders beside it whose probe file is gone (a renamed
    file), and the flat ``baselines/*.json`` files of the older layout.
    """
    # Not neuronpatch.baselines.baseline_files: that module imports numpy, and collecting
    # probe files must stay light. Same rule: *.json, never a killed writer's temporary file.
    from neuronpatch._io import is_temporary

    def baseline_files(folder: Path) -> list[Path]:
        if not folder.is_dir():
            return []
        return [p for p in folder.iterdir() if p.suffix == ".json" and not p.name.startswith(".")
                and not is_temporary(p) and p.is_file()]

    owners = config.stash.get(OWNERS_KEY, {})
    scanned = config.stash.get(SCANNED_KEY, set())
    candidates: set[Path] = set()
    for folder in scanned:
        candidates.update(baseline_files(folder))
        root = folder.parent  # <probe dir>/baselines
        candidates.update(p for p in baseline_files(root) if _old_layout(p))
        if root.is_dir():
            for sub in root.iterdir():
                if sub.is_dir() and not any((root.parent / f"{sub.name}{s}").is_file()
                                            for s in PROBE_SUFFIXES):
                    candidates.update(baseline_files(sub))
    return sorted(k for k in (rel(config, p) for p in candidates) if k not in owners)


def _old_layout(path: Path) -> bool:
    """A flat ``baselines/<name>.json`` written before baselines had a folder per probe file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8")[:1_000_000])
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "format" in data and "node" not in data


def wanted(config: pytest.Config, spec: ProbeSpec, name: str) -> bool:
    """Whether this probe takes part in baseline checks.

    It does when it has a ``baseline:`` key, when every probe is asked to
    (``--neuronpatch-baselines`` or the ini key), when baselines are being
    written, and when a baseline file for it already exists (once written,
    a probe stays under regression).
    """
    return bool(spec.baseline is not None or flag(config, "update_baselines")
                or flag(config, "update_all_baselines") or flag(config, "baselines")
                or baseline_path(spec, name).is_file())


@dataclass(frozen=True)
class BaselineCheck:
    """The outcome of a baseline check for one probe.

    ``status`` is ``ok``, ``drifted``, ``missing``, ``updated`` (``content`` is
    the file to write) or ``not-updated`` (``message`` says why).
    """

    status: str
    path: str
    message: str = ""
    drifts: list[dict[str, Any]] = field(default_factory=list)
    content: str | None = None

    def to_record(self) -> dict[str, Any]:
        """What the report carries: path, status, the drift rows and what to write."""
        rec: dict[str, Any] = {"path": self.path, "status": self.status, "drifts": self.drifts}
        if self.content is not None:
            rec["content"] = self.content
        if self.status == "not-updated":
            rec["why"] = self.message
        return rec


def check_baseline(config: pytest.Config, spec: ProbeSpec, name: str, head_dir: Path,
                   metrics: dict[str, Any], *, node_id: str, expectations_hold: bool,
                   why_not: str = "") -> BaselineCheck:
    """Prepare the update of, or compare, this probe's baseline (nothing is written here)."""
    from neuronpatch import baselines

    path = baseline_path(spec, name)
    shown = rel(config, path)
    if flag(config, "update_baselines") or flag(config, "update_all_baselines"):
        if not expectations_hold and not flag(config, "update_all_baselines"):
            return BaselineCheck("not-updated", shown, f"expectations failed ({why_not})"
                                 if why_not else "expectations failed")
        baselines.check_place(path)
        extra = {"node": node_id, **({"model": spec.checkpoint()} if spec.model is not None else {})}
        base = baselines.make_baseline(name, metrics, head_dir=head_dir, extra=extra)
        return BaselineCheck("updated", shown, f"baseline written: {shown}", content=base.to_json())
    base_or_none = baselines.read_baseline(path)
    if base_or_none is None:
        return BaselineCheck("missing", shown, f"probe {name!r} has no baseline at {shown}; "
                             f"run pytest with {baselines.UPDATE_FLAG} to create it")
    tolerance = spec.baseline.tolerance if spec.baseline is not None else {}
    drifts = baselines.compare(metrics, base_or_none, tolerance)
    rows = [d.__dict__ for d in drifts]
    if all(d.ok for d in drifts):
        return BaselineCheck("ok", shown, drifts=rows)
    text = baselines.explain(drifts, base_or_none, head_dir=head_dir, baseline_path=shown,
                             model=spec.checkpoint())
    return BaselineCheck("drifted", shown, f"probe {name!r}: {text}", rows)


def write_update(config: pytest.Config, record: dict[str, Any]) -> str | None:
    """Write a baseline a report carries (controller side); an error line, or None.

    Example:
        >>> write_update(config, {"path": "baselines/a/t.json", "content": "{}"})  # doctest: +SKIP
    """
    from neuronpatch._io import atomic_write_text
    from neuronpatch.baselines import check_place
    from neuronpatch.errors import NeuronpatchError

    path = Path(record["path"])
    if not path.is_absolute():
        path = config.rootpath / path
    refused = outside_message(config, path, "baseline file")
    if refused is not None:  # the folder became a link to elsewhere since the probe was collected
        return f"{record['path']}: baseline not written: {refused}"
    try:
        check_place(path)
        atomic_write_text(path, record["content"])
    except (NeuronpatchError, OSError) as e:
        return f"{record['path']}: baseline not written: {e}"
    return None


def remove_stale(config: pytest.Config, stale: list[str],
                 refused: list[str] | None = None) -> list[str]:
    """Delete stale baseline files (rootdir-relative paths); the ones removed.

    A file that resolves outside the rootdir (its folder is a link to elsewhere)
    is not deleted: its refusal goes to ``refused``.
    """
    removed = []
    for key in stale:
        path = Path(key) if Path(key).is_absolute() else config.rootpath / key
        message = outside_message(config, path, "stale baseline")
        if message is not None:
            if refused is not None:
                refused.append(f"{key}: not removed: {message}")
            continue
        try:
            path.unlink()
        except OSError:
            continue
        removed.append(key)
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # an emptied baselines/<stem>/ folder goes too
    return removed


class BaselineSession:
    """Controller side of CI mode: writes the baselines reports carry, lists stale ones.

    Registered once per pytest process. On an xdist worker it only works out
    which baselines are stale (workers collect) and hands that list over in
    ``workeroutput``; the controller (or the single pytest process) writes.
    """

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.written: list[str] = []
        self.not_updated: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.stale: set[str] = set()
        self.removed: list[str] = []
        self.worker = hasattr(config, "workerinput")

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        clean_leftovers(self.config)  # before anything lists or reads a baseline
        self.stale.update(stale_baselines(self.config))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.worker or report.when != "call":
            return
        base = (record_of(report) or {}).get("baseline") or {}
        if base.get("status") == "updated" and base.get("content") is not None:
            error = write_update(self.config, base)
            if error is None:
                self.written.append(base["path"])
            else:
                self.errors.append(error)
        elif base.get("status") == "not-updated":
            nodeid = (record_of(report) or {}).get("nodeid") or report.nodeid
            self.not_updated.append((nodeid, str(base.get("why", ""))))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.worker:
            send_at_end(self.config, "stale", sorted(self.stale))
            return
        for stale in from_workers(self.config, "stale").values():  # each worker's list
            self.stale.update(stale if isinstance(stale, list) else [])
        if self.stale and flag(self.config, "remove_stale_baselines"):
            self.removed = remove_stale(self.config, sorted(self.stale), self.errors)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.worker or not (self.written or self.not_updated or self.errors or self.stale):
            return
        tr = terminalreporter
        tr.write_sep("-", "neuronpatch baselines")
        if self.written:
            tr.line(f"{len(self.written)} baseline(s) written")
        for nodeid, why in self.not_updated:
            tr.line(f"not updated: {nodeid}: {why}; --neuronpatch-update-all-baselines writes it anyway")
        for error in self.errors:
            tr.line(error, red=True)
        stale = sorted(self.stale)
        if self.removed:
            tr.line(f"{len(self.removed)} stale baseline(s) removed: " + ", ".join(self.removed))
        elif stale:
            tr.line(f"{len(stale)} stale baseline(s), no collected probe maps to them "
                    "(remove them with --neuronpatch-remove-stale-baselines):")
            for key in stale:
                tr.line(f"  {key}")


def suggestion(result: ExperimentResult) -> dict[str, float]:
    """Baseline tolerances suggested by the spread of the metrics over resampled inputs."""
    from neuronpatch.baselines import suggest_tolerances

    return suggest_tolerances(result.activation_change, result.prediction_change,
                              result.clean_activation, result.clean_prediction)
