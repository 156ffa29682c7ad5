"""One self-contained HTML page for a probe run: verdicts, metrics, baselines, figures.

The page has no external references (figures are embedded as data URIs, the
style sheet is inline), so it opens offline and survives being attached to a
CI run. Failures come first. Input records are plain JSON-able dicts so they
can travel from pytest-xdist workers to the controller.

A record has: ``nodeid``, ``name``, ``outcome`` (``failed``, ``error``,
``drifted``, ``missing-baseline``, ``passed``, ``skipped``), ``message``,
``head``, ``expectations`` (list of ``{metric, measured, expected, passed,
where}``), ``metrics``, ``baseline`` (``{path, status, drifts: [...]}``) and
``figures`` (``{file name: base64 PNG}``).
"""

from __future__ import annotations

import base64
import html
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from neuronpatch._io import atomic_write_text

ORDER = ("error", "failed", "drifted", "missing-baseline", "passed", "skipped")
_COLOURS = {"error": "#b00020", "failed": "#d32f2f", "drifted": "#e65100",
            "missing-baseline": "#8d6e63", "passed": "#2e7d32", "skipped": "#757575"}
_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.6em} .counts span{margin-right:1.2em;font-weight:600}
details{border:1px solid #ddd;border-radius:6px;margin:.8em 0;padding:.4em .9em}
summary{cursor:pointer;font-weight:600} .badge{color:#fff;border-radius:4px;padding:1px 7px;
margin-right:.6em;font-size:.85em} table{border-collapse:collapse;margin:.6em 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left} tr.bad td{background:#fdecea}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;white-space:pre-wrap}
.figs{display:flex;flex-wrap:wrap;gap:8px} .figs figure{margin:0;width:48%}
.figs img{width:100%;border:1px solid #eee} figcaption{font-size:.8em;color:#555}
"""


def encode_figures(paths: Iterable[str | Path]) -> dict[str, str]:
    """Base64 of each PNG, keyed by file name (what a record carries)."""
    return {Path(p).name: base64.b64encode(Path(p).read_bytes()).decode("ascii")
            for p in paths if Path(p).is_file()}


def _fmt(v: Any) -> str:
    if v is None:
        return "undefined"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _e(v: Any) -> str:
    return html.escape(_fmt(v))


def _sort_key(rec: Mapping[str, Any]) -> tuple[int, str]:
    outcome = rec.get("outcome", "passed")
    return (ORDER.index(outcome) if outcome in ORDER else len(ORDER), str(rec.get("nodeid", "")))


def _probe(rec: Mapping[str, Any]) -> str:
    outcome = str(rec.get("outcome", "passed"))
    colour = _COLOURS.get(outcome, "#555")
    is_open = " open" if outcome in ("error", "failed", "drifted", "missing-baseline") else ""
    out = [f'<details class="probe {html.escape(outcome)}"{is_open}><summary>'
           f'<span class="badge" style="background:{colour}">{html.escape(outcome)}</span>'
           f'{html.escape(str(rec.get("name", rec.get("nodeid", "?"))))}</summary>',
           f'<p><code>{html.escape(str(rec.get("nodeid", "")))}</code>'
           + (f' · head <code>{html.escape(str(rec["head"]))}</code>' if rec.get("head") else "")
           + "</p>"]
    if rec.get("message"):
        out.append(f"<pre>{html.escape(str(rec['message']))}</pre>")
    exps = rec.get("expectations") or []
    if exps:
        out.append("<table><tr><th>metric</th><th>measured</th><th>expected</th><th>result</th>"
                   "<th>where</th></tr>")
        for x in exps:
            bad = "" if x.get("passed") else ' class="bad"'
            out.append(f"<tr{bad}><td>{_e(x.get('metric'))}</td><td>{_e(x.get('measured'))}</td>"
                       f"<td>{_e(x.get('expected'))}</td>"
                       f"<td>{'pass' if x.get('passed') else 'FAIL'}</td><td>{_e(x.get('where'))}</td></tr>")
        out.append("</table>")
    base = rec.get("baseline") or {}
    if base.get("drifts"):
        out.append(f"<p>baseline <code>{_e(base.get('path'))}</code>: {_e(base.get('status'))}</p>")
        out.append("<table><tr><th>metric</th><th>baseline</th><th>now</th><th>difference</th>"
                   "<th>tolerance</th></tr>")
        for d in base["drifts"]:
            bad = "" if d.get("ok") else ' class="bad"'
            out.append(f"<tr{bad}><td>{_e(d.get('metric'))}</td><td>{_e(d.get('baseline'))}</td>"
                       f"<td>{_e(d.get('now'))}</td><td>{_e(d.get('difference'))}</td>"
                       f"<td>{_e(d.get('tolerance'))}</td></tr>")
        out.append("</table>")
    elif base.get("status"):
        out.append(f"<p>baseline: {_e(base.get('status'))}</p>")
    metrics = rec.get("metrics") or {}
    if metrics:
        cells = "".join(f"<tr><td>{html.escape(k)}</td><td>{_e(v)}</td></tr>" for k, v in metrics.items())
        out.append(f"<details><summary>all metrics</summary><table>{cells}</table></details>")
    figs = rec.get("figures") or {}
    if figs:
        out.append('<div class="figs">')
        for name, b64 in figs.items():
            out.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{b64}">'
                       f"<figcaption>{html.escape(name)}</figcaption></figure>")
        out.append("</div>")
    out.append("</details>")
    return "\n".join(out)


def render_report(records: Sequence[Mapping[str, Any]], *, title: str = "neuronpatch probes") -> str:
    """The HTML page for ``records`` (failures first)."""
    counts = Counter(str(r.get("outcome", "passed")) for r in records)
    count_html = "".join(
        f'<span style="color:{_COLOURS.get(k, "#555")}">{counts[k]} {html.escape(k)}</span>'
        for k in ORDER if counts.get(k))
    body = "\n".join(_probe(r) for r in sorted(records, key=_sort_key))
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p class=counts>{count_html or 'no probes ran'}</p>"
            f"{body}</body></html>\n")


def write_report(path: str | Path, records: Sequence[Mapping[str, Any]], *,
                 title: str = "neuronpatch probes") -> Path:
    """Write the page atomically.

    Example:
        >>> records = [{"nodeid": "p.probe.yaml::a", "outcome": "passed"}]
        >>> write_report("report.html", records)  # doctest: +SKIP
    """
    return atomic_write_text(path, render_report(records, title=title))
