"""Issue 12 items 1-4 and issue 13's batch derivatives, through the real command line.

One uninterrupted batch of a 2-subject x 2-run BIDS dataset (6 mm images, --search none) is the
reference; concurrent, killed-and-resumed, copied, re-optioned and changed-input batches are
compared with it file by file. Records hold run times and file times, which differ from run to
run: they are compared with those fields removed; every other file must be byte-identical.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from regkl.batch import check_jobs, discover_bids
from regkl.bids import pair_paths
from regkl.errors import InputError

from .conftest import SAMPLE

OPTS = ("--search", "none", "--jobs", "1", "-q")  # one process per batch: the cheapest run
VOLATILE = {"seconds", "mtime_ns"}  # run and file times: the only fields allowed to differ


def regkl(*args, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "regkl.cli", *map(str, args)], capture_output=True,
                          encoding="utf-8", errors="replace", cwd=cwd, timeout=timeout)


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "regkl.cli", *map(str, args)], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, encoding="utf-8", errors="replace")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The sample pair at 6 mm (T1 32x38x31, EPI 30x36x32): batch mechanics, not accuracy."""
    from regkl.io import load_volume
    from regkl.writers import save_volume
    from regkl.pyramid import downsample

    if not (SAMPLE / "sub-01_bold.nii.gz").exists():
        pytest.skip("bundled sample data missing")
    folder = tmp_path_factory.mktemp("tiny")
    save_volume(downsample(load_volume(SAMPLE / "sub-01_T1w.nii.gz"), 6.0), folder / "T1w.nii.gz")
    save_volume(downsample(load_volume(SAMPLE / "sub-01_bold.nii.gz"), 6.0), folder / "bold.nii.gz")
    save_volume(downsample(load_volume(SAMPLE / "sub-01_bold.nii.gz", volume=2), 6.0), folder / "other.nii.gz")
    return folder


def make_ds(root: Path, tiny: Path, subjects=("01", "02"), runs=("1", "2")) -> Path:
    for sub in subjects:
        (root / f"sub-{sub}/anat").mkdir(parents=True)
        (root / f"sub-{sub}/func").mkdir(parents=True)
        shutil.copy(tiny / "T1w.nii.gz", root / f"sub-{sub}/anat/sub-{sub}_T1w.nii.gz")
        for run in runs:
            shutil.copy(tiny / "bold.nii.gz", root / f"sub-{sub}/func/sub-{sub}_task-rest_run-{run}_bold.nii.gz")
    (root / "dataset_description.json").write_text('{"Name": "tiny", "BIDSVersion": "1.9.0"}')
    return root


def _drop_volatile(value):
    if isinstance(value, dict):
        return {k: _drop_volatile(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_drop_volatile(v) for v in value]
    return value


def results(out: Path) -> dict:
    """Every result file of a batch (not the report, summary or lock), records without times."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if not p.is_file() or rel.startswith("logs/") or rel in ("regkl_report.html", ".regkl.lock"):
            continue
        files[rel] = _drop_volatile(json.loads(p.read_text())) if p.name.endswith("_xfm.json") else p.read_bytes()
    return files


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """One uninterrupted batch of 2 subjects x 2 runs: (dataset, its results, seconds it took)."""
    root = make_ds(tmp_path_factory.mktemp("ref") / "ds", tiny)
    t0 = time.perf_counter()
    proc = regkl("batch", root, *OPTS)
    assert proc.returncode == 0, proc.stderr
    out = root / "derivatives" / "regkl"
    return root, results(out), time.perf_counter() - t0


def copy_raw(reference, dest: Path) -> Path:
    shutil.copytree(reference[0], dest, ignore=shutil.ignore_patterns("derivatives"))
    return dest


# --------------------------------------------------------------------------------------------------
# names: BIDS derivatives, fMRIPrep's names, pybids


def test_derivatives_follow_bids_and_pybids_finds_every_transform(reference):
    from bids import BIDSLayout

    root, files, _ = reference
    base = "sub-01/func/sub-01_task-rest_run-1"
    for name in (f"{base}_space-T1w_boldref.nii.gz", f"{base}_space-T1w_boldref.json",
                 f"{base}_from-boldref_to-T1w_mode-image_desc-coreg_xfm.txt",
                 f"{base}_from-boldref_to-T1w_mode-image_desc-coreg_xfm.json",
                 "sub-01/figures/sub-01_task-rest_run-1_desc-coreg_bold.png", ".bidsignore", "dataset_description.json"):
        assert name in files, sorted(files)
    assert not [f for f in files if "/func/" in f and f.endswith(".png")]  # pictures are not indexed as bold
    sidecar = json.loads(files[f"{base}_space-T1w_boldref.json"])
    assert sidecar["Sources"] == ["bids:raw:sub-01/func/sub-01_task-rest_run-1_bold.nii.gz",
                                  f"bids::{base}_from-boldref_to-T1w_mode-image_desc-coreg_xfm.txt"]
    assert sidecar["SpatialReference"] == "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"
    out = root / "derivatives" / "regkl"
    assert json.loads((out / "dataset_description.json").read_text())["DatasetLinks"] == {"raw": "../.."}
    record = files[f"{base}_from-boldref_to-T1w_mode-image_desc-coreg_xfm.json"]["Regkl"]
    paths = [record["inputs"]["moving"]["path"]] + [o["path"] for o in record["outputs"]]
    assert all(not os.path.isabs(p) and ".." not in p for p in paths), paths

    layout = BIDSLayout(root, derivatives=True)
    found = layout.get(desc="coreg", suffix="xfm", extension=".txt")
    assert sorted(Path(f.path).relative_to(out).as_posix() for f in found) == sorted(
        f"sub-{s}/func/sub-{s}_task-rest_run-{r}_from-boldref_to-T1w_mode-image_desc-coreg_xfm.txt"
        for s in ("01", "02") for r in ("1", "2"))
    assert all(f.get_metadata()["Sources"][0].startswith("bids:raw:sub-") for f in found)
    assert len(layout.get(scope="derivatives", suffix="boldref", space="T1w", extension=".nii.gz")) == 4


def test_every_input_gets_its_own_outputs(tmp_path):
    """Entities, the desc/space of the input, names without entities: all one-to-one."""
    names = ["sub-01_task-rest_bold.nii.gz", "sub-01_task-rest_desc-preproc_bold.nii.gz",
             "sub-01_task-rest_space-MNI_desc-preproc_bold.nii.gz", "sub-01_task-rest_acq-fast_bold.nii.gz",
             "a_bold.nii.gz", "b_bold.nii.gz", "sub-01_task-rest_sbref.nii.gz"]
    func = tmp_path / "ds/sub-01/func"
    func.mkdir(parents=True)
    for n in names:
        (func / n).write_bytes(b"x")
    for ses in ("1", "2"):  # names without the session entity, in two sessions (one figures/ folder)
        (tmp_path / f"ds/sub-01/ses-{ses}/func").mkdir(parents=True)
        (tmp_path / f"ds/sub-01/ses-{ses}/func/a_bold.nii.gz").write_bytes(b"x")
    jobs = discover_bids(tmp_path / "ds", tmp_path / "ds/derivatives/regkl", suffixes=("bold", "sbref"))
    assert len(jobs) == len(names) + 2
    check_jobs(jobs)  # no collision
    every = [str(p) for j in jobs for p in j.paths.all()]
    # 5 coregistration files per pair, and 5 head-motion files per bold series (issue 15)
    n_bold = sum(j.moving_rel.endswith("_bold.nii.gz") for j in jobs)
    assert len(every) == len(set(every)) == 5 * len(jobs) + 5 * n_bold
    assert pair_paths("sub-01/func/sub-01_task-rest_desc-preproc_bold.nii.gz", "o").transform.name == \
        "sub-01_task-rest_from-boldref_to-T1w_mode-image_desc-preprocCoreg_xfm.txt"
    (func / "sub-01_task-rest_bold.nii").write_bytes(b"x")  # same name but for .gz: a collision
    with pytest.raises(InputError, match="would both be written to"):
        check_jobs(discover_bids(tmp_path / "ds", tmp_path / "ds/derivatives/regkl", suffixes=("bold",)))


def test_collision_is_refused_before_any_work(tmp_path, tiny):
    root = make_ds(tmp_path / "ds", tiny, subjects=("01",), runs=("1",))
    shutil.copy(tiny / "bold.nii.gz", root / "sub-01/func/sub-01_task-rest_run-1_bold.nii")
    proc = regkl("batch", root, *OPTS)
    assert proc.returncode == 2 and "would both be written to" in proc.stderr, proc.stderr
    assert "run-1_bold.nii " in proc.stderr.replace(" and", " ") and not (root / "derivatives").exists()


# --------------------------------------------------------------------------------------------------
# the results folder is never an input, never left


def test_results_folder_is_never_searched_nor_left(tmp_path, tiny, capfd):
    study = tmp_path / "study"
    (study / "a").mkdir(parents=True)
    shutil.copy(tiny / "bold.nii.gz", study / "a" / "rest.nii.gz")
    shutil.copy(tiny / "T1w.nii.gz", study / "T1.nii.gz")
    out = study / "results"
    args = ("batch", study, "--moving-glob", "**/*rest*", "--fixed-glob", "T1.nii.gz", "--out-dir", out,
            "--search", "none", "--json", "-q")
    first, second = regkl(*args), regkl(*args)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert [r["status"] for r in json.loads(first.stdout)] == ["ok"]
    assert [r["status"] for r in json.loads(second.stdout)] == ["skipped"]  # its own outputs were not found
    other = tmp_path / "elsewhere"
    other.mkdir()
    for bad, phrase in ((("--moving-glob", "../elsewhere/*"), "stay inside it"),
                        (("--moving-glob", str(study / "a" / "*")), "stay inside it"),
                        (("--fixed-glob", "../T1.nii.gz"), "stay inside it"),
                        (("--out-dir", study), "must not be the dataset folder")):
        opts = dict(zip(("--moving-glob", "--fixed-glob", "--out-dir"), ("a/*", "T1.nii.gz", other)))
        opts.update(dict([bad]))
        code, err = in_process(["batch", study, *[x for kv in opts.items() for x in kv]], capfd)
        assert code == 2 and phrase in err and len(err.splitlines()) == 1, err
    assert list(other.iterdir()) == []
    xfm = next(out.rglob("*_xfm.txt"))
    before = {p: p.read_bytes() for p in (xfm, out / "logs" / "regkl_summary.json", next(out.rglob("*_xfm.json")),
                                          study / "T1.nii.gz")}
    for target in [*before, tmp_path / "report.txt"]:
        code, err = in_process([*args[:-2], "--report", target], capfd)
        assert code == 2 and len(err.splitlines()) == 1, (target, err)
        code, err = in_process(["report", out, "-o", target], capfd)
        assert code == 2 and len(err.splitlines()) == 1, (target, err)
    assert all(p.read_bytes() == data for p, data in before.items())


def in_process(argv, capfd):
    """Exit code and stderr of ``regkl ARGV`` run in this process (for checks that stop before work)."""
    from regkl.cli import main

    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    return info.value.code, capfd.readouterr().err


# --------------------------------------------------------------------------------------------------
# resume: concurrent runs, kills, copies, changed options and inputs


def test_two_batches_at_once_end_as_one(reference, tmp_path):
    root = copy_raw(reference, tmp_path / "ds")
    procs = [start("batch", root, *OPTS[:-1], "--json") for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    statuses = [{r["moving"]: r["status"] for r in json.loads(o)} for o, _ in outs]
    assert len(statuses[0]) == 4 and all({a[k], b[k]} == {"ok", "skipped"}
                                         for a, b in [statuses] for k in a)  # each pair done exactly once
    assert any("waiting for the batch already writing" in e for _, e in outs)
    assert results(root / "derivatives" / "regkl") == reference[1]


def test_sigkill_at_random_points_then_resume_is_byte_identical(reference, tmp_path):
    root = copy_raw(reference, tmp_path / "ds")
    out = root / "derivatives" / "regkl"
    rng = random.Random(1207)
    done = [0]

    def kill_one_run(when):
        proc = start("batch", root, *OPTS)  # one pair at a time
        when(proc)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the batch and its workers, wherever they are
        proc.wait()
        done.append(len(list(out.rglob("*_xfm.json"))))

    def after_next_pair(proc):  # a random moment of the pair after the next one to finish
        deadline = time.time() + 120
        while len(list(out.rglob("*_xfm.json"))) == done[-1] and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.2))

    kill_one_run(lambda proc: time.sleep(rng.uniform(0.3, 1.5)))  # start-up or first pair
    while done[-1] < 2:
        kill_one_run(after_next_pair)
    assert 0 < done[-1] < 4, f"the kills did not land inside the batch ({done} pairs done): the test proves nothing"
    final = regkl("batch", root, *OPTS[:-1], "--json")
    assert final.returncode == 0, final.stderr
    rows = json.loads(final.stdout)
    assert sum(r["status"] == "skipped" for r in rows) == done[-1] and len(rows) == 4
    assert results(out) == reference[1]
    assert [p for p in out.rglob(".*") if ".tmp" in p.name] == []


def test_copied_dataset_is_judged_by_its_own_files(reference, tmp_path):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(reference[0]), str(copy)], check=True)  # new times for every file
    out = copy / "derivatives" / "regkl"
    gone = next(out.glob("sub-02/func/*run-1*_xfm.txt"))
    gone.unlink()
    original = results(reference[0] / "derivatives" / "regkl")
    proc = regkl("batch", "copy", *OPTS[:-1], "--json", cwd=tmp_path)  # relative, from another working folder
    assert proc.returncode == 0, proc.stderr
    status = {r["moving"]: r["status"] for r in json.loads(proc.stdout)}
    assert status.pop("sub-02/func/sub-02_task-rest_run-1_bold.nii.gz") == "ok"
    assert set(status.values()) == {"skipped"}
    assert f"output sub-02/func/{gone.name} is missing" in proc.stderr
    assert results(out) == reference[1] and results(reference[0] / "derivatives" / "regkl") == original


def test_changed_input_or_option_means_redo(reference, tmp_path, tiny):
    root = tmp_path / "ds"
    shutil.copytree(reference[0], root, ignore=shutil.ignore_patterns("sub-02"))  # 2 pairs, results copied
    out = root / "derivatives" / "regkl"
    run1, run2 = (root / f"sub-01/func/sub-01_task-rest_run-{r}_bold.nii.gz" for r in "12")
    xfm1, xfm2 = (next(out.glob(f"sub-01/func/*run-{r}*_xfm.txt")) for r in "12")
    old2 = xfm2.read_bytes()
    os.utime(run1)  # a new time, the same content: still complete
    shutil.copy(tiny / "other.nii.gz", run2)  # another image under the same name: redo
    again = regkl("batch", root, *OPTS[:-1], "--json")
    assert again.returncode == 0, again.stderr
    assert [r["status"] for r in json.loads(again.stdout)] == ["skipped", "ok"]
    assert "redo sub-01/func/sub-01_task-rest_run-2_bold.nii.gz: the moving image" in again.stderr
    assert "changed since it was registered" in again.stderr and "run-1" not in again.stderr
    assert xfm2.read_bytes() != old2  # registered again, from the new image

    run2.unlink()
    affine = regkl("batch", root, *OPTS[:-1], "--model", "affine", "--json")
    assert affine.returncode == 0, affine.stderr
    assert [r["status"] for r in json.loads(affine.stdout)] == ["ok"]
    assert "redo sub-01/func/sub-01_task-rest_run-1_bold.nii.gz: options changed: --model was rigid, now affine" \
        in affine.stderr
    record = json.loads(xfm1.with_suffix(".json").read_text())["Regkl"]
    assert record["options"]["model"] == "affine" and record["summary"]["status"] == "ok"


# --------------------------------------------------------------------------------------------------
# the report of a moved dataset


def test_report_after_mv_shows_every_picture_in_chromium(reference, tmp_path, capfd):
    from .test_report import find_chromium, probe_in_browser

    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium binary found (Debian: apt-get install chromium, or set REGKL_CHROMIUM)")
    first = tmp_path / "first"
    subprocess.run(["cp", "-r", str(reference[0]), str(first)], check=True)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    subprocess.run(["mv", str(first), str(moved)], check=True)
    page = tmp_path / "after_mv.html"
    code, err = in_process(["report", moved / "derivatives" / "regkl", "-o", page], capfd)
    assert code == 0, err
    seen, _ = probe_in_browser(exe, page, tmp_path)
    assert seen["problems"] == [] and seen["rows"] == 4
    assert len(seen["images"]) == 4 and all(i["ok"] and i["data"] and i["width"] >= 100 for i in seen["images"])
    assert sorted(i["row"] for i in seen["images"]) == sorted(
        f"sub-{s}_task-rest_run-{r}_bold.nii.gz" for s in ("01", "02") for r in ("1", "2"))
    assert str(moved) in page.read_text() and str(reference[0]) not in page.read_text()


def test_report_refuses_a_summary_whose_paths_are_not_text(tmp_path, capfd):
    summary = tmp_path / "s.json"
    summary.write_text('{"Pairs": [{"moving": "a.nii.gz", "status": "ok", "qc": 3}]}')
    code, err = in_process(["report", summary, "-o", tmp_path / "r.html"], capfd)
    assert code == 2 and "pair 1: 'qc' is not a path" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "r.html").exists()
