"""What every script shares: user-facing errors and the command line, devices and mixed precision,
distributed helpers, and atomic file and checkpoint I/O. Nothing here knows about a
particular model or dataset."""

import argparse
import difflib
import functools
import os
import statistics
import sys
import tempfile
import time
import typing
from pathlib import Path
from typing import Literal

# ----------------------------------------------------------------------------- errors and the command line


class UserError(Exception):
    """A problem the user can fix (bad path, bad config, missing weights): printed as one line."""


def closest(name: str, choices, n: int = 3) -> str:
    """' (did you mean a, b?)' for the closest valid names, or '' when nothing is close."""
    matches = difflib.get_close_matches(str(name), list(choices), n=n, cutoff=0.5)
    return f" (did you mean {', '.join(matches)}?)" if matches else ""


def cli(main):
    """Run an entry point: a UserError becomes one 'error: ...' line on stderr and exit code 2; Ctrl-C
    one line and exit code 130, with what to do next where the entry point says (KeyboardInterrupt(text))."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        for stream in (sys.stdout, sys.stderr):  # printing a file name that is not valid UTF-8 must not fail
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except BaseException as e:
            interrupt = interrupt_in(e)
            if interrupt is None:
                raise
            text = interrupt.args[0] if interrupt.args else "interrupted; finished results and checkpoints are kept"
            print(f"error: {text}", file=sys.stderr)
            sys.exit(130)

    return wrapper


def interrupt_in(error: BaseException | None) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt behind an error: Ctrl-C inside torch.save surfaces as the RuntimeError its
    half-written zip raises while the interrupt is handled."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return error
        error = error.__cause__ or error.__context__
    return None


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes end as one 'error: ...' line (through cli) instead of usage + exit."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)  # keep the docstring's layout
        super().__init__(*args, allow_abbrev=False, **kwargs)  # --epoch is a typo, not --epochs

    def error(self, message):
        raise UserError(f"{message} (see --help)")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an unknown option suggests the closest known one (--model: --models)."""
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            flag = unknown[0].split("=")[0]
            if not flag.startswith("-"):
                raise UserError(f"unexpected argument '{flag}' (see --help)")
            known = [option for action in self._actions for option in action.option_strings]
            raise UserError(f"unknown option {flag}{closest(flag, known)} (see --help)")
        return parsed


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


# The options every job shares: the same names, choices and defaults in train.py (TrainConfig's fields),
# test_torchvision.py, benchmark.py and predict.py. "auto" is each job's best choice, given here.
Device = Literal["auto", "cpu", "cuda"]
Amp = Literal["auto", "none", "bf16", "fp16"]
ChannelsLast = Literal["auto", "true", "false"]
RUNTIME_HELP = {
    "device": "auto (the GPU when there is one) | cpu | cuda",
    "amp": "autocast dtype: auto (bf16 when training on CUDA, otherwise off: evaluation stays exact) | none | bf16 "
    "| fp16 (training: with a GradScaler)",
    "channels_last": "NHWC memory layout: auto (evaluation always, training on CUDA) | true | false",
    "workers": "loader processes per process (default: dataset.default_workers)",
}


def add_runtime_args(parser: argparse.ArgumentParser, batch_size: int | None = None) -> None:
    """--device, --amp, --channels-last and, with a default batch size, --batch-size and --workers."""
    group = parser.add_argument_group("runtime")
    for name, choices in (("device", Device), ("amp", Amp), ("channels_last", ChannelsLast)):
        flag = "--" + name.replace("_", "-")
        group.add_argument(flag, choices=typing.get_args(choices), default="auto", help=RUNTIME_HELP[name])
    if batch_size is not None:
        group.add_argument("--batch-size", type=positive_int, default=batch_size, help=f"(default: {batch_size})")
        group.add_argument("--workers", type=non_negative_int, default=None, help=RUNTIME_HELP["workers"])


# ----------------------------------------------------------------------------- devices and mixed precision


def resolve_device(name: Device = "auto"):
    """This process's device: under torchrun, the GPU of its local rank."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank())


def amp_dtype(name: Amp, device, training: bool):
    """The autocast dtype of --amp; None = off. auto: bf16 for training on CUDA; evaluation stays fp32,
    so that its results equal the module's own arithmetic."""
    import torch

    if name == "auto":
        name = "bf16" if training and device.type == "cuda" else "none"
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def amp_name(dtype) -> str:
    """The --amp value of an autocast dtype from amp_dtype: none, bf16 or fp16 (for result rows)."""
    return next(name for name in ("none", "bf16", "fp16") if amp_dtype(name, None, True) == dtype)


def use_channels_last(name: ChannelsLast, device, training: bool) -> bool:
    """auto: always for evaluation (oneDNN's and cuDNN's fast layout), for training on CUDA only (on a
    CPU the backward pass of channels_last convolutions is slower)."""
    if name == "auto":
        return not training or device.type == "cuda"
    return name == "true"


def autocast(device, dtype):
    """torch.autocast in `dtype` (from amp_dtype); a no-op for None."""
    import torch

    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


# ----------------------------------------------------------------------------- distributed


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


def setup_distributed(device_name: Device):
    """The device of this process; under torchrun (any --nproc_per_node, 1 too, as torchvision's
    references do) also the process group: NCCL on GPUs, gloo on CPUs."""
    import torch
    import torch.distributed as dist

    device = resolve_device(device_name)
    if (world_size() > 1 or "TORCHELASTIC_RUN_ID" in os.environ) and not is_distributed():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device


def process_group_name() -> str:
    """'nccl' or 'gloo' under torchrun, 'none' in a plain process (for run headers)."""
    if not is_distributed():
        return "none"
    import torch.distributed as dist

    return str(dist.get_backend())


def cleanup_distributed() -> None:
    if is_distributed():
        import torch.distributed as dist

        dist.destroy_process_group()


def all_reduce_sum(tensor):
    """Sum over ranks in place (no-op in one process)."""
    if is_distributed():
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in one process)."""
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


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


# ----------------------------------------------------------------------------- files and checkpoints


def atomic_write(path, write_fn, mode: str = "w") -> None:
    """Write through a temp file in the same folder, fsync, then rename over `path`, so readers
    see the old file or the new one, never half of one (also after kill -9 or a full disk)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except (FileExistsError, NotADirectoryError) as e:  # e.g. --out names a file
        raise UserError(f"cannot write {path}: {e.filename} is a file, not a folder; choose another folder") from e
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e
    try:
        os.fchmod(fd, _new_file_mode())  # mkstemp makes 0600; results are for colleagues to read too
        # text: file names that are not valid UTF-8 (scraped datasets) are written back as their bytes
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "errors": "surrogateescape"})) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"could not write {path}: {e.strerror or e}; the previous file is intact") from e
        raise


def _new_file_mode() -> int:
    """The permissions open() gives a new file under the current umask (0o644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


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
        raise UserError(
            f"cannot load {what} {path}: {first[:160]} (truncated or corrupt, or not a plain "
            "weights file: only files that load with weights_only=True are accepted)"
        ) from e


def save_checkpoint(state: dict, path) -> None:
    """Atomic torch.save: after a crash, kill -9 or a full disk the previous file is still whole."""
    import torch

    atomic_write(path, lambda f: torch.save(state, f), mode="wb")


def timed(runs: dict, repeats: int, device) -> dict:
    """runs: name -> (function, images one call processes). One untimed warm-up call of each, then
    `repeats` rounds that time each once, in turn, so that drifts of the machine's speed (large on
    shared VMs) hit all of them alike. name -> {img/s of the median call, seconds of every call}."""
    import torch

    sync = functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else lambda: None
    for run, _ in runs.values():
        run()
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (run, _) in runs.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            seconds[name].append(time.perf_counter() - start)
    return {
        name: {"img_per_s": runs[name][1] / statistics.median(s), "seconds": [round(x, 3) for x in s]}
        for name, s in seconds.items()
    }
