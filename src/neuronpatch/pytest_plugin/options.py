"""Every option of the plugin: the flags and ini keys, the typed settings, and the path helpers.

* **declared** here, all of them (:func:`add_options`): each ``--neuronpatch-*``
  flag and its ``neuronpatch_*`` ini key;
* **read** here: the session's :class:`Settings` (validated once, up front, so
  a typo fails the session once, not every probe), the boolean flags
  (:func:`flag`: the command line when given, else the ini key), what an
  inconclusive verdict or a missing baseline becomes;
* **paths** as the options make them: which paths this plugin may write (inside
  the rootdir unless ``--neuronpatch-allow-outside-rootdir``), where pytest was
  started, and a path as the person who started pytest would type it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import pytest

from neuronpatch._io import is_temporary
from neuronpatch.names import CACHE_MARKER
from neuronpatch.pytest_plugin.channel import controller

FigureMode = Literal["auto", "all", "failed", "none"]
FIGURE_MODES: tuple[str, ...] = ("auto", "all", "failed", "none")
DEFAULT_ARTIFACTS = ".neuronpatch/artifacts"

SETTINGS_KEY = pytest.StashKey["Settings"]()


# ----- declared --------------------------------------------------------------------------------


def add_options(parser: pytest.Parser) -> None:
    """Every ``--neuronpatch-*`` flag and ``neuronpatch_*`` ini key (``pytest_addoption``)."""
    group = parser.getgroup("neuronpatch", "neuronpatch: causal probes of prediction heads")
    options = [
        ("artifacts", "DIR",
         "where each probe's summary.json and figures go, one directory per test "
         "(default .neuronpatch/artifacts under the rootdir)"),
        ("device", "DEVICE", "torch device for the models: auto (CUDA when available), cpu, cuda:N "
                             "(default cpu)"),
        ("dtype", "float32|bfloat16|float16", "dtype of the models (default float32)"),
        ("batch-size", "N", "rows per forward pass in the engine (default 64)"),
        ("figures", "auto|all|failed|none",
         "which tests draw the five figures (default auto: failed tests, and every test "
         "when an HTML report is written)"),
    ]
    for name, metavar, text in options:
        group.addoption(f"--neuronpatch-{name}", metavar=metavar, default=None, help=text)
        if name == "batch-size":
            parser.addini("neuronpatch_batch_size", help=text, type="int", default=None)
        else:
            parser.addini(f"neuronpatch_{name.replace('-', '_')}", help=text, default="")
    cache_help = ("reuse results of experiments whose model, head, inputs, options and library "
                  "versions are unchanged, from DIR (default .neuronpatch/cache under the rootdir; "
                  "write --neuronpatch-cache=DIR with '=')")
    group.addoption("--neuronpatch-cache", metavar="DIR", nargs="?", const="", default=None,
                    help=cache_help)
    parser.addini("neuronpatch_cache", default="",
                  help=cache_help + "; in the ini file: a directory (relative to the rootdir), "
                       "true for the default, or false")
    _add_baseline_options(group, parser)
    parser.addini("neuronpatch_on_inconclusive", default="fail",
                  help="pytest outcome of a probe whose only misses are inconclusive "
                       "(confidence: an interval straddling the range): fail, skip or xfail")


def _add_baseline_options(group: Any, parser: pytest.Parser) -> None:
    """The CI-mode command-line flags and ini keys (every flag has a typed ini key)."""
    for name, text in FLAGS:
        group.addoption(f"--neuronpatch-{name}", action="store_true", default=None, help=text)
        parser.addini(f"neuronpatch_{name.replace('-', '_')}", type="bool", default=False, help=text)
    group.addoption("--neuronpatch-missing-baseline", metavar="fail|skip", default=None,
                    help="what a probe without a baseline file does (default fail)")
    parser.addini("neuronpatch_missing_baseline", default="fail",
                  help="fail or skip a probe that has no baseline file")
    report_help = ("write one HTML page: an overview table of every probe and test that uses "
                   "neuronpatch_expect, then details, figures linked from the artifacts")
    group.addoption("--neuronpatch-report", metavar="FILE.html", default=None, help=report_help)
    parser.addini("neuronpatch_report", default="", help=report_help + " (relative to the rootdir)")


# Boolean flags; each has an ini key of type bool (--neuronpatch-x-y: neuronpatch_x_y).
FLAGS: list[tuple[str, str]] = [
    ("update-baselines",
     "write the measured metrics of each probe whose expectations hold to its baseline file"),
    ("update-all-baselines",
     "with updates: also write baselines of probes whose expectations fail"),
    ("remove-stale-baselines",
     "delete baseline files that no collected probe maps to (they are always listed)"),
    ("baselines", "compare every probe with its baseline (not only those with baseline:)"),
    ("report-embed", "embed the figures in the HTML page instead of linking them"),
    ("suggest-tolerances", "print baseline tolerances suggested by each probe's input noise"),
    ("allow-outside-rootdir",
     "let baseline.file and inputs.file of probe files point outside the rootdir, and the files "
     "the plugin writes (baselines, artifacts, cache, HTML report) resolve outside it"),
]


# ----- read ------------------------------------------------------------------------------------


def ini(config: pytest.Config, key: str, expected: str) -> Any:
    """An ini value, or a usage error that names the ini key (pytest's own names neither).

    Example:
        >>> ini(config, "neuronpatch_batch_size", "a positive integer")   # doctest: +SKIP
        64
    """
    try:
        return config.getini(key)
    except (ValueError, TypeError, pytest.UsageError) as e:
        raise pytest.UsageError(f"ini key {key} is invalid ({e}); expected {expected}") from None


def flag(config: pytest.Config, name: str) -> bool:
    """A boolean option: the command line when given, else its ini key.

    Example:
        >>> flag(config, "update_baselines")     # doctest: +SKIP
        False
    """
    value = config.getoption(f"neuronpatch_{name}", None)
    if value is not None:
        return bool(value)
    return bool(ini(config, f"neuronpatch_{name}", "true or false"))


MISSING_MODES = ("fail", "skip")


def missing_mode(config: pytest.Config) -> str:
    """``fail`` or ``skip``: what a probe without a baseline file does."""
    value = config.getoption("neuronpatch_missing_baseline")
    where = "--neuronpatch-missing-baseline"
    if not value:
        value, where = config.getini("neuronpatch_missing_baseline") or "fail", \
            "ini key neuronpatch_missing_baseline"
    if value not in MISSING_MODES:
        raise pytest.UsageError(f"{where} = {value!r} is invalid; "
                                f"expected one of {', '.join(MISSING_MODES)}")
    return str(value)


def check_options(config: pytest.Config) -> None:
    """Fail the session once, up front, on a bad CI-mode option."""
    missing_mode(config)
    for name, _ in FLAGS:
        flag(config, name.replace("-", "_"))


INCONCLUSIVE_MODES: tuple[str, ...] = ("fail", "skip", "xfail")


def inconclusive_mode(config: pytest.Config, probe_value: str | None = None) -> str:
    """What an inconclusive verdict becomes in pytest: the probe's key, else the ini key, else fail.

    Raises:
        pytest.UsageError: the ini value is not fail, skip or xfail.
    """
    if probe_value:
        return probe_value
    value = str(config.getini("neuronpatch_on_inconclusive") or "fail").strip()
    if value not in INCONCLUSIVE_MODES:
        raise pytest.UsageError(f"ini key neuronpatch_on_inconclusive = {value!r} is invalid; "
                                f"expected one of {', '.join(INCONCLUSIVE_MODES)}")
    return value


@dataclass(frozen=True)
class Settings:
    """Session options (``--neuronpatch-*`` flags or ``neuronpatch_*`` ini keys).

    Example:
        >>> Settings(artifacts=Path(".neuronpatch/artifacts")).figures
        'auto'
    """

    artifacts: Path
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 64
    figures: FigureMode = "auto"
    root: Path = Path()
    report: bool = False  # an HTML report (ours or pytest-html's) will show the figures
    ship: bool = False  # an xdist worker: files under ``artifacts`` go to the controller
    cache: Path | None = None  # --neuronpatch-cache: results of unchanged experiments are reused


def settings_from_config(config: pytest.Config) -> Settings:
    """Read the options: command line first, then the ini key, then the default.

    A relative ``--neuronpatch-artifacts`` is relative to where pytest was started;
    a relative ``neuronpatch_artifacts`` ini value to the rootdir.

    Raises:
        pytest.UsageError: a bad batch size or figures mode (names the option).

    Example:
        >>> settings_from_config(config).device     # doctest: +SKIP
        'cpu'
    """

    def option(name: str, key: str) -> tuple[str | None, str]:
        value = config.getoption(name.lstrip("-").replace("-", "_"))
        if value is not None:
            return value, name
        raw = ini(config, key, "a positive integer" if key.endswith("batch_size") else "a string")
        ini_value = "" if raw is None else str(raw).strip()
        return (ini_value or None), f"ini key {key}"

    artifacts, artifacts_where = option("--neuronpatch-artifacts", "neuronpatch_artifacts")
    if artifacts is None:
        root = config.rootpath / DEFAULT_ARTIFACTS
    elif artifacts_where.startswith("--"):
        root = config.invocation_params.dir / artifacts
    else:
        root = config.rootpath / artifacts
    device = option("--neuronpatch-device", "neuronpatch_device")[0] or "cpu"
    dtype, where = option("--neuronpatch-dtype", "neuronpatch_dtype")
    dtype = dtype or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise pytest.UsageError(f"{where} = {dtype!r} is invalid; expected float32, bfloat16 or float16")
    raw_batch, where = option("--neuronpatch-batch-size", "neuronpatch_batch_size")
    batch_size = 64
    if raw_batch is not None:
        try:
            batch_size = int(raw_batch)
        except ValueError:
            batch_size = 0
        if batch_size < 1:
            raise pytest.UsageError(
                f"{where} = {raw_batch!r} is invalid; expected a positive integer (rows per "
                "forward pass)"
            )
    figures, where = option("--neuronpatch-figures", "neuronpatch_figures")
    figures = figures or "auto"
    if figures not in FIGURE_MODES:
        raise pytest.UsageError(
            f"{where} = {figures!r} is invalid; expected one of {', '.join(FIGURE_MODES)}"
        )
    cache = cache_dir(config)
    info = controller(config)
    if info:  # an xdist worker: the controller's directory, written by the controller
        root = Path(info["artifacts"])
    elif not artifacts_where.startswith("--"):  # a path the command line names is the user's to choose
        _refuse_outside(config, root, "the artifacts directory" if artifacts is None
                        else "the artifacts directory (ini key neuronpatch_artifacts)",
                        "name it with --neuronpatch-artifacts DIR")
    target = report_target(config)
    if target is not None and not config.getoption("neuronpatch_report", None) and not info:
        _refuse_outside(config, target, "the HTML report (ini key neuronpatch_report)",
                        "name it with --neuronpatch-report FILE.html")
    return Settings(artifacts=root, device=device, dtype=dtype, batch_size=batch_size,
                    figures=cast(FigureMode, figures), root=config.rootpath,
                    report=bool(target is not None or getattr(config.option, "htmlpath", None)),
                    ship=info is not None, cache=cache)


def _refuse_outside(config: pytest.Config, path: Path, what: str, also: str) -> None:
    """A usage error when ``path``, which this process would write, resolves outside the rootdir."""
    message = outside_message(config, path, what, also)
    if message is not None:
        raise pytest.UsageError(message)


DEFAULT_CACHE = ".neuronpatch/cache"
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def cache_dir(config: pytest.Config) -> Path | None:
    """``--neuronpatch-cache[=DIR]`` or the ini key ``neuronpatch_cache``: the cache directory.

    The flag alone (or ``true`` in the ini file) means ``.neuronpatch/cache`` under
    the rootdir; a relative DIR is relative to where pytest was started (the ini
    key's to the rootdir); ``false`` or an empty ini value means no cache.

    Raises:
        pytest.UsageError: the directory is a file, or holds files that are not a cache's.
    """
    value = config.getoption("neuronpatch_cache", None)
    if value is not None:
        where, base = "--neuronpatch-cache", config.invocation_params.dir
    else:
        value = str(ini(config, "neuronpatch_cache", "a directory, true or false") or "").strip()
        where, base = "ini key neuronpatch_cache", config.rootpath
    if value.lower() in _FALSE or (not value and where.startswith("ini")):
        return None
    default = not value or value.lower() in _TRUE
    path = config.rootpath / DEFAULT_CACHE if default else base / value
    if default or where.startswith("ini"):  # a DIR the command line names is the user's to choose
        _refuse_outside(config, path, "the result cache" if default
                        else "the result cache (ini key neuronpatch_cache)",
                        "name it with --neuronpatch-cache=DIR")
    if path.exists() and not path.is_dir():
        raise pytest.UsageError(f"{where} = {str(path)!r} is a file; expected a directory for the "
                                "result cache (or a path that does not exist yet)")
    if path.is_dir() and not (path / CACHE_MARKER).is_file() and any(
            not is_temporary(p) for p in path.iterdir()):  # a killed first write's leftover is not
        raise pytest.UsageError(
            f"{where} = {str(path)!r} is a directory of other files (no {CACHE_MARKER}); expected an "
            "empty or new directory for the result cache (write --neuronpatch-cache=DIR, with '=', "
            "so that a test path after it is not taken for DIR)")
    return path


# ----- paths -----------------------------------------------------------------------------------


ALLOW_OUTSIDE = "--neuronpatch-allow-outside-rootdir"


def outside_rootdir(config: pytest.Config, path: str | os.PathLike[str]) -> Path | None:
    """Where ``path`` resolves (symlinks followed) when that is outside the rootdir; else None.

    None as well when ``--neuronpatch-allow-outside-rootdir`` (or its ini key) is on.
    A path that does not exist yet resolves through its nearest existing parent,
    so ``baselines/ -> /elsewhere`` makes ``baselines/a/t.json`` resolve outside.

    Example:
        >>> outside_rootdir(config, "probes/baselines/a/t.json")     # doctest: +SKIP
        PosixPath('/elsewhere/a/t.json')
    """
    if flag(config, "allow_outside_rootdir"):
        return None
    full = config.rootpath / path
    real = Path(os.path.realpath(full))
    root = Path(os.path.realpath(config.rootpath))
    return None if real.is_relative_to(root) else real


def outside_message(config: pytest.Config, path: str | os.PathLike[str], what: str,
                    also: str = "") -> str | None:
    """The one-line refusal of a path this plugin would write outside the rootdir, or None.

    ``also`` names another way to allow it (the option that names the path explicitly).

    Example:
        >>> outside_message(config, "baselines/a/t.json", "baseline file")    # doctest: +SKIP
        'baselines/a/t.json: baseline file resolves to /elsewhere/a/t.json, outside the rootdir ...'
    """
    real = outside_rootdir(config, path)
    if real is None:
        return None
    allow = f"{ALLOW_OUTSIDE} allows it" + (f", or {also}" if also else "")
    return (f"{user_path(config, config.rootpath / path)}: {what} resolves to {real}, outside the "
            f"rootdir {config.rootpath}; expected a path inside the repository ({allow})")


def report_target(config: pytest.Config) -> Path | None:
    """The HTML report's path: the flag (relative to the start directory) or the ini key."""
    value = config.getoption("neuronpatch_report", None)
    if value:
        return config.invocation_params.dir / value
    ini = str(config.getini("neuronpatch_report") or "").strip()
    return config.rootpath / ini if ini else None


def shown_path(path: str | os.PathLike[str], base: Path | None = None) -> str:
    """A path as the user should type it: relative to ``base`` (cwd) when that is shorter.

    Example:
        >>> shown_path("/tmp/x/a.png", Path("/tmp/x"))
        'a.png'
    """
    base = base or Path.cwd()
    path = Path(path)
    try:
        rel = os.path.relpath(path, base)
    except ValueError:  # another drive on Windows
        return str(path)
    return rel if len(rel) < len(str(path)) else str(path)


def start_dir(config: pytest.Config) -> Path:
    """Where the person started pytest: the controller's directory on an xdist worker."""
    info = controller(config)
    return Path(info["invocation_dir"]) if info else config.invocation_params.dir


def user_path(config: pytest.Config, path: str | os.PathLike[str]) -> str:
    """A path as the person who started pytest would type it.

    On an xdist worker that runs elsewhere (``--tx ...//chdir=DIR``, another
    machine) a path under the worker's rootdir is shown as the same path under
    the controller's, relative to where pytest was started, so messages read
    the same as in a run without workers.

    Example:
        >>> user_path(config, "/work/project/probes/a.probe.yaml")   # doctest: +SKIP
        'probes/a.probe.yaml'
    """
    info = controller(config)
    if info:
        full = Path(os.path.abspath(path))
        root = Path(os.path.abspath(config.rootpath))
        if full.is_relative_to(root):
            path = Path(info["rootdir"]) / full.relative_to(root)
    return shown_path(path, start_dir(config))
