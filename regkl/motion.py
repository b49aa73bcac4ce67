"""Motion estimates as pipelines read them: framewise displacement, non-steady-state volumes,
fMRIPrep confound columns, FSL MCFLIRT ``.par``, the motion-trace picture, and writing the set."""

from __future__ import annotations

import numpy as np

#: Radius (mm) of the sphere on which rotations become displacements in the framewise
#: displacement (Power et al. 2012; the value fMRIPrep and nipype use).
FD_RADIUS_MM = 50.0
#: Modified z-score above which a volume's global signal is an outlier (Iglewicz and Hoaglin 1993;
#: fMRIPrep's non-steady-state detector uses 3.5 over the first 50 volumes).
NON_STEADY_Z = 3.5
NON_STEADY_WINDOW = 50
#: Confound columns, fMRIPrep's names: translations in mm, rotations in radians.
CONFOUND_COLUMNS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z", "framewise_displacement")
#: The confound columns as a BIDS tabular-file sidecar describes them (fMRIPrep's wording in spirit).
CONFOUND_DESCRIPTIONS = {
    **{f"trans_{a}": {"Description": f"Translation along the RAS+ {a} axis of the volume relative to the "
                                     "reference (head-motion estimate)", "Units": "mm"} for a in "xyz"},
    **{f"rot_{a}": {"Description": f"Rotation about the RAS+ {a} axis through the reference's centre "
                                   "(matrix Rz Ry Rx) relative to the reference", "Units": "rad"} for a in "xyz"},
    "framewise_displacement": {"Description": "Framewise displacement (Power et al. 2012): sum of the absolute "
                                              "backward differences of the six parameters, rotations as arcs on a "
                                              f"{FD_RADIUS_MM:g} mm sphere; n/a for the first volume", "Units": "mm"},
}
#: Framewise displacement (mm) above which a volume counts as a motion outlier (fMRIPrep's
#: ``--fd-spike-threshold`` default).
FD_OUTLIER_MM = 0.5


def framewise_displacement(params: np.ndarray, radius_mm: float = FD_RADIUS_MM) -> np.ndarray:
    """Framewise displacement (Power et al. 2012, NeuroImage 59:2142).

    ``FD_t = sum |d trans| + radius * sum |d rot|`` between volumes ``t - 1`` and ``t``.

    Parameters
    ----------
    params : ndarray (T, 6)
        ``rot_x, rot_y, rot_z`` (radians), ``trans_x, trans_y, trans_z`` (mm) per volume.
    radius_mm : float

    Returns
    -------
    ndarray (T,)
        mm; NaN for the first volume (no predecessor; fMRIPrep writes ``n/a``).
    """
    p = np.asarray(params, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 6:
        raise ValueError(f"params must be (T, 6), got {p.shape}")
    d = np.abs(np.diff(p, axis=0))
    fd = np.full(len(p), np.nan)
    fd[1:] = d[:, 3:].sum(axis=1) + radius_mm * d[:, :3].sum(axis=1)
    return fd


def non_steady_volumes(global_signal: np.ndarray, *, z: float = NON_STEADY_Z,
                       window: int = NON_STEADY_WINDOW) -> int:
    """Number of leading non-steady-state volumes (fMRIPrep's detector, as described by nipype's
    ``NonSteadyStateDetector``): over the first ``window`` volumes, the leading run of volumes
    whose global signal has a modified z-score ``0.6745 |s - median| / MAD`` above ``z``.

    Parameters
    ----------
    global_signal : ndarray (T,)
        Mean intensity of each volume (before motion correction).

    Returns
    -------
    int
        0 when the signal is flat (MAD 0) or the first volume is not an outlier.
    """
    s = np.asarray(global_signal, dtype=np.float64)[:window]
    dev = np.abs(s - np.median(s))
    mad = float(np.median(dev))
    if not mad > 0.0:
        return 0
    score = 0.6745 * dev / mad
    n = 0
    while n < len(score) and score[n] > z:
        n += 1
    return n


def _number(v) -> str:
    return "n/a" if not np.isfinite(v) else f"{float(v) + 0.0:.8g}"  # + 0.0: no "-0"


def confounds_text(params: np.ndarray, fd: np.ndarray) -> str:
    """Tab-separated table with :data:`CONFOUND_COLUMNS`, one row per volume (fMRIPrep's
    ``desc-confounds_timeseries.tsv`` names; missing values ``n/a``)."""
    rows = ["\t".join(CONFOUND_COLUMNS)]
    for p, f in zip(np.asarray(params), np.asarray(fd)):
        rows.append("\t".join(_number(v) for v in (p[3], p[4], p[5], p[0], p[1], p[2], f)))
    return "\n".join(rows) + "\n"


def par_text(params: np.ndarray) -> str:
    """FSL MCFLIRT ``.par`` layout: per volume ``rot_x rot_y rot_z`` (radians) then ``trans_x
    trans_y trans_z`` (mm), space-separated. The values are regkl's (RAS+, about the reference's
    centre), not FSL's scaled-voxel parameters."""
    return "".join("  ".join(f"{v + 0.0:.6e}" for v in p) + "\n" for p in np.asarray(params))


def _write_text(path, text, protect):
    from .outputs import atomic_path

    with atomic_path(path, protect=protect) as tmp:
        tmp.write_text(text)


def motion_figure(params: np.ndarray, fd: np.ndarray, path, *, title: str = "", flags=(), protect=()) -> None:
    """PNG of the motion traces: translations (mm), rotations (degrees) and framewise displacement.

    Flagged volumes (``flags[t]`` non-empty) are marked on every panel.
    """
    from .outputs import atomic_path
    from .qc import pyplot

    plt = pyplot()
    p = np.asarray(params)
    t = np.arange(len(p))
    fig, axes = plt.subplots(3, 1, figsize=(9.5, 6), sharex=True)
    for k, name in enumerate("xyz"):
        axes[0].plot(t, p[:, 3 + k], lw=1, label=f"trans_{name}")
        axes[1].plot(t, np.rad2deg(p[:, k]), lw=1, label=f"rot_{name}")
    axes[2].plot(t, fd, lw=1, color="k", label="framewise_displacement")
    for ax, unit in zip(axes, ("mm", "degrees", "mm")):
        ax.set_ylabel(unit)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)  # beside the traces, never over them
        ax.grid(alpha=0.3)
        for i, f in enumerate(flags):
            if f:
                ax.axvline(i, color="r", alpha=0.4, lw=1)
    axes[2].set_xlabel("volume")
    axes[0].set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path, protect=protect) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
