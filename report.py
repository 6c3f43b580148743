"""What results are written as: tables (Markdown, CSV and JSON), a training run's files (config.yaml,
run.json, metrics.csv, TensorBoard events), the evaluation's predictions and robustness report,
benchmark.py's report, and the figures (training curves, accuracy against compute as PNG and
hover-labelled HTML, robustness, latency, the augmentation preview). Every file is written atomically.
"""

import csv
import html
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from utils import UserError, atomic_write, atomic_write_text, machine_info, world_size

# ----------------------------------------------------------------------------- tables


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


def write_csv(records: list[dict], path) -> None:
    """PATH: every key of the records as a column, atomically."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    atomic_write_text(path, buffer.getvalue())


def write_records(records: list[dict], out_dir, stem: str, columns: list[str]) -> list[Path]:
    """FOLDER/stem.md (the given columns), FOLDER/stem.csv and FOLDER/stem.json (every key), each
    atomically."""
    out_dir = Path(out_dir)
    paths = [out_dir / f"{stem}.md", out_dir / f"{stem}.csv", out_dir / f"{stem}.json"]
    atomic_write_text(paths[0], markdown_table(records, columns))
    write_csv(records, paths[1])
    atomic_write_text(paths[2], json.dumps(records, indent=1) + "\n")
    return paths


def write_metrics(history: list[dict], run_dir, tensorboard=None) -> None:
    """metrics.csv (one row per epoch, rewritten whole) and the last row's numbers as TensorBoard scalars."""
    if tensorboard is not None and history:
        for key, value in history[-1].items():
            if isinstance(value, (int, float)):  # not best_pt, which names the weights best.pt holds
                tensorboard.add_scalar(key, value, history[-1]["epoch"])
        tensorboard.flush()
    if not history:
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[-1]), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(Path(run_dir) / "metrics.csv", buffer.getvalue())


# ----------------------------------------------------------------------------- a training run's files


def run_info(seed: int) -> dict:
    """Git commit, command line, seed, world size and machine_info, saved next to every run's checkpoints."""
    git = ["git", "rev-parse", "HEAD"]
    try:
        found = subprocess.run(git, capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent)
        commit = found.stdout.strip() or None
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
    atomic_write_text(
        run_dir / "run.json", json.dumps({**run_info(config["seed"]), "classes": classes}, indent=1)
    )


def write_run_config(run_dir: Path, config: dict) -> None:
    """config.yaml: the run's resolved config (again when a resume changes a setting)."""
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))


def tensorboard_writer(run_dir: Path):
    """A SummaryWriter for run_dir/tensorboard, or None without the (optional) tensorboard package."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # here: tensorboard is optional
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


# ----------------------------------------------------------------------------- evaluation


def robustness_table(rows: list[dict], clean: str = "imagenet") -> tuple[list[dict], list[str]]:
    """(one row per weights enum evaluated on `clean` and another set: clean top-1, then each set's top-1 and
    its drop; the other sets' names). ReaL top-1 of a clean row counts as the set 'real'; a masked row
    (--mask-classes) as '<set> (masked)'; ImageNet-C's rows as one set, 'imagenet-c', the mean top-1 over
    the corruptions and severities evaluated. Rows of a --limit run are left out; of rows with the same
    weights and set, the last one counts."""
    accuracy: dict[str, dict[str, float]] = {}
    corrupted: dict[str, dict[tuple, float]] = {}  # weights -> (corruption, severity) -> top-1
    for r in (r for r in rows if not r.get("limit")):  # a --limit run is a smoke test, not a result
        label = r.get("dataset", "imagenet") + (" (masked)" if r.get("masked") else "")
        if r.get("corruption"):
            corrupted.setdefault(r["weights"], {})[(label, r["corruption"], r["severity"])] = r["acc1"]
            continue
        accuracy.setdefault(r["weights"], {})[label] = r["acc1"]
        if label == clean and r.get("real_acc1") is not None:
            accuracy[r["weights"]]["real"] = r["real_acc1"]
    for weights, found in corrupted.items():
        for label in {key[0] for key in found}:
            values = [acc1 for key, acc1 in found.items() if key[0] == label]
            accuracy.setdefault(weights, {})[label] = sum(values) / len(values)
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
    """OUTPUT/robustness.{md,csv,json} and robustness.png when some weights were evaluated on `clean` and
    another set; nothing (an empty list) otherwise."""
    table, sets = robustness_table(rows, clean)
    if not table:
        return []
    columns = ["weights", clean, *(c for name in sets for c in (name, f"{name} drop"))]
    paths = write_records(table, out_dir, "robustness", columns)
    plot_robustness(table, sets, clean, Path(out_dir) / "robustness.png")
    return [*paths[:2], Path(out_dir) / "robustness.png"]


def write_predictions(rows: list[dict], path: Path) -> None:
    """OUTPUT/predictions/*.csv: each image's path, target, top-5 classes and their probabilities."""
    header = ["path", "target", *(f"top{k}" for k in range(1, 6)), *(f"prob{k}" for k in range(1, 6))]
    lines = [",".join(header)]
    for r in rows:
        lines.append(
            ",".join([f'"{r["path"]}"', str(r["target"]), *map(str, r["top5"]), *map(str, r["probs"])])
        )
    atomic_write_text(path, "\n".join(lines) + "\n")


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
            f"augment: {r['variant'].split(':')[0]} needs {r['workers_per_gpu']} loader cores per GPU "
            f"training at {r['gpu_img_per_s']} img/s ({r['img_per_s']:.0f} img/s per core here)"
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
            f"+{ours[1]:.1f} MB per worker (a list of Sample objects: +{objects[0]:.1f} MB, "
            f"+{objects[1]:.1f} MB)"
        )
    for r in (r for r in rows if r["part"] == "memory_fit"):
        checked = r["checked_peak_mb"]
        check = "the fit alone: a step at it is more than this device holds"
        if not r["batch"]:
            check = "the weights and optimizer state alone need more"
        elif checked is not None:
            check = f"a step at it peaked at {checked:.0f} MB"
        lines.append(
            f"memory: {r['arch']} ({r['config']}): largest batch within {r['budget_mb']:.0f} MB: "
            f"{r['batch']} (from batches {', '.join(map(str, r['from_batches']))} and steps at the line's "
            f"predictions; {check})"
        )
    for r in (r for r in rows if r["part"] == "profile"):
        ops = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in r["top_cpu_ops"][:5])
        gpu = r["gpu_busy_share"]
        lines.append(
            f"profile: {r['variant']}: {r['img_per_s']:.0f} img/s; the main process waited for the loader "
            f"{100 * r['loader_wait_share']:.0f}% of the pass"
            + ("" if gpu is None else f", the GPU ran kernels {100 * gpu:.0f}% of it")
            + f"; most CPU time: {ops}"
        )
    lines += [f"{r['part']}: note: {r['note']}" for r in rows if "note" in r]
    for ours in (r for r in rows if "share_of_model_only" in r):
        lines.append(
            f"eval: ours end-to-end = {100 * ours['share_of_model_only']:.0f}% of the model alone "
            f"({ours['model_only']['img_per_s']:.1f} img/s on synthetic batches, same settings, timed in "
            "turn)"
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
        if r["part"] not in ("approx", "index_memory", "memory", "memory_fit")
    ]
    memory = [
        {
            "run": r.get("run"),
            "arch": r["arch"],
            "config": r["config"],
            "settings": r["settings"],
            "batch": r["batch"],
            "peak MB": f"{r['peak_mb']:.0f}",
        }
        for r in rows
        if r["part"] == "memory"
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
    if memory:
        tables.append(markdown_table(memory, [*runs, *list(memory[0])[1:]]))
    return "\n".join(tables + lines)


def merge_benchmarks(paths: list[str]) -> str:
    """One report of several benchmark.py --output results (scripts/gpu_check.sh's table), the machine
    named."""
    rows, lines, machine_line = [], [], ""
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise UserError(
                f"cannot read benchmark result {path} ({e}); pass files written by --output"
            ) from e
        rows += [{"run": Path(path).stem, **r} for r in result["rows"]]
        lines += [f"{Path(path).stem}: {line}" for line in result["summary"]]
        m = result["machine"]
        libraries = f"torch {m['torch']}, torchvision {m['torchvision']}"
        machine_line = f"{m['gpu'] or m['cpu']}, {m['cores']} CPU cores, {libraries}"
    return machine_line + "\n\n" + benchmark_report(rows, lines)


# ----------------------------------------------------------------------------- figures

MARKERS = "osD^v<>pPhX*"


def _pyplot():
    """matplotlib's pyplot, imported here: it takes a second to import, and only figures need it."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: list[dict], run_dir) -> None:
    """curves.png: train and val loss, train and val top-1, val top-5 (and the EMA's) per epoch."""
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(epochs, [row["train_loss"] for row in history], label="train")
    left.plot(epochs, [row["val_loss"] for row in history], label="val")
    right.plot(epochs, [row["train_acc1"] for row in history], label="train top-1")
    right.plot(epochs, [row["val_acc1"] for row in history], label="val top-1")
    right.plot(epochs, [row["val_acc5"] for row in history], label="val top-5")
    if "ema_acc1" in history[-1]:  # EMA may have been turned on by a resume: earlier epochs have none
        right.plot(epochs, [row.get("ema_acc1", math.nan) for row in history], label="EMA val top-1")
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    right.set(xlabel="epoch", ylabel="%", title="accuracy")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(Path(run_dir) / "curves.png", lambda f: fig.savefig(f, format="png", dpi=120), mode="wb")
    plt.close(fig)


def family_styles(families: list[str]) -> dict[str, tuple]:
    """family -> (colour, marker): every family its own colour (tab20, then tab20b) and a marker."""
    plt = _pyplot()
    colours = [*plt.get_cmap("tab20").colors, *plt.get_cmap("tab20b").colors]
    return {
        family: (colours[i % len(colours)], MARKERS[i % len(MARKERS)]) for i, family in enumerate(families)
    }


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, accuracy) points that no other point beats: as cheap or cheaper and at
    least as accurate, one of them strictly. Ordered by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def point_label(record: dict) -> str:
    """'resnet50' for the DEFAULT weights, 'resnet50 (IMAGENET1K_V1)' for the others."""
    return (
        record["model"]
        if record.get("default")
        else f"{record['model']} ({record['weights'].split('.')[-1]})"
    )


def plot_acc_vs_gmacs(records: list[dict], path: Path) -> list[tuple]:
    """The complexity table's plot: published top-1 against GMACs (plot_acc_vs_cost)."""
    return plot_acc_vs_cost(
        records,
        path,
        cost="gmacs",
        xlabel="GMACs at the weights' eval resolution (log scale)",
        title="torchvision ImageNet-1K weights: accuracy vs compute",
    )


def plot_acc_vs_cost(records: list[dict], path: Path, cost: str, xlabel: str, title: str) -> list[tuple]:
    """Published top-1 against record[cost] (log x, lower is better): a colour and marker per family,
    the Pareto front drawn, its points and the DEFAULT weights labelled where a label fits without
    overlapping another label, a point or the legend. Also writes the hover-labelled HTML beside it.
    Returns the labels drawn, (text, box) pairs."""
    plt = _pyplot()
    rows = [r for r in records if r["acc1_published"] is not None]
    if not rows:  # e.g. only VGG16's feature weights, which publish no accuracy
        return []
    styles = family_styles(sorted({r["family"] for r in rows}))
    fig, ax = plt.subplots(figsize=(18, 11))
    for family, (colour, marker) in styles.items():
        mine = [r for r in rows if r["family"] == family]
        x, y = [r[cost] for r in mine], [r["acc1_published"] for r in mine]
        ax.scatter(x, y, s=22, color=colour, marker=marker, label=family, zorder=3)
    front = pareto_front([(r[cost], r["acc1_published"]) for r in rows])
    x, y = [rows[i][cost] for i in front], [rows[i]["acc1_published"] for i in front]
    ax.plot(
        x, y, color="black", alpha=0.35, linewidth=1, drawstyle="steps-post", label="Pareto front", zorder=2
    )
    costs = [r[cost] for r in rows]
    html_name = Path(path).with_suffix(".html").name
    ax.set(
        xscale="log",
        xlim=(min(costs) / 1.6, max(costs) * 1.6),
        xlabel=xlabel,
        ylabel="published top-1 (%)",
        title=f"{title} (labelled: the Pareto front and DEFAULT weights; every point in {html_name})",
    )
    ax.grid(True, which="both", alpha=0.3)
    legend = ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    by_accuracy = sorted(range(len(rows)), key=lambda i: -rows[i]["acc1_published"])
    wanted = front + [i for i in by_accuracy if rows[i].get("default") and i not in front]
    points = [(rows[i][cost], rows[i]["acc1_published"], point_label(rows[i])) for i in wanted]
    labels = place_labels(fig, ax, points, avoid=[legend.get_window_extent()])
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=150), mode="wb")
    plt.close(fig)
    write_acc_vs_cost_html(rows, styles, Path(path).with_suffix(".html"), cost, xlabel, title, front)
    return labels


OFFSETS = [(5, 3), (5, -10), (-5, 3), (-5, -10), (5, 10), (-5, 10), (5, -17), (-5, -17), (0, 16), (0, -22)]


def place_labels(fig, ax, points: list[tuple[float, float, str]], avoid=()) -> list[tuple]:
    """Greedy placement, in the given order: each label takes the first offset around its point where
    its box stays inside the axes and overlaps no placed label, no point and nothing in `avoid`;
    a label that fits nowhere is left out (the HTML names every point). Returns (text, box) of each
    label drawn, boxes in display pixels."""
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    taken = list(avoid)  # boxes no label may overlap: the legend, every marker, the labels placed
    for collection in ax.collections:
        markers = ax.transData.transform(collection.get_offsets())
        taken += [_box(px - 4, py - 4, px + 4, py + 4) for px, py in markers]
    placed = []
    for x, y, text in points:
        for dx, dy in OFFSETS:
            side = "left" if dx >= 0 else "right"
            label = ax.annotate(
                text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=6.5, ha=side, zorder=4
            )
            box = label.get_window_extent(renderer)
            fits = inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)
            if fits and not any(box.overlaps(other) for other in taken):
                taken.append(box)
                placed.append((text, box))
                break
            label.remove()
    return placed


def _box(x0, y0, x1, y1):
    from matplotlib.transforms import Bbox  # (with pyplot: see _pyplot)

    return Bbox([[x0, y0], [x1, y1]])


def hover_text(row: dict, cost: str) -> str:
    """A point's tooltip: model and weights, its cost, its size where known, published top-1/top-5."""
    lines = [f"{row['model']} — {row['weights']}"]
    if cost == "gmacs":
        lines.append(f"{row['gmacs']:.3f} GMACs, {row['params']:,} params")
    else:
        lines.append(f"{row[cost]:.4g} {cost.replace('_', ' ')}")
    if row.get("img_per_s") is not None:
        lines.append(
            f"{row['img_per_s']:,.1f} img/s, batch-1 latency p50 {row['latency_p50_ms']:.2f} ms, "
            f"p99 {row['latency_p99_ms']:.2f} ms, peak {row['peak_mem_mb']:,.0f} MB"
        )
    acc5 = row.get("acc5_published")
    lines.append(f"top-1 {row['acc1_published']:.3f}%" + (f", top-5 {acc5:.3f}%" if acc5 is not None else ""))
    return "\n".join(lines)


def write_acc_vs_cost_html(
    rows: list[dict],
    styles: dict,
    path: Path,
    cost: str,
    xlabel: str,
    title: str,
    front=(),
    width=1100,
    height=700,
) -> None:
    """A self-contained page (inline SVG, no script, no dependency): every point a circle whose tooltip
    gives model, weights, its cost and published top-1/top-5 (hover_text), the Pareto front's points
    ringed; the families listed beside."""
    pad, log = 60, math.log10
    x_min, x_max = log(min(r[cost] for r in rows) / 1.3), log(max(r[cost] for r in rows) * 1.3)
    y_min, y_max = min(r["acc1_published"] for r in rows) - 1, max(r["acc1_published"] for r in rows) + 1

    def xy(value, acc):
        x = pad + (log(value) - x_min) / (x_max - x_min) * (width - 2 * pad)
        return x, height - pad - (acc - y_min) / (y_max - y_min) * (height - 2 * pad)

    def colour(family):
        return "#" + "".join(f"{round(255 * c):02x}" for c in styles[family][0][:3])

    decades = range(math.floor(x_min) - 1, math.ceil(x_max) + 1)
    ticks = [m * 10.0**d for d in decades for m in (1, 3) if x_min <= log(m * 10.0**d) <= x_max]
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">']
    for t in ticks:
        x = xy(t, y_min)[0]
        svg.append(f'<line x1="{x:.1f}" y1="{pad}" x2="{x:.1f}" y2="{height - pad}" stroke="#ddd"/>')
        svg.append(f'<text x="{x:.1f}" y="{height - pad + 16}" text-anchor="middle">{t:g}</text>')
    for acc in range(math.ceil(y_min), math.floor(y_max) + 1, 2):
        y = xy(10**x_min, acc)[1]
        svg.append(f'<line x1="{pad}" y1="{y:.1f}" x2="{width - pad}" y2="{y:.1f}" stroke="#eee"/>')
        svg.append(f'<text x="{pad - 6}" y="{y + 4:.1f}" text-anchor="end">{acc}</text>')
    on_front = set(front)
    for i, r in enumerate(rows):
        x, y = xy(r[cost], r["acc1_published"])
        radius = 5 if r.get("default") else 3.5
        ring = ' stroke="black" stroke-width="1.5"' if i in on_front else ""
        svg.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{radius}" fill="{colour(r["family"])}"{ring}>')
        svg.append(f"<title>{html.escape(hover_text(r, cost))}</title></circle>")
    svg.append(f'<text x="{width / 2}" y="{height - 18}" text-anchor="middle">{html.escape(xlabel)}</text>')
    rotate = f"rotate(-90 16 {height / 2})"
    svg.append(
        f'<text x="16" y="{height / 2}" transform="{rotate}" text-anchor="middle">published top-1 (%)</text>'
    )
    svg.append("</svg>")
    legend = "".join(
        f'<li><span style="color:{colour(f)}">&#9679;</span> {html.escape(f)}</li>' for f in styles
    )
    page = "".join(
        [
            f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
            f"<h3>{html.escape(title)} (hover a point; large: DEFAULT; ringed: the Pareto front)</h3>",
            f"<div style='display:flex'>{''.join(svg)}<ul style='list-style:none'>{legend}</ul></div>\n",
        ]
    )
    atomic_write_text(path, page)


def plot_preview(images, targets, class_names: list[str], path, title: str = "") -> None:
    """A grid of (N, 3, H, W) images in [0, 1], each captioned with its largest soft-label classes."""
    plt = _pyplot()
    columns = min(4, len(images))
    rows = math.ceil(len(images) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, target in zip(axes.flat, images, targets):
        ax.imshow(image.permute(1, 2, 0).numpy())
        shares, classes = target.topk(min(2, len(target)))  # the two largest shares of the soft label
        pairs = zip(shares.tolist(), classes.tolist())
        caption = [f"{class_names[c][:22]} {share:.2f}" for share, c in pairs if share > 0.005]
        ax.set_title("\n".join(caption), fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=80), mode="wb")
    plt.close(fig)


def plot_robustness(table: list[dict], sets: list[str], clean: str, path) -> None:
    """Each set's top-1 against the clean top-1, one point per weights enum, with each set's least-squares
    line: points above a set's line are more robust than the clean accuracy predicts (the "effective
    robustness" picture of Taori et al. 2020)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5.5))
    colours = plt.get_cmap("tab10").colors
    low = min(row[clean] for row in table)
    for i, name in enumerate(sets):
        points = [(row[clean], row[name]) for row in table if name in row]
        x, y = np.array(points).T
        ax.scatter(x, y, s=18, color=colours[i % 10], label=f"{name} ({len(points)})")
        if len(points) > 1 and np.ptp(x) > 0:
            slope, intercept = np.polyfit(x, y, 1)
            line = np.array([x.min(), x.max()])
            ax.plot(line, slope * line + intercept, color=colours[i % 10], linewidth=1)
        low = min(low, y.min())
    high = max(row[clean] for row in table)
    ax.plot([low, high], [low, high], "k--", linewidth=0.8, label="no drop (y = x)")
    ax.set(
        xlabel=f"{clean} top-1 (%)", ylabel="top-1 on the set (%)", title="accuracy under distribution shift"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
    plt.close(fig)


def plot_reliability(row: dict, path) -> None:
    """An eval row's reliability diagram: each calibration bin's top-1 accuracy against its mean top-1
    probability (bars; the diagonal is perfect calibration), its share of the images below, the ECE in
    the title."""
    plt = _pyplot()
    bins = row["calibration"]  # per bin: images, sum of top-1 probabilities, top-1 hits
    width = 1 / len(bins)
    lefts = [k * width for k in range(len(bins))]
    accuracy = [hits / n if n else 0.0 for n, _, hits in bins]
    confidence = [total / n if n else left + width / 2 for (n, total, _), left in zip(bins, lefts)]
    share = [n / max(1, sum(b[0] for b in bins)) for n, _, _ in bins]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 7), height_ratios=(3, 1), sharex=True)
    top.bar(lefts, accuracy, width=width, align="edge", edgecolor="black", alpha=0.8, label="top-1 accuracy")
    filled = [(c, a) for (n, _, _), c, a in zip(bins, confidence, accuracy) if n]
    top.plot(*zip(*filled), "o", color="black", markersize=3, label="at the bin's mean probability")
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    top.set(ylabel="top-1 accuracy", xlim=(0, 1), ylim=(0, 1))
    top.set_title(
        f"{row['model']} ({Path(str(row['weights'])).name}) on {row['dataset']}: ECE {row['ece']:.2f}%, "
        f"NLL {row['nll']:.3f}",
        fontsize=9,
    )
    top.legend(fontsize=8, loc="upper left")
    bottom.bar(lefts, share, width=width, align="edge", edgecolor="black", alpha=0.6)
    bottom.set(xlabel="top-1 probability", ylabel="share of images")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
    plt.close(fig)


def plot_latency(rows: list[dict], path) -> None:
    """Images/s and p50 latency (p99 as the bar's top) against batch size, one line per backend."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["batch"])
        batches = [r["batch"] for r in mine]
        left.plot(batches, [r["img_per_s"] for r in mine], marker="o", label=backend)
        p50 = [r["p50_ms"] for r in mine]
        up_to_p99 = [r["p99_ms"] - q for r, q in zip(mine, p50)]
        right.errorbar(batches, p50, yerr=[[0] * len(mine), up_to_p99], marker="o", capsize=3, label=backend)
    left.set(xscale="log", xlabel="batch size", ylabel="images/s", title="throughput")
    right.set(
        xscale="log",
        yscale="log",
        xlabel="batch size",
        ylabel="ms per batch",
        title="latency (p50, bar to p99)",
    )
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
    plt.close(fig)
