#!/usr/bin/env bash
# The GPU check of issue 15: ONE Markdown table (stdout, and --out FILE or $OUT/gpu_check.md) of parity
# (fp32 vs the ISDM reference, bf16 vs fp32), ISDM's 256 px model training images/s and peak memory (eager and
# torch.compile, with and without gradient checkpointing), guided sampling s/image (ancestral 300, dpm++2m 20)
# and a torchrun run (main.py train; an NCCL collective), within about 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh            # on a GPU machine
#   bash benchmarks/gpu_check.sh --tiny     # tiny config on CPU, gloo, no compile (what CI runs)
#
# Options (see benchmarks/gpu_check.py --help): --out FILE, --budget SECONDS, --fixture tiny_sdm.pt.
# Exit status 1 when a row that can run here gave no result (its note says why); the table is written anyway.
set -euo pipefail
cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
