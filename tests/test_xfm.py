"""Transform files: what we write is what SimpleITK and ANTs apply."""

import numpy as np
import pytest
import SimpleITK as sitk

from regkl.errors import InputError
from regkl.transforms import euler_to_rotation
from regkl.xfm import load_transform, ras_to_lps, read_itk, save_transform


def _random_rigid(seed):
    rng = np.random.default_rng(seed)
    m = np.eye(4)
    m[:3, :3] = euler_to_rotation(rng.uniform(-0.4, 0.4, 3))
    m[:3, 3] = rng.uniform(-20, 20, 3)
    return m


@pytest.mark.parametrize("suffix", [".tfm", ".txt"])
def test_itk_file_maps_points_like_our_matrix(tmp_path, suffix):
    m = _random_rigid(0)
    path = tmp_path / f"x{suffix}"
    save_transform(path, m, "itk")
    tx = sitk.ReadTransform(str(path))
    flip = np.array([-1.0, -1.0, 1.0])
    for x_ras in np.random.default_rng(1).uniform(-80, 80, (10, 3)):
        y_lps = np.array(tx.TransformPoint(tuple(x_ras * flip)))
        np.testing.assert_allclose(y_lps * flip, m[:3, :3] @ x_ras + m[:3, 3], atol=1e-9)
    np.testing.assert_allclose(load_transform(path), m, atol=1e-12)


def test_reads_other_itk_transform_types(tmp_path):
    """An Euler3DTransform with a centre, as other tools write it, gives the right RAS matrix."""
    tx = sitk.Euler3DTransform((10.0, -5.0, 3.0), 0.1, -0.2, 0.3, (4.0, 5.0, -6.0))
    sitk.WriteTransform(tx, str(tmp_path / "euler.tfm"))
    m_ras = read_itk(tmp_path / "euler.tfm")
    x_lps = np.array([12.0, -30.0, 40.0])
    y_lps = np.array(tx.TransformPoint(tuple(x_lps)))
    flip = np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(m_ras[:3, :3] @ (x_lps * flip) + m_ras[:3, 3], y_lps * flip, atol=1e-9)


def test_ras_matrix_file_round_trip_and_convention_comment(tmp_path):
    m = _random_rigid(2)
    save_transform(tmp_path / "m.txt", m, "ras")
    text = (tmp_path / "m.txt").read_text()
    assert "FIXED" in text and "RAS" in text
    np.testing.assert_allclose(load_transform(tmp_path / "m.txt"), m, atol=1e-9)
    np.testing.assert_allclose(ras_to_lps(ras_to_lps(m)), m)


def test_bad_transform_files(tmp_path):
    (tmp_path / "junk.txt").write_text("1 2 3\n")
    with pytest.raises(InputError, match="junk.txt"):
        load_transform(tmp_path / "junk.txt")
    with pytest.raises(InputError, match="no such"):
        load_transform(tmp_path / "missing.tfm")
    (tmp_path / "bad.tfm").write_text("#Insight Transform File V1.0\nTransform: Nonsense\n")
    with pytest.raises(InputError, match="bad.tfm"):
        load_transform(tmp_path / "bad.tfm")


def _sitk_reference_volume(path):
    """A 3D SimpleITK image of the moving file (4D reduced by mean, as regkl does)."""
    img = sitk.ReadImage(str(path), sitk.sitkFloat32)
    if img.GetDimension() == 3:
        return img
    arr = sitk.GetArrayFromImage(img).mean(axis=0)
    out = sitk.GetImageFromArray(arr)
    out.SetOrigin(img.GetOrigin()[:3])
    out.SetSpacing(img.GetSpacing()[:3])
    out.SetDirection(np.asarray(img.GetDirection()).reshape(4, 4)[:3, :3].ravel().tolist())
    return out


def test_simpleitk_resample_with_written_tfm_reproduces_output(tmp_path, real_pair_paths):
    """Acceptance 4: SimpleITK.Resample(moving, fixed, tfm) == regkl's own output (corr > 0.999)."""
    from regkl.cli import main

    moving, fixed = real_pair_paths
    out, tfm = tmp_path / "out.nii.gz", tmp_path / "x.tfm"
    with pytest.raises(SystemExit) as code:
        main(["register", str(moving), str(fixed), "-o", str(out), "--transform-out", str(tfm), "-q"])
    assert code.value.code == 0
    fixed_img = sitk.ReadImage(str(fixed), sitk.sitkFloat32)
    ref = sitk.Resample(_sitk_reference_volume(moving), fixed_img, sitk.ReadTransform(str(tfm)),
                        sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    a = sitk.GetArrayFromImage(ref)
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(out), sitk.sitkFloat32))
    overlap = (a != 0) & (b != 0)
    assert overlap.sum() > 0.2 * overlap.size
    assert np.corrcoef(a[overlap], b[overlap])[0, 1] > 0.999

    ants = pytest.importorskip("ants", reason="antspyx not installed: antsApplyTransforms check skipped")
    warped = ants.apply_transforms(ants.image_read(str(fixed)), ants.image_read(str(moving)),
                                   transformlist=[str(tfm)], interpolator="linear")
    c = np.transpose(warped.numpy(), (2, 1, 0))
    overlap = (c != 0) & (b != 0)
    assert np.corrcoef(c[overlap], b[overlap])[0, 1] > 0.999


def test_apply_reproduces_register_output_and_inverse_round_trips(tmp_path, real_pair_paths):
    """Issue 4: `regkl apply` with the written transform reproduces register's output exactly, and
    --inverse brings the result back onto the moving grid within interpolation error."""
    import nibabel as nib

    from regkl.cli import main

    moving, fixed = real_pair_paths

    def run(argv):
        with pytest.raises(SystemExit) as info:
            main([str(a) for a in argv])
        assert info.value.code == 0

    out, tfm = tmp_path / "reg.nii.gz", tmp_path / "x.tfm"
    run(["register", moving, fixed, "-o", out, "--transform-out", tfm, "-q"])
    applied = tmp_path / "applied.nii.gz"
    run(["apply", tfm, moving, fixed, "-o", applied, "-q"])
    np.testing.assert_array_equal(nib.load(str(applied)).get_fdata(), nib.load(str(out)).get_fdata())

    back = tmp_path / "back.nii.gz"
    run(["apply", tfm, out, moving, "--inverse", "-o", back, "-q"])
    original = nib.load(str(moving)).get_fdata()
    returned = nib.load(str(back)).get_fdata()
    both = (returned > 0) & (original > np.percentile(original, 50))
    assert both.sum() > 0.3 * (original > np.percentile(original, 50)).sum()
    # two linear interpolations (T2w grid, then back): agreement within interpolation blur
    assert np.corrcoef(original[both], returned[both])[0, 1] > 0.95
    assert np.median(np.abs(original[both] - returned[both])) < 0.1 * np.percentile(original[both], 90)

    labels = tmp_path / "labels.nii.gz"
    img = nib.load(str(moving))
    nib.save(nib.Nifti1Image((np.asanyarray(img.dataobj) > 60).astype(np.int16) * 7, img.affine), str(labels))
    lab_out = tmp_path / "labels_on_fixed.nii.gz"
    run(["apply", tfm, labels, fixed, "--interp", "nearest", "-o", lab_out, "-q"])
    lab = nib.load(str(lab_out))
    assert lab.get_data_dtype() == np.int16 and set(np.unique(np.asanyarray(lab.dataobj))) <= {0, 7}
