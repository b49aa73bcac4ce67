"""The MNI152 template, known transforms and the error measure for synthetic test data.

Part of the test-data generators (see :mod:`regkl.synthetic`, which re-exports these names): the
:class:`Template` with its tissue maps, random rigid/affine ``fixed2moving`` matrices (RAS+ mm,
FIXED world point -> MOVING world point), brain points and the RMS-displacement error over them.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .transforms import apply_matrix, euler_to_rotation, rms_displacement
from .volume import Volume

#: Files of the template inside ``<shared_dir>/mni152_2009c/``.
TEMPLATE_SUBDIR = "mni152_2009c"
TEMPLATE_FILES = {"t1": "mni152_T1w_1mm.nii.gz", "gm": "mni152_gm_1mm.nii.gz", "wm": "mni152_wm_1mm.nii.gz"}

# --------------------------------------------------------------------------------------------
# Template
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Template:
    """The MNI152 template on its 1 mm grid (the FIXED world of synthetic pairs).

    Compared and hashed by identity (it holds large arrays), which lets derived images be cached.

    Parameters
    ----------
    t1 : Volume
        Brain-only T1-weighted image, shape (I, J, K) = (197, 233, 189), 1 mm, float32 0..255.
    gm, wm, csf : ndarray, shape (I, J, K), float32
        Grey-matter, white-matter and CSF probabilities in [0, 1] on the grid of ``t1``, all three
        zero outside the brain; ``csf = clip(brain - gm - wm, 0, 1)``.
    brain : ndarray, shape (I, J, K), bool
        Brain mask: the support of the brain-only T1, ``t1 > 0``. The synthetic EPIs show tissue
        only there, so fixed and moving images depict the same object. (The tissue probability
        maps reach up to about a voxel beyond the T1's mask; keeping that shell, as an earlier
        version did with ``t1 > 0 or gm + wm > 0.1``, gave the EPI a CSF-bright rim where the T1
        is empty: a 0.3-0.5 % larger brain than the fixed image, which biased affine recovery.)
    source : str
        Folder the template was read from.
    """

    t1: Volume
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    source: str = ""

    @property
    def vox2ras(self) -> np.ndarray:
        """(4, 4) voxel index to RAS+ mm of the template grid (the fixed world)."""
        return self.t1.vox2ras

    @property
    def shape(self) -> tuple:
        """(I, J, K) template grid shape."""
        return self.t1.shape


def default_shared_dir() -> Path:
    """Folder of the shared reference data.

    Returns ``$REGKL_SHARED_DATA`` when that environment variable is set, otherwise
    ``<repo root>/../shared/data``, where the repo root is the parent of the ``regkl`` package
    folder.
    """
    env = os.environ.get("REGKL_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def load_template(shared_dir=None) -> Template:
    """Load the MNI152 template and its tissue maps (cached per folder).

    Parameters
    ----------
    shared_dir : str or Path, optional
        The shared data folder (holding ``mni152_2009c/``) or the ``mni152_2009c`` folder itself.
        Defaults to :func:`default_shared_dir`.

    Returns
    -------
    Template
        The same object for repeated calls with the same folder; treat its arrays as read-only.

    Raises
    ------
    InputError
        If a template file is missing or the images do not share one grid.
    """
    folder = Path(default_shared_dir() if shared_dir is None else shared_dir).expanduser().resolve()
    if not (folder / TEMPLATE_FILES["t1"]).exists():
        folder = folder / TEMPLATE_SUBDIR
    return _load_template_cached(str(folder))


@functools.lru_cache(maxsize=2)
def _load_template_cached(folder: str) -> Template:
    import nibabel as nib

    arrays, affines = {}, {}
    for key, fname in TEMPLATE_FILES.items():
        path = Path(folder) / fname
        if not path.exists():
            raise InputError("template file not found (set REGKL_SHARED_DATA to the shared data folder)",
                             path=path)
        img = nib.load(str(path))
        arrays[key] = np.asarray(img.dataobj, dtype=np.float32)
        affines[key] = np.asarray(img.affine, dtype=np.float64)
    for key in ("gm", "wm"):
        if arrays[key].shape != arrays["t1"].shape or not np.allclose(affines[key], affines["t1"]):
            raise InputError("tissue map is not on the T1 template grid", path=Path(folder) / TEMPLATE_FILES[key])
    brain = arrays["t1"] > 0
    gm, wm = (_as_probability(arrays[k]) * brain for k in ("gm", "wm"))
    csf = np.clip(brain.astype(np.float32) - gm - wm, 0.0, 1.0)
    t1 = Volume(arrays["t1"], affines["t1"], name=str(Path(folder) / TEMPLATE_FILES["t1"]),
                note="MNI152 brain-only T1 template")
    for a in (gm, wm, csf, brain):
        a.setflags(write=False)
    return Template(t1=t1, gm=gm, wm=wm, csf=csf, brain=brain, source=folder)


def _as_probability(values: np.ndarray) -> np.ndarray:
    """Scale a tissue map stored as 0..255 (uint8) or 0..1 to float32 probabilities in [0, 1]."""
    top = float(values.max()) if values.size else 0.0
    scale = 255.0 if top > 1.5 else 1.0
    return np.clip(values / np.float32(scale), 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Transforms and error measure
# --------------------------------------------------------------------------------------------


def rotation_matrix(angles_deg) -> np.ndarray:
    """Rotation (3, 3) from angles in degrees about R, A, S, composed ``Rz @ Ry @ Rx``
    (:func:`regkl.transforms.euler_to_rotation` in degrees)."""
    return euler_to_rotation(np.deg2rad(np.asarray(angles_deg, dtype=np.float64).reshape(3)))


def rigid_fixed2moving(angles_deg, translation_mm, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Rigid ``fixed2moving`` matrix rotating about ``centre`` then translating.

    A fixed world point ``x`` maps to ``R @ (x - centre) + centre + translation_mm``.

    Parameters
    ----------
    angles_deg : array_like, shape (3,)
        Angles (degrees) about R, A, S; see :func:`rotation_matrix`.
    translation_mm : array_like, shape (3,)
        Translation (mm, RAS+) of the centre.
    centre : array_like, shape (3,)
        Centre of rotation (mm, fixed world).

    Returns
    -------
    ndarray, shape (4, 4)
    """
    rot = rotation_matrix(angles_deg)
    c = np.asarray(centre, dtype=np.float64).reshape(3)
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = c - rot @ c + np.asarray(translation_mm, dtype=np.float64).reshape(3)
    return m


def random_rigid(rng: np.random.Generator, max_rot_deg: float, max_trans_mm: float,
                 centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Random rigid ``fixed2moving`` matrix.

    Each of the three angles about the R, A, S axes is drawn uniformly in
    ``[-max_rot_deg, max_rot_deg]`` (composition as in :func:`rotation_matrix`), then each
    translation component uniformly in ``[-max_trans_mm, max_trans_mm]``; the rotation is about
    ``centre``. Draw order: three angles, then three translations.

    Parameters
    ----------
    rng : numpy.random.Generator
    max_rot_deg : float
        Largest angle per axis (degrees).
    max_trans_mm : float
        Largest translation per axis (mm).
    centre : array_like, shape (3,)
        Centre of rotation (mm, fixed world), e.g. the brain centre.

    Returns
    -------
    ndarray, shape (4, 4)
    """
    angles = rng.uniform(-max_rot_deg, max_rot_deg, size=3)
    trans = rng.uniform(-max_trans_mm, max_trans_mm, size=3)
    return rigid_fixed2moving(angles, trans, centre)


def random_affine(rng: np.random.Generator, max_rot_deg: float = 15.0, max_trans_mm: float = 15.0,
                  max_scale_dev: float = 0.1, max_shear: float = 0.05, centre=(0.0, 0.0, 0.0)):
    """Random affine ``fixed2moving`` matrix ``x -> L (x - centre) + centre + t`` with ``L = R @ K @ S``.

    ``R`` is a rotation as in :func:`rotation_matrix`, ``K`` an upper-triangular shear (unit
    diagonal; ``K[0, 1], K[0, 2], K[1, 2]``) and ``S`` a diagonal scaling. Draw order, each uniform:
    three angles in ``[-max_rot_deg, max_rot_deg]``, three translations in
    ``[-max_trans_mm, max_trans_mm]``, three scales in ``[1 - max_scale_dev, 1 + max_scale_dev]``,
    three shears in ``[-max_shear, max_shear]``.

    Parameters
    ----------
    rng : numpy.random.Generator
    max_rot_deg, max_trans_mm, max_scale_dev, max_shear : float
        Ranges (degrees, mm, relative, shear factor).
    centre : array_like, shape (3,)
        Centre (mm, fixed world), e.g. the brain centre.

    Returns
    -------
    matrix : ndarray, shape (4, 4)
    parts : dict
        ``angles_deg``, ``translation_mm``, ``scales``, ``shears`` (lists) as drawn.
    """
    angles = rng.uniform(-max_rot_deg, max_rot_deg, 3)
    trans = rng.uniform(-max_trans_mm, max_trans_mm, 3)
    scales = rng.uniform(1.0 - max_scale_dev, 1.0 + max_scale_dev, 3)
    shears = rng.uniform(-max_shear, max_shear, 3)
    shear = np.eye(3)
    shear[0, 1], shear[0, 2], shear[1, 2] = shears
    lin = rotation_matrix(angles) @ shear @ np.diag(scales)
    c = np.asarray(centre, dtype=np.float64).reshape(3)
    m = np.eye(4)
    m[:3, :3] = lin
    m[:3, 3] = c - lin @ c + trans
    return m, {"angles_deg": angles.tolist(), "translation_mm": trans.tolist(), "scales": scales.tolist(),
               "shears": shears.tolist()}


def rms_error(fixed2moving_est, fixed2moving_true, points) -> float:
    """Root-mean-square distance (mm) between two transforms over a set of points.

    Parameters
    ----------
    fixed2moving_est, fixed2moving_true : array_like, shape (4, 4)
        Estimated and true ``fixed2moving`` matrices.
    points : array_like, shape (N, 3)
        Fixed world points (mm), e.g. from :func:`brain_points`.

    Returns
    -------
    float
        ``sqrt(mean_n ||est(x_n) - true(x_n)||^2)`` in mm.
    """
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if p.shape[0] == 0:
        raise ValueError("rms_error needs at least one point")
    return rms_displacement(np.asarray(fixed2moving_est, dtype=np.float64),
                            np.asarray(fixed2moving_true, dtype=np.float64), p)


def brain_points(template: Template, step_vox: int = 2) -> np.ndarray:
    """World coordinates of brain voxels, subsampled on a regular grid.

    Parameters
    ----------
    template : Template
    step_vox : int
        Keep every ``step_vox``-th voxel along each axis.

    Returns
    -------
    ndarray, shape (N, 3)
        Fixed world RAS+ mm of the kept voxels inside ``template.brain``.
    """
    step = int(step_vox)
    if step < 1:
        raise ValueError(f"step_vox must be >= 1, got {step_vox}")
    idx = np.argwhere(template.brain[::step, ::step, ::step]).astype(np.float64) * step
    return apply_matrix(template.vox2ras, idx)


# --------------------------------------------------------------------------------------------
# Grids and resampling helpers
# --------------------------------------------------------------------------------------------


def _as_spacing(voxel_mm) -> np.ndarray:
    s = np.broadcast_to(np.asarray(voxel_mm, dtype=np.float64), (3,)).copy()
    if np.any(~np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"voxel size must be positive, got {voxel_mm}")
    return s


def brain_bbox_mm(template: Template) -> tuple[np.ndarray, np.ndarray]:
    """(lo (3,), hi (3,)) world mm corners of the brain's bounding box (voxel centres, fixed world)."""
    return _brain_bbox_mm_cached(template)


@functools.lru_cache(maxsize=4)
def _brain_bbox_mm_cached(template: Template):
    lo, hi = (np.asarray(b, dtype=np.float64) for b in _brain_bbox_vox(template))
    hi = hi - 1.0
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.float64)
    world = apply_matrix(template.vox2ras, lo + corners * (hi - lo))
    return world.min(axis=0), world.max(axis=0)


@functools.lru_cache(maxsize=4)
def _brain_bbox_vox(template: Template) -> tuple[tuple, tuple]:
    """(lo, hi) voxel index bounds of the brain mask, ``hi`` exclusive."""
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(template.brain.any(axis=other))
        if present.size == 0:
            raise InputError("template brain mask is empty", path=template.source)
        lo.append(int(present[0]))
        hi.append(int(present[-1]) + 1)
    return tuple(lo), tuple(hi)
