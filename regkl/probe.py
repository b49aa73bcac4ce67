"""The registration metric of two images at given poses (:class:`MetricProbe`,
:func:`evaluate_metric`), and the KL prior learnt from aligned pairs (:func:`learn_prior`)."""

from __future__ import annotations

import numpy as np

from . import histogram, pyramid
from .errors import InputError, RegistrationError
from .levels import _build_levels
from .metrics import NATIVE_FIXED_METRICS, get_metric
from .volume import Volume, as_volume


class MetricProbe:
    """The metric of two images at the registration's finest level, for any fixed->moving matrix.

    The sample points, intensity ranges and masks are set up once, as :func:`regkl.optimize.register`
    sets up its finest level, so many poses can be evaluated cheaply (:func:`evaluate_metric`,
    :mod:`regkl.landscape`).

    Parameters
    ----------
    moving, fixed : Volume
    metric, bins, prior, fixed_mask, moving_mask, sampling, seed
        As for :func:`regkl.optimize.register`.

    Attributes
    ----------
    spacing_mm : float
        Spacing of the finest level.
    n_points : int
        Fixed sample points.
    min_valid : int
        Points that must fall inside the moving image for a value (as in :func:`regkl.optimize.register`).
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
        self.min_valid = self.level.min_valid

    def __call__(self, fixed2moving: np.ndarray):
        """(metric value, or None where fewer than ``min_valid`` points overlap; overlap fraction; points inside)."""
        ev = histogram.joint_histogram(self.level.samples, self.level.moving,
                                       np.asarray(fixed2moving, dtype=np.float64))
        overlap = float(ev.mov_w.sum() / self.n_points)
        if ev.n_valid < self.min_valid:
            return None, overlap, int(ev.n_valid)
        return float(self.metric_fn(ev.hist)[0]), overlap, int(ev.n_valid)


def evaluate_metric(moving: Volume | str, fixed: Volume | str, fixed2moving: np.ndarray | None = None, *,
                    metric: str = "mi", bins: int = 24, prior=None, fixed_mask: Volume | None = None,
                    moving_mask: Volume | None = None, sampling: float = 1.0, seed: int = 0):
    """Similarity of two images in world space, as the registration's finest level sees it.

    Parameters
    ----------
    moving, fixed : Volume, nibabel image or path
    fixed2moving : ndarray (4, 4), optional
        RAS fixed -> moving; identity (the headers) when omitted.
    metric, bins, prior, fixed_mask, moving_mask, sampling, seed
        As for :func:`regkl.optimize.register`.

    Returns
    -------
    value : float
        Metric value (higher is more similar).
    overlap : float
        Fraction of the fixed sample points that fall inside the moving image (and masks).
    """
    moving, fixed = as_volume(moving, what="moving"), as_volume(fixed, what="fixed")
    probe = MetricProbe(moving, fixed, metric=metric, bins=bins, prior=prior, fixed_mask=fixed_mask,
                        moving_mask=moving_mask, sampling=sampling, seed=seed)
    value, overlap, n_valid = probe(np.eye(4) if fixed2moving is None else fixed2moving)
    if value is None:
        if n_valid == 0:
            raise RegistrationError(f"the images do not overlap (none of the {probe.n_points} sample points of the "
                                    "fixed image falls inside the moving image)")
        raise RegistrationError(f"too little overlap to measure: {n_valid} of the {probe.n_points} sample points of "
                                f"the fixed image fall inside the moving image, at least {probe.min_valid} are "
                                "needed")
    return value, overlap


def learn_prior(pairs, *, bins: int = 24, sampling: float = 1.0, seed: int = 0) -> np.ndarray:
    """Expected joint histogram for ``metric='kl'`` from already-aligned pairs (Chung et al. 2002).

    Each pair is binned exactly as :func:`regkl.optimize.register` bins its finest level (robust intensity ranges,
    box bins for the fixed image, cubic B-spline window for the moving one) at its known transform,
    and the normalised histograms are averaged.

    Parameters
    ----------
    pairs : iterable of (moving Volume, fixed Volume, fixed2moving (4, 4) or None)
        Aligned pairs; None means the headers already align them.
    bins, sampling, seed
        As for :func:`regkl.optimize.register` (use the same ``bins`` when registering).

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
