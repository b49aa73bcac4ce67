"""Transform models: parameters <-> fixed-to-moving RAS matrix, with analytic derivatives.

Every model maps a parameter vector ``p`` to a 4x4 matrix ``M(p)`` taking a FIXED world point
``x`` (RAS+ mm) to the MOVING world point ``y = M(p) @ [x, 1]``. Models act about a centre ``c``
(fixed world mm) so that rotations and translations are decoupled:
``y = L(p) (x - c) + c + t``.

``dmatrix(p, c)`` returns d M / d p as an array of shape (P, 3, 4); the metric kernels return the
gradient with respect to the 3x4 matrix entries, so one tensordot gives the parameter gradient for
any model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import InputError


def _euler_parts(angles):
    """(cos ax, sin ax, cos ay, sin ay, cos az, sin az) of Euler angles, as floats."""
    ax, ay, az = (float(a) for a in angles)
    return math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az)


def _rotation_rows(cx, sx, cy, sy, cz, sz):
    """Rows of ``Rz @ Ry @ Rx`` written out from the angles' cosines and sines (floats, or arrays
    of K poses: each entry is then a (K,) array)."""
    return [[cz * cy, cz * sy * sx - sz * cx, cz * sy * cx + sz * sx],
            [sz * cy, sz * sy * sx + cz * cx, sz * sy * cx - cz * sx],
            [-sy, cy * sx, cy * cx]]


def euler_to_rotation(angles):
    """Rotation matrix ``Rz(az) @ Ry(ay) @ Rx(ax)`` for angles (ax, ay, az) in radians.

    Written out in closed form (no 3x3 products): the optimisers evaluate it hundreds of times
    per registration.
    """
    return np.array(_rotation_rows(*_euler_parts(angles)))


def rotation_to_euler(rot):
    """Inverse of :func:`euler_to_rotation` (ay in [-pi/2, pi/2])."""
    ay = np.arcsin(np.clip(-rot[2, 0], -1.0, 1.0))
    if abs(np.cos(ay)) > 1e-9:
        ax = np.arctan2(rot[2, 1], rot[2, 2])
        az = np.arctan2(rot[1, 0], rot[0, 0])
    else:  # gimbal lock: put everything in az
        ax = 0.0
        az = np.arctan2(-rot[0, 1], rot[1, 1])
    return np.array([ax, ay, az])


def _homogeneous(lin, centre, trans):
    m = np.eye(4)
    m[:3, :3] = lin
    m[:3, 3] = centre + trans - lin @ centre
    return m


# --- translation -------------------------------------------------------------------------------

def _translation_matrix(p, centre):
    return _homogeneous(np.eye(3), centre, p[:3])


def _translation_dmatrix(p, centre):
    d = np.zeros((3, 3, 4))
    for k in range(3):
        d[k, k, 3] = 1.0
    return d


def _translation_from_matrix(m, centre):
    return m[:3, 3] + m[:3, :3] @ centre - centre


# --- rigid ---------------------------------------------------------------------------------------

def _rigid_matrix(p, centre):
    return _homogeneous(euler_to_rotation(p[:3]), centre, p[3:6])


def _rigid_matrices(ps, centre):
    """:func:`_rigid_matrix` of each row of ``ps`` (K, 6) at once: (K, 4, 4)."""
    ps = np.asarray(ps, dtype=np.float64)
    (cx, cy, cz), (sx, sy, sz) = np.cos(ps[:, :3]).T, np.sin(ps[:, :3]).T
    rot = np.moveaxis(np.array(_rotation_rows(cx, sx, cy, sy, cz, sz)), -1, 0)  # (K, 3, 3)
    m = np.zeros((len(ps), 4, 4))
    m[:, :3, :3] = rot
    m[:, :3, 3] = centre + ps[:, 3:6] - rot @ np.asarray(centre, dtype=np.float64)
    m[:, 3, 3] = 1.0
    return m


def _rigid_dmatrix(p, centre):
    """d M / d p (6, 3, 4): the rotation's derivative by each Euler angle, closed form, and the
    translations' unit columns."""
    cx, sx, cy, sy, cz, sz = _euler_parts(p[:3])
    d = np.zeros((6, 3, 4))
    # d/dax = Rz Ry dRx ; d/day = Rz dRy Rx ; d/daz = dRz Ry Rx
    d[0, :, :3] = [[0.0, cz * sy * cx + sz * sx, sz * cx - cz * sy * sx],
                   [0.0, sz * sy * cx - cz * sx, -sz * sy * sx - cz * cx],
                   [0.0, cy * cx, -cy * sx]]
    d[1, :, :3] = [[-cz * sy, cz * cy * sx, cz * cy * cx],
                   [-sz * sy, sz * cy * sx, sz * cy * cx],
                   [-cy, -sy * sx, -sy * cx]]
    d[2, :, :3] = [[-sz * cy, -sz * sy * sx - cz * cx, -sz * sy * cx + cz * sx],
                   [cz * cy, cz * sy * sx - sz * cx, cz * sy * cx + sz * sx],
                   [0.0, 0.0, 0.0]]
    d[:3, :, 3] = -(d[:3, :, :3] @ np.asarray(centre, dtype=np.float64))
    d[3, 0, 3] = d[4, 1, 3] = d[5, 2, 3] = 1.0
    return d


def _rigid_from_matrix(m, centre):
    """Closest rigid parameters to the 4x4 ``m`` (rotation by polar decomposition)."""
    trans = m[:3, 3] + m[:3, :3] @ centre - centre
    return np.concatenate([rotation_to_euler(_polar_rotation(m[:3, :3])), trans])


# --- similarity: rigid + isotropic scale s = exp(p[6]) --------------------------------------------

def _polar_rotation(lin):
    u, _, vt = np.linalg.svd(lin)
    rot = u @ vt
    if np.linalg.det(rot) < 0:
        u[:, -1] *= -1
        rot = u @ vt
    return rot


def _similarity_matrix(p, centre):
    return _homogeneous(np.exp(p[6]) * euler_to_rotation(p[:3]), centre, p[3:6])


def _similarity_dmatrix(p, centre):
    s = np.exp(p[6])
    d = np.zeros((7, 3, 4))
    d[:6] = _rigid_dmatrix(p[:6], centre)
    d[:3] *= s
    lin = s * euler_to_rotation(p[:3])
    d[6, :, :3] = lin
    d[6, :, 3] = -lin @ centre
    return d


def _similarity_from_matrix(m, centre):
    lin = m[:3, :3]
    det = np.linalg.det(lin)
    s = np.cbrt(det) if det > 0 else 1.0
    trans = m[:3, 3] + lin @ centre - centre
    return np.concatenate([rotation_to_euler(_polar_rotation(lin / s)), trans, [np.log(s)]])


# --- affine: linear part I + A (9 entries, row-major), translation -------------------------------

def _affine_matrix(p, centre):
    return _homogeneous(np.eye(3) + p[:9].reshape(3, 3), centre, p[9:12])


def _affine_dmatrix(p, centre):
    d = np.zeros((12, 3, 4))
    for a in range(3):
        for b in range(3):
            d[3 * a + b, a, b] = 1.0
            d[3 * a + b, a, 3] = -centre[b]
        d[9 + a, a, 3] = 1.0
    return d


def _affine_from_matrix(m, centre):
    lin = m[:3, :3]
    return np.concatenate([(lin - np.eye(3)).ravel(), m[:3, 3] + lin @ centre - centre])


@dataclass(frozen=True)
class TransformModel:
    """A parametric family of fixed-to-moving matrices.

    Attributes
    ----------
    name : str
    n_params : int
    matrix : callable(p (P,), centre (3,)) -> (4, 4)
    dmatrix : callable(p (P,), centre (3,)) -> (P, 3, 4)
    from_matrix : callable(m (4, 4), centre (3,)) -> (P,)
        Parameters of (the closest member of the family to) a matrix.
    matrices : callable(ps (K, P), centre (3,)) -> (K, 4, 4), or None
        ``matrix`` of many parameter vectors at once (None: one at a time).
    kinds : tuple of str
        Per parameter: 'rot' (radians), 'trans' (mm), 'lin' (dimensionless matrix entries or
        log-scale).
    stages : tuple of str
        Models run before this one, each starting from the last (``affine``: rigid, then affine).
    """

    name: str
    n_params: int
    matrix: Callable
    dmatrix: Callable
    from_matrix: Callable
    kinds: tuple
    stages: tuple = ()
    matrices: Callable | None = None

    def scales(self, radius_mm: float) -> np.ndarray:
        """Per-parameter scale so one optimiser unit moves points about 1 mm at ``radius_mm``."""
        table = {"rot": 1.0 / radius_mm, "trans": 1.0, "lin": 1.0 / radius_mm}
        return np.array([table[k] for k in self.kinds])


MODELS = {
    "translation": TransformModel("translation", 3, _translation_matrix, _translation_dmatrix,
                                  _translation_from_matrix, ("trans",) * 3),
    "rigid": TransformModel("rigid", 6, _rigid_matrix, _rigid_dmatrix, _rigid_from_matrix,
                            ("rot",) * 3 + ("trans",) * 3, matrices=_rigid_matrices),
    "similarity": TransformModel("similarity", 7, _similarity_matrix, _similarity_dmatrix,
                                 _similarity_from_matrix, ("rot",) * 3 + ("trans",) * 3 + ("lin",),
                                 stages=("rigid",)),
    "affine": TransformModel("affine", 12, _affine_matrix, _affine_dmatrix, _affine_from_matrix,
                             ("lin",) * 9 + ("trans",) * 3, stages=("rigid",)),
}


def get_model(name: str) -> TransformModel:
    """Look a model up by name; the error lists the valid names."""
    try:
        return MODELS[name]
    except KeyError:
        raise InputError(f"unknown transform model {name!r}; choose one of {', '.join(MODELS)}") from None


def apply_matrix(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 4x4 homogeneous matrix to points (N, 3) -> (N, 3)."""
    # (3, 3) @ (3, N) is much faster than (N, 3) @ (3, 3) in NumPy for large N
    return (matrix[:3, :3] @ np.asarray(points, dtype=np.float64).T).T + matrix[:3, 3]


def rms_displacement(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> float:
    """Root-mean-square distance (mm) between where two matrices send ``points`` (N, 3)."""
    diff = apply_matrix(a, points) - apply_matrix(b, points)
    return float(np.sqrt(np.mean(np.sum(diff * diff, axis=1))))
