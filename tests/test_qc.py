"""QC pictures: written as PNG by register --qc and regkl qc; grid mismatch is a clear error."""

import pytest

from regkl.cli import main


def run(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_register_qc_and_qc_command(tmp_path, capsys, real_pair_paths):
    moving, fixed = real_pair_paths
    png, out = tmp_path / "qc.png", tmp_path / "out.nii.gz"
    code, _, err = run(["register", moving, fixed, "-o", out, "--qc", png, "-q"], capsys)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000
    png2 = tmp_path / "qc2.png"
    code, _, err = run(["qc", fixed, out, "-o", png2, "--slices", "3"], capsys)
    assert code == 0 and png2.read_bytes()[:4] == b"\x89PNG"
    code, _, err = run(["qc", fixed, moving, "-o", tmp_path / "bad.png"], capsys)  # moving is not on the grid
    assert code == 2 and "same shape" in err and not (tmp_path / "bad.png").exists()


def test_canonical_view_orders_axes_ras():
    import numpy as np

    from regkl.qc import canonical
    from regkl.volume import Volume

    data = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    ras = Volume(data, np.eye(4))
    # stored as (S, P, R): permuted and flipped
    v2r = np.array([[0, 0, 1, 0], [0, -1, 0, 2], [1, 0, 0, 0], [0, 0, 0, 1.0]])
    stored = Volume(np.flip(np.transpose(data, (2, 1, 0)), 1), v2r)
    np.testing.assert_array_equal(canonical(stored), canonical(ras))


def test_confidence_flags_an_unfinished_registration(capsys, real_pair_paths):
    moving, fixed = real_pair_paths
    code, out, err = run(["register", moving, fixed, "--init", "header", "--search", "none", "--levels", "1",
                          "--max-iter", "1", "--fail-on-suspect", "-q"], capsys)
    assert code == 1 and "suspect" in err
    code, out, err = run(["register", moving, fixed, "--confidence", "--json", "-q"], capsys)
    import json

    conf = json.loads(out)["confidence"]
    assert code == 0 and conf["suspect"] is False and conf["evidence"]["drift_mm"] < 0.5


def _flip_lr(vol):
    import numpy as np

    from regkl.volume import Volume

    axis = int(np.argmax(np.abs(vol.vox2ras[0, :3])))
    return Volume(np.flip(vol.data, axis).copy(), vol.vox2ras, vol.name)


@pytest.mark.slow
def test_mirror_check_flags_a_left_right_flipped_header_of_a_real_brain(real_pair):
    """An EPI-like view of the real T2w subject (asymmetric anatomy) registers normally; the same image
    with its data mirrored left-right under an unchanged header must be flagged by the mirror check
    (and only by the mirror check: everything else about that fit looks good)."""
    import numpy as np

    from regkl import synthetic
    from regkl.optimize import register

    _, t2 = real_pair
    rng = np.random.default_rng(5)
    truth = synthetic.random_rigid(rng, 10, 10, t2.centre_of_mass())
    epi = synthetic.epi_from_volume(t2, truth, rng)
    good = register(epi, t2, confidence=True).confidence
    bad = register(_flip_lr(epi), t2, confidence=True).confidence
    assert not good.suspect and good.evidence["mirror_gain"] < 0.0, good.evidence
    assert bad.suspect and bad.evidence["mirror_gain"] > 0.05, bad.evidence
    assert bad.subscores["mirror_gain"] == 0.0 and bad.subscores["restart_mm"] > 0.5


def test_mid_sagittal_reflection_is_a_reflection_through_the_mapped_centre():
    import numpy as np

    from regkl.confidence import mid_sagittal_reflection
    from regkl.transforms import get_model

    solution = get_model("rigid").matrix(np.array([0.1, -0.2, 0.3, 5.0, -3.0, 2.0]), np.zeros(3))
    centre = np.array([1.0, -20.0, 10.0])
    g = mid_sagittal_reflection(solution, centre)
    np.testing.assert_allclose(g @ g, np.eye(4), atol=1e-12)           # an involution
    assert np.isclose(np.linalg.det(g[:3, :3]), -1.0)                   # a reflection
    point = solution @ np.append(centre, 1.0)
    np.testing.assert_allclose(g @ point, point, atol=1e-9)             # fixes the mapped centre
    normal = solution[:3, :3] @ np.array([1.0, 0, 0])
    np.testing.assert_allclose(g[:3, :3] @ normal, -normal, atol=1e-12)  # flips the mapped L-R axis


def test_confidence_on_two_threads_equals_one_thread_and_reads_drift_from_the_settled_level(monkeypatch):
    """The re-optimisations run concurrently (GIL-free serial kernels); every piece of evidence must
    be exactly what one thread computes. When the finest rigid level ended because the pose settled,
    the drift IS its last step (no re-optimisation); otherwise it is re-optimised."""
    from pathlib import Path

    from regkl import confidence
    from regkl.io import load_volume
    from regkl.optimize import register

    data = Path(__file__).resolve().parents[1] / "data"
    moving = load_volume(data / "sub-01_bold.nii.gz", volume="mean")
    fixed = load_volume(data / "sub-01_T1w.nii.gz")
    results = {}
    for workers in (1, 2):
        monkeypatch.setattr(confidence, "default_workers", lambda w=workers: w)
        results[workers] = register(moving, fixed, confidence=True)
    one, two = results[1], results[2]
    assert one.confidence.evidence == two.confidence.evidence
    last = two.levels[-1]
    assert last.stage == "rigid" and last.stop_reason.startswith("pose settled"), last
    assert two.confidence.evidence["drift_mm"] == last.last_step_mm < last.spacing_mm * 0.002
    # an unsettled finish (iteration limit) is re-optimised: drift is then measured, not read
    capped = register(moving, fixed, confidence=True, max_iter=2, search="none")
    assert not capped.levels[-1].stop_reason.startswith("pose settled")
    assert capped.confidence.evidence["drift_mm"] != capped.levels[-1].last_step_mm
