#!/usr/bin/env python
"""Rigid EPI -> anatomical registration benchmark: regkl against SimpleITK, ANTs, elastix and DIPY.

Every tool runs in this one process on the same image pairs:

* synthetic EPI -> T1 pairs built by :mod:`regkl.synthetic` with a known random rigid transform
  (error = RMS distance in mm between the estimated and the true ``fixed2moving`` over brain points);
* the real b0 EPI -> T2w pair, unperturbed and with known rigid perturbations of the EPI header
  (error = self-consistency: RMS distance between ``P @ unperturbed result`` and the perturbed result
  over the T2w head voxels; also reported against regkl's unperturbed result).

Only the registration call is timed (image conversion and file writing happen before the clock
starts). The whole ``regkl register`` command line is timed separately in a subprocess.

Run ``python benchmarks/bench_rigid.py --help``; see benchmarks/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import regkl  # noqa: F401  (first: sets OPENBLAS_NUM_THREADS=1 / OMP_WAIT_POLICY=PASSIVE before numpy loads)

import numpy as np

from regkl import synthetic
from regkl.io import load_volume
from regkl.sitk_images import LPS_RAS, array_to_sitk
from regkl.writers import save_volume
from regkl.optimize import register
from regkl.volume import Volume
from regkl.xfm import load_transform, lps_to_ras, read_itk

ALL_TOOLS = ("regkl", "sitk", "ants", "elastix", "dipy")

#: Synthetic pairs: largest rotation per axis (deg) and translation per axis (mm) of the truth.
SYN_MAX_ROT_DEG, SYN_MAX_TRANS_MM = 20.0, 20.0
#: Real pair: largest perturbation of the EPI header per axis.
REAL_MAX_ROT_DEG, REAL_MAX_TRANS_MM = 15.0, 15.0
#: Success thresholds (mm).
SYN_OK_MM = 0.5
REAL_OK_MM = (0.3, 2.0)
#: Head voxels of the real fixed image: intensity above this fraction of its 99th percentile.
HEAD_FRACTION_OF_P99 = 0.1
#: Most points used for the real-pair RMS (random subset of the head voxels, fixed seed).
MAX_HEAD_POINTS = 50000

REAL_DIR = "real_b0_t2w"


# ------------------------------------------------------------------------------------------------
# Small helpers
# ------------------------------------------------------------------------------------------------


def vox2lps_parts(vox2ras: np.ndarray):
    """(origin (3,), spacing (3,), direction (3, 3)) of a RAS vox2ras in ITK's LPS physical space."""
    lps = LPS_RAS @ np.asarray(vox2ras, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    return lps[:3, 3].copy(), spacing, lps[:3, :3] / spacing


def probe_lps_matrix(transform_point) -> np.ndarray:
    """4x4 matrix of a linear map given by a point-mapping function (LPS in, LPS out)."""
    basis = np.vstack([np.zeros(3), np.eye(3)]) * 100.0
    mapped = np.array([transform_point(tuple(float(x) for x in p)) for p in basis], dtype=np.float64)
    m = np.eye(4)
    m[:3, 3] = mapped[0]
    m[:3, :3] = (mapped[1:] - mapped[0]).T / 100.0
    probe = np.array([37.0, -91.0, 53.0])
    got = np.asarray(transform_point(tuple(probe)), dtype=np.float64)
    if not np.allclose(got, m[:3, :3] @ probe + m[:3, 3], atol=1e-3):
        raise RuntimeError("tool returned a non-linear transform")
    return m


def summary_stats(values):
    finite = [v for v in values if math.isfinite(v)]
    return {
        "n": len(values),
        "failed": len(values) - len(finite),
        "median": statistics.median(values) if values else float("nan"),
        "max": max(values) if values else float("nan"),
    }


def fmt(x, digits=2):
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:.{digits}f}"


# ------------------------------------------------------------------------------------------------
# Tools. Each has prepare(moving, fixed, workdir) -> opaque inputs (untimed) and run(inputs) -> 4x4
# RAS fixed2moving (timed).
# ------------------------------------------------------------------------------------------------


class Tool:
    name = "?"
    note = ""
    #: (module to import, package name for the message), or None when nothing optional is needed.
    requires = None

    def available(self):
        """None when usable, else the reason it is skipped."""
        if self.requires is None:
            return None
        module, package = self.requires
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return f"{package} not importable ({exc})"
        return None

    def prepare(self, moving: Volume, fixed: Volume, workdir: Path):
        return moving, fixed

    def run(self, inputs) -> np.ndarray:
        raise NotImplementedError


class RegklTool(Tool):
    name = "regkl"

    @property
    def note(self):
        import inspect

        keys = ("model", "metric", "bins", "sampling", "levels", "init", "search", "seed", "max_iter")
        params = inspect.signature(register).parameters
        defaults = ", ".join(f"{k}={params[k].default!r}" for k in keys if k in params)
        return f"regkl.optimize.register(moving, fixed) with the library defaults ({defaults})"

    def run(self, inputs):
        moving, fixed = inputs
        return register(moving, fixed).fixed2moving


class SitkTool(Tool):
    name = "sitk"
    note = ("ImageRegistrationMethod: Mattes MI 50 bins, RANDOM 20% sampling (seeded), linear interpolator, "
            "GradientDescent(lr 1.0, 100 it, conv. 1e-6 / window 10) with scales from physical shift, "
            "shrink [4,2,1], smoothing [2,1,0] mm, CenteredTransformInitializer(Euler3D, MOMENTS)")

    requires = ("SimpleITK", "SimpleITK")

    def prepare(self, moving, fixed, workdir):
        import SimpleITK as sitk

        return (sitk.Cast(array_to_sitk(moving.data, moving.vox2ras), sitk.sitkFloat32),
                sitk.Cast(array_to_sitk(fixed.data, fixed.vox2ras), sitk.sitkFloat32))

    def optimizer(self, reg):
        reg.SetOptimizerAsGradientDescent(learningRate=1.0, numberOfIterations=100,
                                          convergenceMinimumValue=1e-6, convergenceWindowSize=10)

    def run(self, inputs):
        import SimpleITK as sitk

        moving, fixed = inputs
        init = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                 sitk.CenteredTransformInitializerFilter.MOMENTS)
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(0.2, 1)
        reg.SetInterpolator(sitk.sitkLinear)
        self.optimizer(reg)
        reg.SetOptimizerScalesFromPhysicalShift()
        reg.SetShrinkFactorsPerLevel(shrinkFactors=[4, 2, 1])
        reg.SetSmoothingSigmasPerLevel(smoothingSigmas=[2, 1, 0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        reg.SetInitialTransform(init, inPlace=False)
        tx = reg.Execute(fixed, moving)
        return lps_to_ras(probe_lps_matrix(tx.TransformPoint))


class SitkRsgdTool(SitkTool):
    name = "sitk-rsgd"
    note = ("optional variant of 'sitk' (not run by default): the same set-up with "
            "RegularStepGradientDescent(learningRate 2.0, minStep 1e-4, 200 it, gradient tolerance 1e-8)")

    def optimizer(self, reg):
        reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-4, numberOfIterations=200,
                                                     gradientMagnitudeTolerance=1e-8)


class AntsTool(Tool):
    name = "ants"
    note = ("antspyx ants.registration(fixed, moving, type_of_transform='Rigid') with its defaults "
            "(Mattes 32 bins, regular 20% sampling, Rigid[0.25], 2100x1200x1200x10 it, shrink 6x4x2x1, "
            "smoothing 3x2x1x0 vox, centre-of-mass start); images from "
            "ants.from_numpy with LPS origin/spacing/direction; result read from fwdtransforms[0]")

    requires = ("ants", "antspyx")

    def prepare(self, moving, fixed, workdir):
        import ants

        def conv(vol):
            origin, spacing, direction = vox2lps_parts(vol.vox2ras)
            return ants.from_numpy(np.ascontiguousarray(vol.data, dtype=np.float32), origin=tuple(origin),
                                   spacing=tuple(spacing), direction=np.ascontiguousarray(direction))

        return conv(moving), conv(fixed), workdir

    def run(self, inputs):
        import ants

        moving, fixed, workdir = inputs
        prefix = tempfile.mkdtemp(dir=workdir, prefix="ants_") + "/"
        out = ants.registration(fixed, moving, type_of_transform="Rigid", outprefix=prefix)
        return read_itk(out["fwdtransforms"][0])


class ElastixTool(Tool):
    name = "elastix"
    note = ("itk-elastix ElastixRegistrationMethod with the default 'rigid' parameter map (Euler, "
            "Mattes MI, ASGD 256 it, 4 resolutions, 2048 random samples, no automatic initialisation: "
            "starts from the headers, writes the B-spline resampled result image), "
            "log to console off, default threads; transform from GetCombinationTransform()")

    def available(self):
        try:
            import itk

            itk.ElastixRegistrationMethod  # noqa: B018  (lazy module load)
        except (ImportError, AttributeError) as exc:
            return f"itk-elastix not importable ({exc})"
        return None

    def prepare(self, moving, fixed, workdir):
        import itk

        def conv(vol):
            origin, spacing, direction = vox2lps_parts(vol.vox2ras)
            img = itk.GetImageFromArray(np.ascontiguousarray(vol.data.transpose(2, 1, 0), dtype=np.float32))
            img.SetOrigin(origin.tolist())
            img.SetSpacing(spacing.tolist())
            img.SetDirection(itk.GetMatrixFromArray(np.ascontiguousarray(direction)))
            return img

        return conv(moving), conv(fixed)

    def run(self, inputs):
        import itk

        moving, fixed = inputs
        params = itk.ParameterObject.New()
        params.AddParameterMap(params.GetDefaultParameterMap("rigid"))
        reg = itk.ElastixRegistrationMethod.New(fixed, moving)
        reg.SetParameterObject(params)
        reg.SetLogToConsole(False)
        reg.UpdateLargestPossibleRegion()
        tx = reg.ConvertToItkTransform(reg.GetCombinationTransform())
        return lps_to_ras(probe_lps_matrix(lambda p: tx.TransformPoint(p)))


class DipyTool(Tool):
    name = "dipy"
    note = ("AffineRegistration(MutualInformationMetric(nbins=32, sampling_proportion=None), "
            "level_iters [1000,100,10], sigmas [3,1,0] vox, factors [4,2,1]), RigidTransform3D, "
            "started from transform_centers_of_mass")

    requires = ("dipy.align.imaffine", "dipy")

    def prepare(self, moving, fixed, workdir):
        return (np.asarray(moving.data, dtype=np.float64), moving.vox2ras.copy(),
                np.asarray(fixed.data, dtype=np.float64), fixed.vox2ras.copy())

    def run(self, inputs):
        from dipy.align.imaffine import AffineRegistration, MutualInformationMetric, transform_centers_of_mass
        from dipy.align.transforms import RigidTransform3D

        moving, moving_v2r, fixed, fixed_v2r = inputs
        com = transform_centers_of_mass(fixed, fixed_v2r, moving, moving_v2r)
        affreg = AffineRegistration(metric=MutualInformationMetric(nbins=32, sampling_proportion=None),
                                    level_iters=[1000, 100, 10], sigmas=[3.0, 1.0, 0.0], factors=[4, 2, 1],
                                    verbosity=0)
        out = affreg.optimize(fixed, moving, RigidTransform3D(), None, fixed_v2r, moving_v2r,
                              starting_affine=com.affine)
        # DIPY's AffineMap.affine maps static (fixed) world points to moving world points (RAS).
        return np.asarray(out.affine, dtype=np.float64)


TOOLS = {t.name: t for t in (RegklTool(), SitkTool(), AntsTool(), ElastixTool(), DipyTool(), SitkRsgdTool())}


def timed_run(tool: Tool, moving: Volume, fixed: Volume, workdir: Path):
    """(fixed2moving or None, seconds, message). Preparation is not timed."""
    try:
        inputs = tool.prepare(moving, fixed, workdir)
    except Exception as exc:  # noqa: BLE001 - report, never crash
        return None, float("nan"), f"prepare failed: {type(exc).__name__}: {exc}"
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = tool.run(inputs)
        seconds = time.perf_counter() - t0
        m = np.asarray(m, dtype=np.float64)
        if m.shape != (4, 4) or not np.all(np.isfinite(m)):
            return None, seconds, f"bad result matrix {m.shape}"
        return m, seconds, ""
    except Exception as exc:  # noqa: BLE001
        seconds = time.perf_counter() - t0
        tb = traceback.format_exc(limit=2).strip().splitlines()[-1]
        return None, seconds, f"{type(exc).__name__}: {str(exc)[:200] or tb}"


# ------------------------------------------------------------------------------------------------
# Pairs
# ------------------------------------------------------------------------------------------------


def synthetic_pairs(n: int, seed: int):
    """[(label, moving, fixed, true fixed2moving)], plus the brain points used for the error."""
    template = synthetic.load_template()
    fixed = synthetic.make_t1(template)
    points = synthetic.brain_points(template)
    centre = points.mean(axis=0)
    pairs = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        truth = synthetic.random_rigid(rng, SYN_MAX_ROT_DEG, SYN_MAX_TRANS_MM, centre)
        moving = synthetic.make_epi(template, truth, rng)
        pairs.append((f"syn{i:02d}", moving, fixed, truth))
    return pairs, points, template


def real_pair(shared: Path, n_perturb: int, seed: int):
    """Unperturbed moving, fixed, [(label, perturbation P)], head points of the fixed image."""
    moving = load_volume(shared / REAL_DIR / "b0_epi.nii.gz")
    fixed = load_volume(shared / REAL_DIR / "T2w.nii.gz")
    data = fixed.data
    thr = HEAD_FRACTION_OF_P99 * float(np.percentile(data, 99.0))
    idx = np.argwhere(data > thr).astype(np.float64)
    rng = np.random.default_rng([seed, 1000])
    if len(idx) > MAX_HEAD_POINTS:
        idx = idx[rng.choice(len(idx), MAX_HEAD_POINTS, replace=False)]
    points = fixed.world_coords(idx)
    centre = moving.centre_of_mass()
    perts = [("real-0", np.eye(4))]
    for i in range(n_perturb):
        perts.append((f"real{i + 1:02d}", synthetic.random_rigid(rng, REAL_MAX_ROT_DEG, REAL_MAX_TRANS_MM, centre)))
    return moving, fixed, perts, points


def perturbed(moving: Volume, p: np.ndarray) -> Volume:
    return Volume(moving.data, p @ moving.vox2ras, name=moving.name + " (perturbed)")


def perturbation_size(p: np.ndarray):
    """(rotation angle deg, translation norm mm at the origin-free centre) of a rigid matrix."""
    angle = math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(p[:3, :3]) - 1.0) / 2.0))))
    return angle, float(np.linalg.norm(p[:3, 3]))


# ------------------------------------------------------------------------------------------------
# Command-line timing
# ------------------------------------------------------------------------------------------------


def regkl_executable():
    cand = Path(sys.executable).parent / "regkl"
    if cand.exists():
        return [str(cand)]
    found = shutil.which("regkl")
    return [found] if found else [sys.executable, "-m", "regkl.cli"]


def time_cli(pair, points, workdir: Path, repeats: int):
    label, moving, fixed, truth = pair
    d = workdir / "cli"
    d.mkdir(exist_ok=True)
    mpath, fpath = d / "epi.nii.gz", d / "t1.nii.gz"
    save_volume(moving, mpath)
    template_file = Path(synthetic.load_template().t1.name)
    if template_file.is_file() and np.array_equal(load_volume(template_file).data, fixed.data):
        shutil.copyfile(template_file, fpath)  # the template file itself (uint8), as a T1 comes from disk
    else:
        save_volume(fixed, fpath)
    cmd = regkl_executable() + ["register", str(mpath), str(fpath), "-o", str(d / "out.nii.gz"),
                                "--transform-out", str(d / "x.tfm"), "-q"]
    times, cpus, errors, fails = [], [], [], []
    for rep in range(repeats + 1):
        for f in (d / "out.nii.gz", d / "x.tfm"):
            if f.exists():
                f.unlink()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        dt = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        if proc.returncode != 0:
            fails.append(f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
            continue
        err = synthetic.rms_error(load_transform(d / "x.tfm"), truth, points)
        if rep > 0:  # the first run is the warm-up
            times.append(dt)
            cpus.append(cpu)
            errors.append(err)
    return {
        "pair": label, "moving_shape": list(moving.shape), "moving_voxel_mm": moving.spacing.round(3).tolist(),
        "fixed_shape": list(fixed.shape), "fixed_voxel_mm": fixed.spacing.round(3).tolist(),
        "command": " ".join(["regkl"] + cmd[1:] if cmd[0].endswith("regkl") else cmd),
        "repeats": repeats, "seconds": times, "median_seconds": statistics.median(times) if times else None,
        "cpu_seconds": cpus, "median_cpu_seconds": statistics.median(cpus) if cpus else None,
        "rms_mm": errors, "failures": fails,
    }


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=None, help="synthetic pairs (default 10; 3 with --quick)")
    ap.add_argument("--perturbations", type=int, default=None,
                    help="real-pair header perturbations (default 10; 3 with --quick)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 synthetic pairs, 3 perturbations")
    ap.add_argument("--tools", default=",".join(ALL_TOOLS),
                    help=f"comma list from {','.join(TOOLS)} (default: {','.join(ALL_TOOLS)})")
    ap.add_argument("--seed", type=int, default=2024, help="seed of the synthetic truths and perturbations")
    ap.add_argument("--cli-repeats", type=int, default=5, help="timed regkl command-line runs (after 1 warm-up)")
    ap.add_argument("--warmup-all", action="store_true",
                    help="one untimed warm-up run for every tool (default: regkl only)")
    ap.add_argument("--no-cli", action="store_true", help="skip the command-line timing")
    ap.add_argument("--no-real", action="store_true", help="skip the real pair")
    ap.add_argument("--shared", default=None, help="shared data folder (default: regkl.synthetic's)")
    ap.add_argument("--json", default=None, help="write every run and the summary to this JSON file")
    args = ap.parse_args(argv)
    if args.pairs is None:
        args.pairs = 3 if args.quick else 10
    if args.perturbations is None:
        args.perturbations = 3 if args.quick else 10
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [t for t in tools if t not in TOOLS]
    if bad:
        ap.error(f"unknown tool(s) {bad}; choose from {','.join(TOOLS)}")
    args.tools = tools
    return args


def say(msg=""):
    print(msg, flush=True)


def git_state():
    """'<commit> (+ uncommitted changes in regkl/)' of the source tree regkl is imported from."""
    root = Path(regkl.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "regkl"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + (" + uncommitted changes in regkl/" if dirty else "")) if head else None


def machine_info():
    import numba

    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "platform": platform.platform(), "cpus": os.cpu_count(), "numba_threads": numba.config.NUMBA_NUM_THREADS}
    versions = {}
    for mod, name in (("numpy", "numpy"), ("SimpleITK", "SimpleITK"), ("ants", "antspyx"), ("itk", "itk"),
                      ("dipy", "dipy"), ("numba", "numba")):
        try:
            versions[name] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            versions[name] = None
    info["versions"] = versions
    info["env"] = {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY", "NUMBA_NUM_THREADS",
                                                  "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")}
    info["git"] = git_state()
    info["loadavg_start"] = os.getloadavg()
    return info


def main(argv=None):
    args = parse_args(argv)
    info = machine_info()
    say(f"# bench_rigid  {info['date']}  {info['platform']}  cpus={info['cpus']}  python {info['python']}")
    say(f"# load average at start: {' '.join(f'{x:.2f}' for x in info['loadavg_start'])} "
        "(other processes on the machine inflate every time)")
    say(f"# regkl source: {info['git']}; env: " + ", ".join(f"{k}={v}" for k, v in info["env"].items()))
    say("# versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))

    tools = []
    for name in args.tools:
        reason = TOOLS[name].available()
        if reason:
            say(f"# SKIP {name}: {reason}")
        else:
            tools.append(TOOLS[name])
    if not tools:
        say("no tool available")
        return 2
    for t in tools:
        say(f"# {t.name}: {t.note}")

    records = []
    shared = Path(args.shared) if args.shared else synthetic.default_shared_dir()
    with tempfile.TemporaryDirectory(prefix="bench_rigid_") as tmp:
        workdir = Path(tmp)

        # ---- synthetic pairs ---------------------------------------------------------------
        t_gen = time.perf_counter()
        pairs, points, _ = synthetic_pairs(args.pairs, args.seed)
        say(f"# {len(pairs)} synthetic pairs: fixed {pairs[0][2].shape} 1 mm MNI T1, moving EPI "
            f"{pairs[0][1].shape} 3 mm; truth up to {SYN_MAX_ROT_DEG:g} deg / {SYN_MAX_TRANS_MM:g} mm per axis; "
            f"{len(points)} brain points; generated in {time.perf_counter() - t_gen:.1f} s")

        # Warm-up: one untimed run (regkl: Numba kernels loaded from the cache or compiled; with
        # --warmup-all every tool, which costs a minute or more each for the slow ones).
        for t in tools:
            if t.name != "regkl" and not args.warmup_all:
                continue
            _, sec, msg = timed_run(t, pairs[0][1], pairs[0][2], workdir)
            say(f"# warm-up {t.name}: {fmt(sec)} s {msg}")

        say("")
        say(f"{'set':<5} {'pair':<7} {'tool':<8} {'seconds':>8} {'err_mm':>8}  note")
        for label, moving, fixed, truth in pairs:
            for t in tools:
                m, sec, msg = timed_run(t, moving, fixed, workdir)
                err = synthetic.rms_error(m, truth, points) if m is not None else float("inf")
                records.append({"set": "synthetic", "pair": label, "tool": t.name, "seconds": sec,
                                "error_mm": err, "message": msg,
                                "fixed2moving": None if m is None else m.tolist()})
                say(f"{'syn':<5} {label:<7} {t.name:<8} {fmt(sec):>8} {fmt(err, 3):>8}  {msg}")

        # ---- real pair ---------------------------------------------------------------------
        if not args.no_real:
            moving0, fixed, perts, head = real_pair(shared, args.perturbations, args.seed)
            say("")
            say(f"# real pair: moving {moving0.shape} b0 EPI, fixed {fixed.shape} T2w; {len(head)} head points "
                f"(> {HEAD_FRACTION_OF_P99:g} x 99th percentile); {len(perts) - 1} perturbations up to "
                f"{REAL_MAX_ROT_DEG:g} deg / {REAL_MAX_TRANS_MM:g} mm per axis")
            say(f"{'set':<5} {'pair':<7} {'tool':<8} {'seconds':>8} {'self_mm':>8} {'vs_regkl':>8}  note")
            unpert = {}
            for label, p in perts:
                ang, tr = perturbation_size(p)
                moving = perturbed(moving0, p) if label != "real-0" else moving0
                for t in tools:
                    m, sec, msg = timed_run(t, moving, fixed, workdir)
                    if label == "real-0":
                        unpert[t.name] = m
                        self_err = 0.0 if m is not None else float("inf")
                    else:
                        ref = unpert.get(t.name)
                        self_err = (synthetic.rms_error(m, p @ ref, head)
                                    if m is not None and ref is not None else float("inf"))
                    ref_r = unpert.get("regkl")
                    vs_regkl = (synthetic.rms_error(m, p @ ref_r, head)
                                if m is not None and ref_r is not None else float("inf"))
                    if "regkl" not in unpert:
                        vs_regkl = None
                    records.append({"set": "real", "pair": label, "tool": t.name, "seconds": sec,
                                    "error_mm": self_err, "vs_regkl_mm": vs_regkl, "message": msg,
                                    "perturbation_deg": ang, "perturbation_mm": tr,
                                    "fixed2moving": None if m is None else m.tolist()})
                    say(f"{'real':<5} {label:<7} {t.name:<8} {fmt(sec):>8} {fmt(self_err, 3):>8} "
                        f"{fmt(vs_regkl, 3):>8}  {msg}")

        # ---- command line ------------------------------------------------------------------
        cli = None
        if not args.no_cli and "regkl" in [t.name for t in tools]:
            cli = time_cli(pairs[0], points, workdir, args.cli_repeats)

    info["loadavg_end"] = os.getloadavg()
    summary = summarise(records, tools, cli)
    say(f"\n# load average at end: {' '.join(f'{x:.2f}' for x in info['loadavg_end'])}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": info, "args": {k: v for k, v in vars(args).items()}, "records": records,
                       "summary": summary, "cli": cli, "tool_setups": {t.name: t.note for t in tools}},
                      fh, indent=1, default=float)
        say(f"\n# wrote {args.json}")
    return 0


def summarise(records, tools, cli):
    out = {}
    say("")
    say("## Summary")
    for set_name, thresholds in (("synthetic", (SYN_OK_MM,)), ("real", REAL_OK_MM)):
        recs = [r for r in records if r["set"] == set_name]
        if not recs:
            continue
        label = "error = RMS vs truth over brain points" if set_name == "synthetic" else \
            "error = self-consistency RMS over head points (perturbed runs only)"
        say(f"\n### {set_name} ({label})")
        head = f"{'tool':<8} {'runs':>4} {'fail':>4} {'med_err':>8} {'max_err':>8} "
        head += " ".join(f"{'<' + format(th, 'g') + 'mm':>7}" for th in thresholds)
        if set_name == "real":
            head += f" {'med_vs_regkl':>12} {'unpert_vs_regkl':>15}"
        head += f" {'med_s':>7} {'x_regkl':>7}"
        say(head)
        regkl_times = [r["seconds"] for r in recs if r["tool"] == "regkl" and math.isfinite(r["seconds"])]
        regkl_med = statistics.median(regkl_times) if regkl_times else None
        out[set_name] = {}
        for t in tools:
            rt = [r for r in recs if r["tool"] == t.name]
            times = [r["seconds"] for r in rt if math.isfinite(r["seconds"])]
            scored = [r for r in rt if r["pair"] != "real-0"]
            errs = [r["error_mm"] for r in scored]
            st = summary_stats(errs)
            fr = [sum(e < th for e in errs) / len(errs) if errs else float("nan") for th in thresholds]
            med_t = statistics.median(times) if times else float("nan")
            ratio = med_t / regkl_med if regkl_med else float("nan")
            fails = sum(1 for r in rt if r["message"])
            row = f"{t.name:<8} {len(rt):>4} {fails:>4} {fmt(st['median'], 3):>8} {fmt(st['max'], 3):>8} "
            row += " ".join(f"{fmt(f, 2):>7}" for f in fr)
            entry = {"runs": len(rt), "failures": fails, "median_error_mm": st["median"], "max_error_mm": st["max"],
                     "fraction_below": dict(zip([str(th) for th in thresholds], fr)),
                     "median_seconds": med_t, "time_ratio_vs_regkl": ratio}
            if set_name == "real":
                vs = [r["vs_regkl_mm"] for r in scored if r.get("vs_regkl_mm") is not None]
                med_vs = statistics.median(vs) if vs else None
                u = [r.get("vs_regkl_mm") for r in rt if r["pair"] == "real-0"]
                u = u[0] if u else None
                row += f" {fmt(med_vs, 3):>12} {fmt(u, 3):>15}"
                entry["median_vs_regkl_mm"] = med_vs
                entry["unperturbed_vs_regkl_mm"] = u
            row += f" {fmt(med_t, 2):>7} {fmt(ratio, 1):>7}"
            say(row)
            out[set_name][t.name] = entry
    if cli is not None:
        say("\n### regkl command line (subprocess, includes start-up, loading, writing)")
        say(f"pair {cli['pair']}: moving {tuple(cli['moving_shape'])} at {cli['moving_voxel_mm']} mm, fixed "
            f"{tuple(cli['fixed_shape'])} at {cli['fixed_voxel_mm']} mm")
        say(f"command: {cli['command']}")
        say("runs (s): " + ", ".join(fmt(s, 2) for s in cli["seconds"]) + "  (after 1 warm-up)")
        say("child CPU user+sys (s): " + ", ".join(fmt(s, 2) for s in cli["cpu_seconds"])
            + f"  (median {fmt(cli['median_cpu_seconds'], 2)}; less sensitive to other load than wall time)")
        med = cli["median_seconds"]
        verdict = "PASS" if med is not None and med < 2.0 else "FAIL"
        say(f"median wall: {fmt(med, 2)} s  (target < 2 s: {verdict}); RMS error of the written .tfm: "
            + ", ".join(fmt(e, 3) for e in cli["rms_mm"][:1]) + " mm")
        if cli["failures"]:
            say("failures: " + " | ".join(cli["failures"]))
        out["cli"] = {"median_seconds": med, "target_met": verdict == "PASS"}
    return out


if __name__ == "__main__":
    sys.exit(main())
