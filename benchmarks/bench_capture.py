#!/usr/bin/env python
"""Capture range of rigid registration (issue 3, criteria 2 and 4): large header perturbations.

Part ``capture`` (criterion 2). The moving image's header is moved by a known rigid ``P``
(``new vox2ras = P @ vox2ras``), so the correct answer becomes ``P @ (answer without P)``. ``P``
rotates by an angle uniform in [0, 90] degrees about a uniformly random axis through the moving
image's centre of mass, then translates by a vector uniform in a BALL of radius 60 mm (uniform
direction, length 60 * U^(1/3)). A start succeeds when the result is within 1 mm (RMS) of the
expected answer.

* synthetic: start i has its own EPI (:func:`regkl.synthetic.make_epi`, default effects) of the
  MNI152 2009c template through a small known rigid ``T0`` (<= 5 degrees / 5 mm per axis), with the
  perturbation on top; expected = ``P @ T0``; error over the template's brain points.
* real: the b0 EPI -> T2w pair; expected = ``P @ (the same tool's result on the unperturbed pair)``;
  error over the T2w head voxels (as in bench_rigid.py). The distance to ``P @ (regkl's unperturbed
  result)`` is reported too.

Tools: regkl with ``search='auto'`` (the default), ``'full'`` and ``'none'``, everything else default;
SimpleITK's standard set-up, antspyx 'Rigid' and itk-elastix's default rigid map, exactly as in
bench_rigid.py (their wrappers are imported from there). The other tools take 5-370 s per run, so
by default they run on the first ``--others-starts`` starts only (the table gives each tool's count).

Part ``search`` (criterion 4): the bundled sample pair (data/sub-01_bold.nii.gz, mean volume ->
data/sub-01_T1w.nii.gz), ``search`` 'none' / 'auto' / 'full', ``--search-repeats`` runs each
(interleaved), medians of ``Result.search.seconds`` and of the whole ``register`` call, with the
poses the grid scored and the search's local (L-BFGS) evaluations.

Run: ``python benchmarks/bench_capture.py [--quick] [--part capture|search|all] [--starts N]
[--others-starts K] [--tools regkl,sitk,ants,elastix]``. Defaults: 40 starts for regkl, 10 for the
other tools: measured 80 minutes on 2 cores at load 4-7 (regkl alone, ``--tools regkl``, and the
search part: 12 minutes at load ~2). Run it in the background with the output sent to a file.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from regkl import synthetic  # first: regkl's thread settings apply before numpy loads (3-6x slower runs without)

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_rigid as br  # noqa: E402  (tool wrappers, real-pair loader, helpers)

from regkl.io import load_volume  # noqa: E402
from regkl.optimize import register  # noqa: E402
from regkl.volume import Volume  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MAX_ANGLE_DEG, MAX_SHIFT_MM = 90.0, 60.0
OK_MM = 1.0
LOOSE_MM = 5.0
TARGET_FRACTION = 0.95
T0_ROT_DEG, T0_TRANS_MM = 5.0, 5.0
ANGLE_BINS = ((0.0, 30.0), (30.0, 60.0), (60.0, 90.0))


def axis_angle_matrix(axis, angle_rad: float) -> np.ndarray:
    """(3, 3) rotation by ``angle_rad`` about the unit vector ``axis`` (Rodrigues)."""
    x, y, z = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + math.sin(angle_rad) * k + (1.0 - math.cos(angle_rad)) * (k @ k)


def random_perturbation(rng: np.random.Generator, centre, min_deg=0.0, max_deg=MAX_ANGLE_DEG,
                        max_shift_mm=MAX_SHIFT_MM):
    """(P (4, 4), angle deg, shift mm): rotation uniform in [min_deg, max_deg] about a uniformly random axis
    through ``centre``, then a translation uniform in a ball of radius ``max_shift_mm``.
    Draw order: axis (3 normals), angle, direction (3 normals), radius."""
    axis = rng.standard_normal(3)
    angle = rng.uniform(min_deg, max_deg)
    direction = rng.standard_normal(3)
    shift = direction / np.linalg.norm(direction) * max_shift_mm * rng.uniform() ** (1.0 / 3.0)
    rot = axis_angle_matrix(axis, math.radians(angle))
    c = np.asarray(centre, dtype=np.float64)
    p = np.eye(4)
    p[:3, :3] = rot
    p[:3, 3] = c - rot @ c + shift
    return p, float(angle), float(np.linalg.norm(shift))


def perturbed(moving: Volume, p: np.ndarray) -> Volume:
    return Volume(moving.data, p @ moving.vox2ras, name=moving.name + " (perturbed)")


class RegklSearch(br.Tool):
    def __init__(self, mode):
        self.mode = mode
        self.name = f"regkl-{mode}"
        self.note = f"regkl.optimize.register(moving, fixed, search='{mode}'), other settings default"

    def run(self, inputs):
        moving, fixed = inputs
        return register(moving, fixed, search=self.mode).fixed2moving


def make_tools(names):
    tools = []
    for name in names:
        if name == "regkl":
            tools += [RegklSearch("auto"), RegklSearch("full"), RegklSearch("none")]
            continue
        if name.startswith("regkl-"):  # one search mode only, e.g. regkl-auto
            tools.append(RegklSearch(name.split("-", 1)[1]))
            continue
        tool = br.TOOLS[name]
        reason = tool.available()
        if reason:
            say(f"# SKIP {name}: {reason}")
        else:
            tools.append(tool)
    return tools


def say(msg=""):
    print(msg, flush=True)


def fmt(x, d=2):
    return br.fmt(x, d)


# ------------------------------------------------------------------------------------------------
# Capture range
# ------------------------------------------------------------------------------------------------


def run_capture(args, tools, workdir, records):
    template = synthetic.load_template()
    t1 = synthetic.make_t1(template)
    brain = synthetic.brain_points(template, step_vox=2)
    centre = brain.mean(axis=0)

    def limit(tool):
        return args.starts if tool.name.startswith("regkl") else min(args.others_starts, args.starts)

    # warm-up regkl (kernels from the cache), untimed
    rng = np.random.default_rng([args.seed, 99_999])
    warm = synthetic.make_epi(template, synthetic.random_rigid(rng, 5, 5, centre), rng)
    br.timed_run(RegklSearch("auto"), warm, t1, workdir)

    header = f"{'set':<5} {'start':>5} {'angle':>6} {'shift':>6} {'tool':<12} {'sec':>7} {'err_mm':>8} {'vs_regkl':>8}  note"
    if not args.no_synthetic:
        say("")
        say(f"# synthetic: fixed MNI152 2009c T1 {t1.shape} 1 mm; moving: a new synthetic EPI per start through T0 "
            f"(<= {T0_ROT_DEG:g} deg / {T0_TRANS_MM:g} mm per axis), header moved by P; error vs P @ T0 over "
            f"{len(brain)} brain points")
        say(header)
        for i in range(args.starts):
            rng = np.random.default_rng([args.seed, i])
            t0 = synthetic.random_rigid(rng, T0_ROT_DEG, T0_TRANS_MM, centre)
            epi = synthetic.make_epi(template, t0, rng)
            p, angle, shift = random_perturbation(rng, epi.centre_of_mass())
            moving = perturbed(epi, p)
            expected = p @ t0
            for tool in tools:
                if i >= limit(tool):
                    continue
                m, sec, msg = br.timed_run(tool, moving, t1, workdir)
                err = synthetic.rms_error(m, expected, brain) if m is not None else float("inf")
                records.append({"set": "synthetic", "start": i, "angle_deg": angle, "shift_mm": shift,
                                "tool": tool.name, "seconds": sec, "error_mm": err, "vs_regkl_mm": None,
                                "message": msg, "fixed2moving": None if m is None else m.tolist()})
                say(f"{'syn':<5} {i:>5} {angle:>6.1f} {shift:>6.1f} {tool.name:<12} {fmt(sec):>7} {fmt(err, 3):>8} "
                    f"{'-':>8}  {msg}")

    if not args.no_real:
        moving0, fixed, _, head = br.real_pair(Path(args.shared), 0, args.seed)
        say("")
        say(f"# real: moving b0 EPI {moving0.shape}, fixed T2w {fixed.shape}; error vs P @ (same tool's unperturbed "
            f"result) over {len(head)} head points; vs_regkl: vs P @ (regkl-auto's unperturbed result)")
        base = {}
        say(header)
        for tool in tools:
            m, sec, msg = br.timed_run(tool, moving0, fixed, workdir)
            base[tool.name] = m
            records.append({"set": "real-base", "start": -1, "angle_deg": 0.0, "shift_mm": 0.0, "tool": tool.name,
                            "seconds": sec, "error_mm": 0.0, "vs_regkl_mm": None, "message": msg,
                            "fixed2moving": None if m is None else m.tolist()})
        ref = base.get("regkl-auto")
        for tool in tools:
            m = base[tool.name]
            vs = synthetic.rms_error(m, ref, head) if m is not None and ref is not None else None
            for r in records:
                if r["set"] == "real-base" and r["tool"] == tool.name:
                    r["vs_regkl_mm"] = vs
                    say(f"{'real':<5} {'base':>5} {0.0:>6.1f} {0.0:>6.1f} {tool.name:<12} {fmt(r['seconds']):>7} "
                        f"{'-':>8} {fmt(vs, 3):>8}  unperturbed {r['message']}")
        centre_m = moving0.centre_of_mass()
        for i in range(args.starts):
            rng = np.random.default_rng([args.seed, 5000 + i])
            p, angle, shift = random_perturbation(rng, centre_m)
            moving = perturbed(moving0, p)
            for tool in tools:
                if i >= limit(tool):
                    continue
                m, sec, msg = br.timed_run(tool, moving, fixed, workdir)
                own = base[tool.name]
                err = synthetic.rms_error(m, p @ own, head) if m is not None and own is not None else float("inf")
                vs = synthetic.rms_error(m, p @ ref, head) if m is not None and ref is not None else None
                records.append({"set": "real", "start": i, "angle_deg": angle, "shift_mm": shift, "tool": tool.name,
                                "seconds": sec, "error_mm": err, "vs_regkl_mm": vs, "message": msg,
                                "fixed2moving": None if m is None else m.tolist(), "perturbation": p.tolist()})
                say(f"{'real':<5} {i:>5} {angle:>6.1f} {shift:>6.1f} {tool.name:<12} {fmt(sec):>7} {fmt(err, 3):>8} "
                    f"{fmt(vs, 3):>8}  {msg}")


def summarise_capture(records, tools):
    out = {}
    for set_name in ("synthetic", "real"):
        recs = [r for r in records if r["set"] == set_name]
        if not recs:
            continue
        what = ("error vs the known truth P @ T0" if set_name == "synthetic"
                else "error vs P @ (the tool's own unperturbed result)")
        say("")
        say(f"### capture range, {set_name} ({what}); P: angle U[0, {MAX_ANGLE_DEG:g}] deg about a random axis, "
            f"shift uniform in a {MAX_SHIFT_MM:g} mm ball")
        bins = " ".join(f"{f'{int(a)}-{int(b)}deg':>10}" for a, b in ANGLE_BINS)
        say(f"{'tool':<12} {'starts':>6} {'<1mm':>11} {'<5mm':>6} {bins} {'med_err':>8} {'med_s':>7} {'max_s':>7}"
            + (f" {'med_vs_regkl':>12}" if set_name == "real" else ""))
        out[set_name] = {}
        for tool in tools:
            rt = [r for r in recs if r["tool"] == tool.name]
            if not rt:
                continue
            errs = [r["error_mm"] for r in rt]
            ok = sum(e < OK_MM for e in errs)
            loose = sum(e < LOOSE_MM for e in errs) / len(errs)
            per_bin = []
            for a, b in ANGLE_BINS:
                sel = [r["error_mm"] < OK_MM for r in rt if a <= r["angle_deg"] < b or (b == MAX_ANGLE_DEG and
                                                                                       r["angle_deg"] == b)]
                per_bin.append(f"{sum(sel)}/{len(sel)}" if sel else "-")
            times = [r["seconds"] for r in rt if math.isfinite(r["seconds"])]
            med_t = statistics.median(times) if times else float("nan")
            row = (f"{tool.name:<12} {len(rt):>6} {ok:>3}/{len(rt):<3}{ok / len(rt):>5.2f} {loose:>6.2f} "
                   + " ".join(f"{b:>10}" for b in per_bin)
                   + f" {fmt(statistics.median(errs), 3):>8} {fmt(med_t):>7} {fmt(max(times) if times else None):>7}")
            if set_name == "real":
                vs = [r["vs_regkl_mm"] for r in rt if r["vs_regkl_mm"] is not None]
                row += f" {fmt(statistics.median(vs) if vs else None, 3):>12}"
            say(row)
            out[set_name][tool.name] = {"starts": len(rt), "success": ok, "fraction": ok / len(rt),
                                        "fraction_below_5mm": loose, "median_error_mm": statistics.median(errs),
                                        "median_seconds": med_t}
            fails = [r for r in rt if r["error_mm"] >= OK_MM]
            if fails and tool.name.startswith("regkl"):
                say(f"{'':<12} failures (angle deg / shift mm -> err mm): "
                    + ", ".join(f"{r['angle_deg']:.0f}/{r['shift_mm']:.0f}->{fmt(r['error_mm'], 1)}" for r in fails))
    if any(r["set"] == "real-base" for r in records):
        say("")
        say("# real pair, unperturbed: distance of each tool's answer to regkl-auto's (mm RMS over head points): "
            + ", ".join(f"{r['tool']} {fmt(r['vs_regkl_mm'], 3)}" for r in records if r["set"] == "real-base"))
    say("")
    for set_name, res in out.items():
        if "regkl-auto" in res:
            frac = res["regkl-auto"]["fraction"]
            say(f"# criterion 2, {set_name}, default settings (search 'auto'): {res['regkl-auto']['success']}/"
                f"{res['regkl-auto']['starts']} = {frac:.2f} within {OK_MM:g} mm "
                f"(target >= {TARGET_FRACTION:.2f}): {'PASS' if frac >= TARGET_FRACTION else 'FAIL'}")
    return out


# ------------------------------------------------------------------------------------------------
# Search cost on the bundled sample
# ------------------------------------------------------------------------------------------------


def run_search_cost(args):
    moving = load_volume(REPO / "data" / "sub-01_bold.nii.gz", volume="mean")
    fixed = load_volume(REPO / "data" / "sub-01_T1w.nii.gz")
    truth = np.loadtxt(REPO / "data" / "sub-01_true_fixed2moving_ras.txt")
    points = synthetic.brain_points(synthetic.load_template(), step_vox=2)
    modes = ("none", "auto", "full")
    register(moving, fixed)  # warm-up
    runs = {m: [] for m in modes}
    for _ in range(args.search_repeats):
        for mode in modes:  # interleaved, so a change of machine load hits every mode alike
            t0 = time.perf_counter()
            res = register(moving, fixed, search=mode)
            wall = time.perf_counter() - t0
            runs[mode].append({"wall": wall, "search": None if res.search is None else res.search.seconds,
                               "chosen": None if res.search is None else res.search.chosen,
                               "evaluated": None if res.search is None else res.search.evaluated,
                               "local_evaluations": None if res.search is None else res.search.local_evaluations,
                               "error_mm": synthetic.rms_error(res.fixed2moving, truth, points)})
    say("")
    say(f"### search cost: bundled sample {moving.shape} 3 mm (mean of the 4D series) -> {fixed.shape} 1 mm, "
        f"{args.search_repeats} repeats each (interleaved), medians; load average now "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    say(f"{'search':<6} {'wall_s':>7} {'search_s':>9} {'added_vs_none_s':>15} {'poses':>6} {'local_ev':>8} "
        f"{'chosen':>8} {'err_mm':>7}  all wall times")
    none_wall = statistics.median(r["wall"] for r in runs["none"])
    out = {}
    for mode in modes:
        rs = runs[mode]
        wall = statistics.median(r["wall"] for r in rs)
        srch = statistics.median(r["search"] for r in rs) if rs[0]["search"] is not None else None
        chosen = ",".join(sorted({str(r["chosen"]) for r in rs}))
        say(f"{mode:<6} {wall:>7.2f} {fmt(srch):>9} {wall - none_wall:>+15.2f} {str(rs[0]['evaluated'] or '-'):>6} "
            f"{str(rs[0]['local_evaluations'] or '-'):>8} {chosen:>8} {statistics.median(r['error_mm'] for r in rs):>7.3f}  "
            + " ".join(f"{r['wall']:.2f}" for r in rs))
        out[mode] = {"median_wall_s": wall, "median_search_s": srch, "added_vs_none_s": wall - none_wall, "runs": rs}
    for mode in ("auto", "full"):
        added = out[mode]["median_search_s"]
        say(f"# criterion 4, search '{mode}': search itself {added:.2f} s (median Result.search.seconds), whole "
            f"registration {out[mode]['added_vs_none_s']:+.2f} s vs 'none' (target: search adds <= 1 s): "
            f"{'PASS' if max(added, out[mode]['added_vs_none_s']) <= 1.0 else 'FAIL'}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("capture", "search", "all"), default="all")
    ap.add_argument("--starts", type=int, default=None, help="random starts per set (default 40; 6 with --quick)")
    ap.add_argument("--others-starts", type=int, default=None,
                    help="starts for SimpleITK/ANTs/elastix (default 10; 2 with --quick)")
    ap.add_argument("--quick", action="store_true", help="6 starts (2 for the other tools), 2 search repeats")
    ap.add_argument("--tools", default="regkl,sitk,ants,elastix", help="comma list from regkl (= regkl-auto,regkl-full,regkl-none),sitk,ants,elastix,dipy")
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--no-real", action="store_true")
    ap.add_argument("--seed", type=int, default=33, help="seed of the perturbations and synthetic pairs")
    ap.add_argument("--search-repeats", type=int, default=None, help="runs per search mode (default 5; 2 with --quick)")
    ap.add_argument("--shared", default=str(synthetic.default_shared_dir()), help="shared data folder")
    ap.add_argument("--json", default=None, help="write every run and the summaries to this JSON file")
    args = ap.parse_args(argv)
    args.starts = args.starts if args.starts is not None else (6 if args.quick else 40)
    args.others_starts = args.others_starts if args.others_starts is not None else (2 if args.quick else 10)
    args.search_repeats = args.search_repeats if args.search_repeats is not None else (2 if args.quick else 5)

    say(f"# bench_capture  {time.strftime('%Y-%m-%d %H:%M:%S')}  cpus={os.cpu_count()}  load average at start: "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (other processes inflate every time)")
    out = {}
    records = []
    if args.part in ("capture", "all"):
        tools = make_tools([t.strip() for t in args.tools.split(",") if t.strip()])
        for t in tools:
            say(f"# {t.name}: {t.note}")
        say(f"# regkl: {args.starts} starts per set; other tools: the first {min(args.others_starts, args.starts)}")
        with tempfile.TemporaryDirectory(prefix="bench_capture_") as tmp:
            run_capture(args, tools, Path(tmp), records)
        say("")
        say("## Summary")
        out["capture"] = summarise_capture(records, tools)
    if args.part in ("search", "all"):
        out["search"] = run_search_cost(args)
    say(f"# load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "records": records, "summary": out}, fh, indent=1, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
