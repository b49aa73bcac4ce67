"""Checked wrappers around the joint-histogram kernels.

A :class:`Samples` holds the fixed-image sample points of one pyramid level; :func:`evaluate`
returns a metric and its gradient with respect to the fixed-to-moving matrix.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from . import kernels
from .errors import KernelInputError
from .volume import Volume


_local = threading.local()


@contextmanager
def serial_kernels():
    """In this thread, evaluate with the serial kernels, which release the GIL.

    For running independent evaluations concurrently in a thread pool (the confidence restarts):
    on few cores the parallel kernels scale poorly at ~10^5 points (1.0-1.2x on 2 cores), while
    two serial evaluations in two threads take about the time of one. Results are identical.
    """
    before = getattr(_local, "serial", False)
    _local.serial = True
    try:
        yield
    finally:
        _local.serial = before


def _serial(n):
    return n < kernels.SERIAL_BELOW or getattr(_local, "serial", False)


@dataclass(frozen=True)
class Samples:
    """Fixed-image sample points of one level.

    Attributes
    ----------
    points : float64 (N, 3)
        Fixed world positions (RAS+ mm).
    values : float32 (N,)
        Fixed intensities at the points.
    bins : int32 (N,)
        Fixed histogram bin of each point.
    n_bins : int
    """

    points: np.ndarray
    values: np.ndarray
    bins: np.ndarray
    n_bins: int


@dataclass(frozen=True)
class MovingLevel:
    """Moving image of one level and the mapping of its intensities to continuous bins.

    ``mask`` (float32 in [0, 1], same grid, or None) multiplies each sample point's weight.
    """

    volume: Volume
    lo: float
    scale: float
    n_bins: int
    mask: np.ndarray | None = None


#: :func:`robust_range` reads the percentiles from at most about this many values (an even stride
#: through larger arrays: a 1 mm image's 8.7 million voxels cost ~0.2 s and move them by < 0.1 %).
RANGE_MAX_VALUES = 2 ** 20


def robust_range(values: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5):
    """Percentile-clipped intensity range (lo, hi) of finite values; hi > lo guaranteed or error."""
    values = np.ravel(values)
    if values.size > 2 * RANGE_MAX_VALUES:
        v = values[:: values.size // RANGE_MAX_VALUES]
        v = v[np.isfinite(v)]
        if v.size:
            lo, hi = np.percentile(v, [lo_pct, hi_pct])
            if hi > lo:
                return float(lo), float(hi)
    v = values[np.isfinite(values)]
    if v.size == 0:
        raise KernelInputError("no finite intensities")
    lo, hi = np.percentile(v, [lo_pct, hi_pct])
    if not hi > lo:
        lo, hi = float(v.min()), float(v.max())
    if not hi > lo:
        raise KernelInputError(f"image is constant (every value is {lo:g})")
    return float(lo), float(hi)


def fixed_bins(values: np.ndarray, lo: float, hi: float, n_bins: int) -> np.ndarray:
    """Box-kernel bin index (int32) of fixed intensities in ``n_bins`` bins over [lo, hi]."""
    idx = np.floor((values - lo) / (hi - lo) * n_bins)
    return np.clip(idx, 0, n_bins - 1).astype(np.int32)


def make_samples(points: np.ndarray, values: np.ndarray, n_bins: int, value_range=None) -> Samples:
    """Bin fixed intensities and package sample points (checks shapes and finiteness)."""
    points = np.ascontiguousarray(points, dtype=np.float64)
    values = np.ascontiguousarray(values, dtype=np.float32)
    if points.ndim != 2 or points.shape[1] != 3 or values.shape != (points.shape[0],):
        raise KernelInputError(f"points must be (N, 3) and values (N,), got {points.shape}, {values.shape}")
    if n_bins < 4:
        raise KernelInputError(f"need at least 4 bins, got {n_bins}")
    if not np.all(np.isfinite(points)) or not np.all(np.isfinite(values)):
        raise KernelInputError("sample points or values are not finite")
    lo, hi = robust_range(values) if value_range is None else value_range
    return Samples(points, values, fixed_bins(values, lo, hi, n_bins), int(n_bins))


def thinned(samples: Samples, max_points: int) -> Samples:
    """Every k-th sample point, k the smallest step leaving at most ``max_points`` (the samples
    themselves when they are already that few). Points in grid order stay spread over the image."""
    step = -(-len(samples.points) // int(max_points))
    if step <= 1:
        return samples
    # contiguous copies: a strided view would make Numba compile (and cache) another specialisation
    # of every kernel, ~15 s on the first such run
    return Samples(np.ascontiguousarray(samples.points[::step]), np.ascontiguousarray(samples.values[::step]),
                   np.ascontiguousarray(samples.bins[::step]), samples.n_bins)


def in_moving_order(samples: Samples, moving: MovingLevel, fixed2moving: np.ndarray) -> Samples:
    """The same sample points, reordered to visit the moving image row by row under ``fixed2moving``.

    The joint histogram's cost on a large moving image is its trilinear fetches; points that follow
    the moving image's storage order reuse cache lines (on a 1 mm moving image and 150 000 points
    about twice the throughput of fixed-grid order, see benchmarks/README.md, "Kernel throughput").
    A level's pose changes little, so one ordering at its start serves all its evaluations. The
    histogram and gradient are the same sums in another order (equal to rounding).

    Parameters
    ----------
    samples : Samples
    moving : MovingLevel
    fixed2moving : ndarray (4, 4)
        Fixed RAS mm to moving RAS mm.

    Returns
    -------
    Samples
        ``samples`` permuted (a stable counting sort on the moving row; deterministic).
    """
    m = np.asarray(fixed2moving, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise KernelInputError(f"fixed2moving must be a finite 4x4 matrix, got shape {m.shape}")
    vox_mat = np.ascontiguousarray((moving.volume.ras2vox @ m)[:3])
    n0, n1 = moving.volume.shape[:2]
    order = kernels.moving_row_order(samples.points, vox_mat, int(n0), int(n1))
    return Samples(samples.points[order], samples.values[order], samples.bins[order], samples.n_bins)


def make_moving_level(volume: Volume, n_bins: int, value_range=None, mask: np.ndarray | None = None) -> MovingLevel:
    """Map moving intensities [lo, hi] to continuous bins [2, n_bins - 3] (cubic-kernel padding).

    ``mask``: optional weights in [0, 1] on the moving grid (points outside it are left out)."""
    if n_bins < 8:
        raise KernelInputError(f"need at least 8 moving bins, got {n_bins}")
    if min(volume.shape) < 2:
        raise KernelInputError(f"moving image needs at least 2 voxels along each axis, got {volume.shape}",
                               path=volume.name)
    if mask is not None:
        mask = np.ascontiguousarray(np.clip(mask, 0.0, 1.0), dtype=np.float32)
        if mask.shape != volume.shape:
            raise KernelInputError(f"moving mask shape {mask.shape} != moving image shape {volume.shape}")
        if not np.any(mask > 0):
            raise KernelInputError("moving mask is empty", path=volume.name)
    if value_range is None:
        inside = volume.data[mask > 0.5] if mask is not None and np.count_nonzero(mask > 0.5) > 100 else volume.data
        lo, hi = robust_range(inside)
    else:
        lo, hi = value_range
    return MovingLevel(volume, lo, (n_bins - 5) / (hi - lo), int(n_bins), mask)


@dataclass(frozen=True)
class Evaluation:
    """Histogram state at one transform."""

    hist: np.ndarray        # (F, M) counts
    mov_c: np.ndarray       # (N,) continuous moving bins, NaN outside
    mov_g: np.ndarray       # (N, 3) d bin / d moving voxel index
    mov_w: np.ndarray       # (N,) weight of each point (0 outside the moving image)
    mov_gw: np.ndarray      # (N, 3) d weight / d moving voxel index
    n_valid: int


def joint_histogram(samples: Samples, moving: MovingLevel, fixed2moving: np.ndarray) -> Evaluation:
    """Parzen joint histogram of the samples against the moving image under ``fixed2moving``.

    Parameters
    ----------
    samples : Samples
    moving : MovingLevel
    fixed2moving : ndarray (4, 4)
        Fixed RAS mm to moving RAS mm.
    """
    m = np.asarray(fixed2moving, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise KernelInputError(f"fixed2moving must be a finite 4x4 matrix, got shape {m.shape}")
    vox_mat = np.ascontiguousarray((moving.volume.ras2vox @ m)[:3])
    n = samples.points.shape[0]
    mov_c = np.empty(n)
    mov_g = np.empty((n, 3))
    mov_w = np.empty(n)
    mov_gw = np.empty((n, 3))
    kernel = kernels.joint_histogram_serial if _serial(n) else kernels.joint_histogram
    hist = kernel(samples.bins, samples.points, moving.volume.data, vox_mat, moving.lo, moving.scale, moving.n_bins,
                  samples.n_bins, mov_c, mov_g, mov_w, mov_gw, *_mask_args(moving))
    return Evaluation(hist, mov_c, mov_g, mov_w, mov_gw, int(np.count_nonzero(mov_w > 0)))


def joint_histograms(samples: Samples, moving: MovingLevel, fixed2movings) -> tuple:
    """:func:`joint_histogram` under many poses at once: (hists (K, F, M), n_valid (K,)).

    Each histogram is bit-identical to :func:`joint_histogram`'s for that pose.
    """
    m = np.asarray(fixed2movings, dtype=np.float64)
    if m.ndim != 3 or m.shape[1:] != (4, 4) or not np.all(np.isfinite(m)):
        raise KernelInputError(f"fixed2movings must be finite (K, 4, 4) matrices, got shape {m.shape}")
    vox_mats = np.ascontiguousarray((moving.volume.ras2vox @ m)[:, :3])
    return kernels.joint_histograms(samples.bins, samples.points, moving.volume.data, vox_mats, moving.lo,
                                    moving.scale, moving.n_bins, samples.n_bins, *_mask_args(moving))


def _mask_args(moving: MovingLevel):
    return (moving.volume.data, False) if moving.mask is None else (moving.mask, True)


def matrix_gradient(samples: Samples, moving: MovingLevel, evaluation: Evaluation,
                    dtable: np.ndarray) -> np.ndarray:
    """Gradient (3, 4) of a metric with respect to the fixed-to-moving matrix entries."""
    dtable = np.ascontiguousarray(dtable, dtype=np.float64)
    if dtable.shape != evaluation.hist.shape:
        raise KernelInputError(f"dtable shape {dtable.shape} != histogram shape {evaluation.hist.shape}")
    vox_lin = np.ascontiguousarray(moving.volume.ras2vox[:3, :3])
    kernel = kernels.matrix_gradient_serial if _serial(len(samples.points)) else kernels.matrix_gradient
    return kernel(samples.bins, samples.points, evaluation.mov_c, evaluation.mov_g, evaluation.mov_w,
                  evaluation.mov_gw, dtable, vox_lin)
