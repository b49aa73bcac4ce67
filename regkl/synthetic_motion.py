"""4D series with KNOWN head motion, for tests and benchmarks of :mod:`regkl.realign` (never
imported by the runtime).

Convention (as in :mod:`regkl.synthetic`): volume ``t`` is a still source seen through the rigid
matrix ``source2volume[t]`` (source world mm -> volume world mm), so its voxel ``v`` shows the
source at ``inv(source2volume[t]) @ vox2ras @ v``. A realignment to a reference in the source's
frame should return ``ref2volume[t] == source2volume[t]``; to any other reference frame ``R``
(reference world -> source world), ``source2volume[t] @ R`` (see :func:`motion_errors`).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .resample import resample
from .synthetic import add_rician_noise, make_epi, mean_brain_signal, rigid_fixed2moving
from .transforms import apply_matrix
from .volume import Volume


def motion_trace(rng: np.random.Generator, n_volumes: int, *, drift_mm: float = 2.0, drift_deg: float = 2.0,
                 n_spikes: int = 3, spike_mm: float = 8.0, spike_deg: float = 6.0) -> np.ndarray:
    """Realistic rigid motion: slow drifts plus sudden one-volume spikes.

    Drifts are smoothed random walks (Gaussian increments, 5-volume smoothing), each parameter
    rescaled so its largest excursion is uniform in ``[0.3, 1]`` times ``drift_mm`` / ``drift_deg``;
    spikes add, in ``n_spikes`` volumes drawn after the first 5, a random direction of length
    uniform in ``[0.5, 1]`` times ``spike_mm`` (translation) and ``spike_deg`` (rotation).

    Returns
    -------
    ndarray (T, 6)
        Angles about R, A, S (degrees), then translations (mm) per volume; volume 0 is still.
    """
    walk = np.cumsum(rng.normal(size=(n_volumes, 6)), axis=0)
    walk = ndimage.uniform_filter1d(walk, 5, axis=0, mode="nearest")
    walk -= walk[0]
    peak = np.maximum(np.abs(walk).max(axis=0), 1e-9)
    limit = np.array([drift_deg] * 3 + [drift_mm] * 3) * rng.uniform(0.3, 1.0, size=6)
    trace = walk / peak * limit
    candidates = np.arange(5, n_volumes)
    for t in rng.choice(candidates, size=min(n_spikes, len(candidates)), replace=False):
        rot = rng.normal(size=3)
        trans = rng.normal(size=3)
        trace[t, :3] += rot / np.linalg.norm(rot) * spike_deg * rng.uniform(0.5, 1.0)
        trace[t, 3:] += trans / np.linalg.norm(trans) * spike_mm * rng.uniform(0.5, 1.0)
    return trace


def _finish(signal: np.ndarray, rng, noise, gain, activation):
    """Scale by the volume's global gain and local activation, then add Rician noise."""
    out = signal * np.float32(gain) * activation
    sigma = noise * mean_brain_signal(out) if noise > 0 else 0.0
    return add_rician_noise(out.astype(np.float32), sigma, rng)


def _activation_map(shape, rng, amplitude):
    """A smooth blob pattern in [0, 1] (fixed on the grid) scaled per volume by ``amplitude``."""
    blobs = ndimage.gaussian_filter(rng.normal(size=shape), 3.0)
    blobs = np.clip(blobs / max(float(blobs.std()), 1e-12) - 1.0, 0.0, None)
    return (blobs / max(float(blobs.max()), 1e-12)).astype(np.float32) * amplitude


def motion_series(source, rng: np.random.Generator, n_volumes: int, *, centre, trace=None, pose=None,
                  noise: float = 0.03,
                  gain_sd: float = 0.01, activation: float = 0.02, n_dummy: int = 0, dummy_gain: float = 1.6,
                  voxel_mm: float = 3.0, shape=None, **trace_options):
    """A series of ``n_volumes`` with known motion.

    Parameters
    ----------
    source : Volume or regkl.synthetic.Template
        A still image resampled through every transform (cubic; e.g. the real b0), or the template,
        from which every volume is rendered as a synthetic EPI (:func:`regkl.synthetic.make_epi`,
        with one anatomy, dropout and bias field for the whole series).
    rng : numpy.random.Generator
    n_volumes : int
    centre : array_like (3,)
        Centre of rotation of the trace (source world mm), e.g. the brain's centre.
    trace : ndarray (T, 6), optional
        Angles (degrees) and translations (mm); default :func:`motion_trace` with ``trace_options``.
    pose : ndarray (4, 4), optional
        A rigid pose of the whole series, applied before the motion:
        ``source2volume[t] = motion[t] @ pose``.
    noise : float
        Rician noise sigma relative to the mean brain signal, drawn anew per volume.
    gain_sd : float
        Standard deviation of a global intensity gain per volume (around 1).
    activation : float
        Largest relative signal change of a smooth activation pattern, random amplitude in
        ``[-1, 1]`` times this per volume.
    n_dummy : int
        Leading non-steady-state volumes, their signal times ``dummy_gain`` (T1 saturation).
    voxel_mm, shape
        Grid of the synthetic EPIs (template source only).

    Returns
    -------
    volumes : list of Volume
        On one grid.
    source2volume : ndarray (T, 4, 4)
    trace : ndarray (T, 6)
    """
    if trace is None:
        trace = motion_trace(rng, n_volumes, **trace_options)
    pose = np.eye(4) if pose is None else np.asarray(pose, dtype=np.float64)
    mats = np.stack([rigid_fixed2moving(p[:3], p[3:], centre) @ pose for p in trace])
    structure_seed = int(rng.integers(2 ** 31))
    if isinstance(source, Volume):
        grid = source
        render = lambda m: resample(source, grid, np.linalg.inv(m), interp="cubic").data  # noqa: E731
    else:
        def render(m):
            vol = make_epi(source, m, np.random.default_rng(structure_seed), voxel_mm=voxel_mm, shape=shape,
                           noise=0.0)
            return vol.data
        grid = make_epi(source, np.eye(4), np.random.default_rng(structure_seed), voxel_mm=voxel_mm, shape=shape,
                        noise=0.0)
    act = _activation_map(grid.shape, rng, activation)
    vols = []
    for t, m in enumerate(mats):
        gain = (dummy_gain if t < n_dummy else 1.0) * (1.0 + gain_sd * rng.normal())
        signal = np.clip(render(m), 0.0, None)
        data = _finish(signal, rng, noise, gain, 1.0 + act * rng.uniform(-1.0, 1.0))
        vols.append(Volume(data, grid.vox2ras, "synthetic_motion_series", f"volume {t} of {n_volumes}"))
    return vols, mats, trace


def _kabsch(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Rigid (4, 4) matrix best mapping points ``src`` onto ``dst`` (least squares)."""
    cs, cd = src.mean(axis=0), dst.mean(axis=0)
    u, _, vt = np.linalg.svd((src - cs).T @ (dst - cd))
    d = np.sign(np.linalg.det(vt.T @ u.T))
    rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = cd - rot @ cs
    return m


def motion_errors(ref2volume, source2volume, points) -> np.ndarray:
    """Per-volume RMS error (mm) over ``points`` of estimated against true motion.

    The reference of a realignment need not be in the source's frame (a mean or another volume
    is offset by the average motion), so the frame ``R`` (reference world -> source world) is fitted
    first: ``R`` maps the points to the per-point median over volumes of
    ``inv(source2volume[t]) @ ref2volume[t] @ x`` (Kabsch). The error of volume ``t`` is then the
    RMS over the points of ``|inv(source2volume[t]) @ ref2volume[t] @ x - R @ x|`` (the true
    transform is ``source2volume[t] @ R``; rigid matrices keep distances, so this is the RMS
    displacement between estimated and true transform over the points).

    Parameters
    ----------
    ref2volume, source2volume : ndarray (T, 4, 4)
    points : ndarray (N, 3)
        World mm of the brain (reference world; the source's frame is close enough).

    Returns
    -------
    ndarray (T,)
    """
    mapped = np.stack([apply_matrix(np.linalg.inv(s) @ e, points) for e, s in zip(ref2volume, source2volume)])
    frame = _kabsch(points, np.median(mapped, axis=0))
    target = apply_matrix(frame, points)
    return np.sqrt(np.mean(np.sum((mapped - target) ** 2, axis=2), axis=1))


def brain_points_of(volume: Volume, step: int = 2) -> np.ndarray:
    """World points (mm) of a volume's brain/head: smoothed intensity above half its 98th percentile."""
    smooth = ndimage.gaussian_filter(volume.data, 1.0)
    inside = smooth > 0.5 * np.percentile(smooth, 98)
    idx = np.argwhere(inside[::step, ::step, ::step]).astype(np.float64) * step
    return apply_matrix(volume.vox2ras, idx)
