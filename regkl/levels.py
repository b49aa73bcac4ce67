"""Pyramid levels of a registration: fixed sample points, moving level, masks and no-data voxels
per level, and the checks that every level has enough sample points."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import histogram, masks, pyramid
from .errors import InputError, KernelInputError
from .objective import MIN_OVERLAP
from .volume import Volume


@dataclass(frozen=True)
class _Level:
    spacing: float
    samples: histogram.Samples
    moving: histogram.MovingLevel
    fixed_image: Volume
    moving_image: Volume
    #: Sample points that must fall inside the moving image for a metric value.
    min_valid: int = 64


#: Fewest fixed sample points a level may have: a coarser level with fewer is left out, a finest
#: level with fewer is refused.
MIN_LEVEL_POINTS = 64


def reachable_fraction(fixed: Volume, moving: Volume) -> float:
    """Largest fraction of the fixed image's sample points that can fall inside the moving image:
    ``min(1, moving field-of-view volume / fixed field-of-view volume)``.

    :data:`MIN_OVERLAP` is taken of this fraction, so a moving image much smaller than the fixed
    one (a slab of a few slices) is not refused for an overlap it can never have.
    """
    def fov(v):
        return float(np.prod(np.asarray(v.shape, dtype=np.float64) * v.spacing))

    return min(1.0, fov(moving) / fov(fixed))


def _too_few_points(fixed, moving, spacing, n, sampling, fixed_mask, roles):
    """InputError for a finest level with fewer than MIN_LEVEL_POINTS sample points, in the user's terms
    (``roles``: what the user calls the sampled image and the other one)."""
    limiting, limiting_name = ((roles[1], moving.name) if float(np.min(moving.spacing)) > float(np.min(fixed.spacing))
                               else (roles[0], fixed.name))
    vox = "x".join(f"{v:.4g}" for v in fixed.spacing)
    where = f" inside the {roles[0]} mask" if fixed_mask is not None else ""
    text = (f"only {n} sample points{where} (at least {MIN_LEVEL_POINTS} are needed): the {roles[0]} image "
            f"({'x'.join(map(str, fixed.shape))} voxels of {vox} mm) is sampled at {spacing:.4g} mm, the voxel size "
            f"of the {limiting} image ({limiting_name})")
    if sampling < 1.0:
        text += f", keeping a fraction {sampling:g} of the points (--sampling)"
    if sampling < 1.0 and n / sampling >= 2 * MIN_LEVEL_POINTS:
        text += f"; use --sampling {min(1.0, 2 * MIN_LEVEL_POINTS * sampling / max(n, 1)):.2g} or more"
    return InputError(text, path=fixed.name)


def _build_levels(moving, fixed, spacings, bins, sampling, rng, fixed_mask, moving_mask, native_finest=False,
                  roles=("fixed", "moving"), max_points=None):
    """Pyramid levels, coarse to fine. With ``native_finest`` (the metrics in
    :data:`regkl.metrics.NATIVE_FIXED_METRICS`), the finest level's sample points keep their
    positions but take their fixed intensities from ``fixed`` itself, unsmoothed.

    Non-finite voxels are no data on both sides: fixed sample points that touch one are left out,
    and moving points whose interpolation touches one count as outside the moving image
    (:func:`regkl.pyramid.no_data_mask`, applied like a moving mask). A coarse level with fewer than
    :data:`MIN_LEVEL_POINTS` sample points is left out; a finest one is refused. ``roles``: what the
    user calls ``fixed`` and ``moving``, for messages (they differ when registering the other way).
    ``max_points`` caps the sample points of every level (None: no cap)."""
    levels = []
    reach = reachable_fraction(fixed, moving)
    for li, spacing in enumerate(spacings):
        finest = li == len(spacings) - 1
        flev = pyramid.downsample(fixed, spacing)
        mlev = pyramid.downsample(moving, spacing)
        pts, vals = pyramid.sample_grid(flev, sampling, rng, max_points=max_points)
        if native_finest and finest:
            vals = pyramid.values_at(fixed, pts)
            keep = np.isfinite(vals)
            pts, vals = pts[keep], vals[keep]
        if fixed_mask is not None:
            keep = masks.values_at(fixed_mask, pts) >= 0.5
            if np.count_nonzero(keep) < 64:
                raise InputError(f"{roles[0]} mask keeps only {np.count_nonzero(keep)} sample points at "
                                 f"{spacing:g} mm; it does not overlap the {roles[0]} image", path=fixed_mask.name)
            pts, vals = pts[keep], vals[keep]
        if len(pts) < MIN_LEVEL_POINTS:
            if not finest:
                continue
            raise _too_few_points(fixed, moving, spacing, len(pts), sampling, fixed_mask, roles)
        mmask = None if moving_mask is None else masks.on_grid(moving_mask, mlev)
        if mmask is not None and not np.any(mmask > 0):
            raise InputError(f"{roles[1]} mask does not overlap the {roles[1]} image", path=moving_mask.name)
        nodata = pyramid.no_data_mask(mlev)
        mdata = mlev
        if nodata is not None:
            if not np.any(nodata > 0):
                raise InputError(f"{roles[1]} image has no finite voxel away from its NaN/infinite ones at "
                                 f"{spacing:g} mm", path=moving.name)
            mmask = nodata if mmask is None else mmask * nodata
            mdata = mlev.with_data(np.where(nodata > 0, mlev.data, np.float32(0.0)))
        try:
            samples = histogram.make_samples(pts, vals, bins)
        except KernelInputError as exc:
            raise InputError(f"{roles[0]} image has no contrast at its {len(pts)} sample points"
                             f"{f' inside the {roles[0]} mask' if fixed_mask is not None else ''} ({exc.problem})",
                             path=fixed.name) from exc
        try:
            mlevel = histogram.make_moving_level(mdata, bins, mask=mmask)
        except KernelInputError as exc:
            raise InputError(f"{roles[1]} image has no contrast{f' inside the {roles[1]} mask' if moving_mask else ''} "
                             f"({exc.problem})", path=moving.name) from exc
        levels.append(_Level(float(spacing), samples, mlevel, flev, mlev,
                             max(64, int(MIN_OVERLAP * reach * len(pts)))))
    return levels
