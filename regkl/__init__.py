"""regkl: mutual-information registration of 3D medical images.

Internal convention: every transform is a 4x4 matrix in RAS+ millimetres that maps a point of the
FIXED (reference) image's world to the corresponding point of the MOVING image's world (the pull
direction used for resampling). Conversions to other conventions happen only in :mod:`regkl.xfm`.
"""

import os as _os

__version__ = "0.1.0"

# Numba's OpenMP workers otherwise spin after every parallel kernel and steal the other core from
# the serial work between kernels (optimiser, metric): twice slower on 2 cores. Users may override.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .errors import RegklError, InputError, RegistrationError  # noqa: E402,F401
from .volume import Volume  # noqa: E402,F401


def register(*args, **kwargs):
    """Register a moving volume to a fixed one; see :func:`regkl.optimize.register`."""
    from .optimize import register as _register

    return _register(*args, **kwargs)
