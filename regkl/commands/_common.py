"""Helpers shared by the command modules: logging, option parsing, output checks."""

from __future__ import annotations

import click


def log(quiet):
    def say(msg):
        if not quiet:
            click.echo(f"regkl: {msg}", err=True)
    return say


def volume_option(value):
    return int(value) if value.lstrip("-").isdigit() else value


def set_threads(threads):
    if threads is None:
        return
    import numba

    if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        raise click.BadParameter(f"must be 1..{numba.config.NUMBA_NUM_THREADS}", param_hint="--threads")
    numba.set_num_threads(threads)


def load_prior(metric, prior, bins):
    """The prior table for --metric kl (checked against --bins), or None."""
    from ..errors import InputError
    from ..metrics import PRIOR_METRICS, load_prior as read_prior_file

    if metric in PRIOR_METRICS:
        if prior is None:
            raise InputError(f"--metric {metric} needs --prior FILE (make one with: regkl learn-prior)")
        table, _ = read_prior_file(prior)
        if table.shape != (bins, bins):
            raise InputError(f"prior has {table.shape[0]}x{table.shape[1]} bins but --bins is {bins}; "
                             f"use --bins {table.shape[0]}", path=prior)
        return table
    if prior is not None:
        raise InputError(f"--prior is only used with --metric kl, not {metric}")
    return None


def warm_kernels_in_background():
    """Start loading the compiled kernels while the images are read (both release the GIL)."""
    import threading

    from ..kernels import warm_up

    thread = threading.Thread(target=warm_up, name="regkl-warm-up", daemon=True)
    thread.start()
    return thread


def check_output(path, inputs):
    """Refuse, before any work, an output that would overwrite an input or cannot be written."""
    from ..io import check_output_path

    if path is None or path == "-":
        return
    check_output_path(path, protect=inputs)
