#!/usr/bin/env python
"""Where the time of one ``regkl register`` command goes, stage by stage (issue 14, fixed costs).

Each repeat runs the WHOLE command in a fresh process (as a user does), with timestamps taken
around its stages: interpreter start, imports (the command-line module, then what ``register``
imports), reading each image, waiting for Numba's kernels (loaded in a background thread while
the images are read), the ITK placement check, the registration, the transform file, resampling
and writing the output image, and the exit. A second, uninstrumented run of the same command
gives the wall time a user sees (process start to exit). Medians over the repeats.

Run ``python benchmarks/bench_fixed_costs.py --help``. Default pair: the shared real b0 EPI ->
T2w (``$REGKL_SHARED_DATA/real_b0_t2w``), written as a .tfm and a .nii.gz. The "floor" row is
the same command with almost nothing to register (the moving image onto itself, one level, no
search, one iteration): what any registration costs before its own work.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: Runs the command inside a fresh interpreter with timestamps; prints one JSON line on stderr's last line.
PROBE = r"""
import sys, time, json, functools
T0 = time.perf_counter()
marks = [("interpreter up", 0.0)]
def mark(label):
    marks.append((label, time.perf_counter() - T0))
import regkl.cli
mark("import regkl.cli")
import regkl.commands.register
import regkl.io, regkl.writers, regkl.optimize, regkl.resample, regkl.xfm, regkl.itk_placement
mark("imports of register")
def wrap(mod, name, label):
    f = getattr(mod, name)
    calls = [0]
    @functools.wraps(f)
    def g(*a, **k):
        calls[0] += 1
        this = label.format(n=calls[0])
        marks.append((this + " start", time.perf_counter() - T0))
        r = f(*a, **k)
        mark(this)
        return r
    setattr(mod, name, g)
wrap(regkl.io, "load_volume", "read image {n} (1: fixed, 2: moving)")
wrap(regkl.itk_placement, "check_itk_placement", "ITK placement check")
wrap(regkl.optimize, "register", "registration")
wrap(regkl.xfm, "save_transform", "write transform")
wrap(regkl.resample, "resample", "resample output")
wrap(regkl.writers, "save_volume", "write output")
try:
    regkl.cli.main(sys.argv[1:])
except SystemExit:
    pass
mark("command returned")
print(json.dumps({"marks": marks}), file=sys.stderr)
sys.stderr.flush()
import os
os._exit(0)  # as the console script (regkl.cli.run) ends: no interpreter teardown
"""


def stage_durations(marks):
    """[(stage, seconds)] from the probe's marks: each mark's time since the previous one, with a
    '... start' mark closing a 'waiting/other' gap (e.g. joining the kernel warm-up)."""
    out, last = [], 0.0
    for label, t in marks[1:]:
        if label.endswith(" start"):
            if t - last > 1e-4:
                out.append(("between stages (kernel warm-up wait, checks)", t - last))
        else:
            out.append((label, t - last))
        last = t
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--moving", default=None, help="default: the shared real b0 EPI")
    ap.add_argument("--fixed", default=None, help="default: the shared real T2w")
    ap.add_argument("--json", default=None, help="write the medians here")
    args = ap.parse_args(argv)
    shared = Path(os.environ.get("REGKL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    moving = args.moving or str(shared / "real_b0_t2w" / "b0_epi.nii.gz")
    fixed = args.fixed or str(shared / "real_b0_t2w" / "T2w.nii.gz")
    print(f"# bench_fixed_costs: {Path(moving).name} -> {Path(fixed).name}, {args.repeats} repeats, "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    stages, walls, probed = {}, [], []
    with tempfile.TemporaryDirectory(prefix="bench_fixed_") as tmp:
        out, tfm = Path(tmp) / "out.nii.gz", Path(tmp) / "x.tfm"
        cmd_args = ["register", moving, fixed, "-o", str(out), "--transform-out", str(tfm), "-q"]
        plain = [sys.executable, "-m", "regkl.cli", *cmd_args]
        subprocess.run(plain, capture_output=True, check=True)  # warm the Numba cache and the page cache
        # the floor: the same command with (almost) nothing to register, the moving image onto itself on
        # one level, no search, one iteration: start-up, imports, Numba's set-up, reading and writing
        floor_cmd = [sys.executable, "-m", "regkl.cli", "register", moving, moving, "-o", str(out), "--transform-out",
                     str(tfm), "-q", "--levels", "1", "--search", "none", "--max-iter", "1"]
        floors = []

        def timed(cmd, **kw):
            """(seconds, completed process) of ``cmd`` run with no output files left from before."""
            for f in (out, tfm):
                f.unlink(missing_ok=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, **kw)
            return time.perf_counter() - t0, proc

        for _ in range(args.repeats):
            walls.append(timed(plain, check=True)[0])
            floors.append(timed(floor_cmd, check=True)[0])
            total, proc = timed([sys.executable, "-c", PROBE, *cmd_args], text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-2000:])
            probe = json.loads(proc.stderr.strip().splitlines()[-1])
            marks = probe["marks"]
            end = marks[-1][1]
            probed.append(total)
            for label, sec in [("interpreter start (python to first line)", total - end)] + stage_durations(marks):
                stages.setdefault(label, []).append(sec)
    print(f"\n{'stage':<48} {'median s':>9} {'min s':>7}")
    rows = {}
    for label, secs in stages.items():
        rows[label] = statistics.median(secs)
        print(f"{label:<48} {statistics.median(secs):>9.3f} {min(secs):>7.3f}")
    print(f"{'whole command, instrumented (process start to exit)':<48} {statistics.median(probed):>9.3f} "
          f"{min(probed):>7.3f}")
    print(f"{'whole command, plain `python -m regkl.cli`':<48} {statistics.median(walls):>9.3f} {min(walls):>7.3f}")
    print(f"{'floor: moving onto itself, 1 level, 1 iteration':<48} {statistics.median(floors):>9.3f} "
          f"{min(floors):>7.3f}")
    print("\n(interpreter start = everything outside the probe's timestamps: process creation, Python's own start-up "
          "and the exit without teardown, as the console script ends)")
    print(f"# load at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        Path(args.json).write_text(json.dumps({"stages": rows, "wall_median": statistics.median(walls),
                                               "floor_median": statistics.median(floors)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
