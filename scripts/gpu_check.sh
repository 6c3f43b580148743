#!/usr/bin/env bash
# GPU throughput check in under 5 minutes on one NVIDIA GPU, resnet50 on 10,000 generated 500x375 JPEGs:
#   model alone (synthetic input): inference bf16 + channels_last, eager and compiled; a training step,
#   bf16 + channels_last vs fp32 NCHW;
#   evaluation from JPEG files decoded on the CPU (loader workers) or on the GPU (nvjpeg), vs a plain loop;
#   training from JPEG files with the standard augmentation and every core but one as loader workers;
#   how often --amp bf16/fp16 and --decode gpu keep the exact path's top-1 class.
# Prints the card, driver and versions, then one table; each benchmark.py run's JSON goes to OUT
# (default results/gpu_check).
#     bash scripts/gpu_check.sh [OUT]
# Without a CUDA GPU it says so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU on this machine: skipping the GPU benchmarks"
    exit 0
fi
out=${1:-results/gpu_check}
data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
mkdir -p "$out"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -c "import torch, torchvision; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'torchvision', torchvision.__version__)"
workers=$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))

python - "$data" <<'PY'
# 20 wnid folders x 500 JPEGs: smooth shapes plus noise, about the file size and decode cost of photos
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from dataset import imagenet_wnids


def make(i):
    rng = np.random.default_rng(i)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 12, (375, 500, 3)).astype(np.int16)
    path = Path(sys.argv[1]) / imagenet_wnids()[i % 20 * 50] / f"{i:05d}.JPEG"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


with ProcessPoolExecutor() as pool:
    list(pool.map(make, range(10000), chunksize=100))
print(f"generated 10000 JPEGs (500x375) in {sys.argv[1]}")
PY

run() { python benchmark.py --arch resnet50 --data "$data" --batch-size 256 --train-batch-size 256 "$@"; }
bf16=(--amp bf16 --channels-last true)
run --parts forward "${bf16[@]}" --compile --json "$out/forward_compiled.json"
run --parts forward,step "${bf16[@]}" --train-steps 10 --json "$out/model_bf16.json"
run --parts forward,step --amp none --channels-last false --train-steps 5 --json "$out/model_fp32.json"
run --parts eval,train "${bf16[@]}" --limit 2000 --train-steps 7 --repeats 2 --workers "$workers" --json "$out/from_jpeg.json"
run --parts eval "${bf16[@]}" --decode gpu --workers "$workers" --no-baselines --json "$out/gpu_decode.json"
run --parts approx --limit 500 --workers "$workers" --json "$out/approx.json"   # random weights: agreement, not accuracy

names="forward_compiled model_bf16 model_fp32 from_jpeg gpu_decode approx"
python benchmark.py --merge $(for name in $names; do echo "$out/$name.json"; done)
