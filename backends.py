"""The model alone on each inference backend, on the same images: PyTorch's evaluation path (BatchNorm
folded, channels_last), compiled, ONNX Runtime and torchvision's int8 model (the last two on a CPU):
images/s, p50/p99 latency of one batch and peak memory, per batch size (benchmark.py's latency and
int8 parts).

    python benchmark.py --data DIR --parts latency --arch resnet50 --batch-sizes 1,8,32 --json results/latency.json
    python benchmark.py --data DIR --parts int8 --arch resnet50     # int8 against fp32, timed in turn
"""

import copy
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dataset import load_rgb
from engine import Runtime
from model import NO_QUANTIZATION, QUANTIZED_ARCHS, build_model, float_arch, is_quantized, prepare_for_eval
from presets import normalize
from utils import UserError, autocast, timed


def forward_loop(model, x, batches: int, runtime: Runtime):
    """The model alone: `batches` forward passes on the synthetic batch x, under inference_mode."""

    def run():
        with torch.inference_mode(), autocast(runtime.device, runtime.amp_dtype):
            for _ in range(batches):
                model(x)

    return run


def image_batch(samples, preset, size: int) -> torch.Tensor:
    """(size, 3, crop, crop) normalised float32 from the first images (repeated when there are fewer)."""
    images = [preset(load_rgb(s.path)) for s in samples[: min(size, len(samples))]]
    return normalize(torch.stack([images[i % len(images)] for i in range(size)]), preset.mean, preset.std)


def process_mb(field: str) -> float:
    """A memory line of Linux's /proc/self/status in MB ('VmRSS': resident now, 'VmHWM': its peak)."""
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    values = [line.split()[1] for line in status.splitlines() if line.startswith(field + ":")]
    return int(values[0]) / 1024 if values else math.nan


def memory_now(device) -> float:
    """MB in use: CUDA's allocated memory, or this process's resident set."""
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else process_mb("VmRSS")


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # the kernel's peak RSS (VmHWM) restarts from now


def peak(device) -> float:
    """MB at the peak since reset_peak: CUDA's max allocated, or the process's VmHWM."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else process_mb("VmHWM")


def benchmark_model(args):
    """benchmark.py's --arch with its --weights (from --weights-dir or torchvision's cache; random without)."""
    return build_model(args.arch, args.weights, weights_dir=args.weights_dir)


def inference_backends(args, preset, device, folder) -> dict:
    """name -> (model, Runtime): PyTorch's eval path, compiled (--compile), and on a CPU ONNX Runtime and
    the int8 model where torchvision has one. Random weights unless --weights."""
    from export import onnx_model

    runtime = Runtime.create(device, args.amp, args.channels_last, False, preset)
    weights = benchmark_model(args)  # one set of weights for the float backends
    model = prepare_for_eval(copy.deepcopy(weights).to(device), runtime.channels_last)
    backends = {"pytorch": (model, runtime)}
    if args.compile:
        backends["compiled"] = (torch.compile(model), runtime)
    if device.type == "cpu":
        cpu = Runtime.on_cpu(preset)
        try:
            exported = onnx_model(prepare_for_eval(weights, channels_last=False), args.arch, None, preset, Path(folder))
            backends["onnxruntime"] = (exported, cpu)
        except UserError as e:  # an architecture the exporter can't handle: the other backends still run
            print(f"note: no onnxruntime row: {e}")
        if is_quantized(f"quantized_{args.arch}"):
            backends["int8"] = (build_model(f"quantized_{args.arch}", quantize=True), cpu)
    return backends


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-th percentile: the smallest value with at least q% of the values at or below it
    (with 10 values, p99 is the slowest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def run_once(model, x, runtime: Runtime, device) -> None:
    with torch.inference_mode(), autocast(device, runtime.amp_dtype):
        model(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_latency(args, samples, preset, device) -> list[dict]:
    """Every backend at every --batch-sizes, one call at a time, backends in turn: images/s (median
    call), p50 and p99 latency of a call, and the peak memory of one call above what was in use before
    it (CUDA's allocated memory, or the process's resident set on a CPU)."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        backends = inference_backends(args, preset, device, folder)
        for batch in args.batch_sizes:
            x = image_batch(samples, preset, batch).to(device)
            inputs = {name: x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x
                      for name, (_, rt) in backends.items()}  # fmt: skip
            seconds, memory = {name: [] for name in backends}, {}
            for name, (model, runtime) in backends.items():  # warm up, then one call alone for its memory
                for call in range(2):
                    if call == 1:
                        reset_peak(device)
                        start_mb = memory_now(device)
                    run_once(model, inputs[name], runtime, device)
                memory[name] = max(0.0, peak(device) - start_mb)
            for _ in range(args.latency_runs):  # the backends in turn, so that drifts hit all alike
                for name, (model, runtime) in backends.items():
                    start = time.perf_counter()
                    run_once(model, inputs[name], runtime, device)
                    seconds[name].append(time.perf_counter() - start)
            for name, s in seconds.items():
                p99 = percentile(s, 99)
                row = {"part": "latency", "variant": f"{name} {args.arch} batch {batch}", "backend": name}
                row.update(batch=batch, img_per_s=batch / statistics.median(s), seconds=[round(t, 4) for t in s])
                row.update(p50_ms=1000 * statistics.median(s), p99_ms=1000 * p99, peak_mb=round(memory[name], 1))
                rows.append(row)
    return rows


def bench_int8(args, samples, preset) -> list[dict]:
    """torchvision's int8 model of --arch against our fp32 evaluation path (BatchNorm folded,
    channels_last), the model alone on the CPU, on the same images (preprocessed once), timed in turn."""
    if not is_quantized(f"quantized_{args.arch}"):
        archs = ", ".join(map(float_arch, QUANTIZED_ARCHS)) or NO_QUANTIZATION
        raise UserError(f"torchvision has no int8 {args.arch}; --parts int8 takes {archs}")
    cpu = Runtime.on_cpu(preset)
    images = torch.stack([preset(load_rgb(s.path)) for s in samples[: args.batch_size]])  # (B, 3, H, W) uint8
    x, batches = normalize(images, preset.mean, preset.std), math.ceil(len(samples) / args.batch_size)
    fp32 = prepare_for_eval(benchmark_model(args), channels_last=True)
    int8 = build_model(f"quantized_{args.arch}", quantize=True)  # random weights, calibrated and converted
    runs = {
        "fp32": (forward_loop(fp32, x.contiguous(memory_format=torch.channels_last), batches, cpu), batches),
        "int8": (forward_loop(int8, x, batches, cpu), batches),
    }
    times = timed({k: (run, n * len(x)) for k, (run, n) in runs.items()}, args.repeats, cpu.device)
    fp32_variant = f"fp32 {args.arch} batch {len(x)}, channels_last, BN folded"
    int8_row = {"part": "int8", "variant": f"int8 {args.arch} batch {len(x)} ({torch.backends.quantized.engine})"}
    int8_row.update(times["int8"], baseline=fp32_variant, ratio=times["int8"]["img_per_s"] / times["fp32"]["img_per_s"])
    return [{"part": "int8", "variant": fp32_variant, **times["fp32"]}, int8_row]
