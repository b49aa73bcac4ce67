"""Command-line interface. Parses, calls one library function, writes; nothing else.

Exit codes: 0 success, 1 registration failed, 2 bad usage or bad input/output, 3 internal error.
Results go to stdout; progress, warnings and errors to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import click
import numpy as np

from . import __version__
from .errors import RegklError

EXAMPLES = """
\b
Examples:
  # EPI series onto the T1; mean volume as reference, outputs on the T1 grid
  regkl register sub-01_bold.nii.gz sub-01_T1w.nii.gz -o bold_in_T1w.nii.gz \\
        --transform-out bold2T1w.tfm --matrix-out bold2T1w_ras.txt
\b
  # the same, machine-readable summary on stdout
  regkl register bold.nii.gz T1w.nii.gz -o out.nii.gz --json > summary.json
\b
  # apply the transform with ANTs or SimpleITK (fixed = reference):
  antsApplyTransforms -d 3 -i bold_ref.nii.gz -r T1w.nii.gz -t bold2T1w.tfm -o out.nii.gz
"""


def _log(quiet):
    def say(msg):
        if not quiet:
            click.echo(f"regkl: {msg}", err=True)
    return say


def _volume_option(value):
    return int(value) if value.lstrip("-").isdigit() else value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="regkl")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug):
    """regkl: mutual-information registration of 3D images (EPI to T1 and more).

    Transforms are 4x4 matrices in RAS+ mm mapping FIXED world points to MOVING world points;
    ITK files (.tfm) are the same transform in LPS, as ITK, ANTs and SimpleITK expect.
    """


@cli.command(epilog=EXAMPLES)
@click.argument("moving", type=click.Path(dir_okay=True))
@click.argument("fixed", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Moving image resampled on the fixed grid.")
@click.option("--transform-out", type=click.Path(dir_okay=False),
              help="ITK text transform (.tfm/.txt; LPS, fixed->moving) for SimpleITK/antsApplyTransforms.")
@click.option("--matrix-out", type=click.Path(dir_okay=False), help="4x4 RAS+ fixed->moving matrix (text).")
@click.option("--qc", "qc_out", type=click.Path(dir_okay=False), help="QC picture (PNG): edges, reverse edges, "
              "checkerboard in three views (needs regkl[qc]).")
@click.option("--model", default="rigid", show_default=True,
              help="Transform model: translation, rigid, similarity (rigid + scale), affine; similarity and "
                   "affine run a rigid stage first.")
@click.option("--metric", default="mi", show_default=True,
              help="Similarity metric: mi (mutual information), nmi (normalised MI), cr (correlation ratio), "
                   "jsd (Jensen-Shannon), kl (KL divergence to a learned prior; needs --prior).")
@click.option("--prior", type=click.Path(dir_okay=False), help="Prior joint histogram for --metric kl "
              "(from regkl learn-prior).")
@click.option("--bins", default=24, show_default=True, type=int, help="Histogram bins.")
@click.option("--sampling", default=0.5, show_default=True, type=float,
              help="Fraction of fixed grid points used at each level (regular grid, seeded jitter).")
@click.option("--levels", type=int, default=None, help="Pyramid levels [default: from voxel sizes].")
@click.option("--init", "init", type=click.Choice(["com", "geometry", "header"]), default="com",
              show_default=True, help="Start: align centres of mass, grid centres, or trust the headers.")
@click.option("--search", type=click.Choice(["none", "auto", "full"]), default="auto", show_default=True,
              help="Global rotation/translation search at the coarsest level (rotations up to 90 degrees); "
                   "auto keeps the start unless a searched pose is clearly better.")
@click.option("--fixed-mask", type=click.Path(dir_okay=False), help="Only fixed-image points inside this mask "
              "(any grid) count.")
@click.option("--moving-mask", type=click.Path(dir_okay=False), help="Only points mapping inside this mask "
              "(any grid, on the moving image's world) count.")
@click.option("--auto-mask", is_flag=True, help="Build head/brain masks from the images where no mask is given "
              "(neck, eyes and background then do not steer the result).")
@click.option("--moving-volume", default="mean", show_default=True,
              help="4D moving image reduced by mean, median or a volume index N (0-based).")
@click.option("--interp", type=click.Choice(["nearest", "linear", "cubic"]), default="linear",
              show_default=True, help="Interpolation of the output image.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the point sampling.")
@click.option("--max-iter", default=100, show_default=True, type=int, help="Optimiser iterations per level.")
@click.option("--max-seconds", default=600.0, show_default=True, type=float,
              help="Time limit: past it the registration stops with exit code 1.")
@click.option("--threads", type=int, default=None, help="Numba threads [default: all cores or NUMBA_NUM_THREADS].")
@click.option("--confidence", is_flag=True, help="Assess the result without ground truth (restart drift and "
              "agreement, optimum sharpness, MI/entropy): score and suspect flag in --json and on stderr.")
@click.option("--fail-on-suspect", is_flag=True, help="Exit with code 1 when the result is flagged suspect "
              "(implies --confidence; outputs are still written for inspection).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages on stderr.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def register(moving, fixed, output, transform_out, matrix_out, qc_out, model, metric, prior, bins, sampling, levels, init,
             search, fixed_mask, moving_mask, auto_mask, moving_volume, interp, seed, max_iter, max_seconds, threads,
             confidence, fail_on_suspect, as_json, quiet, debug):
    """Register MOVING (e.g. an EPI, 3D or 4D) to FIXED (e.g. a T1).

    Writes the moving image resampled on the fixed grid (-o), the transform as an ITK file
    (--transform-out) and/or a RAS matrix (--matrix-out). Without --json, the 4x4 RAS
    fixed->moving matrix is printed on stdout.
    """
    from .io import load_volume, save_volume
    from .optimize import register as run_register
    from .resample import resample
    from .xfm import save_transform, transform_text

    t0 = time.perf_counter()
    say = _log(quiet)
    _set_threads(threads)
    if as_json and "-" in (transform_out, matrix_out):
        raise RegklError("--json and a '-' (stdout) transform output cannot share stdout")
    prior_table = _load_prior(metric, prior, bins)
    inputs = tuple(p for p in (moving, fixed, fixed_mask, moving_mask, prior) if p)
    for out in (output, transform_out, matrix_out, qc_out):
        _check_output(out, inputs)
    warm = _warm_kernels_in_background()
    fixed_vol = load_volume(fixed, volume="mean")
    moving_vol = load_volume(moving, volume=_volume_option(moving_volume))
    fixed_mask_vol = None if fixed_mask is None else load_volume(fixed_mask, allow_constant=True)
    moving_mask_vol = None if moving_mask is None else load_volume(moving_mask, allow_constant=True)
    warm.join()
    if moving_vol.note:
        say(f"moving reference: {moving_vol.note}")
    result = run_register(moving_vol, fixed_vol, model=model, metric=metric, prior=prior_table, bins=bins,
                          sampling=sampling, levels=levels, init=init, search=search, fixed_mask=fixed_mask_vol,
                          moving_mask=moving_mask_vol, auto_mask=auto_mask, seed=seed, max_iter=max_iter,
                          max_seconds=max_seconds, confidence=confidence or fail_on_suspect, log=say)
    from .io import output_group

    printed = False
    with output_group():  # all outputs or none
        for path, fmt in ((transform_out, "itk"), (matrix_out, "ras")):
            if path == "-":
                printed = True
            elif path:
                save_transform(path, result.fixed2moving, fmt, protect=inputs)
        if output or qc_out:
            registered = resample(moving_vol, fixed_vol, result.fixed2moving, interp=interp)
        if output:
            save_volume(registered, output, like=fixed_vol, protect=inputs)
        if qc_out:
            _write_qc(fixed_vol, registered, qc_out, moving, fixed, metric, result)
    for path, fmt in ((transform_out, "itk"), (matrix_out, "ras")):
        if path == "-":
            click.echo(transform_text(result.fixed2moving, fmt), nl=False)
    elapsed = time.perf_counter() - t0
    say(f"{metric} {result.metric_before:.4f} -> {result.metric_after:.4f} in {elapsed:.2f} s")
    if as_json:
        if printed:
            raise RegklError("--json and a '-' (stdout) transform output cannot share stdout")
        click.echo(json.dumps(summary(result, moving_vol, fixed_vol, output, transform_out, matrix_out,
                                      elapsed), indent=2))
    elif not printed:
        for row in result.fixed2moving:
            click.echo(" ".join(f"{v: .8f}" for v in row))
    if fail_on_suspect and result.confidence.suspect:
        click.echo(f"regkl: error: {moving}: registration flagged suspect (confidence "
                   f"{result.confidence.score:.2f}); see --json evidence or --qc", err=True)
        sys.exit(1)


def _write_qc(fixed_vol, registered, path, moving, fixed, metric, result):
    from .qc import qc_figure

    qc_figure(fixed_vol, registered, path,
              title=f"{os.path.basename(moving)} -> {os.path.basename(fixed)}   {metric} "
                    f"{result.metric_before:.3f} -> {result.metric_after:.3f}   {result.model}"
                    + ("" if result.confidence is None else
                       f"   confidence {result.confidence.score:.2f}"
                       f"{' SUSPECT' if result.confidence.suspect else ''}"))


def _set_threads(threads):
    if threads is None:
        return
    import numba

    if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        raise click.BadParameter(f"must be 1..{numba.config.NUMBA_NUM_THREADS}", param_hint="--threads")
    numba.set_num_threads(threads)


def _load_prior(metric, prior, bins):
    """The prior table for --metric kl (checked against --bins), or None."""
    from .errors import InputError
    from .metrics import PRIOR_METRICS, load_prior

    if metric in PRIOR_METRICS:
        if prior is None:
            raise InputError(f"--metric {metric} needs --prior FILE (make one with: regkl learn-prior)")
        table, _ = load_prior(prior)
        if table.shape != (bins, bins):
            raise InputError(f"prior has {table.shape[0]}x{table.shape[1]} bins but --bins is {bins}; "
                             f"use --bins {table.shape[0]}", path=prior)
        return table
    if prior is not None:
        raise InputError(f"--prior is only used with --metric kl, not {metric}")
    return None


def _warm_kernels_in_background():
    """Start loading the compiled kernels while the images are read (both release the GIL)."""
    import threading

    from .kernels import warm_up

    thread = threading.Thread(target=warm_up, name="regkl-warm-up", daemon=True)
    thread.start()
    return thread


def _check_output(path, inputs):
    """Refuse, before any work, an output that would overwrite an input or cannot be written."""
    from .io import check_output_path

    if path is None or path == "-":
        return
    check_output_path(path, protect=inputs)


def summary(result, moving, fixed, output, transform_out, matrix_out, seconds) -> dict:
    """JSON-ready summary of a registration."""
    params = np.asarray(result.params, dtype=float)
    named = {}
    if result.model == "rigid":
        named = {"rotation_deg": np.rad2deg(params[:3]).round(6).tolist(),
                 "translation_mm": params[3:6].round(6).tolist()}
    return {
        "regkl_version": __version__,
        "moving": moving.name, "moving_reference": moving.note or "3D volume", "fixed": fixed.name,
        "output": output, "transform_itk": transform_out, "matrix_ras": matrix_out,
        "model": result.model, "stages": list(result.stages), "metric": result.metric, "init": result.init,
        "search": None if result.search is None else {
            "chosen": result.search.chosen, "poses_evaluated": result.search.evaluated,
            "start_metric": result.search.start_metric, "best_metric": result.search.best_metric,
            "rotation_from_start_deg": result.search.rotation_deg, "seconds": round(result.search.seconds, 4)},
        "metric_before": result.metric_before, "metric_after": result.metric_after,
        "parameters": {"values": params.tolist(), "centre_ras_mm": np.asarray(result.centre).tolist(), **named},
        "fixed2moving_ras": np.asarray(result.fixed2moving).tolist(),
        "levels": [{"stage": lv.stage, "spacing_mm": lv.spacing_mm, "points": lv.n_points, "iterations": lv.iterations,
                    "evaluations": lv.evaluations, "metric_start": lv.metric_start, "metric_end": lv.metric_end,
                    "stop": lv.stop_reason,
                    "last_step_mm": None if lv.last_step_mm is None else round(lv.last_step_mm, 6),
                    "seconds": round(lv.seconds, 4)} for lv in result.levels],
        "confidence": None if result.confidence is None else result.confidence.as_dict(),
        "settings": result.settings,
        "registration_seconds": round(result.seconds, 4),
        "total_seconds": round(seconds, 4),
    }


class _Progress:
    """Progress on stderr: a bar on a terminal, plain lines otherwise (logs, pipelines)."""

    def __init__(self, total, quiet):
        self.total, self.done, self.failed, self.quiet = total, 0, 0, quiet
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, row):
        self.done += 1
        self.failed += row["status"] == "failed"
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        name = os.path.basename(row["moving"])
        if self.tty:
            width = 30
            fill = int(width * self.done / max(self.total, 1))
            click.echo(f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
                       f"({self.failed} failed) ETA {eta:4.0f} s  {name[:40]:40s}", err=True, nl=False)
            if self.done == self.total:
                click.echo("", err=True)
        else:
            extra = f": {row['error']}" if row["status"] == "failed" else ""
            click.echo(f"regkl: {self.done}/{self.total} {row['status']} {name} ({row['seconds']:.1f} s){extra}",
                       err=True)


@cli.command("batch")
@click.argument("root", type=click.Path(file_okay=False, exists=False))
@click.option("--out-dir", type=click.Path(file_okay=False), help="Results folder [default: ROOT/derivatives/regkl].")
@click.option("--moving-glob", help="Plain folder: moving images, a glob relative to ROOT (e.g. '*/epi.nii.gz').")
@click.option("--fixed-glob", help="Plain folder: fixed image glob, matched in each moving image's folder or "
              "the nearest parent.")
@click.option("--suffixes", default="bold,sbref,dwi", show_default=True,
              help="BIDS suffixes of the images to register.")
@click.option("-j", "--jobs", "n_jobs", type=int, default=None,
              help="Parallel processes [default: one per core, each with cores/jobs Numba threads].")
@click.option("--dask-scheduler", help="Run on an existing Dask cluster (address, e.g. tcp://host:8786).")
@click.option("--force", is_flag=True, help="Redo pairs whose outputs are already complete.")
@click.option("--model", default="rigid", show_default=True, help="As for register.")
@click.option("--metric", default="mi", show_default=True, help="As for register (kl needs --prior).")
@click.option("--prior", type=click.Path(dir_okay=False), help="Prior for --metric kl.")
@click.option("--bins", default=24, show_default=True, type=int)
@click.option("--sampling", default=0.5, show_default=True, type=float)
@click.option("--search", type=click.Choice(["none", "auto", "full"]), default="auto", show_default=True)
@click.option("--auto-mask", is_flag=True, help="As for register.")
@click.option("--moving-volume", default="mean", show_default=True, help="4D reduction: mean, median or N.")
@click.option("--interp", type=click.Choice(["nearest", "linear", "cubic"]), default="linear", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--report", "report_out", type=click.Path(dir_okay=False),
              help="HTML report of every pair (QC pictures, confidence, errors; worst first) "
                   "[default: regkl_report.html in the results folder].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary rows as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def batch_cmd(root, out_dir, moving_glob, fixed_glob, suffixes, n_jobs, dask_scheduler, force, model, metric, prior,
              bins, sampling, search, auto_mask, moving_volume, interp, seed, report_out, as_json, quiet, debug):
    """Register every EPI of a BIDS dataset (or plain folder ROOT) to its subject's T1w.

    BIDS: sub-*/[ses-*/]func/*_bold.nii[.gz] (and --suffixes) onto the same subject's
    anat/*_T1w.nii[.gz], preferring the same session. Results go to ROOT/derivatives/regkl with
    BIDS-derivative names (..._space-T1w_desc-coreg_bold.nii.gz, ..._from-bold_to-T1w_mode-image_xfm.txt),
    plus regkl_summary.tsv and .json and an HTML report (regkl_report.html: every pair with a QC
    picture, worst first). Pairs already complete are skipped (resumable; --force redoes them); a
    failing pair never stops the others. Exit code 1 if any pair failed.

    \b
    Examples:
      regkl batch /data/ds000001 --jobs 4
      regkl batch /data/study --moving-glob '*/rest.nii.gz' --fixed-glob 'T1.nii.gz' --out-dir /data/reg
      regkl batch /data/ds000001 --dask-scheduler tcp://scheduler:8786
    """
    from . import batch
    from .errors import InputError
    from .io import stale_temp_files
    from .report import write_report

    rootp = Path(root)
    if not rootp.is_dir():
        raise InputError("no such folder", path=root)
    if bool(moving_glob) != bool(fixed_glob):
        raise InputError("--moving-glob and --fixed-glob go together")
    out = Path(out_dir) if out_dir else rootp / "derivatives" / "regkl"
    _load_prior(metric, prior, bins)
    options = {"model": model, "metric": metric, "bins": bins, "sampling": sampling, "search": search,
               "auto_mask": auto_mask, "seed": seed, "moving_volume": _volume_option(moving_volume),
               "interp": interp}
    if prior:
        options["prior"] = str(Path(prior).resolve())
    if moving_glob:
        jobs = batch.discover_glob(rootp, out, moving_glob, fixed_glob, options=options)
    else:
        jobs = batch.discover_bids(rootp, out, suffixes=tuple(x for x in suffixes.split(",") if x), options=options)
    if not jobs:
        raise InputError("found no images to register (BIDS: sub-*/[ses-*/]func/*_bold.nii[.gz]; "
                         "plain folders: --moving-glob/--fixed-glob)", path=root)
    inputs = sorted({p for j in jobs for p in (j.moving, j.fixed) if p})
    if report_out:
        _check_output(report_out, inputs)
    out.mkdir(parents=True, exist_ok=True)
    for stale in stale_temp_files(out):
        stale.unlink()
    _write_dataset_description(out)
    todo = [j for j in jobs if force or not batch.is_complete(j)]
    done_rows = {j.sidecar: batch.skipped_row(j) for j in jobs if j not in todo}
    say = _log(quiet)
    say(f"{len(jobs)} pairs, {len(done_rows)} already complete, {len(todo)} to run")
    progress = _Progress(len(todo), quiet)
    if not todo:
        rows = []
    elif dask_scheduler:
        rows = batch.run_dask(todo, dask_scheduler, progress=progress)
    else:
        cores = os.cpu_count() or 1
        rows = batch.run_local(todo, n_jobs=max(1, min(n_jobs or cores, len(todo))), progress=progress)
    by_sidecar = {j.sidecar: r for j, r in zip(todo, rows)}
    all_rows = [by_sidecar.get(j.sidecar) or done_rows[j.sidecar] for j in jobs]
    tsv, _ = batch.write_summary(all_rows, out)
    page = write_report(all_rows, report_out or out / "regkl_report.html", title=f"regkl batch report: {rootp.name}",
                        source=f"results in {out}", protect=inputs)
    failed = sum(r["status"] == "failed" for r in all_rows)
    say(f"{len(all_rows) - failed} of {len(all_rows)} pairs ok; summary: {tsv}; report: {page}")
    if as_json:
        click.echo(json.dumps(all_rows, indent=2))
    if failed:
        sys.exit(1)


def _write_dataset_description(out):
    """BIDS derivatives need a dataset_description.json; write one if missing."""
    from .io import atomic_path

    path = Path(out) / "dataset_description.json"
    if path.exists():
        return
    desc = {"Name": "regkl coregistration", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "regkl", "Version": __version__}]}
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(desc, indent=2), encoding="utf-8")


@cli.command("report")
@click.argument("summary", type=click.Path())
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="HTML file to write.")
@click.option("--title", default=None, help="Page title [default: from the results folder's name].")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def report_cmd(summary, output, title, debug):
    """HTML report of a finished batch, from SUMMARY (regkl_summary.json or the folder holding it).

    Every pair with its QC picture, identifiers, metric, time, confidence, suspect flag and error;
    worst first, sortable by any column. Self-contained: pictures are embedded in the file.

    \b
    Example:
      regkl report /data/ds000001/derivatives/regkl -o report.html
    """
    from .report import load_summary, write_report

    rows, source = load_summary(summary)
    _check_output(output, (source,))
    folder = source.resolve().parent
    if folder.name == "regkl" and folder.parent.name == "derivatives":  # the default ROOT/derivatives/regkl
        folder = folder.parent.parent
    write_report(rows, output, title=title or f"regkl batch report: {folder.name}", source=f"from {source}",
                 protect=(source,))


@cli.command("apply")
@click.argument("transform", type=click.Path(dir_okay=False))
@click.argument("moving", type=click.Path(dir_okay=True))
@click.argument("reference", type=click.Path(dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Resampled image (NIfTI for 4D).")
@click.option("--interp", type=click.Choice(["nearest", "linear", "cubic"]), default="linear", show_default=True,
              help="Interpolation; nearest keeps the values and data type (label maps).")
@click.option("--inverse", is_flag=True, help="Apply the transform the other way (fixed-space image onto a "
              "moving-space grid).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages on stderr.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def apply_cmd(transform, moving, reference, output, interp, inverse, as_json, quiet, debug):
    """Apply a saved TRANSFORM to MOVING (3D or a whole 4D series), on REFERENCE's grid.

    TRANSFORM is a regkl or any linear ITK transform (.tfm/.txt/.mat) or a RAS 4x4 text matrix,
    fixed->moving as `regkl register` writes it; REFERENCE is normally the fixed image.

    \b
    Examples:
      regkl apply bold2T1w.tfm sub-01_bold.nii.gz sub-01_T1w.nii.gz -o bold_in_T1w.nii.gz
      regkl apply bold2T1w.tfm aparc_T1w.nii.gz bold_ref.nii.gz --inverse --interp nearest -o aparc_in_bold.nii.gz
    """
    from .io import load_series, load_volume, save_array
    from .resample import apply_to_series
    from .xfm import load_transform

    t0 = time.perf_counter()
    say = _log(quiet)
    _check_output(output, (moving, reference, transform))
    matrix = load_transform(transform)
    volumes, header = load_series(moving)
    ref = load_volume(reference, volume=0, allow_constant=True)
    out = apply_to_series(volumes, ref, matrix, interp=interp, inverse=inverse)
    dtype = volumes[0].data.dtype if interp != "nearest" else _stored_dtype(header, volumes[0].data.dtype)
    zooms_t = float(header.get_zooms()[3]) if header is not None and len(header.get_zooms()) > 3 else None
    save_array(out, ref.vox2ras, output, like=ref, protect=(moving, reference, transform),
               dtype=np.float32 if interp != "nearest" else dtype, zooms_t=zooms_t)
    say(f"{len(volumes)} volume(s) resampled on {reference} in {time.perf_counter() - t0:.2f} s")
    if as_json:
        click.echo(json.dumps({"transform": transform, "moving": moving, "reference": reference, "output": output,
                               "volumes": len(volumes), "interp": interp, "inverse": inverse,
                               "seconds": round(time.perf_counter() - t0, 4)}))


def _stored_dtype(header, default):
    """On-disk data type of a NIfTI header (so label maps stay integer), else ``default``."""
    try:
        return np.dtype(header.get_data_dtype()) if header is not None else default
    except Exception:  # noqa: BLE001 - unusual header: keep float
        return default


@cli.command("qc")
@click.argument("fixed", type=click.Path(dir_okay=True))
@click.argument("registered", type=click.Path(dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--title", default=None, help="Title [default: the file names].")
@click.option("--slices", default=5, show_default=True, type=int, help="Slices per view.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def qc_cmd(fixed, registered, output, title, slices, debug):
    """QC picture of REGISTERED (on FIXED's grid, e.g. regkl register -o) against FIXED.

    Rows: the registered image with the fixed image's edges (red), the reverse, and a
    checkerboard of the two; axial, coronal and sagittal views at several slices.
    """
    from .io import load_volume
    from .qc import qc_figure

    _check_output(output, (fixed, registered))
    fixed_vol = load_volume(fixed)
    reg_vol = load_volume(registered, volume=0)
    qc_figure(fixed_vol, reg_vol, output, n_slices=slices,
              title=title or f"{os.path.basename(registered)} on {os.path.basename(fixed)}")


@cli.command("learn-prior")
@click.argument("pairs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Prior file (.npz).")
@click.option("--bins", default=24, show_default=True, type=int, help="Histogram bins (use the same to register).")
@click.option("--moving-volume", default="mean", show_default=True, help="4D reduction: mean, median or N.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages on stderr.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def learn_prior_cmd(pairs, output, bins, moving_volume, as_json, quiet, debug):
    """Learn the expected joint histogram of ALIGNED pairs, for --metric kl.

    Each PAIR is MOVING,FIXED (the headers already align them) or MOVING,FIXED,TRANSFORM (an ITK
    or RAS transform file that aligns them, fixed->moving, e.g. from regkl register).

    \b
    Example:
      regkl learn-prior s1_bold.nii.gz,s1_T1w.nii.gz s2_bold.nii.gz,s2_T1w.nii.gz,s2.tfm -o prior.npz
      regkl register s3_bold.nii.gz s3_T1w.nii.gz --metric kl --prior prior.npz -o out.nii.gz
    """
    from .errors import InputError
    from .io import load_volume
    from .metrics import save_prior
    from .optimize import learn_prior
    from .xfm import load_transform

    say = _log(quiet)
    _check_output(output, [q for p in pairs for q in p.split(",") if q])
    loaded = []
    for pair in pairs:
        parts = pair.split(",")
        if len(parts) not in (2, 3):
            raise InputError(f"a pair is MOVING,FIXED or MOVING,FIXED,TRANSFORM, got {pair!r}")
        moving, fixed = load_volume(parts[0], volume=_volume_option(moving_volume)), load_volume(parts[1])
        loaded.append((moving, fixed, load_transform(parts[2]) if len(parts) == 3 else None))
        say(f"pair {len(loaded)}: {parts[0]} -> {parts[1]}")
    prior = learn_prior(loaded, bins=bins)
    meta = {"pairs": list(pairs), "regkl_version": __version__}
    save_prior(output, prior, bins=bins, meta=meta)
    if as_json:
        click.echo(json.dumps({"output": output, "bins": bins, "pairs": len(loaded)}))


@cli.command("metric")
@click.argument("moving", type=click.Path(dir_okay=True))
@click.argument("fixed", type=click.Path(dir_okay=True))
@click.option("--metric", "metric_names", default="mi", show_default=True,
              help="Metric name, or several separated by commas (mi, nmi, cr, jsd, kl).")
@click.option("--transform", type=click.Path(dir_okay=False), help="Transform to apply first (fixed->moving; "
              "ITK or RAS file); default: the headers as they are.")
@click.option("--prior", type=click.Path(dir_okay=False), help="Prior for kl.")
@click.option("--bins", default=24, show_default=True, type=int, help="Histogram bins.")
@click.option("--moving-volume", default="mean", show_default=True, help="4D reduction: mean, median or N.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of one line per metric.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def metric_cmd(moving, fixed, metric_names, transform, prior, bins, moving_volume, as_json, debug):
    """Similarity of MOVING and FIXED in world space (higher is more similar).

    Prints one line per metric: NAME VALUE (and the overlap fraction), or JSON with --json.
    """
    from .io import load_volume
    from .optimize import evaluate_metric
    from .xfm import load_transform

    names = [n.strip() for n in metric_names.split(",") if n.strip()]
    fixed_vol = load_volume(fixed)
    moving_vol = load_volume(moving, volume=_volume_option(moving_volume))
    m = None if transform is None else load_transform(transform)
    out = {}
    for name in names:
        value, overlap = evaluate_metric(moving_vol, fixed_vol, m, metric=name, bins=bins,
                                         prior=_load_prior(name, prior if name == "kl" else None, bins))
        out[name] = value
    if as_json:
        click.echo(json.dumps({"moving": moving, "fixed": fixed, "transform": transform, "overlap": overlap,
                               "metrics": out}))
    else:
        for name, value in out.items():
            click.echo(f"{name}\t{value:.6f}")
        click.echo(f"overlap\t{overlap:.4f}")


@cli.command("profile")
@click.argument("moving", type=click.Path(dir_okay=True))
@click.argument("fixed", type=click.Path(dir_okay=True))
@click.option("--transform", type=click.Path(dir_okay=False), help="Pose to profile (fixed->moving; ITK or RAS "
              "file, e.g. from register --transform-out) [default: the headers as they are].")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="PNG with the six curves (needs regkl[qc]).")
@click.option("--metric", default="mi", show_default=True, help="As for register (kl needs --prior).")
@click.option("--prior", type=click.Path(dir_okay=False), help="Prior for --metric kl.")
@click.option("--bins", default=24, show_default=True, type=int, help="Histogram bins.")
@click.option("--sampling", default=1.0, show_default=True, type=float,
              help="Fraction of the finest level's fixed grid points used.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the point sampling.")
@click.option("--range-deg", default=20.0, show_default=True, type=float, help="Rotations from -R to +R degrees.")
@click.option("--range-mm", default=20.0, show_default=True, type=float, help="Shifts from -R to +R mm.")
@click.option("--steps", default=20, show_default=True, type=int, help="Points on each side of the pose.")
@click.option("--fixed-mask", type=click.Path(dir_okay=False), help="As for register.")
@click.option("--moving-mask", type=click.Path(dir_okay=False), help="As for register.")
@click.option("--auto-mask", is_flag=True, help="As for register.")
@click.option("--moving-volume", default="mean", show_default=True, help="4D reduction: mean, median or N.")
@click.option("--json", "as_json", is_flag=True, help="Print the curves as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages on stderr.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def profile_cmd(moving, fixed, transform, output, metric, prior, bins, sampling, seed, range_deg, range_mm, steps,
                fixed_mask, moving_mask, auto_mask, moving_volume, as_json, quiet, debug):
    """The metric along each rigid parameter around a pose: a picture of the cost landscape.

    Rotations about R, A, S through the brain's centre and shifts along R, A, S, one at a time,
    applied to the moving side of TRANSFORM, at the registration's finest level. A good solution
    peaks at 0 on all six curves. Prints the best offset of each curve (or --json: every curve).

    \b
    Example:
      regkl register bold.nii.gz T1w.nii.gz --transform-out bold2T1w.tfm
      regkl profile bold.nii.gz T1w.nii.gz --transform bold2T1w.tfm -o profile.png
    """
    from .io import load_volume
    from .landscape import PARAMETERS, check_settings, plot_profile, profile_metric
    from .xfm import load_transform

    say = _log(quiet)
    check_settings(range_deg, range_mm, steps)
    if not 0.0 < sampling <= 1.0:
        raise click.BadParameter(f"must be in (0, 1], got {sampling:g}", param_hint="--sampling")
    prior_table = _load_prior(metric, prior, bins)
    inputs = tuple(p for p in (moving, fixed, transform, fixed_mask, moving_mask, prior) if p)
    _check_output(output, inputs)
    if output:
        from .qc import _require_matplotlib

        _require_matplotlib()
    pose = np.eye(4) if transform is None else load_transform(transform)
    fixed_vol = load_volume(fixed, volume="mean")
    moving_vol = load_volume(moving, volume=_volume_option(moving_volume))
    fixed_mask_vol = None if fixed_mask is None else load_volume(fixed_mask, allow_constant=True)
    moving_mask_vol = None if moving_mask is None else load_volume(moving_mask, allow_constant=True)
    say(f"{6 * 2 * steps + 1} evaluations of {metric}")
    prof = profile_metric(moving_vol, fixed_vol, pose, metric=metric, bins=bins, prior=prior_table,
                          fixed_mask=fixed_mask_vol, moving_mask=moving_mask_vol, auto_mask=auto_mask,
                          sampling=sampling, seed=seed, range_deg=range_deg, range_mm=range_mm, steps=steps)
    say(f"{prof.n_points} points at {prof.spacing_mm:g} mm, {prof.seconds:.1f} s")
    if output:
        plot_profile(prof, output, protect=inputs,
                     title=f"{os.path.basename(moving)} -> {os.path.basename(fixed)}: {metric} around "
                           f"{os.path.basename(transform) if transform else 'the headers'}")
    if as_json:
        click.echo(json.dumps({"moving": moving, "fixed": fixed, "transform": transform, "output": output,
                               **prof.as_dict()}))
    else:
        click.echo(f"at_pose\t{prof.at_pose:.6f}")
        for k, (name, unit, _) in enumerate(PARAMETERS):
            j = int(np.nanargmax(prof.values[k]))
            click.echo(f"{name}\t{prof.best[k]:+g} {unit}\t{prof.values[k, j]:.6f}")


@cli.command("stats")
@click.argument("image", type=click.Path(dir_okay=True))
@click.option("--bins", default=64, show_default=True, type=int, help="Histogram bins.")
@click.option("--mask", type=click.Path(dir_okay=False), help="Only voxels inside this mask (same grid).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of one line per value.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def stats_cmd(image, bins, mask, as_json, debug):
    """Intensity entropy of IMAGE and the KL divergence of its histogram from uniform (contrast).

    One 'name<TAB>value' line each, or JSON with --json.
    """
    from .io import load_volume
    from .stats import image_stats

    vol = load_volume(image)
    mask_data = None
    if mask is not None:
        from .errors import InputError

        mvol = load_volume(mask, allow_constant=True)
        if mvol.shape != vol.shape:
            raise InputError(f"mask shape {mvol.shape} differs from the image's {vol.shape}", path=mask)
        mask_data = mvol.data > 0
    result = image_stats(vol, bins=bins, mask=mask_data)
    if as_json:
        click.echo(json.dumps({"image": image, **result}, default=_jsonable))
    else:
        for key, value in result.items():
            click.echo(f"{key}\t{_jsonable(value) if not isinstance(value, (int, float, str)) else value}")


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def main(argv=None):
    """Console entry point: runs the Click group and maps errors to one line and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        # a scheduler's SIGTERM unwinds normally, so temporary outputs are removed
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not debug:
        warnings.showwarning = lambda msg, *a, **k: click.echo(f"regkl: warning: {msg}", err=True)
    try:
        cli.main(args=argv, prog_name="regkl", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("regkl: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        if debug:
            raise
        click.echo(f"regkl: error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(exc.exit_code)
    except RegklError as exc:
        if debug:
            raise
        click.echo(f"regkl: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("regkl: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, no traceback
        if debug:
            raise
        text = " ".join(str(exc).split())[:300]
        click.echo(f"regkl: internal error: {type(exc).__name__}: {text} (rerun with --debug)", err=True)
        sys.exit(3)
    sys.exit(0)


def run():
    """The ``regkl`` console script: :func:`main`, then exit without interpreter teardown.

    Tearing down Numba/LLVM at exit takes about 0.25 s, longer than many registrations' I/O. By the
    time :func:`main` returns every output is closed and renamed into place, so the streams are
    flushed and the process ends with ``os._exit`` and the same exit code. Unexpected exceptions
    (``--debug``) still propagate with their traceback and a normal exit.
    """
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (regkl ... | head): nothing more to say
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
