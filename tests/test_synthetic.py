"""Tests of regkl.synthetic: synthetic EPI/T1 pairs with a known transform, and the sample data."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from regkl import synthetic
from regkl.volume import Volume

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "data"
SHARED = synthetic.default_shared_dir()
HAVE_SHARED = (SHARED / synthetic.TEMPLATE_SUBDIR / synthetic.TEMPLATE_FILES["t1"]).exists()

#: Noise-free, bias-free, dropout-free EPI options (pure geometry + contrast + blur).
CLEAN = dict(bias=0.0, noise=0.0, dropout=0.0)


@pytest.fixture(scope="module")
def template():
    if not HAVE_SHARED:
        pytest.skip(f"shared reference data not found at {SHARED} (set REGKL_SHARED_DATA)")
    return synthetic.load_template(SHARED)


def _value_at(volume: Volume, world_mm) -> float:
    """Intensity of the voxel nearest a world point."""
    idx = np.rint(synthetic.apply_matrix(volume.ras2vox, np.asarray([world_mm], dtype=float))[0]).astype(int)
    return float(volume.data[tuple(idx)])


def _min_ratio_near(image: Volume, reference: Volume, world_mm, radius_mm: float = 10.0) -> float:
    """Smallest image/reference intensity ratio over voxels within ``radius_mm`` of a world point."""
    world = synthetic.apply_matrix(image.vox2ras, _all_indices(image.shape))
    close = np.linalg.norm(world - np.asarray(world_mm, dtype=float), axis=1) < radius_mm
    near = close & (reference.data.ravel() > 0)
    return float(np.min(image.data.ravel()[near] / reference.data.ravel()[near]))


def _all_indices(shape) -> np.ndarray:
    return np.indices(shape).reshape(3, -1).T.astype(np.float64)


# ------------------------------------------------------------------------------------------
# Transforms and error measure (no data needed)
# ------------------------------------------------------------------------------------------


def test_rotation_matrix_matches_extrinsic_xyz_and_is_right_handed():
    angles = (7.0, -3.0, 12.0)
    expected = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    np.testing.assert_allclose(synthetic.rotation_matrix(angles), expected, atol=1e-12)
    # +90 degrees about S turns R (+x) into A (+y).
    np.testing.assert_allclose(synthetic.rotation_matrix((0, 0, 90)) @ [1, 0, 0], [0, 1, 0], atol=1e-12)


def test_random_rigid_is_rigid_bounded_and_deterministic():
    centre = np.array([0.0, -17.0, 5.0])
    for seed in range(20):
        m = synthetic.random_rigid(np.random.default_rng(seed), 8.0, 10.0, centre)
        rot = m[:3, :3]
        np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(rot) == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_array_equal(m[3], [0, 0, 0, 1])
        angles = Rotation.from_matrix(rot).as_euler("xyz", degrees=True)
        assert np.all(np.abs(angles) <= 8.0 + 1e-9)
        shift = synthetic.apply_matrix(m, centre[None])[0] - centre  # the centre only translates
        assert np.all(np.abs(shift) <= 10.0 + 1e-9)
        np.testing.assert_array_equal(m, synthetic.random_rigid(np.random.default_rng(seed), 8.0, 10.0, centre))
    assert not np.allclose(synthetic.random_rigid(np.random.default_rng(1), 8, 10),
                           synthetic.random_rigid(np.random.default_rng(2), 8, 10))


def test_rigid_fixed2moving_rotates_about_centre():
    centre = np.array([10.0, -20.0, 30.0])
    m = synthetic.rigid_fixed2moving((0, 0, 90), (1, 2, 3), centre)
    np.testing.assert_allclose(synthetic.apply_matrix(m, centre[None])[0], centre + [1, 2, 3], atol=1e-12)
    np.testing.assert_allclose(synthetic.apply_matrix(m, (centre + [5, 0, 0])[None])[0],
                               centre + [1, 2, 3] + [0, 5, 0], atol=1e-12)


def test_rms_error_known_values():
    rng = np.random.default_rng(0)
    points = rng.uniform(-80, 80, size=(500, 3))
    m = synthetic.random_rigid(rng, 10, 10)
    assert synthetic.rms_error(m, m, points) == 0.0
    shifted = m.copy()
    shifted[:3, 3] += [0.0, 3.0, 0.0]
    assert synthetic.rms_error(shifted, m, points) == pytest.approx(3.0, abs=1e-9)
    diag = np.eye(4)
    diag[:3, 3] = [1.0, 2.0, 2.0]  # length 3 in an oblique direction
    assert synthetic.rms_error(diag, np.eye(4), points) == pytest.approx(3.0, abs=1e-9)
    # A 90 degree rotation about the origin moves a point at radius r by r*sqrt(2).
    ring = np.array([[10.0, 0, 0], [0, 10.0, 0], [-10.0, 0, 0]])
    rot = synthetic.rigid_fixed2moving((0, 0, 90), (0, 0, 0))
    assert synthetic.rms_error(rot, np.eye(4), ring) == pytest.approx(10.0 * np.sqrt(2.0), abs=1e-9)


def test_default_shared_dir(monkeypatch):
    monkeypatch.delenv("REGKL_SHARED_DATA", raising=False)
    assert synthetic.default_shared_dir() == REPO.parent / "shared" / "data"
    monkeypatch.setenv("REGKL_SHARED_DATA", "/somewhere/else")
    assert synthetic.default_shared_dir() == Path("/somewhere/else")


# ------------------------------------------------------------------------------------------
# Template
# ------------------------------------------------------------------------------------------


def test_load_template_missing_folder_is_a_clear_error(tmp_path):
    from regkl.errors import InputError

    with pytest.raises(InputError, match="REGKL_SHARED_DATA"):
        synthetic.load_template(tmp_path)



def test_load_template_tissue_maps(template):
    shape = template.t1.shape
    assert shape == (197, 233, 189)
    assert synthetic.load_template(SHARED) is template  # cached
    for name in ("gm", "wm", "csf"):
        a = getattr(template, name)
        assert a.shape == shape and a.dtype == np.float32
        assert a.min() >= 0.0 and a.max() <= 1.0
    assert template.brain.dtype == bool and template.brain.shape == shape
    assert 0.15 < template.brain.mean() < 0.3
    assert not np.any(template.csf[~template.brain])
    total = template.gm + template.wm + template.csf
    assert total.max() <= 1.0 + 1e-5
    np.testing.assert_allclose(total[template.brain], 1.0, atol=1e-5)  # gm + wm never exceeds 1 here
    # Ventricles are CSF: the CSF-rich voxels are dark on the T1.
    assert np.median(template.t1.data[template.csf > 0.9]) < 0.6 * np.median(template.t1.data[template.wm > 0.9])


def test_epi_shows_tissue_only_where_the_fixed_t1_does(template):
    """Fixed and moving images depict the same object: at 1 mm, unblurred, through the identity
    (EPI voxel centres on template voxel centres), the EPI is non-zero exactly where the T1 is.
    (The tissue maps reach about a voxel beyond the brain-only T1's mask; an EPI that kept that
    shell, 43564 voxels of mostly CSF, had a larger brain than the T1 and biased affine recovery
    by about +0.5 % in scale.)"""
    assert np.array_equal(template.brain, template.t1.data > 0)
    epi = synthetic.make_epi(template, np.eye(4), np.random.default_rng(0), voxel_mm=1.0, blur_fwhm_mm=0.0,
                             **CLEAN)
    idx = synthetic.apply_matrix(template.t1.ras2vox, synthetic.apply_matrix(epi.vox2ras, _all_indices(epi.shape)))
    np.testing.assert_allclose(idx, np.rint(idx), atol=1e-9)
    idx = np.rint(idx).astype(int)
    inside = np.all((idx >= 0) & (idx < np.asarray(template.t1.shape)), axis=1)
    t1_on_epi = np.zeros(len(idx), dtype=np.float32)
    t1_on_epi[inside] = template.t1.data[tuple(idx[inside].T)]
    np.testing.assert_array_equal(epi.data.ravel() > 0, t1_on_epi > 0)


def test_random_affine_composition_and_ranges():
    centre = np.array([1.0, -17.0, 5.0])
    m, parts = synthetic.random_affine(np.random.default_rng(4), 15.0, 15.0, 0.1, 0.05, centre)
    rng = np.random.default_rng(4)
    angles, trans, scales, shears = (rng.uniform(-a, a, 3) for a in (15.0, 15.0, 0.1, 0.05))
    np.testing.assert_allclose(parts["angles_deg"], angles)
    np.testing.assert_allclose(parts["scales"], 1.0 + scales)
    k = np.array([[1.0, shears[0], shears[1]], [0.0, 1.0, shears[2]], [0.0, 0.0, 1.0]])
    lin = synthetic.rotation_matrix(angles) @ k @ np.diag(1.0 + scales)
    np.testing.assert_allclose(m[:3, :3], lin, atol=1e-12)
    np.testing.assert_allclose(synthetic.apply_matrix(m, centre[None])[0], centre + trans, atol=1e-9)
    np.testing.assert_allclose(m[3], [0, 0, 0, 1])


def test_brain_points(template):
    pts = synthetic.brain_points(template, step_vox=2)
    assert pts.ndim == 2 and pts.shape[1] == 3
    assert abs(len(pts) - template.brain.sum() / 8) < 0.1 * template.brain.sum() / 8
    idx = synthetic.apply_matrix(template.t1.ras2vox, pts)
    np.testing.assert_allclose(idx, np.rint(idx), atol=1e-9)
    assert template.brain[tuple(np.rint(idx).astype(int).T)].all()
    assert np.all(np.rint(idx).astype(int) % 2 == 0)
    assert len(synthetic.brain_points(template, step_vox=1)) == template.brain.sum()


# ------------------------------------------------------------------------------------------
# EPI
# ------------------------------------------------------------------------------------------


def test_make_epi_basic_properties_and_determinism(template):
    m = synthetic.random_rigid(np.random.default_rng(3), 8, 10, (0, -17, 5))
    a = synthetic.make_epi(template, m, np.random.default_rng(11))
    b = synthetic.make_epi(template, m, np.random.default_rng(11))
    c = synthetic.make_epi(template, m, np.random.default_rng(12))
    np.testing.assert_array_equal(a.data, b.data)
    assert not np.array_equal(a.data, c.data)
    assert a.data.dtype == np.float32 and a.data.min() >= 0.0
    assert 300 < np.percentile(a.data, 99) < 1100 and a.data.max() < 2000
    assert all(55 <= n <= 80 for n in a.shape)
    np.testing.assert_allclose(a.vox2ras[:3, :3], 3.0 * np.eye(3))
    aniso = synthetic.make_epi(template, m, np.random.default_rng(11), voxel_mm=(2.0, 2.5, 4.0))
    np.testing.assert_allclose(aniso.spacing, [2.0, 2.5, 4.0])
    np.testing.assert_allclose(aniso.centre, a.centre, atol=2.5)


def test_make_epi_identity_matches_independent_resampling(template):
    epi = synthetic.make_epi(template, np.eye(4), np.random.default_rng(0), blur_fwhm_mm=0.0, **CLEAN)
    # Independent: EPI contrast at 1 mm, 3x3x3 box average, nearest template voxel at each EPI voxel.
    contrast = 1.0 * template.csf + 0.65 * template.gm + 0.45 * template.wm
    boxed = ndimage.uniform_filter(contrast, size=3, mode="constant")
    world = synthetic.apply_matrix(epi.vox2ras, _all_indices(epi.shape))
    idx = np.rint(synthetic.apply_matrix(template.t1.ras2vox, world)).astype(int)
    inside = np.all((idx >= 0) & (idx < np.asarray(template.t1.shape)), axis=1)
    ref = np.zeros(len(world))
    ref[inside] = boxed[tuple(idx[inside].T)]
    got = epi.data.ravel()
    used = (ref > 0.05) | (got > 0.05 * got.max())
    r = np.corrcoef(ref[used], got[used])[0, 1]
    assert r > 0.97, r
    # CSF bright, WM dark.
    assert got[used][ref[used] > 0.9].mean() > got[used][(ref[used] > 0.4) & (ref[used] < 0.5)].mean() * 1.6


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_translation_of_6mm_is_a_2_voxel_shift(template, axis):
    rng_seed = 5
    ref = synthetic.make_epi(template, np.eye(4), np.random.default_rng(rng_seed), **CLEAN)
    moved_matrix = np.eye(4)
    moved_matrix[axis, 3] = 6.0  # fixed point x shows up at x + 6 mm in the moving world
    moved = synthetic.make_epi(template, moved_matrix, np.random.default_rng(rng_seed), **CLEAN)
    src = [slice(None)] * 3
    dst = [slice(None)] * 3
    src[axis], dst[axis] = slice(0, -2), slice(2, None)
    np.testing.assert_allclose(moved.data[tuple(dst)], ref.data[tuple(src)], atol=1e-3 * ref.data.max())
    expected = np.zeros(3)
    expected[axis] = 6.0
    np.testing.assert_allclose(moved.centre_of_mass() - ref.centre_of_mass(), expected, atol=0.05)


def test_rotation_moves_content_by_fixed2moving_not_its_inverse(template):
    centre = np.array([0.0, -17.0, 5.0])
    m = synthetic.rigid_fixed2moving((6.0, -4.0, 10.0), (5.0, -3.0, 4.0), centre)
    ref = synthetic.make_epi(template, np.eye(4), np.random.default_rng(1), **CLEAN)
    moved = synthetic.make_epi(template, m, np.random.default_rng(1), **CLEAN)
    com_ref = ref.centre_of_mass()
    expected = synthetic.apply_matrix(m, com_ref[None])[0]
    wrong = synthetic.apply_matrix(np.linalg.inv(m), com_ref[None])[0]
    assert np.linalg.norm(moved.centre_of_mass() - expected) < 0.5
    assert np.linalg.norm(wrong - expected) > 5.0


def test_noise_level_is_relative_to_mean_brain_signal(template):
    m = synthetic.random_rigid(np.random.default_rng(4), 5, 5)
    clean = synthetic.make_epi(template, m, np.random.default_rng(9), noise=0.0)
    noisy = synthetic.make_epi(template, m, np.random.default_rng(9), noise=0.04)
    sigma = 0.04 * synthetic.mean_brain_signal(clean.data)
    bright = clean.data > 10 * sigma  # Rician ~ Gaussian at high SNR
    assert np.std(noisy.data[bright] - clean.data[bright]) == pytest.approx(sigma, rel=0.05)
    assert abs(np.mean(noisy.data[bright] - clean.data[bright])) < 0.05 * sigma
    background = clean.data == 0  # Rayleigh there: mean sigma*sqrt(pi/2)
    assert np.mean(noisy.data[background]) == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.05)


def test_bias_field_amplitude(template):
    flat = synthetic.make_epi(template, np.eye(4), np.random.default_rng(2), bias=0.0, noise=0.0, dropout=0.0)
    biased = synthetic.make_epi(template, np.eye(4), np.random.default_rng(2), bias=0.2, noise=0.0, dropout=0.0)
    brain = flat.data > 0.2 * flat.data.max()
    ratio = biased.data[brain] / flat.data[brain]
    assert ratio.min() >= 0.8 - 1e-4 and ratio.max() <= 1.2 + 1e-4
    assert np.max(np.abs(ratio - 1.0)) > 0.15
    # Smooth: neighbouring voxels differ by much less than the total range.
    field = np.where(brain, biased.data / np.maximum(flat.data, 1e-6), np.nan)
    assert np.nanmax(np.abs(np.diff(field, axis=0))) < 0.03


def test_dropout_at_orbitofrontal_and_temporal_base_only(template):
    base = synthetic.make_epi(template, np.eye(4), np.random.default_rng(6), bias=0.0, noise=0.0, dropout=0.0)
    drop = synthetic.make_epi(template, np.eye(4), np.random.default_rng(6), bias=0.0, noise=0.0, dropout=0.8)
    assert _min_ratio_near(drop, base, (0, 32, -24)) < 0.3  # orbitofrontal: down to ~20 %
    for x in (-42, 42):
        assert _min_ratio_near(drop, base, (x, -8, -34)) < 0.6  # inferior temporal
    for p in [(0, -50, 60), (30, 0, 40), (-30, -70, 20)]:
        assert _value_at(drop, p) / _value_at(base, p) > 0.99
    ratio = drop.data[base.data > 0] / base.data[base.data > 0]
    assert ratio.min() >= 0.2 - 1e-4  # never more than 80 % loss
    assert np.mean(ratio > 0.95) > 0.7  # most of the brain untouched
    # Anatomy-bound: under a translation the dropped region moves with the brain.
    m = np.eye(4)
    m[:3, 3] = [0.0, 15.0, 0.0]
    base_m = synthetic.make_epi(template, m, np.random.default_rng(6), bias=0.0, noise=0.0, dropout=0.0)
    drop_m = synthetic.make_epi(template, m, np.random.default_rng(6), bias=0.0, noise=0.0, dropout=0.8)
    assert _min_ratio_near(drop_m, base_m, (0, 47, -24)) < 0.3


@pytest.mark.parametrize("pe_axis", [0, 1])
def test_distortion_moves_signal_along_pe_axis_and_conserves_line_sums(template, pe_axis):
    ref = synthetic.make_epi(template, np.eye(4), np.random.default_rng(8), **CLEAN)
    dist = synthetic.make_epi(template, np.eye(4), np.random.default_rng(8), distortion_mm=6.0,
                              pe_axis=pe_axis, **CLEAN)
    # Large local changes near the frontal / temporal base, none high up in the brain.
    assert np.abs(dist.data - ref.data).max() > 0.3 * ref.data.max()
    top = synthetic.apply_matrix(ref.ras2vox, np.array([[0.0, 0.0, 45.0]]))[0, 2]
    np.testing.assert_allclose(dist.data[:, :, int(top):], ref.data[:, :, int(top):], atol=1e-3 * ref.data.max())
    # Intensity is only moved along the phase-encoding lines (Jacobian modulation): line sums kept.
    s_ref, s_dist = ref.data.sum(axis=pe_axis), dist.data.sum(axis=pe_axis)
    lines = s_ref > 0.05 * s_ref.max()
    assert np.max(np.abs(s_dist[lines] - s_ref[lines]) / s_ref[lines]) < 0.02
    shift = dist.centre_of_mass() - ref.centre_of_mass()
    assert shift[pe_axis] < -0.1
    assert np.all(np.abs(np.delete(shift, pe_axis)) < 0.02)


def test_slab_is_a_world_consistent_crop(template):
    m = synthetic.random_rigid(np.random.default_rng(7), 5, 5)
    full = synthetic.make_epi(template, m, np.random.default_rng(13))
    slab = synthetic.make_epi(template, m, np.random.default_rng(13), slab=(0.25, 0.75))
    k0 = int(np.floor(0.25 * full.shape[2]))
    k1 = int(np.ceil(0.75 * full.shape[2]))
    assert slab.shape == (full.shape[0], full.shape[1], k1 - k0)
    np.testing.assert_array_equal(slab.data, full.data[:, :, k0:k1])
    idx = _all_indices(slab.shape)[::97]
    np.testing.assert_allclose(slab.world_coords(idx), full.world_coords(idx + [0, 0, k0]), atol=1e-9)
    with pytest.raises(ValueError):
        synthetic.make_epi(template, m, np.random.default_rng(13), slab=(0.6, 0.4))


def test_make_epi_is_fast(template):
    m = synthetic.random_rigid(np.random.default_rng(0), 8, 10)
    synthetic.make_epi(template, m, np.random.default_rng(0))  # warm the caches
    start = time.perf_counter()
    synthetic.make_epi(template, m, np.random.default_rng(1), distortion_mm=4.0)
    assert time.perf_counter() - start < 2.0


# ------------------------------------------------------------------------------------------
# T1
# ------------------------------------------------------------------------------------------


def test_make_t1(template):
    t1 = synthetic.make_t1(template)
    np.testing.assert_array_equal(t1.data, template.t1.data)
    np.testing.assert_array_equal(t1.vox2ras, template.t1.vox2ras)
    assert t1.data.dtype == np.float32
    t1_2mm = synthetic.make_t1(template, voxel_mm=2.0)
    np.testing.assert_allclose(t1_2mm.spacing, 2.0)
    assert all(abs(2 * a - b) <= 2 for a, b in zip(t1_2mm.shape, t1.shape))
    np.testing.assert_allclose(t1_2mm.centre, t1.centre, atol=1e-9)
    np.testing.assert_allclose(t1_2mm.centre_of_mass(), t1.centre_of_mass(), atol=0.3)
    # Anti-aliased: each 2 mm voxel matches the exact 2 mm box average of the piecewise-constant
    # 1 mm image around its centre (computed here for any sub-voxel position of the centre).
    idx = _all_indices(t1_2mm.shape)[::17]
    in_t1 = synthetic.apply_matrix(template.t1.ras2vox, synthetic.apply_matrix(t1_2mm.vox2ras, idx))
    keep = np.all((in_t1 >= 2) & (in_t1 <= np.asarray(t1.shape) - 3), axis=1)
    in_t1, idx = in_t1[keep], idx[keep]
    block = np.zeros(len(idx))
    offsets = np.arange(-2, 3)
    weights = []
    for axis in range(3):  # overlap of [c - 1, c + 1] with the voxels [n - 0.5, n + 0.5]
        n = np.floor(in_t1[:, axis])[:, None] + offsets
        weights.append(np.clip(np.minimum(in_t1[:, axis:axis + 1] + 1, n + 0.5)
                               - np.maximum(in_t1[:, axis:axis + 1] - 1, n - 0.5), 0, None) / 2.0)
    base = np.floor(in_t1).astype(int)
    for a in range(5):
        for b in range(5):
            for c in range(5):
                vals = t1.data[base[:, 0] + offsets[a], base[:, 1] + offsets[b], base[:, 2] + offsets[c]]
                block += weights[0][:, a] * weights[1][:, b] * weights[2][:, c] * vals
    got = t1_2mm.data[tuple(idx.astype(int).T)]
    brain = block > 20
    assert np.corrcoef(block[brain], got[brain])[0, 1] > 0.99  # 0.98 for a 0.5 mm offset
    assert np.mean(got[brain]) == pytest.approx(np.mean(block[brain]), rel=0.02)


# ------------------------------------------------------------------------------------------
# Storage orientation
# ------------------------------------------------------------------------------------------


def _small_volume() -> Volume:
    rng = np.random.default_rng(0)
    v2r = np.array([[2.0, 0, 0, -20.0], [0, 3.0, 0, -30.0], [0, 0, 4.0, 10.0], [0, 0, 0, 1]])
    return Volume(rng.random((7, 9, 5)).astype(np.float32), v2r, name="small")


def _assert_same_world_content(new: Volume, old: Volume):
    idx = _all_indices(new.shape)
    old_idx = synthetic.apply_matrix(old.ras2vox, synthetic.apply_matrix(new.vox2ras, idx))
    np.testing.assert_allclose(old_idx, np.rint(old_idx), atol=1e-9)
    old_int = np.rint(old_idx).astype(int)
    assert np.all(old_int >= 0) and np.all(old_int < np.asarray(old.shape))
    hits = np.bincount(np.ravel_multi_index(tuple(old_int.T), old.shape), minlength=old.data.size)
    assert np.all(hits == 1)  # a one-to-one voxel correspondence
    np.testing.assert_array_equal(new.data[tuple(idx.astype(int).T)], old.data[tuple(old_int.T)])


@pytest.mark.parametrize("code", ["RAS", "LAS", "LPS", "ARS", "PIR", "SLA", "ilp"])
def test_reorient_keeps_every_voxel_world_position(code):
    vol = _small_volume()
    new = synthetic.reorient(vol, code)
    assert new.data.size == vol.data.size
    if code.upper() != "RAS":
        assert not np.array_equal(new.vox2ras, vol.vox2ras)
    _assert_same_world_content(new, vol)
    # The new axes point the way the code says.
    letters = {0: "RL", 1: "AP", 2: "SI"}
    for axis, letter in enumerate(code.upper()):
        col = new.vox2ras[:3, axis]
        world = int(np.argmax(np.abs(col)))
        assert letter == letters[world][0 if col[world] > 0 else 1]
    back = synthetic.reorient(new, "RAS")
    np.testing.assert_array_equal(back.data, vol.data)
    np.testing.assert_allclose(back.vox2ras, vol.vox2ras, atol=1e-12)


def test_reorient_rejects_bad_codes():
    for code in ["RAR", "XYZ", "RA", "RASS"]:
        with pytest.raises(ValueError):
            synthetic.reorient(_small_volume(), code)


def test_oblique_copy_and_reorient_of_oblique(template):
    epi = synthetic.make_epi(template, np.eye(4), np.random.default_rng(0), **CLEAN)
    obl = synthetic.oblique_copy(epi, 20.0, np.random.default_rng(3))
    lin = obl.vox2ras[:3, :3]
    assert np.abs(lin - np.diag(np.diag(lin))).max() > 0.3  # non-diagonal
    np.testing.assert_allclose(obl.spacing, epi.spacing, atol=1e-9)
    np.testing.assert_allclose(obl.centre, epi.centre, atol=1e-9)
    grid_rotation = Rotation.from_matrix(lin / obl.spacing @ np.linalg.inv(epi.vox2ras[:3, :3] / epi.spacing))
    assert np.rad2deg(grid_rotation.magnitude()) == pytest.approx(20.0, abs=1e-6)
    # Covers the original field of view.
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)]) * (np.asarray(epi.shape) - 1)
    in_obl = synthetic.apply_matrix(obl.ras2vox, epi.world_coords(corners.astype(float)))
    assert np.all(in_obl >= -0.5 - 1e-6) and np.all(in_obl <= np.asarray(obl.shape) - 0.5 + 1e-6)
    # Same content: sample the oblique copy back on the original grid.
    world = synthetic.apply_matrix(epi.vox2ras, _all_indices(epi.shape))
    back = ndimage.map_coordinates(obl.data, synthetic.apply_matrix(obl.ras2vox, world).T, order=1)
    brain = epi.data.ravel() > 0.1 * epi.data.max()
    assert np.corrcoef(back[brain], epi.data.ravel()[brain])[0, 1] > 0.94  # two trilinear resamplings
    np.testing.assert_allclose(obl.centre_of_mass(), epi.centre_of_mass(), atol=0.5)
    # Flipping an oblique volume is still exact.
    _assert_same_world_content(synthetic.reorient(obl, "LPI"), obl)


# ------------------------------------------------------------------------------------------
# Bundled sample data
# ------------------------------------------------------------------------------------------


def test_bundled_sample_files():
    import nibabel as nib

    truth = np.loadtxt(DATA / "sub-01_true_fixed2moving_ras.txt")
    assert truth.shape == (4, 4)
    np.testing.assert_allclose(truth[:3, :3] @ truth[:3, :3].T, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(truth[3], [0, 0, 0, 1])
    angle = np.rad2deg(Rotation.from_matrix(truth[:3, :3]).magnitude())
    assert 5.0 < angle < 12.0
    header = (DATA / "sub-01_true_fixed2moving_ras.txt").read_text().splitlines()[0]
    assert header.startswith("#") and "fixed2moving" in header
    t1 = nib.load(DATA / "sub-01_T1w.nii.gz")
    bold = nib.load(DATA / "sub-01_bold.nii.gz")
    assert t1.get_data_dtype() == np.uint8 and bold.get_data_dtype() == np.int16
    assert bold.ndim == 4 and bold.shape[3] >= 3
    for img in (t1, bold):
        assert int(img.header["sform_code"]) > 0 and int(img.header["qform_code"]) > 0
        np.testing.assert_allclose(img.get_qform(), img.get_sform(), atol=1e-5)
    total = sum(p.stat().st_size for p in DATA.iterdir() if p.is_file())
    assert total < 3.1e6
    assert "Permission to use, copy, modify, and distribute" in (DATA / "README.md").read_text()


def test_make_sample_reproduces_bundled_files(template, tmp_path):
    import nibabel as nib

    spec = importlib.util.spec_from_file_location("make_sample", DATA / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    paths = module.main(tmp_path, SHARED)
    for key in ("t1", "bold"):
        new = nib.load(paths[key])
        old = nib.load(DATA / paths[key].name)
        np.testing.assert_allclose(new.affine, old.affine, atol=1e-6)
        diff = np.abs(np.asarray(new.dataobj, dtype=np.int32) - np.asarray(old.dataobj, dtype=np.int32))
        assert diff.max() <= 1, f"{paths[key].name} differs from the bundled file: rerun data/make_sample.py"
    np.testing.assert_allclose(np.loadtxt(paths["truth"]), np.loadtxt(DATA / "sub-01_true_fixed2moving_ras.txt"),
                               atol=1e-9)
    # The bundled EPI really is the template seen through the truth matrix: noise-free content
    # matches the mean of the series.
    truth = np.loadtxt(DATA / "sub-01_true_fixed2moving_ras.txt")
    bold = nib.load(DATA / "sub-01_bold.nii.gz")
    clean = synthetic.make_epi(template, truth, np.random.default_rng(module.SEED), voxel_mm=3.0,
                               shape=bold.shape[:3], noise=0.0)
    mean = np.asarray(bold.dataobj, dtype=np.float32).mean(axis=3)
    np.testing.assert_allclose(bold.affine, clean.vox2ras, atol=1e-6)
    assert np.corrcoef(mean.ravel(), clean.data.ravel())[0, 1] > 0.99
