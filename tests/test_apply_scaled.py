"""`apply --interp nearest` keeps the values of an image whose header scales its stored integers."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest


@pytest.mark.parametrize("slope,inter,dtype", [(0.25, 10.0, np.float32), (1.0, 0.0, np.int16)])
def test_nearest_keeps_scaled_values(slope, inter, dtype, tmp_path, capfd):
    from regkl.cli import main

    raw = ((np.arange(20 * 20 * 10) % 7).reshape(20, 20, 10) * 3 + 1).astype(np.int16)
    img = nib.Nifti1Image(raw, np.diag([2.0, 2.0, 2.0, 1.0]))
    img.set_data_dtype(np.int16)
    img.header.set_slope_inter(slope, inter)
    src = tmp_path / "labels.nii.gz"
    nib.save(img, str(src))
    identity = tmp_path / "id.txt"
    identity.write_text("# regkl transform: 4x4 matrix, RAS+ millimetres\n1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    out = tmp_path / "out.nii.gz"
    with pytest.raises(SystemExit) as exc:
        main(["apply", str(identity), str(src), str(src), "-o", str(out), "--interp", "nearest", "-q"])
    assert exc.value.code == 0, capfd.readouterr().err
    got = nib.load(str(out))
    np.testing.assert_array_equal(got.get_fdata(), raw * slope + inter)
    assert got.get_data_dtype() == np.dtype(dtype)


@pytest.mark.parametrize("dtype,big", [(np.int32, 1387860160), (np.int64, 2**40 + 1), (np.float64, 0.1)])
def test_nearest_refuses_values_float32_cannot_hold(dtype, big, tmp_path, capfd):
    """A label map whose values float32 cannot hold (int32 labels beyond 2**24, float64 detail) is
    refused, with no output, instead of coming out changed (attacker finding: 1387860160 became
    1387860224 in 4884 of 5049 voxels); the same map with small labels is kept exactly."""
    from regkl.cli import main

    identity = tmp_path / "id.txt"
    identity.write_text("# regkl transform: 4x4 matrix, RAS+ millimetres\n1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    small = ((np.arange(12 * 11 * 10) % 5).reshape(12, 11, 10)).astype(dtype)
    for name, data, refused in (("wide", small + np.asarray(big, dtype=dtype), True), ("small", small, False)):
        src = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]), dtype=dtype), str(src))
        out = tmp_path / f"{name}_out.nii.gz"
        with pytest.raises(SystemExit) as exc:
            main(["apply", str(identity), str(src), str(src), "-o", str(out), "--interp", "nearest", "-q"])
        err = capfd.readouterr().err
        if refused:
            assert exc.value.code == 2 and "cannot carry exactly" in err and not out.exists(), err
        else:
            assert exc.value.code == 0, err
            np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), data)
