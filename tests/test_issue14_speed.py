"""Issue 14 (speed): the pieces behind the faster registration keep their meaning.

Branch-free B-spline weights against the reference kernel, batched histograms against single
calls, a sample cap that bounds the work without bunching the points, robust ranges read from a
stride, and the cap as the registration applies it.
"""

import numpy as np
import pytest
from scipy import ndimage

from regkl import histogram, kernels, pyramid
from regkl.volume import Volume


def test_bspline_weights_equal_the_reference_kernel():
    for t in np.linspace(0.0, 1.0, 101):
        weights = kernels.bspline3_weights(t)
        derivs = kernels.bspline3_deriv_weights(t)
        for j in range(4):
            # bin k0 + j of a continuous bin k0 + 1 + t sits at offset 1 + t - j
            assert weights[j] == pytest.approx(kernels.bspline3(1.0 + t - j), abs=1e-15)
            assert derivs[j] == pytest.approx(kernels.bspline3_deriv(1.0 + t - j), abs=1e-15)
        assert sum(weights) == pytest.approx(1.0, abs=1e-15)
        assert sum(derivs) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("with_mask", [False, True])
def test_batched_histograms_equal_single_calls_bit_for_bit(with_mask):
    rng = np.random.default_rng(14)
    data = (ndimage.gaussian_filter(rng.random((18, 16, 14)), 1.5) * 100).astype(np.float32)
    moving = Volume(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    mask = ndimage.gaussian_filter((rng.random(data.shape) > 0.3).astype(np.float32), 1.5) if with_mask else None
    level = histogram.make_moving_level(moving, 20, mask=mask)
    samples = histogram.make_samples(rng.uniform(-4, 36, size=(3000, 3)), rng.random(3000), 12)
    mats = []
    for a in np.linspace(-0.3, 0.3, 5):
        m = np.eye(4)
        m[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
        m[:3, 3] = [a * 10, -a * 5, 1.0]
        mats.append(m)
    hists, n_valid = histogram.joint_histograms(samples, level, np.stack(mats))
    for m, h, nv in zip(mats, hists, n_valid):
        single = histogram.joint_histogram(samples, level, m)
        np.testing.assert_array_equal(h, single.hist)
        assert nv == single.n_valid
    assert 0 < min(n_valid) < 3000  # some points fall outside: the edge handling is exercised


def test_sample_cap_bounds_points_spreads_them_and_is_seeded():
    vol = Volume(np.random.default_rng(0).random((60, 50, 40)).astype(np.float32), np.eye(4))
    pts, vals = pyramid.sample_grid(vol, 0.5, np.random.default_rng(3), max_points=6000)
    assert pts.shape == (6000, 3) and vals.shape == (6000,)
    again, _ = pyramid.sample_grid(vol, 0.5, np.random.default_rng(3), max_points=6000)
    np.testing.assert_array_equal(pts, again)
    # stratified: every block of 10 slices along each axis gets its share (not a random clump)
    for axis, n in enumerate(vol.shape):
        counts = np.histogram(pts[:, axis], bins=n // 10, range=(-0.5, n - 0.5))[0]
        assert counts.min() > 0.7 * counts.mean(), (axis, counts)
    # the fraction still applies below the cap
    few, _ = pyramid.sample_grid(vol, 0.01, np.random.default_rng(3), max_points=6000)
    assert len(few) == round(0.01 * vol.data.size)


def test_robust_range_of_a_large_array_reads_a_stride_and_falls_back_when_sparse():
    rng = np.random.default_rng(1)
    big = rng.normal(100.0, 10.0, size=3 * histogram.RANGE_MAX_VALUES).astype(np.float32)
    lo, hi = histogram.robust_range(big)
    full = np.percentile(big, [0.5, 99.5])
    assert lo == pytest.approx(full[0], rel=0.005) and hi == pytest.approx(full[1], rel=0.005)
    sparse = np.zeros(3 * histogram.RANGE_MAX_VALUES, dtype=np.float32)
    sparse[7::100003] = 5.0  # missed by the stride: the full array must still be read
    assert histogram.robust_range(sparse) == (0.0, 5.0)


def test_registration_applies_the_cap_to_every_level():
    from regkl.optimize import register

    rng = np.random.default_rng(2)
    data = ndimage.gaussian_filter(rng.random((48, 48, 40)), 2.0).astype(np.float32)
    fixed = Volume(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    moving = Volume(np.sqrt(data) * 10, fixed.vox2ras)
    result = register(moving, fixed, levels=2, search="none", max_points=5000)
    assert [lv.n_points for lv in result.levels] == [5000, 5000]
    assert result.settings["max_points"] == 5000
    assert np.allclose(result.fixed2moving, np.eye(4), atol=0.05)


def test_thinned_samples_are_contiguous_every_kth_point():
    rng = np.random.default_rng(5)
    samples = histogram.make_samples(rng.uniform(0, 10, size=(1000, 3)), rng.random(1000), 8)
    thin = histogram.thinned(samples, 300)
    assert len(thin.points) == 250  # step 4
    np.testing.assert_array_equal(thin.points, samples.points[::4])
    np.testing.assert_array_equal(thin.bins, samples.bins[::4])
    # the kernels' compiled (C-contiguous) specialisation applies; a strided view would compile anew
    assert thin.points.flags.c_contiguous and thin.bins.flags.c_contiguous and thin.values.flags.c_contiguous
    assert histogram.thinned(samples, 5000) is samples
