"""QC pictures: written as PNG by register --qc and regkl qc; grid mismatch is a clear error."""

import pytest

from regkl.cli import main


def run(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_register_qc_and_qc_command(tmp_path, capsys, real_pair_paths):
    pytest.importorskip("matplotlib", reason="matplotlib not installed (regkl[qc])")
    moving, fixed = real_pair_paths
    png, out = tmp_path / "qc.png", tmp_path / "out.nii.gz"
    code, _, err = run(["register", moving, fixed, "-o", out, "--qc", png, "-q"], capsys)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20000
    png2 = tmp_path / "qc2.png"
    code, _, err = run(["qc", fixed, out, "-o", png2, "--slices", "3"], capsys)
    assert code == 0 and png2.read_bytes()[:4] == b"\x89PNG"
    code, _, err = run(["qc", fixed, moving, "-o", tmp_path / "bad.png"], capsys)  # moving is not on the grid
    assert code == 2 and "same shape" in err and not (tmp_path / "bad.png").exists()


def test_canonical_view_orders_axes_ras():
    import numpy as np

    from regkl.qc import canonical
    from regkl.volume import Volume

    data = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    ras = Volume(data, np.eye(4))
    # stored as (S, P, R): permuted and flipped
    v2r = np.array([[0, 0, 1, 0], [0, -1, 0, 2], [1, 0, 0, 0], [0, 0, 0, 1.0]])
    stored = Volume(np.flip(np.transpose(data, (2, 1, 0)), 1), v2r)
    np.testing.assert_array_equal(canonical(stored), canonical(ras))


def test_confidence_flags_an_unfinished_registration(capsys, real_pair_paths):
    moving, fixed = real_pair_paths
    code, out, err = run(["register", moving, fixed, "--init", "header", "--search", "none", "--levels", "1",
                          "--max-iter", "1", "--fail-on-suspect", "-q"], capsys)
    assert code == 1 and "suspect" in err
    code, out, err = run(["register", moving, fixed, "--confidence", "--json", "-q"], capsys)
    import json

    conf = json.loads(out)["confidence"]
    assert code == 0 and conf["suspect"] is False and conf["evidence"]["drift_mm"] < 0.5
