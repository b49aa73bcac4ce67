"""`regkl batch`: every pair of a dataset, in parallel, resumable."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import click

from ._common import (BINS, METRIC, MODEL, POSITIVE, SAMPLING, SEED, VolumeChoice, check_output, echo_err,
                      load_prior, log)


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
            echo_err(f"\r[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
                     f"({self.failed} failed) ETA {eta:4.0f} s  {name[:40]:40s}", nl=False)
            if self.done == self.total:
                echo_err("")
        else:
            extra = f": {row['error']}" if row["status"] == "failed" else ""
            echo_err(f"regkl: {self.done}/{self.total} {row['status']} {name} ({row['seconds']:.1f} s){extra}")


@click.command("batch")
@click.argument("root", type=click.Path(file_okay=False, exists=False))
@click.option("--out-dir", type=click.Path(file_okay=False), help="Results folder [default: ROOT/derivatives/regkl].")
@click.option("--moving-glob", help="Plain folder: moving images, a glob relative to ROOT (e.g. '*/epi.nii.gz').")
@click.option("--fixed-glob", help="Plain folder: fixed image glob, matched in each moving image's folder or "
              "the nearest parent.")
@click.option("--suffixes", default="bold,sbref,dwi", show_default=True,
              help="BIDS suffixes of the images to register.")
@click.option("-j", "--jobs", "n_jobs", type=POSITIVE, default=None,
              help="Parallel processes [default: one per core, each with cores/jobs Numba threads].")
@click.option("--dask-scheduler", help="Run on an existing Dask cluster (address, e.g. tcp://host:8786).")
@click.option("--force", is_flag=True, help="Redo pairs whose outputs are already complete.")
@click.option("--model", default="rigid", show_default=True, type=MODEL, help="As for register.")
@click.option("--metric", default="mi", show_default=True, type=METRIC, help="As for register (kl needs --prior).")
@click.option("--prior", type=click.Path(dir_okay=False), help="Prior for --metric kl.")
@click.option("--bins", default=24, show_default=True, type=BINS)
@click.option("--sampling", default=0.5, show_default=True, type=SAMPLING)
@click.option("--search", type=click.Choice(["none", "auto", "full"]), default="auto", show_default=True)
@click.option("--auto-mask", is_flag=True, help="As for register.")
@click.option("--moving-volume", default=None, type=VolumeChoice(extra=("realigned",)),
              help="4D reduction: mean, median, N, or realigned (the motion-corrected boldref; computed once with "
                   "--hmc's outputs) [default: realigned for the series --hmc corrects, so that the coreg transform "
                   "starts from the desc-hmc_boldref as fMRIPrep chains them; mean otherwise].")
@click.option("--hmc/--no-hmc", default=True, show_default=True,
              help="Head-motion correction of every 4D BOLD series (any 4D series with --moving-glob): writes "
                   "..._desc-confounds_timeseries.tsv (+ .json), ..._from-orig_to-boldref_mode-image_desc-hmc_xfm.txt "
                   "and ..._desc-hmc_boldref.nii.gz (+ .json).")
@click.option("--interp", type=click.Choice(["nearest", "linear", "cubic"]), default="linear", show_default=True)
@click.option("--seed", default=0, show_default=True, type=SEED)
@click.option("--report", "report_out", type=click.Path(dir_okay=False),
              help="HTML report of every pair (QC pictures, confidence, errors; worst first); an .html "
                   "name [default: regkl_report.html in the results folder].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary rows as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress on stderr (why a pair is redone is still said).")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def batch_cmd(root, out_dir, moving_glob, fixed_glob, suffixes, n_jobs, dask_scheduler, force, model, metric, prior,
              bins, sampling, search, auto_mask, moving_volume, hmc, interp, seed, report_out, as_json, quiet, debug):
    """Register every EPI of a BIDS dataset (or plain folder ROOT) to its subject's T1w.

    BIDS: sub-*/[ses-*/]func/*_bold.nii[.gz] (and --suffixes) onto the same subject's
    anat/*_T1w.nii[.gz], preferring the same session. Results go to ROOT/derivatives/regkl with
    fMRIPrep's BIDS-derivative names (..._space-T1w_boldref.nii.gz,
    ..._from-boldref_to-T1w_mode-image_desc-coreg_xfm.txt and their JSON sidecars,
    sub-*/figures/..._desc-coreg_bold.png), for a 4D BOLD series its head-motion correction
    (--hmc: ..._desc-confounds_timeseries.tsv, ..._desc-hmc_xfm.txt, ..._desc-hmc_boldref.nii.gz),
    a summary in logs/regkl_summary.tsv and .json and an
    HTML report (regkl_report.html: every pair with a QC picture, worst first). Pairs already
    complete with the same options and inputs are skipped (resumable; --force redoes them); a
    failing pair never stops the others; a second batch on the same results folder waits for the
    first. Exit code 1 if any pair failed.

    \b
    Examples:
      regkl batch /data/ds000001 --jobs 4
      regkl batch /data/study --moving-glob '*/rest.nii.gz' --fixed-glob 'T1.nii.gz' --out-dir /data/reg
      regkl batch /data/ds000001 --dask-scheduler tcp://scheduler:8786
    """
    from .. import batch, resume
    from ..bids import ignore_patterns
    from ..errors import InputError
    from ..outputs import stale_temp_files
    from ..report import report_rows, write_report

    from ..numba_cache import ensure_usable

    ensure_usable()  # before the workers start: they inherit a fallback cache folder
    rootp = Path(root)
    if not rootp.is_dir():
        raise InputError("no such folder", path=root)
    if bool(moving_glob) != bool(fixed_glob):
        raise InputError("--moving-glob and --fixed-glob go together")
    out = Path(out_dir) if out_dir else rootp / "derivatives" / "regkl"
    batch.check_folders(rootp, out)
    load_prior(metric, prior, bins)
    options = {"model": model, "metric": metric, "bins": bins, "sampling": sampling, "search": search,
               "auto_mask": auto_mask, "seed": seed, "moving_volume": moving_volume,
               "interp": interp, "hmc": hmc}
    if prior:
        options["prior"] = str(Path(prior).resolve())
    shaping = resume.shaping_options(options)
    suffix_list = tuple(x for x in suffixes.split(",") if x)
    if moving_glob:
        jobs = batch.discover_glob(rootp, out, moving_glob, fixed_glob, options=options, shaping=shaping)
    else:
        jobs = batch.discover_bids(rootp, out, suffixes=suffix_list, options=options, shaping=shaping)
    if not jobs:
        raise InputError("found no images to register (BIDS: sub-*/[ses-*/]func/*_bold.nii[.gz]; "
                         "plain folders: --moving-glob/--fixed-glob)", path=root)
    # --hmc shapes only the pairs that get motion outputs: changing it never redoes an sbref or dwi pair
    jobs = [j if j.paths.motion else replace(j, shaping={k: v for k, v in j.shaping.items() if k != "hmc"})
            for j in jobs]
    batch.check_jobs(jobs)
    inputs = sorted({str(p) for j in jobs for p in (j.moving, j.fixed) if p})
    results = [str(p) for j in jobs for p in j.paths.all()]
    results += [str(out / f"{resume.SUMMARY_NAME}{ext}") for ext in (".tsv", ".json")]
    results += [str(out / n) for n in ("dataset_description.json", ".bidsignore", resume.LOCK_NAME)]
    if report_out:
        _check_report(report_out, inputs + results)
    say = log(quiet)
    out.mkdir(parents=True, exist_ok=True)
    with resume.results_lock(out, on_wait=lambda owner: say(f"waiting for the batch already writing to {out} "
                                                            f"({owner})")):
        for stale in stale_temp_files(out):  # under the lock: their writer is gone
            stale.unlink()
        resume.write_description(out, rootp)
        if (out / resume.OLD_SUMMARY).is_file():
            say(f"note: {out / resume.OLD_SUMMARY} was written by an earlier regkl (the summary is now in logs/); "
                "pybids cannot index the results folder while it is there: remove it")
        if not moving_glob:
            resume.write_bidsignore(out, ignore_patterns(suffix_list))
        todo, done_rows = [], {}
        for job in jobs:
            record = None if force else resume.read_record(job)
            reason = resume.stale_reason(job, record)
            if record is not None and record.get("status") == "ok" and reason is None:
                done_rows[job.moving_rel] = resume.skipped_row(job, record)
                continue
            if reason:  # not progress: said even with --quiet
                click.echo(f"regkl: redo {job.moving_rel}: {reason}", err=True)
                job.paths.record.unlink(missing_ok=True)  # its outputs no longer match: not complete
            todo.append(job)
        say(f"{len(jobs)} pairs, {len(done_rows)} already complete, {len(todo)} to run")
        progress = _Progress(len(todo), quiet)
        if not todo:
            rows = []
        elif dask_scheduler:
            rows = batch.run_dask(todo, dask_scheduler, progress=progress)
        else:
            cores = os.cpu_count() or 1
            rows = batch.run_local(todo, n_jobs=max(1, min(n_jobs or cores, len(todo))), progress=progress)
        by_moving = {j.moving_rel: r for j, r in zip(todo, rows)}
        all_rows = [by_moving.get(j.moving_rel) or done_rows[j.moving_rel] for j in jobs]
        tsv, _ = resume.write_summary(all_rows, out)
        page = write_report(report_rows(all_rows, out, rootp), report_out or out / "regkl_report.html",
                            title=f"regkl batch report: {rootp.name}", source=f"results in {out}",
                            protect=inputs + results)
    failed = sum(r["status"] == "failed" for r in all_rows)
    say(f"{len(all_rows) - failed} of {len(all_rows)} pairs ok; summary: {tsv}; report: {page}")
    if as_json:
        click.echo(json.dumps(all_rows, indent=2))
    if failed:
        sys.exit(1)


def _check_report(path, protect):
    """The report must be an .html file that is none of the batch's inputs or results."""
    from ..errors import OutputError

    check_output(path, protect)
    if Path(path).suffix.lower() not in (".html", ".htm"):
        raise OutputError("the report is an HTML page: give a name ending in .html", path=path)
