"""A run killed mid-write leaves hidden temporary files; the next write of the same output removes
them, but never the temporary files of a writer that is still running."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from regkl.outputs import TEMP_PATTERN, atomic_path, atomic_set


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_write_removes_a_dead_writers_temps_only(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    stale = tmp_path / f".out.nii.gz.{dead}.abcd1234.tmp.nii.gz"
    busy = tmp_path / f".out.nii.gz.{live}.wxyz9876.tmp.nii.gz"
    other = tmp_path / f".other.nii.gz.{dead}.abcd1234.tmp.nii.gz"
    pair = [tmp_path / f".out.hdr.{dead}.q1w2e3r4.tmp{s}" for s in (".hdr", ".img")]
    for p in (stale, busy, other, *pair):
        p.write_bytes(b"partial")
    assert all(re.match(TEMP_PATTERN, p.name) for p in (stale, busy, other, *pair))
    with atomic_path(tmp_path / "out.nii.gz") as tmp:
        assert re.match(TEMP_PATTERN, tmp.name) and f".{os.getpid()}." in tmp.name
        tmp.write_bytes(b"whole")
    with atomic_set(tmp_path / "out.hdr", (".hdr", ".img")) as tmps:
        for t in tmps:
            t.write_bytes(b"whole")
    assert (tmp_path / "out.nii.gz").read_bytes() == b"whole"
    assert not stale.exists() and not any(p.exists() for p in pair)   # the killed writer's leftovers
    assert busy.exists()                                                # a live writer's file stays
    assert other.exists()                                               # another output's is not touched
