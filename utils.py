"""Shared plumbing: user-facing errors, atomic writes, config loading, meters, accuracy,
distributed helpers and checkpoint I/O. Nothing here knows about a particular model or dataset."""
import argparse
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


def amp_dtype(name: str, device):
    """The autocast dtype of --amp none|fp32|bf16|fp16|auto (auto: bf16 on CUDA, off on CPU); None = off."""
    import torch
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "none"
    return {"none": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device, dtype):
    """torch.autocast in `dtype` (from amp_dtype); a no-op for None."""
    import torch
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


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


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (itself in one process)."""
    if not is_distributed():
        return obj
    import torch.distributed as dist
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def broadcast_buffers(model) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank; DDP only syncs them before forwards."""
    if is_distributed():
        import torch.distributed as dist
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def check_ranks_in_step(model) -> None:
    """After distributed training: the same weights on every rank (sha256 of the state), or an error."""
    if not is_distributed():
        return
    import hashlib
    import torch
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digests = all_gather_objects(digest.hexdigest())
    if len(set(digests)) != 1:
        raise UserError(f"the ranks' weights diverged (sha256 {[d[:12] for d in digests]}); please report it with your config")
    if is_main():
        print(f"weights identical on all {len(digests)} ranks (sha256 {digests[0][:12]})")


def topk_correct(logits, targets, ks=(1, 5)) -> list:
    """Number of samples whose target is among the top-k logits, for each k (tensors, no host sync)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (B, k)
    hits = top == targets[:, None]
    return [hits[:, :k].sum() for k in ks]


def default_workers(device) -> int:
    """Loader processes. On a GPU the JPEG pipeline is the bottleneck: every core of this process's
    share decodes. On a CPU the model's intra-op threads already use every core, so images are decoded
    in the main process between batches (0): a loader process beside the model competes for the same
    cores. Measured on 2 cores (resnet18 eval, timed in turn with the model alone): 0 workers reach
    73-88% of the model's speed (median 84%), 1 worker 81-91% (median 83%): README Performance."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return min(per_process, 16) if device.type == "cuda" else 0


# ----------------------------------------------------------------------------- configuration

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes end as one 'error: ...' line (through cli) instead of usage + exit."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)  # --epoch is a typo, not --epochs

    def error(self, message):
        raise UserError(f"{message} (see --help)")


def _coerce(name: str, value, default):
    """A YAML or command-line value checked against the type of the field's default."""
    kind = type(default)
    if value is None or default is None and not isinstance(value, str):
        return value
    if default is None or isinstance(default, str):
        return value if isinstance(value, dict) else str(value)  # dict: a loss spec such as {focal: 1}
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, bool):
            return value
    elif isinstance(default, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value) if kind is float else int(value)
            if kind is int and float(value) != number:
                raise ValueError
            return number
        except (TypeError, ValueError):
            pass
    elif isinstance(default, (list, dict)) and isinstance(value, kind):
        return value
    article = "an" if kind.__name__[0] in "aeiou" else "a"
    raise UserError(f"config key '{name}' must be {article} {kind.__name__}, got {value!r}")


def load_config(cls, argv=None, description: str = ""):
    """Defaults (the dataclass) < --config YAML < --key value on the command line. Unknown keys, in
    the file or on the command line, are errors that suggest the closest valid key."""
    import dataclasses
    import yaml
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls()
    parser = ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of keys that differ from the defaults")
    for name, f in fields.items():
        default = getattr(defaults, name)
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, nargs="?", const="true", default=None, help=f"(default: {default})")
        elif isinstance(default, list):
            parser.add_argument(flag, nargs="*", default=None, help=f"(default: {default})")
        else:
            parser.add_argument(flag, default=None, help=f"(default: {default})")
    args, unknown = parser.parse_known_args(argv)
    for arg in unknown:
        if arg.startswith("--"):
            key = arg[2:].split("=")[0].replace("-", "_")
            flags = ["--" + name.replace("_", "-") for name in fields]
            raise UserError(f"unknown option {arg.split('=')[0]}{closest(arg.split('=')[0], flags)}")
        raise UserError(f"unexpected argument '{arg}' (options are --key value)")
    values = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"config file {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from e
        if not isinstance(values, dict):
            raise UserError(f"config file {path} must be a mapping of key: value")
        for key in values:
            if key not in fields:
                raise UserError(f"unknown key '{key}' in {path}{closest(key, fields)}")
    for name in fields:
        value = getattr(args, name)
        if value is not None:
            if isinstance(getattr(defaults, name), list):
                value = [yaml.safe_load(v) for v in value]
            elif getattr(defaults, name) is None or value.lstrip().startswith("{"):
                value = yaml.safe_load(value)
            values[name] = value
    return cls(**{name: _coerce(name, value, getattr(defaults, name)) for name, value in values.items()})


# ----------------------------------------------------------------------------- runs and checkpoints

def load_checkpoint(path, what: str = "checkpoint") -> dict:
    """torch.load with weights_only=True: a file whose pickle would run code is refused, not run."""
    import torch
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with a code payload, not a torch file at all
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot load {what} {path}: {first[:160]} (truncated or corrupt, or not a plain "
                        "weights file: only files that load with weights_only=True are accepted)") from e


def save_checkpoint(state: dict, path) -> None:
    """Atomic torch.save: after a crash, kill -9 or a full disk the previous file is still whole."""
    import torch
    atomic_write(path, lambda f: torch.save(state, f), mode="wb")


def run_dir_for(output, run_name: str, arch: str, resume: str) -> tuple[Path, Path | None]:
    """(run dir, checkpoint to resume from). A run never reuses another run's dir without --resume."""
    import time
    output = Path(output)
    if resume and resume != "auto":
        return (output / run_name if run_name else Path(resume).parent), Path(resume)
    if resume == "auto":
        if run_name:
            candidates = [output / run_name]
        else:  # the newest run of this architecture
            candidates = sorted((d for d in output.glob(f"{arch}-*") if (d / "last.pt").exists()),
                                key=lambda d: (d / "last.pt").stat().st_mtime, reverse=True)
        found = [d for d in candidates if (d / "last.pt").is_file()]
        if not found:
            where = output / run_name if run_name else f"{output}/{arch}-*"
            raise UserError(f"--resume auto found nothing to resume: no last.pt in {where}; "
                            "start a new run without --resume")
        return found[0], found[0] / "last.pt"
    if run_name:
        run_dir = output / run_name
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UserError(f"run dir {run_dir} already exists; continue it with --resume auto "
                            "or choose another --run-name")
        return run_dir, None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = output / f"{arch}-{stamp}", 1
    while run_dir.exists():
        n += 1
        run_dir = output / f"{arch}-{stamp}-{n}"
    return run_dir, None


def run_info(seed: int) -> dict:
    """Git commit, library versions, seed and command line, saved next to every run's checkpoints."""
    import platform
    import subprocess
    import torch
    import torchvision
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"git_commit": commit, "seed": seed, "command": " ".join(sys.argv), "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "world_size": world_size(),
            "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def setup_distributed(device_name: str):
    """The device of this process; under torchrun (WORLD_SIZE > 1) also the process group:
    NCCL on GPUs, gloo on CPUs."""
    import torch
    import torch.distributed as dist
    device = resolve_device(device_name)
    if world_size() > 1 and not is_distributed():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return device


def cleanup_distributed() -> None:
    if is_distributed():
        import torch.distributed as dist
        dist.destroy_process_group()


def merge_predictions(shards, samples) -> list[dict]:
    rows = []
    for shard in shards:
        if not shard:
            continue
        indices, targets, classes, probs = shard
        for i in range(len(indices)):
            rows.append({"index": int(indices[i]), "path": samples[int(indices[i])].path, "target": int(targets[i]),
                         "top5": classes[i].tolist(), "probs": [round(p, 6) for p in probs[i].tolist()]})
    return sorted(rows, key=lambda row: row["index"])


def tensorboard_writer(run_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
