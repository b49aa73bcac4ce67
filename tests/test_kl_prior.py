"""The KL-to-prior metric (Chung et al. 2002) against plain MI, on synthetic pairs.

Measured (see the closing note of issue 3): with a prior learned from pairs acquired like the new
one, KL was MORE accurate than MI when the EPI covers only a thin slab of the brain (top 30 %:
median 0.63 vs 1.11 mm), and LESS accurate under a strong bias field or heavy noise; a prior
learned from differently acquired images is worse than MI in every case tried.

The thin-slab advantage came from the synthetic generator: its EPIs had tissue in a shell about a
voxel thick where the brain-only T1 is empty, which misled MI most when the slab leaves little
else, while the prior, learned on pairs with the same shell, absorbed it. With EPI and T1 showing
the same object (and the pyramid resolution fix), the same pairs give MI median 0.38 mm and KL
0.66 mm (generator fix alone: MI 0.44 mm). The claim is withdrawn; `benchmarks/bench_kl_slab.py`
re-measures it on the seeds the suite used to pin it (it was a strict expected failure here, 30-47 s
of CPU that checked no behaviour).
"""

import numpy as np
import pytest


def test_kl_needs_a_prior_with_matching_bins(tmp_path):
    from regkl.errors import InputError
    from regkl.metrics import get_metric

    with pytest.raises(InputError, match="learn-prior"):
        get_metric("kl")
    metric = get_metric("kl", prior=np.ones((24, 24)))
    with pytest.raises(InputError):
        metric(np.ones((16, 16)))
