"""Same inputs and seed -> bit-identical transforms at any Numba thread count; time cap."""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bit_identical_transforms_across_thread_counts(tmp_path, real_pair_paths):
    moving, fixed = real_pair_paths
    texts = {}
    for threads in (1, 2, 4, 1, 2, 4):
        out = tmp_path / f"t{threads}_{len(texts)}.tfm"
        env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
        proc = subprocess.run([sys.executable, "-m", "regkl.cli", "register", str(moving), str(fixed),
                               "--transform-out", str(out), "-q"], env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        texts[out.name] = out.read_bytes()
    assert len(set(texts.values())) == 1, "transforms differ between runs or thread counts"


def test_time_limit_stops_with_a_clear_message(capsys, real_pair_paths):
    from regkl.cli import main

    moving, fixed = real_pair_paths
    with pytest.raises(SystemExit) as info:
        main(["register", str(moving), str(fixed), "--max-seconds", "0.001"])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "time limit" in err and len(err.strip().splitlines()) == 1
