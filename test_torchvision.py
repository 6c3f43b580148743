"""Benchmark torchvision's pretrained ImageNet classifiers.

Complexity of every weights enum (no data, no download; the repo's main job):
    python test_torchvision.py                                  # -> results/complexity.{md,csv,json}, acc_vs_gmacs.png
    python test_torchvision.py --models 'resnet*' --weights default
Accuracy on the ImageNet validation set (see README "Preparing ImageNet"):
    python test_torchvision.py --data /data/imagenet/val --models resnet50 vit_b_16
"""
import argparse
import fnmatch
import math
import multiprocessing
import os
import sys
from pathlib import Path

from tqdm import tqdm

from model import ARCHS, all_weights, complexity, model_family, resolve_weights
from utils import UserError, cli, closest, write_records

COMPLEXITY_COLUMNS = ["model", "weights", "params", "gmacs", "gflops", "thop_gmacs", "resize", "crop",
                      "interpolation", "acc1_published", "acc5_published", "err1_published", "err5_published",
                      "file_mb"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["*"], help="names or globs, e.g. resnet50 'vit_*' (default: all)")
    p.add_argument("--weights", default=None,
                   help="default | all | a weights name such as IMAGENET1K_V2 or a .pth file "
                        "(default: all without --data, default with it)")
    p.add_argument("--out", default="results", help="folder for the tables, plot and predictions")
    p.add_argument("--no-thop", action="store_true", help="skip thop's cross-check column")
    p.add_argument("--data", help="ImageNet validation folder (or its root): evaluate instead of counting")
    args = p.parse_args(argv)
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


def plot_acc_vs_gmacs(records: list[dict], path: Path) -> None:
    """Published acc@1 against GMACs (log x), one colour per model family, every point labelled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    families = sorted({r["family"] for r in records})
    colours = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(16, 10))
    for i, family in enumerate(families):
        rows = [r for r in records if r["family"] == family and r["acc1_published"] is not None]
        ax.scatter([r["gmacs"] for r in rows], [r["acc1_published"] for r in rows], s=18,
                   color=colours(i % 20), marker="o" if i < 20 else "s", label=family)
        for r in rows:
            label = r["model"] + ("" if r["weights"].endswith("IMAGENET1K_V1") else "." + r["weights"].split(".")[1])
            ax.annotate(label, (r["gmacs"], r["acc1_published"]), fontsize=5, xytext=(2, 2),
                        textcoords="offset points")
    ax.set(xscale="log", xlabel="GMACs at the weights' eval resolution (log scale)", ylabel="published top-1 (%)",
           title="torchvision ImageNet-1K weights: accuracy vs compute")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=150)
    plt.close(fig)
    os.replace(tmp, path)


def run_complexity(args) -> list[dict]:
    pairs = select_weights(args.models, args.weights)
    records = complexity_records(pairs, thop=not args.no_thop)
    out = Path(args.out)
    paths = write_records(records, out, "complexity", COMPLEXITY_COLUMNS)
    plot_acc_vs_gmacs(records, out / "acc_vs_gmacs.png")
    print(open(paths[0]).read(), end="")
    print(f"wrote {', '.join(map(str, paths))} and {out / 'acc_vs_gmacs.png'} ({len(records)} weights)")
    return records


@cli
def main(argv=None):
    args = parse_args(argv)
    if args.data:
        from evaluate import run_evaluation
        return run_evaluation(args)
    return run_complexity(args)


if __name__ == "__main__":
    main()
