"""Fuzzing the readers (hypothesis): generated NIfTI files and transform files either load into a
valid result or raise InputError naming the file; never any other exception, never a warning for
a refused file, and no warning other than regkl's own (a UserWarning naming the file).

The strategies below are shared with ``benchmarks/fuzz_readers.py``, which runs 10 000+ inputs:

    python benchmarks/fuzz_readers.py --n 10000

Here each property runs a few hundred examples (the whole file takes well under a minute).
"""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regkl.errors import InputError
from regkl.io import load_series, load_volume
from regkl.itk_files import LINEAR_ITK_TYPES
from regkl.xfm import load_transform

# --------------------------------------------------------------------------------------------------
# NIfTI files

#: NIfTI datatype codes: every valid one, plus invalid ones.
DATATYPE_CODES = [2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280, 128, 2304, 32, 1792, 1536, 2048, 1, 0, 999, -4]
WILD_FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, 1e-30, 1e30, -3.5, float("nan"), float("inf"), float("-inf")]),
    st.floats(allow_nan=True, allow_infinity=True, width=32))
PLAIN_FLOATS = st.floats(-300, 300, allow_nan=False, width=32)


def _dtype_for(code):
    try:
        return np.dtype(nib.nifti1.data_type_codes.dtype[code])
    except KeyError:
        return np.dtype(np.uint8)


def _pick(draw, rng, sane, wild, p_wild=0.2):
    """``sane`` most of the time, else a draw from the ``wild`` strategy (hypothesis-controlled)."""
    return draw(wild) if rng.random() < p_wild else sane


@st.composite
def nifti_files(draw):
    """(file suffix, bytes) of a single-file NIfTI-1/2: random header fields, data and damage.

    Each field is plausible most of the time and wild otherwise, so that both accepted and
    refused files are common and every check is reached.
    """
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    nifti2 = draw(st.booleans())
    hdr = nib.Nifti2Header() if nifti2 else nib.Nifti1Header()
    ndim = _pick(draw, rng, int(rng.choice([3, 3, 3, 4])), st.integers(1, 7), 0.3)
    shape = [int(rng.integers(2, 8)) for _ in range(ndim)]
    if rng.random() < 0.2:
        shape[int(rng.integers(ndim))] = 1
    code = _pick(draw, rng, int(rng.choice([2, 4, 16, 64, 256, 512, 768])), st.sampled_from(DATATYPE_CODES), 0.2)
    dtype = _dtype_for(code)
    nvox = int(np.prod(shape))
    if dtype.kind == "f" and rng.random() < 0.7:
        values = rng.normal(50, 20, nvox)
        values[rng.random(nvox) < rng.choice([0.0, 0.0, 0.1, 0.6, 1.0])] = np.nan
        body = values.astype(dtype).tobytes()
    elif dtype.kind in "iu" and rng.random() < 0.7:
        info = np.iinfo(dtype)
        body = rng.integers(max(info.min, -1000), min(info.max, 1000), nvox, endpoint=True).astype(dtype).tobytes()
    else:  # random bytes: for float types this makes NaNs, infinities and denormals too
        body = rng.integers(0, 256, nvox * dtype.itemsize, dtype=np.uint8).tobytes()
    if rng.random() < 0.05:  # a constant image
        body = bytes(len(body))
    dims = [ndim] + shape + [1] * (7 - ndim)
    if rng.random() < 0.1:  # header dims that do not match the data (incl. huge and negative)
        dims[int(rng.integers(0, 8))] = draw(st.sampled_from([0, -1, 2, 9, 100, 30000, 32767]))
    hdr["dim"] = dims
    hdr["datatype"] = code
    hdr["bitpix"] = dtype.itemsize * 8
    hdr["pixdim"] = [float(rng.choice([1.0, 1.0, -1.0, 0.0]))] + [
        _pick(draw, rng, float(rng.choice([1.0, 2.5, 3.0])), WILD_FLOATS, 0.1) for _ in range(7)]
    hdr["vox_offset"] = _pick(draw, rng, 544 if nifti2 else 352, st.sampled_from([0, 100, 352, 400, 1e12]), 0.1)
    hdr["scl_slope"], hdr["scl_inter"] = _pick(
        draw, rng, (1.0, 0.0) if rng.random() < 0.6 else (float(rng.uniform(0.01, 4)), float(rng.normal(0, 50))),
        st.tuples(WILD_FLOATS, WILD_FLOATS), 0.15)
    hdr["sform_code"] = _pick(draw, rng, int(rng.choice([0, 1, 2, 4])), st.sampled_from([3, 7, -1]), 0.1)
    hdr["qform_code"] = _pick(draw, rng, int(rng.choice([0, 1, 2])), st.sampled_from([3, 7, -1]), 0.1)
    srows = np.diag(rng.uniform(0.5, 4, 3)) @ _rotation(rng)
    srows = np.hstack([srows, rng.uniform(-100, 100, (3, 1))])
    if rng.random() < 0.2:
        srows[int(rng.integers(3)), int(rng.integers(4))] = draw(WILD_FLOATS)
    if rng.random() < 0.05:
        srows[:, int(rng.integers(3))] = 0.0  # a zero voxel size
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = srows
    quat = rng.normal(0, 0.3, 3)
    for key, value in zip(("quatern_b", "quatern_c", "quatern_d"), quat):
        hdr[key] = _pick(draw, rng, float(value), WILD_FLOATS, 0.05)
    for key in ("qoffset_x", "qoffset_y", "qoffset_z"):
        hdr[key] = _pick(draw, rng, float(rng.uniform(-100, 100)), WILD_FLOATS, 0.05)
    if rng.random() < 0.05:
        hdr["magic"] = draw(st.sampled_from([b"ni1", b"n+2", b"n+1", b"", b"xyz"]))
    ext = b"\0\0\0\0" if rng.random() < 0.9 else b"\x01\0\0\0" + rng.integers(0, 256, 16, np.uint8).tobytes()
    raw = hdr.binaryblock + ext + body
    gz = bool(rng.random() < 0.5)
    data = gzip.compress(raw, compresslevel=1, mtime=0) if gz else raw
    data = _damage(draw, rng, data, p=0.3)
    suffix = ".nii.gz" if (gz if rng.random() < 0.9 else not gz) else ".nii"
    return suffix, data


def _rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def _damage(draw, rng, data: bytes, p: float) -> bytes:
    """With probability ``p``: truncate, change bytes, append garbage or zero a run (positions from rng)."""
    if not data or rng.random() >= p:
        return data
    how = draw(st.sampled_from(["truncate", "flip", "append", "zero_run", "truncate_and_flip"]))
    buf = bytearray(data)
    if how in ("flip", "truncate_and_flip"):
        for _ in range(int(rng.integers(1, 9))):
            buf[int(rng.integers(len(buf)))] ^= int(rng.integers(1, 256))
    if how in ("truncate", "truncate_and_flip"):
        buf = buf[:int(rng.integers(len(buf)))]
    if how == "append":
        buf += draw(st.binary(min_size=1, max_size=64))
    if how == "zero_run":
        start = int(rng.integers(len(buf)))
        buf[start:start + 64] = bytes(len(buf[start:start + 64]))
    return bytes(buf)


@st.composite
def damaged_valid_files(draw):
    """(suffix, bytes): a valid image written by nibabel, then truncated and/or with bytes changed."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    shape = tuple(int(s) for s in rng.integers(2, 7, int(rng.choice([3, 3, 4]))))
    dtype = draw(st.sampled_from([np.uint8, np.int16, np.float32, np.float64]))
    affine = np.eye(4)
    affine[:3, :3] = np.diag(rng.uniform(0.5, 4, 3)) @ _rotation(rng)
    img = nib.Nifti1Image((rng.random(shape) * 100).astype(dtype), affine)
    gz = bool(rng.random() < 0.5)
    data = gzip.compress(img.to_bytes(), mtime=0) if gz else img.to_bytes()
    return (".nii.gz" if gz else ".nii"), _damage(draw, rng, data, p=0.85)


def check_image(path: Path) -> tuple:
    """Load an image both ways: ('ok', '') or ('refused', problem). Anything but InputError propagates."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            vol = load_volume(path)
            series, _ = load_series(path)
        except InputError as exc:
            assert str(path) in str(exc), exc
            assert not caught, [str(w.message) for w in caught]  # a refused file: one line, its error
            return "refused", exc.problem
    for w in caught:  # an accepted file may warn, always as regkl: a UserWarning naming the file
        assert w.category is UserWarning and str(w.message).startswith(str(path)), (w.category, w.message)
    for v in [vol] + list(series):
        assert v.data.dtype == np.float32 and v.data.ndim == 3 and min(v.shape) >= 2
        assert not np.isinf(v.data).any()  # NaN is "no data" (issue 11), announced; never an infinity
        assert not np.isnan(v.data).any() or any("NaN" in str(w.message) for w in caught)
        assert v.vox2ras.shape == (4, 4) and np.all(np.isfinite(v.vox2ras))
        assert abs(np.linalg.det(v.vox2ras[:3, :3])) > 0
    return "ok", ""


# --------------------------------------------------------------------------------------------------
# transform files

TOKENS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-10 ** 6, 10 ** 6).map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e999", "-1e999", "0x10", "abc", "1,5", "--1", "", "1e-400", "+0",
                     "1.5e+3", "NaN", "Infinity", "\x00"]))
TRANSFORM_TYPES = ["AffineTransform_double_3_3", "AffineTransform_float_3_3", "MatrixOffsetTransformBase_double_3_3",
                   "Euler3DTransform_double_3_3", "TranslationTransform_double_3_3", "ScaleTransform_double_3_3",
                   "Similarity3DTransform_double_3_3", "AffineTransform_double_2_2", "CompositeTransform_double_3_3",
                   "BSplineTransform_double_3_3", "IdentityTransform_double_3_3", "Nonsense", ""]


@st.composite
def itk_text(draw):
    if draw(st.booleans()):  # a well-formed file of a linear type, with random values: SimpleITK's path
        kind = draw(st.sampled_from(sorted(LINEAR_ITK_TYPES)))
        n, n_fixed = LINEAR_ITK_TYPES[kind]
        params = [repr(draw(st.one_of(st.floats(-2, 2), PLAIN_FLOATS, st.sampled_from([0.0, 1.0, -1.0]))))
                  for _ in range(n)]
        fixed = [repr(draw(PLAIN_FLOATS)) for _ in range(draw(st.sampled_from(n_fixed)))]
        precision = draw(st.sampled_from(["double", "float"]))
        text = (f"#Insight Transform File V1.0\n#Transform 0\nTransform: {kind}_{precision}_3_3\n"
                f"Parameters: {' '.join(params)}\nFixedParameters: {' '.join(fixed)}\n")
        return draw(st.sampled_from([".tfm", ".txt"])), text.encode()
    n = draw(st.sampled_from([12, 12, 12, 6, 3, 7, 9, 0, 11, 13]))
    near_identity = draw(st.booleans())
    if near_identity:
        base = list(np.eye(3).ravel()) + [0.0, 0.0, 0.0]
        params = [repr(float(b + draw(st.floats(-0.2, 0.2)))) for b in base[:n]] + ["0"] * max(0, n - 12)
        if params and draw(st.booleans()):
            params[draw(st.integers(0, len(params) - 1))] = draw(TOKENS)
    else:
        params = draw(st.lists(TOKENS, min_size=n, max_size=n))
    fixed = draw(st.lists(TOKENS, min_size=0, max_size=4)) if draw(st.booleans()) else ["0", "0", "0"]
    lines = ["#Insight Transform File V1.0", "#Transform 0", f"Transform: {draw(st.sampled_from(TRANSFORM_TYPES))}",
             "Parameters: " + " ".join(params), "FixedParameters: " + " ".join(fixed)]
    edit = draw(st.sampled_from(["none", "none", "drop", "duplicate", "shuffle", "garbage_line"]))
    if edit == "drop":
        del lines[draw(st.integers(0, len(lines) - 1))]
    elif edit == "duplicate":
        i = draw(st.integers(0, len(lines) - 1))
        lines.insert(i, lines[i])
    elif edit == "shuffle":
        lines = draw(st.permutations(lines))
    elif edit == "garbage_line":
        lines.insert(draw(st.integers(0, len(lines))), draw(st.text(max_size=40)))
    suffix = draw(st.sampled_from([".tfm", ".txt", ".tfm"]))
    return suffix, ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")


@st.composite
def ras_text(draw):
    rows = draw(st.sampled_from([4, 4, 4, 3, 5, 0, 1]))
    cols = draw(st.sampled_from([4, 4, 4, 3, 5, 1]))
    m = np.eye(4)
    m[:3, :] += np.array([[draw(st.floats(-0.3, 0.3)) for _ in range(4)] for _ in range(3)]) * draw(
        st.sampled_from([0.0, 1.0, 100.0]))
    lines = []
    for r in range(rows):
        row = [repr(float(m[r % 4, c % 4])) for c in range(cols)]
        if draw(st.integers(0, 5)) == 0:
            row[draw(st.integers(0, len(row) - 1))] = draw(TOKENS)
        lines.append(" ".join(row))
    if draw(st.booleans()):
        lines.insert(0, "# regkl transform: 4x4 matrix, RAS+ millimetres")
    if draw(st.integers(0, 5)) == 0:
        lines.insert(draw(st.integers(0, len(lines))), draw(st.text(max_size=30)))
    if draw(st.integers(0, 9)) == 0:  # a singular or degenerate matrix
        lines = [" ".join(["0"] * 4)] * 3 + ["0 0 0 1"]
    return ".txt", ("\n".join(lines) + "\n").encode("utf-8", "surrogatepass")


BINARY_TRANSFORMS = st.tuples(st.sampled_from([".h5", ".mat", ".tfm", ".txt", ".hdf5"]),
                              st.one_of(st.binary(min_size=1, max_size=600),
                                        st.binary(max_size=300).map(lambda b: b"\x89HDF\r\n\x1a\n" + b),
                                        st.binary(max_size=300).map(lambda b: b"MATLAB 5.0 MAT-file" + b)))
TRANSFORM_FILES = st.one_of(itk_text(), ras_text(), BINARY_TRANSFORMS)


def check_transform(path: Path) -> tuple:
    """load_transform: ('ok', '') or ('refused', problem). Anything but InputError propagates."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            m = load_transform(path)
        except InputError as exc:
            assert str(path) in str(exc), exc
            assert not caught, [str(w.message) for w in caught]
            return "refused", exc.problem
    assert not caught, [str(w.message) for w in caught]
    assert m.shape == (4, 4) and np.all(np.isfinite(m)) and np.allclose(m[3], [0, 0, 0, 1])
    assert abs(np.linalg.det(m[:3, :3])) > 0
    return "ok", ""


# --------------------------------------------------------------------------------------------------
# the properties (a modest number of examples; the benchmark runs 10 000+)

SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                      HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _write(folder, name, suffix, data) -> Path:
    path = folder / f"{name}{suffix}"
    path.write_bytes(data)
    return path


@settings(max_examples=300, **SETTINGS)
@given(case=nifti_files())
def test_generated_nifti_loads_or_raises_input_error(folder, case):
    check_image(_write(folder, "gen", *case))


@settings(max_examples=200, **SETTINGS)
@given(case=damaged_valid_files())
def test_damaged_nifti_loads_or_raises_input_error(folder, case):
    check_image(_write(folder, "dmg", *case))


@settings(max_examples=300, **SETTINGS)
@given(case=TRANSFORM_FILES)
def test_generated_transform_loads_or_raises_input_error(folder, case):
    check_transform(_write(folder, "tfm", *case))
