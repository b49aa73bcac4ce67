"""An image with signal in a few hundred voxels gets a warning before registration (it ended
111 mm off, silently); the sample images do not."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[1] / "data"


def test_sparse_signal_warns_and_real_images_do_not():
    from regkl.io import load_volume
    from regkl.masks import sparse_signal_warning

    bold = load_volume(DATA / "sub-01_bold.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparse_signal_warning(bold, "moving")
        sparse_signal_warning(load_volume(DATA / "sub-01_T1w.nii.gz"), "fixed")
    keep = bold.data >= np.sort(bold.data, axis=None)[-600]
    sparse = bold.with_data(np.where(keep, bold.data, 0.0).astype(np.float32))
    with pytest.warns(UserWarning, match=r"signal in only 600 of its \d+ voxels"):
        sparse_signal_warning(sparse, "moving")
