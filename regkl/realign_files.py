"""Files in, files out for :func:`regkl.realign.realign`: reading a 4D series, writing the motion
outputs all or none (confounds TSV, per-volume ITK transforms, boldref, MCFLIRT .par, the realigned
series, the QC trace), and the boldref other commands register from."""

from __future__ import annotations

import threading

import numpy as np

from .errors import InputError
from .realign import RealignResult, realign, realigned_volumes
from .volume import Volume


def write_outputs(result: RealignResult, volumes, *, confounds=None, xfm=None, boldref=None, par=None,
                  realigned=None, interp: str = "linear", qc=None, like=None, zooms_t=None, protect=(),
                  threads: int = 1) -> None:
    """Write the motion outputs of a realignment, all or none (:func:`regkl.outputs.output_group`).

    Parameters
    ----------
    result : RealignResult
    volumes : sequence of Volume
        The series that was realigned (for ``realigned``).
    confounds : path, optional
        TSV with fMRIPrep's confound columns (:data:`regkl.motion.CONFOUND_COLUMNS`).
    xfm : path, optional
        ITK text file with one transform per volume, in order (LPS, reference -> volume).
    boldref : path, optional
        The reference volume (median of the realigned steady-state volumes).
    par : path, optional
        FSL MCFLIRT ``.par`` layout (:func:`regkl.motion.par_text`).
    realigned : path, optional
        The realigned series (4D NIfTI), one resampling with ``interp``.
    qc : path, optional
        PNG of the motion traces.
    like : Volume, optional
        Image whose NIfTI header the images keep; ``zooms_t`` the repetition time to keep.
    protect : iterable of paths
        Inputs never to overwrite.
    threads : int
        Volumes of ``realigned`` resampled concurrently.
    """
    from .outputs import atomic_path, output_group
    from .writers import save_array, save_volume
    from .motion import confounds_text, motion_figure, par_text
    from .xfm import itk_series_text

    def text(path, content):
        with atomic_path(path, protect=protect) as tmp:
            tmp.write_text(content)

    with output_group():
        if confounds:
            text(confounds, confounds_text(result.params, result.framewise_displacement))
        if par:
            text(par, par_text(result.params))
        if xfm:
            text(xfm, itk_series_text(result.ref2volume))
        if boldref:
            save_volume(result.boldref, boldref, like=like, protect=protect)
        if realigned:
            data = np.moveaxis(realigned_volumes(volumes, result.boldref, result.ref2volume, interp=interp,
                                                 threads=threads), 0, -1)
            save_array(data, result.boldref.vox2ras, realigned, like=like, protect=protect, zooms_t=zooms_t)
        if qc:
            fd = result.framewise_displacement
            motion_figure(result.params, fd, qc, flags=result.flags, protect=protect,
                          title=f"{volumes[0].name}: {len(volumes)} volumes, reference {result.reference.note}, "
                                f"mean FD {np.nanmean(fd) if len(fd) > 1 else 0.0:.3f} mm, max "
                                f"{np.nanmax(fd) if len(fd) > 1 else 0.0:.3f} mm")


def warm_up():
    """Load the kernels realignment uses (cost 'nc'/'ls') on tiny inputs: Numba's one-off start-up
    cost, safe in a background thread while the series is read."""
    from . import kernels
    from .stack_kernels import correlate_nearest, median_over_first_axis

    data = np.zeros((2, 2, 2), dtype=np.float32)
    mat = np.eye(4)
    kernels.block_mean_serial(data, 2, 2, 2)
    kernels.weighted_moments_serial(np.zeros((1, 3)), np.zeros(1), data, mat[:3].copy(), 0.0, 1.0)
    kernels.resample_linear_serial(data, mat, 1, 1, 1, np.float32(0.0))
    median_over_first_axis(np.zeros((3, 1), dtype=np.float32), np.empty(1, dtype=np.float32), 0, 1)
    correlate_nearest(data, np.array([0.25, 0.5, 0.25]), 0)


def load_series_for_realign(path):
    """The volumes of a 4D series and its repetition time; InputError (one line) for a 3D image or a
    single volume."""
    from .io import load_series

    volumes, header = load_series(path)
    if len(volumes) < 2:
        raise InputError("has a single volume (a 3D image); realign needs a 4D series of at least 2 volumes",
                         path=path)
    zooms = header.get_zooms() if header is not None and hasattr(header, "get_zooms") else ()
    return volumes, (float(zooms[3]) if len(zooms) > 3 else None), header


def realign_file(series, *, confounds=None, xfm=None, boldref=None, par=None, realigned=None,
                 interp: str = "linear", qc=None, log=None, xfm_optional: bool = False, **options) -> RealignResult:
    """Series file in, motion outputs out: what ``regkl realign`` and a batch run call.

    Reads ``series`` (:func:`load_series_for_realign`), runs :func:`realign` with ``options`` and
    writes the requested outputs with :func:`write_outputs` (all or none; inputs never
    overwritten). Returns the :class:`RealignResult`.

    The per-volume ITK file ``xfm`` is written only if ITK places the series (and a reference
    image) where regkl does (:func:`regkl.itk_placement.check_itk_placement`): otherwise an
    InputError, or, with ``xfm_optional`` (the command's default name, not asked for), a warning
    and no ITK file.
    """
    warm = threading.Thread(target=warm_up, name="regkl-realign-warm-up", daemon=True)
    warm.start()  # Numba's one-off start-up while the series is read (decompression releases the GIL)
    try:
        volumes, tr, _ = load_series_for_realign(series)
    finally:
        warm.join()
    reference = options.get("reference")
    protect = (series,) + ((reference,) if isinstance(reference, str) else ())
    if isinstance(reference, str) and reference not in ("auto", "mean", "median"):
        from .io import load_series

        ref_volumes, _ = load_series(reference)
        if len(ref_volumes) > 1:
            raise InputError(f"is a 4D series of {len(ref_volumes)} volumes; a reference image must be one 3D "
                             "volume (an SBRef, a boldref, or pick a volume of the series by its index)", path=reference)
        options["reference"] = ref_volumes[0]  # realign() names it "image PATH"
    if xfm:
        import warnings

        from .itk_placement import check_itk_placement

        ref = options.get("reference")
        try:
            check_itk_placement([volumes[0]] + ([ref] if isinstance(ref, Volume) else []),
                                "write the per-volume ITK transforms (--xfm)")
        except InputError as exc:
            if not xfm_optional:
                raise
            warnings.warn(f"not writing {xfm}: {exc}", stacklevel=2)
            xfm = None
    result = realign(volumes, log=log, **options)
    write_outputs(result, volumes, confounds=confounds, xfm=xfm, boldref=boldref, par=par, realigned=realigned,
                  interp=interp, qc=qc, like=volumes[0], zooms_t=tr, protect=protect,
                  threads=options.get("threads", 1))
    from dataclasses import replace

    return replace(result, settings={**result.settings, "xfm_file": xfm and str(xfm)})


def realigned_reference(path, *, threads: int = 1, log=None) -> Volume:
    """The motion-free reference (boldref) of a 4D series, for registering the series elsewhere
    (``regkl register --moving-volume realigned``); a 3D image is returned as it is read.

    Raises
    ------
    InputError
        As :func:`regkl.io.load_series` and :func:`realign`.
    """
    from .io import load_series, load_volume

    volumes, _ = load_series(path)
    if len(volumes) < 2:
        return load_volume(path)
    return described_boldref(realign(volumes, threads=threads, log=log))


def described_boldref(result: RealignResult) -> Volume:
    """``result.boldref`` with a note saying how it was made (for logs and sidecars)."""
    return result.boldref.with_data(result.boldref.data, note=f"boldref: {result.boldref.note} (realigned to "
                                    f"{result.reference.note}; {result.n_non_steady} non-steady-state left out)")
