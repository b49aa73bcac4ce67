"""Batch: BIDS discovery and names, parallel runs, resumability after SIGKILL, failures, Dask."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from regkl.transforms import rms_displacement
from regkl.xfm import load_transform

from .conftest import SAMPLE


def _sample():
    bold, t1 = SAMPLE / "sub-01_bold.nii.gz", SAMPLE / "sub-01_T1w.nii.gz"
    if not (bold.exists() and t1.exists()):
        pytest.skip("bundled sample data missing")
    return bold, t1


@pytest.fixture(scope="module")
def small_sample(tmp_path_factory):
    """The sample pair with the T1 at 2 mm, so batch mechanics tests run fast."""
    from regkl.io import load_volume
    from regkl.writers import save_volume
    from regkl.pyramid import downsample

    bold, t1 = _sample()
    folder = tmp_path_factory.mktemp("small")
    t1_small = downsample(load_volume(t1), 2.0)
    save_volume(t1_small, folder / "T1w.nii.gz")
    shutil.copy(bold, folder / "bold.nii.gz")
    return folder / "bold.nii.gz", folder / "T1w.nii.gz"


@pytest.fixture(scope="module")
def small_reference(small_sample, tmp_path_factory):
    """The single-pair ``regkl register`` answer for ``small_sample``: what every batch pair must match."""
    return single_pair_matrix(*small_sample, tmp_path_factory.mktemp("single"))


def make_bids(root: Path, bold: Path, t1: Path, subjects=("01", "02"), sessions=("1", "2"), runs=("1", "2")):
    for sub in subjects:
        for ses in sessions:
            anat, func = root / f"sub-{sub}/ses-{ses}/anat", root / f"sub-{sub}/ses-{ses}/func"
            anat.mkdir(parents=True)
            func.mkdir(parents=True)
            shutil.copy(t1, anat / f"sub-{sub}_ses-{ses}_T1w.nii.gz")
            for run in runs:
                shutil.copy(bold, func / f"sub-{sub}_ses-{ses}_task-rest_run-{run}_bold.nii.gz")
    return root


def expected_outputs(root: Path, subjects=("01", "02"), sessions=("1", "2"), runs=("1", "2")):
    out = root / "derivatives" / "regkl"
    for sub in subjects:
        for ses in sessions:
            for run in runs:
                base = out / f"sub-{sub}/ses-{ses}/func/sub-{sub}_ses-{ses}_task-rest_run-{run}"
                yield (Path(f"{base}_space-T1w_boldref.nii.gz"),
                       Path(f"{base}_from-boldref_to-T1w_mode-image_desc-coreg_xfm.txt"))


def regkl(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "regkl.cli", *map(str, args)], capture_output=True, text=True,
                          **kwargs)


def single_pair_matrix(bold, t1, tmp_path):
    proc = regkl("register", bold, t1, "--matrix-out", tmp_path / "single.txt", "-q")
    assert proc.returncode == 0, proc.stderr
    return load_transform(tmp_path / "single.txt")


def check_outputs(root, reference, t1, **kw):
    """Every expected file exists, reads back, and its transform is within 0.5 mm of ``reference``."""
    fixed = nib.load(str(t1))
    pts = np.argwhere(np.asanyarray(fixed.dataobj)[::4, ::4, ::4] > 0) * 4.0
    pts = pts @ fixed.affine[:3, :3].T + fixed.affine[:3, 3]
    n = 0
    for image, xfm in expected_outputs(root, **kw):
        assert image.is_file() and xfm.is_file(), image
        data = nib.load(str(image)).get_fdata()
        assert data.shape == fixed.shape and np.isfinite(data).all() and data.max() > 0
        sitk.ReadTransform(str(xfm))
        assert rms_displacement(load_transform(xfm), reference, pts) < 0.5
        n += 1
    return n


@pytest.mark.slow
def test_bids_tree_every_output_named_and_correct(tmp_path, small_sample, small_reference):
    bold, t1 = small_sample
    root = make_bids(tmp_path / "ds", bold, t1)
    proc = regkl("batch", root, "--jobs", "2")
    assert proc.returncode == 0, proc.stderr
    assert check_outputs(root, small_reference, t1) == 8
    out = root / "derivatives" / "regkl"
    rows = json.loads((out / "logs" / "regkl_summary.json").read_text())["Pairs"]
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows)
    tsv = (out / "logs" / "regkl_summary.tsv").read_text().splitlines()
    assert tsv[0].split("\t")[:2] == ["subject", "session"] and len(tsv) == 9
    assert json.loads((out / "dataset_description.json").read_text())["DatasetType"] == "derivative"
    # a second run skips every pair; --force redoes them
    again = regkl("batch", root, "--jobs", "2", "--json", "-q")
    assert again.returncode == 0 and {r["status"] for r in json.loads(again.stdout)} == {"skipped"}


@pytest.mark.slow
def test_sigkill_mid_batch_then_rerun_leaves_everything_correct(tmp_path, small_sample, small_reference):
    bold, t1 = small_sample
    root = make_bids(tmp_path / "ds", bold, t1)
    reference = small_reference
    out = root / "derivatives" / "regkl"
    proc = subprocess.Popen([sys.executable, "-m", "regkl.cli", "batch", str(root), "--jobs", "2", "-q"],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.rglob("*_xfm.json"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the batch and its worker processes, mid-write
    proc.wait()
    done_before = len(list(out.rglob("*_xfm.json")))
    assert 0 < done_before < 8, "kill landed outside the batch; the test proves nothing"
    rerun = regkl("batch", root, "--jobs", "2", "--json", "-q")
    assert rerun.returncode == 0, rerun.stderr
    statuses = [r["status"] for r in json.loads(rerun.stdout)]
    assert statuses.count("skipped") == done_before and statuses.count("ok") == 8 - done_before
    assert check_outputs(root, reference, t1) == 8
    assert [p for p in out.rglob(".*") if ".tmp" in p.name] == []


def test_one_failing_pair_does_not_stop_the_others(tmp_path, small_sample):
    bold, t1 = small_sample
    root = make_bids(tmp_path / "ds", bold, t1, subjects=("01",), sessions=("1",))
    broken = root / "sub-01/ses-1/func/sub-01_ses-1_task-rest_run-2_bold.nii.gz"
    broken.write_bytes(b"not an image at all")
    proc = regkl("batch", root, "--jobs", "1", "--json")
    assert proc.returncode == 1
    rows = {Path(r["moving"]).name: r for r in json.loads(proc.stdout)}
    assert rows[broken.name]["status"] == "failed" and broken.name in rows[broken.name]["error"]
    assert rows["sub-01_ses-1_task-rest_run-1_bold.nii.gz"]["status"] == "ok"
    assert "1/2 failed" in proc.stderr or "failed" in proc.stderr


def test_plain_folder_globs_and_usage_errors(tmp_path, small_sample):
    bold, t1 = small_sample
    for name in ("a", "b"):
        (tmp_path / "study" / name).mkdir(parents=True)
        shutil.copy(bold, tmp_path / "study" / name / "rest.nii.gz")
    shutil.copy(t1, tmp_path / "study" / "T1.nii.gz")  # shared by both, found in the parent folder
    proc = regkl("batch", tmp_path / "study", "--moving-glob", "*/rest.nii.gz", "--fixed-glob", "T1.nii.gz",
                 "--out-dir", tmp_path / "out", "--json", "-q")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 2 and all(r["fixed"].endswith("T1.nii.gz") for r in rows)
    assert (tmp_path / "out" / "a" / "rest_coreg.nii.gz").is_file()
    empty = regkl("batch", tmp_path / "nothing_here")
    assert empty.returncode == 2 and "no such folder" in empty.stderr
    (tmp_path / "empty_ds").mkdir()
    none = regkl("batch", tmp_path / "empty_ds")
    assert none.returncode == 2 and "found no images" in none.stderr


@pytest.mark.slow
def test_dask_localcluster_gives_the_same_results_as_local(tmp_path, small_sample):
    distributed = pytest.importorskip("dask.distributed", reason="dask.distributed not installed (regkl[dask])")
    bold, t1 = small_sample
    local_root = make_bids(tmp_path / "local", bold, t1, subjects=("01",))
    dask_root = make_bids(tmp_path / "dask", bold, t1, subjects=("01",))
    assert regkl("batch", local_root, "--jobs", "1", "-q").returncode == 0
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl:
        proc = regkl("batch", dask_root, "--dask-scheduler", cl.scheduler_address, "-q")
    assert proc.returncode == 0, proc.stderr
    for (img_l, xfm_l), (img_d, xfm_d) in zip(expected_outputs(local_root, subjects=("01",)),
                                              expected_outputs(dask_root, subjects=("01",))):
        np.testing.assert_array_equal(load_transform(xfm_l), load_transform(xfm_d))
        np.testing.assert_array_equal(nib.load(str(img_l)).get_fdata(), nib.load(str(img_d)).get_fdata())
