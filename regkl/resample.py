"""Resampling a moving image on a fixed grid through a fixed->moving RAS transform."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from . import kernels
from .errors import InputError
from .volume import Volume, as_volume

INTERPOLATORS = ("nearest", "linear", "cubic")


def vox2vox(moving: Volume, grid: Volume, fixed2moving: np.ndarray) -> np.ndarray:
    """(4, 4) grid voxel index -> moving voxel index."""
    return moving.ras2vox @ np.asarray(fixed2moving, dtype=np.float64) @ grid.vox2ras


def resample(moving: Volume | str, grid: Volume | str, fixed2moving: np.ndarray, *, interp: str = "linear",
             fill: float = 0.0, serial: bool = False) -> Volume:
    """Resample ``moving`` on the voxel grid of ``grid`` (usually the fixed image).

    NaN voxels of ``moving`` mean "no data" (see :mod:`regkl.io`): an output voxel whose
    interpolation would read one (any of the 8 neighbours for 'linear' and 'cubic', the nearest
    voxel for 'nearest') gets ``fill``, like a voxel outside the moving image's field of view.

    Parameters
    ----------
    moving : Volume, nibabel image or path
    grid : Volume, nibabel image or path
        Supplies the output shape, vox2ras and header.
    fixed2moving : ndarray (4, 4)
        RAS mm, grid world -> moving world.
    interp : {'nearest', 'linear', 'cubic'}
    fill : float
        Value outside the moving image and on its NaN voxels (ANTs ``--default-value``,
        SimpleITK ``defaultPixelValue``).
    serial : bool
        Use the serial 'linear' and 'nearest' kernels (they release the GIL: for many volumes
        resampled in a thread pool). Results are identical.

    Returns
    -------
    Volume
        float32 data on ``grid``'s voxels, with ``grid``'s header.
    """
    if interp not in INTERPOLATORS:
        raise InputError(f"unknown interpolation {interp!r}; choose one of {', '.join(INTERPOLATORS)}")
    from .xfm import check_transform_matrix

    moving = as_volume(moving, what="moving", allow_constant=True)
    grid = as_volume(grid, what="grid", allow_constant=True)
    fixed2moving = check_transform_matrix(fixed2moving, what="fixed2moving")
    try:
        fill = float(fill)
    except (TypeError, ValueError):
        raise InputError(f"fill must be a number, got {fill!r}") from None
    m = np.ascontiguousarray(vox2vox(moving, grid, fixed2moving))
    s0, s1, s2 = grid.shape
    has_nan = not bool(np.isfinite(moving.data).all())  # NaN (and infinite, from the API) voxels: no data
    linear = kernels.resample_linear_serial if serial else kernels.resample_linear
    if interp == "linear":
        out = linear(moving.data, m, s0, s1, s2, np.float32(fill))
    elif interp == "nearest":
        nearest = kernels.resample_nearest_serial if serial else kernels.resample_nearest
        out = nearest(moving.data, m, s0, s1, s2, np.float32(fill))  # keeps the values
    else:
        out = _resample_cubic(_nan_to_nearest(moving.data) if has_nan else moving.data, m, grid.shape, fill)
        if has_nan:  # the linear result is not finite exactly where the 8 neighbours include such a voxel
            out[~np.isfinite(linear(moving.data, m, s0, s1, s2, np.float32(0.0)))] = np.nan
    if has_nan:
        out[~np.isfinite(out)] = np.float32(fill)
    return Volume(out, grid.vox2ras, moving.name, f"resampled on {grid.name}", grid.header)


def _nan_to_nearest(data: np.ndarray) -> np.ndarray:
    """``data`` with every non-finite voxel replaced by the nearest finite one (for spline prefiltering,
    which would spread a NaN over the whole image)."""
    nan = ~np.isfinite(data)
    idx = ndimage.distance_transform_edt(nan, return_distances=False, return_indices=True)
    return data[tuple(idx)]


def _resample_cubic(data, m, shape, fill) -> np.ndarray:
    """Cubic B-spline resampling, plane by plane; ``fill`` outside [-0.5, n - 0.5] on any axis."""
    s0, s1, s2 = shape
    coeffs = ndimage.spline_filter(data, order=3, mode="mirror")
    out = np.empty(shape, dtype=np.float32)
    jj, kk = np.meshgrid(np.arange(s1), np.arange(s2), indexing="ij")
    plane = np.stack([np.zeros_like(jj), jj, kk, np.ones_like(jj)], axis=0).reshape(4, -1).astype(np.float64)
    lim = np.asarray(data.shape)[:, None] - 0.5
    for i in range(s0):
        plane[0] = i
        coords = (m @ plane)[:3]
        vals = ndimage.map_coordinates(coeffs, coords, order=3, mode="mirror", prefilter=False)
        inside = np.all((coords >= -0.5) & (coords <= lim), axis=0)
        out[i] = np.where(inside, vals, fill).reshape(s1, s2)
    return out


def overlap_count(moving_shape, grid: Volume, grid2moving_vox: np.ndarray) -> int:
    """Voxels of ``grid`` whose centre maps inside the moving grid (within half a voxel of its
    outermost centres, as the interpolators decide), counted exactly, one i-plane at a time.

    Parameters
    ----------
    moving_shape : tuple of int
        (I, J, K) of the moving image.
    grid : Volume
        Output grid.
    grid2moving_vox : ndarray (4, 4)
        Grid voxel index -> moving voxel index (:func:`vox2vox`).
    """
    s0, s1, s2 = grid.shape
    jj, kk = np.meshgrid(np.arange(s1, dtype=np.float64), np.arange(s2, dtype=np.float64), indexing="ij")
    plane = (grid2moving_vox[:3, 1:2] * jj.ravel() + grid2moving_vox[:3, 2:3] * kk.ravel()
             + grid2moving_vox[:3, 3:4])
    lo, hi = -0.5, np.asarray(moving_shape, dtype=np.float64)[:, None] - 0.5
    count = 0
    for i in range(s0):
        coords = plane + grid2moving_vox[:3, 0:1] * i
        count += int(np.count_nonzero(np.all((coords >= lo) & (coords <= hi), axis=0)))
    return count


def resample_series(volumes, reference: Volume, fixed2moving: np.ndarray, *, interp: str = "linear",
                    inverse: bool = False, fill: float = 0.0):
    """Resample every volume of a series on ``reference``'s grid, one at a time (a generator).

    Parameters
    ----------
    volumes : sequence of Volume
        The image to move (one volume, or every volume of a 4D series, e.g. :class:`regkl.io.Series`),
        all on one grid; each is asked for only when it is resampled.
    reference : Volume
        Output grid (the FIXED image for a transform from ``regkl register``).
    fixed2moving : ndarray (4, 4)
        RAS fixed -> moving. With ``inverse``, the transform is applied the other way: the volumes
        live in the fixed image's world and ``reference`` is a grid in the moving image's world.
    interp : {'nearest', 'linear', 'cubic'}
        'nearest' keeps the input's values and type (label maps).
    fill : float
        Value outside the volumes' field of view and on their NaN voxels (see :func:`resample`).

    Yields
    ------
    ndarray (I, J, K)
        Each volume on ``reference``'s grid, in order.
    """
    m = np.asarray(fixed2moving, dtype=np.float64)
    if inverse:
        m = np.linalg.inv(m)
    for t in range(len(volumes)):
        yield resample(volumes[t], reference, m, interp=interp, fill=fill).data
