"""Same-modality costs from weighted intensity moments: least squares and normalised correlation.

Where both images share a contrast (the volumes of one series), the cost needs no histogram: it is
a function of six weighted sums over the fixed sample points (:func:`regkl.kernels.weighted_moments`)

    A = sum w,  F = sum w f,  FF = sum w f^2,  M = sum w m,  MM = sum w m^2,  FM = sum w f m,

with ``w`` the smooth edge weight of each point. Each cost returns its value (to be MAXIMISED) and
``d value / d sums``; :func:`evaluate` turns that into the gradient with respect to the
fixed-to-moving matrix, so the optimiser of :mod:`regkl.optimize` runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels
from .errors import KernelInputError
from .histogram import robust_range
from .volume import Volume


def least_squares(sums: np.ndarray):
    """Negative mean squared intensity difference ``-(FF - 2 FM + MM) / A`` and d value / d sums.

    Parameters
    ----------
    sums : ndarray (6,)
        ``A, F, FF, M, MM, FM`` as defined in the module docstring.

    Returns
    -------
    value : float
    dsums : ndarray (6,)
    """
    a, _, ff, _, mm, fm = sums
    sq = ff - 2.0 * fm + mm
    value = -sq / a
    dsums = np.array([sq / (a * a), 0.0, -1.0 / a, 0.0, -1.0 / a, 2.0 / a])
    return float(value), dsums


def normalised_correlation(sums: np.ndarray):
    """Pearson correlation of the weighted intensity pairs and d value / d sums.

    ``NC = C / sqrt(P Q)`` with ``C = A FM - F M``, ``P = A FF - F^2``, ``Q = A MM - M^2``
    (the weighted covariance and variances times ``A^2``). Insensitive to a global gain and offset
    of either image (Friston et al. 1995 use least squares with an intensity scale; correlation
    removes it exactly). A constant image (``P`` or ``Q`` zero) gives 0 and a zero gradient.
    """
    a, f, ff, m, mm, fm = sums
    c = a * fm - f * m
    p = a * ff - f * f
    q = a * mm - m * m
    if not (p > 0.0 and q > 0.0):
        return 0.0, np.zeros(6)
    root = np.sqrt(p * q)
    value = c / root
    dc = np.array([fm, -m, 0.0, -f, 0.0, a])
    dp = np.array([ff, -2.0 * f, a, 0.0, 0.0, 0.0])
    dq = np.array([mm, 0.0, 0.0, -2.0 * m, a, 0.0])
    dsums = dc / root - 0.5 * value * (dp / p + dq / q)
    return float(value), dsums


#: Same-modality costs by name: sums (6,) -> (value to maximise, d value / d sums).
COSTS = {"ls": least_squares, "nc": normalised_correlation}


@dataclass(frozen=True)
class MomentSamples:
    """Fixed sample points of one level with their intensities scaled to about [0, 1].

    Attributes
    ----------
    points : float64 (N, 3)
        Fixed world mm.
    values : float64 (N,)
        ``(f - lo) / (hi - lo)`` with (lo, hi) the robust range of the fixed values.
    """

    points: np.ndarray
    values: np.ndarray


def make_samples(points: np.ndarray, values: np.ndarray, value_range=None) -> MomentSamples:
    """Check and package fixed sample points and intensities (KernelInputError if unusable).

    ``value_range``: (lo, hi) mapped to [0, 1]; default the robust range of ``values``."""
    points = np.ascontiguousarray(points, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3 or values.shape != (points.shape[0],):
        raise KernelInputError(f"points must be (N, 3) and values (N,), got {points.shape}, {values.shape}")
    if not np.all(np.isfinite(points)) or not np.all(np.isfinite(values)):
        raise KernelInputError("sample points or values are not finite")
    lo, hi = robust_range(values) if value_range is None else value_range
    return MomentSamples(points, np.ascontiguousarray((values - lo) / (hi - lo)))


@dataclass(frozen=True)
class MomentMoving:
    """Moving image of one level; intensity ``m`` enters the sums as ``(m - lo) * scale``."""

    volume: Volume
    lo: float
    scale: float


def make_moving(volume: Volume, value_range=None) -> MomentMoving:
    """Moving level with its intensities scaled to about [0, 1].

    ``value_range``: (lo, hi) mapped to [0, 1] (e.g. the fixed image's, so that least squares
    compares like with like); default the robust range of the volume (error if constant)."""
    if min(volume.shape) < 2:
        raise KernelInputError(f"moving image needs at least 2 voxels along each axis, got {volume.shape}",
                               path=volume.name)
    lo, hi = robust_range(volume.data) if value_range is None else value_range
    if not hi > lo:
        raise KernelInputError(f"empty intensity range [{lo}, {hi}]", path=volume.name)
    return MomentMoving(volume, lo, 1.0 / (hi - lo))


def weighted_moments(samples: MomentSamples, moving: MomentMoving, fixed2moving: np.ndarray, *,
                     serial: bool = True):
    """The six weighted sums and their gradient with respect to the fixed-to-moving matrix.

    Parameters
    ----------
    samples : MomentSamples
    moving : MomentMoving
    fixed2moving : ndarray (4, 4)
        Fixed RAS mm to moving RAS mm.
    serial : bool
        Use the serial kernel (releases the GIL; for many evaluations in a thread pool) rather than
        the parallel one. Results are identical.

    Returns
    -------
    sums : ndarray (6,)
    dsums_dmatrix : ndarray (6, 3, 4)
        d sums / d fixed2moving[:3, :].
    """
    m = np.asarray(fixed2moving, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise KernelInputError(f"fixed2moving must be a finite 4x4 matrix, got shape {m.shape}")
    ras2vox = moving.volume.ras2vox
    vox_mat = np.ascontiguousarray((ras2vox @ m)[:3])
    kernel = kernels.weighted_moments_serial if serial else kernels.weighted_moments
    sums, dvox = kernel(samples.points, samples.values, moving.volume.data, vox_mat, moving.lo, moving.scale)
    # vox_mat = lin @ M[:3] + ...: d/dM[c, b] = sum_a lin[a, c] d/dvox_mat[a, b]
    return sums, np.einsum("ac,kab->kcb", ras2vox[:3, :3], dvox)


def evaluate(cost: str, samples: MomentSamples, moving: MomentMoving, fixed2moving: np.ndarray):
    """(value, d value / d fixed2moving[:3, :] (3, 4), weight of the points inside) of a named cost."""
    fn = COSTS[cost]
    sums, dsums = weighted_moments(samples, moving, fixed2moving)
    if not sums[0] > 0.0:
        return 0.0, np.zeros((3, 4)), 0.0
    value, dv = fn(sums)
    return value, np.tensordot(dv, dsums, axes=1), float(sums[0])
