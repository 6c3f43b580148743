"""Throughput of the input pipeline, the model alone, and end-to-end evaluation and training, ours next
to plain PyTorch loops in the same run. Every number is the median of --repeats timed passes after one
untimed warm-up pass (synchronised on CUDA). Weights are random unless --weights: nothing is downloaded.

    python benchmark.py --data /work/shared/data/imagenet-samples --json results/benchmark-cpu.json
    python benchmark.py --data DIR --parts data --worker-counts 0,1,2        # decoding alone: PIL, tensor, batched
    python benchmark.py --parts model --arch resnet50 --amp bf16 --compile    # model alone, synthetic input
    python benchmark.py --data DIR --parts eval --decode gpu --amp bf16       # JPEGs decoded on the GPU
    python benchmark.py --data DIR --parts approx --weights DEFAULT           # what --amp, --decode gpu change
    python benchmark.py --data DIR --parts augment                            # each recipe's train loader, per core
    python benchmark.py --data DIR --parts int8 --arch resnet50               # torchvision's int8 model vs fp32, CPU
    python benchmark.py --data DIR --parts latency --batch-sizes 1,8,32       # each backend: img/s, p50/p99, memory
    python benchmark.py --parts index --files 1281167                         # indexing ImageNet-1k train's shape
    bash scripts/gpu_check.sh                                                  # the GPU table, <= 5 minutes
--parts: data, model (= forward,step), eval, train (the default: all four), augment, int8, latency, approx, index.
"""

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from approximations import bench_approx
from backends import bench_int8, bench_latency, benchmark_model, forward_loop
from config import TrainConfig, load_config
from dataset import ImageDataset, TrainSampler, build_loader, default_workers, find_samples, split_folder
from decode import GpuDecodeLoader, TensorImageDataset, eval_loader, resize_crop, use_gpu_decode
from engine import Runtime, TrainState, evaluate, train_one_epoch
from index_benchmark import bench_index
from loss import build_loss
from model import prepare_for_eval, resolve_weights
from optimizer import build_optimizer
from plots import plot_latency
from presets import EvalPreset, train_preset, train_transform
from report import benchmark_report, benchmark_summary, busy_seconds, machine_info, merge_benchmarks
from utils import (
    ArgumentParser,
    UserError,
    add_runtime_args,
    amp_name,
    atomic_write_text,
    autocast,
    cli,
    positive_int,
    resolve_device,
    timed,
)

PARTS = ("data", "forward", "step", "eval", "train", "augment", "int8", "latency", "approx", "index")
PLAIN_WORKERS = 2  # the plain loops' fixed worker count, as in pytorch/examples' habit


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
    return f"{precision}, {layout}" + ("" if train else ", BN folded") + (", compiled" if args.compile else "")


# ----------------------------------------------------------------------------- the parts


def bench_data(args, samples, preset, device) -> list[dict]:
    """Decode + eval transform alone (what the model is fed), per worker count and backend: PIL (the
    exact path), torchvision.io in the workers, and --decode gpu's batched loader (on the GPU where
    --decode gpu is possible, else the same code with libjpeg on the CPU)."""
    rows = []
    batched_device = device if use_gpu_decode(args.decode, device, note_to=None) else torch.device("cpu")
    datasets = {
        "pil": ImageDataset(samples, preset),
        "tensor": TensorImageDataset(samples, functools.partial(resize_crop, preset=preset)),
    }
    for workers in args.worker_counts:

        def count(dataset, workers=workers):
            return sum(len(batch[1]) for batch in build_loader(dataset, args.batch_size, workers))

        def count_batched(workers=workers):
            return sum(
                len(batch[1]) for batch in GpuDecodeLoader(samples, preset, args.batch_size, workers, batched_device)
            )

        runs = {backend: (functools.partial(count, d), len(samples)) for backend, d in datasets.items()}
        runs[f"batched on {batched_device.type}"] = (count_batched, len(samples))
        times = timed(runs, args.repeats, device)
        pil, *others = ({"part": "data", "variant": f"{name}, {workers} workers", **times[name]} for name in runs)
        for row in others:
            row.update(baseline=pil["variant"], ratio=row["img_per_s"] / pil["img_per_s"])
        rows += [pil, *others]
    return rows


def bench_model(args, runtime: Runtime, size: int, batches: int, train: bool) -> dict:
    """Synthetic (B, 3, H, W) input: forward under inference_mode, or forward + backward + SGD step."""
    raw, model = prepare(args, runtime, train)
    batch = args.train_batch_size if train else args.batch_size
    device = runtime.device
    x, y = synthetic_batch(runtime, batch, size), torch.randint(0, 1000, (batch,), device=device)
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
        "note": f"{batches} batches a pass for {workers_named} times their first batches' wait more than their "
        f"rate: for the rate, give at least {4 * workers} batches a pass (more images or a smaller batch)"
    }


def ours_and_plain(part: str, times: dict, variant: str, plain_variant: str) -> list[dict]:
    """Our row, then the plain loop's with our ratio to it, where the plain loop was timed."""
    ours = {"part": part, "variant": variant, **times["ours"]}
    if "plain" not in times:
        return [ours]
    ours.update(baseline=plain_variant, ratio=times["ours"]["img_per_s"] / times["plain"]["img_per_s"])
    return [ours, {"part": part, "variant": plain_variant, **times["plain"]}]


def bench_eval(args, device, samples, preset, weights, workers: int) -> list[dict]:
    """Ours: ImageDataset + EvalPreset + build_loader + engine.evaluate(). Plain: ImageFolder + PIL +
    weights.transforms() + DataLoader, fp32 NCHW (its labels are 0..k-1, which is fine for speed)."""
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
        folder = ImageFolder(str(split_folder(args.data)), transform=weights.transforms())
        dataset = Subset(folder, range(len(samples)))

        def plain():
            loader = DataLoader(dataset, args.batch_size, num_workers=PLAIN_WORKERS, pin_memory=device.type == "cuda")
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
        model_only=times["model"], share_of_model_only=times["ours"]["img_per_s"] / times["model"]["img_per_s"]
    )
    rows[0].update(short_pass_note(batches, workers) if not gpu_decode else {})  # gpu decode: workers only read
    return rows


def bench_train(args, device, samples, preset, workers: int, steps: int) -> list[dict]:
    """Ours: engine.train_one_epoch() with train_preset('standard') at 224. Plain: transforms v1 (ToTensor +
    Normalize), SGD(0.01, momentum 0.9), cross-entropy, fp32 NCHW. Both train on the same images."""
    batch, images = args.train_batch_size, steps * args.train_batch_size
    runtime = Runtime.create(device, args.amp, args.channels_last, True, preset)
    raw, model = prepare(args, runtime, True)
    cfg = TrainConfig(arch=args.arch, batch_size=batch, lr=0.01)
    dataset = ImageDataset(samples[:images], train_preset("standard", 224), cfg.seed)
    sampler, pin = TrainSampler(dataset, 1, 0, cfg.seed), device.type == "cuda"
    loader = build_loader(dataset, batch, workers, sampler, pin, drop_last=True, persistent_workers=True)
    optimizer, criterion = build_optimizer(cfg, raw, cfg.lr), build_loss("ce", 1000).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.amp_dtype == torch.float16)

    def ours():
        train_one_epoch(model, criterion, optimizer, scaler, loader, runtime, TrainState(), log_interval=10**9)

    runs = {"ours": (ours, images)}
    if args.baselines:
        plain_model, criterion = benchmark_model(args).to(device).train(), nn.CrossEntropyLoss()
        plain_optimizer = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9)
        transform = T.Compose(
            [T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(preset.mean, preset.std)]
        )
        plain_set = Subset(ImageFolder(str(split_folder(args.data)), transform=transform), range(images))
        plain_loader = DataLoader(
            plain_set, batch, shuffle=True, num_workers=PLAIN_WORKERS, pin_memory=device.type == "cuda", drop_last=True
        )

        def plain():
            for x, y in plain_loader:
                loss = criterion(plain_model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
                plain_optimizer.zero_grad()
                loss.backward()
                plain_optimizer.step()

        runs["plain"] = (plain, images)
    times = timed(runs, args.repeats, device)  # ours and plain in turn
    variant = f"ours: {workers} workers, {torch.get_num_threads()} threads, {settings(args, runtime, True)}"
    rows = ours_and_plain(
        "train", times, variant, f"plain: ImageFolder + transforms v1, {PLAIN_WORKERS} workers, fp32 NCHW"
    )
    rows[0].update(short_pass_note(steps, workers))
    return rows


def bench_augment(args, samples, device) -> list[dict]:
    """Decode + each config's train transform, in this process (what one loader worker does), timed in
    turn: img/s per worker, and the workers (cores) that feed one GPU training at --gpu-img-per-s. The V1
    recipe (RandomResizedCrop + flip) is the baseline; MixUp/CutMix run on the device, not in workers."""
    runs, names = {}, {}
    for path in sorted((Path(__file__).parent / "configs").glob("*.yaml")):
        cfg = load_config(TrainConfig, ["--config", str(path), "--dummy"])
        dataset = ImageDataset(samples, train_transform(cfg), cfg.seed)
        runs[path.name] = (functools.partial(lambda d: [d[(i, 0, 0)] for i in range(len(d))], dataset), len(samples))
        names[path.name] = f"{path.name}: {cfg.train_crop_size} px, {cfg.auto_augment}, erase {cfg.random_erase}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    times, rows = timed(runs, args.repeats, device), []
    torch.set_num_threads(threads)
    for name, t in times.items():
        ratio = t["img_per_s"] / times["torchvision_v1.yaml"]["img_per_s"]
        rows.append({"part": "augment", "variant": names[name], **t, "baseline": "torchvision_v1.yaml", "ratio": ratio})
        rows[-1].update(
            workers_per_gpu=math.ceil(args.gpu_img_per_s / t["img_per_s"]), gpu_img_per_s=args.gpu_img_per_s
        )
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--arch", default="resnet18", help="any torchvision classifier (random weights)")
    p.add_argument("--weights", help="DEFAULT or a weights name from torchvision's cache (default: random weights)")
    p.add_argument("--weights-dir", help="folder holding torchvision's weights files (default: torchvision's cache)")
    p.add_argument("--train-batch-size", type=positive_int, default=32, help="train and step batch")
    p.add_argument("--train-steps", type=positive_int, default=5, help="timed optimizer steps per pass (train, step)")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (never the plain loops')")
    p.add_argument("--data", help="ImageFolder of ImageNet wnid folders (its val/ or the folder itself)")
    p.add_argument("--limit", type=positive_int, help="only the first N images (sorted by path)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed passes; the median counts")
    p.add_argument("--threads", type=positive_int, help="torch.set_num_threads in this process (default: torch's)")
    p.add_argument("--worker-counts", help="for --parts data, e.g. 0,1,2 (default: 0, 1 and our default)")
    p.add_argument("--decode", default="cpu", choices=["cpu", "gpu"], help="eval: decode JPEGs on the CPU or the GPU")
    p.add_argument("--parts", default="data,model,eval,train", help=f"comma list of model and {', '.join(PARTS)}")
    p.add_argument("--batch-sizes", default="1,8,32", help="latency: the batch sizes (default: 1,8,32)")
    p.add_argument("--latency-runs", type=positive_int, default=20, help="latency: timed calls per backend and batch")
    p.add_argument("--files", type=positive_int, default=200_000, help="index: files in the generated tree")
    p.add_argument("--gpu-img-per-s", type=positive_int, default=3000, help="augment: the GPU speed to feed")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True, help="also time the plain loops")
    p.add_argument("--json", help="write the machine, the arguments and every row here")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="only print one report of earlier --json files")
    add_runtime_args(p, batch_size=50)  # --batch-size: the eval and forward batch
    args = p.parse_args(argv)
    try:
        args.batch_sizes = [positive_int(b) for b in args.batch_sizes.split(",")]
    except (argparse.ArgumentTypeError, ValueError) as e:  # positive_int: a number below 1, or not a number
        raise UserError(f"--batch-sizes {args.batch_sizes}: {e}; use e.g. 1,8,32") from e
    args.parts = [q for part in args.parts.split(",") for q in (("forward", "step") if part == "model" else (part,))]
    if any(part not in PARTS for part in args.parts):
        raise UserError(f"unknown part in --parts {','.join(args.parts)}; use model or {', '.join(PARTS)}")
    if set(args.parts) - {"forward", "step", "index"} and not args.data and not args.merge:
        raise UserError(
            "--parts data, eval, train, augment, int8, latency and approx read images: pass --data DIR "
            "(or --parts model or index)"
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
    torch.backends.cudnn.benchmark = True  # for ours and the plain loops alike, as train.py and test_torchvision.py
    device = resolve_device(args.device)
    weights = resolve_weights(args.arch, args.weights or "DEFAULT")  # for its eval transforms
    preset = EvalPreset.from_weights(weights)
    workers = default_workers(device) if args.workers is None else args.workers
    samples = find_samples(args.data, "val")[0][: args.limit] if args.data else []
    counts = {int(w) for w in args.worker_counts.split(",")} if args.worker_counts else {0, 1, workers}
    args.worker_counts = sorted(counts)
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
            rows.append(bench_model(args, runtime, 224 if train else preset.crop, batches, train))
    if "eval" in args.parts:
        rows += bench_eval(args, device, samples, preset, weights, workers)
    if "train" in args.parts:
        rows += bench_train(args, device, samples, preset, workers, steps)
    if "augment" in args.parts:
        rows += bench_augment(args, samples, device)
    if "int8" in args.parts:
        rows += bench_int8(args, samples, preset)
    if "latency" in args.parts:
        rows += bench_latency(args, samples, preset, device)
    if "approx" in args.parts:
        rows += bench_approx(args, device, samples, preset, workers)
    if "index" in args.parts:
        rows += bench_index(args)
    lines = benchmark_summary(rows)
    if busy:  # other processes' CPU use during the run: how far to trust CPU numbers
        now, seconds = busy_seconds(), time.perf_counter() - start
        info["other_busy_cores"] = others = round(max(0.0, (now[0] - busy[0]) - (now[1] - busy[1])) / seconds, 2)
        lines.append(f"other processes kept {others:.2f} of {info['cores']} cores busy during the run")
    print(benchmark_report(rows, lines))
    result = {"machine": info, "args": vars(args), "rows": rows, "summary": lines}
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
        if "latency" in args.parts:
            plot_latency([r for r in rows if r["part"] == "latency"], Path(args.json).with_suffix(".png"))
            print(f"wrote {Path(args.json).with_suffix('.png')}: img/s and p50 latency against batch size")
    return result


if __name__ == "__main__":
    main()
