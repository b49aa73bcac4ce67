"""Helpers shared by the command modules: logging, option parsing, output checks."""

from __future__ import annotations

import contextlib
import math

import click


def log(quiet):
    def say(msg):
        if not quiet:
            echo_err(f"regkl: {msg}")
    return say


def echo_err(text: str, *, nl: bool = True) -> None:
    """A progress or log line on stderr that can never stop the work: a closed stderr (``2>&1 |
    head -1``) or a name the terminal's encoding cannot show must not end a batch."""
    try:
        click.echo(text, err=True, nl=nl)
    except BrokenPipeError:
        _silence_stderr()
    except UnicodeEncodeError:
        try:
            click.echo(text.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace"), err=True, nl=nl)
        except (BrokenPipeError, OSError, ValueError):
            _silence_stderr()
    except (OSError, ValueError):  # stderr closed or gone
        _silence_stderr()


def _silence_stderr() -> None:
    """Point file descriptor 2 at /dev/null (later writes, by us or by libraries, go nowhere)."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    except OSError:
        pass


@contextlib.contextmanager
def naming(label):
    """Errors raised inside that name no file get ``label`` (the files the command works on), so
    every message says what it is about: ``moving.nii.gz onto fixed.nii.gz: the images do not overlap``."""
    from ..errors import RegklError

    try:
        yield
    except RegklError as exc:
        if exc.path is not None:
            raise
        raise type(exc)(exc.problem, path=label) from exc


def pair_label(moving, fixed, transform=None) -> str:
    """How messages name a pair of images (and the transform between them)."""
    return f"{moving} onto {fixed}" + (f" with {transform}" if transform else "")


def volume_option(value):
    return int(value) if isinstance(value, str) and value.lstrip("-").isdigit() else value


# --------------------------------------------------------------------------------------------------
# option types: every value is checked when the command line is parsed, before any image is read


class Finite(click.FloatRange):
    """A float in a range that is also finite (click's FloatRange lets NaN through)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


class FillValue(click.ParamType):
    """An output fill value: a number a float32 image can hold, or nan (no data)."""

    name = "value"

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number.", param, ctx)
        if math.isinf(number) or (math.isfinite(number) and abs(number) > 3.4e38):
            self.fail(f"{value!r} cannot be stored in the float32 output (largest magnitude about 3.4e38); "
                      "use a finite value, or nan for no data.", param, ctx)
        return number


class VolumeChoice(click.ParamType):
    """How a 4D image becomes one volume: mean, median or a volume index (negative from the end), or
    one of the ``extra`` names a command also accepts (register: ``realigned``)."""

    def __init__(self, extra=()):
        self.extra = tuple(extra)
        self.name = "|".join(("mean", "median", "N") + self.extra)

    def convert(self, value, param, ctx):
        text = str(value).strip()
        if text in ("mean", "median") + self.extra:
            return text
        if text.lstrip("-").isdigit():
            return int(text)
        named = ", ".join(("mean", "median") + self.extra)
        self.fail(f"expected {named} or a volume index (0, 1, ..., or -1 for the last), got {value!r}.", param, ctx)


class Registry(click.ParamType):
    """A name from one of regkl's registries (metrics, models), listed in the error; ``multiple``
    accepts a comma-separated list."""

    def __init__(self, what, names, *, multiple=False):
        self.name, self._names, self._multiple = what, names, multiple

    def convert(self, value, param, ctx):
        names = self._names()
        given = [v.strip() for v in str(value).split(",")] if self._multiple else [str(value).strip()]
        if not any(given):
            self.fail(f"the value is empty; choose {'one or more' if self._multiple else 'one'} of {', '.join(names)}.",
                      param, ctx)
        for name in given:
            if name not in names:
                self.fail(f"unknown {self.name.split('[')[0]} {name!r}; choose one of {', '.join(names)}.",
                          param, ctx)
        return ",".join(given) if self._multiple else given[0]


def _metric_names():
    from ..metrics import METRICS

    return list(METRICS)


def _model_names():
    from ..transforms import MODELS

    return list(MODELS)


def _format_names():
    from ..xfm import FORMATS

    return list(FORMATS)


METRIC = Registry("metric", _metric_names)
METRICS = Registry("metric[,metric...]", _metric_names, multiple=True)
MODEL = Registry("model", _model_names)
#: Histogram bins of the registration metrics (regkl.optimize checks the same range).
BINS = click.IntRange(8, 512)
SEED = click.IntRange(0, 2**32 - 1)
SAMPLING = Finite(0.0, 1.0, min_open=True)
MAX_ITER = click.IntRange(1, 100000)
MAX_SECONDS = Finite(0.0, min_open=True)
LEVELS = click.IntRange(1, 6)
POSITIVE = click.IntRange(1)


class MaxPoints(click.IntRange):
    """Cap on sample points per level: 0 (no cap) or at least the library's minimum."""

    def __init__(self):
        super().__init__(0)

    def convert(self, value, param, ctx):
        from ..optimize import MIN_MAX_POINTS

        rv = super().convert(value, param, ctx)
        if 0 < rv < MIN_MAX_POINTS:
            self.fail(f"{rv} is too few to register with; give 0 (no cap) or at least {MIN_MAX_POINTS}.", param, ctx)
        return rv


MAX_POINTS = MaxPoints()


def check_environment() -> None:
    """Refuse (one line, exit 2) settings in the environment regkl or Numba cannot use."""
    import os

    from ..errors import InputError

    threads = os.environ.get("NUMBA_NUM_THREADS")
    if threads is not None and threads.strip() and not (threads.strip().isdigit() and int(threads) >= 1):
        raise InputError(f"NUMBA_NUM_THREADS={threads!r} is not a positive number of threads; set it to 1 or more, "
                         "or unset it (use --threads to choose per run)")
    limit = os.environ.get("REGKL_MEMORY_LIMIT_GB")
    if limit is not None and limit.strip():
        try:
            ok = math.isfinite(float(limit)) and float(limit) > 0
        except ValueError:
            ok = False
        if not ok:
            raise InputError(f"REGKL_MEMORY_LIMIT_GB={limit!r} is not a positive number of GiB; set it (e.g. 8) "
                             "or unset it")


def format_option(*names, help_text, dest="fmt"):
    """A transform-format option: a name of :data:`regkl.xfm.FORMATS` (default: told by the file)."""
    return click.option(*names, dest, type=Registry("transform format", _format_names), default=None, help=help_text)


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
    """Start importing Numba and loading the compiled kernels while the images are read.

    The thread imports :mod:`regkl.kernels` itself, so Numba's import, its first-call set-up and
    LLVM's loading of the cached kernels (which releases the GIL) overlap the reading. Call it
    before importing the modules that need the kernels, and join it before using them. A failure
    here is left to the main thread, which meets it again when it imports the kernels and reports
    it in one line.
    """
    import threading

    def load():
        try:
            from ..kernels import REGISTRATION_KERNELS, warm_up

            warm_up(REGISTRATION_KERNELS)
        except Exception:  # noqa: BLE001 - the main thread's own import raises it properly
            pass

    thread = threading.Thread(target=load, name="regkl-warm-up", daemon=True)
    thread.start()
    return thread


def check_picture_output(path):
    """Refuse, before any work, a picture output whose name does not end in .png (what is written)."""
    from ..errors import OutputError

    if path and path != "-" and not str(path).lower().endswith(".png"):
        raise OutputError("pictures are written as PNG; name the output *.png", path=path)


def check_output(path, inputs):
    """Refuse, before any work, an output that would overwrite an input or cannot be written."""
    from ..errors import OutputError
    from ..outputs import check_output_path

    if path is None or path == "-":
        return
    if not str(path).strip():
        raise OutputError("an output file name is empty; give a file name")
    check_output_path(path, protect=inputs)
