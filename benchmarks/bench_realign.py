#!/usr/bin/env python
"""Head-motion correction benchmark: `regkl realign` against antspyx `motion_correction`.

Series with KNOWN motion (:mod:`regkl.synthetic_motion`): one still volume (the real b0 EPI, or a
synthetic EPI rendered from the MNI template for every pose) seen through per-volume rigid
transforms from realistic traces (drifts up to 2 mm / 2 deg, spikes up to 8 mm / 6 deg in a few
volumes), with Rician noise, a global gain and a smooth activation pattern changing per volume.
Error of a volume = RMS displacement (mm) over the brain between the estimated and the true
transform, after fitting the one rigid frame that relates each tool's reference to the source
(:func:`regkl.synthetic_motion.motion_errors`; the same fit for every tool).

Also times the whole `regkl realign` command (subprocess: start-up, reading, estimation,
parameters, transforms, boldref; no series output) on a 200-volume 64x64x36 series: the median of
``--repeats`` runs (default 5) with the machine's load beside each (the machine may be shared), and
a breakdown by phase (``--timing-only`` skips the accuracy series).

Run ``python benchmarks/bench_realign.py --help``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import regkl  # noqa: F401  (first: thread settings before numpy loads)

import numpy as np

from regkl import synthetic
from regkl import synthetic_motion as sm
from regkl.io import load_volume
from regkl.realign import realign
from regkl.xfm import load_transform

SHARED = Path(os.environ.get("REGKL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def make_series(kind: str, seed: int, n: int, shape=None):
    """(volumes, true source2volume, brain points) of one benchmark series."""
    rng = np.random.default_rng(seed)
    if kind == "b0":
        b0 = load_volume(SHARED / "real_b0_t2w" / "b0_epi.nii.gz")
        vols, mats, _ = sm.motion_series(b0, rng, n, centre=b0.centre_of_mass(), n_spikes=max(3, n // 25))
        return vols, mats, sm.brain_points_of(b0)
    template = synthetic.load_template(SHARED)
    centre = synthetic.brain_points(template, 4).mean(axis=0)
    vols, mats, _ = sm.motion_series(template, rng, n, centre=centre, shape=shape, n_spikes=max(3, n // 25))
    return vols, mats, synthetic.brain_points(template, step_vox=3)


def save_series(vols, path, tr=2.0):
    import nibabel as nib

    img = nib.Nifti1Image(np.stack([v.data for v in vols], axis=-1), vols[0].vox2ras)
    img.header.set_zooms(tuple(vols[0].spacing) + (tr,))
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def run_ants(series_path):
    """(ref2volume (T, 4, 4) RAS, seconds) from ants.motion_correction(type_of_transform='Rigid')."""
    import ants

    img = ants.image_read(str(series_path))
    t0 = time.perf_counter()
    out = ants.motion_correction(img, type_of_transform="Rigid")
    seconds = time.perf_counter() - t0
    mats = []
    for files in out["motion_parameters"]:
        mats.append(load_transform(files[0] if isinstance(files, (list, tuple)) else files))
    return np.stack(mats), seconds


def stats(err):
    return f"{np.median(err):8.3f} {np.percentile(err, 95):8.3f} {err.max():8.3f}"


def timing_series(n, tmp):
    """Path of an n-volume 64x64x36 float32 series with motion and noise (~107 MB .nii.gz for 200)."""
    vols, _, _ = make_series("epi", 99, n, shape=(64, 64, 36))
    path = Path(tmp) / "timing_bold.nii.gz"
    save_series(vols, path)
    return path


def time_command(path, threads, tmp, repeats=5):
    """[(seconds, 1-min load)] of the whole `regkl realign` command (a subprocess: start-up, imports,
    reading, estimation, parameters, transforms, boldref; no series output), after one warm-up run
    (Numba cache, page cache)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "regkl.cli", "realign", str(path), "--prefix", str(Path(tmp) / "timing"),
           "--threads", str(threads), "-q"]
    subprocess.run(cmd, check=True, env=env)
    times = []
    for _ in range(repeats):
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        times.append((time.perf_counter() - t0, load))
    return times


def time_phases(path, threads, tmp):
    """{phase: (wall seconds, CPU seconds of this process)} of one realignment of ``path``: imports (a
    fresh interpreter), the kernels' start-up, reading, the estimation, the rest of
    :func:`regkl.realign.realign` (reference, sample points, boldref) and writing."""
    from regkl.realign_files import load_series_for_realign, warm_up, write_outputs

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    code = ("import time; t = time.perf_counter(); c = time.process_time(); import regkl.cli, regkl.commands.realign, "
            "regkl.realign; print(time.perf_counter() - t, time.process_time() - c)")
    out = subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True, text=True).stdout
    phases = {"start-up and imports (fresh interpreter)": tuple(float(v) for v in out.split())}

    def timed(name, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        phases[name] = (time.perf_counter() - t0, time.process_time() - c0)
        return result

    timed("Numba kernels' start-up (the command overlaps it with reading)", warm_up)
    volumes, tr, _ = timed("read the series", lambda: load_series_for_realign(path))
    passes = []

    def log(message):
        if message.startswith("pass"):
            passes.append(float(message.rsplit(" in ", 1)[1].split()[0]))

    res = timed("realign(): reference, sample points, estimation, boldref",
                lambda: realign(volumes, threads=threads, log=log))
    phases["  of which the estimation (pass 1, wall)"] = (sum(passes), float("nan"))
    stem = Path(tmp) / "phases"
    timed("write parameters, transforms, boldref",
          lambda: write_outputs(res, volumes, confounds=f"{stem}_motion.tsv", xfm=f"{stem}_hmc_xfm.txt",
                                boldref=f"{stem}_boldref.nii.gz", like=volumes[0], zooms_t=tr, threads=threads))
    return phases


def register_comparison(n_series, n_volumes, threads, first_seed=500):
    """EPI -> T1 error (mm, brain RMS) of `regkl register` from the plain mean, from the realigned
    boldref (median of the realigned steady-state volumes), from the mean of the same realigned
    volumes and from their median resampled with cubic splines instead of trilinearly, on moving and on still synthetic series (MI, rigid, default settings); per kind, the
    paired differences against the plain mean (mean +- standard error over the series).

    Truth: a still series (every volume through one random rigid pose P) has P for every reference.
    In a moving series the realigned references are in the frame of the realignment's reference
    volume r (truth ``source2volume[r]``); the plain mean has no single frame, so its truth is the
    median pose (the rigid fit to the per-point median over volumes), the most favourable choice for it.
    """
    from regkl.optimize import register
    from regkl.realign import realigned_volumes
    from regkl.stack_kernels import median_of_volumes

    template = synthetic.load_template(SHARED)
    t1 = synthetic.make_t1(template)
    pts = synthetic.brain_points(template, step_vox=3)
    centre = pts.mean(axis=0)
    names = ("mean", "realigned", "realigned-mean", "realigned-cubic")
    rows = {}
    for i in range(n_series):
        for kind in ("moving", "still"):
            rng = np.random.default_rng(first_seed + i)
            pose = synthetic.random_rigid(rng, 5.0, 5.0, centre)
            trace = np.zeros((n_volumes, 6)) if kind == "still" else None
            vols, mats_fixed, _ = sm.motion_series(template, rng, n_volumes, centre=centre, trace=trace, pose=pose,
                                                   n_spikes=max(2, n_volumes // 25))
            res = realign(vols, threads=threads)
            r = int(res.reference.note.split()[1])
            keep = [t for t in range(len(vols)) if t >= res.n_non_steady]
            aligned = realigned_volumes([vols[t] for t in keep], res.boldref, res.ref2volume[keep], threads=threads)
            references = {"mean": vols[0].with_data(np.mean(np.stack([v.data for v in vols]), axis=0)),
                          "realigned": res.boldref,
                          "realigned-mean": res.boldref.with_data(np.mean(aligned, axis=0, dtype=np.float64)),
                          "realigned-cubic": res.boldref.with_data(median_of_volumes(realigned_volumes(
                              [vols[t] for t in keep], res.boldref, res.ref2volume[keep], interp="cubic",
                              threads=threads), threads))}
            median_pose = sm._kabsch(pts, np.median(np.stack([sm.apply_matrix(m, pts) for m in mats_fixed]), 0))
            truths = {name: mats_fixed[r] for name in names}
            truths["mean"] = median_pose
            for name in names:
                est = register(references[name], t1, seed=0).fixed2moving
                err = float(np.sqrt(np.mean(np.sum((sm.apply_matrix(est, pts) - sm.apply_matrix(truths[name], pts))
                                                   ** 2, axis=1))))
                rows.setdefault((kind, name), []).append(err)
                print(f"register {kind:6s} series {i}: --moving-volume {name:15s} error {err:.3f} mm", flush=True)
    for kind in ("moving", "still"):
        base = np.array(rows[(kind, "mean")])
        for name in names:
            errs = np.array(rows[(kind, name)])
            line = (f"register {kind:6s} {name:15s} median {np.median(errs):.3f} mean {errs.mean():.3f} "
                    f"max {errs.max():.3f} mm")
            if name != "mean":
                d = errs - base
                se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
                line += (f"; minus mean: {d.mean():+.3f} +- {se:.3f} mm (better on {int(np.sum(d < 0))} of "
                         f"{len(d)})")
            print(line + f" ({len(errs)} series of {n_volumes} volumes)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=100, help="volumes per accuracy series")
    ap.add_argument("--series", default="b0:1,epi:2,epi:3,b0:4", help="kind:seed list (kind b0 or epi)")
    ap.add_argument("--ants", type=int, default=1, help="run ANTs on the first N series (about 50 s per 100 volumes)")
    ap.add_argument("--variants", action="store_true", help="also regkl's other costs and reference/pass options "
                    "on the first series")
    ap.add_argument("--timing", type=int, default=200, help="volumes of the timed series (0: skip)")
    ap.add_argument("--timing-only", action="store_true", help="only the command timing (no accuracy series)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of the whole command (median printed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--register", type=int, default=0, help="EPI->T1 from mean vs realigned boldref on N moving "
                    "and N still series (only this part runs)")
    ap.add_argument("--register-volumes", type=int, default=40)
    ap.add_argument("--register-seed", type=int, default=500, help="seed of the first register series")
    args = ap.parse_args(argv)
    import numba

    numba.set_num_threads(args.threads)
    if args.register:
        register_comparison(args.register, args.register_volumes, args.threads, args.register_seed)
        return
    if args.timing_only:
        args.series = ""
    print(f"# bench_realign (regkl {regkl.__version__}): {args.volumes} volumes per series, {args.threads} threads, "
          f"load {os.getloadavg()[0]:.1f} at start")
    print(f"{'series':10s} {'tool':28s} {'median':>8s} {'p95':>8s} {'max':>8s} {'seconds':>8s}")
    all_err = {}
    with tempfile.TemporaryDirectory() as tmp:
        for si, spec in enumerate(s for s in args.series.split(",") if s):
            kind, seed = spec.split(":")
            vols, mats, pts = make_series(kind, int(seed), args.volumes)
            variants = [("regkl (default)", {})]
            if args.variants and si == 0:
                variants += [("regkl --cost ls", {"cost": "ls"}), ("regkl --cost mi", {"cost": "mi"}),
                             ("regkl --two-pass", {"two_pass": True}),
                             ("regkl --reference mean", {"reference": "mean"}),
                             ("regkl --reference mean --two-pass", {"reference": "mean", "two_pass": True})]
            for name, opts in variants:
                t0 = time.perf_counter()
                res = realign(vols, threads=args.threads, **opts)
                seconds = time.perf_counter() - t0
                err = sm.motion_errors(res.ref2volume, mats, pts)
                all_err.setdefault(name, []).append(err)
                print(f"{spec:10s} {name:28s} {stats(err)} {seconds:8.2f}", flush=True)
            if si < args.ants:
                path = Path(tmp) / f"{kind}_{seed}.nii.gz"
                save_series(vols, path)
                est, seconds = run_ants(path)
                err = sm.motion_errors(est, mats, pts)
                all_err.setdefault("ants Rigid", []).append(err)
                print(f"{spec:10s} {'ants motion_correction':28s} {stats(err)} {seconds:8.2f}", flush=True)
        for name, errs in all_err.items():
            err = np.concatenate(errs)
            print(f"{'all':10s} {name:28s} {stats(err)} {'':>8s}  ({len(errs)} series, {len(err)} volumes)")
        if args.timing:
            timing(args.timing, args.threads, args.repeats, tmp)


def timing(n, threads, repeats, tmp):
    """Print the whole command's median time over ``repeats`` runs, each run with the load, and a breakdown."""
    path = timing_series(n, tmp)
    runs = time_command(path, threads, tmp, repeats)
    for seconds, load in runs:
        print(f"# whole command, {n} volumes 64x64x36, --threads {threads}: {seconds:.2f} s (1-min load average "
              f"{load:.1f} on {os.cpu_count()} cores)")
    print(f"# whole command: median {np.median([s for s, _ in runs]):.2f} s over {len(runs)} runs (goal < 5 s on 2 "
          f"idle cores)")
    print("# breakdown (one run in this process, same series): wall s, CPU s (all threads)")
    for phase, (wall, cpu) in time_phases(path, threads, tmp).items():
        print(f"#   {phase:64s} {wall:6.2f} {cpu:6.2f}")
    print(f"# 1-min load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
