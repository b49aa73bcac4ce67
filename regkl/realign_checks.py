"""What :func:`regkl.realign.realign` checks about its input and its result.

Before the estimation: non-finite voxels become background, intensities far outside the series'
range are clipped for the costs (one corrupt voxel of 1e30 made up tens of millimetres of motion),
and a series of very few slices is warned about. After it: volumes that match the reference
poorly are flagged, and a reference image of another contrast is refused for the same-modality
costs. None of this changes the files the series came from or the realigned series written.
"""

from __future__ import annotations

import warnings

import numpy as np

from . import masks, pyramid
from .errors import InputError
from .io import MIN_FINITE_VOXELS
from .resample import resample
from .volume import Volume

#: Intensities beyond the series' 0.1-99.9 % percentile range by more than this many times that
#: range are clipped to it for the costs (a hot voxel, a scanner spike); real data stay far inside.
CLIP_SPANS = 1.0
#: Fewer slices than this along an axis leave through-plane motion poorly determined: warned.
MIN_SLICES = 4
#: A volume is flagged 'poor-fit' when its final normalised correlation with the reference is
#: below the series' median by more than this (and by more than :data:`POOR_FIT_MADS` robust
#: standard deviations). Correctly realigned volumes, spikes of 8 mm / 6 degrees included, sit
#: within a few hundredths of the median.
POOR_FIT_NC_DROP = 0.2
#: The robust (MAD-based) z-score a poor fit must also exceed, for every cost.
POOR_FIT_MADS = 10.0
#: For the costs whose scale is not bounded ('ls', 'mi'): the relative fall from the median a poor
#: fit must exceed.
POOR_FIT_RELATIVE = 0.5
#: A reference image given as a file must look like the series' volumes for the same-modality costs:
#: the correlation of the realigned median with it (both smoothed to twice its voxel size, over the
#: brighter half of its head mask: tissue contrast, not the head's outline) is at least this. Single
#: volumes of synthetic and real-b0 series, even with noise at 30 % of the signal, scored 0.79-0.99;
#: the sample BOLD's T1 as reference scored 0.07 and made up about 1 mm of motion.
MIN_REFERENCE_CORRELATION = 0.5


def usable_series(volumes):
    """(volumes, usable) ready for the costs.

    NaN/Inf voxels (no data, e.g. SPM's background) become 0, the background of a BOLD series, so
    that the same-modality costs stay finite; intensities beyond :data:`CLIP_SPANS` times the
    series' 0.1-99.9 % percentile range outside it are clipped to that bound. A volume is usable
    when it keeps at least :data:`MIN_FINITE_VOXELS` finite voxels and is not constant. Only the
    volumes that change are copied; one warning per kind, with the counts.
    """
    out, usable, n_bad = [], [], 0
    for v in volumes:
        finite = np.isfinite(v.data)
        n_finite = int(np.count_nonzero(finite))
        if n_finite < v.data.size:
            n_bad += v.data.size - n_finite
            v = v.with_data(np.where(finite, v.data, np.float32(0.0)).astype(np.float32))
        usable.append(n_finite >= MIN_FINITE_VOXELS)
        out.append(v)
    name = volumes[0].name
    if n_bad:
        warnings.warn(f"{name}: {n_bad} NaN/infinite voxels in the series are no data: taken as "
                      "background (0) for realignment", stacklevel=3)
    good = [v for v, ok in zip(out, usable) if ok]
    if not good:
        return out, usable
    sample = np.concatenate([v.data[::3, ::3, ::3].ravel() for v in good])
    lo, hi = (float(x) for x in np.percentile(sample, [0.1, 99.9]))
    low, high = lo - CLIP_SPANS * (hi - lo), hi + CLIP_SPANS * (hi - lo)
    n_clipped, extreme, volumes_clipped = 0, 0.0, []
    for t, v in enumerate(out):
        vmin, vmax = float(v.data.min()), float(v.data.max())
        usable[t] = usable[t] and vmax > vmin
        if hi > lo and (vmax > high or vmin < low):
            outside = (v.data > high) | (v.data < low)
            n_clipped += int(np.count_nonzero(outside))
            extreme = max(extreme, abs(vmax - hi), abs(vmin - lo))
            volumes_clipped.append(t)
            out[t] = v.with_data(np.clip(v.data, low, high).astype(np.float32))
    if n_clipped:
        shown = ", ".join(str(t) for t in volumes_clipped[:5]) + (" ..." if len(volumes_clipped) > 5 else "")
        warnings.warn(f"{name}: {n_clipped} voxel(s) in volume(s) {shown} lie far outside the series' intensity "
                      f"range ({lo:.4g} to {hi:.4g}; up to {extreme:.3g} away): clipped to [{low:.4g}, {high:.4g}] "
                      "for the realignment only (corrupt voxels?)", stacklevel=3)
    return out, usable


def thin_series_warning(grid: Volume) -> None:
    """Warn when the series has fewer than :data:`MIN_SLICES` slices along an axis."""
    thin = [(axis, n) for axis, n in enumerate(grid.shape[:3]) if n < MIN_SLICES]
    if thin:
        axis, n = thin[0]
        warnings.warn(f"{grid.name}: the series has only {n} slice(s) along voxel axis {axis}: motion across "
                      "them (and rotation about the other axes) is poorly determined; check the estimates",
                      stacklevel=3)


def poor_fits(values, usable, cost: str) -> list:
    """Indices of the volumes whose final cost ``values`` (higher is better) fall far below the
    series' median: their registration to the reference did not find a match (a volume of noise,
    another contrast, a volume moved out of the field of view)."""
    v = np.asarray(values, dtype=np.float64)
    good = np.asarray(usable, dtype=bool) & np.isfinite(v)
    if np.count_nonzero(good) < 3:
        return []
    med = float(np.median(v[good]))
    sd = 1.4826 * float(np.median(np.abs(v[good] - med)))
    margin = POOR_FIT_NC_DROP if cost == "nc" else POOR_FIT_RELATIVE * abs(med)
    bound = med - max(margin, POOR_FIT_MADS * sd)
    return [int(t) for t in np.flatnonzero(good & (v < bound))]


def check_resemblance(boldref: Volume, reference: Volume, cost: str) -> None:
    """InputError when a reference image does not look like the realigned series (another contrast):
    the same-modality costs would then report made-up motion. Both are compared at twice the
    reference's coarsest voxel size (noise averaged out, tissue contrast kept)."""
    spacing = 2.0 * float(np.max(reference.spacing))
    ref = pyramid.downsample(reference, spacing)
    head = resample(masks.auto_mask(reference), ref, np.eye(4), interp="nearest").data > 0.5
    inside = head & (ref.data > np.median(ref.data[head]))  # tissue, not the head's outline
    a = pyramid.downsample(boldref, spacing).data[inside].astype(np.float64)
    b = ref.data[inside].astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    corr = float(a @ b / max(np.sqrt((a @ a) * (b @ b)), 1e-300))
    if not corr >= MIN_REFERENCE_CORRELATION:
        raise InputError(f"does not look like the volumes of the series (correlation {corr:.2f} after "
                         f"realignment, below {MIN_REFERENCE_CORRELATION}): the {cost!r} cost needs a reference "
                         "of the same contrast (a volume of the series, its mean, an SBRef or boldref); for "
                         "another contrast use --cost mi", path=reference.name)
