"""register(moving, fixed, ...) -> Result: initialisation, pyramid levels, optimiser, stopping."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize as sopt

from . import histogram, pyramid
from .errors import InputError, RegistrationError
from .metrics import get_metric
from .transforms import get_model
from .volume import Volume

#: Minimum fraction of sample points that must land inside the moving image.
MIN_OVERLAP = 0.05


@dataclass(frozen=True)
class LevelReport:
    """What happened at one pyramid level."""

    spacing_mm: float
    n_points: int
    iterations: int
    evaluations: int
    metric_start: float
    metric_end: float
    stop_reason: str
    seconds: float


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
    params : ndarray (P,)
        Model parameters (radians, mm) about ``centre``.
    centre : ndarray (3,)
        Centre of rotation (fixed world mm).
    metric : str
    metric_before, metric_after : float
        Metric at the finest level at the start and at the end (higher is better).
    levels : tuple of LevelReport
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
    settings: dict = field(default_factory=dict)


def initial_transform(moving: Volume, fixed: Volume, how: str) -> np.ndarray:
    """Starting fixed-to-moving matrix: 'com' (centres of mass), 'geometry' (grid centres) or
    'header' (identity: trust the headers)."""
    if how == "header":
        return np.eye(4)
    if how == "com":
        shift = moving.centre_of_mass() - fixed.centre_of_mass()
    elif how == "geometry":
        shift = moving.centre - fixed.centre
    else:
        raise InputError(f"unknown initialisation {how!r}; choose one of com, geometry, header")
    m = np.eye(4)
    m[:3, 3] = shift
    return m


class _Objective:
    """Negative metric and gradient in scaled optimiser units, for one level."""

    def __init__(self, samples, moving_level, model, metric_fn, centre, scales):
        self.samples = samples
        self.moving = moving_level
        self.model = model
        self.metric_fn = metric_fn
        self.centre = centre
        self.scales = scales
        self.evaluations = 0
        self.min_valid = max(64, int(MIN_OVERLAP * samples.points.shape[0]))

    def metric_at(self, params):
        ev = histogram.joint_histogram(self.samples, self.moving, self.model.matrix(params, self.centre))
        if ev.n_valid < self.min_valid:
            return 0.0, ev, None
        value, dtable = self.metric_fn(ev.hist)
        return value, ev, dtable

    def __call__(self, q):
        self.evaluations += 1
        params = q * self.scales
        if not np.all(np.isfinite(params)):
            raise RegistrationError("optimiser produced non-finite parameters")
        value, ev, dtable = self.metric_at(params)
        if dtable is None:
            return 0.0, np.zeros_like(q)
        gmat = histogram.matrix_gradient(self.samples, self.moving, ev, dtable)
        dmat = self.model.dmatrix(params, self.centre)
        grad_p = np.tensordot(dmat, gmat, axes=([1, 2], [0, 1]))
        return -value, -grad_p * self.scales


def register(moving: Volume, fixed: Volume, *, model: str = "rigid", metric: str = "mi", bins: int = 24,
             sampling: float = 0.5, levels: int | None = None, init: str = "com",
             init_fixed2moving: np.ndarray | None = None, seed: int = 0, max_iter: int = 100,
             log=None) -> Result:
    """Align ``moving`` to ``fixed`` by maximising a histogram similarity metric.

    Parameters
    ----------
    moving, fixed : Volume
        3D images in RAS+ mm.
    model : str
        Transform model name (see :data:`regkl.transforms.MODELS`).
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
    seed : int
        Seed of the sample jitter and subsampling; the result is deterministic for a seed.
    max_iter : int
        Maximum optimiser iterations per level.
    log : callable(str), optional
        Progress messages.

    Returns
    -------
    Result
    """
    t0 = time.perf_counter()
    say = log or (lambda msg: None)
    if not 0.0 < sampling <= 1.0:
        raise InputError(f"sampling must be in (0, 1], got {sampling}")
    if not 8 <= bins <= 512:
        raise InputError(f"bins must be between 8 and 512, got {bins}")
    if levels is not None and not 1 <= levels <= 6:
        raise InputError(f"levels must be between 1 and 6, got {levels}")
    mdl = get_model(model)
    metric_fn = get_metric(metric)
    spacings = pyramid.default_spacings(fixed, moving, levels)
    rng = np.random.default_rng(seed)

    fixed_levels = [pyramid.downsample(fixed, s) for s in spacings]
    moving_levels = [pyramid.downsample(moving, s) for s in spacings]
    centre = fixed_levels[-1].centre_of_mass()
    if init_fixed2moving is not None:
        start = np.asarray(init_fixed2moving, dtype=np.float64)
        init = "given"
    else:
        start = initial_transform(moving_levels[-1], fixed_levels[-1], init)
    params = mdl.from_matrix(start, centre)

    pts_fine = fixed_levels[-1].world_coords(
        np.stack(np.nonzero(fixed_levels[-1].data > np.percentile(fixed_levels[-1].data, 50)), axis=1))
    radius = float(np.sqrt(np.mean(np.sum((pts_fine - centre) ** 2, axis=1)))) if len(pts_fine) else 50.0
    scales = mdl.scales(max(radius, 10.0))

    reports = []
    objectives = []
    for spacing, flev, mlev in zip(spacings, fixed_levels, moving_levels):
        tl = time.perf_counter()
        pts, vals = pyramid.sample_grid(flev, sampling, rng)
        samples = histogram.make_samples(pts, vals, bins)
        moving_level = histogram.make_moving_level(mlev, bins)
        obj = _Objective(samples, moving_level, mdl, metric_fn, centre, scales)
        objectives.append(obj)
        start_value, ev, _ = obj.metric_at(params)
        if ev.n_valid < obj.min_valid:
            raise RegistrationError(
                f"the images do not overlap at the start ({ev.n_valid} of {len(pts)} fixed sample points fall "
                f"inside the moving image); check the headers or use --init com")
        res = sopt.minimize(obj, params / scales, jac=True, method="L-BFGS-B",
                            options={"maxiter": max_iter, "ftol": 1e-9, "gtol": 1e-6, "maxcor": 10})
        if not np.all(np.isfinite(res.x)):
            raise RegistrationError(f"optimiser diverged at level {spacing:g} mm")
        new_params = res.x * scales
        end_value = -float(res.fun)
        if end_value < start_value:  # never accept a worse solution
            new_params, end_value = params, start_value
        params = new_params
        reports.append(LevelReport(float(spacing), len(pts), int(res.nit), obj.evaluations, float(start_value),
                                   end_value, str(res.message), time.perf_counter() - tl))
        say(f"level {spacing:g} mm: {len(pts)} points, {res.nit} iterations, {metric} "
            f"{start_value:.4f} -> {end_value:.4f}")

    finest = objectives[-1]
    before = finest.metric_at(mdl.from_matrix(start, centre))[0]
    after = reports[-1].metric_end
    return Result(
        fixed2moving=mdl.matrix(params, centre), init_fixed2moving=start, model=mdl.name, params=params,
        centre=centre, metric=metric, metric_before=float(before), metric_after=float(after),
        levels=tuple(reports), seconds=time.perf_counter() - t0, init=init,
        settings={"bins": bins, "sampling": sampling, "levels": len(spacings), "spacings_mm": spacings,
                  "seed": seed, "max_iter": max_iter},
    )
