"""Similarity metrics computed from a joint histogram, with their derivatives.

Each metric is a function ``hist (F, M) counts -> (value, dtable)`` where ``value`` is to be
MAXIMISED and ``dtable[l, k] = d value / d hist[l, k]``, the full derivative: sample points carry
weights that change near the moving image's edge, so the histogram's total is not constant.
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


METRICS = {
    "mi": mutual_information,
}


def get_metric(name: str):
    """Look a metric up by name; the error lists the valid names."""
    try:
        return METRICS[name]
    except KeyError:
        raise InputError(f"unknown metric {name!r}; choose one of {', '.join(METRICS)}") from None
