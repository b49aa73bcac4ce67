"""What a batch has already done, and who is working on a results folder.

Each complete pair has a record (the transform's JSON sidecar, see :func:`regkl.bids.pair_paths`),
written last, that holds its BIDS ``Sources`` and, under ``"Regkl"``, everything a later run needs
to trust it: the options that shape the result, a fingerprint of each input (path relative to the
dataset folder, size, modification time in ns, SHA-256) and of each output (path relative to the
results folder, size, time, SHA-256), and the summary row. A pair is complete when its record
matches the current options and inputs and every output it lists is there, unchanged; paths are
relative, so a copied or moved folder is judged by its own files, wherever the command runs from.
A file whose size and time match is taken as unchanged; one whose time differs (a copy) is
compared by its SHA-256, as git and rsync do.

One batch at a time writes to a results folder: :func:`results_lock` holds an exclusive lock
(``fcntl``) on ``.regkl.lock`` there, so a second batch waits for the first and then finds its
pairs complete; temporary files are cleaned only under the lock, when their writer is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from pathlib import Path

from . import __version__
from .bids import bids_uri

LOCK_NAME = ".regkl.lock"
#: Columns of the summary (logs/regkl_summary.tsv); the JSON summary has the same fields per pair.
SUMMARY_COLUMNS = ("subject", "session", "moving", "fixed", "output", "transform", "status", "metric",
                   "metric_before", "metric_after", "confidence", "suspect", "seconds", "error", "qc", "record",
                   "confounds", "fd_mean", "fd_max", "motion_outliers")
#: Where the summary goes, relative to the results folder (``regkl report`` also reads the old place).
SUMMARY_NAME = "logs/regkl_summary"
OLD_SUMMARY = "regkl_summary.json"


def fingerprint(path, *, digest: bool = True) -> dict:
    """``{"size", "mtime_ns"[, "sha256"]}`` of a file (OSError if it cannot be read)."""
    st = os.stat(path)
    fp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if digest:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        fp["sha256"] = h.hexdigest()
    return fp


def same_file(path, recorded: dict) -> bool:
    """True when ``path`` still has the recorded fingerprint (size and time, or else content)."""
    try:
        now = fingerprint(path, digest=False)
        if now["size"] != recorded.get("size"):
            return False
        if now["mtime_ns"] == recorded.get("mtime_ns"):
            return True
        return fingerprint(path)["sha256"] == recorded.get("sha256")
    except OSError:
        return False


def shaping_options(options: dict) -> dict:
    """The options that shape a pair's result, as recorded: the prior by its content, not its path."""
    shaped = {k: v for k, v in sorted(options.items()) if k != "prior"}
    if options.get("prior"):
        shaped["prior_sha256"] = fingerprint(options["prior"])["sha256"]
    return shaped


def write_record(job, row: dict, result, inputs: dict, written, *, protect=()) -> None:
    """Write the pair's record (atomically; last, as it marks the pair complete)."""
    from .outputs import atomic_path

    record = {
        "Description": f"{job.options.get('model', 'rigid')} coregistration by regkl {__version__}: ITK text "
                       "transform mapping points of the fixed image to the moving image (LPS, as ITK/ANTs)",
        "Sources": [bids_uri(job.moving_rel), bids_uri(job.fixed_rel)],
        "Regkl": {
            "status": "ok",
            "options": job.shaping,
            "inputs": {"moving": {"path": job.moving_rel, **inputs["moving"]},
                       "fixed": {"path": job.fixed_rel, **inputs["fixed"]}},
            "outputs": [{"path": job.rel_out(p), **fingerprint(p)} for p in written],
            "summary": row,
            "fixed2moving_ras": result.fixed2moving.tolist(),
            "confidence_evidence": None if result.confidence is None else result.confidence.as_dict(),
        },
    }
    with atomic_path(job.paths.record, protect=protect) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_record(job) -> dict | None:
    """The ``"Regkl"`` part of the pair's record, or None when there is no readable record."""
    try:
        record = json.loads(job.paths.record.read_text(encoding="utf-8"))
        regkl = record["Regkl"]
        return regkl if isinstance(regkl, dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _option_changes(recorded: dict, current: dict) -> str:
    keys = sorted(set(recorded) | set(current))
    changed = [k for k in keys if recorded.get(k) != current.get(k)]
    return ", ".join(f"--{k.replace('_', '-')} was {recorded.get(k)}, now {current.get(k)}" for k in changed)


def stale_reason(job, record: dict | None) -> str | None:
    """Why a recorded pair must be redone (options or an input changed, an output is missing or
    changed); None when it is complete. Without a record there is nothing stale: None, and
    :func:`is_complete` says it is not complete."""
    if record is None or record.get("status") != "ok":
        return None
    if record.get("options") != job.shaping:
        return "options changed: " + _option_changes(record.get("options") or {}, job.shaping)
    recorded_inputs = record.get("inputs") or {}
    for name, rel, path in (("moving", job.moving_rel, job.moving), ("fixed", job.fixed_rel, job.fixed)):
        fp = recorded_inputs.get(name) or {}
        if fp.get("path") != rel:
            return f"the {name} image is now {rel} (was {fp.get('path')})"
        if not same_file(path, fp):
            return f"the {name} image {rel} changed since it was registered"
    outputs = record.get("outputs") or []
    if not outputs:
        return "the record lists no outputs"
    for fp in outputs:
        path = Path(job.out_dir) / str(fp.get("path"))
        if not path.is_file():
            return f"output {fp.get('path')} is missing"
        if not same_file(path, fp):
            return f"output {fp.get('path')} changed since it was written"
    return None


def is_complete(job) -> bool:
    """True when the pair has a record that matches its options and inputs and every output is intact."""
    record = read_record(job)
    return record is not None and record.get("status") == "ok" and stale_reason(job, record) is None


def skipped_row(job, record: dict) -> dict:
    """Summary row of a complete pair (from its record), with status "skipped"."""
    summary = record.get("summary") or {}
    row = {k: summary.get(k) for k in SUMMARY_COLUMNS}
    row["status"] = "skipped"
    return row


# --------------------------------------------------------------------------------------------------
# results folder


@contextlib.contextmanager
def results_lock(out_dir, *, on_wait=None):
    """Hold the results folder's exclusive lock for the block (one batch at a time).

    Waits for a batch already holding it (calling ``on_wait(owner)`` once, with the pid, host and
    start time that batch wrote). The lock is the kernel's (``fcntl.lockf``): it is released when
    its holder exits, however that happens, so a killed batch never leaves the folder locked.
    Where ``fcntl`` does not exist (Windows), runs unlocked.
    """
    from .errors import OutputError

    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    path = Path(out_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise OutputError(f"cannot write: {exc.strerror or exc}", path=path) from exc
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            if on_wait:
                owner = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another batch"
                on_wait(owner)
            fcntl.lockf(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def root_link(root, out_dir) -> str:
    """How the results folder names the dataset folder (``DatasetLinks["raw"]``): a relative path
    when the results are inside the dataset (it survives moving both), else the absolute path."""
    root_r, out_r = Path(root).resolve(), Path(out_dir).resolve()
    if root_r in out_r.parents:
        return Path(os.path.relpath(root_r, out_r)).as_posix()
    return str(root_r)


def write_description(out_dir, root) -> None:
    """The derivative dataset_description.json (with ``DatasetLinks`` to the dataset), when missing
    or different."""
    path = Path(out_dir) / "dataset_description.json"
    try:
        desc = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(desc, dict):
            desc = {}
    except (OSError, ValueError):
        desc = {}
    new = {"Name": "regkl coregistration", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
           "GeneratedBy": [{"Name": "regkl", "Version": __version__}], **desc}
    new["DatasetLinks"] = {**(desc.get("DatasetLinks") or {}), "raw": root_link(root, out_dir)}
    if new != desc:
        _write_text(path, json.dumps(new, indent=2) + "\n")


def write_bidsignore(out_dir, patterns) -> None:
    """Add ``patterns`` to the results folder's .bidsignore (keeping the lines already there)."""
    path = Path(out_dir) / ".bidsignore"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    missing = [p for p in patterns if p not in lines]
    if missing:
        _write_text(path, "\n".join(lines + missing) + "\n")


def dataset_root(results_dir) -> Path:
    """The dataset folder of a results folder, from its ``DatasetLinks["raw"]``; the results folder
    itself when it names none (old batches recorded absolute paths)."""
    results_dir = Path(results_dir)
    try:
        link = json.loads((results_dir / "dataset_description.json").read_text(encoding="utf-8"))["DatasetLinks"]["raw"]
        return Path(os.path.normpath(results_dir / str(link)))
    except (OSError, ValueError, KeyError, TypeError):
        return results_dir


def _write_text(path, text):
    from .outputs import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_summary(rows, out_dir, *, protect=()) -> tuple:
    """Write ``logs/regkl_summary.tsv`` and ``logs/regkl_summary.json`` (atomically) in ``out_dir``.

    The JSON is an object, ``{"GeneratedBy": ..., "Pairs": [rows]}`` (a bare list there makes
    pybids' ``BIDSLayout(..., derivatives=True)`` fail). Paths in the rows are relative: inputs to
    the dataset folder, outputs to the results folder.
    """
    base = Path(out_dir) / SUMMARY_NAME
    base.parent.mkdir(parents=True, exist_ok=True)
    tsv, js = base.with_suffix(".tsv"), base.with_suffix(".json")

    def cell(v):
        if v is None:
            return "n/a"
        return f"{v:.6g}" if isinstance(v, float) else str(v).replace("\t", " ").replace("\n", " ")

    lines = ["\t".join(SUMMARY_COLUMNS)] + ["\t".join(cell(r.get(c)) for c in SUMMARY_COLUMNS) for r in rows]
    from .outputs import atomic_path

    with atomic_path(tsv, protect=protect) as tmp:  # a file name that is not UTF-8 keeps its bytes
        Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogateescape")
    with atomic_path(js, protect=protect) as tmp:
        Path(tmp).write_text(json.dumps({"GeneratedBy": f"regkl {__version__}", "Pairs": rows}, indent=2),
                             encoding="utf-8")
    return tsv, js
