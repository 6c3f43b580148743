#!/usr/bin/env bash
# GPU throughput check in under 5 minutes on one NVIDIA GPU, on 2000 generated 500x375 JPEGs:
#   resnet50 model-only inference, fp32 and bf16, channels_last, compiled;
#   end-to-end eval from JPEG, decoded on the CPU (loader workers) vs on the GPU (nvjpeg), vs the plain loop;
#   training with bf16 autocast + channels_last vs a plain fp32 NCHW loop;
#   how often --amp bf16/fp16 and --decode gpu keep the exact path's top-1 class.
# Prints one table; each benchmark.py run's JSON goes to OUT (default results/gpu_check).
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

python - "$data" <<'PY'
# 20 wnid folders x 100 JPEGs: smooth shapes plus noise, about the file size and decode cost of photos
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
    list(pool.map(make, range(2000), chunksize=50))
print(f"generated 2000 JPEGs (500x375) in {sys.argv[1]}")
PY

run() { python benchmark.py --arch resnet50 --data "$data" --batch-size 128 --repeats 3 "$@"; }
run --parts forward --amp none --compile --json "$out/forward_fp32.json"
run --parts forward --amp bf16 --compile --json "$out/forward_bf16.json"
run --parts forward,eval,train --amp bf16 --train-batch-size 128 --train-steps 10 --json "$out/cpu_decode.json"
run --parts eval --amp bf16 --decode gpu --no-baselines --json "$out/gpu_decode.json"
run --parts approx --limit 1000 --json "$out/approx.json"   # random weights: agreement, not accuracy

names="forward_fp32 forward_bf16 cpu_decode gpu_decode approx"
python benchmark.py --merge $(for name in $names; do echo "$out/$name.json"; done)
