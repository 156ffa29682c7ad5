"""The HTML report: self-contained, failures first, and rendered by a real browser."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from neuronpatch.plots import write_figures
from neuronpatch.report_html import encode_figures, render_report, write_report
from tests.test_plots import linear_case

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    figs = encode_figures(write_figures(linear_case(), tmp_path_factory.mktemp("figs")))
    return [
        {"nodeid": "probes/a.probe.yaml::tracks", "name": "tracks", "outcome": "passed",
         "expectations": [{"metric": "slope", "measured": 0.92, "expected": "[0.8, 1.2]",
                           "passed": True, "where": "a.probe.yaml:7"}],
         "metrics": {"slope": 0.92}, "figures": figs},
        {"nodeid": "probes/b.probe.yaml::wrong", "name": "wrong <claim>", "outcome": "failed",
         "message": "slope 0.201 not in [0.8, 1.2]",
         "expectations": [{"metric": "slope", "measured": 0.201, "expected": "[0.8, 1.2]",
                           "passed": False, "where": "b.probe.yaml:9"}],
         "baseline": {"path": "baselines/wrong.json", "status": "drifted",
                      "drifts": [{"metric": "slope", "baseline": 0.92, "now": 0.201,
                                  "difference": 0.719, "tolerance": 0.02, "ok": False}]},
         "figures": figs},
        {"nodeid": "probes/c.probe.yaml::new", "name": "new", "outcome": "missing-baseline"},
    ]


def test_page_is_self_contained_and_failures_come_first(records, tmp_path):
    page = write_report(tmp_path / "r.html", records).read_text()
    assert page.index("wrong &lt;claim&gt;") < page.index("tracks")  # escaped, and first
    assert page.index("new") < page.index("tracks")
    assert page.count("data:image/png;base64,") == 10
    assert "http://" not in page and "https://" not in page  # nothing to fetch
    assert "1 failed" in page and "1 passed" in page and "1 missing-baseline" in page
    assert "b.probe.yaml:9" in page and "0.719" in page


def test_empty_run():
    assert "no probes ran" in render_report([])


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_a_real_browser_renders_the_report(records, tmp_path):
    page = write_report(tmp_path / "report.html", records)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    # Count the images the browser actually decoded (naturalWidth > 0), inside the page.
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace(
        "</body>", "<script>window.onload=()=>{document.title='decoded:'+[...document.images]"
        ".filter(i=>i.complete&&i.naturalWidth>0).length}</script></body>"))
    dom = subprocess.run([CHROMIUM, *flags, "--virtual-time-budget=5000", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<title>decoded:10</title>" in dom.stdout
    assert "wrong &lt;claim&gt;" in dom.stdout and "missing-baseline" in dom.stdout
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,1600",
                    page.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
