#!/usr/bin/env bash
# Every CUDA path of the repo on one NVIDIA GPU, in one run of at most GPU_CHECK_SECONDS (default 540):
#   the CUDA tests (python -m pytest -m gpu, with a JUnit XML so that failures are named even when cut);
#   resnet50 alone on synthetic input: inference bf16 + channels_last (eager and compiled) and fp32 NCHW,
#   a training step bf16 + channels_last vs fp32 NCHW;
#   evaluation and training from 16,000 generated 500x375 JPEGs with every core but one as loader
#   workers, JPEGs decoded on the CPU and on the GPU (--decode gpu), at 224 px and at 176 px (the fast
#   recipes' 160-192), each with a torch.profiler pass saying where a step's time goes; the training
#   from JPEG again with 4 intra-op threads in the main process (against torch's default of one per core);
#   the peak memory of every recipe's training step at its per-GPU batch (gradient accumulation keeps the
#   recipe's global batch); the zoo's speed (test_torchvision.py --speed, every weights, bf16);
#   the loaders alone and each recipe's train transform per loader core of this machine.
# Each step has a time limit of its own, cut to what is left of the run, so that a hang can't eat it (at the
# limit it gets SIGINT, on which pytest still writes its summary and XML, then SIGKILL 5 s later);
# steps that no longer fit are listed as not run. Prints the card, driver and versions, then a table of
# the steps, the benchmark rows and the goals (scripts/gpu_goals.py). Logs, JSONs, speed.* and the
# JUnit XML go to OUT (default results/gpu_check).
#     bash scripts/gpu_check.sh [OUT]
# Without a CUDA GPU it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU on this machine: skipping the GPU checks"
    exit 0
fi
out=${1:-results/gpu_check}
mkdir -p "$out"
out=$(cd "$out" && pwd)
data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
deadline=$(( SECONDS + ${GPU_CHECK_SECONDS:-540} - 15 ))  # 15 s kept for the tables at the end
export PYTHONUNBUFFERED=1
: > "$out/steps.tsv"

# step NAME LIMIT COMMAND...: runs COMMAND with its output in OUT/NAME.log, cut at LIMIT seconds or at
# what is left of the run; records NAME, its exit status (124: cut) and its seconds in OUT/steps.tsv
step() {
    local name=$1 limit=$2 left=$(( deadline - SECONDS ))
    shift 2
    if (( left < 10 )); then
        printf '%s\tnot run\t0\n' "$name" >> "$out/steps.tsv"
        echo "== $name: not run (out of time)"
        return
    fi
    (( limit > left )) && limit=$left
    echo "== $name (limit ${limit} s): $*"
    local start=$SECONDS
    timeout --signal=INT --kill-after=5 "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - start ))" >> "$out/steps.tsv"
    tail -n 4 "$out/$name.log" | cut -c1-300
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -c "import torch, torchvision; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'torchvision', torchvision.__version__, 'cores', len(__import__('os').sched_getaffinity(0)))"
python -c "import decoding; print('JPEG codec:', decoding.codec_name())"
workers=$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))

step generate 60 python - "$data" <<'PY'
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

bench=(python benchmark.py --arch resnet50 --data "$data" --batch-size 256 --train-batch-size 256)
bf16=(--amp bf16 --channels-last true)
jpeg=(--train-steps 60 --repeats 1 --workers "$workers" --no-baselines)  # 60 batches: 4 per loader worker

step model_bf16 45 "${bench[@]}" --parts forward,step "${bf16[@]}" --train-steps 10 --output "$out/model_bf16.json"
step model_fp32 45 "${bench[@]}" --parts forward,step --amp none --channels-last false --train-steps 5 --repeats 2 \
    --output "$out/model_fp32.json"
step from_jpeg 80 "${bench[@]}" --parts eval,train,profile "${bf16[@]}" "${jpeg[@]}" --output "$out/from_jpeg.json"
step gpu_decode 70 "${bench[@]}" --parts eval,train,profile "${bf16[@]}" "${jpeg[@]}" --decode gpu \
    --output "$out/gpu_decode.json"
parallel=()  # pytest-xdist, where installed: the tests spend most of their time starting processes
python -c "import xdist" 2>/dev/null && parallel=(-n 5)
step tests 110 python -m pytest -m gpu -rA -q "${parallel[@]}" --junitxml "$out/gpu_tests.xml"
step train_176 50 "${bench[@]}" --parts step,train "${bf16[@]}" "${jpeg[@]}" --train-size 176 \
    --output "$out/train_176.json"
step train_176_gpu 45 "${bench[@]}" --parts train,profile "${bf16[@]}" "${jpeg[@]}" --train-size 176 --decode gpu \
    --output "$out/train_176_gpu.json"
step threads_4 45 "${bench[@]}" --parts train "${bf16[@]}" "${jpeg[@]}" --threads 4 --output "$out/threads_4.json"
step zoo_speed 150 python test_torchvision.py --speed --amp bf16 --channels-last true --batch-size 128 \
    --speed-seconds 0.1 --device cuda --output "$out"
step memory 60 "${bench[@]}" --parts memory --recipes "${bf16[@]}" --output "$out/memory.json"
step forward_compiled 70 "${bench[@]}" --parts forward "${bf16[@]}" --compile --output "$out/forward_compiled.json"
step loaders 45 "${bench[@]}" --parts data "${bf16[@]}" --decode gpu --limit 8000 --batch-size 128 \
    --worker-counts "$workers" --repeats 1 --output "$out/loaders.json"
step augment 45 "${bench[@]}" --parts augment --limit 100 --repeats 1 --gpu-img-per-s \
    "$(python scripts/gpu_goals.py --step-rate "$out")" --output "$out/augment.json"

echo
python scripts/gpu_goals.py "$out"
