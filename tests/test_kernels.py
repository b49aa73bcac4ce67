"""Kernels against independent NumPy/SciPy computations and finite differences."""

import numpy as np
import pytest
from scipy import ndimage

from regkl import histogram, kernels
from regkl.errors import KernelInputError
from regkl.metrics import mutual_information
from regkl.objective import _Objective
from regkl.transforms import get_model
from regkl.volume import Volume


def bspline3_numpy(t):
    """Cubic B-spline as the 4-fold convolution of a box: closed form by pieces."""
    a = np.abs(t)
    return np.where(a < 1, 2 / 3 - a ** 2 + a ** 3 / 2, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))


def test_bspline3_matches_closed_form_and_partition_of_unity():
    t = np.linspace(-3, 3, 601)
    ours = np.array([kernels.bspline3(x) for x in t])
    np.testing.assert_allclose(ours, bspline3_numpy(t), atol=1e-14)
    for x in np.linspace(0, 1, 11):
        assert sum(kernels.bspline3(x - k) for k in range(-3, 4)) == pytest.approx(1.0, abs=1e-14)


def test_bspline3_derivative_matches_finite_differences():
    h = 1e-6
    for x in np.linspace(-2.5, 2.5, 51):
        fd = (kernels.bspline3(x + h) - kernels.bspline3(x - h)) / (2 * h)
        assert kernels.bspline3_deriv(x) == pytest.approx(fd, abs=1e-6)


def _smooth_random(shape, rng, sigma=1.5):
    return ndimage.gaussian_filter(rng.random(shape), sigma).astype(np.float32) * 100


def _ramp(t, n):
    """Independent edge weight: product form of a smoothstep on each side."""
    def s(x):
        x = np.clip(x, 0, 1)
        return x * x * (3 - 2 * x)
    return np.where((t > 0) & (t < n - 1), s(t) * s(n - 1 - t), 0.0)


def brute_force_histogram(fixed_bins, points, moving, vox_mat, lo, scale, nm, nf, mask=None):
    vox = points @ vox_mat[:, :3].T + vox_mat[:, 3]
    weight = np.ones(len(points))
    for a in range(3):
        weight *= _ramp(vox[:, a], moving.shape[a])
    if mask is not None:
        weight *= ndimage.map_coordinates(mask.astype(np.float64), vox.T, order=1, mode="nearest")
    vals = ndimage.map_coordinates(moving.astype(np.float64), vox.T, order=1, mode="nearest")
    mc = np.clip(2 + (vals - lo) * scale, 2, nm - 3)
    hist = np.zeros((nf, nm))
    for p in range(len(points)):
        if weight[p] <= 0:
            continue
        for k in range(nm):
            hist[fixed_bins[p], k] += weight[p] * bspline3_numpy(mc[p] - k)
    return hist


@pytest.mark.parametrize("seed", [0, 1])
def test_joint_histogram_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    moving = _smooth_random((17, 13, 11), rng)
    n = 3000
    points = rng.uniform(-5, 40, size=(n, 3))  # many fall outside or near the edge
    fixed_bins = rng.integers(0, 12, n).astype(np.int32)
    vox_mat = np.array([[0.5, 0.05, 0.0, 1.0], [-0.03, 0.4, 0.02, -2.0], [0.0, 0.01, 0.3, 0.5]])
    lo, scale, nm, nf = 20.0, 0.9, 24, 12
    out = [np.empty(n), np.empty((n, 3)), np.empty(n), np.empty((n, 3))]
    ours = kernels.joint_histogram(fixed_bins, points, moving, vox_mat, lo, scale, nm, nf, *out, moving, False)
    ref = brute_force_histogram(fixed_bins, points, moving, vox_mat, lo, scale, nm, nf)
    assert 0 < np.count_nonzero(out[2] > 0) < n
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)


def test_joint_histogram_with_moving_mask_equals_brute_force():
    rng = np.random.default_rng(4)
    moving = _smooth_random((17, 13, 11), rng)
    mask = (ndimage.gaussian_filter(rng.random((17, 13, 11)), 2) > 0.5).astype(np.float32)
    n = 3000
    points = rng.uniform(-5, 40, size=(n, 3))
    fixed_bins = rng.integers(0, 12, n).astype(np.int32)
    vox_mat = np.array([[0.5, 0.05, 0.0, 1.0], [-0.03, 0.4, 0.02, -2.0], [0.0, 0.01, 0.3, 0.5]])
    out = [np.empty(n), np.empty((n, 3)), np.empty(n), np.empty((n, 3))]
    ours = kernels.joint_histogram(fixed_bins, points, moving, vox_mat, 20.0, 0.9, 24, 12, *out, mask, True)
    ref = brute_force_histogram(fixed_bins, points, moving, vox_mat, 20.0, 0.9, 24, 12, mask)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-9)


def test_mi_gradient_with_soft_moving_mask_matches_finite_differences():
    rng = np.random.default_rng(8)
    fixed = Volume(_smooth_random((30, 32, 28), rng, sigma=2.0), np.diag([2.0, 2.0, 2.0, 1.0]))
    moving_data = np.sqrt(fixed.data) * 10
    mask = ndimage.gaussian_filter((rng.random(fixed.shape) > 0.3).astype(np.float32), 2.0)
    obj = _objective_for(fixed, Volume(moving_data, fixed.vox2ras))
    obj.moving = histogram.make_moving_level(obj.moving.volume, 32, mask=mask)
    q = np.full(6, 0.7)
    _, grad = obj(q)
    h = 1e-4
    fd = np.array([(obj(q + h * e)[0] - obj(q - h * e)[0]) / (2 * h) for e in np.eye(6)])
    assert _cosine(grad, fd) > 0.99


def test_joint_histogram_total_is_number_of_interior_points():
    rng = np.random.default_rng(3)
    moving = Volume(_smooth_random((20, 20, 20), rng), np.eye(4))
    pts = rng.uniform(2, 17, size=(5000, 3))
    samples = histogram.make_samples(pts, rng.random(5000), 16)
    ev = histogram.joint_histogram(samples, histogram.make_moving_level(moving, 32), np.eye(4))
    assert ev.hist.sum() == pytest.approx(5000)
    assert ev.n_valid == 5000


def test_mutual_information_matches_direct_formula():
    rng = np.random.default_rng(5)
    hist = rng.random((6, 9)) * (rng.random((6, 9)) > 0.3)
    p = hist / hist.sum()
    pf, pm = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    direct = np.sum(p[nz] * np.log(p[nz] / (pf @ pm)[nz]))
    value, dtable = mutual_information(hist)
    assert value == pytest.approx(direct, rel=1e-12)
    # dtable is the derivative with respect to each count
    h = 1e-7
    for (i, j) in [(0, 0), (2, 3), (5, 8)]:
        if hist[i, j] == 0:
            continue
        bumped = hist.copy()
        bumped[i, j] += h
        assert dtable[i, j] == pytest.approx((mutual_information(bumped)[0] - value) / h, rel=1e-4, abs=1e-9)


def _objective_for(fixed, moving, model="rigid", bins=32, seed=0):
    rng = np.random.default_rng(seed)
    idx = rng.uniform(0, np.asarray(fixed.shape) - 1, size=(20000, 3))
    vals = ndimage.map_coordinates(fixed.data, idx.T, order=1)
    samples = histogram.make_samples(fixed.world_coords(idx), vals, bins)
    mdl = get_model(model)
    return _Objective(samples, histogram.make_moving_level(moving, bins), mdl,
                      mutual_information, fixed.centre_of_mass(), mdl.scales(40.0))


def _cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.mark.parametrize("model", ["rigid", "translation"])
def test_mi_gradient_matches_finite_differences_synthetic(model):
    rng = np.random.default_rng(7)
    data = _smooth_random((30, 32, 28), rng, sigma=2.0)
    fixed = Volume(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    # moving: a non-linear intensity remap on an oblique 2.5 mm grid covering part of the fixed FOV
    v2r = np.diag([2.5, 2.5, 2.5, 1.0])
    v2r[:3, :3] = v2r[:3, :3] @ np.array([[0.98, -0.17, 0], [0.17, 0.98, 0], [0, 0, 1.0]])
    v2r[:3, 3] = [4.0, 1.0, 3.0]
    grid = Volume(np.zeros((20, 22, 18)), v2r)
    from regkl.resample import resample
    mov_vals = resample(fixed, grid, np.eye(4)).data
    moving = Volume(np.sqrt(np.abs(mov_vals)) * 10, v2r)
    obj = _objective_for(fixed, moving, model)
    q = np.full(obj.model.n_params, 0.7)
    _, grad = obj(q)
    h = 1e-4
    fd = np.array([(obj(q + h * e)[0] - obj(q - h * e)[0]) / (2 * h) for e in np.eye(len(q))])
    assert _cosine(grad, fd) > 0.99
    np.testing.assert_allclose(grad, fd, rtol=0.05, atol=1e-3 * np.abs(fd).max())


def test_mi_gradient_matches_finite_differences_real_pair(real_pair):
    moving, fixed = real_pair
    from regkl.pyramid import downsample
    obj = _objective_for(downsample(fixed, 4.0), downsample(moving, 4.0))
    q = np.array([2.0, -1.0, 1.5, 3.0, -2.0, 1.0])
    _, grad = obj(q)
    h = 1e-3
    fd = np.array([(obj(q + h * e)[0] - obj(q - h * e)[0]) / (2 * h) for e in np.eye(6)])
    assert _cosine(grad, fd) > 0.99


def test_histogram_wrapper_rejects_bad_inputs():
    with pytest.raises(KernelInputError):
        histogram.make_samples(np.zeros((5, 2)), np.zeros(5), 16)
    with pytest.raises(KernelInputError):
        histogram.make_samples(np.full((5, 3), np.nan), np.zeros(5), 16)
    with pytest.raises(KernelInputError, match="constant"):
        histogram.make_moving_level(Volume(np.ones((4, 4, 4)), np.eye(4)), 32)
    moving = histogram.make_moving_level(Volume(np.arange(64.0).reshape(4, 4, 4), np.eye(4)), 32)
    samples = histogram.make_samples(np.zeros((5, 3)), np.arange(5.0), 16)
    with pytest.raises(KernelInputError):
        histogram.joint_histogram(samples, moving, np.full((4, 4), np.inf))


def test_resample_linear_matches_scipy():
    rng = np.random.default_rng(11)
    data = _smooth_random((15, 16, 17), rng)
    mat = np.array([[0.9, 0.1, 0.0, 0.5], [-0.1, 0.95, 0.05, 1.2], [0.02, 0.0, 1.05, -0.3], [0, 0, 0, 1.0]])
    out = kernels.resample_linear(data, mat, 12, 13, 14, np.float32(-1))
    idx = np.stack(np.meshgrid(np.arange(12), np.arange(13), np.arange(14), indexing="ij"), -1).reshape(-1, 3)
    coords = idx @ mat[:3, :3].T + mat[:3, 3]
    ref = ndimage.map_coordinates(data, coords.T, order=1, mode="nearest").reshape(12, 13, 14)
    inside = np.all((coords >= 0) & (coords <= np.array(data.shape) - 1), axis=1).reshape(12, 13, 14)
    np.testing.assert_allclose(out[inside], ref[inside], rtol=1e-5, atol=1e-4)
    assert np.all(out[~inside] == -1)


@pytest.mark.parametrize("shape,factors", [((15, 16, 17), (3, 3, 3)), ((9, 8, 7), (1, 2, 3)), ((5, 6, 7), (5, 1, 2)),
                                           ((4, 4, 4), (1, 1, 1))])
def test_block_mean_matches_numpy_reshape(shape, factors):
    data = np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32)
    f0, f1, f2 = factors
    n0, n1, n2 = shape[0] // f0, shape[1] // f1, shape[2] // f2
    ref = data[: n0 * f0, : n1 * f1, : n2 * f2].astype(np.float64).reshape(n0, f0, n1, f1, n2, f2).mean(axis=(1, 3, 5))
    out = kernels.block_mean(data, f0, f1, f2)
    assert out.shape == (n0, n1, n2) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


def test_serial_kernels_switch_is_per_thread_and_gives_identical_results():
    """Inside ``serial_kernels()`` the GIL-free serial builds run, only in that thread, and two
    threads evaluating at once get exactly what the parallel kernels give one after the other."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(3)
    moving = Volume(_smooth_random((30, 28, 26), rng).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    n = kernels.SERIAL_BELOW + 5000  # large enough for the parallel kernels by default
    points = rng.uniform(5, 50, size=(n, 3))
    samples = histogram.make_samples(points, rng.uniform(0, 1, n).astype(np.float32), 16)
    level = histogram.make_moving_level(moving, 16)
    mats = [np.eye(4), get_model("rigid").matrix(np.array([0.05, -0.03, 0.02, 1.0, -2.0, 0.5]), np.full(3, 27.0))]

    def evaluate(m):
        ev = histogram.joint_histogram(samples, level, m)
        _, dtable = mutual_information(ev.hist)
        return ev.hist, histogram.matrix_gradient(samples, level, ev, dtable)

    assert not histogram._serial(n)
    reference = [evaluate(m) for m in mats]
    seen = []

    def in_thread(m):
        with histogram.serial_kernels():
            seen.append(histogram._serial(n))
            return evaluate(m)

    with ThreadPoolExecutor(max_workers=2) as pool:
        threaded = list(pool.map(in_thread, mats))
    assert seen == [True, True] and not histogram._serial(n)
    other = []
    with histogram.serial_kernels():
        t = threading.Thread(target=lambda: other.append(histogram._serial(n)))
        t.start()
        t.join()
    assert other == [False]
    for (h0, g0), (h1, g1) in zip(reference, threaded):
        np.testing.assert_array_equal(h0, h1)
        np.testing.assert_array_equal(g0, g1)
