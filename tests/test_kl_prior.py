"""The KL-to-prior metric (Chung et al. 2002) against plain MI, on synthetic pairs.

Measured (see the closing note of issue 3): with a prior learned from pairs acquired like the new
one, KL was MORE accurate than MI when the EPI covers only a thin slab of the brain (top 30 %:
median 0.63 vs 1.11 mm), and LESS accurate under a strong bias field or heavy noise; a prior
learned from differently acquired images is worse than MI in every case tried.

The thin-slab advantage came from the synthetic generator: its EPIs had tissue in a shell about a
voxel thick where the brain-only T1 is empty, which misled MI most when the slab leaves little
else, while the prior, learned on pairs with the same shell, absorbed it. With EPI and T1 showing
the same object (and the pyramid resolution fix), the same pairs give MI median 0.38 mm and KL
0.66 mm (generator fix alone: MI 0.44 mm). The test that pinned the advantage is kept as a strict
expected failure until the claim is re-measured or withdrawn.
"""

import numpy as np
import pytest

from regkl.optimize import register
from regkl.probe import learn_prior

from .conftest import MNI, need

SLAB = dict(slab=(0.6, 0.9))


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="MI improved on thin slabs once the synthetic EPI shows the same object as "
                                       "the T1 (median 1.11 -> 0.38 mm); KL with the matched prior: 0.66 mm")
def test_kl_with_matched_prior_beats_mi_on_thin_slab():
    from regkl import synthetic as syn

    need(MNI)
    tpl = syn.load_template(MNI.parent)
    t1 = syn.make_t1(tpl)
    pts = syn.brain_points(tpl, step_vox=3)
    centre = t1.centre_of_mass()
    train = []
    for seed in range(200, 206):
        rng = np.random.default_rng(seed)
        truth = syn.random_rigid(rng, 10, 10, centre)
        train.append((syn.make_epi(tpl, truth, rng, **SLAB), t1, truth))
    prior = learn_prior(train)
    assert prior.shape == (24, 24) and prior.sum() == pytest.approx(1.0)
    err_mi, err_kl = [], []
    for seed in range(300, 306):
        rng = np.random.default_rng(seed)
        truth = syn.random_rigid(rng, 15, 15, centre)
        epi = syn.make_epi(tpl, truth, rng, **SLAB)
        err_mi.append(syn.rms_error(register(epi, t1).fixed2moving, truth, pts))
        err_kl.append(syn.rms_error(register(epi, t1, metric="kl", prior=prior).fixed2moving, truth, pts))
    print("thin slab, MI:", np.round(err_mi, 3).tolist(), "KL:", np.round(err_kl, 3).tolist())
    assert np.median(err_kl) < np.median(err_mi) - 0.2
    assert max(err_kl) < max(err_mi)


def test_kl_needs_a_prior_with_matching_bins(tmp_path):
    from regkl.errors import InputError
    from regkl.metrics import get_metric

    with pytest.raises(InputError, match="learn-prior"):
        get_metric("kl")
    metric = get_metric("kl", prior=np.ones((24, 24)))
    with pytest.raises(InputError):
        metric(np.ones((16, 16)))
