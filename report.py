"""Result files: markdown/CSV/JSON tables, metrics.csv and the plots, each written atomically."""
import csv
import io
import json
from pathlib import Path

from utils import atomic_write, atomic_write_text


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


def plot_curves(history: list[dict], run_dir) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(epochs, [row["train_loss"] for row in history], label="train")
    left.plot(epochs, [row["val_loss"] for row in history], label="val")
    right.plot(epochs, [row["train_acc1"] for row in history], label="train top-1")
    right.plot(epochs, [row["val_acc1"] for row in history], label="val top-1")
    right.plot(epochs, [row["val_acc5"] for row in history], label="val top-5")
    if "ema_acc1" in history[-1]:
        right.plot(epochs, [row["ema_acc1"] for row in history], label="EMA val top-1")
    left.set(xlabel="epoch", ylabel="loss", title="loss")
    right.set(xlabel="epoch", ylabel="%", title="accuracy")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(Path(run_dir) / "curves.png", lambda f: fig.savefig(f, format="png", dpi=120), mode="wb")
    plt.close(fig)


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
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=150), mode="wb")
    plt.close(fig)
