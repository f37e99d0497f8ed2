#!/usr/bin/env bash
# On the device machine (see ../shared/device/README.md): install MLX CUDA, run the GPU tests.
set -o pipefail
bash .device/b/install.sh || exit 3
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log"
