"""Outputs written all or none: checks of output paths before any work (never overwrite an input),
temporary names renamed into place after fsync (:func:`atomic_path`, :func:`atomic_set`), groups of
outputs committed together (:func:`output_group`), and the temporary files a killed run leaves."""

from __future__ import annotations

import contextlib
import contextvars
import glob
import os
import re
import tempfile
from pathlib import Path

from .errors import OutputError
from .quiet import _oserror_text


#: Name pattern of the temporary files :func:`atomic_path` creates (".NAME.PID.XXXXXXXX.tmpSUFFIX",
#: PID the writing process's id).
TEMP_PATTERN = r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9.]+)?$"


def _alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _remove_stale_temps(dest: Path, suffixes) -> None:
    """Remove the temporary files of ``dest`` (and of its partner files) that a writer killed
    mid-write left behind: those whose writer's process id no longer runs. A live writer's files
    are left alone, so concurrent runs never delete each other's work."""
    folder = dest.parent if str(dest.parent) else Path(".")
    rx = re.compile(re.escape(f".{dest.name}.") + r"(\d+)\.[A-Za-z0-9_]{8}\.tmp" + re.escape(suffixes[0]) + "$")
    with contextlib.suppress(OSError):
        for first in folder.glob(f".{glob.escape(dest.name)}.*.tmp{glob.escape(suffixes[0])}"):
            m = rx.match(first.name)
            if not m or _alive(int(m.group(1))):
                continue
            stem = str(first)[:len(str(first)) - len(suffixes[0])]
            for suffix in suffixes:
                with contextlib.suppress(OSError):
                    os.unlink(stem + suffix)


def stale_temp_files(folder) -> list:
    """Temporary files left in ``folder`` (recursively) by a run that was killed mid-write."""
    rx = re.compile(TEMP_PATTERN)
    return sorted(p for p in Path(folder).rglob(".*") if p.is_file() and rx.match(p.name))


def check_output_path(path, *, protect=()) -> Path:
    """Refuse (OutputError naming it) an output that cannot be written, before any work is done.

    It would overwrite an input (same path, or the same file through a link), it is a folder, its
    folder does not exist or is not writable. Used by :func:`atomic_path`; callers may also check
    their outputs up front, before a long computation.
    """
    dest = Path(path)
    try:
        for other in protect:
            if other is None:
                continue
            if os.path.abspath(dest) == os.path.abspath(other) or (
                    dest.exists() and Path(other).exists() and os.path.samefile(dest, other)):
                raise OutputError("output would overwrite an input", path=dest)
        folder = dest.parent if str(dest.parent) else Path(".")
        if not folder.exists():
            raise OutputError("output folder does not exist", path=dest)
        if not folder.is_dir():
            raise OutputError("output folder is not a folder", path=dest)
        if dest.is_dir():
            raise OutputError("output path is a folder", path=dest)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError("output folder is not writable (permission denied)", path=dest)
    except OSError as exc:
        raise OutputError(f"cannot write: {_oserror_text(exc)}", path=dest) from exc
    return dest


def _umask() -> int:
    """The process umask, read without changing it where possible (os.umask is not thread-safe)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder) -> None:
    """Make a rename durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_GROUP: contextvars.ContextVar = contextvars.ContextVar("regkl_output_group", default=None)


@contextlib.contextmanager
def output_group():
    """All-or-nothing outputs: files written with :func:`atomic_path` inside the block are renamed
    into place only when the whole block succeeds; otherwise none of them appears.

    Each file is still written to its own temporary file and fsynced; the renames happen together
    at the end. Two outputs with the same path in one group are refused (OutputError).

    Examples
    --------
    >>> with output_group():                                          # doctest: +SKIP
    ...     save_transform("x.tfm", m, "itk")
    ...     save_volume(vol, "out.nii.gz")   # disk full here: neither x.tfm nor out.nii.gz is written
    """
    pending: list = []
    token = _GROUP.set(pending)
    try:
        yield
        for tmp, dest in pending:
            try:
                os.replace(tmp, dest)
            except OSError as exc:
                raise OutputError(f"cannot write: {_oserror_text(exc)}", path=dest) from exc
        for folder in dict.fromkeys(dest.parent if str(dest.parent) else Path(".") for _, dest in pending):
            _fsync_folder(folder)
    finally:
        _GROUP.reset(token)
        for tmp, _ in pending:
            with contextlib.suppress(OSError):
                if os.path.lexists(tmp):
                    os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path, *, protect=()):
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file (hidden, ``.NAME.XXXXXXXX.tmpSUFFIX``, see :data:`TEMP_PATTERN`) is in the
    destination's folder, so the rename is atomic; it is fsynced before the rename and the folder
    after it. Whatever the block raises, the temporary file is removed and the destination (if it
    existed) is untouched; an OSError (disk full, permission, I/O error) becomes an OutputError
    naming the destination.

    Parameters
    ----------
    path : str or Path
        Final destination.
    protect : iterable of paths
        Inputs that must never be overwritten.
    """
    dest = Path(path)
    suffix = "".join(dest.suffixes[-2:]) if dest.name.lower().endswith(".gz") else dest.suffix
    with atomic_set(dest, (suffix,), protect=protect) as tmps:
        yield tmps[0]


def file_set(path, suffixes) -> list:
    """The files of a set named like ``path``: ``path`` itself, then its partners.

    ``suffixes[0]`` is the suffix ``path`` ends with (any case); each partner replaces it by one of
    the others, in the same case (``OUT.HDR`` -> ``OUT.IMG``).
    """
    dest = Path(path)
    stem = dest.name[:len(dest.name) - len(suffixes[0])]
    upper = dest.name[len(stem):].isupper()
    return [dest] + [dest.with_name(stem + (s.upper() if upper else s)) for s in suffixes[1:]]


@contextlib.contextmanager
def atomic_set(path, suffixes, *, protect=()):
    """:func:`atomic_path` for a set of files written together (NIfTI pair .hdr/.img, MetaImage
    .mhd/.raw): yields one temporary path per file, all with the same stem (``.NAME.XXXXXXXX.tmp``
    + each suffix, as the writers of such pairs expect); every file is renamed into place only if
    the block succeeds (inside :func:`output_group`, with the group), else none is.

    Parameters
    ----------
    path : str or Path
        Final destination of the first file; the others are named by :func:`file_set`.
    suffixes : sequence of str
        The suffix of ``path`` first (as in :data:`regkl.writers.IMAGE_OUTPUTS`), then its partners'.
    protect : iterable of paths
        Inputs that must never be overwritten (by any file of the set).
    """
    finals = [check_output_path(p, protect=protect) for p in file_set(path, suffixes)]
    dest = finals[0]
    group = _GROUP.get()
    for final in finals:
        if group is not None and any(os.path.abspath(final) == os.path.abspath(d) for _, d in group):
            raise OutputError("two outputs have the same path", path=final)
    folder = dest.parent if str(dest.parent) else Path(".")
    try:
        _remove_stale_temps(dest, suffixes)
        fd, first = tempfile.mkstemp(prefix=f".{dest.name}.{os.getpid()}.", suffix=f".tmp{suffixes[0]}", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write: {_oserror_text(exc)}", path=dest) from exc
    stem = first[:len(first) - len(suffixes[0])]
    tmps = [Path(first)]
    handed_over = False
    try:
        os.close(fd)
        for suffix in suffixes[1:]:  # partners: same random stem, created exclusively
            os.close(os.open(stem + suffix, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            tmps.append(Path(stem + suffix))
        for tmp in tmps:
            os.chmod(tmp, 0o666 & ~_umask())
        yield tmps
        for tmp in tmps:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        if group is not None:  # output_group renames every file together at its end
            group.extend((str(t), f) for t, f in zip(tmps, finals))
            handed_over = True
        else:
            for tmp, final in zip(tmps, finals):
                os.replace(tmp, final)
            _fsync_folder(folder)
    except OSError as exc:
        raise OutputError(f"cannot write: {_oserror_text(exc)}", path=dest) from exc
    finally:
        if not handed_over:
            for tmp in tmps:
                with contextlib.suppress(OSError):
                    if os.path.lexists(tmp):
                        os.unlink(tmp)
