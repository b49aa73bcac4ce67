"""Issue 15: `regkl realign` (head-motion correction), its costs, outputs and bad inputs."""

import numpy as np
import pytest
from scipy import ndimage



# --- the moments kernel and the same-modality costs -----------------------------------------------

def _toy(seed=0):
    from regkl import moments
    from regkl.pyramid import values_at
    from regkl.volume import Volume

    rng = np.random.default_rng(seed)
    data = ndimage.gaussian_filter(rng.normal(size=(20, 22, 18)), 2).astype(np.float32) * 100 + 50
    v2r = np.diag([2.0, 2.0, 2.5, 1.0])
    v2r[:3, 3] = -20
    moving = Volume(data, v2r)
    fixed = Volume(np.roll(data, 1, 0), v2r)
    pts = fixed.world_coords(rng.uniform(0, 17, size=(3000, 3)))
    return moments.make_samples(pts, values_at(fixed, pts)), moments.make_moving(moving), fixed, moving


def test_weighted_moments_equal_brute_force():
    from regkl import moments

    samples, mov, _, moving = _toy()
    m = np.eye(4)
    m[:3, 3] = [0.7, -0.4, 0.3]
    sums, _ = moments.weighted_moments(samples, mov, m)
    vox = (moving.ras2vox @ m)[:3, :3] @ samples.points.T + (moving.ras2vox @ m)[:3, 3:4]
    top = np.array(moving.shape, dtype=float)[:, None] - 1.0
    a, b = np.clip(vox, 0.0, 1.0), np.clip(top - vox, 0.0, 1.0)
    w = np.prod(a * a * (3 - 2 * a) * b * b * (3 - 2 * b), axis=0)   # smoothstep ramp over the edge voxel
    assert 0 < np.count_nonzero(w < 1) < len(w)
    mv = (ndimage.map_coordinates(moving.data.astype(np.float64), vox, order=1) - mov.lo) * mov.scale
    f = samples.values
    brute = [w.sum(), (w * f).sum(), (w * f * f).sum(), (w * mv).sum(), (w * mv * mv).sum(), (w * f * mv).sum()]
    np.testing.assert_allclose(sums, brute, rtol=1e-9)


@pytest.mark.parametrize("cost", ["ls", "nc"])
def test_cost_gradient_matches_finite_differences(cost):
    from regkl import moments
    from regkl.transforms import get_model

    samples, mov, fixed, _ = _toy(1)
    rigid, c = get_model("rigid"), fixed.centre
    p = np.array([0.05, -0.03, 0.02, 1.0, -0.5, 0.7])
    _, gmat, _ = moments.evaluate(cost, samples, mov, rigid.matrix(p, c))
    grad = np.tensordot(rigid.dmatrix(p, c), gmat, axes=([1, 2], [0, 1]))
    fd = []
    for k in range(6):
        h = 1e-5 if k < 3 else 1e-4
        e = np.zeros(6)
        e[k] = h
        fd.append((moments.evaluate(cost, samples, mov, rigid.matrix(p + e, c))[0]
                   - moments.evaluate(cost, samples, mov, rigid.matrix(p - e, c))[0]) / (2 * h))
    np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-7 * np.abs(fd).max())


def test_moments_serial_and_parallel_identical_and_nc_ignores_gain():
    from regkl import moments

    samples, mov, _, moving = _toy(2)
    m = np.eye(4)
    a = moments.weighted_moments(samples, mov, m, serial=True)
    b = moments.weighted_moments(samples, mov, m, serial=False)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    scaled = moments.make_moving(moving.with_data(moving.data * 3.0 + 10.0))
    nc1 = moments.evaluate("nc", samples, mov, m)[0]
    nc2 = moments.evaluate("nc", samples, scaled, m)[0]
    assert nc2 == pytest.approx(nc1, rel=1e-7)   # the scaled copy is stored in float32


# --- motion tables --------------------------------------------------------------------------------

def test_framewise_displacement_power_2012():
    from regkl.motion import framewise_displacement

    p = np.zeros((3, 6))
    p[1, 3:] = [1.0, -2.0, 0.5]          # 3.5 mm of translation
    p[2, 3:] = p[1, 3:]
    p[2, 0] = 0.01                       # 0.01 rad on a 50 mm sphere: 0.5 mm
    fd = framewise_displacement(p)
    assert np.isnan(fd[0])
    np.testing.assert_allclose(fd[1:], [3.5, 0.5])


def test_non_steady_state_detector():
    from regkl.motion import non_steady_volumes

    rng = np.random.default_rng(0)
    signal = 100 + rng.normal(0, 0.5, 60)
    assert non_steady_volumes(signal) == 0
    signal[:3] += [40, 20, 10]
    assert non_steady_volumes(signal) == 3
    assert non_steady_volumes(np.full(20, 5.0)) == 0


# --- realignment of a small series with known motion ------------------------------------------------

@pytest.fixture(scope="session")
def small_series(template):
    """14 synthetic EPI volumes (3.5 mm) with known motion (one spike of several mm), 2 dummy scans.

    Rendered from the 1 mm template for every pose, so the truth holds at the EPI's resolution (a
    series resampled from the real 3 mm b0 is aliased: there every tool, ANTs included, shows a
    bias of ~0.05-0.1 mm; see benchmarks/bench_realign.py)."""
    from regkl import synthetic
    from regkl import synthetic_motion as sm

    centre = synthetic.brain_points(template, 4).mean(axis=0)
    vols, mats, _ = sm.motion_series(template, np.random.default_rng(5), 14, centre=centre, n_spikes=1,
                                     n_dummy=2, voxel_mm=3.5)
    return vols, mats, synthetic.brain_points(template, step_vox=4)


@pytest.fixture(scope="session")
def small_result(small_series):
    from regkl.realign import realign

    return realign(small_series[0], threads=2)


def test_realign_recovers_known_motion(small_series, small_result):
    from regkl import synthetic_motion as sm

    vols, mats, pts = small_series
    err = sm.motion_errors(small_result.ref2volume, mats, pts)
    moved = sm.motion_errors(np.repeat(np.eye(4)[None], len(mats), 0), mats, pts)
    assert moved.max() > 3.0           # the series really moves (a spike of several mm)
    assert np.median(err) < 0.1 and err.max() < 0.3, err
    assert small_result.n_non_steady == 2
    assert small_result.settings["reference"] == "auto" and small_result.reference.note.startswith("volume ")
    assert int(small_result.reference.note.split()[1]) >= 2   # never a dummy scan


def test_realign_deterministic_at_any_thread_count(small_series, small_result):
    from regkl.realign import realign

    one = realign(small_series[0], threads=1)
    assert np.array_equal(one.ref2volume, small_result.ref2volume)
    assert np.array_equal(one.boldref.data, small_result.boldref.data)


def _save_series(vols, path, data=None):
    import nibabel as nib

    arr = np.stack([v.data for v in vols], axis=-1) if data is None else data
    img = nib.Nifti1Image(arr, vols[0].vox2ras)
    img.header.set_zooms(tuple(vols[0].spacing) + (2.0,))
    nib.save(img, str(path))
    return path


def test_realign_command_outputs_read_by_nitransforms(small_series, tmp_path, capfd):
    import nibabel as nib
    import nitransforms as nt
    from nitransforms.resampling import apply

    from regkl.cli import main

    series = _save_series(small_series[0][:8], tmp_path / "bold.nii.gz")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["realign", str(series), "--prefix", str(out), "-o", str(tmp_path / "realigned.nii.gz"),
              "--par", str(tmp_path / "bold.par"), "--qc", str(tmp_path / "motion.png"), "-q", "--threads", "2"])
    assert exc.value.code == 0, capfd.readouterr().err
    rows = (tmp_path / "out_motion.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z",
                                   "framewise_displacement"]
    assert len(rows) == 9 and rows[1].split("\t")[-1] == "n/a"
    table = np.array([[float(v) for v in r.split("\t")[:6]] for r in rows[1:]])
    par = np.loadtxt(tmp_path / "bold.par")
    np.testing.assert_allclose(par[:, :3], table[:, 3:], atol=1e-6)   # MCFLIRT: rotations first
    np.testing.assert_allclose(par[:, 3:], table[:, :3], atol=1e-5)
    assert (tmp_path / "motion.png").read_bytes()[:4] == b"\x89PNG"
    # nitransforms reads one transform per volume and reproduces the realigned series
    xfm = nt.linear.load(str(tmp_path / "out_hmc_xfm.txt"), fmt="itk")
    assert len(xfm) == 8
    ref = nib.load(str(tmp_path / "out_boldref.nii.gz"))
    theirs = np.asarray(apply(xfm, nib.load(str(series)), reference=ref, order=1).dataobj)
    ours = nib.load(str(tmp_path / "realigned.nii.gz")).get_fdata()
    assert ours.shape == theirs.shape == small_series[0][0].shape + (8,)
    inside = ours[..., 0] > np.percentile(ours[..., 0], 50)
    assert np.abs(ours[inside] - theirs[inside]).max() < 1e-3 * np.abs(ours).max()


def _run(args, capfd):
    from regkl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(args)
    return exc.value.code, capfd.readouterr().err


def test_realign_bad_inputs_one_line_and_nothing_written(small_series, tmp_path, capfd):
    import nibabel as nib

    vols = small_series[0][:4]
    one = tmp_path / "one.nii.gz"
    nib.save(nib.Nifti1Image(vols[0].data, vols[0].vox2ras), str(one))
    single = _save_series(vols[:1], tmp_path / "single.nii.gz")
    far = vols[0].vox2ras.copy()
    far[:3, 3] += 500.0
    far_ref = tmp_path / "far.nii.gz"
    nib.save(nib.Nifti1Image(vols[0].data, far), str(far_ref))
    series = _save_series(vols, tmp_path / "bold.nii.gz")
    cases = [([str(one)], "single volume"), ([str(single)], "single volume"),
             ([str(series), "--reference", str(far_ref)], "does not overlap"),
             ([str(series), "--reference", "9"], "volume 9 requested"),
             ([str(series), "--confounds", str(series)], "overwrite an input")]
    for args, words in cases:
        code, err = _run(["realign", *args, "--prefix", str(tmp_path / "x"), "-q"], capfd)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and words in lines[0], (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bold.nii.gz", "far.nii.gz", "one.nii.gz",
                                                          "single.nii.gz"]


def test_realign_nan_volume_is_flagged_not_fatal(small_series, tmp_path, capfd):
    vols = small_series[0][:6]
    data = np.stack([v.data for v in vols], axis=-1)
    data[..., 3] = np.nan
    series = _save_series(vols, tmp_path / "bold.nii.gz", data)
    code, err = _run(["realign", str(series), "--prefix", str(tmp_path / "x"), "--threads", "1"], capfd)
    assert code == 0, err
    assert "volume 3: constant (empty or not-a-number)" in err
    rows = (tmp_path / "x_motion.tsv").read_text().splitlines()
    assert rows[4].split("\t")[:6] == rows[3].split("\t")[:6]   # the neighbour's transform


def test_register_moving_volume_realigned(small_series, template, tmp_path, capfd):
    import json

    from regkl import synthetic
    from regkl.writers import save_volume

    series = _save_series(small_series[0][:8], tmp_path / "bold.nii.gz")
    t1 = tmp_path / "t1.nii.gz"
    save_volume(synthetic.make_t1(template, voxel_mm=3.0), t1)
    from regkl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["register", str(series), str(t1), "--moving-volume", "realigned", "--json", "-q", "--search", "none"])
    out, err = capfd.readouterr()
    assert exc.value.code == 0, err
    assert json.loads(out)["moving_reference"].startswith("boldref: median of 6 realigned volumes")  # 2 dummies out


def test_realign_reference_file_must_share_the_series_contrast(small_series, template, tmp_path, capfd):
    """A T1 as --reference would make up motion with the same-modality costs: refused, nothing
    written; a noisy volume of the series given as a file is accepted, and --cost mi takes the T1."""
    import nibabel as nib

    from regkl import synthetic
    from regkl.resample import resample

    vols = small_series[0][2:6]
    series = _save_series(vols, tmp_path / "bold.nii.gz")
    t1 = resample(synthetic.make_t1(template), vols[0], np.eye(4))
    t1_ref = tmp_path / "T1w.nii.gz"
    nib.save(nib.Nifti1Image(t1.data, vols[0].vox2ras), str(t1_ref))
    noisy = vols[1].data + np.random.default_rng(0).normal(0, 0.15 * np.percentile(vols[1].data, 90), vols[1].shape)
    noisy_ref = tmp_path / "sbref.nii.gz"
    nib.save(nib.Nifti1Image(noisy.astype(np.float32), vols[0].vox2ras), str(noisy_ref))
    for args, words in (([str(series), "--reference", str(t1_ref)], "does not look like the volumes"),
                        ([str(series), "--reference", "-1"], "count from 0")):
        code, err = _run(["realign", *args, "--prefix", str(tmp_path / "x"), "-q"], capfd)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and words in lines[0], (args, err)
    assert not list(tmp_path.glob("x*"))
    for args in ([str(series), "--reference", str(noisy_ref)], [str(series), "--reference", str(t1_ref),
                                                                 "--cost", "mi"]):
        code, err = _run(["realign", *args, "--prefix", str(tmp_path / "y"), "-q", "--threads", "1"], capfd)
        assert code == 0, (args, err)


@pytest.mark.parametrize("threads", [0, "2", 1.5, True])
def test_realign_api_refuses_odd_thread_counts(small_series, threads):
    from regkl.errors import InputError
    from regkl.realign import realign

    with pytest.raises(InputError, match="threads must be a whole number"):
        realign(small_series[0][:2], threads=threads)


def test_realign_reference_and_prefix_edge_cases(small_series, tmp_path, capfd):
    """A 4D reference file and an empty reference are refused, a duplicate output is named, a folder
    prefix puts the series' name inside it, and a file reference is named in the summary."""
    import json

    import nibabel as nib

    vols = small_series[0][2:5]
    series = _save_series(vols, tmp_path / "bold.nii.gz")
    ref = tmp_path / "ref.nii.gz"
    nib.save(nib.Nifti1Image(vols[1].data, vols[1].vox2ras), str(ref))
    for args, words in (([str(series), "--reference", str(series)], "is a 4D series of 3 volumes"),
                        ([str(series), "--reference", " "], "must not be empty"),
                        ([str(series), "--confounds", str(tmp_path / "a.tsv"), "--xfm", str(tmp_path / "a.tsv")],
                         f"{tmp_path / 'a.tsv'}: two outputs name the same file")):
        code, err = _run(["realign", *args, "--prefix", str(tmp_path / "x"), "-q"], capfd)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and words in lines[0], (args, err)
    out = tmp_path / "out"
    out.mkdir()
    from regkl.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["realign", str(series), "--reference", str(ref), "--prefix", f"{out}/", "--json", "-q",
              "--threads", "1"])
    captured = capfd.readouterr()
    assert exc.value.code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["reference"] == f"image {ref}"
    assert sorted(p.name for p in out.iterdir()) == ["bold_boldref.nii.gz", "bold_hmc_xfm.txt", "bold_motion.tsv"]
