"""Third-party libraries kept quiet: nibabel's log lines and warnings become notes, C/C++ libraries'
stderr goes to /dev/null, and their exceptions become short one-line reasons."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import warnings

import numpy as np


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(exc).__name__)


def _oserror_text(exc: OSError) -> str:
    """A short, lower-case reason for an OSError (reading or writing)."""
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return "no space left on the device (disk full or quota exceeded)"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code == errno.EROFS:
        return "read-only file system"
    if code == errno.EISDIR:
        return "is a folder"
    return (exc.strerror or _short(exc)).lower() if exc.strerror else _short(exc)


@contextlib.contextmanager
def _captured_library_messages(notes: list):
    """nibabel's log lines and Python warnings raised inside become ``notes`` (not stderr lines).

    numpy's floating-point RuntimeWarnings (a header with NaNs...) are dropped: the checks that
    follow report the problem itself.
    """
    import nibabel as nib

    logger = nib.imageglobals.logger
    records = []

    class _Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    saved, propagate = list(logger.handlers), logger.propagate
    collector = _Collect()
    for handler in saved:
        logger.removeHandler(handler)
    logger.addHandler(collector)
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught, np.errstate(all="ignore"):
            warnings.simplefilter("always")
            yield
    finally:
        logger.removeHandler(collector)
        for handler in saved:
            logger.addHandler(handler)
        logger.propagate = propagate
        for msg in dict.fromkeys(records):
            notes.append(f"header problem fixed on reading: {' '.join(msg.split())}")
        for w in caught:
            if not issubclass(w.category, (RuntimeWarning, DeprecationWarning)):
                notes.append(" ".join(str(w.message).split()))


@contextlib.contextmanager
def quiet_native_stderr():
    """Send what C/C++ libraries (ITK, GDCM, HDF5) print on file descriptor 2 to /dev/null.

    SimpleITK reports failures as exceptions, which regkl turns into one-line errors; ITK's
    warnings and HDF5's diagnostics would otherwise add lines to stderr.
    """
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError, OSError):
        pass
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
