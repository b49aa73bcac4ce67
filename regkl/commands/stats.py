"""`regkl stats`: intensity entropy and contrast of one image."""

from __future__ import annotations

import json

import click
import numpy as np

from ..stats import MAX_BINS
from ._common import naming


@click.command("stats")
@click.argument("image", type=click.Path(dir_okay=True))
@click.option("--bins", default=64, show_default=True, type=click.IntRange(2, MAX_BINS),
              help=f"Histogram bins (2 to {MAX_BINS}).")
@click.option("--mask", type=click.Path(dir_okay=False), help="Only voxels inside this mask (same grid).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of one line per value.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def stats_cmd(image, bins, mask, as_json, debug):
    """Intensity entropy of IMAGE and the KL divergence of its histogram from uniform (contrast).

    One 'name<TAB>value' line each, or JSON with --json.
    """
    from ..io import load_volume
    from ..stats import image_stats

    vol = load_volume(image)
    mask_data = None
    if mask is not None:
        from ..errors import InputError

        mvol = load_volume(mask, allow_constant=True)
        if mvol.shape != vol.shape:
            raise InputError(f"mask shape {mvol.shape} differs from the image's {vol.shape}", path=mask)
        mask_data = mvol.data > 0
    with naming(image if mask is None else f"{image} in {mask}"):
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
