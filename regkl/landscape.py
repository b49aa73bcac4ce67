"""The cost landscape around a pose: the metric along each rigid parameter, for debugging hard cases.

Around a transform ``M`` (fixed->moving, any linear model) the metric is evaluated, at the
registration's finest level (:class:`regkl.probe.MetricProbe`), at ``P(d) @ M`` where ``P(d)``
is a rigid motion of the moving image's world by one parameter ``d`` at a time: a rotation about
an axis parallel to R, A or S through the centre (the fixed image's centre of mass, as the
registration uses it, mapped by ``M``), or a shift along R, A or S. ``d = 0`` is ``M`` itself, for
affine transforms too. For a rigid ``M`` the shifts are exactly changes of the translation
``register`` reports. A well-registered pair peaks at 0 on every curve; a peak at ``d`` means the
metric prefers the pose ``d`` away (a shift curve peaking at +3 mm: move the moving image's
sampling position 3 mm along that axis).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .transforms import get_model
from .volume import Volume

#: The six profiled parameters: (name, unit, label).
PARAMETERS = (
    ("rot_x", "deg", "rotation about R (x)"),
    ("rot_y", "deg", "rotation about A (y)"),
    ("rot_z", "deg", "rotation about S (z)"),
    ("shift_x", "mm", "shift along R (x)"),
    ("shift_y", "mm", "shift along A (y)"),
    ("shift_z", "mm", "shift along S (z)"),
)


@dataclass(frozen=True)
class Profile:
    """Metric curves around a pose.

    Attributes
    ----------
    offsets : ndarray (6, 2 * steps + 1)
        Offsets of each parameter (degrees for rotations, mm for shifts); the middle one is 0.
    values : ndarray (6, 2 * steps + 1)
        Metric at each offset; NaN where the images overlap too little for a value.
    at_pose : float
        Metric at the given pose (offset 0).
    best : ndarray (6,)
        Offset of the highest value of each curve.
    metric : str
    centre : ndarray (3,)
        Centre of the rotations, moving world (RAS mm).
    spacing_mm : float
        Finest-level spacing the metric was computed at.
    n_points : int
        Fixed sample points.
    seconds : float
    """

    offsets: np.ndarray
    values: np.ndarray
    at_pose: float
    best: np.ndarray
    metric: str
    centre: np.ndarray
    spacing_mm: float
    n_points: int
    seconds: float

    def as_dict(self) -> dict:
        """JSON-ready: one entry per parameter with its offsets, values (null: no overlap) and best offset."""
        def num(x):
            return None if not np.isfinite(x) else round(float(x), 8)

        return {
            "metric": self.metric, "at_pose": num(self.at_pose), "centre_moving_ras_mm": self.centre.round(4).tolist(),
            "spacing_mm": self.spacing_mm, "points": self.n_points, "seconds": round(self.seconds, 3),
            "parameters": [
                {"name": name, "unit": unit, "label": label, "best": num(self.best[k]),
                 "offsets": [num(x) for x in self.offsets[k]], "values": [num(v) for v in self.values[k]]}
                for k, (name, unit, label) in enumerate(PARAMETERS)],
        }


def check_settings(range_deg: float, range_mm: float, steps: int) -> None:
    """InputError unless the ranges and the number of steps are usable."""
    from .errors import InputError

    if not (np.isfinite(range_deg) and 0 < range_deg <= 180):
        raise InputError(f"--range-deg must be in (0, 180] degrees, got {range_deg:g}")
    if not (np.isfinite(range_mm) and 0 < range_mm <= 500):
        raise InputError(f"--range-mm must be in (0, 500] mm, got {range_mm:g}")
    if not 1 <= steps <= 500:
        raise InputError(f"--steps must be between 1 and 500, got {steps}")


def _perturbation(k: int, offset: float, centre: np.ndarray) -> np.ndarray:
    """Rigid motion of parameter ``k`` by ``offset`` (deg or mm) about ``centre`` (moving world)."""
    delta = np.zeros(6)
    delta[k] = np.deg2rad(offset) if PARAMETERS[k][1] == "deg" else offset
    return get_model("rigid").matrix(delta, centre)


def profile_metric(moving: Volume, fixed: Volume, fixed2moving: np.ndarray, *, metric: str = "mi", bins: int = 24,
                   prior=None, fixed_mask: Volume | None = None, moving_mask: Volume | None = None,
                   auto_mask: bool = False, sampling: float = 1.0, seed: int = 0, range_deg: float = 20.0,
                   range_mm: float = 20.0, steps: int = 20) -> Profile:
    """The metric along each rigid parameter around ``fixed2moving`` (see the module notes).

    Parameters
    ----------
    moving, fixed : Volume
    fixed2moving : ndarray (4, 4)
        The pose to profile (RAS fixed -> moving), e.g. a registration's result.
    metric, bins, prior, fixed_mask, moving_mask, auto_mask, sampling, seed
        As for :func:`regkl.optimize.register`.
    range_deg, range_mm : float
        Half-width of the rotation and shift curves.
    steps : int
        Points on each side of the pose (``2 * steps + 1`` per curve).

    Returns
    -------
    Profile
    """
    from . import masks, pyramid
    from .probe import MetricProbe

    check_settings(range_deg, range_mm, steps)
    t0 = time.perf_counter()
    fixed_mask, moving_mask = masks.prepare_masks(fixed, moving, fixed_mask, moving_mask, auto_mask)
    probe = MetricProbe(moving, fixed, metric=metric, bins=bins, prior=prior, fixed_mask=fixed_mask,
                        moving_mask=moving_mask, sampling=sampling, seed=seed)
    pose = np.asarray(fixed2moving, dtype=np.float64)
    centre_fixed = pyramid.downsample(fixed, probe.spacing_mm).centre_of_mass()
    centre = pose[:3, :3] @ centre_fixed + pose[:3, 3]
    at_pose = probe(pose)[0]
    if at_pose is None:
        from .errors import RegistrationError

        raise RegistrationError("the images do not overlap at the given pose; check the transform's direction "
                                "(fixed->moving) and the headers")
    unit = np.linspace(-1.0, 1.0, 2 * steps + 1)
    offsets = np.stack([unit * (range_deg if u == "deg" else range_mm) for _, u, _ in PARAMETERS])
    offsets[:, steps] = 0.0
    values = np.full(offsets.shape, np.nan)
    for k in range(len(PARAMETERS)):
        for j, d in enumerate(offsets[k]):
            value = at_pose if j == steps else probe(_perturbation(k, d, centre) @ pose)[0]
            values[k, j] = np.nan if value is None else value
    best = np.array([offsets[k, int(np.nanargmax(values[k]))] for k in range(len(PARAMETERS))])
    return Profile(offsets, values, float(at_pose), best, metric, centre, probe.spacing_mm, probe.n_points,
                   time.perf_counter() - t0)


def plot_profile(profile: Profile, path, *, title: str = "", protect=()) -> Path:
    """Six panels (rotations above, shifts below): each curve, the pose (offset 0) and the best point.

    The PNG is written atomically.
    """
    from .outputs import atomic_path
    from .qc import printable, pyplot

    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(11, 6.2), sharey=True)
    for k, ax in enumerate(axes.ravel()):
        name, unit, label = PARAMETERS[k]
        x, y = profile.offsets[k], profile.values[k]
        ax.plot(x, y, "-", color="#1f5fa8", lw=1.5, marker=".", ms=3)
        ax.axvline(0.0, color="0.4", ls="--", lw=1, label="given pose")
        j = int(np.nanargmax(y))
        ax.plot([x[j]], [y[j]], "o", color="#d62728", ms=7, label=f"best {x[j]:+.3g} {unit}")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel(f"offset ({unit})")
        if k % 3 == 0:
            ax.set_ylabel(profile.metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(printable(title) or f"{profile.metric} around the given pose", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    dest = Path(path)
    with atomic_path(dest, protect=protect) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)
    return dest
