"""What runs write: result tables (markdown/CSV/JSON), run folders with their config, run info,
metrics.csv and TensorBoard events, the "our training" table, and benchmark.py's report (figures:
plots.py). Every file is written atomically."""

import csv
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from utils import UserError, atomic_write_text, world_size


def format_cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def markdown_table(records: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(format_cell(r.get(c)) for c in columns) + " |" for r in records]
    return "\n".join(lines) + "\n"


def write_records(records: list[dict], out_dir, stem: str, columns: list[str]) -> list[Path]:
    """OUT/stem.md (the given columns), OUT/stem.csv and OUT/stem.json (every key), each atomically."""
    out_dir = Path(out_dir)
    keys = list(dict.fromkeys(k for r in records for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    paths = [out_dir / f"{stem}.md", out_dir / f"{stem}.csv", out_dir / f"{stem}.json"]
    atomic_write_text(paths[0], markdown_table(records, columns))
    atomic_write_text(paths[1], buffer.getvalue())
    atomic_write_text(paths[2], json.dumps(records, indent=1) + "\n")
    return paths


def write_metrics(history: list[dict], run_dir, tensorboard=None) -> None:
    """metrics.csv (one row per epoch, rewritten whole) and the last row as TensorBoard scalars."""
    if tensorboard is not None and history:
        for key, value in history[-1].items():
            tensorboard.add_scalar(key, value, history[-1]["epoch"])
        tensorboard.flush()
    if not history:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[-1]), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(Path(run_dir) / "metrics.csv", buffer.getvalue())


# ----------------------------------------------------------------------------- run folders


def choose_run_dir(output, run_name: str, arch: str, resume: str) -> tuple[Path, Path | None]:
    """(run dir, checkpoint to resume from). A run never reuses another run's dir without --resume."""
    output = Path(output)
    if resume and resume != "auto":
        return (output / run_name if run_name else Path(resume).parent), Path(resume)
    if resume == "auto":
        return _run_to_resume(output, run_name, arch)
    if run_name:
        run_dir = output / run_name
        if (run_dir / "last.pt").exists() or (run_dir / "best.pt").exists():
            raise UserError(
                f"run dir {run_dir} already exists; continue it with --resume auto or choose another --run-name"
            )
        if run_dir.exists() and any(run_dir.iterdir()):  # no checkpoint: a start that failed, or --dummy
            print(f"note: {run_dir} holds no checkpoint (a run that never saved one); starting afresh in it")
        return run_dir, None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = output / f"{arch}-{stamp}", 1
    while run_dir.exists():
        n += 1
        run_dir = output / f"{arch}-{stamp}-{n}"
    return run_dir, None


def _run_to_resume(output: Path, run_name: str, arch: str) -> tuple[Path, Path]:
    """--resume auto: the named run, else the newest run of this architecture, with a last.pt."""
    if run_name:
        candidates = [output / run_name]
    else:
        candidates = sorted(output.glob(f"{arch}-*"), key=lambda d: _mtime(d / "last.pt"), reverse=True)
    found = [d for d in candidates if (d / "last.pt").is_file()]
    if not found:
        where = output / run_name if run_name else f"{output}/{arch}-*"
        raise UserError(
            f"--resume auto found nothing to resume: no last.pt in {where}; start a new run without --resume"
        )
    return found[0], found[0] / "last.pt"


def _mtime(path: Path) -> float:
    return path.stat().st_mtime if path.exists() else 0.0


def machine_info(device=None) -> dict:
    """The CPU, GPU, cores, threads and library versions of this process (run.json, benchmark results)."""
    import torch
    import torchvision

    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(device) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": cores,
        "gpu": gpu,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device) if device is not None else None,
        "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "GOMP_"))},  # thread settings
    }


def busy_seconds() -> tuple[float, float] | None:
    """(CPU seconds all processes used, CPU seconds this one and its finished workers used), from /proc/stat."""
    if not Path("/proc/stat").exists():
        return None
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    own = os.times()
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), own[0] + own[1] + own[2] + own[3]


def run_info(seed: int) -> dict:
    """Git commit, command line, seed, world size and machine_info, saved next to every run's checkpoints."""
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "git_commit": commit,
        "seed": seed,
        "command": " ".join(sys.argv),
        "world_size": world_size(),
        **machine_info(),
    }


def write_run_files(run_dir: Path, config: dict, classes: list[str]) -> None:
    """A new run's config.yaml (the resolved config) and run.json (run_info and the class names)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(run_dir, config)
    atomic_write_text(run_dir / "run.json", json.dumps({**run_info(config["seed"]), "classes": classes}, indent=1))


def write_run_config(run_dir: Path, config: dict) -> None:
    """config.yaml: the run's resolved config (again when a resume changes a setting)."""
    import yaml

    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))


def tensorboard_writer(run_dir: Path):
    """A SummaryWriter for run_dir/tensorboard, or None without the (optional) tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


RUN_COLUMNS = """model run params gmacs resolution epochs finished acc1 acc5 err1 err5 ema_acc1 training_hours gpu
    world_size""".split()


def collect_runs(runs_dir, out) -> list[dict]:
    """One row per train.py run (its best epoch), written to OUT/our_training.{md,csv,json}. --dummy
    runs (throughput on synthetic images) are left out; a run stopped early says so (finished: 7/20)."""
    import yaml

    from model import complexity

    if not Path(runs_dir).is_dir():
        raise UserError(f"runs folder {runs_dir} does not exist; pass the --output folder of train.py (checkpoints)")
    records = []
    for metrics in sorted(Path(runs_dir).glob("*/metrics.csv")):
        run = metrics.parent
        config = yaml.safe_load((run / "config.yaml").read_text())
        if config.get("dummy"):
            continue
        info = json.loads((run / "run.json").read_text()) if (run / "run.json").exists() else {}
        rows = list(csv.DictReader(metrics.read_text().splitlines()))
        best = max(rows, key=lambda row: float(row["val_acc1"]))
        size = config["val_crop_size"]
        count = complexity(config["arch"], size=size, num_classes=len(info.get("classes", [])) or config["num_classes"])
        acc1, acc5 = float(best["val_acc1"]), float(best["val_acc5"])
        records.append({
            "model": config["arch"], "run": run.name, "params": count["params"], "gmacs": round(count["gmacs"], 3),
            "resolution": f"{size} x {size}", "epochs": len(rows),
            "finished": "yes" if len(rows) >= config["epochs"] else f"{len(rows)}/{config['epochs']}",
            "acc1": acc1, "acc5": acc5, "err1": 100 - acc1, "err5": 100 - acc5,
            "ema_acc1": float(best["ema_acc1"]) if best.get("ema_acc1") else None,
            "training_hours": sum(float(row["epoch_time_s"]) for row in rows) / 3600,
            "gpu": info.get("gpu") or "cpu", "world_size": info.get("world_size"),
        })  # fmt: skip
    if not records:
        raise UserError(f"no finished runs (*/metrics.csv of a run with real data) in {runs_dir}")
    paths = write_records(records, out, "our_training", RUN_COLUMNS)
    print(paths[0].read_text(), end="")
    return records


# ----------------------------------------------------------------------------- benchmark.py's report


def benchmark_summary(rows: list[dict]) -> list[str]:
    """Ratios against the plain loops, end-to-end eval as a share of the model alone, and the loader
    cores a GPU needs for each recipe's train transform."""
    compared = [r for r in rows if r["part"] in ("eval", "train") and "ratio" in r]
    lines = [f"{r['part']}: ours / baseline = {r['ratio']:.2f}x" for r in compared]
    int8 = [r for r in rows if r["part"] == "int8" and "ratio" in r]
    lines += [f"int8: {r['variant'].split(' (')[0]} / fp32 = {r['ratio']:.2f}x" for r in int8]
    for r in (r for r in rows if "workers_per_gpu" in r):
        lines.append(
            f"augment: {r['variant'].split(':')[0]} needs {r['workers_per_gpu']} loader cores per GPU training at "
            f"{r['gpu_img_per_s']} img/s ({r['img_per_s']:.0f} img/s per core here)"
        )
    for r in (r for r in rows if r["part"] == "latency"):
        lines.append(
            f"latency: {r['variant']}: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
            f"{r['img_per_s']:.1f} img/s, memory +{r['peak_mb']:.0f} MB"
        )
    for r in (r for r in rows if r["part"] == "index_memory"):
        ours, objects = r["worker_growth_mb"]["ours"], r["worker_growth_mb"]["list"]
        lines.append(
            f"index: {r['files']} files: {r['bytes_per_image_beside_paths']:.1f} bytes per image beside "
            f"{r['path_bytes_per_image']:.1f} bytes of path (a list of Sample objects: "
            f"{r['list_of_samples_bytes_per_image']:.0f} bytes per image)"
        )
        lines.append(
            f"index: one pass of {r['workers']} loader workers: resident +{ours[0]:.1f} MB, private "
            f"+{ours[1]:.1f} MB per worker (a list of Sample objects: +{objects[0]:.1f} MB, +{objects[1]:.1f} MB)"
        )
    lines += [f"{r['part']}: note: {r['note']}" for r in rows if "note" in r]
    for ours in (r for r in rows if "share_of_model_only" in r):
        lines.append(
            f"eval: ours end-to-end = {100 * ours['share_of_model_only']:.0f}% of the model alone "
            f"({ours['model_only']['img_per_s']:.1f} img/s on synthetic batches, same settings, timed in turn)"
        )
    return lines


def benchmark_report(rows: list[dict], lines: list[str]) -> str:
    """The speed table (with a run column when rows come from several JSON files), the approx table
    and the summary lines."""
    runs = ["run"] if any("run" in r for r in rows) else []
    speed = [
        {
            "run": r.get("run"),
            "part": r["part"],
            "variant": r["variant"],
            "img/s": f"{r['img_per_s']:.1f}",
            "vs": r.get("baseline"),
            "ratio": f"{r['ratio']:.2f}x" if "ratio" in r else None,
        }
        for r in rows
        if r["part"] not in ("approx", "index_memory")
    ]
    approx = [
        {
            "run": r.get("run"),
            "variant": r["variant"],
            "acc1": f"{r['acc1']:.2f}",
            "acc1 change": f"{r['acc1_delta']:+.2f}",
            "same top-1": f"{r['top1_agreement']:.1f}%",
            "same top-5, in order": f"{r['top5_agreement']:.1f}%",
            "top-1 probability change, max": f"{100 * r['top1_prob_change']:.2g}%",
        }
        for r in rows
        if r["part"] == "approx"
    ]
    tables = []
    if speed:
        tables.append(markdown_table(speed, [*runs, "part", "variant", "img/s", "vs", "ratio"]))
    if approx:
        tables.append(markdown_table(approx, [*runs, *list(approx[0])[1:]]))
    return "\n".join(tables + lines)


def merge_benchmarks(paths: list[str]) -> str:
    """One report of several benchmark.py --json results (scripts/gpu_check.sh's table), the machine named."""
    rows, lines, machine_line = [], [], ""
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read benchmark result {path} ({e}); pass files written by --json") from e
        rows += [{"run": Path(path).stem, **r} for r in result["rows"]]
        lines += [f"{Path(path).stem}: {line}" for line in result["summary"]]
        m = result["machine"]
        machine_line = (
            f"{m['gpu'] or m['cpu']}, {m['cores']} CPU cores, torch {m['torch']}, torchvision {m['torchvision']}"
        )
    return machine_line + "\n\n" + benchmark_report(rows, lines)


def robustness_table(rows: list[dict], clean: str = "imagenet") -> tuple[list[dict], list[str]]:
    """(one row per weights evaluated on `clean` and another set: clean top-1, then each set's top-1 and
    its drop; the other sets' names). ReaL top-1 of a clean row counts as the set 'real'; a masked row
    (--mask-classes) as '<set> (masked)'. Rows of a --limit run are left out; of rows with the same
    weights and set, the last one counts."""
    accuracy: dict[str, dict[str, float]] = {}
    for r in (r for r in rows if not r.get("limit")):  # a --limit run is a smoke test, not a result
        label = r.get("dataset", "imagenet") + (" (masked)" if r.get("masked") else "")
        accuracy.setdefault(r["weights"], {})[label] = r["acc1"]
        if label == clean and r.get("real_acc1") is not None:
            accuracy[r["weights"]]["real"] = r["real_acc1"]
    compared = {weights: found for weights, found in accuracy.items() if clean in found and len(found) > 1}
    sets = sorted({label for found in compared.values() for label in found if label != clean})
    table = []
    for weights, found in compared.items():
        row = {"weights": weights, clean: found[clean]}
        for name in (name for name in sets if name in found):
            row.update({name: found[name], f"{name} drop": found[clean] - found[name]})
        table.append(row)
    return table, sets


def write_robustness(rows: list[dict], out_dir, clean: str = "imagenet") -> list[Path]:
    """OUT/robustness.{md,csv,json} and robustness.png when some weights were evaluated on `clean` and
    another set; nothing (an empty list) otherwise."""
    from plots import plot_robustness

    table, sets = robustness_table(rows, clean)
    if not table:
        return []
    columns = ["weights", clean, *(c for name in sets for c in (name, f"{name} drop"))]
    paths = write_records(table, out_dir, "robustness", columns)
    plot_robustness(table, sets, clean, Path(out_dir) / "robustness.png")
    return [*paths[:2], Path(out_dir) / "robustness.png"]


def write_predictions(rows: list[dict], path: Path) -> None:
    lines = [
        "path,target," + ",".join(f"top{k}" for k in range(1, 6)) + "," + ",".join(f"prob{k}" for k in range(1, 6))
    ]
    for r in rows:
        lines.append(",".join([f'"{r["path"]}"', str(r["target"]), *map(str, r["top5"]), *map(str, r["probs"])]))
    atomic_write_text(path, "\n".join(lines) + "\n")
