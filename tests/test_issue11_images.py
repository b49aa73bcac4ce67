"""Issue 11, items 1-4: users' own images that used to be refused or silently wrong.

Every case is built from the shared MNI data with a KNOWN transform and goes through the real
command line (``regkl.cli.main``); the error is the RMS displacement (mm) over the brain.

1. thin oblique slabs of 2-5 slices register with the default options; one slice is refused with
   its shape and extent;
2. NaN/infinite voxels are "no data" on either side (a float EPI with a 69 % NaN background);
3. files without orientation are placed as ITK/ANTs/SimpleITK place them, with a warning, so
   SimpleITK applying regkl's .tfm to the files as they are reproduces regkl's output;
4. ``--fill`` sets the value outside the moving image (a cut-off CT in Hounsfield units).
"""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from regkl import synthetic
from regkl.cli import main
from regkl.resample import resample
from regkl.transforms import apply_matrix
from regkl.volume import Volume

#: The synthetic EPI's grid is tilted by these Euler angles (degrees): an oblique acquisition.
TILT_DEG = (12.0, -8.0, 5.0)


def _rigid_truth():
    return synthetic.rigid_fixed2moving((4.0, -3.0, 6.0), (3.0, -2.0, 4.0), centre=(0.0, -18.0, 18.0))


@pytest.fixture(scope="session")
def case(template, tmp_path_factory):
    """Fixed T1 (3 mm, saved), an oblique 3 x 3 x 3.5 mm EPI of it with its true fixed->moving
    matrix, the brain points and a folder."""
    folder = tmp_path_factory.mktemp("issue11")
    t1 = synthetic.make_t1(template, voxel_mm=3.0)
    epi = synthetic.make_epi(template, _rigid_truth(), np.random.default_rng(3), voxel_mm=(3.0, 3.0, 3.5))
    tilt = np.eye(4)
    tilt[:3, :3] = synthetic.rotation_matrix(TILT_DEG)
    # relabel the moving world by the tilt: same content, an oblique grid, and the truth follows
    epi = Volume(epi.data, tilt @ epi.vox2ras, "epi")
    save(t1, folder / "t1.nii.gz")
    return dict(t1=t1, epi=epi, truth=tilt @ _rigid_truth(), brain=synthetic.brain_points(template, step_vox=4),
                dir=folder)


def save(vol: Volume, path, *, orientation=True):
    img = nib.Nifti1Image(vol.data, vol.vox2ras)
    if not orientation:
        img.set_sform(None, code=0)
        img.set_qform(None, code=0)
    nib.save(img, str(path))
    return path


def run(argv, capfd):
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capfd.readouterr()
    return code, out, err


def register(moving, fixed, folder, capfd, *extra, name="reg"):
    """Register through the command line; (matrix, output path, .tfm path, stderr)."""
    out, tfm, mat = folder / f"{name}.nii.gz", folder / f"{name}.tfm", folder / f"{name}.txt"
    code, _, err = run(["register", moving, fixed, "-o", out, "--transform-out", tfm, "--matrix-out", mat, "-q",
                        *extra], capfd)
    assert code == 0, err
    return np.loadtxt(mat), out, tfm, err


def slab(vol: Volume, n: int, axis: int = 2, centre_frac: float = 0.55) -> Volume:
    """``n`` adjacent slices of ``vol`` along ``axis`` (world positions kept)."""
    k0 = int(round(centre_frac * vol.shape[axis] - n / 2))
    take = [slice(None)] * 3
    take[axis] = slice(k0, k0 + n)
    offset = np.zeros(3)
    offset[axis] = k0
    v2r = vol.vox2ras.copy()
    v2r[:3, 3] = vol.vox2ras[:3, :3] @ offset + vol.vox2ras[:3, 3]
    return Volume(np.ascontiguousarray(vol.data[tuple(take)]), v2r, "slab")


# --------------------------------------------------------------------------------------------------
# 1. thin slabs


@pytest.mark.parametrize("n_slices", [2, 3, 4, 5])
def test_thin_oblique_slab_registers_with_default_options(case, n_slices, capfd):
    moving = save(slab(case["epi"], n_slices), case["dir"] / f"slab{n_slices}.nii.gz")
    m, _, _, _ = register(moving, case["dir"] / "t1.nii.gz", case["dir"], capfd, name=f"slab{n_slices}_reg")
    err = synthetic.rms_error(m, case["truth"], case["brain"])
    print(f"{n_slices}-slice slab: {err:.3f} mm")
    assert err < 1.0


def test_single_slice_is_refused_with_its_shape_and_extent(case, capfd):
    moving = save(slab(case["epi"], 1), case["dir"] / "one_slice.nii.gz")
    code, _, err = run(["register", moving, case["dir"] / "t1.nii.gz"], capfd)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    nx, ny, _ = case["epi"].shape
    assert lines[0] == (f"regkl: error: {moving}: image is a single slice: {nx}x{ny}x1 voxels covering "
                        f"{3 * nx:g} x {3 * ny:g} x 3.5 mm; registration needs a 3D volume with at least 2 "
                        "voxels along each axis")


def test_no_message_reports_an_internal_shape_for_tiny_or_coarse_images(tmp_path, capfd):
    """Issue 12 item 9: 0.05 mm voxels ("got (1, 1, 1)") and 500 mm voxels / --sampling 1e-9
    ("image is constant") must be told in terms of what the user gave."""
    rng = np.random.default_rng(0)
    blob = ndimage.gaussian_filter(rng.normal(size=(20, 20, 20)), 2).astype(np.float32)
    normal = save(Volume(blob, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "normal.nii.gz")
    tiny = save(Volume(blob, np.diag([0.05, 0.05, 0.05, 1.0])), tmp_path / "tiny.nii.gz")
    coarse = save(Volume(blob[:4, :4, :4], np.diag([500.0, 500.0, 500.0, 1.0])), tmp_path / "coarse.nii.gz")
    for argv in (["register", tiny, normal], ["register", coarse, normal],
                 ["register", normal, normal, "--sampling", "1e-9"]):
        code, _, err = run(argv + ["-q"], capfd)
        assert code in (1, 2), err
        assert len(err.strip().splitlines()) == 1, err
        assert not re.search(r"\(\d+, \d+, \d+\)", err), err  # no array shape tuple
        assert "constant" not in err, err
    assert "use --sampling" in err  # the last one: a larger fraction than the one given would do


# --------------------------------------------------------------------------------------------------
# 2. NaN / infinite voxels are no data


def _background_nan(epi: Volume, fraction: float, value=np.nan) -> np.ndarray:
    """EPI data with the background outside a dilated head mask set to ``value`` (``fraction`` of
    the voxels, to within 1 %)."""
    smooth = ndimage.gaussian_filter(epi.data, 1.5)
    level = np.quantile(smooth, fraction)  # the darkest `fraction` of the smoothed image is background
    head = ndimage.binary_fill_holes(smooth > level)
    data = epi.data.copy()
    data[~head] = value
    return data


def test_epi_with_nan_background_registers_and_output_has_fill(case, capfd):
    data = _background_nan(case["epi"], 0.69)
    assert abs(np.isnan(data).mean() - 0.69) < 0.01
    moving = save(case["epi"].with_data(data), case["dir"] / "epi_nan.nii.gz")
    fixed = case["dir"] / "t1.nii.gz"
    code, _, err = run(["register", moving, fixed, "--matrix-out", case["dir"] / "nan.txt", "-o",
                        case["dir"] / "nan_out.nii.gz", "--fill", "-7", "-q"], capfd)
    assert code == 0, err
    assert "NaN/infinite voxels (69.0%) are treated as no data" in err
    err_mm = synthetic.rms_error(np.loadtxt(case["dir"] / "nan.txt"), case["truth"], case["brain"])
    print(f"69 % NaN EPI: {err_mm:.3f} mm")
    assert err_mm < 1.0
    out = nib.load(str(case["dir"] / "nan_out.nii.gz")).get_fdata()
    assert np.isfinite(out).all()
    # fixed voxels that land on the moving image's NaN background get the fill value
    nan_there = resample(case["epi"].with_data(data), case["t1"], np.loadtxt(case["dir"] / "nan.txt"),
                         fill=np.nan).data
    assert np.isnan(nan_there).mean() > 0.3
    np.testing.assert_array_equal(out[np.isnan(nan_there)], -7.0)


def test_nan_and_inf_on_the_fixed_side_are_no_data(case, capfd):
    t1 = case["t1"].data.copy()
    t1[case["t1"].data <= 0] = np.nan  # the brain-only template's background
    t1[:, :, :3] = np.inf
    fixed = save(case["t1"].with_data(t1), case["dir"] / "t1_nan.nii.gz")
    moving = save(case["epi"].with_data(_background_nan(case["epi"], 0.5, np.inf)), case["dir"] / "epi_inf.nii.gz")
    m, _, _, err = register(moving, fixed, case["dir"], capfd, name="nan_fixed")
    err_mm = synthetic.rms_error(m, case["truth"], case["brain"])
    print(f"NaN/Inf fixed and Inf moving: {err_mm:.3f} mm")
    assert err_mm < 1.0


def test_too_few_finite_voxels_is_refused_with_the_count(case, capfd):
    data = np.full(case["epi"].shape, np.nan, np.float32)
    data[10:15, 10:15, 10:14] = case["epi"].data[10:15, 10:15, 10:14]
    moving = save(case["epi"].with_data(data), case["dir"] / "mostly_nan.nii.gz")
    code, _, err = run(["register", moving, case["dir"] / "t1.nii.gz"], capfd)
    assert code == 2
    assert err.strip() == (f"regkl: error: {moving}: only 100 of {data.size} voxels are finite (the others are NaN "
                           "or infinite, meaning no data); at least 512 are needed to register")


# --------------------------------------------------------------------------------------------------
# 3. files without orientation


def _sitk_resample(moving, fixed, tfm):
    import SimpleITK as sitk

    out = sitk.Resample(sitk.ReadImage(str(moving), sitk.sitkFloat32), sitk.ReadImage(str(fixed)),
                        sitk.ReadTransform(str(tfm)), sitk.sitkLinear, 0.0)
    return np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))


def _corr(a, b):
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("which", ["moving", "moving_ras", "fixed"])
def test_file_without_orientation_matches_itk_and_simpleitk_reproduces_the_output(case, which, capfd):
    """Stored LPS (as DICOM-derived arrays are), ITK's placement of the bare grid (origin 0, axes
    along L, P, S) differs from the real one by a translation (and the EPI's tilt); stored RAS
    ('moving_ras'), by a half-turn about the vertical axis as well, which the search must find."""
    import SimpleITK as sitk

    epi = synthetic.reorient(case["epi"], "LPS") if which == "moving" else case["epi"]
    which_file = "fixed" if which == "fixed" else "moving"
    t1 = synthetic.reorient(case["t1"], "LPS")
    moving = save(epi, case["dir"] / f"noorient_{which}_epi.nii.gz", orientation=which_file != "moving")
    fixed = save(t1, case["dir"] / f"noorient_{which}_t1.nii.gz", orientation=which_file != "fixed")
    m, out, tfm, err = register(moving, fixed, case["dir"], capfd, name=f"noorient_{which}")
    bare = moving if which_file == "moving" else fixed
    warn = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warn) == 1 and str(bare) in warn[0] and "no orientation" in warn[0], err
    # ITK's placement of the bare file, and the truth in that world
    itk = sitk.ReadImage(str(bare))
    assert itk.GetOrigin() == (0.0, 0.0, 0.0)
    placed = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.diag(list(itk.GetSpacing()) + [1.0])
    np.testing.assert_allclose(np.asarray(itk.GetDirection()).reshape(3, 3), np.eye(3))
    if which_file == "moving":
        truth = placed @ np.linalg.inv(epi.vox2ras) @ case["truth"]
        brain = case["brain"]
    else:
        fixed_old2new = placed @ np.linalg.inv(t1.vox2ras)
        truth = case["truth"] @ np.linalg.inv(fixed_old2new)
        brain = apply_matrix(fixed_old2new, case["brain"])
    err_mm = synthetic.rms_error(m, truth, brain)
    print(f"no orientation on the {which} image: {err_mm:.3f} mm")
    assert err_mm < 1.0
    ours = nib.load(str(out)).get_fdata()
    theirs = _sitk_resample(moving, fixed, tfm)
    corr = _corr(ours, theirs)
    print(f"  SimpleITK.Resample with regkl's .tfm vs regkl's output: correlation {corr:.5f}")
    assert corr > 0.99


def test_analyze_file_is_placed_as_itk_places_it(case, tmp_path, capfd):
    import SimpleITK as sitk

    from regkl.io import load_volume

    path = tmp_path / "epi.hdr"
    nib.save(nib.AnalyzeImage(case["epi"].data, np.diag([3.0, 3.0, 3.5, 1.0])), str(path))
    with pytest.warns(UserWarning, match="Analyze 7.5 file.*placed as ITK"):
        vol = load_volume(path)
    itk = sitk.ReadImage(str(path))
    np.testing.assert_allclose(vol.vox2ras[:3, 3], np.diag([-1, -1, 1]) @ np.asarray(itk.GetOrigin()))
    np.testing.assert_allclose(vol.vox2ras[:3, :3], np.diag([-1, -1, 1]) @ np.asarray(itk.GetDirection()).reshape(3, 3)
                               @ np.diag(itk.GetSpacing()))


# --------------------------------------------------------------------------------------------------
# 4. --fill


def test_cut_off_ct_with_fill_in_hounsfield_units(case, capfd):
    t1 = case["t1"]
    hu = np.where(t1.data > 0, 60.0 * t1.data / t1.data.max(), -1000.0).astype(np.float32)  # air -1000 HU
    ct = t1.with_data(hu)
    fixed = save(ct, case["dir"] / "ct_whole.nii.gz")
    truth = synthetic.rigid_fixed2moving((-5.0, 4.0, 3.0), (4.0, 3.0, -5.0), centre=(0.0, -18.0, 18.0))
    # moving grid: the lower 55 % of the head only (cut off above)
    shape = (ct.shape[0], ct.shape[1], int(0.55 * ct.shape[2]))
    grid = Volume(np.zeros(shape, np.float32), ct.vox2ras, "grid")
    moving_vol = resample(ct, grid, np.linalg.inv(truth), fill=-1000.0)
    moving = save(moving_vol, case["dir"] / "ct_cut.nii.gz")
    m, out, _, _ = register(moving, fixed, case["dir"], capfd, "--fill", "-1024", name="ct")
    err_mm = synthetic.rms_error(m, truth, case["brain"])
    print(f"cut-off CT, --fill -1024: {err_mm:.3f} mm")
    assert err_mm < 1.0
    data = nib.load(str(out)).get_fdata()
    outside = np.isnan(resample(moving_vol, ct, m, fill=np.nan).data)
    assert outside.mean() > 0.19
    np.testing.assert_array_equal(data[outside], -1024.0)
    assert not np.any(data[~outside] == -1024.0)


def test_fill_is_applied_by_apply_and_refused_when_the_label_type_cannot_hold_it(case, tmp_path, capfd):
    moving = save(case["epi"], tmp_path / "epi.nii.gz")
    tfm = tmp_path / "shift.txt"
    np.savetxt(tfm, np.array([[1, 0, 0, 60.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    out = tmp_path / "applied.nii.gz"
    code, _, err = run(["apply", tfm, moving, case["dir"] / "t1.nii.gz", "-o", out, "--fill", "-1024", "--format", "ras", "-q"], capfd)
    assert code == 0, err
    from regkl.io import load_volume

    expected = resample(load_volume(moving), load_volume(case["dir"] / "t1.nii.gz"), np.loadtxt(tfm), fill=-1024.0).data
    np.testing.assert_array_equal(nib.load(str(out)).get_fdata(), expected)
    assert (expected == -1024).mean() > 0.2
    labels = tmp_path / "labels.nii.gz"
    nib.save(nib.Nifti1Image((case["epi"].data > 300).astype(np.uint8), case["epi"].vox2ras), str(labels))
    code, _, err = run(["apply", tfm, labels, case["dir"] / "t1.nii.gz", "-o", tmp_path / "l.nii.gz",
                        "--interp", "nearest", "--fill", "-1", "--format", "ras"], capfd)
    assert code == 2 and "--fill -1 cannot be stored in this image's uint8 data" in err
    assert not (tmp_path / "l.nii.gz").exists()


def test_fill_default_is_stated_in_help(capfd):
    for command in ("register", "apply"):
        code, out, _ = run([command, "--help"], capfd)
        assert code == 0
        assert re.search(r"--fill VALUE.*\[default: 0\.0\]", " ".join(out.split())), out


# --------------------------------------------------------------------------------------------------
# the pieces, against NumPy


def test_pyramid_keeps_thin_axes_and_averages_finite_voxels_only():
    from regkl.pyramid import downsample

    rng = np.random.default_rng(1)
    data = np.full((40, 36, 2), 7.0, np.float32)
    holes = rng.random(data.shape) < 0.3
    data[holes] = np.nan
    data[:8, :8, :] = np.nan  # whole blocks without data
    vol = Volume(data, np.diag([1.0, 1.0, 3.5, 1.0]))
    out = downsample(vol, 8.0)
    assert out.shape == (5, 4, 2)  # 8x8 blocks in-plane; the 2-slice axis is not reduced
    finite = np.isfinite(out.data)
    np.testing.assert_allclose(out.data[finite], 7.0, rtol=1e-6)  # NaN never read as 0
    assert not finite[0, 0].any() and finite.sum() == out.data.size - 2


def test_moving_points_touching_nan_count_as_outside():
    from regkl import histogram, pyramid

    rng = np.random.default_rng(2)
    data = rng.random((12, 11, 10)).astype(np.float32)
    data[rng.random(data.shape) < 0.05] = np.nan
    vol = Volume(data, np.eye(4))
    level = histogram.make_moving_level(vol.with_data(np.nan_to_num(data)), 16, mask=pyramid.no_data_mask(vol))
    idx = rng.uniform(0, np.asarray(data.shape) - 1, size=(4000, 3))
    samples = histogram.make_samples(idx, rng.random(4000).astype(np.float32), 16)
    ev = histogram.joint_histogram(samples, level, np.eye(4))
    base = np.minimum(np.floor(idx).astype(int), np.asarray(data.shape) - 2)
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    touches = np.zeros(len(idx), bool)
    for corner in corners:
        i, j, k = (base + corner).T
        touches |= np.isnan(data[i, j, k])
    assert touches.sum() > 500 and (~touches).sum() > 200
    assert np.all(ev.mov_w[touches] == 0.0)
    assert np.any(ev.mov_w[~touches] > 0.0)
