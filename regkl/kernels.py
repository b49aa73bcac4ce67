"""Numba kernels: small pure functions on arrays, no checking.

Call them through the checking wrappers in :mod:`regkl.histogram` and :mod:`regkl.resample`.
Every parallel kernel splits its points into fixed-size chunks, accumulates one partial result per
chunk and reduces the chunks in order, so results are bit-identical whatever the thread count.
"""

import math
import types as types_module

import numpy as np

from . import numba_cache

numba_cache.ensure_usable()  # before the first @njit(cache=True): a read-only install must still run

from llvmlite import ir  # noqa: E402
from numba import njit, prange, types, uint64  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

#: Points per chunk for the parallel reductions (fixed, so results do not depend on thread count).
CHUNK = 4096


#: The histogram kernel asks for the cache lines of the point this many points ahead (software
#: prefetch): on a moving image larger than a core's cache the trilinear fetches wait on memory.
PREFETCH_AHEAD = 16
#: ... only on moving images of at least this many voxels (2 MB of float32, a core's L2 here);
#: on smaller ones the lines are already in cache and the extra index arithmetic costs ~10 %.
PREFETCH_MIN_VOXELS = 2 ** 19


@intrinsic
def prefetch(typingctx, arr, idx):
    """Hint the CPU to bring the cache line of ``arr[idx]`` (1-D array) towards the core.

    LLVM's ``llvm.prefetch`` (read, high locality, data): no effect on any result, never faults;
    Numba offers no prefetch of its own.
    """
    def codegen(context, builder, signature, args):
        ary = context.make_array(signature.args[0])(context, builder, args[0])
        byte_ptr = ir.IntType(8).as_pointer()
        fnty = ir.FunctionType(ir.VoidType(), [byte_ptr, ir.IntType(32), ir.IntType(32), ir.IntType(32)])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0")
        i32 = ir.IntType(32)
        builder.call(fn, [builder.bitcast(builder.gep(ary.data, [args[1]]), byte_ptr), ir.Constant(i32, 0),
                          ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, idx), codegen


@njit(cache=True, fastmath=False)
def bspline3(t):
    """Cubic B-spline kernel beta3(t), support (-2, 2), integrates to 1."""
    a = abs(t)
    if a < 1.0:
        return (4.0 - 6.0 * a * a + 3.0 * a * a * a) / 6.0
    if a < 2.0:
        b = 2.0 - a
        return b * b * b / 6.0
    return 0.0


@njit(cache=True, fastmath=False)
def bspline3_deriv(t):
    """Derivative d beta3(t) / dt."""
    a = abs(t)
    s = 1.0 if t >= 0.0 else -1.0
    if a < 1.0:
        return s * (-2.0 * a + 1.5 * a * a)
    if a < 2.0:
        b = 2.0 - a
        return -s * 0.5 * b * b
    return 0.0


@njit(cache=True, fastmath=False)
def trilinear(data, u, v, w):
    """Trilinear value and gradient (per voxel index) of ``data`` at continuous index (u, v, w).

    Returns (valid, value, du, dv, dw); ``valid`` is False outside [0, n-1] on any axis.
    """
    n0, n1, n2 = data.shape
    if not (u >= 0.0 and v >= 0.0 and w >= 0.0 and u <= n0 - 1 and v <= n1 - 1 and w <= n2 - 1):
        return False, 0.0, 0.0, 0.0, 0.0
    val, du, dv, dw = trilinear_inside(data, u, v, w)
    return True, val, du, dv, dw


@njit(cache=True, fastmath=False)
def trilinear_inside(data, u, v, w):
    """:func:`trilinear` without the bounds check (the caller guarantees 0 <= index <= n - 1):
    (value, du, dv, dw)."""
    n0, n1, n2 = data.shape
    i = min(int(u), n0 - 2)
    j = min(int(v), n1 - 2)
    k = min(int(w), n2 - 2)
    return trilinear_mix(data[i, j, k], data[i, j, k + 1], data[i, j + 1, k], data[i, j + 1, k + 1],
                         data[i + 1, j, k], data[i + 1, j, k + 1], data[i + 1, j + 1, k], data[i + 1, j + 1, k + 1],
                         u - i, v - j, w - k)


@njit(cache=True, fastmath=False)
def trilinear_flat(flat, n1, n2, u, v, w, n0):
    """:func:`trilinear_inside` on the C-order flattened image (n0, n1, n2): one offset for the
    corner, no per-axis index arithmetic or negative-index handling per fetch (the hot path)."""
    i = min(int(u), n0 - 2)
    j = min(int(v), n1 - 2)
    k = min(int(w), n2 - 2)
    s0 = n1 * n2
    b = uint64((i * n1 + j) * n2 + k)
    return trilinear_mix(flat[b], flat[b + uint64(1)], flat[b + uint64(n2)], flat[b + uint64(n2 + 1)],
                         flat[b + uint64(s0)], flat[b + uint64(s0 + 1)], flat[b + uint64(s0 + n2)],
                         flat[b + uint64(s0 + n2 + 1)], u - i, v - j, w - k)


@njit(cache=True, fastmath=False)
def prefetch_cell(flat, n0, n1, n2, u, v, w):
    """:func:`prefetch` the (up to) four cache lines of the trilinear cell at continuous index
    (u, v, w) of the flattened image (n0, n1, n2); any (u, v, w) (clamped to the grid)."""
    i = int(min(max(u, 0.0), n0 - 2.0))
    j = int(min(max(v, 0.0), n1 - 2.0))
    k = int(min(max(w, 0.0), n2 - 2.0))
    s0 = n1 * n2
    b = uint64((i * n1 + j) * n2 + k)
    prefetch(flat, b)
    prefetch(flat, b + uint64(n2))
    prefetch(flat, b + uint64(s0))
    prefetch(flat, b + uint64(s0 + n2))


@njit(cache=True, fastmath=False)
def trilinear_mix(c000, c001, c010, c011, c100, c101, c110, c111, fu, fv, fw):
    """Trilinear value and gradient (per voxel index) from the 8 corners ``c<i><j><k>`` of a cell
    and the fractions (fu, fv, fw) in [0, 1]: (value, du, dv, dw)."""
    # interpolate along w first
    c00 = c000 + fw * (c001 - c000)
    c01 = c010 + fw * (c011 - c010)
    c10 = c100 + fw * (c101 - c100)
    c11 = c110 + fw * (c111 - c110)
    c0 = c00 + fv * (c01 - c00)
    c1 = c10 + fv * (c11 - c10)
    val = c0 + fu * (c1 - c0)
    du = c1 - c0
    dv = (1.0 - fu) * (c01 - c00) + fu * (c11 - c10)
    d00 = c001 - c000
    d01 = c011 - c010
    d10 = c101 - c100
    d11 = c111 - c110
    d0 = d00 + fv * (d01 - d00)
    d1 = d10 + fv * (d11 - d10)
    dw = d0 + fu * (d1 - d0)
    return val, du, dv, dw


@njit(cache=True, fastmath=False)
def edge_ramp(t, n):
    """C1 weight of continuous index t on an axis of n voxels: 0 outside [0, n-1], rising as a
    smoothstep over the first and last voxel, 1 inside. Returns (weight, d weight / dt)."""
    top = n - 1.0
    if t <= 0.0 or t >= top:
        return 0.0, 0.0
    if t >= 1.0 and top - t >= 1.0:
        return 1.0, 0.0
    a = t if t < 1.0 else 1.0
    b = top - t if top - t < 1.0 else 1.0
    wa = a * a * (3.0 - 2.0 * a)
    wb = b * b * (3.0 - 2.0 * b)
    da = 6.0 * a * (1.0 - a) if t < 1.0 else 0.0
    db = -6.0 * b * (1.0 - b) if top - t < 1.0 else 0.0
    return wa * wb, da * wb + wa * db


#: 1/6 (rounded to float64).
SIXTH = 1.0 / 6.0


@njit(cache=True, fastmath=False)
def bspline3_weights(t):
    """beta3(1 + t), beta3(t), beta3(t - 1), beta3(t - 2) for t in [0, 1]: the four cubic B-spline
    weights of a continuous bin ``k0 + 1 + t`` on bins k0 .. k0 + 3 (branch-free)."""
    s = 1.0 - t
    # products with 1/6, not divisions by 6: a division costs ~4 cycles of throughput, and the
    # histogram and gradient kernels evaluate these weights for every point
    return (s * s * s * SIXTH, (4.0 - 6.0 * t * t + 3.0 * t * t * t) * SIXTH,
            (4.0 - 6.0 * s * s + 3.0 * s * s * s) * SIXTH, t * t * t * SIXTH)


@njit(cache=True, fastmath=False)
def bspline3_deriv_weights(t):
    """The derivatives of :func:`bspline3_weights` with respect to the continuous bin."""
    s = 1.0 - t
    return -0.5 * s * s, t * (1.5 * t - 2.0), s * (2.0 - 1.5 * s), 0.5 * t * t


@njit(cache=True, parallel=True, fastmath=False)
def joint_histogram(fixed_bins, points, moving, vox_mat, mov_lo, mov_scale, n_moving_bins, n_fixed_bins,
                    mov_c, mov_g, mov_w, mov_gw, mov_mask, use_mask):
    """Parzen-window joint histogram of fixed bins against moving intensities.

    Each sample point adds a cubic B-spline kernel centred on its continuous moving bin, in the row
    of its fixed bin, with weight ``w`` in [0, 1]: 1 inside the moving image, falling smoothly (C1)
    to 0 over the outermost voxel, 0 outside (points outside are left out, never zero-filled).
    What the gradient needs of each point is stored (one trilinear fetch per point and
    evaluation: on a moving image larger than the caches the fetches cost about a third of the
    time; there the cell of the point :data:`PREFETCH_AHEAD` ahead is prefetched, and points in the
    moving image's row order, :func:`moving_row_order`, reuse cache lines).

    Parameters
    ----------
    fixed_bins : int32 (N,)
        Fixed-image bin of every sample point (box kernel).
    points : float64 (N, 3)
        Sample points in fixed world mm.
    moving : float32 (I, J, K)
        Moving image.
    vox_mat : float64 (3, 4)
        Fixed world mm to moving voxel index (moving_ras2vox @ fixed2moving).
    mov_lo, mov_scale : float
        Moving intensity m maps to continuous bin ``2 + (m - mov_lo) * mov_scale``, clipped to
        ``[2, n_moving_bins - 3]``.
    n_moving_bins, n_fixed_bins : int
    mov_c : float64 (N,) output
        Continuous moving bin of every point (NaN where its weight is 0).
    mov_g : float64 (N, 3) output
        d(continuous bin)/d(moving voxel index) (zero where clipped).
    mov_w : float64 (N,) output
        Weight of every point.
    mov_gw : float64 (N, 3) output
        d(weight)/d(moving voxel index).
    mov_mask : float32 (I, J, K)
        Moving mask in [0, 1] on the moving grid (trilinear; multiplies the weight) if ``use_mask``.
    use_mask : bool

    Returns
    -------
    hist : float64 (n_fixed_bins, n_moving_bins)
        Weighted joint histogram (total = sum of weights).
    """
    n = points.shape[0]
    n0, n1, n2 = moving.shape
    flat = moving.ravel()
    mask_flat = mov_mask.ravel()
    # flat views indexed by unsigned offsets: no per-access negative-index handling or stride
    # multiplications (C-contiguous arrays; reshape refuses others)
    pts = points.reshape(3 * n)
    g_flat = mov_g.reshape(3 * n)
    gw_flat = mov_gw.reshape(3 * n)
    n_chunks = (n + CHUNK - 1) // CHUNK
    size = n_fixed_bins * n_moving_bins
    partial = np.zeros((n_chunks, size))
    top = n_moving_bins - 3.0
    m00, m01, m02, m03 = vox_mat[0, 0], vox_mat[0, 1], vox_mat[0, 2], vox_mat[0, 3]
    m10, m11, m12, m13 = vox_mat[1, 0], vox_mat[1, 1], vox_mat[1, 2], vox_mat[1, 3]
    m20, m21, m22, m23 = vox_mat[2, 0], vox_mat[2, 1], vox_mat[2, 2], vox_mat[2, 3]
    ahead = PREFETCH_AHEAD if n0 * n1 * n2 >= PREFETCH_MIN_VOXELS else 0
    in0, in1, in2 = n0 - 2.0, n1 - 2.0, n2 - 2.0
    for c in prange(n_chunks):
        start = c * CHUNK
        stop = min(start + CHUNK, n)
        part = partial[c]
        for p in range(start, stop):
            if ahead > 0:
                q = min(p + ahead, n - 1)
                x = points[q, 0]
                y = points[q, 1]
                z = points[q, 2]
                u = m00 * x + m01 * y + m02 * z + m03
                v = m10 * x + m11 * y + m12 * z + m13
                w = m20 * x + m21 * y + m22 * z + m23
                prefetch_cell(flat, n0, n1, n2, u, v, w)
                if use_mask:
                    prefetch_cell(mask_flat, n0, n1, n2, u, v, w)
            pu = uint64(p)
            p3 = uint64(3) * pu
            x = pts[p3]
            y = pts[p3 + uint64(1)]
            z = pts[p3 + uint64(2)]
            u = m00 * x + m01 * y + m02 * z + m03
            v = m10 * x + m11 * y + m12 * z + m13
            w = m20 * x + m21 * y + m22 * z + m23
            if u >= 1.0 and v >= 1.0 and w >= 1.0 and u <= in0 and v <= in1 and w <= in2:
                # inside all but the outermost voxel (most points): edge_ramp is (1, 0) on every axis
                weight = 1.0
                gwu = gwv = gww = 0.0
            else:
                ru, dru = edge_ramp(u, n0)
                rv, drv = edge_ramp(v, n1)
                rw, drw = edge_ramp(w, n2)
                weight = ru * rv * rw
                gwu = dru * rv * rw
                gwv = ru * drv * rw
                gww = ru * rv * drw
            if use_mask and weight > 0.0:
                mval, mdu, mdv, mdw = trilinear_flat(mask_flat, n1, n2, u, v, w, n0)
                gwu = gwu * mval + weight * mdu
                gwv = gwv * mval + weight * mdv
                gww = gww * mval + weight * mdw
                weight = weight * mval
            if weight <= 0.0:
                mov_c[pu] = np.nan
                mov_w[pu] = 0.0
                for a in range(3):
                    g_flat[p3 + uint64(a)] = 0.0
                    gw_flat[p3 + uint64(a)] = 0.0
                continue
            val, du, dv, dw = trilinear_flat(flat, n1, n2, u, v, w, n0)
            mov_w[pu] = weight
            gw_flat[p3] = gwu
            gw_flat[p3 + uint64(1)] = gwv
            gw_flat[p3 + uint64(2)] = gww
            mc = 2.0 + (val - mov_lo) * mov_scale
            if mc < 2.0 or mc > top:
                mc = 2.0 if mc < 2.0 else top
                g_flat[p3] = 0.0
                g_flat[p3 + uint64(1)] = 0.0
                g_flat[p3 + uint64(2)] = 0.0
            else:
                g_flat[p3] = du * mov_scale
                g_flat[p3 + uint64(1)] = dv * mov_scale
                g_flat[p3 + uint64(2)] = dw * mov_scale
            mov_c[pu] = mc
            k0 = int(mc) - 1
            b0, b1, b2, b3 = bspline3_weights(mc - k0 - 1.0)
            row = uint64(fixed_bins[pu] * n_moving_bins + k0)
            part[row] += weight * b0
            part[row + uint64(1)] += weight * b1
            part[row + uint64(2)] += weight * b2
            part[row + uint64(3)] += weight * b3
    hist = np.zeros(size)
    for c in range(n_chunks):
        hist += partial[c]
    return hist.reshape((n_fixed_bins, n_moving_bins))


@njit(cache=True, parallel=True, fastmath=False)
def matrix_gradient(fixed_bins, points, mov_c, mov_g, mov_w, mov_gw, dtable, vox_lin):
    """Gradient of a histogram metric with respect to the fixed-to-moving 3x4 world matrix.

    Parameters
    ----------
    fixed_bins, points, mov_c, mov_g, mov_w, mov_gw
        As filled by :func:`joint_histogram`.
    dtable : float64 (n_fixed_bins, n_moving_bins)
        d(metric) / d(joint histogram entry) (full derivative, histogram in counts).
    vox_lin : float64 (3, 3)
        Linear part of moving_ras2vox (moving world mm to moving voxel index).

    Returns
    -------
    grad : float64 (3, 4)
        d(metric) / d(M[a, b]) where M is the fixed-to-moving RAS matrix (rows 0-2).
    """
    n = points.shape[0]
    n_chunks = (n + CHUNK - 1) // CHUNK
    partial = np.zeros((n_chunks, 12))
    n_moving_bins = dtable.shape[1]
    dflat = dtable.ravel()
    pts = points.reshape(3 * n)  # flat views, unsigned offsets (see joint_histogram)
    g_flat = mov_g.reshape(3 * n)
    gw_flat = mov_gw.reshape(3 * n)
    for c in prange(n_chunks):
        start = c * CHUNK
        stop = min(start + CHUNK, n)
        a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = a20 = a21 = a22 = a23 = 0.0
        for p in range(start, stop):
            pu = uint64(p)
            p3 = uint64(3) * pu
            mc = mov_c[pu]
            if not (mc == mc):
                continue
            k0 = int(mc) - 1
            t = mc - k0 - 1.0
            e0, e1, e2, e3 = bspline3_deriv_weights(t)
            row = uint64(fixed_bins[pu] * n_moving_bins + k0)
            t0 = dflat[row]
            t1 = dflat[row + uint64(1)]
            t2 = dflat[row + uint64(2)]
            t3 = dflat[row + uint64(3)]
            s1 = (e0 * t0 + e1 * t1 + e2 * t2 + e3 * t3) * mov_w[pu]
            # d(metric contribution)/d(moving voxel index); the chain rule to moving world mm
            # (vox_lin^T) is linear, so it is applied once to the sum, not per point
            g0 = s1 * g_flat[p3]
            g1 = s1 * g_flat[p3 + uint64(1)]
            g2 = s1 * g_flat[p3 + uint64(2)]
            gw0 = gw_flat[p3]
            gw1 = gw_flat[p3 + uint64(1)]
            gw2 = gw_flat[p3 + uint64(2)]
            if gw0 != 0.0 or gw1 != 0.0 or gw2 != 0.0:
                # the weight changes only over the outermost voxel and on a soft mask's slopes:
                # elsewhere the histogram-value term is zero and skipped
                b0, b1, b2, b3 = bspline3_weights(t)
                s0 = b0 * t0 + b1 * t1 + b2 * t2 + b3 * t3
                g0 += s0 * gw0
                g1 += s0 * gw1
                g2 += s0 * gw2
            x = pts[p3]
            y = pts[p3 + uint64(1)]
            z = pts[p3 + uint64(2)]
            a00 += g0 * x
            a01 += g0 * y
            a02 += g0 * z
            a03 += g0
            a10 += g1 * x
            a11 += g1 * y
            a12 += g1 * z
            a13 += g1
            a20 += g2 * x
            a21 += g2 * y
            a22 += g2 * z
            a23 += g2
        q = partial[c]
        q[0], q[1], q[2], q[3] = a00, a01, a02, a03
        q[4], q[5], q[6], q[7] = a10, a11, a12, a13
        q[8], q[9], q[10], q[11] = a20, a21, a22, a23
    grad = np.zeros(12)
    for c in range(n_chunks):
        grad += partial[c]
    out = np.zeros((3, 4))
    for a in range(3):
        for b in range(4):
            out[a, b] = vox_lin[0, a] * grad[b] + vox_lin[1, a] * grad[4 + b] + vox_lin[2, a] * grad[8 + b]
    return out


@njit(cache=True, fastmath=False)
def moving_row_order(points, vox_mat, n0, n1):
    """Order (int64 permutation) that visits the points row by row of the moving image's storage.

    Stable counting sort on the row (i, j) of each point's voxel (clamped to the grid) under
    ``vox_mat`` (fixed world mm to moving voxel index, (3, 4)); within a row the points keep their
    order. O(N + n0 n1), deterministic.
    """
    n = points.shape[0]
    key = np.empty(n, dtype=np.int64)
    start = np.zeros(n0 * n1 + 1, dtype=np.int64)
    for p in range(n):
        x = points[p, 0]
        y = points[p, 1]
        z = points[p, 2]
        u = vox_mat[0, 0] * x + vox_mat[0, 1] * y + vox_mat[0, 2] * z + vox_mat[0, 3]
        v = vox_mat[1, 0] * x + vox_mat[1, 1] * y + vox_mat[1, 2] * z + vox_mat[1, 3]
        i = int(min(max(u, 0.0), n0 - 1.0))
        j = int(min(max(v, 0.0), n1 - 1.0))
        key[p] = i * n1 + j
        start[key[p] + 1] += 1
    for r in range(n0 * n1):
        start[r + 1] += start[r]
    order = np.empty(n, dtype=np.int64)
    for p in range(n):
        order[start[key[p]]] = p
        start[key[p]] += 1
    return order


#: Below this many sample points the serial builds are used: waking the thread pool costs more
#: than the work (the coarsest level and the global search evaluate a few thousand points).
SERIAL_BELOW = 20000

def serial_twin(kernel):
    """A serial, GIL-releasing build of a ``parallel=True`` kernel (prange runs as range; identical
    results, no thread wake-up).

    Built from a copy of the Python function under its own name ``<name>_serial``: Numba's on-disk
    cache files are named by the function's qualified name and first line, and their keys do not
    include the compile flags, so a twin built from the same function object shares the parallel
    build's cache entry, and whichever was compiled first is what both load in later processes.
    """
    fn = kernel.py_func
    twin = types_module.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__,
                                     fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + "_serial"
    twin.__doc__ = fn.__doc__
    return njit(cache=True, fastmath=False, nogil=True)(twin)


# Serial builds of the histogram kernels: they release the GIL, so independent evaluations can run
# concurrently in Python threads (:func:`regkl.histogram.serial_kernels`).
joint_histogram_serial = serial_twin(joint_histogram)
matrix_gradient_serial = serial_twin(matrix_gradient)


@njit(cache=True, parallel=True, fastmath=False)
def joint_histograms(fixed_bins, points, moving, vox_mats, mov_lo, mov_scale, n_moving_bins, n_fixed_bins,
                     mov_mask, use_mask):
    """:func:`joint_histogram` of the same points under K poses at once, one pose per thread.

    ``vox_mats`` is (K, 3, 4); returns hists (K, n_fixed_bins, n_moving_bins) and n_valid (K,),
    each bit-identical to a separate call (the same serial chunk order per pose). For the global
    search's hundreds of poses of a few thousand points, where one call per pose costs more in
    Python than in the kernel.
    """
    k = vox_mats.shape[0]
    n = points.shape[0]
    hists = np.empty((k, n_fixed_bins, n_moving_bins))
    n_valid = np.empty(k, dtype=np.int64)
    for q in prange(k):
        mov_c = np.empty(n)
        mov_w = np.empty(n)
        mov_g = np.empty((n, 3))
        mov_gw = np.empty((n, 3))
        hists[q] = joint_histogram_serial(fixed_bins, points, moving, vox_mats[q], mov_lo, mov_scale, n_moving_bins,
                                          n_fixed_bins, mov_c, mov_g, mov_w, mov_gw, mov_mask, use_mask)
        n_valid[q] = np.count_nonzero(mov_w > 0.0)
    return hists, n_valid


#: Number of weighted sums :func:`weighted_moments` accumulates:
#: (w, w f, w f^2, w m, w m^2, w f m) for fixed value f and moving value m at each point.
N_MOMENTS = 6


@njit(cache=True, parallel=True, fastmath=False)
def weighted_moments(points, fixed_values, moving, vox_mat, mov_lo, mov_scale):
    """Weighted first and second moments of (fixed, moving) intensity pairs, and their gradients.

    The same-modality costs (least squares, normalised correlation) are functions of these six
    sums. Each point carries the C1 edge weight ``w`` of :func:`joint_histogram` (1 inside the
    moving image, falling to 0 over the outermost voxel), so points leaving the image drop out
    smoothly. Moving values are trilinear, mapped to ``(m - mov_lo) * mov_scale``.

    Parameters
    ----------
    points : float64 (N, 3)
        Sample points in fixed world mm.
    fixed_values : float64 (N,)
        Fixed intensity at every point (already scaled by the caller).
    moving : float32 (I, J, K)
    vox_mat : float64 (3, 4)
        Fixed world mm to moving voxel index (moving_ras2vox @ fixed2moving).
    mov_lo, mov_scale : float

    Returns
    -------
    sums : float64 (6,)
        ``sum w, sum w f, sum w f^2, sum w m, sum w m^2, sum w f m``.
    grad : float64 (6, 3, 4)
        d sums / d(voxel-index matrix ``vox_mat`` entries); the caller maps it to the world matrix.
    """
    n = points.shape[0]
    n0, n1, n2 = moving.shape
    n_chunks = (n + CHUNK - 1) // CHUNK
    psum = np.zeros((n_chunks, N_MOMENTS))
    pgrad = np.zeros((n_chunks, N_MOMENTS, 3, 4))
    for c in prange(n_chunks):
        start = c * CHUNK
        stop = min(start + CHUNK, n)
        for p in range(start, stop):
            x = points[p, 0]
            y = points[p, 1]
            z = points[p, 2]
            u = vox_mat[0, 0] * x + vox_mat[0, 1] * y + vox_mat[0, 2] * z + vox_mat[0, 3]
            v = vox_mat[1, 0] * x + vox_mat[1, 1] * y + vox_mat[1, 2] * z + vox_mat[1, 3]
            w = vox_mat[2, 0] * x + vox_mat[2, 1] * y + vox_mat[2, 2] * z + vox_mat[2, 3]
            ru, dru = edge_ramp(u, n0)
            rv, drv = edge_ramp(v, n1)
            rw, drw = edge_ramp(w, n2)
            weight = ru * rv * rw
            if weight <= 0.0:
                continue
            ok, val, du, dv, dw = trilinear(moving, u, v, w)
            f = fixed_values[p]
            m = (val - mov_lo) * mov_scale
            gw0 = dru * rv * rw
            gw1 = ru * drv * rw
            gw2 = ru * rv * drw
            gm0 = du * mov_scale
            gm1 = dv * mov_scale
            gm2 = dw * mov_scale
            psum[c, 0] += weight
            psum[c, 1] += weight * f
            psum[c, 2] += weight * f * f
            psum[c, 3] += weight * m
            psum[c, 4] += weight * m * m
            psum[c, 5] += weight * f * m
            # d(term)/d(voxel index) = a * d weight + b * d m, per moment (a, b); inside the image
            # (all but the outermost voxel) the weight is flat and only the moving terms move
            edge = gw0 != 0.0 or gw1 != 0.0 or gw2 != 0.0
            for k in range(0 if edge else 3, N_MOMENTS):
                if k == 0:
                    a, b = 1.0, 0.0
                elif k == 1:
                    a, b = f, 0.0
                elif k == 2:
                    a, b = f * f, 0.0
                elif k == 3:
                    a, b = m, weight
                elif k == 4:
                    a, b = m * m, 2.0 * weight * m
                else:
                    a, b = f * m, weight * f
                g0 = a * gw0 + b * gm0
                g1 = a * gw1 + b * gm1
                g2 = a * gw2 + b * gm2
                pgrad[c, k, 0, 0] += g0 * x
                pgrad[c, k, 0, 1] += g0 * y
                pgrad[c, k, 0, 2] += g0 * z
                pgrad[c, k, 0, 3] += g0
                pgrad[c, k, 1, 0] += g1 * x
                pgrad[c, k, 1, 1] += g1 * y
                pgrad[c, k, 1, 2] += g1 * z
                pgrad[c, k, 1, 3] += g1
                pgrad[c, k, 2, 0] += g2 * x
                pgrad[c, k, 2, 1] += g2 * y
                pgrad[c, k, 2, 2] += g2 * z
                pgrad[c, k, 2, 3] += g2
    sums = np.zeros(N_MOMENTS)
    grad = np.zeros((N_MOMENTS, 3, 4))
    for c in range(n_chunks):
        sums += psum[c]
        grad += pgrad[c]
    return sums, grad


@njit(cache=True, parallel=True, fastmath=False)
def resample_linear(data, vox2vox, out_shape0, out_shape1, out_shape2, fill):
    """Trilinear resampling: out[i, j, k] = data at vox2vox @ (i, j, k, 1); ``fill`` outside."""
    out = np.empty((out_shape0, out_shape1, out_shape2), dtype=np.float32)
    for i in prange(out_shape0):
        for j in range(out_shape1):
            for k in range(out_shape2):
                u = vox2vox[0, 0] * i + vox2vox[0, 1] * j + vox2vox[0, 2] * k + vox2vox[0, 3]
                v = vox2vox[1, 0] * i + vox2vox[1, 1] * j + vox2vox[1, 2] * k + vox2vox[1, 3]
                w = vox2vox[2, 0] * i + vox2vox[2, 1] * j + vox2vox[2, 2] * k + vox2vox[2, 3]
                ok, val, du, dv, dw = trilinear(data, u, v, w)
                out[i, j, k] = val if ok else fill
    return out


@njit(cache=True, parallel=True, fastmath=False)
def resample_nearest(data, vox2vox, out_shape0, out_shape1, out_shape2, fill):
    """Nearest-neighbour resampling; ``fill`` outside [-0.5, n-0.5) on any axis."""
    n0, n1, n2 = data.shape
    out = np.empty((out_shape0, out_shape1, out_shape2), dtype=data.dtype)
    for i in prange(out_shape0):
        for j in range(out_shape1):
            for k in range(out_shape2):
                u = vox2vox[0, 0] * i + vox2vox[0, 1] * j + vox2vox[0, 2] * k + vox2vox[0, 3]
                v = vox2vox[1, 0] * i + vox2vox[1, 1] * j + vox2vox[1, 2] * k + vox2vox[1, 3]
                w = vox2vox[2, 0] * i + vox2vox[2, 1] * j + vox2vox[2, 2] * k + vox2vox[2, 3]
                a = int(math.floor(u + 0.5))
                b = int(math.floor(v + 0.5))
                c = int(math.floor(w + 0.5))
                if a < 0 or b < 0 or c < 0 or a >= n0 or b >= n1 or c >= n2:
                    out[i, j, k] = fill
                else:
                    out[i, j, k] = data[a, b, c]
    return out


@njit(cache=True, parallel=True, fastmath=False)
def block_mean(data, f0, f1, f2):
    """Mean over non-overlapping f0 x f1 x f2 blocks (trailing partial blocks dropped), float32.

    Accumulates in float64 per block, so the result does not depend on the thread count.
    """
    n0, n1, n2 = data.shape[0] // f0, data.shape[1] // f1, data.shape[2] // f2
    out = np.empty((n0, n1, n2), dtype=np.float32)
    inv = 1.0 / (f0 * f1 * f2)
    for i in prange(n0):
        for j in range(n1):
            for k in range(n2):
                acc = 0.0
                for a in range(i * f0, i * f0 + f0):
                    for b in range(j * f1, j * f1 + f1):
                        for c in range(k * f2, k * f2 + f2):
                            acc += data[a, b, c]
                out[i, j, k] = acc * inv
    return out


# Serial twins of the moments and block-mean kernels (see joint_histogram_serial above).
weighted_moments_serial = serial_twin(weighted_moments)
block_mean_serial = serial_twin(block_mean)
# Serial twins of the resampling kernels (the volumes of a series resampled in a thread pool).
resample_linear_serial = serial_twin(resample_linear)
resample_nearest_serial = serial_twin(resample_nearest)


#: Kernels a registration uses (``register``, ``batch``): :func:`warm_up` loads only these for it.
#: (The serial twins serve levels under :data:`SERIAL_BELOW` points; nearest-neighbour resampling,
#: serial block means and the moments kernels serve ``--interp nearest`` and ``realign``.)
REGISTRATION_KERNELS = ("resample_linear", "block_mean", "joint_histogram", "matrix_gradient",
                       "joint_histogram_serial", "matrix_gradient_serial", "joint_histograms", "moving_row_order")


def warm_up(names=None):
    """Load cached kernels once on tiny inputs (Numba's one-off start-up cost, ~0.3 s): every
    kernel, or those named in ``names`` (e.g. :data:`REGISTRATION_KERNELS`; each one more costs
    ~5-15 ms).

    Safe to call from a background thread while images are read.
    """
    data = np.zeros((2, 2, 2), dtype=np.float32)
    mat = np.eye(4)
    pts = np.zeros((1, 3))
    bins = np.zeros(1, dtype=np.int32)
    c, w = np.empty(1), np.empty(1)
    g, gw = np.empty((1, 3)), np.empty((1, 3))
    calls = {
        "resample_linear": lambda: resample_linear(data, mat, 1, 1, 1, np.float32(0.0)),
        "resample_nearest": lambda: resample_nearest(data, mat, 1, 1, 1, np.float32(0.0)),
        "block_mean": lambda: block_mean(data, 2, 2, 2),
        "block_mean_serial": lambda: block_mean_serial(data, 2, 2, 2),
        "joint_histogram": lambda: joint_histogram(bins, pts, data, mat[:3].copy(), 0.0, 1.0, 8, 8, c, g, w, gw,
                                                   data, False),
        "matrix_gradient": lambda: matrix_gradient(bins, pts, c, g, w, gw, np.zeros((8, 8)), mat[:3, :3].copy()),
        "joint_histogram_serial": lambda: joint_histogram_serial(bins, pts, data, mat[:3].copy(), 0.0, 1.0, 8, 8, c,
                                                                 g, w, gw, data, False),
        "matrix_gradient_serial": lambda: matrix_gradient_serial(bins, pts, c, g, w, gw, np.zeros((8, 8)),
                                                                 mat[:3, :3].copy()),
        "joint_histograms": lambda: joint_histograms(bins, pts, data, mat[None, :3].copy(), 0.0, 1.0, 8, 8, data,
                                                     False),
        "moving_row_order": lambda: moving_row_order(pts, mat[:3].copy(), 2, 2),
        "weighted_moments": lambda: weighted_moments(pts, np.zeros(1), data, mat[:3].copy(), 0.0, 1.0),
        "weighted_moments_serial": lambda: weighted_moments_serial(pts, np.zeros(1), data, mat[:3].copy(), 0.0, 1.0),
    }
    for name in calls if names is None else names:
        calls[name]()
