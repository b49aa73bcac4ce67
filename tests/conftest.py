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
def real_pair_paths():
    """(moving b0 EPI path, fixed T2w path) of the real pair."""
    need(REAL)
    return REAL / "b0_epi.nii.gz", REAL / "T2w.nii.gz"
