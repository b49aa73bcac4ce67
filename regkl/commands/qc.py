"""`regkl qc`: the QC picture of a registered image against the fixed image."""

from __future__ import annotations

import os

import click

from ._common import check_output, check_picture_output, naming


@click.command("qc")
@click.argument("fixed", type=click.Path(dir_okay=True))
@click.argument("registered", type=click.Path(dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--title", default=None, help="Title [default: the file names].")
@click.option("--slices", default=5, show_default=True, type=click.IntRange(1, 20), help="Slices per view (1 to 20).")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def qc_cmd(fixed, registered, output, title, slices, debug):
    """QC picture of REGISTERED (on FIXED's grid, e.g. regkl register -o) against FIXED.

    Rows: the registered image with the fixed image's edges (red), the reverse, and a
    checkerboard of the two; axial, coronal and sagittal views at several slices.
    """
    from ..io import load_volume
    from ..qc import qc_figure

    check_output(output, (fixed, registered))
    check_picture_output(output)
    fixed_vol = load_volume(fixed)
    reg_vol = load_volume(registered, volume=0)
    with naming(f"{registered} on {fixed}"):
        qc_figure(fixed_vol, reg_vol, output, n_slices=slices,
                  title=title or f"{os.path.basename(registered)} on {os.path.basename(fixed)}")
