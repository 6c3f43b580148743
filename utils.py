"""What every script shares: user-facing errors and the command line, config loading, devices and
mixed precision, distributed helpers, and atomic file and checkpoint I/O. Nothing here knows about a
particular model or dataset."""

import argparse
import dataclasses
import difflib
import functools
import os
import sys
import tempfile
import types
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes end as one 'error: ...' line (through cli) instead of usage + exit."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)  # keep the docstring's layout
        super().__init__(*args, allow_abbrev=False, **kwargs)  # --epoch is a typo, not --epochs

    def error(self, message):
        raise UserError(f"{message} (see --help)")


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


# ----------------------------------------------------------------------------- configuration


def _unwrap_optional(hint) -> tuple[object, bool]:
    """(X, True) for `X | None`, else (hint, False)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True  # noqa: UP007 (built at run time)
    return hint, False


def _coerce(name: str, value, hint):
    """A YAML or command-line value checked against the field's type annotation."""
    hint, optional = _unwrap_optional(hint)
    if optional and isinstance(value, str) and value.lower() in ("none", "null"):
        value = None
    if value is None:
        if optional:
            return None
        raise UserError(f"config key '{name}' needs a value")
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        text = str(value).lower() if isinstance(value, bool) else str(value)  # YAML reads `true` as a bool
        if text not in choices:
            raise UserError(f"{name} must be one of {', '.join(choices)}, got '{value}'")
        return text
    if typing.get_origin(hint) in (typing.Union, types.UnionType):  # str | dict: a loss name or spec
        return value if isinstance(value, dict) else str(value)
    kind = typing.get_origin(hint) or hint
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, bool):
            return value
    elif kind in (int, float) and not isinstance(value, bool):
        try:
            number = kind(float(value)) if kind is float else int(value)
            if kind is int and float(value) != number:
                raise ValueError
            return number
        except (TypeError, ValueError):
            pass
    elif kind is str:
        return str(value)
    elif kind is list and isinstance(value, list):
        item = (typing.get_args(hint) or (None,))[0]
        return value if item is None else [_coerce(f"{name} item", v, item) for v in value]
    article = "an" if kind.__name__[0] in "aeiou" else "a"
    raise UserError(f"config key '{name}' must be {article} {kind.__name__}, got {value!r}")


def _read_yaml_config(path) -> dict:
    import yaml

    path = Path(path)
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
    return values


def load_config(cls, argv=None, description: str = ""):
    """Defaults (the dataclass) < --config YAML < --key value on the command line. Each value is
    checked against its field's annotation (a Literal lists the choices). Unknown keys, in the file or
    on the command line, are errors that suggest the closest valid key."""
    import yaml

    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = cls()
    parser = ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML file of keys that differ from the defaults")
    for name in fields:
        default, kind = getattr(defaults, name), _unwrap_optional(hints[name])[0]
        flag, help_text = "--" + name.replace("_", "-"), f"{RUNTIME_HELP.get(name, '')} (default: {default})"
        if kind is bool:
            parser.add_argument(flag, nargs="?", const="true", default=None, help=help_text)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, nargs="*", default=None, help=help_text)
        else:
            parser.add_argument(flag, default=None, help=help_text)
    args, unknown = parser.parse_known_args(argv)
    for arg in unknown:
        if arg.startswith("--"):
            flags = ["--" + name.replace("_", "-") for name in fields]
            raise UserError(f"unknown option {arg.split('=')[0]}{closest(arg.split('=')[0], flags)}")
        raise UserError(f"unexpected argument '{arg}' (options are --key value)")
    values = _read_yaml_config(args.config) if args.config else {}
    for key in values:
        if key not in fields:
            raise UserError(f"unknown key '{key}' in {args.config}{closest(key, fields)}")
    for name in fields:
        value = getattr(args, name)
        if value is None:
            continue
        if isinstance(value, list):
            value = [yaml.safe_load(v) for v in value]
        elif value.lstrip().startswith("{"):  # a loss spec such as {focal: 1.0, smooth_l1: 1.0}
            value = yaml.safe_load(value)
        values[name] = value
    return cls(**{name: _coerce(name, value, hints[name]) for name, value in values.items()})


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
    """The device of this process; under torchrun (WORLD_SIZE > 1) also the process group:
    NCCL on GPUs, gloo on CPUs."""
    import torch
    import torch.distributed as dist

    device = resolve_device(device_name)
    if world_size() > 1 and not is_distributed():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device


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
