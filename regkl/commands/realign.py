"""`regkl realign`: head-motion correction of a 4D series."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import click

from ._common import (POSITIVE, SAMPLING, SEED, check_output, check_picture_output, log, set_threads, volume_option)

EXAMPLES = """
\b
Examples:
  # motion parameters, per-volume transforms and boldref next to sub-01_bold_*
  regkl realign sub-01_bold.nii.gz
\b
  # also the realigned series, the MCFLIRT-style .par and the motion-trace picture
  regkl realign bold.nii.gz -o bold_realigned.nii.gz --par bold.par --qc motion.png
"""


def _stem(path) -> str:
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".mgz", ".nrrd", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


@click.command("realign", epilog=EXAMPLES)
@click.argument("series", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Realigned series (4D NIfTI), one resampling.")
@click.option("--prefix", help="Prefix of the default output names [default: the series' name, in the current "
              "folder]: PREFIX_motion.tsv, PREFIX_hmc_xfm.txt, PREFIX_boldref.nii.gz.")
@click.option("--confounds", type=click.Path(dir_okay=False), help="Motion parameters TSV (fMRIPrep names: trans_* "
              "mm, rot_* radians, framewise_displacement mm).")
@click.option("--xfm", type=click.Path(dir_okay=False), help="ITK text file, one transform per volume (LPS, "
              "reference -> volume), as nitransforms and fMRIPrep's desc-hmc_xfm.")
@click.option("--boldref", type=click.Path(dir_okay=False), help="Reference volume: median of the realigned "
              "steady-state volumes.")
@click.option("--par", type=click.Path(dir_okay=False), help="Also the parameters in FSL MCFLIRT's .par layout.")
@click.option("--qc", "qc_out", type=click.Path(dir_okay=False), help="PNG of the motion traces.")
@click.option("--reference", default="auto", show_default=True,
              help="Target: auto (the steady-state volume most like the series mean), mean, median, a volume "
                   "index N (0-based) or a 3D image FILE.")
@click.option("--cost", type=click.Choice(["nc", "ls", "mi"]), default="nc", show_default=True,
              help="Normalised correlation, least squares or mutual information.")
@click.option("--two-pass", is_flag=True, help="Register again to the mean of the realigned series (MCFLIRT "
              "-meanvol, SPM).")
@click.option("--interp", type=click.Choice(["nearest", "linear", "cubic"]), default="linear", show_default=True,
              help="Interpolation of the realigned series.")
@click.option("--sampling", default=0.125, show_default=True, type=SAMPLING,  # regkl.realign.SAMPLING
              help="Fraction of the reference's grid points sampled at each level (inside its head mask).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the point sampling.")
@click.option("--threads", type=POSITIVE, default=None, help="Threads [default: all cores or NUMBA_NUM_THREADS]; the "
              "result does not depend on it.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages on stderr.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def realign_cmd(series, output, prefix, confounds, xfm, boldref, par, qc_out, reference, cost, two_pass, interp,
                sampling, seed, threads, as_json, quiet, debug):
    """Correct head motion in SERIES (4D): rigid registration of every volume to one reference.

    Parameters are about the reference's grid centre, in RAS+ mm and radians; transforms map
    reference world points to volume world points.
    """
    import numba

    from ..realign_files import realign_file

    t0 = time.perf_counter()
    say = log(quiet)
    set_threads(threads)
    if prefix is not None and (prefix.endswith(("/", os.sep)) or os.path.isdir(prefix)):
        prefix = os.path.join(prefix, _stem(series))  # a folder: the series' name inside it
    base = prefix if prefix is not None else _stem(series)
    confounds = confounds or f"{base}_motion.tsv"
    xfm_optional = xfm is None  # the default name: skipped (with a warning) where ITK would misplace it
    xfm = xfm or f"{base}_hmc_xfm.txt"
    boldref = boldref or f"{base}_boldref.nii.gz"
    if not reference.strip():
        raise click.BadParameter("must not be empty: auto, mean, median, a volume index or an image file",
                                 param_hint="--reference")
    reference = volume_option(reference)
    if isinstance(reference, int) and reference < 0:
        raise click.BadParameter(f"{reference}: volume indices count from 0 (the first volume)",
                                 param_hint="--reference")
    inputs = (series,) + ((reference,) if isinstance(reference, str) and reference not in
                          ("auto", "mean", "median") else ())
    if prefix is not None and not prefix.strip():
        raise click.BadParameter("must not be empty", param_hint="--prefix")
    seen = set()
    for p in filter(None, (output, confounds, xfm, boldref, par, qc_out)):
        if os.path.abspath(p) in seen:
            raise click.UsageError(f"{p}: two outputs name the same file; give each output its own name")
        seen.add(os.path.abspath(p))
    for out in (output, confounds, xfm, boldref, par, qc_out):
        check_output(out, inputs)
    for out, option, suffixes in ((confounds, "--confounds", (".tsv",)), (xfm, "--xfm", (".txt", ".tfm")),
                                  (par, "--par", (".par",))):
        if out and not out.lower().endswith(suffixes):
            raise click.BadParameter(f"{out!r}: this file is written as {' or '.join(suffixes)} text; name it so",
                                     param_hint=option)
    from ..writers import check_image_output

    for out, ndim in ((output, 4), (boldref, 3)):
        if out:
            check_image_output(out, protect=inputs, ndim=ndim)
    if qc_out:
        check_picture_output(qc_out)
    result = realign_file(series, confounds=confounds, xfm=xfm, boldref=boldref, par=par, realigned=output,
                          interp=interp, qc=qc_out, log=say, reference=reference, cost=cost, two_pass=two_pass,
                          sampling=sampling, seed=seed, threads=numba.get_num_threads(),
                          xfm_optional=xfm_optional)
    fd = result.framewise_displacement
    elapsed = time.perf_counter() - t0
    say(f"{len(fd)} volumes, reference {result.reference.note}; mean FD {float(fd[1:].mean()):.3f} mm, max "
        f"{float(fd[1:].max()):.3f} mm; {result.n_non_steady} non-steady-state volume(s); {elapsed:.2f} s")
    if as_json:
        click.echo(json.dumps({
            "series": series, "volumes": len(fd), "reference": result.reference.note,
            "centre_ras_mm": result.centre.tolist(), "cost": result.cost,
            "non_steady_volumes": result.n_non_steady,
            "flags": {str(t): f for t, f in enumerate(result.flags) if f},
            "mean_fd_mm": float(fd[1:].mean()), "max_fd_mm": float(fd[1:].max()),
            "outputs": {"confounds": confounds, "xfm": result.settings.get("xfm_file"), "boldref": boldref, "par": par, "realigned": output,
                        "qc": qc_out},
            "settings": result.settings, "seconds": round(elapsed, 4)}, indent=2))
