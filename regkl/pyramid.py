"""Multi-resolution pyramid in physical space and fixed-image sampling."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from . import kernels
from .transforms import apply_matrix
from .volume import Volume

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def default_spacings(fixed: Volume, moving: Volume, levels: int | None = None) -> list:
    """Sample spacings (mm) per level, coarse to fine.

    The finest level works at the coarser of the two images' finest voxel sizes (there is no
    information finer than the lower-resolution image); each coarser level doubles it. Without
    ``levels``, enough levels are used for the coarsest one to reach about 10 mm (1 to 4 levels).
    """
    base = max(float(np.min(fixed.spacing)), float(np.min(moving.spacing)))
    if levels is None:
        levels = 1 + max(0, math.ceil(math.log2(10.0 / base) - 1e-9))
        levels = min(max(levels, 1), 4)
    return [base * 2.0 ** k for k in range(levels - 1, -1, -1)]


def downsample(volume: Volume, spacing_mm: float) -> Volume:
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

    Parameters
    ----------
    volume : Volume
    spacing_mm : float
        Target resolution (FWHM) and approximate voxel size, in mm.

    Returns
    -------
    Volume
        On a grid with voxel sizes ``factor * spacing`` (``factor = floor(spacing_mm / voxel)``
        per axis, at least 1); the voxel centre moves to the block centre, so world positions stay
        exact.
    """
    vox = volume.spacing
    factors = np.maximum(1, np.floor(spacing_mm / vox + 1e-6)).astype(int)
    factors = np.minimum(factors, np.asarray(volume.shape))
    data = volume.data
    vox2ras = volume.vox2ras
    if np.any(factors > 1):
        data = kernels.block_mean(np.ascontiguousarray(data), *(int(f) for f in factors))
        scale = np.eye(4)
        scale[:3, :3] = np.diag(factors)
        scale[:3, 3] = (factors - 1) / 2.0
        vox2ras = vox2ras @ scale
    new_vox = vox * factors
    have_var = (vox / FWHM_PER_SIGMA) ** 2 + vox ** 2 * (factors ** 2 - 1) / 12.0
    add_var_vox = np.maximum((spacing_mm / FWHM_PER_SIGMA) ** 2 - have_var, 0.0) / new_vox ** 2
    data = smooth_variance(data, add_var_vox)
    return Volume(data, vox2ras, volume.name, volume.note)


#: Below this variance (voxels**2) :func:`smooth_variance` uses a 3-tap kernel: a sampled Gaussian
#: of sigma under ~0.7 voxel has much less than its nominal variance (at 0.3 voxel, 6 % of it).
SMALL_VARIANCE_VOX2 = 0.5


def smooth_variance(data: np.ndarray, var_vox) -> np.ndarray:
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
            out = ndimage.correlate1d(out, np.array([a, 1.0 - 2.0 * a, a]), axis=axis, mode="nearest",
                                      output=np.float32)
        else:
            out = ndimage.gaussian_filter1d(out, math.sqrt(var), axis=axis, mode="nearest", truncate=4.0,
                                            output=np.float32)
    return out


def sample_grid(level: Volume, fraction: float, rng: np.random.Generator, jitter: float = 0.5,
                max_points: int | None = None):
    """Stratified sample points with seeded jitter over a (downsampled) fixed image.

    The voxels, in storage order, are cut into ``n`` equal runs and one voxel is drawn at random
    from each run (stratified sampling: every part of the grid gets its share, and the cost is
    proportional to ``n``, not to the number of voxels); each point then moves by a uniform jitter.

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
        Fixed intensities at the points (trilinear).
    """
    shape = np.asarray(level.shape)
    total = int(np.prod(shape))
    n = max(1, int(round(total * fraction)))
    if max_points is not None:
        n = max(1, min(n, int(max_points)))
    if n < total:
        flat = ((np.arange(n) + rng.random(n)) * (total / n)).astype(np.int64)
        np.minimum(flat, total - 1, out=flat)
    else:
        flat = np.arange(total)
    idx = np.stack(np.unravel_index(flat, level.shape), axis=1).astype(np.float64)
    if jitter > 0:
        idx += rng.uniform(-jitter, jitter, size=idx.shape)
        np.clip(idx, 0.0, shape - 1.0, out=idx)
    values = ndimage.map_coordinates(level.data, idx.T, order=1, mode="nearest").astype(np.float32)
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
    """
    idx = apply_matrix(volume.ras2vox, np.asarray(points, dtype=np.float64))
    return ndimage.map_coordinates(volume.data, idx.T, order=1, mode="nearest").astype(np.float32)
