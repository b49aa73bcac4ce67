"""Issue 12 items 5-9, each finding as a kind, through the real command line (``regkl.cli.main``
with capfd, or ``python -m regkl.cli`` where the process itself matters: pipes, environment).

5 image outputs write what their suffix says (every file of a pair) or are refused up front;
6 apply streams a series volume by volume (memory bounded by the output grid, not the series);
7 stderr that cannot take a line, non-UTF-8 names and an unwritable Numba cache never stop work;
8 every option's value is checked (ranges, NaN, empty) before any image is read, exit 2;
9 apply refuses a transform that misses the reference; messages name the files they are about.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from io import BytesIO
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from regkl.io import load_volume
from regkl.resample import resample

from .test_hardening import AFF, assert_one_line_error, blob, listing, run
from regkl.xfm import transform_text

SMALL = np.array([[8.0, 0, 0, -60], [0, 8.0, 0, -60], [0, 0, 8.0, -44], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """(moving 3D, fixed 3D, 4D series of 5 volumes on a coarser grid, identity, far-away transform)."""
    d = tmp_path_factory.mktemp("i12")
    nib.save(nib.Nifti1Image(blob(seed=1), AFF), str(d / "fixed.nii.gz"))
    nib.save(nib.Nifti1Image(blob(seed=2), AFF), str(d / "moving.nii.gz"))
    series = np.stack([blob((16, 16, 12), seed=10 + t) for t in range(5)], -1)
    img = nib.Nifti1Image(series, SMALL)
    img.header.set_zooms((8.0, 8.0, 8.0, 2.5))
    nib.save(img, str(d / "bold.nii.gz"))
    (d / "identity.txt").write_text(transform_text(np.eye(4), "ras"))  # regkl's RAS matrix, with its header
    far = np.eye(4)
    far[0, 3] = 5000.0
    (d / "far.txt").write_text(transform_text(far, "ras"))
    return {k: d / n for k, n in (("moving", "moving.nii.gz"), ("fixed", "fixed.nii.gz"), ("bold", "bold.nii.gz"),
                                  ("identity", "identity.txt"), ("far", "far.txt"))}


def cli(*argv, env=None):
    """``python -m regkl.cli`` in a subprocess: (exit code, stdout, stderr)."""
    full = dict(os.environ, **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "regkl.cli", *map(str, argv)], capture_output=True, env=full,
                          timeout=600)
    return proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")


# --------------------------------------------------------------------------------------------------
# 5: image outputs: what the suffix says, every file of a set, or refused up front


def _read_any(path: Path) -> np.ndarray:
    name = path.name.lower()
    if name.endswith((".nrrd", ".mha", ".mhd")):
        return np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), (2, 1, 0))
    return np.asanyarray(nib.load(str(path)).dataobj)


# (output name, files that must exist afterwards)
SUFFIXES = [
    ("out.nii.gz", ["out.nii.gz"]),
    ("out.nii", ["out.nii"]),
    ("out.hdr", ["out.hdr", "out.img"]),
    ("out.img", ["out.hdr", "out.img"]),
    ("out.img.gz", ["out.hdr.gz", "out.img.gz"]),
    ("OUT.HDR", ["OUT.HDR", "OUT.IMG"]),
    ("out.nrrd", ["out.nrrd"]),
    ("out.mha", ["out.mha"]),
    ("out.mhd", ["out.mhd", "out.raw"]),
]


@pytest.mark.parametrize("name,files", SUFFIXES, ids=[s[0] for s in SUFFIXES])
def test_every_image_suffix_writes_its_whole_set(name, files, images, tmp_path, capfd):
    out = tmp_path / "o"
    out.mkdir()
    code, _, err = run(["apply", images["identity"], images["moving"], images["fixed"], "-o", out / name, "-q"], capfd)
    assert code == 0, err
    assert listing(out) == sorted(files)  # both halves of a pair, no hidden temporary file
    expected = resample(load_volume(images["moving"]), load_volume(images["fixed"]), np.eye(4)).data
    np.testing.assert_array_equal(_read_any(out / name), expected)  # read back by nibabel / SimpleITK


@pytest.mark.parametrize("name", ["out.hdr", "out.nii", "out.nii.gz"])
def test_series_in_every_nifti_form(name, images, tmp_path, capfd):
    code, _, err = run(["apply", images["identity"], images["bold"], images["fixed"], "-o", tmp_path / name, "-q"],
                       capfd)
    assert code == 0, err
    img = nib.load(str(tmp_path / name))
    assert img.shape == (32, 32, 32, 5) and float(img.header.get_zooms()[3]) == 2.5
    np.testing.assert_allclose(img.affine, AFF)
    data = np.asanyarray(img.dataobj)
    bold = nib.load(str(images["bold"])).get_fdata(dtype=np.float32)
    fixed = load_volume(images["fixed"])
    from regkl.volume import Volume

    for t in range(5):  # each volume as resampling it alone gives
        np.testing.assert_array_equal(data[..., t], resample(Volume(bold[..., t], SMALL), fixed, np.eye(4)).data)


REFUSED = [
    ("unknown_suffix", ["apply", "{identity}", "{moving}", "{fixed}", "-o", "{out}/x.xyz"], "x.xyz", "suffix"),
    ("nhdr_detached", ["apply", "{identity}", "{moving}", "{fixed}", "-o", "{out}/x.nhdr"], "x.nhdr", "suffix"),
    ("series_as_mha", ["apply", "{identity}", "{bold}", "{fixed}", "-o", "{out}/x.mha"], "x.mha", "4D series"),
    ("register_png_output", ["register", "{moving}", "{fixed}", "-o", "{out}/x.png"], "x.png", "suffix"),
    ("pair_partner_is_input", ["apply", "{identity}", "{out}/in.img", "{fixed}", "-o", "{out}/in.hdr"], "in.img",
     "overwrite an input"),
    ("qc_not_png", ["qc", "{fixed}", "{moving}", "-o", "{out}/q.pdf"], "q.pdf", "png"),
    ("register_qc_not_png", ["register", "{moving}", "{fixed}", "--qc", "{out}/q.jpg"], "q.jpg", "png"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_unwritable_suffix_refused_before_work(case, images, tmp_path, capfd):
    _, argv, named, phrase = case
    out = tmp_path / "o"
    out.mkdir()
    nib.save(nib.Nifti1Pair(blob(), AFF), str(out / "in.img"))
    before = listing(out)
    argv = [a.format(out=out, **{k: str(v) for k, v in images.items()}) for a in argv]
    code, stdout, err = run(argv, capfd)
    assert_one_line_error(code, stdout, err, path=named, phrase=phrase)
    assert listing(out) == before


# --------------------------------------------------------------------------------------------------
# 6: apply streams a series; memory is checked against the output grid before any work

def test_apply_series_memory_does_not_grow_with_the_series(tmp_path, capfd):
    """32 volumes onto a 64^3 grid would need 32 MB gathered in memory (twice that before streaming:
    the list, then the stacked array); streamed, the peak of what is allocated (numpy reports to
    tracemalloc) stays that of a 2-volume series, within a quarter of that."""
    import tracemalloc

    ref = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((64, 64, 64), np.float32), np.diag([1.0, 1, 1, 1])), str(ref))
    (tmp_path / "id.txt").write_text(transform_text(np.eye(4), "ras"))
    peaks = {}
    for n in (2, 32):
        series = np.random.default_rng(n).normal(100, 10, (16, 16, 16, n)).astype(np.float32)
        nib.save(nib.Nifti1Image(series, np.diag([8.0, 8, 8, 1])), str(tmp_path / f"s{n}.nii"))
        argv = ["apply", tmp_path / "id.txt", tmp_path / f"s{n}.nii", ref, "-o", tmp_path / f"o{n}.nii", "-q"]
        run(argv, capfd)  # the first run also allocates what importing and loading the kernels take
        tracemalloc.start()
        try:
            code, _, err = run(argv, capfd)
            peaks[n] = tracemalloc.get_traced_memory()[1] / 2**20
        finally:
            tracemalloc.stop()
        assert code == 0, err
        assert nib.load(str(tmp_path / f"o{n}.nii")).shape == (64, 64, 64, n)
    gathered_mb = 64 ** 3 * 4 * 32 / 2**20
    assert peaks[32] - peaks[2] < 0.25 * gathered_mb, peaks


def test_apply_refuses_an_output_too_large_for_the_disk(images, tmp_path, capfd, monkeypatch):
    """An uncompressed output is checked against the free disk space before any work, with figures."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, (1 << 30) - 4096, 4096))
    dest = tmp_path / "o.nii"
    code, stdout, err = run(["apply", images["identity"], images["bold"], images["fixed"], "-o", dest, "-q"], capfd)
    assert_one_line_error(code, stdout, err, path=dest, phrase="GiB of disk space")
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# 7: output channels and caches never stop the work


def test_batch_survives_closed_stderr_and_non_utf8_names(images, tmp_path, capfd):
    """``regkl batch ... 2>&1 | head -c 1`` on a dataset with a file name that is not UTF-8: every
    pair is still registered, the summary and report written (the name's exact bytes in the TSV,
    valid UTF-8 in the HTML), exit 0; ``regkl report`` reads that summary again."""
    ds = tmp_path / "ds"
    names = {"01": "sub-01_task-rest_bold.nii.gz", "02": os.fsdecode(b"sub-02_task-r\xffst_bold.nii.gz")}
    for sub, name in names.items():
        (ds / f"sub-{sub}" / "anat").mkdir(parents=True)
        (ds / f"sub-{sub}" / "func").mkdir(parents=True)
        (ds / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz").write_bytes(images["fixed"].read_bytes())
        (ds / f"sub-{sub}" / "func" / name).write_bytes(images["moving"].read_bytes())
    cmd = (f"{sys.executable} -m regkl.cli batch {ds} --search none --jobs 1 2>&1 | head -c 1 > /dev/null; "
           "echo ${PIPESTATUS[0]}")
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, timeout=900, env=dict(os.environ))
    assert proc.stdout.decode().strip() == "0", proc.stderr.decode()
    results = ds / "derivatives" / "regkl"
    summary = json.loads((results / "logs" / "regkl_summary.json").read_text())
    assert [r["status"] for r in summary["Pairs"]] == ["ok", "ok"]
    assert b"r\xffst" in (results / "logs" / "regkl_summary.tsv").read_bytes()
    (results / "regkl_report.html").read_text(encoding="utf-8")
    code, _, err = run(["report", results, "-o", tmp_path / "r.html"], capfd)
    assert code == 0 and "r\\xffst" in (tmp_path / "r.html").read_text(encoding="utf-8"), err


@pytest.mark.parametrize("command", ["register", "profile"])
def test_non_utf8_names_in_picture_titles(command, images, tmp_path, capfd):
    """A file name that is not UTF-8 goes into the QC/profile picture's title (as \\xNN)."""
    odd = tmp_path / os.fsdecode(b"m\xff.nii.gz")
    odd.write_bytes(images["moving"].read_bytes())
    picture = tmp_path / os.fsdecode(b"p\xff.png")
    extra = {"register": ["--search", "none", "--max-iter", "2", "--qc", picture],
             "profile": ["--steps", "2", "-o", picture]}[command]
    code, _, err = run([command, odd, images["fixed"], "-q"] + extra, capfd)
    assert code == 0, err
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_read_only_numba_cache_runs_uncached_with_one_hint(images, tmp_path):
    """No cache folder Numba can write (install, user cache, temporary folder): apply (one kernel to
    compile) still works, compiled without a cache, with one warning line that says how to get a
    cache."""
    script = textwrap.dedent("""
        import sys, tempfile
        from numba.core import caching
        impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl
        for cls in impl._locator_classes:  # every location read-only, as in a locked-down install
            cls.from_function = classmethod(lambda cls, f, p: None)
        tempfile.tempdir = "/proc"  # not writable
        from regkl.cli import main
        main(sys.argv[1:])
    """)
    dest = tmp_path / "o.nii.gz"
    proc = subprocess.run([sys.executable, "-c", script, "apply", str(images["identity"]), str(images["moving"]),
                           str(images["fixed"]), "-o", str(dest), "-q"], capture_output=True, timeout=900)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Numba cache" in lines[0], err
    assert "NUMBA_CACHE_DIR" in lines[0] and "without a cache" in lines[0], err
    expected = resample(load_volume(images["moving"]), load_volume(images["fixed"]), np.eye(4)).data
    np.testing.assert_array_equal(nib.load(str(dest)).get_fdata(dtype=np.float32), expected)


# --------------------------------------------------------------------------------------------------
# 8: every option value checked before any image is read: one line, exit 2

BAD_VALUES = [
    ("register", "--seed", "-1"), ("register", "--seed", "99999999999"), ("register", "--max-iter", "0"),
    ("register", "--max-seconds", "nan"), ("register", "--max-seconds", "-1"), ("register", "--max-seconds", "inf"),
    ("register", "--sampling", "nan"), ("register", "--sampling", "1.5"), ("register", "--bins", "4"),
    ("register", "--bins", "100000"), ("register", "--levels", "0"), ("register", "--threads", "0"),
    ("register", "--metric", ""), ("register", "--metric", "mutual"), ("register", "--model", ""),
    ("register", "--moving-volume", ""), ("register", "--moving-volume", "1.5"), ("register", "--max-points", "10"),
    ("metric", "--metric", ""), ("metric", "--metric", "mi,,nmi"), ("metric", "--bins", "0"),
    ("metric", "--moving-volume", "x"),
    ("profile", "--seed", "-3"), ("profile", "--metric", ""), ("profile", "--bins", "1"),
    ("stats", "--bins", "300000000"), ("stats", "--bins", "1"),
    ("learn-prior", "--bins", "-2"), ("learn-prior", "--moving-volume", ""),
    ("qc", "--slices", "0"), ("qc", "--slices", "100000"),
    ("batch", "--jobs", "0"), ("batch", "--seed", "-1"), ("batch", "--sampling", "nan"), ("batch", "--model", ""),
]


def _argv(command, images, out):
    m, f = str(images["moving"]), str(images["fixed"])
    return {"register": ["register", m, f], "metric": ["metric", m, f], "profile": ["profile", m, f],
            "stats": ["stats", f], "learn-prior": ["learn-prior", f"{m},{f}", "-o", str(out / "p.npz")],
            "qc": ["qc", f, m, "-o", str(out / "q.png")], "batch": ["batch", str(out)]}[command]


@pytest.mark.parametrize("case", BAD_VALUES, ids=[f"{c}{o}={v or 'empty'}" for c, o, v in BAD_VALUES])
def test_bad_option_value_is_refused_before_reading(case, images, tmp_path, capfd, monkeypatch):
    command, option, value = case
    import regkl.io

    def no_reading(*a, **k):
        raise AssertionError("an image was read before the options were checked")
    monkeypatch.setattr(regkl.io, "_read", no_reading)
    code, stdout, err = run(_argv(command, images, tmp_path) + [option, value], capfd)
    assert_one_line_error(code, stdout, err, path=option, phrase="invalid value")
    assert listing(tmp_path) == []


EMPTY = [
    ("register_output", ["register", "{moving}", "{fixed}", "-o", ""]),
    ("register_transform_out", ["register", "{moving}", "{fixed}", "--transform-out", " "]),
    ("apply_output", ["apply", "{identity}", "{moving}", "{fixed}", "-o", ""]),
    ("learn_prior_pair_part", ["learn-prior", "{moving},,{fixed}", "-o", "{out}/p.npz"]),
]


@pytest.mark.parametrize("case", EMPTY, ids=[c[0] for c in EMPTY])
def test_empty_names_are_refused_before_reading(case, images, tmp_path, capfd, monkeypatch):
    import regkl.io

    monkeypatch.setattr(regkl.io, "_read", lambda *a, **k: pytest.fail("an image was read"))
    argv = [a.format(out=tmp_path, **{k: str(v) for k, v in images.items()}) for a in case[1]]
    code, stdout, err = run(argv, capfd)
    assert code == 2 and stdout == "" and len(err.strip().splitlines()) == 1 and "empty" in err, err
    assert listing(tmp_path) == []


@pytest.mark.parametrize("variable,value", [("NUMBA_NUM_THREADS", "0"), ("NUMBA_NUM_THREADS", "-2"),
                                            ("REGKL_MEMORY_LIMIT_GB", "nan"), ("REGKL_MEMORY_LIMIT_GB", "-1")])
def test_bad_environment_is_one_line(variable, value, images):
    code, out, err = cli("stats", images["fixed"], env={variable: value})
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and variable in err, err


def _npz(path, members: dict):
    with zipfile.ZipFile(path, "w") as zf:
        for key, raw in members.items():
            zf.writestr(f"{key}.npy", raw)
    return path


def _npy(array) -> bytes:
    buf = BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def _declared(shape, dtype="<f8") -> bytes:
    """An .npy header declaring ``shape`` followed by a few bytes: a tiny file claiming a huge array."""
    from numpy.lib import format as npy

    buf = BytesIO()
    npy.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + bytes(64)


PRIORS = [
    ("prior_200000_squared", {"prior": _declared((200000, 200000)), "bins": _npy(np.array([24, 24])),
                              "meta_json": _npy(np.array("{}"))}, "200000x200000"),
    ("bins_huge", {"prior": _npy(np.full((24, 24), 1 / 576)), "bins": _declared((10 ** 9,), "<i8"),
                   "meta_json": _npy(np.array("{}"))}, "bins"),
    ("meta_huge", {"prior": _npy(np.full((24, 24), 1 / 576)), "bins": _npy(np.array([24, 24])),
                   "meta_json": _declared((10 ** 8,), "<U100")}, "meta_json"),
]


@pytest.mark.parametrize("case", PRIORS, ids=[c[0] for c in PRIORS])
@pytest.mark.parametrize("command", ["register", "metric"])
def test_prior_declaring_a_huge_array_is_refused_from_its_header(case, command, images, tmp_path, capfd):
    name, members, phrase = case
    prior = _npz(tmp_path / "prior.npz", members)
    argv = [command, images["moving"], images["fixed"], "--metric", "kl", "--prior", prior]
    code, stdout, err = run(argv, capfd)
    assert_one_line_error(code, stdout, err, path=prior, phrase=phrase)


@pytest.mark.parametrize("field,value", [("confidence", "high"), ("seconds", [1]), ("suspect", "no"),
                                         ("moving", 3)])
def test_report_summary_with_wrong_field_types(field, value, tmp_path, capfd):
    row = {"moving": "a_bold.nii.gz", "status": "ok", "confidence": 0.9, "seconds": 1.0, "suspect": False}
    row[field] = value
    summary = tmp_path / "regkl_summary.json"
    summary.write_text(json.dumps([row]))
    code, stdout, err = run(["report", summary, "-o", tmp_path / "r.html"], capfd)
    assert_one_line_error(code, stdout, err, path=summary, phrase=field)
    assert not (tmp_path / "r.html").exists()


# --------------------------------------------------------------------------------------------------
# 9: no silent empty output; messages name the files and speak of what the user gave


@pytest.mark.parametrize("inverse", [False, True])
def test_apply_refuses_a_transform_that_misses_the_reference(inverse, images, tmp_path, capfd):
    out = tmp_path / "o"
    out.mkdir()
    argv = ["apply", images["far"], images["bold"], images["fixed"], "-o", out / "x.nii.gz", "-q"]
    code, stdout, err = run(argv + (["--inverse"] if inverse else []), capfd)
    assert_one_line_error(code, stdout, err, path=images["far"], phrase="maps no voxel", exit_code=1)
    assert ("use --inverse" in err) != inverse  # never advise what the user already did
    assert listing(out) == []


def test_apply_with_partial_overlap_still_works(images, tmp_path, capfd):
    shift = np.eye(4)
    shift[0, 3] = 100.0  # most, not all, of the reference falls outside
    (tmp_path / "shift.txt").write_text(transform_text(shift, "ras"))
    code, _, err = run(["apply", tmp_path / "shift.txt", images["moving"], images["fixed"], "-o",
                        tmp_path / "x.nii.gz", "-q"], capfd)
    assert code == 0, err
    assert np.count_nonzero(nib.load(str(tmp_path / "x.nii.gz")).get_fdata()) > 0


def _vox(size, shape=(32, 32, 32)):
    return np.diag([size, size, size, 1.0]), shape


MESSAGES = [  # (id, argv, files the line must name, words it must not contain)
    ("metric_no_overlap", ["metric", "{moving}", "{fixed}", "--transform", "{far}"], ["moving", "fixed", "far"],
     []),
    ("profile_no_overlap", ["profile", "{moving}", "{fixed}", "--transform", "{far}"], ["moving", "fixed", "far"],
     []),
    ("metric_tiny_images", ["metric", "{tiny}", "{tiny}"], ["tiny"], ["do not overlap"]),
    ("sampling_tiny", ["register", "{moving}", "{fixed}", "--sampling", "1e-9"], ["fixed"], ["constant"]),
    ("huge_voxels_moving", ["register", "{big}", "{fixed}"], ["big"], ["constant", "(1, 1, 1)"]),
]


@pytest.mark.parametrize("case", MESSAGES, ids=[c[0] for c in MESSAGES])
def test_messages_name_the_files(case, images, tmp_path, capfd):
    _, argv, named, banned = case
    nib.save(nib.Nifti1Image(blob((4, 4, 4), seed=3), np.diag([4.0, 4, 4, 1])), str(tmp_path / "tiny.nii.gz"))
    nib.save(nib.Nifti1Image(blob(seed=3), np.diag([500.0, 500, 500, 1])), str(tmp_path / "big.nii.gz"))
    files = {k: str(v) for k, v in images.items()}
    files.update(tiny=str(tmp_path / "tiny.nii.gz"), big=str(tmp_path / "big.nii.gz"))
    code, stdout, err = run([a.format(**files) for a in argv] + ["-q"] * (argv[0] != "metric"), capfd)
    assert code in (1, 2) and stdout == "" and len(err.strip().splitlines()) == 1, err
    for key in named:
        assert files[key] in err, err
    for word in banned:
        assert word not in err, err
