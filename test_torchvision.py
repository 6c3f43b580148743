"""Benchmark torchvision's pretrained ImageNet classifiers: the tables of the zoo.

Complexity of all weights (no data, no download; the repo's main job):
    python test_torchvision.py               # -> results/complexity.{md,csv,json}, acc_vs_gmacs.{png,html}
    python test_torchvision.py --models 'resnet*' --weights default --output results/few   # a subset
Accuracy on the ImageNet validation set (README: the --data layouts) and its other test sets (dataset.py):
    python test_torchvision.py --data /data/imagenet/val --models resnet50 vit_b_16
    python test_torchvision.py --data /data/imagenet/val --real-labels real.json     # ReaL top-1/top-5 too
    python test_torchvision.py --data /data/imagenet-a --mask-classes                # its 200 classes only
    python test_torchvision.py --data /data/imagenet/val --tta flip        # each image and its mirror
The speed of every weights on this machine, the model alone (random values, nothing downloaded):
    python test_torchvision.py --speed --amp bf16 --batch-size 256   # -> results/speed.{md,csv,json}
    python test_torchvision.py --speed train --models 'resnet*' --device cpu   # a training step's too
The table of finished train.py runs, and the training command of all of torchvision's weights:
    python test_torchvision.py --runs checkpoints                # -> results/our_training.{md,csv,json}
    python test_torchvision.py --recipes --output docs           # -> docs/recipes.md
"""

import contextlib
import csv
import fnmatch
import gc
import hashlib
import io
import json
import math
import multiprocessing
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from torchvision import models
from torchvision.models import WeightsEnum
from tqdm import tqdm

from backends import OnnxRuntimeModel, exported_model
from config import recipes_table
from dataset import (
    class_mask,
    corruption,
    dataset_name,
    eval_samples,
    images_fingerprint,
    is_shard_source,
    is_shifted_set,
    is_url,
    load_real_labels,
    real_accuracy,
    real_label_sets,
)
from engine import Runtime, evaluate, per_class_accuracy, with_smaller_batches
from loader import EvalSampler, default_workers, eval_loader, shard_eval_loader, use_gpu_decode
from model import (
    ARCHS,
    NO_QUANTIZATION,
    QUANTIZED_ARCHS,
    MissingWeights,
    Weights,
    all_weights,
    build_model,
    check_input_size,
    float_arch,
    is_onnx_file,
    is_quantized,
    is_weights_file,
    on_meta,
    prepare_for_eval,
    resolve_weights,
    size_argument,
    weights_enum,
)
from presets import TestTimeAugmentation, add_preprocessing_args
from report import (
    markdown_table,
    plot_acc_vs_gmacs,
    plot_reliability,
    write_csv,
    write_predictions,
    write_records,
    write_robustness,
)
from speed import SpeedSettings, speed_sweep
from utils import (
    RUNTIME_HELP,
    AgreedError,
    ArgumentParser,
    UserError,
    add_runtime_args,
    add_weights_args,
    amp_dtype,
    amp_name,
    atomic_write_text,
    available_cores,
    cleanup_distributed,
    cli,
    closest,
    is_distributed,
    is_main,
    positive_float,
    positive_int,
    rank,
    remove_stale_temporaries,
    resolve_device,
    setup_distributed,
    switch,
    use_channels_last,
    world_size,
)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, renamed={"--out": "--output"})
    p.add_argument(
        "--models", nargs="+", default=["*"], help="names or globs, e.g. resnet50 'vit_*' (default: all)"
    )
    weights_help = (
        "default | all | a weights name such as IMAGENET1K_V2, a .pth or train.py checkpoint, an export.py "
        ".onnx file (default: all without --data, default with it)"
    )
    add_weights_args(p, None, weights_help)
    p.add_argument("--output", default="results", help="folder for the tables, plot and predictions")
    switch(p, "--thop", "thop's cross-check column of the complexity table", default=True)
    # the modes; without any: the complexity table
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--data", help="ImageNet val folder (or its root) or tar shards: evaluate instead of counting"
    )
    mode.add_argument(
        "--runs", help="folder of train.py runs (e.g. checkpoints): tabulate them in OUTPUT/our_training.md"
    )
    switch(p, "--recipes", "write OUTPUT/recipes.md: the train.py command of all torchvision weights")
    speed_help = (
        "measure each weights' speed here (OUTPUT/speed.{md,csv,json}, acc_vs_speed.{png,html}): inference "
        "img/s at --batch-size, batch-1 latency p50/p99, peak memory; 'train': a training step's too"
    )
    mode.add_argument(
        "--speed", nargs="?", const="inference", choices=["inference", "train"], help=speed_help
    )
    p.add_argument(
        "--speed-seconds",
        type=positive_float,
        default=1.0,
        help="--speed: timed calls per measurement, in seconds (at least 5 calls; default 1)",
    )
    e = p.add_argument_group("evaluation (with --data)")
    e.add_argument("--val-labels", help=RUNTIME_HELP["val_labels"])
    e.add_argument(
        "--dataset", help="the name rows give this set (default: recognised from the folder, see dataset.py)"
    )
    switch(e, "--mask-classes", "predict among the classes the folder holds (-A, -R)")
    e.add_argument(
        "--real-labels",
        metavar="JSON",
        help="ReaL's real.json: also score the val images by their ReaL labels",
    )
    e.add_argument(
        "--clean",
        default="imagenet",
        help="the set robustness.md compares the others with (default: imagenet)",
    )
    add_preprocessing_args(e)
    e.add_argument("--limit", type=positive_int, help="evaluate only the first N images (sorted by path)")
    switch(e, "--skip-bad-images", "skip unreadable images, count and list them")
    switch(e, "--force", "re-evaluate weights already in OUTPUT/eval.json")
    decode_help = (
        "gpu: batched JPEG decoding and resizing on the GPU (changes results slightly, see "
        "docs/performance.md; falls back to cpu where it is not possible)"
    )
    e.add_argument("--decode", choices=["cpu", "gpu"], default="cpu", help=decode_help)
    onnx_help = "onnxruntime: export each model to OUTPUT/onnx/ once, run it with ONNX Runtime"
    e.add_argument("--backend", choices=["pytorch", "onnxruntime"], default="pytorch", help=onnx_help)
    tta_help = (
        "flip: each image and its left-right mirror, by the mean of their logits (FFCV's rule adds them: "
        "the same top-1/top-5); a row of its own, without the published numbers, which are of one pass"
    )
    e.add_argument("--tta", choices=typing.get_args(TestTimeAugmentation), default="none", help=tta_help)
    switch(e, "--compile", "torch.compile each model (pays off on long sweeps)")
    switch(
        e,
        "--plots",
        "a reliability diagram of every row evaluated in OUTPUT/reliability/ (default: each set's best row)",
    )
    switch(
        e,
        "--fuse-bn",
        "fold BatchNorm into the convolutions (--no-fuse-bn: the module's own math)",
        default=True,
    )
    add_runtime_args(p, batch_size=50)
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if args.recipes and (args.data or args.runs or args.speed):
        raise UserError("--recipes is a mode of its own: drop --data, --runs and --speed (see --help)")
    if args.weights is None:
        args.weights = "default" if args.data else "all"
    return args


# ----------------------------------------------------------------------------- choosing weights


def select_models(patterns: list[str], evaluating: bool = False) -> list[str]:
    """The architectures the patterns name; the int8 ones (CPU-only, slow over 50,000 images) join an
    evaluation only when a pattern names them ('quantized_*')."""
    selected = []
    for pattern in patterns:
        int8 = [] if evaluating and not pattern.startswith("quantized") else QUANTIZED_ARCHS
        matches = fnmatch.filter(ARCHS + int8, pattern)
        if NO_QUANTIZATION and fnmatch.fnmatch("quantized_resnet50", pattern):  # the int8 models it would add
            if not matches:
                raise UserError(NO_QUANTIZATION)
            print(f"note: {NO_QUANTIZATION}", file=sys.stderr)
        if not matches:
            raise UserError(f"no model matches '{pattern}'{closest(pattern, ARCHS + QUANTIZED_ARCHS)}")
        selected += [m for m in matches if m not in selected]
    return selected


def select_weights(patterns: list[str], choice: str, evaluating: bool = False) -> list[tuple]:
    """(arch, weights) pairs: each model's DEFAULT, all of its weights, or the weights of one name."""
    pairs = []
    for arch in select_models(patterns, evaluating):
        if choice.lower() == "all":
            pairs += [(arch, w) for w in all_weights(arch)]
        elif choice.lower() == "default":
            pairs.append((arch, weights_enum(arch, "DEFAULT")))
        elif len(patterns) == 1 and not any(c in patterns[0] for c in "*?["):
            pairs.append((arch, weights_enum(arch, choice)))  # one model: unknown weights is an error
        else:
            pairs += [(arch, w) for w in all_weights(arch) if choice.split(".")[-1] == w.name]
    if not pairs:
        raise UserError(f"no selected model has weights '{choice}'; use default, all or e.g. IMAGENET1K_V1")
    return pairs


# ----------------------------------------------------------------------------- complexity


def meta_model(arch: str, weights: WeightsEnum | None, num_classes=None, size=None) -> nn.Module:
    """The architecture as the weights' builder makes it, on the meta device; without weights, a ViT or
    MaxViT is made for `size` (as train.py makes a new one)."""
    kwargs = {"num_classes": len(weights.meta["categories"] or range(1000))} if weights is not None else {}
    arch = float_arch(arch)  # an int8 model counts as its float architecture (as its metadata does)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if weights is not None:  # as torchvision's ViT and MaxViT builders do
        kwargs.update(size_argument(arch, weights.meta["min_size"][0]))
    elif size is not None:
        kwargs.update(size_argument(arch, size))
    # torchvision's num_params for googlenet leaves out its aux heads, and counts them for inception_v3
    if arch == "googlenet":
        kwargs.update(aux_logits=False, init_weights=False)
    if arch == "inception_v3":
        kwargs.update(aux_logits=True, init_weights=False)
    with on_meta():
        return models.get_model(arch, weights=None, **kwargs).eval()


def eval_resolution(weights: WeightsEnum | None) -> int:
    return weights.transforms().crop_size[0] if weights is not None else 224


def complexity(
    arch: str, weights=None, thop: bool = False, size: int | None = None, num_classes: int | None = None
) -> dict:
    """Parameters and multiply-accumulates at the weights' own eval resolution, counted by
    torch.utils.flop_counter on the meta device (attention included: math SDPA backend and
    nn.MultiheadAttention's fused fast path off). GFLOPs = 2 x GMACs, torchvision's convention."""
    weights = weights_enum(arch, weights)
    model, size = meta_model(arch, weights, num_classes, size), size or eval_resolution(weights)
    x = torch.empty(1, 3, size, size, device="meta")
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    macs = counter.get_total_flops() / 2
    result = {
        "params": sum(p.numel() for p in model.parameters()),
        "gmacs": macs / 1e9,
        "gflops": 2 * macs / 1e9,
        "resolution": size,
    }
    if thop:
        result["thop_gmacs"] = thop_gmacs(model, x)
    return result


def thop_gmacs(model: nn.Module, x: torch.Tensor) -> float | None:
    """thop's count, as a cross-check (it counts 0 for attention matmuls); None without thop."""
    try:
        import thop  # here: thop is optional
    except ImportError:
        return None
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():  # thop prints per-module warnings
        macs, _ = thop.profile(model, inputs=(x,), verbose=False)
    return float(macs) / 1e9


def published(weights: WeightsEnum) -> dict:
    """Resolution, interpolation and published accuracy from the weights' metadata."""
    transform = weights.transforms()
    metrics = weights.meta["_metrics"]["ImageNet-1K"]
    # VGG16's IMAGENET1K_FEATURES (a feature extractor, no trained head) publishes NaN: reported as None
    acc1, acc5 = (None if math.isnan(metrics[k]) else metrics[k] for k in ("acc@1", "acc@5"))
    return {
        "resize": transform.resize_size[0],
        "crop": transform.crop_size[0],
        "interpolation": transform.interpolation.value,
        "acc1_published": acc1,
        "acc5_published": acc5,
        "err1_published": None if acc1 is None else round(100 - acc1, 3),
        "err5_published": None if acc5 is None else round(100 - acc5, 3),
        "file_mb": weights.meta.get("_file_size"),
        "quantized_engine": weights.meta.get("backend"),  # int8 weights: fbgemm or qnnpack
    }


def published_deltas(weights: WeightsEnum, record: dict) -> dict:
    """The published top-1/top-5 of `weights` and our difference to them (None where none is published)."""
    pub = published(weights)
    deltas = {"acc1_published": pub["acc1_published"], "acc5_published": pub["acc5_published"]}
    for k in ("acc1", "acc5"):
        deltas[f"{k}_delta"] = None if pub[f"{k}_published"] is None else record[k] - pub[f"{k}_published"]
    return deltas


FAMILIES = (
    "efficientnet_v2",
    "efficientnet",
    "mobilenet_v2",
    "mobilenet_v3",
    "shufflenet_v2",
    "swin_v2",
    "swin",
    "regnet_x",
    "regnet_y",
    "wide_resnet",
    "resnext",
    "resnet",
    "vit",
    "convnext",
    "densenet",
    "vgg",
    "mnasnet",
    "squeezenet",
    "maxvit",
)


def model_family(arch: str) -> str:
    """'resnet50' -> 'resnet', 'efficientnet_v2_s' -> 'efficientnet_v2', every int8 model -> 'int8'
    (for plots and grouping)."""
    return "int8" if is_quantized(arch) else next((f for f in FAMILIES if arch.startswith(f)), arch)


COMPLEXITY_COLUMNS = (
    "model weights params gmacs gflops thop_gmacs resize crop interpolation acc1_published acc5_published "
    "err1_published err5_published file_mb quantized_engine"
).split()


def _count(job: tuple) -> dict:
    arch, weights_name, thop = job
    return complexity(arch, weights_name, thop=thop)


def complexity_records(pairs: list[tuple], thop: bool = True, workers: int | None = None) -> list[dict]:
    """One record per weights enum; architectures shared by several weights at one resolution are counted
    once."""
    keys = {(arch, w): (arch, w.meta["num_params"], w.transforms().crop_size[0]) for arch, w in pairs}
    unique = {}
    for (arch, w), key in keys.items():
        unique.setdefault(key, (arch, str(w), thop))
    jobs = list(unique.items())
    workers = workers or min(len(jobs), available_cores())
    progress = tqdm(total=len(jobs), desc="counting", unit="model", disable=None)
    counts = {}
    if workers > 1:
        gc.collect()  # no garbage for forked workers to collect: a native object in it may hang them (ORT's)
        context = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
        # one thread each: a forked child's first multi-threaded OpenMP region hangs where the parent ran
        # one (GNU OpenMP is not fork-safe); workers x 1 thread fill the cores anyway
        with context.Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for key, result in zip([k for k, _ in jobs], pool.imap(_count, [j for _, j in jobs])):
                counts[key] = result
                progress.update()
    else:
        for key, job in jobs:
            counts[key] = _count(job)
            progress.update()
    progress.close()
    records = []
    for arch, w in pairs:
        c = counts[keys[(arch, w)]]
        records.append(
            {
                "model": arch,
                "weights": str(w),
                "default": w is weights_enum(arch, "DEFAULT"),
                "family": model_family(arch),
                "params": c["params"],
                "gmacs": round(c["gmacs"], 3),
                "gflops": round(c["gflops"], 3),
                "thop_gmacs": round(c["thop_gmacs"], 3) if c.get("thop_gmacs") is not None else None,
                **published(w),
            }
        )
    return records


def run_complexity(args) -> list[dict]:
    pairs = select_weights(args.models, args.weights)
    records = complexity_records(pairs, thop=args.thop)
    out = Path(args.output)
    paths = write_records(records, out, "complexity", COMPLEXITY_COLUMNS)
    plot_acc_vs_gmacs(records, out / "acc_vs_gmacs.png")
    print(paths[0].read_text(), end="")
    print(
        f"wrote {', '.join(map(str, paths))} and {out / 'acc_vs_gmacs'}.{{png,html}} ({len(records)} weights)"
    )
    return records


# ----------------------------------------------------------------------------- evaluation

EVAL_COLUMNS = (
    "model weights dataset corruption severity masked n_images acc1 acc5 real_acc1 real_acc5 loss ece nll "
    "acc1_published acc1_delta acc5_published acc5_delta img_per_s ms_per_batch resize crop interpolation "
    "amp tta decode backend quantized_engine"
).split()


@dataclass
class Sweep:
    """What every row of an evaluation shares: the weights, the images and their labels, where and how
    they are read, and the rows already written."""

    weights: list[Weights]  # in the order they are evaluated
    samples: list  # the images evaluated (--limit applied)
    data_key: dict  # what names the data in a row: dataset, data, images fingerprint, masked, real labels
    mask: torch.Tensor | None  # --mask-classes: the classes the whole set holds
    all_classes: bool  # all of ImageNet-1k's 1000 classes among the whole set's images
    real: list[set[int]] | None  # --real-labels: each image's ReaL labels
    device: torch.device
    workers: int
    decode: str  # cpu | gpu
    backend: str  # pytorch | onnxruntime
    shards: bool  # tar shards: each rank streams its own
    out: Path
    done: list[dict]  # the rows of OUTPUT/eval.json


def plan_sweep(args, device) -> Sweep:
    """The weights the command selects and everything their rows share, each checked before any model runs."""
    selected, backend = selected_weights(args)
    # --mask-classes: the classes of the whole set, whatever --limit keeps
    classes = selected[0].classes
    all_samples = eval_samples(args.data, args.val_labels, classes, args.weights)
    samples = all_samples[: args.limit] if args.limit else all_samples
    shards = is_shard_source(args.data)
    if shards and args.decode == "gpu" and is_main():
        print("note: --decode gpu reads image files; tar shards are decoded on the CPU", file=sys.stderr)
    gpu_decode = not shards and use_gpu_decode(args.decode, device, sys.stderr if is_main() else None)
    real = real_label_sets(samples, load_real_labels(args.real_labels)) if args.real_labels else None
    data_key = {
        "dataset": dataset_name(args.data, args.dataset),
        **corruption(args.data),
        "data": args.data if is_url(args.data) else str(Path(args.data).resolve()),
        "images": images_fingerprint(samples, args.data),
        "masked": args.mask_classes,
        "real_labels": str(Path(args.real_labels).resolve()) if real is not None else None,
    }
    return Sweep(
        weights=selected,
        samples=samples,
        data_key=data_key,
        mask=class_mask(all_samples, len(classes) if classes else 1000) if args.mask_classes else None,
        all_classes=len({s.target for s in all_samples}) == 1000,
        real=real,
        device=device,
        workers=default_workers(device) if args.workers is None else args.workers,
        decode="gpu" if gpu_decode else "cpu",
        backend=backend,
        shards=shards,
        out=Path(args.output),
        done=read_eval_rows(Path(args.output)),
    )


def selected_weights(args) -> tuple[list[Weights], str]:
    """The weights --models and --weights name, read by resolve_weights, and the backend that runs them
    (--backend; ONNX Runtime for an .onnx file). A file names its architecture (a train.py checkpoint, a
    torchvision download, an .onnx file): --models may leave it out; one that contradicts it is refused."""
    if is_weights_file(args.weights) or is_onnx_file(args.weights):
        if len(args.models) != 1 or (args.models != ["*"] and args.models[0] not in ARCHS + QUANTIZED_ARCHS):
            raise UserError(
                f"--weights {args.weights} is one model: leave --models out, or name its one architecture"
            )
        weights = resolve_weights(args.weights, None if args.models == ["*"] else args.models[0])
    else:
        pairs = select_weights(args.models, args.weights, evaluating=True)
        return [resolve_weights(weights, arch) for arch, weights in pairs], args.backend
    if weights.onnx is None:
        return [weights], args.backend
    # export.py's file: its architecture, preprocessing, classes and source weights
    if args.resize or args.crop or args.interpolation:
        raise UserError(f"{args.weights} holds its preprocessing; drop --resize, --crop and --interpolation")
    return [weights], "onnxruntime"


def read_eval_rows(out: Path) -> list[dict]:
    """The rows of OUTPUT/eval.json; rows written before the test-set columns existed are unmasked and
    without ReaL labels."""
    done = json.loads((out / "eval.json").read_text()) if (out / "eval.json").exists() else []
    for row in done:
        defaults = {"dataset": dataset_name(row.get("data", "")), "masked": False, "real_labels": None}
        for key, value in {**defaults, "backend": "pytorch", "tta": "none"}.items():
            row.setdefault(key, value)
    return done


def eval_runtime(args, sweep: Sweep, weights: Weights, preset) -> Runtime:
    """Where and how these weights run: int8 kernels and ONNX Runtime's CPU provider on the CPU in their
    own precision, the rest as --device, --amp and --channels-last say."""
    int8, onnx = is_quantized(weights.arch), sweep.backend == "onnxruntime"
    if int8 and onnx:
        raise UserError(
            f"{weights.arch} runs on PyTorch's int8 kernels; evaluate it without --backend onnxruntime"
        )
    # under torchrun on GPUs the process group is NCCL's, which takes GPU tensors only
    if (int8 or onnx) and is_distributed() and sweep.device.type == "cuda":
        raise UserError(
            f"{weights.arch} runs on the CPU here: evaluate it without torchrun, or with --device cpu"
        )
    if int8 or onnx:
        return Runtime.on_cpu(preset)
    return Runtime.create(sweep.device, args.amp, args.channels_last, False, preset)


def eval_model(args, sweep: Sweep, weights: Weights, preset, runtime: Runtime) -> nn.Module | None:
    """The model to evaluate: the .onnx file in ONNX Runtime; else the weights built in their inference
    form (compiled with --compile), exported once into OUTPUT/onnx/ for --backend onnxruntime. None when
    the exporter can't handle it (the sweep goes on)."""
    if weights.onnx is not None:
        return OnnxRuntimeModel(weights.source)
    model = build_model(weights.arch, weights.source, weights_dir=args.weights_dir).to(runtime.device)
    model = prepare_for_eval(model, channels_last=runtime.channels_last, fuse_bn=args.fuse_bn)
    if sweep.backend != "onnxruntime":
        return torch.compile(model) if args.compile else model
    try:
        return exported_model(model, weights, preset, sweep.out / "onnx")
    except UserError as e:  # one model the exporter can't handle: the sweep goes on
        tqdm.write(f"{weights.source}: skipped: {e}")
        return None


@dataclass
class Evaluated:
    """One set of weights evaluated: the settings that identify its row, the row, evaluate()'s result and
    its per-class results."""

    key: dict
    row: dict
    result: dict
    classes: list[dict]


def evaluate_weights(args, sweep: Sweep, weights: Weights) -> Evaluated | None:
    """Build and evaluate one set of weights, or None when it is skipped (already in eval.json with the
    same data and settings, unless --force; not exportable; out of memory even at batch 1)."""
    preset = weights.preset(args.resize, args.crop, args.interpolation)
    if args.crop and not fits_crop(weights, preset.crop, len(sweep.weights) > 1):
        return None
    runtime = eval_runtime(args, sweep, weights, preset)
    on_cpu = is_quantized(weights.arch) or sweep.backend == "onnxruntime"
    key = {
        "weights": str(weights.source),
        **sweep.data_key,
        "limit": args.limit,
        "resize": preset.resize,
        "crop": preset.crop,
        "interpolation": preset.interpolation,
        "amp": amp_name(runtime.amp_dtype),
        "tta": args.tta,
        "decode": "cpu" if on_cpu else sweep.decode,
        "backend": sweep.backend,
    }
    if not args.force and any(same_row(row, key) for row in sweep.done):
        if is_main():
            tqdm.write(f"{weights.source}: already in {sweep.out / 'eval.json'}, skipped (--force to redo)")
        return None
    model = eval_model(args, sweep, weights, preset, runtime)
    if model is None:
        return None
    loader = eval_batches(args, sweep, preset, runtime, gpu_decode=key["decode"] == "gpu")

    def evaluate_at(batch_size: int) -> dict:
        return evaluate(
            model,
            loader(batch_size),
            runtime,
            skip_bad_images=args.skip_bad_images,
            keep_predictions=True,
            class_mask=sweep.mask,
            tta=args.tta,
            desc=weights.arch,
        )

    result, batch_size = with_smaller_batches(evaluate_at, args.batch_size, runtime.device)
    if result is None:
        tqdm.write(f"{weights.source}: out of memory even at batch 1, skipped")
        return None
    coder = weights.label_coder()
    classes = per_class_accuracy(result["predictions"], coder.wnids or coder.names)
    return Evaluated(key, eval_row(weights, key, result, batch_size, sweep, classes), result, classes)


def fits_crop(weights: Weights, crop: int, sweeping: bool) -> bool:
    """Before the model is built: whether it takes --crop (a ViT's or MaxViT's one size, every architecture's
    minimum). A sweep skips weights that don't, with a line; one weights is an error."""
    try:
        check_input_size(weights.arch, crop, "--crop", weights.built_for)
    except UserError as e:
        if not sweeping:
            raise
        if is_main():
            tqdm.write(f"{weights.source}: skipped: {e}")
        return False
    return True


def eval_batches(args, sweep: Sweep, preset, runtime: Runtime, gpu_decode: bool):
    """batch size -> this rank's loader of the sweep's images: from tar shards, or from image files."""
    pin = runtime.device.type == "cuda"

    def loader(batch_size: int):
        if sweep.shards:
            return shard_eval_loader(
                args.data, sweep.samples, preset, batch_size, sweep.workers, rank(), world_size(), pin
            )
        sampler = EvalSampler(len(sweep.samples), world_size(), rank())
        return eval_loader(
            sweep.samples, preset, batch_size, sweep.workers, runtime.device, gpu_decode, sampler
        )

    return loader


def same_row(row: dict, key: dict) -> bool:
    """A row of these weights with these data and settings."""
    return all(row.get(k) == v for k, v in key.items())


def eval_row(weights: Weights, key: dict, result: dict, batch_size: int, sweep: Sweep, classes) -> dict:
    """The eval.json row of one evaluation: its key, the measurements, the 5 worst of its per-class
    results (classes), and where the row measures what the weights publish, the published numbers."""
    measured = {k: v for k, v in result.items() if k not in ("predictions", "seconds")}
    record = {"model": weights.arch, **key, **measured}
    record["batch_size"] = batch_size  # below --batch-size after an out-of-memory retry
    record["quantized_engine"] = weights.enum.meta.get("backend") if weights.enum is not None else None
    settings_hash = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]  # one file per row
    stem = f"{Path(str(weights.source)).name}_{settings_hash}"
    record.update(predictions=f"predictions/{stem}.csv", per_class=f"per_class/{stem}.csv")
    record["reliability"] = f"reliability/{stem}.png"
    if len(weights.classes or range(1000)) <= 5 or (sweep.mask is not None and sweep.mask.sum() <= 5):
        record["acc5"] = None  # every image's class is among the top 5 of 5 classes or fewer
    record.update(err1=100 - record["acc1"], err5=None if record["acc5"] is None else 100 - record["acc5"])
    worst = sorted(classes, key=lambda c: (c["top1"], -c["n"], c["class"]))[:5]
    record["worst_classes"] = ", ".join(f"{c['class']} ({c['top1']:.1f}%)" for c in worst)
    if sweep.real is not None:
        record.update(real_accuracy(result["predictions"], sweep.real))
    if weights.published is not None and measures_published(weights, record, sweep):
        record.update(published_deltas(weights.published, record))
    return record


def measures_published(weights: Weights, record: dict, sweep: Sweep) -> bool:
    """The published numbers are for all of ImageNet val with the weights' own preprocessing, one pass per
    image: they say nothing on a masked or shifted set, a class subset, a --limit run, another
    --resize/--crop or --tta."""
    own = weights.preset()
    own_preprocessing = (own.resize, own.crop, own.interpolation)
    return (
        not record["masked"]
        and not is_shifted_set(record["dataset"])
        and sweep.all_classes
        and not record["limit"]
        and record["tta"] == "none"
        and (record["resize"], record["crop"], record["interpolation"]) == own_preprocessing
    )


def run_evaluation(args) -> list[dict]:
    """Evaluate the selected weights on --data; every finished row is written at once, and a re-run
    skips rows already evaluated with the same data and settings (unless --force)."""
    device = setup_distributed(args.device)  # under torchrun each rank evaluates its own shard
    torch.backends.cudnn.benchmark = True  # fixed batch shapes: autotuned conv kernels pay off
    try:
        sweep = plan_sweep(args, device)
    except UserError as e:  # every rank plans the same sweep from the same files: rank 0 says it
        raise AgreedError(str(e)) from e
    if is_main():  # what a write cut by a kill left, in the folders rows are written to
        for name in ("", "predictions", "per_class", "reliability"):
            remove_stale_temporaries(sweep.out / name)
    missing = []  # the weights of a sweep whose files are neither here nor downloadable
    for weights in tqdm(sweep.weights, desc="models", unit="model", disable=not is_main() or None):
        try:
            evaluated = evaluate_weights(args, sweep, weights)
        except MissingWeights as e:
            if len(sweep.weights) == 1:
                raise
            missing.append(e)
            if is_main():
                tqdm.write(f"{weights.source}: skipped: its file is not in {e.folder} (nor downloadable)")
            continue
        if evaluated is None:
            continue
        record, result = evaluated.row, evaluated.result
        sweep.done = [row for row in sweep.done if not same_row(row, evaluated.key)] + [record]
        if not is_main():
            continue
        write_predictions(result["predictions"], sweep.out / record["predictions"])
        write_per_class(evaluated.classes, record, sweep.out / record["per_class"])
        write_records(sweep.done, sweep.out, "eval", EVAL_COLUMNS)
        if args.plots:
            plot_reliability(record, sweep.out / record["reliability"])
        top5 = "" if record["acc5"] is None else f"  top-5 {record['acc5']:.3f}%"
        tqdm.write(
            f"{weights.source}: top-1 {record['acc1']:.3f}%{top5}  "
            f"({record['n_images']} images, {record['img_per_s']:.1f} img/s)"
        )
        if record["acc5"] is None:
            tqdm.write("  (no top-5: with 5 classes or fewer every image's class is among the top 5)")
        if result["bad_images"]:
            bad = result["bad_images"]
            tqdm.write(f"skipped {len(bad)} unreadable images:\n  " + "\n  ".join(bad))
    if is_main():
        if sweep.done:
            print(markdown_table(sweep.done, EVAL_COLUMNS), end="")
        if not args.plots:
            plot_best_reliability(sweep)
        report_robustness(sweep, args.clean)
    if missing and is_main():
        print(
            f"skipped {len(missing)} of {len(sweep.weights)} weights: their files are not in "
            f"{missing[0].folder}; download them there (or into --weights-dir DIR) and run the same command "
            "again:\n  " + "\n  ".join(e.url for e in missing)
        )
    if missing and len(missing) == len(sweep.weights):
        raise UserError(f"none of the {len(missing)} selected weights could be loaded; see the list above")
    return sweep.done


def write_per_class(rows: list[dict], record: dict, path: Path) -> None:
    """OUTPUT/per_class/*.csv: class (wnid, or a custom head's folder name), n, top1, top5 (%) of every
    class with images; top5 empty where the row has none (5 classes or fewer)."""
    if record["acc5"] is None:
        rows = [{**row, "top5": None} for row in rows]
    write_csv(rows, path)


def plot_best_reliability(sweep: Sweep) -> None:
    """The reliability diagram of each set's best row (by top-1) among those with calibration bins."""
    best = {}
    for row in sweep.done:
        if row.get("calibration") and row["acc1"] > best.get(row["dataset"], {"acc1": -1})["acc1"]:
            best[row["dataset"]] = row
    for row in best.values():
        plot_reliability(row, sweep.out / row["reliability"])
        name = Path(str(row["weights"])).name
        print(f"wrote {sweep.out / row['reliability']}: {name}'s reliability diagram on {row['dataset']}")


def report_robustness(sweep: Sweep, clean: str) -> None:
    """The robustness report, where rows on shifted sets can be compared with rows on `clean`."""
    written = write_robustness(sweep.done, sweep.out, clean)
    if written:
        print(f"wrote {', '.join(map(str, written))}: each set's top-1 against {clean}'s")
    elif any(is_shifted_set(row["dataset"]) for row in sweep.done) and not any(
        row["dataset"] == clean for row in sweep.done
    ):
        print(
            f"note: no row on '{clean}' in {sweep.out / 'eval.json'} to compare the shifted sets' rows "
            "with, so no robustness report; see --clean"
        )


# ----------------------------------------------------------------------------- the runs and the recipes

RUN_COLUMNS = (
    "model run params gmacs resolution tta epochs finished best_pt acc1 acc5 err1 err5 ema_acc1 "
    "training_hours gpu world_size"
).split()


def collect_runs(runs_dir, out) -> list[dict]:
    """One row per train.py run (its best epoch), written to OUTPUT/our_training.{md,csv,json}. --dummy
    runs (throughput on synthetic images) and --limit runs are left out, with a note; a run stopped early
    says so (finished: 7/20)."""
    if not Path(runs_dir).is_dir():
        raise UserError(
            f"runs folder {runs_dir} does not exist; pass the --output folder of train.py (checkpoints)"
        )
    records, quick = [], []
    for metrics in sorted(Path(runs_dir).glob("*/metrics.csv")):
        run = metrics.parent
        config = (
            yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else None
        )
        rows = list(csv.DictReader(metrics.read_text().splitlines()))
        if not isinstance(config, dict) or not rows:
            print(f"note: {run} is left out: it has no config.yaml or no finished epoch in metrics.csv")
            continue
        if config.get("dummy") or config.get("limit"):  # throughput runs and quick checks are no results
            quick.append(run.name)
            continue
        info = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
        # the epoch best.pt was last written at, and its weights (train.best_weights); a run from before
        # best_pt existed: the model's best epoch
        saved = [row for row in rows if row.get("best_pt")]
        best = saved[-1] if saved else max(rows, key=lambda row: float(row["val_acc1"]))
        held = best.get("best_pt") or "model"
        size = config["val_crop_size"]
        num_classes = len(info.get("classes", [])) or config["num_classes"]
        count = complexity(config["arch"], size=size, num_classes=num_classes)
        prefix = "ema" if held == "ema" else "val"
        acc1, acc5 = float(best[f"{prefix}_acc1"]), float(best[f"{prefix}_acc5"])
        finished = "yes" if len(rows) >= config["epochs"] else f"{len(rows)}/{config['epochs']}"
        records.append(
            {
                "model": config["arch"],
                "run": run.name,
                "params": count["params"],
                "gmacs": round(count["gmacs"], 3),
                "resolution": f"{size} x {size}",
                "tta": config.get("val_tta", "none"),  # --val-tta flip: its top-1 is of two passes
                "epochs": len(rows),
                "finished": finished,
                "best_pt": f"{held}, epoch {best['epoch']}",
                "acc1": acc1,
                "acc5": acc5,
                "err1": 100 - acc1,
                "err5": 100 - acc5,
                "ema_acc1": float(best["ema_acc1"]) if best.get("ema_acc1") else None,
                "training_hours": sum(float(row["epoch_time_s"]) for row in rows) / 3600,
                "gpu": info.get("gpu") or "cpu",
                "world_size": info.get("world_size"),
            }
        )
    if quick:
        print(f"note: left out as quick checks, not results (--dummy or --limit): {', '.join(quick)}")
    if not records:
        raise UserError(f"no finished runs (*/metrics.csv of a run with real data) in {runs_dir}")
    paths = write_records(records, out, "our_training", RUN_COLUMNS)
    print(paths[0].read_text(), end="")
    return records


def run_speed(args) -> list[dict]:
    """--speed: speed.speed_sweep over the selected weights (all of them by default, int8 included)."""
    if is_distributed():
        raise UserError("--speed measures one process's device: run it without torchrun")
    device = resolve_device(args.device)
    settings = SpeedSettings(
        device=device,
        amp=amp_dtype(args.amp, device, training=False),
        channels_last=use_channels_last(args.channels_last, device, training=False),
        compile=args.compile,
        backend=args.backend,
        batch_size=args.batch_size,
        train=args.speed == "train",
        seconds=args.speed_seconds,
    )
    selected = []
    for arch, weights in select_weights(args.models, args.weights):
        pub = published(weights)
        described = {
            "crop": pub["crop"],
            "family": model_family(arch),
            "default": weights == weights_enum(arch, "DEFAULT"),
            "acc1_published": pub["acc1_published"],
            "acc5_published": pub["acc5_published"],
        }
        selected.append((arch, weights, described))
    return speed_sweep(selected, settings, Path(args.output), force=args.force)


def write_recipes(out) -> Path:
    """OUTPUT/recipes.md (docs/recipes.md with --output docs): the training command of all of torchvision's
    weights."""
    path = Path(out) / "recipes.md"
    atomic_write_text(path, recipes_table())
    print(f"wrote {path}")
    return path


@cli
def main(argv=None):
    args = parse_args(argv)
    if args.runs:
        return collect_runs(args.runs, args.output)
    if args.recipes:
        return write_recipes(args.output)
    if args.speed:
        return run_speed(args)
    if args.data:
        try:
            return run_evaluation(args)
        finally:
            cleanup_distributed()
    if is_weights_file(args.weights) or is_onnx_file(args.weights):
        raise UserError(
            f"--weights {args.weights} is a file: pass --data DIR to evaluate it (without --data, "
            "test_torchvision.py counts the parameters and FLOPs of torchvision's weights)"
        )
    return run_complexity(args)


if __name__ == "__main__":
    main()
