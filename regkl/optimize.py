"""register(moving, fixed, ...) -> Result: initialisation, pyramid levels, optimiser, stopping."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np

from . import histogram, masks, pyramid
from .errors import InputError, RegistrationError
from .initialize import SEARCH_MODES, SearchReport, global_search, initial_transform  # noqa: F401
from .levels import _build_levels, reachable_fraction
from .mask_guard import _keep_masked_or_plain
from .metrics import NATIVE_FIXED_METRICS, get_metric
from .objective import STEP_TOL, _lbfgs, _Objective, _refine, _stop_reason
from .transforms import get_model
from .volume import Volume, as_volume

#: Default cap on the fixed sample points of one level (``max_points``): the error of a rigid fit
#: stops improving well below it (error against the cap in benchmarks/README.md, "Speed").
MAX_POINTS = 150_000
#: A metric that ends lower than it started by less than this fraction of its size has not
#: decreased: refining a converged result moves it by rounding only (7e-9 of 0.89 was reported).
METRIC_DECREASE_TOL = 1e-6


def decreased(before: float, after: float) -> bool:
    """Whether a metric fell from ``before`` to ``after`` by more than :data:`METRIC_DECREASE_TOL`
    of its size."""
    return after < before - METRIC_DECREASE_TOL * max(abs(before), abs(after), 1e-12)


#: Fewest sample points per level a cap may ask for.
MIN_MAX_POINTS = 1000
#: Step tolerance of the finest level (fraction of its spacing; coarser levels use
#: :data:`regkl.objective.STEP_TOL`): 0.015 mm at 3 mm. The precision of the answer is set by the
#: sample points (on the real b0/T2w pair, answers with different seeds lie 0.3-0.9 mm apart, along
#: a flat rotation), not by settling to microns. Measured against 0.002 (benchmarks/README.md, "Real
#: pair self-consistency (session 6)"): the same errors on 8 synthetic EPI pairs and the 1 mm pair
#: (within 0.001 mm) and the same dependence on the start on the real pair (0.02-0.10 mm from starts
#: 0.9 mm apart; 0.01 let it grow to 0.10-0.18 mm), with fewer finest-level evaluations (real pair
#: 20-53 instead of 23-60; synthetic 9-13 instead of 9-14).
FINEST_STEP_TOL = 0.005
#: Centres of mass (rotation centre, ``init='com'``) come from the finest level with at most this
#: many voxels in each image.
COM_MAX_VOXELS = 2 ** 21
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
    #: Metric of the registration's starting pose on this level's sample points.
    metric_initial: float | None = None

    @property
    def metric_decreased(self) -> bool:
        """The level ended with a lower metric than the starting pose has on its points."""
        return self.metric_initial is not None and decreased(self.metric_initial, self.metric_end)


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

    @property
    def metric_decreased(self) -> bool:
        """The registration ended with a lower metric than its start, on the same (finest) points."""
        return decreased(self.metric_before, self.metric_after)


def register(moving: Volume | str, fixed: Volume | str, *, model: str = "rigid", metric: str = "mi", bins: int = 24,
             sampling: float = 0.5, levels: int | None = None, init: str = "com",
             init_fixed2moving: np.ndarray | None = None, search: str = "auto", fixed_mask: Volume | None = None,
             moving_mask: Volume | None = None, auto_mask: bool = False, prior=None, seed: int = 0,
             max_points: int | None = MAX_POINTS, max_iter: int = 100, max_seconds: float | None = 600.0,
             confidence: bool = False, log=None) -> Result:
    """Align ``moving`` to ``fixed`` by maximising a histogram similarity metric.

    Parameters
    ----------
    moving, fixed : Volume, nibabel image or path
        The images (3D; a 4D image or file is reduced to its mean volume).
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
    fixed_mask, moving_mask : Volume, nibabel image or path, optional
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

    Raises
    ------
    TypeError
        An image that is not a Volume, a nibabel image or a path.
    InputError
        Unknown model, metric or search mode, settings out of range, unusable images.
    RegistrationError
        The images do not overlap, or the time limit was reached.

    Notes
    -----
    A moving image whose field of view is less than :data:`SWAP_BELOW` of the fixed image's (a
    slab of a few slices) is registered the other way, the fixed image onto it, and the result is
    inverted: sampling the small image puts every sample point where there is data, where sampling
    the large one would spend almost every point outside it. The masks swap roles with the images
    (each still belongs to its image), the prior is transposed, and ``settings`` records it.
    """
    _check_numbers(bins=bins, seed=seed, max_iter=max_iter, max_seconds=max_seconds, sampling=sampling,
                   max_points=max_points, levels=levels)
    moving, fixed = as_volume(moving, what="moving"), as_volume(fixed, what="fixed")
    fixed_mask = None if fixed_mask is None else as_volume(fixed_mask, what="fixed_mask", allow_constant=True)
    moving_mask = None if moving_mask is None else as_volume(moving_mask, what="moving_mask", allow_constant=True)
    options = dict(model=model, metric=metric, bins=bins, sampling=sampling, levels=levels, init=init,
                   init_fixed2moving=init_fixed2moving, search=search, fixed_mask=fixed_mask, moving_mask=moving_mask,
                   auto_mask=auto_mask, prior=prior, seed=seed, max_points=max_points, max_iter=max_iter,
                   max_seconds=max_seconds, confidence=confidence, log=log)
    masks.sparse_signal_warning(moving, "moving")
    masks.sparse_signal_warning(fixed, "fixed")
    fraction = reachable_fraction(fixed, moving)
    with _one_blas_thread():
        if fraction < SWAP_BELOW:
            return _register_other_way(moving, fixed, fraction, options)
        return _register(moving, fixed, **options)


_BLAS_LOCK = threading.Lock()
_BLAS_STATE = {"users": 0, "limiter": None}


@contextlib.contextmanager
def _one_blas_thread():
    """Keep BLAS to one thread while any registration of this process runs, unless the environment
    already did (:data:`regkl.BLAS_SINGLE_THREADED`: the command line's case, where this would cost
    ~10 ms). The limit is process-wide (threadpoolctl), so registrations running at once in
    threads share it: the first one sets it, the last one to finish restores the user's setting."""
    from . import BLAS_SINGLE_THREADED

    if BLAS_SINGLE_THREADED:
        yield
        return
    from threadpoolctl import threadpool_limits

    with _BLAS_LOCK:
        if _BLAS_STATE["users"] == 0:
            _BLAS_STATE["limiter"] = threadpool_limits(limits=1, user_api="blas")
        _BLAS_STATE["users"] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS_STATE["users"] -= 1
            if _BLAS_STATE["users"] == 0:
                _BLAS_STATE["limiter"].restore_original_limits()
                _BLAS_STATE["limiter"] = None


def _check_numbers(*, bins, seed, max_iter, max_seconds, sampling, max_points, levels) -> None:
    """InputError for numeric settings of the wrong type or range (the command line checks the same
    when it parses its options; this is the Python API's check)."""
    import numbers

    def integer(name, value, low, optional=False):
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise InputError(f"{name} must be an integer >= {low}{' or None' if optional else ''}, got {value!r}")

    integer("bins", bins, 8)
    integer("seed", seed, 0)
    integer("max_iter", max_iter, 1)
    integer("max_points", max_points, MIN_MAX_POINTS, optional=True)
    integer("levels", levels, 1, optional=True)
    for name, value, optional in (("sampling", sampling, False), ("max_seconds", max_seconds, True)):
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value) or value <= 0:
            raise InputError(f"{name} must be a finite number > 0{' or None' if optional else ''}, got {value!r}")


#: A moving image whose field of view is under this fraction of the fixed image's is registered the
#: other way (see :func:`register`).
SWAP_BELOW = 0.2


def _register_other_way(moving, fixed, fraction, options) -> Result:
    """Register ``fixed`` onto ``moving`` and invert the result (see :func:`register`)."""
    say = options["log"] or (lambda msg: None)
    say(f"the moving image covers {100 * fraction:.2g} % of the fixed image's field of view: registering the fixed image "
        "onto it and inverting the result, so that the sample points fall where the moving image has data")
    swapped = dict(options, fixed_mask=options["moving_mask"], moving_mask=options["fixed_mask"])
    if options["init_fixed2moving"] is not None:
        swapped["init_fixed2moving"] = np.linalg.inv(np.asarray(options["init_fixed2moving"], dtype=np.float64))
    if options["prior"] is not None:
        swapped["prior"] = np.asarray(options["prior"]).T
    res = _register(fixed, moving, **swapped, roles=("moving", "fixed"))
    matrix = np.linalg.inv(res.fixed2moving)
    centre = res.fixed2moving[:3, :3] @ res.centre + res.fixed2moving[:3, 3]
    settings = dict(res.settings, registered_other_way=True,
                    fixed_mask=res.settings.get("moving_mask"), moving_mask=res.settings.get("fixed_mask"))
    return replace(res, fixed2moving=matrix, init_fixed2moving=np.linalg.inv(res.init_fixed2moving),
                   params=get_model(res.model).from_matrix(matrix, centre), centre=centre, settings=settings)


def _register(moving: Volume, fixed: Volume, *, model, metric, bins, sampling, levels, init, init_fixed2moving,
              search, fixed_mask, moving_mask, auto_mask, prior, seed, max_points, max_iter, max_seconds,
              confidence, log, roles=("fixed", "moving")) -> Result:
    """:func:`register` with the roles as given (``roles``: what the user calls ``fixed`` and ``moving``)."""
    t0 = time.perf_counter()
    deadline = None if max_seconds is None else t0 + float(max_seconds)
    say = log or (lambda msg: None)
    if not 0.0 < sampling <= 1.0:
        raise InputError(f"sampling must be in (0, 1], got {sampling}")
    if not 8 <= bins <= 512:
        raise InputError(f"bins must be between 8 and 512, got {bins}")
    if max_points is not None and max_points < MIN_MAX_POINTS:
        raise InputError(f"max_points must be at least {MIN_MAX_POINTS}, got {max_points}")
    if levels is not None and not 1 <= levels <= 6:
        raise InputError(f"levels must be between 1 and 6, got {levels}")
    if search not in SEARCH_MODES:
        raise InputError(f"unknown search mode {search!r}; choose one of {', '.join(SEARCH_MODES)}")
    final = get_model(model)
    stage_models = [get_model(name) for name in final.stages] + [final]
    metric_fn = get_metric(metric) if prior is None else get_metric(metric, prior=prior)
    spacings = pyramid.default_spacings(fixed, moving, levels)
    rng = np.random.default_rng(seed)

    given_masks, mask_report = (fixed_mask, moving_mask), {}
    fixed_mask, moving_mask = masks.prepare_masks(fixed, moving, fixed_mask, moving_mask, auto_mask,
                                                  report=mask_report)
    lvls = _build_levels(moving, fixed, spacings, bins, sampling, rng, fixed_mask, moving_mask,
                         native_finest=metric in NATIVE_FIXED_METRICS, roles=roles,
                         max_points=max_points)
    if levels is not None and len(lvls) < levels:
        say(f"using {len(lvls)} of the {levels} levels asked for ({', '.join(f'{lv.spacing:g}' for lv in lvls)} "
            f"mm): a coarser level would average away a thin field of view "
            f"(thinnest: {roles[1]} {pyramid.thinnest_extent_mm(moving):.3g} mm, {roles[0]} "
            f"{pyramid.thinnest_extent_mm(fixed):.3g} mm) or keep too few sample points")
    spacings = [lv.spacing for lv in lvls]

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

    def objective(level, mdl, step_tol=STEP_TOL, max_points=None, order_at=None):
        samples = level.samples if max_points is None else histogram.thinned(level.samples, max_points)
        if order_at is not None:  # a level's optimisation: points in the moving image's storage order
            samples = histogram.in_moving_order(samples, level.moving, order_at)
        # the overlap floor scales with the points kept
        min_valid = max(64, int(level.min_valid * len(samples.points) / max(len(level.samples.points), 1)))
        return _Objective(samples, level.moving, mdl, metric_fn, centre, mdl.scales(radius), deadline,
                          step_tol * level.spacing, min_valid)

    first = objective(lvls[0], stage_models[0])
    p0 = stage_models[0].from_matrix(start, centre)
    value0, ev0, _ = first.metric_at(p0)
    if ev0.n_valid < first.min_valid:
        advice = [opt for opt, used in (("--init com", init == "com" or init_fixed2moving is not None),
                                        ("--search full", search == "full")) if not used]
        raise RegistrationError(
            f"the images do not overlap at the start ({ev0.n_valid} of {len(first.samples.points)} {roles[0]} "
            f"sample points fall inside the {roles[1]} image{' mask' if moving_mask is not None else ''}, at least "
            f"{first.min_valid} are needed); check the headers{''.join(', or use ' + a for a in advice[:1])}"
            f"{''.join(' / ' + a for a in advice[1:])}")

    matrix = start
    reports = []
    search_report = None

    def run_levels(mdl, params, first):
        """Optimise ``params`` from level ``first`` to the finest: (params, level reports)."""
        out = []
        for level in lvls[first:]:
            tl = time.perf_counter()
            tol = FINEST_STEP_TOL if level is lvls[-1] else STEP_TOL
            obj = objective(level, mdl, tol, order_at=mdl.matrix(params, centre))
            # the starting pose is scored last: _lbfgs and L-BFGS-B's first evaluation reuse it
            initial = obj.metric_at(mdl.from_matrix(start, centre))[0]
            start_value = obj.metric_at(params)[0]
            params, end_value, res = _lbfgs(obj, params, max_iter)
            out.append(LevelReport(mdl.name, level.spacing, len(level.samples.points), int(res.nit),
                                   obj.evaluations, float(start_value), end_value, _stop_reason(res, obj),
                                   time.perf_counter() - tl, res.last_step_mm, res.settled, float(initial)))
        return params, out

    for si, mdl in enumerate(stage_models):
        params = mdl.from_matrix(matrix, centre)
        finalists = []
        if si == 0 and search != "none" and mdl.name == "rigid":
            # the search only has to tell basins apart: its refinements settle at 1 % of the spacing
            obj = objective(lvls[0], mdl, SEARCH_STEP_TOL, SEARCH_MAX_POINTS[0])
            finer = objective(lvls[min(1, len(lvls) - 1)], mdl, SEARCH_STEP_TOL, SEARCH_MAX_POINTS[1])
            params, search_report = global_search(obj, finer, params, _refine, mode=search, radius_mm=radius)
            say(f"search: {search_report.evaluated} poses in {search_report.seconds:.2f} s; the {search_report.chosen} "
                f"pose's basin wins, refined to {search_report.rotation_deg:.1f} deg from the start pose ({metric} "
                f"{search_report.start_metric:.4f} for the start's basin, {search_report.best_metric:.4f} for the "
                f"chosen one, both refined)")
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

    if "used" in mask_report.values():
        # an automatic mask must never wreck a registration that works without it
        plain = _register(moving, fixed, model=model, metric=metric, bins=bins, sampling=sampling, levels=levels,
                          init=init, init_fixed2moving=init_fixed2moving, search=search, fixed_mask=given_masks[0],
                          moving_mask=given_masks[1], auto_mask=False, prior=prior, seed=seed, max_points=max_points,
                          max_iter=max_iter, confidence=False, log=None, roles=roles,
                          max_seconds=None if deadline is None else max(deadline - time.perf_counter(), 1.0))
        whole = _build_levels(moving, fixed, spacings[-1:], bins, sampling, np.random.default_rng(seed),
                              *given_masks, native_finest=metric in NATIVE_FIXED_METRICS, roles=roles,
                              max_points=max_points)[0]
        matrix, params, mask_report["kept"] = _keep_masked_or_plain(
            objective(lvls[-1], final), objective(whole, final), params, plain, max_iter, say, moving.name)
        if mask_report["kept"].startswith("unmasked ("):  # judge and report the answer as the unmasked run found it
            lvls[-1], reports, search_report = whole, list(plain.levels), plain.search

    finest = objective(lvls[-1], final)
    before = finest.metric_at(final.from_matrix(start, centre))[0]
    after = finest.metric_at(params)[0]
    if decreased(before, after):
        import warnings

        warnings.warn(f"{moving.name}: the registration ended with a lower {metric} ({after:.4f}) than its start "
                      f"({before:.4f}) on the same points: the result is probably wrong", stacklevel=2)
    conf = None
    if confidence:
        from .confidence import assess

        rigid = get_model("rigid")
        last = reports[-1]
        conf = assess(objective(lvls[-1], rigid), rigid.from_matrix(matrix, centre), centre, _refine,
                      settled_step_mm=last.last_step_mm if last.stage == "rigid" and last.settled else None,
                      metric_gain=(after - before) / max(abs(before), 1e-12))
        say(f"confidence {conf.score:.2f}{' (SUSPECT)' if conf.suspect else ''}: "
            + ", ".join(f"{k} {v:.3g}" for k, v in conf.evidence.items()))
    return Result(
        fixed2moving=matrix, init_fixed2moving=start, model=final.name, params=params, centre=centre,
        metric=metric, metric_before=float(before), metric_after=float(after),
        levels=tuple(reports), seconds=time.perf_counter() - t0, init=init,
        stages=tuple(m.name for m in stage_models), search=search_report, confidence=conf,
        settings={"bins": bins, "sampling": sampling, "levels": len(spacings), "spacings_mm": spacings,
                  "seed": seed, "max_points": max_points, "max_iter": max_iter, "max_seconds": max_seconds,
                  "search": search, "auto_mask": auto_mask, "auto_masks": mask_report if auto_mask else None,
                  "registered_other_way": False,
                  "fixed_mask": None if fixed_mask is None else fixed_mask.name,
                  "moving_mask": None if moving_mask is None else moving_mask.name},
    )


