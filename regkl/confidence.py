"""Confidence in a registration from evidence that needs no ground truth.

Three pieces of evidence, computed after the registration from its own pyramid levels:

``restart_mm``
    Agreement of restarts: the solution itself and the solution perturbed by a few fixed poses
    (6 degrees, 6 mm) are re-optimised at the second-finest level; the largest RMS displacement
    (mm, over the fixed sample points) between where they end and the solution. A registration
    in a clear, wide basin comes back to itself; one stuck in a local optimum, or not converged,
    drifts away.
``sharpness``
    Relative drop of the metric 3 mm (translations) and 3 degrees (rotations) away from the
    solution, averaged over the 12 directions, at the finest level. A flat optimum means the images
    barely constrain the pose.
``uncertainty``
    Mutual information divided by the smaller marginal entropy of the final joint histogram
    (0: independent, 1: one image predicts the other), a scale-free measure of how much the
    images explain each other.

Each is mapped to [0, 1] (1 = good) against thresholds and the score is their minimum; the
registration is flagged suspect when the score is below 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .transforms import get_model, rms_displacement

#: (name, bad value, good value): evidence is scored linearly between them.
THRESHOLDS = {
    "restart_mm": (3.0, 1.0),
    "sharpness": (0.005, 0.03),
    "uncertainty": (0.08, 0.2),
}
SUSPECT_BELOW = 0.5


@dataclass(frozen=True)
class Confidence:
    """Confidence of a registration: ``score`` in [0, 1], ``suspect`` flag and the evidence."""

    score: float
    suspect: bool
    evidence: dict
    subscores: dict
    seconds: float

    def as_dict(self):
        return {"score": round(self.score, 4), "suspect": self.suspect,
                "evidence": {k: round(float(v), 5) for k, v in self.evidence.items()},
                "subscores": {k: round(float(v), 4) for k, v in self.subscores.items()},
                "seconds": round(self.seconds, 4)}


def _subscore(name, value):
    """Linear in [0, 1] from the bad to the good threshold (either may be the larger)."""
    bad, good = THRESHOLDS[name]
    return float(np.clip((value - bad) / (good - bad), 0.0, 1.0))


def _perturbations():
    """Fixed rigid offsets (parameter deltas): +-6 degrees about two axes, +-6 mm along two others."""
    a = np.deg2rad(6.0)
    out = []
    for rot, trans in (((a, 0, 0), (0, 6, 0)), ((0, -a, 0), (0, 0, -6)), ((0, 0, a), (6, 0, 0))):
        out.append(np.concatenate([rot, trans]))
    return out


def _mutual_uncertainty(hist):
    p = hist / max(hist.sum(), 1e-300)
    pf, pm = p.sum(1), p.sum(0)

    def h(x):
        x = x[x > 0]
        return float(-(x * np.log(x)).sum())

    mi = h(pf) + h(pm) - h(p.ravel())
    return mi / max(min(h(pf), h(pm)), 1e-12)


def assess(fine, mid, params, centre, refine, *, rigid_params=None) -> Confidence:
    """Evidence and score for a finished registration.

    Parameters
    ----------
    fine, mid : regkl.optimize._Objective
        Objectives of the RIGID model at the finest and second-finest levels.
    params : ndarray (6,)
        Rigid parameters of the solution (for non-rigid models, the closest rigid pose).
    centre : ndarray (3,)
    refine : callable(objective, params, max_iter) -> (params, value)
    """
    import time

    t0 = time.perf_counter()
    model = get_model("rigid")
    points = mid.samples.points
    solution = model.matrix(params, centre)
    worst = 0.0
    for delta in [np.zeros(6)] + _perturbations():
        q, _ = refine(mid, params + delta, 12)
        worst = max(worst, rms_displacement(model.matrix(q, centre), solution, points))
    value0 = fine.metric_at(params)[0]
    drops = []
    for k in range(6):
        for sign in (-1.0, 1.0):
            step = np.zeros(6)
            step[k] = sign * (np.deg2rad(3.0) if k < 3 else 3.0)
            drops.append(value0 - fine.metric_at(params + step)[0])
    sharp = float(np.mean(drops)) / max(abs(value0), 1e-12)
    ev = fine.metric_at(params)[1]
    evidence = {"restart_mm": worst, "sharpness": sharp, "uncertainty": _mutual_uncertainty(ev.hist)}
    sub = {name: _subscore(name, value) for name, value in evidence.items()}
    score = min(sub.values())
    return Confidence(score, score < SUSPECT_BELOW, evidence, sub, time.perf_counter() - t0)
