"""Confidence in a registration from evidence that needs no ground truth.

Six pieces of evidence, computed after the registration at its finest level: the restarts on
the registration's own sample points, the mirror check and the uncertainty on every ``THIN``-th
(sharpness: ``SHARPNESS_THIN``-th) point (cheaper; the thresholds allow for the extra sampling
noise). The re-optimisations are independent and run concurrently in threads
(:func:`default_workers`).

``drift_mm``
    How far the solution still moves when optimised further on the registration's own points:
    RMS displacement (mm, over the fixed sample points). A converged registration stays put; an
    unfinished one moves. When the registration's finest level ended because the pose settled,
    its last iteration's displacement is the drift; otherwise (iteration or time limit, or a
    non-rigid final stage) the solution is re-optimised for a few iterations.
``restart_mm``
    Agreement of restarts: the solution perturbed by a few fixed poses (4 degrees, 4 mm) and
    re-optimised until settled (at most ``RESTART_ITERATIONS``) on the registration's own
    finest-level points; the largest RMS displacement between a perturbed restart and the
    unperturbed one. In a clear basin they agree; near a local optimum or on a ridge they do not.
    (On every 3rd point and stopped after 10 iterations, the restarts of the correct but flat
    real b0/T2w pair ended 0.7-2.7 mm apart depending on the seed, a false alarm in 4 of 10
    seeds; settled on every 3rd point, still 0.3-2.6 mm, in sampling-noise optima of the subset;
    settled on the registration's own points, 0.03-0.6 mm: benchmarks/README.md, issue 11.)
``sharpness``
    Relative drop of the metric 3 mm (translations) and 3 degrees (rotations) away from the
    solution, averaged over the 12 directions. A flat optimum means the images barely constrain
    the pose.
``uncertainty``
    Mutual information divided by the smaller marginal entropy of the joint histogram at the
    solution (0: independent, 1: one image predicts the other), a scale-free measure of how much the
    images explain each other.
``mirror_gain``
    Left-right flip check (in the spirit of AFNI's ``align_epi_anat.py -check_flip``): the moving
    image is mirrored about the solution's mid-sagittal plane (the plane through the fixed image's
    centre whose normal is the fixed image's left-right axis, carried into the moving world by the
    solution), re-optimised, and its metric compared with the unmirrored one: relative gain.
    A correct registration of a real (asymmetric) brain loses by mirroring; a moving image whose
    header flips left and right gains. A perfectly symmetric brain cannot tell (gain about 0).

``metric_gain``
    Relative change of the metric from the registration's start to its end, on the same (finest)
    points. A registration that ends lower than it started left a pose its own metric prefers:
    any loss beyond 0.1 % flags it.

Each is mapped to [0, 1] (1 = good) against thresholds and the score is their minimum; the
registration is flagged suspect when the score is below 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .transforms import get_model, rms_displacement

#: (name, bad value, good value): evidence is scored linearly between them. ``restart_mm``: the
#: settled restarts of 90 correct registrations (20 synthetic and 20 perturbed real pairs of the
#: confidence benchmark, its 10 same-subject pairs, 4 pairs x 10 seeds) agreed to 0.62 mm at most;
#: flagged above 1.375 mm (benchmarks/README.md, issue 11).
THRESHOLDS = {
    "drift_mm": (2.0, 0.5),
    "restart_mm": (2.0, 0.75),
    "sharpness": (0.005, 0.03),
    "uncertainty": (0.08, 0.2),
    "mirror_gain": (0.03, 0.01),
    "metric_gain": (-0.001, 0.0),
}
SUSPECT_BELOW = 0.5
#: The mirror check uses every THIN-th sample point of the finest level...
THIN = 3
#: ... and the sharpness probe every SHARPNESS_THIN-th (a mean of 12 metric drops is less noisy
#: than an optimum: on the confidence benchmark's 80 cases it differs from every 3rd point's by < 12 %).
SHARPNESS_THIN = 6
#: Optimiser iterations of each re-optimisation on the thinned points (solution, mirrored solution)
#: at most...
ITERATIONS = 10
#: ... and of the restarts and their unperturbed reference, on the registration's own points (a
#: restart 4 degrees / 4 mm away along a flat valley needs 10-20 iterations to settle).
RESTART_ITERATIONS = 20
#: ... and of the drift check, on the registration's own finest-level points (on thinned points the
#: optimum itself moves by sampling noise: 0.3-0.7 mm on the flat real b0/T2w pair).
DRIFT_ITERATIONS = 5
#: ... and they stop once two successive iterations move the points less than this (mm): the
#: evidence is judged at the 0.5-3 mm scale, so settling to a few microns would be wasted time.
SETTLE_MM = 0.05


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
    """Fixed rigid offsets (parameter deltas): 4 degrees about one axis and 4 mm along another."""
    a = np.deg2rad(4.0)
    out = []
    for rot, trans in (((a, 0, 0), (0, 4, 0)), ((0, -a, 0), (0, 0, -4)), ((0, 0, a), (4, 0, 0))):
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


class _Mirrored:
    """A transform model seen through a fixed reflection ``g`` (4x4) of the moving world: g @ M(p)."""

    def __init__(self, model, g):
        self.model, self.g, self.name = model, g, model.name

    def matrix(self, params, centre):
        return self.g @ self.model.matrix(params, centre)

    def dmatrix(self, params, centre):
        return np.einsum("ij,pjk->pik", self.g[:3, :3], self.model.dmatrix(params, centre))


def mid_sagittal_reflection(solution, centre):
    """(4, 4) reflection of the moving world about the solution's mid-sagittal plane.

    The plane goes through ``solution @ centre`` with normal ``solution``'s image of the fixed
    left-right axis (RAS x), i.e. the left-right mirror of the moving image as registered.
    """
    normal = solution[:3, :3] @ np.array([1.0, 0.0, 0.0])
    normal /= np.linalg.norm(normal)
    point = solution[:3, :3] @ centre + solution[:3, 3]
    g = np.eye(4)
    g[:3, :3] -= 2.0 * np.outer(normal, normal)
    g[:3, 3] = 2.0 * normal * float(normal @ point)
    return g


def _thinned(objective, step=3):
    """The same objective on every ``step``-th sample point (all of them for step 1), settling at
    :data:`SETTLE_MM`."""
    from .histogram import Samples

    smp = objective.samples
    sub = smp if step == 1 else Samples(smp.points[::step].copy(), smp.values[::step].copy(),
                                        smp.bins[::step].copy(), smp.n_bins)
    return type(objective)(sub, objective.moving, objective.model, objective.metric_fn, objective.centre,
                           objective.scales, objective.deadline, max(objective.tol_mm, SETTLE_MM))


def _copy(objective):
    """An independent objective on the same data (own evaluation counter), for a worker thread."""
    return objective.with_model(objective.model, objective.scales)


def _sharpness(probe, params):
    """Relative metric drop 3 mm / 3 degrees away, averaged over the 12 directions (see module doc)."""
    value = probe.metric_at(params)[0]
    drops = []
    for k in range(6):
        for sign in (-1.0, 1.0):
            step = np.zeros(6)
            step[k] = sign * (np.deg2rad(3.0) if k < 3 else 3.0)
            drops.append(value - probe.metric_at(params + step)[0])
    return float(np.mean(drops)) / max(abs(value), 1e-12)


def _run(tasks, workers):
    """Run the zero-argument callables, ``workers`` at a time, each with the serial (GIL-free)
    kernels when ``workers > 1``; results in order. Exceptions propagate."""
    if workers <= 1 or len(tasks) <= 1:
        return [task() for task in tasks]
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    from .histogram import serial_kernels

    def serial(task):
        with serial_kernels():
            return task()

    # The tasks' BLAS calls are tiny (6x6, 3x4); a multi-threaded BLAS called from two threads at
    # once keeps its own threads spinning on the cores the kernels need (measured: the threads then
    # gain nothing over one after the other). One BLAS thread while the pool runs.
    with threadpool_limits(limits=1, user_api="blas"), \
            ThreadPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
        futures = [pool.submit(serial, task) for task in tasks]
        return [f.result() for f in futures]


def default_workers():
    """Threads for the independent re-optimisations: Numba's thread count (``NUMBA_NUM_THREADS``)."""
    import numba

    return max(1, int(numba.get_num_threads()))


def assess(fine, params, centre, refine, *, settled_step_mm=None, workers=None, metric_gain=None) -> Confidence:
    """Evidence and score for a finished registration.

    The re-optimisations (drift, the restarts, the mirrored solution) and the sharpness probe are
    independent, so they run concurrently on ``workers`` threads; each result is the same as in
    a serial run.

    Parameters
    ----------
    fine : regkl.objective._Objective
        Objective of the RIGID model at the finest level.
    params : ndarray (6,)
        Rigid parameters of the solution (for non-rigid models, the closest rigid pose).
    centre : ndarray (3,)
    refine : callable(objective, params, max_iter) -> (params, value)
    settled_step_mm : float, optional
        When the registration's own finest level ended because the pose settled, the RMS
        displacement (mm) of its last iteration: that IS the drift evidence (re-optimising
        further would move it by less), so the drift re-optimisation is skipped.
    workers : int, optional
        Threads (default :func:`default_workers`).
    metric_gain : float, optional
        Relative metric change from the registration's start to its end on the finest points
        (evidence ``metric_gain`` when given).
    """
    import time

    t0 = time.perf_counter()
    model = get_model("rigid")
    points = fine.samples.points
    solution = model.matrix(params, centre)
    own_points = _thinned(fine, 1)
    thin = _thinned(fine, THIN)
    probe = _thinned(fine, SHARPNESS_THIN)

    def drift():
        if settled_step_mm is not None:
            return float(settled_step_mm)
        moved, _ = refine(_copy(fine), params, DRIFT_ITERATIONS)
        return rms_displacement(model.matrix(moved, centre), solution, points)

    def mirror():
        own = _copy(thin)
        hist = own.metric_at(params)[1].hist
        base, value_base = refine(own, params, ITERATIONS)
        mirrored = own.with_model(_Mirrored(model, mid_sagittal_reflection(model.matrix(base, centre), centre)),
                                  own.scales)
        _, value_mirror = refine(mirrored, base, ITERATIONS)
        return (value_mirror - value_base) / max(abs(value_base), 1e-12), _mutual_uncertainty(hist)

    def restart(delta):
        return lambda: model.matrix(refine(_copy(own_points), params + delta, RESTART_ITERATIONS)[0], centre)

    tasks = ([mirror, restart(np.zeros(6))] + [restart(d) for d in _perturbations()]
             + [lambda: _sharpness(probe, params), drift])
    (gain, uncertainty), base_m, *rest = _run(tasks, default_workers() if workers is None else workers)
    restarts, (sharp, drift_mm) = rest[:-2], rest[-2:]
    worst = max(rms_displacement(m, base_m, points) for m in restarts)
    evidence = {"drift_mm": drift_mm, "restart_mm": worst, "sharpness": sharp,
                "uncertainty": uncertainty, "mirror_gain": gain}
    if metric_gain is not None:
        evidence["metric_gain"] = metric_gain
    sub = {name: _subscore(name, value) for name, value in evidence.items()}
    score = min(sub.values())
    return Confidence(score, score < SUSPECT_BELOW, evidence, sub, time.perf_counter() - t0)
