"""Command line: exit codes, one-line errors, nothing but results on stdout, no stray files."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from regkl import __version__
from regkl.cli import main


def run(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_version_and_help(capsys):
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and __version__ in out
    code, out, _ = run(["register", "--help"], capsys)
    assert code == 0 and "Examples" in out and "--transform-out" in out


def _bad_file(tmp_path, case):
    p = tmp_path / f"{case}.nii.gz"
    if case == "missing":
        return p
    if case == "not_an_image":
        p.write_text("just text")
    elif case == "image_2d":
        nib.save(nib.Nifti1Image(np.random.rand(8, 8).astype(np.float32), np.eye(4)), str(p))
    elif case == "nan_filled":
        nib.save(nib.Nifti1Image(np.full((8, 8, 8), np.nan, np.float32), np.eye(4)), str(p))
    elif case == "singular_affine":
        hdr = nib.Nifti1Header()
        hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = [1, 0, 0, 0], [2, 0, 0, 0], [0, 0, 1, 0]
        hdr["sform_code"], hdr["qform_code"] = 2, 0
        nib.save(nib.Nifti1Image(np.random.rand(8, 8, 8).astype(np.float32), None, header=hdr), str(p))
    return p


@pytest.mark.parametrize("case", ["missing", "not_an_image", "image_2d", "nan_filled", "singular_affine"])
@pytest.mark.parametrize("role", ["moving", "fixed"])
def test_bad_input_one_line_exit_2_no_output(tmp_path, capsys, real_pair_paths, case, role):
    good_moving, good_fixed = real_pair_paths
    bad = _bad_file(tmp_path, case)
    moving, fixed = (bad, good_fixed) if role == "moving" else (good_moving, bad)
    outs = [tmp_path / "out.nii.gz", tmp_path / "x.tfm", tmp_path / "m.txt"]
    code, out, err = run(["register", moving, fixed, "-o", outs[0], "--transform-out", outs[1],
                          "--matrix-out", outs[2]], capsys)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(bad) in lines[0] and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [bad.name] if bad.exists() else [])


def test_output_equal_to_input_is_refused(tmp_path, capsys, real_pair_paths):
    moving, fixed = real_pair_paths
    code, out, err = run(["register", moving, fixed, "-o", moving], capsys)
    assert code == 2 and "overwrite an input" in err


def test_debug_shows_traceback(tmp_path):
    """--debug shows the traceback and keeps the exit code of the error (2: bad input), through the
    console entry point (it exited 1, the code of a failed registration)."""
    for entry in (["-m", "regkl.cli"], ["-c", "from regkl.cli import run; run()"]):
        proc = subprocess.run([sys.executable, *entry, "register", str(tmp_path / "a.nii"),
                               str(tmp_path / "b.nii"), "--debug"], capture_output=True, text=True)
        assert proc.returncode == 2 and "Traceback" in proc.stderr, (entry, proc.returncode, proc.stderr[-300:])


def test_json_summary_on_stdout_only(tmp_path, capsys, real_pair_paths):
    moving, fixed = real_pair_paths
    code, out, err = run(["register", moving, fixed, "--matrix-out", tmp_path / "m.txt", "--json"], capsys)
    assert code == 0
    summary = json.loads(out)
    assert summary["metric_after"] > summary["metric_before"]
    assert len(summary["levels"]) >= 2 and all(lv["iterations"] > 0 for lv in summary["levels"])
    m = np.array(summary["fixed2moving_ras"])
    np.testing.assert_allclose(np.loadtxt(tmp_path / "m.txt", comments="#"), m, atol=1e-8)
    assert "level" in err  # progress went to stderr


def test_matrix_on_stdout_without_json(capsys, real_pair_paths):
    moving, fixed = real_pair_paths
    code, out, _ = run(["register", moving, fixed, "-q"], capsys)
    assert code == 0
    m = np.array([[float(v) for v in line.split()] for line in out.strip().splitlines()])
    assert m.shape == (4, 4) and np.allclose(m[3], [0, 0, 0, 1])


def test_same_seed_same_result_and_other_seed_close(real_pair, real_pair_result):
    """Same seed: identical. Another seed draws other sample points; on this real pair the MI
    optimum is flat (about 2e-4 nats over 0.6 mm), and over 6 seeds the results spread up to
    1.0 mm (median 0.7 mm; see README, known limitations), so the bound here is that measured
    spread with margin, not a precision claim."""
    from regkl.optimize import register
    from regkl.transforms import rms_displacement

    moving, fixed = real_pair
    a = real_pair_result.fixed2moving  # register(moving, fixed), default seed 0, from an earlier call
    b = register(moving, fixed, seed=0).fixed2moving
    c = register(moving, fixed, seed=4).fixed2moving
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    pts = fixed.world_coords(np.argwhere(fixed.data[::4, ::4, ::4] > np.percentile(fixed.data, 60)) * 4.0)
    assert rms_displacement(a, c, pts) < 1.5


def test_metric_stats_and_learn_prior_commands(tmp_path, capsys, real_pair_paths):
    moving, fixed = real_pair_paths
    code, out, _ = run(["stats", fixed, "--json"], capsys)
    stats = json.loads(out)
    assert code == 0 and 0 < stats["kl_from_uniform_nats"] < np.log(64)
    code, out, _ = run(["metric", moving, fixed, "--metric", "mi,nmi,cr,jsd"], capsys)
    values = dict(line.split("\t") for line in out.strip().splitlines())
    assert code == 0 and set(values) == {"mi", "nmi", "cr", "jsd", "overlap"}
    assert float(values["nmi"]) > 1.0 and 0 < float(values["overlap"]) <= 1.0
    prior = tmp_path / "prior.npz"
    code, _, _ = run(["learn-prior", f"{moving},{fixed}", "-o", prior], capsys)
    assert code == 0 and prior.exists()
    code, out, _ = run(["metric", moving, fixed, "--metric", "kl", "--prior", prior, "--json"], capsys)
    assert code == 0 and abs(json.loads(out)["metrics"]["kl"]) < 1e-6  # the prior IS this pair
    code, _, err = run(["register", moving, fixed, "--metric", "kl", "--prior", prior, "--bins", "32"], capsys)
    assert code == 2 and "--bins 24" in err


@pytest.mark.parametrize("argv, message", [
    (["--metric", "kl"], "needs --prior"),
    (["--metric", "mi", "--prior", "p.npz"], "only used with --metric kl"),
    (["--metric", "bogus"], "choose one of"),
    (["--model", "bogus"], "choose one of"),
])
def test_metric_and_model_usage_errors(capsys, real_pair_paths, argv, message):
    moving, fixed = real_pair_paths
    code, out, err = run(["register", moving, fixed] + argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_masks_from_cli_and_empty_mask_error(tmp_path, capsys, real_pair_paths):
    moving, fixed = real_pair_paths
    img = nib.load(str(fixed))
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), str(tmp_path / "zeros.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones(img.shape, np.uint8), img.affine), str(tmp_path / "ones.nii.gz"))
    code, _, err = run(["register", moving, fixed, "--fixed-mask", tmp_path / "zeros.nii.gz"], capsys)
    assert code == 2 and "fixed mask is empty" in err and "zeros.nii.gz" in err
    code, _, err = run(["register", moving, fixed, "--fixed-mask", tmp_path / "ones.nii.gz", "-q"], capsys)
    assert code == 0, err
    code, out, err = run(["register", moving, fixed, "--auto-mask", "--json"], capsys)
    assert code == 0 and json.loads(out)["settings"]["auto_mask"] is True


def test_console_script_flushes_and_keeps_exit_codes(tmp_path):
    """The `regkl` script ends with os._exit (no slow Numba teardown): stdout must still arrive whole,
    files must be complete and the exit codes must be those of main()."""
    repo = Path(__file__).resolve().parents[1] / "data"
    entry = [sys.executable, "-c", "from regkl.cli import run; run()"]
    out = tmp_path / "out.nii.gz"
    ok = subprocess.run(entry + ["register", str(repo / "sub-01_bold.nii.gz"), str(repo / "sub-01_T1w.nii.gz"),
                                 "-o", str(out), "--search", "none", "--json", "-q"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)  # the whole JSON document, flushed before the exit
    assert summary["output"] == str(out)
    from regkl.io import load_volume

    assert load_volume(out).shape == load_volume(repo / "sub-01_T1w.nii.gz").shape
    bad = subprocess.run(entry + ["register", str(tmp_path / "missing.nii"), str(repo / "sub-01_T1w.nii.gz")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.nii" in bad.stderr and bad.stdout == ""
    version = subprocess.run(entry + ["--version"], capture_output=True, text=True)
    assert version.returncode == 0 and "regkl" in version.stdout
