"""Issue 15, batch: the head-motion outputs of a 4D BOLD series, through the real command line.

One small BIDS dataset (the sample pair at 6 mm; the sample BOLD's 4 volumes, volume 2 moved by a
KNOWN 3 mm translation along x) is run once with the defaults; pybids, nitransforms and the
summary/report are checked against the known motion, then resume is exercised (a complete pair
is skipped, --no-hmc redoes it and removes the motion outputs, --moving-volume realigned with
--hmc writes them again).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from regkl.bids import pair_paths

from .conftest import SAMPLE

OPTS = ("--search", "none", "--jobs", "1", "-q")
SHIFT_MM = 3.0  # volume 2 is the others moved by this much along x
BOLD = "sub-01/func/sub-01_task-rest_bold.nii.gz"


def regkl(*args):
    return subprocess.run([sys.executable, "-m", "regkl.cli", *map(str, args)], capture_output=True,
                          encoding="utf-8", errors="replace", timeout=600)


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """(dataset root, results folder, first run) of a batch with the default options."""
    from regkl.io import load_series, load_volume
    from regkl.writers import save_array, save_volume
    from regkl.pyramid import downsample
    from regkl.resample import resample

    if not (SAMPLE / "sub-01_bold.nii.gz").exists():
        pytest.skip("bundled sample data missing")
    root = tmp_path_factory.mktemp("motion") / "ds"
    (root / "sub-01/anat").mkdir(parents=True)
    (root / "sub-01/func").mkdir(parents=True)
    save_volume(downsample(load_volume(SAMPLE / "sub-01_T1w.nii.gz"), 6.0), root / "sub-01/anat/sub-01_T1w.nii.gz")
    volumes = [downsample(v, 6.0) for v in load_series(SAMPLE / "sub-01_bold.nii.gz")[0]]
    shift = np.eye(4)
    shift[0, 3] = SHIFT_MM  # pulled from x + 3 mm: the content moves by -3 mm
    data = [resample(v, v, shift, interp="cubic").data if t == 2 else v.data for t, v in enumerate(volumes)]
    save_array(np.stack(data, axis=-1), volumes[0].vox2ras, root / BOLD, zooms_t=2.0)
    (root / "dataset_description.json").write_text('{"Name": "motion", "BIDSVersion": "1.9.0"}')
    out = root / "derivatives" / "regkl"
    first = regkl("batch", root, *OPTS)
    assert first.returncode == 0, first.stderr
    return root, out, first


def summary(out: Path) -> dict:
    return json.loads((out / "logs/regkl_summary.json").read_text())["Pairs"][0]


def test_motion_outputs_named_by_bids_and_indexed_by_pybids(ran):
    from bids import BIDSLayout

    root, out, _ = ran
    motion = pair_paths(BOLD, out).motion
    for path in motion.all():
        assert path.is_file(), path
    layout = BIDSLayout(root, derivatives=True)
    confounds = layout.get(desc="confounds", suffix="timeseries", extension=".tsv")
    assert [Path(f.path) for f in confounds] == [motion.confounds]
    assert [Path(f.path) for f in layout.get(desc="hmc", suffix="xfm", extension=".txt")] == [motion.xfm]
    assert [Path(f.path) for f in layout.get(desc="hmc", suffix="boldref", extension=".nii.gz")] == [motion.boldref]
    assert confounds[0].get_df().columns.tolist()[:7] == ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z",
                                                          "framewise_displacement"]
    sidecar = json.loads(motion.confounds_sidecar.read_text())
    assert sidecar["Sources"][0] == f"bids:raw:{BOLD}"
    assert sidecar["trans_x"]["Units"] == "mm" and sidecar["rot_x"]["Units"] == "rad"
    # the coregistration outputs are there as before, and the record lists every file of the set
    record = json.loads(pair_paths(BOLD, out).record.read_text())["Regkl"]
    listed = {out / o["path"] for o in record["outputs"]}
    assert listed == set(pair_paths(BOLD, out).all()[:-1])


def test_nitransforms_reads_the_hmc_file_and_finds_the_known_motion(ran):
    import nibabel as nib
    import nitransforms.linear as nitl

    _, out, _ = ran
    motion = pair_paths(BOLD, out).motion
    mapping = nitl.load(motion.xfm, fmt="itk")
    matrices = np.asarray(mapping.matrix)
    assert matrices.shape == (4, 4, 4)
    table = np.genfromtxt(motion.confounds, names=True, delimiter="\t", missing_values="n/a")
    rel = [np.linalg.inv(matrices[0]) @ m for m in matrices]  # motion relative to volume 0: known truth
    expected = np.zeros(3)
    expected[0] = -SHIFT_MM
    assert np.allclose(rel[2][:3, 3], expected, atol=0.3), rel[2]
    for t in (1, 3):
        assert np.allclose(rel[t][:3, :3], np.eye(3), atol=0.005) and np.allclose(rel[t][:3, 3], 0, atol=0.3)
    assert np.allclose(table["trans_x"][2] - table["trans_x"][0], -SHIFT_MM, atol=0.3)
    assert nib.load(motion.boldref).shape == nib.load(out.parent.parent / BOLD).shape[:3]


def test_summary_and_report_show_the_motion_line(ran):
    root, out, _ = ran
    row = summary(out)
    # FD of volumes 2 and 3 is the known 3 mm jump (away and back); volume 1 barely moves
    assert row["fd_max"] == pytest.approx(SHIFT_MM, abs=0.3)
    assert row["fd_mean"] == pytest.approx(2 * SHIFT_MM / 3, abs=0.3)
    assert row["motion_outliers"] == 2
    assert row["confounds"] == pair_paths(BOLD, "").motion.confounds.as_posix()
    page = (out / "regkl_report.html").read_text()
    assert "head motion" in page and f"max {row['fd_max']:.2f} mm" in page and "2 volumes flagged" in page


def test_resume_skips_then_redoes_after_hmc_changes(ran):
    root, out, _ = ran
    paths = pair_paths(BOLD, out)
    again = regkl("batch", root, *OPTS, "--json")
    assert again.returncode == 0 and [r["status"] for r in json.loads(again.stdout)] == ["skipped"]
    assert "redo" not in again.stderr

    off = regkl("batch", root, *OPTS, "--no-hmc")
    assert off.returncode == 0, off.stderr
    assert f"redo {BOLD}: options changed: --hmc was True, now False" in off.stderr
    assert not any(p.exists() for p in paths.motion.all())  # an earlier run's motion outputs are stale
    record = json.loads(paths.record.read_text())["Regkl"]
    assert {out / o["path"] for o in record["outputs"]} == set(paths.outputs())
    assert summary(out)["fd_max"] is None

    # a missing motion output redoes the pair; --moving-volume realigned reuses the realignment
    on = regkl("batch", root, *OPTS, "--moving-volume", "realigned")
    assert on.returncode == 0, on.stderr
    assert all(p.is_file() for p in paths.motion.all())
    assert summary(out)["fd_max"] == pytest.approx(SHIFT_MM, abs=0.3)
    paths.motion.confounds.unlink()
    redo = regkl("batch", root, *OPTS, "--moving-volume", "realigned")
    assert redo.returncode == 0 and f"output {paths.motion.confounds.relative_to(out).as_posix()} is missing" \
        in redo.stderr
    assert paths.motion.confounds.is_file()


def test_only_bold_series_get_motion_outputs():
    """dwi (b-values and directions differ between volumes), epi field maps (phase-encoding
    directions differ) and sbref (one volume) get none; plain folders get them for any 4D series."""
    assert pair_paths("sub-01/func/sub-01_task-rest_bold.nii.gz", "o").motion is not None
    for rel in ("sub-01/dwi/sub-01_dwi.nii.gz", "sub-01/fmap/sub-01_dir-AP_epi.nii.gz",
                "sub-01/func/sub-01_task-rest_sbref.nii.gz"):
        paths = pair_paths(rel, "o")
        assert paths.motion is None and len(paths.all()) == 5
    assert pair_paths("a/rest.nii.gz", "o", layout="plain").motion.xfm == Path("o/a/rest_hmc_xfm.txt")


def test_a_failure_while_writing_the_motion_outputs_leaves_nothing(ran, tmp_path, monkeypatch):
    """The motion outputs are written in the pair's output group: when one of them cannot be
    written, none of the pair's files appears (nor stays from an earlier complete run)."""
    import regkl.xfm
    from regkl.batch import discover_bids, run_job

    root, _, _ = ran
    out = tmp_path / "results"
    (job,) = discover_bids(root, out, options={"search": "none", "hmc": True}, shaping={"hmc": True})
    assert run_job(job, threads=1)["status"] == "ok"
    assert all(p.is_file() for p in job.paths.all())

    def broken(_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(regkl.xfm, "itk_series_text", broken)
    row = run_job(job, threads=1)
    assert row["status"] == "failed" and "No space left" in row["error"]
    assert not any(p.exists() for p in job.paths.all())
    assert [p for p in out.rglob("*") if p.is_file()] == []  # no temporary file either
