#!/usr/bin/env bash
# Does synthetic data raise mIoU? Train segmenters on mixes of real and synthetic images (R<real>F<synthetic>),
# test them on the real test split, and write Results/evaluate_NNN/ (metrics.csv, summary.md/.csv, plots).
#
#   evaluation/evaluate.sh -c configs/config_evaluate.json
#   evaluation/evaluate.sh --data-dir datasets/tiles --samples Results/tiles/sample_001 \
#       --mixes RALLF000 RALLF200 --seeds 0 1 2 --models unetplusplus fpn deeplabv3plus
#   evaluation/evaluate.sh --help
#
# Relative paths are read from the current folder, as main.py reads them. Exit status 2 = a mistake in the input.
set -euo pipefail
repo_root="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${repo_root}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" -m evaluation "$@"
