"""Issue 11, item 5: automatic masks are sanity-checked and never wreck a registration; a metric that
falls from start to end is reported.

Small images: the real T2w is taken to 3 mm (the real b0 is 3 mm already), synthetic EPIs at 4 mm.
"""

import json
import warnings

import numpy as np
import pytest

from regkl import masks, synthetic
from regkl.cli import main
from regkl.writers import save_volume
from regkl.optimize import register
from regkl.pyramid import downsample
from regkl.transforms import rms_displacement
from regkl.volume import Volume


@pytest.fixture(scope="session")
def small_real(real_pair):
    moving, fixed = real_pair
    fixed3 = downsample(fixed, 3.0)
    head = fixed3.world_coords(np.argwhere(fixed3.data > np.percentile(fixed3.data, 60)))
    return moving, fixed3, head


def _blob_image(shape=(40, 40, 30)):
    """A smooth ellipsoidal 'head' in a dark background, 3 mm voxels."""
    idx = np.indices(shape, dtype=np.float64)
    centre = (np.array(shape) - 1) / 2
    r2 = sum(((idx[k] - centre[k]) / (0.35 * shape[k])) ** 2 for k in range(3))
    data = np.where(r2 < 1.0, 100.0 + 20.0 * np.cos(idx[0] / 3.0), 2.0).astype(np.float32)
    return Volume(data, np.diag([3.0, 3.0, 3.0, 1.0]), "blob")


def test_sound_auto_mask_passes_and_bad_masks_are_named():
    img = _blob_image()
    mask = masks.auto_mask(img)
    assert masks.mask_problem(img, mask) is None
    inside = mask.data > 0.5
    assert inside[20, 20, 15] and not inside[0, 0, 0]
    # a mask that removes most of the signal
    small = np.zeros(img.shape, np.float32)
    small[15:25, 15:25, 10:20] = 1.0
    assert "signal" in masks.mask_problem(img, Volume(small, img.vox2ras))
    # a mask that keeps the background (the whole grid)
    assert "background" in masks.mask_problem(img, Volume(np.ones(img.shape, np.float32), img.vox2ras))


def test_fragmented_foreground_gives_no_mask_and_a_warning():
    rng = np.random.default_rng(0)
    data = np.full((40, 40, 30), 1.0, np.float32)
    for _ in range(40):  # many separate bright specks, no object
        i, j, k = rng.integers(2, 27, 3)
        data[i:i + 2, j:j + 2, k:k + 2] = 100.0
    img = Volume(data, np.diag([3.0, 3.0, 3.0, 1.0]), "specks.nii.gz")
    with pytest.warns(UserWarning, match="specks.nii.gz: automatic fixed mask not used"):
        mask, how = masks.checked_auto_mask(img, "fixed mask")
    assert mask is None and how.startswith("not used")


def test_holes_open_to_the_field_of_view_are_filled():
    shell = np.zeros((30, 30, 20), bool)
    idx = np.indices(shell.shape)
    r2 = (idx[0] - 14.5) ** 2 + (idx[1] - 14.5) ** 2
    shell[(r2 < 12 ** 2) & (r2 >= 8 ** 2)] = True  # a tube cut by the top and bottom of the grid
    filled = masks._fill_holes(shell.copy())
    assert filled[15, 15, 0] and filled[15, 15, 10] and not filled[0, 0, 10]


def test_auto_mask_does_not_wreck_the_real_pair(small_real):
    """The automatic masks pull the real b0/T2w pair ~3 mm away (the masks used as given: 7 mm at 3 mm, 22 mm
    at full resolution); the whole images contradict that pose, so the unmasked answer is kept."""
    moving, fixed, head = small_real
    plain = register(moving, fixed)
    with pytest.warns(UserWarning, match="kept the unmasked answer"):
        masked = register(moving, fixed, auto_mask=True)
    assert rms_displacement(masked.fixed2moving, plain.fixed2moving, head) < 0.5
    assert masked.settings["auto_masks"]["kept"].startswith("unmasked")
    assert not masked.metric_decreased


def test_auto_mask_on_a_synthetic_pair_stays_with_the_unmasked_answer(template, brain):
    fixed = synthetic.make_t1(template, voxel_mm=2.0)
    rng = np.random.default_rng([11, 5])
    truth = synthetic.random_rigid(rng, 10.0, 10.0, brain.mean(axis=0))
    epi = synthetic.make_epi(template, truth, rng, voxel_mm=4.0)
    plain = register(epi, fixed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the masks are sound and change nothing of substance
        masked = register(epi, fixed, auto_mask=True)
    assert masked.settings["auto_masks"]["fixed"] == masked.settings["auto_masks"]["moving"] == "used"
    err_plain = rms_displacement(plain.fixed2moving, truth, brain)
    err_masked = rms_displacement(masked.fixed2moving, truth, brain)
    assert rms_displacement(masked.fixed2moving, plain.fixed2moving, brain) < 0.5 or err_masked < err_plain
    assert err_masked < 1.0


def test_json_reports_metric_change_per_level_and_overall(tmp_path, capsys, template, brain):
    fixed = synthetic.make_t1(template, voxel_mm=3.0)
    rng = np.random.default_rng(3)
    epi = synthetic.make_epi(template, synthetic.random_rigid(rng, 5.0, 5.0, brain.mean(axis=0)), rng, voxel_mm=4.0)
    save_volume(epi, str(tmp_path / "epi.nii.gz"))
    save_volume(fixed, str(tmp_path / "t1.nii.gz"))
    with pytest.raises(SystemExit) as info:
        main(["register", str(tmp_path / "epi.nii.gz"), str(tmp_path / "t1.nii.gz"), "--json", "--confidence", "-q"])
    assert info.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metric_decreased"] == (out["metric_after"] < out["metric_before"]) and not out["metric_decreased"]
    for level in out["levels"]:
        assert level["metric_decreased"] == (level["metric_end"] < level["metric_initial"])
    assert out["levels"][-1]["metric_initial"] == pytest.approx(out["metric_before"], rel=1e-9)
    gain = out["confidence"]["evidence"]["metric_gain"]
    assert gain == pytest.approx((out["metric_after"] - out["metric_before"]) / out["metric_before"], abs=1e-5)


def test_confidence_flags_a_metric_that_fell(template, brain):
    """The same converged solution is flagged when its metric ended lower than the start, not otherwise."""
    from regkl.confidence import assess
    from regkl.objective import _Objective, _refine
    from regkl.probe import MetricProbe
    from regkl.transforms import get_model

    fixed = synthetic.make_t1(template, voxel_mm=4.0)
    rng = np.random.default_rng(8)
    truth = synthetic.random_rigid(rng, 5.0, 5.0, brain.mean(axis=0))
    epi = synthetic.make_epi(template, truth, rng, voxel_mm=4.0)
    result = register(epi, fixed)
    probe = MetricProbe(epi, fixed, sampling=0.5)
    rigid = get_model("rigid")
    fine = _Objective(probe.level.samples, probe.level.moving, rigid, probe.metric_fn, result.centre,
                      rigid.scales(60.0), None, 0.008)
    params = rigid.from_matrix(result.fixed2moving, result.centre)
    fell = assess(fine, params, result.centre, _refine, metric_gain=-0.01, workers=1)
    rose = assess(fine, params, result.centre, _refine, metric_gain=0.2, workers=1)
    assert fell.suspect and fell.subscores["metric_gain"] == 0.0
    assert not rose.suspect and rose.subscores["metric_gain"] == 1.0
    assert {k: v for k, v in fell.evidence.items() if k != "metric_gain"} == \
        {k: v for k, v in rose.evidence.items() if k != "metric_gain"}
