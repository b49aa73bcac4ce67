"""Images that ITK places elsewhere than regkl (sform/qform disagreeing, pixdim against the sform):
no ITK transform is written, read or applied for them; consistent headers are unaffected, and the
placement check agrees with SimpleITK resampling."""

from __future__ import annotations

import struct

import nibabel as nib
import numpy as np
import pytest

from regkl.itk_placement import ITK_PLACEMENT_TOL_MM, itk_placement_gap

DATA = __import__("pathlib").Path(__file__).resolve().parents[1] / "data"


def _run(args, capfd):
    from regkl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capfd.readouterr().err


@pytest.fixture(scope="module")
def headers(tmp_path_factory):
    """The sample BOLD's first volume under four headers: consistent, sform shifted 10 mm from the
    qform (sform_code 2), a sheared sform over a plain qform, and an sform of 3 mm voxels with pixdim
    2.5 mm and no qform."""
    folder = tmp_path_factory.mktemp("itk_placement")
    src = nib.load(str(DATA / "sub-01_bold.nii.gz"))
    data = np.asarray(src.dataobj)[..., 0].astype(np.float32)
    a = src.affine.copy()
    out = {}
    img = nib.Nifti1Image(data, a)
    nib.save(img, str(folder / "good.nii.gz"))
    out["good"] = folder / "good.nii.gz"

    def over_plain_qform(name, sform, sform_code):  # the plain affine as qform, another sform
        img = nib.Nifti1Image(data, None)
        img.header.set_qform(a, code=1)
        img.header.set_sform(sform, code=sform_code)
        nib.save(img, str(folder / f"{name}.nii.gz"))
        out[name] = folder / f"{name}.nii.gz"

    shifted = a.copy()
    shifted[0, 3] += 10.0
    over_plain_qform("disagree", shifted, 2)
    sheared = a.copy()
    sheared[0, 1] += 0.3
    over_plain_qform("sheared", sheared, 1)
    img = nib.Nifti1Image(data, a)
    img.header.set_qform(None, code=0)
    img.header.set_sform(a, code=1)
    nib.save(img, str(folder / "pixdim.nii"))
    raw = bytearray((folder / "pixdim.nii").read_bytes())
    raw[80:92] = struct.pack("<3f", 2.5, 2.5, 2.5)     # pixdim[1:4] of a little-endian NIfTI-1 header
    (folder / "pixdim.nii").write_bytes(bytes(raw))
    out["pixdim"] = folder / "pixdim.nii"
    return out


def test_gap_matches_what_simpleitk_resampling_does(headers):
    """The gap flags exactly the files that SimpleITK really places elsewhere: resampling the file
    with SimpleITK through the identity onto regkl's reading of its grid gives the data back for the
    consistent header only."""
    import SimpleITK as sitk

    from regkl.io import load_volume
    from regkl.sitk_images import array_to_sitk, sitk_to_array

    for name, expect_far in (("good", False), ("disagree", True), ("sheared", True), ("pixdim", True)):
        vol = load_volume(headers[name])
        gap = itk_placement_gap(headers[name], vol.vox2ras, vol.shape)
        assert (gap > ITK_PLACEMENT_TOL_MM) == expect_far, (name, gap)
        grid = array_to_sitk(vol.data, vol.vox2ras)
        theirs = sitk.Resample(sitk.ReadImage(str(headers[name]), sitk.sitkFloat32), grid,
                               sitk.Transform(), sitk.sitkLinear, 0.0)
        back = sitk_to_array(theirs)[0]
        inside = vol.data > np.percentile(vol.data, 60)
        diff = float(np.abs(back[inside] - vol.data[inside]).mean() / vol.data[inside].mean())
        assert (diff > 0.05) == expect_far, (name, diff)
    vol = load_volume(headers["disagree"])
    assert abs(itk_placement_gap(headers["disagree"], vol.vox2ras, vol.shape) - 10.0) < 1e-3


@pytest.mark.parametrize("name", ["disagree", "sheared", "pixdim"])
def test_no_itk_transform_for_a_header_itk_reads_otherwise(name, headers, tmp_path, capfd):
    moving = str(headers[name])
    fixed = str(DATA / "sub-01_T1w.nii.gz")
    identity = tmp_path / "id.tfm"
    identity.write_text("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
                        "Parameters: 1 0 0 0 1 0 0 0 1 0 0 0\nFixedParameters: 0 0 0\n")
    cases = [["register", moving, fixed, "-o", str(tmp_path / "o.nii.gz"), "--transform-out",
              str(tmp_path / "x.tfm")],
             ["register", fixed, moving, "--transform-out", str(tmp_path / "x.txt")],
             ["apply", str(identity), moving, fixed, "-o", str(tmp_path / "a.nii.gz")]]
    for args in cases:
        code, err = _run(args + ["-q"], capfd)
        last = [ln for ln in err.splitlines() if ln.strip()][-1]
        assert code == 2 and "ITK, ANTs and SimpleITK place this image" in last and moving in last, (args, err)
        assert "fslorient -copysform2qform" in last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["id.tfm"]


def test_realign_refuses_or_skips_its_itk_file_for_such_a_series(headers, tmp_path, capfd):
    src = nib.load(str(DATA / "sub-01_bold.nii.gz"))
    shifted = src.affine.copy()
    shifted[0, 3] += 10.0
    img = nib.Nifti1Image(np.asarray(src.dataobj), None)
    img.header.set_qform(src.affine, code=1)
    img.header.set_sform(shifted, code=2)
    series = tmp_path / "bold.nii.gz"
    nib.save(img, str(series))
    code, err = _run(["realign", str(series), "--prefix", str(tmp_path / "r"), "--xfm", str(tmp_path / "x.txt"),
                      "-q"], capfd)
    assert code == 2 and "per-volume ITK transforms" in err, err      # asked for: refused, nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bold.nii.gz"]
    code, err = _run(["realign", str(series), "--prefix", str(tmp_path / "r"), "-q"], capfd)
    assert code == 0 and "not writing" in err and "r_hmc_xfm.txt" in err, err   # the default name: skipped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bold.nii.gz", "r_boldref.nii.gz", "r_motion.tsv"]


def test_realign_reference_image_is_checked_too(headers, tmp_path, capfd):
    """A consistent series with a --reference image that ITK places 10 mm away: no ITK file."""
    src = nib.load(str(DATA / "sub-01_bold.nii.gz"))
    series = tmp_path / "bold.nii.gz"
    nib.save(src, str(series))
    code, err = _run(["realign", str(series), "--reference", str(headers["disagree"]), "--prefix",
                      str(tmp_path / "r"), "--xfm", str(tmp_path / "x.txt"), "-q"], capfd)
    assert code == 2 and "per-volume ITK transforms" in err and str(headers["disagree"]) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bold.nii.gz"]
