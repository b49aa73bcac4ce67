"""register(moving, fixed, ...) -> Result: initialisation, pyramid levels, optimiser, stopping."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import optimize as sopt

from . import histogram, masks, pyramid
from .errors import InputError, RegistrationError
from .initialize import SEARCH_MODES, SearchReport, global_search, initial_transform  # noqa: F401
from .metrics import NATIVE_FIXED_METRICS, get_metric
from .transforms import get_model, rms_displacement
from .volume import Volume

#: Default cap on the fixed sample points of one level (``max_points``): the error of a rigid fit
#: stops improving well below it (error against the cap in benchmarks/README.md, "Speed").
MAX_POINTS = 150_000
#: Centres of mass (rotation centre, ``init='com'``) come from the finest level with at most this
#: many voxels in each image.
COM_MAX_VOXELS = 2 ** 21
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
#: The same for the global search's refinements, which only have to tell basins apart.
SEARCH_STEP_TOL = 0.01
#: Most sample points the global search scores its poses with at the coarsest level and at the
#: finer check (every k-th point of the level: still spread over the whole image). A 3 mm EPI's
#: levels have fewer (12 mm: ~2 000, 6 mm: ~19 000); a 1 mm pair's 8 mm and 4 mm levels have
#: 8 000 and 67 000, which made its search twice as slow for no better start.
SEARCH_MAX_POINTS = (4000, 20000)


@dataclass(frozen=True)
class LevelReport:
    """What happened at one pyramid level of one stage."""

    stage: str
    spacing_mm: float
    n_points: int
    iterations: int
    evaluations: int
    metric_start: float
    metric_end: float
    stop_reason: str
    seconds: float
    #: RMS displacement (mm, over the level's sample points) of the optimiser's last iteration.
    last_step_mm: float | None = None
    #: Whether the level ended because the pose settled (two iterations under the step tolerance).
    settled: bool = False


@dataclass(frozen=True)
class Result:
    """Outcome of a registration.

    Attributes
    ----------
    fixed2moving : ndarray (4, 4)
        RAS+ mm fixed world -> moving world (the pull direction used to resample).
    init_fixed2moving : ndarray (4, 4)
        The starting transform.
    model : str
        Final model; ``stages`` lists every model run, in order.
    params : ndarray (P,)
        Parameters of the final model about ``centre``.
    centre : ndarray (3,)
        Centre of rotation (fixed world mm).
    metric : str
    metric_before, metric_after : float
        Metric at the finest level at the start and at the end (higher is better).
    levels : tuple of LevelReport
    search : SearchReport or None
    seconds : float
    init : str
    """

    fixed2moving: np.ndarray
    init_fixed2moving: np.ndarray
    model: str
    params: np.ndarray
    centre: np.ndarray
    metric: str
    metric_before: float
    metric_after: float
    levels: tuple
    seconds: float
    init: str
    stages: tuple = ()
    search: SearchReport | None = None
    confidence: object = None
    settings: dict = field(default_factory=dict)


class _Objective:
    """Negative metric and gradient in scaled optimiser units, for one level.

    ``deadline`` (a time.perf_counter() value) makes every evaluation after it raise
    :class:`RegistrationError`, so no registration can run forever.
    """

    def __init__(self, samples, moving_level, model, metric_fn, centre, scales, deadline=None, tol_mm=0.0):
        self.samples = samples
        self.tol_mm = float(tol_mm)
        self.moving = moving_level
        self.model = model
        self.metric_fn = metric_fn
        self.centre = centre
        self.scales = scales
        self.deadline = deadline
        self.evaluations = 0
        self.min_valid = max(64, int(MIN_OVERLAP * samples.points.shape[0]))

    def metric_at(self, params):
        self._check_deadline()
        ev = histogram.joint_histogram(self.samples, self.moving, self.model.matrix(params, self.centre))
        if ev.n_valid < self.min_valid:
            return NO_OVERLAP_VALUE, ev, None
        value, dtable = self.metric_fn(ev.hist)
        return value, ev, dtable

    def metrics_at(self, params_list):
        """Metric values at many poses (one batched kernel call); NO_OVERLAP_VALUE where too few
        points overlap. The same values as :meth:`metric_at`, one by one."""
        self._check_deadline()
        mats = np.stack([self.model.matrix(p, self.centre) for p in params_list])
        hists, n_valid = histogram.joint_histograms(self.samples, self.moving, mats)
        return [NO_OVERLAP_VALUE if nv < self.min_valid else self.metric_fn(h)[0] for h, nv in zip(hists, n_valid)]

    def _check_deadline(self):
        if self.deadline is not None and time.perf_counter() > self.deadline:
            raise RegistrationError("time limit reached (--max-seconds); the images may be very large or the "
                                    "problem ill-posed")

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
                          self.tol_mm)


@dataclass(frozen=True)
class _Level:
    spacing: float
    samples: histogram.Samples
    moving: histogram.MovingLevel
    fixed_image: Volume
    moving_image: Volume


def _build_levels(moving, fixed, spacings, bins, sampling, rng, fixed_mask, moving_mask, native_finest=False,
                  max_points=None):
    """Pyramid levels, coarse to fine. With ``native_finest`` (the metrics in
    :data:`regkl.metrics.NATIVE_FIXED_METRICS`), the finest level's sample points keep their
    positions but take their fixed intensities from ``fixed`` itself, unsmoothed. ``max_points``
    caps the sample points of every level (None: no cap)."""
    levels = []
    for li, spacing in enumerate(spacings):
        flev = pyramid.downsample(fixed, spacing)
        mlev = pyramid.downsample(moving, spacing)
        pts, vals = pyramid.sample_grid(flev, sampling, rng, max_points=max_points)
        if native_finest and li == len(spacings) - 1:
            vals = pyramid.values_at(fixed, pts)
        if fixed_mask is not None:
            keep = masks.values_at(fixed_mask, pts) >= 0.5
            if np.count_nonzero(keep) < 64:
                raise InputError(f"fixed mask keeps only {np.count_nonzero(keep)} sample points at "
                                 f"{spacing:g} mm; it does not overlap the fixed image", path=fixed_mask.name)
            pts, vals = pts[keep], vals[keep]
        mmask = None if moving_mask is None else masks.on_grid(moving_mask, mlev)
        if mmask is not None and not np.any(mmask > 0):
            raise InputError("moving mask does not overlap the moving image", path=moving_mask.name)
        levels.append(_Level(float(spacing), histogram.make_samples(pts, vals, bins),
                             histogram.make_moving_level(mlev, bins, mask=mmask), flev, mlev))
    return levels


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


def register(moving: Volume, fixed: Volume, *, model: str = "rigid", metric: str = "mi", bins: int = 24,
             sampling: float = 0.5, levels: int | None = None, init: str = "com",
             init_fixed2moving: np.ndarray | None = None, search: str = "auto", fixed_mask: Volume | None = None,
             moving_mask: Volume | None = None, auto_mask: bool = False, prior=None, seed: int = 0,
             max_points: int | None = MAX_POINTS, max_iter: int = 100, max_seconds: float | None = 600.0,
             confidence: bool = False, log=None) -> Result:
    """Align ``moving`` to ``fixed`` by maximising a histogram similarity metric.

    Parameters
    ----------
    moving, fixed : Volume
        3D images in RAS+ mm.
    model : str
        Transform model name (see :data:`regkl.transforms.MODELS`); models with ``stages`` run
        those first (``affine``: rigid, then affine), each starting from the last.
    metric : str
        Metric name (see :data:`regkl.metrics.METRICS`).
    bins : int
        Histogram bins per image.
    sampling : float
        Fraction (0, 1] of the fixed grid points used at each level.
    levels : int, optional
        Number of pyramid levels; default from the voxel sizes.
    init : {'com', 'geometry', 'header'}
        Starting transform when ``init_fixed2moving`` is not given.
    init_fixed2moving : ndarray (4, 4), optional
        Explicit starting transform (fixed RAS -> moving RAS).
    search : {'none', 'auto', 'full'}
        Global rotation/translation search at the coarsest level (see
        :func:`regkl.initialize.global_search`); 'auto' keeps the start unless a searched pose is
        clearly better.
    fixed_mask, moving_mask : Volume, optional
        Masks on any grid: only fixed samples inside ``fixed_mask`` count, and only where they map
        inside ``moving_mask``.
    auto_mask : bool
        Build foreground masks from the images where no mask is given.
    prior : ndarray (bins, bins), optional
        Expected joint histogram for ``metric='kl'``.
    seed : int
        Seed of the sample jitter and subsampling; the result is deterministic for a seed.
    max_points : int or None
        Cap on the fixed sample points of each level (None: ``sampling`` alone decides); the work
        per level is then bounded whatever the image size.
    max_iter : int
        Maximum optimiser iterations per level (and 4x as many metric evaluations).
    max_seconds : float or None
        Wall-time limit; past it the registration stops with a RegistrationError.
    confidence : bool
        Also assess the result (:mod:`regkl.confidence`): restarts, sharpness, uncertainty.
    log : callable(str), optional
        Progress messages.

    Returns
    -------
    Result
    """
    t0 = time.perf_counter()
    deadline = None if max_seconds is None else t0 + float(max_seconds)
    say = log or (lambda msg: None)
    if not 0.0 < sampling <= 1.0:
        raise InputError(f"sampling must be in (0, 1], got {sampling}")
    if not 8 <= bins <= 512:
        raise InputError(f"bins must be between 8 and 512, got {bins}")
    if max_points is not None and max_points < 1000:
        raise InputError(f"max_points must be at least 1000, got {max_points}")
    if levels is not None and not 1 <= levels <= 6:
        raise InputError(f"levels must be between 1 and 6, got {levels}")
    if search not in SEARCH_MODES:
        raise InputError(f"unknown search mode {search!r}; choose one of {', '.join(SEARCH_MODES)}")
    final = get_model(model)
    stage_models = [get_model(name) for name in final.stages] + [final]
    metric_fn = get_metric(metric) if prior is None else get_metric(metric, prior=prior)
    spacings = pyramid.default_spacings(fixed, moving, levels)
    rng = np.random.default_rng(seed)

    fixed_mask, moving_mask = masks.prepare_masks(fixed, moving, fixed_mask, moving_mask, auto_mask)
    lvls = _build_levels(moving, fixed, spacings, bins, sampling, rng, fixed_mask, moving_mask,
                         native_finest=metric in NATIVE_FIXED_METRICS, max_points=max_points)

    # centres of mass from the finest level small enough to read quickly (a 1 mm image's own grid
    # costs ~0.25 s per image and moves the centre by well under a voxel)
    com_level = next((lv for lv in reversed(lvls) if lv.fixed_image.data.size <= COM_MAX_VOXELS
                      and lv.moving_image.data.size <= COM_MAX_VOXELS), lvls[0])
    centre = com_level.fixed_image.centre_of_mass()
    if init_fixed2moving is not None:
        start = np.asarray(init_fixed2moving, dtype=np.float64)
        init = "given"
    else:
        start = initial_transform(com_level.moving_image, com_level.fixed_image, init)
    pts_fine = lvls[-1].samples.points
    radius = float(np.sqrt(np.mean(np.sum((pts_fine - centre) ** 2, axis=1)))) if len(pts_fine) else 50.0
    radius = max(radius, 10.0)

    def objective(level, mdl, step_tol=STEP_TOL, max_points=None):
        samples = level.samples if max_points is None else histogram.thinned(level.samples, max_points)
        return _Objective(samples, level.moving, mdl, metric_fn, centre, mdl.scales(radius), deadline,
                          step_tol * level.spacing)

    first = objective(lvls[0], stage_models[0])
    p0 = stage_models[0].from_matrix(start, centre)
    value0, ev0, _ = first.metric_at(p0)
    if ev0.n_valid < first.min_valid:
        raise RegistrationError(
            f"the images do not overlap at the start ({ev0.n_valid} of {len(first.samples.points)} fixed sample "
            f"points fall inside the moving image{' mask' if moving_mask is not None else ''}); "
            "check the headers, or use --init com / --search full")

    matrix = start
    reports = []
    search_report = None

    def run_levels(mdl, params, first):
        """Optimise ``params`` from level ``first`` to the finest: (params, level reports)."""
        out = []
        for level in lvls[first:]:
            tl = time.perf_counter()
            obj = objective(level, mdl)
            start_value = obj.metric_at(params)[0]
            params, end_value, res = _lbfgs(obj, params, max_iter)
            out.append(LevelReport(mdl.name, level.spacing, len(level.samples.points), int(res.nit),
                                   obj.evaluations, float(start_value), end_value, _stop_reason(res, obj),
                                   time.perf_counter() - tl, res.last_step_mm, res.settled))
        return params, out

    for si, mdl in enumerate(stage_models):
        params = mdl.from_matrix(matrix, centre)
        finalists = []
        if si == 0 and search != "none" and mdl.name == "rigid":
            # the search only has to tell basins apart: its refinements settle at 1 % of the spacing
            obj = objective(lvls[0], mdl, SEARCH_STEP_TOL, SEARCH_MAX_POINTS[0])
            finer = objective(lvls[min(1, len(lvls) - 1)], mdl, SEARCH_STEP_TOL, SEARCH_MAX_POINTS[1])
            params, search_report = global_search(obj, finer, params, _refine, mode=search, radius_mm=radius)
            say(f"search: {search_report.evaluated} poses; chose the {search_report.chosen} pose "
                f"({search_report.rotation_deg:.1f} deg from the start; {metric} "
                f"{search_report.start_metric:.4f} for the start, {search_report.best_metric:.4f} chosen), "
                f"{search_report.seconds:.2f} s")
            for alt in search_report.alternatives:
                finalists.append(run_levels(mdl, alt, 0))
        best_params, best_reports = run_levels(mdl, params, 0)
        for alt_params, alt_reports in finalists:
            if alt_reports[-1].metric_end > best_reports[-1].metric_end:
                best_params, best_reports = alt_params, alt_reports
        if finalists:
            search_report = replace(search_report, finalists=1 + len(finalists))
            say(f"search: {1 + len(finalists)} near-tied poses taken to the finest level; kept the best")
        params = best_params
        reports.extend(best_reports)
        for r in best_reports:
            say(f"{mdl.name} level {r.spacing_mm:g} mm: {r.n_points} points, {r.iterations} "
                f"iterations, {metric} {r.metric_start:.4f} -> {r.metric_end:.4f}")
        matrix = mdl.matrix(params, centre)

    finest = objective(lvls[-1], stage_models[0])
    before = finest.metric_at(stage_models[0].from_matrix(start, centre))[0]
    conf = None
    if confidence:
        from .confidence import assess

        rigid = get_model("rigid")
        last = reports[-1]
        conf = assess(objective(lvls[-1], rigid), rigid.from_matrix(matrix, centre), centre, _refine,
                      settled_step_mm=last.last_step_mm if last.stage == "rigid" and last.settled else None)
        say(f"confidence {conf.score:.2f}{' (SUSPECT)' if conf.suspect else ''}: "
            + ", ".join(f"{k} {v:.3g}" for k, v in conf.evidence.items()))
    return Result(
        fixed2moving=matrix, init_fixed2moving=start, model=final.name, params=params, centre=centre,
        metric=metric, metric_before=float(before), metric_after=float(reports[-1].metric_end),
        levels=tuple(reports), seconds=time.perf_counter() - t0, init=init,
        stages=tuple(m.name for m in stage_models), search=search_report, confidence=conf,
        settings={"bins": bins, "sampling": sampling, "levels": len(spacings), "spacings_mm": spacings,
                  "seed": seed, "max_points": max_points, "max_iter": max_iter, "max_seconds": max_seconds,
                  "search": search,
                  "auto_mask": auto_mask,
                  "fixed_mask": None if fixed_mask is None else fixed_mask.name,
                  "moving_mask": None if moving_mask is None else moving_mask.name},
    )


class MetricProbe:
    """The metric of two images at the registration's finest level, for any fixed->moving matrix.

    The sample points, intensity ranges and masks are set up once, as :func:`register` sets up its
    finest level, so many poses can be evaluated cheaply (:func:`evaluate_metric`,
    :mod:`regkl.landscape`).

    Parameters
    ----------
    moving, fixed : Volume
    metric, bins, prior, fixed_mask, moving_mask, sampling, seed
        As for :func:`register`.

    Attributes
    ----------
    spacing_mm : float
        Spacing of the finest level.
    n_points : int
        Fixed sample points.
    min_valid : int
        Points that must fall inside the moving image for a value (as in :func:`register`).
    """

    def __init__(self, moving: Volume, fixed: Volume, *, metric: str = "mi", bins: int = 24, prior=None,
                 fixed_mask: Volume | None = None, moving_mask: Volume | None = None, sampling: float = 1.0,
                 seed: int = 0):
        spacing = pyramid.default_spacings(fixed, moving, 1)
        self.spacing_mm = float(spacing[0])
        self.metric_fn = get_metric(metric) if prior is None else get_metric(metric, prior=prior)
        self.level = _build_levels(moving, fixed, spacing, bins, sampling, np.random.default_rng(seed),
                                   fixed_mask, moving_mask, native_finest=metric in NATIVE_FIXED_METRICS)[0]
        self.n_points = len(self.level.samples.points)
        self.min_valid = max(64, int(MIN_OVERLAP * self.n_points))

    def __call__(self, fixed2moving: np.ndarray):
        """(metric value, or None where fewer than ``min_valid`` points overlap; overlap fraction; points inside)."""
        ev = histogram.joint_histogram(self.level.samples, self.level.moving,
                                       np.asarray(fixed2moving, dtype=np.float64))
        overlap = float(ev.mov_w.sum() / self.n_points)
        if ev.n_valid < self.min_valid:
            return None, overlap, int(ev.n_valid)
        return float(self.metric_fn(ev.hist)[0]), overlap, int(ev.n_valid)


def evaluate_metric(moving: Volume, fixed: Volume, fixed2moving: np.ndarray | None = None, *, metric: str = "mi",
                    bins: int = 24, prior=None, fixed_mask: Volume | None = None,
                    moving_mask: Volume | None = None, sampling: float = 1.0, seed: int = 0):
    """Similarity of two images in world space, as the registration's finest level sees it.

    Parameters
    ----------
    moving, fixed : Volume
    fixed2moving : ndarray (4, 4), optional
        RAS fixed -> moving; identity (the headers) when omitted.
    metric, bins, prior, fixed_mask, moving_mask, sampling, seed
        As for :func:`register`.

    Returns
    -------
    value : float
        Metric value (higher is more similar).
    overlap : float
        Fraction of the fixed sample points that fall inside the moving image (and masks).
    """
    probe = MetricProbe(moving, fixed, metric=metric, bins=bins, prior=prior, fixed_mask=fixed_mask,
                        moving_mask=moving_mask, sampling=sampling, seed=seed)
    value, overlap, n_valid = probe(np.eye(4) if fixed2moving is None else fixed2moving)
    if value is None:
        raise RegistrationError(f"the images do not overlap ({n_valid} of {probe.n_points} sample points inside the "
                                "moving image)")
    return value, overlap


def learn_prior(pairs, *, bins: int = 24, sampling: float = 1.0, seed: int = 0) -> np.ndarray:
    """Expected joint histogram for ``metric='kl'`` from already-aligned pairs (Chung et al. 2002).

    Each pair is binned exactly as :func:`register` bins its finest level (robust intensity ranges,
    box bins for the fixed image, cubic B-spline window for the moving one) at its known transform,
    and the normalised histograms are averaged.

    Parameters
    ----------
    pairs : iterable of (moving Volume, fixed Volume, fixed2moving (4, 4) or None)
        Aligned pairs; None means the headers already align them.
    bins, sampling, seed
        As for :func:`register` (use the same ``bins`` when registering).

    Returns
    -------
    ndarray (bins, bins)
        Normalised prior (sums to 1).
    """
    from .metrics import prior_from_histograms

    hists = []
    for moving, fixed, m in pairs:
        spacing = pyramid.default_spacings(fixed, moving, 1)
        level = _build_levels(moving, fixed, spacing, bins, sampling, np.random.default_rng(seed), None, None)[0]
        ev = histogram.joint_histogram(level.samples, level.moving, np.eye(4) if m is None else m)
        if ev.n_valid < 64:
            raise InputError("the images of a training pair do not overlap", path=moving.name)
        hists.append(ev.hist)
    if not hists:
        raise InputError("learn-prior needs at least one aligned pair")
    return prior_from_histograms(hists)
