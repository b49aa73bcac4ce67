"""What :func:`regkl.realign.realign` checks about its input and its result.

Before the estimation: non-finite voxels become background, intensities far outside the series'
range are taken as no data for the costs (one corrupt voxel of 1e30 made up tens of millimetres of motion),
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
#: range are taken as no data (0) for the costs (a hot voxel, a scanner spike); real bright features (eyes,
#: vessels, fat: up to 2-4 times the 99.9th percentile) stay inside.
CLIP_SPANS = 4.0
#: Fewer slices than this along an axis leave through-plane motion poorly determined: warned.
MIN_SLICES = 4
#: A volume is flagged 'poor-fit' when its final cost falls below the series' median by more than
#: ``drop`` (in the cost's units; ``relative``: that fraction of the median) and by more than
#: :data:`POOR_FIT_MADS` robust standard deviations, or (``floor``) below an absolute value whatever
#: the other volumes do. Measured on synthetic and sample series: correctly realigned volumes,
#: spikes of 8 mm / 6 degrees and dummy scans included, stay within 0.001-0.03 of the median NC;
#: noise, inverted or out-of-view volumes fall to NC 0.02-0.32. Under 'ls' dummy scans are
#: misregistered (146 mm) and fall 0.06-0.37 below; under 'mi' they are registered right but lose
#: half their MI, so 'mi' leaves the non-steady-state volumes out of this check.
POOR_FIT = {"nc": {"drop": 0.2, "floor": 0.5, "skip_non_steady": False},
            "ls": {"drop": 0.03, "floor": None, "skip_non_steady": False},
            "mi": {"relative": 0.5, "floor": None, "skip_non_steady": True}}
#: The robust (MAD-based) z-score a relative fall must also exceed.
POOR_FIT_MADS = 10.0
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
    series' 0.1-99.9 % percentile range outside it are no data (0) too. A volume is usable
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
    n_outside, extreme, volumes_hit = 0, 0.0, []
    for t, v in enumerate(out):
        vmin, vmax = float(v.data.min()), float(v.data.max())
        usable[t] = usable[t] and vmax > vmin
        if hi > lo and (vmax > high or vmin < low):
            outside = (v.data > high) | (v.data < low)
            n_outside += int(np.count_nonzero(outside))
            extreme = max(extreme, abs(vmax - hi), abs(vmin - lo))
            volumes_hit.append(t)
            out[t] = v.with_data(np.where(outside, np.float32(0.0), v.data).astype(np.float32))
    if n_outside:
        shown = ", ".join(str(t) for t in volumes_hit[:5]) + (" ..." if len(volumes_hit) > 5 else "")
        warnings.warn(f"{name}: {n_outside} voxel(s) in volume(s) {shown} lie far outside the series' intensity "
                      f"range ({lo:.4g} to {hi:.4g}; up to {extreme:.3g} away): taken as no data (0) "
                      f"for the realignment only (corrupt voxels?; bounds {low:.4g} to {high:.4g})", stacklevel=3)
    return out, usable


def thin_series_warning(grid: Volume) -> None:
    """Warn when the series has fewer than :data:`MIN_SLICES` slices along an axis."""
    thin = [(axis, n) for axis, n in enumerate(grid.shape[:3]) if n < MIN_SLICES]
    if thin:
        axis, n = thin[0]
        warnings.warn(f"{grid.name}: the series has only {n} slice(s) along voxel axis {axis}: motion across "
                      "them (and rotation about the other axes) is poorly determined; check the estimates",
                      stacklevel=3)


def poor_fits(values, usable, cost: str, n_non_steady: int = 0) -> list:
    """Indices of the volumes whose final cost ``values`` (higher is better) fall far below the
    series' (rules per cost in :data:`POOR_FIT`): their registration to the reference did not find
    a match (a volume of noise, another contrast, a volume moved out of the field of view)."""
    rule = POOR_FIT[cost]
    v = np.asarray(values, dtype=np.float64)
    good = np.asarray(usable, dtype=bool) & np.isfinite(v)
    if rule["skip_non_steady"]:
        good[:n_non_steady] = False
    flagged = np.zeros(len(v), dtype=bool)
    if rule["floor"] is not None:
        flagged |= good & (v < rule["floor"])
    if np.count_nonzero(good) >= 3:
        med = float(np.median(v[good]))
        sd = 1.4826 * float(np.median(np.abs(v[good] - med)))
        margin = rule["drop"] if "drop" in rule else rule["relative"] * abs(med)
        flagged |= good & (v < med - max(margin, POOR_FIT_MADS * sd))
    return [int(t) for t in np.flatnonzero(flagged)]


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
