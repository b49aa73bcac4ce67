"""Memory and time of `regkl apply` on a long 4D series onto a fine grid (issue 12 item 6).

Run by hand (writes VOLUMES x 182x218x182 float32 as .nii.gz: 600 volumes are 17 GB before
compression, about 9 GB after; needs that much free disk in --work):

    nice -n 5 python benchmarks/bench_apply_series.py [--volumes 600] [--work /tmp]

Builds an int16 series of 64x64x36 voxels (3 x 3 x 3.6 mm), a 1 mm 182x218x182 reference (the
FSL MNI grid, from the shared 2 mm head upsampled), runs `regkl apply` under `/usr/bin/time -v`
and prints the peak resident memory, the wall and CPU times and the output size. Target: peak
under 2 GB whatever the number of volumes.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("REGKL_SHARED_DATA", "/work/shared/data"))


def make_inputs(folder: Path, volumes: int):
    rng = np.random.default_rng(0)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in (64, 64, 36)], indexing="ij"), -1)
    base = 1000 * np.exp(-2 * ((g / [0.6, 0.7, 0.6]) ** 2).sum(-1))
    data = np.empty((64, 64, 36, volumes), np.int16)
    for t in range(volumes):
        data[..., t] = (base + rng.normal(0, 20, base.shape)).astype(np.int16)
    bold2ras = np.diag([3.0, 3.0, 3.6, 1.0])
    bold2ras[:3, 3] = [-96, -120, -60]
    img = nib.Nifti1Image(data, bold2ras)
    img.header.set_zooms((3.0, 3.0, 3.6, 2.0))
    nib.save(img, str(folder / "bold.nii.gz"))
    head = nib.load(str(DATA / "mni152_fsl_head" / "mni152_T1w_head_2mm.nii.gz"))
    t1 = ndimage.zoom(head.get_fdata(dtype=np.float32), 2, order=1)[:182, :218, :182]
    ref2ras = np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(t1, ref2ras), str(folder / "ref.nii.gz"))
    np.savetxt(folder / "identity.txt", np.eye(4))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", type=int, default=600)
    parser.add_argument("--work", default=tempfile.gettempdir())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        folder = Path(tmp)
        make_inputs(folder, args.volumes)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "regkl.cli", "apply",
                               str(folder / "identity.txt"), str(folder / "bold.nii.gz"), str(folder / "ref.nii.gz"),
                               "-o", str(folder / "out.nii.gz"), "-q"], capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(proc.stderr)
        fields = dict(line.strip().split(": ", 1) for line in proc.stderr.splitlines() if ": " in line)
        size = (folder / "out.nii.gz").stat().st_size
    print("| volumes | peak RSS (MB) | wall | user + system CPU (s) | output (GB) |")
    print("| --- | --- | --- | --- | --- |")
    cpu = float(fields["User time (seconds)"]) + float(fields["System time (seconds)"])
    print(f"| {args.volumes} | {int(fields['Maximum resident set size (kbytes)']) / 1000:.0f} | "
          f"{fields['Elapsed (wall clock) time (h:mm:ss or m:ss)']} | {cpu:.0f} | {size / 1e9:.1f} |")


if __name__ == "__main__":
    main()
