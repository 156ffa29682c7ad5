"""Small file helpers shared by artifacts and baselines: atomic writes and their leftovers.

An atomic write goes to a temporary file beside its target, then is renamed
over it. An exception removes the temporary file; a ``kill -9`` or a power cut
cannot, so temporary files carry a name that says what they are and who wrote
them (``.<name>.neuronpatch-tmp-<pid>-<random>``), and the first write into a
directory in a process, or the first read of a run that compares baselines or
looks up the result cache there (:func:`clean_once`), removes those whose writer
is dead or that are older than :data:`STALE_TEMPORARY_SECONDS`. A live writer's
fresh file is kept. They start with a dot and do not end in ``.json``, so
nothing that lists baselines or summaries ever takes one for a result.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
import time
from pathlib import Path

from neuronpatch.errors import OutputPathError

TEMPORARY_MARK = ".neuronpatch-tmp-"
# A live writer holds its temporary file for milliseconds (one small text and an
# fsync); a file this old is a leftover even when its pid was reused since.
STALE_TEMPORARY_SECONDS = 30.0
_NAME_PART = 100  # keeps the temporary name under the 255 bytes file systems allow
_TEMPORARY = re.compile(r"^\..*\.neuronpatch-tmp-(?P<pid>\d+)-[A-Za-z0-9_]+$", re.DOTALL)
# What tempfile.mkstemp made before temporaries were named: ``.p00.json.k3j9a_2x.tmp``.
_LEGACY_TEMPORARY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$", re.DOTALL)
_cleaned: set[str] = set()
_cleaned_lock = threading.Lock()


def is_temporary(path: str | Path) -> bool:
    """Whether ``path`` names an atomic write's temporary file (ours, or an older release's).

    Example:
        >>> is_temporary("baselines/.p00.json.neuronpatch-tmp-4242-k3j9a_2x")
        True
        >>> is_temporary("baselines/p00.json")
        False
    """
    name = Path(path).name
    return bool(_TEMPORARY.match(name) or _LEGACY_TEMPORARY.match(name))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return False
    return True


def clean_stale_temporaries(directory: str | Path, *,
                            max_age_s: float = STALE_TEMPORARY_SECONDS) -> list[Path]:
    """Remove temporary files that a crashed atomic write left in ``directory``.

    A temporary file is removed when the process that wrote it is gone, or when
    it is older than ``max_age_s`` (its pid may have been reused). A temporary
    file of a live writer, younger than that, is kept: two processes may write
    into one directory at once. Other files are never touched, nor are
    subdirectories or symlinks. Errors (a directory that is not there, a file
    another cleaner removed first) are ignored: cleaning is best effort.

    Returns:
        The paths removed.

    Example:
        >>> clean_stale_temporaries("probes/baselines")        # doctest: +SKIP
        [PosixPath('probes/baselines/.p00.json.neuronpatch-tmp-4242-k3j9a_2x')]
    """
    removed: list[Path] = []
    now = time.time()
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        ours = _TEMPORARY.match(name)
        if not ours and not _LEGACY_TEMPORARY.match(name):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            age = now - entry.stat(follow_symlinks=False).st_mtime
            dead = ours is not None and int(ours["pid"]) != os.getpid() and not _pid_alive(int(ours["pid"]))
            if dead or age > max_age_s:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def clean_once(directory: str | Path) -> None:
    """:func:`clean_stale_temporaries` of ``directory``, the first time a process asks for it.

    Whatever touches a directory of results (a write into it, a cache lookup, a
    run that compares baselines) calls this first, so a dead writer's leftover
    goes with the next run of any kind, at the cost of one listing per process.
    """
    key = os.path.abspath(directory)
    with _cleaned_lock:
        if key in _cleaned:
            return
        _cleaned.add(key)
    clean_stale_temporaries(directory)


def ensure_directory(path: str | Path, what: str = "output directory") -> Path:
    """Create ``path`` (and its parents) as a directory, or say in one line why it cannot be.

    Raises:
        OutputPathError: ``path`` or one of its parents is a file (or a broken link).

    Example:
        >>> ensure_directory("out/run1", "--out")                    # doctest: +SKIP
        PosixPath('out/run1')
    """
    path = Path(path)
    check_output_directory(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"{path}: cannot create the {what}: {e.strerror}") from e
    return path


def check_output_directory(path: str | Path, what: str = "output directory") -> None:
    """Refuse, before any work, an output directory that cannot be created or used.

    ``path`` must be a directory or not exist yet; its nearest existing ancestor
    must be a directory. Nothing is created.

    Raises:
        OutputPathError: a file stands at ``path`` or at one of its parents.

    Example:
        >>> check_output_directory("README.md", "--out")        # doctest: +ELLIPSIS
        Traceback (most recent call last):
        neuronpatch.errors.OutputPathError: README.md: --out is an existing file; expected a directory ...
    """
    path = Path(path)
    if path.is_dir():
        return
    if os.path.lexists(path):
        kind = "a broken symlink" if path.is_symlink() and not path.exists() else "an existing file"
        raise OutputPathError(f"{path}: {what} is {kind}; expected a directory "
                              "(or a path that does not exist yet)")
    for parent in path.parents:
        if parent.is_dir():
            return
        if os.path.lexists(parent):
            raise OutputPathError(f"{path}: {what} cannot be created: {parent} is a file, not a "
                                  "directory; move that file or choose another path")


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a temp file beside it, fsync, then rename.

    A crash at any point leaves either the old file or the new one, never half
    of one. An exception removes the temporary file; a killed process leaves it
    behind under a recognisable name, and the next process that writes into the
    directory removes it (see :func:`clean_stale_temporaries`).

    Raises:
        OutputPathError: a parent of ``path`` is a file, or ``path`` is a directory.

    Example:
        >>> atomic_write_text("out/summary.json", "{}\\n")      # doctest: +SKIP
        PosixPath('out/summary.json')
    """
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, as :func:`atomic_write_text` does text.

    Raises:
        OutputPathError: a parent of ``path`` is a file, or ``path`` is a directory.

    Example:
        >>> atomic_write_bytes("out/figure.png", b"\\x89PNG...")   # doctest: +SKIP
        PosixPath('out/figure.png')
    """
    path = Path(path)
    ensure_directory(path.parent, "directory")
    if path.is_dir():
        raise OutputPathError(f"{path}: is a directory; expected a file path to write "
                              "(move the directory away)")
    clean_once(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent,
                               prefix=f".{path.name[:_NAME_PART]}{TEMPORARY_MARK}{os.getpid()}-")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes files private; these are meant to be read
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
