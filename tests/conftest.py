"""Shared fixtures. Reference data live in ../shared/data (or $REGKL_SHARED_DATA)."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("REGKL_SHARED_DATA", REPO.parent / "shared" / "data"))
REAL = SHARED / "real_b0_t2w"
MNI = SHARED / "mni152_2009c"
SAMPLE = REPO / "data"


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data not found: {path} (set REGKL_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def real_pair():
    """(moving b0 EPI, fixed T2w) of the real pair, as Volumes."""
    from regkl.io import load_volume

    need(REAL)
    return load_volume(REAL / "b0_epi.nii.gz"), load_volume(REAL / "T2w.nii.gz")


@pytest.fixture(scope="session")
def real_pair_result(real_pair):
    """``register(moving, fixed)`` of the real pair with default settings (seed 0), computed once
    for every test that compares against it (deterministic: bit-identical on every call)."""
    from regkl.optimize import register

    moving, fixed = real_pair
    return register(moving, fixed)


@pytest.fixture(scope="session")
def real_pair_paths():
    """(moving b0 EPI path, fixed T2w path) of the real pair."""
    need(REAL)
    return REAL / "b0_epi.nii.gz", REAL / "T2w.nii.gz"


@pytest.fixture(scope="session")
def template():
    """The MNI152 2009c template (T1 and tissue maps) for synthetic pairs."""
    from regkl import synthetic

    need(MNI)
    return synthetic.load_template(MNI.parent)


@pytest.fixture(scope="session")
def t1(template):
    """The fixed T1 of synthetic pairs (the template's T1 at 1 mm)."""
    from regkl import synthetic

    return synthetic.make_t1(template)


@pytest.fixture(scope="session")
def brain(template):
    """Brain points (fixed world mm) over which RMS errors are measured."""
    from regkl import synthetic

    return synthetic.brain_points(template, step_vox=3)


def write_dicom_series(img, folder: Path, orientation: str | None = None, modality: str | None = None) -> Path:
    """Write a SimpleITK 3D image as a DICOM series, one file per slice, into ``folder`` (created).

    Each slice gets its position (0020|0032), orientation (0020|0037: ``orientation``, or the
    image's own direction cosines), instance number and one series UID; ``modality`` (0008|0060)
    when given.
    """
    import numpy as np
    import SimpleITK as sitk

    folder.mkdir()
    if orientation is None:
        orientation = "\\".join(map(str, np.asarray(img.GetDirection()).reshape(3, 3)[:, :2].T.ravel()))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        sl.SetMetaData("0020|0032", "\\".join(map(str, img.TransformIndexToPhysicalPoint((0, 0, k)))))
        sl.SetMetaData("0020|0037", orientation)
        sl.SetMetaData("0020|0013", str(k))
        sl.SetMetaData("0020|000e", "1.2.3.4.5")
        if modality:
            sl.SetMetaData("0008|0060", modality)
        writer.SetFileName(str(folder / f"{k:03d}.dcm"))
        writer.Execute(sl)
    return folder
