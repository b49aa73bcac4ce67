"""Issue 11: the confidence flag must not depend on the seed on a correct real pair.

The real b0/T2w pair has a flat optimum. Restarts re-optimised on a third of the sample points and
stopped after 10 iterations ended 0.7-2.7 mm apart depending on the seed (seed 6: 2.66 mm, score
0.17, flagged; seed 3: 2.19 mm, flagged); on the registration's own points and settled they agree
to 0.03-0.6 mm over seeds 0-9 (benchmarks/README.md, issue 11).
"""

import pytest


@pytest.mark.parametrize("seed", [3, 6])
def test_correct_real_pair_is_not_flagged_on_the_seeds_that_flagged_it(real_pair, seed):
    from regkl.optimize import register

    moving, fixed = real_pair
    conf = register(moving, fixed, seed=seed, confidence=True).confidence
    assert conf.evidence["restart_mm"] < 1.0, conf.evidence
    assert not conf.suspect, conf.as_dict()
