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


def auto_mask(volume: Volume, *, dilate_mm: float = 4.0) -> Volume:
    """Foreground (head or brain) mask of an image, from the image itself.

    Smooth lightly, threshold at Otsu's level, keep the largest connected component, fill its
    holes and dilate it by ``dilate_mm`` so the object's edges stay inside.

    Parameters
    ----------
    volume : Volume
    dilate_mm : float
        Dilation (mm) of the thresholded object.

    Returns
    -------
    Volume
        float32 0/1 mask on ``volume``'s grid.
    """
    spacing = volume.spacing
    finite = np.isfinite(volume.data)  # NaN is no data: background, not a hole spreading through the filter
    data = volume.data if finite.all() else np.where(finite, volume.data, np.min(volume.data[finite]))
    smooth = ndimage.gaussian_filter(data, np.maximum(2.0 / spacing, 0.5))
    fg = smooth > otsu_threshold(smooth)
    labels, n = ndimage.label(fg)
    if n == 0:
        raise InputError("automatic mask found no foreground", path=volume.name)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    fg = labels == int(np.argmax(sizes))
    fg = ndimage.binary_fill_holes(fg)
    if dilate_mm > 0:
        fg = ndimage.distance_transform_edt(~fg, sampling=spacing) <= dilate_mm
    return Volume(fg.astype(np.float32), volume.vox2ras, f"auto mask of {volume.name}")


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


def prepare_masks(fixed, moving, fixed_mask=None, moving_mask=None, auto=False):
    """The masks a registration uses: given ones checked, missing ones built when ``auto``.

    Parameters
    ----------
    fixed, moving : Volume
    fixed_mask, moving_mask : Volume or None
    auto : bool
        Build a foreground mask (:func:`auto_mask`) for each image without one.

    Returns
    -------
    (fixed_mask, moving_mask) : Volume or None each
    """
    if auto:
        fixed_mask = fixed_mask if fixed_mask is not None else auto_mask(fixed)
        moving_mask = moving_mask if moving_mask is not None else auto_mask(moving)
    for m, what in ((fixed_mask, "fixed mask"), (moving_mask, "moving mask")):
        if m is not None:
            check_mask(m, what)
    return fixed_mask, moving_mask
