"""Multi-resolution pyramid in physical space and fixed-image sampling."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from . import kernels
from .transforms import apply_matrix
from .volume import Volume

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


#: A pyramid level never reduces an axis below this many voxels (an image's thin axis is left
#: unreduced instead of being averaged away).
MIN_AXIS_VOXELS = 2
#: Relative tolerance of a block factor ``spacing_mm / voxel size``: voxel sizes come from float32
#: headers, so two copies of one image (e.g. one with a rotated header) differ by ~1e-7 relative,
#: and a factor of 12 computed as 11.9999995 must still be 12. (With an absolute 1e-6, moving the
#: real b0's header by a rigid transform flipped the T2w's 12 mm level from 12 to 11 voxel blocks
#: along one axis, which changed every level's random sample points and the answer by 0.8 mm.)
BLOCK_FACTOR_TOL = 1e-4
#: Levels coarser than this fraction of either image's thinnest extent (voxels x voxel size along
#: an array axis) are left out: a 7 mm slab gets no level coarser than 3.5 mm, where a coarse grid
#: would put only a handful of sample points inside it.
MAX_SPACING_PER_EXTENT = 0.5


def thinnest_extent_mm(volume: Volume) -> float:
    """Smallest extent (mm) of the field of view along an array axis: ``min(shape * voxel size)``."""
    return float(np.min(np.asarray(volume.shape, dtype=np.float64) * volume.spacing))


def default_spacings(fixed: Volume, moving: Volume, levels: int | None = None) -> list:
    """Sample spacings (mm) per level, coarse to fine.

    The finest level works at the coarser of the two images' finest voxel sizes (there is no
    information finer than the lower-resolution image); each coarser level doubles it. Without
    ``levels``, enough levels are used for the coarsest one to reach about 10 mm (1 to 4 levels).
    Levels coarser than :data:`MAX_SPACING_PER_EXTENT` times either image's thinnest extent are
    left out (thin slabs), so fewer than ``levels`` may be returned; the finest level is always kept.
    """
    base = max(float(np.min(fixed.spacing)), float(np.min(moving.spacing)))
    if levels is None:
        levels = 1 + max(0, math.ceil(math.log2(10.0 / base) - 1e-9))
        levels = min(max(levels, 1), 4)
    spacings = [base * 2.0 ** k for k in range(levels - 1, -1, -1)]
    limit = MAX_SPACING_PER_EXTENT * min(thinnest_extent_mm(fixed), thinnest_extent_mm(moving))
    return [s for s in spacings[:-1] if s <= limit * (1.0 + 1e-9)] + spacings[-1:]


def downsample(volume: Volume, spacing_mm: float, *, serial: bool = False) -> Volume:
    """Smooth and resample ``volume`` to an effective resolution (FWHM) of ``spacing_mm``.

    Resolution model (the same for the fixed and the moving image, so that at every level both are
    compared at the same resolution): an image's own point-spread function is taken as a Gaussian
    of FWHM equal to its voxel size; averaging blocks of ``f`` voxels of size ``v`` adds the
    variance ``v**2 (f**2 - 1) / 12``; a Gaussian supplies the variance still missing to reach a
    FWHM of ``spacing_mm`` along each axis (none where the image is already that coarse).
    Variances add; widths do not (a block of width ``w`` has the variance of a Gaussian of FWHM
    ``0.68 w``, not ``w``).

    For a 1 mm image at 3 mm this adds a Gaussian of 0.88 mm sigma to the 3x3x3 block average;
    a 3 mm image at 3 mm is left as it is.

    No axis is reduced below :data:`MIN_AXIS_VOXELS` voxels (a thin slab keeps its slices).
    Non-finite voxels are "no data": block means and smoothing are taken over finite voxels only
    (normalised convolution), a block without any finite voxel is NaN, and a NaN voxel stays NaN
    after smoothing. (Requiring half of a block to be finite shrank an image with a NaN background
    by a coarse voxel more, which lost the 12 mm level of a 69 % NaN EPI.)

    Parameters
    ----------
    volume : Volume
    spacing_mm : float
        Target resolution (FWHM) and approximate voxel size, in mm.
    serial : bool
        Use the serial block average and smoothing kernels (they release the GIL: for many volumes
        in a thread pool). Results are identical.

    Returns
    -------
    Volume
        On a grid with voxel sizes ``factor * spacing`` (``factor = floor(spacing_mm / voxel)``
        per axis, to within :data:`BLOCK_FACTOR_TOL`, at least 1, at most
        ``shape // MIN_AXIS_VOXELS``); the voxel centre moves to the block centre, so world
        positions stay exact. NaN where there is no data.
    """
    vox = volume.spacing
    shape = np.asarray(volume.shape)
    factors = np.maximum(1, np.floor(spacing_mm / vox * (1.0 + BLOCK_FACTOR_TOL))).astype(int)
    factors = np.minimum(factors, np.maximum(1, shape // MIN_AXIS_VOXELS))
    data = volume.data
    finite = np.isfinite(data)
    valid = None if finite.all() else finite.astype(np.float32)  # weights of the normalised averages
    if valid is not None:
        data = np.where(finite, data, np.float32(0.0))
    vox2ras = volume.vox2ras
    if np.any(factors > 1):
        block_mean = kernels.block_mean_serial if serial else kernels.block_mean
        data = block_mean(np.ascontiguousarray(data), *(int(f) for f in factors))
        if valid is not None:
            valid = block_mean(valid, *(int(f) for f in factors))
            with np.errstate(all="ignore"):
                data = data / valid  # mean over the block's finite voxels
            valid = (valid > 0).astype(np.float32)
            data = np.where(valid > 0, data, np.float32(0.0))
        scale = np.eye(4)
        scale[:3, :3] = np.diag(factors)
        scale[:3, 3] = (factors - 1) / 2.0
        vox2ras = vox2ras @ scale
    new_vox = vox * factors
    have_var = (vox / FWHM_PER_SIGMA) ** 2 + vox ** 2 * (factors ** 2 - 1) / 12.0
    add_var_vox = np.maximum((spacing_mm / FWHM_PER_SIGMA) ** 2 - have_var, 0.0) / new_vox ** 2
    if valid is None:
        data = smooth_variance(data, add_var_vox, serial=serial)
    else:
        weight = smooth_variance(valid, add_var_vox, serial=serial)
        with np.errstate(all="ignore"):
            data = np.where(valid > 0, smooth_variance(data, add_var_vox, serial=serial) / weight,
                            np.float32(np.nan))
    return Volume(data, vox2ras, volume.name, volume.note)


def no_data_mask(level: Volume) -> np.ndarray | None:
    """Weights (float32 0/1) that leave out every point whose trilinear interpolation touches a
    non-finite voxel of ``level``, or None when every voxel is finite.

    The finite voxels eroded by one voxel (26-neighbourhood): every corner of an interpolation
    cell that contains a NaN voxel is then 0, so the weight interpolated from this mask is exactly
    0 there, and it rises to 1 over one voxel, as at the edge of the field of view.
    """
    finite = np.isfinite(level.data)
    if finite.all():
        return None
    kept = ndimage.binary_erosion(finite, structure=np.ones((3, 3, 3), dtype=bool), border_value=1)
    return kept.astype(np.float32)


#: Below this variance (voxels**2) :func:`smooth_variance` uses a 3-tap kernel: a sampled Gaussian
#: of sigma under ~0.7 voxel has much less than its nominal variance (at 0.3 voxel, 6 % of it).
SMALL_VARIANCE_VOX2 = 0.5


def gaussian_weights(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Sampled, normalised Gaussian of ``sigma`` voxels truncated at ``truncate`` sigma (the kernel
    :func:`scipy.ndimage.gaussian_filter1d` uses)."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x ** 2)
    return phi / phi.sum()


def smooth_variance(data: np.ndarray, var_vox, *, serial: bool = False) -> np.ndarray:
    """Smooth ``data`` with a separable kernel of the given variance (voxels**2) along each axis.

    Small variances (up to :data:`SMALL_VARIANCE_VOX2`) use the 3-tap kernel ``[a, 1 - 2a, a]``
    with ``a = var / 2``, whose variance is exact; larger ones a sampled Gaussian of sigma
    ``sqrt(var)`` (truncated at 4 sigma), accurate to ~1 % from there on. Borders repeat the edge
    voxel. Axes with a variance below 1e-4 are left alone.

    Parameters
    ----------
    data : ndarray, shape (I, J, K)
    var_vox : array_like, shape (3,)
        Kernel variance per axis, in voxels squared.

    serial : bool
        Use a Numba kernel that releases the GIL (identical results; for many volumes in a thread
        pool, where SciPy's filters, which hold it, would run one at a time).

    Returns
    -------
    ndarray, float32 (``data`` itself when nothing is smoothed)
    """
    var_vox = np.broadcast_to(np.asarray(var_vox, dtype=np.float64), (3,))
    out = data
    for axis, var in enumerate(var_vox):
        if var < 1e-4:
            continue
        if var <= SMALL_VARIANCE_VOX2:
            a = var / 2.0
            weights = np.array([a, 1.0 - 2.0 * a, a])
        else:
            weights = gaussian_weights(math.sqrt(var))
        if serial:
            from .stack_kernels import correlate_nearest

            out = correlate_nearest(np.ascontiguousarray(out, dtype=np.float32), weights, axis)
        else:
            out = ndimage.correlate1d(out, weights, axis=axis, mode="nearest", output=np.float32)
    return out


def sample_grid(level: Volume, fraction: float, rng: np.random.Generator, jitter: float = 0.5,
                max_points: int | None = None):
    """Random sample points with seeded jitter over a (downsampled) fixed image.

    ``n`` distinct voxels are drawn at random (seeded; NumPy draws a small subset in time
    proportional to ``n``, not to the number of voxels) and each point then moves by a uniform
    jitter. (Stratified runs in storage order were tried: on the flat real b0/T2w pair they made
    the confidence's restarts settle up to 8 mm apart, against 1-2 mm with random points.)

    Parameters
    ----------
    level : Volume
        Fixed image of this level; its voxel centres form the grid.
    fraction : float
        Fraction of grid points kept, in (0, 1].
    rng : numpy.random.Generator
    jitter : float
        Uniform jitter amplitude in voxels (points stay inside the grid).
    max_points : int, optional
        At most this many points (the information a rigid fit needs does not grow with the
        voxel count; see benchmarks/README.md, "Speed", for the error against the cap).

    Returns
    -------
    points : float64 (N, 3)
        World mm.
    values : float32 (N,)
        Fixed intensities at the points (trilinear). Points whose interpolation touches a
        non-finite voxel (no data) are left out.
    """
    shape = np.asarray(level.shape)
    total = int(np.prod(shape))
    n = max(1, int(round(total * fraction)))
    if max_points is not None:
        n = max(1, min(n, int(max_points)))
    if n < total:
        flat = np.sort(rng.choice(total, size=n, replace=False))
    else:
        flat = np.arange(total)
    idx = np.stack(np.unravel_index(flat, level.shape), axis=1).astype(np.float64)
    if jitter > 0:
        idx += rng.uniform(-jitter, jitter, size=idx.shape)
        np.clip(idx, 0.0, shape - 1.0, out=idx)
    values = ndimage.map_coordinates(level.data, idx.T, order=1, mode="nearest").astype(np.float32)
    keep = np.isfinite(values)  # a NaN corner makes the interpolated value NaN, even at weight 0
    if not keep.all():
        idx, values = idx[keep], values[keep]
    return level.world_coords(idx), values


def values_at(volume: Volume, points: np.ndarray) -> np.ndarray:
    """Intensities of ``volume`` at world points, by trilinear interpolation.

    The same interpolation as :func:`sample_grid` (edge voxels repeat beyond the grid), for
    reading sample points of one level from another image, e.g. the unsmoothed fixed image.

    Parameters
    ----------
    volume : Volume
    points : ndarray, shape (N, 3)
        World mm (RAS+).

    Returns
    -------
    ndarray, shape (N,), float32
        NaN where the interpolation touches a non-finite voxel.
    """
    idx = apply_matrix(volume.ras2vox, np.asarray(points, dtype=np.float64))
    return ndimage.map_coordinates(volume.data, idx.T, order=1, mode="nearest").astype(np.float32)
