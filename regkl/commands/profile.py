"""`regkl profile`: the metric along each rigid parameter around a pose."""

from __future__ import annotations

import json
import os

import click
import numpy as np

from ._common import (BINS, METRIC, SEED, VolumeChoice, check_output, check_picture_output, format_option, load_prior,
                      log, naming, pair_label)


@click.command("profile")
@click.argument("moving", type=click.Path(dir_okay=True))
@click.argument("fixed", type=click.Path(dir_okay=True))
@click.option("--transform", type=click.Path(dir_okay=False), help="Pose to profile (fixed->moving; ITK or RAS "
              "file, e.g. from register --transform-out) [default: the headers as they are].")
@format_option("--transform-format", help_text="Format of --transform when its content and suffix do not say.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="PNG with the six curves.")
@click.option("--metric", default="mi", show_default=True, type=METRIC, help="As for register (kl needs --prior).")
@click.option("--prior", type=click.Path(dir_okay=False), help="Prior for --metric kl.")
@click.option("--bins", default=24, show_default=True, type=BINS, help="Histogram bins (8 to 512).")
@click.option("--sampling", default=1.0, show_default=True, type=float,
              help="Fraction of the finest level's fixed grid points used.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the point sampling.")
@click.option("--range-deg", default=20.0, show_default=True, type=float, help="Rotations from -R to +R degrees.")
@click.option("--range-mm", default=20.0, show_default=True, type=float, help="Shifts from -R to +R mm.")
@click.option("--steps", default=20, show_default=True, type=int, help="Points on each side of the pose.")
@click.option("--fixed-mask", type=click.Path(dir_okay=False), help="As for register.")
@click.option("--moving-mask", type=click.Path(dir_okay=False), help="As for register.")
@click.option("--auto-mask", is_flag=True, help="As for register.")
@click.option("--moving-volume", default="mean", show_default=True, type=VolumeChoice(), help="4D reduction: mean, median or N.")
@click.option("--json", "as_json", is_flag=True, help="Print the curves as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages on stderr.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def profile_cmd(moving, fixed, transform, fmt, output, metric, prior, bins, sampling, seed, range_deg, range_mm, steps,
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
    from ..io import load_volume
    from ..landscape import PARAMETERS, check_settings, plot_profile, profile_metric
    from ..xfm import read_transform

    say = log(quiet)
    check_settings(range_deg, range_mm, steps)
    if not 0.0 < sampling <= 1.0:
        raise click.BadParameter(f"must be in (0, 1], got {sampling:g}", param_hint="--sampling")
    prior_table = load_prior(metric, prior, bins)
    inputs = tuple(p for p in (moving, fixed, transform, fixed_mask, moving_mask, prior) if p)
    check_output(output, inputs)
    volume = moving_volume  # converted by VolumeChoice
    if fmt is not None and transform is None:
        raise click.UsageError("--transform-format needs --transform")
    transform_file = None if transform is None else read_transform(transform, fmt, option="--transform-format")
    if output:
        check_picture_output(output)
    fixed_vol = load_volume(fixed, volume="mean")
    moving_vol = load_volume(moving, volume=volume)
    pose = np.eye(4) if transform_file is None else transform_file.fixed2moving(fixed_vol, moving_vol)
    fixed_mask_vol = None if fixed_mask is None else load_volume(fixed_mask, allow_constant=True)
    moving_mask_vol = None if moving_mask is None else load_volume(moving_mask, allow_constant=True)
    say(f"{6 * 2 * steps + 1} evaluations of {metric}")
    with naming(pair_label(moving, fixed, transform)):
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
