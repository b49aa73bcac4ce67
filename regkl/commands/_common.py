"""Helpers shared by the command modules: logging, option parsing, output checks."""

from __future__ import annotations

import click


def log(quiet):
    def say(msg):
        if not quiet:
            click.echo(f"regkl: {msg}", err=True)
    return say


def volume_option(value):
    """--moving-volume: 'mean', 'median' or a 0-based volume index (checked before any image is read)."""
    if value.isdigit():
        return int(value)
    if value in ("mean", "median"):
        return value
    raise click.BadParameter(f"expected mean, median or a volume index N >= 0, got {value!r}",
                             param_hint="--moving-volume")


class RegistryChoice(click.Choice):
    """A choice among a registry's names, checked when the command line is parsed (before any image
    is read); the message names what was given and lists the valid names.

    The registry (``module.attribute``, a dict) is imported on first use, so defining the commands
    does not import it: the command line starts fast.
    """

    def __init__(self, module, attribute, what):  # noqa: D107 - click.Choice's choices come from the registry
        self._registry = (module, attribute)
        self.what = what
        self.case_sensitive = True

    @property
    def choices(self):
        import importlib

        module, attribute = self._registry
        return tuple(getattr(importlib.import_module(module), attribute))

    def convert(self, value, param, ctx):
        if value in self.choices:
            return value
        self.fail(f"unknown {self.what} {value!r}; choose one of {', '.join(self.choices)}", param, ctx)


def format_option(*names, help_text, dest="fmt"):
    """A transform-format option: a choice of :data:`regkl.xfm.FORMATS` (default: told by the file)."""
    return click.option(*names, dest, type=RegistryChoice("regkl.xfm", "FORMATS", "transform format"), default=None,
                        help=help_text)


def metric_names(value, param_hint="--metric"):
    """Names of a comma-separated --metric value, each checked against the metric registry."""
    from ..metrics import METRICS

    names = [n.strip() for n in value.split(",") if n.strip()]
    bad = [n for n in names if n not in METRICS]
    if not names or bad:
        raise click.BadParameter(f"unknown metric {', '.join(map(repr, bad)) or '(none given)'}; choose one of "
                                 f"{', '.join(METRICS)}", param_hint=param_hint)
    return names


def model_choice():
    return RegistryChoice("regkl.transforms", "MODELS", "model")


def metric_choice():
    return RegistryChoice("regkl.metrics", "METRICS", "metric")


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
