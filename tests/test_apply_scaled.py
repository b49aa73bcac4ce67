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
