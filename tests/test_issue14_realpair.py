"""Issue 14, real-pair self-consistency: the pyramid of a pair must not depend on float32 rounding of
the headers (a rigidly moved copy of an image has voxel sizes ~1e-7 off), or the levels, their random
sample points and the answer change with it (the real b0 -> T2w pair's answer moved 0.8 mm)."""

import numpy as np

from regkl import pyramid
from regkl.volume import Volume


def _rotated_float32(vox2ras, angle_deg):
    a = np.radians(angle_deg)
    rot = np.eye(4)
    rot[:3, :3] = [[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]]
    return (rot @ vox2ras).astype(np.float32).astype(np.float64)  # as a NIfTI sform stores it


def test_levels_ignore_header_rounding():
    rng = np.random.default_rng(0)
    data = rng.random((48, 48, 20), dtype=np.float32)
    moving = Volume(rng.random((16, 16, 13), dtype=np.float32), np.diag([3.0, 3.0, 3.0, 1.0]))
    level_voxels = set()
    for fixed_vox in ([1.0, 1.0, 2.0], [1.0, 1.00000005, 2.0000001]):  # the second: the real T2w's header
        fixed = Volume(data, np.diag(fixed_vox + [1.0]))
        for moved_vox2ras in [moving.vox2ras, np.diag([2.9999999, 2.9999999, 2.9999999, 1.0])] + [
                _rotated_float32(moving.vox2ras, angle) for angle in (3.0, 7.0, 11.0)]:
            spacings = pyramid.default_spacings(fixed, Volume(moving.data, moved_vox2ras), 3)
            assert np.allclose(spacings, [12.0, 6.0, 3.0], rtol=1e-6)
            level_voxels.add(tuple(tuple(np.round(pyramid.downsample(fixed, s).spacing, 3)) for s in spacings))
    assert level_voxels == {((12.0, 12.0, 12.0), (6.0, 6.0, 6.0), (3.0, 3.0, 2.0))}
