"""Image statistics: histogram entropy, KL from uniform, voxel selection, input checks."""

import json
import math

import numpy as np
import pytest

from regkl.errors import InputError
from regkl.stats import image_stats
from regkl.volume import Volume


def _uniform_image(shape=(40, 40, 40), seed=0):
    """Values spread evenly over (1, 1001): every histogram bin equally filled (voxels > 0)."""
    n = int(np.prod(shape))
    values = 1.0 + 1000.0 * (np.arange(n) + 0.5) / n
    return np.random.default_rng(seed).permutation(values).reshape(shape)


@pytest.mark.parametrize("bins", [16, 64, 100])
def test_uniform_image_has_maximal_entropy(bins):
    st = image_stats(Volume(_uniform_image(), np.eye(4)), bins=bins)
    assert st["entropy_nats"] == pytest.approx(math.log(bins), abs=5e-3)
    assert st["entropy_bits"] == pytest.approx(math.log2(bins), abs=7e-3)
    assert st["kl_from_uniform_nats"] == pytest.approx(0.0, abs=5e-3)
    # exactly: the robust range clips 0.5 % of the voxels into each end bin
    p = np.full(bins, 0.99 / bins)
    p[[0, -1]] += 0.005
    assert st["entropy_nats"] == pytest.approx(-np.sum(p * np.log(p)), abs=1e-4)
    assert st["kl_from_uniform_nats"] == pytest.approx(math.log(bins) - st["entropy_nats"], abs=1e-12)


def test_two_value_image_has_large_kl_from_uniform():
    data = np.full((20, 20, 20), 10.0)
    data[:, :, 10:] = 200.0
    st = image_stats(data, bins=64)
    assert st["entropy_nats"] == pytest.approx(math.log(2), rel=1e-12)      # two equal bins
    assert st["kl_from_uniform_nats"] == pytest.approx(math.log(64) - math.log(2), rel=1e-12)
    assert st["kl_from_uniform_nats"] > 3.0


def test_entropy_against_independent_histogram():
    rng = np.random.default_rng(3)
    data = rng.gamma(2.0, 30.0, size=(30, 30, 30))          # all > 0
    st = image_stats(data, bins=32)
    v = data.ravel()
    lo, hi = np.percentile(v, [0.5, 99.5])
    counts, _ = np.histogram(np.clip(v, lo, hi), bins=32, range=(lo, hi))
    p = counts / counts.sum()
    h = -sum(x * math.log(x) for x in p if x > 0)
    assert st["entropy_nats"] == pytest.approx(h, rel=1e-9)
    assert st["range"] == pytest.approx([lo, hi])
    assert st["percentiles"]["50"] == pytest.approx(np.median(v))
    assert st["mean"] == pytest.approx(v.mean())
    assert st["min"] == pytest.approx(v.min()) and st["max"] == pytest.approx(v.max())


def test_constant_image_has_zero_entropy():
    st = image_stats(np.full((4, 5, 6), 7.0), bins=10)
    assert st["entropy_nats"] == 0.0
    assert st["kl_from_uniform_nats"] == pytest.approx(math.log(10))
    assert st["range"] == [7.0, 7.0]


def test_voxel_selection_rules():
    data = np.zeros((10, 10, 10))
    data[:5] = np.arange(500).reshape(5, 10, 10) + 1.0      # half of the voxels > 0
    st = image_stats(data)
    assert st["selection"] == "positive" and st["n_selected"] == 500 and st["min"] == 1.0
    sparse = np.zeros((10, 10, 10))
    sparse[0, 0, :5] = 5.0                                  # < 10 % positive: use every voxel
    st = image_stats(sparse)
    assert st["selection"] == "all" and st["n_selected"] == 1000 and st["min"] == 0.0
    mask = np.zeros((10, 10, 10), dtype=bool)
    mask[:2] = True
    st = image_stats(data, mask=mask)
    assert st["selection"] == "mask" and st["n_selected"] == 200 and st["max"] == 200.0
    assert image_stats(data, mask=mask.astype(np.uint8))["n_selected"] == 200
    with_nan = data.copy()
    with_nan[0, 0, 0] = np.nan
    st = image_stats(with_nan)
    assert st["n_nonfinite"] == 1 and st["n_selected"] == 499 and np.isfinite(st["mean"])


def test_volume_metadata_and_json():
    v2r = np.diag([1.5, 2.0, 3.0, 1.0])
    st = image_stats(Volume(_uniform_image((6, 7, 8)), v2r), bins=8)
    assert st["shape"] == [6, 7, 8] and st["n_voxels"] == 336 and st["bins"] == 8
    assert st["voxel_mm"] == pytest.approx([1.5, 2.0, 3.0])
    assert image_stats(np.ones((2, 2, 2)) + np.arange(8).reshape(2, 2, 2))["voxel_mm"] is None
    assert json.loads(json.dumps(st)) == st


def test_real_image_stats(real_pair):
    moving, fixed = real_pair
    for vol in (moving, fixed):
        st = image_stats(vol)
        assert 0.0 < st["entropy_nats"] < math.log(64)
        assert st["kl_from_uniform_nats"] > 0.0
        assert st["percentiles"]["1"] <= st["percentiles"]["50"] <= st["percentiles"]["99"]


@pytest.mark.parametrize("kwargs, match", [
    ({"bins": 1}, "bins"),
    ({"bins": 2.5}, "bins"),
    ({"mask": np.ones((2, 2, 2), dtype=bool)}, "mask shape"),
    ({"mask": np.zeros((4, 4, 4), dtype=bool)}, "no finite voxels"),
    ({"mask": np.full((4, 4, 4), "x")}, "mask must be"),
])
def test_bad_inputs(kwargs, match):
    with pytest.raises(InputError, match=match):
        image_stats(np.ones((4, 4, 4)), **kwargs)


def test_bad_images():
    with pytest.raises(InputError, match="3D"):
        image_stats(np.ones((4, 4)))
    with pytest.raises(InputError, match="no finite voxels"):
        image_stats(np.full((3, 3, 3), np.nan))
