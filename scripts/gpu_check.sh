#!/usr/bin/env bash
# GPU throughput check in under 5 minutes on one NVIDIA GPU, resnet50 on 16,000 generated 500x375 JPEGs:
#   model alone (synthetic input): inference bf16 + channels_last, eager and compiled; a training step,
#   bf16 + channels_last vs fp32 NCHW;
#   the loaders alone: decoding + eval transform with PIL, torchcodec, or batched on the GPU;
#   evaluation from JPEG files decoded on the CPU (loader workers) or on the GPU (nvjpeg);
#   training from JPEG files with the standard augmentation and every core but one as loader workers
#   (passes of at least 4 batches per worker: shorter ones time a worker's first batch, not its rate);
#   each recipe's train transform per loader core on this CPU, and the cores one GPU needs at the
#   synthetic training step's rate;
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
# 20 wnid folders x 800 JPEGs: smooth shapes plus noise, about the file size and decode cost of photos
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from coder import imagenet_wnids


def make(i):
    rng = np.random.default_rng(i)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 12, (375, 500, 3)).astype(np.int16)
    path = Path(sys.argv[1]) / imagenet_wnids()[i % 20 * 50] / f"{i:05d}.JPEG"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


with ProcessPoolExecutor() as pool:
    list(pool.map(make, range(16000), chunksize=100))
print(f"generated 16000 JPEGs (500x375) in {sys.argv[1]}")
PY

run() { python benchmark.py --arch resnet50 --data "$data" --batch-size 256 --train-batch-size 256 "$@"; }
bf16=(--amp bf16 --channels-last true)
run --parts forward "${bf16[@]}" --compile --output "$out/forward_compiled.json"
run --parts forward,step "${bf16[@]}" --train-steps 10 --output "$out/model_bf16.json"
run --parts forward,step --amp none --channels-last false --train-steps 5 --output "$out/model_fp32.json"
run --parts data "${bf16[@]}" --decode gpu --limit 8000 --batch-size 128 --worker-counts "$workers" --repeats 1 \
    --output "$out/loaders.json"   # 63 batches of 128
# 63 batches of 256 to evaluate, 60 steps of 256 to train: about 4 per worker (the plain loops' 2 workers
# would take minutes here: benchmark.py without --no-baselines compares with them)
run --parts eval,train "${bf16[@]}" --train-steps 60 --repeats 1 --workers "$workers" --no-baselines \
    --output "$out/from_jpeg.json"
run --parts eval,train "${bf16[@]}" --decode gpu --train-steps 60 --repeats 2 --workers "$workers" --no-baselines \
    --output "$out/gpu_decode.json"   # evaluation and training with the JPEGs decoded on the GPU
step=$(python -c "import json, sys; print(round(next(r['img_per_s'] for r in json.load(open(sys.argv[1]))['rows'] \
    if r['part'] == 'step')))" "$out/model_bf16.json")
run --parts augment --limit 200 --repeats 1 --gpu-img-per-s "$step" --output "$out/augment.json"
run --parts approx --limit 300 --workers "$workers" --output "$out/approx.json"   # random weights: agreement, not accuracy

names="forward_compiled model_bf16 model_fp32 loaders from_jpeg gpu_decode augment approx"
python benchmark.py --merge $(for name in $names; do echo "$out/$name.json"; done)
