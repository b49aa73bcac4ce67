"""Images in and out: NIfTI through nibabel, every other format through SimpleITK.

Everything that comes in is converted to a :class:`~regkl.volume.Volume` (RAS+); everything that
goes out is written atomically (temporary file in the same folder, fsync, rename).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .errors import InputError, OutputError
from .volume import Volume, check_vox2ras

#: LPS <-> RAS flip (its own inverse).
LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(NIFTI_SUFFIXES) or name.endswith((".hdr", ".img", ".img.gz", ".hdr.gz"))


def _reduce_4d(data: np.ndarray, how, path: str):
    """Reduce a 4D array (I, J, K, T) to 3D; returns (data, note)."""
    n = data.shape[3]
    if isinstance(how, str) and how.isdigit():
        how = int(how)
    if isinstance(how, (int, np.integer)):
        if not -n <= how < n:
            raise InputError(f"volume {how} requested but the series has {n} volumes (0..{n - 1})", path=path)
        return data[..., how], f"volume {int(how) % n} of {n}"
    if how == "mean":
        return np.mean(data, axis=3, dtype=np.float64), f"mean of {n} volumes"
    if how == "median":
        return np.median(data, axis=3), f"median of {n} volumes"
    raise InputError(f"--moving-volume must be mean, median or a volume index, got {how!r}", path=path)


def _finish(data: np.ndarray, vox2ras: np.ndarray, path: str, volume, header=None, allow_constant=False) -> Volume:
    """Squeeze trailing singleton axes, reduce 4D, clean non-finite values, build the Volume."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    note = ""
    if data.ndim == 4:
        data, note = _reduce_4d(data, volume, path)
    if data.ndim == 5:
        raise InputError(f"5D images are not supported (shape {data.shape})", path=path)
    if data.ndim != 3:
        raise InputError(f"expected a 3D or 4D image, got {data.ndim}D with shape {data.shape}", path=path)
    if min(data.shape) < 2:
        raise InputError(f"image is too small to register (shape {data.shape}); a 3D volume needs at "
                         "least 2 voxels along each axis", path=path)
    data = np.asarray(data, dtype=np.float32)
    finite = np.isfinite(data)
    if not finite.all():
        n_bad = int(data.size - np.count_nonzero(finite))
        if n_bad == data.size:
            raise InputError("every voxel is NaN or infinite", path=path)
        if n_bad > data.size // 2:
            raise InputError(f"{n_bad} of {data.size} voxels are NaN or infinite", path=path)
        warnings.warn(f"{path}: {n_bad} NaN/infinite voxels set to 0")
        data = np.where(finite, data, 0.0).astype(np.float32)
    if not allow_constant and float(data.max()) == float(data.min()):
        raise InputError(f"image is constant (every voxel is {float(data.min()):g})", path=path)
    vox2ras = check_vox2ras(vox2ras, name="voxel-to-world matrix", path=path)
    return Volume(data, vox2ras, path, note, header)


def _load_nifti(path: Path, volume, allow_constant=False) -> Volume:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        vox2ras = img.affine
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for damaged files
        raise InputError(f"cannot read as NIfTI: {_short(exc)}") from exc
    if vox2ras is None:
        raise InputError("image has no voxel-to-world matrix", path=path)
    return _finish(data, vox2ras, str(path), volume, header=img.header.copy(), allow_constant=allow_constant)


def _load_sitk(path: Path, volume, allow_constant=False) -> Volume:
    import SimpleITK as sitk

    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            files = reader.GetGDCMSeriesFileNames(str(path))
            if not files:
                raise InputError("folder holds no DICOM series", path=path)
            reader.SetFileNames(files)
            img = reader.Execute()
        else:
            img = sitk.ReadImage(str(path))
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"not an image SimpleITK can read: {_short(exc)}") from exc
    return _finish(*sitk_to_array(img), str(path), volume, allow_constant=allow_constant)


def sitk_to_array(img):
    """SimpleITK image -> (array in (i, j, k[, t]) order, vox2ras 4x4)."""
    import SimpleITK as sitk

    dim = img.GetDimension()
    arr = sitk.GetArrayFromImage(img)  # (k, j, i) or (t, k, j, i), components last
    if img.GetNumberOfComponentsPerPixel() > 1:
        arr = np.moveaxis(arr, -1, 0)  # components become the time axis
        dim_axes = list(range(arr.ndim))
        arr = np.transpose(arr, dim_axes[1:][::-1] + [0])
    else:
        arr = np.transpose(arr, list(range(arr.ndim))[::-1])
    n = min(dim, 3)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)[:n, :n]
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)[:n]
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)[:n]
    vox2lps = np.eye(4)
    vox2lps[:n, :n] = direction @ np.diag(spacing)
    vox2lps[:n, 3] = origin
    return arr, LPS_RAS @ vox2lps


def array_to_sitk(data: np.ndarray, vox2ras: np.ndarray):
    """3D array in (i, j, k) order + vox2ras -> SimpleITK image (LPS physical space)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    vox2lps = LPS_RAS @ vox2ras
    spacing = np.linalg.norm(vox2lps[:3, :3], axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetDirection((vox2lps[:3, :3] / spacing).ravel().tolist())
    img.SetOrigin(vox2lps[:3, 3].tolist())
    return img


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(exc).__name__)


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
        Missing, unreadable or invalid image (message names the file and the problem).
    """
    p = Path(path)
    if not p.exists():
        raise InputError("no such file or folder", path=p)
    if p.is_file() and not os.access(p, os.R_OK):
        raise InputError("file is not readable (permission denied)", path=p)
    if p.is_file() and p.stat().st_size == 0:
        raise InputError("file is empty", path=p)
    if p.is_dir() or not _is_nifti(p):
        return _load_sitk(p, volume, allow_constant)
    return _load_nifti(p, volume, allow_constant)


def load_series(path):
    """Read an image without reducing it: (list of 3D Volumes, 4D NIfTI header or None).

    A 3D image gives a one-element list. Used to resample every volume of a 4D series.
    """
    p = Path(path)
    if not p.exists():
        raise InputError("no such file or folder", path=p)
    if p.is_file() and _is_nifti(p):
        import nibabel as nib

        try:
            img = nib.load(str(p))
            data = np.asanyarray(img.dataobj)
        except Exception as exc:
            raise InputError(f"cannot read as NIfTI: {_short(exc)}") from exc
        header = img.header.copy()
        vox2ras = img.affine
    else:
        import SimpleITK as sitk

        try:
            data, vox2ras = sitk_to_array(sitk.ReadImage(str(p)))
        except RuntimeError as exc:
            raise InputError(f"not an image SimpleITK can read: {_short(exc)}") from exc
        header = None
    while data.ndim > 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 3:
        return [_finish(data, vox2ras, str(p), "mean", header=header, allow_constant=True)], header
    if data.ndim != 4:
        raise InputError(f"expected a 3D or 4D image, got shape {data.shape}", path=p)
    vols = [_finish(np.asarray(data[..., t]), vox2ras, str(p), "mean", header=header, allow_constant=True)
            for t in range(data.shape[3])]
    return vols, header


#: Name pattern of the temporary files :func:`atomic_path` creates (".NAME.XXXXXXXX.tmpSUFFIX").
TEMP_PATTERN = r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9.]+)?$"


def stale_temp_files(folder) -> list:
    """Temporary files left in ``folder`` (recursively) by a run that was killed mid-write."""
    import re

    rx = re.compile(TEMP_PATTERN)
    return sorted(p for p in Path(folder).rglob(".*") if p.is_file() and rx.match(p.name))


@contextlib.contextmanager
def atomic_path(path, *, protect=()):
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    Parameters
    ----------
    path : str or Path
        Final destination.
    protect : iterable of paths
        Inputs that must never be overwritten.
    """
    dest = Path(path)
    for other in protect:
        if other is not None and Path(other).exists() and dest.exists() and os.path.samefile(dest, other):
            raise OutputError("output would overwrite an input", path=dest)
        if other is not None and os.path.abspath(dest) == os.path.abspath(other):
            raise OutputError("output would overwrite an input", path=dest)
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError("output folder does not exist", path=dest)
    if dest.is_dir():
        raise OutputError("output path is a folder", path=dest)
    if not os.access(folder, os.W_OK):
        raise OutputError("output folder is not writable", path=dest)
    suffix = "".join(dest.suffixes[-2:]) if dest.name.lower().endswith(".gz") else dest.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".tmp{suffix}", dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except OSError as exc:
        raise OutputError(f"cannot write: {exc.strerror or exc}", path=dest) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


#: Uncompressed bytes per gzip member when writing .nii.gz (members are compressed in parallel).
GZIP_CHUNK = 4 << 20


def write_gzip_parallel(raw: bytes, path, *, level: int = 1, threads: int | None = None) -> None:
    """Write ``raw`` as a gzip file made of concatenated members compressed in parallel.

    A multi-member gzip file is standard (RFC 1952): zlib's gzread (ITK, FSL, AFNI, FreeSurfer),
    Python's gzip module and nibabel read it as one stream. zlib releases the GIL, so threads scale.
    """
    from concurrent.futures import ThreadPoolExecutor

    try:  # ISA-L's deflate: ~10x faster than zlib at the same ratio
        from isal.igzip import compress
    except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
        from gzip import compress

    view = memoryview(raw)
    chunks = [view[i:i + GZIP_CHUNK] for i in range(0, len(raw), GZIP_CHUNK)] or [view]
    workers = threads or min(len(chunks), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        members = pool.map(lambda c: compress(c, compresslevel=level, mtime=0), chunks)
        with open(path, "wb") as fh:
            for member in members:
                fh.write(member)


def save_array(data: np.ndarray, vox2ras: np.ndarray, path, *, like: Volume | None = None, protect=(),
               dtype=np.float32, zooms_t: float | None = None) -> None:
    """Write a 3D or 4D array on a grid atomically (see :func:`save_volume`); 4D only as NIfTI."""
    dest = Path(path)
    if data.ndim == 3:
        save_volume(Volume(data, vox2ras), dest, like=like, protect=protect, dtype=dtype)
        return
    if not _is_nifti(dest):
        raise OutputError("a 4D output must be NIfTI (.nii or .nii.gz)", path=dest)
    _save_nifti(np.asarray(data).astype(dtype, copy=False), vox2ras, dest, like, protect, dtype, zooms_t)


def _save_nifti(data, vox2ras, dest, like, protect, dtype, zooms_t=None):
    import nibabel as nib

    with atomic_path(dest, protect=protect) as tmp:
        header = getattr(like, "header", None)
        cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        header = header.copy() if isinstance(header, nib.Nifti1Header) else None
        img = cls(data, vox2ras, header=header)
        img.header.set_data_dtype(dtype)
        img.header["scl_slope"] = 1.0
        img.header["scl_inter"] = 0.0
        if data.ndim == 4 and zooms_t is not None:
            img.header.set_zooms(tuple(img.header.get_zooms()[:3]) + (float(zooms_t),))
        sform_code = int(header["sform_code"]) if header is not None and header["sform_code"] > 0 else 2
        qform_code = int(header["qform_code"]) if header is not None and header["qform_code"] > 0 else 2
        img.set_sform(vox2ras, sform_code)
        img.set_qform(vox2ras, qform_code)
        if dest.name.lower().endswith(".nii.gz"):
            write_gzip_parallel(img.to_bytes(), tmp)
        else:
            nib.save(img, str(tmp))


def save_volume(vol: Volume, path, *, like: Volume | None = None, protect=(), dtype=np.float32) -> None:
    """Write a volume atomically; NIfTI keeps the header of ``like`` (its codes and units).

    Parameters
    ----------
    vol : Volume
    path : str or Path
        Destination; the format follows the extension (NIfTI via nibabel, others via SimpleITK).
    like : Volume, optional
        Image whose NIfTI header (sform/qform codes, units, description) is reused.
    protect : iterable of paths
        Inputs that must not be overwritten.
    """
    dest = Path(path)
    data = vol.data.astype(dtype, copy=False)
    if _is_nifti(dest):
        _save_nifti(data, vol.vox2ras, dest, like, protect, dtype)
        return
    import SimpleITK as sitk

    with atomic_path(dest, protect=protect) as tmp:
        try:
            sitk.WriteImage(array_to_sitk(data, vol.vox2ras), str(tmp))
        except RuntimeError as exc:
            raise OutputError(f"cannot write image: {_short(exc)}", path=dest) from exc
