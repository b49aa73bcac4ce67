"""Quality-control pictures: edges of one image over the other, and a checkerboard; small
thumbnails (three views, fixed edges over the registered image) for batch reports.

Drawn with matplotlib (Agg backend, no display needed). Both images must be on the same grid (the
registered moving image is on the fixed grid).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import InputError
from .volume import Volume


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only; imported when a picture is drawn)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def canonical(volume: Volume) -> np.ndarray:
    """Data reordered so array axes run along R, A, S (closest axes; flips and permutations only)."""
    lin = volume.vox2ras[:3, :3]
    order = np.argmax(np.abs(lin), axis=0)  # world axis each array axis is closest to
    if len(set(order.tolist())) != 3:  # very oblique: fall back to the stored order
        return volume.data
    data = volume.data
    for axis in range(3):
        if lin[order[axis], axis] < 0:
            data = np.flip(data, axis)
    return np.transpose(data, np.argsort(order))


def _robust_norm(data: np.ndarray) -> np.ndarray:
    fg = data[data > 0]
    if fg.size < 100:
        fg = data.ravel()
    lo, hi = np.nanpercentile(fg, [1, 99.5])
    return np.nan_to_num(np.clip((data - lo) / max(hi - lo, 1e-12), 0, 1), nan=0.0)  # NaN: no data, shown black


def edges(data: np.ndarray, *, sigma: float = 1.0, quantile: float = 85.0) -> np.ndarray:
    """Edge strength (gradient magnitude of the smoothed image) and the level that marks edges."""
    mag = ndimage.gaussian_gradient_magnitude(_robust_norm(data).astype(np.float32), sigma)
    fg = mag[mag > 1e-3]
    level = float(np.percentile(fg, quantile)) if fg.size else 1.0
    return mag, level


def _slices(shape, n):
    return [int(round(x)) for x in np.linspace(0.2, 0.8, n) * (shape - 1)]


def _check_grid(fixed: Volume, registered: Volume) -> None:
    if fixed.shape != registered.shape or not np.allclose(fixed.vox2ras, registered.vox2ras, atol=1e-4):
        raise InputError("QC needs the registered image on the fixed image's grid (same shape and header)",
                         path=registered.name)


def _panel(ax, image, axis, index, edge=None, level=None, edge_color="#ff3030", linewidth=0.6):
    """Slice ``index`` along ``axis`` of ``image`` (RAS-ordered), with the ``edge`` contour at ``level``."""
    take = [slice(None)] * 3
    take[axis] = index
    ax.imshow(image[tuple(take)].T, cmap="gray", origin="lower", vmin=0, vmax=1, interpolation="nearest")
    if edge is not None:
        ax.contour(edge[tuple(take)].T, levels=[level], colors=edge_color, linewidths=linewidth)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _save_png(fig, plt, path, dpi, protect=()) -> bytes:
    """The figure as PNG bytes, also written (atomically) to ``path`` when given."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="black")
    plt.close(fig)
    png = buf.getvalue()
    if path is not None:
        from .outputs import atomic_path

        with atomic_path(path, protect=protect) as tmp:
            Path(tmp).write_bytes(png)
    return png


VIEWS = (("axial", 2), ("coronal", 1), ("sagittal", 0))


def printable(text: str) -> str:
    """``text`` with the bytes of a file name that is not UTF-8 (held by Python as surrogates) shown
    as ``\\xNN``, so fonts and UTF-8 files can take it."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def qc_figure(fixed: Volume, registered: Volume, path, *, title: str = "", n_slices: int = 5,
              edge_color: str = "#ff3030", checker_mm: float = 20.0) -> Path:
    """Write a PNG: fixed edges over the registered image, the reverse, and a checkerboard.

    Parameters
    ----------
    fixed, registered : Volume
        On the same grid (shape and vox2ras).
    path : str or Path
        PNG to write (atomically).
    title : str
        Shown at the top (subject, metric...).
    n_slices : int
        Slices per view (axial, coronal, sagittal).
    checker_mm : float
        Size of the checkerboard squares.
    """
    _check_grid(fixed, registered)
    plt = pyplot()
    f = _robust_norm(canonical(fixed))
    m = _robust_norm(canonical(registered))
    f_edges, f_level = edges(f)
    m_edges, m_level = edges(m)
    vox = np.sort(np.abs(fixed.vox2ras[:3, :3]), axis=None)[-3:]  # rough voxel size for the checker
    square = max(2, int(round(checker_mm / max(float(np.mean(vox)), 1e-3))))
    ii, jj, kk = np.meshgrid(*[np.arange(s) // square for s in f.shape], indexing="ij", sparse=True)
    checker = np.where((ii + jj + kk) % 2 == 0, f, m)

    rows = [("registered + fixed edges", m, f_edges, f_level), ("fixed + registered edges", f, m_edges, m_level),
            ("checkerboard", checker, None, None)]
    fig, axes = plt.subplots(len(rows) * len(VIEWS), n_slices, figsize=(2.0 * n_slices, 2.0 * 9),
                             facecolor="black")
    for r, (label, image, edge, level) in enumerate(rows):
        for v, (vname, axis) in enumerate(VIEWS):
            for c, s in enumerate(_slices(np.asarray(f.shape[axis]), n_slices)):
                ax = axes[r * len(VIEWS) + v, c]
                _panel(ax, image, axis, s, edge, level, edge_color)
                if c == 0:
                    ax.set_ylabel(f"{label}\n{vname}", color="white", fontsize=7)
    fig.suptitle(printable(title), color="white", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    _save_png(fig, plt, path, 80)
    return Path(path)


def qc_thumbnail(fixed: Volume, registered: Volume, path=None, *, panel_px: int = 150,
                 edge_color: str = "#ff3030", protect=()) -> bytes:
    """A small PNG for reports: the registered image with the fixed image's edges, mid-slices of
    the axial, coronal and sagittal views side by side (about ``3 * panel_px`` by ``panel_px``).

    Parameters
    ----------
    fixed, registered : Volume
        On the same grid (shape and vox2ras).
    path : str or Path, optional
        Also write the PNG there (atomically).
    panel_px : int
        Height (and width) of each view in pixels.
    protect : iterable of paths
        Inputs ``path`` must not overwrite.

    Returns
    -------
    bytes
        The PNG file's content.
    """
    _check_grid(fixed, registered)
    plt = pyplot()
    f = _robust_norm(canonical(fixed))
    m = _robust_norm(canonical(registered))
    # edges of the three slices only (from thin slabs around them): the whole volume costs ~1 s at 1 mm
    cuts = [(axis, int(round(frac * (f.shape[axis] - 1)))) for (_, axis), frac in zip(VIEWS, THUMB_SLICES)]
    mags = [_slab_edges(f, axis, index) for axis, index in cuts]
    fg = np.concatenate([g[g > 1e-3] for g in mags])
    level = float(np.percentile(fg, 85.0)) if fg.size else 1.0
    dpi = 100
    fig, axes = plt.subplots(1, len(VIEWS), figsize=(len(VIEWS) * panel_px / dpi, panel_px / dpi),
                             facecolor="black")
    for ax, (axis, index), mag in zip(axes, cuts, mags):
        edge = np.expand_dims(mag, axis)  # a one-slice volume: _panel takes slice 0 of it
        image = np.expand_dims(np.take(m, index, axis=axis), axis)
        _panel(ax, image, axis, 0, edge, level, edge_color, linewidth=0.7)
        ax.set_aspect("equal")
    fig.subplots_adjust(left=0, right=1, bottom=0, top=1, wspace=0.02)
    return _save_png(fig, plt, path, dpi, protect)


#: Where the thumbnail cuts each view (fraction of the axis): the middle, but the sagittal view
#: off the midline (the midline of a brain-only image has few in-plane edges).
THUMB_SLICES = (0.5, 0.5, 0.4)


def _slab_edges(norm: np.ndarray, axis: int, index: int, sigma: float = 1.0) -> np.ndarray:
    """Edge strength of one slice, as :func:`edges` computes it, from a slab of +-4 sigma around it."""
    half = int(np.ceil(4 * sigma))
    lo, hi = max(0, index - half), min(norm.shape[axis], index + half + 1)
    slab = np.take(norm, np.arange(lo, hi), axis=axis).astype(np.float32)
    mag = ndimage.gaussian_gradient_magnitude(slab, sigma)
    return np.take(mag, index - lo, axis=axis)
