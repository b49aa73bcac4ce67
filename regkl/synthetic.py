"""Synthetic EPI/T1 image pairs with a known rigid transform, built from the MNI152 template
(ICBM 2009 nonlinear symmetric, ``mni152_2009c`` in the shared data).

This module is for tests, examples and benchmarks: it produces a FIXED T1-weighted image (the
template itself) and MOVING EPI-like images whose content is the template seen through a known
``fixed2moving`` matrix, so a registration result can be scored in millimetres.

Conventions (the same as everywhere in regkl, see :mod:`regkl.volume`):

* world coordinates are RAS+ millimetres;
* a transform is a (4, 4) matrix ``fixed2moving`` mapping a point of the FIXED (template) world to
  the corresponding point of the MOVING (EPI) world, so moving voxel ``v`` of an EPI shows the
  template at the fixed world point ``inv(fixed2moving) @ moving_vox2ras @ v``.

The dropout and distortion regions are placed at MNI coordinates (orbitofrontal cortex and inferior
temporal lobes), so they assume the template is in MNI space, which the bundled one is.

Everything is deterministic given a :class:`numpy.random.Generator`; the order of random draws in
:func:`make_epi` does not depend on which effects are switched on.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import ndimage

from .synthetic_template import (TEMPLATE_FILES, TEMPLATE_SUBDIR, Template, _as_spacing,
                                 _brain_bbox_vox, brain_bbox_mm, brain_points, default_shared_dir,
                                 load_template, random_affine, random_rigid, rigid_fixed2moving, rms_error,
                                 rotation_matrix)
from .transforms import apply_matrix
from .volume import Volume, check_vox2ras

#: Public names, with those of :mod:`regkl.synthetic_template` (one import for tests and benchmarks).
__all__ = ["TEMPLATE_FILES", "TEMPLATE_SUBDIR", "Template", "brain_bbox_mm", "brain_points",
           "default_shared_dir", "load_template", "random_affine", "random_rigid", "rigid_fixed2moving",
           "rms_error", "rotation_matrix", "epi_grid", "add_rician_noise", "mean_brain_signal", "bias_field",
           "make_epi", "make_t1", "reorient", "oblique_copy", "epi_from_volume", "EPI_CONTRAST", "EPI_SCALE",
           "EPI_MARGIN_MM", "FWHM_PER_SIGMA"]

#: EPI-like (T2*-weighted) tissue intensities, relative to CSF: (csf, gm, wm).
EPI_CONTRAST = (1.0, 0.65, 0.45)

#: Relative amplitude (standard deviation) of the fixed anatomical texture in the EPI contrast.
TEXTURE_AMPLITUDE = 0.03
#: Correlation length (Gaussian sigma, mm) of the anatomical texture.
TEXTURE_SIGMA_MM = 1.5
#: Seed of the anatomical texture: the texture is part of the "anatomy", the same in every EPI.
TEXTURE_SEED = 20090

#: Susceptibility regions (MNI mm): (centre (3,), Gaussian sigmas (3,), weight). Signal dropout uses
#: them with the sigmas below; distortion uses wider ones.
_DROPOUT_BLOBS = (
    ((0.0, 32.0, -24.0), (14.0, 10.0, 7.0), 1.0),     # orbitofrontal cortex / gyrus rectus
    ((-42.0, -8.0, -34.0), (9.0, 14.0, 7.0), 0.7),    # left inferior temporal lobe
    ((42.0, -8.0, -34.0), (9.0, 14.0, 7.0), 0.7),     # right inferior temporal lobe
)
_DISTORTION_BLOBS = (
    ((0.0, 32.0, -24.0), (24.0, 16.0, 12.0), 1.0),
    ((-42.0, -8.0, -34.0), (14.0, 20.0, 12.0), 0.8),
    ((42.0, -8.0, -34.0), (14.0, 20.0, 12.0), 0.8),
)
#: Standard deviation (mm) of the random jitter of the dropout centres in each EPI.
_DROPOUT_JITTER_MM = 3.0

#: Margin (mm) around the template brain's bounding box for the default EPI field of view.
EPI_MARGIN_MM = 24.0
#: Intensity of CSF (before bias and noise) in the output EPI.
EPI_SCALE = 800.0

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def epi_grid(template: Template, voxel_mm=3.0, shape=None) -> tuple[tuple, np.ndarray]:
    """Default axis-aligned RAS+ grid of a synthetic EPI (moving world).

    The grid is centred on the template voxel nearest the centre of the brain's bounding box (the
    same coordinates are used in the moving world) and, unless ``shape`` is given, covers that box
    plus :data:`EPI_MARGIN_MM` on every side (64x76x68 voxels at 3 mm for the MNI template). Voxel ``n // 2`` of
    each axis sits on the centre, so with integer voxel sizes and an identity transform every EPI
    voxel centre is also a template voxel centre.

    Parameters
    ----------
    template : Template
    voxel_mm : float or array_like, shape (3,)
        Voxel size (mm).
    shape : tuple of 3 int, optional
        Grid shape; default covers the brain with margin.

    Returns
    -------
    shape : tuple of 3 int
    moving_vox2ras : ndarray, shape (4, 4)
    """
    spacing = _as_spacing(voxel_mm)
    lo, hi = brain_bbox_mm(template)
    centre_idx = np.round(apply_matrix(template.t1.ras2vox, ((lo + hi) / 2.0)[None])[0])
    centre = apply_matrix(template.vox2ras, centre_idx[None])[0]
    if shape is None:
        shape = tuple(int(n) for n in np.ceil((hi - lo + 2.0 * EPI_MARGIN_MM) / spacing))
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be 3 positive ints, got {shape}")
    v2r = np.eye(4)
    v2r[:3, :3] = np.diag(spacing)
    v2r[:3, 3] = centre - spacing * (np.asarray(shape) // 2)
    return shape, v2r


def _grid_indices(shape) -> np.ndarray:
    """(N, 3) float64 voxel indices of a grid, C order."""
    return np.indices(shape, dtype=np.float64).reshape(3, -1).T


def _sample(data: np.ndarray, vox2ras: np.ndarray, world: np.ndarray, order: int = 1) -> np.ndarray:
    """Sample ``data`` (on ``vox2ras``) at world points (N, 3); zero outside. Returns (N,) float32."""
    idx = apply_matrix(np.linalg.inv(vox2ras), world)
    return ndimage.map_coordinates(data, idx.T, order=order, mode="constant", cval=0.0,
                                   prefilter=order > 1, output=np.float32)


def _antialias_sigma_vox(target_spacing, source_spacing, extra_fwhm_mm: float = 0.0) -> np.ndarray:
    """Per-axis Gaussian sigma (source voxels) turning source voxels into target-size voxels.

    A box of width ``s`` has variance ``s**2 / 12``; the Gaussian adds the variance missing between
    the source and target boxes (isotropic: the largest target voxel size is used on every axis, so
    it holds for any orientation of the target grid) plus that of an extra blur of FWHM
    ``extra_fwhm_mm``.
    """
    target = float(np.max(target_spacing))
    src = np.asarray(source_spacing, dtype=np.float64)
    var_mm = np.maximum(target ** 2 - src ** 2, 0.0) / 12.0 + (extra_fwhm_mm / FWHM_PER_SIGMA) ** 2
    return np.sqrt(var_mm) / src


def _gaussian_blobs(world: np.ndarray, blobs, offsets=None) -> np.ndarray:
    """Sum of weighted anisotropic Gaussians (peak = weight) at world points (N, 3); (N,) float32."""
    out = np.zeros(world.shape[0], dtype=np.float32)
    for n, (centre, sigma, weight) in enumerate(blobs):
        c = np.asarray(centre, dtype=np.float64)
        if offsets is not None:
            c = c + offsets[n]
        z = (world - c) / np.asarray(sigma, dtype=np.float64)
        out += np.float32(weight) * np.exp(-0.5 * np.sum(z * z, axis=1)).astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------
# Template-derived intensity images (cached)
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=2)
def _texture(template: Template) -> np.ndarray:
    """Fixed smooth unit-variance random texture, float32, on the template grid cropped to the brain."""
    lo, hi = _brain_bbox_vox(template)
    rng = np.random.default_rng(TEXTURE_SEED)
    noise = rng.standard_normal(tuple(b - a for a, b in zip(lo, hi)), dtype=np.float32)
    sigma_vox = TEXTURE_SIGMA_MM / template.t1.spacing
    tex = ndimage.gaussian_filter(noise, sigma_vox, mode="constant")
    tex /= max(float(tex.std()), 1e-12)
    return tex


@functools.lru_cache(maxsize=4)
def _tissue_intensity(template: Template, contrast: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Unblurred 1 mm tissue-intensity image, cropped to the brain's bounding box.

    Returns (data (i, j, k) float32, vox2ras (4, 4) of the crop); zero outside the crop.
    """
    c_csf, c_gm, c_wm = (np.float32(c) for c in contrast)
    lo, hi = _brain_bbox_vox(template)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    img = template.csf[sl] * c_csf + template.gm[sl] * c_gm + template.wm[sl] * c_wm
    img *= 1.0 + np.float32(TEXTURE_AMPLITUDE) * _texture(template)
    np.clip(img, 0.0, None, out=img)
    v2r = template.vox2ras.copy()
    v2r[:3, 3] = apply_matrix(template.vox2ras, np.asarray([lo], dtype=np.float64))[0]
    return np.ascontiguousarray(img), v2r


@functools.lru_cache(maxsize=8)
def _blurred_intensity(template: Template, contrast: tuple, sigma_vox: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Tissue intensity blurred by a Gaussian of ``sigma_vox`` (template voxels), zero-padded by 4 sigma.

    Returns (data float32, vox2ras (4, 4)).
    """
    img, v2r = _tissue_intensity(template, contrast)
    pad = [int(math.ceil(4.0 * s)) + 1 for s in sigma_vox]
    padded = np.pad(img, [(p, p) for p in pad])
    if max(sigma_vox) > 0:
        padded = ndimage.gaussian_filter(padded, sigma_vox, mode="constant", truncate=4.0)
    v2r = v2r.copy()
    v2r[:3, 3] = v2r[:3, :3] @ (-np.asarray(pad, dtype=np.float64)) + v2r[:3, 3]
    padded.setflags(write=False)
    return padded, v2r


# --------------------------------------------------------------------------------------------
# Image effects (pure functions)
# --------------------------------------------------------------------------------------------


def add_rician_noise(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise.

    Parameters
    ----------
    signal : ndarray, any shape
        Noise-free magnitude (non-negative).
    sigma : float
        Standard deviation of each of the real and imaginary noise parts (same units as signal).
    rng : numpy.random.Generator
        Always draws ``2 * signal.size`` standard normals (real parts first), even for sigma 0.

    Returns
    -------
    ndarray, same shape, float32, non-negative
    """
    s = np.asarray(signal, dtype=np.float32)
    noise = rng.standard_normal((2,) + s.shape, dtype=np.float32) * np.float32(sigma)
    return np.hypot(s + noise[0], noise[1]).astype(np.float32)


def mean_brain_signal(signal: np.ndarray, threshold_frac: float = 0.2) -> float:
    """Mean of the voxels above ``threshold_frac`` times the 99th percentile (a brain-mean proxy)."""
    s = np.asarray(signal, dtype=np.float32)
    top = float(np.percentile(s, 99.0)) if s.size else 0.0
    inside = s[s > threshold_frac * top]
    return float(inside.mean()) if inside.size else 0.0


def bias_field(shape, coefficients, amplitude: float, mask=None) -> np.ndarray:
    """Smooth multiplicative bias field from a quadratic polynomial of the voxel position.

    Parameters
    ----------
    shape : tuple of 3 int
        Grid shape (I, J, K).
    coefficients : array_like, shape (9,)
        Weights of ``x, y, z, x^2, y^2, z^2, xy, xz, yz`` with each coordinate scaled to [-1, 1]
        over the grid.
    amplitude : float
        Largest relative deviation from 1 (e.g. 0.2 for +-20 %), reached inside ``mask``.
    mask : ndarray of bool, shape (I, J, K), optional
        Where the amplitude is normalised (default: whole grid).

    Returns
    -------
    ndarray, shape (I, J, K), float32
        ``1 + amplitude * p / max|p|``, clipped to at least 0.05.
    """
    axes = [np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1) for n in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    c = np.asarray(coefficients, dtype=np.float64).reshape(9)
    p = (c[0] * x + c[1] * y + c[2] * z + c[3] * x * x + c[4] * y * y + c[5] * z * z
         + c[6] * x * y + c[7] * x * z + c[8] * y * z)
    p = np.broadcast_to(p, tuple(shape))
    p = p - (p[mask].mean() if mask is not None and mask.any() else p.mean())
    top = float(np.max(np.abs(p[mask]))) if mask is not None and mask.any() else float(np.max(np.abs(p)))
    field = 1.0 + amplitude * p / top if top > 0 else np.ones(shape)
    return np.clip(field, 0.05, None).astype(np.float32)


def _slab_bounds(n: int, slab) -> tuple[int, int]:
    lo_frac, hi_frac = (float(f) for f in slab)
    if not (0.0 <= lo_frac < hi_frac <= 1.0):
        raise ValueError(f"slab must be (lo_frac, hi_frac) with 0 <= lo < hi <= 1, got {slab}")
    lo = int(np.floor(lo_frac * n + 1e-9))
    hi = max(int(np.ceil(hi_frac * n - 1e-9)), lo + 1)
    return lo, min(hi, n)


# --------------------------------------------------------------------------------------------
# Synthetic images
# --------------------------------------------------------------------------------------------


def make_epi(template: Template, fixed2moving, rng: np.random.Generator, *, voxel_mm=3.0, shape=None,
             blur_fwhm_mm: float = 2.5, bias: float = 0.2, noise: float = 0.04, dropout: float = 0.8,
             distortion_mm: float = 0.0, pe_axis: int = 1, slab=None, contrast=EPI_CONTRAST,
             scale: float = EPI_SCALE) -> Volume:
    """EPI-like image of the template seen through a known transform.

    Moving voxel ``v`` shows the template at fixed world point
    ``inv(fixed2moving) @ moving_vox2ras @ v`` (before distortion). Steps:

    1. tissue intensity at 1 mm: ``csf*1.0 + gm*0.65 + wm*0.45`` (``contrast``) times a fixed
       anatomical texture (+-3 %, smooth);
    2. Gaussian blur of ``blur_fwhm_mm`` combined with the anti-aliasing needed for ``voxel_mm``
       voxels (variance of a box of the voxel size), then trilinear sampling at the voxel centres;
       with distortion, sampling moves along ``pe_axis`` and the intensity is multiplied by the
       Jacobian ``|1 + du/dv|`` (pile-up / stretching);
    3. signal dropout near the orbitofrontal cortex and inferior temporal lobes (anatomy-bound,
       centres jittered by ~3 mm per image): intensity times ``1 - dropout * w`` with ``w`` in
       [0, 1];
    4. a smooth quadratic bias field (scanner-bound, moving grid) of relative amplitude ``bias``
       inside the brain;
    5. scaling (CSF = ``scale``) and Rician noise of sigma ``noise`` times the mean brain signal;
    6. optional axial slab crop.

    Parameters
    ----------
    template : Template
        From :func:`load_template`.
    fixed2moving : array_like, shape (4, 4)
        Fixed (template) world mm to moving (EPI) world mm; any invertible affine.
    rng : numpy.random.Generator
        Draws, in this order whatever the options: 3x3 dropout jitters, 9 bias coefficients,
        ``2 * n_voxels`` noise normals (of the full grid, before the slab crop).
    voxel_mm : float or array_like, shape (3,)
        EPI voxel size (mm).
    shape : tuple of 3 int, optional
        EPI grid shape; default covers the brain with margin (see :func:`epi_grid`).
    blur_fwhm_mm : float
        Point-spread FWHM (mm) on top of the voxel integration.
    bias : float
        Relative bias-field amplitude in the brain (0.2 = +-20 %); 0 for none.
    noise : float
        Rician noise sigma relative to the mean brain signal (e.g. 0.03 to 0.05); 0 for none.
    dropout : float
        Largest fractional signal loss in the dropout regions (0.8 = down to 20 %); 0 for none.
    distortion_mm : float
        Largest displacement (mm) along ``pe_axis``, largest near the frontal and temporal base;
        0 for none.
    pe_axis : int
        Moving voxel axis (0, 1 or 2) of the phase-encoding direction.
    slab : (float, float), optional
        ``(lo_frac, hi_frac)``: keep only moving-grid slices ``floor(lo*K) .. ceil(hi*K)-1`` along
        the third axis; the returned ``vox2ras`` keeps every kept voxel's world position. The
        result equals that crop of the full image made with the same generator state.
    contrast : (float, float, float)
        Relative intensities of (CSF, GM, WM).
    scale : float
        Output intensity of pure CSF before bias and noise.

    Returns
    -------
    Volume
        Data (I, J, K) float32, non-negative, roughly 0..1000; ``vox2ras`` axis-aligned RAS+ with
        ``voxel_mm`` voxels (moving world).
    """
    f2m = check_vox2ras(fixed2moving, name="fixed2moving")
    spacing = _as_spacing(voxel_mm)
    if pe_axis not in (0, 1, 2):
        raise ValueError(f"pe_axis must be 0, 1 or 2, got {pe_axis}")
    grid_shape, moving_vox2ras = epi_grid(template, spacing, shape)
    if slab is not None:
        k_lo, k_hi = _slab_bounds(grid_shape[2], slab)

    # Random draws first, in a fixed order.
    jitter = rng.normal(0.0, _DROPOUT_JITTER_MM, size=(len(_DROPOUT_BLOBS), 3))
    bias_coef = rng.uniform(-1.0, 1.0, size=9)

    vox_to_fixed = np.linalg.inv(f2m) @ moving_vox2ras
    idx = _grid_indices(grid_shape)
    fixed_pts = apply_matrix(vox_to_fixed, idx)
    jacobian = None
    if distortion_mm > 0:
        shift_vox = (distortion_mm / spacing[pe_axis]) * _gaussian_blobs(fixed_pts, _DISTORTION_BLOBS)
        np.clip(shift_vox, 0.0, distortion_mm / spacing[pe_axis], out=shift_vox)
        idx[:, pe_axis] += shift_vox
        fixed_pts = apply_matrix(vox_to_fixed, idx)
        grad = np.gradient(shift_vox.reshape(grid_shape), axis=pe_axis) if grid_shape[pe_axis] > 1 else 0.0
        jacobian = np.abs(1.0 + grad).astype(np.float32).ravel()

    sigma_vox = _antialias_sigma_vox(spacing, template.t1.spacing, blur_fwhm_mm)
    sigma_key = tuple(round(float(s), 3) for s in sigma_vox)
    contrast_key = tuple(float(c) for c in contrast)
    blurred, blurred_v2r = _blurred_intensity(template, contrast_key, sigma_key)
    signal = _sample(blurred, blurred_v2r, fixed_pts, order=1)
    if jacobian is not None:
        signal *= jacobian
    if dropout > 0:
        loss = np.clip(_gaussian_blobs(fixed_pts, _DROPOUT_BLOBS, jitter), 0.0, 1.0)
        signal *= 1.0 - np.float32(dropout) * loss
    signal = signal.reshape(grid_shape)
    if bias > 0:
        mask = signal > 0.1 * max(float(signal.max()), 1e-12)
        signal *= bias_field(grid_shape, bias_coef, bias, mask)
    signal *= np.float32(scale)
    sigma = noise * mean_brain_signal(signal) if noise > 0 else 0.0
    out = add_rician_noise(signal, sigma, rng)

    v2r = moving_vox2ras
    if slab is not None:
        out = out[:, :, k_lo:k_hi]
        v2r = moving_vox2ras.copy()
        v2r[:3, 3] = moving_vox2ras[:3, :3] @ np.array([0.0, 0.0, k_lo]) + moving_vox2ras[:3, 3]
    note = (f"synthetic EPI: voxel {np.round(spacing, 3).tolist()} mm, blur {blur_fwhm_mm} mm FWHM, "
            f"bias {bias}, noise {noise}, dropout {dropout}, distortion {distortion_mm} mm along axis "
            f"{pe_axis}, slab {slab}")
    return Volume(out, v2r, name="synthetic_epi", note=note)


def make_t1(template: Template, *, voxel_mm=1.0) -> Volume:
    """The fixed T1-weighted image: the template T1, resampled when ``voxel_mm`` is not 1 mm.

    Parameters
    ----------
    template : Template
    voxel_mm : float or array_like, shape (3,)
        Voxel size (mm). For 1 mm, the template T1 itself (a copy); otherwise an anti-aliased
        (Gaussian, box-variance matched) trilinear resampling onto an axis-aligned grid of the same
        centre and field of view.

    Returns
    -------
    Volume
        Float32 0..255, fixed world.
    """
    spacing = _as_spacing(voxel_mm)
    t1 = template.t1
    if np.allclose(spacing, t1.spacing):
        return Volume(t1.data.copy(), t1.vox2ras, name="synthetic_t1", note="MNI152 T1 template, 1 mm")
    extent = np.asarray(t1.shape) * t1.spacing
    shape = tuple(int(n) for n in np.maximum(np.round(extent / spacing), 1))
    v2r = np.eye(4)
    v2r[:3, :3] = np.diag(spacing)
    v2r[:3, 3] = t1.centre - spacing * (np.asarray(shape) - 1) / 2.0
    sigma_vox = _antialias_sigma_vox(spacing, t1.spacing)
    blurred = ndimage.gaussian_filter(t1.data, sigma_vox, mode="constant") if np.any(sigma_vox > 0) else t1.data
    data = _sample(blurred, t1.vox2ras, apply_matrix(v2r, _grid_indices(shape))).reshape(shape)
    return Volume(np.clip(data, 0.0, None), v2r, name="synthetic_t1",
                  note=f"MNI152 T1 template resampled to {np.round(spacing, 3).tolist()} mm")


# --------------------------------------------------------------------------------------------
# Storage orientation
# --------------------------------------------------------------------------------------------


def reorient(volume: Volume, code: str) -> Volume:
    """The same image stored with another axis order / direction (exact: no resampling).

    Parameters
    ----------
    volume : Volume
    code : str
        Three orientation letters naming the world direction each array axis increases toward,
        one from each of R/L, A/P, S/I: 'RAS' (as stored for an axis-aligned RAS volume), 'LAS'
        (first axis flipped), 'LPS' (first two flipped), 'ARS' (first two axes swapped, i.e.
        stored in (j, i, k) order), 'PIR', ... The volume's current axis directions are taken
        from the closest world axis of each ``vox2ras`` column.

    Returns
    -------
    Volume
        Flipped/transposed data with ``vox2ras`` updated so every voxel keeps its world position.
    """
    from nibabel import orientations as ornt

    letters = str(code).upper()
    world_axis = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}
    if len(letters) != 3 or sorted(world_axis.get(c, -1) for c in letters) != [0, 1, 2]:
        raise ValueError(f"orientation code must be 3 letters, one of each R/L, A/P, S/I; got {code!r}")
    current = ornt.io_orientation(volume.vox2ras)
    wanted = ornt.axcodes2ornt(tuple(letters))
    change = ornt.ornt_transform(current, wanted)
    data = ornt.apply_orientation(volume.data, change)
    new_v2r = volume.vox2ras @ ornt.inv_ornt_aff(change, volume.shape)
    return Volume(np.ascontiguousarray(data), new_v2r, name=volume.name,
                  note=(volume.note + "; " if volume.note else "") + f"stored as {letters}")


def oblique_copy(volume: Volume, rotation_deg: float, rng: np.random.Generator, *, order: int = 1) -> Volume:
    """Resample a volume onto an oblique grid (same voxel size, rotated axes).

    The new grid's axes are the volume's axes rotated by exactly ``rotation_deg`` about a random
    unit axis (drawn from ``rng``: three normals), centred on the volume's centre and large enough
    to hold the whole original field of view.

    Parameters
    ----------
    volume : Volume
    rotation_deg : float
        Rotation angle of the grid (degrees).
    rng : numpy.random.Generator
    order : int
        Spline order of the resampling (1 = trilinear); zero outside the original grid.

    Returns
    -------
    Volume
        Float32 data on a grid with non-diagonal ``vox2ras`` (for a non-zero angle).
    """
    axis = rng.standard_normal(3)
    axis /= max(float(np.linalg.norm(axis)), 1e-12)
    rot = _axis_angle(axis, np.deg2rad(rotation_deg))
    lin = rot @ volume.vox2ras[:3, :3]
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.float64)
    corners = corners * np.asarray(volume.shape, dtype=np.float64) - 0.5
    world = volume.world_coords(corners) - volume.centre
    in_new = world @ np.linalg.inv(lin).T
    half = np.max(np.abs(in_new), axis=0)
    shape = tuple(int(n) for n in np.ceil(2.0 * half - 1e-6))
    v2r = np.eye(4)
    v2r[:3, :3] = lin
    v2r[:3, 3] = volume.centre - lin @ ((np.asarray(shape, dtype=np.float64) - 1.0) / 2.0)
    data = _sample(volume.data, volume.vox2ras, apply_matrix(v2r, _grid_indices(shape)), order=order)
    data = data.reshape(shape)
    if order > 1 and volume.data.min() >= 0:
        np.clip(data, 0.0, None, out=data)  # spline overshoot must not create negative intensities
    return Volume(data, v2r, name=volume.name,
                  note=(volume.note + "; " if volume.note else "") + f"oblique copy, {rotation_deg} deg")


def _axis_angle(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    """(3, 3) rotation by ``angle_rad`` about unit ``axis`` (Rodrigues)."""
    x, y, z = axis
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + math.sin(angle_rad) * k + (1.0 - math.cos(angle_rad)) * (k @ k)


def epi_from_volume(src: Volume, fixed2moving, rng, *, voxel_mm=3.0, blur_mm=4.0, distortion_mm=3.0,
                    noise=0.06, shape=(72, 72, 44)) -> Volume:
    """EPI-like view of a real image of one subject through a known rigid/affine transform.

    Gives test pairs whose anatomy is a real, asymmetric brain (the MNI 2009c template is
    symmetric, so a left-right flip of an EPI made from it is not an error).

    Parameters
    ----------
    src : Volume
        Real image (e.g. a T2w, whose bright CSF resembles an EPI's contrast).
    fixed2moving : ndarray (4, 4)
        src world mm -> EPI world mm.
    rng : numpy.random.Generator
        Draws 3 distortion phases, 3 bias coefficients and the noise, in that order.
    voxel_mm : float
        EPI voxel size (mm), axis-aligned grid of ``shape`` centred on the mapped centre of mass.
    blur_mm : float
        Point-spread FWHM (mm) on top of the voxel integration.
    distortion_mm : float
        Amplitude (mm) of a smooth displacement along the second axis (phase encoding), with the
        intensity multiplied by its Jacobian.
    noise : float
        Noise sigma relative to the mean signal (magnitude, so Rician-like).
    shape : tuple of 3 int

    Returns
    -------
    Volume
        float32, RAS+ axis-aligned grid.
    """
    sigma = np.sqrt(blur_mm ** 2 / (8 * np.log(2)) + voxel_mm ** 2 / 12) / src.spacing
    smooth = ndimage.gaussian_filter(src.data, sigma)
    centre = fixed2moving[:3, :3] @ src.centre_of_mass() + fixed2moving[:3, 3]
    v2r = np.diag([voxel_mm, voxel_mm, voxel_mm, 1.0])
    v2r[:3, 3] = centre - voxel_mm * (np.array(shape) - 1) / 2
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij"), -1)
    k = rng.uniform(-1, 1, 3)
    shift = distortion_mm * np.sin(np.pi * (k[0] * idx[..., 0] / shape[0] + k[1] * idx[..., 2] / shape[2]) + k[2])
    vox = idx.copy()
    vox[..., 1] += shift / voxel_mm  # phase encoding along the second axis (A-P)
    world = vox.reshape(-1, 3) @ v2r[:3, :3].T + v2r[:3, 3]
    inv = np.linalg.inv(fixed2moving)
    src_vox = (world @ inv[:3, :3].T + inv[:3, 3]) @ src.ras2vox[:3, :3].T + src.ras2vox[:3, 3]
    out = ndimage.map_coordinates(smooth, src_vox.T, order=1, cval=0.0).reshape(shape)
    out *= np.abs(1 + np.gradient(shift / voxel_mm, axis=1))
    lin = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    out *= 1 + 0.2 * np.tensordot(rng.uniform(-1, 1, 3), lin, 1)
    out = np.abs(out + rng.normal(0, noise * out[out > 0].mean(), shape))
    return Volume(out.astype(np.float32), v2r, f"EPI-like view of {src.name}")
