"""The training corpus of the embedded demo model: English text that ships with Python.

neuronpatch must work on a fresh, offline install, so the demo model cannot be
trained (or re-trained) on anything fetched from a hub. The Python standard
library already carries a few megabytes of edited English prose: the help
texts behind ``help("TOPIC")`` (``pydoc_data.topics``) and the docstrings of
its modules, classes and functions. That is the corpus.

Every call gives the same documents in the same order for a given Python
version and platform: the module list is fixed and sorted, members are walked
in sorted order, and duplicates (inherited or re-exported docstrings) are kept
only at their first occurrence.

Example:
    >>> from neuronpatch.demo import corpus
    >>> train, held_out = corpus.split()
    >>> len(train) > len(held_out) > 0
    True
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import random
import re
import warnings
from collections.abc import Iterator, Sequence
from types import ModuleType

# Pure-Python (or always-built) standard-library modules that import quickly,
# print nothing, raise no DeprecationWarning on 3.11 and need no optional
# system library; a missing optional C extension would silently change the corpus.
MODULES: tuple[str, ...] = tuple(
    sorted(
        [
            "abc",
            "argparse",
            "array",
            "ast",
            "asyncio",
            "atexit",
            "base64",
            "bdb",
            "binascii",
            "bisect",
            "builtins",
            "calendar",
            "cmath",
            "cmd",
            "code",
            "codecs",
            "codeop",
            "collections",
            "collections.abc",
            "colorsys",
            "compileall",
            "concurrent.futures",
            "configparser",
            "contextlib",
            "contextvars",
            "copy",
            "copyreg",
            "csv",
            "dataclasses",
            "datetime",
            "decimal",
            "difflib",
            "dis",
            "doctest",
            "email",
            "email.charset",
            "email.contentmanager",
            "email.header",
            "email.headerregistry",
            "email.message",
            "email.mime.text",
            "email.parser",
            "email.policy",
            "email.utils",
            "encodings",
            "enum",
            "errno",
            "faulthandler",
            "filecmp",
            "fileinput",
            "fnmatch",
            "fractions",
            "ftplib",
            "functools",
            "gc",
            "getopt",
            "gettext",
            "glob",
            "graphlib",
            "gzip",
            "hashlib",
            "heapq",
            "hmac",
            "html",
            "html.parser",
            "http.client",
            "http.cookiejar",
            "http.cookies",
            "http.server",
            "imaplib",
            "importlib",
            "importlib.abc",
            "importlib.metadata",
            "importlib.resources",
            "importlib.util",
            "inspect",
            "io",
            "ipaddress",
            "itertools",
            "json",
            "keyword",
            "linecache",
            "locale",
            "logging",
            "logging.config",
            "logging.handlers",
            "mailbox",
            "marshal",
            "math",
            "mimetypes",
            "modulefinder",
            "multiprocessing",
            "multiprocessing.connection",
            "multiprocessing.managers",
            "multiprocessing.pool",
            "multiprocessing.queues",
            "multiprocessing.shared_memory",
            "multiprocessing.synchronize",
            "netrc",
            "numbers",
            "operator",
            "optparse",
            "os",
            "pathlib",
            "pdb",
            "pickle",
            "pickletools",
            "pkgutil",
            "platform",
            "plistlib",
            "poplib",
            "pprint",
            "profile",
            "pstats",
            "pty",
            "py_compile",
            "pyclbr",
            "pydoc",
            "queue",
            "quopri",
            "random",
            "re",
            "reprlib",
            "runpy",
            "sched",
            "secrets",
            "selectors",
            "shelve",
            "shlex",
            "shutil",
            "signal",
            "smtplib",
            "socket",
            "socketserver",
            "stat",
            "statistics",
            "string",
            "struct",
            "subprocess",
            "symtable",
            "sys",
            "sysconfig",
            "tabnanny",
            "tarfile",
            "tempfile",
            "textwrap",
            "threading",
            "time",
            "timeit",
            "tokenize",
            "tomllib",
            "trace",
            "traceback",
            "tracemalloc",
            "tty",
            "types",
            "typing",
            "unicodedata",
            "unittest",
            "unittest.mock",
            "urllib.error",
            "urllib.parse",
            "urllib.request",
            "urllib.robotparser",
            "uuid",
            "venv",
            "warnings",
            "wave",
            "weakref",
            "wsgiref.handlers",
            "wsgiref.headers",
            "wsgiref.simple_server",
            "wsgiref.util",
            "xml.dom.minidom",
            "xml.dom.pulldom",
            "xml.etree.ElementTree",
            "xml.sax",
            "xml.sax.handler",
            "xml.sax.saxutils",
            "xmlrpc.client",
            "xmlrpc.server",
            "zipapp",
            "zipfile",
            "zipimport",
            "zlib",
            "zoneinfo",
        ]
    )
)

MIN_DOCUMENT_WORDS = 12
_WHITESPACE = re.compile(r"\s+")
# reST heading underlines and rules ("*****", "=====", "-----") carry no language.
_RULE = re.compile(r"(?<!\S)([*=~^+#-])\1{2,}(?!\S)")


def _clean(text: str) -> str:
    return _WHITESPACE.sub(" ", _RULE.sub(" ", text)).strip()


def _help_topics() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


def _members(obj: type | ModuleType) -> Iterator[object]:
    # vars() rather than dir(): only what the object itself defines or re-exports,
    # so walking a class does not re-visit everything it inherits.
    for name in sorted(vars(obj)):
        if name.startswith("_"):
            continue
        try:
            yield getattr(obj, name)
        except Exception:  # a lazy attribute that fails to resolve has no docstring to offer
            continue


def _module_docstrings(name: str) -> Iterator[str]:
    module = importlib.import_module(name)
    yield inspect.getdoc(module) or ""
    for member in _members(module):
        if not (inspect.isclass(member) or inspect.isroutine(member)):
            continue
        yield inspect.getdoc(member) or ""
        if inspect.isclass(member):
            for attr in _members(member):
                if inspect.isroutine(attr) or isinstance(attr, property):
                    yield inspect.getdoc(attr) or ""


@functools.cache
def _documents() -> tuple[str, ...]:
    seen: set[str] = set()
    docs: list[str] = []
    with warnings.catch_warnings():
        # Touching every public attribute wakes a few deprecated aliases; they are harmless here.
        warnings.simplefilter("ignore")
        texts = [*_help_topics()]
        for name in MODULES:
            texts.extend(_module_docstrings(name))
    for raw in texts:
        text = _clean(raw)
        if len(text.split(" ")) < MIN_DOCUMENT_WORDS or text in seen:
            continue
        seen.add(text)
        docs.append(text)
    return tuple(docs)


def documents() -> list[str]:
    """All corpus documents, cleaned, deduplicated, in a stable order.

    The ``pydoc`` help topics come first (sorted by topic), then the docstrings
    of :data:`MODULES` (module, then its public classes and functions and the
    public methods of those classes, each in sorted order). Whitespace runs are
    collapsed to one space, reST rules are dropped, and documents shorter than
    ``MIN_DOCUMENT_WORDS`` words are left out.

    Returns:
        A new list on every call (the underlying texts are computed once).

    Example:
        >>> docs = documents()
        >>> docs == documents() and all("  " not in d for d in docs)
        True
    """
    return list(_documents())


def split(held_out_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split :func:`documents` into train and held-out parts, by whole document.

    Args:
        held_out_fraction: share of documents held out, in (0, 1).
        seed: seed of the shuffle that picks the held-out documents.

    Returns:
        ``(train, held_out)``, each in corpus order; disjoint and together the whole corpus.

    Raises:
        ValueError: ``held_out_fraction`` is not strictly between 0 and 1.

    Example:
        >>> train, held_out = split(0.1, seed=0)
        >>> set(train).isdisjoint(held_out)
        True
    """
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    docs = _documents()
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_held = max(1, math.ceil(held_out_fraction * len(docs)))
    held = set(order[:n_held])
    train = [d for i, d in enumerate(docs) if i not in held]
    held_out = [d for i, d in enumerate(docs) if i in held]
    return train, held_out


def text_windows(
    docs: Sequence[str], *, n: int, min_words: int, max_words: int, seed: int
) -> list[str]:
    """Sample ``n`` contiguous word windows from ``docs``, deterministically.

    A window is a run of consecutive whitespace-separated words of one
    document, joined by single spaces, so it starts and ends on a word
    boundary; its length is uniform in ``[min_words, max_words]`` (capped by
    the document). Documents are drawn in proportion to their length, so every
    word is about equally likely to be covered.

    Args:
        docs: documents to sample from (e.g. one side of :func:`split`).
        n: number of windows.
        min_words: fewest words in a window (at least 1).
        max_words: most words in a window.
        seed: seed of the sampler; the same arguments give the same windows.

    Returns:
        ``n`` strings, each of ``min_words`` to ``max_words`` words.

    Raises:
        ValueError: bad bounds, negative ``n``, or no document has ``min_words`` words.

    Example:
        >>> w = text_windows(["one two three four five six"], n=2, min_words=2,
        ...                  max_words=3, seed=0)
        >>> len(w), all(2 <= len(x.split()) <= 3 for x in w)
        (2, True)
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_words <= max_words:
        raise ValueError(f"need 1 <= min_words <= max_words, got {min_words}, {max_words}")
    split_docs = [words for words in (d.split() for d in docs) if len(words) >= min_words]
    if n and not split_docs:
        raise ValueError(f"no document has at least {min_words} words")
    rng = random.Random(seed)
    weights = [len(words) for words in split_docs]
    windows: list[str] = []
    for words in rng.choices(split_docs, weights=weights, k=n) if n else []:
        length = rng.randint(min_words, min(max_words, len(words)))
        start = rng.randint(0, len(words) - length)
        windows.append(" ".join(words[start : start + length]))
    return windows
