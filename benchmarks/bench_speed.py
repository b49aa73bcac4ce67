#!/usr/bin/env python
"""Speed benchmark: the whole ``regkl register`` command against elastix's rigid registration.

Parts (``--part``, default all):

* ``pairs``: on four pairs (easy synthetic EPI -> 1 mm T1, hard synthetic (35 degree start, strong
  bias, distortion), the shared real b0 -> T2w pair, a 1 mm -> 1 mm pair), each repeat runs the
  WHOLE ``regkl register`` command in a subprocess (process start, imports, reading, registration,
  resampling and writing the output included) and then elastix's default rigid registration called
  in this process (its images already in memory: the harsher view for regkl), interleaved so both
  see the same machine load. Medians, the same error measure for both tools, ratios.
* ``kernels``: histogram + gradient throughput (points per second) at 1 and 2 threads, points in
  sampling order and in the moving image's row order, and the bare B-spline histogram update.
* ``curve``: registration error against the cap on sample points per level (library calls).

Run ``python benchmarks/bench_speed.py --help``; benchmarks/README.md ("Speed") explains the columns.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import regkl  # noqa: F401  (first: regkl's thread settings apply before numpy loads)

import numpy as np

from regkl import synthetic
from regkl.io import load_volume
from regkl.writers import save_volume
from regkl.volume import Volume
from regkl.xfm import load_transform

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rigid import TOOLS, regkl_executable  # noqa: E402

PAIRS = ("easy", "hard", "real", "mm1")
#: Real pair: largest header perturbation per axis (deg, mm) of the repeats after the first.
REAL_MAX_ROT_DEG, REAL_MAX_TRANS_MM = 10.0, 10.0
#: Head voxels of the real fixed image (error points): intensity above this fraction of its 99th pct.
HEAD_FRACTION_OF_P99 = 0.1
#: T2-like contrast (CSF, GM, WM) of the 1 mm moving image.
T2_CONTRAST = (1.0, 0.55, 0.35)


def say(msg=""):
    print(msg, flush=True)


def load_text():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ------------------------------------------------------------------------------------------------
# Pairs: files on disk (the command reads files) plus the points and truths of the error measure
# ------------------------------------------------------------------------------------------------


def _axis_rotation(angle_deg, rng, centre):
    """Rigid fixed2moving: rotation by exactly ``angle_deg`` about a random axis through ``centre``
    and a random translation of up to 10 mm per axis."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    a = math.radians(angle_deg)
    rot = np.eye(3) + math.sin(a) * k + (1.0 - math.cos(a)) * (k @ k)
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = centre - rot @ centre + rng.uniform(-10.0, 10.0, 3)
    return m


def build_pairs(names, workdir: Path, repeats: int, seed: int, shared: Path):
    """{name: dict(fixed path, [moving path per repeat], [truth per repeat or None], points, kind)}.

    Synthetic pairs have a known truth (error = RMS vs truth over brain points). The real pair has
    none: repeat r > 0 moves the EPI header by a known rigid P_r and the error is the distance of
    the result from ``P_r @ (the same tool's result of repeat 0)`` over the T2w head voxels.
    """
    template = synthetic.load_template()
    brain = synthetic.brain_points(template)
    centre = brain.mean(axis=0)
    t1_path = Path(template.t1.name)
    out = {}
    for name in names:
        d = workdir / name
        d.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, PAIRS.index(name)])
        if name == "real":
            moving = load_volume(shared / "real_b0_t2w" / "b0_epi.nii.gz")
            fixed_path = shared / "real_b0_t2w" / "T2w.nii.gz"
            fixed = load_volume(fixed_path)
            idx = np.argwhere(fixed.data > HEAD_FRACTION_OF_P99 * np.percentile(fixed.data, 99.0))
            idx = idx[rng.choice(len(idx), min(len(idx), 50000), replace=False)].astype(np.float64)
            com = moving.centre_of_mass()
            movings, perts = [], []
            for r in range(repeats):
                p = np.eye(4) if r == 0 else synthetic.random_rigid(rng, REAL_MAX_ROT_DEG, REAL_MAX_TRANS_MM, com)
                path = d / f"b0_{r}.nii.gz"
                save_volume(Volume(moving.data, p @ moving.vox2ras, name=moving.name), path)
                movings.append(path)
                perts.append(p)
            out[name] = dict(fixed=fixed_path, moving=movings, truth=perts, points=fixed.world_coords(idx),
                             kind="real", what="b0 EPI 72x72x39 3 mm -> T2w 224x224x60 1x1x2 mm (oblique)")
            continue
        if name == "easy":
            truth = synthetic.random_rigid(rng, 20.0, 20.0, centre)
            moving = synthetic.make_epi(template, truth, rng)
            what = "synthetic EPI 3 mm -> 1 mm T1 (rotation up to 20 deg/axis, defaults of make_epi)"
        elif name == "hard":
            truth = _axis_rotation(35.0, rng, centre)
            moving = synthetic.make_epi(template, truth, rng, bias=0.4, distortion_mm=4.0, noise=0.06)
            what = "synthetic EPI 3 mm -> 1 mm T1, 35 deg start, bias +-40 %, 4 mm distortion, 6 % noise"
        else:
            truth = _axis_rotation(15.0, rng, centre)
            moving = synthetic.make_epi(template, truth, rng, voxel_mm=1.0, blur_fwhm_mm=1.0, bias=0.1,
                                        noise=0.03, dropout=0.0, contrast=T2_CONTRAST)
            what = (f"T2-like {moving.shape} 1 mm from the tissue maps, rotated 15 deg -> 1 mm MNI T1 "
                    "(197x233x189)")
        mpath = d / "moving.nii.gz"
        save_volume(moving, mpath)
        out[name] = dict(fixed=t1_path, moving=[mpath] * repeats, truth=[truth] * repeats, points=brain,
                         kind="synthetic", what=what)
    return out


def error_mm(pair, r, m, first):
    """Error of result ``m`` of repeat ``r``; ``first`` is the same tool's result of repeat 0."""
    if m is None:
        return float("inf")
    if pair["kind"] == "synthetic":
        return synthetic.rms_error(m, pair["truth"][r], pair["points"])
    if r == 0:
        return float("nan")  # the reference of the real pair's self-consistency
    if first is None:
        return float("inf")
    return synthetic.rms_error(m, pair["truth"][r] @ first, pair["points"])


# ------------------------------------------------------------------------------------------------
# The two tools
# ------------------------------------------------------------------------------------------------


def run_regkl_cli(moving, fixed, d: Path, extra=()):
    """(fixed2moving or None, wall seconds, child CPU seconds, --json summary or message)."""
    out, tfm = d / "out.nii.gz", d / "x.tfm"
    for f in (out, tfm):
        if f.exists():
            f.unlink()
    cmd = regkl_executable() + ["register", str(moving), str(fixed), "-o", str(out), "--transform-out", str(tfm),
                                "--json", "-q", *extra]
    r0 = os.times()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    r1 = os.times()
    cpu = (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
    if proc.returncode != 0:
        return None, dt, cpu, f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"
    return load_transform(tfm), dt, cpu, json.loads(proc.stdout)


def run_elastix(moving, fixed, workdir):
    """(fixed2moving or None, seconds of the registration call, CPU seconds of this process during
    it (all of ITK's threads), message)."""
    tool = TOOLS["elastix"]
    inputs = tool.prepare(load_volume(moving), load_volume(fixed), workdir)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        m = tool.run(inputs)
    except Exception as exc:  # noqa: BLE001 - report, never crash
        return None, time.perf_counter() - t0, time.process_time() - c0, f"{type(exc).__name__}: {exc}"
    return m, time.perf_counter() - t0, time.process_time() - c0, ""


def level_text(summary):
    """Per-level seconds of a --json summary: 'spacing:points:seconds' per level."""
    if not isinstance(summary, dict):
        return ""
    levels = summary.get("levels") or []
    text = " ".join(f"{lv['spacing_mm']:g}mm/{lv['points']}p/{lv['evaluations']}ev/{lv['seconds']:.2f}s"
                    for lv in levels)
    search = summary.get("search") or {}
    return (f"reg {summary['registration_seconds']:.2f}s of {summary['total_seconds']:.2f}s; "
            f"search {search.get('seconds', 0):.2f}s; {text}")


def part_pairs(args, workdir, shared):
    names = [n for n in args.pairs.split(",") if n]
    for n in names:
        if n not in PAIRS:
            raise SystemExit(f"unknown pair {n!r}; choose from {', '.join(PAIRS)}")
    say(f"# building pairs {', '.join(names)} in {workdir} (load {load_text()})")
    pairs = build_pairs(names, workdir, args.repeats, args.seed, shared)
    skip = TOOLS["elastix"].available()
    if skip:
        say(f"# SKIP elastix: {skip}")
    # warm-up: regkl's Numba cache and elastix's ITK modules (untimed)
    first = pairs[names[0]]
    run_regkl_cli(first["moving"][0], first["fixed"], workdir, args.regkl_args)
    if not skip:
        run_elastix(first["moving"][0], first["fixed"], workdir)
    say("")
    say(f"{'pair':<5} {'rep':>3} {'regkl_s':>8} {'cpu_s':>6} {'regkl_mm':>8} {'elastix_s':>9} {'cpu_s':>6} "
        f"{'elastix_mm':>10} {'ratio':>6} {'load':>15}  regkl levels")
    rows = []
    for name in names:
        pair = pairs[name]
        ref = {"regkl": None, "elastix": None}
        for r in range(args.repeats):
            load = load_text()
            m, sec, cpu, info = run_regkl_cli(pair["moving"][r], pair["fixed"], workdir, args.regkl_args)
            if r == 0:
                ref["regkl"] = m
            err = error_mm(pair, r, m, ref["regkl"])
            row = {"pair": name, "repeat": r, "regkl_seconds": sec, "regkl_cpu_seconds": cpu, "regkl_error_mm": err,
                   "regkl_levels": info.get("levels") if isinstance(info, dict) else None,
                   "regkl_message": "" if isinstance(info, dict) else info, "load": load}
            if not skip:
                me, esec, ecpu, msg = run_elastix(pair["moving"][r], pair["fixed"], workdir)
                if r == 0:
                    ref["elastix"] = me
                row.update(elastix_seconds=esec, elastix_cpu_seconds=ecpu,
                           elastix_error_mm=error_mm(pair, r, me, ref["elastix"]), elastix_message=msg)
            rows.append(row)
            ratio = sec / row["elastix_seconds"] if not skip else float("nan")
            say(f"{name:<5} {r:>3} {sec:>8.2f} {cpu:>6.2f} {err:>8.3f} {row.get('elastix_seconds', math.nan):>9.2f} "
                f"{row.get('elastix_cpu_seconds', math.nan):>6.2f} {row.get('elastix_error_mm', math.nan):>10.3f} "
                f"{ratio:>6.2f} {load:>15}  "
                f"{level_text(info) if isinstance(info, dict) else info}")
    say("")
    say("## Summary (medians over the repeats; real pair: error over repeats 1.. only)")
    say(f"{'pair':<5} {'regkl_s':>8} {'elastix_s':>9} {'regkl/elastix':>13} {'cpu_ratio':>9} {'regkl_mm':>8} "
        f"{'elastix_mm':>10} {'regkl_max_mm':>12} {'elastix_max_mm':>14}  pair")
    summary = {}
    for name in names:
        rr = [row for row in rows if row["pair"] == name]
        med = lambda key: statistics.median([row[key] for row in rr]) if key in rr[0] else math.nan  # noqa: E731
        errs = lambda key: [row[key] for row in rr if key in row and not math.isnan(row[key])]  # noqa: E731
        rs, es = med("regkl_seconds"), med("elastix_seconds")
        re_, ee = errs("regkl_error_mm"), errs("elastix_error_mm")
        cpu_ratio = med("regkl_cpu_seconds") / med("elastix_cpu_seconds")
        entry = {"regkl_seconds": rs, "elastix_seconds": es, "ratio": rs / es, "cpu_ratio": cpu_ratio,
                 "regkl_error_mm": statistics.median(re_) if re_ else math.nan,
                 "elastix_error_mm": statistics.median(ee) if ee else math.nan,
                 "regkl_max_error_mm": max(re_) if re_ else math.nan,
                 "elastix_max_error_mm": max(ee) if ee else math.nan, "what": pair_what(pairs, name)}
        summary[name] = entry
        say(f"{name:<5} {rs:>8.2f} {es:>9.2f} {entry['ratio']:>13.2f} {cpu_ratio:>9.2f} "
            f"{entry['regkl_error_mm']:>8.3f} "
            f"{entry['elastix_error_mm']:>10.3f} {entry['regkl_max_error_mm']:>12.3f} "
            f"{entry['elastix_max_error_mm']:>14.3f}  {entry['what']}")
    if "easy" in summary and "mm1" in summary:
        q = summary["mm1"]["regkl_seconds"] / summary["easy"]["regkl_seconds"]
        say(f"\n1 mm -> 1 mm time / 3 mm -> 1 mm time (regkl command): {q:.2f} (target <= 1.5)")
        summary["mm1_over_easy"] = q
    return {"rows": rows, "summary": summary}


def pair_what(pairs, name):
    return pairs[name]["what"]


# ------------------------------------------------------------------------------------------------
# Kernel throughput
# ------------------------------------------------------------------------------------------------


def kernel_case(n_points, seed=0, moving_mm=1.0):
    """(samples, moving level, fixed2moving) of a realistic evaluation: ``n_points`` random points
    of the 1 mm T1's grid (``pyramid.sample_grid``, in its storage order), 24 bins, a 5 degree
    pose, and as the moving image the T1 at ``moving_mm`` (1 mm: 197x233x189, 35 MB, larger than
    a core's caches; 3 mm: 66x78x63, 1.3 MB, the size of an EPI)."""
    from regkl import histogram, pyramid
    from regkl.transforms import get_model

    template = synthetic.load_template()
    fixed = synthetic.make_t1(template)
    moving = fixed if moving_mm == 1.0 else synthetic.make_t1(template, voxel_mm=moving_mm)
    pts, vals = pyramid.sample_grid(fixed, 1.0, np.random.default_rng(seed), max_points=n_points)
    samples = histogram.make_samples(pts, vals, 24)
    level = histogram.make_moving_level(moving, 24)
    m = get_model("rigid").matrix(np.array([0.05, -0.08, 0.06, 2.0, -1.0, 3.0]), fixed.centre)
    return samples, level, m


def _bare_update():
    """A Numba kernel of the bare cubic B-spline histogram update (continuous bins given): the
    ceiling of the histogram kernel, which also maps, fetches and stores the gradient terms."""
    from numba import njit

    from regkl.kernels import bspline3_weights

    @njit(cache=False)
    def bare(mov_c, fixed_bins, n_moving_bins, n_fixed_bins):
        hist = np.zeros(n_fixed_bins * n_moving_bins)
        for p in range(mov_c.shape[0]):
            mc = mov_c[p]
            if not (mc == mc):
                continue
            k0 = int(mc) - 1
            b0, b1, b2, b3 = bspline3_weights(mc - k0 - 1.0)
            row = fixed_bins[p] * n_moving_bins + k0
            hist[row] += b0
            hist[row + 1] += b1
            hist[row + 2] += b2
            hist[row + 3] += b3
        return hist

    return bare


def part_kernels(args):
    """Points per second of one histogram + gradient evaluation (and of each kernel alone), with the
    points in sampling (fixed grid) order and in the moving image's row order (as register() visits
    them), and the bare B-spline histogram update for scale."""
    import numba

    from regkl import histogram
    from regkl.metrics import mutual_information

    sizes = (150_000, 1_000_000) if args.quick else (150_000, 1_000_000, 4_000_000)
    cases = [(n, 1.0) for n in sizes] + [(150_000, 3.0)]
    reps = 10 if args.quick else 20
    threads = [t for t in (1, 2) if t <= numba.config.NUMBA_NUM_THREADS]
    bare = _bare_update()
    say(f"# kernels: median of {reps} evaluations, 24x24 bins, points of the 1 mm T1 grid; moving: the T1 at 1 mm "
        "(197x233x189 float32, 35 MB) or 3 mm (66x78x63, 1.3 MB)")
    say("# order: grid = as sampled (fixed storage order), moving = moving-image row order (what register() uses)")
    say("# Mpt/s: million points per second of wall time; per_cpu_s: per second of this process's CPU time (all")
    say("# threads; on a loaded machine wall time includes waiting for a core, CPU time does not);")
    say("# hist_ns, grad_ns: CPU nanoseconds per point of each kernel (all threads; best of the repeats)")
    say(f"{'points':>9} {'moving':>6} {'order':>6} {'threads':>7} {'hist_Mpt/s':>10} {'grad_Mpt/s':>10} "
        f"{'both_Mpt/s':>10} {'per_cpu_s':>12} {'hist_ns':>8} {'grad_ns':>8} {'load':>15}")
    rows = []
    for n, mm in cases:
        grid, level, m = kernel_case(n, moving_mm=mm)
        for order, samples in (("grid", grid), ("moving", histogram.in_moving_order(grid, level, m))):
            ev = histogram.joint_histogram(samples, level, m)  # first call: loads the kernels
            dtable = mutual_information(ev.hist)[1]
            histogram.matrix_gradient(samples, level, ev, dtable)
            for t in threads:
                numba.set_num_threads(t)
                th, tg, cpu, ch, cg = [], [], [], [], []
                for _ in range(reps):
                    c0 = time.process_time()
                    t0 = time.perf_counter()
                    ev = histogram.joint_histogram(samples, level, m)
                    t1 = time.perf_counter()
                    c1 = time.process_time()
                    histogram.matrix_gradient(samples, level, ev, dtable)
                    t2 = time.perf_counter()
                    cpu.append(time.process_time() - c0)
                    ch.append(c1 - c0)
                    cg.append(cpu[-1] - ch[-1])
                    th.append(t1 - t0)
                    tg.append(t2 - t1)
                h, g = statistics.median(th), statistics.median(tg)
                both = statistics.median([a + b for a, b in zip(th, tg)])
                row = {"points": n, "moving_mm": mm, "order": order, "threads": t, "hist_mpts": n / h / 1e6,
                       "grad_mpts": n / g / 1e6, "both_mpts": n / both / 1e6,
                       "both_mpts_per_cpu_s": n / statistics.median(cpu) / 1e6, "hist_cpu_ns": min(ch) / n * 1e9,
                       "grad_cpu_ns": min(cg) / n * 1e9, "load": load_text()}
                rows.append(row)
                say(f"{n:>9} {mm:>4g}mm {order:>6} {t:>7} {row['hist_mpts']:>10.1f} {row['grad_mpts']:>10.1f} "
                    f"{row['both_mpts']:>10.1f} {row['both_mpts_per_cpu_s']:>12.1f} {row['hist_cpu_ns']:>8.1f} "
                    f"{row['grad_cpu_ns']:>8.1f} {row['load']:>15}")
        bare(ev.mov_c, samples.bins, level.n_bins, samples.n_bins)  # compile
        tb = []
        for _ in range(reps):
            t0 = time.perf_counter()
            bare(ev.mov_c, samples.bins, level.n_bins, samples.n_bins)
            tb.append(time.perf_counter() - t0)
        row = {"points": n, "moving_mm": mm, "order": "moving", "threads": 1,
               "bare_update_mpts": n / statistics.median(tb) / 1e6, "load": load_text()}
        rows.append(row)
        say(f"{n:>9} {mm:>4g}mm {'moving':>6} {1:>7} bare B-spline histogram update (continuous bins given): "
            f"{row['bare_update_mpts']:.1f} Mpt/s {row['load']:>15}")
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    return rows


# ------------------------------------------------------------------------------------------------
# Error against the cap on sample points per level
# ------------------------------------------------------------------------------------------------

#: Caps tried by the curve (None: no cap, the sampling fraction alone).
CURVE_CAPS = (10000, 20000, 50000, 100000, 150000, 200000, None)


def part_curve(args, workdir, shared):
    """Error of register() (library defaults except ``max_points``) against the cap.

    Synthetic suite: bench_rigid's pairs (EPI 3 mm -> 1 mm T1, truth up to 20 deg / 20 mm per axis)
    plus the 1 mm -> 1 mm pair; error = RMS vs truth over brain points. Real pair (no truth): for
    each cap, ``self``: the perturbed results against ``P @ (the same cap's unperturbed result)``,
    and ``vs_uncapped``: the unperturbed result against the uncapped one (over head voxels).
    """
    from bench_rigid import real_pair, synthetic_pairs

    from regkl.optimize import register

    n_syn = 3 if args.quick else 6
    n_real = 3 if args.quick else 5
    syn, brain, _ = synthetic_pairs(n_syn, args.seed)
    mm1 = build_pairs(["mm1"], workdir, 1, args.seed, shared)["mm1"]
    cases = [(label, mv, fx, truth, brain) for label, mv, fx, truth in syn]
    cases.append(("mm1", load_volume(mm1["moving"][0]), load_volume(mm1["fixed"]), mm1["truth"][0], brain))
    say(f"# curve: {len(cases)} synthetic cases, real pair with {n_real} perturbations (load {load_text()}); "
        "error in mm / seconds of register() in-process")
    say(f"{'case':<8} " + " ".join(f"{'cap ' + str(c) if c else 'no cap':>14}" for c in CURVE_CAPS) + "   load")
    rows = []
    for label, mv, fx, truth, pts in cases:
        cells = []
        for cap in CURVE_CAPS:
            t0 = time.perf_counter()
            m = register(mv, fx, max_points=cap).fixed2moving
            sec = time.perf_counter() - t0
            err = synthetic.rms_error(m, truth, pts)
            rows.append({"case": label, "cap": cap, "error_mm": err, "seconds": sec})
            cells.append(f"{err:6.3f}/{sec:5.2f}s")
        say(f"{label:<8} " + " ".join(f"{c:>14}" for c in cells) + f"   {load_text()}")
    moving0, fixed_r, perts, head = real_pair(shared, n_real, args.seed)
    refs = {cap: register(moving0, fixed_r, max_points=cap).fixed2moving for cap in CURVE_CAPS}
    cells = [f"{synthetic.rms_error(refs[cap], refs[None], head):6.3f}" for cap in CURVE_CAPS]
    say(f"{'real-0':<8} " + " ".join(f"{c:>14}" for c in cells) + "   (vs the uncapped result)")
    for cap in CURVE_CAPS:
        rows.append({"case": "real-0", "cap": cap, "vs_uncapped_mm": synthetic.rms_error(refs[cap], refs[None], head)})
    for label, p in perts[1:]:
        cells = []
        for cap in CURVE_CAPS:
            t0 = time.perf_counter()
            m = register(Volume(moving0.data, p @ moving0.vox2ras), fixed_r, max_points=cap).fixed2moving
            sec = time.perf_counter() - t0
            err = synthetic.rms_error(m, p @ refs[cap], head)
            rows.append({"case": label, "cap": cap, "error_mm": err, "seconds": sec})
            cells.append(f"{err:6.3f}/{sec:5.2f}s")
        say(f"{label:<8} " + " ".join(f"{c:>14}" for c in cells) + f"   {load_text()}")
    say("\n## median (max) error in mm per cap (real: self-consistency)")
    for group, pick in (("synthetic 3 mm", lambda c: c.startswith("syn")), ("1 mm -> 1 mm", lambda c: c == "mm1"),
                        ("real (perturbed)", lambda c: c.startswith("real") and c != "real-0")):
        line = []
        for cap in CURVE_CAPS:
            e = [r["error_mm"] for r in rows if r["cap"] == cap and pick(r["case"])]
            line.append(f"{statistics.median(e):.3f} ({max(e):.3f})" if e else "-")
        say(f"{group:<17} " + " | ".join(line))
    return rows


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="pairs,kernels", help="comma list of pairs, kernels, curve")
    ap.add_argument("--quick", action="store_true", help="5 repeats, fewer curve pairs")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per pair (default 7; 5 with --quick)")
    ap.add_argument("--pairs", default=",".join(PAIRS), help=f"comma list from {','.join(PAIRS)}")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--regkl-args", default="", help="extra options for regkl register (one string)")
    ap.add_argument("--workdir", default=None, help="keep the pair files here (default: a temporary folder)")
    ap.add_argument("--shared", default=None, help="shared data folder (default: $REGKL_SHARED_DATA)")
    ap.add_argument("--json", default=None, help="write every row and the summaries")
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 5 if args.quick else 7
    args.regkl_args = args.regkl_args.split()
    return args


def main(argv=None):
    args = parse_args(argv)
    shared = Path(args.shared) if args.shared else synthetic.default_shared_dir()
    parts = [p for p in args.part.split(",") if p]
    say(f"# bench_speed {' '.join(sys.argv[1:])}; regkl {regkl.__version__}; load at start {load_text()}; "
        f"nice {os.nice(0)}; "
        f"{os.cpu_count()} cores")
    result = {"args": {k: v for k, v in vars(args).items()}, "load_start": os.getloadavg()}
    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="bench_speed_")
        workdir = Path(tmp)
    try:
        if "pairs" in parts:
            result["pairs"] = part_pairs(args, workdir, shared)
        if "kernels" in parts:
            result["kernels"] = part_kernels(args)
        if "curve" in parts:
            result["curve"] = part_curve(args, workdir, shared)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    result["load_end"] = os.getloadavg()
    say(f"\n# load at end {load_text()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
