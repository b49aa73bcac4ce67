"""Similarity metrics computed from a joint histogram, with their derivatives.

Each metric is a function ``hist (F, M) counts -> (value, dtable)`` where ``value`` is to be
MAXIMISED and ``dtable[l, k] = d value / d hist[l, k]``. Terms of ``dtable`` that are constant
along a fixed-bin row may be dropped: every sample point keeps its fixed bin and a total weight of
one, so such terms do not change the gradient.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError


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
        Derivative of ``value`` with respect to each count, up to per-row constants.
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
    logratio = np.zeros_like(p)
    pm_b = np.broadcast_to(pm, p.shape)
    logratio[nz] = np.log(p[nz] / pm_b[nz])
    return value, logratio / n


METRICS = {
    "mi": mutual_information,
}


def get_metric(name: str):
    """Look a metric up by name; the error lists the valid names."""
    try:
        return METRICS[name]
    except KeyError:
        raise InputError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}") from None
