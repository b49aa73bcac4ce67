"""The guard of automatic masks: an answer found with them is kept only if the whole images do
not contradict it (see :func:`_keep_masked_or_plain`)."""

from __future__ import annotations

from .objective import _lbfgs
from .transforms import rms_displacement


#: An answer found with automatic masks is kept only if the whole (unmasked) images fit it at most this
#: much worse (relative metric) than the unmasked answer. Measured: masks that change nothing of
#: substance cost < 0.05 % (synthetic EPIs onto brain-only and whole-head T1s); the moving auto mask of the
#: real b0/T2w pair, which pulls the answer 3 mm away, costs 1.1 %.
AUTO_MASK_MAX_LOSS = 0.005
#: ... unless it is within this distance (RMS mm over the sample points) of the unmasked answer anyway.
AUTO_MASK_FREE_MM = 0.5


def _keep_masked_or_plain(fine, plain_fine, params, plain, max_iter, say, name):
    """(matrix, params, what was kept) after a registration with automatic masks.

    ``fine`` is the masked finest-level objective and ``params`` its solution; ``plain`` the
    registration without the automatic masks and ``plain_fine`` an unmasked finest-level objective.
    The unmasked answer refined on the masked points replaces the masked answer when it scores higher
    there (the masked run missed its own optimum). The masked choice is then kept only if the whole
    images fit it within :data:`AUTO_MASK_MAX_LOSS` (relative) as well as the unmasked answer on the
    same points, or lies within :data:`AUTO_MASK_FREE_MM` of the unmasked answer; otherwise the masks
    moved the answer to a pose the images themselves contradict, and the unmasked answer is kept with a
    warning.
    """
    import warnings

    p_plain = fine.model.from_matrix(plain.fixed2moving, fine.centre)
    own_value = fine.metric_at(params)[0]
    refined, refined_value, _ = _lbfgs(fine, p_plain, max_iter)
    kept, chosen = ("masked", params) if own_value >= refined_value else ("unmasked answer refined with the masks",
                                                                         refined)
    matrix = fine.model.matrix(chosen, fine.centre)
    whole_plain = plain_fine.metric_at(plain_fine.model.from_matrix(plain.fixed2moving, fine.centre))[0]
    whole_chosen = plain_fine.metric_at(plain_fine.model.from_matrix(matrix, fine.centre))[0]
    loss = (whole_plain - whole_chosen) / max(abs(whole_plain), 1e-12)
    moved = rms_displacement(matrix, plain.fixed2moving, fine.samples.points)
    say(f"auto mask: the {kept} answer is {moved:.2f} mm from the unmasked one; the whole images fit it "
        f"{loss:+.2%} worse")
    if loss > AUTO_MASK_MAX_LOSS and moved > AUTO_MASK_FREE_MM:
        warnings.warn(f"{name}: the automatic masks moved the answer {moved:.1f} mm to a pose the whole images fit "
                      f"{loss:.1%} worse than the unmasked answer; kept the unmasked answer (give masks with "
                      "--fixed-mask/--moving-mask to use them as they are)", stacklevel=3)
        return plain.fixed2moving, p_plain, "unmasked (the masked answer fits the whole images worse)"
    return matrix, chosen, kept
