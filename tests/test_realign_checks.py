"""realign on series users have: a corrupt voxel does not make up motion, a volume that cannot
match the reference is flagged, a series of two slices is warned about (attacker findings)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def shifted_series():
    """Six volumes: the sample BOLD's first volume shifted by (0.5, -0.3, 0.2) voxels per volume,
    plus noise; (volumes, the clean realignment's parameters)."""
    from regkl.realign import realign
    from regkl.volume import Volume

    img = nib.load(str(DATA / "sub-01_bold.nii.gz"))
    v0 = np.asarray(img.dataobj[..., 0], dtype=np.float32)
    rng = np.random.default_rng(0)
    vols = [Volume((ndimage.shift(v0, (0.5 * t, -0.3 * t, 0.2 * t), order=1)
                    + rng.normal(0, 5, v0.shape)).astype(np.float32), img.affine, name="bold")
            for t in range(6)]
    return vols, realign(vols, threads=2)


def _with(vols, t, data):
    return [v.with_data(data) if i == t else v for i, v in enumerate(vols)]


def test_corrupt_voxel_is_clipped_not_turned_into_motion(shifted_series):
    from regkl.realign import realign

    vols, clean = shifted_series
    hot = vols[4].data.copy()
    hot[30, 36, 32] = 1e30
    with pytest.warns(UserWarning, match=r"1 voxel\(s\) in volume\(s\) 4 lie far outside"):
        result = realign(_with(vols, 4, hot), threads=2)
    assert np.abs(result.params - clean.params).max() < 0.02      # was 13-22 mm of made-up motion
    assert not any(result.flags) and not any(clean.flags)
    shift = clean.params[5, 3:] - clean.params[0, 3:]             # 5 volumes of (1.5, -0.9, 0.6) mm
    np.testing.assert_allclose(shift, 5 * np.array([1.5, -0.9, 0.6]), atol=0.1)


def test_volume_that_cannot_match_is_flagged(shifted_series, tmp_path, capfd):
    from regkl.cli import main

    vols, _ = shifted_series
    noise = np.random.default_rng(1).uniform(0, 1000, vols[0].shape).astype(np.float32)
    inverted = (vols[2].data.max() - vols[2].data).astype(np.float32)
    data = np.stack([v.data for v in _with(_with(vols, 4, noise), 2, inverted)], axis=-1)
    series = tmp_path / "bold.nii.gz"
    nib.save(nib.Nifti1Image(data, vols[0].vox2ras), str(series))
    with pytest.raises(SystemExit) as exc:
        main(["realign", str(series), "--prefix", str(tmp_path / "r"), "--json", "--threads", "1"])
    out = capfd.readouterr()
    assert exc.value.code == 0, out.err
    assert json.loads(out.out)["flags"] == {"2": "poor-fit", "4": "poor-fit"}
    assert "volume 4: matches the reference far worse" in out.err


def test_two_slice_series_is_warned_about(shifted_series):
    from regkl.realign import realign

    vols, _ = shifted_series
    slab = [v.with_data(np.ascontiguousarray(v.data[:, :, 30:32])) for v in vols]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        realign(slab, threads=2)
    assert any("only 2 slice(s) along voxel axis 2" in str(w.message) for w in caught)


def test_first_volume_and_two_volume_series_are_checked(shifted_series):
    """A noise volume first in the series (taken for a dummy scan) is flagged, and so is one of the
    two volumes of a 2-volume series of a volume and noise (they got 100 mm of motion, unflagged)."""
    from regkl.realign import realign

    vols, _ = shifted_series
    noise = np.random.default_rng(2).uniform(0, 1000, vols[0].shape).astype(np.float32)
    assert realign(_with(vols, 0, noise), threads=2).flags[0] == "poor-fit"
    pair = realign(_with(vols[:2], 1, noise), threads=2).flags   # two volumes: which one is "wrong" is moot
    assert sorted(pair) == ["", "poor-fit"], pair


def test_register_mean_leaves_out_an_empty_volume(shifted_series, tmp_path):
    from regkl.io import load_volume

    vols, _ = shifted_series
    data = np.stack([v.data for v in vols], axis=-1)
    data[..., 3] = np.nan
    path = tmp_path / "bold.nii.gz"
    nib.save(nib.Nifti1Image(data, vols[0].vox2ras), str(path))
    mean = load_volume(path)
    np.testing.assert_allclose(mean.data, np.delete(data, 3, axis=-1).mean(axis=-1, dtype=np.float64),
                               rtol=1e-5, atol=1e-3)   # float32 values of order 100-1000
    assert "volume 3 without data left out" in mean.note
