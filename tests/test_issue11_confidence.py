"""Issue 11: the confidence flag must not depend on the seed on a correct real pair.

The real b0/T2w pair has a flat optimum. Restarts re-optimised on a third of the sample points and
stopped after 10 iterations ended 0.7-2.7 mm apart depending on the seed (4 of seeds 0-9 flagged;
seed 6: 2.66 mm, score 0.17; seed 3: 2.19 mm, score 0.41); on the registration's own points and
settled they agree to 0.03-0.6 mm over seeds 0-9 (benchmarks/README.md, issue 11).
"""

import pytest


@pytest.mark.parametrize("seed", [3, 6])
def test_correct_real_pair_is_not_flagged_on_the_seeds_that_flagged_it(real_pair, seed):
    from regkl.optimize import register

    moving, fixed = real_pair
    conf = register(moving, fixed, seed=seed, confidence=True).confidence
    assert conf.evidence["restart_mm"] < 1.0, conf.evidence
    assert not conf.suspect, conf.as_dict()


def test_a_start_beyond_the_capture_range_that_ends_wrong_is_flagged(template, t1, brain):
    """A start beyond the capture range (search off, rotated 156 degrees) ends ~105 mm from the truth
    and is flagged (score 0.33). The confidence benchmark's first such start (seed 200), which ended
    ~54 mm off with restarts 1.8 mm apart and scored 0.59 with the old restart threshold (3.0, 1.0
    mm), now registers correctly (0.27 mm) since the points are visited in the moving image's order:
    so this test takes the next start of the same generator."""
    import numpy as np

    from regkl import synthetic
    from regkl.optimize import register
    from regkl.transforms import rms_displacement

    rng = np.random.default_rng(201)
    c = t1.centre_of_mass()
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(120, 180))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    truth = np.eye(4)
    truth[:3, :3] = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    truth[:3, 3] = c - truth[:3, :3] @ c + rng.uniform(-10, 10, 3)
    res = register(synthetic.make_epi(template, truth, rng), t1, search="none", confidence=True)
    assert rms_displacement(res.fixed2moving, truth, brain) > 10.0  # it did end wrong
    assert res.confidence.suspect, res.confidence.as_dict()
