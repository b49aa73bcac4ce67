"""Findings of the session-4 adversarial review: each a kind of silent wrong answer or lost result,
now refused (exit 2, one line, nothing written) or handled, through the real command line."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from regkl.xfm import transform_text

from .test_hardening import AFF, blob, listing, run

TWO_TRANSFORMS = """#Insight Transform File V1.0
#Transform 0
Transform: AffineTransform_double_3_3
Parameters: 1 0 0 0 1 0 0 0 1 0 0 0
FixedParameters: 0 0 0
#Transform 1
Transform: AffineTransform_double_3_3
Parameters: 1 0 0 0 1 0 0 0 1 30 0 0
FixedParameters: 0 0 0
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("atk")
    nib.save(nib.Nifti1Image(blob(seed=1), AFF), str(d / "fixed.nii.gz"))
    nib.save(nib.Nifti1Image(blob(seed=2), AFF), str(d / "moving.nii.gz"))
    return d


def one_error_line(err):
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("regkl: warning:")]
    assert len(lines) == 1 and lines[0].startswith("regkl: error: "), err
    return lines[0]


@pytest.mark.parametrize("command", ["apply", "metric", "register"])
def test_a_file_of_several_transforms_is_refused(pair, tmp_path, capfd, command):
    """ITK reads only the first transform of such a file (realign's per-volume file): never silently."""
    tfm = tmp_path / "two.tfm"
    tfm.write_text(TWO_TRANSFORMS)
    out = tmp_path / "out"
    out.mkdir()
    argv = {"apply": ["apply", tfm, pair / "moving.nii.gz", pair / "fixed.nii.gz", "-o", out / "o.nii.gz"],
            "metric": ["metric", pair / "moving.nii.gz", pair / "fixed.nii.gz", "--transform", tfm],
            "register": ["register", pair / "moving.nii.gz", pair / "fixed.nii.gz", "--init-transform", tfm,
                         "-o", out / "o.nii.gz"]}[command]
    code, _, err = run(argv, capfd)
    assert code == 2 and "holds 2 separate transforms" in one_error_line(err) and str(tfm) in err
    assert listing(out) == []


@pytest.mark.parametrize("value", ["1e40", "-1e300", "inf"])
@pytest.mark.parametrize("command", ["register", "apply"])
def test_fill_must_fit_the_float32_output(pair, tmp_path, capfd, command, value):
    ident = tmp_path / "id.txt"
    ident.write_text(transform_text(np.eye(4), "ras"))
    argv = (["register", pair / "moving.nii.gz", pair / "fixed.nii.gz"] if command == "register" else
            ["apply", ident, pair / "moving.nii.gz", pair / "fixed.nii.gz"])
    code, _, err = run(argv + ["-o", tmp_path / "o.nii.gz", "--fill", value], capfd)
    assert code == 2 and "--fill" in one_error_line(err) and "float32" in err
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_mirroring_start_is_refused(pair, tmp_path, capfd):
    """A reflection cannot be a rigid start: it was silently turned into a 180-degree rotation."""
    mirror = tmp_path / "mirror.txt"
    mirror.write_text(transform_text(np.diag([-1.0, 1.0, 1.0, 1.0]), "ras"))
    code, _, err = run(["register", pair / "moving.nii.gz", pair / "fixed.nii.gz", "--init-transform", mirror,
                        "-o", tmp_path / "o.nii.gz"], capfd)
    assert code == 2 and "negative determinant" in one_error_line(err) and str(mirror) in err
    assert not (tmp_path / "o.nii.gz").exists()


def _bids(root, pair):
    for sub in ("01", "02"):
        (root / f"sub-{sub}" / "anat").mkdir(parents=True)
        (root / f"sub-{sub}" / "func").mkdir(parents=True)
        (root / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz").write_bytes((pair / "fixed.nii.gz").read_bytes())
        (root / f"sub-{sub}" / "func" / f"sub-{sub}_task-rest_bold.nii.gz").write_bytes(
            (pair / "moving.nii.gz").read_bytes())
    (root / "dataset_description.json").write_text(json.dumps({"Name": "raw", "BIDSVersion": "1.9.0"}))


def test_results_folder_that_would_hide_inputs_or_take_over_a_dataset_is_refused(pair, tmp_path, capfd):
    root = tmp_path / "ds"
    _bids(root, pair)
    other = tmp_path / "other"
    other.mkdir()
    (other / "dataset_description.json").write_text(json.dumps({"Name": "someone else's", "BIDSVersion": "1.9.0"}))
    before = {p: p.read_bytes() for p in (root.rglob("*")) if p.is_file()}
    for out_dir, phrase in ((root / "sub-01", "subject's or session's folder"),
                            (root / "sub-01" / "x", "subject's or session's folder"),
                            (other, "another dataset"),
                            (root / "code", "already holds files")):
        if out_dir.name == "code":
            out_dir.mkdir()
            (out_dir / "notes.txt").write_text("mine")
        code, _, err = run(["batch", root, "--out-dir", out_dir, "--search", "none", "-q"], capfd)
        assert code == 2 and phrase in one_error_line(err), (out_dir, err)
    assert json.loads((other / "dataset_description.json").read_text())["Name"] == "someone else's"
    assert {p: p.read_bytes() for p in before} == before
    assert not (root / "sub-01" / "dataset_description.json").exists()


def test_fixed_glob_matching_moving_images_is_refused(pair, tmp_path, capfd):
    root = tmp_path / "plain"
    for s in ("a", "b"):
        (root / s).mkdir(parents=True)
        (root / s / "rest.nii.gz").write_bytes((pair / "moving.nii.gz").read_bytes())
    code, _, err = run(["batch", root, "--moving-glob", "*/rest.nii.gz", "--fixed-glob", "*/rest.nii.gz", "-q"],
                       capfd)
    assert code == 2 and "--moving-glob also takes as a moving image" in one_error_line(err)
    assert not (root / "derivatives").exists()


def test_realign_takes_nan_background_as_no_data(tmp_path, capfd):
    """A NaN background in every volume (SPM-style) was refused as 'every volume is constant', and
    one NaN voxel made a moved volume 'empty' (given its neighbour's transform)."""
    base = blob((48, 48, 40), seed=4)
    shift = np.zeros_like(base)
    shift[3:] = base[:-3]  # volume 2 moved by 3 voxels (9 mm) along i
    series = np.stack([base, base, shift, base], -1).astype(np.float32)
    series[series < np.percentile(base, 30)] = np.nan
    img = nib.Nifti1Image(series, np.diag([3.0, 3.0, 3.0, 1.0]))
    img.header.set_zooms((3.0, 3.0, 3.0, 2.0))
    nib.save(img, str(tmp_path / "nan_bold.nii.gz"))
    code, _, err = run(["realign", tmp_path / "nan_bold.nii.gz", "--prefix", tmp_path / "r", "-q"], capfd)
    assert code == 0, err
    rows = (tmp_path / "r_motion.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    trans_x = [float(r.split("\t")[header.index("trans_x")]) for r in rows[1:]]
    assert abs(abs(trans_x[2] - trans_x[0]) - 9.0) < 1.0, trans_x


@pytest.mark.parametrize("extra, phrase", [
    (["--xfm", "{d}/x.h5"], "written as .txt or .tfm"),
    (["--confounds", "{d}/c.csv"], "written as .tsv"),
    (["--par", "{d}/p.txt"], "written as .par"),
    (["--par", "{d}/same.par", "--qc", "{d}/q.png", "--boldref", "{d}/b.nii.gz", "-o", "{d}/b.nii.gz"],
     "same file"),
    (["--prefix", ""], "--prefix"),
])
def test_realign_outputs_are_named_for_what_they_hold(tmp_path, capfd, extra, phrase):
    """Refused before any work: realign wrote ITK text under .h5 and tab-separated text under .csv."""
    series = np.stack([blob((12, 12, 10), seed=s) for s in range(3)], -1)
    nib.save(nib.Nifti1Image(series, AFF), str(tmp_path / "s.nii.gz"))
    code, _, err = run(["realign", tmp_path / "s.nii.gz", *[a.format(d=tmp_path) for a in extra], "-q"], capfd)
    assert code == 2 and phrase in one_error_line(err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.nii.gz"]


def test_wrong_subject_real_pair_is_flagged(capfd):
    """Issue 11 item 7: a real EPI registered onto another person's image (the real b0 onto the MNI
    T1) is flagged suspect; the same subject's pair is covered by test_qc's real-pair check."""
    from .conftest import MNI, REAL, need

    code, out, err = run(["register", need(REAL) / "b0_epi.nii.gz", need(MNI) / "mni152_T1w_1mm.nii.gz",
                          "--confidence", "--json", "-q"], capfd)
    assert code == 0, err
    conf = json.loads(out)["confidence"]
    assert conf["suspect"] is True, conf


@pytest.mark.parametrize("settings", [dict(bins="24"), dict(bins=24.5), dict(seed=-1), dict(seed=0.5),
                                      dict(max_iter=0), dict(max_seconds=float("nan")), dict(max_seconds=-1.0),
                                      dict(sampling=0.0), dict(max_points=10)])
def test_api_register_refuses_bad_settings_before_work(pair, settings):
    """The Python API checks what the command line checks (raw TypeErrors, or silent acceptance, before)."""
    import regkl
    from regkl.errors import InputError

    with pytest.raises(InputError):
        regkl.register(pair / "moving.nii.gz", pair / "fixed.nii.gz", **settings)


@pytest.mark.parametrize("matrix", [np.full((4, 4), np.nan), np.zeros((4, 4)), np.eye(3)])
def test_api_apply_refuses_impossible_matrices(pair, matrix):
    import regkl
    from regkl.errors import InputError

    with pytest.raises(InputError):
        regkl.apply(pair / "moving.nii.gz", pair / "fixed.nii.gz", matrix)
