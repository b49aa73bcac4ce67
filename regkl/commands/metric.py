"""`regkl metric`: similarity of two images at a pose."""

from __future__ import annotations

import json

import click

from ._common import BINS, METRICS, VolumeChoice, format_option, load_prior, naming, pair_label


@click.command("metric")
@click.argument("moving", type=click.Path(dir_okay=True))
@click.argument("fixed", type=click.Path(dir_okay=True))
@click.option("--metric", "metric_list", default="mi", show_default=True, type=METRICS,
              help="Metric name, or several separated by commas (mi, nmi, cr, jsd, kl).")
@click.option("--transform", type=click.Path(dir_okay=False), help="Transform to apply first (fixed->moving; "
              "any file `apply` reads); default: the headers as they are.")
@format_option("--transform-format", help_text="Format of --transform when its content and suffix do not say.")
@click.option("--prior", type=click.Path(dir_okay=False), help="Prior for kl.")
@click.option("--bins", default=24, show_default=True, type=BINS, help="Histogram bins (8 to 512).")
@click.option("--moving-volume", default="mean", show_default=True, type=VolumeChoice(), help="4D reduction: mean, median or N.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of one line per metric.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def metric_cmd(moving, fixed, metric_list, transform, fmt, prior, bins, moving_volume, as_json, debug):
    """Similarity of MOVING and FIXED in world space (higher is more similar).

    Prints one line per metric: NAME VALUE (and the overlap fraction), or JSON with --json.
    """
    from ..io import load_volume
    from ..probe import evaluate_metric
    from ..xfm import read_transform

    names = metric_list.split(",")  # checked against the registry by the option type
    volume = moving_volume  # converted by VolumeChoice
    if fmt is not None and transform is None:
        raise click.UsageError("--transform-format needs --transform")
    transform_file = None if transform is None else read_transform(transform, fmt, option="--transform-format")
    priors = {name: load_prior(name, prior if name == "kl" else None, bins) for name in names}
    fixed_vol = load_volume(fixed)
    moving_vol = load_volume(moving, volume=volume)
    m = None if transform_file is None else transform_file.fixed2moving(fixed_vol, moving_vol)
    out = {}
    for name in names:
        with naming(pair_label(moving, fixed, transform)):
            value, overlap = evaluate_metric(moving_vol, fixed_vol, m, metric=name, bins=bins, prior=priors[name])
        out[name] = value
    if as_json:
        click.echo(json.dumps({"moving": moving, "fixed": fixed, "transform": transform, "overlap": overlap,
                               "metrics": out}))
    else:
        for name, value in out.items():
            click.echo(f"{name}\t{value:.6f}")
        click.echo(f"overlap\t{overlap:.4f}")
