"""regkl: mutual-information registration of 3D medical images.

Internal convention: every transform is a 4x4 matrix in RAS+ millimetres that maps a point of the
FIXED (reference) image's world to the corresponding point of the MOVING image's world (the pull
direction used for resampling). Conversions to other conventions happen only in :mod:`regkl.xfm`.
"""

__version__ = "0.1.0"

from .errors import RegklError, InputError, RegistrationError  # noqa: E402,F401
from .volume import Volume  # noqa: E402,F401


def register(*args, **kwargs):
    """Register a moving volume to a fixed one; see :func:`regkl.optimize.register`."""
    from .optimize import register as _register

    return _register(*args, **kwargs)
