"""An opt-in on-disk cache of experiment results, so an unchanged probe need not run again.

A probe suite in CI mostly re-measures heads, models and inputs that did not
change since the last run. With ``--neuronpatch-cache`` (or
:class:`ResultCache` in Python) a result is stored under a key of everything
that can move one of its numbers:

* the model's files, by content (SHA-256 of each file; a file in the Hugging
  Face cache is named by its own content hash there, which is used as is);
* the head directory's ``config.json`` and weights, by content;
* the inputs and every engine option (interventions, position, route, device,
  dtype, batch size, controls);
* the installed versions of neuronpatch, torch, transformers and
  transformer_lens, and a digest of neuronpatch's own source files.

A warm run with the same key reads the arrays back instead of running the
model (not even loading it), and every metric is computed from bitwise the same
arrays, so it is bitwise the same; any changed part of the key is a miss.

Storage is plain data: one ``.npz`` file per entry (float64 arrays, and the
result's other fields as JSON in a ``uint8`` array), read with
``allow_pickle=False`` after its size, its members and their sizes are
checked. Entries are written atomically (temporary file, then rename), so
parallel workers and a killed run never leave half an entry. An entry that
cannot be read back (truncated, foreign, from another format) is ignored with
one warning line and rewritten by the next run.

Example:
    >>> from neuronpatch.cache import ResultCache                    # doctest: +SKIP
    >>> cache = ResultCache(".neuronpatch/cache")
    >>> key = cache.key("probes/heads/demo_causal", inputs=["The cat sat."], options={"set": [0, 1]})
    >>> cache.get(key) or cache.put(key, run_experiment(...))
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neuronpatch._io import atomic_write_bytes, atomic_write_text, clean_once, is_temporary
from neuronpatch.errors import NeuronpatchError, OutputPathError
from neuronpatch.names import CACHE_MARKER
from neuronpatch.result import ExperimentResult

FORMAT = 4  # 4: the mixture-of-experts fields (target_expert, unrouted_inputs, routing_changed)
MARKER = CACHE_MARKER  # says a directory is a neuronpatch cache
MAX_ENTRY_BYTES = 256 * 1024 * 1024  # an entry over this is not read (nor written)
MAX_MEMBERS = 1024  # arrays in one entry (controls add two per unit)
_CHUNK = 1 << 20

# The fields of ExperimentResult this format stores; a result with others is not cached.
_ARRAYS = ("clean_activation", "clean_prediction", "patched_activation", "patched_prediction")
_TEXT = ("head_path", "model_name", "head_type", "layer_type", "unit_hook", "feature_hook",
         "patch_position", "method", "created")
_INTS = ("target_layer", "target_neuron")
_OPTIONAL_INTS = ("target_expert", "routing_changed")  # int or None
_KNOWN = {*_ARRAYS, *_TEXT, *_INTS, *_OPTIONAL_INTS, "token_pos", "inputs", "n_tokens", "positions",
          "interventions", "write_direction_cosine", "notes", "controls", "ranking", "rounding",
          "unrouted_inputs"}
# Files of this package whose code cannot move a measured number.
_NOT_MEASURING = ("pytest_plugin", "demo", "plots.py", "report_html.py", "cli.py")


class Uncachable(Exception):
    """An experiment whose options the cache cannot key exactly (it then just runs)."""


class CorruptEntry(NeuronpatchError):
    """A cache entry that cannot be read back as a result."""


# ----- the key ---------------------------------------------------------------------------------

_FILE_DIGESTS: dict[tuple[str, int, int, int], str] = {}
_SOURCE_DIGEST: list[str] = []


def _file_digest(path: Path) -> str:
    """SHA-256 of a file, remembered per process while its size and mtime stay the same."""
    real = path.resolve()
    # In the Hugging Face cache a file is a link to blobs/<its own content hash>.
    if path.is_symlink() and real.parent.name == "blobs" and len(real.name) in (40, 64) and all(
            c in "0123456789abcdef" for c in real.name):
        return f"blob:{real.name}"
    st = real.stat()
    memo = (str(real), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        _FILE_DIGESTS[memo] = h.hexdigest()
    return _FILE_DIGESTS[memo]


def directory_digest(directory: str | Path) -> str:
    """SHA-256 over every file in ``directory`` (relative names and contents), links followed.

    Hidden files and directories (``.git``, ``.cache``) are left out.

    Example:
        >>> directory_digest("src/neuronpatch/demo/model")[:7]        # doctest: +SKIP
        'sha256:'
    """
    root = Path(directory)
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            if not path.is_file():
                continue
            rel = path.relative_to(root).as_posix()
            h.update(f"{rel}\0{_file_digest(path)}\0".encode())
    return "sha256:" + h.hexdigest()


def source_digest() -> str:
    """SHA-256 of neuronpatch's own modules that take part in a measurement."""
    if not _SOURCE_DIGEST:
        package = Path(__file__).resolve().parent
        h = hashlib.sha256()
        for path in sorted(package.rglob("*.py")):
            rel = path.relative_to(package)
            if rel.parts[0] in _NOT_MEASURING:
                continue
            h.update(f"{rel.as_posix()}\0".encode() + path.read_bytes() + b"\0")
        _SOURCE_DIGEST.append("sha256:" + h.hexdigest())
    return _SOURCE_DIGEST[0]


def _canonical(value: Any, where: str) -> Any:
    """A JSON value that says exactly what ``value`` is, or :class:`Uncachable`."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return {"float": float.hex(value)}  # exact, and NaN or inf too
    if isinstance(value, Mapping):
        return {str(k): _canonical(v, f"{where}.{k}") for k, v in sorted(value.items(), key=str)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v, where) for v in value]
    kind = getattr(value, "kind", None)
    if isinstance(kind, str) and hasattr(value, "value"):  # an Intervention
        return {"intervention": kind, "value": _canonical(value.value, where)}
    dump = getattr(value, "model_dump", None)  # a pydantic model (probe-file sections)
    if callable(dump):
        return _canonical(dump(), where)
    if isinstance(value, np.generic):
        return _canonical(value.item(), where)
    raise Uncachable(f"{where}: a {type(value).__name__} cannot be part of a cache key")


def versions() -> dict[str, str]:
    """Installed versions of the packages whose changes can move a number, and our source."""
    from neuronpatch.baselines import versions as installed

    return {**installed(), "neuronpatch-source": source_digest()}


def _head_config(head_dir: Path) -> dict[str, Any]:
    from neuronpatch.limits import load_json_bounded

    raw = load_json_bounded(head_dir / "config.json", what="head config")
    if not isinstance(raw, dict):
        raise Uncachable(f"{head_dir}/config.json is not a mapping")
    return raw


# ----- entries ---------------------------------------------------------------------------------


def _floats(values: Sequence[float]) -> list[str]:
    return [float.hex(float(v)) for v in values]


def to_arrays(result: ExperimentResult) -> dict[str, np.ndarray]:
    """An :class:`ExperimentResult` as plain arrays (``meta``: the other fields as JSON bytes).

    Raises:
        Uncachable: the result has fields or controls this format does not know.
    """
    fields = {f.name for f in dataclasses.fields(result)}
    if fields != _KNOWN:
        raise Uncachable(f"ExperimentResult fields changed: {sorted(fields ^ _KNOWN)}")
    if result.ranking is not None:
        raise Uncachable("a ranking is not cached (it is recomputed with the model)")
    arrays = {name: np.asarray(getattr(result, name), dtype=np.float64) for name in _ARRAYS}
    meta: dict[str, Any] = {name: getattr(result, name) for name in (*_TEXT, *_INTS)}
    meta.update(
        format=FORMAT,
        token_pos=result.token_pos,
        inputs=list(result.inputs),
        n_tokens=[int(n) for n in result.n_tokens],
        positions=[int(p) for p in result.positions],
        interventions=[[iv.kind, None if iv.value is None else float.hex(float(iv.value))]
                       for iv in result.interventions],
        write_direction_cosine=_floats([result.write_direction_cosine])[0],
        notes=list(result.notes),
        unrouted_inputs=list(result.unrouted_inputs),
        **{name: None if getattr(result, name) is None else int(getattr(result, name))
           for name in _OPTIONAL_INTS},
        controls=None,
        rounding=None if result.rounding is None else {
            "dtype": result.rounding.dtype, "row_error": float.hex(float(result.rounding.row_error)),
            "method": result.rounding.method, "inputs": [int(i) for i in result.rounding.inputs],
            "seconds": float.hex(float(result.rounding.seconds))},
    )
    controls = result.controls
    if controls is not None:
        from neuronpatch.controls import ControlResults

        if type(controls) is not ControlResults or {f.name for f in dataclasses.fields(controls)} != {
                "target_x", "target_y", "xs", "ys", "units", "directions", "seed"}:
            raise Uncachable("controls of a kind this cache format does not know")
        meta["controls"] = {"units": [int(u) for u in controls.units], "count": len(controls.xs),
                            "seed": None if controls.seed is None else int(controls.seed)}
        if controls.directions is not None:
            arrays["control_directions"] = np.asarray(controls.directions, dtype=np.float64)
        arrays["control_target_x"] = np.asarray(controls.target_x, dtype=np.float64)
        arrays["control_target_y"] = np.asarray(controls.target_y, dtype=np.float64)
        for i, (x, y) in enumerate(zip(controls.xs, controls.ys, strict=True)):
            arrays[f"control_x_{i}"] = np.asarray(x, dtype=np.float64)
            arrays[f"control_y_{i}"] = np.asarray(y, dtype=np.float64)
    arrays["meta"] = np.frombuffer(json.dumps(meta, allow_nan=False).encode("utf-8"), dtype=np.uint8)
    return arrays


def _expect(cond: bool, what: str) -> None:
    if not cond:
        raise CorruptEntry(what)


def from_arrays(arrays: Mapping[str, np.ndarray]) -> ExperimentResult:
    """The :class:`ExperimentResult` that :func:`to_arrays` stored; :class:`CorruptEntry` if not."""
    from neuronpatch.interventions import Intervention

    _expect("meta" in arrays and arrays["meta"].dtype == np.uint8 and arrays["meta"].ndim == 1,
            "no metadata")
    try:
        meta = json.loads(arrays["meta"].tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptEntry(f"metadata is not JSON ({e})") from None
    _expect(isinstance(meta, dict) and meta.get("format") == FORMAT, "another cache format")
    for name in _ARRAYS:
        _expect(name in arrays and arrays[name].dtype == np.float64, f"array {name} missing")
    n, k = arrays["patched_activation"].shape if arrays["patched_activation"].ndim == 2 else (-1, -1)
    _expect(arrays["clean_activation"].shape == (n,) and arrays["clean_prediction"].shape == (n,)
            and arrays["patched_prediction"].shape == (n, k), "array shapes disagree")
    try:
        fields: dict[str, Any] = {name: str(meta[name]) for name in _TEXT}
        fields.update({name: int(meta[name]) for name in _INTS})
        fields.update({name: None if meta[name] is None else int(meta[name]) for name in _OPTIONAL_INTS})
        fields["unrouted_inputs"] = tuple(str(t) for t in meta["unrouted_inputs"])
        inputs = tuple(str(t) for t in meta["inputs"])
        ivs = tuple(Intervention(kind, None if value is None else float.fromhex(value))
                    for kind, value in meta["interventions"])
        token_pos = meta["token_pos"]
        _expect(isinstance(token_pos, (str, int)), "token_pos")
        n_tokens = tuple(int(t) for t in meta["n_tokens"])
        positions = tuple(int(p) for p in meta["positions"])
        cosine = float.fromhex(meta["write_direction_cosine"])
        notes = tuple(str(x) for x in meta["notes"])
        rounding = None
        if meta["rounding"] is not None:
            from neuronpatch.stats import Rounding

            r = meta["rounding"]
            rounding = Rounding(str(r["dtype"]), float.fromhex(r["row_error"]), str(r["method"]),
                                tuple(int(i) for i in r["inputs"]), float.fromhex(r["seconds"]))
        controls = None
        if meta["controls"] is not None:
            from neuronpatch.controls import ControlResults

            units = tuple(int(u) for u in meta["controls"]["units"])
            count = int(meta["controls"]["count"])
            seed = meta["controls"]["seed"]
            xs = tuple(arrays[f"control_x_{i}"] for i in range(count))
            ys = tuple(arrays[f"control_y_{i}"] for i in range(count))
            _expect(all(a.dtype == np.float64 and a.shape == (n, k) for a in (*xs, *ys)),
                    "control arrays")
            directions = arrays.get("control_directions")
            _expect(count == len(units) + (0 if directions is None else len(directions)),
                    "control count")
            controls = ControlResults(arrays["control_target_x"], arrays["control_target_y"],
                                      xs, ys, units, directions, None if seed is None else int(seed))
    except (KeyError, TypeError, ValueError, NeuronpatchError) as e:
        if isinstance(e, CorruptEntry):
            raise
        raise CorruptEntry(f"metadata incomplete ({type(e).__name__}: {e})") from None
    _expect(len(inputs) == n == len(n_tokens) == len(positions) and len(ivs) == k, "sizes disagree")
    return ExperimentResult(
        **fields, token_pos=token_pos, inputs=inputs, n_tokens=n_tokens, positions=positions,
        interventions=ivs,
        clean_activation=arrays["clean_activation"], clean_prediction=arrays["clean_prediction"],
        patched_activation=arrays["patched_activation"],
        patched_prediction=arrays["patched_prediction"],
        write_direction_cosine=cosine, notes=notes, controls=controls, rounding=rounding,
    )


def read_entry(path: Path, *, max_bytes: int = MAX_ENTRY_BYTES) -> dict[str, np.ndarray]:
    """The arrays of one entry, read within bounds and without pickle; :class:`CorruptEntry`."""
    from neuronpatch.limits import check_regular_file

    try:
        check_regular_file(path, max_bytes=max_bytes, what="cache entry")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except (NeuronpatchError, OSError) as e:
        raise CorruptEntry(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    _expect(len(data) <= max_bytes, f"over {max_bytes} bytes")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            infos = z.infolist()
            _expect(0 < len(infos) <= MAX_MEMBERS, f"{len(infos)} members")
            _expect(all(i.filename.endswith(".npy") and "/" not in i.filename for i in infos),
                    "members that are not arrays")
            _expect(sum(i.file_size for i in infos) <= max_bytes, "members too large")
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except CorruptEntry:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise CorruptEntry(f"not a cache entry ({type(e).__name__}: {e})") from None


class ResultCache:
    """A directory of cached experiment results.

    Args:
        directory: where entries go; created with a marker file on first use. An
            existing directory that is not empty and has no marker is refused (it
            is not ours to fill).
        warn: called with one line when an entry is ignored.

    Raises:
        OutputPathError: ``directory`` is a file, or a non-empty directory of something else.
    """

    def __init__(self, directory: str | Path, *, warn: Callable[[str], None] | None = None) -> None:
        self.directory = Path(directory)
        self.warn = warn
        self.hits = 0
        self.misses = 0
        marker = self.directory / MARKER
        if self.directory.is_dir():
            clean_once(self.directory)  # a killed run's half-written marker or entry goes first
        if self.directory.is_dir() and not marker.is_file() and any(
                not is_temporary(p) for p in self.directory.iterdir()):
            raise OutputPathError(
                f"{self.directory}: not a neuronpatch cache (it has files but no {MARKER}); expected "
                "an empty or new directory for --neuronpatch-cache")
        if os.path.lexists(self.directory) and not self.directory.is_dir():
            raise OutputPathError(f"{self.directory}: the cache directory is a file; expected a "
                                  "directory (or a path that does not exist yet)")

    # ----- keys ---------------------------------------------------------------------------------
    def key(self, head_dir: str | Path, *, inputs: Sequence[str] | None, options: Mapping[str, Any],
            model_dir: str | Path | None = None) -> str:
        """The key of one experiment (hex SHA-256).

        ``options`` are the engine's keyword arguments (interventions, position,
        method, device, dtype, batch size, controls). ``model_dir`` is the model's
        directory; by default the one the head's ``base_model_name`` resolves to.

        Raises:
            Uncachable: an option the key cannot say exactly (``device="auto"``, an object).
        """
        from neuronpatch.baselines import head_hash
        from neuronpatch.models import resolve_model_path

        head = Path(head_dir)
        if options.get("device", "auto") == "auto":
            raise Uncachable("device 'auto' depends on the machine; name the device to cache")
        if model_dir is None:
            name = _head_config(head).get("base_model_name")
            if not isinstance(name, str) or not name:
                raise Uncachable(f"{head}/config.json names no base_model_name")
            model_dir = resolve_model_path(name)
        ignored = {"model", "progress", "inputs"}
        content = {
            "format": FORMAT,
            "model": directory_digest(model_dir),
            "head": head_hash(head),
            "inputs": _canonical(None if inputs is None else list(inputs), "inputs"),
            "options": _canonical({k: v for k, v in options.items() if k not in ignored}, "options"),
            "versions": versions(),
        }
        text = json.dumps(content, sort_keys=True, allow_nan=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.npz"

    # ----- entries ------------------------------------------------------------------------------
    def get(self, key: str, *, head_path: str | None = None) -> ExperimentResult | None:
        """The cached result of ``key``, or None (a miss; a corrupt entry is a miss with a warning).

        ``head_path`` replaces the stored head path (the same head may now live elsewhere).
        """
        path = self.path(key)
        if path.parent.is_dir():
            clean_once(path.parent)  # leftovers are never read: only ``<key>.npz`` is
        if not path.exists():
            self.misses += 1
            return None
        try:
            result = from_arrays(read_entry(path))
        except CorruptEntry as e:
            self.misses += 1
            if self.warn is not None:
                self.warn(f"neuronpatch cache: ignored the entry {path}: {e}; it will be measured "
                          "and written again")
            return None
        self.hits += 1
        note = f"read from the neuronpatch cache ({key[:12]}), measured {result.created}"
        return dataclasses.replace(result, head_path=head_path or result.head_path,
                                   notes=(*result.notes, note))

    def put(self, key: str, result: ExperimentResult) -> bool:
        """Store ``result`` under ``key`` (atomically); False when it cannot be stored."""
        try:
            arrays = to_arrays(result)
        except Uncachable:
            return False
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        data = buffer.getvalue()
        if len(data) > MAX_ENTRY_BYTES:
            return False
        marker = self.directory / MARKER
        if not marker.is_file():
            atomic_write_text(marker, json.dumps({"format": FORMAT, "what": "neuronpatch result cache"})
                              + "\n")
        atomic_write_bytes(self.path(key), data)
        return True
