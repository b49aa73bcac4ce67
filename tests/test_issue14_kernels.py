"""Issue 14 (kernel throughput): the faster histogram and gradient keep their meaning.

The moving-row visiting order against a NumPy stable sort, the histogram and gradient unchanged
(to rounding) by the order, the histogram on a moving image large enough for the software
prefetch against brute-force NumPy, the gradient (chain rule to world mm now applied once to the
sums) against finite differences of every matrix entry on an oblique moving grid, and
bit-identical results at 1 and 2 threads.
"""

import numba
import numpy as np
import pytest
from scipy import ndimage

from regkl import histogram, kernels
from regkl.metrics import mutual_information
from regkl.volume import Volume


def _oblique_level(rng, shape=(23, 19, 17), mask=False):
    data = (ndimage.gaussian_filter(rng.random(shape), 2.0) * 100).astype(np.float32)
    v2r = np.diag([2.5, 2.0, 3.0, 1.0])
    a = 0.3
    v2r[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0.1], [np.sin(a), np.cos(a), 0.0], [0.0, 0.2, 1.0]]) @ v2r[:3, :3]
    v2r[:3, 3] = [3.0, -4.0, 2.0]
    moving = Volume(data, v2r)
    weights = ndimage.gaussian_filter((rng.random(shape) > 0.3).astype(np.float32), 1.5) if mask else None
    return moving, histogram.make_moving_level(moving, 24, mask=weights)


def _samples_inside(rng, moving, n, n_bins=16):
    """Points over the moving image's grid (some just outside), in random order, with values."""
    idx = rng.uniform(-1.0, np.asarray(moving.shape) - 0.5, size=(n, 3))
    pts = moving.world_coords(idx)
    vals = ndimage.map_coordinates(moving.data, idx.T, order=1, mode="nearest") ** 1.5
    return histogram.make_samples(pts, vals, n_bins)


def test_moving_row_order_is_a_stable_sort_on_the_moving_row():
    rng = np.random.default_rng(140)
    moving, level = _oblique_level(rng)
    samples = _samples_inside(rng, moving, 5000)
    m = np.eye(4)
    m[:3, 3] = [1.5, -2.0, 0.5]
    vox = samples.points @ (moving.ras2vox @ m)[:3, :3].T + (moving.ras2vox @ m)[:3, 3]
    i = np.clip(vox[:, 0], 0, moving.shape[0] - 1).astype(np.int64)
    j = np.clip(vox[:, 1], 0, moving.shape[1] - 1).astype(np.int64)
    expected = np.argsort(i * moving.shape[1] + j, kind="stable")
    ordered = histogram.in_moving_order(samples, level, m)
    np.testing.assert_array_equal(ordered.points, samples.points[expected])
    np.testing.assert_array_equal(ordered.values, samples.values[expected])
    np.testing.assert_array_equal(ordered.bins, samples.bins[expected])
    assert ordered.n_bins == samples.n_bins


@pytest.mark.parametrize("with_mask", [False, True])
def test_moving_order_changes_histogram_and_gradient_by_rounding_only(with_mask):
    rng = np.random.default_rng(141)
    moving, level = _oblique_level(rng, mask=with_mask)
    samples = _samples_inside(rng, moving, 6000)
    m = np.eye(4)
    m[:3, 3] = [1.0, 2.0, -1.5]
    ordered = histogram.in_moving_order(samples, level, m)
    a = histogram.joint_histogram(samples, level, m)
    b = histogram.joint_histogram(ordered, level, m)
    assert a.n_valid == b.n_valid and 0 < a.n_valid < 6000  # some points fall outside
    np.testing.assert_allclose(b.hist, a.hist, rtol=1e-12, atol=1e-12 * a.hist.max())
    dtable = mutual_information(a.hist)[1]
    ga = histogram.matrix_gradient(samples, level, a, dtable)
    gb = histogram.matrix_gradient(ordered, level, b, dtable)
    np.testing.assert_allclose(gb, ga, rtol=1e-10, atol=1e-10 * np.abs(ga).max())


def _bspline3(t):
    a = np.abs(t)
    return np.where(a < 1, 2 / 3 - a ** 2 + a ** 3 / 2, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))


def _smoothstep_weight(t, n):
    def s(x):
        x = np.clip(x, 0, 1)
        return x * x * (3 - 2 * x)
    return np.where((t > 0) & (t < n - 1), s(t) * s(n - 1 - t), 0.0)


@pytest.mark.parametrize("with_mask", [False, True])
def test_histogram_with_prefetching_equals_brute_force(with_mask):
    """A moving image above PREFETCH_MIN_VOXELS (the prefetching path), points inside, on the
    edge ramps and outside, the last ones near the end of the array."""
    rng = np.random.default_rng(144)
    shape = (90, 80, 76)
    assert np.prod(shape) >= kernels.PREFETCH_MIN_VOXELS
    data = (ndimage.gaussian_filter(rng.random(shape), 2.0) * 100).astype(np.float32)
    mask = ndimage.gaussian_filter((rng.random(shape) > 0.3).astype(np.float32), 2.0) if with_mask else None
    level = histogram.make_moving_level(Volume(data, np.eye(4)), 24, mask=mask)
    n = 4000
    idx = rng.uniform(-2.0, np.asarray(shape) + 1.0, size=(n, 3))
    samples = histogram.make_samples(idx, rng.random(n), 12)
    ev = histogram.joint_histogram(samples, level, np.eye(4))
    weight = np.ones(n)
    for a in range(3):
        weight *= _smoothstep_weight(idx[:, a], shape[a])
    if with_mask:
        weight *= ndimage.map_coordinates(mask.astype(np.float64), idx.T, order=1, mode="nearest")
    vals = ndimage.map_coordinates(data.astype(np.float64), idx.T, order=1, mode="nearest")
    mc = np.clip(2 + (vals - level.lo) * level.scale, 2, level.n_bins - 3)
    ref = np.zeros((12, level.n_bins))
    for k in range(level.n_bins):
        np.add.at(ref[:, k], samples.bins, weight * _bspline3(mc - k))
    assert 0 < ev.n_valid < n
    np.testing.assert_allclose(ev.hist, ref, rtol=1e-9, atol=1e-9)


def test_matrix_gradient_matches_finite_differences_of_every_matrix_entry():
    """d MI / d M[a, b] for all 12 entries of the fixed-to-moving matrix, oblique moving grid."""
    rng = np.random.default_rng(142)
    moving, level = _oblique_level(rng)
    samples = _samples_inside(rng, moving, 20000)
    m0 = np.eye(4)
    m0[:3, :3] += rng.uniform(-0.03, 0.03, (3, 3))
    m0[:3, 3] = [0.7, -0.4, 0.9]

    def mi(m):
        return mutual_information(histogram.joint_histogram(samples, level, m).hist)[0]

    ev = histogram.joint_histogram(samples, level, m0)
    grad = histogram.matrix_gradient(samples, level, ev, mutual_information(ev.hist)[1])
    fd = np.zeros((3, 4))
    for a in range(3):
        for b in range(4):
            h = 1e-4 if b == 3 else 1e-6  # translation in mm, the linear part per mm of position
            e = np.zeros((4, 4))
            e[a, b] = h
            fd[a, b] = (mi(m0 + e) - mi(m0 - e)) / (2 * h)
    # trilinear interpolation is only C0 across voxel faces, so the differences see a few kinks:
    # 2e-5 of the largest entry here; the chain rule with vox_lin instead of its transpose is 0.57 off
    np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-3 * np.abs(fd).max())


def test_parallel_kernels_give_the_same_bits_at_one_and_two_threads():
    rng = np.random.default_rng(143)
    moving, level = _oblique_level(rng, shape=(40, 36, 30), mask=True)
    samples = _samples_inside(rng, moving, kernels.SERIAL_BELOW + 9000)
    m = np.eye(4)
    m[:3, 3] = [0.5, 0.5, -1.0]
    samples = histogram.in_moving_order(samples, level, m)
    assert not histogram._serial(len(samples.points))
    before = numba.get_num_threads()
    out = []
    try:
        for t in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(t)
            ev = histogram.joint_histogram(samples, level, m)
            out.append((ev.hist, histogram.matrix_gradient(samples, level, ev, mutual_information(ev.hist)[1])))
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])


_CALL_GRADIENT = """
import sys, numba, numpy as np
from regkl import kernels
n = 10
fn = kernels.matrix_gradient if sys.argv[1] == "parallel" else kernels.matrix_gradient_serial
fn(np.zeros(n, np.int32), np.zeros((n, 3)), np.full(n, 5.5), np.zeros((n, 3)), np.ones(n), np.zeros((n, 3)),
   np.ones((24, 24)), np.eye(3))
try:
    numba.threading_layer()
    print("threads")
except ValueError:  # no parallel region has run in this process
    print("no threads")
"""


def test_serial_twin_does_not_load_the_parallel_build_from_the_cache(tmp_path):
    """Numba's cache keys ignore the compile flags: a twin sharing the parallel kernel's name and
    line loaded the parallel build (or the parallel kernel the serial one) in later processes."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    runs = [subprocess.run([sys.executable, "-c", _CALL_GRADIENT, which], env=env, capture_output=True, text=True)
            for which in ("parallel", "serial", "parallel")]
    assert [r.stdout.strip() for r in runs] == ["threads", "no threads", "threads"], [r.stderr[-500:] for r in runs]
