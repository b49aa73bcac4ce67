"""realign(volumes, ...) -> RealignResult: rigid head-motion correction of a 4D series.

Every volume is registered rigidly to one reference volume with the kernels, pyramid and optimiser
used by :func:`regkl.optimize.register` (same-modality costs from :mod:`regkl.moments`, or MI).
Schedule (as FSL MCFLIRT and SPM Realign do it): a first pass to the chosen reference, then an
optional second pass to the mean of the realigned series, starting from the first pass's estimates.
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from . import histogram, masks, moments, pyramid
from .errors import InputError, RegistrationError
from .metrics import get_metric
from .motion import framewise_displacement, non_steady_volumes
from .realign_checks import MIN_FINITE_VOXELS, check_resemblance, poor_fits, thin_series_warning, usable_series
from .objective import NO_OVERLAP_VALUE, MIN_OVERLAP, STEP_TOL, _lbfgs, _Objective
from .resample import resample
from .stack_kernels import median_of_volumes
from .transforms import get_model
from .volume import Volume

#: Costs by name; 'nc' and 'ls' are :data:`regkl.moments.COSTS`, 'mi' the histogram metric.
COSTS = ("nc", "ls", "mi")
#: Consecutive volumes registered one after the other, each starting from its neighbour's estimate
#: (or from the identity when that fits better, after a spike). Blocks run in parallel; their size
#: does not depend on the thread count, so neither do the results.
BLOCK = 8
#: Resolution (FWHM, voxels) of the finest level: a little smoothing of both images removes most of
#: the bias of trilinear interpolation and noise (SPM Realign smooths by 5 mm; measured in benchmarks/bench_realign.py).
FINEST_FWHM_VOX = 1.5
#: Default fraction of the reference's grid points sampled at every level: on 3 mm EPI series, 1/8
#: (~9000 points at the finest level) is as accurate as 1/4 and ~25 % faster (benchmarks/bench_realign.py).
SAMPLING = 0.125
#: Every level samples ``sampling`` of the reference's grid points, but at least this many (the
#: coarsest levels then use all their points).
MIN_POINTS = 4000
#: Coarser levels end once the pose settles to this fraction of their spacing (the finest level
#: refines it to :data:`regkl.objective.STEP_TOL`).
COARSE_STEP_TOL = 0.01
#: A coarser level is kept only if it is at least this many times coarser than the finest.
COARSER = 1.2
#: Bins of the MI histogram (cost 'mi').
MI_BINS = 32
#: Python's thread switch interval (s) while volumes are registered in several threads: each
#: evaluation returns from a GIL-free kernel to a little Python, and waiting up to Python's
#: default 5 ms for the other thread to yield the GIL left cores idle (measured: 100 volumes, 2
#: threads, 3 interleaved repeats on cores shared at load 18: median 12.8 s instead of 21.0 s wall,
#: the same CPU time; 0.2 ms was worse again).
SWITCH_INTERVAL_S = 0.001
#: Per-volume flags (value = message).
FLAGS = {"empty": "constant (empty or not-a-number) volume; its transform is its neighbour's",
         "no-overlap": "does not overlap the reference; its transform is its neighbour's",
         "poor-fit": "matches the reference far worse than the other volumes after realignment (noise, another "
                     "contrast, or moved out of the field of view?): its motion estimate is unreliable"}


@dataclass(frozen=True)
class RealignResult:
    """Outcome of :func:`realign`.

    Attributes
    ----------
    ref2volume : ndarray (T, 4, 4)
        Per volume, RAS+ mm reference world -> volume world (the pull direction: resampling volume
        ``t`` through ``ref2volume[t]`` on the reference grid realigns it).
    params : ndarray (T, 6)
        ``rot_x, rot_y, rot_z`` (radians; matrix ``Rz @ Ry @ Rx``) and ``trans_x, trans_y,
        trans_z`` (mm) of ``ref2volume`` about ``centre``: ``y = R (x - c) + c + t``.
    centre : ndarray (3,)
        Centre of the reference grid (RAS+ mm).
    framewise_displacement : ndarray (T,)
        Power et al. (2012), mm; NaN for the first volume.
    reference : Volume
        Target of the last pass.
    boldref : Volume
        Median of the realigned steady-state volumes, on the reference grid.
    n_non_steady : int
        Leading non-steady-state volumes left out of ``boldref``.
    flags : tuple of str
        Per volume: '' or a key of :data:`FLAGS`.
    cost : str
    cost_values : ndarray (T,)
        Cost at the estimate (finest level; NaN for flagged volumes).
    seconds : float
    settings : dict
    """

    ref2volume: np.ndarray
    params: np.ndarray
    centre: np.ndarray
    framewise_displacement: np.ndarray
    reference: Volume
    boldref: Volume
    n_non_steady: int
    flags: tuple
    cost: str
    cost_values: np.ndarray
    seconds: float
    settings: dict = field(default_factory=dict)


class _MomentObjective:
    """Negative same-modality cost and gradient in scaled optimiser units (the interface of
    :class:`regkl.objective._Objective`, so :func:`regkl.objective._lbfgs` runs it unchanged)."""

    def __init__(self, samples, moving, cost, model, centre, scales, tol_mm):
        self.samples = samples
        self.moving = moving
        self.cost = cost
        self.model = model
        self.centre = centre
        self.scales = scales
        self.tol_mm = tol_mm
        self.evaluations = 0
        self.min_weight = max(64.0, MIN_OVERLAP * len(samples.points))
        self._values = {}  # metric_at's values by parameters: the optimiser's start is a candidate already valued

    def _evaluate(self, params):
        value, gmat, weight = moments.evaluate(self.cost, self.samples, self.moving,
                                               self.model.matrix(params, self.centre))
        if weight < self.min_weight:
            return NO_OVERLAP_VALUE, None
        return value, gmat

    def metric_at(self, params):
        key = np.asarray(params, dtype=np.float64).tobytes()
        if key not in self._values:
            if len(self._values) >= 4:
                self._values.clear()
            self._values[key] = self._evaluate(params)[0]
        return self._values[key], None, None

    def __call__(self, q):
        self.evaluations += 1
        params = q * self.scales
        if not np.all(np.isfinite(params)):
            raise RegistrationError("optimiser produced non-finite parameters")
        value, gmat = self._evaluate(params)
        if gmat is None:
            return -value, np.zeros_like(q)
        grad = np.tensordot(self.model.dmatrix(params, self.centre), gmat, axes=([1, 2], [0, 1]))
        return -value, -grad * self.scales


@dataclass(frozen=True)
class _FixedLevel:
    spacing: float
    samples: object        # MomentSamples or histogram.Samples


def _fixed_levels(reference: Volume, spacings, sampling, rng, cost, value_range):
    """Sample points of the reference per level, inside its head mask (coarse to fine)."""
    head = masks.auto_mask(reference)
    out = []
    for li, spacing in enumerate(spacings):
        flev = pyramid.downsample(reference, spacing, serial=True)
        fraction = min(1.0, max(sampling, MIN_POINTS / max(1, int(np.prod(flev.shape)))))
        pts, vals = pyramid.sample_grid(flev, fraction, rng)
        keep = masks.values_at(head, pts) >= 0.5
        if np.count_nonzero(keep) < 64:
            raise InputError(f"the reference has too little signal to register to ({np.count_nonzero(keep)} "
                             f"sample points at {spacing:g} mm)", path=reference.name)
        pts, vals = pts[keep], vals[keep]
        samples = (histogram.make_samples(pts, vals, MI_BINS, value_range) if cost == "mi"
                   else moments.make_samples(pts, vals, value_range))
        out.append(_FixedLevel(float(spacing), samples))
    return out


def _moving_levels(volume: Volume, spacings, cost, value_range):
    """The volume at every level (coarse to fine), ready for the cost (serial: runs in the pool)."""
    out = []
    for spacing in spacings:
        lev = pyramid.downsample(volume, spacing, serial=True)
        out.append(histogram.make_moving_level(lev, MI_BINS, value_range) if cost == "mi"
                   else moments.make_moving(lev, value_range))
    return out


def _spacings(reference: Volume, grid: Volume, levels, finest_fwhm_vox):
    """Level resolutions (mm, coarse to fine): :func:`regkl.pyramid.default_spacings`, the finest
    compared at a FWHM of ``finest_fwhm_vox`` voxels (smoothing against interpolation bias and noise)."""
    spacings = pyramid.default_spacings(reference, grid, levels)
    finest = spacings[-1] * finest_fwhm_vox
    return [s for s in spacings[:-1] if s > finest * COARSER] + [finest]


def _objective(cost, fixed_level, moving_level, model, centre, scales, finest=True):
    tol = (STEP_TOL if finest else COARSE_STEP_TOL) * fixed_level.spacing
    if cost == "mi":
        return _Objective(fixed_level.samples, moving_level, model, get_metric("mi"), centre, scales, None, tol)
    return _MomentObjective(fixed_level.samples, moving_level, cost, model, centre, scales, tol)


def _register_block(indices, fixed, volumes, starts, cost, centre, scales, max_iter, first_level, spacings,
                    value_range):
    """Register the volumes ``indices`` in order: {t: (ref2volume, cost value) or None (no overlap)}.

    Each starts from the better (coarsest level's cost) of its entry in ``starts`` and the
    previous volume's estimate in this block.
    """
    model = get_model("rigid")
    out = {}
    previous = None
    with histogram.serial_kernels():
        for t in indices:
            levels = _moving_levels(volumes[t], spacings[first_level:], cost, value_range)
            levels = [None] * first_level + levels
            # candidates valued on the first level's objective, which keeps the values for the optimiser's start
            first = _objective(cost, fixed[first_level], levels[first_level], model, centre, scales,
                               first_level == len(fixed) - 1)
            candidates = [starts[t]] + ([] if previous is None else [previous])
            values = [first.metric_at(model.from_matrix(m, centre))[0] for m in candidates]
            if max(values) <= NO_OVERLAP_VALUE:
                out[t] = None
                continue
            best = int(np.argmax(values))
            params = model.from_matrix(candidates[best], centre)
            value = values[best]
            for li in range(first_level, len(fixed)):
                obj = first if li == first_level else _objective(cost, fixed[li], levels[li], model, centre, scales,
                                                                 li == len(fixed) - 1)
                params, value, _ = _lbfgs(obj, params, max_iter)
            previous = model.matrix(params, centre)
            out[t] = (previous, value)
    return out


def _run_pass(fixed, volumes, starts, usable, cost, centre, scales, max_iter, first_level, threads, spacings,
              value_range):
    """One registration of every usable volume; returns {t: (matrix, value) or None}."""
    todo = [t for t in range(len(volumes)) if usable[t]]
    blocks = [todo[i:i + BLOCK] for i in range(0, len(todo), BLOCK)]
    args = (fixed, volumes, starts, cost, centre, scales, max_iter, first_level, spacings, value_range)
    results = {}
    if threads <= 1 or len(blocks) == 1:
        for b in blocks:
            results.update(_register_block(b, *args))
        return results
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, SWITCH_INTERVAL_S))
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for part in pool.map(lambda b: _register_block(b, *args), blocks):
                results.update(part)
    finally:
        sys.setswitchinterval(before)
    return results


def _most_typical(volumes, usable, n_skip):
    """Index of the usable steady-state volume best correlated with the per-voxel median of those
    volumes (over every second voxel along each axis: plenty to rank them). The median, not the
    mean: a volume with corrupt voxels drags the mean toward itself and would be chosen."""
    idx = [t for t in range(len(volumes)) if usable[t] and t >= n_skip] or [t for t in range(len(volumes))
                                                                            if usable[t]]
    sub = np.stack([volumes[t].data[::2, ::2, ::2].ravel() for t in idx]).astype(np.float64)
    typical = np.median(sub, axis=0)
    typical -= typical.mean()
    sub -= sub.mean(axis=1, keepdims=True)
    scores = (sub @ typical) / np.maximum(np.linalg.norm(sub, axis=1) * np.linalg.norm(typical), 1e-300)
    return idx[int(np.argmax(scores))]


def _reference_volume(volumes, usable, reference, n_skip):
    """The first pass's target from 'auto', 'mean', 'median', a volume index or a 3D Volume."""
    if isinstance(reference, Volume):
        return reference if reference.note else reference.with_data(reference.data, note=f"image {reference.name}")
    if isinstance(reference, bool) or (isinstance(reference, (int, np.integer)) and reference < 0):
        raise InputError(f"reference volume {reference!r}: give a volume index counted from 0 (the first volume)",
                         path=volumes[0].name)
    if reference == "auto":
        reference = _most_typical(volumes, usable, n_skip)
    good = [v.data for v, ok in zip(volumes, usable) if ok]
    if isinstance(reference, (int, np.integer)):
        n = len(volumes)
        if not -n <= reference < n:
            raise InputError(f"reference volume {reference} requested but the series has {n} volumes "
                             f"(0..{n - 1})", path=volumes[0].name)
        if not usable[reference]:
            raise InputError(f"reference volume {int(reference) % n} is constant (empty or not-a-number)",
                             path=volumes[0].name)
        return volumes[reference].with_data(volumes[reference].data, note=f"volume {int(reference) % n}")
    reducers = {"mean": lambda a: np.mean(a, axis=0, dtype=np.float64), "median": median_of_volumes}
    if reference not in reducers:
        raise InputError(f"unknown reference {reference!r}; choose auto, mean, median, a volume index or a "
                         "3D image")
    return volumes[0].with_data(reducers[reference](np.stack(good)).astype(np.float32),
                                note=f"{reference} of {len(good)} volumes")


def _fill_flagged(matrices, usable):
    """Flagged volumes take the nearest earlier usable volume's transform (else the next one's)."""
    good = [t for t in range(len(matrices)) if usable[t]]
    out = list(matrices)
    for t in range(len(out)):
        if not usable[t]:
            earlier = [g for g in good if g < t]
            out[t] = matrices[earlier[-1] if earlier else good[0]]
    return np.stack(out)


def realigned_volumes(volumes, grid: Volume, ref2volume, *, interp: str = "linear", threads: int = 1) -> np.ndarray:
    """Every volume resampled on ``grid`` through its ``ref2volume`` matrix (one resampling).

    Returns
    -------
    ndarray (T, I, J, K), float32
        Volume ``t`` is ``resample(volumes[t], grid, ref2volume[t], interp=interp)``; ``threads``
        volumes at a time (serial kernels; identical results).
    """
    out = np.empty((len(volumes),) + tuple(grid.shape), dtype=np.float32)

    def one(t):
        out[t] = resample(volumes[t], grid, ref2volume[t], interp=interp, serial=True).data

    if threads <= 1 or len(volumes) < 2:
        for t in range(len(volumes)):
            one(t)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(one, range(len(volumes))))
    return out


def realign(volumes, *, reference="auto", cost: str = "nc", two_pass: bool = False, sampling: float = SAMPLING,
            levels: int | None = None, finest_fwhm_vox: float = FINEST_FWHM_VOX, seed: int = 0,
            max_iter: int = 100, threads: int = 1, log=None) -> RealignResult:
    """Rigid head-motion correction of a series of volumes on one grid.

    Parameters
    ----------
    volumes : sequence of Volume
        The volumes of a 4D series, in acquisition order (at least 2), on one grid.
    reference : {'auto', 'mean', 'median'} or int or Volume
        Target of the first pass: 'auto' is the steady-state volume best correlated with the
        series mean (a typical pose, never a spike or a dummy scan); or the mean or median of the
        series (blurred by the motion itself: less accurate), volume N (0-based), or any 3D image
        in the same world space (its grid becomes the output grid).
    cost : {'nc', 'ls', 'mi'}
        Normalised correlation, least squares (:mod:`regkl.moments`) or mutual information.
    two_pass : bool
        Register again to the mean of the first pass's realigned series (MCFLIRT, SPM), resampled
        with cubic splines (trilinear resampling blurs each volume by an amount that depends on
        its sub-voxel shift, which biases the second pass).
    sampling : float
        Fraction (0, 1] of the reference's grid points used at every level (at least
        :data:`MIN_POINTS` of them), those inside its head mask.
    levels : int, optional
        Pyramid levels; default from the voxel size (:func:`regkl.pyramid.default_spacings`).
    finest_fwhm_vox : float
        Resolution (FWHM, in voxels of the series) at which the finest level compares the images.
    seed : int
        Seed of the sample jitter and subsampling; results are identical for a seed whatever
        ``threads``.
    max_iter : int
        Optimiser iterations per level and volume.
    threads : int
        Blocks of :data:`BLOCK` volumes registered concurrently (serial kernels, no GIL).
    log : callable(str), optional

    Returns
    -------
    RealignResult

    Raises
    ------
    InputError
        Fewer than 2 volumes, volumes on different grids, every volume constant, an unknown
        cost or reference, a reference that does not overlap the series, a reference image that
        does not look like the series with cost 'nc' or 'ls' (:data:`regkl.realign_checks.MIN_REFERENCE_CORRELATION`).
    """
    t0 = time.perf_counter()
    say = log or (lambda msg: None)
    volumes = list(volumes)
    if len(volumes) < 2:
        name = volumes[0].name if volumes else None
        raise InputError(f"a series of {len(volumes)} volume{'s' * (len(volumes) != 1)} has no motion to "
                         "correct; realign needs a 4D series of at least 2 volumes", path=name)
    if cost not in COSTS:
        raise InputError(f"unknown cost {cost!r}; choose one of {', '.join(COSTS)}")
    if not 0.0 < sampling <= 1.0:
        raise InputError(f"sampling must be in (0, 1], got {sampling}")
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise InputError(f"threads must be a whole number of at least 1, got {threads!r}")
    grid = volumes[0]
    if any(v.shape != grid.shape or not np.allclose(v.vox2ras, grid.vox2ras) for v in volumes):
        raise InputError("the volumes of the series are not on one grid", path=grid.name)
    thin_series_warning(grid)
    volumes, usable = usable_series(volumes)
    if not any(usable):
        raise InputError(f"no volume of the series can be realigned: each is constant or has fewer than "
                         f"{MIN_FINITE_VOXELS} finite voxels (of {int(np.prod(grid.shape))})", path=grid.name)
    flags = ["" if ok else "empty" for ok in usable]

    n_skip = non_steady_volumes(np.array([float(np.mean(v.data, dtype=np.float64)) for v in volumes]))
    target = _reference_volume(volumes, usable, reference, n_skip)
    out_grid = target
    centre = target.centre
    spacings = _spacings(target, grid, levels, finest_fwhm_vox)
    model = get_model("rigid")
    rng = np.random.default_rng(seed)
    value_range = histogram.robust_range(target.data)
    identity = [np.eye(4)] * len(volumes)

    def one_pass(ref_vol, starts, first_level, label):
        fixed = _fixed_levels(ref_vol, spacings, sampling, rng, cost, value_range)
        pts = fixed[-1].samples.points
        radius = max(10.0, float(np.sqrt(np.mean(np.sum((pts - centre) ** 2, axis=1)))))
        tp = time.perf_counter()
        with threadpool_limits(limits=1, user_api="blas"):  # BLAS threads only slow the optimiser's tiny steps
            res = _run_pass(fixed, volumes, starts, usable, cost, centre, model.scales(radius), max_iter,
                            first_level, threads, spacings, value_range)
        say(f"{label}: {sum(usable)} volumes to {ref_vol.note or ref_vol.name} in {time.perf_counter() - tp:.2f} s")
        return res

    res = one_pass(target, identity, 0, "pass 1")
    for t, r in res.items():
        if r is None:
            flags[t] = "no-overlap"
    ok = [r is not None for r in (res.get(t) for t in range(len(volumes)))]
    if not any(ok):
        raise InputError("the reference does not overlap any volume of the series", path=target.name)
    matrices = _fill_flagged([res[t][0] if ok[t] else np.eye(4) for t in range(len(volumes))], ok)
    passes = 1
    if two_pass:
        aligned = realigned_volumes([volumes[t] for t in range(len(volumes)) if ok[t]], out_grid, matrices[np.asarray(ok)],
                                    interp="cubic", threads=threads)
        mean = np.mean(aligned, axis=0, dtype=np.float64)
        target = out_grid.with_data(mean.astype(np.float32), note="mean of the realigned series")
        second = one_pass(target, list(matrices), len(spacings) - 1, "pass 2")
        for t, r in second.items():
            if r is not None:
                res[t] = r
        matrices = _fill_flagged([res[t][0] if ok[t] else np.eye(4) for t in range(len(volumes))], ok)
        passes = 2

    params = np.stack([model.from_matrix(m, centre) for m in matrices])
    values = np.array([res[t][1] if ok[t] else np.nan for t in range(len(volumes))])
    for t in poor_fits(values, ok, cost, n_skip):
        flags[t] = "poor-fit"
    fit = [ok[t] and flags[t] != "poor-fit" for t in range(len(volumes))]
    keep = [t for t in range(len(volumes)) if fit[t] and t >= n_skip] or [t for t in range(len(volumes)) if ok[t]]
    aligned = realigned_volumes([volumes[t] for t in keep], out_grid, matrices[keep], threads=threads)
    boldref = out_grid.with_data(median_of_volumes(aligned, threads), note=f"median of {len(keep)} realigned volumes")
    if isinstance(reference, Volume) and cost != "mi":
        check_resemblance(boldref, reference, cost)
    for t, f in enumerate(flags):
        if f:
            say(f"volume {t}: {FLAGS[f]}")
    return RealignResult(
        ref2volume=matrices, params=params, centre=centre,
        framewise_displacement=framewise_displacement(params), reference=target, boldref=boldref,
        n_non_steady=int(n_skip), flags=tuple(flags), cost=cost, cost_values=values,
        seconds=time.perf_counter() - t0,
        settings={"reference": reference if not isinstance(reference, Volume) else reference.name,
                  "cost": cost, "passes": passes, "sampling": sampling, "spacings_mm": spacings, "seed": seed,
                  "finest_fwhm_vox": finest_fwhm_vox, "block": BLOCK, "max_iter": max_iter})
