"""Batch HTML report: content and order, self-containment, and how it renders in headless Chromium.

The browser tests load the page in Debian's ``chromium`` (``--headless``): a copy of the report
gets an observer script first in <head> (it records script errors, failed resource loads and
console.error calls) and a probe script last in <body> that, once the page has loaded, checks
every image, clicks column headers and writes what it saw into the DOM, which ``--dump-dom``
returns. The expected row counts and orders are computed here from ``regkl_summary.json``, not
from regkl.report. A screenshot of the unmodified report is checked for rendered pictures.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from regkl import report
from regkl.cli import main

from .test_batch import _sample, make_bids

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium():
    override = os.environ.get("REGKL_CHROMIUM")
    if override:
        return override if shutil.which(override) else None
    return next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)


@pytest.fixture(scope="module")
def chromium():
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium binary found (Debian: apt-get install chromium, or set REGKL_CHROMIUM); "
                    "bash .ci/run installs it")
    return exe


def run(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return info.value.code, out, err


def tiny_png(value: int, width: int = 12, height: int = 4) -> bytes:
    """A valid grey PNG made without any imaging library."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\0" + bytes([value % 256]) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def expected_default_order(rows):
    """Worst first, from the rules: failed, then suspect, then lowest confidence (none: last)."""
    def key(r):
        failed = r["status"] == "failed"
        group = 0 if failed else (1 if r.get("suspect") else 2)
        conf = r.get("confidence")
        return (group, 2.0 if conf is None else conf, r["subject"] or "", r["session"] or "", r["moving"])
    return [Path(r["moving"]).name for r in sorted(rows, key=key)]


SYNTHETIC = [  # (subject, status, suspect, confidence, metric_after, seconds)
    ("01", "ok", False, 0.93, 0.81, 12.0),
    ("02", "ok", True, 0.31, 0.42, 9.5),
    ("03", "failed", None, None, None, 0.1),
    ("04", "skipped", False, 0.77, 0.79, 11.0),
    ("05", "ok", False, None, 0.66, 10.0),  # an old record without a confidence score
    ("06", "ok", True, 0.12, 0.35, 30.2),
    ("07", "ok", False, 0.55, 0.71, 8.0),
    ("10", "failed", None, None, None, 2.0),
]


def synthetic_rows(folder: Path):
    rows = []
    for sub, status, suspect, conf, metric, secs in SYNTHETIC:
        moving = folder / f"sub-{sub}" / "func" / f"sub-{sub}_task-rest_run-{int(sub) % 3 + 1}_bold.nii.gz"
        rows.append({"subject": sub, "session": "", "moving": str(moving), "fixed": "", "output": "",
                     "transform": "", "status": status, "metric": "mi", "metric_before": 0.2,
                     "metric_after": metric, "confidence": conf, "suspect": suspect, "seconds": secs,
                     "error": f"{moving}: <b>bad</b> & broken" if status == "failed" else "", "qc": ""})
    return rows


def synthetic_pictures(row):
    return (None, "no picture") if row["status"] == "failed" else (tiny_png(int(row["subject"]) * 20), "")


# --------------------------------------------------------------------------------------------------
# the page itself (no browser)


def test_page_is_self_contained_ordered_and_escaped(tmp_path):
    rows = synthetic_rows(tmp_path)
    page = report.render(rows, title="t <1>", pictures=synthetic_pictures)
    # no external resource of any kind
    links = re.findall(r"""\b(?:src|href|srcset|action|poster)\s*=\s*["']?([^"'\s>]*)""", page, re.I)
    assert links and all(v.startswith("data:image/png;base64,") for v in links), links[:3]
    assert "<link" not in page and "<iframe" not in page
    assert "url(" not in page and "@import" not in page and "http" not in page
    # one row per pair, worst first
    names = re.findall(r'title="[^"]*?/([^/"]+\.nii\.gz)"', page)
    assert names == expected_default_order(rows)
    # error text escaped, no markup injected; failed rows have no image
    assert "<b>bad</b>" not in page and "&lt;b&gt;bad&lt;/b&gt; &amp; broken" in page
    body_rows = re.findall(r"<tr class=\"(\w*)\".*?</tr>", page, re.S)
    assert body_rows.count("failed") == 2 and body_rows.count("suspect") == 2
    for tr in re.findall(r'<tr class="failed".*?</tr>', page, re.S):
        assert "<img" not in tr
    assert page.count("<img") == len(rows) - 2
    assert "t &lt;1&gt;" in page


def test_report_command_rebuilds_from_summary(tmp_path, capsys):
    rows = synthetic_rows(tmp_path)
    out_dir = tmp_path / "derivatives" / "regkl"
    out_dir.mkdir(parents=True)
    (out_dir / "regkl_summary.json").write_text(json.dumps(rows))
    for source in (out_dir, out_dir / "regkl_summary.json"):
        dest = tmp_path / "r.html"
        code, out, err = run(["report", source, "-o", dest], capsys)
        assert code == 0 and out == "", err
        page = dest.read_text()
        assert page.startswith("<!DOCTYPE html>") and page.count("<tr class=") == len(rows)
        # completed pairs whose outputs are gone: a note instead of a picture, never a broken image
        assert "<img" not in page and "outputs not found" in page


@pytest.mark.parametrize("case", ["missing", "folder_without_summary", "not_json", "not_a_list", "rows_lack_keys"])
def test_report_command_bad_summary_is_one_line_exit_2(tmp_path, capsys, case):
    bad = {"missing": tmp_path / "nope.json", "folder_without_summary": tmp_path / "empty",
           "not_json": tmp_path / "x.json", "not_a_list": tmp_path / "d.json", "rows_lack_keys": tmp_path / "k.json"}[case]
    if case == "folder_without_summary":
        bad.mkdir()
    elif case == "not_json":
        bad.write_text("subject\tstatus\n01\tok\n")
    elif case == "not_a_list":
        bad.write_text('{"status": "ok"}')
    elif case == "rows_lack_keys":
        bad.write_text('[{"subject": "01"}]')
    dest = tmp_path / "r.html"
    code, out, err = run(["report", bad, "-o", dest], capsys)
    phrase = {"missing": "no such file", "folder_without_summary": "regkl_summary.json: no such file",
              "not_json": "invalid JSON", "not_a_list": "not a regkl batch summary",
              "rows_lack_keys": "not a regkl batch summary"}[case]
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("regkl: error: ") and str(bad) in err and phrase in err, err
    assert not dest.exists()


# --------------------------------------------------------------------------------------------------
# in the browser

OBSERVER = """<script>
window.__regklProblems = [];
window.addEventListener("error", function (e) {
  window.__regklProblems.push("error: " + (e.message || (e.target && (e.target.src || e.target.href)) || "?"));
}, true);
window.addEventListener("unhandledrejection", function (e) { window.__regklProblems.push("rejection: " + e.reason); });
(function (orig) {
  console.error = function () { window.__regklProblems.push("console.error: " + Array.prototype.join.call(arguments, " ")); orig.apply(console, arguments); };
})(console.error);
</script>"""

PROBE = """<script>
window.addEventListener("load", function () {
  var out = {problems: window.__regklProblems};
  try {
    var table = document.getElementById("pairs");
    var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
    var col = function (name) { return heads.map(function (h) { return h.textContent; }).indexOf(name); };
    var imageCol = col("image");
    var order = function () {
      return Array.prototype.map.call(table.tBodies[0].rows, function (r) { return r.cells[imageCol].textContent; });
    };
    out.rows = table.tBodies[0].rows.length;
    out.images = Array.prototype.map.call(document.images, function (img) {
      var row = img.closest("tr");
      return {ok: img.complete && img.naturalWidth > 0 && img.naturalHeight > 0, data: img.src.indexOf("data:image/png;base64,") === 0,
              width: img.naturalWidth, shownHeight: img.getBoundingClientRect().height,
              row: row.cells[imageCol].textContent};
    });
    out.failedRowsWithImage = Array.prototype.filter.call(table.querySelectorAll("tr.failed"), function (r) {
      return r.querySelector("img") !== null;
    }).length;
    out.resources = performance.getEntriesByType("resource").map(function (e) { return e.name; });
    out.order = {initial: order()};
    ["confidence", "confidence", "seconds", "image", "subject", "status"].forEach(function (name, i) {
      heads[col(name)].click();
      out.order[i + ":" + name + ":" + heads[col(name)].getAttribute("aria-sort")] = order();
    });
  } catch (err) {
    out.problems.push("probe: " + err);
  }
  var pre = document.createElement("pre");
  pre.id = "regkl-probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium_args(exe, user_dir):
    return [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
            "--no-first-run", "--disable-extensions", f"--user-data-dir={user_dir}", "--enable-logging=stderr",
            "--v=0"]


def probe_in_browser(exe, page: Path, tmp_path: Path) -> tuple:
    """(what the probe saw, chromium's stderr) for ``page`` loaded in headless Chromium."""
    html = page.read_text(encoding="utf-8")
    assert html.count("<head>") == 1 and html.count("</body>") == 1
    probed = tmp_path / f"probed_{page.name}"
    probed.write_text(html.replace("<head>", "<head>" + OBSERVER).replace("</body>", PROBE + "</body>"),
                      encoding="utf-8")
    proc = subprocess.run(chromium_args(exe, tmp_path / "chromium-profile")
                          + ["--virtual-time-budget=10000", "--dump-dom", probed.as_uri()],
                          capture_output=True, encoding="utf-8", errors="replace", timeout=90,
                          start_new_session=True)  # Chromium may signal its whole process group
    found = re.search(r'<pre id="regkl-probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"the probe did not run (exit {proc.returncode}): {proc.stderr[-2000:]}"
    import html as htmllib

    return json.loads(htmllib.unescape(found.group(1))), proc.stderr


def console_lines(stderr: str) -> list:
    """Console messages (and uncaught errors) Chromium logged while loading the page."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def screenshot(exe, page: Path, dest: Path, size=(1400, 900)) -> Path:
    proc = subprocess.run(chromium_args(exe, dest.parent / "chromium-profile-shot")
                          + [f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=10000",
                             f"--screenshot={dest}", page.as_uri()], capture_output=True, encoding="utf-8",
                          errors="replace", timeout=90, start_new_session=True)
    assert dest.is_file(), proc.stderr[-2000:]
    return dest


def check_sorting(seen, rows):
    """The orders the probe recorded, against orders computed here from the summary rows."""
    by_name = {Path(r["moving"]).name: r for r in rows}
    orders = seen["order"]
    assert orders.pop("initial") == expected_default_order(rows)

    def numeric(field, reverse):
        have = [n for n in by_name if by_name[n].get(field) is not None]
        missing = [n for n in by_name if by_name[n].get(field) is None]
        return sorted(have, key=lambda n: by_name[n][field], reverse=reverse), set(missing)

    for label, got in orders.items():
        _, name, direction = label.split(":")
        reverse = direction == "descending"
        if name in ("confidence", "seconds"):
            ranked, missing = numeric(name, reverse)
            values = [by_name[n][name] for n in got[:len(ranked)]]
            assert values == [by_name[n][name] for n in ranked], label  # ties may come in any order
            assert set(got[len(ranked):]) == missing, label  # pairs without a value last, either way
        elif name == "image":
            assert got == sorted(by_name, reverse=reverse), label
        elif name == "subject":
            subjects = [by_name[n]["subject"] for n in got]
            assert subjects == sorted(subjects, key=int, reverse=reverse), label
        elif name == "status":  # back to worst first
            assert got == expected_default_order(rows), label
    assert list(orders) == ["0:confidence:ascending", "1:confidence:descending", "2:seconds:ascending",
                            "3:image:ascending", "4:subject:ascending", "5:status:ascending"]


def test_synthetic_report_in_chromium_sorts_every_column_kind(chromium, tmp_path):
    rows = synthetic_rows(tmp_path)
    page = tmp_path / "synthetic.html"
    page.write_text(report.render(rows, pictures=synthetic_pictures), encoding="utf-8")
    seen, stderr = probe_in_browser(chromium, page, tmp_path)
    assert seen["problems"] == [] and console_lines(stderr) == []
    assert seen["rows"] == len(rows) and seen["failedRowsWithImage"] == 0
    assert len(seen["images"]) == len(rows) - 2 and all(i["ok"] and i["data"] for i in seen["images"])
    check_sorting(seen, rows)


@pytest.fixture(scope="module")
def batch_with_report(tmp_path_factory):
    """A real batch: two good pairs (T1 at 2 mm, for speed) and one that fails; its output folder."""
    from regkl.io import load_volume
    from regkl.writers import save_volume
    from regkl.pyramid import downsample

    bold, t1 = _sample()
    folder = tmp_path_factory.mktemp("report_batch")
    t1_small = folder / "T1w.nii.gz"
    save_volume(downsample(load_volume(t1), 2.0), t1_small)
    root = make_bids(folder / "ds", bold, t1_small, subjects=("01", "02"), sessions=("1",), runs=("1",))
    (root / "sub-02/ses-1/func/sub-02_ses-1_task-rest_run-2_bold.nii.gz").write_bytes(b"not an image")
    custom = folder / "custom_report.html"
    proc = subprocess.run([sys.executable, "-m", "regkl.cli", "batch", str(root), "--jobs", "1", "--report",
                           str(custom)], capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 1, proc.stderr  # one pair failed
    out = root / "derivatives" / "regkl"
    assert str(custom) in proc.stderr and proc.stdout == ""
    return out, custom


def test_batch_report_renders_every_row_and_picture_in_chromium(chromium, batch_with_report, tmp_path):
    out, custom = batch_with_report
    rows = json.loads((out / "logs" / "regkl_summary.json").read_text())["Pairs"]
    assert len(rows) == 3 and [r["status"] for r in rows].count("failed") == 1
    assert not (out / "regkl_report.html").exists()  # --report replaced the default location
    page = custom
    seen, stderr = probe_in_browser(chromium, page, tmp_path)
    assert seen["problems"] == [], seen["problems"]
    assert console_lines(stderr) == [], console_lines(stderr)
    assert seen["resources"] == []  # nothing fetched: pictures are data URIs, CSS and JS inline
    assert seen["rows"] == len(rows) and seen["failedRowsWithImage"] == 0
    ok_names = sorted(Path(r["moving"]).name for r in rows if r["status"] != "failed")
    assert sorted(i["row"] for i in seen["images"]) == ok_names
    for img in seen["images"]:
        assert img["ok"] and img["data"] and img["width"] >= 300 and img["shownHeight"] >= 100, img
    # each embedded picture is the job's thumbnail file, byte for byte
    import base64

    html = page.read_text()
    embedded = [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', html)]
    assert sorted(embedded) == sorted((out / r["qc"]).read_bytes() for r in rows if r["status"] != "failed")
    assert seen["order"]["initial"][0] == "sub-02_ses-1_task-rest_run-2_bold.nii.gz"  # failed first
    assert seen["order"]["initial"] == expected_default_order(rows)

    shot = screenshot(chromium, page, tmp_path / "report_screenshot.png")
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))[..., :3]
    assert pixels.shape[:2] == (900, 1400)
    red = (pixels[..., 0] > 0.8) & (pixels[..., 1] < 0.4) & (pixels[..., 2] < 0.4)  # the edge contours
    black = pixels.max(axis=-1) < 0.05  # the pictures' background
    assert red.sum() > 500 and black.sum() > 20000, (red.sum(), black.sum())
    assert float(np.mean(pixels)) > 0.4  # a white page, not a blank or crashed render


def test_rerun_writes_the_default_report_and_report_command_rebuilds_it(batch_with_report, tmp_path, capsys):
    out, _ = batch_with_report
    root = out.parents[1]
    proc = subprocess.run([sys.executable, "-m", "regkl.cli", "batch", str(root), "--jobs", "1", "-q"],
                          capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 1, proc.stderr  # the broken pair is tried again and fails again
    default = out / "regkl_report.html"
    page = default.read_text()
    assert page.count("<tr class=") == 3 and page.count("<img") == 2 and "ok (earlier run)" in page
    dest = tmp_path / "again.html"
    code, _, err = run(["report", out, "-o", dest], capsys)
    assert code == 0, err
    strip = re.compile(r'<p class="source">.*?</p>|<title>.*?</title>|<h1>.*?</h1>')
    assert strip.sub("", dest.read_text()) == strip.sub("", page)
