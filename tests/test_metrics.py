"""Histogram metrics: values against independent computations, derivatives against finite
differences (per histogram entry and through the whole registration gradient), alignment sanity,
and the prior file format."""

import json
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy

from regkl import histogram
from regkl import metrics as M
from regkl.errors import InputError, OutputError
from regkl.objective import _Objective
from regkl.transforms import get_model
from regkl.volume import Volume

#: Every registered metric must be covered here (a new metric without tests fails test_registry).
TESTED = ("mi", "nmi", "cr", "jsd", "kl")


def _random_hist(seed, shape=(7, 11), zero_frac=0.3, empty_row=True):
    rng = np.random.default_rng(seed)
    h = rng.random(shape) * 40 * (rng.random(shape) > zero_frac)
    if empty_row:
        h[shape[0] // 2] = 0.0
    return h


def _random_prior(shape, seed=99):
    return np.random.default_rng(seed).random(shape) + 0.05


def _metric(name, prior=None, shape=(7, 11)):
    if name in M.PRIOR_METRICS:
        return M.get_metric(name, prior if prior is not None else _random_prior(shape))
    return M.get_metric(name)


# ---------------------------------------------------------------------------------------------
# registry

def test_registry_is_fully_tested_and_lookup_works():
    assert set(M.METRICS) == set(TESTED)
    assert M.get_metric("mi") is M.mutual_information          # old call still works
    with pytest.raises(InputError) as err:
        M.get_metric("mutual-info")
    for name in TESTED:
        assert name in str(err.value)
    with pytest.raises(InputError, match=r"metric 'kl' needs a prior: regkl learn-prior .* --prior"):
        M.get_metric("kl")
    with pytest.raises(InputError, match="does not use a prior"):
        M.get_metric("mi", prior=np.ones((4, 4)))


# ---------------------------------------------------------------------------------------------
# (a) values against independent computations

def _marginals_loop(p):
    nf, nm = p.shape
    pf = [sum(p[i, j] for j in range(nm)) for i in range(nf)]
    pm = [sum(p[i, j] for i in range(nf)) for j in range(nm)]
    return pf, pm


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mi_matches_explicit_loops_and_entropies(seed):
    h = _random_hist(seed)
    p = h / h.sum()
    pf, pm = _marginals_loop(p)
    loop = 0.0
    for i in range(p.shape[0]):
        for j in range(p.shape[1]):
            if p[i, j] > 0:
                loop += p[i, j] * math.log(p[i, j] / (pf[i] * pm[j]))
    by_entropy = entropy(pf) + entropy(pm) - entropy(p.ravel())
    value, _ = M.mutual_information(h)
    assert value == pytest.approx(loop, rel=1e-12)
    assert value == pytest.approx(by_entropy, rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nmi_matches_entropies(seed):
    h = _random_hist(seed)
    p = h / h.sum()
    pf, pm = _marginals_loop(p)
    hj = -sum(x * math.log(x) for x in p.ravel() if x > 0)
    expected = (entropy(pf) + entropy(pm)) / hj
    value, _ = M.normalised_mutual_information(h)
    assert value == pytest.approx(expected, rel=1e-12)
    assert 1.0 <= value <= 2.0


def test_nmi_limits():
    # independent: outer product -> 1; one-to-one: diagonal -> 2
    a, b = np.array([1.0, 2, 3]), np.array([4.0, 1, 2, 5])
    assert M.normalised_mutual_information(np.outer(a, b))[0] == pytest.approx(1.0, abs=1e-12)
    assert M.normalised_mutual_information(np.diag([3.0, 1, 2, 7]))[0] == pytest.approx(2.0, abs=1e-12)


def test_nmi_matches_scikit_image():
    metrics = pytest.importorskip("skimage.metrics", reason="scikit-image is optional (independent NMI check)")
    rng = np.random.default_rng(4)
    nf, nm = 6, 9
    a = rng.integers(0, nf, size=(20, 30, 10))
    b = (a * 3 + rng.integers(0, 4, size=a.shape)) % nm      # dependent, noisy
    a.flat[:2], b.flat[:2] = [0, nf - 1], [0, nm - 1]           # both ranges fully used
    hist = np.zeros((nf, nm))
    np.add.at(hist, (a.ravel(), b.ravel()), 1.0)
    ref = metrics.normalized_mutual_information(a, b, bins=[nf, nm])
    assert M.normalised_mutual_information(hist)[0] == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cr_matches_brute_force_class_variances(seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 6, size=(5, 12)) * (rng.random((5, 12)) > 0.3)
    counts[2] = 0                                            # an empty class
    counts[0, 3] += 1
    counts[1, 8] += 1                                        # at least two distinct values
    # raw samples (class, value) giving exactly this histogram: value of column k is k
    cls, val = [], []
    for i in range(counts.shape[0]):
        for k in range(counts.shape[1]):
            cls += [i] * int(counts[i, k])
            val += [float(k)] * int(counts[i, k])
    cls, val = np.array(cls), np.array(val)
    within = 0.0
    for i in np.unique(cls):
        v = val[cls == i]
        within += len(v) / len(val) * np.var(v)
    expected = 1.0 - within / np.var(val)
    value, _ = M.correlation_ratio(counts.astype(float))
    assert value == pytest.approx(expected, rel=1e-12, abs=1e-14)
    assert 0.0 <= value <= 1.0


def test_cr_limits():
    # moving value determined by the class -> 1; same distribution in every class -> 0
    assert M.correlation_ratio(np.diag([2.0, 5, 1, 3]))[0] == pytest.approx(1.0)
    row = np.array([1.0, 0, 3, 2, 5])
    assert M.correlation_ratio(np.outer([1.0, 4, 2], row))[0] == pytest.approx(0.0, abs=1e-14)
    assert M.correlation_ratio(np.outer([1.0, 2], [0, 0, 3.0, 0]))[0] == 0.0   # no moving variance


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jsd_matches_scipy(seed):
    h = _random_hist(seed)
    p = h / h.sum()
    q = np.outer(p.sum(1), p.sum(0))
    expected = jensenshannon(p.ravel(), q.ravel()) ** 2      # scipy returns the square root, base e
    value, _ = M.jensen_shannon(h)
    assert value == pytest.approx(expected, rel=1e-9)
    assert 0.0 <= value <= math.log(2)


def test_jsd_limits():
    assert M.jensen_shannon(np.outer([1.0, 2, 3], [2.0, 1, 1]))[0] == pytest.approx(0.0, abs=1e-14)
    # one-to-one with 2 equal cells: p = diag(1/2), q = 1/4 everywhere
    p = np.array([0.5, 0, 0, 0.5])
    q = np.full(4, 0.25)
    expected = 0.5 * entropy(p, (p + q) / 2) + 0.5 * entropy(q, (p + q) / 2)
    assert M.jensen_shannon(np.eye(2) * 7.0)[0] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_kl_matches_scipy_entropy(seed):
    h = _random_hist(seed)
    prior = _random_prior(h.shape, seed + 10) * 3.0
    prior[0, 0] = 0.0                                         # floored, not infinite
    floored = prior / prior.sum() + M.PRIOR_FLOOR / prior.size
    floored /= floored.sum()
    value, _ = M.kl_to_prior(prior)(h)
    assert value == pytest.approx(-entropy(h.ravel(), floored.ravel()), rel=1e-12)
    assert value <= 0.0
    # the histogram itself as prior: KL = 0 up to the floor
    assert M.kl_to_prior(h)(h * 5.0)[0] == pytest.approx(0.0, abs=1e-4)


@pytest.mark.parametrize("name", TESTED)
def test_value_is_invariant_to_histogram_scale(name):
    f = _metric(name)
    h = _random_hist(3)
    v1, d1 = f(h)
    v2, d2 = f(h * 1e-3)
    assert v2 == pytest.approx(v1, rel=1e-12, abs=1e-15)
    np.testing.assert_allclose(d2, d1 * 1e3, rtol=1e-9, atol=1e-12 * np.abs(d2).max())


# ---------------------------------------------------------------------------------------------
# (b) dtable against finite differences, entry by entry

@pytest.mark.parametrize("name", TESTED)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dtable_matches_finite_differences(name, seed):
    h = _random_hist(seed)
    f = _metric(name, shape=h.shape)
    value, dtable = f(h)
    assert dtable.shape == h.shape and np.all(np.isfinite(dtable))
    scale = np.abs(dtable).max()
    # the metrics are scale invariant, so the derivative along the histogram itself is 0
    assert abs(np.sum(h * dtable)) < 1e-10 * scale * h.sum()
    step = 1e-5
    for (i, j) in np.ndindex(h.shape):
        if h[i, j] > 0:
            up, down = h.copy(), h.copy()
            up[i, j] += step
            down[i, j] -= step
            fd = (f(up)[0] - f(down)[0]) / (2 * step)
            assert dtable[i, j] == pytest.approx(fd, rel=1e-4, abs=1e-6 * scale), (i, j)
        elif name == "cr":
            # no logarithm: the one-sided derivative of an empty cell is finite and exact
            up = h.copy()
            up[i, j] += 1e-7
            fd = (f(up)[0] - value) / 1e-7
            assert dtable[i, j] == pytest.approx(fd, rel=1e-4, abs=1e-5 * scale), (i, j)
        else:
            assert dtable[i, j] == 0.0


@pytest.mark.parametrize("name", TESTED)
def test_degenerate_histograms_are_finite(name):
    f = _metric(name, shape=(6, 10))
    with np.errstate(divide="raise", invalid="raise", over="raise"):
        value, dtable = f(np.zeros((6, 10)))
        assert value == 0.0 and not dtable.any() and dtable.shape == (6, 10)
        single = np.zeros((6, 10))
        single[2, 4] = 1e-3
        one_row = np.zeros((6, 10))
        one_row[1, 3:7] = [1.0, 4.0, 4.0, 1.0]
        for h in (single, one_row, _random_hist(5, (6, 10)) * 1e-250, _random_hist(6, (6, 10)) * 1e250):
            value, dtable = f(h)
            assert np.isfinite(value) and np.all(np.isfinite(dtable))


# ---------------------------------------------------------------------------------------------
# (c) the registration gradient through the kernels

def _blob_field(world, seed, n_blobs=40):
    """Smooth random intensity field defined in world mm (sum of Gaussian blobs), so both images
    of a pair sample exactly the same anatomy, with no fill values anywhere."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform([-5, -5, -5], [65, 69, 61], size=(n_blobs, 3))
    widths = rng.uniform(4.0, 9.0, n_blobs)
    heights = rng.uniform(-1.0, 1.0, n_blobs)
    out = np.zeros(len(world))
    for c, w, a in zip(centres, widths, heights):
        out += a * np.exp(-np.sum((world - c) ** 2, axis=1) / (2 * w * w))
    return out


def _grid_world(shape, v2r):
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    return idx @ v2r[:3, :3].T + v2r[:3, 3]


def _synthetic_pair(seed=7, noise=0.0, noise_seed=0):
    """(fixed, moving), aligned at the identity: the fixed samples a smooth blob field on a 2 mm
    grid; the moving samples the same field on an oblique 2.5 mm grid covering part of the fixed
    field of view (so edge weights matter), through a monotone non-linear intensity remap."""
    f_v2r = np.diag([2.0, 2.0, 2.0, 1.0])
    f_shape = (30, 32, 28)
    fixed = Volume((50 + 20 * _blob_field(_grid_world(f_shape, f_v2r), seed)).reshape(f_shape), f_v2r)
    v2r = np.diag([2.5, 2.5, 2.5, 1.0])
    c, s = math.cos(0.2), math.sin(0.2)
    v2r[:3, :3] = v2r[:3, :3] @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    v2r[:3, 3] = [9.0, 2.0, 4.0]
    m_shape = (20, 22, 18)
    field = (50 + 20 * _blob_field(_grid_world(m_shape, v2r), seed)).reshape(m_shape)
    data = np.sqrt(np.clip(field, 1.0, None)) * 10
    if noise:
        data = data + np.random.default_rng(noise_seed).normal(0, noise, data.shape)
    return fixed, Volume(data.astype(np.float32), v2r)


def _level(fixed, moving, bins=32, seed=0, n=20000):
    rng = np.random.default_rng(seed)
    idx = rng.uniform(0, np.asarray(fixed.shape) - 1, size=(n, 3))
    vals = ndimage.map_coordinates(fixed.data, idx.T, order=1)
    samples = histogram.make_samples(fixed.world_coords(idx), vals, bins)
    return samples, histogram.make_moving_level(moving, bins)


def _objective(fixed, moving, metric_fn, model="rigid", bins=32, seed=0):
    samples, moving_level = _level(fixed, moving, bins, seed)
    mdl = get_model(model)
    return _Objective(samples, moving_level, mdl, metric_fn, fixed.centre_of_mass(), mdl.scales(40.0))


def _aligned_prior(fixed, moving, bins=32, seed=1, matrix=None):
    """Prior learned from the pair's own histogram (other sample points) at ``matrix``."""
    samples, moving_level = _level(fixed, moving, bins, seed)
    ev = histogram.joint_histogram(samples, moving_level, np.eye(4) if matrix is None else matrix)
    return M.prior_from_histograms([ev.hist])


def _metric_for_pair(name, fixed, moving, bins=32):
    if name in M.PRIOR_METRICS:
        return M.get_metric(name, _aligned_prior(fixed, moving, bins))
    return M.get_metric(name)


def _cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _check_gradient(obj, q, h, cos_min=0.99, rtol=None):
    _, grad = obj(q)
    fd = np.array([(obj(q + h * e)[0] - obj(q - h * e)[0]) / (2 * h) for e in np.eye(len(q))])
    assert np.all(np.isfinite(grad)) and np.abs(fd).max() > 0
    assert _cosine(grad, fd) > cos_min, (grad, fd)
    assert np.linalg.norm(grad) == pytest.approx(np.linalg.norm(fd), rel=0.02)
    if rtol is not None:
        np.testing.assert_allclose(grad, fd, rtol=rtol, atol=1e-3 * np.abs(fd).max())


@pytest.fixture(scope="module")
def synthetic_pair():
    return _synthetic_pair()


@pytest.mark.parametrize("name", TESTED)
@pytest.mark.parametrize("model", ["rigid", "translation"])
def test_registration_gradient_matches_finite_differences_synthetic(name, model, synthetic_pair):
    fixed, moving = synthetic_pair
    obj = _objective(fixed, moving, _metric_for_pair(name, fixed, moving), model)
    q = np.full(obj.model.n_params, 0.7)
    _check_gradient(obj, q, 1e-4, rtol=0.05)


@pytest.fixture(scope="module")
def real_pair_4mm(real_pair):
    from regkl.pyramid import downsample

    moving, fixed = real_pair
    return downsample(fixed, 4.0), downsample(moving, 4.0)


@pytest.mark.parametrize("name", TESTED)
def test_registration_gradient_matches_finite_differences_real_pair(name, real_pair_4mm):
    fixed, moving = real_pair_4mm
    obj = _objective(fixed, moving, _metric_for_pair(name, fixed, moving))
    q = np.array([2.0, -1.0, 1.5, 3.0, -2.0, 1.0])
    _check_gradient(obj, q, 1e-3)


# ---------------------------------------------------------------------------------------------
# (d) aligned beats misaligned

def _values_at(fixed, moving, metric_fn, base, shifts_mm, seed=0):
    """Metric values at ``translate(shift) @ base`` for each shift (mm, fixed world)."""
    samples, moving_level = _level(fixed, moving, 32, seed)
    out = []
    for s in shifts_mm:
        m = np.eye(4)
        m[:3, 3] = s
        out.append(metric_fn(histogram.joint_histogram(samples, moving_level, m @ base).hist)[0])
    return out


@pytest.mark.parametrize("name", TESTED)
def test_metric_prefers_the_aligned_pair_synthetic(name):
    fixed, moving = _synthetic_pair(noise=1.0, noise_seed=1)
    if name in M.PRIOR_METRICS:
        # prior learned from another noisy copy of the pair, with other sample points
        other_fixed, other_moving = _synthetic_pair(noise=1.0, noise_seed=2)
        metric_fn = M.get_metric(name, _aligned_prior(other_fixed, other_moving, seed=5))
    else:
        metric_fn = M.get_metric(name)
    shifts = [(0, 0, 0), (6, 0, 0), (0, -6, 0), (0, 0, 6), (-6, 0, 0), (3, 3, -3), (2, 0, 0), (0, 0, -2)]
    aligned, *shifted = _values_at(fixed, moving, metric_fn, np.eye(4), shifts)
    assert all(aligned > s for s in shifted), (aligned, shifted)


#: fixed2moving of the real pair found by ``regkl.optimize.register(b0, T2w)`` (default settings,
#: rounded); the headers alone are ~19 mm and ~8 degrees away from it.
REAL_ALIGNED = np.array([[0.986, 0.130, 0.102, -0.534],
                         [-0.138, 0.987, 0.080, 3.857],
                         [-0.090, -0.093, 0.992, 19.089],
                         [0.0, 0.0, 0.0, 1.0]])


@pytest.mark.parametrize("name", TESTED)
def test_metric_prefers_the_aligned_pair_real(name, real_pair_4mm):
    fixed, moving = real_pair_4mm
    metric_fn = (M.get_metric(name, _aligned_prior(fixed, moving, seed=5, matrix=REAL_ALIGNED))
                 if name in M.PRIOR_METRICS else M.get_metric(name))
    shifts = [(0, 0, 0), (10, 0, 0), (-10, 0, 0), (0, 10, 0), (0, -10, 0), (0, 0, 10), (0, 0, -10)]
    aligned, *shifted = _values_at(fixed, moving, metric_fn, REAL_ALIGNED, shifts)
    assert all(aligned > s for s in shifted), (aligned, shifted)
    # the header-only starting point is worse too
    assert aligned > _values_at(fixed, moving, metric_fn, np.eye(4), [(0, 0, 0)])[0]


# ---------------------------------------------------------------------------------------------
# (e) priors: construction, validation, file round trip

def test_prior_from_histograms_averages_normalised_histograms():
    a = np.array([[1.0, 3.0], [0.0, 0.0]])
    b = np.array([[0.0, 0.0], [50.0, 50.0]])
    np.testing.assert_allclose(M.prior_from_histograms([a, b]), [[0.125, 0.375], [0.25, 0.25]])
    np.testing.assert_allclose(M.prior_from_histograms(iter([a])), a / 4)
    with pytest.raises(InputError, match="no histograms"):
        M.prior_from_histograms([])
    with pytest.raises(InputError, match="shape"):
        M.prior_from_histograms([a, np.ones((3, 2))])
    with pytest.raises(InputError, match="empty"):
        M.prior_from_histograms([a, np.zeros((2, 2))])
    with pytest.raises(InputError, match="negative or non-finite"):
        M.prior_from_histograms([a, np.array([[1.0, np.nan], [0, 0]])])


@pytest.mark.parametrize("bad, match", [
    (np.ones(5), "2D"),
    (np.array([[1.0, np.inf], [1, 1]]), "non-finite"),
    (np.array([[1.0, -1.0], [1, 1]]), "negative"),
    (np.zeros((3, 3)), "all zero"),
    ([["a", "b"]], "numeric"),
])
def test_kl_to_prior_rejects_bad_priors(bad, match):
    with pytest.raises(InputError, match=match):
        M.kl_to_prior(bad)


def test_kl_rejects_histogram_of_other_shape():
    f = M.kl_to_prior(np.ones((8, 8)))
    with pytest.raises(InputError, match="8 x 8 bins but the joint histogram is 8 x 12"):
        f(np.ones((8, 12)))


def test_prior_save_load_round_trip(tmp_path):
    prior = M.prior_from_histograms([_random_hist(0, (6, 9)), _random_hist(1, (6, 9))])
    meta = {"pairs": ["a.nii.gz", "b.nii.gz"], "sampling": 0.5, "note": "é"}
    path = tmp_path / "prior.npz"
    M.save_prior(path, prior, bins=(6, 9), meta=meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior.npz"]   # no temporary left behind
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["bins", "meta_json", "prior"]
    loaded, meta_back = M.load_prior(path)
    np.testing.assert_allclose(loaded, prior, rtol=1e-15)
    assert meta_back == {**meta, "bins": [6, 9]}
    # a name without .npz is kept as is; an int bins means square
    other = tmp_path / "prior.dat"
    M.save_prior(other, np.ones((5, 5)), bins=5, meta={})
    assert other.exists() and not (tmp_path / "prior.dat.npz").exists()
    assert M.load_prior(other)[1] == {"bins": [5, 5]}
    # get_metric accepts the file
    f = M.get_metric("kl", prior=path)
    assert f(prior * 100)[0] == pytest.approx(0.0, abs=1e-4)


def test_save_prior_rejects_bad_input(tmp_path):
    with pytest.raises(InputError, match="does not match bins"):
        M.save_prior(tmp_path / "p.npz", np.ones((4, 5)), bins=4, meta={})
    with pytest.raises(InputError, match="JSON"):
        M.save_prior(tmp_path / "p.npz", np.ones((4, 4)), bins=4, meta={"x": object()})
    with pytest.raises(OutputError, match="folder does not exist"):
        M.save_prior(tmp_path / "missing" / "p.npz", np.ones((4, 4)), bins=4, meta={})
    assert list(tmp_path.iterdir()) == []


def _write_npz(path, **arrays):
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


@pytest.mark.parametrize("case, match", [
    ("missing", "not found"),
    ("folder", "folder"),
    ("text", "cannot read prior file"),
    ("npy", "single array"),
    ("keys", "missing bins, meta_json"),
    ("shape1d", "2D float"),
    ("negative", "negative"),
    ("bins", "does not match its stored bins"),
    ("badbins", "stored bins"),
    ("json", "not valid JSON"),
    ("jsonlist", "not a JSON object"),
    ("pickle", "cannot read prior file"),
])
def test_load_prior_errors_name_the_file(tmp_path, case, match):
    p = tmp_path / "prior.npz"
    good = {"prior": np.ones((4, 4)) / 16, "bins": np.array([4, 4]), "meta_json": np.array("{}")}
    if case == "folder":
        p.mkdir()
    elif case == "text":
        p.write_text("not a zip file\n")
    elif case == "npy":
        with open(p, "wb") as fh:
            np.save(fh, np.ones((4, 4)))
    elif case == "keys":
        _write_npz(p, prior=good["prior"])
    elif case == "shape1d":
        _write_npz(p, **{**good, "prior": np.ones(16)})
    elif case == "negative":
        _write_npz(p, **{**good, "prior": -np.ones((4, 4))})
    elif case == "bins":
        _write_npz(p, **{**good, "bins": np.array([4, 5])})
    elif case == "badbins":
        _write_npz(p, **{**good, "bins": np.array([4.5, 4.0])})
    elif case == "json":
        _write_npz(p, **{**good, "meta_json": np.array("{not json")})
    elif case == "jsonlist":
        _write_npz(p, **{**good, "meta_json": np.array(json.dumps([1, 2]))})
    elif case == "pickle":
        _write_npz(p, **{**good, "meta_json": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(InputError, match=match) as err:
        M.load_prior(p)
    assert err.value.path == str(p)
    assert str(p) in str(err.value)
