"""regkl profile: the metric along each rigid parameter around a pose peaks where it should.

Truth: the sample pair's known transform (data/sub-01_true_fixed2moving_ras.txt), and the same
transform displaced by a known shift of the moving side.
"""

import json

import numpy as np
import pytest

from regkl.cli import main
from regkl.landscape import PARAMETERS, _perturbation
from regkl.transforms import get_model
from regkl.xfm import save_transform

from .conftest import SAMPLE

BOLD, T1, TRUTH = SAMPLE / "sub-01_bold.nii.gz", SAMPLE / "sub-01_T1w.nii.gz", SAMPLE / "sub-01_true_fixed2moving_ras.txt"
#: 1 mm / 1 degree steps over +-15 mm and +-10 degrees: 181 evaluations
ARGS = ["--range-mm", "15", "--range-deg", "10", "--steps", "15", "-q"]
STEP = {"mm": 1.0, "deg": 10.0 / 15}


def run(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return info.value.code, out, err


@pytest.fixture(scope="module")
def truth():
    if not (BOLD.exists() and T1.exists() and TRUTH.exists()):
        pytest.skip("bundled sample data missing")
    return np.loadtxt(TRUTH)


def curves(doc):
    return {p["name"]: p for p in doc["parameters"]}


def test_profile_peaks_at_the_true_pose(truth, tmp_path, capsys):
    png = tmp_path / "profile.png"
    code, out, err = run(["profile", BOLD, T1, "--transform", TRUTH, "-o", png, "--json", *ARGS], capsys)
    assert code == 0 and err == "", err
    doc = json.loads(out)  # nothing but the JSON on stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000
    from regkl.io import load_volume
    from regkl.probe import evaluate_metric

    expected = evaluate_metric(load_volume(BOLD), load_volume(T1), truth)[0]
    assert doc["at_pose"] == pytest.approx(expected, abs=1e-8)  # JSON values have 8 decimals
    for (name, unit, _), curve in zip(PARAMETERS, doc["parameters"]):
        assert curve["name"] == name and curve["unit"] == unit
        offsets, values = np.array(curve["offsets"]), np.array(curve["values"], dtype=float)
        assert len(offsets) == 31 and offsets[15] == 0.0 and values[15] == doc["at_pose"]
        assert abs(curve["best"]) <= STEP[unit] + 1e-9, (name, curve["best"])
        assert values[0] < doc["at_pose"] and values[-1] < doc["at_pose"]  # a peak, not a plateau


def test_profile_finds_a_known_10mm_shift(truth, tmp_path, capsys):
    displaced = truth.copy()
    displaced[0, 3] += 10.0  # every fixed point now samples the moving image 10 mm further along +R
    xfm = tmp_path / "displaced.tfm"
    save_transform(xfm, displaced, "itk")
    code, out, err = run(["profile", BOLD, T1, "--transform", xfm, "--json", *ARGS], capsys)
    assert code == 0, err
    doc = json.loads(out)
    shift_x = curves(doc)["shift_x"]
    assert shift_x["best"] == pytest.approx(-10.0, abs=STEP["mm"])  # back by 10 mm along R
    # the point 10 mm back along R is the true pose itself: its value is the metric at the truth
    from regkl.io import load_volume
    from regkl.probe import evaluate_metric

    at_truth = evaluate_metric(load_volume(BOLD), load_volume(T1), truth)[0]
    j = int(np.argmin(np.abs(np.array(shift_x["offsets"]) + 10.0)))
    assert shift_x["offsets"][j] == pytest.approx(-10.0, abs=1e-9)
    assert shift_x["values"][j] == pytest.approx(at_truth, rel=1e-6)
    assert doc["at_pose"] < at_truth - 0.1
    for other in ("shift_y", "shift_z"):
        assert abs(curves(doc)[other]["best"]) <= 2 * STEP["mm"], (other, curves(doc)[other]["best"])


def test_text_output_names_the_best_offsets(truth, capsys):
    code, out, err = run(["profile", BOLD, T1, "--transform", TRUTH, "--range-mm", "2", "--range-deg", "2",
                          "--steps", "2", "--sampling", "0.25"], capsys)
    assert code == 0
    lines = [line.split("\t") for line in out.strip().splitlines()]
    assert [line[0] for line in lines] == ["at_pose"] + [p[0] for p in PARAMETERS]
    assert "evaluations" in err  # progress on stderr only


def test_shift_perturbation_is_the_rigid_translation_and_offset_zero_is_the_pose():
    """Shifts change exactly the translation register reports; rotations keep the centre fixed."""
    rigid = get_model("rigid")
    centre = np.array([1.0, -17.0, 6.0])
    pose = rigid.matrix(np.array([0.07, -0.09, 0.08, 6.0, -4.0, 7.0]), centre)
    for k in range(3, 6):
        moved = _perturbation(k, 2.5, np.array([5.0, 5.0, 5.0])) @ pose
        delta = rigid.from_matrix(moved, centre) - rigid.from_matrix(pose, centre)
        np.testing.assert_allclose(delta, np.eye(6)[k] * 2.5, atol=1e-12)
    moving_centre = pose[:3, :3] @ centre + pose[:3, 3]
    for k in range(3):
        rot = _perturbation(k, 7.0, moving_centre)
        np.testing.assert_allclose(rot[:3, :3] @ moving_centre + rot[:3, 3], moving_centre, atol=1e-9)
        angle = np.degrees(np.arccos((np.trace(rot[:3, :3]) - 1) / 2))
        assert angle == pytest.approx(7.0) and rot[k, k] == pytest.approx(1.0)  # about axis k
        np.testing.assert_array_equal(_perturbation(k, 0.0, moving_centre), np.eye(4))


def test_affine_pose_is_profiled_as_is(truth):
    """Offset 0 of every curve is the given affine transform itself, not its closest rigid pose."""
    from regkl.io import load_volume
    from regkl.landscape import profile_metric
    from regkl.probe import evaluate_metric

    moving, fixed = load_volume(BOLD), load_volume(T1)
    affine = truth.copy()
    affine[:3, :3] = affine[:3, :3] @ np.diag([1.06, 0.95, 1.0])
    prof = profile_metric(moving, fixed, affine, steps=1, range_mm=3, range_deg=3, sampling=0.5)
    expected = evaluate_metric(moving, fixed, affine, sampling=0.5)[0]
    assert prof.at_pose == pytest.approx(expected, rel=1e-12)
    np.testing.assert_array_equal(prof.values[:, 1], prof.at_pose)
    assert prof.at_pose != pytest.approx(evaluate_metric(moving, fixed, truth, sampling=0.5)[0], rel=1e-3)
