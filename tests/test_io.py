"""Image I/O: every storage orientation and format gives the same world content."""

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from regkl.errors import InputError
from regkl.io import load_volume
from regkl.sitk_images import array_to_sitk, sitk_to_array
from regkl.writers import save_volume
from regkl.volume import Volume

from .conftest import write_dicom_series


def _oblique_vox2ras():
    a = np.deg2rad(12)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag([2.0, 1.5, 3.0])
    m[:3, 3] = [-40.0, 25.0, -10.0]
    return m


def _ras_at(vol: Volume, world):
    vox = np.round(world @ vol.ras2vox[:3, :3].T + vol.ras2vox[:3, 3]).astype(int)
    return vol.data[tuple(vox.T)]


def _variants(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.random((9, 10, 11)).astype(np.float32)
    v2r = _oblique_vox2ras()
    flips = {"RAS": np.diag([1, 1, 1, 1.0]), "LAS": np.diag([-1, 1, 1, 1.0]), "LPS": np.diag([-1, -1, 1, 1.0])}
    out = {}
    for name, f in flips.items():
        # re-store the same world content with flipped axes
        d = data[:: int(f[0, 0]), :: int(f[1, 1]), :]
        shift = np.eye(4)
        for a in range(2):
            if f[a, a] < 0:
                shift[a, a] = -1
                shift[a, 3] = data.shape[a] - 1
        out[name] = (d, v2r @ shift)
    out["permuted"] = (np.transpose(data, (2, 0, 1)), v2r[:, [2, 0, 1, 3]])
    return data, v2r, out


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_every_orientation_and_format_reads_same_world(tmp_path, suffix):
    data, v2r, variants = _variants(tmp_path)
    ref = Volume(data, v2r)
    idx = np.stack(np.meshgrid(*[np.arange(0, s, 2) for s in data.shape], indexing="ij"), -1).reshape(-1, 3)
    world = ref.world_coords(idx)
    for name, (d, m) in variants.items():
        path = tmp_path / f"{name}{suffix}"
        if suffix.startswith(".nii"):
            nib.save(nib.Nifti1Image(d, m), str(path))
        else:
            sitk.WriteImage(array_to_sitk(d, m), str(path))
        vol = load_volume(path)
        np.testing.assert_allclose(_ras_at(vol, world), data[tuple(idx.T)], err_msg=name)


def test_sitk_conversion_matches_nibabel(tmp_path):
    """The same file read by nibabel and (through SimpleITK) by our converter agrees."""
    _, v2r, variants = _variants(tmp_path)
    d, m = variants["LPS"]
    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(d, m), str(path))
    arr, vox2ras = sitk_to_array(sitk.ReadImage(str(path)))
    np.testing.assert_allclose(vox2ras, m, atol=1e-5)
    np.testing.assert_allclose(arr, d)


def test_sform_preferred_over_qform(tmp_path):
    img = nib.Nifti1Image(np.random.default_rng(1).random((4, 5, 6)).astype(np.float32), np.eye(4))
    s = np.diag([2.0, 2.0, 2.0, 1.0])
    img.set_sform(s, 2)
    img.set_qform(np.eye(4), 1)
    nib.save(img, str(tmp_path / "a.nii.gz"))
    np.testing.assert_allclose(load_volume(tmp_path / "a.nii.gz").vox2ras, s)


def test_4d_reduction(tmp_path):
    rng = np.random.default_rng(2)
    d = rng.random((5, 6, 7, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(d, np.eye(4)), str(tmp_path / "bold.nii.gz"))
    p = tmp_path / "bold.nii.gz"
    np.testing.assert_allclose(load_volume(p).data, d.mean(3), rtol=1e-6)
    assert "mean of 4" in load_volume(p).note
    np.testing.assert_allclose(load_volume(p, volume="median").data, np.median(d, 3), rtol=1e-6)
    np.testing.assert_allclose(load_volume(p, volume=2).data, d[..., 2])
    with pytest.raises(InputError, match="4 volumes"):
        load_volume(p, volume=9)


@pytest.mark.parametrize("case", ["missing", "text", "2d", "nan", "singular", "constant", "empty"])
def test_bad_inputs_raise_input_error_naming_file(tmp_path, case):
    p = tmp_path / "bad.nii.gz"
    if case == "text":
        p.write_text("hello, not an image")
    elif case == "2d":
        nib.save(nib.Nifti1Image(np.ones((5, 5), np.float32), np.eye(4)), str(p))
    elif case == "nan":
        nib.save(nib.Nifti1Image(np.full((5, 5, 5), np.nan, np.float32), np.eye(4)), str(p))
    elif case == "singular":
        hdr = nib.Nifti1Header()
        hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]
        hdr["sform_code"], hdr["qform_code"] = 2, 0
        nib.save(nib.Nifti1Image(np.random.rand(5, 5, 5).astype(np.float32), None, header=hdr), str(p))
    elif case == "constant":
        nib.save(nib.Nifti1Image(np.ones((5, 5, 5), np.float32), np.eye(4)), str(p))
    elif case == "empty":
        p.write_bytes(b"")
    with pytest.raises(InputError) as info:
        load_volume(p)
    assert str(p) in str(info.value)


def test_save_keeps_fixed_header_and_is_atomic(tmp_path):
    img = nib.Nifti1Image(np.random.rand(6, 7, 8).astype(np.float32), _oblique_vox2ras())
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(_oblique_vox2ras(), 4)
    nib.save(img, str(tmp_path / "fixed.nii.gz"))
    fixed = load_volume(tmp_path / "fixed.nii.gz")
    out = tmp_path / "out.nii.gz"
    save_volume(fixed.with_data(fixed.data * 2), out, like=fixed)
    back = nib.load(str(out))
    assert int(back.header["sform_code"]) == 4
    assert back.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(back.affine, _oblique_vox2ras(), atol=1e-5)
    np.testing.assert_allclose(back.get_fdata(), fixed.data * 2, rtol=1e-6)
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".")] == []


def test_dicom_series_folder_and_nifti2(tmp_path):
    data, v2r, _ = _variants(tmp_path)
    ref = Volume(data, v2r)
    img = array_to_sitk((data * 1000).astype(np.int16), v2r)
    folder = write_dicom_series(img, tmp_path / "dicom", modality="MR")
    vol = load_volume(folder)
    idx = np.stack(np.meshgrid(*[np.arange(0, s, 2) for s in data.shape], indexing="ij"), -1).reshape(-1, 3)
    world = ref.world_coords(idx)
    np.testing.assert_allclose(_ras_at(vol, world), (data * 1000).astype(np.int16)[tuple(idx.T)], atol=1)

    nib.save(nib.Nifti2Image(data, v2r), str(tmp_path / "n2.nii"))
    np.testing.assert_allclose(load_volume(tmp_path / "n2.nii").data, data)
