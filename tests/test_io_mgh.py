"""FreeSurfer .mgz/.mgh images are read (through nibabel) with the geometry nibabel gives them;
a damaged one is refused in one line."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[1] / "data"


def test_mgz_reads_like_the_nifti_it_was_made_from(tmp_path, capfd):
    from regkl.cli import main
    from regkl.errors import InputError
    from regkl.io import load_series, load_volume

    src = nib.load(str(DATA / "sub-01_bold.nii.gz"))
    data = np.asarray(src.dataobj, dtype=np.float32)
    mgz = tmp_path / "bold.mgz"
    nib.save(nib.MGHImage(data, src.affine), str(mgz))
    mean = load_volume(mgz)
    np.testing.assert_allclose(mean.vox2ras, src.affine, atol=1e-4)
    np.testing.assert_allclose(mean.data, data.mean(axis=-1), rtol=1e-5, atol=1e-3)
    volumes, _ = load_series(mgz)
    assert len(volumes) == 4 and np.array_equal(volumes[2].data, data[..., 2])
    damaged = tmp_path / "cut.mgz"
    damaged.write_bytes(mgz.read_bytes()[:300])
    with pytest.raises(InputError, match="cut.mgz"):
        load_volume(damaged)
    with pytest.raises(SystemExit) as exc:
        main(["realign", str(mgz), "--prefix", str(tmp_path / "r"), "-q", "--threads", "1"])
    assert exc.value.code == 0, capfd.readouterr().err
    assert (tmp_path / "r_motion.tsv").read_text().count("\n") == 5
