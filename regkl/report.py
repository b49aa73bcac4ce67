"""Batch report: one self-contained HTML page listing every pair of a batch, worst first.

The page has no external resources: CSS and the small sorting script are inline and each pair's
QC thumbnail (:func:`regkl.qc.qc_thumbnail`) is embedded as a base64 ``data:`` URI, so the file
can be mailed or archived on its own. Rows are ordered worst first (failed, then suspect, then
lowest confidence); clicking a column header sorts by that column (again: the other way).

Thumbnails come from the PNG each job wrote (the ``qc`` field of its summary row); for a pair
without one (a batch run before thumbnails existed) the picture is made from the written outputs.
A failed pair has a row with its error and no picture.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import __version__
from .bids import entities
from .errors import InputError, RegklError
from .motion import FD_OUTLIER_MM

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

#: Severity of a row for the default order: failed, then suspect, then the rest.
SEVERITY = {"failed": 0, "suspect": 1, "ok": 2}
#: Status shown for each summary status ("skipped": complete from an earlier run).
STATUS_TEXT = {"ok": "ok", "skipped": "ok (earlier run)", "failed": "failed"}


def _severity(row) -> int:
    if row.get("status") == "failed":
        return SEVERITY["failed"]
    return SEVERITY["suspect"] if row.get("suspect") else SEVERITY["ok"]


def order_key(row) -> float:
    """Sort key of the default order, worst first: failed, then suspect, then lowest confidence.

    ``2 * severity + confidence``, with a missing confidence counted as 1.5 (after every scored
    row of the same severity); confidence is in [0, 1], so the severities never mix.
    """
    conf = row.get("confidence")
    conf = 1.5 if conf is None or not math.isfinite(float(conf)) else float(conf)
    return 2.0 * _severity(row) + conf


def default_order(rows) -> list:
    """Rows worst first (see :func:`order_key`); ties by subject, session and image."""
    return sorted(rows, key=lambda r: (order_key(r), str(r.get("subject") or ""), str(r.get("session") or ""),
                                       str(r.get("moving") or "")))


# --------------------------------------------------------------------------------------------------
# columns: header, sort type ("num", "text" or None), cell(row, picture) -> (html, sort value)


def _esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value, fmt="{:.3f}"):
    if value is None:
        return "n/a", ""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return _esc(value), ""
    return (fmt.format(x), repr(x)) if math.isfinite(x) else ("n/a", "")


def _short_error(row) -> str:
    """The error with the moving image's folder left out (the row already names the image)."""
    text, moving = str(row.get("error") or "unknown error"), str(row.get("moving") or "")
    return text.replace(moving, Path(moving).name) if moving else text


def _cell_qc(row, picture):
    if row.get("status") == "failed":
        return (f'<span class="error" title="{_esc(row.get("error"))}">failed: {_esc(_short_error(row))}</span>',
                _short_error(row))
    data, note = picture
    if data is None:
        return f'<span class="nopic">{_esc(note)}</span>', ""
    alt = f"QC picture of {Path(str(row.get('moving') or '')).name}"
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return f'<img class="qc" src="{uri}" alt="{_esc(alt)}" title="click to enlarge">', ""


def _cell_entity(key):
    def cell(row, _):
        value = entities(str(row.get("moving") or "")).get(key, "")
        return _esc(value), value
    return cell


def _cell_field(key):
    def cell(row, _):
        return _esc(row.get(key) or ""), str(row.get(key) or "")
    return cell


def _cell_image(row, _):
    path = str(row.get("moving") or "")
    return f'<span title="{_esc(path)}">{_esc(Path(path).name)}</span>', Path(path).name


def _cell_status(row, _):
    status = str(row.get("status") or "")
    text = STATUS_TEXT.get(status, status)
    if status != "failed" and row.get("suspect"):
        text += ", suspect"
    return _esc(text), repr(order_key(row))


def _cell_metric(row, _):
    shown, key = _num(row.get("metric_after"), "{:.4f}")
    before, _ = _num(row.get("metric_before"), "{:.4f}")
    name = _esc(row.get("metric") or "")
    if not key:
        return "n/a", ""
    return f'<span title="before: {before}">{name} {shown}</span>', key


def _cell_confidence(row, _):
    return _num(row.get("confidence"), "{:.2f}")


def _cell_suspect(row, _):
    value = row.get("suspect")
    if value is None:
        return "n/a", ""
    return ("yes", "1") if value else ("no", "0")


def _cell_motion(row, _):
    """Head motion of a 4D series: mean and max framewise displacement, flagged volumes; sorted by max FD."""
    shown, key = _num(row.get("fd_max"), "{:.2f}")
    if not key:
        return '<span class="nopic">n/a</span>', ""
    mean, _ = _num(row.get("fd_mean"), "{:.2f}")
    n = row.get("motion_outliers") or 0
    flagged = f"{n} volume{'s' * (n != 1)} flagged"
    return (f'FD mean {mean}, max {shown} mm<br><span class="{"error" if n else "nopic"}">{flagged}</span>', key)


def _cell_seconds(row, _):
    return _num(row.get("seconds"), "{:.1f}")


@dataclass(frozen=True)
class Column:
    header: str
    sort: str | None  # "num", "text" or None (not sortable)
    cell: Callable
    tip: str = ""
    css: str = "nowrap"  #: class of the column's cells


COLUMNS = (
    Column("QC picture / error", None, _cell_qc, "registered image with the fixed image's edges (red); click to "
           "enlarge", "pic"),
    Column("subject", "text", _cell_field("subject")),
    Column("session", "text", _cell_field("session")),
    Column("task", "text", _cell_entity("task")),
    Column("run", "text", _cell_entity("run")),
    Column("image", "text", _cell_image, "moving image (hover for the full path)"),
    Column("status", "num", _cell_status, "worst first: failed, suspect, then by confidence"),
    Column("metric", "num", _cell_metric, "metric after registration (hover for the value before)", "num"),
    Column("confidence", "num", _cell_confidence, "0 (suspect) .. 1", "num"),
    Column("suspect", "num", _cell_suspect),
    Column("head motion", "num", _cell_motion, "framewise displacement (Power et al. 2012) of the 4D series, mm; "
           f"flagged: FD above {FD_OUTLIER_MM:g} mm (fMRIPrep's outliers) or a constant volume; sorted by max FD"),
    Column("seconds", "num", _cell_seconds, "registration time", "num"),
)


# --------------------------------------------------------------------------------------------------
# pictures


def _png_file(path) -> bytes | None:
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    return data if data.startswith(PNG_MAGIC) else None


def picture(row) -> tuple:
    """(PNG bytes or None, note shown instead) for one summary row.

    The job's own thumbnail when it exists; else, for a completed pair, one made from its written
    outputs (registered image and fixed image).
    """
    if row.get("status") == "failed":
        return None, "no picture (registration failed)"
    if row.get("qc"):
        data = _png_file(row["qc"])
        if data is not None:
            return data, ""
    return _picture_from_outputs(row)


def _picture_from_outputs(row) -> tuple:
    fixed, output = row.get("fixed"), row.get("output")
    if not (fixed and output and Path(fixed).is_file() and Path(output).is_file()):
        return None, "no picture (outputs not found)"
    from .io import load_volume
    from .qc import qc_thumbnail

    try:
        return qc_thumbnail(load_volume(fixed), load_volume(output, volume=0)), ""
    except RegklError as exc:
        return None, f"no picture ({exc.problem})"


# --------------------------------------------------------------------------------------------------
# page

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.4em; margin: 0 0 .3em; }
p { margin: .3em 0; }
.counts span { margin-right: 1.2em; }
table { border-collapse: collapse; margin-top: 1em; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 7px; text-align: left; vertical-align: middle; }
th { background: #f2f2f2; position: sticky; top: 0; white-space: nowrap; }
th[data-type] { cursor: pointer; user-select: none; }
th[data-type]:hover { text-decoration: underline; }
th[aria-sort="ascending"]::after { content: " \\25B2"; color: #222; }
th[aria-sort="descending"]::after { content: " \\25BC"; color: #222; }
tr.failed td { background: #fde2e2; }
tr.suspect td { background: #fff3cd; }
td.nowrap, td.num { white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.pic { width: 390px; max-width: 390px; overflow-wrap: anywhere; }
img.qc { display: block; height: 130px; cursor: zoom-in; background: #000; }
img.qc.big { height: 390px; cursor: zoom-out; }
.nopic { color: #888; font-style: italic; }
.error { color: #a00000; }
"""

SCRIPT = """
(function () {
  "use strict";
  var table = document.getElementById("pairs");
  var body = table.tBodies[0];
  var heads = table.tHead.rows[0].cells;
  function sortValue(row, col) { return row.cells[col].getAttribute("data-sort") || ""; }
  function compare(x, y, numeric) {
    if (x === "" || y === "") { return (x === "") - (y === ""); }
    if (numeric) { return parseFloat(x) - parseFloat(y); }
    return x.localeCompare(y, undefined, {numeric: true});
  }
  Array.prototype.forEach.call(heads, function (th, col) {
    var type = th.getAttribute("data-type");
    if (!type) { return; }
    th.addEventListener("click", function () {
      var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = sortValue(a, col), y = sortValue(b, col);
        if (x === "" || y === "") { return compare(x, y, false); }  /* missing values last either way */
        return dir * compare(x, y, type === "num");
      });
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  body.addEventListener("click", function (event) {
    if (event.target.tagName === "IMG") { event.target.classList.toggle("big"); }
  });
})();
"""


def render(rows, *, title: str = "regkl batch report", source: str = "", pictures=None) -> str:
    """The report page for summary ``rows`` (as in ``regkl_summary.json``).

    Parameters
    ----------
    rows : list of dict
        Summary rows of :mod:`regkl.batch`.
    title : str
    source : str
        Where the rows came from (shown under the title).
    pictures : callable(row) -> (bytes or None, note), optional
        Thumbnail of a row; :func:`picture` by default.

    Returns
    -------
    str
        A complete HTML document with no external resources.
    """
    pictures = pictures or picture
    ordered = default_order(rows)
    status_col = next(i for i, c in enumerate(COLUMNS) if c.header == "status")
    heads = []
    for i, col in enumerate(COLUMNS):
        attrs = f' data-type="{col.sort}"' if col.sort else ""
        attrs += ' aria-sort="ascending"' if i == status_col else ""
        attrs += f' title="{_esc(col.tip)}"' if col.tip else ""
        heads.append(f"<th{attrs}>{_esc(col.header)}</th>")
    body = []
    for row in ordered:
        pic = pictures(row)
        cls = {0: "failed", 1: "suspect"}.get(_severity(row), "")
        cells = []
        for col in COLUMNS:
            shown, key = col.cell(row, pic)
            cells.append(f'<td class="{col.css}" data-sort="{_esc(key)}">{shown}</td>')
        body.append(f'<tr class="{cls}" data-key="{order_key(row)!r}">' + "".join(cells) + "</tr>")
    n_failed = sum(_severity(r) == 0 for r in rows)
    n_suspect = sum(_severity(r) == 1 for r in rows)
    n_earlier = sum(r.get("status") == "skipped" for r in rows)
    counts = (f'<span>{len(rows)} pairs</span><span>{len(rows) - n_failed - n_suspect} ok</span>'
              f'<span>{n_suspect} suspect</span><span>{n_failed} failed</span>'
              + (f"<span>({n_earlier} complete from an earlier run)</span>" if n_earlier else ""))
    made = time.strftime("%Y-%m-%d %H:%M")
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{_esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_esc(title)}</h1>\n"
        f'<p class="counts">{counts}</p>\n'
        f'<p class="source">{_esc(source)}{" &middot; " if source else ""}regkl {_esc(__version__)}, {made}</p>\n'
        "<p>Worst first: failed, then suspect, then lowest confidence. Click a column header to sort "
        "(again to reverse), a picture to enlarge it. Pictures: the registered image with the fixed "
        "image's edges in red; a failed pair shows its error instead.</p>\n"
        f'<table id="pairs">\n<thead><tr>{"".join(heads)}</tr></thead>\n<tbody>\n'
        + "\n".join(body)
        + f"\n</tbody>\n</table>\n<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )


def write_report(rows, path, *, title: str = "regkl batch report", source: str = "", protect=()) -> Path:
    """Write :func:`render`'s page to ``path`` (atomically); returns the path."""
    from .outputs import atomic_path

    page = render(rows, title=title, source=source)
    with atomic_path(path, protect=protect) as tmp:
        # file names that are not UTF-8: their odd bytes shown as \xNN (the page stays valid UTF-8)
        Path(tmp).write_text(page.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"),
                             encoding="utf-8")
    return Path(path)


#: Row fields holding paths: inputs (relative to the dataset folder) and outputs (to the results folder).
INPUT_FIELDS = ("moving", "fixed")
OUTPUT_FIELDS = ("output", "transform", "qc", "record", "confounds")


def report_rows(rows, results_dir, root) -> list:
    """Summary rows with their relative paths made usable from here: inputs joined to the dataset
    folder ``root``, outputs to ``results_dir`` (absolute paths, from old batches, stay as they are)."""
    def join(base, value):
        return str(Path(base) / value) if isinstance(value, str) and value else value

    return [{**r, **{k: join(root, r.get(k)) for k in INPUT_FIELDS},
             **{k: join(results_dir, r.get(k)) for k in OUTPUT_FIELDS}} for r in rows]


def _summary_file(folder: Path) -> Path:
    from .io import check_input_path
    from .resume import OLD_SUMMARY, SUMMARY_NAME

    new = folder / f"{SUMMARY_NAME}.json"
    return check_input_path(new if new.exists() or not (folder / OLD_SUMMARY).exists() else folder / OLD_SUMMARY,
                            "summary")


def load_summary(path) -> tuple:
    """Rows of a batch summary, given the summary JSON or the results folder holding it
    (``logs/regkl_summary.json``, or the ``regkl_summary.json`` list that earlier versions wrote at its top).

    Returns
    -------
    rows : list of dict
        With paths usable from the working folder (see :func:`report_rows`).
    source : Path
        The JSON file read.
    """
    from .io import check_input_path
    from .resume import dataset_root

    p = check_input_path(path, "summary")
    if p.is_dir():
        p = _summary_file(p)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError("not a regkl batch summary (not text)", path=p) from None
    except ValueError as exc:
        raise InputError(f"not a regkl batch summary (invalid JSON: {exc})", path=p) from None
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path=p) from exc
    rows = data.get("Pairs") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "status" in r and "moving" in r for r in rows):
        raise InputError("not a regkl batch summary (expected a list of pair records with 'status' and "
                         "'moving')", path=p)
    for i, row in enumerate(rows, 1):
        bad = next((k for k in INPUT_FIELDS + OUTPUT_FIELDS if not isinstance(row.get(k) or "", str)), None)
        if bad:
            raise InputError(f"not a regkl batch summary (pair {i}: {bad!r} is not a path)", path=p)
        for key, value in row.items():
            expected = SUMMARY_FIELD_TYPES.get(key)
            if expected is None or value is None:
                continue
            name, ok = expected
            if not ok(value):
                raise InputError(f"not a valid regkl batch summary: record {i} ({str(row.get('moving'))[:80]}) has "
                                 f"{key} = {json.dumps(value)[:40]}, expected {name} or null", path=p)
    results_dir = next((d for d in (p.parent, p.parent.parent) if (d / "dataset_description.json").is_file()),
                       p.parent)
    return report_rows(rows, results_dir, dataset_root(results_dir)), p


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: Summary fields with a type (others are free): name -> (what the message says, check).
SUMMARY_FIELD_TYPES = {
    **{key: ("a number", _is_number) for key in ("metric_before", "metric_after", "confidence", "seconds", "fd_mean",
                                                  "fd_max", "motion_outliers")},
    "suspect": ("true/false", lambda v: isinstance(v, bool)),
    **{key: ("a text", lambda v: isinstance(v, str))
       for key in ("subject", "session", "moving", "fixed", "output", "transform", "status", "metric", "error", "qc",
                   "confounds")},
}
