"""Transform files: the one adapter between regkl's convention and every transform file format.

Inside regkl a transform is a 4x4 matrix ``fixed2moving`` in RAS+ mm (fixed world point ->
moving world point). Every other convention exists only here, at the file boundary, and each
file format is one entry of :data:`FORMATS`:

``ras``
    regkl's own text: the 4x4 RAS+ fixed->moving matrix under ``#`` comment lines stating the
    convention (the first one is :data:`RAS_HEADER`).
``itk``
    ITK/ANTs/SimpleITK linear transforms: text ``.tfm``/``.txt``, binary MATLAB ``.mat`` (as ANTs
    writes) and HDF5 ``.h5``. Same direction as regkl, in LPS: ``M_lps = F @ M_ras @ F`` with
    ``F = diag(-1, -1, 1, 1)``. Read with regkl's own checks (:mod:`regkl.itk_files`); text is
    written at full precision (``repr``), ``.mat`` through nitransforms, ``.h5`` through SimpleITK.
``fsl``
    FSL FLIRT matrices (``-omat``): they map the INPUT (moving) image's scaled-voxel coordinates to
    the REFERENCE (fixed) image's (voxel index times voxel size, the first axis mirrored when the
    voxel-to-world matrix has a positive determinant), so they need both images' grids.
``afni``
    AFNI ``.aff12.1D`` (one line of 12 numbers, DICOM/LPS, base -> source, with AFNI's handling of
    oblique grids, so it needs both images' grids).
``lta``
    FreeSurfer LTA (``.lta``, with the two volumes' geometry inside).

FSL, AFNI and LTA conversions go through nitransforms (:func:`nitransforms.io.get_linear_factory`);
regkl validates every file first (size, text, numbers, finite, last row ``0 0 0 1``, invertible)
and every matrix it produces. A file's format is never guessed: it is told by its content (the
ITK header, regkl's header, LTA's keys, a binary MATLAB or HDF5 container), by a suffix that only
one format uses (``.lta``, ``.aff12.1D``/``.1D``, ``.tfm``, ``.h5``), or by an explicit format
name; a bare matrix (no header) is refused without one: it could be RAS, LPS, FSL or AFNI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError, OutputError
from .outputs import atomic_path
from .sitk_images import LPS_RAS
from .itk_files import ITK_MAGIC, itk_text, read_itk_lps

#: Transform files larger than this are refused (a linear transform file is a few kB; a larger
#: file is a displacement field or not a transform at all).
MAX_TRANSFORM_BYTES = 16 << 20
#: First line (or its start) of regkl's RAS matrix files: what makes a 4x4 text matrix regkl's own.
RAS_HEADER = "# regkl transform: 4x4 matrix, RAS+ millimetres"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def check_transform_matrix(m, path=None, what="transform") -> np.ndarray:
    """Validate a 4x4 transform matrix; InputError naming the file if not usable.

    Finite, last row ``[0, 0, 0, 1]``, and invertible: a singular matrix would map the whole
    image onto a plane (and ``--inverse`` could not use it).
    """
    m = np.asarray(m, dtype=np.float64)
    if m.shape != (4, 4):
        raise InputError(f"{what} must be a 4x4 matrix, got shape {m.shape}", path=path)
    if not np.all(np.isfinite(m)):
        raise InputError(f"{what} has non-finite parameters (NaN or infinite)", path=path)
    if not np.allclose(m[3], [0.0, 0.0, 0.0, 1.0]):
        raise InputError(f"{what}'s last row is {m[3].tolist()}, expected [0, 0, 0, 1]", path=path)
    with np.errstate(all="ignore"):
        scale = np.linalg.norm(m[:3, :3], axis=0)
        det = float(np.linalg.det(m[:3, :3]))
        if not (np.all(scale > 1e-8) and abs(det) > 1e-8 * float(np.prod(scale)) and np.all(scale < 1e6)
                and np.isfinite(det)):
            raise InputError(f"{what} is singular or degenerate (determinant {det:.3g}; column norms "
                             f"{np.round(scale, 6).tolist()})", path=path)
        if np.any(np.abs(m[:3, 3]) > 1e9):
            raise InputError(f"{what}'s translation {m[:3, 3].tolist()} mm is implausible", path=path)
    return m


def ras_to_lps(fixed2moving_ras: np.ndarray) -> np.ndarray:
    """RAS fixed->moving matrix to the LPS matrix ITK uses (same direction)."""
    return LPS_RAS @ fixed2moving_ras @ LPS_RAS


lps_to_ras = ras_to_lps  # the flip is its own inverse


# --------------------------------------------------------------------------------------------------
# file content


def itk_series_text(fixed2moving_series) -> str:
    """ITK text file of several RAS fixed->moving transforms in order (``#Transform 0``, ``#Transform
    1``, ...), each as :func:`regkl.itk_files.itk_text` writes one: the per-volume head-motion
    transforms of a series, which nitransforms reads as a ``LinearTransformsMapping`` (fMRIPrep's
    ``desc-hmc_xfm`` convention)."""
    blocks = []
    for t, m in enumerate(fixed2moving_series):
        one = itk_text(ras_to_lps(np.asarray(m, dtype=np.float64))).split("\n", 2)[2]
        blocks.append(f"#Transform {t}\n{one}")
    return f"{ITK_MAGIC} V1.0\n" + "".join(blocks)


def _head(path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(4096)
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", path=path) from exc


def _text_lines(head: bytes) -> list:
    return [line.strip() for line in head.decode("utf-8", errors="replace").splitlines() if line.strip()]


def _content_format(path) -> str | None:
    """The format a file's content states (ITK header or container, regkl's header, LTA keys), or None."""
    head = _head(path)
    if head.startswith(HDF5_MAGIC) or head.startswith(b"MATLAB 5.0"):
        return "itk"
    if b"\0" in head:
        return "itk" if Path(path).suffix.lower() == ".mat" else None  # ANTs writes MATLAB v4 (no magic)
    lines = _text_lines(head)
    if lines and lines[0].startswith(ITK_MAGIC):
        return "itk"
    if lines and lines[0].startswith(RAS_HEADER):
        return "ras"
    keys = {line.split("=")[0].strip() for line in lines if "=" in line and not line.startswith("#")}
    if {"type", "nxforms"} <= keys:
        return "lta"
    return None


def _text_matrix(path) -> np.ndarray:
    """Rows of numbers of a text file (``#`` comments skipped): InputError unless a 4x4 of numbers."""
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
    return m


# --------------------------------------------------------------------------------------------------
# images: FSL, AFNI and LTA need the grids the matrix was made for


def _grid_image(grid, what, fmt, path):
    """A data-less nibabel image of a grid (anything with ``vox2ras`` and a 3D ``shape``) for nitransforms."""
    import nibabel as nib

    if grid is None:
        raise InputError(f"{FORMATS[fmt].title} transforms are relative to the images' grids: the {what} "
                         "image is needed to convert it", path=path)
    img = nib.Nifti1Image(np.broadcast_to(np.uint8(0), tuple(grid.shape)[:3]), np.asarray(grid.vox2ras))
    img.file_map["image"].filename = getattr(grid, "name", None)
    return img


def _factory(fmt):
    from nitransforms.io import get_linear_factory

    return get_linear_factory(fmt, is_array=False)


# --------------------------------------------------------------------------------------------------
# the formats: parse (file -> stored matrix, validated), to RAS, from RAS, write


def _parse_ras(path):
    return _text_matrix(path)


def _parse_itk(path):
    head = _head(path)
    container = ("h5" if head.startswith(HDF5_MAGIC) or Path(path).suffix.lower() in (".h5", ".hdf5") else
                 "mat" if head.startswith(b"MATLAB 5.0") or Path(path).suffix.lower() == ".mat" else "text")
    return read_itk_lps(path, container=container)


def _parse_fsl(path):
    return check_transform_matrix(_text_matrix(path), path, what="FSL matrix")


def _parse_afni(path):
    rows = [line for line in _text_lines(Path(path).read_bytes()) if not line.startswith("#")]
    try:
        values = [[float(t) for t in row.split()] for row in rows]
    except ValueError as exc:
        raise InputError("not an AFNI .aff12.1D matrix (expected 12 numbers on one line)", path=path) from exc
    if len(values) != 1 or len(values[0]) != 12:
        raise InputError(f"not an AFNI .aff12.1D matrix: expected one line of 12 numbers, found "
                         f"{len(values)} line(s) of {[len(v) for v in values][:3]} numbers (a series of "
                         "matrices is not supported)", path=path)
    m = np.vstack([np.reshape(values[0], (3, 4)), [0.0, 0.0, 0.0, 1.0]])
    return check_transform_matrix(m, path, what="AFNI matrix")


def _parse_lta(path):
    import warnings

    from nitransforms.io.lta import FSLinearTransformArray

    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            lta = FSLinearTransformArray.from_string(text)
            if len(lta.xforms) != 1:
                raise InputError(f"LTA holds {len(lta.xforms)} transforms; regkl reads one", path=path)
            m = np.asarray(lta.to_ras()[0], dtype=np.float64)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - nitransforms' parser asserts and raises many types
        raise InputError("not a readable FreeSurfer LTA file (it needs a 'type' line, 'nxforms = 1', one 4x4 "
                         "matrix and the src/dst volume info; --debug shows the parser's error)", path=path) from exc
    return m


def _identity_to_ras(stored, fixed, moving, path):
    return stored


def _fsl_to_ras(stored, fixed, moving, path):
    xfm = _factory("fsl")(parameters=stored)
    return xfm.to_ras(reference=_grid_image(fixed, "fixed (FLIRT -ref)", "fsl", path),
                      moving=_grid_image(moving, "moving (FLIRT -in)", "fsl", path))


def _afni_to_ras(stored, fixed, moving, path):
    xfm = _factory("afni")(parameters=stored)
    return xfm.to_ras(reference=_grid_image(fixed, "fixed (AFNI base)", "afni", path),
                      moving=_grid_image(moving, "moving (AFNI source)", "afni", path))


def _numbers_text(rows) -> str:
    return "".join(" ".join(repr(float(v)) for v in row) + "\n" for row in rows)


def _ras_text(m, fixed, moving, path):
    return (f"{RAS_HEADER}\n"
            "# maps a FIXED (reference) world point to the MOVING world point: y = M @ [x, 1]\n"
            + _numbers_text(m))


def _itk_text(m, fixed, moving, path):
    return itk_text(ras_to_lps(m))


def _fsl_text(m, fixed, moving, path):
    xfm = _factory("fsl").from_ras(m, reference=_grid_image(fixed, "fixed (FLIRT -ref)", "fsl", path),
                                   moving=_grid_image(moving, "moving (FLIRT -in)", "fsl", path))
    return _numbers_text(xfm.structarr["parameters"])


def _afni_text(m, fixed, moving, path):
    xfm = _factory("afni").from_ras(m, reference=_grid_image(fixed, "fixed (AFNI base)", "afni", path),
                                    moving=_grid_image(moving, "moving (AFNI source)", "afni", path))
    params = np.asarray(xfm.structarr["parameters"])[:3].ravel()
    return ("# aff12 matrix (DICOM-to-DICOM, row-by-row) written by regkl: base = fixed, source = moving\n"
            + _numbers_text([params]))


def _lta_text(m, fixed, moving, path):
    """LTA text (RAS2RAS) in FreeSurfer's own layout: ``src`` = the moving image, ``dst`` = the fixed
    one, and ``m_L`` mapping src RAS to dst RAS (moving -> fixed, the inverse of ``m``), as
    ``mri_robust_register --mov M --dst F`` writes it and as nitransforms reads it (its reader
    returns inv(m_L) whatever the labels). nitransforms' writer puts the two geometries the other
    way round, which FreeSurfer tools that match ``src`` against ``--mov`` could read as the inverse."""
    xfm = _factory("lta").from_ras(m, reference=_grid_image(moving, "moving", "lta", path),
                                   moving=_grid_image(fixed, "fixed", "lta", path))
    return xfm.to_string()


@dataclass(frozen=True)
class TransformFormat:
    """One transform file format: how to read it, convert it and write it.

    ``parse(path)`` returns the file's matrix in its own convention;
    ``to_ras(stored, fixed, moving, path)`` and ``text(fixed2moving, fixed, moving, path)``
    convert; ``suffixes`` are the names it may be written under; ``needs_images`` says whether
    converting needs the fixed and moving grids.
    """

    name: str
    title: str
    suffixes: tuple
    needs_images: bool
    parse: object
    to_ras: object
    text: object


#: name -> format. The registry every option, message and reader uses.
FORMATS = {
    "ras": TransformFormat("ras", "regkl RAS", (".txt",), False, _parse_ras, _identity_to_ras, _ras_text),
    "itk": TransformFormat("itk", "ITK", (".tfm", ".txt", ".mat", ".h5", ".hdf5"), False, _parse_itk,
                           lambda stored, *_: lps_to_ras(stored), _itk_text),
    "fsl": TransformFormat("fsl", "FSL", (".mat", ".txt"), True, _parse_fsl, _fsl_to_ras, _fsl_text),
    "afni": TransformFormat("afni", "AFNI", (".1D",), True, _parse_afni, _afni_to_ras, _afni_text),
    "lta": TransformFormat("lta", "FreeSurfer LTA", (".lta",), False, _parse_lta, _identity_to_ras, _lta_text),
}
#: Suffixes that name one format on their own (when a file's content does not say).
SUFFIX_FORMATS = {".tfm": "itk", ".h5": "itk", ".hdf5": "itk", ".lta": "lta", ".1d": "afni"}
#: Suffixes whose content is written in one format unless another is asked for (fMRIPrep's _xfm.txt is ITK).
DEFAULT_WRITE_FORMATS = {**SUFFIX_FORMATS, ".txt": "itk"}


def _suffix(path) -> str:
    return Path(str(path)).suffix.lower()


def _check_format_name(fmt, option):
    if fmt is not None and fmt not in FORMATS:
        raise InputError(f"unknown transform format {fmt!r} for {option}; choose one of {', '.join(FORMATS)}")


# --------------------------------------------------------------------------------------------------
# reading


@dataclass(frozen=True)
class TransformFile:
    """A transform file read and validated; :meth:`fixed2moving` converts it (with the grids if needed).

    Reading (size, content, numbers, matrix checks) happens before any image is loaded; the
    conversion to regkl's convention needs the fixed and moving grids for FSL and AFNI files.
    """

    path: str
    format: str
    stored: np.ndarray

    @property
    def needs_images(self) -> bool:
        return FORMATS[self.format].needs_images

    def fixed2moving(self, fixed=None, moving=None) -> np.ndarray:
        """(4, 4) RAS+ fixed->moving matrix; ``fixed``/``moving``: Volumes (or grids) the file relates.

        Raises
        ------
        InputError
            If the format needs the grids and one is missing, the result is not a usable matrix, or
            (ITK files) ITK places one of the images elsewhere than regkl, so that the file cannot
            mean the same here as in the tools that wrote it
            (:func:`regkl.itk_placement.check_itk_placement`).
        """
        if self.format == "itk":
            from .itk_placement import check_itk_placement

            check_itk_placement([v for v in (fixed, moving) if hasattr(v, "vox2ras") and hasattr(v, "name")],
                                f"use the ITK transform {Path(self.path).name}")
        with np.errstate(all="ignore"):
            m = FORMATS[self.format].to_ras(self.stored, fixed, moving, self.path)
        return check_transform_matrix(np.asarray(m, dtype=np.float64), self.path)


def _check_file(path) -> Path:
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
    return p


def read_transform(path, fmt: str | None = None, *, option: str = "--format") -> TransformFile:
    """Read and validate a transform file (no images needed yet).

    Parameters
    ----------
    path : str or Path
        The transform file.
    fmt : str, optional
        A name of :data:`FORMATS`. Without it the format must be told by the content or by a
        suffix only one format uses; a bare matrix is refused.
    option : str
        The command-line option that sets ``fmt``, named in messages.

    Raises
    ------
    InputError
        Missing, unreadable, empty or oversized file; content that is not the format; a bare
        matrix without ``fmt``; a matrix that is not finite, affine and invertible.
    """
    _check_format_name(fmt, option)
    p = _check_file(path)
    stated = _content_format(p)
    if fmt is not None and stated is not None and stated != fmt:
        raise InputError(f"the file is in {FORMATS[stated].title} format, not {FORMATS[fmt].title} as "
                         f"{option} {fmt} says", path=p)
    chosen = fmt or stated or SUFFIX_FORMATS.get(_suffix(p))
    if chosen is None:
        _text_matrix(p)  # a file that is not even a valid matrix gets that message first
        check_transform_matrix(_text_matrix(p), p)
        raise InputError(f"a bare 4x4 matrix without regkl's header: its convention (RAS world, FSL FLIRT's "
                         f"scaled voxels, ...) cannot be told from the file; say which with {option} fsl (FLIRT "
                         f"-omat) or {option} ras", path=p)
    stored = check_transform_matrix(FORMATS[chosen].parse(p), p)  # before any image is read
    return TransformFile(str(p), chosen, stored)


def load_transform(path, fmt: str | None = None, *, fixed=None, moving=None, option: str = "--format") -> np.ndarray:
    """Read a transform file as a (4, 4) RAS+ fixed->moving matrix (see :func:`read_transform`).

    ``fixed`` and ``moving`` (Volumes) are needed for FSL and AFNI files.
    """
    return read_transform(path, fmt, option=option).fixed2moving(fixed, moving)


# --------------------------------------------------------------------------------------------------
# writing


def output_format(path, fmt: str | None = None, *, option: str = "--transform-out",
                  format_option: str = "--transform-format") -> str:
    """The format a transform output is written in, or OutputError up front (before any work).

    The suffix decides (``.tfm``/``.txt``/``.h5`` ITK, ``.lta``, ``.aff12.1D``); ``.mat`` (ITK
    binary or FSL text) and names no format uses need ``fmt``; ``fmt`` must suit the suffix.
    ``-`` (stdout) takes any text format (ITK text by default).
    """
    _check_format_name(fmt, format_option)
    suffix = _suffix(path)
    if str(path) == "-":
        return fmt or "itk"  # every format has a text form
    if fmt is None:
        if suffix in DEFAULT_WRITE_FORMATS:
            return DEFAULT_WRITE_FORMATS[suffix]
        if suffix == ".mat":
            raise OutputError(f"{option}: .mat is an ITK/ANTs binary or an FSL FLIRT text matrix; say which with "
                              f"{format_option} itk or {format_option} fsl", path=path)
        raise OutputError(f"{option}: regkl cannot write a {suffix or 'suffix-less'} transform file; use .tfm or "
                          f".txt (ITK), .h5, .mat, .lta or .aff12.1D (or {format_option})", path=path)
    if suffix not in {s.lower() for s in FORMATS[fmt].suffixes}:
        raise OutputError(f"{option}: {FORMATS[fmt].title} transforms are written as "
                          f"{' or '.join(FORMATS[fmt].suffixes)}, not {suffix or 'a suffix-less name'}", path=path)
    return fmt


def transform_text(fixed2moving: np.ndarray, fmt: str, *, fixed=None, moving=None) -> str:
    """The text a transform file of format ``fmt`` holds (ITK: text ``.tfm``)."""
    _check_format_name(fmt, "format")
    m = check_transform_matrix(fixed2moving, what="fixed2moving")
    return FORMATS[fmt].text(m, fixed, moving, None)


def save_transform(path, fixed2moving: np.ndarray, fmt: str | None = None, *, fixed=None, moving=None,
                   protect=()) -> None:
    """Write a RAS fixed->moving matrix as ``fmt`` (default: by suffix, see :func:`output_format`).

    ``fixed`` and ``moving`` (Volumes) are needed for FSL and AFNI files and give LTA files their
    geometry. The file appears atomically (see :func:`regkl.outputs.atomic_path`).
    """
    fmt = output_format(path, fmt)
    m = check_transform_matrix(fixed2moving, what="fixed2moving")
    suffix = _suffix(path)
    if fmt == "itk" and suffix in (".mat", ".h5", ".hdf5"):
        _write_itk_binary(path, m, suffix, protect)
        return
    text = FORMATS[fmt].text(m, fixed, moving, path)
    with atomic_path(path, protect=protect) as tmp:
        with open(tmp, "w") as fh:
            fh.write(text)


def _write_itk_binary(path, m, suffix, protect) -> None:
    """ITK binary containers: MATLAB v4 ``.mat`` as ANTs writes it (nitransforms), HDF5 composite (SimpleITK)."""
    lps = ras_to_lps(m)
    with atomic_path(path, protect=protect) as tmp:
        if suffix == ".mat":
            _factory("itk")(parameters=lps).to_filename(str(tmp))
        else:
            import SimpleITK as sitk

            tx = sitk.AffineTransform(3)
            tx.SetMatrix(lps[:3, :3].ravel().tolist())
            tx.SetTranslation(lps[:3, 3].tolist())
            sitk.WriteTransform(sitk.CompositeTransform([tx]), str(tmp))  # ANTs' composite .h5 layout


def read_itk(path) -> np.ndarray:
    """Read any linear ITK transform file as a RAS fixed->moving 4x4 matrix."""
    return load_transform(path, "itk")
