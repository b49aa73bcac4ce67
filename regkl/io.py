"""Images in and out: NIfTI through nibabel, every other format through SimpleITK.

Everything that comes in is converted to a :class:`~regkl.volume.Volume` (RAS+); everything that
goes out is written atomically (temporary file in the same folder, fsync, rename).

Reading is defensive, because regkl runs unattended over thousands of files: every problem with
an input becomes an :class:`~regkl.errors.InputError` naming the file and the problem (never
another exception), and nothing is allocated before the header has been checked against the
memory available. What is checked, and what is decided:

- NIfTI (``.nii``, ``.nii.gz``) is read by regkl itself with nibabel's header classes: the NIfTI-1
  or NIfTI-2 magic must be present; the header's dimensions and data type must describe exactly
  the data the file holds (a shorter file is truncated, a longer one has wrong dimensions); a
  gzip stream is read to its end, so a damaged stream or a failed CRC is an error, not silent
  garbage. gzip is recognised by its content, whatever the file name says.
- Geometry: the sform when ``sform_code > 0`` (as nibabel and FSL do), else the qform when
  ``qform_code > 0``. Without either (and for Analyze 7.5 ``.hdr``/``.img`` files) the grid is
  placed as ITK, ANTs and SimpleITK place it (:func:`itk_placement`), so the transform files regkl
  writes mean the same in those tools, and a warning says so. Voxel sizes (``pixdim``) that define
  the geometry must be positive and finite (nibabel would silently replace zeros by 1 and negatives
  by their absolute value). When both sform and qform are set and map the grid's corners more than
  :data:`SFORM_QFORM_TOL_MM` apart, the sform is used and a warning says so.
- Shape: at least 2 voxels along each of the three axes (a single slice is refused with its shape
  and extent in mm).
- NaN/infinite voxels mean "no data": they are kept as NaN (a warning gives their number), left
  out of the registration on either side and filled in resampled outputs; an image to register is
  refused when fewer than :data:`MIN_FINITE_VOXELS` voxels are finite (and any image when none is).
- Integer data with ``scl_slope``/``scl_inter`` are scaled (``value * slope + inter``).
- Complex and RGB images, 2D and 5D+ images are refused.
- Size: before any data are read, the memory needed (the file's data, a float copy and
  :data:`WORKING_COPIES` float32 copies of the 3D volume) is compared with the memory available
  (``MemAvailable``, capped by a cgroup limit; ``REGKL_MEMORY_LIMIT_GB`` overrides) and the image
  is refused with both figures when it does not fit.
- Warnings (NaN voxels, header fields nibabel had to fix, sform/qform disagreement, no orientation) are issued
  only when the image is accepted, so a refused image gives exactly one line: its error.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import io as _io
import logging
import math
import os
import re
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from .errors import InputError, OutputError
from .volume import Volume, check_vox2ras

#: LPS <-> RAS flip (its own inverse).
LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

NIFTI_SUFFIXES = (".nii", ".nii.gz")

#: float32 copies of the 3D volume a registration keeps besides the image (pyramid, output, masks).
WORKING_COPIES = 4
#: sform and qform further apart than this (mm, at the grid's corners) give a warning.
SFORM_QFORM_TOL_MM = 1e-3
#: Fewest finite voxels an image to register may have (NaN/infinite voxels are no data).
MIN_FINITE_VOXELS = 512
#: Largest plausible NIfTI ``vox_offset`` (bytes of header and extensions before the data).
MAX_VOX_OFFSET = 64 << 20

_GZIP_MAGIC = b"\x1f\x8b"
_GIB = float(1 << 30)


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(NIFTI_SUFFIXES) or name.endswith((".hdr", ".img", ".img.gz", ".hdr.gz"))


def _short(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(exc).__name__)


def _oserror_text(exc: OSError) -> str:
    """A short, lower-case reason for an OSError (reading or writing)."""
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return "no space left on the device (disk full or quota exceeded)"
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code == errno.EROFS:
        return "read-only file system"
    if code == errno.EISDIR:
        return "is a folder"
    return (exc.strerror or _short(exc)).lower() if exc.strerror else _short(exc)


# --------------------------------------------------------------------------------------------------
# memory


def _read_int(path) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except (OSError, ValueError):
        return None
    return int(text) if text.isdigit() else None


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2 or v1), or None if unlimited/unknown."""
    candidates = []
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            parts = line.split(":", 2)
            if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
                candidates.append(Path("/sys/fs/cgroup") / parts[2].lstrip("/"))
    except OSError:
        pass
    candidates.append(Path("/sys/fs/cgroup"))
    for base in candidates:  # cgroup v2
        limit = _read_int(base / "memory.max")
        usage = _read_int(base / "memory.current")
        if limit is not None and usage is not None:
            return max(limit - usage + _stat_field(base / "memory.stat", "inactive_file"), 0)
    base = Path("/sys/fs/cgroup/memory")  # cgroup v1
    limit = _read_int(base / "memory.limit_in_bytes")
    usage = _read_int(base / "memory.usage_in_bytes")
    if limit is not None and usage is not None and limit < (1 << 60):
        return max(limit - usage + _stat_field(base / "memory.stat", "total_inactive_file"), 0)
    return None


def _stat_field(path, key) -> int:
    """A field of a cgroup memory.stat file (reclaimable page cache), 0 if absent."""
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def available_memory() -> int | None:
    """Bytes of memory regkl may still use, or None when unknown.

    ``REGKL_MEMORY_LIMIT_GB`` (GiB) if set; otherwise the kernel's ``MemAvailable`` (free memory
    plus reclaimable cache; ``SC_AVPHYS_PAGES`` where there is no /proc), capped by the room left
    under a cgroup (container) memory limit.
    """
    override = os.environ.get("REGKL_MEMORY_LIMIT_GB")
    if override:
        try:
            return int(float(override) * _GIB)
        except ValueError:
            pass
    avail = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            avail = None
    room = _cgroup_room()
    if room is not None:
        avail = room if avail is None else min(avail, room)
    return avail


def memory_needed(shape, itemsize: int, *, compressed: bool = False, scaled: bool = False) -> int:
    """Bytes needed to read an image of ``shape`` and register it (an estimate, on the high side).

    The file's data (twice for a gzip file: the decompressed bytes and the array), one float copy
    of the whole image (float64 when scaled by scl_slope/inter) and :data:`WORKING_COPIES` float32
    copies of the 3D volume.
    """
    n = math.prod(int(s) for s in shape)
    n3 = math.prod(int(s) for s in tuple(shape)[:3])
    raw = n * int(itemsize)
    return raw * (2 if compressed else 1) + n * (8 if scaled else 4) + n3 * 4 * WORKING_COPIES


def check_memory(shape, dtype, path, *, compressed: bool = False, scaled: bool = False, extra: int = 0) -> None:
    """Refuse (InputError, with the figures in GiB) an image that does not fit in memory.

    ``extra``: bytes read besides the image data (the NIfTI header and extensions).
    """
    need = memory_needed(shape, np.dtype(dtype).itemsize, compressed=compressed, scaled=scaled) + int(extra)
    avail = available_memory()
    if avail is not None and need > avail:
        raise InputError(f"image of shape {tuple(int(s) for s in shape)} ({np.dtype(dtype).name}) needs about "
                         f"{_gib(need)} GiB of memory to load and register, but only {_gib(avail)} GiB is "
                         "available (set REGKL_MEMORY_LIMIT_GB to override)", path=path)


def _gib(nbytes) -> str:
    g = nbytes / _GIB
    return f"{g:.0f}" if g >= 10 else f"{g:.1f}" if g >= 0.1 else f"{g:.3g}"


# --------------------------------------------------------------------------------------------------
# quiet third-party libraries


@contextlib.contextmanager
def _captured_library_messages(notes: list):
    """nibabel's log lines and Python warnings raised inside become ``notes`` (not stderr lines).

    numpy's floating-point RuntimeWarnings (a header with NaNs...) are dropped: the checks that
    follow report the problem itself.
    """
    import nibabel as nib

    logger = nib.imageglobals.logger
    records = []

    class _Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    saved, propagate = list(logger.handlers), logger.propagate
    collector = _Collect()
    for handler in saved:
        logger.removeHandler(handler)
    logger.addHandler(collector)
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught, np.errstate(all="ignore"):
            warnings.simplefilter("always")
            yield
    finally:
        logger.removeHandler(collector)
        for handler in saved:
            logger.addHandler(handler)
        logger.propagate = propagate
        for msg in dict.fromkeys(records):
            notes.append(f"header problem fixed on reading: {' '.join(msg.split())}")
        for w in caught:
            if not issubclass(w.category, (RuntimeWarning, DeprecationWarning)):
                notes.append(" ".join(str(w.message).split()))


@contextlib.contextmanager
def quiet_native_stderr():
    """Send what C/C++ libraries (ITK, GDCM, HDF5) print on file descriptor 2 to /dev/null.

    SimpleITK reports failures as exceptions, which regkl turns into one-line errors; ITK's
    warnings and HDF5's diagnostics would otherwise add lines to stderr.
    """
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError, OSError):
        pass
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


# --------------------------------------------------------------------------------------------------
# NIfTI


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


# --------------------------------------------------------------------------------------------------
# SimpleITK (other formats, DICOM series folders)


def itk_reason(exc: Exception) -> str:
    """The useful part of an ITK exception message: the text of its ERROR line, without the C++ file,
    line and object address (``ITK ERROR: MetaImageIO(0x55...): File cannot be read`` -> ``File
    cannot be read``)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = next((ln for ln in lines if "ERROR:" in ln), lines[-1] if lines else type(exc).__name__)
    text = text.split("ERROR:", 1)[-1].strip()
    text = re.sub(r"^\w+(<[^>]*>)?\(0x[0-9a-fA-F]+\):\s*", "", text)
    return _short(Exception(text or type(exc).__name__))


def _sitk_pixel_dtype(reader):
    import SimpleITK as sitk

    pid = reader.GetPixelID()
    name = sitk.GetPixelIDValueAsString(pid).lower()
    if "complex" in name:
        raise InputError(f"complex-valued images ({name}) are not supported; use the magnitude",
                         path=reader.GetFileName())
    return 8 if ("64" in name or "double" in name) else 4


def _read_sitk(path: Path) -> _Raw:
    import SimpleITK as sitk

    with quiet_native_stderr():
        try:
            if path.is_dir():
                series = sitk.ImageSeriesReader()
                files = series.GetGDCMSeriesFileNames(str(path))
                if not files:
                    raise InputError("folder holds no DICOM series (give an image file or a DICOM folder)",
                                     path=path)
                info = sitk.ImageFileReader()
                info.SetFileName(files[0])
                info.ReadImageInformation()
                size = tuple(info.GetSize()[:2]) + (len(files),)
                check_memory(size + ((info.GetNumberOfComponents(),) if info.GetNumberOfComponents() > 1 else ()),
                             np.float64 if _sitk_pixel_dtype(info) == 8 else np.float32, path)
                series.SetFileNames(files)
                img = series.Execute()
            else:
                reader = sitk.ImageFileReader()
                reader.SetFileName(str(path))
                reader.ReadImageInformation()
                size = tuple(int(s) for s in reader.GetSize())
                if reader.GetNumberOfComponents() > 1:
                    size = size + (int(reader.GetNumberOfComponents()),)
                if not size or any(s <= 0 for s in size):
                    raise InputError(f"image dimensions {size} are not positive", path=path)
                check_memory(size, np.float64 if _sitk_pixel_dtype(reader) == 8 else np.float32, path)
                img = reader.Execute()
            data, vox2ras = sitk_to_array(img)
        except InputError:
            raise
        except MemoryError as exc:
            raise InputError("not enough memory to read the image", path=path) from exc
        except Exception as exc:  # noqa: BLE001 - ITK raises RuntimeError; anything else is the same
            what = "DICOM series" if path.is_dir() else "image file"
            raise InputError(f"not an {what} regkl can read (NIfTI, NRRD, MetaImage, MINC, ...): "
                             f"{itk_reason(exc)}", path=path) from exc
    _check_dtype(data.dtype, path)
    return _Raw(data, vox2ras, None, "voxel-to-world matrix", [])


def sitk_to_array(img):
    """SimpleITK image -> (array in (i, j, k[, t]) order, vox2ras 4x4)."""
    dim = img.GetDimension()
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(img)  # (k, j, i) or (t, k, j, i), components last
    if img.GetNumberOfComponentsPerPixel() > 1:
        arr = np.moveaxis(arr, -1, 0)  # components become the time axis
        dim_axes = list(range(arr.ndim))
        arr = np.transpose(arr, dim_axes[1:][::-1] + [0])
    else:
        arr = np.transpose(arr, list(range(arr.ndim))[::-1])
    n = min(dim, 3)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(dim, dim)[:n, :n]
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)[:n]
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)[:n]
    vox2lps = np.eye(4)
    vox2lps[:n, :n] = direction @ np.diag(spacing)
    vox2lps[:n, 3] = origin
    return arr, LPS_RAS @ vox2lps


def array_to_sitk(data: np.ndarray, vox2ras: np.ndarray):
    """3D array in (i, j, k) order + vox2ras -> SimpleITK image (LPS physical space)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(data, (2, 1, 0))))
    vox2lps = LPS_RAS @ vox2ras
    spacing = np.linalg.norm(vox2lps[:3, :3], axis=0)
    img.SetSpacing(spacing.tolist())
    img.SetDirection((vox2lps[:3, :3] / spacing).ravel().tolist())
    img.SetOrigin(vox2lps[:3, 3].tolist())
    return img


# --------------------------------------------------------------------------------------------------
# public readers


def check_input_path(path, what: str = "image") -> Path:
    """The path as a Path if it can be read; InputError naming it otherwise.

    Missing, not a regular file or folder (a pipe or device, which could block forever),
    unreadable, or an empty file.
    """
    p = Path(path)
    try:
        if not p.exists():
            raise InputError("no such file or folder", path=p)
        if p.is_dir():
            if not os.access(p, os.R_OK | os.X_OK):
                raise InputError("folder is not readable (permission denied)", path=p)
            return p
        if not p.is_file():
            raise InputError(f"not a regular file (a pipe, socket or device); give an {what} file", path=p)
        if not os.access(p, os.R_OK):
            raise InputError("file is not readable (permission denied)", path=p)
        if p.stat().st_size == 0:
            raise InputError("file is empty", path=p)
    except OSError as exc:  # e.g. a name too long, a path through a file
        raise InputError(f"cannot access: {_oserror_text(exc)}", path=p) from exc
    return p


def _read(path: Path) -> _Raw:
    name = path.name.lower()
    if path.is_dir():
        return _read_sitk(path)
    if name.endswith(NIFTI_SUFFIXES):
        return _read_nifti(path)
    if _is_nifti(path):
        return _read_nifti_pair(path)
    return _read_sitk(path)


def _squeeze(data: np.ndarray) -> np.ndarray:
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def _check_dims(shape, path):
    if len(shape) != 3:
        raise InputError(f"expected a 3D or 4D image, got {len(shape)}D with shape {shape}", path=path)


def _check_extent(shape, vox2ras, path):
    """Refuse a grid with a single voxel along an axis (one slice), with its shape and extent in mm."""
    if min(shape) < 2:
        extent = np.asarray(shape, dtype=np.float64) * np.linalg.norm(np.asarray(vox2ras)[:3, :3], axis=0)
        what = "a single slice" if sorted(shape)[1] >= 2 else "a single line or voxel"
        raise InputError(f"image is {what}: {'x'.join(map(str, shape))} voxels covering "
                         f"{' x '.join(f'{e:.4g}' for e in extent)} mm; registration needs a 3D volume with at "
                         "least 2 voxels along each axis", path=path)


def _clean(data: np.ndarray, path: str, notes: list, *, min_finite: int = 1) -> np.ndarray:
    """float32 C-ordered copy; NaN/infinite voxels become NaN ("no data", a note), or InputError
    when fewer than ``min_finite`` voxels are finite."""
    data = np.ascontiguousarray(data, dtype=np.float32)  # one pass: convert and reorder (NIfTI is F-ordered)
    finite = np.isfinite(data)
    n_good = int(np.count_nonzero(finite))
    n_bad = int(data.size - n_good)
    if n_bad:
        if n_good == 0:
            raise InputError("every voxel is NaN or infinite", path=path)
        if n_good < min_finite:
            raise InputError(f"only {n_good} of {data.size} voxels are finite (the others are NaN or infinite, "
                             f"meaning no data); at least {min_finite} are needed to register", path=path)
        notes.append(f"{n_bad} NaN/infinite voxels ({n_bad / data.size:.1%}) are treated as no data (left out of "
                     "the registration; resampled outputs have the fill value there)")
        data = np.where(finite, data, np.float32(np.nan))
    return data


def _reduce_4d(data: np.ndarray, how, path: str):
    """Reduce a 4D array (I, J, K, T) to 3D; returns (data, note)."""
    n = data.shape[3]
    if isinstance(how, str) and how.lstrip("-").isdigit():
        how = int(how)
    if isinstance(how, (int, np.integer)):
        if not -n <= how < n:
            raise InputError(f"volume {how} requested but the series has {n} volumes (0..{n - 1})", path=path)
        return data[..., how], f"volume {int(how) % n} of {n}"
    if how == "mean":
        return np.mean(data, axis=3, dtype=np.float64), f"mean of {n} volumes"
    if how == "median":
        return np.median(data, axis=3), f"median of {n} volumes"
    raise InputError(f"--moving-volume must be mean, median or a volume index, got {how!r}", path=path)


def _finish(raw: _Raw, path: str, volume, allow_constant=False) -> Volume:
    """Squeeze trailing singleton axes, reduce 4D, check geometry, clean non-finite values.

    Errors come before any note is issued, so a refused image gives exactly one line.
    """
    data = _squeeze(raw.data)
    if data.ndim > 4:
        raise InputError(f"{data.ndim}D images are not supported (shape {data.shape})", path=path)
    if data.ndim < 3:
        raise InputError(f"expected a 3D or 4D image, got {data.ndim}D with shape {data.shape}", path=path)
    _check_dims(data.shape[:3], path)
    vox2ras = check_vox2ras(raw.vox2ras, name=raw.matrix_name, path=path)
    _check_extent(data.shape[:3], vox2ras, path)
    note = ""
    if data.ndim == 4:
        data, note = _reduce_4d(data, volume, path)
    data = _clean(data, path, raw.notes, min_finite=1 if allow_constant else MIN_FINITE_VOXELS)
    if not allow_constant and float(np.nanmax(data)) == float(np.nanmin(data)):
        raise InputError(f"image is constant (every {'finite ' if np.isnan(data).any() else ''}voxel is "
                         f"{float(np.nanmin(data)):g})", path=path)
    return Volume(data, vox2ras, path, note, raw.header)


def _issue(notes, path):
    for text in dict.fromkeys(notes):
        warnings.warn(f"{path}: {text}", stacklevel=3)


def load_volume(path, *, volume="mean", allow_constant: bool = False) -> Volume:
    """Read a 3D or 4D image as a RAS+ :class:`Volume`.

    Parameters
    ----------
    path : str or Path
        NIfTI-1/2 (``.nii``, ``.nii.gz``), any format SimpleITK reads, or a DICOM series folder.
    volume : {'mean', 'median'} or int
        How a 4D series is reduced to one reference volume.
    allow_constant : bool
        Accept an image with a single value (masks); images to register must have contrast.

    Raises
    ------
    InputError
        Missing, unreadable or invalid image (message names the file and the problem); see the
        module docstring for every check. Warnings (NaN voxels kept as no data, header fields fixed,
        no orientation, sform/qform disagreement) are issued only for an accepted image.
    """
    p = check_input_path(path)
    raw = _read(p)
    with np.errstate(all="ignore"):  # overflow to inf (float64 -> float32) is counted by _clean instead
        vol = _finish(raw, str(p), volume, allow_constant=allow_constant)
    _issue(raw.notes, p)
    return vol


def volume_from_nibabel(img, *, volume="mean", allow_constant: bool = False) -> Volume:
    """A nibabel image (3D or 4D, already loaded) as a RAS+ :class:`Volume`, with :func:`load_volume`'s checks.

    The voxel-to-world matrix is chosen as for a file (NIfTI: sform, else qform, else voxel
    sizes; other images: ``img.affine``); ``volume`` reduces a 4D series.

    Raises
    ------
    InputError
        As :func:`load_volume` (names the image's file when it has one).
    """
    name = str(img.get_filename() or "<nibabel image>")
    notes: list = []
    data = np.asanyarray(img.dataobj)
    header = img.header if hasattr(img.header, "get_sform") else None
    if header is not None:
        vox2ras, matrix_name = _nifti_affine(header, data.shape, notes)
    else:
        vox2ras, matrix_name = img.affine, "voxel-to-world matrix (affine)"
    if vox2ras is None:
        raise InputError("the image has no voxel-to-world matrix (affine is None)", path=name)
    with np.errstate(all="ignore"):
        vol = _finish(_Raw(data, vox2ras, header, matrix_name, notes), name, volume, allow_constant=allow_constant)
    _issue(notes, name)
    return vol


def load_series(path):
    """Read an image without reducing it: (list of 3D Volumes, 4D NIfTI header or None).

    A 3D image gives a one-element list. The same checks as :func:`load_volume` (constant images
    allowed: label maps). :func:`open_series` gives the volumes one at a time instead.
    """
    series, header = open_series(path)
    return list(series), header


def open_series(path):
    """Read an image for volume-by-volume use: (:class:`Series`, 4D NIfTI header or None).

    Checked as :func:`load_series`; each volume's float32 copy is made only when it is asked for.
    """
    p = check_input_path(path)
    raw = _read(p)
    with np.errstate(all="ignore"):
        series, header = _series(raw, p)
    _issue(raw.notes, p)
    return series, header


class Series:
    """The volumes of a 3D or 4D image, as :class:`Volume` objects made one at a time.

    Parameters
    ----------
    data : ndarray (I, J, K) or (I, J, K, T), float32
    vox2ras : ndarray (4, 4)
    name : str
    header : nibabel header or None
    """

    def __init__(self, data, vox2ras, name, header):
        self._data, self.vox2ras, self.name, self.header = data, vox2ras, name, header
        self.shape = tuple(data.shape[:3])

    def __len__(self):
        return 1 if self._data.ndim == 3 else self._data.shape[3]

    def __getitem__(self, t) -> Volume:
        n = len(self)
        if not -n <= t < n:
            raise IndexError(t)
        if self._data.ndim == 3:
            return Volume(self._data, self.vox2ras, self.name, "", self.header)
        t = int(t) % n
        return Volume(np.ascontiguousarray(self._data[..., t]), self.vox2ras, self.name, f"volume {t} of {n}",
                      self.header)


def _series(raw: _Raw, p: Path):
    data = _squeeze(raw.data)
    if data.ndim not in (3, 4):
        raise InputError(f"expected a 3D or 4D image, got {data.ndim}D with shape {data.shape}", path=p)
    _check_dims(data.shape[:3], str(p))
    vox2ras = check_vox2ras(raw.vox2ras, name=raw.matrix_name, path=p)
    _check_extent(data.shape[:3], vox2ras, str(p))
    raw.data = None  # the float copy replaces the file's data
    data = _clean(data, str(p), raw.notes)
    return Series(data, vox2ras, str(p), raw.header), raw.header


#: Name pattern of the temporary files :func:`atomic_path` creates (".NAME.XXXXXXXX.tmpSUFFIX").
TEMP_PATTERN = r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9.]+)?$"


def stale_temp_files(folder) -> list:
    """Temporary files left in ``folder`` (recursively) by a run that was killed mid-write."""
    import re

    rx = re.compile(TEMP_PATTERN)
    return sorted(p for p in Path(folder).rglob(".*") if p.is_file() and rx.match(p.name))


def check_output_path(path, *, protect=()) -> Path:
    """Refuse (OutputError naming it) an output that cannot be written, before any work is done.

    It would overwrite an input (same path, or the same file through a link), it is a folder, its
    folder does not exist or is not writable. Used by :func:`atomic_path`; callers may also check
    their outputs up front, before a long computation.
    """
    dest = Path(path)
    try:
        for other in protect:
            if other is None:
                continue
            if os.path.abspath(dest) == os.path.abspath(other) or (
                    dest.exists() and Path(other).exists() and os.path.samefile(dest, other)):
                raise OutputError("output would overwrite an input", path=dest)
        folder = dest.parent if str(dest.parent) else Path(".")
        if not folder.exists():
            raise OutputError("output folder does not exist", path=dest)
        if not folder.is_dir():
            raise OutputError("output folder is not a folder", path=dest)
        if dest.is_dir():
            raise OutputError("output path is a folder", path=dest)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError("output folder is not writable (permission denied)", path=dest)
    except OSError as exc:
        raise OutputError(f"cannot write: {_oserror_text(exc)}", path=dest) from exc
    return dest


def _umask() -> int:
    """The process umask, read without changing it where possible (os.umask is not thread-safe)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder) -> None:
    """Make a rename durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_GROUP: contextvars.ContextVar = contextvars.ContextVar("regkl_output_group", default=None)


@contextlib.contextmanager
def output_group():
    """All-or-nothing outputs: files written with :func:`atomic_path` inside the block are renamed
    into place only when the whole block succeeds; otherwise none of them appears.

    Each file is still written to its own temporary file and fsynced; the renames happen together
    at the end. Two outputs with the same path in one group are refused (OutputError).

    Examples
    --------
    >>> with output_group():                                          # doctest: +SKIP
    ...     save_transform("x.tfm", m, "itk")
    ...     save_volume(vol, "out.nii.gz")   # disk full here: neither x.tfm nor out.nii.gz is written
    """
    pending: list = []
    token = _GROUP.set(pending)
    try:
        yield
        for tmp, dest in pending:
            try:
                os.replace(tmp, dest)
            except OSError as exc:
                raise OutputError(f"cannot write: {_oserror_text(exc)}", path=dest) from exc
        for folder in dict.fromkeys(dest.parent if str(dest.parent) else Path(".") for _, dest in pending):
            _fsync_folder(folder)
    finally:
        _GROUP.reset(token)
        for tmp, _ in pending:
            with contextlib.suppress(OSError):
                if os.path.lexists(tmp):
                    os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path, *, protect=()):
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file (hidden, ``.NAME.XXXXXXXX.tmpSUFFIX``, see :data:`TEMP_PATTERN`) is in the
    destination's folder, so the rename is atomic; it is fsynced before the rename and the folder
    after it. Whatever the block raises, the temporary file is removed and the destination (if it
    existed) is untouched; an OSError (disk full, permission, I/O error) becomes an OutputError
    naming the destination.

    Parameters
    ----------
    path : str or Path
        Final destination.
    protect : iterable of paths
        Inputs that must never be overwritten.
    """
    dest = Path(path)
    suffix = "".join(dest.suffixes[-2:]) if dest.name.lower().endswith(".gz") else dest.suffix
    with atomic_set(dest, (suffix,), protect=protect) as tmps:
        yield tmps[0]


def file_set(path, suffixes) -> list:
    """The files of a set named like ``path``: ``path`` itself, then its partners.

    ``suffixes[0]`` is the suffix ``path`` ends with (any case); each partner replaces it by one of
    the others, in the same case (``OUT.HDR`` -> ``OUT.IMG``).
    """
    dest = Path(path)
    stem = dest.name[:len(dest.name) - len(suffixes[0])]
    upper = dest.name[len(stem):].isupper()
    return [dest] + [dest.with_name(stem + (s.upper() if upper else s)) for s in suffixes[1:]]


@contextlib.contextmanager
def atomic_set(path, suffixes, *, protect=()):
    """:func:`atomic_path` for a set of files written together (NIfTI pair .hdr/.img, MetaImage
    .mhd/.raw): yields one temporary path per file, all with the same stem (``.NAME.XXXXXXXX.tmp``
    + each suffix, as the writers of such pairs expect); every file is renamed into place only if
    the block succeeds (inside :func:`output_group`, with the group), else none is.

    Parameters
    ----------
    path : str or Path
        Final destination of the first file; the others are named by :func:`file_set`.
    suffixes : sequence of str
        The suffix of ``path`` first (as in :data:`IMAGE_OUTPUTS`), then its partners'.
    protect : iterable of paths
        Inputs that must never be overwritten (by any file of the set).
    """
    finals = [check_output_path(p, protect=protect) for p in file_set(path, suffixes)]
    dest = finals[0]
    group = _GROUP.get()
    for final in finals:
        if group is not None and any(os.path.abspath(final) == os.path.abspath(d) for _, d in group):
            raise OutputError("two outputs have the same path", path=final)
    folder = dest.parent if str(dest.parent) else Path(".")
    try:
        fd, first = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=f".tmp{suffixes[0]}", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write: {_oserror_text(exc)}", path=dest) from exc
    stem = first[:len(first) - len(suffixes[0])]
    tmps = [Path(first)]
    handed_over = False
    try:
        os.close(fd)
        for suffix in suffixes[1:]:  # partners: same random stem, created exclusively
            os.close(os.open(stem + suffix, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            tmps.append(Path(stem + suffix))
        for tmp in tmps:
            os.chmod(tmp, 0o666 & ~_umask())
        yield tmps
        for tmp in tmps:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        if group is not None:  # output_group renames every file together at its end
            group.extend((str(t), f) for t, f in zip(tmps, finals))
            handed_over = True
        else:
            for tmp, final in zip(tmps, finals):
                os.replace(tmp, final)
            _fsync_folder(folder)
    except OSError as exc:
        raise OutputError(f"cannot write: {_oserror_text(exc)}", path=dest) from exc
    finally:
        if not handed_over:
            for tmp in tmps:
                with contextlib.suppress(OSError):
                    if os.path.lexists(tmp):
                        os.unlink(tmp)


#: Uncompressed bytes per gzip member when writing .nii.gz (members are compressed in parallel).
GZIP_CHUNK = 4 << 20


def write_gzip_parallel(raw: bytes, path, *, level: int = 1, threads: int | None = None) -> None:
    """Write ``raw`` as a gzip file made of concatenated members compressed in parallel.

    A multi-member gzip file is standard (RFC 1952): zlib's gzread (ITK, FSL, AFNI, FreeSurfer),
    Python's gzip module and nibabel read it as one stream. zlib releases the GIL, so threads scale.
    """
    from concurrent.futures import ThreadPoolExecutor

    try:  # ISA-L's deflate: ~10x faster than zlib at the same ratio
        from isal.igzip import compress
    except ImportError:  # pragma: no cover - isal is a dependency; zlib is the fallback
        from gzip import compress

    view = memoryview(raw)
    chunks = [view[i:i + GZIP_CHUNK] for i in range(0, len(raw), GZIP_CHUNK)] or [view]
    workers = threads or min(len(chunks), os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        members = pool.map(lambda c: compress(c, compresslevel=level, mtime=0), chunks)
        with open(path, "wb") as fh:
            for member in members:
                fh.write(member)


#: Image output suffix (lower case) -> (writer, suffixes of every file written, 4D allowed). A name
#: with any other suffix is refused before any work (:func:`check_image_output`).
IMAGE_OUTPUTS = {
    ".nii.gz": ("nifti", (".nii.gz",), True),
    ".nii": ("nifti", (".nii",), True),
    ".hdr": ("nifti", (".hdr", ".img"), True),  # NIfTI-1 pair: header and data files
    ".img": ("nifti", (".img", ".hdr"), True),
    ".hdr.gz": ("nifti", (".hdr.gz", ".img.gz"), True),
    ".img.gz": ("nifti", (".img.gz", ".hdr.gz"), True),
    ".nrrd": ("itk", (".nrrd",), False),
    ".mha": ("itk", (".mha",), False),
    ".mhd": ("itk", (".mhd", ".raw"), False),  # MetaImage header and its data file
}


def image_output(path, *, ndim: int = 3):
    """(writer, suffixes of the set) for an image output path; OutputError naming it if regkl
    cannot write that suffix (or a 4D series in that format)."""
    dest = Path(path)
    name = dest.name.lower()
    for suffix in sorted(IMAGE_OUTPUTS, key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            writer, suffixes, series_ok = IMAGE_OUTPUTS[suffix]
            if ndim == 4 and not series_ok:
                raise OutputError(f"a 4D series can only be written as NIfTI (.nii.gz, .nii or an .hdr/.img "
                                  f"pair), not {suffix}", path=dest)
            return writer, suffixes
    known = ", ".join(dict.fromkeys(s for s in IMAGE_OUTPUTS if not s.startswith((".img", ".hdr.gz"))))
    raise OutputError(f"cannot write an image with this name's suffix; use one of {known} "
                      "(.hdr writes an .hdr/.img NIfTI pair, .mhd an .mhd/.raw pair)", path=dest)


def check_image_output(path, *, protect=(), ndim: int = 3) -> list:
    """Refuse, before any work, an image output regkl cannot write (unknown suffix, 4D not NIfTI) or
    whose files (both halves of a pair) would overwrite an input or cannot be written."""
    _, suffixes = image_output(path, ndim=ndim)
    return [check_output_path(p, protect=protect) for p in file_set(path, suffixes)]


def _nifti_image(data, vox2ras, dest, like, dtype, zooms_t=None):
    """nibabel image for ``data`` on ``vox2ras`` with ``like``'s NIfTI header (codes, units), as a
    single file or a pair according to ``dest``'s suffix."""
    import nibabel as nib

    header = getattr(like, "header", None)
    nifti2 = isinstance(header, nib.Nifti2Header)
    single = dest.name.lower().endswith(NIFTI_SUFFIXES)
    cls = {(False, True): nib.Nifti1Image, (True, True): nib.Nifti2Image, (False, False): nib.Nifti1Pair,
           (True, False): nib.Nifti2Pair}[nifti2, single]
    header = header.copy() if isinstance(header, nib.Nifti1Header) else None
    img = cls(data, vox2ras, header=header)
    img.header.set_data_dtype(dtype)
    img.header["scl_slope"] = 1.0
    img.header["scl_inter"] = 0.0
    if len(data.shape) == 4 and zooms_t is not None:
        img.header.set_zooms(tuple(img.header.get_zooms()[:3]) + (float(zooms_t),))
    sform_code = int(header["sform_code"]) if header is not None and header["sform_code"] > 0 else 2
    qform_code = int(header["qform_code"]) if header is not None and header["qform_code"] > 0 else 2
    img.set_sform(vox2ras, sform_code)
    img.set_qform(vox2ras, qform_code)
    return img


def save_array(data: np.ndarray, vox2ras: np.ndarray, path, *, like: Volume | None = None, protect=(),
               dtype=np.float32, zooms_t: float | None = None) -> None:
    """Write a 3D or 4D array on a grid atomically (see :func:`save_volume`); 4D only as NIfTI."""
    dest = Path(path)
    if data.ndim == 3:
        save_volume(Volume(data, vox2ras), dest, like=like, protect=protect, dtype=dtype)
        return
    with series_writer(dest, data.shape, vox2ras, like=like, protect=protect, dtype=dtype, zooms_t=zooms_t) as put:
        for t in range(data.shape[3]):
            put(data[..., t])


def _save_nifti(data, vox2ras, dest, like, protect, dtype, suffixes):
    import nibabel as nib

    img = _nifti_image(data, vox2ras, dest, like, dtype)
    with atomic_set(dest, suffixes, protect=protect) as tmps:
        if dest.name.lower().endswith(".nii.gz"):
            write_gzip_parallel(img.to_bytes(), tmps[0])
        else:  # .nii, or a pair: nibabel writes the partner next to the first temporary file
            nib.save(img, str(tmps[0]))


def save_volume(vol: Volume, path, *, like: Volume | None = None, protect=(), dtype=np.float32) -> None:
    """Write a volume atomically; NIfTI keeps the header of ``like`` (its codes and units).

    Parameters
    ----------
    vol : Volume
    path : str or Path
        Destination; the format follows the suffix (:data:`IMAGE_OUTPUTS`: NIfTI via nibabel,
        NRRD and MetaImage via SimpleITK). Every file of a pair is written (both renamed into
        place together, or neither).
    like : Volume, optional
        Image whose NIfTI header (sform/qform codes, units, description) is reused.
    protect : iterable of paths
        Inputs that must not be overwritten.

    Raises
    ------
    OutputError
        Unknown suffix, a file of the set would overwrite an input, or the write failed.
    """
    dest = Path(path)
    writer, suffixes = image_output(dest)
    data = vol.data.astype(dtype, copy=False)
    if writer == "nifti":
        _save_nifti(data, vol.vox2ras, dest, like, protect, dtype, suffixes)
        return
    import SimpleITK as sitk

    with atomic_set(dest, suffixes, protect=protect) as tmps:
        try:
            with quiet_native_stderr():
                sitk.WriteImage(array_to_sitk(data, vol.vox2ras), str(tmps[0]))
        except RuntimeError as exc:
            import shutil

            with contextlib.suppress(OSError):
                if shutil.disk_usage(tmps[0].parent).free < data.nbytes:
                    raise OutputError("cannot write: no space left on the device (disk full or quota exceeded)",
                                      path=dest) from exc
            raise OutputError(f"cannot write image: {itk_reason(exc)}", path=dest) from exc
        if len(tmps) == 2:  # MetaImage: the header names its data file, still by its temporary name
            _rename_data_file(tmps[0], tmps[1].name, file_set(dest, suffixes)[1].name)


def _rename_data_file(header_path: Path, tmp_name: str, final_name: str) -> None:
    """Point a MetaImage header's ``ElementDataFile`` at the data file's final name."""
    lines = header_path.read_text(encoding="latin-1").splitlines()
    for i, line in enumerate(lines):
        key, sep, value = line.partition("=")
        if sep and key.strip() == "ElementDataFile" and value.strip() == tmp_name:
            lines[i] = f"{key.rstrip()} = {final_name}"
            break
    else:
        raise OutputError(f"MetaImage header does not name its data file {tmp_name}", path=header_path)
    header_path.write_text("\n".join(lines) + "\n", encoding="latin-1")


class _GzipMembers:
    """A binary sink that gzips what it is given as :data:`GZIP_CHUNK`-byte members (compressed on a
    thread pool) and appends them to ``fh`` in order: the same bytes :func:`write_gzip_parallel`
    writes, with at most a few chunks in memory."""

    def __init__(self, fh, pool, workers, *, level=1):
        try:
            from isal.igzip import compress
        except ImportError:  # pragma: no cover - isal is a dependency
            from gzip import compress
        self._compress, self._fh, self._pool, self._level = compress, fh, pool, level
        self._ahead = 2 * max(1, workers)  # members compressed ahead of the file
        self._buf = bytearray()
        self._pending = []

    def write(self, data) -> None:
        self._buf += data
        while len(self._buf) >= GZIP_CHUNK:
            chunk = bytes(self._buf[:GZIP_CHUNK])
            del self._buf[:GZIP_CHUNK]
            self._submit(chunk)

    def _submit(self, chunk) -> None:
        self._pending.append(self._pool.submit(self._compress, chunk, compresslevel=self._level, mtime=0))
        while len(self._pending) > self._ahead:
            self._fh.write(self._pending.pop(0).result())

    def close(self) -> None:
        if self._buf:
            self._submit(bytes(self._buf))
            self._buf = bytearray()
        while self._pending:
            self._fh.write(self._pending.pop(0).result())


@contextlib.contextmanager
def series_writer(path, shape, vox2ras, *, like: Volume | None = None, protect=(), dtype=np.float32,
                  zooms_t: float | None = None):
    """Write a NIfTI image volume by volume: yields ``put(volume)``, to call once per 3D volume.

    Memory stays at a few volumes whatever the series' length: the header is written first, then
    each volume's data (gzip members compressed on the fly for ``.gz``). Atomic like
    :func:`save_volume` (every file of a pair); the block must put exactly ``shape[3]`` volumes (one
    for a 3D ``shape``).

    Parameters
    ----------
    path : str or Path
        NIfTI destination (``.nii.gz``, ``.nii``, ``.hdr``/``.img`` pair).
    shape : tuple of int
        (I, J, K) or (I, J, K, T).
    vox2ras : ndarray (4, 4)
    like, protect, dtype
        As for :func:`save_volume`.
    zooms_t : float, optional
        Time between volumes (s), kept in the header.

    Raises
    ------
    OutputError
        Not a NIfTI name, an input would be overwritten, or the write failed.
    """
    from concurrent.futures import ThreadPoolExecutor

    dest = Path(path)
    shape = tuple(int(s) for s in shape)
    writer, suffixes = image_output(dest, ndim=len(shape))
    if writer != "nifti":
        raise OutputError("volume-by-volume writing needs a NIfTI name (.nii.gz, .nii, .hdr/.img)", path=dest)
    dtype = np.dtype(dtype)
    img = _nifti_image(np.broadcast_to(np.zeros((), dtype), shape), vox2ras, dest, like, dtype, zooms_t)
    hdr = img.header
    hdr["vox_offset"] = 0  # nibabel sets the smallest offset for a single file, keeps 0 for a pair
    head = _io.BytesIO()
    hdr.write_to(head)
    head = head.getvalue()
    if hdr.is_single:
        head += bytes(max(int(hdr["vox_offset"]) - len(head), 0))
    n_volumes = shape[3] if len(shape) == 4 else 1
    written = 0

    def put(volume):
        nonlocal written
        if tuple(volume.shape) != shape[:3] or written >= n_volumes:
            raise OutputError(f"internal: volume {written} of shape {volume.shape} does not fit {shape}", path=dest)
        sink.write(np.asarray(volume, dtype=hdr.get_data_dtype()).tobytes(order="F"))
        written += 1

    workers = os.cpu_count() or 1
    with atomic_set(dest, suffixes, protect=protect) as tmps, ThreadPoolExecutor(workers) as pool:
        def sink_for(fh, path):  # gzip members for .gz, the file itself otherwise
            return _GzipMembers(fh, pool, workers) if path.name.lower().endswith(".gz") else fh

        if hdr.is_single:
            data_tmp = tmps[0]
        else:  # a pair: the header file first, then the data (.img) file
            data_first = suffixes[0].startswith(".img")
            data_tmp, header_tmp = (tmps[0], tmps[1]) if data_first else (tmps[1], tmps[0])
            with open(header_tmp, "wb") as fh:
                header_sink = sink_for(fh, header_tmp)
                header_sink.write(head)
                if header_sink is not fh:
                    header_sink.close()
        with open(data_tmp, "wb") as fh:
            sink = sink_for(fh, data_tmp)
            if hdr.is_single:
                sink.write(head)
            yield put
            if written != n_volumes:
                raise OutputError(f"internal: {written} of {n_volumes} volumes written", path=dest)
            if sink is not fh:
                sink.close()
