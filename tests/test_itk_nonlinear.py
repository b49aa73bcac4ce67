"""A non-linear ITK transform in an HDF5 file is refused, even when its warp is zero at every
point a linearity probe would look at (a local warp)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[1] / "data"


def _local_warp_field(sitk):
    """A displacement field that is 0 except for a 6 mm push inside a 20 mm ball at (40, 10, 30) LPS."""
    field = sitk.Image([24, 24, 24], sitk.sitkVectorFloat64, 3)
    field.SetSpacing((10.0, 10.0, 10.0))
    field.SetOrigin((-115.0, -115.0, -115.0))
    arr = np.zeros((24, 24, 24, 3))
    k, j, i = np.meshgrid(*(np.arange(24),) * 3, indexing="ij")
    world = np.stack([i, j, k], axis=-1) * 10.0 - 115.0
    arr[np.linalg.norm(world - [40.0, 10.0, 30.0], axis=-1) < 20.0, 0] = 6.0
    image = sitk.GetImageFromArray(arr, isVector=True)
    image.CopyInformation(field)
    return image


@pytest.mark.parametrize("kind", ["bspline", "composite"])
def test_local_warp_in_h5_is_refused(kind, tmp_path, capfd):
    import SimpleITK as sitk

    from regkl.cli import main

    if kind == "bspline":
        grid = sitk.Image([8, 8, 8], sitk.sitkFloat32)
        grid.SetSpacing((30.0, 30.0, 30.0))
        grid.SetOrigin((-105.0, -105.0, -105.0))
        tx = sitk.BSplineTransformInitializer(grid, [4, 4, 4])
        params = np.zeros(tx.GetNumberOfParameters())
        params[200] = 6.0                                   # one control point, far from the probes
        tx.SetParameters(params.tolist())
    else:
        rigid = sitk.Euler3DTransform()
        rigid.SetTranslation((1.0, 0.0, 0.0))
        tx = sitk.CompositeTransform([rigid, sitk.DisplacementFieldTransform(_local_warp_field(sitk))])
    path = tmp_path / f"{kind}.h5"
    sitk.WriteTransform(tx, str(path))
    with pytest.raises(SystemExit) as exc:
        main(["apply", str(path), str(DATA / "sub-01_bold.nii.gz"), str(DATA / "sub-01_T1w.nii.gz"),
              "-o", str(tmp_path / "out.nii.gz"), "-q"])
    err = capfd.readouterr().err
    assert exc.value.code == 2 and "transform that is not linear" in err, err
    assert not (tmp_path / "out.nii.gz").exists()
