"""ITK transform files (text ``.tfm``/``.txt``, MATLAB ``.mat``, HDF5 ``.h5``): regkl's own checks.

ITK does not check a file's parameter counts when it reads it (too few parameters make it read
past its buffer or crash), so every ITK file is parsed and validated here before any library sees
it; single affine transforms (what regkl, ANTs and elastix write) are computed exactly, other
linear types and HDF5 files go through SimpleITK. Matrices come out in ITK's own LPS convention
(fixed->moving); :mod:`regkl.xfm` converts them to RAS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError
from .quiet import quiet_native_stderr
from .sitk_images import itk_reason

ITK_MAGIC = "#Insight Transform File"


def itk_text(fixed2moving_lps: np.ndarray) -> str:
    """ITK text transform (``AffineTransform_double_3_3``, full precision) of an LPS fixed->moving matrix."""
    m = np.asarray(fixed2moving_lps, dtype=np.float64)
    numbers = " ".join(repr(float(v)) for v in list(m[:3, :3].ravel()) + list(m[:3, 3]))
    return (f"{ITK_MAGIC} V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
            f"Parameters: {numbers}\nFixedParameters: 0 0 0\n")


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
    elif len(blocks) > 1:
        # ITK itself would read the first one and drop the others: never a silent choice
        raise InputError(f"holds {len(blocks)} separate transforms (e.g. one per volume, as regkl realign's "
                         "head-motion file), not one; give a file with a single transform (or a "
                         "CompositeTransform, whose parts are applied in order)", path=path)
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


def _nonlinear_parts(tx) -> str:
    """Names of the non-linear parts of a SimpleITK transform (a composite's, in order)."""
    import SimpleITK as sitk

    if tx.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(tx)
        parts = [composite.GetNthTransform(i) for i in range(composite.GetNumberOfTransforms())]
        names = [t.GetName() for t in parts if not t.IsLinear()]
        return ", ".join(names) + " inside a CompositeTransform" if names else "CompositeTransform"
    return tx.GetName()


def read_itk_lps(path, container: str = "text") -> np.ndarray:
    """Read any linear ITK transform file as an LPS fixed->moving 4x4 matrix (finite; not yet validated).

    Text (``.tfm``/``.txt``) and MATLAB (``.mat``, ANTs) files are parsed and checked by regkl
    first (transform types, parameter counts, numbers); single affine transforms (what regkl, ANTs
    and elastix write) are computed exactly, other linear types and HDF5 files go through
    SimpleITK. ``container``: ``text``, ``mat`` (MATLAB v4/v5) or ``h5`` (HDF5).
    """
    import SimpleITK as sitk

    p = Path(path)
    blocks = {"h5": lambda: None, "mat": lambda: _itk_mat_blocks(p), "text": lambda: _itk_text_blocks(p)}[container]()
    if blocks is not None and len(blocks) == 1 and blocks[0][0] in EXACT_ITK_TYPES:
        with np.errstate(all="ignore"):
            exact = _exact_matrix(blocks[0][1], blocks[0][2])
        if not np.all(np.isfinite(exact)):
            raise InputError("transform has non-finite parameters (NaN or infinite)", path=path)
        return exact

    with quiet_native_stderr():
        try:
            tx = sitk.ReadTransform(str(path))
        except Exception as exc:  # noqa: BLE001 - ITK raises RuntimeError; anything else is the same
            raise InputError(f"not a transform file regkl can read (ITK .tfm/.txt/.mat/.h5 or a 4x4 text "
                             f"matrix): {itk_reason(exc)}", path=path) from exc
        try:
            if tx.GetDimension() != 3:
                raise InputError(f"expected a 3D transform, got {tx.GetDimension()}D", path=path)
            if not tx.IsLinear():  # ITK's own answer, for every part of a composite (probing points misses local warps)
                raise InputError(f"holds a transform that is not linear ({_nonlinear_parts(tx)}); only linear "
                                 "(affine) transforms are supported: apply warps with the tool that made them",
                                 path=path)
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
    return m


