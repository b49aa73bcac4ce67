"""Fuzz regkl's readers: N generated inputs, each must load into a valid result or raise InputError.

Inputs (hypothesis strategies shared with tests/test_fuzz.py):

- ``nifti``: single-file NIfTI-1/2 built field by field: 1-6 dimensions, every datatype code (and
  invalid ones), random scl_slope/inter, sform/qform codes and matrices (NaN, infinite, singular),
  voxel sizes, vox_offset, header dims that do not match the data, extensions, gzip or not, then
  truncated, bytes flipped, garbage appended or zeroed;
- ``damaged``: a valid image written by nibabel, then truncated and/or with bytes changed;
- ``transform``: ITK text transforms (random types, parameter counts, tokens: NaN, inf, 1e999,
  words...), RAS 4x4 text matrices (wrong row/column counts, bad tokens, singular), and binary
  garbage named .h5/.mat/.tfm/.txt (through SimpleITK).

Each input goes through ``load_volume`` and ``load_series`` (images) or ``load_transform``; the run
fails (exit code 1, hypothesis prints the smallest failing input) on any other exception, on a
warning for a refused input, or on an accepted result that is not valid (non-finite values or
matrix, not 3D, singular).

    /work/venv/bin/python benchmarks/fuzz_readers.py --n 10000 [--seed 0]

Stops after N distinct inputs (hypothesis repeats some; each distinct input is checked once).
Prints the number of inputs checked and generated, the outcome table and the time.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hypothesis import HealthCheck, given, seed as hseed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.test_fuzz import TRANSFORM_FILES, check_image, check_transform, damaged_valid_files, nifti_files  # noqa: E402

KINDS = {"nifti": (nifti_files(), check_image), "damaged": (damaged_valid_files(), check_image),
         "transform": (TRANSFORM_FILES, check_transform)}


class _Enough(BaseException):
    """Raised once N distinct inputs have been checked (a BaseException: hypothesis lets it through)."""


def _category(problem: str) -> str:
    """A message without its numbers and quoted details, for counting outcome classes."""
    text = problem
    for _ in range(4):  # innermost brackets first
        text = re.sub(r"\([^()]*\)|\[[^\[\]]*\]|'[^']*'|\"[^\"]*\"", "", text)
    text = re.sub(r"-?\d[\d.e+-]*", "N", text)
    text = text.split(":")[0]
    return " ".join(text.split())[:70]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10000, help="distinct inputs to check (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    parser.add_argument("--top", type=int, default=25, help="refusal classes listed (default 25)")
    parser.add_argument("--failures", type=Path, default=Path("fuzz_failures"),
                        help="where a failing input is saved (default ./fuzz_failures)")
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="regkl-fuzz-"))
    counts = collections.Counter()
    reasons = collections.Counter()
    digests = set()
    t0 = time.perf_counter()

    generated = [0]

    @hseed(args.seed)
    @settings(max_examples=4 * args.n, deadline=None, database=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(sorted(KINDS)).flatmap(lambda k: st.tuples(st.just(k), KINDS[k][0])))
    def run(tagged):
        kind, (suffix, data) = tagged
        generated[0] += 1
        digest = hashlib.blake2b(kind.encode() + suffix.encode() + data, digest_size=16).digest()
        if digest in digests:  # hypothesis repeats some inputs: each distinct input is checked once
            return
        if len(digests) >= args.n:
            raise _Enough
        digests.add(digest)
        path = folder / f"{kind}{suffix}"
        path.write_bytes(data)
        try:
            outcome, problem = KINDS[kind][1](path)
        except BaseException:
            args.failures.mkdir(parents=True, exist_ok=True)  # the last one saved is hypothesis's smallest
            shutil.copy(path, args.failures / f"failing_{kind}{suffix}")
            raise
        counts[kind, outcome] += 1
        if outcome == "refused":
            reasons[kind, _category(problem)] += 1

    failed = False
    try:
        run()
    except _Enough:
        pass
    except Exception as exc:  # noqa: BLE001 - report and exit 1 (hypothesis printed the example)
        failed = True
        traceback.print_exc()
        print(f"FAILED: {type(exc).__name__}: {exc}; failing input saved in {args.failures}/", file=sys.stderr)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    seconds = time.perf_counter() - t0

    total = sum(counts.values())
    print(f"distinct inputs checked: {total} (of {generated[0]} generated) in {seconds:.1f} s "
          f"({total / max(seconds, 1e-9):.0f}/s); unhandled exceptions: {'YES (see above)' if failed else 0}")
    print()
    print(f"{'kind':10s} {'inputs':>7s} {'loaded':>7s} {'refused':>8s}")
    for kind in sorted(KINDS):
        ok, bad = counts[kind, "ok"], counts[kind, "refused"]
        print(f"{kind:10s} {ok + bad:7d} {ok:7d} {bad:8d}")
    print()
    print(f"most frequent refusal messages (numbers and details removed), top {args.top}:")
    for (kind, reason), n in reasons.most_common(args.top):
        print(f"{n:7d}  {kind:10s} {reason}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
