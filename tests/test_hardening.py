"""Hardening: every bad input gets a one-line error naming the file, exit code 2, no traceback, and
no output file (not even a hidden temporary one) is left behind; outputs are written atomically.

Every case goes through the real command line (``regkl.cli.main``), with ``capfd`` so that what
C libraries (ITK, GDCM, HDF5) print on file descriptor 2 is seen too. The distinct bad inputs are
the entries of IMAGE_CASES, TRANSFORM_CASES, OUTPUT_CASES, OVERWRITE_CASES, MASK_CASES and
CLI_CASES (see ``test_case_count``).
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import regkl.nifti_read
import regkl.outputs
import regkl.writers
from regkl.cli import main
from regkl.errors import InputError, OutputError
from regkl.io import load_series, load_volume
from regkl.outputs import TEMP_PATTERN, atomic_path, output_group, stale_temp_files

from .conftest import write_dicom_series

N = 32  # test images: 32^3 voxels of 4 mm (128 mm field of view), registration takes ~1 s
AFF = np.array([[4.0, 0, 0, -62], [0, 4.0, 0, -62], [0, 0, 4.0, -62], [0, 0, 0, 1]])
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# --------------------------------------------------------------------------------------------------
# helpers


def blob(shape=(N, N, N), seed=0) -> np.ndarray:
    """A smooth head-like blob with an off-centre bright spot and a little noise (float32)."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape[:3]], indexing="ij"), -1)
    d = 100 * np.exp(-2 * ((g / [0.6, 0.5, 0.4]) ** 2).sum(-1))
    d += 30 * np.exp(-(((g - [0.3, 0.1, 0.0]) / 0.2) ** 2).sum(-1))
    return (d + rng.normal(0, 1, d.shape)).astype(np.float32)


def nifti_bytes(data, *, sform=AFF, qform=None, pixdim=None, shape=None, dtype=None, scl=None, fields=None,
                nifti2=False, data_bytes=None) -> bytes:
    """A single-file NIfTI built field by field (nibabel would refuse or fix many of these headers)."""
    data = np.asarray(data)
    hdr = nib.Nifti2Header() if nifti2 else nib.Nifti1Header()
    hdr.set_data_dtype(dtype or data.dtype)
    hdr.set_data_shape(shape or data.shape)
    hdr["vox_offset"] = 544 if nifti2 else 352
    if qform is not None:
        hdr.set_qform(qform, 1)
    if sform is not None:
        hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = sform[0], sform[1], sform[2]
        hdr["sform_code"] = 2
    if pixdim is not None:
        hdr["pixdim"][1:1 + len(pixdim)] = pixdim
    elif sform is not None:  # voxel sizes as every writer sets them (ITK takes its spacing from pixdim)
        hdr["pixdim"][1:4] = np.linalg.norm(np.asarray(sform, dtype=np.float64)[:3, :3], axis=0)
    if scl is not None:
        hdr["scl_slope"], hdr["scl_inter"] = scl
    for key, value in (fields or {}).items():
        hdr[key] = value
    body = data.astype(dtype or data.dtype).tobytes(order="F") if data_bytes is None else data_bytes
    return hdr.binaryblock + b"\0" * 4 + body


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(content, mtime=0) if path.name.endswith(".gz") else content)
    return path


def good_gz() -> bytes:
    return gzip.compress(nifti_bytes(blob()), mtime=0)


def run(argv, capfd):
    """Run the command line in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return info.value.code, out, err


def listing(folder: Path) -> list:
    """Every file under ``folder``, hidden temporary files included."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_one_line_error(code, out, err, *, path, phrase, exit_code=2):
    assert code == exit_code, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("regkl: error: "), err
    assert str(path) in lines[0], err
    assert phrase.lower() in lines[0].lower(), err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """(moving, fixed) good 3D NIfTI images on the same 4 mm grid."""
    folder = tmp_path_factory.mktemp("good")
    fixed, moving = folder / "fixed.nii.gz", folder / "moving.nii.gz"
    nib.save(nib.Nifti1Image(blob(seed=1), AFF), str(fixed))
    nib.save(nib.Nifti1Image(blob(seed=2), AFF), str(moving))
    return moving, fixed


@pytest.fixture
def out(tmp_path):
    """An empty output folder; every test checks it is still empty after a failure."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def register_argv(moving, fixed, out: Path, *extra):
    return ["register", moving, fixed, "-o", out / "reg.nii.gz", "--transform-out", out / "reg.tfm",
            "--matrix-out", out / "reg.txt", "--search", "none", "--max-iter", "5", "-q", *extra]


# --------------------------------------------------------------------------------------------------
# bad images: (id, maker(folder, monkeypatch) -> path, phrase the message must contain)


def _sform(col_a, col_b, col_c, origin=(-62, -62, -62)):
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 2], m[:3, 3] = col_a, col_b, col_c, origin
    return m


def _gz_cut(fraction=None, drop=None):
    def make(d, mp):
        data = good_gz()
        return write(d / "cut.nii.gz_raw", data[:int(len(data) * fraction)] if fraction else data[:-drop])
    return make


def _renamed(make, name):
    def inner(d, mp):
        p = make(d, mp)
        return p.rename(p.with_name(name))
    return inner


def _corrupt_gz(d, mp):
    data = bytearray(good_gz())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xA5 for b in data[mid:mid + 16])
    return write(d / "corrupt.nii.gz_raw", bytes(data))


def _bad_crc(d, mp):
    data = bytearray(good_gz())
    data[-8:-4] = b"\0\0\0\0"
    return write(d / "crc.nii.gz_raw", bytes(data))


def _unreadable_access(d, mp):
    """os.access says no (what chmod 000 gives a non-root user)."""
    p = write(d / "locked.nii.gz", nifti_bytes(blob()))
    real = os.access
    mp.setattr(os, "access", lambda f, mode, *a, **k: False if Path(f) == p else real(f, mode, *a, **k))
    return p


def _unreadable_open(d, mp):
    """open() fails with EACCES although access() said yes (ACLs, NFS root squash...)."""
    p = write(d / "denied.nii.gz", nifti_bytes(blob()))

    def fake_open(f, *a, **k):
        if Path(f) == p:
            raise PermissionError(errno.EACCES, "Permission denied", str(f))
        return open(f, *a, **k)
    mp.setattr(regkl.nifti_read, "open", fake_open, raising=False)
    return p


def _io_error(d, mp):
    """The disk returns EIO while the data are read."""
    p = write(d / "eio.nii.gz", nifti_bytes(blob()))

    class Broken:
        def __init__(self, f):
            self.f = open(f, "rb")

        def read(self, *a):
            raise OSError(errno.EIO, "Input/output error")

        readinto = read

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    mp.setattr(regkl.nifti_read, "open", lambda f, *a, **k: Broken(f) if Path(f) == p else open(f, *a, **k),
               raising=False)
    return p


def _fifo(d, mp):
    d.mkdir(parents=True, exist_ok=True)
    p = d / "fifo.nii.gz"
    os.mkfifo(p)
    return p


def _folder_without_dicom(d, mp):
    p = d / "not_dicom"
    p.mkdir(parents=True)
    (p / "notes.txt").write_text("no images here")
    return p


def _metaimage_huge(d, mp):
    d.mkdir(parents=True, exist_ok=True)
    (d / "huge.raw").write_bytes(b"\0" * 64)
    p = d / "huge.mhd"
    p.write_text("ObjectType = Image\nNDims = 3\nDimSize = 30000 30000 30000\nElementType = MET_FLOAT\n"
                 "ElementSpacing = 1 1 1\nElementDataFile = huge.raw\n")
    return p


def _metaimage_truncated(d, mp):
    import SimpleITK as sitk

    d.mkdir(parents=True, exist_ok=True)
    p = d / "cut.mha"
    sitk.WriteImage(sitk.GetImageFromArray(blob()), str(p))
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])
    return p


def _nrrd_2d(d, mp):
    import SimpleITK as sitk

    d.mkdir(parents=True, exist_ok=True)
    p = d / "flat.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(blob()[:, :, 0]), str(p))
    return p


def _pair_truncated_img(d, mp):
    d.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Pair(blob(), AFF), str(d / "pair.hdr"))
    img = d / "pair.img"
    img.write_bytes(img.read_bytes()[:1000])
    return d / "pair.hdr"


def _nan_fraction(frac):
    def make(d, mp):
        data = blob()
        data.reshape(-1)[:int(round(frac * data.size))] = np.nan
        return write(d / f"nan{int(frac * 100)}.nii.gz", nifti_bytes(data))
    return make


def _nifti(name, data=None, **kw):
    return lambda d, mp: write(d / name, nifti_bytes(blob() if data is None else data, **kw))


_B = blob()
IMAGE_CASES = [
    ("missing", lambda d, mp: d / "missing.nii.gz", "no such file"),
    ("folder_without_dicom", _folder_without_dicom, "folder holds no DICOM series"),
    ("empty_file", lambda d, mp: write(d / "empty.nii", b""), "file is empty"),
    ("fifo_not_regular", _fifo, "not a regular file"),
    ("unreadable_access", _unreadable_access, "not readable"),
    ("unreadable_open_eacces", _unreadable_open, "permission denied"),
    ("io_error_eio", _io_error, "input/output error"),
    ("text_named_nii_gz", lambda d, mp: write(d / "text.nii", b"hello, not an image"), "less than a NIfTI header"),
    ("text_named_nrrd", lambda d, mp: write(d / "text.nrrd", b"hello, not an image"), "not an image file"),
    ("unknown_extension", lambda d, mp: write(d / "image.xyz", nifti_bytes(_B)), "not an image file"),
    ("wrong_magic", _nifti("magic.nii", fields={"magic": b"abc"}), "not a NIfTI file"),
    ("pair_magic_in_nii", _nifti("pair.nii", fields={"magic": b"ni1"}), "separate .img"),
    ("truncated_in_header", lambda d, mp: write(d / "h.nii", nifti_bytes(_B)[:200]), "less than a NIfTI header"),
    ("truncated_after_header", lambda d, mp: write(d / "h352.nii", nifti_bytes(_B)[:352]), "file is truncated"),
    ("truncated_half_data", lambda d, mp: write(d / "half.nii", nifti_bytes(_B)[:70000]), "file is truncated"),
    ("truncated_gz_half", _renamed(_gz_cut(0.5), "half.nii.gz"), "file is truncated"),
    ("truncated_gz_in_header", _renamed(_gz_cut(0.002), "head.nii.gz"), "truncated"),
    ("truncated_gz_no_trailer", _renamed(_gz_cut(drop=8), "notrailer.nii.gz"), "does not end properly"),
    ("corrupted_gz_stream", _renamed(_corrupt_gz, "corrupt.nii.gz"), "compressed data are damaged"),
    ("corrupted_gz_crc", _renamed(_bad_crc, "crc.nii.gz"), "CRC check failed"),
    ("gz_trailing_garbage", lambda d, mp: write(d / "garbage.nii.gz_raw", good_gz() + b"garbage").rename(
        d / "garbage.nii.gz"), "does not end properly"),
    ("dims_bigger_than_data", _nifti("big.nii", shape=(64, N, N)), "file is truncated"),
    ("dims_smaller_than_data", _nifti("small.nii", shape=(16, N, N)), "header dimensions do not match the data"),
    ("dims_smaller_than_data_gz", _nifti("small.nii.gz", shape=(16, N, N)), "header dimensions do not match"),
    ("negative_dim", _nifti("negdim.nii", fields={"dim": [3, -N, N, N, 1, 1, 1, 1]}), "not positive"),
    ("zero_dim", _nifti("zerodim.nii", fields={"dim": [3, 0, N, N, 1, 1, 1, 1]}), "not positive"),
    ("invalid_datatype_code", _nifti("dtype.nii", fields={"datatype": 999}), "invalid NIfTI header"),
    ("absurd_vox_offset", _nifti("offset.nii", fields={"vox_offset": 1e20}), "vox_offset"),
    ("extreme_size_nii", _nifti("huge.nii", shape=(30000, 30000, 30000)), "GiB of memory"),
    ("extreme_size_nii_gz", _nifti("huge.nii.gz", shape=(30000, 30000, 30000)), "GiB of memory"),
    ("extreme_size_4d", _nifti("huge4d.nii", shape=(512, 512, 512, 4000)), "GiB of memory"),
    ("extreme_size_metaimage", _metaimage_huge, "GiB of memory"),
    ("truncated_metaimage", _metaimage_truncated, "not an image file"),
    ("truncated_nifti_pair_img", _pair_truncated_img, "cannot read as NIfTI"),
    ("complex_data", _nifti("complex.nii", _B.astype(np.complex64)), "complex-valued"),
    ("rgb_data", _nifti("rgb.nii", data_bytes=b"\x10\x20\x30" * N ** 3, shape=(N, N, N),
                        fields={"datatype": 128, "bitpix": 24}), "RGB"),
    ("nan_almost_all", _nan_fraction(0.99), "voxels are finite"),
    ("all_nan", _nan_fraction(1.0), "every voxel is NaN or infinite"),
    ("all_inf", _nifti("inf.nii.gz", np.full((N, N, N), np.inf, np.float32)), "every voxel is NaN or infinite"),
    ("constant", _nifti("constant.nii.gz", np.full((N, N, N), 7, np.float32)), "image is constant"),
    ("all_zero", _nifti("zeros.nii.gz", np.zeros((N, N, N), np.int16)), "every voxel is 0"),
    ("scaled_to_constant", _nifti("slope0.nii", (_B * 10).astype(np.int16), scl=(1e-30, 5.0)),
     "image is constant"),
    ("image_1d", _nifti("line.nii", _B[:, 0, 0]), "got 1D"),
    ("image_2d", _nifti("flat.nii.gz", _B[:, :, 0]), "got 2D"),
    ("image_2d_nrrd", _nrrd_2d, "got 2D"),
    ("single_slice", _nifti("slice.nii.gz", _B[:, :, :1]), "single slice: 32x32x1 voxels covering 128 x 128 x 4 mm"),
    ("image_5d", _nifti("five.nii.gz", np.stack([_B, _B + 1], -1)[..., None].repeat(2, -1)),
     "5D images are not supported"),
    ("image_6d", _nifti("six.nii", _B[..., None, None, None].repeat(2, 3).repeat(2, 4).repeat(2, 5)),
     "6D images are not supported"),
    ("zero_voxel_size_qform", _nifti("pix0q.nii", sform=None, qform=AFF, pixdim=[0, 4, 4]), "voxel size"),
    ("negative_voxel_size_qform", _nifti("pixnq.nii", sform=None, qform=AFF, pixdim=[4, -4, 4]), "voxel size"),
    ("zero_voxel_size_no_forms", _nifti("pix0.nii", sform=None, pixdim=[4, 0, 4]), "voxel size"),
    ("nan_voxel_size_no_forms", _nifti("pixnan.nii", sform=None, pixdim=[4, 4, np.nan]), "voxel size"),
    ("zero_voxel_size_sform", _nifti("s0.nii", sform=_sform([4, 0, 0], [0, 0, 0], [0, 0, 4])), "zero voxel size"),
    ("singular_sform", _nifti("ssing.nii", sform=_sform([4, 0, 0], [4, 0, 0], [0, 0, 4])), "is singular"),
    ("nan_sform", _nifti("snan.nii", sform=_sform([4, 0, 0], [0, np.nan, 0], [0, 0, 4])), "non-finite"),
    ("inf_sform", _nifti("sinf.nii", sform=_sform([4, 0, 0], [0, 4, 0], [0, 0, 4], [np.inf, 0, 0])),
     "non-finite"),
    ("implausible_voxel_size", _nifti("s1e9.nii", sform=_sform([1e9, 0, 0], [0, 4, 0], [0, 0, 4])),
     "implausible voxel size"),
    ("nan_qform_quaternion", _nifti("qnan.nii", sform=None, qform=AFF, fields={"quatern_b": np.nan}),
     "non-finite"),
    ("volume_index_out_of_range", _nifti("bold.nii.gz", np.stack([_B, _B + 1, _B + 2], -1)),
     "volume 9 requested"),
]


def test_case_count():
    """The number of distinct bad inputs the suite tries (reported in the hardening notes)."""
    total = (len(IMAGE_CASES) + len(TRANSFORM_CASES) + len(OUTPUT_CASES) + len(OVERWRITE_CASES)
             + len(MASK_CASES) + len(CLI_CASES))
    ids = [_id(c) for c in IMAGE_CASES + TRANSFORM_CASES + OUTPUT_CASES + OVERWRITE_CASES + MASK_CASES + CLI_CASES]
    assert len(set(ids)) == len(ids) == total >= 90


def _id(case):
    return case.values[0][0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize("role", ["moving", "fixed"])
@pytest.mark.parametrize("case", IMAGE_CASES, ids=[_id(c) for c in IMAGE_CASES])
def test_bad_image(case, role, good, tmp_path, out, capfd, monkeypatch):
    name, make, phrase = case
    bad = make(tmp_path / "bad", monkeypatch)
    moving, fixed = (bad, good[1]) if role == "moving" else (good[0], bad)
    extra = ["--moving-volume", "9"] if name == "volume_index_out_of_range" else []
    if name == "volume_index_out_of_range" and role == "fixed":
        pytest.skip("--moving-volume only applies to the moving image")
    code, stdout, err = run(register_argv(moving, fixed, out, *extra), capfd)
    assert_one_line_error(code, stdout, err, path=bad, phrase=phrase)
    assert listing(out) == []


@pytest.mark.parametrize("command", ["stats", "metric", "apply", "profile"])
def test_bad_image_other_commands(command, good, tmp_path, out, capfd):
    """The same reader serves every command: one representative bad input each."""
    bad = write(tmp_path / "bad" / "cut.nii", nifti_bytes(_B)[:5000])
    tfm = tmp_path / "identity.txt"
    tfm.write_text("# regkl transform: 4x4 matrix, RAS+ millimetres\n1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    argv = {"stats": ["stats", bad], "metric": ["metric", bad, good[1]],
            "apply": ["apply", tfm, bad, good[1], "-o", out / "a.nii.gz", "-q"],
            "profile": ["profile", bad, good[1], "-o", out / "p.png", "-q"]}[command]
    code, stdout, err = run(argv, capfd)
    assert_one_line_error(code, stdout, err, path=bad, phrase="file is truncated")
    assert listing(out) == []


def test_unreadable_file_library(tmp_path, monkeypatch):
    bad = _unreadable_access(tmp_path, monkeypatch)
    with pytest.raises(InputError, match="file is not readable") as info:
        load_volume(bad)
    assert str(bad) in str(info.value)


def test_transform_folder_library(tmp_path):
    """A folder given as the transform: the reader's message (the command line stops earlier, in click)."""
    from regkl.xfm import load_transform

    with pytest.raises(InputError, match="is a folder, expected a transform file") as info:
        load_transform(tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.skipif(IS_ROOT, reason="running as root: file permissions do not block root's reads "
                                    "(covered by the simulated unreadable_* cases)")
def test_unreadable_file_chmod(good, tmp_path, out, capfd):
    bad = write(tmp_path / "locked.nii.gz", nifti_bytes(_B))
    bad.chmod(0)
    try:
        with pytest.raises(InputError, match="not readable"):
            load_volume(bad)
        code, stdout, err = run(register_argv(bad, good[1], out), capfd)
    finally:
        bad.chmod(0o644)
    assert code == 2 and "not readable" in err and "Traceback" not in err  # click's message (4 lines)


# --------------------------------------------------------------------------------------------------
# bad transforms (regkl apply TRANSFORM MOVING REFERENCE)


def _text(name, content):
    return lambda d: write(d / name, content.encode() if isinstance(content, str) else content)


ITK_HEAD = "#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"


def _sitk_transform(name, make_tx):
    def inner(d):
        import SimpleITK as sitk

        d.mkdir(parents=True, exist_ok=True)
        sitk.WriteTransform(make_tx(sitk), str(d / name))
        return d / name
    return inner


def _bspline(sitk):
    img = sitk.Image([8, 8, 8], sitk.sitkFloat32)
    tx = sitk.BSplineTransformInitializer(img, [3, 3, 3])
    params = list(tx.GetParameters())
    params[len(params) // 3] = 5.0
    tx.SetParameters(params)
    return tx


def _mat(name, n_params):
    def inner(d):
        import scipy.io

        d.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(str(d / name), {"AffineTransform_double_3_3": np.ones((n_params, 1)),
                                          "fixed": np.zeros((3, 1))}, format="4")
        return d / name
    return inner


def _sparse(name, size):
    def inner(d):
        d.mkdir(parents=True, exist_ok=True)
        with open(d / name, "wb") as fh:
            fh.truncate(size)
        return d / name
    return inner


TRANSFORM_CASES = [
    ("tfm_missing", lambda d: d / "missing.tfm", "no such transform file"),
    ("tfm_empty", _text("empty.txt", ""), "transform file is empty"),
    ("tfm_too_large", _sparse("huge.txt", 17 << 20), "too large"),
    ("ras_three_numbers", _text("three.txt", "1 2 3\n"), "not a 4x4 text matrix"),
    ("ras_ragged_rows", _text("ragged.txt", "1 0 0 0\n0 1 0\n0 0 1 0\n0 0 0 1\n"), "not a 4x4 text matrix"),
    ("ras_words", _text("words.txt", "one two three four\n" * 4), "not a 4x4 text matrix"),
    ("ras_binary", _text("binary.txt", bytes(range(256)) * 4), "not a 4x4 text matrix"),
    ("ras_nan", _text("nan.txt", "1 0 0 nan\n0 1 0 0\n0 0 1 0\n0 0 0 1\n"), "non-finite"),
    ("ras_inf", _text("inf.txt", "1 0 0 0\n0 inf 0 0\n0 0 1 0\n0 0 0 1\n"), "non-finite"),
    ("ras_bad_last_row", _text("lastrow.txt", "1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 1 1\n"), "last row"),
    ("ras_singular", _text("singular.txt", "1 0 0 0\n1 0 0 0\n0 0 1 0\n0 0 0 1\n"), "singular"),
    ("ras_zero", _text("zero.txt", "0 0 0 0\n0 0 0 0\n0 0 0 0\n0 0 0 1\n"), "singular"),
    ("ras_5x5", _text("five.txt", "\n".join(["1 0 0 0 0"] * 5) + "\n"), "not a 4x4 text matrix"),
    ("itk_unknown_type", _text("type.tfm", "#Insight Transform File V1.0\nTransform: Nonsense_double_3_3\n"),
     "not a linear 3D ITK transform"),
    ("itk_nan_parameters", _text("nan.tfm", ITK_HEAD + "Parameters: 1 0 0 0 1 0 0 0 nan 0 0 0\n"
                                 "FixedParameters: 0 0 0\n"), "non-finite"),
    ("itk_inf_parameters", _text("inf.tfm", ITK_HEAD + "Parameters: 1 0 0 0 1 0 0 0 1 1e999 0 0\n"
                                 "FixedParameters: 0 0 0\n"), "non-finite"),
    ("itk_eleven_parameters", _text("eleven.tfm", ITK_HEAD + "Parameters: 1 0 0 0 1 0 0 0 1 0 0\n"
                                    "FixedParameters: 0 0 0\n"), "needs 12 parameters"),
    ("itk_scale_without_parameters", _text("scale.tfm", "#Insight Transform File V1.0\nTransform: "
                                           "ScaleTransform_double_3_3\nParameters: \nFixedParameters: 0 0 0\n"),
     "needs 3 parameters"),  # SimpleITK 2.5 crashes (SIGSEGV) reading this file
    ("itk_euler_one_parameter", _text("euler.tfm", "#Insight Transform File V1.0\nTransform: "
                                      "Euler3DTransform_double_3_3\nParameters: 0.1\nFixedParameters: 0 0 0\n"),
     "needs 6 parameters"),  # SimpleITK reads this, with garbage for the 5 missing parameters
    ("itk_word_in_parameters", _text("word.tfm", ITK_HEAD + "Parameters: 1 0 0 0 1 0 0 0 1 abc 0 0\n"
                                     "FixedParameters: 0 0 0\n"), "not all numbers"),
    ("itk_two_parameter_lines", _text("twice.tfm", ITK_HEAD + "Parameters: 1 0 0 0 1 0 0 0 1 0 0 0\n" * 2
                                      + "FixedParameters: 0 0 0\n"), "two 'Parameters:' lines"),
    ("itk_empty_composite", _text("composite.tfm", "#Insight Transform File V1.0\n"
                                  "Transform: CompositeTransform_double_3_3\n"), "holds no transform"),
    ("mat_eleven_parameters", _mat("eleven.mat", 11), "needs 12 parameters"),
    ("itk_singular", _text("singular.tfm", ITK_HEAD + "Parameters: 0 0 0 0 0 0 0 0 0 1 2 3\n"
                           "FixedParameters: 0 0 0\n"), "singular"),
    ("itk_2d", _text("flat.tfm", "#Insight Transform File V1.0\n#Transform 0\n"
                     "Transform: AffineTransform_double_2_2\nParameters: 1 0 0 1 0 0\nFixedParameters: 0 0\n"),
     "expected a 3D transform"),
    ("itk_binary_garbage", _text("garbage.tfm", bytes(range(256)) * 8), "not an ITK text transform"),
    ("itk_h5_garbage", _text("garbage.h5", b"\x89HDF\r\n\x1a\n" + bytes(512)), "not a transform file"),
    ("itk_mat_garbage", _text("garbage.mat", b"MATLAB 5.0" + bytes(300)), "not a MATLAB transform file"),
    ("itk_nonlinear_bspline", _sitk_transform("bspline.tfm", _bspline), "not a linear 3D ITK transform"),
    ("itk_nonlinear_bspline_h5", _sitk_transform("bspline.h5", _bspline), "not linear"),
]


@pytest.mark.parametrize("case", TRANSFORM_CASES, ids=[c[0] for c in TRANSFORM_CASES])
def test_bad_transform(case, good, tmp_path, out, capfd):
    name, make, phrase = case
    bad = make(tmp_path / "bad")
    code, stdout, err = run(["apply", bad, good[0], good[1], "-o", out / "applied.nii.gz", "-q"], capfd)
    assert_one_line_error(code, stdout, err, path=bad, phrase=phrase)
    assert listing(out) == []


@pytest.mark.parametrize("suffix", [".tfm", ".mat", ".h5", ".txt"])
@pytest.mark.parametrize("kind", ["affine", "euler", "similarity", "translation", "composite"])
def test_linear_itk_transforms_read_as_simpleitk_maps_points(tmp_path, kind, suffix):
    """Every accepted linear ITK file gives the matrix SimpleITK's own TransformPoint gives."""
    import SimpleITK as sitk

    from regkl.xfm import load_transform, lps_to_ras

    rng = np.random.default_rng(len(kind) + len(suffix))
    if kind == "affine":
        tx = sitk.AffineTransform(3)
        tx.SetMatrix((np.eye(3) + rng.normal(0, 0.1, (3, 3))).ravel().tolist())
        tx.SetTranslation(rng.normal(0, 10, 3).tolist())
        tx.SetCenter(rng.normal(0, 30, 3).tolist())
    elif kind == "euler":
        tx = sitk.Euler3DTransform(rng.normal(0, 20, 3).tolist(), *rng.normal(0, 0.2, 3).tolist(),
                                   rng.normal(0, 5, 3).tolist())
    elif kind == "similarity":
        tx = sitk.Similarity3DTransform(1.1, (0.1, 0.2, 0.3), 0.2, (1.0, 2.0, 3.0), (10.0, -5.0, 3.0))
    elif kind == "translation":
        tx = sitk.TranslationTransform(3, rng.normal(0, 10, 3).tolist())
    else:
        tx = sitk.CompositeTransform([sitk.Euler3DTransform((0, 0, 0), 0.1, 0.0, 0.2, (1.0, 2.0, 3.0)),
                                      sitk.TranslationTransform(3, (4.0, 5.0, 6.0))])
    path = tmp_path / f"{kind}{suffix}"
    if suffix == ".mat" and kind == "composite":
        pytest.skip("MATLAB transform files hold one transform")
    if suffix == ".txt":
        path.write_text(open_written(sitk, tx, tmp_path))
    else:
        sitk.WriteTransform(tx, str(path))
    pts = rng.normal(0, 50, (5, 3))
    expected = np.array([tx.TransformPoint(tuple(map(float, p))) for p in pts])
    m_lps = lps_to_ras(load_transform(path))
    np.testing.assert_allclose(pts @ m_lps[:3, :3].T + m_lps[:3, 3], expected, atol=1e-6)


def open_written(sitk, tx, folder) -> str:
    sitk.WriteTransform(tx, str(folder / "written.tfm"))
    return (folder / "written.tfm").read_text()


# --------------------------------------------------------------------------------------------------
# outputs that cannot be written


def _disk_full_gzip(mp, folder):
    def fake(raw, path, **kw):
        with open(path, "wb") as fh:
            fh.write(b"\x1f\x8b" + bytes(1000))  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    mp.setattr(regkl.writers, "write_gzip_parallel", fake)


def _disk_full_nii(mp, folder):
    def fake(img, filename):
        Path(filename).write_bytes(bytes(4096))
        raise OSError(errno.ENOSPC, "No space left on device")
    mp.setattr(nib, "save", fake)


def _disk_full_fsync(mp, folder):
    real = os.fsync

    def fake(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith("."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)
    mp.setattr(os, "fsync", fake)


def _not_writable(mp, folder):
    real = os.access
    mp.setattr(os, "access", lambda f, mode, *a, **k: False if Path(f) == folder and mode & os.W_OK
               else real(f, mode, *a, **k))


def _read_only_fs(mp, folder):
    import types

    def fake(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    mp.setattr(regkl.outputs, "tempfile", types.SimpleNamespace(mkstemp=fake))


def _sitk_write_fails(mp, folder):
    import SimpleITK as sitk

    def fake(*a, **k):
        raise RuntimeError("Exception thrown in SimpleITK WriteImage: ... ITK ERROR: could not write file")
    mp.setattr(sitk, "WriteImage", fake)


# (id, output option, output path relative to the out folder (None: special), simulate, phrase)
OUTPUT_CASES = [
    ("out_folder_missing", "-o", "nope/reg.nii.gz", None, "output folder does not exist"),
    ("out_parent_is_a_file", "-o", "afile/reg.nii.gz", None, "output folder is not a folder"),
    ("out_folder_not_writable", "-o", "reg.nii.gz", _not_writable, "not writable"),
    ("out_read_only_filesystem", "-o", "reg.nii.gz", _read_only_fs, "read-only file system"),
    ("disk_full_nii_gz", "-o", "reg.nii.gz", _disk_full_gzip, "no space left"),
    ("disk_full_nii", "-o", "reg.nii", _disk_full_nii, "no space left"),
    ("disk_full_at_fsync_tfm", "--transform-out", "reg.tfm", _disk_full_fsync, "no space left"),
    ("disk_full_at_fsync_matrix", "--matrix-out", "reg.txt", _disk_full_fsync, "no space left"),
    ("writer_error_nrrd", "-o", "reg.nrrd", _sitk_write_fails, "cannot write image"),
    ("transform_out_folder_missing", "--transform-out", "nope/reg.tfm", None, "output folder does not exist"),
]


@pytest.mark.parametrize("case", OUTPUT_CASES, ids=[c[0] for c in OUTPUT_CASES])
def test_output_cannot_be_written(case, good, out, capfd, monkeypatch):
    name, option, rel, simulate, phrase = case
    (out / "afile").write_text("a file, not a folder")
    before = listing(out)
    if simulate:
        simulate(monkeypatch, out)
    dest = out / rel
    code, stdout, err = run(["register", good[0], good[1], option, dest, "--search", "none", "--max-iter", "3",
                             "-q"], capfd)
    assert_one_line_error(code, stdout, err, path=dest, phrase=phrase)
    assert listing(out) == before  # nothing new, no hidden temporary file


def test_failed_write_keeps_previous_output_intact(good, out, capfd, monkeypatch):
    """A run that fails while writing leaves an existing output exactly as it was."""
    dest = out / "reg.nii.gz"
    code, _, err = run(["register", good[0], good[1], "-o", dest, "--search", "none", "--max-iter", "3", "-q"],
                       capfd)
    assert code == 0, err
    previous = digest(dest)
    _disk_full_gzip(monkeypatch, out)
    code, stdout, err = run(["register", good[0], good[1], "-o", dest, "--search", "none", "-q"], capfd)
    assert_one_line_error(code, stdout, err, path=dest, phrase="no space left")
    assert digest(dest) == previous and listing(out) == ["reg.nii.gz"]


# --------------------------------------------------------------------------------------------------
# an output that would overwrite an input


def _same(good, kind):
    moving, fixed = good
    return {"moving": moving, "fixed": fixed, "dot_fixed": Path(os.path.relpath(fixed)),
            "dotdot_moving": moving.parent / ".." / moving.parent.name / moving.name}[kind]


OVERWRITE_CASES = [
    ("register_o_is_moving", "register", "-o", "moving"),
    ("register_o_is_fixed", "register", "-o", "fixed"),
    ("register_o_is_fixed_relative", "register", "-o", "dot_fixed"),
    ("register_o_is_moving_via_dotdot", "register", "-o", "dotdot_moving"),
    ("register_o_is_symlink_to_fixed", "register", "-o", "symlink"),
    ("register_transform_out_is_moving", "register", "--transform-out", "moving"),
    ("register_matrix_out_is_fixed", "register", "--matrix-out", "fixed"),
    ("apply_o_is_moving", "apply", "-o", "moving"),
    ("apply_o_is_reference", "apply", "-o", "fixed"),
    ("apply_o_is_transform", "apply", "-o", "transform"),
]


@pytest.mark.parametrize("case", OVERWRITE_CASES, ids=[c[0] for c in OVERWRITE_CASES])
def test_output_equal_to_input_is_refused(case, good, tmp_path, out, capfd):
    name, command, option, which = case
    moving, fixed = good
    tfm = tmp_path / "identity.txt"
    tfm.write_text("# regkl transform: 4x4 matrix, RAS+ millimetres\n1 0 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    if which == "symlink":
        target = tmp_path / "link.nii.gz"
        target.symlink_to(fixed)
    else:
        target = tfm if which == "transform" else _same(good, which)
    hashes = {p: digest(p) for p in (moving, fixed, tfm)}
    if command == "register":
        argv = ["register", moving, fixed, option, target, "-q"]
    else:
        argv = ["apply", tfm, moving, fixed, "-o", target, "-q"]
    code, stdout, err = run(argv, capfd)
    assert_one_line_error(code, stdout, err, path=target, phrase="overwrite an input")
    assert {p: digest(p) for p in hashes} == hashes


def test_output_equal_to_mask_is_refused(good, tmp_path, capfd):
    mask = write(tmp_path / "mask.nii.gz", nifti_bytes(np.ones((N, N, N), np.uint8)))
    before = digest(mask)
    code, stdout, err = run(["register", good[0], good[1], "--fixed-mask", mask, "-o", mask, "-q",
                             "--search", "none", "--max-iter", "3"], capfd)
    assert digest(mask) == before
    assert_one_line_error(code, stdout, err, path=mask, phrase="overwrite an input")


def test_learn_prior_output_equal_to_input_is_refused(good, tmp_path, capfd):
    import shutil

    moving, fixed = (Path(shutil.copy(p, tmp_path / p.name)) for p in good)  # today the file IS overwritten
    before = digest(fixed)
    code, stdout, err = run(["learn-prior", f"{moving},{fixed}", "-o", fixed, "-q"], capfd)
    assert digest(fixed) == before
    assert_one_line_error(code, stdout, err, path=fixed, phrase="overwrite an input")


# --------------------------------------------------------------------------------------------------
# masks


def _mask(name, data, **kw):
    return lambda d: write(d / name, nifti_bytes(data, **kw))


MASK_CASES = [
    ("fixed_mask_empty", "--fixed-mask", _mask("zeros.nii.gz", np.zeros((N, N, N), np.uint8)), "mask is empty"),
    ("moving_mask_empty", "--moving-mask", _mask("zeros.nii.gz", np.zeros((N, N, N), np.uint8)), "mask is empty"),
    ("fixed_mask_2d", "--fixed-mask", _mask("flat.nii.gz", np.ones((N, N), np.uint8)), "got 2D"),
    ("fixed_mask_missing", "--fixed-mask", lambda d: d / "missing.nii.gz", "no such file"),
    ("fixed_mask_all_nan", "--fixed-mask", _mask("nan.nii.gz", np.full((N, N, N), np.nan, np.float32)),
     "every voxel is NaN"),
    ("stats_mask_other_shape", "stats", _mask("other.nii.gz", np.ones((N, N, N // 2), np.uint8)), "mask shape"),
]


@pytest.mark.parametrize("case", MASK_CASES, ids=[c[0] for c in MASK_CASES])
def test_bad_mask(case, good, tmp_path, out, capfd):
    name, option, make, phrase = case
    bad = make(tmp_path / "bad")
    if option == "stats":
        argv = ["stats", good[1], "--mask", bad]
    else:
        argv = register_argv(good[0], good[1], out, option, bad)
    code, stdout, err = run(argv, capfd)
    assert_one_line_error(code, stdout, err, path=bad, phrase=phrase)
    assert listing(out) == []


def test_mask_on_another_grid_is_accepted(good, tmp_path, out, capfd):
    """register resamples masks: another shape and voxel size is not an error."""
    coarse = np.diag([8.0, 8.0, 8.0, 1.0])
    coarse[:3, 3] = -60.0
    mask = write(tmp_path / "coarse_mask.nii.gz", nifti_bytes(np.ones((16, 16, 16), np.uint8), sform=coarse))
    code, _, err = run(register_argv(good[0], good[1], out, "--fixed-mask", mask), capfd)
    assert code == 0, err


# --------------------------------------------------------------------------------------------------
# usage problems: one line too


CLI_CASES = [
    ("output_is_a_folder", ["register", "{moving}", "{fixed}", "-o", "{out}"], "is a directory"),
    ("mask_is_a_folder", ["register", "{moving}", "{fixed}", "--fixed-mask", "{out}"], "is a directory"),
    ("bins_not_a_number", ["register", "{moving}", "{fixed}", "--bins", "abc"], "not a valid integer"),
    ("transform_is_a_folder", ["apply", "{out}", "{moving}", "{fixed}", "-o", "{out}/a.nii.gz"], "is a directory"),
    ("profile_steps_zero", ["profile", "{moving}", "{fixed}", "--steps", "0"], "--steps must be between 1 and 500"),
    ("profile_range_mm_negative", ["profile", "{moving}", "{fixed}", "--range-mm", "-5"], "--range-mm must be in"),
    ("profile_range_deg_nan", ["profile", "{moving}", "{fixed}", "--range-deg", "nan"], "--range-deg must be in"),
    ("profile_sampling_zero", ["profile", "{moving}", "{fixed}", "--sampling", "0"], "must be in (0, 1]"),
    ("profile_transform_missing", ["profile", "{moving}", "{fixed}", "--transform", "{out}/none.tfm"],
     "none.tfm: no such transform file"),
    ("profile_output_folder_missing", ["profile", "{moving}", "{fixed}", "-o", "{out}/nope/p.png"],
     "nope/p.png: output folder does not exist"),
    ("profile_output_is_fixed", ["profile", "{moving}", "{fixed}", "-o", "{fixed}"], "overwrite an input"),
    ("profile_kl_without_prior", ["profile", "{moving}", "{fixed}", "--metric", "kl"], "needs --prior"),
    ("report_summary_missing", ["report", "{out}/none.json", "-o", "{out}/r.html"], "none.json: no such file"),
    ("report_summary_not_json", ["report", "{fixed}", "-o", "{out}/r.html"], "not a regkl batch summary"),
    ("report_output_is_summary", ["report", "{out}/s.json", "-o", "{out}/s.json"], "overwrite an input"),
    ("batch_report_folder_missing", ["batch", "{bids}", "--report", "{out}/nope/r.html"],
     "r.html: output folder does not exist"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_usage_error_is_one_line(case, good, out, capfd):
    name, argv, phrase = case
    (out / "s.json").write_text("[]")
    bids = out / "bids"
    for sub in ("sub-01/anat", "sub-01/func"):
        (bids / sub).mkdir(parents=True)
    os.link(good[1], bids / "sub-01/anat/sub-01_T1w.nii.gz")
    os.link(good[0], bids / "sub-01/func/sub-01_task-rest_bold.nii.gz")
    before = listing(out)
    argv = [a.format(moving=good[0], fixed=good[1], out=out, bids=bids) for a in argv]
    code, stdout, err = run(argv, capfd)
    assert code == 2 and len(err.strip().splitlines()) == 1 and phrase in err, err
    assert stdout == "" and listing(out) == before, listing(out)


# --------------------------------------------------------------------------------------------------
# images that do not overlap: a registration failure (exit 1), by design not a bad input (exit 2)


def test_images_that_do_not_overlap_exit_1(good, tmp_path, out, capfd):
    far = AFF.copy()
    far[:3, 3] += 500.0  # 500 mm away along each axis
    moving = write(tmp_path / "far.nii.gz", nifti_bytes(blob(seed=2), sform=far))
    code, stdout, err = run(["register", moving, good[1], "-o", out / "reg.nii.gz", "--init", "header",
                             "--search", "none", "-q"], capfd)
    assert code == 1 and stdout == "", err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("regkl: error: ") and "do not overlap" in lines[0], err
    assert "Traceback" not in err and listing(out) == []


# --------------------------------------------------------------------------------------------------
# inputs that are accepted (with a warning where something was fixed)


def _warnings(err):
    return [ln for ln in err.strip().splitlines() if ln.startswith("regkl: warning: ")]


def test_nan_minority_is_a_warning_and_succeeds(good, tmp_path, out, capfd):
    data = blob(seed=2)
    data[:4] = np.nan
    data[-2:, :, :] = np.inf
    moving = write(tmp_path / "some_nan.nii.gz", nifti_bytes(data))
    code, _, err = run(register_argv(moving, good[1], out), capfd)
    assert code == 0, err
    # one warning about the NaN voxels (a capped 5-iteration toy registration may also warn that it ended
    # below its start: that is a separate, correct report of the result)
    warn = [w for w in _warnings(err) if "NaN" in w]
    assert len(warn) == 1 and str(moving) in warn[0] and f"{6 * N * N} NaN/infinite voxels" in warn[0]
    assert sorted(listing(out)) == ["reg.nii.gz", "reg.tfm", "reg.txt"]
    assert np.isfinite(nib.load(str(out / "reg.nii.gz")).get_fdata()).all()


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.int32, np.uint16])
def test_integer_data_with_scl_slope_inter_are_scaled(tmp_path, dtype):
    raw = (blob() * 2).clip(0, 250).astype(dtype)
    p = write(tmp_path / "scaled.nii.gz", nifti_bytes(raw, scl=(0.25, -7.5)))
    vol = load_volume(p)
    np.testing.assert_allclose(vol.data, raw.astype(np.float64) * 0.25 - 7.5, rtol=1e-6, atol=1e-5)
    assert vol.data.dtype == np.float32


def test_scl_slope_zero_means_unscaled(tmp_path):
    raw = (blob() * 10).astype(np.int16)
    np.testing.assert_array_equal(load_volume(write(tmp_path / "s0.nii", nifti_bytes(raw, scl=(0.0, 3.0)))).data,
                                  raw.astype(np.float32))


def test_sform_qform_disagreement_uses_sform_with_one_warning(tmp_path, capfd, good, out):
    qform = AFF.copy()
    qform[:3, 3] += [2.0, 0.0, 0.0]
    p = write(tmp_path / "disagree.nii.gz", nifti_bytes(blob(seed=2), sform=AFF, qform=qform))
    with pytest.warns(UserWarning, match=r"sform and qform disagree by up to 2 mm .* using the sform"):
        vol = load_volume(p)
    np.testing.assert_allclose(vol.vox2ras, AFF, atol=1e-4)
    argv = register_argv(p, good[1], out)
    lta = [str(out / "reg.lta") if str(a).endswith("reg.tfm") else a for a in argv]
    code, _, err = run(lta, capfd)   # the sform is used; an LTA carries the geometry regkl read
    assert code == 0 and len(_warnings(err)) == 1 and "disagree" in err, err
    assert sorted(listing(out)) == ["reg.lta", "reg.nii.gz", "reg.txt"]
    for f in listing(out):
        (out / f).unlink()
    code, _, err = run(argv, capfd)  # ITK reads the qform here: no .tfm that would mean something else
    assert code == 2 and "ITK, ANTs and SimpleITK place this image up to 2 mm" in err and listing(out) == [], err


def test_sform_qform_agreeing_to_float_precision_no_warning(tmp_path, recwarn):
    a = np.deg2rad(17)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag([2.5, 2.5, 3.1])
    m[:3, 3] = [-91.3, 120.7, -33.2]
    load_volume(write(tmp_path / "agree.nii.gz", nifti_bytes(blob(), sform=m, qform=m)))
    assert not [w for w in recwarn if "disagree" in str(w.message)]


def test_qform_only_and_no_forms_are_accepted(tmp_path):
    q = load_volume(write(tmp_path / "q.nii", nifti_bytes(blob(), sform=None, qform=AFF)))
    np.testing.assert_allclose(q.vox2ras, AFF, atol=1e-5)
    base = load_volume(write(tmp_path / "none.nii", nifti_bytes(blob(), sform=None, pixdim=[2, 3, 4])))
    np.testing.assert_allclose(np.linalg.norm(base.vox2ras[:3, :3], axis=0), [2, 3, 4])


def test_zero_pixdim_with_valid_sform_is_accepted_with_warning(tmp_path):
    p = write(tmp_path / "pix0_sform.nii", nifti_bytes(blob(), pixdim=[0, 4, 4]))
    with pytest.warns(UserWarning, match="pixdim"):
        vol = load_volume(p)
    np.testing.assert_allclose(vol.vox2ras, AFF)


def test_flipped_axes_negative_sform_diagonal_is_accepted(tmp_path):
    m = AFF.copy()
    m[0, 0] = -4.0
    np.testing.assert_allclose(load_volume(write(tmp_path / "las.nii", nifti_bytes(blob(), sform=m))).vox2ras, m)


def test_gzip_recognised_by_content_not_name(tmp_path):
    data = blob()
    plain_named_gz = tmp_path / "plain.nii.gz"
    plain_named_gz.write_bytes(nifti_bytes(data))  # not compressed although named .gz
    gz_named_plain = tmp_path / "gz.nii"
    gz_named_plain.write_bytes(gzip.compress(nifti_bytes(data)))
    for p in (plain_named_gz, gz_named_plain):
        np.testing.assert_array_equal(load_volume(p).data, data)


def test_vox_offset_zero_means_data_after_header(tmp_path):
    data = blob()
    np.testing.assert_array_equal(
        load_volume(write(tmp_path / "off0.nii", nifti_bytes(data, fields={"vox_offset": 0}))).data, data)


def test_multi_member_gzip_and_big_endian_and_nifti2(tmp_path):
    data = blob()
    raw = nifti_bytes(data)
    members = gzip.compress(raw[:1000]) + gzip.compress(raw[1000:])
    np.testing.assert_array_equal(load_volume(write(tmp_path / "mm.nii.gz_raw", members).rename(
        tmp_path / "mm.nii.gz")).data, data)
    big = nib.Nifti1Image(data.astype(">f4"), AFF)
    big.header.set_data_dtype(">f4")
    nib.save(big, str(tmp_path / "big.nii"))
    np.testing.assert_array_equal(load_volume(tmp_path / "big.nii").data, data)
    np.testing.assert_array_equal(load_volume(write(tmp_path / "n2.nii.gz", nifti_bytes(data, nifti2=True))).data,
                                  data)


def test_nifti_pair_is_accepted(tmp_path):
    nib.save(nib.Nifti1Pair(blob(), AFF), str(tmp_path / "pair.hdr"))
    vol = load_volume(tmp_path / "pair.hdr")
    np.testing.assert_array_equal(vol.data, blob())
    np.testing.assert_allclose(vol.vox2ras, AFF)


def test_trailing_singleton_axes_are_dropped(tmp_path):
    data = blob()
    vol = load_volume(write(tmp_path / "t1.nii", nifti_bytes(data[..., None, None])))
    assert vol.shape == data.shape


def test_reader_matches_nibabel_on_valid_files(tmp_path):
    """regkl's own NIfTI reader gives nibabel's values and affine for ordinary files."""
    rng = np.random.default_rng(5)
    for i, dtype in enumerate([np.uint8, np.int16, np.float32, np.float64, np.int8, np.uint16]):
        raw = (rng.random((7, 9, 11, 3)) * 100).astype(dtype)
        img = nib.Nifti1Image(raw, AFF)
        img.header.set_slope_inter(*((1.5, 2.0) if i % 2 else (None, None)))
        p = tmp_path / f"v{i}.nii.gz"
        nib.save(img, str(p))
        ref = nib.load(str(p))
        vols, _ = load_series(p)
        np.testing.assert_allclose(np.stack([v.data for v in vols], -1), ref.get_fdata().astype(np.float32),
                                   rtol=1e-6)
        np.testing.assert_allclose(vols[0].vox2ras, ref.affine)


def test_dicom_folder_still_reads(tmp_path):
    from regkl.sitk_images import array_to_sitk

    img = array_to_sitk((blob() * 10).astype(np.int16), AFF)
    folder = write_dicom_series(img, tmp_path / "dicom", orientation="1\\0\\0\\0\\1\\0")
    assert load_volume(folder).shape == (N, N, N)


# --------------------------------------------------------------------------------------------------
# memory check


def test_memory_figure_and_override(tmp_path, monkeypatch):
    p = write(tmp_path / "big.nii", nifti_bytes(blob()))
    monkeypatch.setenv("REGKL_MEMORY_LIMIT_GB", "0.0001")  # ~100 kB
    with pytest.raises(InputError, match=r"needs about 0\.000\d+ GiB of memory .* only 0\.0001 GiB is available") as info:
        load_volume(p)
    assert str(p) in str(info.value)
    monkeypatch.setenv("REGKL_MEMORY_LIMIT_GB", "1")
    assert load_volume(p).shape == (N, N, N)


def test_memory_estimate_and_available_memory():
    from regkl.memory import available_memory, memory_needed

    assert memory_needed((100, 100, 100), 2) == 100 ** 3 * (2 + 4 + 16)
    assert memory_needed((100, 100, 100), 2, compressed=True, scaled=True) == 100 ** 3 * (4 + 8 + 16)
    assert memory_needed((10, 10, 10, 50), 4) == 10 ** 3 * 50 * (4 + 4) + 10 ** 3 * 16
    avail = available_memory()
    assert avail is None or 0 < avail < 1 << 50


# --------------------------------------------------------------------------------------------------
# atomic writes


def test_atomic_path_leaves_nothing_on_error_and_keeps_old_file(tmp_path):
    dest = tmp_path / "x.txt"
    dest.write_text("old")
    with pytest.raises(ZeroDivisionError):
        with atomic_path(dest) as tmp:
            Path(tmp).write_text("half")
            1 / 0
    assert dest.read_text() == "old" and listing(tmp_path) == ["x.txt"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(dest) as tmp:
            Path(tmp).write_text("half")
            raise KeyboardInterrupt
    assert dest.read_text() == "old" and listing(tmp_path) == ["x.txt"]
    with atomic_path(dest) as tmp:
        assert re.match(TEMP_PATTERN, Path(tmp).name) and Path(tmp).parent == tmp_path
        Path(tmp).write_text("new")
    assert dest.read_text() == "new" and listing(tmp_path) == ["x.txt"]


def test_atomic_path_fsyncs_file_then_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    with atomic_path(tmp_path / "y.txt") as tmp:
        Path(tmp).write_text("data")
    assert len(synced) == 2 and Path(synced[0]).name.startswith(".y.txt.")
    assert os.path.realpath(synced[1]) == os.path.realpath(tmp_path)


def test_atomic_path_permissions_follow_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "z.txt") as tmp:
            Path(tmp).write_text("data")
    finally:
        os.umask(old)
    assert (tmp_path / "z.txt").stat().st_mode & 0o777 == 0o640


def test_output_group_is_all_or_nothing(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    with pytest.raises(OutputError, match="no space left"):
        with output_group():
            with atomic_path(a) as tmp:
                Path(tmp).write_text("a")
            with atomic_path(b):
                raise OSError(errno.ENOSPC, "No space left on device")
    assert listing(tmp_path) == []
    with output_group():
        with atomic_path(a) as tmp:
            Path(tmp).write_text("a")
        assert not a.exists()  # published only when the group ends
        with atomic_path(b) as tmp:
            Path(tmp).write_text("b")
    assert a.read_text() == "a" and b.read_text() == "b" and listing(tmp_path) == ["a.txt", "b.txt"]
    with pytest.raises(OutputError, match="two outputs have the same path"):
        with output_group():
            for _ in range(2):
                with atomic_path(a) as tmp:
                    Path(tmp).write_text("again")
    assert a.read_text() == "a" and listing(tmp_path) == ["a.txt", "b.txt"]


def test_register_outputs_all_or_nothing(good, out, capfd, monkeypatch):
    _disk_full_gzip(monkeypatch, out)  # the image is written last, after both transforms
    code, _, err = run(register_argv(good[0], good[1], out), capfd)
    assert code == 2 and listing(out) == [], err


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import regkl.writers
    real = regkl.writers.write_gzip_parallel
    def slow(raw, path, **kw):
        with open(path, "wb") as fh:
            fh.write(raw[: len(raw) // 3])
            fh.flush()
            open(sys.argv[-1], "w").close()  # tell the test we are mid-write
            time.sleep(60)
    regkl.writers.write_gzip_parallel = slow
    from regkl.cli import main
    main(sys.argv[1:-1])
""")


def test_killed_mid_write_leaves_no_partial_output(good, tmp_path, out):
    """SIGKILL during the write: no output file; only a hidden temporary file a later run ignores."""
    flag = tmp_path / "writing"
    dest = out / "reg.nii.gz"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, "register", str(good[0]), str(good[1]), "-o",
                             str(dest), "--search", "none", "--max-iter", "3", "-q", str(flag)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert flag.exists(), proc.stderr.read().decode() if proc.poll() is not None else "timeout"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    assert not dest.exists()
    stale = stale_temp_files(out)
    assert len(stale) == 1 and stale[0].name.startswith(".reg.nii.gz.") and listing(out) == [stale[0].name]


def test_debug_shows_the_traceback_for_a_bad_input(good, tmp_path, capfd):
    bad = write(tmp_path / "cut.nii", nifti_bytes(_B)[:1000])
    with pytest.raises(InputError, match="file is truncated"):
        main(["register", str(bad), str(good[1]), "--debug"])
