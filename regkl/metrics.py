"""Similarity metrics computed from a joint histogram, with their derivatives.

Each metric is a function ``hist (F, M) counts -> (value, dtable)`` where ``value`` is to be
MAXIMISED and ``dtable[l, k] = d value / d hist[l, k]``, the full derivative: sample points carry
weights that change near the moving image's edge, so the histogram's total is not constant.

Rows are fixed-image bins (box kernel), columns moving-image bins (cubic B-spline Parzen window;
moving intensities occupy the continuous bins ``[2, M - 3]``).

Derivatives. Every metric here is a function ``V(p)`` of the normalised histogram
``p = hist / n`` with ``n = hist.sum()``. Writing ``G = dV/dp`` (each entry of ``p`` treated as
free, marginals being row and column sums of ``p``), the chain rule through ``p = hist / n`` gives

    dV / dhist[l, k] = (G[l, k] - sum_ij p[i, j] G[i, j]) / n,

so ``sum(hist * dtable) == 0`` (the metrics are invariant to scaling the histogram).

Empty bins. Where a count is exactly 0 and the derivative involves ``log p`` (which diverges), the
metrics put 0 in ``dtable``: a zero count means no sample point's Parzen window reaches that bin,
and the B-spline kernel and the edge weights both have zero slope where they reach zero, so such an
entry never contributes to the registration gradient. An all-zero histogram gives ``(0.0, zeros)``.

Metrics that need extra data (``'kl'`` needs an expected joint histogram, the *prior*) are
registered as factories; :func:`get_metric` builds them.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from .errors import InputError

#: Added to every normalised prior cell (divided by the number of cells) before renormalising, so
#: ``log(prior)`` is finite everywhere.
PRIOR_FLOOR = 1e-6


def _normalised(hist: np.ndarray):
    """(n, p) with n = total; n <= 0 or non-finite -> (0.0, None)."""
    hist = np.asarray(hist, dtype=np.float64)
    n = float(hist.sum())
    if not (n > 0.0 and np.isfinite(n)):
        return 0.0, None
    return n, hist / n


def _xlogy_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a * log(a / b)`` with 0 where ``a == 0`` (b > 0 wherever a > 0)."""
    out = np.zeros(np.broadcast(a, b).shape)
    nz = a > 0
    a_, b_ = np.broadcast_to(a, out.shape)[nz], np.broadcast_to(b, out.shape)[nz]
    out[nz] = a_ * np.log(a_ / b_)
    return out


def _entropy(p: np.ndarray) -> float:
    """Shannon entropy ``-sum p log p`` (nats) of the positive entries."""
    q = p[p > 0]
    return float(-np.sum(q * np.log(q)))


def mutual_information(hist: np.ndarray):
    """Mutual information (nats) of a joint histogram of counts.

    Parameters
    ----------
    hist : ndarray, shape (F, M)
        Joint histogram (fixed bins x moving bins), non-negative counts.

    Returns
    -------
    value : float
        ``sum p log(p / (p_f p_m))`` with ``p = hist / hist.sum()``.
    dtable : ndarray, shape (F, M)
        Derivative of ``value`` with respect to each count:
        ``(log(p / (p_f p_m)) - value) / n`` where ``p > 0``, 0 elsewhere.
    """
    n = hist.sum()
    if n <= 0:
        return 0.0, np.zeros_like(hist)
    p = hist / n
    pf = p.sum(axis=1)
    pm = p.sum(axis=0)
    nz = p > 0
    outer = np.outer(pf, pm)
    value = float(np.sum(p[nz] * np.log(p[nz] / outer[nz])))
    dtable = np.zeros_like(p)
    dtable[nz] = (np.log(p[nz] / outer[nz]) - value) / n
    return value, dtable


def mutual_information_values(hists: np.ndarray) -> np.ndarray:
    """Mutual information (nats) of many joint histograms at once, without the derivative tables:
    :func:`mutual_information`'s values (to rounding) for scoring a batch of poses.

    Parameters
    ----------
    hists : ndarray, shape (K, F, M)
        Joint histograms of counts.

    Returns
    -------
    ndarray, shape (K,)
    """
    n = hists.sum(axis=(1, 2))
    p = hists / np.where(n > 0, n, 1.0)[:, None, None]
    outer = p.sum(axis=2)[:, :, None] * p.sum(axis=1)[:, None, :]
    ratio = np.divide(p, outer, out=np.ones_like(p), where=p > 0)  # 1 (a zero term) where p is 0
    return np.einsum("kfm,kfm->k", p, np.log(ratio))


def normalised_mutual_information(hist: np.ndarray):
    r"""Normalised mutual information (Studholme et al. 1999) of a joint histogram.

    .. math:: \mathrm{NMI} = \frac{H(F) + H(M)}{H(F, M)}

    with entropies in nats of ``p = hist / n``, its row marginal ``p_f`` and column marginal
    ``p_m``: ``H(F) = -sum_l p_f log p_f``, ``H(M) = -sum_k p_m log p_m``,
    ``H(F, M) = -sum p log p``. It lies in [1, 2] (1: independent, 2: one-to-one relation) and is
    less sensitive than MI to the amount of overlap.

    Parameters
    ----------
    hist : ndarray, shape (F, M)
        Joint histogram (fixed bins x moving bins), non-negative counts.

    Returns
    -------
    value : float
        NMI; 1.0 when ``H(F, M) == 0`` (a single occupied bin: both images constant).
    dtable : ndarray, shape (F, M)
        ``(NMI * log p[l, k] - log p_f[l] - log p_m[k]) / (n H(F, M))`` where ``p > 0``, 0
        elsewhere. (With ``G = dNMI/dp`` the term ``sum p G`` vanishes and the ``+1`` from each
        entropy derivative cancels.)
    """
    n, p = _normalised(hist)
    if p is None:
        return 0.0, np.zeros(np.shape(hist))
    pf = p.sum(axis=1)
    pm = p.sum(axis=0)
    hj = _entropy(p)
    if not hj > 0.0:
        return 1.0, np.zeros_like(p)
    value = (_entropy(pf) + _entropy(pm)) / hj
    nz = p > 0
    li, ki = np.nonzero(nz)
    dtable = np.zeros_like(p)
    dtable[nz] = (value * np.log(p[nz]) - np.log(pf[li]) - np.log(pm[ki])) / (n * hj)
    return float(value), dtable


def correlation_ratio(hist: np.ndarray):
    r"""Correlation ratio of the moving intensity given the fixed intensity class.

    The moving value of column ``k`` is taken as ``k`` (the continuous moving bin, linear in
    intensity); the fixed bins are the classes (as FLIRT does for EPI, whose cost is
    ``1 - eta^2``). With ``p = hist / n``, ``p_f[l] = sum_k p[l, k]``, class means
    ``mu_l = sum_k k p[l, k] / p_f[l]`` and overall mean ``mu = sum_lk k p[l, k]``:

    .. math:: \eta^2 = 1 - \frac{\sum_l p_f(l) \mathrm{Var}(M \mid F = l)}{\mathrm{Var}(M)}
              = \frac{\sum_l p_f(l) (\mu_l - \mu)^2}{\sum_{lk} p_{lk} (k - \mu)^2}

    (between-class over total variance, computed from centred values for accuracy).

    The classes should be as pure as the fixed image allows, so the registration's finest level
    takes the fixed intensities of its sample points from the fixed image at its own resolution,
    not from the pyramid's smoothed copy (see :data:`NATIVE_FIXED_METRICS`).

    Parameters
    ----------
    hist : ndarray, shape (F, M)
        Joint histogram (fixed bins x moving bins), non-negative counts.

    Returns
    -------
    value : float
        ``eta^2`` in [0, 1], maximised; 0.0 when the moving variance is 0.
    dtable : ndarray, shape (F, M)
        With ``C = n Var(M)``, ``A = eta^2 C`` (between-class sum of squares in counts),
        ``dA/dhist[l, k] = (k - mu)^2 - (k - mu_l)^2`` and ``dC/dhist[l, k] = (k - mu)^2``, so

        ``dtable[l, k] = ((1 - eta^2) (k - mu)^2 - (k - mu_l)^2) / C``.

        For an empty row the one-sided derivative of a single entry is used (``mu_l := k``).
        No logarithm is involved, so zero counts get their true (finite) derivative.
    """
    n, p = _normalised(hist)
    if p is None:
        return 0.0, np.zeros(np.shape(hist))
    k = np.arange(p.shape[1], dtype=np.float64)
    pf = p.sum(axis=1)
    pm = p.sum(axis=0)
    mu = float(pm @ k)
    kc = k - mu
    total = float(pm @ (kc * kc))            # Var(M)
    if not total > 1e-12 * max(1.0, mu * mu):
        return 0.0, np.zeros_like(p)
    filled = pf > 0
    mu_l = np.zeros_like(pf)
    mu_l[filled] = (p[filled] @ kc) / pf[filled]   # class means, centred on mu
    between = float(pf @ (mu_l * mu_l))
    value = min(max(between / total, 0.0), 1.0)
    dev_class = np.where(filled[:, None], kc[None, :] - mu_l[:, None], 0.0)
    dtable = ((1.0 - value) * (kc * kc)[None, :] - dev_class * dev_class) / (n * total)
    return float(value), dtable


def jensen_shannon(hist: np.ndarray):
    r"""Jensen-Shannon divergence between the joint distribution and the product of its marginals.

    With ``p = hist / n``, ``q = p_f p_m`` (outer product of the marginals) and ``m = (p + q) / 2``:

    .. math:: \mathrm{JSD} = \tfrac12 \mathrm{KL}(p \| m) + \tfrac12 \mathrm{KL}(q \| m)

    in nats; 0 for independent images, at most ``log 2``. A bounded, symmetric cousin of MI.

    Parameters
    ----------
    hist : ndarray, shape (F, M)
        Joint histogram (fixed bins x moving bins), non-negative counts.

    Returns
    -------
    value : float
        JSD (nats), maximised.
    dtable : ndarray, shape (F, M)
        With ``R = log(q / m) / 2`` (0 where ``q = 0``; weighted by a zero marginal there),
        ``G[l, k] = log(p / m)[l, k] / 2 + sum_j p_m[j] R[l, j] + sum_i p_f[i] R[i, k]``
        (the partial derivatives of ``x log(2x / (x + y))`` are ``log(2x / (x + y))``, and
        ``dq[i, j]/dp[l, k] = delta_il p_m[j] + p_f[i] delta_jk``), then
        ``dtable = (G - sum p G) / n`` where ``p > 0``, 0 elsewhere.
    """
    n, p = _normalised(hist)
    if p is None:
        return 0.0, np.zeros(np.shape(hist))
    pf = p.sum(axis=1)
    pm = p.sum(axis=0)
    q = np.outer(pf, pm)
    s = p + q
    value = 0.5 * float(np.sum(_xlogy_ratio(p, 0.5 * s)) + np.sum(_xlogy_ratio(q, 0.5 * s)))
    r = np.zeros_like(q)
    qz = q > 0
    r[qz] = 0.5 * np.log(2.0 * q[qz] / s[qz])
    row = r @ pm                 # sum_j p_m[j] R[l, j]
    col = pf @ r                 # sum_i p_f[i] R[i, k]
    nz = p > 0
    g = np.zeros_like(p)
    g[nz] = 0.5 * np.log(2.0 * p[nz] / s[nz])
    g += row[:, None] + col[None, :]
    mean_g = float(np.sum(p[nz] * g[nz]))
    dtable = np.where(nz, (g - mean_g) / n, 0.0)
    return max(value, 0.0), dtable


def _as_prior(prior, *, where: str = "prior") -> np.ndarray:
    """Validate a prior (2D, finite, non-negative, positive sum) and return it normalised, floored
    and renormalised (float64)."""
    try:
        arr = np.array(prior, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where} is not a numeric array ({exc})") from None
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise InputError(f"{where} must be a 2D (fixed bins x moving bins) array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{where} has {int(np.count_nonzero(~np.isfinite(arr)))} non-finite entries")
    if np.any(arr < 0):
        raise InputError(f"{where} has negative entries (minimum {arr.min():g})")
    total = float(arr.sum())
    if not total > 0.0:
        raise InputError(f"{where} is all zero")
    arr = arr / total + PRIOR_FLOOR / arr.size
    return arr / arr.sum()


def kl_to_prior(prior):
    """Build the metric ``-KL(p || prior)`` for an expected joint histogram (Chung et al. 2002).

    The prior is the joint histogram expected at alignment, learned from registered pairs (see
    :func:`prior_from_histograms`). It is normalised to sum 1, then ``PRIOR_FLOOR / size`` is added
    to every cell and it is renormalised, so ``log(prior)`` is finite.

    Parameters
    ----------
    prior : array_like, shape (F, M)
        Non-negative, finite, not all zero.

    Returns
    -------
    metric : callable
        ``hist (F, M) -> (value, dtable)`` with

        ``value = -KL(p || prior) = -sum p log(p / prior)`` (at most 0, maximised) and
        ``dtable = (-log(p / prior) - value) / n`` where ``p > 0``, 0 elsewhere
        (``G = -log(p / prior) - 1`` and ``sum p G = value - 1``).
        Raises :class:`~regkl.errors.InputError` if the histogram's shape differs from the prior's.

    Raises
    ------
    InputError
        If the prior is not a finite, non-negative, non-zero 2D array.
    """
    pri = _as_prior(prior)
    log_pri = np.log(pri)
    shape = pri.shape

    def kl_metric(hist: np.ndarray):
        if np.shape(hist) != shape:
            got = " x ".join(str(s) for s in np.shape(hist))
            raise InputError(f"the prior is {shape[0]} x {shape[1]} bins but the joint histogram is {got}; "
                             f"learn the prior with the same --bins")
        n, p = _normalised(hist)
        if p is None:
            return 0.0, np.zeros(shape)
        nz = p > 0
        log_ratio = np.log(p[nz]) - log_pri[nz]
        value = -float(np.sum(p[nz] * log_ratio))
        dtable = np.zeros_like(p)
        dtable[nz] = (-log_ratio - value) / n
        return min(value, 0.0), dtable

    kl_metric.__doc__ = "-KL(p || prior) of a joint histogram against a fixed prior; see kl_to_prior."
    kl_metric.prior = pri
    return kl_metric


def prior_from_histograms(hists) -> np.ndarray:
    """Expected joint histogram: the mean of joint histograms each normalised to sum 1.

    Parameters
    ----------
    hists : iterable of ndarray, each (F, M)
        Joint histograms of aligned pairs (counts), all of the same shape.

    Returns
    -------
    prior : ndarray, shape (F, M)
        Sums to 1 (no floor added; :func:`kl_to_prior` adds it).
    """
    acc = None
    count = 0
    for i, h in enumerate(hists):
        h = np.asarray(h, dtype=np.float64)
        if h.ndim != 2:
            raise InputError(f"histogram {i} must be 2D, got shape {h.shape}")
        if acc is not None and h.shape != acc.shape:
            raise InputError(f"histogram {i} has shape {h.shape}, the first has {acc.shape}")
        if not np.all(np.isfinite(h)) or np.any(h < 0):
            raise InputError(f"histogram {i} has negative or non-finite counts")
        total = float(h.sum())
        if not total > 0.0:
            raise InputError(f"histogram {i} is empty (the images do not overlap?)")
        acc = h / total if acc is None else acc + h / total
        count += 1
    if acc is None:
        raise InputError("no histograms to learn a prior from")
    prior = acc / count
    return prior / prior.sum()


def _bins_tuple(bins, where="bins"):
    b = np.atleast_1d(np.asarray(bins))
    if b.dtype.kind not in "iu" or b.size not in (1, 2) or b.ndim != 1 or np.any(b < 1):
        raise InputError(f"{where} must be a positive integer or a pair of them, got {bins!r}")
    return (int(b[0]), int(b[-1]))


def save_prior(path, prior, *, bins, meta: dict) -> None:
    """Write a prior joint histogram to an ``.npz`` file atomically.

    Parameters
    ----------
    path : str or Path
        Destination (written via a temporary file renamed into place).
    prior : ndarray, shape (F, M)
        Expected joint histogram (normalised here to sum 1).
    bins : int or (int, int)
        Histogram bins it was learned with (fixed, moving); must match ``prior.shape``.
    meta : dict
        JSON-serialisable description (pairs used, settings...), stored as ``meta_json``.

    Notes
    -----
    Keys: ``prior`` float64 (F, M), ``bins`` int64 (2,), ``meta_json`` str.
    """
    from .outputs import atomic_path

    arr = np.asarray(prior, dtype=np.float64)
    if arr.ndim != 2:
        raise InputError(f"prior must be 2D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or not arr.sum() > 0:
        raise InputError("prior must be finite, non-negative and not all zero")
    fb, mb = _bins_tuple(bins)
    if arr.shape != (fb, mb):
        raise InputError(f"prior shape {arr.shape} does not match bins {(fb, mb)}")
    try:
        meta_json = json.dumps(dict(meta), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise InputError(f"prior metadata is not JSON-serialisable: {exc}") from None
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, prior=arr / arr.sum(), bins=np.array([fb, mb], dtype=np.int64), meta_json=np.array(meta_json))


#: Largest arrays a prior file may declare, checked from the .npz headers before anything is read
#: (bins are at most 512 per image; the metadata is a short JSON text).
PRIOR_MAX_ELEMENTS = {"prior": 512 * 512, "bins": 2, "meta_json": 1}
PRIOR_MAX_BYTES = 4 << 20


def _check_prior_sizes(p: Path) -> None:
    """Refuse a prior whose members declare more data than a prior can hold, from the zip directory
    and each .npy header alone (a small file must not make regkl allocate gigabytes)."""
    from numpy.lib import format as npy

    try:
        with zipfile.ZipFile(p) as zf:
            for info in zf.infolist():
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if info.file_size > PRIOR_MAX_BYTES:
                    raise InputError(f"member {key!r} holds {info.file_size} bytes uncompressed; a prior holds at "
                                     f"most {PRIOR_MAX_BYTES}", path=p)
                with zf.open(info) as fh:
                    version = npy.read_magic(fh)
                    reader = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
                    if reader is None:
                        raise InputError(f"member {key!r} is in .npy format {version}, which regkl does not read",
                                         path=p)
                    shape, _, dtype = reader(fh)
                n = int(np.prod(shape, dtype=object))
                limit = PRIOR_MAX_ELEMENTS.get(key)
                if limit is not None and n > limit or n * dtype.itemsize > PRIOR_MAX_BYTES:
                    raise InputError(f"member {key!r} declares a {'x'.join(map(str, shape))} array of {dtype}, larger "
                                     f"than a prior can be (at most {PRIOR_MAX_ELEMENTS.get(key, 'a few')} "
                                     "elements)", path=p)
    except InputError:
        raise
    except zipfile.BadZipFile:
        return  # not a zip: np.load below says what it is
    except (OSError, ValueError, EOFError, TypeError) as exc:
        raise InputError(f"cannot read prior file: {' '.join(str(exc).split())[:200]}", path=p) from None


def load_prior(path):
    """Read and validate a prior written by :func:`save_prior`.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    prior : ndarray, shape (F, M)
        As stored (sums to 1).
    meta : dict
        The stored metadata, plus ``'bins': [F, M]``.

    Raises
    ------
    InputError
        Naming the file: missing, unreadable, not an ``.npz``, missing keys, or invalid contents.
    """
    p = Path(path)
    if not p.exists():
        raise InputError("prior file not found", path=p)
    if p.is_dir():
        raise InputError("prior path is a folder, expected an .npz file", path=p)
    if not os.access(p, os.R_OK):
        raise InputError("prior file is not readable (permission denied)", path=p)
    _check_prior_sizes(p)
    try:
        npz = np.load(p, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise InputError("not an .npz prior file (a single array)", path=p)
        with npz:
            missing = [k for k in ("prior", "bins", "meta_json") if k not in npz.files]
            if missing:
                raise InputError(f"not a regkl prior: missing {', '.join(missing)}", path=p)
            prior = np.array(npz["prior"])
            bins = np.array(npz["bins"])
            meta_json = npz["meta_json"]
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise InputError(f"cannot read prior file: {exc}", path=p) from None
    if prior.dtype.kind != "f" or prior.ndim != 2:
        raise InputError(f"prior must be a 2D float array, got {prior.dtype} {prior.shape}", path=p)
    if not np.all(np.isfinite(prior)) or np.any(prior < 0) or not prior.sum() > 0:
        raise InputError("prior has negative, non-finite or only zero entries", path=p)
    try:
        fb, mb = _bins_tuple(bins, "stored bins")
    except InputError as exc:
        raise InputError(exc.problem, path=p) from None
    if prior.shape != (fb, mb):
        raise InputError(f"prior shape {prior.shape} does not match its stored bins {(fb, mb)}", path=p)
    try:
        meta = json.loads(str(meta_json.item() if getattr(meta_json, "ndim", 1) == 0 else meta_json))
    except (ValueError, TypeError) as exc:
        raise InputError(f"prior metadata is not valid JSON: {exc}", path=p) from None
    if not isinstance(meta, dict):
        raise InputError("prior metadata is not a JSON object", path=p)
    meta["bins"] = [fb, mb]
    return prior / prior.sum(), meta


#: Metric name -> metric function ``hist -> (value, dtable)``, or, for names in
#: :data:`PRIOR_METRICS`, a factory ``prior -> metric function``. Use :func:`get_metric`.
METRICS = {
    "mi": mutual_information,
    "nmi": normalised_mutual_information,
    "cr": correlation_ratio,
    "jsd": jensen_shannon,
    "kl": kl_to_prior,
}

#: Metric function -> its batched value-only form ``hists (K, F, M) -> values (K,)``, where one
#: exists (the others are evaluated one histogram at a time).
BATCH_VALUES = {mutual_information: mutual_information_values}

#: Metrics that need a prior joint histogram (their METRICS entry is a factory).
PRIOR_METRICS = frozenset({"kl"})

#: Metrics whose finest pyramid level bins the fixed image at its OWN resolution: the sample points
#: are those of the level, but their fixed intensities are read (trilinear) from the unsmoothed
#: fixed image instead of the level's copy smoothed to the level's spacing (as FLIRT bins its
#: reference at full resolution in its last stage).
#:
#: Why: the correlation ratio models the moving intensity as a function of the fixed intensity
#: *class* plus noise. Smoothing does not commute with a non-linear intensity relation: where the
#: fixed image smoothed to 3 mm mixes tissues (background, a thin cortex, the white matter under
#: it), its class does not determine the moving intensity, and as that mixing happens at the convex
#: brain surface the within-class variance is smallest with the moving brain too large. Measured at
#: the truth on synthetic EPI -> T1 pairs (optimum of an isotropic scaling): -0.64 % with the EPI's
#: contrast and -0.66 % with an EPI uniform over the brain, whatever the EPI's blur (1.5-3.5 mm
#: FWHM); with the 1 mm T1's own classes +0.20 % and -0.08 %. Not a free lunch: for a moving
#: contrast nearly linear in the fixed one (T1-like), matched resolutions are better (-0.2 % smoothed,
#: -0.4 % native). The information metrics keep matched resolutions: their joint histogram of a
#: sharp fixed image against the blurred moving one is biased by +1.6 % on the same images.
NATIVE_FIXED_METRICS = frozenset({"cr"})


def get_metric(name: str, prior=None):
    """Look a metric up by name and return the callable ``hist -> (value, dtable)``.

    Parameters
    ----------
    name : str
        One of :data:`METRICS`.
    prior : ndarray (F, M) or str or Path, optional
        Expected joint histogram (or an ``.npz`` from :func:`save_prior`); required by the metrics
        in :data:`PRIOR_METRICS` and refused by the others.

    Raises
    ------
    InputError
        Unknown name (the message lists the valid names), a missing or unused prior, a bad prior.
    """
    try:
        entry = METRICS[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}") from None
    if name in PRIOR_METRICS:
        if prior is None:
            raise InputError(f"metric {name!r} needs a prior: regkl learn-prior ... then --prior prior.npz")
        if isinstance(prior, (str, os.PathLike)):
            prior = load_prior(prior)[0]
        return entry(prior)
    if prior is not None:
        raise InputError(f"metric {name!r} does not use a prior; --prior only applies to "
                         f"{', '.join(sorted(PRIOR_METRICS))}")
    return entry
