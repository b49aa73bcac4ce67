"""Summary statistics of one image: intensity range, percentiles and histogram entropy.

The entropy of the intensity histogram says how spread out the intensities are; its KL divergence
from the uniform histogram (``log(bins) - entropy``) is a simple contrast measure: 0 when every
intensity level is equally common, large when a few levels dominate.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError
from .volume import Volume

#: Robust intensity range: these percentiles of the selected voxels bound the histogram.
RANGE_PERCENTILES = (0.5, 99.5)

#: Most histogram bins (a 16-bit image's every level; more only costs memory).
MAX_BINS = 65536

#: Voxels > 0 are used (no mask given) when at least this fraction of the voxels is > 0.
MIN_FOREGROUND_FRACTION = 0.10


def _select(data: np.ndarray, mask):
    """(values, how) of the voxels the statistics describe (finite only)."""
    finite = np.isfinite(data)
    if mask is not None:
        m = np.asarray(mask)
        if m.shape != data.shape:
            raise InputError(f"mask shape {m.shape} does not match image shape {data.shape}")
        if m.dtype.kind not in "biuf":
            raise InputError(f"mask must be boolean or numeric, got dtype {m.dtype}")
        if m.dtype.kind == "f" and not np.all(np.isfinite(m)):
            raise InputError("mask has non-finite values")
        m = m != 0
        sel = m & finite
        how = "mask"
    else:
        positive = finite & (data > 0)
        if np.count_nonzero(positive) >= MIN_FOREGROUND_FRACTION * data.size:
            sel, how = positive, "positive"
        else:
            sel, how = finite, "all"
    values = data[sel]
    if values.size == 0:
        raise InputError(f"no finite voxels to describe (selection: {how})")
    return values.astype(np.float64), how


def image_stats(volume, *, bins: int = 64, mask=None) -> dict:
    r"""Intensity statistics and histogram entropy of an image.

    Voxel selection: the voxels inside ``mask`` if given; otherwise the voxels > 0 when at least
    10 % of the voxels are > 0 (the background of MR images is 0 or near it after masking, and
    would otherwise dominate the histogram), else all voxels. Non-finite voxels are always left
    out. Every statistic below except ``n_voxels``, ``shape`` and ``voxel_mm`` is computed over the
    selected voxels.

    The histogram has ``bins`` equal bins over the robust range ``[lo, hi]`` = the 0.5 and 99.5
    percentiles of the selected voxels; values outside are clipped into the end bins (so every
    selected voxel is counted). With ``p_b`` the fraction of voxels in bin ``b``:

    .. math:: H = -\sum_b p_b \log p_b, \qquad
              \mathrm{KL}(p \,\|\, u) = \sum_b p_b \log(p_b \cdot \mathrm{bins}) = \log(\mathrm{bins}) - H

    If ``hi == lo`` (constant selection) every voxel falls in one bin: ``H = 0``.

    Parameters
    ----------
    volume : Volume or ndarray (I, J, K)
        The image; a plain array has ``voxel_mm`` None.
    bins : int
        Number of histogram bins (2 to :data:`MAX_BINS`).
    mask : ndarray (I, J, K) of bool or numbers, optional
        Voxels to describe (non-zero = inside).

    Returns
    -------
    dict
        JSON-serialisable:

        - ``shape`` : list of int; ``voxel_mm`` : list of float or None
        - ``n_voxels`` : int, all voxels; ``n_selected`` : int; ``n_nonfinite`` : int
        - ``selection`` : 'mask', 'positive' or 'all'
        - ``min``, ``max``, ``mean`` : float
        - ``percentiles`` : dict {'1': float, '50': float, '99': float}
        - ``range`` : [lo, hi], the robust histogram range
        - ``bins`` : int
        - ``entropy_nats``, ``entropy_bits`` : float, ``H`` and ``H / log 2``
        - ``kl_from_uniform_nats`` : float, ``log(bins) - H`` (>= 0)

    Raises
    ------
    InputError
        Not 3D, bad ``bins``, mask of another shape, or no finite voxel selected.
    """
    if isinstance(volume, Volume):
        data = volume.data
        voxel_mm = [float(v) for v in volume.spacing]
    else:
        data = np.asarray(volume)
        voxel_mm = None
        if data.ndim != 3:
            raise InputError(f"expected a 3D image, got shape {data.shape}")
        if data.dtype.kind not in "biuf":
            raise InputError(f"expected a numeric image, got dtype {data.dtype}")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or not 2 <= bins <= MAX_BINS:
        raise InputError(f"bins must be an integer from 2 to {MAX_BINS}, got {bins!r}")
    bins = int(bins)
    values, how = _select(data, mask)

    lo, hi = (float(x) for x in np.percentile(values, RANGE_PERCENTILES))
    if hi > lo:
        idx = np.floor((values - lo) / (hi - lo) * bins)
        idx = np.clip(idx, 0, bins - 1).astype(np.int64)
        counts = np.bincount(idx, minlength=bins).astype(np.float64)
    else:
        counts = np.zeros(bins)
        counts[0] = values.size
    p = counts / counts.sum()
    nz = p[p > 0]
    entropy = float(max(-np.sum(nz * np.log(nz)), 0.0))
    kl = float(max(np.sum(nz * np.log(nz * bins)), 0.0))
    p1, p50, p99 = (float(x) for x in np.percentile(values, [1, 50, 99]))
    return {
        "shape": [int(s) for s in data.shape],
        "voxel_mm": voxel_mm,
        "n_voxels": int(data.size),
        "n_selected": int(values.size),
        "n_nonfinite": int(data.size - np.count_nonzero(np.isfinite(data))),
        "selection": how,
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean()),
        "percentiles": {"1": p1, "50": p50, "99": p99},
        "range": [lo, hi],
        "bins": bins,
        "entropy_nats": entropy,
        "entropy_bits": entropy / float(np.log(2.0)),
        "kl_from_uniform_nats": kl,
    }
