"""Acceptance, issue 3 (small versions; the full measurements are benchmarks/bench_affine.py,
bench_capture.py and bench_automask.py).

1. known AFFINE recovery (scales 0.9-1.1, shears up to 0.05, rotations up to 15 degrees): RMS error
   < 0.5 mm over the brain, the first 2 pairs of bench_affine.py, metrics mi, nmi, jsd and cr. (cr
   was an expected failure, its optimum about -0.65 % in scale from the truth, while its finest
   level binned the fixed image smoothed to 3 mm; it now bins the unsmoothed fixed image, see
   regkl.metrics.NATIVE_FIXED_METRICS, and lands about +0.2 % off.) The +0.3 % of mi/nmi/jsd comes
   from the EPI's non-monotone contrast seen at 3 mm: with a moving image made from the T1 itself
   through a LINEAR intensity map, every metric's optimum is within 0.2 % of the truth
   (benchmarks/README.md, "Affine recovery").
2. capture range: moving-header perturbations of 60-90 degrees about a random axis plus a shift
   uniform in a 60 mm ball come back within 1 mm with DEFAULT settings (search 'auto'): 6 synthetic
   starts (truth known), and 4 hard starts (75-90 degrees) on the REAL pair that once ended ~100 mm
   off (vs the unperturbed result);
3. automatic masks: a brain-only EPI registered to the WHOLE-HEAD MNI152 T1 with auto_mask=True lands
   within 0.5 mm of the result on the same T1 skull-stripped (2009c brain mask dilated by 5 mm),
   2 synthetic EPIs.
"""

import math

import numpy as np
import pytest

from regkl.optimize import register
from regkl.transforms import apply_matrix, rms_displacement
from regkl.volume import Volume

from .conftest import SHARED, need

HEAD = SHARED / "mni152_fsl_head" / "mni152_T1w_head_2mm.nii.gz"


def _axis_angle_shift(centre, axis, angle_deg, shift):
    """(4, 4) rotation by ``angle_deg`` about ``axis`` through ``centre``, then a shift (mm)."""
    x, y, z = np.asarray(axis) / np.linalg.norm(axis)
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    a = math.radians(angle_deg)
    rot = np.eye(3) + math.sin(a) * k + (1.0 - math.cos(a)) * (k @ k)
    p = np.eye(4)
    p[:3, :3] = rot
    p[:3, 3] = centre - rot @ centre + np.asarray(shift)
    return p


def _perturbation(rng, centre, min_deg=60.0, max_deg=90.0, max_shift=60.0):
    """Rotation by U[min_deg, max_deg] about a random axis through ``centre``, then a shift uniform in
    a ball of radius ``max_shift`` mm."""
    axis = rng.standard_normal(3)
    angle = rng.uniform(min_deg, max_deg)
    direction = rng.standard_normal(3)
    shift = direction / np.linalg.norm(direction) * max_shift * rng.uniform() ** (1.0 / 3.0)
    return _axis_angle_shift(centre, axis, angle, shift)


@pytest.fixture(scope="module")
def affine_pairs(template):
    """The first 2 pairs of benchmarks/bench_affine.py: (EPI, true fixed2moving)."""
    from regkl import synthetic

    centre = synthetic.brain_points(template, step_vox=2).mean(axis=0)
    pairs = []
    for i in range(2):
        rng = np.random.default_rng([3, i])
        truth, _ = synthetic.random_affine(rng, 15.0, 15.0, 0.1, 0.05, centre)
        pairs.append((synthetic.make_epi(template, truth, rng), truth))
    return pairs


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["mi", "nmi", "jsd", "cr"])
def test_known_affine_recovery(affine_pairs, t1, brain, metric):
    errors = []
    for epi, truth in affine_pairs:
        result = register(epi, t1, model="affine", metric=metric)
        errors.append(rms_displacement(result.fixed2moving, truth, brain))
    print(f"affine recovery {metric} (mm):", np.round(errors, 3).tolist())
    assert max(errors) < 0.5, errors


@pytest.mark.slow
def test_capture_range_synthetic_default_settings(template, t1, brain):
    from regkl import synthetic

    errors = []
    for i in range(6):
        rng = np.random.default_rng([41, i])
        t0 = synthetic.random_rigid(rng, 5.0, 5.0, brain.mean(axis=0))
        epi = synthetic.make_epi(template, t0, rng)
        p = _perturbation(rng, epi.centre_of_mass())
        result = register(Volume(epi.data, p @ epi.vox2ras), t1)
        errors.append(rms_displacement(result.fixed2moving, p @ t0, brain))
    print("capture synthetic (mm):", np.round(errors, 3).tolist())
    assert max(errors) < 1.0, errors


#: Starts of bench_capture.py (seed 33) that ended ~90-115 mm off on the REAL pair before the search
#: kept 12 candidates on a 22.5-degree grid and carried near-ties to the finest level (axis, deg, mm).
HARD_REAL_STARTS = {
    3: ([-0.3128, -0.8379, -0.4473], 85.24, [-38.19, -28.29, 8.24]),
    9: ([0.2316, -0.6854, -0.6904], 81.26, [24.06, 33.09, -33.67]),
    12: ([0.0326, 0.7399, -0.6719], 80.58, [3.15, 47.49, -29.35]),
    31: ([0.0624, -0.8888, 0.4539], 87.45, [-52.64, -7.05, -12.1]),
}


@pytest.mark.slow
def test_capture_range_real_pair_hard_starts(real_pair, real_pair_result):
    moving, fixed = real_pair
    head = fixed.world_coords(np.argwhere(fixed.data[::3, ::3, ::3] > np.percentile(fixed.data, 60)) * 3.0)
    base = real_pair_result.fixed2moving  # register(moving, fixed), shared with test_accuracy
    errors = {}
    for start, (axis, angle, shift) in HARD_REAL_STARTS.items():
        p = _axis_angle_shift(moving.centre_of_mass(), axis, angle, shift)
        result = register(Volume(moving.data, p @ moving.vox2ras), fixed)
        errors[start] = rms_displacement(result.fixed2moving, p @ base, head)
    print("capture real, hard starts (mm):", {k: round(v, 3) for k, v in errors.items()})
    assert max(errors.values()) < 1.0, errors


@pytest.mark.slow
def test_auto_mask_whole_head_matches_skull_stripped(template, brain):
    from scipy import ndimage

    from regkl import synthetic
    from regkl.io import load_volume

    head = load_volume(need(HEAD))
    idx = np.indices(head.shape, dtype=np.float64).reshape(3, -1).T
    vox = apply_matrix(template.t1.ras2vox @ head.vox2ras, idx)
    on_head = ndimage.map_coordinates(template.brain.astype(np.float32), vox.T, order=1).reshape(head.shape) >= 0.5
    keep = ndimage.distance_transform_edt(~on_head, sampling=head.spacing) <= 5.0
    stripped = Volume(head.data * keep, head.vox2ras)
    diffs, unmasked = [], []
    for seed in range(2):
        rng = np.random.default_rng([11, seed])
        truth = synthetic.random_rigid(rng, 15.0, 15.0, brain.mean(axis=0))
        epi = synthetic.make_epi(template, truth, rng)
        reference = register(epi, stripped).fixed2moving
        diffs.append(rms_displacement(register(epi, head, auto_mask=True).fixed2moving, reference, brain))
        unmasked.append(rms_displacement(register(epi, head).fixed2moving, reference, brain))
    print("whole head + auto_mask vs skull-stripped (mm):", np.round(diffs, 3).tolist(),
          "; without the mask:", np.round(unmasked, 3).tolist())
    assert max(diffs) < 0.5, diffs
