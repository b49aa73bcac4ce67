"""Images out: NIfTI through nibabel (``.nii.gz`` compressed in parallel), other formats through
SimpleITK, 4D series volume by volume, every file written atomically (:mod:`regkl.outputs`)."""

from __future__ import annotations

import contextlib
import io as _io
import os
from pathlib import Path

import numpy as np

from .errors import OutputError
from .io import NIFTI_SUFFIXES
from .outputs import atomic_set, check_output_path, file_set
from .quiet import quiet_native_stderr
from .sitk_images import array_to_sitk, itk_reason
from .volume import Volume


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


#: Voxels along the first axis per tile of :func:`fortran_order`'s transposition (a tile's rows
#: of the destination are whole cache lines).
TRANSPOSE_TILE = 32


def fortran_order(data: np.ndarray, pool=None) -> np.ndarray:
    """The same (I, J, K) array stored in Fortran order, as NIfTI keeps voxels on disk.

    NumPy's own conversion reads one of the two arrays with a stride of a whole (J, K) plane and
    takes ~35 ms for a 224x224x60 float32 image; copying tiles of :data:`TRANSPOSE_TILE` planes on
    a thread pool (NumPy releases the GIL while copying) takes ~7-10 ms on 2 cores.

    Parameters
    ----------
    data : ndarray (I, J, K)
    pool : concurrent.futures.Executor, optional
        Thread pool to copy the tiles on (default: one for this call, a thread per CPU).

    Returns
    -------
    ndarray (I, J, K), Fortran-contiguous, equal to ``data``.
    """
    if data.ndim != 3 or data.flags.f_contiguous:
        return np.asfortranarray(data)
    from concurrent.futures import ThreadPoolExecutor

    out = np.empty(data.shape[::-1], dtype=data.dtype)  # (K, J, I) in C order is (I, J, K) in F order

    def tile(i0):
        out[:, :, i0:i0 + TRANSPOSE_TILE] = data[i0:i0 + TRANSPOSE_TILE].transpose(2, 1, 0)

    starts = range(0, data.shape[0], TRANSPOSE_TILE)
    if pool is not None:
        list(pool.map(tile, starts))
        return out.T
    with ThreadPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, len(starts)))) as own:
        list(own.map(tile, starts))
    return out.T


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

    img = _nifti_image(fortran_order(data), vox2ras, dest, like, dtype)  # nibabel then copies no strides
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
        sink.write(fortran_order(np.asarray(volume, dtype=hdr.get_data_dtype()), pool).tobytes(order="F"))
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
