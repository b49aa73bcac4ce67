"""The one place where image coordinate conventions are defined.

A :class:`Volume` is a 3D array of intensities plus ``vox2ras``, the 4x4 matrix that maps a voxel
index ``(i, j, k, 1)`` (array axis order, zero-based, voxel centres) to RAS+ world millimetres.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import InputError


#: Voxel sizes (mm) outside this range are refused as implausible (a header error).
VOXEL_SIZE_RANGE_MM = (1e-6, 1e6)
#: An image origin further than this (mm) from the world origin is refused as implausible.
MAX_ORIGIN_MM = 1e9


def check_vox2ras(matrix, *, name="vox2ras", path=None):
    """Validate a voxel-to-world matrix and return it as a float64 (4, 4) array.

    Parameters
    ----------
    matrix : array_like, shape (4, 4)
        Homogeneous voxel-to-RAS matrix (mm).
    name : str
        What the matrix is, for the error message.
    path : str, optional
        File the matrix came from, for the error message.

    Raises
    ------
    InputError
        If the matrix is not 4x4, not finite, has a last row other than ``[0, 0, 0, 1]``, gives a
        zero or implausible voxel size (outside :data:`VOXEL_SIZE_RANGE_MM`), an implausible
        origin (beyond :data:`MAX_ORIGIN_MM`) or is singular (axes not independent).
    """
    try:
        m = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} is not a numeric matrix", path=path) from exc
    if m.shape != (4, 4):
        raise InputError(f"{name} must be 4x4, got shape {m.shape}", path=path)
    if not np.all(np.isfinite(m)):
        raise InputError(f"{name} has non-finite entries (NaN or infinite)", path=path)
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
        raise InputError(f"{name} last row is {m[3].tolist()}, expected [0, 0, 0, 1]", path=path)
    lin = m[:3, :3]
    with np.errstate(all="ignore"):
        scale = np.linalg.norm(lin, axis=0)
        sizes = np.round(scale, 6).tolist()
        if np.any(scale <= 1e-8):
            axes = [int(a) for a in np.flatnonzero(scale <= 1e-8)]
            raise InputError(f"{name} gives a zero voxel size along axis {axes} (voxel sizes {sizes} mm)", path=path)
        lo, hi = VOXEL_SIZE_RANGE_MM
        if np.any(scale < lo) or np.any(scale > hi):
            raise InputError(f"{name} gives an implausible voxel size (voxel sizes {sizes} mm; expected "
                             f"{lo:g} to {hi:g} mm)", path=path)
        if np.any(np.abs(m[:3, 3]) > MAX_ORIGIN_MM):
            raise InputError(f"{name} puts the image implausibly far away (origin {m[:3, 3].tolist()} mm)",
                             path=path)
        if not abs(np.linalg.det(lin)) > 1e-8 * np.prod(scale):
            raise InputError(f"{name} is singular: its axes are not independent (voxel sizes {sizes} mm)",
                             path=path)
    return m


@dataclass(frozen=True)
class Volume:
    """A 3D image in RAS+ world space.

    Parameters
    ----------
    data : ndarray, shape (I, J, K)
        Intensities; stored as C-contiguous float32.
    vox2ras : ndarray, shape (4, 4)
        Voxel index to RAS+ millimetres.
    name : str
        Where the image came from (a path), used in messages.
    note : str
        Free text about how the volume was obtained (e.g. the 4D reduction used).
    header : object, optional
        The file header it was read from (a nibabel NIfTI header), reused when writing on its grid.
    """

    data: np.ndarray
    vox2ras: np.ndarray
    name: str = "<array>"
    note: str = ""
    header: object = field(default=None, repr=False, compare=False)
    _ras2vox: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        data = np.ascontiguousarray(self.data, dtype=np.float32)
        if data.ndim != 3:
            raise InputError(f"expected a 3D volume, got {data.ndim}D with shape {data.shape}", path=self.name)
        if min(data.shape) < 1:
            raise InputError(f"empty volume of shape {data.shape}", path=self.name)
        v2r = check_vox2ras(self.vox2ras, path=self.name)
        object.__setattr__(self, "data", data)
        object.__setattr__(self, "vox2ras", v2r)
        object.__setattr__(self, "_ras2vox", np.linalg.inv(v2r))

    @property
    def ras2vox(self) -> np.ndarray:
        """(4, 4) RAS+ millimetres to voxel index."""
        return self._ras2vox

    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def spacing(self) -> np.ndarray:
        """(3,) voxel sizes in mm along the array axes."""
        return np.linalg.norm(self.vox2ras[:3, :3], axis=0)

    @property
    def centre(self) -> np.ndarray:
        """(3,) RAS+ position (mm) of the centre of the voxel grid."""
        c = (np.asarray(self.shape, dtype=np.float64) - 1.0) / 2.0
        return self.vox2ras[:3, :3] @ c + self.vox2ras[:3, 3]

    def centre_of_mass(self) -> np.ndarray:
        """(3,) intensity-weighted centre (mm, RAS+), over positive finite voxels.

        Falls back to the geometric centre when the image has no positive intensity.
        """
        d = np.where(np.isfinite(self.data), self.data, 0.0)
        d = np.clip(d - np.percentile(d, 2.0), 0.0, None)
        total = float(d.sum(dtype=np.float64))
        if total <= 0.0:
            return self.centre
        idx = []
        for axis in range(3):
            other = tuple(a for a in range(3) if a != axis)
            profile = d.sum(axis=other, dtype=np.float64)
            idx.append(float(profile @ np.arange(d.shape[axis])) / total)
        return self.vox2ras[:3, :3] @ np.asarray(idx) + self.vox2ras[:3, 3]

    def world_coords(self, vox: np.ndarray) -> np.ndarray:
        """Map voxel indices (N, 3) to RAS+ mm (N, 3)."""
        # (3,3) @ (3,N) is much faster than (N,3) @ (3,3) in NumPy for large N
        return (self.vox2ras[:3, :3] @ np.asarray(vox, dtype=np.float64).T).T + self.vox2ras[:3, 3]

    @classmethod
    def from_nibabel(cls, img, *, volume="mean") -> "Volume":
        """A nibabel image (NIfTI or any spatial image) as a Volume, with the checks of a file read.

        Parameters
        ----------
        img : nibabel SpatialImage, 3D or 4D
        volume : {'mean', 'median'} or int
            How a 4D series is reduced to one volume.

        Raises
        ------
        InputError
            Not 3D/4D, singular or non-finite voxel-to-world matrix, constant or all-NaN data.
        """
        from .io import volume_from_nibabel

        return volume_from_nibabel(img, volume=volume)

    def to_nibabel(self):
        """This volume as a ``nibabel.Nifti1Image`` (float32; sform and qform = ``vox2ras``, code 1)."""
        import nibabel as nib

        img = nib.Nifti1Image(self.data, self.vox2ras)
        img.set_sform(self.vox2ras, code=1)
        img.set_qform(self.vox2ras, code=1)
        return img

    def with_data(self, data: np.ndarray, vox2ras: np.ndarray | None = None, note: str | None = None) -> "Volume":
        """A new volume with other data (and optionally another grid) and the same name."""
        return Volume(data, self.vox2ras if vox2ras is None else vox2ras, self.name,
                      self.note if note is None else note)


#: What the public functions accept as an image (the TypeError for anything else lists them).
ACCEPTED_IMAGES = "a regkl Volume, a nibabel image, or a path to an image file"


def as_volume(image, *, what: str = "image", volume="mean", allow_constant: bool = False) -> Volume:
    """A :class:`Volume` from a Volume, a nibabel image or a path (str or os.PathLike).

    Parameters
    ----------
    image : Volume, nibabel SpatialImage, str or os.PathLike
    what : str
        The argument's name, for the TypeError.
    volume : {'mean', 'median'} or int
        How a 4D image or file is reduced (a Volume is returned as it is).
    allow_constant : bool
        Accept an image with a single value (masks).

    Raises
    ------
    TypeError
        Anything else (a bare array has no world coordinates: wrap it in ``Volume(data, vox2ras)``).
    InputError
        The image is unreadable or unusable (see :func:`regkl.io.load_volume`).
    """
    import os

    if isinstance(image, Volume):
        return image
    if isinstance(image, (str, os.PathLike)):
        from .io import load_volume

        return load_volume(image, volume=volume, allow_constant=allow_constant)
    if hasattr(image, "affine") and hasattr(image, "dataobj"):
        from .io import volume_from_nibabel

        return volume_from_nibabel(image, volume=volume, allow_constant=allow_constant)
    hint = " (an array has no world coordinates: wrap it in Volume(data, vox2ras))" if hasattr(image, "shape") else ""
    raise TypeError(f"{what} must be {ACCEPTED_IMAGES}, not {type(image).__name__}{hint}")
