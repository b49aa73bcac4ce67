"""Issue 14 (kernel throughput, session 6): the shortcuts of the histogram and gradient kernels.

The histogram kernel takes points inside all but the outermost voxel without the edge ramps, and
the gradient kernel leaves out the histogram-value term where the weight does not move. Checked
against brute-force NumPy: the weights at the exact ends of the shortcut, and the gradient kernel
(a fixed d metric / d histogram table) against central differences of the same sum computed with
NumPy/SciPy, with points inside, on the edge ramps, outside, with and without a soft mask.
"""

import numpy as np
import pytest
from scipy import ndimage

from regkl import histogram, kernels
from regkl.volume import Volume


def _smoothstep_weight(t, n):
    def s(x):
        x = np.clip(x, 0.0, 1.0)
        return x * x * (3.0 - 2.0 * x)
    return np.where((t > 0) & (t < n - 1), s(t) * s(n - 1 - t), 0.0)


def _bspline3(t):
    a = np.abs(t)
    return np.where(a < 1, 2 / 3 - a ** 2 + a ** 3 / 2, np.where(a < 2, (2 - a) ** 3 / 6, 0.0))


def test_weights_at_the_ends_of_the_inside_shortcut_equal_the_edge_ramp():
    shape = (12, 10, 9)
    data = np.random.default_rng(1).random(shape).astype(np.float32)
    level = histogram.make_moving_level(Volume(data, np.eye(4)), 16)
    ends = []
    for a, n in enumerate(shape):
        for t in (0.0, 0.5, 1.0 - 1e-12, 1.0, n - 2.0, n - 2.0 + 1e-12, n - 1.5, n - 1.0):
            p = np.array([4.5, 4.5, 4.5])
            p[a] = t
            ends.append(p)
    idx = np.array(ends)
    ev = histogram.joint_histogram(histogram.make_samples(idx, np.arange(len(idx), dtype=float), 8), level,
                                   np.eye(4))
    expected = np.ones(len(idx))
    for a in range(3):
        expected *= _smoothstep_weight(idx[:, a], shape[a])
    np.testing.assert_allclose(ev.mov_w, expected, rtol=1e-15, atol=0)
    inside = np.all((idx >= 1.0) & (idx <= np.asarray(shape) - 2.0), axis=1)
    assert inside.sum() == 6 and np.all(ev.mov_w[inside] == 1.0) and np.all(ev.mov_gw[inside] == 0.0)
    assert np.any(ev.mov_gw[~inside] != 0.0)


def _numpy_sum(samples, level, m, dtable):
    """sum over points and moving bins of dtable[fixed bin, k] * w * beta3(mc - k), in NumPy/SciPy."""
    vox_mat = (level.volume.ras2vox @ m)[:3]
    vox = samples.points @ vox_mat[:, :3].T + vox_mat[:, 3]
    weight = np.ones(len(vox))
    for a in range(3):
        weight *= _smoothstep_weight(vox[:, a], level.volume.shape[a])
    if level.mask is not None:
        weight *= ndimage.map_coordinates(level.mask.astype(np.float64), vox.T, order=1, mode="nearest")
    vals = ndimage.map_coordinates(level.volume.data.astype(np.float64), vox.T, order=1, mode="nearest")
    mc = np.clip(2.0 + (vals - level.lo) * level.scale, 2.0, level.n_bins - 3.0)
    k = np.arange(level.n_bins)
    return float(np.sum(dtable[samples.bins] * weight[:, None] * _bspline3(mc[:, None] - k[None, :])))


@pytest.mark.parametrize("with_mask", [False, True])
def test_gradient_kernel_equals_central_differences_of_the_numpy_sum(with_mask):
    rng = np.random.default_rng(146)
    shape = (21, 18, 16)
    data = (ndimage.gaussian_filter(rng.random(shape), 2.0) * 100).astype(np.float32)
    vox2ras = np.diag([2.0, 2.5, 3.0, 1.0])
    vox2ras[:3, 3] = [-3.0, 4.0, 1.0]
    moving = Volume(data, vox2ras)
    mask = ndimage.gaussian_filter((rng.random(shape) > 0.3).astype(np.float32), 1.5) if with_mask else None
    level = histogram.make_moving_level(moving, 20, mask=mask)
    idx = rng.uniform(-1.5, np.asarray(shape) + 0.5, size=(3000, 3))  # inside, on the ramps, outside
    samples = histogram.make_samples(moving.world_coords(idx), rng.random(3000), 10)
    m = np.eye(4)
    m[:3, 3] = [0.3, -0.2, 0.4]
    ev = histogram.joint_histogram(samples, level, m)
    moves = np.any(ev.mov_gw != 0.0, axis=1)
    assert np.count_nonzero(moves) > 100  # the term the shortcut skips elsewhere
    if not with_mask:  # (a soft mask has a slope almost everywhere)
        assert np.count_nonzero(~moves & (ev.mov_w > 0)) > 1000
    dtable = rng.normal(size=ev.hist.shape)
    grad = histogram.matrix_gradient(samples, level, ev, dtable)
    fd = np.zeros((3, 4))
    for a in range(3):
        for b in range(4):
            h = 1e-5 if b == 3 else 1e-7
            e = np.zeros((4, 4))
            e[a, b] = h
            fd[a, b] = (_numpy_sum(samples, level, m + e, dtable) - _numpy_sum(samples, level, m - e, dtable)) / (2 * h)
    # trilinear interpolation is C0 across voxel faces: the differences see the few points that
    # cross one (~1e-5 of the largest entry here)
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-4 * np.abs(fd).max())


def test_bspline_weights_stay_a_partition_of_unity_to_rounding():
    for t in np.linspace(0.0, 1.0, 257):
        assert abs(sum(kernels.bspline3_weights(t)) - 1.0) < 4e-16
