"""Batch registration of whole datasets: discovery, BIDS-derivative names, resumable parallel runs.

Work is described by :class:`Job` (inputs, outputs, options); :func:`run_job` does one pair and
never raises (a failure becomes a row with ``status='failed'``). Jobs run in local processes
(:func:`run_local`) or on an existing Dask cluster (:func:`run_dask`). A job is complete when its
sidecar JSON exists and every output it lists is present with the recorded size: the sidecar is
written last, and every file is written atomically, so a killed batch leaves nothing a later run
mistakes for complete. Each pair also gets a small QC picture (:func:`regkl.qc.qc_thumbnail`,
when matplotlib is installed), which :mod:`regkl.report` embeds in the batch's HTML report.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError

#: EPI-like suffixes looked for in BIDS datasets, and the folders they live in.
BIDS_MOVING = {"bold": "func", "sbref": "func", "dwi": "dwi", "epi": "fmap"}
BIDS_FIXED_SUFFIX = "T1w"
NIFTI = re.compile(r"\.nii(\.gz)?$")

SUMMARY_COLUMNS = ("subject", "session", "moving", "fixed", "output", "transform", "status", "metric",
                   "metric_before", "metric_after", "confidence", "suspect", "seconds", "error", "qc")


@dataclass(frozen=True)
class Job:
    """One pair to register and where its results go."""

    moving: str
    fixed: str
    output: str
    transform: str
    sidecar: str
    subject: str = ""
    session: str = ""
    options: dict = field(default_factory=dict)
    qc: str = ""  #: small QC picture (PNG) for the report; "" for none


def entities(name: str) -> dict:
    """BIDS entities of a file name (``{'sub': '01', 'task': 'rest', 'run': '1'}``); {} if there are none."""
    return dict(_entities(Path(name).name)[0])


def _entities(name: str):
    """BIDS file name -> (list of (key, value), suffix)."""
    stem = NIFTI.sub("", name)
    parts = stem.split("_")
    suffix = parts[-1]
    ents = [tuple(p.split("-", 1)) for p in parts[:-1] if "-" in p]
    return ents, suffix


def _find_t1w(subject_dir: Path, session: str):
    """The T1w for a subject: same session first, then session-less, then any session."""
    def t1s(folder):
        return sorted(p for p in folder.glob(f"*_{BIDS_FIXED_SUFFIX}.nii*") if NIFTI.search(p.name))

    candidates = []
    if session:
        candidates += t1s(subject_dir / f"ses-{session}" / "anat")
    candidates += t1s(subject_dir / "anat")
    for ses in sorted(subject_dir.glob("ses-*")):
        candidates += t1s(ses / "anat")
    return candidates[0] if candidates else None


def discover_bids(root, out_dir, *, suffixes=("bold", "sbref", "dwi"), options=None) -> list:
    """Jobs for every EPI-like image of a BIDS dataset onto the same subject's T1w.

    ``sub-*/[ses-*/]func/*_bold.nii[.gz]`` (and other ``suffixes``) are registered to
    ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``, preferring the same session. Outputs follow BIDS
    derivatives: ``<out_dir>/sub-X/[ses-Y/]<datatype>/<entities>_space-T1w_desc-coreg_<suffix>.nii.gz``
    and ``<entities>_from-<suffix>_to-T1w_mode-image_xfm.txt`` (ITK text transform).
    """
    root, out_dir = Path(root), Path(out_dir)
    jobs = []
    for subject_dir in sorted(root.glob("sub-*")):
        if not subject_dir.is_dir():
            continue
        sub = subject_dir.name[4:]
        for suffix in suffixes:
            datatype = BIDS_MOVING.get(suffix, "func")
            files = sorted(subject_dir.glob(f"{datatype}/*_{suffix}.nii*")) + \
                sorted(subject_dir.glob(f"ses-*/{datatype}/*_{suffix}.nii*"))
            for moving in files:
                if not NIFTI.search(moving.name):
                    continue
                ents, _ = _entities(moving.name)
                session = dict(ents).get("ses", "")
                fixed = _find_t1w(subject_dir, session)
                rel = moving.parent.relative_to(root)
                base = "_".join(f"{k}-{v}" for k, v in ents if k not in ("space", "desc"))
                folder = out_dir / rel
                jobs.append(Job(
                    moving=str(moving), fixed=str(fixed) if fixed else "",
                    output=str(folder / f"{base}_space-T1w_desc-coreg_{suffix}.nii.gz"),
                    transform=str(folder / f"{base}_from-{suffix}_to-T1w_mode-image_xfm.txt"),
                    sidecar=str(folder / f"{base}_from-{suffix}_to-T1w_desc-regkl_summary.json"),
                    qc=str(folder / f"{base}_space-T1w_desc-qc_{suffix}.png"),
                    subject=sub, session=session, options=dict(options or {})))
    return jobs


def discover_glob(root, out_dir, moving_glob: str, fixed_glob: str, *, options=None) -> list:
    """Jobs for a plain folder: each file matching ``moving_glob`` (relative to ``root``) is paired
    with the ``fixed_glob`` match in its own folder, or else in the nearest parent folder."""
    root, out_dir = Path(root), Path(out_dir)
    jobs = []
    for moving in sorted(root.glob(moving_glob)):
        if not moving.is_file():
            continue
        fixed = None
        folder = moving.parent
        while fixed is None:
            matches = sorted(p for p in folder.glob(fixed_glob) if p.is_file() and p != moving)
            if matches:
                fixed = matches[0]
            elif folder == root or root not in folder.parents:
                break
            else:
                folder = folder.parent
        stem = NIFTI.sub("", moving.name)
        rel = moving.parent.relative_to(root)
        dest = out_dir / rel
        jobs.append(Job(moving=str(moving), fixed=str(fixed) if fixed else "",
                        output=str(dest / f"{stem}_coreg.nii.gz"), transform=str(dest / f"{stem}_xfm.txt"),
                        sidecar=str(dest / f"{stem}_regkl.json"), qc=str(dest / f"{stem}_qc.png"),
                        subject=str(rel), options=dict(options or {})))
    return jobs


def is_complete(job: Job) -> bool:
    """True when the job's sidecar exists and every output it lists has the recorded size."""
    try:
        record = json.loads(Path(job.sidecar).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if record.get("status") != "ok":
        return False
    sizes = record.get("output_sizes", {})
    return bool(sizes) and all(Path(p).is_file() and Path(p).stat().st_size == n for p, n in sizes.items())


def _row(job: Job, status: str, seconds: float, error: str = "", result=None, qc: str = "") -> dict:
    return {"subject": job.subject, "session": job.session, "moving": job.moving, "fixed": job.fixed,
            "output": job.output, "transform": job.transform, "status": status,
            "metric": job.options.get("metric", "mi"),
            "metric_before": None if result is None else result.metric_before,
            "metric_after": None if result is None else result.metric_after,
            "confidence": None if result is None or result.confidence is None else round(result.confidence.score, 4),
            "suspect": None if result is None or result.confidence is None else bool(result.confidence.suspect),
            "seconds": round(seconds, 3), "error": error, "qc": qc}


def run_job(job: Job, threads: int | None = None) -> dict:
    """Register one pair and write its outputs; returns a summary row, never raises."""
    t0 = time.perf_counter()
    if threads:
        import numba

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    try:
        from .io import atomic_path, load_volume, save_volume
        from .optimize import register
        from .resample import resample
        from .xfm import save_transform

        if not job.fixed:
            raise InputError(f"no {BIDS_FIXED_SUFFIX} image found for this subject", path=job.moving)
        opts = dict(job.options)
        moving_volume = opts.pop("moving_volume", "mean")
        interp = opts.pop("interp", "linear")
        if opts.get("prior"):
            from .metrics import load_prior

            opts["prior"] = load_prior(opts["prior"])[0]
        fixed = load_volume(job.fixed)
        moving = load_volume(job.moving, volume=moving_volume)
        opts.setdefault("confidence", True)
        result = register(moving, fixed, **opts)
        Path(job.output).parent.mkdir(parents=True, exist_ok=True)
        inputs = (job.moving, job.fixed)
        registered = resample(moving, fixed, result.fixed2moving, interp=interp)
        save_volume(registered, job.output, like=fixed, protect=inputs)
        save_transform(job.transform, result.fixed2moving, "itk", protect=inputs)
        qc = _thumbnail(job, fixed, registered, inputs)
        row = _row(job, "ok", time.perf_counter() - t0, result=result, qc=qc)
        outputs = (job.output, job.transform) + ((qc,) if qc else ())
        record = {**row, "fixed2moving_ras": result.fixed2moving.tolist(), "options": job.options,
                  "confidence_evidence": None if result.confidence is None else result.confidence.as_dict(),
                  "output_sizes": {p: Path(p).stat().st_size for p in outputs}}
        with atomic_path(job.sidecar, protect=inputs) as tmp:  # written last: marks completion
            Path(tmp).write_text(json.dumps(record, indent=2), encoding="utf-8")
        return row
    except Exception as exc:  # noqa: BLE001 - one failing pair never stops the others
        text = " ".join(str(exc).split())[:500] or type(exc).__name__
        return _row(job, "failed", time.perf_counter() - t0, error=text)


def _thumbnail(job: Job, fixed, registered, inputs) -> str:
    """Write the job's QC thumbnail; its path, or "" when the job has none or matplotlib is missing."""
    import importlib.util

    if not job.qc or importlib.util.find_spec("matplotlib") is None:
        return ""
    from .qc import qc_thumbnail

    qc_thumbnail(fixed, registered, job.qc, protect=inputs)
    return job.qc


def _worker_init(threads):
    import numba

    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))


def run_local(jobs, *, n_jobs: int, progress=None) -> list:
    """Run jobs in ``n_jobs`` processes (each with cores // n_jobs Numba threads); rows in job order."""
    cores = os.cpu_count() or 1
    threads = max(1, cores // max(1, n_jobs))
    rows = [None] * len(jobs)
    if n_jobs <= 1:
        for i, job in enumerate(jobs):
            rows[i] = run_job(job, threads)
            if progress:
                progress(rows[i])
        return rows
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=n_jobs, mp_context=mp.get_context("spawn"),
                             initializer=_worker_init, initargs=(threads,)) as pool:
        futures = {pool.submit(run_job, job): i for i, job in enumerate(jobs)}
        for fut in as_completed(futures):
            i = futures[fut]
            try:
                rows[i] = fut.result()
            except Exception as exc:  # noqa: BLE001 - a worker died (e.g. out of memory)
                rows[i] = _row(jobs[i], "failed", 0.0, error=f"worker process failed: {exc}")
            if progress:
                progress(rows[i])
    return rows


def run_dask(jobs, scheduler: str, *, progress=None) -> list:
    """Run jobs on an existing Dask distributed cluster at ``scheduler`` (``regkl[dask]``)."""
    try:
        from dask.distributed import Client, as_completed
    except ImportError:
        raise InputError("--dask-scheduler needs dask.distributed: pip install 'regkl[dask]'") from None
    try:
        client = Client(scheduler, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise InputError(f"cannot connect to the Dask scheduler at {scheduler}: {exc}") from exc
    try:
        futures = client.map(run_job, jobs, threads=1, pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        rows = [None] * len(jobs)
        for fut in as_completed(futures):
            i = index[fut.key]
            try:
                rows[i] = fut.result()
            except Exception as exc:  # noqa: BLE001 - a worker died
                rows[i] = _row(jobs[i], "failed", 0.0, error=f"dask worker failed: {exc}")
            if progress:
                progress(rows[i])
        return rows
    finally:
        client.close()


def skipped_row(job: Job) -> dict:
    """Summary row of a job whose outputs are already complete (taken from its sidecar)."""
    record = json.loads(Path(job.sidecar).read_text(encoding="utf-8"))
    row = {k: record.get(k) for k in SUMMARY_COLUMNS}
    row["status"] = "skipped"
    return row


def write_summary(rows, out_dir, *, protect=()) -> tuple:
    """Write ``regkl_summary.tsv`` and ``regkl_summary.json`` (atomically) into ``out_dir``."""
    from .io import atomic_path

    out_dir = Path(out_dir)
    tsv, js = out_dir / "regkl_summary.tsv", out_dir / "regkl_summary.json"

    def cell(v):
        if v is None:
            return "n/a"
        return f"{v:.6g}" if isinstance(v, float) else str(v).replace("\t", " ").replace("\n", " ")

    lines = ["\t".join(SUMMARY_COLUMNS)] + ["\t".join(cell(r.get(c)) for c in SUMMARY_COLUMNS) for r in rows]
    with atomic_path(tsv, protect=protect) as tmp:
        # a file name that is not UTF-8 keeps its exact bytes (Python holds them as surrogates)
        Path(tmp).write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogateescape")
    with atomic_path(js, protect=protect) as tmp:
        Path(tmp).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return tsv, js
