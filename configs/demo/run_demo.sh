#!/usr/bin/env bash
# The end-to-end demo: build the generated demo dataset, train a tiny SDM, finetune it with null labels,
# sample synthetic (mask, image) pairs with classifier-free guidance. CPU-sized: a few minutes on 2 cores.
# Outputs: Results/demo/{train,finetune,sample}_NNN/ (sample: images/ labels/ colored_labels/ samples/ grid.png).
set -euo pipefail
cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.."
python3 -m guided_diffusion.demo datasets/demo
python3 main.py train -c configs/demo/config_train.json
python3 main.py finetune -c configs/demo/config_finetune.json
python3 main.py sample -c configs/demo/config_sample.json
echo "demo done: see the newest Results/demo/sample_*/grid.png"
