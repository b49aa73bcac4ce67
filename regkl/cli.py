"""Command-line interface. Parses, calls one library function, writes; nothing else.

Exit codes: 0 success, 1 registration failed, 2 bad usage or bad input/output, 3 internal error.
Results go to stdout; progress, warnings and errors to stderr.
"""

from __future__ import annotations

import os
import sys
import warnings

import click

from . import __version__
from .commands._common import check_environment, echo_err
from .errors import RegklError

#: Subcommand -> (module in regkl.commands, Click command in it). A command's module (and what it
#: imports) loads only when that command runs or a help page lists it: a command's start-up does
#: not pay for the other nine.
COMMANDS = {
    "register": ("register", "register"),
    "apply": ("apply", "apply_cmd"),
    "batch": ("batch", "batch_cmd"),
    "report": ("report", "report_cmd"),
    "qc": ("qc", "qc_cmd"),
    "learn-prior": ("learn_prior", "learn_prior_cmd"),
    "metric": ("metric", "metric_cmd"),
    "profile": ("profile", "profile_cmd"),
    "stats": ("stats", "stats_cmd"),
    "realign": ("realign", "realign_cmd"),
}


class _LazyGroup(click.Group):
    """A Click group whose subcommands are imported on first use (see :data:`COMMANDS`)."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, cmd_name):
        if cmd_name not in COMMANDS:
            return None
        import importlib

        module, attribute = COMMANDS[cmd_name]
        return getattr(importlib.import_module(f".commands.{module}", __package__), attribute)

    def resolve_command(self, ctx, args):
        name = args[0] if args else ""
        if name in COMMANDS or name.startswith("-") or ctx.resilient_parsing:
            return super().resolve_command(ctx, args)
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=2)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise click.UsageError(f"No such command {name!r}.{hint}", ctx)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="regkl")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug):
    """regkl: mutual-information registration of 3D images (EPI to T1 and more).

    Transforms are 4x4 matrices in RAS+ mm mapping FIXED world points to MOVING world points;
    ITK files (.tfm) are the same transform in LPS, as ITK, ANTs and SimpleITK expect.
    """


def main(argv=None):
    """Console entry point: runs the Click group and maps errors to one line and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        # a scheduler's SIGTERM unwinds normally, so temporary outputs are removed
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not debug:
        warnings.showwarning = lambda msg, *a, **k: echo_err(f"regkl: warning: {msg}")
    try:
        check_environment()
        cli.main(args=argv, prog_name="regkl", standalone_mode=False)
    except click.exceptions.Abort:
        echo_err("regkl: aborted")
        sys.exit(130)
    except click.ClickException as exc:
        if debug:
            raise
        echo_err(f"regkl: error: {' '.join(exc.format_message().split())}")
        sys.exit(exc.exit_code)
    except RegklError as exc:
        if debug:
            raise
        echo_err(f"regkl: error: {exc}")
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        echo_err("regkl: interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, no traceback
        if debug:
            raise
        text = " ".join(str(exc).split())[:300]
        echo_err(f"regkl: internal error: {type(exc).__name__}: {text} (rerun with --debug)")
        sys.exit(3)
    sys.exit(0)


def run():
    """The ``regkl`` console script: :func:`main`, then exit without interpreter teardown.

    Tearing down Numba/LLVM at exit takes about 0.25 s, longer than many registrations' I/O. By the
    time :func:`main` returns every output is closed and renamed into place, so the streams are
    flushed and the process ends with ``os._exit`` and the same exit code. With ``--debug``,
    regkl's own errors print their traceback and keep their exit code (2 for bad input);
    unexpected exceptions still propagate with their traceback and a normal exit.
    """
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    except (RegklError, click.ClickException) as exc:  # --debug re-raised it for its traceback
        import traceback

        traceback.print_exc()
        code = exc.exit_code  # the exit code the error has without --debug (2 for bad input)
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # a closed pipe (regkl ... | head), or no stream at all
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
