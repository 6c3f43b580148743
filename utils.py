"""Shared plumbing: user-facing errors, atomic writes, config loading, meters, accuracy,
distributed helpers and checkpoint I/O. Nothing here knows about a particular model or dataset."""
import difflib
import functools
import os
import sys
import tempfile
from pathlib import Path


class UserError(Exception):
    """A problem the user can fix (bad path, bad config, missing weights): printed as one line."""


def closest(name: str, choices, n: int = 3) -> str:
    """' (did you mean a, b?)' for the closest valid names, or '' when nothing is close."""
    matches = difflib.get_close_matches(str(name), list(choices), n=n, cutoff=0.5)
    return f" (did you mean {', '.join(matches)}?)" if matches else ""


def cli(main):
    """Run an entry point: a UserError becomes one 'error: ...' line on stderr and exit code 2."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted; finished results and checkpoints are kept", file=sys.stderr)
            sys.exit(130)
    return wrapper


def atomic_write(path, write_fn, mode: str = "w") -> None:
    """Write through a temp file in the same folder, fsync, then rename over `path`, so readers
    see the old file or the new one, never half of one (also after kill -9 or a full disk)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"could not write {path}: {e.strerror or e}; the previous file is intact") from e
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


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
    import csv, io, json
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


# ----------------------------------------------------------------------------- devices and processes

def resolve_device(name: str = "auto"):
    import torch
    if name == "auto":
        return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device '{name}'; use auto, cpu or cuda")
    return torch.device("cuda", local_rank()) if name == "cuda" else torch.device("cpu")


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def is_distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor):
    """Sum over ranks in place (no-op in one process)."""
    if is_distributed():
        import torch.distributed as dist
        dist.all_reduce(tensor)
    return tensor


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (just [obj] in one process)."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def topk_correct(logits, targets, ks=(1, 5)) -> list:
    """Number of samples whose target is among the top-k logits, for each k (tensors, no host sync)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (B, k)
    hits = top == targets[:, None]
    return [hits[:, :k].sum() for k in ks]


def default_workers(device) -> int:
    """Loader processes. On a GPU the JPEG pipeline is the bottleneck: every core decodes. On a CPU
    the model is (resnet18 costs ~40 ms/image vs ~5 ms to decode): one worker keeps it fed, and the
    model's intra-op threads get the cores (see README, Performance)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return min(per_process, 16) if device.type == "cuda" else max(1, min(per_process // 4, 4))
