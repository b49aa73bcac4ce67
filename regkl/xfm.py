"""Transform files. The only module that converts between regkl's RAS convention and others.

Inside regkl a transform is a 4x4 matrix ``fixed2moving`` in RAS+ mm (fixed world point ->
moving world point). File formats:

``itk``
    ITK text transform (``.tfm``/``.txt``), ``AffineTransform_double_3_3`` in LPS mm. ITK
    transforms also map fixed (reference) points to moving points, so the conversion is only the
    RAS<->LPS flip: ``M_lps = F @ M_ras @ F`` with ``F = diag(-1, -1, 1, 1)``. Reading goes
    through SimpleITK, so any linear ITK transform (``.tfm``, ``.txt``, ANTs ``.mat``) is accepted.
``ras``
    Plain-text 4x4 RAS+ matrix with ``#`` comment lines stating the convention.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError
from .io import LPS_RAS, atomic_path

ITK_MAGIC = "#Insight Transform File"


def ras_to_lps(fixed2moving_ras: np.ndarray) -> np.ndarray:
    """RAS fixed->moving matrix to the LPS matrix ITK uses (same direction)."""
    return LPS_RAS @ fixed2moving_ras @ LPS_RAS


lps_to_ras = ras_to_lps  # the flip is its own inverse


def _format_numbers(values) -> str:
    return " ".join(repr(float(v)) for v in values)


def itk_text(fixed2moving: np.ndarray) -> str:
    """ITK text transform (LPS, fixed->moving) of a RAS fixed->moving matrix."""
    m = ras_to_lps(np.asarray(fixed2moving, dtype=np.float64))
    return (f"{ITK_MAGIC} V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
            f"Parameters: {_format_numbers(list(m[:3, :3].ravel()) + list(m[:3, 3]))}\n"
            f"FixedParameters: 0 0 0\n")


def write_itk(path, fixed2moving: np.ndarray, *, protect=()) -> None:
    """Write an ITK text transform (LPS, fixed->moving) that SimpleITK and ANTs read."""
    _write_text(path, itk_text(fixed2moving), protect)


def _parse_affine_text(path):
    """Exact parse of a single 3D Affine/MatrixOffset ITK text transform, or None if not one."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in lines if ":" in line and not line.startswith("#"))
    kind = fields.get("Transform", "").strip()
    if kind.split("_")[0] not in ("AffineTransform", "MatrixOffsetTransformBase") or not kind.endswith("_3_3"):
        return None
    if sum(1 for line in lines if line.startswith("Transform:")) != 1:
        return None
    try:
        params = np.array(fields["Parameters"].split(), dtype=np.float64)
        centre = np.array(fields.get("FixedParameters", "0 0 0").split(), dtype=np.float64)
    except (KeyError, ValueError):
        return None
    if params.shape != (12,) or centre.shape != (3,):
        return None
    lin = params[:9].reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = lin
    m[:3, 3] = params[9:] + centre - lin @ centre
    return m


def read_itk(path) -> np.ndarray:
    """Read any linear ITK transform file as a RAS fixed->moving 4x4 matrix.

    Single affine text transforms (what regkl, ANTs and elastix write) are parsed exactly; anything
    else goes through SimpleITK.
    """
    import SimpleITK as sitk

    exact = _parse_affine_text(path)
    if exact is not None:
        if not np.all(np.isfinite(exact)):
            raise InputError("transform has non-finite parameters", path=path)
        return lps_to_ras(exact)

    try:
        tx = sitk.ReadTransform(str(path))
    except RuntimeError as exc:
        raise InputError(f"not a transform SimpleITK can read: {' '.join(str(exc).split())[:200]}",
                         path=path) from exc
    if tx.GetDimension() != 3:
        raise InputError(f"expected a 3D transform, got {tx.GetDimension()}D", path=path)
    basis = np.vstack([np.zeros(3), np.eye(3)])
    mapped = np.array([tx.TransformPoint(tuple(map(float, p))) for p in basis])
    m = np.eye(4)
    m[:3, 3] = mapped[0]
    m[:3, :3] = (mapped[1:] - mapped[0]).T
    probe = np.array([37.0, -91.0, 53.0])
    if not np.allclose(tx.TransformPoint(tuple(probe)), m[:3, :3] @ probe + m[:3, 3], atol=1e-4):
        raise InputError("transform is not linear (affine); only linear transforms are supported", path=path)
    return lps_to_ras(m)


def ras_text(fixed2moving: np.ndarray) -> str:
    """The 4x4 RAS matrix as text, with comments stating the convention (full precision)."""
    m = np.asarray(fixed2moving, dtype=np.float64)
    rows = "\n".join(" ".join(repr(float(v)) for v in row) for row in m)
    return ("# regkl transform: 4x4 matrix, RAS+ millimetres\n"
            "# maps a FIXED (reference) world point to the MOVING world point: y = M @ [x, 1]\n"
            f"{rows}\n")


def write_ras(path, fixed2moving: np.ndarray, *, protect=()) -> None:
    """Write the 4x4 RAS matrix as text, with comments stating the convention."""
    _write_text(path, ras_text(fixed2moving), protect)


def read_ras(path) -> np.ndarray:
    """Read a 4x4 RAS fixed->moving matrix written by :func:`write_ras` (or any 4x4 text)."""
    try:
        m = np.loadtxt(str(path), comments="#", dtype=np.float64)
    except (ValueError, OSError) as exc:
        raise InputError(f"not a 4x4 text matrix: {exc}", path=path) from exc
    if m.shape != (4, 4) or not np.all(np.isfinite(m)) or not np.allclose(m[3], [0, 0, 0, 1]):
        raise InputError(f"not a valid 4x4 homogeneous matrix (shape {m.shape})", path=path)
    return m


def _write_text(path, text: str, protect) -> None:
    with atomic_path(path, protect=protect) as tmp:
        with open(tmp, "w") as fh:
            fh.write(text)


#: name -> (reader, writer)
FORMATS = {"itk": (read_itk, write_itk), "ras": (read_ras, write_ras)}


def detect_format(path) -> str:
    """'itk' for ITK transform files (by content or extension), else 'ras'."""
    p = Path(path)
    if p.suffix.lower() in (".tfm", ".mat", ".h5", ".hdf5"):
        return "itk"
    try:
        with open(p, "r", errors="replace") as fh:
            head = fh.read(64)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror}", path=p) from exc
    return "itk" if head.startswith(ITK_MAGIC) else "ras"


def load_transform(path, fmt: str | None = None) -> np.ndarray:
    """Read a transform file as a RAS fixed->moving 4x4 matrix (format detected if not given)."""
    p = Path(path)
    if not p.is_file():
        raise InputError("no such transform file", path=p)
    fmt = fmt or detect_format(p)
    if fmt not in FORMATS:
        raise InputError(f"unknown transform format {fmt!r}; choose one of {', '.join(FORMATS)}", path=p)
    return FORMATS[fmt][0](p)


def transform_text(fixed2moving: np.ndarray, fmt: str) -> str:
    """The text a transform file of format ``fmt`` would hold."""
    texts = {"itk": itk_text, "ras": ras_text}
    if fmt not in texts:
        raise InputError(f"unknown transform format {fmt!r}; choose one of {', '.join(texts)}")
    return texts[fmt](fixed2moving)


def save_transform(path, fixed2moving: np.ndarray, fmt: str, *, protect=()) -> None:
    """Write a RAS fixed->moving matrix in format ``fmt`` (see :data:`FORMATS`)."""
    if fmt not in FORMATS:
        raise InputError(f"unknown transform format {fmt!r}; choose one of {', '.join(FORMATS)}")
    FORMATS[fmt][1](path, fixed2moving, protect=protect)
