"""A probe file → validated :class:`~neuronpatch.probes.schema.ProbeSpec` objects, in three steps.

Each YAML document (:mod:`neuronpatch.probes.documents`: split before parsing, the line of
every key) is resolved against the probe file's directory
(:mod:`neuronpatch.probes.resolver`: head globs, inputs files, rootdir containment), then
validated (:mod:`neuronpatch.probes.schema`: the keys, pure pydantic), and every problem
of both steps becomes one ``FILE:LINE: key …`` line (:mod:`neuronpatch.probes.diagnostics`),
reported together in line order. A broken document does not stop the others.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping

from pydantic import ValidationError

from neuronpatch.errors import ProbeSpecError
from neuronpatch.probes.diagnostics import describe, error_line, joined, key_problem
from neuronpatch.probes.documents import Document, load_documents
from neuronpatch.probes.resolver import resolve
from neuronpatch.probes.schema import ProbeSpec


def parse_document(doc: Document, *, root: str | os.PathLike[str] | None = None) -> ProbeSpec:
    """Validate one document into a :class:`ProbeSpec`.

    Raises:
        ProbeSpecError: every problem of the document (its YAML's, such as
            duplicate keys, and its schema's), one ``FILE:LINE: key ...`` line
            each, in line order. With ``root``, a ``baseline.file`` or
            ``inputs.file`` that resolves outside it is one of them.

    Example:
        >>> [spec.title for spec in map(parse_document, load_documents(p))]  # doctest: +SKIP
        ['demo head tracks its neuron']
    """
    problems = list(doc.problems)
    if not doc.parsed:
        raise ProbeSpecError("\n".join(doc.problem_lines()))
    if not isinstance(doc.data, Mapping):
        problems.append((doc.line, f"the document: {describe(doc.data)}; expected a mapping of "
                                   f"probe keys ({', '.join(ProbeSpec.model_fields)})"))
        raise ProbeSpecError(joined(doc, problems))
    bad_keys = [k for k in doc.data if not isinstance(k, str)]
    if bad_keys:
        problems.append((doc.line, f"key {bad_keys[0]!r} is not a string; expected one of "
                                   f"{', '.join(ProbeSpec.model_fields)}"))
        raise ProbeSpecError(joined(doc, problems))
    resolved = resolve(doc.data, doc.path.parent, root)
    problems += [key_problem(doc, loc, text) for loc, text in resolved.problems]
    try:
        spec = ProbeSpec.model_validate(resolved.data)
    except ValidationError as e:
        problems += [error_line(doc, err, ProbeSpec) for err in e.errors(include_url=False)]
        raise ProbeSpecError(joined(doc, problems)) from None
    if problems:
        raise ProbeSpecError(joined(doc, problems))
    spec._doc = doc
    spec._heads = resolved.heads
    return spec


def iter_probe_file(
    path: str | os.PathLike[str], *, display: str | None = None,
    root: str | os.PathLike[str] | None = None,
) -> Iterator[tuple[Document, ProbeSpec | ProbeSpecError]]:
    """Each document with its spec, or the error that document has (the others still parse).

    Raises:
        ProbeSpecError: the file as a whole cannot be read.

    Example:
        >>> for doc, spec in iter_probe_file("probes/demo.probe.yaml"):   # doctest: +SKIP
        ...     print(doc.name_guess(), isinstance(spec, ProbeSpec))
    """
    names: dict[str, str] = {}
    for doc in load_documents(path, display=display):
        try:
            spec = parse_document(doc, root=root)
        except ProbeSpecError as e:
            yield doc, e
            continue
        if spec.title in names:
            yield doc, ProbeSpecError(
                f"{spec.where('name')}: key 'name': {spec.title!r} is already the name of the "
                f"probe at {names[spec.title]}; expected a unique name per file"
            )
            continue
        names[spec.title] = spec.where()
        yield doc, spec


def load_probe_file(path: str | os.PathLike[str], *, display: str | None = None) -> list[ProbeSpec]:
    """Parse every probe of a file; the first broken document raises.

    Raises:
        ProbeSpecError: one-line-per-problem message naming file, line and key.

    Example:
        >>> [s.title for s in load_probe_file("probes/demo.probe.yaml")]   # doctest: +SKIP
        ['demo head tracks its neuron']
    """
    specs = []
    for _, spec in iter_probe_file(path, display=display):
        if isinstance(spec, ProbeSpecError):
            raise spec
        specs.append(spec)
    return specs
