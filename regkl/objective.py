"""The optimiser of one pyramid level: the negative metric and its gradient in scaled units
(:class:`_Objective`), L-BFGS-B with a settled-pose stop (:func:`_lbfgs`).

Shared by :func:`regkl.optimize.register`, :mod:`regkl.initialize`, :mod:`regkl.confidence` and
:mod:`regkl.realign`.
"""

from __future__ import annotations

import time

import numpy as np
from scipy import optimize as sopt

from . import histogram
from .errors import RegistrationError
from .metrics import BATCH_VALUES
from .transforms import rms_displacement


#: Minimum fraction of sample points that must land inside the moving image.
MIN_OVERLAP = 0.05
#: Metric value reported where the images do not overlap enough: below any metric's real range
#: (MI, NMI, CR, JSD are >= 0; -KL to a floored prior is > -50), so the optimiser backs off.
NO_OVERLAP_VALUE = -1.0e3
#: A level ends once two successive optimiser iterations each move the sample points by less than
#: this fraction of the level's spacing (RMS): 0.006 mm at 3 mm, far below any accuracy that matters.
STEP_TOL = 0.002
#: ... for this many successive iterations.
STEP_PATIENCE = 2


class _Objective:
    """Negative metric and gradient in scaled optimiser units, for one level.

    ``deadline`` (a time.perf_counter() value) makes every evaluation after it raise
    :class:`RegistrationError`, so no registration can run forever.
    """

    def __init__(self, samples, moving_level, model, metric_fn, centre, scales, deadline=None, tol_mm=0.0,
                 min_valid=None):
        self.samples = samples
        self.tol_mm = float(tol_mm)
        self.moving = moving_level
        self.model = model
        self.metric_fn = metric_fn
        self.centre = centre
        self.scales = scales
        self.deadline = deadline
        self.evaluations = 0
        self.min_valid = max(64, int(MIN_OVERLAP * samples.points.shape[0])) if min_valid is None else int(min_valid)
        self._last = None  # (params, metric_at's result) of the last pose scored

    def metric_at(self, params):
        """(value, evaluation, dtable or None where too few points overlap) at ``params``.

        The last pose's result is kept: L-BFGS-B's first evaluation repeats the pose its caller
        has just scored (the start of every level and refinement), up to the rounding of
        ``params / scales * scales``, and is not recomputed.
        """
        self._check_deadline()
        last = self._last
        if last is not None and np.allclose(params, last[0], rtol=1e-13, atol=1e-13):
            return last[1]
        ev = histogram.joint_histogram(self.samples, self.moving, self.model.matrix(params, self.centre))
        if ev.n_valid < self.min_valid:
            out = NO_OVERLAP_VALUE, ev, None
        else:
            value, dtable = self.metric_fn(ev.hist)
            out = value, ev, dtable
        self._last = (np.array(params, dtype=np.float64), out)
        return out

    def metrics_at(self, params_list):
        """Metric values at many poses (one batched kernel call); NO_OVERLAP_VALUE where too few
        points overlap. The same values as :meth:`metric_at`, one by one (to rounding where the metric
        has a batched form, :data:`regkl.metrics.BATCH_VALUES`)."""
        self._check_deadline()
        if self.model.matrices is not None:
            mats = self.model.matrices(np.asarray(params_list), self.centre)
        else:
            mats = np.stack([self.model.matrix(p, self.centre) for p in params_list])
        hists, n_valid = histogram.joint_histograms(self.samples, self.moving, mats)
        batch = BATCH_VALUES.get(self.metric_fn)
        values = batch(hists) if batch is not None else [self.metric_fn(h)[0] for h in hists]
        return [NO_OVERLAP_VALUE if nv < self.min_valid else float(v) for v, nv in zip(values, n_valid)]

    def _check_deadline(self):
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise RegistrationError("time limit reached (--max-seconds); raise --max-seconds to give it more time "
                                    "(the images may be very large or the problem ill-posed)")

    def __call__(self, q):
        self.evaluations += 1
        params = q * self.scales
        if not np.all(np.isfinite(params)):
            raise RegistrationError("optimiser produced non-finite parameters")
        value, ev, dtable = self.metric_at(params)
        if dtable is None:
            return -value, np.zeros_like(q)
        gmat = histogram.matrix_gradient(self.samples, self.moving, ev, dtable)
        dmat = self.model.dmatrix(params, self.centre)
        grad_p = dmat.reshape(len(dmat), 12) @ gmat.ravel()
        return -value, -grad_p * self.scales

    def with_model(self, model, scales):
        """The same level's data for another transform model."""
        return _Objective(self.samples, self.moving, model, self.metric_fn, self.centre, scales, self.deadline,
                          self.tol_mm, self.min_valid)


class _StepMonitor:
    """L-BFGS-B callback that stops once the pose has settled (see :data:`STEP_TOL`).

    Raises StopIteration (SciPy's documented way to end a minimisation early) after two
    successive iterations that each move the sample points by less than ``obj.tol_mm`` (RMS).
    Afterwards ``settled`` says whether it did, and ``last_step_mm`` is the RMS displacement of
    the last iteration (None before a second iteration).
    """

    def __init__(self, obj):
        self.obj = obj
        pts = obj.samples.points
        self.points = pts[:: max(1, len(pts) // 2000)]
        self.matrix = None
        self.small = 0
        self.last_step_mm = None
        self.settled = False

    def __call__(self, intermediate_result):
        obj = self.obj
        m = obj.model.matrix(intermediate_result.x * obj.scales, obj.centre)
        if self.matrix is not None:
            self.last_step_mm = rms_displacement(m, self.matrix, self.points)
            self.small = self.small + 1 if self.last_step_mm < obj.tol_mm else 0
            if self.small >= STEP_PATIENCE:
                self.settled = True
                raise StopIteration
        self.matrix = m


def _lbfgs(obj, params, max_iter):
    """Run L-BFGS-B from ``params``; returns (params, value, scipy result). Never returns worse.

    The result also carries ``settled`` and ``last_step_mm`` from the step monitor (False / None
    when ``obj.tol_mm`` is 0 and no monitor runs).
    """
    start_value = obj.metric_at(params)[0]
    monitor = _StepMonitor(obj) if obj.tol_mm > 0 else None
    res = sopt.minimize(obj, params / obj.scales, jac=True, method="L-BFGS-B", callback=monitor,
                        options={"maxiter": max_iter, "maxfun": 4 * max_iter + 20, "ftol": 1e-9, "gtol": 1e-6,
                                 "maxcor": 10})
    res.settled = monitor is not None and monitor.settled
    res.last_step_mm = None if monitor is None else monitor.last_step_mm
    if not np.all(np.isfinite(res.x)):
        raise RegistrationError("optimiser diverged (non-finite parameters)")
    value = -float(res.fun)
    if value < start_value:
        return params, start_value, res
    return res.x * obj.scales, value, res


def _stop_reason(res, obj):
    """Why L-BFGS-B ended, in words."""
    if res.settled:
        return f"pose settled (two steps under {obj.tol_mm:.3g} mm)"
    return str(res.message)


def _refine(obj, params, max_iter):
    """Local L-BFGS-B refinement used by the global search: (params, value)."""
    q, v, _ = _lbfgs(obj, params, max_iter)
    return q, v
