"""Where ITK (and so ANTs and SimpleITK) places an image, against where regkl places it.

regkl reads NIfTI and Analyze headers as nibabel does (sform, else qform); ITK has its own rules
(it may prefer the qform, falls back to it when the sform is sheared, and takes voxel sizes from
``pixdim`` whatever the sform says). Where the two disagree, an ITK transform file means one
thing in regkl and another in those tools, so regkl refuses to read or write one for such an
image instead of handing over a file that would silently misplace it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import InputError
from .nifti_read import _grid_corners
from .sitk_images import sitk_vox2ras

#: Farthest (mm, over the grid corners) ITK's placement of an image may lie from regkl's and still
#: count as the same place (float32 headers round at about 1e-4 mm).
ITK_PLACEMENT_TOL_MM = 0.05

#: sform and qform (both set) this close (mm, over the grid corners) place the grid alike whichever
#: of them a reader takes: such a header needs no asking SimpleITK (which costs its ~0.06 s import).
FORMS_AGREE_MM = 0.005

#: NIfTI spatial unit codes (``xyzt_units & 7``) that mean millimetres to ITK: unknown (0) and mm
#: (2). ITK scales voxel sizes given in metres (1) or microns (3); regkl and nibabel do not.
MM_UNIT_CODES = (0, 2)
NON_MM_UNITS = {1: "metres", 3: "microns"}


def _spatial_unit_code(volume) -> int | None:
    """``xyzt_units & 7`` of ``volume``'s NIfTI header, or None without one."""
    hdr = getattr(volume, "header", None)
    try:
        return int(hdr["xyzt_units"]) & 7
    except (TypeError, KeyError, ValueError):
        return None

#: Files regkl decodes itself (the others it reads through SimpleITK, so ITK's placement is its own).
OWN_DECODER_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img", ".hdr.gz", ".img.gz")


def _readable_name(path, folder) -> str:
    """``path`` as SimpleITK can take it: a name that is not valid UTF-8 (SimpleITK aborts the process
    on one) is reached through ASCII-named links in ``folder`` (both files of an .hdr/.img pair)."""
    name = str(path)
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    lower = name.lower()
    suffix = next(s for s in OWN_DECODER_SUFFIXES if lower.endswith(s))
    stem = os.path.abspath(name)[:len(os.path.abspath(name)) - len(suffix)]
    partners = {".hdr": ".img", ".img": ".hdr", ".hdr.gz": ".img.gz", ".img.gz": ".hdr.gz"}
    for s in (suffix,) + ((partners[suffix],) if suffix in partners else ()):
        if os.path.lexists(stem + s):
            os.symlink(stem + s, os.path.join(folder, "image" + s))
    return os.path.join(folder, "image" + suffix)


def itk_vox2ras(path) -> np.ndarray | None:
    """(4, 4) voxel -> RAS+ mm matrix of the first three axes as SimpleITK reads ``path``'s header,
    or None when SimpleITK cannot read it."""
    import tempfile

    import SimpleITK as sitk

    from .quiet import quiet_native_stderr

    reader = sitk.ImageFileReader()
    with tempfile.TemporaryDirectory(prefix="regkl-itk-") as folder:
        reader.SetFileName(_readable_name(path, folder))
        try:
            with quiet_native_stderr():
                reader.ReadImageInformation()
        except RuntimeError:
            return None
    return sitk_vox2ras(reader) if reader.GetDimension() >= 3 else None


def itk_placement_gap(path, vox2ras, shape) -> float | None:
    """Largest distance (mm) over the grid's corners between where ITK and regkl put the voxels of
    the image file ``path`` (regkl's ``vox2ras``, its ``shape``), or None when regkl read it through
    SimpleITK (the same placement by construction) or SimpleITK cannot read its header."""
    name = str(path).lower()
    if not name.endswith(OWN_DECODER_SUFFIXES) or not Path(path).is_file():
        return None
    theirs = itk_vox2ras(path)
    if theirs is None:
        return None
    return _corner_gap(vox2ras, theirs, shape)


def _corner_gap(a, b, shape) -> float:
    return float(np.max(np.linalg.norm(((np.asarray(a) - np.asarray(b)) @ _grid_corners(shape))[:3], axis=0)))


def forms_agree(volume) -> bool:
    """True when ``volume``'s NIfTI header leaves no room for ITK to place it elsewhere than regkl.

    That is: spatial units mm or unknown (:data:`MM_UNIT_CODES`), sform_code and qform_code both
    set, the qform (built from the quaternion AND ``pixdim``,
    which is where ITK takes voxel sizes from) and the sform within :data:`FORMS_AGREE_MM` of each
    other, and the volume's ``vox2ras`` the sform. ITK's rules only choose between those two
    matrices (or fall back on the qform when the sform is sheared, which a matrix equal to a qform
    is not), so any choice gives regkl's placement. Anything else (one form, no form, Analyze,
    forms apart, no header) returns False: ask SimpleITK (:func:`itk_placement_gap`).
    """
    hdr = getattr(volume, "header", None)
    if hdr is None or not hasattr(hdr, "get_qform") or not hasattr(hdr, "get_sform"):
        return False
    try:
        if int(hdr["sform_code"]) <= 0 or int(hdr["qform_code"]) <= 0:
            return False
        if _spatial_unit_code(volume) not in MM_UNIT_CODES:  # ITK scales by micron/metre units; regkl does not
            return False
        sform, qform = hdr.get_sform(), hdr.get_qform()
    except Exception:  # noqa: BLE001 - an invalid quaternion or field: let SimpleITK decide
        return False
    if not (np.all(np.isfinite(sform)) and np.all(np.isfinite(qform))):
        return False
    shape = volume.shape
    return (_corner_gap(sform, qform, shape) <= FORMS_AGREE_MM
            and _corner_gap(volume.vox2ras, sform, shape) <= FORMS_AGREE_MM)


def check_itk_placement(volumes, action: str, alternative: str = "") -> None:
    """InputError when ITK places one of ``volumes`` (Volumes read from files; their ``name`` is the
    path) elsewhere than regkl does, so that an ITK transform could not mean the same in both.

    Parameters
    ----------
    volumes : iterable of Volume
    action : str
        What needs the agreement, for the message (e.g. "write an ITK transform").
    alternative : str
        Another way out for the message (e.g. "write another format (--transform-format fsl)").

    Raises
    ------
    InputError
        Naming the image and the gap in mm.
    """
    for volume in volumes:
        if volume is None or not volume.name or forms_agree(volume):
            continue
        gap = itk_placement_gap(volume.name, volume.vox2ras, volume.shape)
        if gap is not None and gap > ITK_PLACEMENT_TOL_MM:
            units = NON_MM_UNITS.get(_spatial_unit_code(volume))
            if units is not None:
                reason = (f"its header gives the voxel sizes in {units} (xyzt_units), which ITK applies and regkl, "
                          "nibabel and FSL do not")
                fix = "set the spatial units to mm (nibabel: img.header.set_xyzt_units('mm'))"
            else:
                reason = ("its header's sform and qform disagree, the sform is sheared, or pixdim does not match "
                          "the sform")
                fix = ("make the header consistent (e.g. nibabel: img.set_qform(img.get_sform()); FSL: "
                       "fslorient -copysform2qform)")
            raise InputError(
                f"ITK, ANTs and SimpleITK place this image up to {gap:.3g} mm from where regkl, nibabel and "
                f"FSL place it ({reason}): an ITK transform cannot mean the same in regkl and in those tools, so "
                f"regkl will not {action}; {fix}"
                + (f" or {alternative}" if alternative else ""), path=volume.name)
