"""The HTML report: overview first, failures first, thumbnails linked, and rendered by a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from neuronpatch.plots import write_figures
from neuronpatch.report_html import render_report, write_report
from tests.results.test_plots import linear_case

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site") / "artifacts" / "a.probe.yaml_tracks"
    write_figures(linear_case(), out)
    return out


@pytest.fixture(scope="module")
def records(artifacts):
    names = sorted(p.name for p in artifacts.glob("*.png"))
    return [
        {"nodeid": "probes/a.probe.yaml::tracks", "name": "tracks", "kind": "probe",
         "outcome": "passed", "location": "probes/a.probe.yaml:1",
         "expectations": [{"metric": "slope", "measured": "0.92", "expected": "[0.8, 1.2]",
                           "passed": True, "where": "a.probe.yaml:7"}],
         "metrics": {"slope": 0.92, "r_squared": 0.99, "slope_ci95": [0.9, 0.94]},
         "artifacts": str(artifacts), "figures": names},
        {"nodeid": "probes/b.probe.yaml::wrong", "name": "wrong <claim>", "kind": "probe",
         "outcome": "failed", "message": "slope 0.201 not in [0.8, 1.2]",
         "metrics": {"slope": 0.201, "r_squared": None, "slope_ci95": [0.2, 0.21]},
         "reasons": {"r_squared": "no effect: below float noise"},
         "baseline": {"path": "baselines/wrong.json", "status": "drifted",
                      "drifts": [{"metric": "slope", "baseline": 0.92, "now": 0.201,
                                  "difference": 0.719, "tolerance": 0.02, "ok": False}]},
         "artifacts": str(artifacts), "figures": names},
        {"nodeid": "tests/test_x.py::test_x", "name": "test_x", "kind": "test",
         "outcome": "xfailed", "message": "known"},
        {"nodeid": "probes/c.probe.yaml::new", "name": "new", "kind": "probe",
         "outcome": "skipped", "baseline": {"status": "missing"}},
    ]


def test_overview_table_first_failures_first_thumbnails_link_to_the_files(records, tmp_path):
    site = Path(records[0]["artifacts"]).parents[1]
    page = write_report(site / "report.html", records).read_text()
    overview, details = page.split("<h2>Details</h2>")
    names = re.findall(r'<a href="#t\d+">([^<]+)</a>', overview)
    assert names == ["wrong &lt;claim&gt;", "new", "test_x", "tracks"]  # failed, skipped, xfailed, passed
    assert "undefined" in overview and "no effect: below float noise" in overview  # says why
    assert "drifted: slope" in overview
    links = re.findall(r'<a href="([^"]+\.png)"><img[^>]+src="([^"]+)"', details)
    assert len(links) == 10 and all(href == src for href, src in links)
    assert all((site / href).is_file() for href, _ in links)  # relative to the page
    assert "data:image" not in page and "http://" not in page and "https://" not in page
    assert details.count("<th>tolerance</th>") <= 1  # the drift table at most once
    assert "1 failed" in page and "1 passed" in page and "1 xfailed" in page


def test_embedding_is_an_option(records, tmp_path):
    import base64

    png = Path(records[0]["artifacts"]) / records[0]["figures"][0]
    rec = dict(records[0], embedded={png.name: base64.b64encode(png.read_bytes()).decode()})
    page = render_report([rec], base=tmp_path)
    assert page.count("data:image/png;base64,") == 1


def test_empty_run():
    assert "no probes ran" in render_report([])


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_a_real_browser_renders_the_report_links_resolve_and_images_load(records):
    site = Path(records[0]["artifacts"]).parents[1]
    page = write_report(site / "report.html", records)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--allow-file-access-from-files", f"--user-data-dir={site / 'profile'}"]
    # Count, inside the page, the images the browser decoded (naturalWidth > 0) and the
    # links to PNG files, after loading every lazy image.
    probe = site / "probe.html"
    probe.write_text(page.read_text().replace('loading="lazy" ', "").replace(
        "</body>", "<script>window.onload=()=>{const imgs=[...document.images];"
        "const ok=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;"
        "const links=[...document.querySelectorAll('a[href$=\".png\"]')].length;"
        "document.title='decoded:'+ok+'/'+imgs.length+' links:'+links}</script></body>"))
    dom = subprocess.run([CHROMIUM, *flags, "--virtual-time-budget=5000", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<title>decoded:10/10 links:10</title>" in dom.stdout
    assert "wrong &lt;claim&gt;" in dom.stdout
    # A thumbnail's link target is the full figure, and the browser can open it.
    href = re.search(r'<a href="([^"]+\.png)">', page.read_text()).group(1)
    target = (site / href).resolve()
    shot = site / "shot.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=800,600",
                    target.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5_000


def test_a_probe_with_controls_gets_a_controls_table(tmp_path):
    controls = {"units": [3], "directions": {"random": 1, "seed": 0}, "specificity": 4.5,
                "specificity_ci95": [4.0, 5.0], "max_abs_control_slope": 0.2,
                "controls": [{"label": "unit3", "kind": "unit", "unit": 3, "slope": -0.2, "r_squared": 0.98,
                              "slope_ci95": [-0.25, -0.15], "r_squared_ci95": [0.95, 0.99]},
                             {"label": "dir0", "kind": "direction", "unit": None, "slope": 0.05,
                              "r_squared": None, "slope_ci95": [0.01, 0.09], "r_squared_ci95": [None, None]}]}
    rec = {"nodeid": "a.probe.yaml::c", "name": "c", "kind": "probe", "outcome": "passed",
           "metrics": {"slope": 0.9, "r_squared": 0.99, "slope_ci95": [0.85, 0.95],
                       "r_squared_ci95": [0.97, 1.0]}, "controls": controls}
    page = render_report([rec, {"nodeid": "b.probe.yaml::plain", "name": "plain", "outcome": "passed"}],
                         base=tmp_path)
    [table] = re.findall(r'<table class="controls">.*?</table>', page, re.DOTALL)
    assert "specificity 4.5 (95% CI [4, 5])" in table and "largest |control slope| (0.2)" in table
    rows = re.findall(r"<tr[^>]*><td>(?:<b>)?([^<]+)(?:</b>)?</td><td>([^<]+)</td>"
                      r"<td class=num>(?:<b>)?([^<]+)", table)
    assert rows == [("target", "target", "0.9"), ("unit3", "unit", "-0.2"), ("dir0", "direction", "0.05")]
    assert "[-0.25, -0.15]" in table and "[0.97, 1]" in table
    assert "undefined" in table  # dir0's R²
    assert page.count('<table class="controls">') == 1  # none for the probe without controls
