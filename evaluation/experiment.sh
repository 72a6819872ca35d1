#!/usr/bin/env bash
# The low-data study: does synthetic data raise mIoU when real labels are scarce? Trains the SDM on a fraction of
# the real images, generates every synthetic variant (SDM modes, copy-paste), trains segmenters on each over
# paired seeds and writes <output_dir>/report.md + summary.json. A killed study resumes where it stopped.
#
#   evaluation/experiment.sh -c configs/experiment_magnetic_tile.json            # real, paste, SDM: ~4.7 h (bf16 CPU)
#   evaluation/experiment.sh -c configs/experiment_magnetic_tile.json --estimate # its time here, by stage
#   evaluation/experiment.sh -c configs/experiment_magnetic_tile.json --quick    # the same at toy size, about a minute
#   evaluation/experiment.sh -c configs/experiment_magnetic_tile_round_one.json  # round one's 2-hour study (bf16 CPU)
#   evaluation/experiment.sh --help
#
# Exit status 2 = a mistake in the input (one line names the file and key).
set -euo pipefail
repo_root="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${repo_root}${PYTHONPATH:+:${PYTHONPATH}}"
for arg in "$@"; do
    # tqdm reads TQDM_DISABLE when it is imported, before the study parses its options: set it here
    if [[ "${arg}" == "--no-progress" ]]; then export TQDM_DISABLE=1; fi
done
exec "${PYTHON:-python3}" -m evaluation.study "$@"
