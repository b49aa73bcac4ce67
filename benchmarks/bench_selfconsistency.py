#!/usr/bin/env python
"""Issue 14: how repeatable is regkl's answer on the real b0 -> T2w pair (no ground truth)?

Two measures, by library calls to :func:`regkl.optimize.register` with its defaults:

* ``header``: repeat r > 0 moves the EPI's header by a known rigid ``P_r`` (up to 10 deg and 10 mm
  per axis, as ``bench_speed.py --part pairs`` does) and stores it as a NIfTI sform would (float32);
  the error is the RMS distance over the T2w's head voxels of the result from ``P_r @ (result of
  repeat 0)``. A tool that samples the fixed image the same way whatever the moving header (as
  elastix and ANTs do, and regkl does) should repeat itself to a small fraction of a millimetre.
* ``seeds``: the same unmoved pair with ``--seed`` 0..N-1, i.e. other random sample points: pairwise
  RMS distance of the answers, their distance to the mean pose, and the spread of each rigid
  parameter about the mean (rotations about R/A/S through the head's centre, shifts along R/A/S).
  This is the precision the sample points allow, which the header measure cannot see.

Registration seconds (in-process, load printed) and finest-level evaluations are printed per run.
Run: ``python benchmarks/bench_selfconsistency.py [--perturbations 6] [--seeds 8] [--json out.json]``
(about 2 s per registration on a quiet machine). See benchmarks/README.md, "Real pair
self-consistency (session 6)".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

sys.path.insert(0, str(Path(__file__).resolve().parent))

import regkl  # noqa: E402,F401  (first: regkl's thread settings apply before numpy's)
from regkl import synthetic  # noqa: E402
from regkl.io import load_volume  # noqa: E402
from regkl.optimize import register  # noqa: E402
from regkl.volume import Volume  # noqa: E402

from bench_speed import HEAD_FRACTION_OF_P99, REAL_MAX_ROT_DEG, REAL_MAX_TRANS_MM  # noqa: E402


def load_text():
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run(moving, fixed, seed):
    """(fixed2moving, seconds, finest-level evaluations)."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = register(moving, fixed, seed=seed)
    return res.fixed2moving, time.perf_counter() - t0, res.levels[-1].evaluations


def mean_pose(matrices):
    """Rigid mean of rigid matrices (mean matrix, rotation part projected onto SO(3))."""
    m = np.mean(matrices, axis=0)
    u, _, vt = np.linalg.svd(m[:3, :3])
    m[:3, :3] = u @ vt
    return m


def parameters(m, ref, centre):
    """(rotation vector deg about R/A/S through ``centre``, shift mm at ``centre``) of ``ref^-1 m``."""
    d = np.linalg.inv(ref) @ m
    rot = Rotation.from_matrix(d[:3, :3]).as_rotvec(degrees=True)
    return np.r_[rot, d[:3, :3] @ centre + d[:3, 3] - centre]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--perturbations", type=int, default=6, help="moved headers besides the original (default 6)")
    ap.add_argument("--seeds", type=int, default=8, help="registration seeds of the unmoved pair (default 8)")
    ap.add_argument("--seed", type=int, default=2024, help="seed of the header perturbations")
    ap.add_argument("--shared", default=None, help="shared data folder (default: $REGKL_SHARED_DATA)")
    ap.add_argument("--json", default=None, help="write every run and the summary")
    args = ap.parse_args(argv)
    shared = Path(args.shared) if args.shared else synthetic.default_shared_dir()
    moving = load_volume(shared / "real_b0_t2w" / "b0_epi.nii.gz")
    fixed = load_volume(shared / "real_b0_t2w" / "T2w.nii.gz")
    rng = np.random.default_rng([args.seed, 2])
    idx = np.argwhere(fixed.data > HEAD_FRACTION_OF_P99 * np.percentile(fixed.data, 99.0))
    idx = idx[rng.choice(len(idx), min(len(idx), 50000), replace=False)].astype(np.float64)
    head = fixed.world_coords(idx)
    centre = head.mean(axis=0)
    print(f"# bench_selfconsistency {' '.join(sys.argv[1:])}; regkl {regkl.__version__}; load {load_text()}; "
          f"{os.cpu_count()} cores", flush=True)
    rows = []

    print("\n## header: repeat r moves the EPI header by P_r (float32 as stored); error vs P_r @ repeat 0")
    print(f"{'repeat':>6} {'rot_deg':>7} {'shift_mm':>8} {'error_mm':>8} {'seconds':>7} {'fin_ev':>6}  load")
    com = moving.centre_of_mass()
    ref = None
    header_errors = []
    for r in range(args.perturbations + 1):
        p = np.eye(4) if r == 0 else synthetic.random_rigid(rng, REAL_MAX_ROT_DEG, REAL_MAX_TRANS_MM, com)
        moved = Volume(moving.data, (p @ moving.vox2ras).astype(np.float32).astype(np.float64), name=moving.name)
        m, sec, ev = run(moved, fixed, 0)
        if r == 0:
            ref, err = m, float("nan")
        else:
            err = synthetic.rms_error(m, p @ ref, head)
            header_errors.append(err)
        angle = np.degrees(np.linalg.norm(Rotation.from_matrix(p[:3, :3]).as_rotvec()))
        rows.append({"measure": "header", "repeat": r, "error_mm": err, "seconds": sec, "finest_evaluations": ev})
        print(f"{r:>6} {angle:>7.1f} {np.linalg.norm(p[:3, 3]):>8.1f} {err:>8.3f} {sec:>7.2f} {ev:>6}  {load_text()}",
              flush=True)

    print("\n## seeds: the unmoved pair with --seed 0..N-1 (other sample points)")
    results, seed_rows = [], []
    for s in range(args.seeds):
        m, sec, ev = run(moving, fixed, s)
        results.append(m)
        seed_rows.append({"measure": "seeds", "seed": s, "seconds": sec, "finest_evaluations": ev, "load": load_text()})
    mean = mean_pose(results)
    to_mean = [synthetic.rms_error(m, mean, head) for m in results]
    pairwise = [synthetic.rms_error(a, b, head) for i, a in enumerate(results) for b in results[i + 1:]]
    spread = np.std([parameters(m, mean, centre) for m in results], axis=0)
    print(f"{'seed':>6} {'to_mean_mm':>10} {'seconds':>7} {'fin_ev':>6}  load")
    for row, d in zip(seed_rows, to_mean):
        row["to_mean_mm"] = d
        print(f"{row['seed']:>6} {d:>10.3f} {row['seconds']:>7.2f} {row['finest_evaluations']:>6}  {row['load']}")
    rows.extend(seed_rows)

    seconds = [r["seconds"] for r in rows]
    summary = {
        "header_median_mm": statistics.median(header_errors), "header_max_mm": max(header_errors),
        "seeds_pairwise_median_mm": statistics.median(pairwise), "seeds_pairwise_max_mm": max(pairwise),
        "seeds_to_mean_median_mm": statistics.median(to_mean), "seeds_to_mean_max_mm": max(to_mean),
        "seeds_sd_rot_deg_RAS": spread[:3].tolist(), "seeds_sd_shift_mm_RAS": spread[3:].tolist(),
        "seconds_median": statistics.median(seconds),
        "finest_evaluations_median": statistics.median(r["finest_evaluations"] for r in rows),
    }
    print("\n## summary")
    print(f"header self-consistency: median {summary['header_median_mm']:.3f} mm, max {summary['header_max_mm']:.3f} mm "
          f"({args.perturbations} moved headers)")
    print(f"seeds: pairwise median {summary['seeds_pairwise_median_mm']:.3f} mm (max "
          f"{summary['seeds_pairwise_max_mm']:.3f}); to the mean pose median {summary['seeds_to_mean_median_mm']:.3f} mm "
          f"(max {summary['seeds_to_mean_max_mm']:.3f})")
    print("seeds: sd of rotation about R/A/S (deg) " + " ".join(f"{v:.3f}" for v in spread[:3])
          + "; of shift along R/A/S (mm) " + " ".join(f"{v:.3f}" for v in spread[3:]))
    print(f"registration seconds median {summary['seconds_median']:.2f}; finest-level evaluations median "
          f"{summary['finest_evaluations_median']:g}; load {load_text()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows, "summary": summary}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
