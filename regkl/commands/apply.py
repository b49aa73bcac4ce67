"""`regkl apply`: a saved transform onto another image or series."""

from __future__ import annotations

import json
import time

import click
import numpy as np

from ._common import FillValue, check_output, format_option, log


@click.command("apply")
@click.argument("transform", type=click.Path(dir_okay=False))
@click.argument("moving", type=click.Path(dir_okay=True))
@click.argument("reference", type=click.Path(dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Resampled image: .nii.gz, .nii, .hdr/.img, .nrrd, .mha, .mhd (a 4D series: NIfTI); "
              "written one volume at a time.")
@click.option("--interp", type=click.Choice(["nearest", "linear", "cubic"]), default="linear", show_default=True,
              help="Interpolation; nearest keeps the values and data type (label maps).")
@click.option("--fill", default=0.0, show_default=True, type=FillValue(),
              help="Output value outside MOVING's field of view and on its NaN (no-data) voxels (e.g. -1024 for CT "
                   "in Hounsfield units; ANTs --default-value).")
@click.option("--inverse", is_flag=True, help="Apply the transform the other way (fixed-space image onto a "
              "moving-space grid).")
@format_option("--format", "--transform-format", help_text="Format of TRANSFORM when its content and suffix do not "
               "say (a bare 4x4 matrix: fsl or ras). FSL: REFERENCE is FLIRT's -ref, MOVING its -in.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages on stderr.")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def apply_cmd(transform, moving, reference, output, interp, fill, inverse, fmt, as_json, quiet, debug):
    """Apply a saved TRANSFORM to MOVING (3D or a whole 4D series), on REFERENCE's grid.

    TRANSFORM is fixed->moving as `regkl register` writes it: regkl's RAS matrix, any linear ITK
    transform (.tfm/.txt/.mat/.h5), FSL FLIRT (--format fsl), AFNI .aff12.1D or FreeSurfer .lta;
    REFERENCE is normally the fixed image.

    \b
    Examples:
      regkl apply bold2T1w.tfm sub-01_bold.nii.gz sub-01_T1w.nii.gz -o bold_in_T1w.nii.gz
      regkl apply bold2T1w.tfm aparc_T1w.nii.gz bold_ref.nii.gz --inverse --interp nearest -o aparc_in_bold.nii.gz
    """
    from ..io import load_volume, open_series
    from ..writers import check_image_output, save_volume, series_writer
    from ..resample import resample_series
    from ..xfm import read_transform

    t0 = time.perf_counter()
    say = log(quiet)
    protect = (moving, reference, transform)
    check_output(output, protect)
    check_image_output(output, protect=protect)
    transform_file = read_transform(transform, fmt)
    volumes, header = open_series(moving)
    ref = load_volume(reference, volume=0, allow_constant=True)
    check_image_output(output, protect=protect, ndim=3 if len(volumes) == 1 else 4)
    # FSL/AFNI matrices relate the two grids: REFERENCE is the fixed one (the moving one with --inverse)
    matrix = transform_file.fixed2moving(*((volumes[0], ref) if inverse else (ref, volumes[0])))
    _check_overlap(volumes, ref, matrix, inverse, transform, moving, reference)
    dtype = np.dtype(np.float32 if interp != "nearest" else _stored_dtype(header, volumes[0].data.dtype))
    _check_fill_fits(fill, dtype, moving)
    _check_room(volumes, ref, dtype, output)
    if interp == "nearest":
        _check_exact_in_float32(moving, dtype, volumes)
    zooms_t = float(header.get_zooms()[3]) if header is not None and len(header.get_zooms()) > 3 else None
    resampled = resample_series(volumes, ref, matrix, interp=interp, inverse=inverse, fill=fill)
    if len(volumes) == 1 and not output.lower().endswith((".nii", ".nii.gz", ".hdr", ".img", ".hdr.gz", ".img.gz")):
        from ..volume import Volume

        save_volume(Volume(next(resampled), ref.vox2ras), output, like=ref, protect=protect, dtype=dtype)
    else:
        shape = ref.shape + ((len(volumes),) if len(volumes) > 1 else ())
        with series_writer(output, shape, ref.vox2ras, like=ref, protect=protect, dtype=dtype,
                           zooms_t=zooms_t) as put:
            for volume in resampled:
                put(volume)
    say(f"{len(volumes)} volume(s) resampled on {reference} in {time.perf_counter() - t0:.2f} s")
    if as_json:
        click.echo(json.dumps({"transform": transform, "transform_format": transform_file.format, "moving": moving,
                               "reference": reference, "output": output,
                               "volumes": len(volumes), "interp": interp, "fill": fill, "inverse": inverse,
                               "seconds": round(time.perf_counter() - t0, 4)}))


def _check_fill_fits(fill, dtype, moving):
    """Refuse a --fill that the (integer) output type of --interp nearest cannot hold."""
    from ..errors import InputError

    if np.dtype(dtype).kind in "biu":
        info = np.iinfo(dtype)
        if not (np.isfinite(fill) and info.min <= fill <= info.max and float(fill).is_integer()):
            raise InputError(f"--fill {fill:g} cannot be stored in this image's {np.dtype(dtype).name} data "
                             f"(--interp nearest keeps the data type; integers {info.min} to {info.max})", path=moving)


def _check_overlap(volumes, ref, matrix, inverse, transform, moving, reference):
    """Refuse a transform that maps no voxel of the reference grid inside the moving image (the
    output would be all fill), as register, metric and profile refuse images that do not overlap."""
    from ..errors import RegistrationError
    from ..resample import overlap_count, vox2vox

    m = np.linalg.inv(matrix) if inverse else matrix
    if overlap_count(volumes.shape, ref, vox2vox(volumes[0], ref, m)) == 0:
        hint = ("check that it maps REFERENCE's world to MOVING's (without --inverse)" if inverse else
                "check that it maps REFERENCE's world to MOVING's (fixed->moving), or use --inverse "
                "if it goes the other way")
        raise RegistrationError(f"the transform maps no voxel of {reference} inside {moving}: the output would "
                                f"hold no image data; {hint}", path=transform)


def _check_room(volumes, ref, dtype, output):
    """Memory for the output (a few volumes of the reference grid: the series is written one volume
    at a time) and, for an uncompressed output, disk space; refused before any work, with figures."""
    import math
    import os
    import shutil

    from ..errors import InputError, OutputError
    from ..memory import _gib, available_memory

    n3 = math.prod(ref.shape)
    need = n3 * (4 * 3 + dtype.itemsize * 2) + (64 << 20)  # resampled, F-order and typed copies; gzip chunks
    avail = available_memory()
    if avail is not None and need > avail:
        raise InputError(f"resampling on this grid {ref.shape} needs about {_gib(need)} GiB of memory, but only "
                         f"{_gib(avail)} GiB is available (set REGKL_MEMORY_LIMIT_GB to override)", path=ref.name)
    if not output.lower().endswith(".gz"):
        size = n3 * len(volumes) * dtype.itemsize
        try:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(output))).free
        except OSError:
            return
        if size > free:
            raise OutputError(f"the output needs {_gib(size)} GiB of disk space, only {_gib(free)} GiB is free "
                              "(write .nii.gz to compress it)", path=output)


#: Stored types whose values float32 (regkl's working type) may not hold exactly.
WIDE_TYPES = ("int32", "uint32", "int64", "uint64", "float64")


def _check_exact_in_float32(moving, dtype, volumes):
    """Refuse --interp nearest on a map whose stored values float32 cannot hold exactly (integers
    beyond +-2**24, float64 detail): regkl resamples in float32, so they would come out changed
    (e.g. label 1387860160 as 1387860224) although nearest promises the values.

    Integers whose float32 values (``volumes``, as read) all lie within +-2**24 were exact (rounding
    keeps larger ones at 2**24 or beyond), so only then is the file not read a second time."""
    if np.dtype(dtype).name not in WIDE_TYPES:
        return
    if np.dtype(dtype).kind in "iu" and all(float(np.max(np.abs(v.data))) < 2.0 ** 24 for v in volumes):
        return
    import nibabel as nib

    from ..errors import InputError

    try:
        raw = np.asanyarray(nib.load(str(moving)).dataobj)
    except Exception:  # noqa: BLE001 - not a nibabel image: read through SimpleITK as float already
        return
    if raw.dtype.name not in WIDE_TYPES:
        return
    back = raw.astype(np.float32).astype(raw.dtype)
    changed = back != raw
    if raw.dtype.kind == "f":
        changed &= ~np.isnan(raw)  # NaN stays NaN
    if changed.any():
        bad = int(np.count_nonzero(changed))
        raise InputError(f"--interp nearest keeps the values, but {bad} voxel(s) of this {raw.dtype.name} image hold "
                         "values that regkl's 32-bit floats cannot carry exactly (integers beyond +-16,777,216 or "
                         "float64 detail), so they would come out changed; renumber the labels below 16,777,216 "
                         "(or store the map as int16/int32 with small values) and apply again", path=moving)


def _stored_dtype(header, default):
    """On-disk data type of a NIfTI header (so label maps stay integer), else ``default``; float32
    when the header scales its stored numbers (scl_slope/scl_inter), whose values are not integers."""
    try:
        if header is None:
            return default
        slope, inter = header.get_slope_inter() if hasattr(header, "get_slope_inter") else (None, None)
        scaled = (slope is not None and np.isfinite(slope) and slope not in (0.0, 1.0)) or \
            (inter is not None and np.isfinite(inter) and inter != 0.0)
        return np.dtype(np.float32) if scaled else np.dtype(header.get_data_dtype())
    except Exception:  # noqa: BLE001 - unusual header: keep float
        return default
