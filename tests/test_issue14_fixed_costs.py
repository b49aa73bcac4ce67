"""Issue 14, fixed costs of a command: work skipped must never change an answer.

The ITK placement check answers from the header alone when the sform and qform agree; SimpleITK
must agree with every such answer (random oblique headers, both qfac signs, float32 rounding).
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from regkl import itk_placement
from regkl.io import load_volume
from regkl.itk_placement import ITK_PLACEMENT_TOL_MM, check_itk_placement, forms_agree, itk_placement_gap


def _rotation(rng, max_deg):
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    a = np.deg2rad(rng.uniform(-max_deg, max_deg))
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    return np.eye(3) + np.sin(a) * k + (1.0 - np.cos(a)) * (k @ k)


def _header_cases(folder, rng):
    """(path, sform, qform or None, codes) for random obliques with both forms set alike, slightly
    apart (float32 rounding of a perturbed qform), far apart, and one form only."""
    cases = []
    for i in range(24):
        shape = tuple(int(s) for s in rng.integers(4, 12, 3))
        zooms = rng.uniform(0.7, 3.5, 3)
        flip = np.diag([(-1.0 if rng.random() < 0.5 else 1.0), 1.0, 1.0])  # qfac -1 half the time
        lin = _rotation(rng, 180.0 if i % 3 == 0 else 25.0) @ flip @ np.diag(zooms)
        sform = np.eye(4)
        sform[:3, :3] = lin
        sform[:3, 3] = rng.uniform(-90, 90, 3)
        kind = ("same", "rounded", "apart", "sform only", "qform only", "sheared")[i % 6]
        qform = sform.copy()
        if kind == "rounded":
            qform[:3, 3] += rng.uniform(-1e-3, 1e-3, 3)
        elif kind == "apart":
            qform[:3, 3] += rng.uniform(0.5, 3.0, 3)
        elif kind == "sheared":
            sform = sform.copy()
            sform[0, 1] += 0.2
        img = nib.Nifti1Image(rng.random(shape).astype(np.float32), None)
        img.header.set_qform(qform, code=0 if kind == "sform only" else 1)
        img.header.set_sform(sform, code=0 if kind == "qform only" else 2)
        path = folder / f"case{i:02d}_{kind.replace(' ', '_')}.nii.gz"
        nib.save(img, str(path))
        cases.append((path, kind))
    return cases


def test_header_answer_agrees_with_simpleitk(tmp_path):
    """Whenever the header alone says ITK and regkl place an image alike, SimpleITK does; the
    headers it does not vouch for include every kind that SimpleITK can move."""
    rng = np.random.default_rng(14)
    vouched = {}
    for path, kind in _header_cases(tmp_path, rng):
        vol = load_volume(path, allow_constant=True)
        gap = itk_placement_gap(path, vol.vox2ras, vol.shape)
        assert gap is not None, path
        if forms_agree(vol):
            assert gap <= ITK_PLACEMENT_TOL_MM, (path, gap)
            vouched[kind] = vouched.get(kind, 0) + 1
        else:
            assert kind not in ("same", "rounded"), (path, gap)
    assert set(vouched) == {"same", "rounded"}, vouched


def test_consistent_header_skips_simpleitk(tmp_path, monkeypatch):
    """A consistent header is checked without asking SimpleITK; an inconsistent one still is, and is
    refused."""
    rng = np.random.default_rng(3)
    cases = dict((kind, path) for path, kind in _header_cases(tmp_path, rng))
    asked = []
    real = itk_placement.itk_vox2ras
    monkeypatch.setattr(itk_placement, "itk_vox2ras", lambda p: asked.append(p) or real(p))
    check_itk_placement([load_volume(cases["same"], allow_constant=True)], "write an ITK transform")
    assert asked == []
    with pytest.raises(Exception, match="ITK, ANTs and SimpleITK place this image"):
        check_itk_placement([load_volume(cases["apart"], allow_constant=True)], "write an ITK transform")
    assert asked == [str(cases["apart"])] or asked == [cases["apart"]]


BLAS_SCRIPT = """
import numpy  # first, as a library user's script does: OpenBLAS keeps its threads
import regkl
from threadpoolctl import threadpool_info
seen = []
def log(msg):
    seen.extend(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")
data = "{data}"
regkl.register(data + "/sub-01_bold.nii.gz", data + "/sub-01_T1w.nii.gz", search="none", levels=1, max_iter=3,
               log=log)
outside = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
print(regkl.BLAS_SINGLE_THREADED, max(seen), min(outside))
"""


def test_register_limits_blas_threads_when_numpy_came_first():
    """With numpy imported before regkl (OPENBLAS_NUM_THREADS not set), L-BFGS-B's tiny BLAS calls
    ran on every core and left spinning threads: a registration took 4x longer on a busy
    machine. register() now keeps BLAS to one thread while it runs, and restores it after."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    data = Path(__file__).resolve().parents[1] / "data"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    env["OPENBLAS_NUM_THREADS"] = "2"  # what a 2-core machine gives by default, made explicit
    proc = subprocess.run([sys.executable, "-c", BLAS_SCRIPT.format(data=data)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    single, during, after = proc.stdout.split()
    assert single == "False" and int(during) == 1 and int(after) == 2, proc.stdout


@pytest.mark.parametrize("units", ["micron", "meter"])
def test_header_in_microns_or_metres_is_asked_and_refused(tmp_path, units):
    """ITK scales voxel sizes by the header's spatial units; regkl and nibabel do not. Forms that
    agree do not vouch for such a header (attacker finding: a .tfm for a micron T1 was written and
    placed the image 200 mm off in SimpleITK); SimpleITK is asked, and the message names the units."""
    img = nib.Nifti1Image(np.random.default_rng(0).random((8, 9, 10)).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1]))
    img.header.set_xyzt_units(units)
    path = tmp_path / f"units_{units}.nii.gz"
    nib.save(img, str(path))
    vol = load_volume(path, allow_constant=True)
    assert not forms_agree(vol)
    assert itk_placement_gap(path, vol.vox2ras, vol.shape) > ITK_PLACEMENT_TOL_MM
    with pytest.raises(Exception, match="xyzt_units") as exc:
        check_itk_placement([vol], "write an ITK transform")
    assert {"micron": "microns", "meter": "metres"}[units] in str(exc.value)


OVERLAP_SCRIPT = """
import numpy
import regkl
from regkl.optimize import _one_blas_thread
from threadpoolctl import threadpool_info
def blas():
    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
a, b = _one_blas_thread(), _one_blas_thread()
seen = [max(blas())]
a.__enter__(); seen.append(max(blas()))
b.__enter__(); a.__exit__(None, None, None); seen.append(max(blas()))  # b still runs
b.__exit__(None, None, None); seen.append(min(blas()))
print(*seen)
"""


def test_overlapping_registrations_share_the_blas_limit():
    """Two registrations in threads of one process: the first sets BLAS to one thread, the second
    keeps it until it ends, and then the user's setting comes back (attacker finding: the second
    restored the first one's limit of 1 for the rest of the process)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    env["OPENBLAS_NUM_THREADS"] = "2"
    proc = subprocess.run([sys.executable, "-c", OVERLAP_SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "1", "1", "2"], proc.stdout


def test_unknown_command_suggests_the_close_one(capfd):
    """Subcommands load lazily; a mistyped one is still answered with the command meant."""
    from regkl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["regster"])
    assert exc.value.code == 2
    assert "Did you mean 'register'?" in capfd.readouterr().err
