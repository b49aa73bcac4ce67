#!/usr/bin/env bash
# Build a small BIDS-like tree from the bundled sample pair and align every run with regkl batch.
# Usage: bash examples/batch_bids.sh [WORKDIR]      (from the repository root, regkl installed)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
ds="$work/ds"
for sub in 01 02; do
  for ses in 1 2; do
    mkdir -p "$ds/sub-$sub/ses-$ses/anat" "$ds/sub-$sub/ses-$ses/func"
    cp "$here/data/sub-01_T1w.nii.gz" "$ds/sub-$sub/ses-$ses/anat/sub-${sub}_ses-${ses}_T1w.nii.gz"
    for run in 1 2; do
      cp "$here/data/sub-01_bold.nii.gz" "$ds/sub-$sub/ses-$ses/func/sub-${sub}_ses-${ses}_task-rest_run-${run}_bold.nii.gz"
    done
  done
done
echo '{"Name": "regkl example", "BIDSVersion": "1.9.0"}' > "$ds/dataset_description.json"
echo "dataset: $ds" >&2

# Register every run (2 processes); results in $ds/derivatives/regkl, summary on stdout as TSV.
regkl batch "$ds" --jobs 2
column -t -s $'\t' "$ds/derivatives/regkl/logs/regkl_summary.tsv" | cut -c1-160
echo "HTML report (QC pictures, worst first): $ds/derivatives/regkl/regkl_report.html" >&2

# Running it again skips the completed pairs (resumable); --force would redo them. A changed
# result-shaping option (or a changed input) redoes the pairs concerned, and stderr says why.
regkl batch "$ds" --jobs 2 --json -q | python3 -c 'import json,sys; print({r["status"] for r in json.load(sys.stdin)})'

# The results are a BIDS derivative dataset that pybids indexes (pip install pybids).
python3 -c 'import sys; from bids import BIDSLayout
layout = BIDSLayout(sys.argv[1], derivatives=True)
print(len(layout.get(desc="coreg", suffix="xfm", extension=".txt")), "transforms found by pybids")
# head motion of every BOLD run (--hmc, the default): confounds, per-volume transforms, boldref
print(len(layout.get(desc="confounds", suffix="timeseries", extension=".tsv")), "confounds tables,",
      len(layout.get(desc="hmc", suffix="xfm", extension=".txt")), "head-motion transform files")' "$ds" \
  || echo "(pybids not installed: skipped the BIDSLayout check)" >&2

# Apply one saved transform to the whole 4D series (every volume onto the T1 grid).
x="$ds/derivatives/regkl/sub-01/ses-1/func/sub-01_ses-1_task-rest_run-1_from-boldref_to-T1w_mode-image_desc-coreg_xfm.txt"
regkl apply "$x" "$ds/sub-01/ses-1/func/sub-01_ses-1_task-rest_run-1_bold.nii.gz" \
      "$ds/sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz" -o "$work/run-1_bold_in_T1w.nii.gz"
echo "4D series in T1 space: $work/run-1_bold_in_T1w.nii.gz" >&2
