"""regkl: mutual-information registration of 3D medical images.

Internal convention: every transform is a 4x4 matrix in RAS+ millimetres that maps a point of the
FIXED (reference) image's world to the corresponding point of the MOVING image's world (the pull
direction used for resampling). Conversions to other conventions happen only in :mod:`regkl.xfm`.

The public functions take images as a :class:`Volume`, a nibabel image or a path::

    import nibabel as nib, regkl
    result = regkl.register(nib.load("bold.nii.gz"), "T1w.nii.gz")   # -> regkl.optimize.Result
    registered = regkl.apply("bold.nii.gz", "T1w.nii.gz", result.fixed2moving)
    regkl.save_transform("bold2T1w.tfm", result.fixed2moving)

They are loaded on first use (``import regkl`` stays light: the command line starts fast).
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
#: True when OpenBLAS was limited to one thread before NumPy loaded (the environment then rules);
#: otherwise (numpy imported first, as a library user's script does) registrations limit BLAS
#: threads themselves (:func:`regkl.optimize.register`), or L-BFGS-B's tiny BLAS calls leave
#: spinning threads behind that cost several times the registration on a busy machine.
BLAS_SINGLE_THREADED = "numpy" not in _sys.modules and _os.environ.get("OPENBLAS_NUM_THREADS") == "1"

from .errors import RegklError, InputError, RegistrationError  # noqa: E402,F401
from .volume import Volume  # noqa: E402,F401

#: Public functions, imported from their modules on first access (PEP 562): name -> (module, attribute).
_LAZY = {
    "register": ("optimize", "register"),
    "evaluate_metric": ("probe", "evaluate_metric"),
    "apply": ("resample", "resample"),
    "load_volume": ("io", "load_volume"),
    "load_transform": ("xfm", "load_transform"),
    "save_transform": ("xfm", "save_transform"),
}

__all__ = ["__version__", "RegklError", "InputError", "RegistrationError", "Volume", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attribute = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'regkl' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
