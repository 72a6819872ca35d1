#!/usr/bin/env bash
# FreeMask filtering of sample runs: a segmenter trained on the real train split (cached by dataset hash) scores
# every synthetic pixel; pixels far above their class's usual loss become 255 (ignore) in labels_filtered/, and
# images with too many of them are listed as dropped in filter.json (plus filter.png) of each sample run folder.
#
#   evaluation/filter.sh --data-dir datasets/tiles --samples Results/tiles/sample_001 --allow-training
#   evaluation/evaluate.sh --data-dir datasets/tiles --samples Results/tiles/sample_001 --synthetic-labels filtered
#   evaluation/filter.sh --help
#
# Relative paths are read from the current folder. Exit status 2 = a mistake in the input.
set -euo pipefail
repo_root="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${repo_root}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" -m evaluation.filter "$@"
