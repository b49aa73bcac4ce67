"""Numba kernels for the volumes of a series: per-voxel median over a stack, and separable
smoothing that releases the GIL (the per-volume pyramids of :mod:`regkl.realign`).

Small pure functions, no checking; call them through :func:`median_of_volumes` and
:func:`regkl.pyramid.smooth_variance` (``serial=True``). Serial kernels
that release the GIL, run over voxel ranges or volumes in a thread pool. Each voxel's result
depends only on its own values, so results do not depend on the thread count.
"""

from __future__ import annotations

import numpy as np

from . import numba_cache

numba_cache.ensure_usable()  # before the first @njit(cache=True): a read-only install must still run

from numba import njit  # noqa: E402

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


@njit(cache=True, nogil=True, fastmath=False)
def median_over_first_axis(stack, out, start, stop):
    """``out[v]`` = median over axis 0 of the float32 (T, N) ``stack`` for voxels ``start <= v < stop``,
    as :func:`numpy.median` gives it: the middle value, or for even T the float32 mean of the two
    middle values; NaN where any value is NaN. Serial, releases the GIL (voxel ranges run in threads)."""
    t_count = stack.shape[0]
    half = t_count // 2
    buf = np.empty((MEDIAN_CHUNK, t_count), dtype=np.float32)
    for first in range(start, stop, MEDIAN_CHUNK):
        last = min(first + MEDIAN_CHUNK, stop)
        for t in range(t_count):
            for v in range(first, last):
                buf[v - first, t] = stack[t, v]
        for v in range(last - first):
            row = buf[v]
            has_nan = False
            for t in range(t_count):
                if np.isnan(row[t]):
                    has_nan = True
                    break
            if has_nan:
                out[first + v] = np.float32(np.nan)
                continue
            _select(row, half)
            upper = row[half]
            if t_count % 2 == 1:
                out[first + v] = upper
            else:
                lower = row[0]
                for t in range(1, half):  # after the selection, row[:half] holds the smaller half
                    if row[t] > lower:
                        lower = row[t]
                out[first + v] = np.float32(lower + upper) / np.float32(2.0)


#: Voxels per task when the median runs in several threads.
MEDIAN_TASK = 16384


def median_of_volumes(stack: np.ndarray, threads: int = 1) -> np.ndarray:
    """Per-voxel median over the volumes of a stack, equal to ``np.median(stack, axis=0)``.

    Parameters
    ----------
    stack : ndarray (T, I, J, K), float32
        T >= 1 volumes on one grid.
    threads : int
        Voxel ranges computed concurrently (each voxel's result is the same whatever the count).

    Returns
    -------
    ndarray (I, J, K), float32
        NaN where any volume is NaN (as :func:`numpy.median`).
    """
    stack = np.ascontiguousarray(stack, dtype=np.float32)
    if stack.ndim < 2 or stack.shape[0] < 1:
        raise ValueError(f"need a stack of at least one volume, got shape {stack.shape}")
    flat = stack.reshape(stack.shape[0], -1)
    n = flat.shape[1]
    out = np.empty(n, dtype=np.float32)
    starts = range(0, n, MEDIAN_TASK)
    if threads <= 1 or n <= MEDIAN_TASK:
        median_over_first_axis(flat, out, 0, n)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(lambda a: median_over_first_axis(flat, out, a, min(a + MEDIAN_TASK, n)), starts))
    return out.reshape(stack.shape[1:])


@njit(cache=True, nogil=True, fastmath=False)
def correlate_nearest(data, weights, axis):
    """:func:`scipy.ndimage.correlate1d` of a float32 (I, J, K) array with a SYMMETRIC odd-length
    float64 kernel along ``axis``, mode 'nearest' (the edge voxel repeated), float32 out, summed in
    the same order as SciPy (centre first, then the pairs from the outermost in), so the results are
    identical. Serial and releases the GIL (SciPy's filters hold it), for volumes in a thread pool."""
    n0, n1, n2 = data.shape
    r = weights.shape[0] // 2
    out = np.empty((n0, n1, n2), dtype=np.float32)
    n = data.shape[axis]
    line = np.empty(n + 2 * r)
    m0, m1 = (n1, n2) if axis == 0 else ((n0, n2) if axis == 1 else (n0, n1))
    for a in range(m0):
        for b in range(m1):
            for i in range(n):
                if axis == 0:
                    line[r + i] = data[i, a, b]
                elif axis == 1:
                    line[r + i] = data[a, i, b]
                else:
                    line[r + i] = data[a, b, i]
            for i in range(r):
                line[i] = line[r]
                line[r + n + i] = line[r + n - 1]
            for i in range(n):
                c = r + i
                acc = line[c] * weights[r]
                for j in range(r, 0, -1):
                    acc += (line[c - j] + line[c + j]) * weights[r - j]
                if axis == 0:
                    out[i, a, b] = acc
                elif axis == 1:
                    out[a, i, b] = acc
                else:
                    out[a, b, i] = acc
    return out
