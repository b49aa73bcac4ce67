"""SimpleITK images: reading every format other than NIfTI (DICOM series folders, NRRD,
MetaImage...), and arrays to and from SimpleITK images (ITK's LPS world <-> RAS+)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .errors import InputError
from .memory import check_memory
from .nifti_read import _check_dtype, _Raw
from .quiet import _short, quiet_native_stderr


#: LPS <-> RAS flip (its own inverse).
LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def itk_reason(exc: Exception) -> str:
    """The useful part of an ITK exception message: the text of its ERROR line, without the C++ file,
    line and object address (``ITK ERROR: MetaImageIO(0x55...): File cannot be read`` -> ``File
    cannot be read``)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = next((ln for ln in lines if "ERROR:" in ln), lines[-1] if lines else type(exc).__name__)
    text = text.split("ERROR:", 1)[-1].strip()
    text = re.sub(r"^\w+(<[^>]*>)?\(0x[0-9a-fA-F]+\):\s*", "", text)
    return _short(Exception(text or type(exc).__name__))


def _sitk_pixel_dtype(reader):
    import SimpleITK as sitk

    pid = reader.GetPixelID()
    name = sitk.GetPixelIDValueAsString(pid).lower()
    if "complex" in name:
        raise InputError(f"complex-valued images ({name}) are not supported; use the magnitude",
                         path=reader.GetFileName())
    return 8 if ("64" in name or "double" in name) else 4


def _read_sitk(path: Path) -> _Raw:
    import SimpleITK as sitk

    with quiet_native_stderr():
        try:
            if path.is_dir():
                series = sitk.ImageSeriesReader()
                files = series.GetGDCMSeriesFileNames(str(path))
                if not files:
                    raise InputError("folder holds no DICOM series (give an image file or a DICOM folder)",
                                     path=path)
                info = sitk.ImageFileReader()
                info.SetFileName(files[0])
                info.ReadImageInformation()
                size = tuple(info.GetSize()[:2]) + (len(files),)
                check_memory(size + ((info.GetNumberOfComponents(),) if info.GetNumberOfComponents() > 1 else ()),
                             np.float64 if _sitk_pixel_dtype(info) == 8 else np.float32, path)
                series.SetFileNames(files)
                img = series.Execute()
            else:
                reader = sitk.ImageFileReader()
                reader.SetFileName(str(path))
                reader.ReadImageInformation()
                size = tuple(int(s) for s in reader.GetSize())
                if reader.GetNumberOfComponents() > 1:
                    size = size + (int(reader.GetNumberOfComponents()),)
                if not size or any(s <= 0 for s in size):
                    raise InputError(f"image dimensions {size} are not positive", path=path)
                check_memory(size, np.float64 if _sitk_pixel_dtype(reader) == 8 else np.float32, path)
                img = reader.Execute()
            data, vox2ras = sitk_to_array(img)
        except InputError:
            raise
        except MemoryError as exc:
            raise InputError("not enough memory to read the image", path=path) from exc
        except Exception as exc:  # noqa: BLE001 - ITK raises RuntimeError; anything else is the same
            what = "DICOM series" if path.is_dir() else "image file"
            raise InputError(f"not an {what} regkl can read (NIfTI, NRRD, MetaImage, MINC, ...): "
                             f"{itk_reason(exc)}", path=path) from exc
    _check_dtype(data.dtype, path)
    return _Raw(data, vox2ras, None, "voxel-to-world matrix", [])


def sitk_to_array(img):
    """SimpleITK image -> (array in (i, j, k[, t]) order, vox2ras 4x4)."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)  # (k, j, i) or (t, k, j, i), components last
    if img.GetNumberOfComponentsPerPixel() > 1:
        arr = np.moveaxis(arr, -1, 0)  # components become the time axis
        dim_axes = list(range(arr.ndim))
        arr = np.transpose(arr, dim_axes[1:][::-1] + [0])
    else:
        arr = np.transpose(arr, list(range(arr.ndim))[::-1])
    return arr, sitk_vox2ras(img)


def sitk_vox2ras(img) -> np.ndarray:
    """(4, 4) voxel -> RAS+ mm matrix of the first three axes of a SimpleITK image, or of an
    ``ImageFileReader`` after ``ReadImageInformation`` (ITK's LPS geometry, flipped to RAS)."""
    dim = img.GetDimension()
    n = min(dim, 3)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)[:n, :n]
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)[:n]
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)[:n]
    vox2lps = np.eye(4)
    vox2lps[:n, :n] = direction @ np.diag(spacing)
    vox2lps[:n, 3] = origin
    return LPS_RAS @ vox2lps


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
