"""Tests of regkl.pyramid: the resolution of each level, checked by measured second moments.

Resolution model (see :func:`regkl.pyramid.downsample`): an image's own point-spread function is a
Gaussian of FWHM equal to its voxel size, and every level brings both images to a FWHM equal to
the level spacing. So downsampling an image of a Gaussian blob of variance ``s0**2`` (per axis)
from voxel size ``v`` to spacing ``s`` must give a blob of variance
``s0**2 + (s**2 - v**2) / FWHM_PER_SIGMA**2``: the blob's own variance plus the variance missing
between the two resolutions. (Before this was fixed, a block of width ``w`` counted as FWHM ``w``,
so a 1 mm image at 3 mm was only 2.2 mm FWHM while a 3 mm image stayed at 3 mm: at the finest
level the fixed T1 was sharper than the moving EPI.)
"""

import numpy as np
import pytest

from regkl.pyramid import FWHM_PER_SIGMA, downsample, smooth_variance
from regkl.volume import Volume


def _moments(volume: Volume):
    """Centroid (3,) and per-axis variance (3,) in world mm of a non-negative image on an
    axis-aligned grid (diagonal vox2ras)."""
    mean, var = np.zeros(3), np.zeros(3)
    for axis in range(3):
        profile = volume.data.sum(axis=tuple(a for a in range(3) if a != axis), dtype=np.float64)
        pos = np.arange(volume.shape[axis]) * volume.vox2ras[axis, axis] + volume.vox2ras[axis, 3]
        mean[axis] = profile @ pos / profile.sum()
        var[axis] = profile @ (pos - mean[axis]) ** 2 / profile.sum()
    return mean, var


def _blob(shape, voxel_mm, sigma_mm, centre_mm):
    v2r = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    v2r[:3, 3] = [-7.0, 3.0, 11.0]
    idx = np.indices(shape, dtype=np.float64).reshape(3, -1).T
    world = idx * voxel_mm + v2r[:3, 3]
    d2 = np.sum((world - centre_mm) ** 2, axis=1)
    data = np.exp(-0.5 * d2 / sigma_mm ** 2).reshape(shape).astype(np.float32)
    return Volume(data, v2r)


@pytest.mark.parametrize("voxel_mm, spacing_mm", [(1.0, 3.0), (1.0, 6.0), (1.0, 12.0), (3.0, 6.0), (3.0, 12.0),
                                                  (1.0, 2.4), (2.0, 3.0)])
def test_downsample_reaches_the_level_resolution(voxel_mm, spacing_mm):
    # wide enough that sampling the result at the level spacing measures its moments exactly
    # (aliasing of a Gaussian of sigma ~ spacing is ~1e-9), and +-6 sigma of field of view
    sigma0 = max(6.0, spacing_mm)
    n = int(round(12 * sigma0 / voxel_mm)) + 1
    start = np.array([-7.0, 3.0, 11.0])
    centre = start + voxel_mm * (n - 1) / 2.0 + np.array([0.3, -0.4, 0.2])
    vol = _blob((n, n, n), voxel_mm, sigma0, centre)
    _, var_in = _moments(vol)
    np.testing.assert_allclose(var_in, sigma0 ** 2, rtol=1e-3)  # the blob is well sampled
    out = downsample(vol, spacing_mm)
    mean, var = _moments(out)
    expected = sigma0 ** 2 + (spacing_mm ** 2 - voxel_mm ** 2) / FWHM_PER_SIGMA ** 2
    np.testing.assert_allclose(mean, centre, atol=0.02)  # world positions stay exact
    np.testing.assert_allclose(var, expected, rtol=0.01)


def test_downsample_leaves_an_image_at_its_own_resolution_alone():
    vol = _blob((30, 30, 30), 3.0, 8.0, np.array([35.0, 45.0, 55.0]))
    out = downsample(vol, 3.0)
    np.testing.assert_array_equal(out.data, vol.data)
    np.testing.assert_array_equal(out.vox2ras, vol.vox2ras)


@pytest.mark.parametrize("var", [0.02, 0.1, 0.3, 0.5, 0.6, 1.0, 4.0])
def test_smooth_variance_has_the_requested_variance(var):
    data = np.zeros((41, 41, 41), dtype=np.float32)
    data[20, 20, 20] = 1.0
    out = smooth_variance(data, (var, 2.0 * var, 0.0))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.sum(), 1.0, rtol=1e-5)
    x = np.arange(41) - 20.0
    for axis, expected in enumerate((var, 2.0 * var, 0.0)):
        profile = out.sum(axis=tuple(a for a in range(3) if a != axis))
        got = float(profile @ x ** 2)
        np.testing.assert_allclose(got, expected, rtol=0.015, atol=1e-7)


def test_values_at_matches_sample_grid_on_the_same_image():
    """values_at reads world points as sample_grid does (trilinear, edges repeated), on any grid."""
    from regkl.pyramid import sample_grid, values_at

    rng = np.random.default_rng(5)
    vol = Volume(rng.random((9, 8, 7), dtype=np.float32), np.array([[0.0, -2.0, 0.0, 5.0], [1.5, 0.0, 0.0, -3.0],
                                                                   [0.0, 0.0, 2.5, 1.0], [0.0, 0.0, 0.0, 1.0]]))
    pts, vals = sample_grid(vol, 0.7, np.random.default_rng(1))
    np.testing.assert_allclose(values_at(vol, pts), vals, rtol=0, atol=1e-6)
    outside = vol.world_coords(np.array([[-3.0, 0.0, 0.0], [8.0, 7.0, 6.0]]))
    np.testing.assert_allclose(values_at(vol, outside), [vol.data[0, 0, 0], vol.data[8, 7, 6]], atol=1e-6)


def test_finest_level_reads_the_unsmoothed_fixed_image_for_cr_only():
    """For the metrics in NATIVE_FIXED_METRICS (cr) the finest level's fixed intensities come from the
    fixed image itself at the same sample points; every other metric and every coarser level keeps the
    level's smoothed copy."""
    from regkl.metrics import NATIVE_FIXED_METRICS
    from regkl.levels import _build_levels
    from regkl.pyramid import values_at

    assert NATIVE_FIXED_METRICS == {"cr"}
    fixed = _blob((40, 40, 40), 1.0, 4.0, [12.0, 22.0, 30.0])
    moving = _blob((14, 14, 14), 3.0, 4.0, [12.0, 22.0, 30.0])
    kw = dict(bins=16, sampling=0.5, fixed_mask=None, moving_mask=None)
    plain = _build_levels(moving, fixed, [6.0, 3.0], rng=np.random.default_rng(2), **kw)
    native = _build_levels(moving, fixed, [6.0, 3.0], rng=np.random.default_rng(2), native_finest=True, **kw)
    np.testing.assert_array_equal(native[0].samples.values, plain[0].samples.values)
    np.testing.assert_array_equal(native[-1].samples.points, plain[-1].samples.points)
    np.testing.assert_allclose(native[-1].samples.values, values_at(fixed, native[-1].samples.points), atol=1e-6)
    # the smoothed level is blurrier: its blob peak is lower than the unsmoothed image's
    assert plain[-1].samples.values.max() < native[-1].samples.values.max()
