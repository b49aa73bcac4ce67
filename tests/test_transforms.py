"""Transform models: matrices, Jacobians against finite differences, round trips."""

import numpy as np
import pytest

from regkl.errors import InputError
from regkl.transforms import (MODELS, euler_to_rotation, get_model, rms_displacement, rotation_to_euler)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dmatrix_matches_finite_differences(name):
    model = get_model(name)
    rng = np.random.default_rng(0)
    centre = np.array([3.0, -20.0, 15.0])
    p = rng.uniform(-0.4, 0.4, model.n_params)
    d = model.dmatrix(p, centre)
    h = 1e-6
    for k in range(model.n_params):
        e = np.zeros(model.n_params)
        e[k] = h
        fd = (model.matrix(p + e, centre) - model.matrix(p - e, centre))[:3] / (2 * h)
        np.testing.assert_allclose(d[k], fd, atol=1e-7)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_from_matrix_round_trip(name):
    model = get_model(name)
    rng = np.random.default_rng(1)
    centre = np.array([-5.0, 10.0, 2.0])
    p = rng.uniform(-0.5, 0.5, model.n_params)
    np.testing.assert_allclose(model.from_matrix(model.matrix(p, centre), centre), p, atol=1e-10)


def test_rigid_matrix_is_rotation_about_centre():
    model = get_model("rigid")
    centre = np.array([10.0, 20.0, 30.0])
    m = model.matrix(np.array([0.3, -0.2, 0.1, 0, 0, 0]), centre)
    np.testing.assert_allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-12)
    assert np.linalg.det(m[:3, :3]) == pytest.approx(1.0)
    np.testing.assert_allclose(m[:3, :3] @ centre + m[:3, 3], centre, atol=1e-12)


def test_euler_round_trip_and_axes():
    for angles in ([0.1, 0.2, 0.3], [-1.0, 0.5, 2.0], [0, 0, 0]):
        np.testing.assert_allclose(rotation_to_euler(euler_to_rotation(angles)), angles, atol=1e-12)
    # a positive rotation about z turns +x (right) towards +y (anterior)
    np.testing.assert_allclose(euler_to_rotation([0, 0, np.pi / 2]) @ [1, 0, 0], [0, 1, 0], atol=1e-12)


def test_rms_displacement_of_translation():
    a = np.eye(4)
    b = np.eye(4)
    b[:3, 3] = [3.0, 0, 4.0]
    pts = np.random.default_rng(2).normal(size=(100, 3)) * 50
    assert rms_displacement(a, b, pts) == pytest.approx(5.0)


def test_unknown_model_lists_choices():
    with pytest.raises(InputError, match="rigid"):
        get_model("bogus")
