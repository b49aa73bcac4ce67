"""Quality-control pictures: edges of one image over the other, and a checkerboard.

Needs matplotlib (``pip install 'regkl[qc]'``). Both images must be on the same grid (the
registered moving image is on the fixed grid).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import InputError, RegklError
from .volume import Volume


def _require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        raise RegklError("QC pictures need matplotlib: pip install 'regkl[qc]'") from None
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
    lo, hi = np.percentile(fg, [1, 99.5])
    return np.clip((data - lo) / max(hi - lo, 1e-12), 0, 1)


def edges(data: np.ndarray, *, sigma: float = 1.0, quantile: float = 85.0) -> np.ndarray:
    """Edge strength (gradient magnitude of the smoothed image) and the level that marks edges."""
    mag = ndimage.gaussian_gradient_magnitude(_robust_norm(data).astype(np.float32), sigma)
    fg = mag[mag > 1e-3]
    level = float(np.percentile(fg, quantile)) if fg.size else 1.0
    return mag, level


def _slices(shape, n):
    return [int(round(x)) for x in np.linspace(0.2, 0.8, n) * (shape - 1)]


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
    from .io import atomic_path

    if fixed.shape != registered.shape or not np.allclose(fixed.vox2ras, registered.vox2ras, atol=1e-4):
        raise InputError("QC needs the registered image on the fixed image's grid (same shape and header)",
                         path=registered.name)
    plt = _require_matplotlib()
    f = _robust_norm(canonical(fixed))
    m = _robust_norm(canonical(registered))
    f_edges, f_level = edges(f)
    m_edges, m_level = edges(m)
    vox = np.sort(np.abs(fixed.vox2ras[:3, :3]), axis=None)[-3:]  # rough voxel size for the checker
    square = max(2, int(round(checker_mm / max(float(np.mean(vox)), 1e-3))))
    ii, jj, kk = np.meshgrid(*[np.arange(s) // square for s in f.shape], indexing="ij", sparse=True)
    checker = np.where((ii + jj + kk) % 2 == 0, f, m)

    views = (("axial", 2), ("coronal", 1), ("sagittal", 0))
    rows = [("registered + fixed edges", m, f_edges, f_level), ("fixed + registered edges", f, m_edges, m_level),
            ("checkerboard", checker, None, None)]
    fig, axes = plt.subplots(len(rows) * len(views), n_slices, figsize=(2.0 * n_slices, 2.0 * 9),
                             facecolor="black")
    for r, (label, image, edge, level) in enumerate(rows):
        for v, (vname, axis) in enumerate(views):
            for c, s in enumerate(_slices(np.asarray(f.shape[axis]), n_slices)):
                ax = axes[r * len(views) + v, c]
                take = [slice(None)] * 3
                take[axis] = s
                img = image[tuple(take)].T
                ax.imshow(img, cmap="gray", origin="lower", vmin=0, vmax=1, interpolation="nearest")
                if edge is not None:
                    ax.contour(edge[tuple(take)].T, levels=[level], colors=edge_color, linewidths=0.6)
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if c == 0:
                    ax.set_ylabel(f"{label}\n{vname}", color="white", fontsize=7)
    fig.suptitle(title, color="white", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    dest = Path(path)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=80, facecolor="black")
    plt.close(fig)
    return dest
