"""Multi-resolution pyramid in physical space and fixed-image sampling."""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from . import kernels
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
    """Smooth and resample ``volume`` to about ``spacing_mm`` resolution.

    Integer block averaging by ``floor(spacing / voxel)`` along each axis (the voxel centre moves to
    the block centre, so world positions stay exact), then a Gaussian that brings the effective
    resolution (FWHM) up to ``spacing_mm`` where the blocks fall short.

    Parameters
    ----------
    volume : Volume
    spacing_mm : float
        Target resolution in mm.

    Returns
    -------
    Volume
        On a grid with voxel sizes ``factor * spacing`` and correspondingly updated vox2ras.
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
    sigma_mm = np.sqrt(np.maximum(spacing_mm ** 2 - new_vox ** 2, 0.0)) / FWHM_PER_SIGMA
    sigma_vox = sigma_mm / new_vox
    if np.any(sigma_vox > 0.1):
        data = ndimage.gaussian_filter(data, sigma_vox, mode="nearest", truncate=3.0)
    return Volume(data, vox2ras, volume.name, volume.note)


def sample_grid(level: Volume, fraction: float, rng: np.random.Generator, jitter: float = 0.5):
    """Regular-grid sample points with seeded jitter over a (downsampled) fixed image.

    Parameters
    ----------
    level : Volume
        Fixed image of this level; its voxel centres form the grid.
    fraction : float
        Fraction of grid points kept (random subset, seeded), in (0, 1].
    rng : numpy.random.Generator
    jitter : float
        Uniform jitter amplitude in voxels (points stay inside the grid).

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
    if n < total:
        flat = np.sort(rng.choice(total, size=n, replace=False))
    else:
        flat = np.arange(total)
    idx = np.stack(np.unravel_index(flat, level.shape), axis=1).astype(np.float64)
    if jitter > 0:
        idx += rng.uniform(-jitter, jitter, size=idx.shape)
        idx = np.clip(idx, 0.0, shape - 1.0)
    values = ndimage.map_coordinates(level.data, idx.T, order=1, mode="nearest").astype(np.float32)
    return level.world_coords(idx), values
