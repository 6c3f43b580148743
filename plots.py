"""Figures: a run's training curves, and published accuracy against compute for every torchvision
weights, as a PNG whose labels never overlap (the Pareto front and the DEFAULT weights are named) and as
an HTML page where every point names itself on hover. Each file is written atomically.

    python test_torchvision.py --out docs      # docs/acc_vs_gmacs.png and docs/acc_vs_gmacs.html
    python dataset.py preview --config configs/torchvision_v2.yaml --data DIR   # what a recipe feeds the model
"""

import html
import math
from pathlib import Path

from utils import UserError, atomic_write, atomic_write_text

MARKERS = "osD^v<>pPhX*"


def _pyplot():
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
    return {family: (colours[i % len(colours)], MARKERS[i % len(MARKERS)]) for i, family in enumerate(families)}


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
    return record["model"] if record.get("default") else f"{record['model']} ({record['weights'].split('.')[-1]})"


def plot_acc_vs_gmacs(records: list[dict], path: Path) -> list[tuple]:
    """Published top-1 against GMACs (log x): a colour and marker per family, the Pareto front drawn,
    its points and the DEFAULT weights labelled where a label fits without overlapping another label,
    a point or the legend. Also writes the hover-labelled HTML beside it. Returns the labels drawn,
    (text, box) pairs."""
    plt = _pyplot()
    rows = [r for r in records if r["acc1_published"] is not None]
    if not rows:  # e.g. only VGG16's feature weights, which publish no accuracy
        return []
    styles = family_styles(sorted({r["family"] for r in rows}))
    fig, ax = plt.subplots(figsize=(18, 11))
    for family, (colour, marker) in styles.items():
        mine = [r for r in rows if r["family"] == family]
        ax.scatter([r["gmacs"] for r in mine], [r["acc1_published"] for r in mine], s=22, color=colour,
                   marker=marker, label=family, zorder=3)  # fmt: skip
    front = pareto_front([(r["gmacs"], r["acc1_published"]) for r in rows])
    ax.plot([rows[i]["gmacs"] for i in front], [rows[i]["acc1_published"] for i in front], color="black",
            alpha=0.35, linewidth=1, drawstyle="steps-post", label="Pareto front", zorder=2)  # fmt: skip
    gmacs = [r["gmacs"] for r in rows]
    ax.set(xscale="log", xlim=(min(gmacs) / 1.6, max(gmacs) * 1.6), xlabel="GMACs at the weights' eval resolution"
           " (log scale)", ylabel="published top-1 (%)", title="torchvision ImageNet-1K weights: accuracy vs "
           "compute (labelled: the Pareto front and DEFAULT weights; every point in acc_vs_gmacs.html)")  # fmt: skip
    ax.grid(True, which="both", alpha=0.3)
    legend = ax.legend(fontsize=8, ncol=2, loc="lower right")
    fig.tight_layout()
    wanted = front + [i for i in sorted(range(len(rows)), key=lambda i: -rows[i]["acc1_published"])
                      if rows[i].get("default") and i not in front]  # fmt: skip
    labels = place_labels(fig, ax, [(rows[i]["gmacs"], rows[i]["acc1_published"], point_label(rows[i]))
                                    for i in wanted], avoid=[legend.get_window_extent()])  # fmt: skip
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=150), mode="wb")
    plt.close(fig)
    write_acc_vs_gmacs_html(rows, styles, Path(path).with_suffix(".html"))
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
        taken += [_box(px - 4, py - 4, px + 4, py + 4) for px, py in ax.transData.transform(collection.get_offsets())]
    placed = []
    for x, y, text in points:
        for dx, dy in OFFSETS:
            label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=6.5,
                                ha="left" if dx >= 0 else "right", zorder=4)  # fmt: skip
            box = label.get_window_extent(renderer)
            fits = inside.contains(box.x0, box.y0) and inside.contains(box.x1, box.y1)
            if fits and not any(box.overlaps(other) for other in taken):
                taken.append(box)
                placed.append((text, box))
                break
            label.remove()
    return placed


def _box(x0, y0, x1, y1):
    from matplotlib.transforms import Bbox

    return Bbox([[x0, y0], [x1, y1]])


def write_acc_vs_gmacs_html(rows: list[dict], styles: dict, path: Path, width=1100, height=700) -> None:
    """A self-contained page (inline SVG, no script, no dependency): every point a circle whose tooltip
    gives model, weights, GMACs, params and published top-1/top-5; the families listed beside."""
    pad, log = 60, math.log10
    x_min, x_max = log(min(r["gmacs"] for r in rows) / 1.3), log(max(r["gmacs"] for r in rows) * 1.3)
    y_min, y_max = min(r["acc1_published"] for r in rows) - 1, max(r["acc1_published"] for r in rows) + 1

    def xy(r):
        x = pad + (log(r["gmacs"]) - x_min) / (x_max - x_min) * (width - 2 * pad)
        return x, height - pad - (r["acc1_published"] - y_min) / (y_max - y_min) * (height - 2 * pad)

    def colour(family):
        return "#" + "".join(f"{round(255 * c):02x}" for c in styles[family][0][:3])

    ticks = [t for t in (0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000) if x_min <= log(t) <= x_max]
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">']
    for t in ticks:
        x = xy({"gmacs": t, "acc1_published": y_min})[0]
        svg.append(f'<line x1="{x:.1f}" y1="{pad}" x2="{x:.1f}" y2="{height - pad}" stroke="#ddd"/>'
                   f'<text x="{x:.1f}" y="{height - pad + 16}" text-anchor="middle">{t:g}</text>')  # fmt: skip
    for acc in range(math.ceil(y_min), math.floor(y_max) + 1, 2):
        y = xy({"gmacs": 10**x_min, "acc1_published": acc})[1]
        svg.append(f'<line x1="{pad}" y1="{y:.1f}" x2="{width - pad}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{pad - 6}" y="{y + 4:.1f}" text-anchor="end">{acc}</text>')  # fmt: skip
    for r in rows:
        x, y = xy(r)
        tip = (f"{r['model']} — {r['weights']}\n{r['gmacs']:.3f} GMACs, {r['params']:,} params\n"
               f"top-1 {r['acc1_published']:.3f}%, top-5 {r['acc5_published']:.3f}%")  # fmt: skip
        svg.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{5 if r.get("default") else 3.5}" '
                   f'fill="{colour(r["family"])}"><title>{html.escape(tip)}</title></circle>')  # fmt: skip
    svg.append(f'<text x="{width / 2}" y="{height - 18}" text-anchor="middle">GMACs (log scale)</text>'
               f'<text x="16" y="{height / 2}" transform="rotate(-90 16 {height / 2})" text-anchor="middle">'
               "published top-1 (%)</text></svg>")  # fmt: skip
    legend = "".join(f'<li><span style="color:{colour(f)}">&#9679;</span> {html.escape(f)}</li>' for f in styles)
    page = ("<!doctype html><meta charset='utf-8'><title>torchvision weights: accuracy vs compute</title>"
            "<h3>torchvision ImageNet-1K weights: published top-1 against GMACs (hover a point; large: DEFAULT)</h3>"
            f"<div style='display:flex'>{''.join(svg)}<ul style='list-style:none'>{legend}</ul></div>\n")  # fmt: skip
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
        weights, classes = target.topk(min(2, len(target)))
        caption = [f"{class_names[c][:22]} {w:.2f}" for w, c in zip(weights.tolist(), classes.tolist()) if w > 0.005]
        ax.set_title("\n".join(caption), fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=80), mode="wb")
    plt.close(fig)


def plot_robustness(table: list[dict], sets: list[str], clean: str, path) -> None:
    """Each set's top-1 against the clean top-1, one point per weights, with each set's least-squares
    line: points above a set's line are more robust than the clean accuracy predicts (the "effective
    robustness" picture of Taori et al. 2020)."""
    import numpy as np

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
    ax.set(xlabel=f"{clean} top-1 (%)", ylabel="top-1 on the set (%)", title="accuracy under distribution shift")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
        right.errorbar(batches, p50, yerr=[[0] * len(mine), [r["p99_ms"] - q for r, q in zip(mine, p50)]],
                       marker="o", capsize=3, label=backend)  # fmt: skip
    left.set(xscale="log", xlabel="batch size", ylabel="images/s", title="throughput")
    right.set(xscale="log", yscale="log", xlabel="batch size", ylabel="ms per batch", title="latency (p50, bar to p99)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
    plt.close(fig)


def augmented_batch(cfg, samples, num_classes: int, count: int = 16, seed: int = 0):
    """What a training step of a TrainConfig sees: `count` images drawn (by seed) from `samples`, through
    the config's train preset and MixUp/CutMix. Returns (images (count, 3, H, W) float in [0, 1] for
    display, targets (count, num_classes) float: the soft labels the loss receives)."""
    import torch

    from dataset import ImageDataset
    from presets import IMAGENET_MEAN, IMAGENET_STD, MixUpCutMix, normalize, train_transform

    picked = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    dataset = ImageDataset([samples[i] for i in picked], train_transform(cfg), seed)
    items = [dataset[(i, 0, 0)] for i in range(len(dataset))]  # (index, epoch 0, copy 0): as epoch 1 sees them
    bad = [error for image, _, _, error in items if image is None]
    if bad:
        raise UserError(f"cannot read an image to preview ({bad[0]})")
    images, targets = torch.stack([item[0] for item in items]), torch.tensor([item[1] for item in items])
    if images.dtype == torch.uint8:  # normalised on the device in training; MixUp needs floats
        images = normalize(images, IMAGENET_MEAN, IMAGENET_STD)
    mix = MixUpCutMix.from_config(cfg, num_classes)
    if mix is not None:
        images, targets = mix(images, targets, step=seed)
    else:
        targets = torch.nn.functional.one_hot(targets, num_classes).float()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1), targets


def write_preview(config, data, out, count: int = 16, seed: int = 0) -> None:
    """`python dataset.py preview`: the PNG of augmented_batch for a config and a folder of images."""
    from config import TrainConfig, load_config
    from dataset import WNID, find_samples, imagenet_wnids

    cfg = load_config(TrainConfig, ["--config", config, "--data", data])
    samples, classes = find_samples(data, "train", imagenet_labels=False)
    names = classes
    if all(WNID.match(c) for c in classes) and set(classes) <= set(imagenet_wnids()):  # readable names
        from coder import LabelCoder

        coder = LabelCoder.imagenet()
        names = [coder.name(coder.index(c)) for c in classes]
    images, targets = augmented_batch(cfg, samples, len(classes), count, seed)
    plot_preview(images, targets, names, out, title=f"{config}: what the model sees (soft labels)")
    print(f"wrote {out}: {len(images)} training images of {data} as {config} augments and mixes them")
