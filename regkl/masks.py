"""Masks: automatic foreground masks and masks resampled onto the grids the registration uses."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .errors import InputError
from .volume import Volume


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold (maximum between-class variance) of finite values, robust range."""
    v = values[np.isfinite(values)]
    lo, hi = np.percentile(v, [0.5, 99.5])
    if not hi > lo:
        return float(lo)
    hist, edges = np.histogram(np.clip(v, lo, hi), bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mu0 = m0 / np.maximum(w0, 1)
    mu1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


#: An automatic mask is refused (:func:`mask_problem`) when it keeps less than this fraction of the
#: image's signal (sum of positive intensities)...
MIN_SIGNAL_KEPT = 0.6
#: ... when more than this fraction of its voxels are background (below half Otsu's level, after
#: the light smoothing)...
MAX_BACKGROUND = 0.5
#: ... when the thresholded object's largest connected component holds less than this fraction of
#: it (the foreground is fragmented: noise, or several objects)...
MIN_LARGEST_COMPONENT = 0.5
#: ... or when it covers less than this fraction of the grid.
MIN_COVERAGE = 0.01
#: Automatic masks are built on a grid no finer than this (mm): registration levels are coarser
#: (the mask is resampled trilinearly onto each), and on a 1 mm T1 it is ten times faster.
MASK_SPACING_MM = 2.0


def _working(volume: Volume) -> Volume:
    """``volume`` on the grid automatic masks are built on (see :data:`MASK_SPACING_MM`)."""
    from .pyramid import downsample

    if np.all(volume.spacing >= MASK_SPACING_MM - 1e-6):
        return volume
    return downsample(volume, MASK_SPACING_MM)


def _smoothed(volume: Volume) -> np.ndarray:
    """Lightly smoothed data; NaN is no data: background, not a hole spreading through the filter."""
    finite = np.isfinite(volume.data)
    data = volume.data if finite.all() else np.where(finite, volume.data, np.min(volume.data[finite]))
    return ndimage.gaussian_filter(data, np.maximum(2.0 / volume.spacing, 0.5))


def _fill_holes(fg: np.ndarray) -> np.ndarray:
    """Holes filled in 3D and then in every 2D slice along each axis (an object cut by the field of
    view has cavities, e.g. the ventricles, that open through the cut and so are not 3D holes)."""
    fg = ndimage.binary_fill_holes(fg)
    for axis in range(3):
        for k in range(fg.shape[axis]):
            sl = [slice(None)] * 3
            sl[axis] = k
            fg[tuple(sl)] = ndimage.binary_fill_holes(fg[tuple(sl)])
    return fg


def auto_mask(volume: Volume, *, dilate_mm: float = 4.0) -> Volume:
    """Foreground (head or brain) mask of an image, from the image itself.

    Smooth lightly, threshold at Otsu's level, keep the largest connected component, fill its
    holes (in 3D and slice by slice, see :func:`_fill_holes`) and dilate it by ``dilate_mm`` so the
    object's edges stay inside. Check the result with :func:`mask_problem` before using it.

    Parameters
    ----------
    volume : Volume
    dilate_mm : float
        Dilation (mm) of the thresholded object.

    Returns
    -------
    Volume
        float32 0/1 mask on ``volume``'s grid, or on a grid of about :data:`MASK_SPACING_MM` when
        ``volume``'s voxels are finer (same world extent).

    Raises
    ------
    InputError
        When nothing is above the threshold.
    """
    volume = _working(volume)
    smooth = _smoothed(volume)
    fg = smooth > otsu_threshold(smooth)
    labels, n = ndimage.label(fg)
    if n == 0:
        raise InputError("automatic mask found no foreground", path=volume.name)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    fg = _fill_holes(labels == int(np.argmax(sizes)))
    if dilate_mm > 0:
        fg = ndimage.distance_transform_edt(~fg, sampling=volume.spacing) <= dilate_mm
    return Volume(fg.astype(np.float32), volume.vox2ras, f"auto mask of {volume.name}")


def mask_problem(volume: Volume, mask: Volume) -> str | None:
    """Why an automatic mask should not be used on the image it came from, or None if it is sound.

    Checks (thresholds are the module constants): the mask keeps most of the image's signal
    (:data:`MIN_SIGNAL_KEPT`), is not mostly background (:data:`MAX_BACKGROUND`), comes from an
    object that is mostly one connected piece (:data:`MIN_LARGEST_COMPONENT`) and covers a
    plausible part of the grid (:data:`MIN_COVERAGE`).

    Parameters
    ----------
    volume : Volume
        The image.
    mask : Volume
        A 0/1 mask from :func:`auto_mask` (on ``volume``'s grid or on its working grid).

    Returns
    -------
    str or None
        The problem in words (for a warning), or None.
    """
    if mask.shape != volume.shape:
        volume = _working(volume)
    inside = mask.data > 0.5
    coverage = float(inside.mean())
    if coverage < MIN_COVERAGE:
        return f"it covers only {coverage:.1%} of the image"
    data = np.where(np.isfinite(volume.data), volume.data, 0.0)
    signal = np.clip(data, 0.0, None)
    kept = float(signal[inside].sum() / max(signal.sum(), 1e-300))
    if kept < MIN_SIGNAL_KEPT:
        return f"it keeps only {kept:.0%} of the image's signal"
    smooth = _smoothed(volume)
    level = otsu_threshold(smooth)
    background = float(np.mean(smooth[inside] < 0.5 * level))
    if background > MAX_BACKGROUND:
        return f"{background:.0%} of it is background"
    labels, n = ndimage.label(smooth > level)
    sizes = np.bincount(labels.ravel())[1:]
    largest = float(sizes.max() / max(sizes.sum(), 1)) if n else 0.0
    if largest < MIN_LARGEST_COMPONENT:
        return f"the image's foreground is fragmented ({n} pieces, the largest {largest:.0%} of it)"
    return None


def check_mask(mask: Volume, what: str) -> Volume:
    """Raise InputError if a mask has no positive voxel."""
    if not np.any(mask.data > 0):
        raise InputError(f"{what} is empty (no voxel > 0)", path=mask.name)
    return mask


def values_at(mask: Volume, points: np.ndarray) -> np.ndarray:
    """Mask values (trilinear, 0 outside) at world points (N, 3)."""
    vox = (mask.ras2vox[:3, :3] @ points.T).T + mask.ras2vox[:3, 3]
    return ndimage.map_coordinates(mask.data, vox.T, order=1, mode="constant", cval=0.0)


def on_grid(mask: Volume, grid: Volume) -> np.ndarray:
    """A mask (any grid) smoothed to ``grid``'s resolution and resampled on it, values in [0, 1]."""
    from .pyramid import downsample
    from .resample import resample

    coarse = downsample(mask, float(np.max(grid.spacing)))
    return np.clip(resample(coarse, grid, np.eye(4)).data, 0.0, 1.0)


def checked_auto_mask(volume: Volume, what: str):
    """:func:`auto_mask` of ``volume`` if :func:`mask_problem` finds it sound, else None with a warning.

    Returns
    -------
    (Volume or None, str)
        The mask (or None) and what happened, in words ("used" or "not used: <problem>").
    """
    import warnings

    try:
        mask = auto_mask(volume)
    except InputError:
        mask, problem = None, "no foreground above the threshold"
    else:
        problem = mask_problem(volume, mask)
    if problem is None:
        return mask, "used"
    warnings.warn(f"{volume.name}: automatic {what} not used: {problem}", stacklevel=3)
    return None, f"not used: {problem}"


def prepare_masks(fixed, moving, fixed_mask=None, moving_mask=None, auto=False, *, report=None):
    """The masks a registration uses: given ones checked, missing ones built when ``auto``.

    Parameters
    ----------
    fixed, moving : Volume
    fixed_mask, moving_mask : Volume or None
    auto : bool
        Build a foreground mask (:func:`checked_auto_mask`) for each image without one; a mask
        that fails its sanity check is not used (warning).
    report : dict, optional
        Filled with what happened to each mask: ``{"fixed": ..., "moving": ...}``, each "given",
        "none", "used" (automatic) or "not used: <problem>".

    Returns
    -------
    (fixed_mask, moving_mask) : Volume or None each
    """
    out = {}
    for side, image, given in (("fixed", fixed, fixed_mask), ("moving", moving, moving_mask)):
        if given is not None:
            out[side] = (check_mask(given, f"{side} mask"), "given")
        elif auto:
            out[side] = checked_auto_mask(image, f"{side} mask")
        else:
            out[side] = (None, "none")
    if report is not None:
        report.update({side: how for side, (_, how) in out.items()})
    return out["fixed"][0], out["moving"][0]


#: An image whose signal (voxels above 5 % of its robust range) covers less than this fraction of
#: its grid gets a warning: intensity-based registration of a few hundred bright voxels is
#: unreliable (600 voxels of a 3 mm EPI grid ended 111 mm off, silently).
SPARSE_SIGNAL_FRACTION = 0.02


def sparse_signal_warning(volume: Volume, role: str) -> None:
    """Warn (one line naming the image) when ``volume``'s signal covers less than
    :data:`SPARSE_SIGNAL_FRACTION` of its grid: a mask- or ROI-like image, or one emptied by its
    scaling, gives a registration nothing reliable to match."""
    import warnings

    data = volume.data
    step = max(1, int(round((data.size / 200_000) ** (1.0 / 3.0))))  # the range from ~200 000 voxels
    sample = data[::step, ::step, ::step]
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return
    lo, hi = np.percentile(sample, [1.0, 99.9])
    if not hi > lo:
        hi = float(np.nanmax(data))
    with np.errstate(invalid="ignore"):
        n = int(np.count_nonzero(data > lo + 0.05 * (hi - lo)))  # NaN (no data) never counts
    if n < SPARSE_SIGNAL_FRACTION * data.size:
        warnings.warn(f"{volume.name}: the {role} image has signal in only {n} of its {data.size} voxels "
                      f"({100.0 * n / data.size:.2g} %): too little for a reliable registration; check the result "
                      "(--confidence, --qc)", stacklevel=3)
