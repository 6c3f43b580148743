"""Throughput of the input pipeline, the model alone, and end-to-end evaluation and training, ours next
to plain PyTorch loops in the same run. Every number is the median of --repeats timed passes after one
untimed warm-up pass (synchronised on CUDA). Weights are random unless --weights (torchvision's, from its
cache, or a file: a train.py run's architecture, classes and sizes come with it): nothing is downloaded.

    python benchmark.py --data /data/imagenet/val --output results/benchmark-cpu.json    # every part
    python benchmark.py --data DIR --parts data --worker-counts 0,1,2   # decoding alone: PIL, tensor, batched
    python benchmark.py --parts model --arch resnet50 --amp bf16 --compile   # model alone, synthetic input
    python benchmark.py --data DIR --parts eval --decode gpu --amp bf16  # JPEGs decoded on the GPU
    python benchmark.py --data DIR --parts approx --weights DEFAULT      # what --amp, --decode gpu change
    python benchmark.py --data DIR/val --parts eval,approx --weights checkpoints/NAME/best.pt  # yours
    python benchmark.py --data DIR --parts augment                       # each recipe's loader, per core
    python benchmark.py --data DIR --parts int8 --arch resnet50          # torchvision's int8 model vs fp32
    python benchmark.py --data DIR --parts latency --batch-sizes 1,8,32  # every backend: img/s, p99, memory
    python benchmark.py --parts index --files 1281167                    # indexing ImageNet-1k train's shape
    python benchmark.py --parts memory --recipes --fit-memory 24GB       # each recipe's step: memory, batch
    python benchmark.py --parts memory --arch resnet50,vit_b_16 --config configs/torchvision_v2.yaml
    python benchmark.py --merge results/a.json results/b.json            # one report of earlier runs
    bash scripts/gpu_check.sh                 # every CUDA path, one table, <= GPU_CHECK_SECONDS (540)
--parts: data, model (= forward,step), eval, train (the default: all four), augment, int8, latency, approx,
index, memory.

The memory part measures the peak memory of a training step (two steps of synthetic batches, with the
config's optimizer, EMA, loss, MixUp/CutMix and train crop): CUDA's max allocated memory, or on a CPU the
growth of the process's peak resident set. With --fit-memory it fits a line through the peaks and checks
the largest batch within the budget with a step at that batch. CUDA's context and its allocator's cache
take about 1 GB more than the allocated peak: leave that margin. With train.py --global-batch, a smaller
--batch-size keeps the recipe (more accumulation steps).

The index part generates a tree of --files zero-byte .JPEG files in 1000 wnid folders (ImageNet-1k train's
shape; the index never opens a file), then times, in turn, our index without its cache and with it,
torchvision's ImageFolder, and a bare two-level os.scandir walk; and measures the memory: bytes per image
beside the path bytes, and what 4 loader workers add over one pass that reads every sample, for our index
and for a Python list of Sample objects (what the index was before).
"""

import argparse
import copy
import dataclasses
import functools
import gc
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
import typing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import default_loader
from torchvision.transforms import v2

from backends import (
    busy_seconds,
    forward_loop,
    inference_backends,
    memory_now,
    peak,
    percentile,
    reset_peak,
    run_once,
    timed,
)
from coder import imagenet_wnids
from config import TrainConfig, load_config, parse_config
from dataset import CACHE_ENV, Sample, eval_samples, find_samples, split_folder
from decoding import pre_resized
from engine import LoopSettings, Runtime, Training, TrainState, evaluate, train_one_epoch
from loader import (
    GpuDecodeLoader,
    GpuTrainDataset,
    GpuTrainLoader,
    ImageDataset,
    SyntheticDataset,
    TensorImageDataset,
    TrainSampler,
    build_loader,
    default_workers,
    eval_loader,
    load_rgb,
    resize_crop,
    use_gpu_decode,
)
from loss import build_loss
from model import (
    NO_QUANTIZATION,
    QUANTIZED_ARCHS,
    Weights,
    arch_of_enum,
    build_model,
    float_arch,
    is_onnx_file,
    is_quantized,
    is_weights_file,
    num_outputs,
    prepare_for_eval,
    resolve_weights,
    size_argument,
    weights_enum,
)
from presets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalPreset,
    MixUpCutMix,
    normalize,
    train_preset,
    train_transform,
)
from report import benchmark_report, benchmark_summary, merge_benchmarks, plot_latency
from utils import (
    OUT_OF_MEMORY,
    ArgumentParser,
    UserError,
    add_runtime_args,
    add_weights_args,
    amp_name,
    atomic_write_text,
    autocast,
    available_cores,
    cli,
    machine_info,
    non_negative_int,
    positive_int,
    resolve_device,
    switch,
)

PARTS = (
    "data",
    "forward",
    "step",
    "eval",
    "train",
    "augment",
    "int8",
    "latency",
    "approx",
    "index",
    "memory",
    "profile",
)
ROOT = Path(__file__).resolve().parent
PLAIN_WORKERS = 2  # the plain loops' fixed worker count, as in pytorch/examples' habit


def benchmark_weights(args) -> Weights:
    """--weights read once (model.resolve_weights): torchvision's by name, a .pth/.pt file (its architecture;
    a train.py checkpoint's classes and eval preprocessing too), or none: random weights, described by
    the architecture's DEFAULT weights (their eval preprocessing). --arch defaults to the one the weights
    name (a file's, 'ResNet50_Weights.IMAGENET1K_V2'), else resnet18; a comma list (the memory part's) is
    described by its first."""
    if is_onnx_file(args.weights):
        raise UserError(
            f"benchmark.py times PyTorch models, not {args.weights}; time an exported file with "
            "test_torchvision.py --weights FILE.onnx, or here --parts latency (it exports --arch itself)"
        )
    named = is_weights_file(args.weights) or arch_of_enum(args.weights)  # weights that name their arch
    arch = args.arch.split(",")[0] if args.arch else None if named else "resnet18"
    weights = resolve_weights(args.weights, arch)
    if weights.source is None:
        weights = dataclasses.replace(weights, enum=weights_enum(weights.arch, "DEFAULT"))
    return weights


def benchmark_model(args):
    """--arch with its --weights (from --weights-dir or torchvision's cache, or a file; random without)."""
    return build_model(args.arch, args.weights, weights_dir=args.weights_dir)


def plain_transform(weights: Weights, preset: EvalPreset):
    """The plain loops' eval transform: torchvision's weights.transforms(); for a train.py checkpoint, the
    same transform at its run's validation sizes."""
    transform = weights.enum.transforms()
    if weights.run is None:
        return transform
    return type(transform)(
        crop_size=preset.crop,
        resize_size=preset.resize,
        interpolation=T.InterpolationMode(preset.interpolation),
        antialias=preset.antialias,
    )


def synthetic_batch(runtime: Runtime, batch: int, size: int) -> torch.Tensor:
    x = torch.randn(batch, 3, size, size, device=runtime.device)  # (B, 3, H, W) float32, as normalize() gives
    return x.contiguous(memory_format=torch.channels_last) if runtime.channels_last else x


def prepare(args, runtime: Runtime, train: bool):
    """(model, the module to call), with our layout and compile settings; optimizers take the first."""
    model = benchmark_model(args).to(runtime.device)
    if not train:  # as test_torchvision.py evaluates: BatchNorm folded into the convolutions
        model = prepare_for_eval(model, runtime.channels_last)
    elif runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, torch.compile(model) if args.compile else model


def settings(args, runtime: Runtime, train: bool) -> str:
    precision = "fp32" if runtime.amp_dtype is None else amp_name(runtime.amp_dtype)
    layout = "channels_last" if runtime.channels_last else "NCHW"
    return (
        f"{precision}, {layout}" + ("" if train else ", BN folded") + (", compiled" if args.compile else "")
    )


# ----------------------------------------------------------------------------- the parts


def bench_data(args, samples, preset, device) -> list[dict]:
    """Decode + eval transform alone (what the model is fed), per worker count and backend: PIL (the
    exact path), decoding.py's codec (torchcodec) in the workers, and --decode gpu's batched loader (on
    the GPU where --decode gpu is possible, else the same code with libjpeg on the CPU)."""
    rows = []
    batched_device = device if use_gpu_decode(args.decode, device, note_to=None) else torch.device("cpu")
    datasets = {
        "pil": ImageDataset(samples, preset),
        "tensor": TensorImageDataset(samples, functools.partial(resize_crop, preset=preset)),
    }
    for workers in args.worker_counts:

        def count(images, workers=workers):
            return sum(len(batch[1]) for batch in build_loader(images, args.batch_size, workers))

        def count_batched(workers=workers):
            return sum(
                len(batch[1])
                for batch in GpuDecodeLoader(samples, preset, args.batch_size, workers, batched_device)
            )

        runs = {backend: (functools.partial(count, d), len(samples)) for backend, d in datasets.items()}
        runs[f"batched on {batched_device.type}"] = (count_batched, len(samples))
        times = timed(runs, args.repeats, device)
        pil, *others = (
            {"part": "data", "variant": f"{name}, {workers} workers", **times[name]} for name in runs
        )
        for row in others:
            row.update(baseline=pil["variant"], ratio=row["img_per_s"] / pil["img_per_s"])
        rows += [pil, *others]
    return rows


def bench_model(args, runtime: Runtime, size: int, batches: int, train: bool) -> dict:
    """Synthetic (B, 3, H, W) input: forward under inference_mode, or forward + backward + SGD step."""
    raw, model = prepare(args, runtime, train)
    batch = args.train_batch_size if train else args.batch_size
    device = runtime.device
    labels = torch.randint(0, num_outputs(raw), (batch,), device=device)  # a trained head's own classes
    x, y = synthetic_batch(runtime, batch, size), labels
    optimizer = torch.optim.SGD(raw.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.amp_dtype == torch.float16)

    def step():
        for _ in range(batches):
            with autocast(device, runtime.amp_dtype):
                loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

    model.train(train)
    run = step if train else forward_loop(model, x, batches, runtime)
    variant = f"{args.arch} batch {batch}, {settings(args, runtime, train)}"
    return {
        "part": "step" if train else "forward",
        "variant": variant,
        **timed({"run": (run, batches * batch)}, args.repeats, device)["run"],
    }


def short_pass_note(batches: int, workers: int) -> dict:
    """{'note': ...} where a pass is too short to time the loader's throughput: a worker builds whole
    batches, so with few batches per worker a pass times the wait for one worker's batch (and idle
    workers) more than the rate the workers keep up; {} otherwise."""
    if not workers or batches >= 4 * workers:
        return {}
    workers_named = f"{workers} loader worker{'s' * (workers > 1)}"
    return {
        "note": f"{batches} batches a pass for {workers_named} times their first batches' wait more than "
        f"their rate: for the rate, give at least {4 * workers} batches a pass (more images or a smaller "
        "batch)"
    }


def ours_and_plain(part: str, times: dict, variant: str, plain_variant: str) -> list[dict]:
    """Our row, then the plain loop's with our ratio to it, where the plain loop was timed."""
    ours = {"part": part, "variant": variant, **times["ours"]}
    if "plain" not in times:
        return [ours]
    ours.update(baseline=plain_variant, ratio=times["ours"]["img_per_s"] / times["plain"]["img_per_s"])
    return [ours, {"part": part, "variant": plain_variant, **times["plain"]}]


def bench_eval(args, device, samples, preset, weights: Weights, workers: int) -> list[dict]:
    """Ours: ImageDataset + EvalPreset + build_loader + engine.evaluate(). Plain: ImageFolder + PIL +
    weights.transforms() (plain_transform) + DataLoader, fp32 NCHW (its labels are 0..k-1, which is fine
    for speed)."""
    gpu_decode = use_gpu_decode(args.decode, device, note_to=sys.stdout)
    runtime = Runtime.create(device, args.amp, args.channels_last, False, preset)
    _, model = prepare(args, runtime, False)

    def ours():
        evaluate(model, eval_loader(samples, preset, args.batch_size, workers, device, gpu_decode), runtime)

    batches = math.ceil(len(samples) / args.batch_size)
    x = synthetic_batch(runtime, args.batch_size, preset.crop)
    runs = {
        "ours": (ours, len(samples)),
        "model": (forward_loop(model, x, batches, runtime), batches * args.batch_size),
    }
    if args.baselines:
        plain_model, criterion = benchmark_model(args).to(device).eval(), nn.CrossEntropyLoss()
        folder = ImageFolder(str(split_folder(args.data)), transform=plain_transform(weights, preset))
        plain_set = Subset(folder, range(len(samples)))

        def plain():
            loader = DataLoader(
                plain_set, args.batch_size, num_workers=PLAIN_WORKERS, pin_memory=device.type == "cuda"
            )
            with torch.no_grad():
                for x, y in loader:
                    criterion(plain_model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))

        runs["plain"] = (plain, len(samples))
    times = timed(runs, args.repeats, device)  # ours, the model alone and plain, in turn
    variant = (
        f"ours: {workers} workers, {torch.get_num_threads()} threads, {settings(args, runtime, False)}, "
        f"{'gpu' if gpu_decode else 'cpu'} decode"
    )
    rows = ours_and_plain(
        "eval", times, variant, f"plain: ImageFolder + transforms(), {PLAIN_WORKERS} workers, fp32 NCHW"
    )
    rows[0].update(
        model_only=times["model"],
        share_of_model_only=times["ours"]["img_per_s"] / times["model"]["img_per_s"],
    )
    if not gpu_decode:  # decoding on the GPU, the loader workers only read files
        rows[0].update(short_pass_note(batches, workers))
    return rows


class WaitTimed:
    """A training loader whose iterators add the time the caller waits for each batch to .waited."""

    def __init__(self, loader):
        self.loader, self.waited = loader, 0.0

    def __getattr__(self, name):  # the samplers and dataset engine.train_one_epoch reads
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        start = time.perf_counter()
        batches = iter(self.loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                self.waited += time.perf_counter() - start
            yield batch
            start = time.perf_counter()


class FromFiles(typing.NamedTuple):
    one_pass: typing.Callable[[], None]  # one pass of engine.train_one_epoch
    loader: WaitTimed
    gpu_decode: bool  # the JPEGs decoded on the GPU
    described: str  # workers, threads, precision and layout, decoding, crop


def train_from_files(args, device, samples, preset, workers: int, steps: int) -> FromFiles:
    """Training from the image files over steps x --train-batch-size images: train_preset('standard') at
    --train-size, the loader train.py builds (GpuTrainLoader with --decode gpu)."""
    batch, images = args.train_batch_size, steps * args.train_batch_size
    runtime = Runtime.create(device, args.amp, args.channels_last, True, preset)
    raw, model = prepare(args, runtime, True)
    cfg = TrainConfig(arch=args.arch, batch_size=batch, lr=0.01)
    gpu_decode = use_gpu_decode(args.decode, device, note_to=sys.stdout)
    dataset = GpuTrainDataset if gpu_decode else ImageDataset  # --decode gpu: train.py's GPU input path
    images_set = dataset(samples[:images], train_preset("standard", args.train_size), cfg.seed)
    sampler, pin = TrainSampler(images_set, 1, 0, cfg.seed), device.type == "cuda"
    options = {"sampler": sampler, "drop_last": True, "persistent_workers": True}
    if gpu_decode:
        loader = GpuTrainLoader(images_set, batch, workers, device, "bilinear", **options)
    else:
        loader = build_loader(images_set, batch, workers, pin_memory=pin, **options)
    loader = WaitTimed(loader)
    training, criterion = Training.build(cfg, raw, runtime), build_loss("ce", 1000).to(device)
    training.wrapped = model
    quiet = LoopSettings(log_interval=10**9)

    def one_pass():
        train_one_epoch(training, criterion, loader, runtime, TrainState(), quiet)

    described = (
        f"{workers} workers, {torch.get_num_threads()} threads, {settings(args, runtime, True)}, "
        f"{'gpu' if gpu_decode else 'cpu'} decode, {args.train_size} px"
    )
    return FromFiles(one_pass, loader, gpu_decode, described)


def bench_train(args, device, samples, preset, workers: int, steps: int) -> list[dict]:
    """Ours: train_from_files. Plain: transforms v1 (ToTensor + Normalize), SGD(0.01, momentum 0.9),
    cross-entropy, fp32 NCHW. Both train on the same images."""
    batch, images = args.train_batch_size, steps * args.train_batch_size
    ours = train_from_files(args, device, samples, preset, workers, steps)
    pin = device.type == "cuda"
    runs = {"ours": (ours.one_pass, images)}
    if args.baselines:
        plain_model, criterion = benchmark_model(args).to(device).train(), nn.CrossEntropyLoss()
        plain_optimizer = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9)
        steps_v1 = [
            T.RandomResizedCrop(args.train_size),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(preset.mean, preset.std),
        ]
        plain_set = Subset(
            ImageFolder(str(split_folder(args.data)), transform=T.Compose(steps_v1)), range(images)
        )
        plain_loader = DataLoader(
            plain_set, batch, shuffle=True, num_workers=PLAIN_WORKERS, pin_memory=pin, drop_last=True
        )

        def plain():
            for x, y in plain_loader:
                loss = criterion(
                    plain_model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
                )
                plain_optimizer.zero_grad()
                loss.backward()
                plain_optimizer.step()

        runs["plain"] = (plain, images)
    times = timed(runs, args.repeats, device)  # ours and plain in turn
    rows = ours_and_plain(
        "train",
        times,
        f"ours: {ours.described}",
        f"plain: ImageFolder + transforms v1, {PLAIN_WORKERS} workers, fp32 NCHW",
    )
    if not ours.gpu_decode:
        rows[0].update(short_pass_note(steps, workers))
    return rows


def bench_profile(args, device, samples, preset, workers: int, steps: int) -> list[dict]:
    """Where a from-JPEG training pass's time goes, by torch.profiler over one pass after a warm-up pass:
    the main process's wait for the input (the loader's next batch: with --decode gpu the decoding
    thread's too), its share of the wall time, the GPU's busy time (the sum of its kernels' times) and
    the operators that took the most CPU time in the main process."""
    run = train_from_files(args, device, samples, preset, workers, steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    run.one_pass()
    run.loader.waited = 0.0
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        run.one_pass()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    averages = prof.key_averages()
    kernels = sum(getattr(e, "self_device_time_total", 0) for e in averages if e.device_type.name == "CUDA")
    top = sorted((e for e in averages if "DataLoader" not in e.key), key=lambda e: -e.self_cpu_time_total)
    images = steps * args.train_batch_size
    return [
        {
            "part": "profile",
            "variant": f"train from JPEG, {run.described}",
            "img_per_s": images / wall,
            "seconds": [round(wall, 3)],
            "loader_wait_share": round(run.loader.waited / wall, 3),
            "gpu_busy_share": round(kernels / 1e6 / wall, 3) if device.type == "cuda" else None,
            "top_cpu_ops": [(e.key, round(e.self_cpu_time_total / 1e6, 3)) for e in top[:8]],
        }
    ]


ARCH_IN_HEADER = re.compile(r"--arch (\S+)")  # a config header's launch command names its architecture


def memory_runs(args) -> list[tuple[str, str | None, list[int]]]:
    """(arch, config file or None, batch sizes) for the memory part: each recipe config (those stating a
    global_batch) with its architecture (its own, or its header command's), at its per-process batch and
    half of it; else every --arch with --config's settings, at --batch-sizes or --train-batch-size and its
    half."""
    if args.recipes:
        runs = []
        for path in sorted((ROOT / "configs").glob("*.yaml")):
            cfg, given = parse_config(TrainConfig, ["--config", str(path)])
            if cfg.global_batch is not None:  # the config's own architecture, else its header's command's
                arch = cfg.arch if "arch" in given else ARCH_IN_HEADER.search(path.read_text()).group(1)
                runs.append(
                    (
                        arch,
                        str(path),
                        args.batch_sizes or sorted({max(1, cfg.batch_size // 2), cfg.batch_size}),
                    )
                )
        return runs
    batch = args.train_batch_size
    sizes = args.batch_sizes or sorted({max(1, batch // 2), batch})
    return [(arch, args.config, sizes) for arch in args.arch.split(",")]


def train_step_memory(arch: str, config: str | None, batch: int, args, device) -> dict:
    """Peak memory of two training steps of `arch` (the second at its steady state: the optimizer's state
    exists) with the config's optimizer, EMA, loss, MixUp/CutMix and train crop, on synthetic batches:
    CUDA's max allocated memory above what was allocated before the model was built; on a CPU, where
    memory freed by one measurement stays with the process, the growth of the peak resident set of a new
    process (spawned for each measurement)."""
    if device.type != "cuda" and mp.current_process().name == "MainProcess":
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as fresh:
            return fresh.submit(train_step_memory, arch, config, batch, args, device).result()
    cfg = load_config(
        TrainConfig,
        ["--arch", arch, "--batch-size", str(batch), "--workers", "0"]
        + (["--config", config] if config else []),
    )
    crop = cfg.max_res or cfg.train_crop_size  # a resolution ramp's largest crop costs the most
    preset = EvalPreset(crop, crop)
    runtime = Runtime.create(device, args.amp, args.channels_last, True, preset)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    before = memory_now(device)
    reset_peak(device)
    model = build_model(arch, None, num_classes=1000, **size_argument(arch, crop)).to(device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    training = Training.build(cfg, model, runtime)
    if args.compile:
        training.wrapped = torch.compile(model)
    images = SyntheticDataset(2 * batch, 1000, preset, image_size=(crop, crop))
    loader = build_loader(images, batch, 0, TrainSampler(images, 1, 0), drop_last=True)
    criterion = build_loss(cfg.loss, 1000, cfg.label_smoothing).to(device)
    settings = dataclasses.replace(LoopSettings.from_config(cfg), log_interval=10**9)
    train_one_epoch(
        training, criterion, loader, runtime, TrainState(), settings, MixUpCutMix.from_config(cfg, 1000)
    )
    peak_mb = max(0.0, peak(device) - before)
    del training, model
    name = Path(config).name if config else "defaults"
    precision = "fp32" if runtime.amp_dtype is None else amp_name(runtime.amp_dtype)
    return {
        "part": "memory",
        "variant": f"{arch} batch {batch}, {name}, {crop} px, {cfg.optimizer}, {precision}",
        "arch": arch,
        "config": name,
        "settings": f"{crop} px, {cfg.optimizer}{', EMA' if cfg.ema_decay else ''}, {precision}",
        "batch": batch,
        "peak_mb": round(peak_mb, 1),
    }


def largest_batch(rows: list[dict], budget_mb: float) -> int:
    """The largest batch whose peak stays within the budget, from a line fitted through the rows' peaks
    (memory grows linearly with the batch: weights, gradients and optimizer state, plus activations per
    image); 0 when not even the fixed part fits."""
    batches = [r["batch"] for r in rows]
    peaks = [r["peak_mb"] for r in rows]
    slope, fixed = np.polyfit(batches, peaks, 1)
    if slope <= 0:
        return 0
    return max(0, int((budget_mb - fixed) // slope))


def fit_batch(arch: str, config: str | None, measured: list[dict], args, device) -> dict:
    """{'batch', 'checked_peak_mb'}: the largest batch a measured step keeps within --fit-memory, found by
    steps at the batch a line through the two largest measured batches predicts (a secant search: up to 4
    steps); without one that fits, the first prediction and None (0: not even the fixed part fits)."""
    points = list(measured)
    batch = largest_batch(points, args.fit_memory)
    found = {"batch": batch, "checked_peak_mb": None}
    for _ in range(4):
        if not batch or any(p["batch"] == batch for p in points):
            break
        try:
            peak_mb = train_step_memory(arch, config, batch, args, device)["peak_mb"]
        except OUT_OF_MEMORY:  # more than this device holds
            break
        points.append({"batch": batch, "peak_mb": peak_mb})
        if peak_mb <= args.fit_memory and (found["checked_peak_mb"] is None or batch > found["batch"]):
            found = {"batch": batch, "checked_peak_mb": peak_mb}
        batch = largest_batch(sorted(points, key=lambda p: p["batch"])[-2:], args.fit_memory)
    return found


def bench_memory(args, device) -> list[dict]:
    """For each run of memory_runs: the peak of a training step at each batch size and, with --fit-memory,
    the largest batch within it (fit_batch)."""
    rows = []
    for arch, config, sizes in memory_runs(args):
        measured = [train_step_memory(arch, config, batch, args, device) for batch in sizes]
        rows += measured
        if not args.fit_memory:
            continue
        fit = {
            "part": "memory_fit",
            "arch": arch,
            "config": measured[0]["config"],
            "budget_mb": args.fit_memory,
            "from_batches": sizes,
        }
        rows.append({**fit, **fit_batch(arch, config, measured, args, device)})
    return rows


def timed_on_one_core(runs: dict, repeats: int, device) -> dict:
    """timed(), with one intra-op thread, as in a DataLoader worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return timed(runs, repeats, device)
    finally:
        torch.set_num_threads(threads)


def augment_all(images: ImageDataset) -> list:
    """Every image of the dataset as epoch 0 augments it (one loader worker's work)."""
    return [images[(i, 0, 0)] for i in range(len(images))]


def bench_augment(args, samples, device) -> list[dict]:
    """Decode + each config's train transform, in this process (what one loader worker does), timed in
    turn: img/s per worker, and the workers (cores) that feed one GPU training at --gpu-img-per-s. The V1
    recipe (RandomResizedCrop + flip) is the baseline; MixUp/CutMix run on the device, not in workers."""
    runs, names = {}, {}
    for path in sorted((Path(__file__).parent / "configs").glob("*.yaml")):
        cfg = load_config(TrainConfig, ["--config", str(path), "--dummy"])
        augmented = ImageDataset(samples, train_transform(cfg), cfg.seed)
        runs[path.name] = (functools.partial(augment_all, augmented), len(samples))
        names[path.name] = (
            f"{path.name}: {cfg.train_crop_size} px, {cfg.auto_augment}, erase {cfg.random_erase}"
        )
    times, rows = timed_on_one_core(runs, args.repeats, device), []
    for name, t in times.items():
        ratio = t["img_per_s"] / times["torchvision_v1.yaml"]["img_per_s"]
        row = {
            "part": "augment",
            "variant": names[name],
            **t,
            "baseline": "torchvision_v1.yaml",
            "ratio": ratio,
        }
        row.update(
            workers_per_gpu=math.ceil(args.gpu_img_per_s / t["img_per_s"]), gpu_img_per_s=args.gpu_img_per_s
        )
        rows.append(row)
    return rows


def references_train_set(samples) -> Dataset:
    """torchvision's references' training input on these images: PIL's default_loader (ImageFolder's)
    and their ClassificationPresetTrain for the V1 recipe (RandomResizedCrop 224 + flip, then to float,
    normalised in the worker)."""
    preset = v2.Compose(
        [
            v2.RandomResizedCrop(224, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
            v2.ToDtype(torch.float, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )

    class References(Dataset):
        def __len__(self):
            return len(samples)

        def __getitem__(self, index):
            return preset(default_loader(samples[index].path)), samples[index].target

    return References()


def pre_resized_copies(samples, folder: Path, max_size: int = 512, quality: int = 90) -> tuple[list, float]:
    """The images as `make-shards --max-size 512 --quality 90` stores them, written to `folder`: (their
    samples, their total bytes over the originals')."""
    copies, before, after = [], 0, 0
    for i, sample in enumerate(samples):
        data = Path(sample.path).read_bytes()
        stored = pre_resized(data, max_size, quality) or data
        path = folder / f"{i}.JPEG"
        path.write_bytes(stored)
        copies.append(Sample(str(path), sample.target))
        before, after = before + len(data), after + len(stored)
    return copies, after / before


def bench_loaders(args, samples, device) -> list[dict]:
    """The V1 training input (RandomResizedCrop 224 + flip) on the same images by every path, per core
    (one thread, in this process, as one loader worker), timed in turn: torchvision's references' loader
    (the baseline), ours with PIL, with --reduced-decode, from pre-resized copies (make-shards --max-size
    512 --quality 90), and --decode gpu's code (torchcodec decode, tensor crop; on the GPU where it
    runs, else on this CPU). Each row says the cores that feed one GPU at --gpu-img-per-s."""
    cfg = load_config(TrainConfig, ["--config", str(ROOT / "configs" / "torchvision_v1.yaml"), "--dummy"])
    reduced = dataclasses.replace(cfg, reduced_decode=True)
    on_gpu = use_gpu_decode("gpu", device, note_to=None)
    gpu_device = device if on_gpu else torch.device("cpu")
    with tempfile.TemporaryDirectory() as folder:
        copies, size_ratio = pre_resized_copies(samples, Path(folder))
        references = references_train_set(samples)
        runs = {
            "references: ImageFolder + their train preset (PIL)": (
                lambda: [references[i] for i in range(len(references))],
                len(samples),
            )
        }
        ours = {
            "ours: PIL": ImageDataset(samples, train_transform(cfg), cfg.seed),
            "ours: --reduced-decode": ImageDataset(samples, train_transform(reduced), cfg.seed),
            f"ours: pre-resized (max 512 px, q90: {size_ratio:.2f}x the bytes)": ImageDataset(
                copies, train_transform(cfg), cfg.seed
            ),
        }
        runs.update({name: (functools.partial(augment_all, d), len(samples)) for name, d in ours.items()})
        gpu_set = GpuTrainDataset(samples, train_transform(cfg), cfg.seed)

        def gpu_path():
            sampler = TrainSampler(gpu_set, 1, 0, cfg.seed)
            for _ in GpuTrainLoader(gpu_set, 32, 0, gpu_device, cfg.interpolation, sampler=sampler):
                pass

        runs[f"ours: --decode gpu's code, torchcodec on {gpu_device.type}"] = (gpu_path, len(samples))
        times = timed_on_one_core(runs, args.repeats, device)
    baseline = next(iter(times))
    rows = []
    for name, t in times.items():
        rows.append(
            {
                "part": "loader",
                "variant": name,
                **t,
                "baseline": baseline,
                "ratio": t["img_per_s"] / times[baseline]["img_per_s"],
                "cores_per_gpu": math.ceil(args.gpu_img_per_s / t["img_per_s"]),
                "gpu_img_per_s": args.gpu_img_per_s,
                # the whole machine's rate if every core ran this path (an extrapolation, not a measurement)
                "machine_img_per_s": round(t["img_per_s"] * available_cores()),
            }
        )
    return rows


def image_batch(samples, preset, size: int) -> torch.Tensor:
    """(size, 3, crop, crop) normalised float32 from the first images (repeated when there are fewer)."""
    images = [preset(load_rgb(s.path)) for s in samples[: min(size, len(samples))]]
    return normalize(torch.stack([images[i % len(images)] for i in range(size)]), preset.mean, preset.std)


def bench_latency(args, samples, preset, device) -> list[dict]:
    """Every backend at every --batch-sizes, one call at a time, backends in turn: images/s (median
    call), p50 and p99 latency of a call, and the peak memory of one call above what was in use before
    it (CUDA's allocated memory, or the process's resident set on a CPU)."""
    rows = []
    runtime = Runtime.create(device, args.amp, args.channels_last, False, preset)
    with tempfile.TemporaryDirectory() as folder:
        # the float backends all run --arch with --weights; the exported file is named and described as
        # random weights, as it is exported again for every run
        exported_as = resolve_weights(None, args.arch)
        backends = inference_backends(
            benchmark_model(args), exported_as, preset, runtime, args.compile, folder
        )
        for batch in args.batch_sizes or [1, 8, 32]:
            x = image_batch(samples, preset, batch).to(device)
            inputs = {}
            for name, (_, backend_runtime) in backends.items():
                channels_last = backend_runtime.channels_last
                inputs[name] = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            seconds, memory = {name: [] for name in backends}, {}
            # each backend warmed up, then one call alone for its memory
            for name, (model, backend_runtime) in backends.items():
                run_once(model, inputs[name], backend_runtime)
                reset_peak(device)
                start_mb = memory_now(device)
                run_once(model, inputs[name], backend_runtime)
                memory[name] = max(0.0, peak(device) - start_mb)
            for _ in range(args.latency_runs):  # the backends in turn, so that drifts hit all alike
                for name, (model, backend_runtime) in backends.items():
                    start = time.perf_counter()
                    run_once(model, inputs[name], backend_runtime)
                    seconds[name].append(time.perf_counter() - start)
            rows += [latency_row(args.arch, name, batch, s, memory[name]) for name, s in seconds.items()]
    return rows


def latency_row(arch: str, backend: str, batch: int, seconds: list[float], peak_mb: float) -> dict:
    median = statistics.median(seconds)
    return {
        "part": "latency",
        "variant": f"{backend} {arch} batch {batch}",
        "backend": backend,
        "batch": batch,
        "img_per_s": batch / median,
        "seconds": [round(t, 4) for t in seconds],
        "p50_ms": 1000 * median,
        "p99_ms": 1000 * percentile(seconds, 99),
        "peak_mb": round(peak_mb, 1),
    }


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
    int8_row = {
        "part": "int8",
        "variant": f"int8 {args.arch} batch {len(x)} ({torch.backends.quantized.engine})",
    }
    ratio = times["int8"]["img_per_s"] / times["fp32"]["img_per_s"]
    int8_row.update(times["int8"], baseline=fp32_variant, ratio=ratio)
    return [{"part": "int8", "variant": fp32_variant, **times["fp32"]}, int8_row]


def bench_approx(args, device, samples, preset, workers: int) -> list[dict]:
    """What each speed option does to the results on these images, against the exact path (PIL
    preprocessing equal to weights.transforms(), BatchNorm unfolded, fp32, NCHW): accuracy, its change,
    the share of images whose top-1 class (and top-5 list) stays the same, and the largest relative change
    of the top-1 probability. One pass each. Random weights predict nearly one class for every image, so
    only the top-5 and probability columns mean something: --weights DEFAULT (torchvision's cache) gives
    real accuracies."""
    base = benchmark_model(args).to(device)
    decode = "batched decode, CPU (--decode gpu's code with libjpeg)"
    if use_gpu_decode("gpu", device, note_to=None):
        decode = "--decode gpu"
    variants = [
        ("exact (weights.transforms(), BN unfolded, fp32)", {"exact": True}),
        ("default: BN folded", {}),
        ("--amp bf16", {"amp": "bf16"}),
        *([("--amp fp16", {"amp": "fp16"})] if device.type == "cuda" else []),
        (decode, {"decode": True}),
        *([("--compile", {"compile": True})] if args.compile else []),
    ]
    rows, exact = [], None
    for name, v in variants:
        fast = not v.get("exact")  # BN folded and channels_last, as test_torchvision.py evaluates
        model = prepare_for_eval(copy.deepcopy(base), channels_last=fast, fuse_bn=fast)
        model = torch.compile(model) if v.get("compile") else model
        loader = eval_loader(samples, preset, args.batch_size, workers, device, v.get("decode", False))
        runtime = Runtime.create(device, v.get("amp", "none"), "true" if fast else "false", False, preset)
        result = evaluate(model, loader, runtime, keep_predictions=True)
        exact = exact or result
        pairs = list(zip(result["predictions"], exact["predictions"]))
        same_top1 = [(a, b) for a, b in pairs if a["top5"][0] == b["top5"][0]]
        rows.append(
            {
                "part": "approx",
                "variant": name,
                "img_per_s": result["img_per_s"],
                "seconds": [result["seconds"]],
                "acc1": result["acc1"],
                "acc1_delta": result["acc1"] - exact["acc1"],
                "top1_agreement": 100 * len(same_top1) / len(pairs),
                "top5_agreement": 100 * sum(a["top5"] == b["top5"] for a, b in pairs) / len(pairs),
                "top1_prob_change": max(
                    (abs(a["probs"][0] - b["probs"][0]) / b["probs"][0] for a, b in same_top1), default=0.0
                ),
            }
        )
    return rows


# ----------------------------------------------------------------------------- the index

LOADER_WORKERS = 4


def make_tree(root: Path, files: int, classes: int = 1000) -> None:
    for c, wnid in enumerate(imagenet_wnids()[:classes]):
        folder = root / wnid
        folder.mkdir(parents=True)
        for i in range(c, files, classes):
            os.close(os.open(folder / f"{wnid}_{i}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))


def bare_scandir(root: Path) -> int:
    with os.scandir(root) as classes:
        return sum(sum(1 for _ in os.scandir(c.path)) for c in classes if c.is_dir())


def memory_kb() -> tuple[int, int]:
    """(resident, private) kB of this process: private pages are the ones it does not share."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":")
        fields[name] = int(value.split()[0])
    return fields["Rss"], fields["Private_Clean"] + fields["Private_Dirty"]


class TouchEverySample(torch.utils.data.Dataset):
    """Items are batches of indices; each item reads every sample's path and target (as a loader
    worker does) and returns this process's pid and its memory before and now."""

    def __init__(self, samples):
        self.samples, self.start = samples, None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, indices):
        self.start = self.start or memory_kb()
        touched = sum(len(self.samples[i].path) + self.samples[i].target for i in indices)
        return os.getpid(), self.start, memory_kb(), touched


def worker_growth_mb(samples) -> tuple[float, float]:
    """The largest (resident, private) MB that one of 4 loader workers gains over one pass in shuffled
    order. Resident memory counts the pages a worker shares with the main process from the start (fork
    maps them all); private memory grows by the pages it copies: the cost the compact index avoids."""
    # a shuffled order, as training reads
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
    batches = torch.utils.data.BatchSampler(order, 4096, drop_last=False)
    loader = torch.utils.data.DataLoader(
        TouchEverySample(samples), batch_size=None, sampler=batches, num_workers=LOADER_WORKERS
    )
    first, last = {}, {}
    for pid, start, now, _ in loader:
        first.setdefault(pid, start)
        last[pid] = now
    growth = [(last[p][0] - first[p][0], last[p][1] - first[p][1]) for p in last]
    return max(g[0] for g in growth) / 1024, max(g[1] for g in growth) / 1024


def bench_index(args) -> list[dict]:
    files = args.files
    tmp = Path(tempfile.mkdtemp(prefix="index_tree_"))
    cache_setting = os.environ.get(CACHE_ENV)
    try:
        tree = tmp / "train"
        started = time.perf_counter()
        make_tree(tree, files)
        print(f"generated {files} zero-byte files in 1000 folders in {time.perf_counter() - started:.1f} s")
        past = time.time() - 60  # older than dataset.FRESH_SECONDS, so the walk may be cached
        for folder in [tree, *(p for p in tree.iterdir())]:
            os.utime(folder, (past, past))

        def ours(cache: str):
            def run():
                os.environ[CACHE_ENV] = cache
                return find_samples(tree, "train", imagenet_labels=False)

            return run

        cache = str(tmp / "cache")
        ours(cache)()  # writes the cache
        runs = {
            "ours, no cache": (ours("off"), files),
            "ours, cached": (ours(cache), files),
            "torchvision ImageFolder": (lambda: ImageFolder(str(tree), loader=lambda p: p), files),
            "bare os.scandir, 2 levels, unsorted": (lambda: bare_scandir(tree), files),
        }
        times = timed(runs, args.repeats, torch.device("cpu"))
        rows = [{"part": "index", "variant": name, **t} for name, t in times.items()]
        base = times["torchvision ImageFolder"]["img_per_s"]
        for row in rows[:2]:
            row.update(baseline="torchvision ImageFolder", ratio=row["img_per_s"] / base)

        os.environ[CACHE_ENV] = cache
        samples, _ = find_samples(tree, "train", imagenet_labels=False)
        beside_paths = (samples.offsets.nbytes + samples.targets.nbytes) / files
        tracemalloc.start()
        objects = [Sample(s.path, s.target) for s in samples]
        object_bytes = tracemalloc.get_traced_memory()[0] / files
        tracemalloc.stop()
        ours_rss, ours_private = worker_growth_mb(samples)
        list_rss, list_private = worker_growth_mb(objects)
        rows.append(
            {
                "part": "index_memory",
                "files": files,
                "workers": LOADER_WORKERS,
                "path_bytes_per_image": samples.blob.nbytes / files,
                "bytes_per_image_beside_paths": beside_paths,
                "list_of_samples_bytes_per_image": object_bytes,
                "worker_growth_mb": {"ours": [ours_rss, ours_private], "list": [list_rss, list_private]},
            }
        )
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if cache_setting is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = cache_setting


# ----------------------------------------------------------------------------- the command line


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, renamed={"--json": "--output"})
    p.add_argument(
        "--arch",
        help="any torchvision classifier (default: the one --weights names, else resnet18); memory: a "
        "comma list",
    )
    add_weights_args(
        p,
        None,
        "DEFAULT, a weights name from torchvision's cache, or a .pth/.pt file such as a train.py run's "
        "best.pt (default: random weights)",
    )
    p.add_argument("--train-batch-size", type=positive_int, default=32, help="train and step batch")
    p.add_argument(
        "--train-size", type=positive_int, help="train and step: the crop size (default 224, a ViT's own)"
    )
    p.add_argument(
        "--train-steps", type=positive_int, default=5, help="timed optimizer steps per pass (train, step)"
    )
    switch(p, "--compile", "torch.compile our model (never the plain loops')")
    p.add_argument("--data", help="ImageFolder of ImageNet wnid folders (its val/ or the folder itself)")
    p.add_argument("--limit", type=positive_int, help="only the first N images (sorted by path)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed passes; the median counts")
    p.add_argument(
        "--threads", type=positive_int, help="torch.set_num_threads in this process (default: torch's)"
    )
    p.add_argument("--worker-counts", help="for --parts data, e.g. 0,1,2 (default: 0, 1 and our default)")
    p.add_argument(
        "--decode", default="cpu", choices=["cpu", "gpu"], help="eval: decode JPEGs on the CPU or the GPU"
    )
    p.add_argument(
        "--parts", default="data,model,eval,train", help=f"comma list of model and {', '.join(PARTS)}"
    )
    p.add_argument(
        "--batch-sizes",
        help="latency: the batch sizes (default: 1,8,32); memory: the batch sizes to measure (default: the "
        "config's or --train-batch-size, and half of it)",
    )
    p.add_argument(
        "--fit-memory",
        metavar="SIZE",
        help="memory: the largest batch whose training step stays within SIZE, e.g. 24GB (an RTX 3090/4090; "
        "GB and GiB both count 2^30 bytes, MB 2^20)",
    )
    p.add_argument(
        "--config",
        metavar="YAML",
        help="memory: the training settings of a train.py config (default: its defaults)",
    )
    switch(p, "--recipes", "memory: every recipe config, with its header's architecture and its batch")
    p.add_argument(
        "--latency-runs", type=positive_int, default=20, help="latency: timed calls per backend and batch"
    )
    p.add_argument("--files", type=positive_int, default=200_000, help="index: files in the generated tree")
    p.add_argument("--gpu-img-per-s", type=positive_int, default=3000, help="augment: the GPU speed to feed")
    switch(p, "--baselines", "also time the plain loops", default=True)
    p.add_argument("--output", metavar="JSON", help="write the machine, the arguments and every row here")
    p.add_argument(
        "--merge", nargs="+", metavar="JSON", help="only print one report of earlier --output files"
    )
    add_runtime_args(p, batch_size=50)  # --batch-size: the eval and forward batch
    return p


MEMORY_UNITS = {"gib": 2**10, "gb": 2**10, "g": 2**10, "mib": 1, "mb": 1, "m": 1}


def memory_size(text: str) -> float:
    """'24GB' -> 24576.0 (MB, as CUDA's allocator counts: GB and GiB alike are 2^30 bytes)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]+)\s*", text)
    unit = match and MEMORY_UNITS.get(match.group(2).lower())
    if not unit:
        raise UserError(f"--fit-memory {text}: give a size with its unit, e.g. 24GB or 8000MB")
    return float(match.group(1)) * unit


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    try:
        args.batch_sizes = (
            [positive_int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else None
        )
    except (argparse.ArgumentTypeError, ValueError) as e:  # positive_int: a number below 1, or not a number
        raise UserError(f"--batch-sizes {args.batch_sizes}: {e}; use e.g. 1,8,32") from e
    args.fit_memory = memory_size(args.fit_memory) if args.fit_memory else None
    if args.fit_memory and args.batch_sizes and len(set(args.batch_sizes)) < 2:
        raise UserError("--fit-memory fits a line through the peaks: give --batch-sizes two sizes or more")
    try:
        counts = args.worker_counts.split(",") if args.worker_counts else []
        args.worker_counts = [non_negative_int(w) for w in counts]
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise UserError(f"--worker-counts {args.worker_counts}: {e}; use e.g. 0,1,2") from e
    args.parts = [
        q for part in args.parts.split(",") for q in (("forward", "step") if part == "model" else (part,))
    ]
    if "," in (args.arch or "") and args.parts != ["memory"]:
        raise UserError("a comma list in --arch is for --parts memory; the other parts time one architecture")
    if any(part not in PARTS for part in args.parts):
        raise UserError(f"unknown part in --parts {','.join(args.parts)}; use model or {', '.join(PARTS)}")
    if set(args.parts) - {"forward", "step", "index", "memory"} and not args.data and not args.merge:
        raise UserError(
            "--parts data, eval, train, augment, int8, latency and approx read images: pass --data DIR "
            "(or --parts model, index or memory)"
        )
    return args


@cli
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.merge:
        print(merge_benchmarks(args.merge))
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = (
        True  # for ours and the plain loops alike, as train.py and test_torchvision.py
    )
    device = resolve_device(args.device)
    weights = benchmark_weights(args)
    preset = weights.preset()
    args.arch = args.arch if args.arch and "," in args.arch else weights.arch
    args.train_size = args.train_size or weights.built_for or 224  # a ViT trained here: its own size
    workers = default_workers(device) if args.workers is None else args.workers
    samples = []
    if args.data and weights.classes is None:
        samples = find_samples(args.data, "val")[0][: args.limit]
    elif args.data:  # a head trained here on other classes: their images, matched by folder name
        samples = eval_samples(args.data, classes=weights.classes, weights=args.weights)[: args.limit]
    args.worker_counts = sorted(set(args.worker_counts or [0, 1, workers]))
    steps = min(args.train_steps, len(samples) // args.train_batch_size) if samples else args.train_steps
    if "train" in args.parts and steps < 1:
        raise UserError(
            f"training needs at least --train-batch-size {args.train_batch_size} images; got {len(samples)}"
        )
    info = machine_info(device)
    start, busy = time.perf_counter(), busy_seconds()
    print(
        f"{args.arch} on {info['gpu'] or info['cpu']} ({info['cores']} cores, {info['threads']} threads), "
        f"torch {info['torch']}, torchvision {info['torchvision']}; {len(samples)} images"
    )
    rows = []
    if "data" in args.parts:
        rows += bench_data(args, samples, preset, device)
    for part in ("forward", "step"):
        if part in args.parts:
            train = part == "step"
            batches = math.ceil(len(samples) / args.batch_size) if not train and samples else args.train_steps
            runtime = Runtime.create(device, args.amp, args.channels_last, train, preset)
            rows.append(bench_model(args, runtime, args.train_size if train else preset.crop, batches, train))
    if "eval" in args.parts:
        rows += bench_eval(args, device, samples, preset, weights, workers)
    if "train" in args.parts:
        rows += bench_train(args, device, samples, preset, workers, steps)
    if "augment" in args.parts:
        rows += bench_augment(args, samples, device) + bench_loaders(args, samples, device)
    if "int8" in args.parts:
        rows += bench_int8(args, samples, preset)
    if "latency" in args.parts:
        rows += bench_latency(args, samples, preset, device)
    if "approx" in args.parts:
        rows += bench_approx(args, device, samples, preset, workers)
    if "index" in args.parts:
        rows += bench_index(args)
    if "memory" in args.parts:
        rows += bench_memory(args, device)
    if "profile" in args.parts:
        rows += bench_profile(args, device, samples, preset, workers, steps)
    lines = benchmark_summary(rows)
    if busy:  # other processes' CPU use during the run: how far to trust CPU numbers
        now, seconds = busy_seconds(), time.perf_counter() - start
        others = round(max(0.0, (now[0] - busy[0]) - (now[1] - busy[1])) / seconds, 2)
        info["other_busy_cores"] = others
        lines.append(f"other processes kept {others:.2f} of {info['cores']} cores busy during the run")
    print(benchmark_report(rows, lines))
    result = {"machine": info, "args": vars(args), "rows": rows, "summary": lines}
    if args.output:
        atomic_write_text(args.output, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.output}")
        if "latency" in args.parts:
            figure = Path(args.output).with_suffix(".png")
            plot_latency([r for r in rows if r["part"] == "latency"], figure)
            print(f"wrote {figure}: img/s and p50 latency against batch size")
    return result


if __name__ == "__main__":
    main()
