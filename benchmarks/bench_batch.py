"""Batch throughput: 16 pairs with --jobs 1 vs --jobs 2, and a Dask LocalCluster vs the local path.

Run by hand (takes a few minutes):  python benchmarks/bench_batch.py [--pairs 16] [--full-res]

The pairs are copies of the bundled sample pair (data/), arranged as a BIDS tree; by default the
T1 is downsampled to 2 mm so the run stays short (--full-res uses the 1 mm T1). Prints wall times,
the jobs-2/jobs-1 ratio (target <= 0.6) and whether Dask's transforms equal the local ones.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from regkl.io import load_volume  # noqa: E402
from regkl.pyramid import downsample  # noqa: E402
from regkl.writers import save_volume  # noqa: E402
from regkl.xfm import load_transform  # noqa: E402


def make_tree(root: Path, bold: Path, t1: Path, n_pairs: int) -> None:
    subjects = max(1, n_pairs // 4)
    for s in range(subjects):
        for ses in (1, 2):
            anat, func = root / f"sub-{s:02d}/ses-{ses}/anat", root / f"sub-{s:02d}/ses-{ses}/func"
            anat.mkdir(parents=True)
            func.mkdir(parents=True)
            shutil.copy(t1, anat / f"sub-{s:02d}_ses-{ses}_T1w.nii.gz")
            for run in (1, 2):
                shutil.copy(bold, func / f"sub-{s:02d}_ses-{ses}_task-rest_run-{run}_bold.nii.gz")


def run(args):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "regkl.cli", "batch", *map(str, args), "-q"], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"batch failed: {proc.stderr}")
    return time.perf_counter() - t0


def transforms(root: Path):
    return {p.relative_to(root): load_transform(p) for p in sorted(root.rglob("*_xfm.txt"))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--full-res", action="store_true")
    args = parser.parse_args()
    bold, t1 = REPO / "data" / "sub-01_bold.nii.gz", REPO / "data" / "sub-01_T1w.nii.gz"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.full_res:
            save_volume(downsample(load_volume(t1), 2.0), tmp / "T1w_2mm.nii.gz")
            t1 = tmp / "T1w_2mm.nii.gz"
        roots = {}
        for name in ("jobs1", "jobs2", "dask"):
            roots[name] = tmp / name
            make_tree(roots[name], bold, t1, args.pairs)
        n = len(list(roots["jobs1"].rglob("*_bold.nii.gz")))
        run([roots["jobs1"], "--jobs", "1", "--out-dir", tmp / "warm"])  # compile/cache kernels once
        shutil.rmtree(tmp / "warm")
        t1s = run([roots["jobs1"], "--jobs", "1"])
        t2s = run([roots["jobs2"], "--jobs", "2"])
        try:
            from dask.distributed import LocalCluster

            with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cl:
                td = run([roots["dask"], "--dask-scheduler", cl.scheduler_address])
            a = transforms(roots["jobs1"] / "derivatives" / "regkl")
            b = transforms(roots["dask"] / "derivatives" / "regkl")
            same = a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        except ImportError:
            td, same = float("nan"), "dask not installed"
        print(f"pairs: {n}   T1: {'1 mm' if args.full_res else '2 mm'}   cores: {os.cpu_count()}   "
              f"load before: {os.getloadavg()[0]:.2f}")
        print(f"{'run':24s} {'wall s':>8s} {'per pair s':>10s} {'vs jobs 1':>9s}")
        for name, t in (("--jobs 1", t1s), ("--jobs 2", t2s), ("Dask LocalCluster (2x1)", td)):
            print(f"{name:24s} {t:8.2f} {t / n:10.2f} {t / t1s:9.2f}")
        print(f"jobs-2 / jobs-1 ratio: {t2s / t1s:.2f} (target <= 0.6)")
        print(f"Dask transforms identical to local: {same}")


if __name__ == "__main__":
    main()
