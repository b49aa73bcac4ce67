"""Issue 13: transform files every neighbouring tool reads, --format, --init-transform, the Python API.

Truth is independent of regkl: transforms are written by regkl and read by nitransforms, SimpleITK
and ANTs (and the other way round), and compared as displacements in mm over a brain-sized ball;
FSL matrices are checked against FLIRT's documented definition, computed here from the NIfTI
headers (voxel index times pixdim, the first axis mirrored when the sform's determinant is
positive; the matrix maps the input's (moving) coordinates to the reference's (fixed)).
"""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from regkl.cli import main
from regkl.errors import InputError
from regkl.io import load_volume
from regkl.transforms import euler_to_rotation
from regkl.xfm import load_transform, read_transform, save_transform

SAMPLE = Path(__file__).resolve().parents[1] / "data"
FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS


def run(argv, capfd):
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return info.value.code, out, err


def _rotation(angles_deg):
    m = np.eye(4)
    m[:3, :3] = euler_to_rotation(np.deg2rad(angles_deg))
    return m


def _vox2ras(orientation, voxel, shape, centre):
    """RAS, LAS (first axis stored right-to-left) or oblique storage of a grid centred on ``centre``."""
    lin = np.diag(np.asarray(voxel, dtype=float))
    if orientation == "LAS":
        lin[0] *= -1.0
    elif orientation == "oblique":
        lin = _rotation([12.0, -7.0, 20.0])[:3, :3] @ lin
    m = np.eye(4)
    m[:3, :3] = lin
    m[:3, 3] = np.asarray(centre) - lin @ ((np.asarray(shape) - 1) / 2.0)
    return m


@pytest.fixture(scope="module", params=["RAS", "LAS", "oblique"])
def pair(request, tmp_path_factory):
    """(fixed path, moving path, fixed Volume, moving Volume, known fixed2moving) on small grids."""
    folder = tmp_path_factory.mktemp(f"grids_{request.param}")
    rng = np.random.default_rng(13)
    paths = []
    for name, voxel, shape, centre, orient in (
            ("fixed", (1.5, 1.5, 1.5), (40, 48, 40), (1.0, -18.0, 10.0), request.param),
            ("moving", (3.0, 3.0, 3.5), (24, 26, 16), (-4.0, -10.0, 16.0),
             "oblique" if request.param == "RAS" else "RAS")):
        img = nib.Nifti1Image(rng.uniform(1, 100, shape).astype(np.float32), _vox2ras(orient, voxel, shape, centre))
        paths.append(folder / f"{name}.nii.gz")
        nib.save(img, str(paths[-1]))
    m = _rotation([6.0, -4.0, 9.0])
    m[:3, :3] = m[:3, :3] @ np.diag([1.04, 0.97, 1.02])  # an affine part: FSL scaling must be right too
    m[:3, 3] = [5.0, -7.5, 3.25]
    return paths[0], paths[1], load_volume(paths[0]), load_volume(paths[1]), m


def brain_ball(volume, radius=70.0, step=5.0):
    """Points of a brain-sized ball (mm, RAS) around the volume's centre."""
    g = np.arange(-radius, radius + step, step)
    pts = np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3)
    return pts[np.linalg.norm(pts, axis=1) <= radius] + volume.centre


def rms_mm(a, b, points):
    d = (points @ a[:3, :3].T + a[:3, 3]) - (points @ b[:3, :3].T + b[:3, 3])
    return float(np.sqrt(np.mean(np.sum(d ** 2, axis=1))))


def flirt_coords(path):
    """FLIRT's scaled-voxel coordinates of a NIfTI file: voxel -> mm (from its header, not nitransforms)."""
    img = nib.load(str(path))
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    m = np.diag(list(zooms) + [1.0])
    if np.linalg.det(img.affine[:3, :3]) > 0:  # neurological storage: FLIRT mirrors the first axis
        flip = np.eye(4)
        flip[0, 0], flip[0, 3] = -1.0, img.shape[0] - 1
        m = m @ flip
    return m, img.affine


def flirt_matrix(fixed2moving, fixed_path, moving_path):
    """The FLIRT -omat matrix of a RAS fixed->moving transform: moving (input) mm -> fixed (reference) mm."""
    c_fix, fix_v2r = flirt_coords(fixed_path)
    c_mov, mov_v2r = flirt_coords(moving_path)
    return c_fix @ np.linalg.inv(fix_v2r) @ np.linalg.inv(fixed2moving) @ mov_v2r @ np.linalg.inv(c_mov)


# --------------------------------------------------------------------------------------------------
# round trips regkl -> file -> other tool -> file -> regkl


def _sitk_matrix_ras(tx):
    """RAS matrix of a SimpleITK transform, from the points it maps (LPS)."""
    basis = np.vstack([np.zeros(3), np.eye(3)])
    mapped = np.array([tx.TransformPoint(tuple(map(float, p))) for p in basis])
    m = np.eye(4)
    m[:3, 3], m[:3, :3] = mapped[0], (mapped[1:] - mapped[0]).T
    return FLIP @ m @ FLIP


@pytest.mark.parametrize("suffix", [".tfm", ".txt", ".mat", ".h5"])
def test_itk_round_trip_simpleitk_ants_nitransforms(pair, tmp_path, suffix):
    import ants
    import nitransforms.linear as ntl

    _, _, fixed, moving, m = pair
    pts = brain_ball(fixed)
    path = tmp_path / f"x{suffix}"
    save_transform(path, m, "itk")
    # SimpleITK reads it and writes it back (as a .tfm), regkl reads that
    tx = sitk.ReadTransform(str(path))
    assert rms_mm(_sitk_matrix_ras(tx), m, pts) < 0.01
    sitk.WriteTransform(tx, str(tmp_path / "sitk.tfm"))
    assert rms_mm(load_transform(tmp_path / "sitk.tfm"), m, pts) < 0.01
    # nitransforms
    nt = ntl.load(str(path), fmt="itk")
    assert rms_mm(np.asarray(nt.matrix), m, pts) < 0.01
    nt.to_filename(str(tmp_path / "nt.tfm"), fmt="itk")
    assert rms_mm(load_transform(tmp_path / "nt.tfm"), m, pts) < 0.01
    # ANTs (antspyx reads single transforms: .tfm, .txt and .mat)
    if suffix != ".h5":
        atx = ants.read_transform(str(path))
        lps = np.array([atx.apply_to_point(tuple(map(float, p))) for p in (pts[:20] * [-1, -1, 1])])
        # antspyx maps points in float32: agreement to ~1e-5 mm, not to double precision
        assert np.sqrt(np.mean(np.sum((lps * [-1, -1, 1] - (pts[:20] @ m[:3, :3].T + m[:3, 3])) ** 2, axis=1))) < 1e-4
        ants.write_transform(atx, str(tmp_path / "ants.mat"))
        assert rms_mm(load_transform(tmp_path / "ants.mat"), m, pts) < 0.01


@pytest.mark.parametrize("fmt, suffix", [("fsl", ".mat"), ("afni", ".aff12.1D"), ("lta", ".lta")])
def test_fsl_afni_lta_round_trip_nitransforms(pair, tmp_path, fmt, suffix):
    import nitransforms.linear as ntl

    fixed_path, moving_path, fixed, moving, m = pair
    pts = brain_ball(fixed)
    path = tmp_path / f"x{suffix}"
    save_transform(path, m, fmt, fixed=fixed, moving=moving)
    nt = ntl.load(str(path), fmt=fmt, reference=str(fixed_path), moving=str(moving_path))
    matrix = np.asarray(nt.matrix)
    assert rms_mm(matrix[0] if matrix.ndim == 3 else matrix, m, pts) < 0.01
    back = tmp_path / f"nt{suffix}"
    ntl.Affine(m, reference=str(fixed_path)).to_filename(str(back), fmt=fmt, moving=str(moving_path))
    got = read_transform(back, fmt).fixed2moving(fixed, moving)
    assert rms_mm(got, m, pts) < 0.01


def test_fsl_matrix_is_flirts_definition(pair, tmp_path):
    """What regkl writes is FLIRT's matrix (computed here from the headers), and reads back exactly."""
    fixed_path, moving_path, fixed, moving, m = pair
    expected = flirt_matrix(m, fixed_path, moving_path)
    save_transform(tmp_path / "x.mat", m, "fsl", fixed=fixed, moving=moving)
    np.testing.assert_allclose(np.loadtxt(tmp_path / "x.mat"), expected, atol=1e-9)
    np.savetxt(tmp_path / "flirt.mat", expected)
    got = load_transform(tmp_path / "flirt.mat", "fsl", fixed=fixed, moving=moving)
    # pixdim (FLIRT's voxel sizes) and the sform are float32 in a NIfTI header: they agree to ~1e-7
    assert rms_mm(got, m, brain_ball(fixed)) < 1e-5


def test_ras_round_trip_and_header(pair, tmp_path):
    _, _, fixed, _, m = pair
    save_transform(tmp_path / "m.txt", m, "ras")
    text = (tmp_path / "m.txt").read_text()
    assert text.startswith("# regkl transform") and "FIXED" in text
    np.testing.assert_array_equal(np.loadtxt(tmp_path / "m.txt"), m)
    assert read_transform(tmp_path / "m.txt").format == "ras"


# --------------------------------------------------------------------------------------------------
# never guess


def test_fsl_matrix_named_txt_refused_then_applied_exactly_with_format(pair, tmp_path, capfd):
    fixed_path, moving_path, fixed, moving, m = pair
    fsl_txt = tmp_path / "flirt.txt"
    np.savetxt(fsl_txt, flirt_matrix(m, fixed_path, moving_path))
    code, out, err = run(["apply", fsl_txt, moving_path, fixed_path, "-o", tmp_path / "a.nii.gz", "-q"], capfd)
    assert code == 2 and "bare 4x4 matrix" in err and "--format fsl" in err and str(fsl_txt) in err
    assert not (tmp_path / "a.nii.gz").exists()
    code, _, err = run(["apply", fsl_txt, moving_path, fixed_path, "--format", "fsl", "-o", tmp_path / "a.nii.gz",
                        "-q"], capfd)
    assert code == 0, err
    save_transform(tmp_path / "ras.txt", m, "ras")
    code, _, err = run(["apply", tmp_path / "ras.txt", moving_path, fixed_path, "-o", tmp_path / "b.nii.gz", "-q"],
                       capfd)
    assert code == 0, err
    a = nib.load(str(tmp_path / "a.nii.gz")).get_fdata()
    b = nib.load(str(tmp_path / "b.nii.gz")).get_fdata()
    assert np.count_nonzero(b) > 0.2 * b.size
    np.testing.assert_allclose(a, b, atol=1e-3)
    # --inverse: a fixed-space image onto the moving grid; FLIRT's -ref is then the MOVING argument
    for name, transform, extra in (("c", fsl_txt, ["--format", "fsl"]), ("d", tmp_path / "ras.txt", [])):
        code, _, err = run(["apply", transform, fixed_path, moving_path, "--inverse", *extra,
                            "-o", tmp_path / f"{name}.nii.gz", "-q"], capfd)
        assert code == 0, err
    c = nib.load(str(tmp_path / "c.nii.gz")).get_fdata()
    d = nib.load(str(tmp_path / "d.nii.gz")).get_fdata()
    assert np.count_nonzero(d) > 0.2 * d.size
    np.testing.assert_allclose(c, d, atol=1e-3)


@pytest.mark.parametrize("name, content, fmt, phrase", [
    ("bare.txt", "1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", None, "bare 4x4 matrix"),
    ("bare.xfm", "1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", None, "bare 4x4 matrix"),
    ("flirt.mat", "1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n", None, "bare 4x4 matrix"),
    ("regkl.txt", "# regkl transform: 4x4 matrix, RAS+ millimetres\n1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n",
     "fsl", "regkl RAS format, not FSL"),
    ("itk.txt", "#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
     "Parameters: 1 0 0 0 1 0 0 0 1 0 0 0\nFixedParameters: 0 0 0\n", "ras", "ITK format, not regkl RAS"),
    ("two.aff12.1D", "1 0 0 0 0 1 0 0 0 0 1 0\n1 0 0 0 0 1 0 0 0 0 1 0\n", None, "one line of 12 numbers"),
    ("bad.lta", "type = 1\nnxforms = 1\ngarbage\n", None, "not a readable FreeSurfer LTA file"),
])
def test_ambiguous_or_contradictory_files_refused(tmp_path, name, content, fmt, phrase):
    (tmp_path / name).write_text(content)
    with pytest.raises(InputError, match=phrase) as info:
        read_transform(tmp_path / name, fmt)
    assert name in str(info.value)


def test_fsl_needs_both_images(tmp_path):
    (tmp_path / "x.mat").write_text("1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    with pytest.raises(InputError, match="relative to the images' grids"):
        load_transform(tmp_path / "x.mat", "fsl")


@pytest.mark.parametrize("name, fmt, phrase", [
    ("x.xfm", None, "cannot write a .xfm"),
    ("x.mat", None, "--transform-format itk or --transform-format fsl"),
    ("x.nii.gz", None, "cannot write a .gz"),
    ("x.lta", "fsl", "FSL transforms are written as .mat or .txt"),
    ("x.tfm", "afni", "AFNI transforms are written as .1D"),
])
def test_transform_out_suffix_refused_before_any_work(tmp_path, capfd, name, fmt, phrase):
    """Refused up front: the images do not even exist, and nothing is written."""
    argv = ["register", tmp_path / "no_moving.nii.gz", tmp_path / "no_fixed.nii.gz", "--transform-out", tmp_path / name]
    code, out, err = run(argv + (["--transform-format", fmt] if fmt else []), capfd)
    assert code == 2 and phrase in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, phrase", [
    (["register", "{m}", "{f}", "--model", "bogus"], "unknown model 'bogus'; choose one of translation"),
    (["register", "{m}", "{f}", "--metric", "bogus"], "unknown metric 'bogus'; choose one of mi"),
    (["register", "{m}", "{f}", "--transform-out", "{d}/x.tfm", "--transform-format", "mni"],
     "unknown transform format 'mni'; choose one of ras, itk, fsl, afni, lta"),
    (["register", "{m}", "{f}", "--moving-volume", "first"], "expected mean, median, realigned or a volume index"),
    (["register", "{m}", "{f}", "--bins", "3"], "--bins"),
    (["register", "{m}", "{f}", "--init-transform", "{d}/none.tfm"], "no such transform file"),
    (["register", "{m}", "{f}", "--init", "com", "--init-transform", "{d}/none.tfm"], "give one"),
    (["metric", "{m}", "{f}", "--metric", "mi,bogus"], "unknown metric 'bogus'"),
    (["profile", "{m}", "{f}", "--metric", "bogus"], "unknown metric 'bogus'"),
    (["apply", "{d}/none.tfm", "{m}", "{f}", "-o", "{d}/o.nii.gz", "--format", "x"], "unknown transform format"),
    (["batch", "{d}", "--model", "bogus"], "unknown model 'bogus'"),
])
def test_options_checked_before_images_are_read(tmp_path, capfd, argv, phrase):
    """Images that do not exist: the option's own error must come first."""
    subs = {"{m}": str(tmp_path / "no_moving.nii.gz"), "{f}": str(tmp_path / "no_fixed.nii.gz")}
    argv = [subs.get(a, a.replace("{d}", str(tmp_path))) for a in argv]
    code, out, err = run(argv, capfd)
    assert code == 2 and phrase in err and "no_moving" not in err and "no_fixed" not in err, err


# --------------------------------------------------------------------------------------------------
# through the command line on the sample pair: --transform-out formats, --init-transform, the API


@pytest.fixture(scope="module")
def sample_cli(tmp_path_factory):
    """One CLI registration of the sample pair: an FSL .mat (--transform-format fsl) and the RAS matrix."""
    out = tmp_path_factory.mktemp("sample")
    moving, fixed = SAMPLE / "sub-01_bold.nii.gz", SAMPLE / "sub-01_T1w.nii.gz"
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in ["register", moving, fixed, "--transform-out", out / "x.mat", "--transform-format",
                               "fsl", "--matrix-out", out / "m.txt", "--json", "-q"]])
    assert info.value.code == 0
    return moving, fixed, out


def test_register_writes_flirt_matrix(sample_cli, capfd):
    moving, fixed, out = sample_cli
    m = load_transform(out / "m.txt")
    np.testing.assert_allclose(np.loadtxt(out / "x.mat"), flirt_matrix(m, fixed, moving), atol=1e-7)


def test_python_api_takes_nibabel_images_and_matches_cli(sample_cli):
    import inspect

    import regkl

    moving, fixed, out = sample_cli
    assert "fixed_mask" in inspect.signature(regkl.register).parameters
    result = regkl.register(nib.load(str(moving)), nib.load(str(fixed)))
    np.testing.assert_allclose(result.fixed2moving, load_transform(out / "m.txt"), atol=1e-9)
    with pytest.raises(TypeError, match="a regkl Volume, a nibabel image, or a path"):
        regkl.register(np.zeros((8, 8, 8)), str(fixed))
    vol = regkl.Volume.from_nibabel(nib.load(str(fixed)))
    img = vol.to_nibabel()
    np.testing.assert_array_equal(img.affine, vol.vox2ras)
    np.testing.assert_array_equal(regkl.Volume.from_nibabel(img).data, vol.data)
    warped = regkl.apply(str(moving), img, result.fixed2moving)
    assert warped.shape == vol.shape


def test_init_transform_starts_from_a_flirt_matrix(sample_cli, tmp_path, capfd):
    """--init-transform (FLIRT -init / ANTs --initial-moving-transform): starts there, search off."""
    moving, fixed, out = sample_cli
    truth = np.loadtxt(SAMPLE / "sub-01_true_fixed2moving_ras.txt")
    code, stdout, err = run(["register", moving, fixed, "--init-transform", out / "x.mat", "--init-format", "fsl",
                             "--transform-out", tmp_path / "x.h5", "--json", "-q"], capfd)
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["init"] == "given" and summary["search"] is None and summary["transform_format"] == "itk"
    pts = brain_ball(load_volume(fixed), radius=60.0)
    got = _sitk_matrix_ras(sitk.ReadTransform(str(tmp_path / "x.h5")))
    assert rms_mm(got, np.asarray(summary["fixed2moving_ras"]), pts) < 1e-6
    assert rms_mm(got, truth, pts) < 1.0

