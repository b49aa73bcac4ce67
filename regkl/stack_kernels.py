"""Numba kernels over a stack of volumes (the volumes of a series): per-voxel median.

Small pure functions, no checking; call them through :func:`median_of_volumes`. Each voxel's
result depends only on its own values, so results do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np

from . import numba_cache

numba_cache.ensure_usable()  # before the first @njit(cache=True): a read-only install must still run

from numba import njit, prange  # noqa: E402

#: Voxels gathered per chunk of the median (their values over the volumes then sit together in memory).
MEDIAN_CHUNK = 256


@njit(cache=True, nogil=True, fastmath=False)
def _select(a, k):
    """Partially order ``a`` (1D, no NaN) in place so that ``a[k]`` is its k-th smallest value,
    nothing before it larger and nothing after it smaller (Hoare's quickselect, median-of-three pivot)."""
    lo = 0
    hi = a.shape[0] - 1
    while hi > lo:
        mid = (lo + hi) // 2
        # median of three to a[mid] <= a[lo] <= a[hi]... then a[lo] is the pivot
        if a[mid] > a[hi]:
            a[mid], a[hi] = a[hi], a[mid]
        if a[lo] > a[hi]:
            a[lo], a[hi] = a[hi], a[lo]
        if a[mid] > a[lo]:
            a[mid], a[lo] = a[lo], a[mid]
        pivot = a[lo]
        i = lo
        j = hi + 1
        while True:
            i += 1
            while i <= hi and a[i] < pivot:
                i += 1
            j -= 1
            while a[j] > pivot:
                j -= 1
            if i >= j:
                break
            a[i], a[j] = a[j], a[i]
        a[lo], a[j] = a[j], a[lo]
        if j == k:
            return
        if j < k:
            lo = j + 1
        else:
            hi = j - 1


@njit(cache=True, parallel=True, fastmath=False)
def median_over_first_axis(stack):
    """Median over axis 0 of a float32 (T, N) array, as :func:`numpy.median` gives it: the middle
    value, or for even T the float32 mean of the two middle values; NaN where any value is NaN."""
    t_count, n = stack.shape
    out = np.empty(n, dtype=np.float32)
    n_chunks = (n + MEDIAN_CHUNK - 1) // MEDIAN_CHUNK
    half = t_count // 2
    for c in prange(n_chunks):
        start = c * MEDIAN_CHUNK
        stop = min(start + MEDIAN_CHUNK, n)
        buf = np.empty((stop - start, t_count), dtype=np.float32)
        for t in range(t_count):
            for v in range(start, stop):
                buf[v - start, t] = stack[t, v]
        for v in range(stop - start):
            row = buf[v]
            has_nan = False
            for t in range(t_count):
                if np.isnan(row[t]):
                    has_nan = True
                    break
            if has_nan:
                out[start + v] = np.float32(np.nan)
                continue
            _select(row, half)
            upper = row[half]
            if t_count % 2 == 1:
                out[start + v] = upper
            else:
                lower = row[0]
                for t in range(1, half):  # after the selection, row[:half] holds the smaller half
                    if row[t] > lower:
                        lower = row[t]
                out[start + v] = np.float32(lower + upper) / np.float32(2.0)
    return out


def median_of_volumes(stack: np.ndarray) -> np.ndarray:
    """Per-voxel median over the volumes of a stack, equal to ``np.median(stack, axis=0)``.

    Parameters
    ----------
    stack : ndarray (T, I, J, K), float32
        T >= 1 volumes on one grid.

    Returns
    -------
    ndarray (I, J, K), float32
        NaN where any volume is NaN (as :func:`numpy.median`).
    """
    stack = np.ascontiguousarray(stack, dtype=np.float32)
    if stack.ndim < 2 or stack.shape[0] < 1:
        raise ValueError(f"need a stack of at least one volume, got shape {stack.shape}")
    return median_over_first_axis(stack.reshape(stack.shape[0], -1)).reshape(stack.shape[1:])
