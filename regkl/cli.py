"""Command-line interface. Parses, calls one library function, writes; nothing else.

Exit codes: 0 success, 1 registration failed, 2 bad usage or bad input/output, 3 internal error.
Results go to stdout; progress, warnings and errors to stderr.
"""

from __future__ import annotations

import json
import sys
import time
import warnings

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
@click.option("--model", default="rigid", show_default=True, help="Transform model: rigid, translation.")
@click.option("--metric", default="mi", show_default=True, help="Similarity metric: mi.")
@click.option("--bins", default=24, show_default=True, type=int, help="Histogram bins.")
@click.option("--sampling", default=0.5, show_default=True, type=float,
              help="Fraction of fixed grid points used at each level (regular grid, seeded jitter).")
@click.option("--levels", type=int, default=None, help="Pyramid levels [default: from voxel sizes].")
@click.option("--init", "init", type=click.Choice(["com", "geometry", "header"]), default="com",
              show_default=True, help="Start: align centres of mass, grid centres, or trust the headers.")
@click.option("--moving-volume", default="mean", show_default=True,
              help="4D moving image reduced by mean, median or a volume index N (0-based).")
@click.option("--interp", type=click.Choice(["nearest", "linear", "cubic"]), default="linear",
              show_default=True, help="Interpolation of the output image.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the point sampling.")
@click.option("--max-iter", default=100, show_default=True, type=int, help="Optimiser iterations per level.")
@click.option("--threads", type=int, default=None, help="Numba threads [default: all cores or NUMBA_NUM_THREADS].")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages on stderr.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def register(moving, fixed, output, transform_out, matrix_out, model, metric, bins, sampling, levels, init,
             moving_volume, interp, seed, max_iter, threads, as_json, quiet, debug):
    """Register MOVING (e.g. an EPI, 3D or 4D) to FIXED (e.g. a T1).

    Writes the moving image resampled on the fixed grid (-o), the transform as an ITK file
    (--transform-out) and/or a RAS matrix (--matrix-out). Without --json, the 4x4 RAS
    fixed->moving matrix is printed on stdout.
    """
    from .io import load_volume, save_volume
    from .optimize import register as run_register
    from .resample import resample
    from .xfm import save_transform

    t0 = time.perf_counter()
    say = _log(quiet)
    if threads is not None:
        import numba

        if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
            raise click.BadParameter(f"must be 1..{numba.config.NUMBA_NUM_THREADS}", param_hint="--threads")
        numba.set_num_threads(threads)
    inputs = (moving, fixed)
    for out in (output, transform_out, matrix_out):
        _check_output(out, inputs)
    warm = _warm_kernels_in_background()
    fixed_vol = load_volume(fixed, volume="mean")
    moving_vol = load_volume(moving, volume=_volume_option(moving_volume))
    warm.join()
    if moving_vol.note:
        say(f"moving reference: {moving_vol.note}")
    result = run_register(moving_vol, fixed_vol, model=model, metric=metric, bins=bins, sampling=sampling,
                          levels=levels, init=init, seed=seed, max_iter=max_iter, log=say)
    if transform_out:
        save_transform(transform_out, result.fixed2moving, "itk", protect=inputs)
    if matrix_out:
        save_transform(matrix_out, result.fixed2moving, "ras", protect=inputs)
    if output:
        save_volume(resample(moving_vol, fixed_vol, result.fixed2moving, interp=interp), output,
                    like=fixed_vol, protect=inputs)
    elapsed = time.perf_counter() - t0
    say(f"{metric} {result.metric_before:.4f} -> {result.metric_after:.4f} in {elapsed:.2f} s")
    if as_json:
        click.echo(json.dumps(summary(result, moving_vol, fixed_vol, output, transform_out, matrix_out,
                                      elapsed), indent=2))
    else:
        for row in result.fixed2moving:
            click.echo(" ".join(f"{v: .8f}" for v in row))


def _warm_kernels_in_background():
    """Start loading the compiled kernels while the images are read (both release the GIL)."""
    import threading

    from .kernels import warm_up

    thread = threading.Thread(target=warm_up, name="regkl-warm-up", daemon=True)
    thread.start()
    return thread


def _check_output(path, inputs):
    import os

    if path is None:
        return
    for inp in inputs:
        if os.path.abspath(path) == os.path.abspath(inp) or (
                os.path.exists(path) and os.path.exists(inp) and os.path.samefile(path, inp)):
            raise RegklError("output would overwrite an input", path=path)


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
        "model": result.model, "metric": result.metric, "init": result.init,
        "metric_before": result.metric_before, "metric_after": result.metric_after,
        "parameters": {"values": params.tolist(), "centre_ras_mm": np.asarray(result.centre).tolist(), **named},
        "fixed2moving_ras": np.asarray(result.fixed2moving).tolist(),
        "levels": [{"spacing_mm": lv.spacing_mm, "points": lv.n_points, "iterations": lv.iterations,
                    "evaluations": lv.evaluations, "metric_start": lv.metric_start, "metric_end": lv.metric_end,
                    "stop": lv.stop_reason, "seconds": round(lv.seconds, 4)} for lv in result.levels],
        "settings": result.settings,
        "registration_seconds": round(result.seconds, 4),
        "total_seconds": round(seconds, 4),
    }


def main(argv=None):
    """Console entry point: runs the Click group and maps errors to one line and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if not debug:
        warnings.showwarning = lambda msg, *a, **k: click.echo(f"regkl: warning: {msg}", err=True)
    try:
        cli.main(args=argv, prog_name="regkl", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("regkl: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
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


if __name__ == "__main__":
    main()
