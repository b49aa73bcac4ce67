"""Round-trip errors of regkl's transform files through the tools users have (issue 13).

For fixed images stored RAS, LAS and oblique (the moving image oblique or RAS), a known affine
fixed->moving transform is written by regkl in every format, read by another tool (nitransforms,
SimpleITK, antspyx), written again by that tool and read back by regkl. Printed: the RMS
displacement (mm) between the known transform and each tool's reading / regkl's final reading,
over the points of a 70 mm ball (a brain) around the fixed image's centre; the worst of the
three storages. FSL files are also compared with FLIRT's definition computed from the headers.

    python benchmarks/bench_formats.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from regkl.io import load_volume  # noqa: E402
from regkl.transforms import euler_to_rotation  # noqa: E402
from regkl.xfm import load_transform, read_transform, save_transform  # noqa: E402
from tests.test_issue13_formats import (_sitk_matrix_ras, _vox2ras, brain_ball, flirt_matrix,  # noqa: E402
                                        rms_mm)

FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def grids(folder, orientation):
    rng = np.random.default_rng(13)
    paths = []
    for name, voxel, shape, centre, orient in (
            ("fixed", (1.5, 1.5, 1.5), (40, 48, 40), (1.0, -18.0, 10.0), orientation),
            ("moving", (3.0, 3.0, 3.5), (24, 26, 16), (-4.0, -10.0, 16.0),
             "oblique" if orientation == "RAS" else "RAS")):
        img = nib.Nifti1Image(rng.uniform(1, 100, shape).astype(np.float32), _vox2ras(orient, voxel, shape, centre))
        paths.append(folder / f"{name}_{orientation}.nii.gz")
        nib.save(img, str(paths[-1]))
    return paths


def known_transform():
    m = np.eye(4)
    m[:3, :3] = euler_to_rotation(np.deg2rad([6.0, -4.0, 9.0])) @ np.diag([1.04, 0.97, 1.02])
    m[:3, 3] = [5.0, -7.5, 3.25]
    return m


def main():
    import ants
    import nitransforms.linear as ntl
    import SimpleITK as sitk

    m = known_transform()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for orientation in ("RAS", "LAS", "oblique"):
            fixed_path, moving_path = grids(d, orientation)
            fixed, moving = load_volume(fixed_path), load_volume(moving_path)
            pts = brain_ball(fixed)

            def record(key, value):
                rows[key] = max(rows.get(key, 0.0), value)

            for suffix in (".tfm", ".txt", ".mat", ".h5"):
                path = d / f"x{suffix}"
                save_transform(path, m, "itk")
                tx = sitk.ReadTransform(str(path))
                record((f"itk {suffix}", "SimpleITK read"), rms_mm(_sitk_matrix_ras(tx), m, pts))
                sitk.WriteTransform(tx, str(d / "sitk.tfm"))
                record((f"itk {suffix}", "SimpleITK -> regkl"), rms_mm(load_transform(d / "sitk.tfm"), m, pts))
                nt = ntl.load(str(path), fmt="itk")
                record((f"itk {suffix}", "nitransforms read"), rms_mm(np.asarray(nt.matrix), m, pts))
                nt.to_filename(str(d / "nt.tfm"), fmt="itk")
                record((f"itk {suffix}", "nitransforms -> regkl"), rms_mm(load_transform(d / "nt.tfm"), m, pts))
                if suffix != ".h5":  # antspyx reads single transforms
                    atx = ants.read_transform(str(path))
                    got = np.array([atx.apply_to_point(tuple(map(float, p))) for p in pts * [-1, -1, 1]]) * [-1, -1, 1]
                    ref = pts @ m[:3, :3].T + m[:3, 3]
                    record((f"itk {suffix}", "ANTs read"), float(np.sqrt(np.mean(np.sum((got - ref) ** 2, axis=1)))))
                    ants.write_transform(atx, str(d / "ants.mat"))
                    record((f"itk {suffix}", "ANTs -> regkl"), rms_mm(load_transform(d / "ants.mat"), m, pts))
            for fmt, suffix in (("fsl", ".mat"), ("afni", ".aff12.1D"), ("lta", ".lta")):
                path = d / f"x{suffix}"
                save_transform(path, m, fmt, fixed=fixed, moving=moving)
                nt = np.asarray(ntl.load(str(path), fmt=fmt, reference=str(fixed_path), moving=str(moving_path)).matrix)
                record((fmt, "nitransforms read"), rms_mm(nt[0] if nt.ndim == 3 else nt, m, pts))
                back = d / f"nt{suffix}"
                ntl.Affine(m, reference=str(fixed_path)).to_filename(str(back), fmt=fmt, moving=str(moving_path))
                record((fmt, "nitransforms -> regkl"),
                       rms_mm(read_transform(back, fmt).fixed2moving(fixed, moving), m, pts))
            np.savetxt(d / "flirt.mat", flirt_matrix(m, fixed_path, moving_path))
            record(("fsl", "FLIRT definition -> regkl"),
                   rms_mm(load_transform(d / "flirt.mat", "fsl", fixed=fixed, moving=moving), m, pts))
            save_transform(d / "r.txt", m, "ras")
            record(("ras", "regkl -> regkl"), rms_mm(load_transform(d / "r.txt"), m, pts))
    print("| format | route | worst RMS over RAS/LAS/oblique storage (mm) |")
    print("| --- | --- | --- |")
    for (fmt, route), value in rows.items():
        print(f"| {fmt} | {route} | {value:.1e} |")


if __name__ == "__main__":
    main()
