"""Images in: NIfTI read by regkl itself (:mod:`regkl.nifti_read`), every other format through
SimpleITK (:mod:`regkl.sitk_images`).

Everything that comes in is converted to a :class:`~regkl.volume.Volume` (RAS+). Images go out
through :mod:`regkl.writers`, written atomically (:mod:`regkl.outputs`: temporary file in the same
folder, fsync, rename).

Reading is defensive, because regkl runs unattended over thousands of files: every problem with
an input becomes an :class:`~regkl.errors.InputError` naming the file and the problem (never
another exception), and nothing is allocated before the header has been checked against the
memory available. What is checked, and what is decided:

- NIfTI (``.nii``, ``.nii.gz``) is read by regkl itself with nibabel's header classes: the NIfTI-1
  or NIfTI-2 magic must be present; the header's dimensions and data type must describe exactly
  the data the file holds (a shorter file is truncated, a longer one has wrong dimensions); a
  gzip stream is read to its end, so a damaged stream or a failed CRC is an error, not silent
  garbage. gzip is recognised by its content, whatever the file name says.
- Geometry: the sform when ``sform_code > 0`` (as nibabel and FSL do), else the qform when
  ``qform_code > 0``. Without either (and for Analyze 7.5 ``.hdr``/``.img`` files) the grid is
  placed as ITK, ANTs and SimpleITK place it (:func:`regkl.nifti_read.itk_placement`), so the transform files regkl
  writes mean the same in those tools, and a warning says so. Voxel sizes (``pixdim``) that define
  the geometry must be positive and finite (nibabel would silently replace zeros by 1 and negatives
  by their absolute value). When both sform and qform are set and map the grid's corners more than
  :data:`regkl.nifti_read.SFORM_QFORM_TOL_MM` apart, the sform is used and a warning says so.
- Shape: at least 2 voxels along each of the three axes (a single slice is refused with its shape
  and extent in mm).
- NaN/infinite voxels mean "no data": they are kept as NaN (a warning gives their number), left
  out of the registration on either side and filled in resampled outputs; an image to register is
  refused when fewer than :data:`MIN_FINITE_VOXELS` voxels are finite (and any image when none is).
- Integer data with ``scl_slope``/``scl_inter`` are scaled (``value * slope + inter``).
- Complex and RGB images, 2D and 5D+ images are refused.
- Size: before any data are read, the memory needed (the file's data, a float copy and
  :data:`regkl.memory.WORKING_COPIES` float32 copies of the 3D volume) is compared with the memory available
  (``MemAvailable``, capped by a cgroup limit; ``REGKL_MEMORY_LIMIT_GB`` overrides) and the image
  is refused with both figures when it does not fit.
- Warnings (NaN voxels, header fields nibabel had to fix, sform/qform disagreement, no orientation) are issued
  only when the image is accepted, so a refused image gives exactly one line: its error.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from .errors import InputError
from .nifti_read import _nifti_affine, _Raw, _read_nifti, _read_nifti_pair
from .quiet import _oserror_text
from .sitk_images import _read_sitk
from .volume import Volume, check_vox2ras

NIFTI_SUFFIXES = (".nii", ".nii.gz")

#: Fewest finite voxels an image to register may have (NaN/infinite voxels are no data).
MIN_FINITE_VOXELS = 512


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(NIFTI_SUFFIXES) or name.endswith((".hdr", ".img", ".img.gz", ".hdr.gz"))


# --------------------------------------------------------------------------------------------------
# public readers


def check_input_path(path, what: str = "image") -> Path:
    """The path as a Path if it can be read; InputError naming it otherwise.

    Missing, not a regular file or folder (a pipe or device, which could block forever),
    unreadable, or an empty file.
    """
    p = Path(path)
    try:
        if not p.exists():
            raise InputError("no such file or folder", path=p)
        if p.is_dir():
            if not os.access(p, os.R_OK | os.X_OK):
                raise InputError("folder is not readable (permission denied)", path=p)
            return p
        if not p.is_file():
            raise InputError(f"not a regular file (a pipe, socket or device); give an {what} file", path=p)
        if not os.access(p, os.R_OK):
            raise InputError("file is not readable (permission denied)", path=p)
        if p.stat().st_size == 0:
            raise InputError("file is empty", path=p)
    except OSError as exc:  # e.g. a name too long, a path through a file
        raise InputError(f"cannot access: {_oserror_text(exc)}", path=p) from exc
    return p


#: FreeSurfer MGH images, read through nibabel (SimpleITK has no reader for them).
MGH_SUFFIXES = (".mgz", ".mgh")


def _read_mgh(path: Path) -> _Raw:
    """A FreeSurfer .mgz/.mgh image through nibabel: its vox2ras (RAS+ mm, as FreeSurfer's scanner
    RAS) and data; the memory needed is checked from the header before the data are read."""
    import nibabel as nib

    from .memory import check_memory
    from .quiet import _short

    try:
        img = nib.load(str(path))
        shape, dtype = img.header.get_data_shape(), img.header.get_data_dtype()
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a damaged file
        raise InputError(f"not a readable FreeSurfer MGH file ({_short(exc)})", path=path) from exc
    check_memory(shape, dtype, path, compressed=path.name.lower().endswith(".mgz"))
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"the MGH image data cannot be read ({_short(exc)})", path=path) from exc
    return _Raw(data, np.asarray(img.affine, dtype=np.float64), img.header, "voxel-to-world matrix (MGH header)",
                [])


def _read(path: Path) -> _Raw:
    name = path.name.lower()
    if path.is_dir():
        return _read_sitk(path)
    if name.endswith(NIFTI_SUFFIXES):
        return _read_nifti(path)
    if name.endswith(MGH_SUFFIXES):
        return _read_mgh(path)
    if _is_nifti(path):
        return _read_nifti_pair(path)
    return _read_sitk(path)


def _squeeze(data: np.ndarray) -> np.ndarray:
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def _check_dims(shape, path):
    if len(shape) != 3:
        raise InputError(f"expected a 3D or 4D image, got {len(shape)}D with shape {shape}", path=path)


def _check_extent(shape, vox2ras, path):
    """Refuse a grid with a single voxel along an axis (one slice), with its shape and extent in mm."""
    if min(shape) < 2:
        extent = np.asarray(shape, dtype=np.float64) * np.linalg.norm(np.asarray(vox2ras)[:3, :3], axis=0)
        what = "a single slice" if sorted(shape)[1] >= 2 else "a single line or voxel"
        raise InputError(f"image is {what}: {'x'.join(map(str, shape))} voxels covering "
                         f"{' x '.join(f'{e:.4g}' for e in extent)} mm; registration needs a 3D volume with at "
                         "least 2 voxels along each axis", path=path)


def _clean(data: np.ndarray, path: str, notes: list, *, min_finite: int = 1) -> np.ndarray:
    """float32 C-ordered copy; NaN/infinite voxels become NaN ("no data", a note), or InputError
    when fewer than ``min_finite`` voxels are finite."""
    data = np.ascontiguousarray(data, dtype=np.float32)  # one pass: convert and reorder (NIfTI is F-ordered)
    finite = np.isfinite(data)
    n_good = int(np.count_nonzero(finite))
    n_bad = int(data.size - n_good)
    if n_bad:
        if n_good == 0:
            raise InputError("every voxel is NaN or infinite", path=path)
        if n_good < min_finite:
            raise InputError(f"only {n_good} of {data.size} voxels are finite (the others are NaN or infinite, "
                             f"meaning no data); at least {min_finite} are needed to register", path=path)
        notes.append(f"{n_bad} NaN/infinite voxels ({n_bad / data.size:.1%}) are treated as no data (left out of "
                     "the registration; resampled outputs have the fill value there)")
        data = np.where(finite, data, np.float32(np.nan))
    return data


def _reduce_4d(data: np.ndarray, how, path: str):
    """Reduce a 4D array (I, J, K, T) to 3D; returns (data, note)."""
    n = data.shape[3]
    if isinstance(how, str) and how.lstrip("-").isdigit():
        how = int(how)
    if isinstance(how, (int, np.integer)):
        if not -n <= how < n:
            raise InputError(f"volume {how} requested but the series has {n} volumes (0..{n - 1})", path=path)
        return data[..., how], f"volume {int(how) % n} of {n}"
    if how in ("mean", "median"):
        # NaN is "no data": a voxel's mean/median over the volumes that have it (one all-NaN volume
        # made the whole mean NaN); a voxel without data in any volume stays NaN
        finite = np.isfinite(data)
        if finite.all():
            out = np.mean(data, axis=3, dtype=np.float64) if how == "mean" else np.median(data, axis=3)
            return out, f"{how} of {n} volumes"
        empty = [t for t in range(n) if not finite[..., t].any()]
        clean = np.where(finite, data, np.nan)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out = np.nanmean(clean, axis=3, dtype=np.float64) if how == "mean" else np.nanmedian(clean, axis=3)
        note = f"{how} of {n} volumes" + (f" (volume{'s' * (len(empty) > 1)} {', '.join(map(str, empty))} "
                                           "without data left out)" if empty else ", non-finite voxels left out")
        return out, note
    raise InputError(f"--moving-volume must be mean, median or a volume index, got {how!r}", path=path)


def _finish(raw: _Raw, path: str, volume, allow_constant=False) -> Volume:
    """Squeeze trailing singleton axes, reduce 4D, check geometry, clean non-finite values.

    Errors come before any note is issued, so a refused image gives exactly one line.
    """
    data = _squeeze(raw.data)
    if data.ndim > 4:
        raise InputError(f"{data.ndim}D images are not supported (shape {data.shape})", path=path)
    if data.ndim < 3:
        raise InputError(f"expected a 3D or 4D image, got {data.ndim}D with shape {data.shape}", path=path)
    _check_dims(data.shape[:3], path)
    vox2ras = check_vox2ras(raw.vox2ras, name=raw.matrix_name, path=path)
    _check_extent(data.shape[:3], vox2ras, path)
    note = ""
    if data.ndim == 4:
        data, note = _reduce_4d(data, volume, path)
    data = _clean(data, path, raw.notes, min_finite=1 if allow_constant else MIN_FINITE_VOXELS)
    if not allow_constant and float(np.nanmax(data)) == float(np.nanmin(data)):
        raise InputError(f"image is constant (every {'finite ' if np.isnan(data).any() else ''}voxel is "
                         f"{float(np.nanmin(data)):g})", path=path)
    return Volume(data, vox2ras, path, note, raw.header)


def _issue(notes, path):
    for text in dict.fromkeys(notes):
        warnings.warn(f"{path}: {text}", stacklevel=3)


def load_volume(path, *, volume="mean", allow_constant: bool = False) -> Volume:
    """Read a 3D or 4D image as a RAS+ :class:`Volume`.

    Parameters
    ----------
    path : str or Path
        NIfTI-1/2 (``.nii``, ``.nii.gz``), any format SimpleITK reads, or a DICOM series folder.
    volume : {'mean', 'median'} or int
        How a 4D series is reduced to one reference volume.
    allow_constant : bool
        Accept an image with a single value (masks); images to register must have contrast.

    Raises
    ------
    InputError
        Missing, unreadable or invalid image (message names the file and the problem); see the
        module docstring for every check. Warnings (NaN voxels kept as no data, header fields fixed,
        no orientation, sform/qform disagreement) are issued only for an accepted image.
    """
    p = check_input_path(path)
    raw = _read(p)
    with np.errstate(all="ignore"):  # overflow to inf (float64 -> float32) is counted by _clean instead
        vol = _finish(raw, str(p), volume, allow_constant=allow_constant)
    _issue(raw.notes, p)
    return vol


def volume_from_nibabel(img, *, volume="mean", allow_constant: bool = False) -> Volume:
    """A nibabel image (3D or 4D, already loaded) as a RAS+ :class:`Volume`, with :func:`load_volume`'s checks.

    The voxel-to-world matrix is chosen as for a file (NIfTI: sform, else qform, else voxel
    sizes; other images: ``img.affine``); ``volume`` reduces a 4D series.

    Raises
    ------
    InputError
        As :func:`load_volume` (names the image's file when it has one).
    """
    name = str(img.get_filename() or "<nibabel image>")
    notes: list = []
    data = np.asanyarray(img.dataobj)
    header = img.header if hasattr(img.header, "get_sform") else None
    if header is not None:
        vox2ras, matrix_name = _nifti_affine(header, data.shape, notes)
    else:
        vox2ras, matrix_name = img.affine, "voxel-to-world matrix (affine)"
    if vox2ras is None:
        raise InputError("the image has no voxel-to-world matrix (affine is None)", path=name)
    with np.errstate(all="ignore"):
        vol = _finish(_Raw(data, vox2ras, header, matrix_name, notes), name, volume, allow_constant=allow_constant)
    _issue(notes, name)
    return vol


def load_series(path):
    """Read an image without reducing it: (list of 3D Volumes, 4D NIfTI header or None).

    A 3D image gives a one-element list. The same checks as :func:`load_volume` (constant images
    allowed: label maps). :func:`open_series` gives the volumes one at a time instead.
    """
    series, header = open_series(path)
    return list(series), header


def open_series(path):
    """Read an image for volume-by-volume use: (:class:`Series`, 4D NIfTI header or None).

    Checked as :func:`load_series`; the data are converted once to float32, volumes first, and each
    volume is a view of them (see :class:`Series`).
    """
    p = check_input_path(path)
    raw = _read(p)
    with np.errstate(all="ignore"):
        series, header = _series(raw, p)
    _issue(raw.notes, p)
    return series, header


class Series:
    """The volumes of a 3D or 4D image, as :class:`Volume` objects.

    A 4D image is held once, as float32 in (T, I, J, K) C order: every volume is then a
    C-contiguous block, handed out as a view (no copy per volume) in the layout the kernels read.

    Parameters
    ----------
    data : ndarray (I, J, K) or (T, I, J, K), float32, C-contiguous
    vox2ras : ndarray (4, 4)
    name : str
    header : nibabel header or None
    """

    def __init__(self, data, vox2ras, name, header):
        self._data, self.vox2ras, self.name, self.header = data, vox2ras, name, header
        self.shape = tuple(data.shape[-3:])

    def __len__(self):
        return 1 if self._data.ndim == 3 else self._data.shape[0]

    def __getitem__(self, t) -> Volume:
        n = len(self)
        if not -n <= t < n:
            raise IndexError(t)
        if self._data.ndim == 3:
            return Volume(self._data, self.vox2ras, self.name, "", self.header)
        t = int(t) % n
        return Volume(self._data[t], self.vox2ras, self.name, f"volume {t} of {n}", self.header)


def _series(raw: _Raw, p: Path):
    data = _squeeze(raw.data)
    if data.ndim not in (3, 4):
        raise InputError(f"expected a 3D or 4D image, got {data.ndim}D with shape {data.shape}", path=p)
    _check_dims(data.shape[:3], str(p))
    vox2ras = check_vox2ras(raw.vox2ras, name=raw.matrix_name, path=p)
    _check_extent(data.shape[:3], vox2ras, str(p))
    raw.data = None  # the float copy replaces the file's data
    if data.ndim == 4:  # volumes first: one copy, each volume C-contiguous (NIfTI stores them F-ordered)
        data = np.moveaxis(data, 3, 0)
    data = _clean(data, str(p), raw.notes)
    return Series(data, vox2ras, str(p), raw.header), raw.header
