"""One HTML page for a test run: an overview table first, then each test's details.

What a reviewer reads first is the overview: one row per probe (and per test
that used ``neuronpatch_expect``) with pytest's outcome, slope, R², the
slope's 95% interval, the baseline state and a link to the details; failures
and errors first. The details hold the failure text, the expectations table,
the drift table and the figures as small thumbnails that link to the PNG files
in the artifacts directory (relative links, so the page and the artifacts can
be archived together). ``embed=True`` puts the figures into the page instead
(data URIs: one file to attach, many times the size).

Outcomes are pytest's own: ``error``, ``failed``, ``xpassed``, ``skipped``,
``xfailed``, ``passed``. A record is a JSON-able dict (see
:func:`neuronpatch.pytest_plugin.outcomes.make_record`) with ``nodeid`` and
``outcome`` added by the run.
"""

from __future__ import annotations

import html
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from neuronpatch._io import atomic_write_text

ORDER = ("error", "failed", "xpassed", "skipped", "xfailed", "passed")
_COLOURS = {"error": "#b00020", "failed": "#d32f2f", "xpassed": "#e65100", "skipped": "#757575",
            "xfailed": "#6d4c41", "passed": "#2e7d32"}
_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em} h2{font-size:1.25em;margin-top:2em} h3{font-size:1.05em;margin:.2em 0}
.counts span{margin-right:1.2em;font-weight:600}
.badge{color:#fff;border-radius:4px;padding:1px 7px;font-size:.85em;white-space:nowrap}
table{border-collapse:collapse;margin:.6em 0} td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.bad td{background:#fdecea} .undef{color:#8d6e63;border-bottom:1px dotted #8d6e63;cursor:help}
section.test{border:1px solid #ddd;border-radius:6px;margin:1em 0;padding:.5em 1em}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;white-space:pre-wrap;font-size:.9em}
.figs{display:flex;flex-wrap:wrap;gap:8px} .figs figure{margin:0;width:190px}
.figs img{width:190px;border:1px solid #eee} figcaption{font-size:.75em;color:#555;word-break:break-all}
.muted{color:#777}
table.controls caption{text-align:left;font-size:.9em;color:#444;padding:.2em 0}
tr.target td{background:#fff8e1}
"""


def _fmt(v: Any) -> str:
    if v is None:
        return "undefined"
    if isinstance(v, float):
        return "undefined" if math.isnan(v) else f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _e(v: Any) -> str:
    return html.escape(_fmt(v))


def _number(rec: Mapping[str, Any], metric: str) -> str:
    """A metric's cell: the value, or "undefined" with the reason on hover."""
    metrics = rec.get("metrics") or {}
    if metric not in metrics:
        return '<span class="muted">—</span>'
    value = metrics[metric]
    undefined = value is None or (isinstance(value, list) and None in value)
    if undefined:
        reason = (rec.get("reasons") or {}).get(metric, "no data")
        return f'<span class="undef" title="{html.escape(reason)}">undefined</span>'
    return _e(value)


def _badge(outcome: str) -> str:
    return (f'<span class="badge" style="background:{_COLOURS.get(outcome, "#555")}">'
            f"{html.escape(outcome)}</span>")


def _anchor(rec: Mapping[str, Any], i: int) -> str:
    return f"t{i}"


def _sort_key(rec: Mapping[str, Any]) -> tuple[int, str]:
    outcome = rec.get("outcome", "passed")
    return (ORDER.index(outcome) if outcome in ORDER else len(ORDER), str(rec.get("nodeid", "")))


def _link(target: Path, base: Path | None) -> str:
    rel = os.path.relpath(target, base) if base is not None else str(target)
    return quote(Path(rel).as_posix())


def _baseline_cell(rec: Mapping[str, Any]) -> str:
    base = rec.get("baseline") or {}
    status = base.get("status")
    if not status:
        return '<span class="muted">—</span>'
    drifted = [d.get("metric") for d in base.get("drifts") or [] if not d.get("ok")]
    text = {"ok": "within tolerance", "drifted": "drifted: " + ", ".join(map(str, drifted)),
            "missing": "no baseline", "updated": "updated"}.get(status, status)
    return html.escape(text)


def _overview(records: Sequence[Mapping[str, Any]], base: Path | None) -> str:
    rows = ["<table class=overview><tr><th>test</th><th>outcome</th><th>slope</th><th>R²</th>"
            "<th>slope 95% CI</th><th>baseline</th><th>artifacts</th></tr>"]
    for i, rec in enumerate(records):
        outcome = str(rec.get("outcome", "passed"))
        bad = ' class="bad"' if outcome in ("error", "failed", "xpassed") else ""
        art = rec.get("artifacts")
        art_cell = (f'<a href="{_link(Path(art), base)}/">files</a>' if art
                    else '<span class="muted">—</span>')
        rows.append(
            f'<tr{bad}><td><a href="#{_anchor(rec, i)}">{html.escape(str(rec.get("name", "?")))}</a>'
            f"</td><td>{_badge(outcome)}</td><td class=num>{_number(rec, 'slope')}</td>"
            f"<td class=num>{_number(rec, 'r_squared')}</td>"
            f"<td class=num>{_number(rec, 'slope_ci95')}</td><td>{_baseline_cell(rec)}</td>"
            f"<td>{art_cell}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _details(rec: Mapping[str, Any], i: int, base: Path | None) -> str:
    outcome = str(rec.get("outcome", "passed"))
    kind = "probe" if rec.get("kind") == "probe" else "test"
    out = [f'<section class="test {html.escape(outcome)}" id="{_anchor(rec, i)}">',
           f"<h3>{_badge(outcome)} {kind} {html.escape(str(rec.get('name', '?')))}</h3>",
           f"<p><code>{html.escape(str(rec.get('nodeid', '')))}</code>"
           + (f" · written at <code>{html.escape(str(rec['location']))}</code>"
              if rec.get("location") else "")
           + (f" · head <code>{html.escape(str(rec['head']))}</code>" if rec.get("head") else "")
           + "</p>"]
    if rec.get("message"):
        out.append(f"<pre>{html.escape(str(rec['message']))}</pre>")
    exps = rec.get("expectations") or []
    if exps and not rec.get("message"):
        out.append("<table><tr><th>metric</th><th>measured</th><th>expected</th><th>result</th>"
                   "<th>where</th></tr>")
        for x in exps:
            bad = "" if x.get("passed") else ' class="bad"'
            details = "".join(f"<br><small>{html.escape(str(d))}</small>"
                              for d in x.get("details") or [])
            out.append(f"<tr{bad}><td>{_e(x.get('metric'))}</td><td>{_e(x.get('measured'))}"
                       f"{details}</td><td>{_e(x.get('expected'))}</td>"
                       f"<td>{_word(x)}</td>"
                       f"<td>{_e(x.get('where'))}</td></tr>")
        out.append("</table>")
    out.append(_controls_table(rec))
    if rec.get("rounding"):
        out.append(f'<p class="rounding">numerical error: {html.escape(str(rec["rounding"]))}</p>')
    reasons = rec.get("reasons") or {}
    if reasons:
        items = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(str(v))}</li>"
                        for k, v in reasons.items())
        out.append(f"<p>undefined or trivial statistics:</p><ul>{items}</ul>")
    baseline = rec.get("baseline") or {}
    if rec.get("message"):  # the failure text already holds the expectations and any drift table
        pass
    elif baseline.get("drifts"):
        out.append(f"<p>baseline <code>{_e(baseline.get('path'))}</code>: "
                   f"{_baseline_cell(rec)}</p>")
        out.append("<table><tr><th>metric</th><th>baseline</th><th>now</th><th>difference</th>"
                   "<th>tolerance</th><th></th></tr>")
        for d in baseline["drifts"]:
            bad = "" if d.get("ok") else ' class="bad"'
            out.append(f"<tr{bad}><td>{_e(d.get('metric'))}</td><td>{_e(d.get('baseline'))}</td>"
                       f"<td>{_e(d.get('now'))}</td><td>{_e(d.get('difference'))}</td>"
                       f"<td>{_e(d.get('tolerance'))}</td>"
                       f"<td>{'ok' if d.get('ok') else 'DRIFT'}</td></tr>")
        out.append("</table>")
    elif baseline.get("status"):
        out.append(f"<p>baseline <code>{_e(baseline.get('path'))}</code>: "
                   f"{_baseline_cell(rec)}</p>")
    figures = rec.get("figures") or []
    embedded = rec.get("embedded") or {}
    art = rec.get("artifacts")
    if figures and art:
        out.append('<div class="figs">')
        for name in figures:
            href = _link(Path(art) / name, base)
            src = f"data:image/png;base64,{embedded[name]}" if name in embedded else href
            out.append(f'<figure><a href="{href}"><img loading="lazy" alt="{html.escape(name)}" '
                       f'src="{src}"></a><figcaption>{html.escape(name)}</figcaption></figure>')
        out.append("</div>")
    elif rec.get("figure_error"):
        out.append(f"<p>figures not written: {html.escape(str(rec['figure_error']))}</p>")
    out.append("</section>")
    return "\n".join(out)


def _controls_table(rec: Mapping[str, Any]) -> str:
    """The target and each negative control: slope, R², 95% intervals; then the specificity."""
    controls = rec.get("controls") or {}
    each = controls.get("controls") or []
    if not each:
        return ""
    metrics = rec.get("metrics") or {}
    spec = (f"specificity {_e(controls.get('specificity'))} (95% CI "
            f"{_e(controls.get('specificity_ci95'))}): |target slope| / largest |control slope| "
            f"({_e(controls.get('max_abs_control_slope'))})")
    rows = [f'<table class="controls"><caption>negative controls · {spec}</caption>'
            "<tr><th>unit</th><th>kind</th><th>slope</th><th>slope 95% CI</th><th>R²</th>"
            "<th>R² 95% CI</th></tr>",
            f'<tr class="target"><td><b>target</b></td><td>target</td>'
            f"<td class=num><b>{_number(rec, 'slope')}</b></td>"
            f"<td class=num>{_number(rec, 'slope_ci95')}</td>"
            f"<td class=num>{_number(rec, 'r_squared')}</td><td class=num>"
            f"{_e(metrics.get('r_squared_ci95')) if 'r_squared_ci95' in metrics else '—'}</td></tr>"]
    for c in each:
        rows.append(f"<tr><td>{_e(c.get('label'))}</td><td>{_e(c.get('kind'))}</td>"
                    f"<td class=num>{_e(c.get('slope'))}</td><td class=num>{_e(c.get('slope_ci95'))}</td>"
                    f"<td class=num>{_e(c.get('r_squared'))}</td>"
                    f"<td class=num>{_e(c.get('r_squared_ci95'))}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def render_report(records: Sequence[Mapping[str, Any]], *, title: str = "neuronpatch probes",
                  base: Path | None = None) -> str:
    """The HTML page for ``records``: counts, overview table, details (failures first).

    ``base`` is the directory the page will live in (figure links are relative to it).

    Example:
        >>> "no probes ran" in render_report([])
        True
    """
    ordered = sorted(records, key=_sort_key)
    counts = Counter(str(r.get("outcome", "passed")) for r in records)
    count_html = "".join(
        f'<span style="color:{_COLOURS.get(k, "#555")}">{counts[k]} {html.escape(k)}</span>'
        for k in ORDER if counts.get(k))
    if not ordered:
        body = ""
    else:
        body = ("<h2>Overview</h2>\n" + _overview(ordered, base) + "\n<h2>Details</h2>\n"
                + "\n".join(_details(r, i, base) for i, r in enumerate(ordered)))
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p class=counts>{count_html or 'no probes ran'}</p>"
            f"{body}</body></html>\n")


def write_report(path: str | Path, records: Sequence[Mapping[str, Any]], *,
                 title: str = "neuronpatch probes") -> Path:
    """Write the page atomically; figure links are relative to its directory.

    Example:
        >>> records = [{"nodeid": "p.probe.yaml::a", "outcome": "passed"}]
        >>> write_report("report.html", records)  # doctest: +SKIP
    """
    path = Path(path)
    return atomic_write_text(path, render_report(records, title=title, base=path.resolve().parent))


def _word(x: dict[str, Any]) -> str:
    """pass, FAIL or INCONCLUSIVE for one expectation row."""
    status = x.get("status") or ("pass" if x.get("passed") else "fail")
    return "pass" if status == "pass" else str(status).upper()
