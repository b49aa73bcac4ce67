#!/usr/bin/env python
"""Automatic masks with a whole-head fixed image (issue 3, acceptance criterion 3).

FIXED: the whole-head MNI152 T1 (FSL generation, skull, scalp, face and neck, 2 mm,
``mni152_fsl_head/mni152_T1w_head_2mm.nii.gz``). MOVING: a brain-only synthetic EPI
(:func:`regkl.synthetic.make_epi`, defaults) of the MNI152 2009c template through a known random rigid
``fixed2moving`` (<= 15 degrees / 15 mm per axis). The two templates are different generations, so the
nominal truth is only approximate (~1 mm); results are compared with EACH OTHER (RMS distance over the
2009c template's brain points, which lie in the shared MNI world).

Reference ("cropped") fixed images, all on the whole-head grid:

* ``strip{D}``: the whole-head image multiplied by the 2009c brain mask (resampled onto the 2 mm grid,
  trilinear >= 0.5) dilated by D mm (D = 2, 5, 10), i.e. skull-stripped with a margin.
  ``strip5`` is the primary reference.
* A neck crop (keep z >= lowest brain voxel - 10 mm) is computed and reported, but on this image it
  is a no-op: the head image's field of view ends at z = -72 mm, where the 2009c brain (brainstem)
  still is, so there are no shoulders and the neck below the brainstem is not in the image.

Every fixed image is registered with default settings (``auto_mask=False``) and with
``auto_mask=True``. Criterion: ``head + auto_mask`` within 0.5 mm of the cropped image's result
(default settings). Also reported: ``head`` without the mask (did the mask matter?), each reference
with the mask, the spread between the references themselves, and where in the brain the difference
between ``head + auto_mask`` and ``strip5`` is largest.

Run: ``python benchmarks/bench_automask.py [--seeds N] [--quick]`` (5 seeds: ~3 minutes on 2 cores).

``--suite`` instead runs issue 11's criterion: every pair of the shared data (the real b0/T2w pair, the
sample pair in ``data/``) and of the synthetic suite (EPI onto the brain-only T1, onto the whole-head
T1, with 3 mm phase-encode distortion; ``--seeds`` of each) registered with and without ``auto_mask``:
the masked answer must land within 0.5 mm of the unmasked one, or closer to the truth. Also printed:
the masks used as they are (``fixed_mask``/``moving_mask`` given explicitly, i.e. the old behaviour),
and what the guard kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
from scipy import ndimage

from regkl import masks, synthetic
from regkl.io import load_volume
from regkl.optimize import register
from regkl.transforms import apply_matrix, rotation_to_euler
from regkl.volume import Volume

HEAD_FILE = ("mni152_fsl_head", "mni152_T1w_head_2mm.nii.gz")
STRIP_MM = (2.0, 5.0, 10.0)
PRIMARY = "strip5"
OK_MM = 0.5
NECK_MARGIN_MM = 10.0


def brain_mask_on(grid: Volume, template) -> np.ndarray:
    """2009c template brain mask resampled (trilinear >= 0.5) onto ``grid``; bool array."""
    idx = np.indices(grid.shape, dtype=np.float64).reshape(3, -1).T
    vox = apply_matrix(template.t1.ras2vox @ grid.vox2ras, idx)
    prob = ndimage.map_coordinates(template.brain.astype(np.float32), vox.T, order=1, mode="constant", cval=0.0)
    return prob.reshape(grid.shape) >= 0.5


def stripped(head: Volume, brain: np.ndarray, dilate_mm: float) -> Volume:
    keep = ndimage.distance_transform_edt(~brain, sampling=head.spacing) <= dilate_mm
    return Volume(head.data * keep, head.vox2ras, name=f"strip{dilate_mm:g}")


def neck_crop(head: Volume, brain: np.ndarray):
    """(lowest brain voxel world z, cut z, number of slices removed) for 'keep z >= lowest brain - margin'.
    Assumes an axis-aligned grid with the third axis along S (true for the FSL head image)."""
    ks = np.flatnonzero(brain.any(axis=(0, 1)))
    z = head.world_coords(np.array([[0.0, 0.0, float(k)] for k in range(head.shape[2])]))[:, 2]
    lowest = float(z[ks[0]])
    cut = lowest - NECK_MARGIN_MM
    return lowest, cut, int(np.sum(z < cut)), float(z.min())


def rigid_difference(a: np.ndarray, b: np.ndarray, centre) -> tuple[float, float]:
    """(rotation deg, translation mm at ``centre``) of inv(b) @ a."""
    d = np.linalg.inv(b) @ a
    angle = np.degrees(np.arccos(np.clip((np.trace(d[:3, :3]) - 1.0) / 2.0, -1.0, 1.0)))
    shift = float(np.linalg.norm(apply_matrix(d, np.asarray(centre)[None])[0] - centre))
    return float(angle), shift


def rms_by_band(a, b, points, edges):
    """RMS distance of two transforms over the points in each z band."""
    diff = apply_matrix(a, points) - apply_matrix(b, points)
    d2 = np.sum(diff * diff, axis=1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (points[:, 2] >= lo) & (points[:, 2] < hi)
        out.append(float(np.sqrt(d2[sel].mean())) if sel.any() else float("nan"))
    return out


def say(msg=""):
    print(msg, flush=True)


def suite_pairs(template, shared, n):
    """(label, moving, fixed, truth or None, points) for the --suite criterion."""
    t2_dir = os.path.join(shared, "real_b0_t2w")
    b0, t2 = load_volume(os.path.join(t2_dir, "b0_epi.nii.gz")), load_volume(os.path.join(t2_dir, "T2w.nii.gz"))
    head_pts = t2.world_coords(np.argwhere(t2.data[::3, ::3, ::3] > np.percentile(t2.data, 60)) * 3.0)
    yield "real b0/T2w", b0, t2, None, head_pts
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    brain = synthetic.brain_points(template, step_vox=3)
    yield ("sample pair", load_volume(os.path.join(repo, "data", "sub-01_bold.nii.gz"), volume="mean"),
           load_volume(os.path.join(repo, "data", "sub-01_T1w.nii.gz")),
           np.loadtxt(os.path.join(repo, "data", "sub-01_true_fixed2moving_ras.txt")), brain)
    t1 = synthetic.make_t1(template)
    head = load_volume(os.path.join(shared, *HEAD_FILE))
    centre = brain.mean(axis=0)
    for i in range(n):
        rng = np.random.default_rng([5, i])
        truth = synthetic.random_rigid(rng, 15.0, 15.0, centre)
        yield f"EPI->T1 {i}", synthetic.make_epi(template, truth, rng), t1, truth, brain
        yield f"EPI->head {i}", synthetic.make_epi(template, truth, rng), head, truth, brain
        yield f"distorted {i}", synthetic.make_epi(template, truth, rng, distortion_mm=3.0), t1, truth, brain


def suite(args, n):
    """Issue 11 item 5: --auto-mask within 0.5 mm of the unmasked answer (or closer to the truth)."""
    template = synthetic.load_template(args.shared)
    say(f"{'pair':<14} {'plain err':>9} {'am err':>7} {'am-plain':>8} {'raw masks-plain':>15}  kept")
    ok_all, rows = True, []
    for label, moving, fixed, truth, pts in suite_pairs(template, args.shared, n):
        plain = register(moving, fixed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            am = register(moving, fixed, auto_mask=True)
        raw = register(moving, fixed, fixed_mask=masks.auto_mask(fixed), moving_mask=masks.auto_mask(moving))
        d = synthetic.rms_error(am.fixed2moving, plain.fixed2moving, pts)
        d_raw = synthetic.rms_error(raw.fixed2moving, plain.fixed2moving, pts)
        e_plain = None if truth is None else synthetic.rms_error(plain.fixed2moving, truth, pts)
        e_am = None if truth is None else synthetic.rms_error(am.fixed2moving, truth, pts)
        ok = d < OK_MM or (e_am is not None and e_am < e_plain)
        ok_all &= ok
        rows.append({"pair": label, "plain_err": e_plain, "am_err": e_am, "am_vs_plain": d, "raw_vs_plain": d_raw,
                     "kept": am.settings["auto_masks"], "warnings": [str(w.message) for w in caught], "ok": ok})
        fmt_e = (lambda e: "    n/a" if e is None else f"{e:7.3f}")
        say(f"{label:<14} {fmt_e(e_plain):>9} {fmt_e(e_am)} {d:8.3f} {d_raw:15.3f}  {am.settings['auto_masks']['kept']}"
            f"{'' if ok else '  FAIL'}")
    say(f"# issue 11 item 5 (--auto-mask within {OK_MM} mm of the unmasked answer or closer to the truth, every "
        f"pair): {'PASS' if ok_all else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1, default=float)
    return 0 if ok_all else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=None, help="synthetic EPIs (default 5; 2 with --quick)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=11, help="EPI i uses default_rng([seed, i])")
    ap.add_argument("--shared", default=str(synthetic.default_shared_dir()))
    ap.add_argument("--json", default=None)
    ap.add_argument("--suite", action="store_true", help="issue 11's criterion on the shared and synthetic pairs")
    args = ap.parse_args(argv)
    n = args.seeds if args.seeds is not None else (2 if args.quick else 5)
    if args.suite:
        return suite(args, n)

    say(f"# bench_automask  {time.strftime('%Y-%m-%d %H:%M:%S')}  cpus={os.cpu_count()}  "
        f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    template = synthetic.load_template(args.shared)
    points = synthetic.brain_points(template, step_vox=2)
    centre = points.mean(axis=0)
    head = load_volume(os.path.join(args.shared, *HEAD_FILE))
    brain = brain_mask_on(head, template)
    fixed = {"head": head}
    for d in STRIP_MM:
        fixed[f"strip{d:g}"] = stripped(head, brain, d)
    lowest, cut, removed, zmin = neck_crop(head, brain)
    am_head = masks.auto_mask(head)
    am_z = np.flatnonzero(am_head.data.any(axis=(0, 1)))
    say(f"# fixed: whole-head T1 {head.shape} {head.spacing.tolist()} mm; 2009c brain mask on it: "
        f"{int(brain.sum())} voxels")
    say(f"# neck crop: lowest brain voxel at z = {lowest:.0f} mm, image starts at z = {zmin:.0f} mm; keeping "
        f"z >= {cut:.0f} mm removes {removed} slices -> no-op on this image, so the references are skull-stripped")
    say(f"# auto_mask(head): {am_head.data.mean() * 100:.0f}% of the grid, slices {am_z[0]}..{am_z[-1]} of "
        f"{head.shape[2]} (a HEAD mask: it keeps scalp, skull and neck)")
    say(f"# {len(points)} brain points (2009c mask, every 2nd voxel); distances are RMS over them")

    configs = [(name, am) for name in fixed for am in (False, True)]
    labels = [f"{name}{'+am' if am else ''}" for name, am in configs]
    register(synthetic.make_epi(template, np.eye(4), np.random.default_rng(0)), head)  # warm-up

    records = []
    band_edges = np.array([-80.0, -40.0, -10.0, 20.0, 50.0, 90.0])
    for i in range(n):
        rng = np.random.default_rng([args.seed, i])
        truth = synthetic.random_rigid(rng, 15.0, 15.0, centre)
        epi = synthetic.make_epi(template, truth, rng)
        res, secs = {}, {}
        for (name, am), label in zip(configs, labels):
            t0 = time.perf_counter()
            r = register(epi, fixed[name], auto_mask=am)
            secs[label] = time.perf_counter() - t0
            res[label] = r.fixed2moving
        rec = {"seed": i, "truth": truth.tolist(), "results": {k: v.tolist() for k, v in res.items()},
               "seconds": secs, "vs_truth": {k: synthetic.rms_error(v, truth, points) for k, v in res.items()}}
        rec["head+am_vs"] = {k: synthetic.rms_error(res["head+am"], res[k], points) for k in labels if k.startswith("strip")}
        rec["head_vs"] = {k: synthetic.rms_error(res["head"], res[k], points) for k in labels if k.startswith("strip")}
        strips = [k for k in labels if k.startswith("strip") and not k.endswith("+am")]
        rec["reference_spread"] = max(synthetic.rms_error(res[a], res[b], points) for a in strips for b in strips)
        rec["diff_rot_deg"], rec["diff_shift_mm"] = rigid_difference(res["head+am"], res[PRIMARY], centre)
        rec["diff_by_z_band"] = rms_by_band(res["head+am"], res[PRIMARY], points, band_edges)
        records.append(rec)
        say("")
        say(f"## EPI {i}: truth {np.round(np.degrees(rotation_to_euler(truth[:3, :3])), 1).tolist()} deg, "
            f"{np.round(truth[:3, 3] + truth[:3, :3] @ centre - centre, 1).tolist()} mm")
        say(f"{'fixed image':<12} {'vs_truth':>8} {'sec':>6} | {'head vs':>8} {'head+am vs':>10}")
        for label in labels:
            extra = ""
            if label.startswith("strip"):
                extra = f" | {rec['head_vs'][label]:>8.3f} {rec['head+am_vs'][label]:>10.3f}"
            say(f"{label:<12} {rec['vs_truth'][label]:>8.3f} {secs[label]:>6.2f}{extra}")
        say(f"head+am vs {PRIMARY}: {rec['diff_rot_deg']:.3f} deg, {rec['diff_shift_mm']:.3f} mm at the brain centre; "
            "RMS by z band " + ", ".join(f"[{lo:.0f},{hi:.0f}) {v:.2f}" for lo, hi, v in
                                       zip(band_edges[:-1], band_edges[1:], rec["diff_by_z_band"]))
            + f"; spread between the references {', '.join(strips)}: {rec['reference_spread']:.3f} mm")

    say("")
    say("## Summary (RMS mm over brain points; max / median over EPIs)")
    refs = [k for k in labels if k.startswith("strip")]
    say(f"{'reference':<12} {'head+am vs (max/med)':>21} {'head vs (max/med)':>18} {'head+am<0.5':>12}")
    for k in refs:
        a = [r["head+am_vs"][k] for r in records]
        b = [r["head_vs"][k] for r in records]
        say(f"{k:<12} {max(a):>10.3f} /{np.median(a):>7.3f} {max(b):>9.3f} /{np.median(b):>6.3f} "
            f"{sum(x < OK_MM for x in a):>9}/{len(a)}")
    vt = {k: [r["vs_truth"][k] for r in records] for k in labels}
    say("vs nominal truth (different template generations, ~1 mm expected): "
        + ", ".join(f"{k} {np.median(v):.2f}" for k, v in vt.items()))
    spread = [r["reference_spread"] for r in records]
    say(f"spread between the strip references themselves (default settings): max {max(spread):.3f}, median "
        f"{np.median(spread):.3f} mm")
    prim = [r["head+am_vs"][PRIMARY] for r in records]
    ok = all(x < OK_MM for x in prim)
    say(f"# criterion 3 (head + auto_mask within {OK_MM} mm of {PRIMARY}, default settings, every EPI): "
        f"{'PASS' if ok else 'FAIL'} (max {max(prim):.3f} mm)")
    say(f"# load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "records": records}, fh, indent=1, default=float)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
