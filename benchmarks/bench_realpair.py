#!/usr/bin/env python
"""Issue 11 item 6: which anatomy drives regkl's optimum and the other tools' on the real b0/T2w pair?

The real b0 EPI (moving) onto its T2w (fixed) has no ground truth. regkl's answer and those of
antspyx (``Rigid``), itk-elastix (default rigid map) and a SimpleITK set-up (the ``bench_rigid``
tools) are compared along the straight path from regkl's pose to each other tool's pose (rotation
vector and translation interpolated linearly, t = 0 at regkl, 1 at the tool, from -0.5 to 1.5), with:

* ``mi``: regkl's own finest-level metric (MI, 24 bins), whole images;
* ``mi_sup``: the same MI with only fixed points in the SUPERIOR brain (above the lowest 40 % of
  the head's extent along S and not in its most anterior 20 % along A), i.e. the
  orbitofrontal cortex, the temporal lobes and the skull base (where a b0's susceptibility
  distortion and dropout sit) left out;
* ``edge_sup``: correlation of the gradient magnitudes of the T2w and of the resampled b0 over
  the same superior points (boundary alignment of the ventricles and the brain outline);
* ``ncc_sup``: correlation of the intensities there (the b0's CSF is bright, the T2w's too, so
  plain correlation is meaningful);
* ``mattes`` and ``mattes_sup``: the anchors' kind of metric, SimpleITK's Mattes MI (50 bins, all
  fixed voxels, linear interpolation) of the whole images and with the superior region as the fixed
  mask (``ImageRegistrationMethod.MetricEvaluate``; sign turned so that higher is better).

Each curve's maximum along the path is printed (t_best; 0 = regkl's pose, 1 = the tool's). A
picture (benchmarks/figures/realpair_profiles.png) shows the curves; another
(benchmarks/figures/realpair_edges.png) the b0's edges over the T2w in superior slices at both poses.

Run: ``python benchmarks/bench_realpair.py [--tools ants,elastix,sitk] [--poses poses.json]``
(the other tools take 1-4 minutes on 2 cores; ``--poses`` reuses a JSON of their matrices).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from regkl import synthetic as syn  # noqa: E402
from regkl.io import load_volume  # noqa: E402
from regkl.optimize import register  # noqa: E402
from regkl.probe import MetricProbe  # noqa: E402
from regkl.resample import resample  # noqa: E402
from regkl.transforms import rms_displacement  # noqa: E402
from regkl.volume import Volume  # noqa: E402

SHARED = Path(syn.default_shared_dir()) / "real_b0_t2w"
FIG = REPO / "benchmarks" / "figures"
TS = np.linspace(-0.5, 1.5, 21)
MEASURES = ("mi", "mi_sup", "edge_sup", "ncc_sup", "mattes", "mattes_sup")


def interpolate(a, b, t):
    """Pose t of the way from a to b (rotation vector of inv(a) @ b scaled by t; translation likewise)."""
    d = np.linalg.inv(a) @ b
    out = np.eye(4)
    out[:3, :3] = Rotation.from_rotvec(t * Rotation.from_matrix(d[:3, :3]).as_rotvec()).as_matrix()
    out[:3, 3] = t * d[:3, 3]
    return a @ out


def superior_mask(t2: Volume) -> Volume:
    """Head voxels of the T2w above the lowest 40 % (S) and behind the front 20 % (A) of the head."""
    head = ndimage.gaussian_filter(t2.data, 2.0) > 0.15 * np.percentile(t2.data, 99)
    idx = np.argwhere(head)
    world = t2.world_coords(idx.astype(float))
    zlo, zhi = np.percentile(world[:, 2], [1, 99])
    ylo, yhi = np.percentile(world[:, 1], [1, 99])
    keep = (world[:, 2] > zlo + 0.4 * (zhi - zlo)) & (world[:, 1] < yhi - 0.2 * (yhi - ylo))
    mask = np.zeros(t2.shape, np.float32)
    mask[tuple(idx[keep].T)] = 1.0
    return Volume(mask, t2.vox2ras, "superior head, orbitofrontal and temporal regions left out")


def grad_mag(vol: Volume) -> np.ndarray:
    sm = ndimage.gaussian_filter(vol.data, 1.0 / vol.spacing * 1.5)
    g = np.gradient(sm, *vol.spacing)
    return np.sqrt(sum(x * x for x in g))


class Mattes:
    """SimpleITK's Mattes MI at a RAS fixed->moving pose (higher is better), optionally in a fixed mask."""

    def __init__(self, b0, t2, mask=None):
        import SimpleITK as sitk

        from regkl.sitk_images import array_to_sitk

        self.sitk = sitk
        self.moving = sitk.Cast(array_to_sitk(b0.data, b0.vox2ras), sitk.sitkFloat32)
        self.fixed = sitk.Cast(array_to_sitk(t2.data, t2.vox2ras), sitk.sitkFloat32)
        self.mask = None if mask is None else sitk.Cast(array_to_sitk(mask.data, mask.vox2ras), sitk.sitkUInt8)

    def __call__(self, pose):
        from regkl.xfm import ras_to_lps

        sitk = self.sitk
        lps = ras_to_lps(pose)
        tx = sitk.AffineTransform(3)
        tx.SetMatrix(lps[:3, :3].ravel().tolist())
        tx.SetTranslation(lps[:3, 3].tolist())
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
        reg.SetInterpolator(sitk.sitkLinear)
        if self.mask is not None:
            reg.SetMetricFixedMask(self.mask)
        reg.SetInitialTransform(tx)
        return -float(reg.MetricEvaluate(self.fixed, self.moving))


def measures(b0, t2, t2_edges, sup, probe_all, probe_sup, pose, mattes=(None, None)):
    reg = resample(b0, t2, pose, interp="linear")
    inside = (sup.data > 0.5) & (reg.data > 0)
    e = grad_mag(reg)[inside]
    f = t2_edges[inside]
    return {"mi": probe_all(pose)[0], "mi_sup": probe_sup(pose)[0],
            "edge_sup": float(np.corrcoef(e, f)[0, 1]),
            "ncc_sup": float(np.corrcoef(reg.data[inside], t2.data[inside])[0, 1]),
            "mattes": mattes[0](pose), "mattes_sup": mattes[1](pose)}


def other_tools(b0, t2, names):
    import bench_rigid as br

    out = {}
    work = Path(tempfile.mkdtemp())
    for name in names:
        m, sec, msg = br.timed_run(br.TOOLS[name], b0, t2, work)
        print(f"# {name}: {sec:.1f} s {msg}", flush=True)
        if m is not None:
            out[name] = m
    return out


def euler_deg_mm(d, centre):
    ang = Rotation.from_matrix(d[:3, :3]).as_euler("xyz", degrees=True)
    shift = d[:3, :3] @ centre + d[:3, 3] - centre
    return ang, shift


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tools", default="ants,elastix,sitk")
    ap.add_argument("--poses", help="JSON {tool: 4x4 fixed2moving RAS} instead of running the tools")
    ap.add_argument("--json")
    args = ap.parse_args()
    b0 = load_volume(SHARED / "b0_epi.nii.gz")
    t2 = load_volume(SHARED / "T2w.nii.gz")
    reg = register(b0, t2).fixed2moving
    poses = ({k: np.asarray(v) for k, v in json.loads(Path(args.poses).read_text()).items() if v is not None}
             if args.poses else other_tools(b0, t2, args.tools.split(",")))
    poses = {k: v for k, v in poses.items() if k in args.tools.split(",")}
    sup = superior_mask(t2)
    pts = t2.world_coords(np.argwhere(sup.data[::3, ::3, ::3] > 0.5) * 3.0)
    centre = pts.mean(axis=0)
    probe_all = MetricProbe(b0, t2, sampling=0.5)
    probe_sup = MetricProbe(b0, t2, sampling=0.5, fixed_mask=sup)
    t2_edges = grad_mag(t2)
    mattes = (Mattes(b0, t2), Mattes(b0, t2, sup))
    print(f"# superior region: {int(sup.data.sum())} T2w voxels; distances are RMS over its points (mm)")
    names = list(poses)
    print("# pairwise RMS distance (mm): " + ", ".join(
        f"{a}-{b} {rms_displacement(poses[a], poses[b], pts):.2f}" for i, a in enumerate(names) for b in names[i + 1:]))
    results = {}
    for name, pose in poses.items():
        ang, shift = euler_deg_mm(np.linalg.inv(reg) @ pose, centre)
        print(f"\n## regkl -> {name}: {rms_displacement(reg, pose, pts):.2f} mm RMS; rotation about R (pitch), "
              f"A, S {np.round(ang, 2).tolist()} deg, shift at the region's centre {np.round(shift, 2).tolist()} mm")
        curves = {k: [] for k in MEASURES}
        for t in TS:
            for k, v in measures(b0, t2, t2_edges, sup, probe_all, probe_sup, interpolate(reg, pose, t),
                                 mattes).items():
                curves[k].append(v)
        for k, v in curves.items():
            v = np.asarray(v)
            print(f"{k:9s} t_best {TS[int(np.argmax(v))]:+.1f}  at regkl {v[5]:.4f}  at {name} {v[15]:.4f}  "
                  f"({'regkl' if v[5] > v[15] else name} higher)")
        results[name] = {"ts": TS.tolist(), **curves, "rms_mm": rms_displacement(reg, pose, pts)}
    figures(b0, t2, sup, reg, poses, results)
    if args.json:
        Path(args.json).write_text(json.dumps({"regkl": reg.tolist(), **{k: v.tolist() for k, v in poses.items()},
                                               "curves": results}, indent=1))


def figures(b0, t2, sup, reg, poses, results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIG.mkdir(exist_ok=True)
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(2.6 * len(MEASURES), 2.6))
    for ax, k in zip(axes, MEASURES):
        for name, r in results.items():
            v = np.asarray(r[k])
            ax.plot(r["ts"], v, label=name)
        ax.axvline(0, color="k", lw=0.6)
        ax.axvline(1, color="grey", lw=0.6, ls="--")
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("t (0 regkl, 1 other tool)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(FIG / "realpair_profiles.png", dpi=70)
    plt.close(fig)
    shown = {"regkl": reg, **{k: poses[k] for k in poses if k in ("ants", "elastix")}}
    ks = [int(t2.shape[2] * f) for f in (0.55, 0.75)]
    fig, axes = plt.subplots(len(shown), len(ks), figsize=(3 * len(ks), 3 * len(shown)))
    axes = np.atleast_2d(axes)
    for row, (name, pose) in enumerate(shown.items()):
        regd = resample(b0, t2, pose, interp="linear")
        edges = grad_mag(regd)
        for col, k in enumerate(ks):
            ax = axes[row, col]
            ax.imshow(t2.data[:, :, k].T, origin="lower", cmap="gray")
            ax.contour(edges[:, :, k].T, [np.percentile(edges, 97)], colors="r", linewidths=0.5)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name)
    fig.suptitle("b0 edges (red) over the T2w, superior slices", fontsize=9)
    fig.tight_layout()
    fig.savefig(FIG / "realpair_edges.png", dpi=50)
    plt.close(fig)


if __name__ == "__main__":
    main()
