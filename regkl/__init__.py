"""regkl: mutual-information registration of 3D medical images.

Internal convention: every transform is a 4x4 matrix in RAS+ millimetres that maps a point of the
FIXED (reference) image's world to the corresponding point of the MOVING image's world (the pull
direction used for resampling). Conversions to other conventions happen only in :mod:`regkl.xfm`.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"

# Numba's OpenMP workers spin after every parallel kernel, and so do OpenBLAS's threads after every
# small matrix operation; both steal the other core from the serial work between kernels (twice
# slower on 2 cores). regkl's BLAS work is tiny, so in a fresh process (numpy not yet loaded, e.g.
# the command line) keep OpenBLAS to one thread and make waiting threads sleep. Users may override.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .errors import RegklError, InputError, RegistrationError  # noqa: E402,F401
from .volume import Volume  # noqa: E402,F401

__all__ = ["__version__", "RegklError", "InputError", "RegistrationError", "Volume", "register"]


def register(*args, **kwargs):
    """Register a moving volume to a fixed one; see :func:`regkl.optimize.register`."""
    from .optimize import register as _register

    return _register(*args, **kwargs)
