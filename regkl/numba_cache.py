"""Numba's on-disk cache of compiled kernels, made to work where it cannot be written.

regkl's kernels are compiled with ``cache=True``. Numba looks for a writable cache folder
(``NUMBA_CACHE_DIR``, ``__pycache__`` next to the source, the user's cache folder) and, when none
is writable (a read-only install run by a user without a home folder), refuses to decorate the
function at all ("cannot cache function ... no locator available"), so nothing runs.
:func:`ensure_usable` runs before the kernels are defined and, in that case only:

1. points ``NUMBA_CACHE_DIR`` at a private folder in the temporary folder (created with mode
   0700 and owned by this user, so no one else can plant compiled code in it; inherited by
   batch worker processes, which then share the compiled kernels), else
2. compiles without a cache (every run compiles its kernels again),

and says which in one warning, with the setting that makes the cache permanent.
"""

from __future__ import annotations

import os
import stat
import tempfile
import warnings

_DONE = False


def _cache_locatable(source_file: str) -> bool:
    """Whether Numba finds a writable cache folder for functions defined in ``source_file``."""
    from numba.core import caching

    impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl")  # public name since 0.59

    def probe():  # a stand-in function: locators only look at its source file and line
        pass

    for locator in impl._locator_classes:
        try:
            if locator.from_function(probe, source_file) is not None:
                return True
        except (OSError, RuntimeError, ValueError):
            continue
    return False


def _private_temp_folder() -> str | None:
    """``<tmp>/regkl-numba-cache-<uid>``, created 0700; None unless it is ours and private."""
    try:
        folder = os.path.join(tempfile.gettempdir(), f"regkl-numba-cache-{os.getuid()}")
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        info = os.lstat(folder)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
            return None
        tempfile.TemporaryFile(dir=folder).close()
        return folder
    except (OSError, AttributeError):
        return None


def _compile_uncached() -> None:
    """Make ``cache=True`` fall back to no cache where Numba finds no cache folder."""
    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher

    original = Dispatcher.enable_caching
    if getattr(original, "regkl_fallback", False):
        return

    def enable_caching(self):
        try:
            original(self)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            self._cache = NullCache()

    enable_caching.regkl_fallback = True
    Dispatcher.enable_caching = enable_caching


def ensure_usable(source_file: str | None = None) -> None:
    """Make sure Numba's ``cache=True`` can work for ``source_file`` (default: regkl/kernels.py).

    Does nothing when Numba finds a writable cache folder (the usual case); otherwise see the
    module docstring. Runs once per process.
    """
    global _DONE
    if _DONE:
        return
    _DONE = True
    source_file = source_file or os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.py")
    if _cache_locatable(source_file):
        return
    import numba

    folder = _private_temp_folder()
    if folder is not None:
        os.environ["NUMBA_CACHE_DIR"] = folder
        numba.config.CACHE_DIR = folder
        if _cache_locatable(source_file):
            warnings.warn(f"no writable Numba cache folder (regkl's install folder and the user cache are read-only); "
                          f"caching compiled kernels in {folder}; set NUMBA_CACHE_DIR to a writable folder to keep "
                          "them", stacklevel=2)
            return
    _compile_uncached()
    warnings.warn("no writable Numba cache folder (regkl's install folder, the user cache and the temporary folder "
                  "are read-only): compiling kernels without a cache, every run; set NUMBA_CACHE_DIR to a writable "
                  "folder to cache them", stacklevel=2)
