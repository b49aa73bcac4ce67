"""BIDS names in, derivative names out: the one place that decides where every output of a pair goes.

Names follow the BIDS derivatives specification and fMRIPrep's outputs. For a moving image
``sub-01/func/sub-01_task-rest_run-1_bold.nii.gz`` registered onto the subject's T1w, a batch writes
(relative to its results folder)::

    sub-01/func/sub-01_task-rest_run-1_space-T1w_boldref.nii.gz                        reference volume
    sub-01/func/sub-01_task-rest_run-1_space-T1w_boldref.json                          its sidecar
    sub-01/func/sub-01_task-rest_run-1_from-boldref_to-T1w_mode-image_desc-coreg_xfm.txt  ITK transform
    sub-01/func/sub-01_task-rest_run-1_from-boldref_to-T1w_mode-image_desc-coreg_xfm.json record
    sub-01/figures/sub-01_task-rest_run-1_desc-coreg_bold.png                          QC picture

and, for a 4D BOLD series, its head-motion correction (fMRIPrep's names)::

    sub-01/func/sub-01_task-rest_run-1_desc-confounds_timeseries.tsv                   motion parameters, FD
    sub-01/func/sub-01_task-rest_run-1_desc-confounds_timeseries.json                  column descriptions
    sub-01/func/sub-01_task-rest_run-1_from-orig_to-boldref_mode-image_desc-hmc_xfm.txt  per-volume ITK transforms
    sub-01/func/sub-01_task-rest_run-1_desc-hmc_boldref.nii.gz                         motion-corrected reference
    sub-01/func/sub-01_task-rest_run-1_desc-hmc_boldref.json                           its sidecar

Every entity of the moving image's name is kept, so two inputs never share outputs: the input's
own ``space`` and ``desc`` (which the outputs set themselves) are folded into the outputs' ``desc``
label (``desc-preproc`` gives ``..._space-T1w_desc-preproc_boldref`` and ``..._desc-preprocCoreg_xfm``).
A name part that is not an entity (``a_bold.nii.gz``) is kept where it was. Figures share one
``figures/`` folder per subject, so their names get ``sub``/``ses`` from the folders when the file
name lacks them. The reference suffix
is ``<suffix>ref`` (fMRIPrep's ``boldref``; ``dwiref``, ``epiref``) except for ``sbref``, which is
already a reference volume and stays ``sbref``.

:func:`pair_paths` gives every output path of a pair; :func:`derivative_path` builds any other
derivative name from a source name (for commands that add outputs to a batch).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

NIFTI = re.compile(r"\.nii(\.gz)?$")

#: Canonical entity order of BIDS file names (BIDS schema), with the transform entities of
#: fMRIPrep (from, to, mode) before desc. Unknown entities keep their place after the entity before them.
ENTITY_ORDER = ("sub", "ses", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc", "stain", "rec",
                "dir", "run", "mod", "echo", "flip", "inv", "mt", "part", "proc", "hemi", "space", "split",
                "recording", "chunk", "seg", "res", "den", "label", "from", "to", "mode", "desc")

#: Suffix of the reference volume written for each moving suffix; any other suffix X gives "Xref".
REFERENCE_SUFFIX = {"sbref": "sbref"}

#: The fixed image's suffix in BIDS datasets (the space the outputs are in).
FIXED_SUFFIX = "T1w"

#: Moving suffixes whose 4D series get head-motion correction in a batch (:class:`MotionPaths`):
#: BOLD, whose volumes share one contrast. Not dwi (volumes differ in b-value and direction: a
#: same-contrast cost would mistake contrast for motion; eddy-current tools do that job), not epi
#: (field maps: volumes differ in phase-encoding direction), and sbref is a single volume.
HMC_SUFFIXES = ("bold",)

#: Output names per layout: "bids" (BIDS datasets) or "plain" (plain folders, --moving-glob).
LAYOUTS = ("bids", "plain")


@dataclass(frozen=True)
class SourceName:
    """A file name split BIDS-style: ``parts`` are (key, value) entities or (None, text) for a part
    that is not an entity, in file order; then the suffix and the extension (".nii.gz", ...)."""

    parts: tuple
    suffix: str
    extension: str

    def get(self, key, default=None):
        return next((v for k, v in self.parts if k == key), default)


def parse_name(name) -> SourceName:
    """Split a file name (``sub-01_task-rest_bold.nii.gz``) into entities, suffix and extension."""
    name = Path(name).name
    match = NIFTI.search(name)
    if match:
        stem, ext = name[:match.start()], match.group(0)
    else:
        stem, dot, rest = name.partition(".")
        ext = dot + rest
    pieces = stem.split("_")
    parts = tuple(tuple(p.split("-", 1)) if "-" in p else (None, p) for p in pieces[:-1])
    return SourceName(parts, pieces[-1], ext)


def entities(name) -> dict:
    """BIDS entities of a file name (``{'sub': '01', 'task': 'rest', 'run': '1'}``); {} if there are none."""
    return {k: v for k, v in parse_name(name).parts if k is not None}


def _ordered(parts) -> list:
    """Parts in canonical entity order; unknown entities and non-entity parts stay after their predecessor."""
    ranked, rank = [], -1.0
    for i, (key, value) in enumerate(parts):
        if key in ENTITY_ORDER:
            rank = float(ENTITY_ORDER.index(key))
        ranked.append((rank, i, key, value))
    return [(k, v) for _, _, k, v in sorted(ranked)]


def derivative_name(source: SourceName, *, set_entities: dict, suffix: str, extension: str) -> str:
    """The derivative file name of ``source``: its entities with ``set_entities`` added or replaced
    (a value of None removes the entity), in canonical order, then ``suffix`` and ``extension``."""
    parts = [(k, v) for k, v in source.parts if k not in set_entities]
    parts += [(k, v) for k, v in set_entities.items() if v is not None]
    stem = "_".join(v if k is None else f"{k}-{v}" for k, v in _ordered(parts))
    return f"{stem}_{suffix}{extension}" if stem else f"{suffix}{extension}"


def derivative_path(source_rel, out_dir, *, set_entities: dict, suffix: str, extension: str,
                    folder=None) -> Path:
    """Path of a derivative of the input at ``source_rel`` (relative to the dataset) in ``out_dir``:
    in the same relative folder (or ``folder``, relative to ``out_dir``), named by :func:`derivative_name`."""
    source_rel = Path(source_rel)
    name = derivative_name(parse_name(source_rel.name), set_entities=set_entities, suffix=suffix,
                           extension=extension)
    return Path(out_dir) / (source_rel.parent if folder is None else Path(folder)) / name


def _camel(pieces) -> str | None:
    pieces = [p for p in pieces if p]
    if not pieces:
        return None
    return pieces[0] + "".join(p[:1].upper() + p[1:] for p in pieces[1:])


def desc_label(source: SourceName, kind: str | None) -> str | None:
    """The ``desc`` of an output: the input's own desc and space (folded in, so that inputs differing
    only by them keep apart) followed by ``kind`` (e.g. "coreg"); None when all are empty."""
    space = source.get("space")
    return _camel([source.get("desc"), f"space{space}" if space else None, kind])


def reference_suffix(suffix: str) -> str:
    """Suffix of the reference volume made from images with ``suffix`` (bold -> boldref)."""
    return REFERENCE_SUFFIX.get(suffix, suffix if suffix.endswith("ref") else f"{suffix}ref")


@dataclass(frozen=True)
class MotionPaths:
    """The head-motion outputs of a 4D series (fMRIPrep's names in the BIDS layout)."""

    confounds: Path  #: TSV: trans_x..rot_z, framewise_displacement (``desc-confounds_timeseries``)
    confounds_sidecar: Path  #: its JSON sidecar: column descriptions, Sources
    xfm: Path  #: ITK text file, one transform per volume (``from-orig_to-boldref_..._desc-hmc_xfm``)
    boldref: Path  #: median of the realigned steady-state volumes, on the series' grid (``desc-hmc_boldref``)
    boldref_sidecar: Path  #: its JSON sidecar (Sources)

    def all(self) -> tuple:
        return self.confounds, self.confounds_sidecar, self.xfm, self.boldref, self.boldref_sidecar


@dataclass(frozen=True)
class PairPaths:
    """Every output of one registered pair. The record is written last and marks the pair complete."""

    reference: Path  #: the moving image's reference volume resampled onto the fixed grid
    reference_sidecar: Path  #: its JSON sidecar (Sources, SpatialReference)
    transform: Path  #: ITK text transform, fixed -> moving
    record: Path  #: the transform's JSON sidecar: Sources and regkl's record of the run
    figure: Path  #: QC picture (PNG)
    motion: MotionPaths | None = None  #: head-motion outputs; None where the suffix gets none (HMC_SUFFIXES)

    def outputs(self) -> tuple:
        """The coregistration files written before the record (which lists them)."""
        return self.reference, self.reference_sidecar, self.transform, self.figure

    def all(self) -> tuple:
        """Every file the pair may write (motion outputs only for a 4D series), the record last."""
        return self.outputs() + (self.motion.all() if self.motion else ()) + (self.record,)


def _bids_paths(moving_rel: Path, out_dir: Path) -> PairPaths:
    source = parse_name(moving_rel.name)
    ref = reference_suffix(source.suffix)
    coreg = desc_label(source, "coreg")
    reference = derivative_path(moving_rel, out_dir, set_entities={"space": FIXED_SUFFIX,
                                                                   "desc": desc_label(source, None)},
                                suffix=ref, extension=".nii.gz")
    xfm = {"space": None, "from": ref, "to": FIXED_SUFFIX, "mode": "image", "desc": coreg}
    transform = derivative_path(moving_rel, out_dir, set_entities=xfm, suffix="xfm", extension=".txt")
    top = moving_rel.parts[0] if len(moving_rel.parts) > 1 else ""
    # one figures/ folder per subject: its names need the subject and session even where the file name lacks them
    folders = dict(p.split("-", 1) for p in moving_rel.parts[:-1] if p.startswith(("sub-", "ses-")))
    figure = derivative_path(moving_rel, out_dir, set_entities={
        **{k: v for k, v in folders.items() if source.get(k) is None}, "space": None, "desc": coreg},
        suffix=source.suffix, extension=".png", folder=Path(top) / "figures")
    motion = None
    if source.suffix in HMC_SUFFIXES:
        bare = {"space": None}
        confounds = derivative_path(moving_rel, out_dir, set_entities={**bare, "desc": desc_label(source, "confounds")},
                                    suffix="timeseries", extension=".tsv")
        hmc_xfm = derivative_path(moving_rel, out_dir, set_entities={
            **bare, "from": "orig", "to": ref, "mode": "image", "desc": desc_label(source, "hmc")},
            suffix="xfm", extension=".txt")
        hmc_ref = derivative_path(moving_rel, out_dir, set_entities={**bare, "desc": desc_label(source, "hmc")},
                                  suffix=ref, extension=".nii.gz")
        motion = MotionPaths(confounds, confounds.with_suffix(".json"), hmc_xfm, hmc_ref,
                             hmc_ref.with_name(NIFTI.sub(".json", hmc_ref.name)))
    return PairPaths(reference, reference.with_name(NIFTI.sub(".json", reference.name)), transform,
                     transform.with_suffix(".json"), figure, motion)


def _plain_paths(moving_rel: Path, out_dir: Path) -> PairPaths:
    stem = NIFTI.sub("", moving_rel.name)
    dest = out_dir / moving_rel.parent
    motion = MotionPaths(dest / f"{stem}_confounds.tsv", dest / f"{stem}_confounds.json",
                         dest / f"{stem}_hmc_xfm.txt", dest / f"{stem}_hmc_ref.nii.gz", dest / f"{stem}_hmc_ref.json")
    return PairPaths(dest / f"{stem}_coreg.nii.gz", dest / f"{stem}_coreg.json", dest / f"{stem}_xfm.txt",
                     dest / f"{stem}_xfm.json", dest / f"{stem}_qc.png", motion)


_NAMERS = {"bids": _bids_paths, "plain": _plain_paths}


def pair_paths(moving_rel, out_dir, layout: str = "bids") -> PairPaths:
    """Every output path of the pair whose moving image is ``moving_rel`` (relative to the dataset).

    Parameters
    ----------
    moving_rel : str or Path
        The moving image, relative to the dataset folder (no "..").
    out_dir : str or Path
        The results folder.
    layout : {"bids", "plain"}
        BIDS-derivative names (see the module), or plain-folder names (``<stem>_coreg.nii.gz``,
        ``<stem>_xfm.txt``, ``<stem>_qc.png``, ...; motion outputs ``<stem>_confounds.tsv``,
        ``<stem>_hmc_xfm.txt``, ``<stem>_hmc_ref.nii.gz`` for any 4D series: the user chose the images).

    Raises
    ------
    InputError
        ``moving_rel`` is absolute or leaves the dataset, or ``layout`` is unknown.
    """
    moving_rel = Path(moving_rel)
    if moving_rel.is_absolute() or ".." in moving_rel.parts:
        raise InputError("image is outside the dataset folder", path=moving_rel)
    try:
        namer = _NAMERS[layout]
    except KeyError:
        raise InputError(f"unknown output layout {layout!r}; valid: {', '.join(_NAMERS)}") from None
    return namer(moving_rel, Path(out_dir))


def bids_uri(rel, dataset: str = "raw") -> str:
    """BIDS URI of a file ``rel`` (relative to its dataset): ``bids:raw:sub-01/func/...``;
    ``dataset=""`` for the derivative dataset itself."""
    return f"bids:{dataset}:{Path(rel).as_posix()}"


def ignore_patterns(suffixes) -> list:
    """.bidsignore lines for a batch's outputs that the BIDS validator does not know (as fMRIPrep)."""
    refs = sorted({reference_suffix(s) for s in suffixes} - set(REFERENCE_SUFFIX.values()))
    return ["*.html", "logs/", "figures/", "*_xfm.*"] + [f"*_{r}.*" for r in refs]
