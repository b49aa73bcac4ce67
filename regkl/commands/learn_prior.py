"""`regkl learn-prior`: the expected joint histogram of aligned pairs (for --metric kl)."""

from __future__ import annotations

import json

import click

from .. import __version__
from ._common import BINS, VolumeChoice, check_output, format_option, log, naming


@click.command("learn-prior")
@click.argument("pairs", nargs=-1, required=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Prior file (.npz).")
@click.option("--bins", default=24, show_default=True, type=BINS, help="Histogram bins (use the same to register).")
@click.option("--moving-volume", default="mean", show_default=True, type=VolumeChoice(), help="4D reduction: mean, median or N.")
@format_option("--transform-format", help_text="Format of the pairs' TRANSFORM files when their content and suffix "
               "do not say (a bare 4x4 matrix: fsl or ras).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages on stderr.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def learn_prior_cmd(pairs, output, bins, moving_volume, fmt, as_json, quiet, debug):
    """Learn the expected joint histogram of ALIGNED pairs, for --metric kl.

    Each PAIR is MOVING,FIXED (the headers already align them) or MOVING,FIXED,TRANSFORM (a
    transform file that aligns them, fixed->moving, any format `regkl apply` reads).

    \b
    Example:
      regkl learn-prior s1_bold.nii.gz,s1_T1w.nii.gz s2_bold.nii.gz,s2_T1w.nii.gz,s2.tfm -o prior.npz
      regkl register s3_bold.nii.gz s3_T1w.nii.gz --metric kl --prior prior.npz -o out.nii.gz
    """
    from ..errors import InputError
    from ..io import load_volume
    from ..metrics import save_prior
    from ..probe import learn_prior
    from ..xfm import read_transform

    say = log(quiet)
    volume = moving_volume  # converted by VolumeChoice
    check_output(output, [q for p in pairs for q in p.split(",") if q])
    split = [pair.split(",") for pair in pairs]
    for pair, parts in zip(pairs, split):
        if len(parts) not in (2, 3) or not all(part.strip() for part in parts):
            raise InputError(f"a pair is MOVING,FIXED or MOVING,FIXED,TRANSFORM (no empty part), got {pair!r}")
    transforms = [read_transform(parts[2], fmt, option="--transform-format") if len(parts) == 3 else None
                  for parts in split]  # every transform file checked before any image is read
    loaded = []
    for parts, transform_file in zip(split, transforms):
        moving, fixed = load_volume(parts[0], volume=volume), load_volume(parts[1])
        loaded.append((moving, fixed, None if transform_file is None else transform_file.fixed2moving(fixed, moving)))
        say(f"pair {len(loaded)}: {parts[0]} -> {parts[1]}")
    with naming(", ".join(pairs)):
        prior = learn_prior(loaded, bins=bins)
    meta = {"pairs": list(pairs), "regkl_version": __version__}
    save_prior(output, prior, bins=bins, meta=meta)
    if as_json:
        click.echo(json.dumps({"output": output, "bins": bins, "pairs": len(loaded)}))
