"""report.html: one self-contained page, byte-stable, tested in a real headless Chromium."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from featurecache.report import compare

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))
                 if p), None)

HARNESS = """<!DOCTYPE html><html><body>
<iframe id="f" src="REPORT"></iframe>
<script>
document.getElementById("f").onload = function () {
  var d = this.contentDocument, out = {};
  out.ready = d.documentElement.getAttribute("data-ready");
  var heads = d.querySelectorAll("#results thead th");
  function col(key) {
    var th = d.querySelector('#results th[data-key="' + key + '"]');
    var idx = Array.prototype.indexOf.call(heads, th);
    return Array.prototype.map.call(d.querySelectorAll("#results tbody tr"),
      function (r) { return r.cells[idx].getAttribute("data-v"); });
  }
  out.keys = Array.prototype.map.call(heads, function (h) { return h.getAttribute("data-key"); });
  out.before = col("dim");
  d.querySelector('#results th[data-key="dim"]').click();
  out.first = col("dim");
  d.querySelector('#results th[data-key="dim"]').click();
  out.second = col("dim");
  out.winners = Array.prototype.map.call(d.querySelectorAll("#results tbody tr.winner"),
    function (r) { return [r.cells[out.keys.indexOf("layer")].textContent,
                           r.cells[out.keys.indexOf("head")].textContent]; });
  out.titles = d.querySelectorAll("svg title").length;
  out.svgs = d.querySelectorAll("svg").length;
  var pre = document.createElement("pre");
  pre.id = "out";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
};
</script></body></html>
"""


@pytest.fixture
def report(feats_path, tmp_path):
    return compare(feats_path, tmp_path / "rep", heads=["logreg", "knn"], progress=False,
                   n_boot=50, n_jobs=1, shots=(1, 2))


def _chromium(url, *flags):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs Debian's chromium)")
        pytest.skip("chromium is not installed")
    run = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                          "--enable-logging=stderr", "--v=0", *flags, url],
                         capture_output=True, text=True, timeout=120)
    return run


@pytest.mark.slow
def test_report_html_is_self_contained_and_byte_stable(report, feats_path, tmp_path):
    page = (report.out_dir / "report.html").read_text()
    # no network reference: no URL of any scheme, no external script, style sheet or image
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", page, re.I)
    assert not re.search(r"<(script|img|link|iframe)[^>]+(src|href)=", page, re.I)
    assert "@import" not in page and "url(http" not in page
    # the verdict, every row, and the plots as inline SVG with a tooltip per point
    rows = json.loads((report.out_dir / "results.json").read_text())["rows"]
    assert page.count("<tr") == len(rows) + 1
    assert page.count("<svg") == 4  # depth, few-shot, confusion, recall per class
    assert page.count("<title>") >= len(rows) + 1
    again = compare(feats_path, tmp_path / "again", heads=["logreg", "knn"], progress=False,
                    n_boot=50, n_jobs=1, shots=(1, 2))
    assert (again.out_dir / "report.html").read_bytes() == (report.out_dir / "report.html").read_bytes()
    assert (report.out_dir / "report.html").resolve().parent.name != \
        (again.out_dir / "report.html").resolve().parent.name  # two runs, two versions


@pytest.mark.slow
def test_report_html_sorts_and_marks_the_winner_in_a_browser(report, tmp_path):
    (tmp_path / "harness.html").write_text(HARNESS.replace("REPORT", "rep/report.html"))
    run = _chromium(f"file://{tmp_path / 'harness.html'}", "--allow-file-access-from-files",
                    "--dump-dom")
    got = re.search(r'<pre id="out">(.*?)</pre>', run.stdout)
    assert got, run.stderr[-2000:]
    out = json.loads(got.group(1).replace("&quot;", '"'))
    assert out["ready"] == "1"  # the page's script ran to its end
    dims = [int(v) for v in out["before"]]
    assert [int(v) for v in out["first"]] == sorted(dims, reverse=True)  # first click: high first
    assert [int(v) for v in out["second"]] == sorted(dims)
    assert len(set(dims)) > 1  # the sort is visible
    res = json.loads((report.out_dir / "results.json").read_text())
    assert out["winners"] == [[res["winner"]["layer"], res["winner"]["head"]]]
    assert out["svgs"] == 4 and out["titles"] >= len(res["rows"])
    console = [l for l in run.stderr.splitlines() if "CONSOLE" in l]
    assert not [l for l in console if "report.html" in l], console


@pytest.mark.slow
def test_report_html_opens_sorted_from_its_link_and_renders(report, tmp_path):
    """``report.html#sort=cv-asc`` (a link that keeps the order) and a screenshot that is
    not blank."""
    url = f"file://{report.out_dir / 'report.html'}#sort=cv-asc"
    run = _chromium(url, "--dump-dom")
    assert 'data-ready="1"' in run.stdout
    cvs = [float(v) for v in re.findall(r'<tr[^>]*>(?:<td[^>]*>.*?</td>){6}<td data-v="([^"]+)"',
                                         run.stdout)]
    assert cvs and cvs == sorted(cvs)
    shot = tmp_path / "shot.png"
    _chromium(url, f"--screenshot={shot}", "--window-size=1200,1600", "--hide-scrollbars")
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert img.std() > 10  # text, table and plots drawn, not a blank page
