"""Does train.py learn as well as the scripts people trust? train.py, a textbook PyTorch loop and
torchvision's own references/classification/train.py, trained with the same settings on scikit-learn's
digits (1,797 8x8 images of 10 classes, upscaled to 32 px and written as class folders by this command),
over many seeds, interleaved: each run's best and final val top-1, then per trainer the mean and spread,
and for train.py against each other trainer the difference of the means with its 95% confidence interval
(Welch) and the ratio of the variances with its permutation p-value.

    python fidelity.py --setting v1 --seeds 20 --reference ~/vision-0.21.0/references/classification
    python fidelity.py --setting v2 --seeds 10 --reference ~/vision-0.21.0/references/classification
    python fidelity.py --setting v1 --seeds 20 --trainers ours,plain          # without the reference
    python fidelity.py --setting v1 --seeds 10 --trainers ours,ours_accum     # batch 64 against 16 x 4
    python fidelity.py --report --output docs                                 # docs/fidelity.md again

Runs are resumable: OUTPUT/fidelity.json keeps every finished run, a re-run adds the missing seeds, and
OUTPUT/fidelity.md is the table of all of them. torchvision's reference script is not part of this repo
and nothing of it is copied here: pass the references/classification folder of a torchvision source tree
(Debian's `apt-get source pytorch-vision` holds v0.21.0 whole; it runs unmodified on torchvision 0.29).
It has no --seed, so each of its runs starts with torch's, numpy's and Python's global RNG seeded.
"""

import hashlib
import json
import math
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, default_collate
from torchvision import datasets
from torchvision import transforms as T
from torchvision.transforms import v2

from report import markdown_table
from utils import ArgumentParser, UserError, atomic_write_text, cli, machine_info, positive_int

ROOT = Path(__file__).resolve().parent
# ours: train.py with the references' flags; ours_drop_last: with its own default of dropping each epoch's
# last partial batch (the one difference fidelity.py found: docs/fidelity.md); ours_accum: as ours, with a
# quarter of the batch and 4 batches accumulated into each optimizer step (the same global batch); ours_ddp:
# as ours, on 4 torchrun processes of a quarter of the batch each (what ours_accum stands in for)
TRAINERS = ("ours", "ours_drop_last", "ours_accum", "ours_ddp", "plain", "reference")
OURS = ("ours", "ours_drop_last", "ours_accum", "ours_ddp")
ACCUM = 4  # ours_accum's accumulation steps, ours_ddp's processes
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as every trainer here normalises


@dataclass(frozen=True)
class Setting:
    """One training setting, as each trainer spells it. resnet18 from scratch at 32 px, SGD (momentum
    0.9), train crop RandomResizedCrop + flip (the references' preset), val resize 32 + center crop 32."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    norm_weight_decay: float | None = None  # None: weight_decay for BatchNorm too
    label_smoothing: float = 0.0
    auto_augment: str | None = None  # ta_wide: TrivialAugmentWide
    random_erase: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    cosine: bool = False  # else a constant lr (the V1 recipe's StepLR, whose first step is at epoch 30)
    warmup_epochs: int = 0  # linear, from 0.01 x lr


SETTINGS = {
    # the V1 recipe's optimizer and augmentation, shortened (a textbook run; the earlier runs)
    "v1": Setting(epochs=5, batch_size=64, lr=0.05, weight_decay=1e-4),
    # the V2 recipe shortened: TrivialAugmentWide, RandomErasing, MixUp/CutMix, label smoothing, cosine
    # with a linear warmup, no weight decay on BatchNorm; no EMA, no repeated augmentation, no FixRes
    "v2": Setting(
        epochs=12,
        batch_size=32,
        lr=0.05,
        weight_decay=2e-5,
        norm_weight_decay=0.0,
        label_smoothing=0.1,
        auto_augment="ta_wide",
        random_erase=0.1,
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        cosine=True,
        warmup_epochs=1,
    ),
}
SIZE = 32


# ----------------------------------------------------------------------------- the data


def write_digits(root: Path) -> Path:
    """scikit-learn's digits as root/{train,val}/<digit>/<n>.png, 32 px RGB; every fifth image of each
    class is val (1,442 train, 355 val). Written once; the folder is reused."""
    if (root / "val" / "9").is_dir():
        return root
    try:
        from sklearn.datasets import load_digits  # here: only this command needs scikit-learn (~1 s)
    except ImportError as e:
        raise UserError("fidelity.py needs scikit-learn for its data: pip install scikit-learn") from e
    digits = load_digits()
    seen: dict[int, int] = {}
    for i, (pixels, target) in enumerate(zip(digits.images, digits.target)):
        count = seen.get(int(target), 0)
        seen[int(target)] = count + 1
        split = "val" if count % 5 == 4 else "train"
        image = Image.fromarray((pixels / 16 * 255).round().astype(np.uint8))  # 0..16 -> 0..255
        path = root / split / str(target) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.resize((SIZE, SIZE), Image.BILINEAR).convert("RGB").save(path)
    return root


def environment(data: Path) -> dict:
    """What a run's numbers depend on besides its seed and settings: the CPU and its instruction set (its
    float kernels sum in another order on another one, and a seed then gives other results), the threads,
    the libraries and the data's bytes. The runs of a setting compare only within one environment."""
    digest = hashlib.sha256()
    for path in sorted(data.rglob("*.png")):
        digest.update(path.relative_to(data).as_posix().encode() + path.read_bytes())
    machine = machine_info()
    return {
        "cpu": machine["cpu"],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": machine["threads"],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pillow": PIL.__version__,
        "data_sha256": digest.hexdigest()[:16],
    }


def describe_environment(env: dict | None) -> str:
    if env is None:
        return "not recorded (runs from before fidelity.py recorded it)"
    return (
        f"{env['cpu']} ({env['cpu_capability']}, {env['threads']} threads), torch {env['torch']}, "
        f"torchvision {env['torchvision']}, Pillow {env['pillow']}, data sha256 {env['data_sha256']}"
    )


def check_same_environment(rows: list[dict], setting: str, env: dict, path: Path) -> None:
    """A setting's runs from another environment would not compare with this one's: refused."""
    others = [r.get("environment") for r in rows if r["setting"] == setting and r.get("environment") != env]
    if others:
        raise UserError(
            f"{path} holds {setting} runs of another environment, {describe_environment(others[0])}; this "
            f"one is {describe_environment(env)}, and a seed gives other results in each: pass another "
            "--output for this machine's runs"
        )


# ----------------------------------------------------------------------------- the three trainers


def ours_command(setting: Setting, data: Path, seed: int, out: Path, variant: str = "ours") -> list[str]:
    """train.py's command line for the setting, as one of OURS runs it."""
    batch, accum = setting.batch_size, 1
    if variant == "ours_accum":
        batch, accum = setting.batch_size // ACCUM, ACCUM
    if variant == "ours_ddp":
        batch = setting.batch_size // ACCUM
    args = [
        *("--data", data, "--arch", "resnet18", "--seed", seed, "--output", out, "--run-name", "run"),
        *("--epochs", setting.epochs, "--batch-size", batch, "--accum-steps", accum, "--lr", setting.lr),
        *(
            "--momentum",
            0.9,
            "--weight-decay",
            setting.weight_decay,
            "--label-smoothing",
            setting.label_smoothing,
        ),
        *("--train-preset", "standard", "--train-crop-size", SIZE, "--val-resize-size", SIZE),
        *("--val-crop-size", SIZE, "--auto-augment", setting.auto_augment or "none"),
        *("--random-erase", setting.random_erase, "--mixup-alpha", setting.mixup_alpha),
        *("--cutmix-alpha", setting.cutmix_alpha, "--workers", 0, "--device", "cpu", "--no-ra-sampler"),
        # the references train on each epoch's last partial batch too
        "--drop-last" if variant == "ours_drop_last" else "--no-drop-last",
    ]
    if setting.norm_weight_decay is not None:
        args += ["--norm-weight-decay", setting.norm_weight_decay]
    if setting.cosine:
        args += ["--scheduler", "cosine"]
    else:
        args += ["--scheduler", "step", "--step-size", 30]
    if setting.warmup_epochs:
        args += [
            "--warmup-epochs",
            setting.warmup_epochs,
            "--warmup-method",
            "linear",
            "--warmup-factor",
            0.01,
        ]
    if variant == "ours_ddp":
        torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ACCUM}"]
        return [sys.executable, *torchrun, str(ROOT / "train.py"), *map(str, args)]
    return [sys.executable, str(ROOT / "train.py"), *map(str, args)]


def run_ours(setting: Setting, data: Path, seed: int, work: Path, variant: str = "ours") -> list[float]:
    """Val top-1 per epoch of a train.py run (its metrics.csv)."""
    command = ours_command(setting, data, seed, work, variant)
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode != 0:
        raise UserError(f"train.py failed: {finished.stderr.strip().splitlines()[-1:]}")
    lines = (work / "run" / "metrics.csv").read_text().splitlines()
    column = lines[0].split(",").index("val_acc1")
    return [float(line.split(",")[column]) for line in lines[1:]]


def reference_command(setting: Setting, data: Path, seed: int) -> list[str]:
    """torchvision's references/classification/train.py for the setting (run from its folder)."""
    args = [
        *("--data-path", data, "--model", "resnet18", "--device", "cpu", "-j", 0, "--output-dir", ""),
        *("--epochs", setting.epochs, "-b", setting.batch_size, "--lr", setting.lr, "--momentum", 0.9),
        *("--wd", setting.weight_decay, "--label-smoothing", setting.label_smoothing),
        *("--train-crop-size", SIZE, "--val-resize-size", SIZE, "--val-crop-size", SIZE),
        *("--random-erase", setting.random_erase, "--mixup-alpha", setting.mixup_alpha),
        *("--cutmix-alpha", setting.cutmix_alpha, "--print-freq", 1000),
    ]
    if setting.norm_weight_decay is not None:
        args += ["--norm-weight-decay", setting.norm_weight_decay]
    if setting.auto_augment:
        args += ["--auto-augment", setting.auto_augment]
    if setting.cosine:
        args += ["--lr-scheduler", "cosineannealinglr"]
    if setting.warmup_epochs:
        args += ["--lr-warmup-epochs", setting.warmup_epochs, "--lr-warmup-method", "linear"]
    # the script runs unmodified; only the global RNGs are seeded before it starts
    start = (
        "import random, runpy, sys, numpy, torch; "
        f"random.seed({seed}); numpy.random.seed({seed}); torch.manual_seed({seed}); "
        "sys.path.insert(0, '.'); sys.argv = ['train.py', *sys.argv[1:]]; "
        "runpy.run_path('train.py', run_name='__main__')"
    )
    return [sys.executable, "-c", start, *map(str, args)]


REFERENCE_TOP1 = re.compile(r"^Test: +Acc@1 ([0-9.]+)", re.MULTILINE)  # its evaluate()'s summary line


def run_reference(setting: Setting, data: Path, seed: int, folder: Path) -> list[float]:
    """Val top-1 per epoch of a reference run (its printed summary lines)."""
    if not (folder / "train.py").is_file() or not (folder / "presets.py").is_file():
        raise UserError(
            f"--reference {folder} is not torchvision's references/classification folder (train.py, "
            "presets.py); see fidelity.py's docstring for where to get it"
        )
    command = reference_command(setting, data, seed)
    finished = subprocess.run(command, cwd=folder, capture_output=True, text=True)
    top1 = [float(value) for value in REFERENCE_TOP1.findall(finished.stdout)]
    if finished.returncode != 0 or len(top1) != setting.epochs:
        last = (finished.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"the reference script failed in {folder}: {last}")
    return top1


def run_plain(setting: Setting, data: Path, seed: int, work: Path) -> list[float]:
    """Val top-1 per epoch of a textbook PyTorch loop: ImageFolder, torchvision's transforms, MixUp/CutMix
    in the collate function, SGD, the schedule stepped per epoch, nothing of this repo."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    train_steps = [T.RandomResizedCrop(SIZE, antialias=True), T.RandomHorizontalFlip()]
    if setting.auto_augment == "ta_wide":
        train_steps.append(T.TrivialAugmentWide())
    train_steps += [T.PILToTensor(), T.ConvertImageDtype(torch.float), T.Normalize(MEAN, STD)]
    if setting.random_erase:
        train_steps.append(T.RandomErasing(setting.random_erase))
    val_steps = [T.Resize(SIZE, antialias=True), T.CenterCrop(SIZE), T.PILToTensor()]
    val_steps += [T.ConvertImageDtype(torch.float), T.Normalize(MEAN, STD)]
    train_set = datasets.ImageFolder(data / "train", T.Compose(train_steps))
    val_set = datasets.ImageFolder(data / "val", T.Compose(val_steps))
    classes = len(train_set.classes)
    mixes = [v2.MixUp(alpha=setting.mixup_alpha, num_classes=classes)] if setting.mixup_alpha else []
    mixes += [v2.CutMix(alpha=setting.cutmix_alpha, num_classes=classes)] if setting.cutmix_alpha else []
    mix = v2.RandomChoice(mixes) if mixes else None

    def collate(batch):
        return mix(*default_collate(batch)) if mix else default_collate(batch)

    train_loader = DataLoader(train_set, setting.batch_size, shuffle=True, collate_fn=collate)
    val_loader = DataLoader(val_set, setting.batch_size)
    model = torchvision.models.resnet18(num_classes=classes)
    norm = [p for m in model.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    others = [p for p in model.parameters() if all(p is not q for q in norm)]
    norm_decay = setting.weight_decay if setting.norm_weight_decay is None else setting.norm_weight_decay
    groups = [{"params": others}, {"params": norm, "weight_decay": norm_decay}]
    optimizer = torch.optim.SGD(groups, lr=setting.lr, momentum=0.9, weight_decay=setting.weight_decay)
    warmup = setting.warmup_epochs
    if setting.cosine:
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=setting.epochs - warmup)
    else:
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30)
    if warmup:
        first = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=warmup)
        schedule = torch.optim.lr_scheduler.SequentialLR(optimizer, [first, schedule], milestones=[warmup])
    criterion = nn.CrossEntropyLoss(label_smoothing=setting.label_smoothing)
    top1 = []
    for _ in range(setting.epochs):
        model.train()
        for images, targets in train_loader:
            loss = criterion(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
        model.eval()
        correct = 0
        with torch.inference_mode():
            for images, targets in val_loader:
                correct += (model(images).argmax(1) == targets).sum().item()
        top1.append(100 * correct / len(val_set))
    return top1


# ----------------------------------------------------------------------------- the comparison


def run_all(args) -> list[dict]:
    """Every missing (setting, seed, trainer) run, seeds in turn and the trainers interleaved within each
    seed (a slower machine later in the session slows every trainer alike); each row written at once."""
    out = Path(args.output)
    rows = read_rows(out)
    data = write_digits(Path(args.data))
    trainers = [t.strip() for t in args.trainers.split(",")]
    unknown = sorted(set(trainers) - set(TRAINERS))
    if unknown:
        raise UserError(f"unknown trainer {unknown[0]}; choose among {', '.join(TRAINERS)}")
    if "reference" in trainers and not args.reference:
        raise UserError(
            "--trainers reference needs --reference DIR (torchvision's references/classification)"
        )
    setting, env = SETTINGS[args.setting], environment(data)
    check_same_environment(rows, args.setting, env, out / "fidelity.json")
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for trainer in trainers:
            if any(
                r["setting"] == args.setting and r["seed"] == seed and r["trainer"] == trainer for r in rows
            ):
                continue
            start = time.perf_counter()
            with tempfile.TemporaryDirectory() as work:
                if trainer in OURS:
                    top1 = run_ours(setting, data, seed, Path(work), trainer)
                elif trainer == "reference":
                    top1 = run_reference(setting, data, seed, Path(args.reference).expanduser())
                else:
                    top1 = run_plain(setting, data, seed, Path(work))
            row = {
                "setting": args.setting,
                "trainer": trainer,
                "seed": seed,
                "best_acc1": max(top1),
                "final_acc1": top1[-1],
                "acc1_per_epoch": top1,
                "seconds": round(time.perf_counter() - start, 1),
                "environment": env,
            }
            rows.append(row)
            print(
                f"{args.setting} seed {seed} {trainer}: best {max(top1):.2f}, final {top1[-1]:.2f} "
                f"({row['seconds']} s)"
            )
            atomic_write_text(out / "fidelity.json", json.dumps(rows, indent=1) + "\n")
    return rows


def read_rows(out: Path) -> list[dict]:
    path = out / "fidelity.json"
    return json.loads(path.read_text()) if path.is_file() else []


def variance_ratio_p(a: np.ndarray, b: np.ndarray, permutations: int = 10_000) -> float:
    """Two-sided permutation p-value of var(a) / var(b): the groups' deviations from their own means,
    pooled and dealt out again (so a difference of the means does not count as one of spreads)."""
    if a.var(ddof=1) == 0 or b.var(ddof=1) == 0:  # a trainer that ends every run alike: no ratio
        return math.nan
    deviations = np.concatenate([a - a.mean(), b - b.mean()])
    observed = abs(math.log(a.var(ddof=1) / b.var(ddof=1)))
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(permutations):
        shuffled = rng.permutation(deviations)
        ratio = shuffled[: len(a)].var(ddof=1) / shuffled[len(a) :].var(ddof=1)
        hits += ratio > 0 and abs(math.log(ratio)) >= observed - 1e-12
    return (hits + 1) / (permutations + 1)


def summary(rows: list[dict], setting: str) -> tuple[list[dict], list[dict]]:
    """(per trainer: n, mean and standard deviation of the best and final top-1; train.py against each
    other trainer: the difference of the means with its 95% Welch interval, the ratio of the variances
    and its permutation p-value), for one setting."""
    by_trainer = {
        t: {
            m: np.array([r[m] for r in rows if r["setting"] == setting and r["trainer"] == t])
            for m in ("best_acc1", "final_acc1")
        }
        for t in TRAINERS
    }
    per_trainer = [
        {
            "trainer": t,
            "n": len(values["final_acc1"]),
            **{f"{m}_mean": values[m].mean() for m in values},
            **{f"{m}_sd": values[m].std(ddof=1) for m in values},
        }
        for t, values in by_trainer.items()
        if len(values["final_acc1"]) >= 2
    ]
    differences = []
    pairs = [(ours, other) for ours in ("ours", "ours_drop_last") for other in ("plain", "reference")]
    # the same global batch, accumulated or on 4 processes: BatchNorm's statistics of a quarter of it
    pairs += [("ours_accum", "ours"), ("ours_accum", "ours_ddp"), ("ours_ddp", "ours")]
    for name, other in pairs:
        if len(by_trainer[name]["final_acc1"]) < 2 or len(by_trainer[other]["final_acc1"]) < 2:
            continue
        for metric in ("final_acc1", "best_acc1"):
            ours, theirs = by_trainer[name][metric], by_trainer[other][metric]
            test = stats.ttest_ind(ours, theirs, equal_var=False)
            low, high = test.confidence_interval(0.95)
            differences.append(
                {
                    "comparison": f"{name} - {other}",
                    "metric": metric,
                    "difference": ours.mean() - theirs.mean(),
                    "ci95_low": low,
                    "ci95_high": high,
                    "welch_p": test.pvalue,
                    "variance_ratio": ours.var(ddof=1) / theirs.var(ddof=1) if theirs.var() > 0 else math.nan,
                    "variance_ratio_p": variance_ratio_p(ours, theirs),
                }
            )
    return per_trainer, differences


def write_report(rows: list[dict], out: Path) -> Path:
    """OUTPUT/fidelity.md: per setting its flags, each seed's runs, the per-trainer summary and the
    differences; the environment its runs come from."""
    lines = [
        "# Training fidelity: train.py, a plain loop and torchvision's reference script",
        "",
        "Written by `python fidelity.py` (its docstring has the commands): resnet18 from scratch on",
        "scikit-learn's digits at 32 px (1,442 train, 355 val images), every trainer with the same settings;",
        "top-1 in percent. The runs of a setting come from one environment (CPU, threads, libraries, data),",
        "named under its heading: a seed gives other results on another CPU, so runs compare within one.",
        "",
        "`ours` is train.py with the references' flags (`--no-drop-last`, as the recipe configs set it);",
        "`ours_drop_last` is train.py with its own default of dropping each epoch's last partial batch,",
        "which here holds 2 images in v2 (1,442 = 45 x 32 + 2) and 34 in v1 (22 x 64 + 34): that last",
        "batch of the references updates BatchNorm's running statistics just before each validation.",
        f"`ours_accum` is `ours` with a quarter of the batch and `--accum-steps {ACCUM}`: the same global",
        "batch, with BatchNorm's statistics of the smaller batches; `ours_ddp` is `ours` on 4 torchrun",
        "processes of a quarter of the batch each, which accumulation stands in for.",
        "`plain` is a textbook loop (fidelity.run_plain); `reference` is torchvision's",
        "references/classification/train.py v0.21.0, unmodified. The interval is Welch's 95% interval of",
        "the difference of the means; the variance ratio's p-value is a permutation test of the",
        "deviations from each trainer's mean.",
        "",
    ]
    for name in sorted({r["setting"] for r in rows}):
        setting = asdict(SETTINGS[name])
        lines += [f"## Setting {name}", "", "`" + ", ".join(f"{k}={v}" for k, v in setting.items()) + "`", ""]
        env = next(r.get("environment") for r in rows if r["setting"] == name)
        lines += [f"Environment: {describe_environment(env)}.", ""]
        seeds = sorted({r["seed"] for r in rows if r["setting"] == name})
        table = []
        for seed in seeds:
            row = {"seed": seed}
            for r in rows:
                if r["setting"] == name and r["seed"] == seed:
                    row.update(
                        {f"{r['trainer']} best": r["best_acc1"], f"{r['trainer']} final": r["final_acc1"]}
                    )
            table.append(row)
        columns = [
            "seed",
            *(f"{t} {m}" for t in TRAINERS for m in ("best", "final") if any(f"{t} {m}" in r for r in table)),
        ]
        per_trainer, differences = summary(rows, name)
        lines += [markdown_table(table, columns), ""]
        lines += [markdown_table(per_trainer, list(per_trainer[0])) if per_trainer else "", ""]
        if differences:
            lines += [markdown_table(differences, list(differences[0])), ""]
    path = out / "fidelity.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument(
        "--setting", choices=sorted(SETTINGS), default="v1", help="what every trainer runs (default: v1)"
    )
    p.add_argument("--seeds", type=positive_int, default=20, help="runs of each trainer (default: 20)")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed (default: 0)")
    p.add_argument(
        "--trainers",
        default="ours,plain,reference",
        help=f"any of {', '.join(TRAINERS)} (default: %(default)s)",
    )
    p.add_argument("--reference", help="torchvision's references/classification folder (v0.21.0)")
    p.add_argument("--data", default="results/digits", help="where the digits' class folders go")
    p.add_argument("--output", default="results/fidelity", help="fidelity.json and fidelity.md go here")
    p.add_argument("--report", action="store_true", help="only write fidelity.md from fidelity.json")
    return p


@cli
def main(argv=None) -> list[dict]:
    args = build_parser().parse_args(argv)
    rows = read_rows(Path(args.output)) if args.report else run_all(args)
    if not rows:
        raise UserError(
            f"no runs in {Path(args.output) / 'fidelity.json'}; run fidelity.py without --report first"
        )
    path = write_report(rows, Path(args.output))
    print(path.read_text(), end="")
    return rows


if __name__ == "__main__":
    main()
