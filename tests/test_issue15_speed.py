"""Issue 15 speed work: the per-voxel median kernel, the series layout read from a 4D file, and the
boldref built from volumes resampled in parallel (all against independent NumPy truth)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from regkl.io import load_series, load_volume, open_series
from regkl.realign import realigned_volumes
from regkl.resample import resample
from regkl.stack_kernels import median_of_volumes
from regkl.transforms import get_model
from regkl.volume import Volume


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 31, 64, 199, 200])
def test_median_of_volumes_equals_numpy_median_exactly(n):
    rng = np.random.default_rng(n)
    stack = rng.normal(100.0, 30.0, size=(n, 9, 8, 7)).astype(np.float32)
    stack[:, 0, 0, 0] = 5.0                                            # all equal
    stack[: n // 2, 1, 0, 0] = 7.0                                     # half tied
    stack[:, 2, 0, 0] = rng.integers(0, 3, n).astype(np.float32)      # few distinct values
    stack[:, 3, 0, 0] = np.arange(n, dtype=np.float32)[::-1]           # sorted descending
    stack[:, 4, 0, 0] = np.float32(1e30) * (np.arange(n) % 2)          # large values (float32 sum rounds)
    stack[n // 2, 5, 0, 0] = np.nan                                    # one NaN: NaN, as NumPy
    got = median_of_volumes(stack)
    want = np.median(stack, axis=0)
    assert got.dtype == want.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert np.isnan(got[5, 0, 0])


def test_median_of_volumes_same_at_any_thread_count(monkeypatch):
    import regkl.stack_kernels as sk

    monkeypatch.setattr(sk, "MEDIAN_TASK", 100)  # many voxel ranges even on a small stack
    rng = np.random.default_rng(1)
    stack = rng.normal(size=(41, 17, 19, 5)).astype(np.float32)
    one = median_of_volumes(stack, threads=1)
    np.testing.assert_array_equal(one, np.median(stack, axis=0))
    for threads in (2, 3):
        np.testing.assert_array_equal(median_of_volumes(stack, threads=threads), one)


@pytest.fixture(scope="module")
def series_file(tmp_path_factory):
    """A 4D NIfTI (int16, scaled) with distinct volumes, written by nibabel."""
    rng = np.random.default_rng(3)
    data = rng.integers(-300, 3000, size=(11, 9, 7, 5)).astype(np.int16)
    vox2ras = np.diag([2.0, 2.5, 3.0, 1.0])
    vox2ras[:3, 3] = (-10.0, 5.0, 2.0)
    img = nib.Nifti1Image(data, vox2ras)
    img.header.set_slope_inter(0.5, 10.0)
    path = tmp_path_factory.mktemp("series") / "bold.nii.gz"
    nib.save(img, str(path))
    return path, data.astype(np.float64) * 0.5 + 10.0, vox2ras


def test_series_volumes_are_the_file_volumes_in_kernel_layout(series_file):
    path, truth, vox2ras = series_file
    volumes, header = load_series(path)
    assert len(volumes) == truth.shape[3] and header is not None
    for t, v in enumerate(volumes):
        assert v.data.dtype == np.float32 and v.data.flags.c_contiguous
        np.testing.assert_array_equal(v.data, truth[..., t].astype(np.float32))
        np.testing.assert_allclose(v.vox2ras, vox2ras)
    series, _ = open_series(path)
    assert len(series) == 5 and series.shape == (11, 9, 7)
    np.testing.assert_array_equal(series[-1].data, truth[..., 4].astype(np.float32))
    # the reductions of load_volume still see the same volumes
    np.testing.assert_allclose(load_volume(path, volume="mean").data, truth.mean(axis=3), rtol=1e-6)
    np.testing.assert_array_equal(load_volume(path, volume=2).data, truth[..., 2].astype(np.float32))


def test_realigned_volumes_parallel_equal_one_by_one():
    rng = np.random.default_rng(5)
    grid = Volume(rng.normal(size=(12, 10, 9)).astype(np.float32), np.diag([3.0, 3.0, 3.0, 1.0]), "g")
    vols = [grid.with_data(rng.normal(size=grid.shape).astype(np.float32)) for _ in range(9)]
    model = get_model("rigid")
    mats = np.stack([model.matrix(rng.normal(0, [0.05, 0.05, 0.05, 2, 2, 2]), grid.centre) for _ in vols])
    for interp in ("linear", "nearest", "cubic"):
        want = np.stack([resample(v, grid, m, interp=interp).data for v, m in zip(vols, mats)])
        for threads in (1, 2):
            got = realigned_volumes(vols, grid, mats, interp=interp, threads=threads)
            np.testing.assert_array_equal(got, want)


def test_cli_sampling_default_is_the_library_default():
    from regkl.commands.realign import realign_cmd
    from regkl.realign import SAMPLING, realign

    option = next(p for p in realign_cmd.params if p.name == "sampling")
    assert option.default == SAMPLING
    import inspect

    assert inspect.signature(realign).parameters["sampling"].default == SAMPLING


@pytest.mark.parametrize("var", [(0.2, 0.3, 0.45), (0.6, 1.3, 2.0), (3.0, 0.0, 9.0)])
def test_serial_smoothing_equals_scipy_exactly(var):
    """The GIL-free smoothing used for the volumes of a series equals SciPy's filters bit for bit
    (3-tap kernel for small variances, sampled Gaussian otherwise; edges repeated), also on an
    axis shorter than the kernel."""
    import math

    from scipy import ndimage

    from regkl.pyramid import SMALL_VARIANCE_VOX2, downsample, smooth_variance

    rng = np.random.default_rng(7)
    data = rng.normal(100.0, 30.0, size=(13, 11, 3)).astype(np.float32)
    want = data
    for axis, v in enumerate(var):
        if v < 1e-4:
            continue
        if v <= SMALL_VARIANCE_VOX2:
            want = ndimage.correlate1d(want, [v / 2, 1 - v, v / 2], axis=axis, mode="nearest", output=np.float32)
        else:
            want = ndimage.gaussian_filter1d(want, math.sqrt(v), axis=axis, mode="nearest", truncate=4.0,
                                             output=np.float32)
    np.testing.assert_array_equal(smooth_variance(data, var, serial=True), want)
    np.testing.assert_array_equal(smooth_variance(data, var), want)
    vol = Volume(rng.normal(100.0, 30.0, size=(16, 14, 10)).astype(np.float32), np.diag([3.0, 3.0, 3.0, 1.0]), "v")
    for spacing in (12.0, 6.0, 4.5):
        np.testing.assert_array_equal(downsample(vol, spacing, serial=True).data, downsample(vol, spacing).data)


def test_serial_twins_have_their_own_numba_cache_and_equal_results():
    """A serial twin built from the same Python function as its parallel kernel shared its on-disk
    cache entry (Numba names the file after the qualified name and line, keys entries by signature),
    so the last one compiled was loaded for both. Each twin now has its own name, hence its own file."""
    from regkl import kernels

    pairs = [(kernels.joint_histogram, kernels.joint_histogram_serial),
             (kernels.matrix_gradient, kernels.matrix_gradient_serial),
             (kernels.weighted_moments, kernels.weighted_moments_serial),
             (kernels.block_mean, kernels.block_mean_serial),
             (kernels.resample_linear, kernels.resample_linear_serial),
             (kernels.resample_nearest, kernels.resample_nearest_serial)]
    names = [f.py_func.__qualname__ for pair in pairs for f in pair]
    assert len(set(names)) == len(names)
    for parallel, serial in pairs:
        assert serial.py_func.__code__ is parallel.py_func.__code__  # same source, different cache name
        assert serial.targetoptions.get("nogil") and not serial.targetoptions.get("parallel")
    rng = np.random.default_rng(11)
    data = rng.normal(size=(9, 8, 7)).astype(np.float32)
    np.testing.assert_array_equal(kernels.block_mean_serial(data, 2, 2, 3), kernels.block_mean(data, 2, 2, 3))
    mat = np.eye(4)
    mat[:3, 3] = (0.3, -0.2, 0.45)
    np.testing.assert_array_equal(kernels.resample_linear_serial(data, mat, 9, 8, 7, np.float32(0)),
                                  kernels.resample_linear(data, mat, 9, 8, 7, np.float32(0)))
    np.testing.assert_array_equal(kernels.resample_nearest_serial(data, mat, 9, 8, 7, np.float32(0)),
                                  kernels.resample_nearest(data, mat, 9, 8, 7, np.float32(0)))
