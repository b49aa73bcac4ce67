"""NIfTI-1/-2 files (``.nii``, ``.nii.gz``, ``.hdr``/``.img`` pairs) read by regkl itself with
nibabel's header classes, every problem an :class:`~regkl.errors.InputError` naming the file (see
:mod:`regkl.io` for what is checked and decided)."""

from __future__ import annotations

import contextlib
import io as _io
import math
import os
from pathlib import Path

import numpy as np

from .errors import InputError
from .memory import _GIB, _gib, check_memory
from .quiet import _captured_library_messages, _oserror_text, _short


#: sform and qform further apart than this (mm, at the grid's corners) give a warning.
SFORM_QFORM_TOL_MM = 1e-3
#: Largest plausible NIfTI ``vox_offset`` (bytes of header and extensions before the data).
MAX_VOX_OFFSET = 64 << 20
_GZIP_MAGIC = b"\x1f\x8b"


class _Raw:
    """What a reader returns: the array in (i, j, k[, t, ...]) order, its geometry and notes."""

    def __init__(self, data, vox2ras, header, matrix_name, notes):
        self.data, self.vox2ras, self.header = data, vox2ras, header
        self.matrix_name, self.notes = matrix_name, notes


class _Gunzip:
    """A gzip file read member by member with a decompressor object, so that every problem is
    told apart: damaged data or a failed CRC, a stream cut before the image data are complete, a
    cut-off end marker, or extra bytes after it (zero padding after the last member is accepted,
    as gzip does). Offers ``readinto``/``read``/``close`` like a file.
    """

    CHUNK = 1 << 20

    def __init__(self, fh, path):
        try:
            from isal import isal_zlib as zlib  # ~3x faster than zlib, same interface
        except ImportError:  # pragma: no cover - isal is a dependency
            import zlib
        self._zlib, self._fh, self._path = zlib, fh, path
        self._d = zlib.decompressobj(wbits=31)
        self._input = b""  # compressed bytes not yet given to the decompressor
        self._output = memoryview(b"")  # decompressed bytes not yet delivered
        self._done = False
        self.produced = 0

    def close(self):
        self._fh.close()

    def _raw(self) -> bytes:
        try:
            return self._fh.read(self.CHUNK)
        except OSError as exc:
            raise InputError(f"cannot read: {_oserror_text(exc)}", path=self._path) from exc

    def _decompress_more(self) -> None:
        while not self._done:
            if self._d.eof:  # a member ended (CRC and size checked): another member, padding or garbage?
                rest = self._d.unused_data or self._raw()
                if not rest:
                    self._done = True
                    return
                if rest[:2] != _GZIP_MAGIC:
                    while rest and not rest.strip(b"\0"):
                        rest = self._raw()
                    if not rest:
                        self._done = True
                        return
                    raise InputError("the compressed stream does not end properly (extra bytes after its end "
                                     "marker)", path=self._path)
                self._d = self._zlib.decompressobj(wbits=31)
                self._input = rest
                continue
            data = self._d.unconsumed_tail or self._input or self._raw()
            self._input = b""
            if not data:
                if self.produced == 0:
                    raise InputError("file is truncated (the compressed stream ends inside the header)",
                                     path=self._path)
                raise _GzipCut(self.produced)
            try:
                out = self._d.decompress(data, self.CHUNK)
            except Exception as exc:  # noqa: BLE001 - zlib.error / IsalError: damaged data or CRC
                reason = _short(exc)
                if "check" in reason.lower():  # zlib "incorrect data check", ISA-L "Incorrect checksum found"
                    reason = f"CRC check failed ({reason})"
                raise InputError(f"compressed data are damaged: {reason}", path=self._path) from exc
            if out:
                self._output = memoryview(out)
                self.produced += len(out)
                return

    def readinto(self, view) -> int:
        if not len(self._output):
            self._decompress_more()
        n = min(len(view), len(self._output))
        view[:n] = self._output[:n]
        self._output = self._output[n:]
        return n

    def read(self, n: int) -> bytes:
        buf = bytearray(n)
        return bytes(buf[:_fill(self, memoryview(buf))])


class _GzipCut(Exception):
    """The compressed input ended before the end of a gzip member (after ``produced`` bytes)."""

    def __init__(self, produced):
        super().__init__(produced)
        self.produced = produced


def _open_data(path: Path):
    """(binary file object, compressed?) — gzip recognised by its magic bytes, not the name."""
    fh = open(path, "rb")
    try:
        magic = fh.read(2)
        fh.seek(0)
    except OSError:
        fh.close()
        raise
    if magic != _GZIP_MAGIC:
        return fh, False
    return _Gunzip(fh, path), True


def _fill(fh, view) -> int:
    """Read into ``view`` until it is full or the stream ends; returns the bytes read."""
    got = 0
    while got < len(view):
        n = fh.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _check_shape(shape, path):
    """Raise InputError unless the header gives at least one voxel along every dimension."""
    if not shape or any(s <= 0 for s in shape):
        raise InputError(f"header dimensions {shape} are not positive (the image holds no voxels)", path=path)


def _check_dtype(dtype, path):
    dtype = np.dtype(dtype)
    if dtype.fields is not None:
        raise InputError(f"RGB/RGBA (structured {dtype}) images are not supported; convert to one channel",
                         path=path)
    if dtype.kind == "c":
        raise InputError(f"complex-valued images ({dtype.name}) are not supported; use the magnitude", path=path)
    if dtype.kind not in "biuf":
        raise InputError(f"unsupported data type {dtype}", path=path)
    return dtype


def _header_class(head: bytes, path):
    import nibabel as nib

    if len(head) >= 8 and head[4:8] == b"n+2\x00":
        return nib.Nifti2Header
    if len(head) >= 348 and head[344:348] == b"n+1\x00":
        return nib.Nifti1Header
    if len(head) < 348:
        raise InputError(f"file is truncated or not NIfTI: {len(head)} bytes, less than a NIfTI header "
                         "(348 bytes)", path=path)
    if head[344:348] == b"ni1\x00":
        raise InputError("header says the data are in a separate .img file (NIfTI pair); name it .hdr", path=path)
    raise InputError("not a NIfTI file (no NIfTI-1 'n+1' or NIfTI-2 'n+2' magic in the header)", path=path)


def _pixdim_geometry_check(raw_hdr, hdr, ndim, path):
    """Voxel sizes must be positive when they define the geometry (no sform)."""
    if int(hdr["sform_code"]) > 0:
        return
    pix = np.asarray(raw_hdr["pixdim"][1:1 + max(1, min(3, ndim))], dtype=np.float64)
    if not np.all(np.isfinite(pix)) or np.any(pix <= 0):
        source = "qform" if int(hdr["qform_code"]) > 0 else "voxel sizes alone (no sform or qform)"
        raise InputError(f"voxel size (pixdim) {[float(v) for v in pix]} mm is not positive/finite, and the "
                         f"geometry comes from the {source}", path=path)


def _grid_corners(shape) -> np.ndarray:
    dims = [max(int(s), 1) for s in tuple(shape)[:3]] + [1] * (3 - min(len(shape), 3))
    corners = np.array(np.meshgrid(*[[0, d - 1] for d in dims], indexing="ij")).reshape(3, -1)
    return np.vstack([corners, np.ones((1, corners.shape[1]))])


def _nifti_affine(hdr, shape, notes):
    """(vox2ras, name) following nibabel: sform if sform_code > 0, else qform, else voxel sizes."""
    scode, qcode = int(hdr["sform_code"]), int(hdr["qform_code"])
    with np.errstate(all="ignore"):
        if scode > 0:
            sform = hdr.get_sform()
            if qcode > 0:
                try:
                    qform = hdr.get_qform()
                    gap = float(np.max(np.linalg.norm(((sform - qform) @ _grid_corners(shape))[:3], axis=0)))
                except Exception:  # noqa: BLE001 - a broken qform is only worth a warning here
                    gap = float("nan")
                if not np.isfinite(gap):
                    notes.append(f"qform is invalid; using the sform (sform_code {scode})")
                elif gap > SFORM_QFORM_TOL_MM:
                    notes.append(f"sform and qform disagree by up to {gap:.3g} mm at the image corners; "
                                 f"using the sform (sform_code {scode}), as nibabel does")
            return sform, "voxel-to-world matrix (sform)"
        if qcode > 0:
            return hdr.get_qform(), "voxel-to-world matrix (qform)"
        notes.append(NO_ORIENTATION_NOTE.format(what="header has no orientation (qform_code and sform_code are 0)"))
        return itk_placement(hdr.get_zooms()), "voxel-to-world matrix (from voxel sizes; no sform or qform)"


#: The warning for an image whose header gives no orientation (``what`` says which header).
NO_ORIENTATION_NOTE = ("{what}: placed as ITK, ANTs and SimpleITK place it (voxel 0 at the world origin, axes toward "
                       "left, posterior, superior), so regkl's transform files mean the same in those tools; "
                       "nibabel, FSL and SPM place it differently: give the image a qform/sform if that matters")


def itk_placement(zooms) -> np.ndarray:
    """vox2ras (4, 4) that ITK (and so ANTs and SimpleITK) gives an image without orientation.

    ITK reads a NIfTI file with ``qform_code = sform_code = 0``, and an Analyze 7.5 file, with
    origin 0 and identity direction in its LPS world: RAS ``diag(-dx, -dy, dz)``. nibabel instead
    centres the grid and flips only x (Analyze's LAS), which would make every transform regkl
    writes mean something else in the tools that read it.

    Parameters
    ----------
    zooms : sequence of float
        Voxel sizes (mm); the first three are used (1 for missing ones).
    """
    dx, dy, dz = (list(float(abs(z)) for z in tuple(zooms)[:3]) + [1.0, 1.0, 1.0])[:3]
    return np.diag([-dx, -dy, dz, 1.0])


def _read_nifti(path: Path) -> _Raw:
    """Read a single-file NIfTI-1/2 (.nii or .nii.gz) with every check of the module docstring."""
    notes: list = []
    try:
        fh, compressed = _open_data(path)
    except OSError as exc:
        raise InputError(f"cannot read: {_oserror_text(exc)}", path=path) from exc
    with contextlib.closing(fh), _captured_library_messages(notes):
        try:
            head = bytearray(544)
            head = bytes(head[:_fill(fh, memoryview(head))])
        except OSError as exc:
            raise InputError(f"cannot read: {_oserror_text(exc)}", path=path) from exc
        except _GzipCut as exc:
            raise InputError("file is truncated (the compressed stream ends inside the header)", path=path) from exc
        klass = _header_class(head, path)
        try:
            raw_hdr = klass(head[:klass.sizeof_hdr], check=False)
            hdr = klass(head[:klass.sizeof_hdr], check=True)
            shape = tuple(int(s) for s in hdr.get_data_shape())
            dtype = _check_dtype(hdr.get_data_dtype(), path)
            slope, inter = hdr.get_slope_inter()
            vox_offset = float(raw_hdr["vox_offset"])
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types for invalid headers
            raise InputError(f"invalid NIfTI header: {_short(exc)}", path=path) from exc
        _check_shape(shape, path)
        if not (np.isfinite(vox_offset) and 0 <= vox_offset <= MAX_VOX_OFFSET):
            raise InputError(f"header's data offset (vox_offset {vox_offset:g}) is not plausible", path=path)
        offset = max(int(vox_offset), klass.sizeof_hdr + 4)  # < minimum: data right after (as niftilib)
        scaled = slope is not None and (slope != 1.0 or inter != 0.0)
        check_memory(shape, dtype, path, compressed=compressed, scaled=scaled, extra=offset)
        _pixdim_geometry_check(raw_hdr, hdr, len(shape), path)
        nbytes = math.prod(shape) * dtype.itemsize
        expected = offset + nbytes
        if not compressed:
            size = os.fstat(fh.fileno()).st_size
            _check_data_size(size, expected, shape, dtype, offset, path, compressed)
        try:
            buf = bytearray(expected)
            n0 = min(len(head), expected)
            buf[:n0] = head[:n0]
            got = n0 + _fill(fh, memoryview(buf)[n0:])
            if got == expected:  # read on: more data than the header says? (and the gzip end checks)
                got += len(head) - n0 if len(head) > expected else len(fh.read(1))
        except (MemoryError, OverflowError) as exc:
            raise InputError(f"not enough memory to read the image ({_gib(expected)} GiB)", path=path) from exc
        except OSError as exc:
            raise InputError(f"cannot read: {_oserror_text(exc)}", path=path) from exc
        except _GzipCut as exc:
            if exc.produced >= expected:
                raise InputError("the compressed stream does not end properly (its end marker is cut off)",
                                 path=path) from exc
            got = exc.produced
        _check_data_size(got, expected, shape, dtype, offset, path, compressed)
        try:
            data = np.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape, order="F")
            if scaled:
                data = data * np.float64(slope) + np.float64(inter)
            header = klass.from_fileobj(_io.BytesIO(bytes(buf[:offset])), check=True)
            vox2ras, name = _nifti_affine(hdr, shape, notes)
        except InputError:
            raise
        except MemoryError as exc:
            raise InputError(f"not enough memory to read the image ({expected / _GIB:.1f} GiB)", path=path) from exc
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"invalid NIfTI header: {_short(exc)}", path=path) from exc
    notes[:] = list(dict.fromkeys(notes))
    return _Raw(data, vox2ras, header, name, notes)


def _check_data_size(got, expected, shape, dtype, offset, path, compressed):
    if got == expected:
        return
    what = f"header dimensions {shape} of {dtype.name} need {expected - offset} bytes of data after byte {offset}"
    if got < expected:
        raise InputError(f"file is truncated: {what}, the file holds {max(got - offset, 0)}", path=path)
    more = "more" if compressed and got == expected + 1 else f"{got - offset}"
    raise InputError(f"header dimensions do not match the data: {what}, the file holds {more}", path=path)


def _read_nifti_pair(path: Path) -> _Raw:
    """NIfTI/Analyze pairs (.hdr/.img): nibabel, checked the same way where it applies."""
    import nibabel as nib

    notes: list = []
    with _captured_library_messages(notes):
        try:
            img = nib.load(str(path), mmap=False)
            shape = tuple(int(s) for s in img.shape)
            dtype = _check_dtype(img.get_data_dtype(), path)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types for damaged files
            raise InputError(f"cannot read as NIfTI: {_short(exc)}", path=path) from exc
        _check_shape(shape, path)
        check_memory(shape, dtype, path, scaled=True)
        try:
            data = np.asanyarray(img.dataobj)  # read here, inside the try, not lazily later
            vox2ras, name = img.affine, "voxel-to-world matrix"
            hdr = img.header
            if not isinstance(hdr, nib.Nifti1Header):
                notes.append(NO_ORIENTATION_NOTE.format(what="Analyze 7.5 file (its header has no orientation)"))
                vox2ras, name = itk_placement(hdr.get_zooms()), "voxel-to-world matrix (from voxel sizes)"
            elif int(hdr["sform_code"]) == 0 and int(hdr["qform_code"]) == 0:
                notes.append(NO_ORIENTATION_NOTE.format(
                    what="header has no orientation (qform_code and sform_code are 0)"))
                vox2ras, name = itk_placement(hdr.get_zooms()), "voxel-to-world matrix (from voxel sizes)"
        except MemoryError as exc:
            raise InputError("not enough memory to read the image", path=path) from exc
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"cannot read as NIfTI: {_short(exc)}", path=path) from exc
    if vox2ras is None:
        raise InputError("image has no voxel-to-world matrix", path=path)
    return _Raw(data, vox2ras, img.header.copy(), name, notes)
