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
from .io import LPS_RAS, atomic_path, itk_reason, quiet_native_stderr

ITK_MAGIC = "#Insight Transform File"

#: Transform files larger than this are refused (a linear transform file is a few kB; a larger
#: file is a displacement field or not a transform at all).
MAX_TRANSFORM_BYTES = 16 << 20


def check_transform_matrix(m, path=None) -> np.ndarray:
    """Validate a fixed->moving 4x4 matrix read from a file; InputError naming the file if not usable.

    Finite, last row ``[0, 0, 0, 1]``, and invertible: a singular matrix would map the whole
    image onto a plane (and ``--inverse`` could not use it).
    """
    m = np.asarray(m, dtype=np.float64)
    if m.shape != (4, 4):
        raise InputError(f"transform must be a 4x4 matrix, got shape {m.shape}", path=path)
    if not np.all(np.isfinite(m)):
        raise InputError("transform has non-finite parameters (NaN or infinite)", path=path)
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
        raise InputError(f"transform's last row is {m[3].tolist()}, expected [0, 0, 0, 1]", path=path)
    with np.errstate(all="ignore"):
        scale = np.linalg.norm(m[:3, :3], axis=0)
        det = float(np.linalg.det(m[:3, :3]))
        if not (np.all(scale > 1e-8) and abs(det) > 1e-8 * float(np.prod(scale)) and np.all(scale < 1e6)
                and np.isfinite(det)):
            raise InputError(f"transform is singular or degenerate (determinant {det:.3g}; column norms "
                             f"{np.round(scale, 6).tolist()})", path=path)
        if np.any(np.abs(m[:3, 3]) > 1e9):
            raise InputError(f"transform's translation {m[:3, 3].tolist()} mm is implausible", path=path)
    return m


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


def itk_series_text(fixed2moving_series) -> str:
    """ITK text file of several transforms in order (``#Transform 0``, ``#Transform 1``, ...), each
    as :func:`itk_text`: the per-volume head-motion transforms of a series, which nitransforms reads
    as a ``LinearTransformsMapping`` (fMRIPrep's ``desc-hmc_xfm`` convention)."""
    blocks = []
    for t, m in enumerate(fixed2moving_series):
        one = itk_text(m).split("\n", 2)[2]
        blocks.append(f"#Transform {t}\n{one}")
    return f"{ITK_MAGIC} V1.0\n" + "".join(blocks)


def write_itk(path, fixed2moving: np.ndarray, *, protect=()) -> None:
    """Write an ITK text transform (LPS, fixed->moving) that SimpleITK and ANTs read."""
    _write_text(path, itk_text(fixed2moving), protect)


#: Linear 3D ITK transform types: name -> (number of parameters, allowed numbers of fixed parameters).
#: ITK does not check these counts when it reads a file (too few parameters make it read past its
#: buffer or crash), so regkl checks them before handing a file to SimpleITK.
LINEAR_ITK_TYPES = {
    "AffineTransform": (12, (3,)),
    "MatrixOffsetTransformBase": (12, (3,)),
    "Rigid3DTransform": (12, (3,)),
    "Euler3DTransform": (6, (3, 4)),
    "VersorRigid3DTransform": (6, (3,)),
    "VersorTransform": (3, (3,)),
    "QuaternionRigidTransform": (7, (3,)),
    "Similarity3DTransform": (7, (3,)),
    "ScaleTransform": (3, (3,)),
    "ScaleLogarithmicTransform": (3, (3,)),
    "ScaleVersor3DTransform": (9, (3,)),
    "ScaleSkewVersor3DTransform": (15, (3,)),
    "ComposeScaleSkewVersor3DTransform": (12, (3,)),
    "TranslationTransform": (3, (0,)),
    "IdentityTransform": (0, (0,)),
}
#: Types regkl computes exactly itself (no SimpleITK): 9 matrix entries, 3 translations, centre.
EXACT_ITK_TYPES = ("AffineTransform", "MatrixOffsetTransformBase", "Rigid3DTransform")


def _numbers(tokens, what, path) -> np.ndarray:
    try:
        values = np.array([float(t) for t in tokens], dtype=np.float64)
    except ValueError as exc:
        bad = next((t for t in tokens if not _is_float(t)), "?")
        raise InputError(f"{what} are not all numbers (found {bad[:20]!r})", path=path) from exc
    if not np.all(np.isfinite(values)):
        raise InputError(f"transform has non-finite {what} (NaN or infinite)", path=path)
    return values


def _is_float(token) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _check_itk_blocks(blocks, path) -> list:
    """Validate (type, parameters, fixed parameters) blocks; returns [(base type, params, fixed)]."""
    if not blocks:
        raise InputError("no 'Transform:' entry; not an ITK transform file", path=path)
    if blocks[0][0].startswith("CompositeTransform"):
        if any(part is not None and len(part) for part in blocks[0][1:]):
            raise InputError("a CompositeTransform entry has no parameters of its own", path=path)
        blocks = blocks[1:]
        if not blocks:
            raise InputError("the CompositeTransform holds no transform", path=path)
    checked = []
    for kind, params, fixed in blocks:
        base, _, precision_dims = kind.partition("_")
        if not precision_dims.endswith("_3_3") and precision_dims.count("_") >= 1:
            raise InputError(f"expected a 3D transform, got {kind!r}", path=path)
        if base not in LINEAR_ITK_TYPES or precision_dims not in ("double_3_3", "float_3_3"):
            raise InputError(f"transform type {kind!r} is not a linear 3D ITK transform (only linear "
                             "transforms are supported: Affine, Euler3D, Similarity3D, Versor..., Translation)",
                             path=path)
        n_params, n_fixed = LINEAR_ITK_TYPES[base]
        if params is None or len(params) != n_params:
            raise InputError(f"{kind} needs {n_params} parameters, the file gives "
                             f"{0 if params is None else len(params)}", path=path)
        fixed = np.zeros(3) if fixed is None and base in EXACT_ITK_TYPES else fixed
        if (0 if fixed is None else len(fixed)) not in n_fixed:
            raise InputError(f"{kind} needs {' or '.join(map(str, n_fixed))} fixed parameters, the file gives "
                             f"{0 if fixed is None else len(fixed)}", path=path)
        checked.append((base, params, fixed))
    return checked


def _itk_text_blocks(path) -> list:
    """Parse an ITK text transform file (.tfm/.txt) into checked blocks, refusing anything odd."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path=path) from exc
    if b"\0" in text:
        raise InputError("not an ITK text transform (binary content)", path=path)
    blocks = []
    for number, line in enumerate(text.decode("utf-8", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep or key not in ("Transform", "Parameters", "FixedParameters"):
            raise InputError(f"not an ITK text transform (line {number}: {line[:40]!r})", path=path)
        if key == "Transform":
            blocks.append([value.strip(), None, None])
            continue
        if not blocks:
            raise InputError(f"'{key}:' before any 'Transform:' line (line {number})", path=path)
        slot = 1 if key == "Parameters" else 2
        if blocks[-1][slot] is not None:
            raise InputError(f"two '{key}:' lines for one transform (line {number})", path=path)
        blocks[-1][slot] = _numbers(value.split(), "parameters" if slot == 1 else "fixed parameters", path)
    return _check_itk_blocks([tuple(b) for b in blocks], path)


def _itk_mat_blocks(path) -> list:
    """Parse an ITK/ANTs MATLAB transform file (.mat) into checked blocks (no SimpleITK)."""
    import scipy.io

    try:
        with np.errstate(all="ignore"):
            content = scipy.io.loadmat(str(path))
    except Exception as exc:  # noqa: BLE001 - scipy raises many types for damaged files
        raise InputError(f"not a MATLAB transform file (ITK/ANTs .mat): {' '.join(str(exc).split())[:150]}",
                         path=path) from exc
    names = [k for k in content if not k.startswith("__") and k != "fixed"]
    if len(names) != 1:
        raise InputError(f"a .mat transform holds one transform and 'fixed'; found {sorted(names)}", path=path)
    try:
        params = np.asarray(content[names[0]], dtype=np.float64).ravel()
        fixed = np.asarray(content["fixed"], dtype=np.float64).ravel() if "fixed" in content else None
    except (TypeError, ValueError) as exc:
        raise InputError("the .mat transform's variables are not numeric arrays", path=path) from exc
    if not (np.all(np.isfinite(params)) and (fixed is None or np.all(np.isfinite(fixed)))):
        raise InputError("transform has non-finite parameters (NaN or infinite)", path=path)
    return _check_itk_blocks([(names[0], params, fixed)], path)


def _exact_matrix(params, centre) -> np.ndarray:
    """LPS fixed->moving matrix of an Affine/MatrixOffset transform (matrix, translation, centre)."""
    lin = params[:9].reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = lin
    m[:3, 3] = params[9:] + centre - lin @ centre
    return m


def read_itk(path) -> np.ndarray:
    """Read any linear ITK transform file as a RAS fixed->moving 4x4 matrix.

    Text (``.tfm``/``.txt``) and MATLAB (``.mat``, ANTs) files are parsed and checked by regkl
    first (transform types, parameter counts, numbers); single affine transforms (what regkl, ANTs
    and elastix write) are computed exactly, other linear types and HDF5 files go through
    SimpleITK.
    """
    import SimpleITK as sitk

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        blocks = None
    elif suffix == ".mat":
        blocks = _itk_mat_blocks(p)
    else:
        blocks = _itk_text_blocks(p)
    if blocks is not None and len(blocks) == 1 and blocks[0][0] in EXACT_ITK_TYPES:
        with np.errstate(all="ignore"):
            exact = _exact_matrix(blocks[0][1], blocks[0][2])
        if not np.all(np.isfinite(exact)):
            raise InputError("transform has non-finite parameters (NaN or infinite)", path=path)
        return check_transform_matrix(lps_to_ras(exact), path)

    with quiet_native_stderr():
        try:
            tx = sitk.ReadTransform(str(path))
        except Exception as exc:  # noqa: BLE001 - ITK raises RuntimeError; anything else is the same
            raise InputError(f"not a transform file regkl can read (ITK .tfm/.txt/.mat/.h5 or a 4x4 text "
                             f"matrix): {itk_reason(exc)}", path=path) from exc
        try:
            if tx.GetDimension() != 3:
                raise InputError(f"expected a 3D transform, got {tx.GetDimension()}D", path=path)
            basis = np.vstack([np.zeros(3), np.eye(3)])
            mapped = np.array([tx.TransformPoint(tuple(map(float, p))) for p in basis], dtype=np.float64)
            probe = np.array([37.0, -91.0, 53.0])
            probed = np.asarray(tx.TransformPoint(tuple(probe)), dtype=np.float64)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"cannot evaluate the transform: {itk_reason(exc)}", path=path) from exc
    m = np.eye(4)
    m[:3, 3] = mapped[0]
    m[:3, :3] = (mapped[1:] - mapped[0]).T
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(probed))):
        raise InputError("transform has non-finite parameters (NaN or infinite)", path=path)
    with np.errstate(all="ignore"):
        linear = np.allclose(probed, m[:3, :3] @ probe + m[:3, 3], atol=1e-4)
    if not linear:
        raise InputError("transform is not linear (affine); only linear transforms are supported", path=path)
    return check_transform_matrix(lps_to_ras(m), path)


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
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data": reported below instead
            m = np.loadtxt(str(path), comments="#", dtype=np.float64, ndmin=2)
    except UnicodeDecodeError as exc:
        raise InputError("not a 4x4 text matrix (binary content)", path=path) from exc
    except (ValueError, OSError, IndexError, TypeError) as exc:
        text = " ".join(str(exc).split()).split(";")[0]  # numpy's reason, without its advice
        raise InputError(f"not a 4x4 text matrix of numbers ({text[:150]})", path=path) from exc
    if m.shape != (4, 4):
        raise InputError(f"not a 4x4 text matrix (found {m.shape[0]} rows of {m.shape[1]} numbers)", path=path)
    return check_transform_matrix(m, path)


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
    import os

    p = Path(path)
    try:
        if not p.exists():
            raise InputError("no such transform file", path=p)
        if p.is_dir():
            raise InputError("is a folder, expected a transform file", path=p)
        if not p.is_file():
            raise InputError("not a regular file (a pipe, socket or device); give a transform file", path=p)
        if not os.access(p, os.R_OK):
            raise InputError("transform file is not readable (permission denied)", path=p)
        size = p.stat().st_size
    except OSError as exc:
        raise InputError(f"cannot access: {exc.strerror or exc}", path=p) from exc
    if size == 0:
        raise InputError("transform file is empty", path=p)
    if size > MAX_TRANSFORM_BYTES:
        raise InputError(f"file is {size / 2**20:.0f} MiB, too large for a linear transform (a few kB); "
                         "displacement fields are not supported", path=p)
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
