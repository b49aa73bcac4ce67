"""`regkl register`: one moving image onto one fixed image."""

from __future__ import annotations

import json
import os
import sys
import time

import click
import numpy as np

from .. import __version__
from ..errors import InputError, RegklError
from ._common import (BINS, LEVELS, MAX_ITER, MAX_POINTS, MAX_SECONDS, METRIC, MODEL, POSITIVE, SAMPLING, SEED, FillValue,
                      VolumeChoice, echo_err,
                      check_output, check_picture_output, format_option, load_prior, log, naming, pair_label,
                      set_threads, warm_kernels_in_background)


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



@click.command(epilog=EXAMPLES)
@click.argument("moving", type=click.Path(dir_okay=True))
@click.argument("fixed", type=click.Path(dir_okay=True))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Moving image resampled on the fixed grid.")
@click.option("--transform-out", type=click.Path(dir_okay=False),
              help="The transform, in the format its suffix names: .tfm/.txt (ITK text), .h5 (ITK), .lta "
                   "(FreeSurfer), .aff12.1D (AFNI); .mat needs --transform-format itk or fsl.")
@format_option("--transform-format", help_text="Format of --transform-out: itk, fsl (FLIRT: input = MOVING, "
               "reference = FIXED), afni, lta or ras [default: from the suffix].")
@click.option("--matrix-out", type=click.Path(dir_okay=False), help="4x4 RAS+ fixed->moving matrix (regkl's "
              "text with its convention in '#' lines; .txt).")
@click.option("--init-transform", type=click.Path(dir_okay=False), help="Start from this transform (fixed->moving, "
              "any format --transform-out writes, e.g. FLIRT -init or ANTs --initial-moving-transform); the "
              "global search is then off unless --search is given.")
@format_option("--init-format", dest="init_fmt", help_text="Format of --init-transform when its content and "
               "suffix do not say (a bare 4x4 matrix: fsl or ras).")
@click.option("--qc", "qc_out", type=click.Path(dir_okay=False), help="QC picture (PNG): edges, reverse edges, "
              "checkerboard in three views.")
@click.option("--model", default="rigid", show_default=True, type=MODEL,
              help="Transform model: translation, rigid, similarity (rigid + scale), affine; similarity and "
                   "affine run a rigid stage first.")
@click.option("--metric", default="mi", show_default=True, type=METRIC,
              help="Similarity metric: mi (mutual information), nmi (normalised MI), cr (correlation ratio), "
                   "jsd (Jensen-Shannon), kl (KL divergence to a learned prior; needs --prior).")
@click.option("--prior", type=click.Path(dir_okay=False), help="Prior joint histogram for --metric kl "
              "(from regkl learn-prior).")
@click.option("--bins", default=24, show_default=True, type=BINS, help="Histogram bins (8 to 512).")
@click.option("--sampling", default=0.5, show_default=True, type=SAMPLING,
              help="Fraction of fixed grid points used at each level (a seeded random subset, jittered).")
@click.option("--max-points", type=MAX_POINTS, default=None, help="Most fixed sample points per level; 0 for no cap "
              "[default: 150000: the error stops improving well below it].")
@click.option("--levels", type=LEVELS, default=None, help="Pyramid levels [default: from voxel sizes].")
@click.option("--init", "init", type=click.Choice(["com", "geometry", "header"]), default=None,
              help="Start: align centres of mass, grid centres, or trust the headers [default: com].")
@click.option("--search", type=click.Choice(["none", "auto", "full"]), default=None,
              help="Global rotation/translation search at the coarsest level (rotations up to 90 degrees); "
                   "auto keeps the start unless a searched pose is clearly better [default: auto; none "
                   "with --init-transform].")
@click.option("--fixed-mask", type=click.Path(dir_okay=False), help="Only fixed-image points inside this mask "
              "(any grid) count.")
@click.option("--moving-mask", type=click.Path(dir_okay=False), help="Only points mapping inside this mask "
              "(any grid, on the moving image's world) count.")
@click.option("--auto-mask", is_flag=True, help="Build head/brain masks from the images where no mask is given "
              "(neck, eyes and background then do not steer the result). A mask that fails its sanity check is "
              "not used, and an answer the whole images contradict is replaced by the unmasked one (warning).")
@click.option("--moving-volume", default="mean", show_default=True, type=VolumeChoice(extra=("realigned",)),
              help="4D moving image reduced by mean, median, a volume index N (0-based), or realigned: the "
                   "median of the motion-corrected steady-state volumes (as regkl realign's boldref).")
@click.option("--interp", type=click.Choice(["nearest", "linear", "cubic"]), default="linear",
              show_default=True, help="Interpolation of the output image.")
@click.option("--fill", default=0.0, show_default=True, type=FillValue(),
              help="Output value where the fixed grid falls outside the moving image or on its NaN (no-data) "
                   "voxels (e.g. -1024 for CT in Hounsfield units; ANTs --default-value).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the point sampling.")
@click.option("--max-iter", default=100, show_default=True, type=MAX_ITER, help="Optimiser iterations per level.")
@click.option("--max-seconds", default=600.0, show_default=True, type=MAX_SECONDS,
              help="Time limit: past it the registration stops with exit code 1.")
@click.option("--threads", type=POSITIVE, default=None, help="Numba threads [default: all cores or NUMBA_NUM_THREADS].")
@click.option("--confidence", is_flag=True, help="Assess the result without ground truth (restart drift and "
              "agreement, optimum sharpness, MI/entropy): score and suspect flag in --json and on stderr.")
@click.option("--fail-on-suspect", is_flag=True, help="Exit with code 1 when the result is flagged suspect "
              "(implies --confidence; outputs are still written for inspection).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages on stderr.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def register(moving, fixed, output, transform_out, fmt, matrix_out, init_transform, init_fmt, qc_out, model, metric,
             prior, bins, sampling, max_points, levels, init, search, fixed_mask, moving_mask, auto_mask,
             moving_volume, interp, fill, seed, max_iter, max_seconds, threads, confidence, fail_on_suspect, as_json,
             quiet, debug):
    """Register MOVING (e.g. an EPI, 3D or 4D) to FIXED (e.g. a T1).

    Writes the moving image resampled on the fixed grid (-o), the transform (--transform-out: ITK,
    FSL, AFNI or LTA) and/or regkl's RAS matrix (--matrix-out). Without --json, the 4x4 RAS
    fixed->moving matrix is printed on stdout.
    """
    # only what the checks and the reading need: Numba and SciPy load while the images are read
    from ..io import load_volume
    from ..xfm import output_format, read_transform, save_transform, transform_text

    t0 = time.perf_counter()
    say = log(quiet)
    set_threads(threads)
    if as_json and "-" in (transform_out, matrix_out):
        raise RegklError("--json and a '-' (stdout) transform output cannot share stdout")
    if init is not None and init_transform is not None:
        raise click.UsageError("--init and --init-transform both set the start; give one")
    if init_fmt is not None and init_transform is None:
        raise click.UsageError("--init-format needs --init-transform")
    if fmt is not None and transform_out is None:
        raise click.UsageError("--transform-format needs --transform-out")
    search = search or ("none" if init_transform else "auto")
    volume = moving_volume  # mean, median, realigned or an int: VolumeChoice converted it
    prior_table = load_prior(metric, prior, bins)
    inputs = tuple(p for p in (moving, fixed, fixed_mask, moving_mask, prior, init_transform) if p)
    for out in (output, transform_out, matrix_out, qc_out):
        check_output(out, inputs)
    transform_fmt = output_format(transform_out, fmt) if transform_out else None
    if matrix_out:
        output_format(matrix_out, "ras", option="--matrix-out")
    start = None if init_transform is None else read_transform(init_transform, init_fmt, option="--init-format")
    if output:
        from ..writers import check_image_output

        check_image_output(output, protect=inputs)
    if qc_out:
        check_picture_output(qc_out)
    warm = warm_kernels_in_background()
    fixed_vol = load_volume(fixed, volume="mean")
    if moving_volume == "realigned":
        import numba

        from ..realign_files import realigned_reference

        moving_vol = realigned_reference(moving, threads=numba.get_num_threads(), log=say)
    else:
        moving_vol = load_volume(moving, volume=volume)
    fixed_mask_vol = None if fixed_mask is None else load_volume(fixed_mask, allow_constant=True)
    moving_mask_vol = None if moving_mask is None else load_volume(moving_mask, allow_constant=True)
    warm.join()
    from ..optimize import MAX_POINTS, register as run_register
    from ..resample import resample
    from ..writers import save_volume
    from ..itk_placement import check_itk_placement

    if transform_fmt == "itk":
        check_itk_placement((fixed_vol, moving_vol), "write --transform-out in ITK format",
                            "write another format (--transform-format fsl, lta or ras)")
    if moving_vol.note:
        say(f"moving reference: {moving_vol.note}")
    init_matrix = None if start is None else start.fixed2moving(fixed_vol, moving_vol)
    if init_matrix is not None and np.linalg.det(init_matrix[:3, :3]) < 0:
        raise InputError("the starting transform mirrors the image (negative determinant): no rigid, similarity "
                         "or staged affine registration can start from a reflection; check which convention "
                         "the file is in (--init-format) or flip the image's header instead", path=init_transform)
    with naming(pair_label(moving, fixed)):
        result = run_register(moving_vol, fixed_vol, model=model, metric=metric, prior=prior_table, bins=bins,
                              sampling=sampling, max_points=MAX_POINTS if max_points is None else (max_points or None),
                              levels=levels, init=init or "com", init_fixed2moving=init_matrix,
                              search=search, fixed_mask=fixed_mask_vol, moving_mask=moving_mask_vol,
                              auto_mask=auto_mask, seed=seed, max_iter=max_iter, max_seconds=max_seconds,
                              confidence=confidence or fail_on_suspect, log=say)
    from ..outputs import output_group

    printed = False
    with output_group():  # all outputs or none
        for path, path_fmt in ((transform_out, transform_fmt), (matrix_out, "ras")):
            if path == "-":
                printed = True
            elif path:
                save_transform(path, result.fixed2moving, path_fmt, fixed=fixed_vol, moving=moving_vol,
                               protect=inputs)
        if output or qc_out:
            registered = resample(moving_vol, fixed_vol, result.fixed2moving, interp=interp, fill=fill)
        if output:
            save_volume(registered, output, like=fixed_vol, protect=inputs)
        if qc_out:
            _write_qc(fixed_vol, registered, qc_out, moving, fixed, metric, result)
    for path, path_fmt in ((transform_out, transform_fmt), (matrix_out, "ras")):
        if path == "-":
            click.echo(transform_text(result.fixed2moving, path_fmt, fixed=fixed_vol, moving=moving_vol), nl=False)
    elapsed = time.perf_counter() - t0
    say(f"{metric} {result.metric_before:.4f} -> {result.metric_after:.4f} in {elapsed:.2f} s")
    if as_json:
        if printed:
            raise RegklError("--json and a '-' (stdout) transform output cannot share stdout")
        click.echo(json.dumps({**summary(result, moving_vol, fixed_vol, output, transform_out, matrix_out, elapsed),
                               "transform_format": transform_fmt, "init_transform": init_transform},
                              indent=2))
    elif not printed:
        for row in result.fixed2moving:
            click.echo(" ".join(f"{v: .8f}" for v in row))
    if fail_on_suspect and result.confidence.suspect:
        echo_err(f"regkl: error: {moving}: registration flagged suspect (confidence "
                 f"{result.confidence.score:.2f}); see --json evidence or --qc")
        sys.exit(1)


def _write_qc(fixed_vol, registered, path, moving, fixed, metric, result):
    from ..qc import qc_figure

    qc_figure(fixed_vol, registered, path,
              title=f"{os.path.basename(moving)} -> {os.path.basename(fixed)}   {metric} "
                    f"{result.metric_before:.3f} -> {result.metric_after:.3f}   {result.model}"
                    + ("" if result.confidence is None else
                       f"   confidence {result.confidence.score:.2f}"
                       f"{' SUSPECT' if result.confidence.suspect else ''}"))



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
            "rotation_from_start_deg": result.search.rotation_deg, "seconds": round(result.search.seconds, 4),
            "local_evaluations": result.search.local_evaluations},
        "metric_before": result.metric_before, "metric_after": result.metric_after,
        "metric_decreased": result.metric_decreased,
        "parameters": {"values": params.tolist(), "centre_ras_mm": np.asarray(result.centre).tolist(), **named},
        "fixed2moving_ras": np.asarray(result.fixed2moving).tolist(),
        "levels": [{"stage": lv.stage, "spacing_mm": lv.spacing_mm, "points": lv.n_points, "iterations": lv.iterations,
                    "evaluations": lv.evaluations, "metric_start": lv.metric_start, "metric_end": lv.metric_end,
                    "metric_initial": lv.metric_initial, "metric_decreased": lv.metric_decreased,
                    "stop": lv.stop_reason,
                    "last_step_mm": None if lv.last_step_mm is None else round(lv.last_step_mm, 6),
                    "seconds": round(lv.seconds, 4)} for lv in result.levels],
        "confidence": None if result.confidence is None else result.confidence.as_dict(),
        "settings": result.settings,
        "registration_seconds": round(result.seconds, 4),
        "total_seconds": round(seconds, 4),
    }
