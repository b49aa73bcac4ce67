"""Write the bundled sample pair (a synthetic T1 / 4D EPI with a known rigid transform).

Usage (from the repository root)::

    python data/make_sample.py [--out-dir data] [--shared-dir ../shared/data]

Files written to ``--out-dir``:

* ``sub-01_T1w.nii.gz``: the fixed image, the MNI152 2009c brain-only T1 template, 1 mm, uint8.
* ``sub-01_bold.nii.gz``: the moving image, an EPI-like 4D series (3 mm, int16, independent
  Rician noise per volume) of the template moved by a known rigid transform.
* ``sub-01_true_fixed2moving_ras.txt``: that transform, 4x4, RAS+ mm, fixed world -> moving world.

Everything is deterministic (fixed seed).
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np

try:
    from regkl import synthetic
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from regkl import synthetic

import nibabel as nib

SEED = 20250101
#: Rotation angles (degrees, about R, A, S; ``Rz @ Ry @ Rx``): about 8.2 degrees in total.
ANGLES_DEG = (4.0, -5.0, 5.0)
#: Translation (mm, RAS+): about 10 mm in total.
TRANSLATION_MM = (6.0, -4.0, 7.0)
#: EPI grid (3 mm voxels), centred on the brain; holds the whole moved brain.
BOLD_SHAPE = (60, 72, 64)
BOLD_VOXEL_MM = 3.0
N_VOLUMES = 4
NOISE = 0.04
TR_S = 2.0

T1_NAME = "sub-01_T1w.nii.gz"
BOLD_NAME = "sub-01_bold.nii.gz"
TRUTH_NAME = "sub-01_true_fixed2moving_ras.txt"


def true_fixed2moving(template) -> np.ndarray:
    """(4, 4) rigid fixed2moving of the sample: rotation about the brain's bounding-box centre."""
    lo, hi = synthetic.brain_bbox_mm(template)
    return synthetic.rigid_fixed2moving(ANGLES_DEG, TRANSLATION_MM, (lo + hi) / 2.0)


def bold_series(template, fixed2moving, rng) -> tuple[np.ndarray, np.ndarray]:
    """The 4D EPI series: (I, J, K, N_VOLUMES) int16 and its (4, 4) vox2ras.

    One noise-free EPI (blur, bias field, dropout) then independent Rician noise per volume.
    """
    clean = synthetic.make_epi(template, fixed2moving, rng, voxel_mm=BOLD_VOXEL_MM, shape=BOLD_SHAPE, noise=0.0)
    sigma = NOISE * synthetic.mean_brain_signal(clean.data)
    vols = [synthetic.add_rician_noise(clean.data, sigma, rng) for _ in range(N_VOLUMES)]
    data = np.clip(np.rint(np.stack(vols, axis=-1)), 0, np.iinfo(np.int16).max).astype(np.int16)
    return data, clean.vox2ras


def _nifti(data: np.ndarray, vox2ras: np.ndarray, *, tr_s: float | None = None) -> nib.Nifti1Image:
    img = nib.Nifti1Image(data, vox2ras)
    img.header.set_data_dtype(data.dtype)
    img.set_qform(vox2ras, code=1)
    img.set_sform(vox2ras, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if tr_s is not None:
        zooms = list(img.header.get_zooms())
        zooms[3] = tr_s
        img.header.set_zooms(zooms)
    return img


def _save_gz(img: nib.Nifti1Image, path: Path) -> None:
    """Write ``.nii.gz`` with maximum compression and no timestamp (byte-reproducible)."""
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=9, mtime=0))


def _truth_header(fixed2moving: np.ndarray, centre: np.ndarray) -> str:
    return "\n".join([
        "regkl transform: 4x4 matrix, RAS+ millimetres; fixed2moving (regkl convention).",
        f"Maps a world point of the FIXED image ({T1_NAME}) to the same anatomical point in the world of",
        f"the MOVING image ({BOLD_NAME}); pull direction: bold voxel v shows the T1 world point",
        "inv(M) @ bold_vox2ras @ v.",
        f"Made by data/make_sample.py (seed {SEED}): rotation {list(ANGLES_DEG)} deg about R, A, S",
        f"(Rz @ Ry @ Rx) about centre {np.round(centre, 3).tolist()} mm, then translation "
        f"{list(TRANSLATION_MM)} mm.",
    ])


def main(out_dir=None, shared_dir=None) -> dict:
    """Write the three sample files; return {name: Path}."""
    out = Path(out_dir) if out_dir is not None else Path(__file__).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    template = synthetic.load_template(shared_dir)
    rng = np.random.default_rng(SEED)
    fixed2moving = true_fixed2moving(template)
    lo, hi = synthetic.brain_bbox_mm(template)

    t1 = np.clip(np.rint(template.t1.data), 0, 255).astype(np.uint8)
    bold, bold_vox2ras = bold_series(template, fixed2moving, rng)

    paths = {"t1": out / T1_NAME, "bold": out / BOLD_NAME, "truth": out / TRUTH_NAME}
    _save_gz(_nifti(t1, template.vox2ras), paths["t1"])
    _save_gz(_nifti(bold, bold_vox2ras, tr_s=TR_S), paths["bold"])
    np.savetxt(paths["truth"], fixed2moving, fmt="%.10f", header=_truth_header(fixed2moving, (lo + hi) / 2.0))
    return paths


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default=None, help="output folder (default: the folder of this script)")
    parser.add_argument("--shared-dir", default=None,
                        help="shared reference data folder (default: $REGKL_SHARED_DATA or ../shared/data)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _parse_args()
    for key, path in main(args.out_dir, args.shared_dir).items():
        print(f"{key}: {path} ({path.stat().st_size / 1e6:.2f} MB)")
