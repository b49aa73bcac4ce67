"""Issue 14, cost of the global search: the batched pieces it scores its grid with agree with the
one-pose-at-a-time definitions, and the grid scores each rotation once."""

import numpy as np

from regkl.initialize import _distinct_rotations, rotation_grid
from regkl.metrics import BATCH_VALUES, mutual_information, mutual_information_values
from regkl.transforms import get_model


def test_rigid_matrices_of_a_batch_equal_one_by_one():
    model = get_model("rigid")
    rng = np.random.default_rng(14)
    params = np.column_stack([rng.uniform(-np.pi, np.pi, (200, 3)), rng.uniform(-80, 80, (200, 3))])
    centre = np.array([3.0, -17.0, 25.0])
    one_by_one = np.stack([model.matrix(p, centre) for p in params])
    np.testing.assert_allclose(model.matrices(params, centre), one_by_one, rtol=0, atol=1e-12)


def test_batched_mutual_information_equals_the_metric_per_histogram():
    rng = np.random.default_rng(3)
    hists = rng.poisson(2.0, (40, 16, 24)).astype(np.float64)
    hists[0] = 0.0                 # nothing overlapped
    hists[1, :, 5:] = 0.0          # empty moving bins
    hists[2] = 0.0
    hists[2, 3, 7] = 50.0          # a single occupied cell: MI 0
    assert BATCH_VALUES[mutual_information] is mutual_information_values
    expected = [mutual_information(h)[0] for h in hists]
    np.testing.assert_allclose(mutual_information_values(hists), expected, rtol=1e-12, atol=1e-15)


def test_grid_scores_each_rotation_once():
    """At gimbal lock (middle angle +-90 degrees) many Euler triples of the grid are one rotation:
    every pose dropped repeats a kept one, and no two kept ones are the same rotation."""
    model = get_model("rigid")

    def rotations(poses):
        return np.stack([model.matrix(p, np.zeros(3))[:3, :3] for p in poses])

    def angles_deg(a, b):  # (len(a), len(b)) rotation angles between every pair, brute force
        cos = (np.einsum("aij,bij->ab", a, b) - 1.0) / 2.0
        return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))

    for start in (np.zeros(6), np.array([0.2, -0.4, 0.7, 5.0, -3.0, 8.0])):
        poses = [np.concatenate([angles + start[:3], start[3:]]) for angles in rotation_grid(90.0, 22.5)]
        kept = _distinct_rotations(poses)
        assert all(np.array_equal(p[3:], start[3:]) for p in kept)
        kept_rot = rotations(kept)
        between = angles_deg(kept_rot, kept_rot) + np.diag(np.full(len(kept), 360.0))
        assert between.min() > 1e-3
        assert angles_deg(rotations(poses), kept_rot).min(axis=1).max() < 1e-4
    # the start without rotation (the default 'com' start) is where the repeats are
    poses = [np.concatenate([a, np.zeros(3)]) for a in rotation_grid(90.0, 22.5)]
    assert len(_distinct_rotations(poses)) < len(poses)
