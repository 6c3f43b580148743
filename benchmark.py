"""Throughput of the input pipeline, the model alone, and end-to-end evaluation and training, ours next
to plain PyTorch loops in the same run. Every number is the median of --repeats timed passes after one
untimed warm-up pass (synchronised on CUDA). Weights are random: nothing is ever downloaded.

    python benchmark.py --data /work/shared/data/imagenet-samples --json results/benchmark-cpu.json
    python benchmark.py --data DIR --parts data --worker-counts 0,1,2        # decoding alone, PIL vs tensor
    python benchmark.py --parts model --arch resnet50 --dtype bf16 --compile  # model alone, synthetic input
    python benchmark.py --data DIR --parts eval --decode gpu --dtype bf16     # JPEGs decoded on the GPU
    bash scripts/gpu_check.sh                                                  # the GPU table, <= 5 minutes
--parts: data, model (= forward,step), eval, train; default all of them.
"""
import argparse
import functools
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_jpeg, read_file
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from dataset import EvalPreset, ImageDataset, TrainSampler, build_loader, find_samples, load_rgb, resolve_split, train_preset
from loss import build_loss
from model import build_model, prepare_for_eval, resolve_weights
from train import TrainConfig, build_optimizer, evaluate, train_one_epoch
from report import markdown_table
from utils import ArgumentParser, UserError, atomic_write_text, cli, default_workers, resolve_device

PARTS = ("data", "forward", "step", "eval", "train")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PLAIN_WORKERS = 2  # the plain loops' fixed worker count, as in pytorch/examples' habit


def timed(run, images: int, repeats: int, device) -> dict:
    """One untimed warm-up call of run(), then `repeats` timed calls; img/s of the median call."""
    sync = functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else lambda: None
    run()
    seconds = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        run()
        sync()
        seconds.append(time.perf_counter() - start)
    return {"img_per_s": images / statistics.median(seconds), "seconds": [round(s, 3) for s in seconds]}


def autocast(device, dtype: str):
    return torch.autocast(device.type, dtype=DTYPES[dtype] or torch.bfloat16, enabled=DTYPES[dtype] is not None)


def channels_last(args, device, train: bool) -> bool:
    """--(no-)channels-last, else the repo's own choice: always for evaluation (test_torchvision.py),
    for training on CUDA only (train.py's channels_last: auto)."""
    return args.channels_last if args.channels_last is not None else not train or device.type == "cuda"


def prepare(args, device, train: bool):
    """(model, the module to call), with our layout and compile settings; optimizers take the first."""
    model = build_model(args.arch).to(device)
    if not train:  # as test_torchvision.py evaluates: BatchNorm folded into the convolutions
        model = prepare_for_eval(model, channels_last(args, device, train))
    elif channels_last(args, device, train):
        model = model.to(memory_format=torch.channels_last)
    return model, torch.compile(model) if args.compile else model


def settings(args, device, train: bool) -> str:
    layout = "channels_last" if channels_last(args, device, train) else "NCHW"
    return f"{args.dtype}, {layout}" + ("" if train else ", BN folded") + (", compiled" if args.compile else "")


# ----------------------------------------------------------------------------- tensor and GPU decoding

def is_jpeg(data: torch.Tensor) -> bool:
    return data[:2].tolist() == [0xFF, 0xD8]


def decode_rgb(path: str) -> torch.Tensor:
    """(3, H, W) uint8 by torchvision.io's libjpeg; PIL for other formats and JPEGs it refuses."""
    data = read_file(path)
    if is_jpeg(data):
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError:
            pass
    return F.pil_to_tensor(load_rgb(path))


def resize_crop(image: torch.Tensor, preset: EvalPreset) -> torch.Tensor:
    """EvalPreset on a (3, H, W) uint8 tensor on any device. Pixels within 1 of the PIL path's, not
    equal (another antialiasing kernel): for speed checks, not for accuracy tables."""
    image = F.resize(image, [preset.resize], interpolation=InterpolationMode(preset.interpolation), antialias=True)
    return F.center_crop(image, [preset.crop])


class TensorImageDataset(ImageDataset):
    """Images decoded by torchvision.io (the "tensor" backend, with resize_crop as transform), or, with
    raw_jpeg, JPEGs left as file bytes for GpuDecodeLoader to decode in batches."""

    def __init__(self, samples, transform, raw_jpeg: bool = False):
        super().__init__(samples, transform)
        self.raw_jpeg = raw_jpeg

    def load(self, index: int):
        path = self.samples[index].path
        if self.raw_jpeg:
            data = read_file(path).clone()  # read_file's file-backed storage can't be sent between processes
            if is_jpeg(data):
                return data
        return decode_rgb(path)


class GpuDecodeLoader:
    """Wraps a loader of TensorImageDataset(raw_jpeg=True) items (collate_fn=list: file bytes differ in
    length): decodes each batch in one batched nvjpeg call, resizes and crops on the GPU, and yields
    what build_loader yields, so train.evaluate() runs on it unchanged."""

    def __init__(self, loader, preset: EvalPreset, device):
        self.loader, self.dataset, self.preset, self.device = loader, loader.dataset, preset, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for items in self.loader:
            good = [item for item in items if item[0] is not None]
            images, indices = [item[0] for item in good], [item[2] for item in good]
            jpegs = [i for i, image in enumerate(images) if image.ndim == 1]
            files = [images[i] for i in jpegs]
            try:
                decoded = decode_jpeg(files, mode=ImageReadMode.RGB, device=self.device) if files else []
            except RuntimeError:  # a JPEG nvjpeg refuses (e.g. CMYK): this batch decodes on the CPU
                decoded = [decode_rgb(self.dataset.samples[indices[i]].path) for i in jpegs]
            for i, image in zip(jpegs, decoded):
                images[i] = image
            images = [resize_crop(image.to(self.device, non_blocking=True), self.preset) for image in images]
            yield (torch.stack(images) if images else torch.empty(0, dtype=torch.uint8),
                   torch.tensor([item[1] for item in good]), torch.tensor(indices), [i[2:] for i in items if i[0] is None])


def gpu_decode_works(device, samples) -> bool:
    """Whether decode_jpeg(device=cuda) works here; if not, a printed note and the CPU path."""
    try:
        if device.type != "cuda":
            raise RuntimeError("no CUDA device")
        decode_jpeg([read_file(samples[0].path)], mode=ImageReadMode.RGB, device=device)
        return True
    except (RuntimeError, TypeError) as e:
        print(f"note: --decode gpu is not possible here ({str(e).splitlines()[0][:120]}); decoding on the CPU")
        return False


# ----------------------------------------------------------------------------- the parts

def bench_data(args, samples, preset, device) -> list[dict]:
    """Decode + eval transform alone (what the model is fed), per worker count and backend."""
    rows = []
    for workers in args.worker_counts:
        for backend in ("pil", "tensor"):
            dataset = (ImageDataset(samples, preset) if backend == "pil" else
                       TensorImageDataset(samples, functools.partial(resize_crop, preset=preset)))
            run = lambda: sum(len(batch[1]) for batch in build_loader(dataset, args.batch_size, workers))
            rows.append({"part": "data", "variant": f"{backend}, {workers} workers",
                         **timed(run, len(samples), args.repeats, device)})
        rows[-1].update(baseline=rows[-2]["variant"], ratio=rows[-1]["img_per_s"] / rows[-2]["img_per_s"])
    return rows


def bench_model(args, device, size: int, batches: int, train: bool) -> dict:
    """Synthetic (B, 3, H, W) input: forward under inference_mode, or forward + backward + SGD step."""
    raw, model = prepare(args, device, train)
    batch = args.train_batch_size if train else args.batch_size
    x = torch.randn(batch, 3, size, size, device=device)  # (B, 3, H, W) float32, as normalize() gives
    x = x.contiguous(memory_format=torch.channels_last) if channels_last(args, device, train) else x
    y = torch.randint(0, 1000, (batch,), device=device)
    optimizer = torch.optim.SGD(raw.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")

    def forward():
        with torch.inference_mode(), autocast(device, args.dtype):
            for _ in range(batches):
                model(x)

    def step():
        for _ in range(batches):
            with autocast(device, args.dtype):
                loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    model.train(train)
    return {"part": "step" if train else "forward", "variant": f"{args.arch} batch {batch}, {settings(args, device, train)}",
            **timed(step if train else forward, batches * batch, args.repeats, device)}


def bench_eval(args, device, samples, preset, weights, workers: int) -> list[dict]:
    """Ours: ImageDataset + EvalPreset + build_loader + train.evaluate(). Plain: ImageFolder + PIL +
    weights.transforms() + DataLoader, fp32 NCHW (its labels are 0..k-1, which is fine for speed)."""
    gpu_decode = args.decode == "gpu" and gpu_decode_works(device, samples)
    _, model = prepare(args, device, False)

    def ours():
        if gpu_decode:
            loader = DataLoader(TensorImageDataset(samples, nn.Identity(), raw_jpeg=True), args.batch_size,
                                num_workers=workers, collate_fn=list, pin_memory=True,
                                prefetch_factor=4 if workers else None)
            loader = GpuDecodeLoader(loader, preset, device)
        else:
            loader = build_loader(ImageDataset(samples, preset), args.batch_size, workers, pin_memory=device.type == "cuda")
        evaluate(model, loader, device, preset.mean, preset.std, channels_last=channels_last(args, device, False),
                 amp_dtype=DTYPES[args.dtype])
    variant = (f"ours: {workers} workers, {torch.get_num_threads()} threads, {settings(args, device, False)}, "
               f"{'gpu' if gpu_decode else 'cpu'} decode")
    rows = [{"part": "eval", "variant": variant, **timed(ours, len(samples), args.repeats, device)}]
    if args.baselines:
        plain_model, criterion = build_model(args.arch).to(device).eval(), nn.CrossEntropyLoss()
        dataset = Subset(ImageFolder(str(resolve_split(args.data)), transform=weights.transforms()), range(len(samples)))

        def plain():
            loader = DataLoader(dataset, args.batch_size, num_workers=PLAIN_WORKERS, pin_memory=device.type == "cuda")
            with torch.no_grad():
                for x, y in loader:
                    criterion(plain_model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
        rows.append({"part": "eval", "variant": f"plain: ImageFolder + transforms(), {PLAIN_WORKERS} workers, fp32 NCHW",
                     **timed(plain, len(samples), args.repeats, device)})
    return rows


def bench_train(args, device, samples, preset, workers: int, steps: int) -> list[dict]:
    """Ours: train_one_epoch() with train_preset('standard') at 224. Plain: transforms v1 (ToTensor +
    Normalize), SGD(0.01, momentum 0.9), cross-entropy, fp32 NCHW. Both train on the same images."""
    batch, images = args.train_batch_size, steps * args.train_batch_size
    raw, model = prepare(args, device, True)
    cfg = TrainConfig(arch=args.arch, batch_size=batch, lr=0.01, epochs=1, log_interval=10 ** 9)
    dataset = ImageDataset(samples[:images], train_preset("standard", 224), cfg.seed)
    loader = build_loader(dataset, batch, workers, shuffle=True, sampler=TrainSampler(dataset, 1, 0, cfg.seed),
                          pin_memory=device.type == "cuda", drop_last=True)
    optimizer, criterion = build_optimizer(cfg, raw, cfg.lr), build_loss("ce", 1000).to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")
    state = {"model": raw, "ema": None, "dir": None, "mean": preset.mean, "std": preset.std, "bad_images": [],
             "channels_last": channels_last(args, device, True), "amp_dtype": DTYPES[args.dtype]}

    def ours():
        state.update(step=0, batch=0)
        train_one_epoch(model, criterion, optimizer, scaler, loader, device, 0, cfg, state)
    variant = f"ours: {workers} workers, {torch.get_num_threads()} threads, {settings(args, device, True)}"
    rows = [{"part": "train", "variant": variant, **timed(ours, images, args.repeats, device)}]
    if args.baselines:
        plain_model, criterion = build_model(args.arch).to(device).train(), nn.CrossEntropyLoss()
        plain_optimizer = torch.optim.SGD(plain_model.parameters(), lr=0.01, momentum=0.9)
        transform = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                               T.Normalize(preset.mean, preset.std)])
        plain_set = Subset(ImageFolder(str(resolve_split(args.data)), transform=transform), range(images))
        plain_loader = DataLoader(plain_set, batch, shuffle=True, num_workers=PLAIN_WORKERS,
                                  pin_memory=device.type == "cuda", drop_last=True)

        def plain():
            for x, y in plain_loader:
                loss = criterion(plain_model(x.to(device, non_blocking=True)), y.to(device, non_blocking=True))
                plain_optimizer.zero_grad()
                loss.backward()
                plain_optimizer.step()
        rows.append({"part": "train", "variant": f"plain: ImageFolder + transforms v1, {PLAIN_WORKERS} workers, fp32 NCHW",
                     **timed(plain, images, args.repeats, device)})
    return rows


# ----------------------------------------------------------------------------- report

def machine(device) -> dict:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), cpu)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "device": str(device), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "threads": torch.get_num_threads(), "python": platform.python_version(),
            "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "GOMP_"))}}


def busy_seconds() -> tuple[float, float] | None:
    """(CPU seconds all processes used, CPU seconds this one and its finished workers used), from /proc/stat."""
    if not Path("/proc/stat").exists():
        return None
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    own = os.times()
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), own[0] + own[1] + own[2] + own[3]


def summarize(rows: list[dict]) -> list[str]:
    """Ratios against the plain loops, and end-to-end eval as a share of the model alone."""
    by_part = {part: [r for r in rows if r["part"] == part] for part in PARTS}
    lines = []
    for part in ("eval", "train"):
        if len(by_part[part]) == 2:
            ours, plain = by_part[part]
            ours.update(baseline=plain["variant"], ratio=ours["img_per_s"] / plain["img_per_s"])
            lines.append(f"{part}: ours / baseline = {ours['ratio']:.2f}x")
    if by_part["eval"] and by_part["forward"]:
        share = by_part["eval"][0]["img_per_s"] / by_part["forward"][0]["img_per_s"]
        lines.append(f"eval: ours end-to-end = {100 * share:.0f}% of model-only forward "
                     f"({by_part['forward'][0]['variant']})")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", help="any torchvision classifier (random weights)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=50, help="eval and forward batch")
    p.add_argument("--train-batch-size", type=int, default=32, help="train and step batch")
    p.add_argument("--train-steps", type=int, default=5, help="timed optimizer steps per pass (train, step)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="bf16/fp16: autocast, as train.py --amp")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="default: as the repo chooses: on for eval and forward, for train and step on CUDA only")
    p.add_argument("--compile", action="store_true", help="torch.compile our model (never the plain loops')")
    p.add_argument("--data", help="ImageFolder of ImageNet wnid folders (its val/ or the folder itself)")
    p.add_argument("--limit", type=int, help="only the first N images (sorted by path)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes; the median counts")
    p.add_argument("--workers", type=int, help="our loader processes (default: utils.default_workers)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in this process (default: torch's)")
    p.add_argument("--worker-counts", help="for --parts data, e.g. 0,1,2 (default: 0, 1 and our default)")
    p.add_argument("--decode", default="cpu", choices=["cpu", "gpu"], help="eval: decode JPEGs in the loader or on the GPU")
    p.add_argument("--parts", default="data,model,eval,train", help="comma list of data, model, forward, step, eval, train")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True, help="also time the plain loops")
    p.add_argument("--json", help="write the machine, the arguments and every row here")
    args = p.parse_args(argv)
    args.parts = [q for part in args.parts.split(",") for q in (("forward", "step") if part == "model" else (part,))]
    if any(part not in PARTS for part in args.parts):
        raise UserError(f"unknown part in --parts {','.join(args.parts)}; use data, model, forward, step, eval, train")
    for name in ("batch_size", "train_batch_size", "train_steps", "repeats", "limit", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
    if {"data", "eval", "train"} & set(args.parts) and not args.data:
        raise UserError("--parts data, eval and train read images: pass --data DIR (or --parts model)")
    return args


@cli
def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = resolve_device(args.device)
    weights = resolve_weights(args.arch, "DEFAULT")  # for its eval transforms only; never loaded
    preset = EvalPreset.from_weights(weights)
    workers = default_workers(device) if args.workers is None else args.workers
    samples = find_samples(args.data, "val")[0][:args.limit] if args.data else []
    args.worker_counts = sorted({int(w) for w in args.worker_counts.split(",")} if args.worker_counts else {0, 1, workers})
    steps = min(args.train_steps, len(samples) // args.train_batch_size) if samples else args.train_steps
    if "train" in args.parts and steps < 1:
        raise UserError(f"training needs at least --train-batch-size {args.train_batch_size} images; got {len(samples)}")
    info, start, busy = machine(device), time.perf_counter(), busy_seconds()
    print(f"{args.arch} on {info['gpu'] or info['cpu']} ({info['cores']} cores, {info['threads']} threads), "
          f"torch {info['torch']}, torchvision {info['torchvision']}; {len(samples)} images")
    rows = []
    if "data" in args.parts:
        rows += bench_data(args, samples, preset, device)
    for part in ("forward", "step"):
        if part in args.parts:
            batches = math.ceil(len(samples) / args.batch_size) if part == "forward" and samples else args.train_steps
            rows.append(bench_model(args, device, preset.crop if part == "forward" else 224, batches, part == "step"))
    if "eval" in args.parts:
        rows += bench_eval(args, device, samples, preset, weights, workers)
    if "train" in args.parts:
        rows += bench_train(args, device, samples, preset, workers, steps)
    lines = summarize(rows)
    if busy:  # other processes' CPU use during the run: how far to trust CPU numbers
        now = busy_seconds()
        info["other_busy_cores"] = round(((now[0] - busy[0]) - (now[1] - busy[1])) / (time.perf_counter() - start), 2)
        lines.append(f"other processes kept {info['other_busy_cores']:.2f} of {info['cores']} cores busy during the run")
    table = [{"part": r["part"], "variant": r["variant"], "img/s": f"{r['img_per_s']:.1f}", "vs": r.get("baseline"),
              "ratio": f"{r['ratio']:.2f}x" if "ratio" in r else None} for r in rows]
    print(markdown_table(table, ["part", "variant", "img/s", "vs", "ratio"]) + "\n".join(lines))
    result = {"machine": info, "args": vars(args), "rows": rows, "summary": lines}
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
