"""Training configuration: every option with its default and why (TrainConfig), the checks of their
bounds, and load_config, which makes each field a train.py option (--key value) and checks values
against the field's annotation (a Literal lists the choices). Precedence: defaults < --config YAML <
command line."""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from loss import check_label_smoothing
from model import check_arch
from presets import AutoAugment, Interpolation, TrainPresetName, check_crop_fits
from utils import RUNTIME_HELP, Amp, ArgumentParser, ChannelsLast, Device, UserError, closest


@dataclass
class TrainConfig:
    # data and model
    data: str = ""  # ImageFolder root with train/ and val/ (any class names), or tar shards (shards.py)
    arch: str = "resnet18"  # any name in torchvision.models.list_models()
    weights: str | None = None  # start from pretrained weights (DEFAULT, IMAGENET1K_V2, a .pth) to fine-tune
    weights_dir: str | None = None  # folder of downloaded torchvision .pth files; none: torchvision's cache
    num_classes: int | None = None  # from the train folder's classes unless set; a new head when it differs
    dropout: float | None = None  # the architecture's dropout probability, where it has one
    dummy: bool = False  # synthetic images instead of --data, for throughput runs (no checkpoints are written)
    dummy_size: int = 512  # images per epoch with --dummy
    # schedule (torchvision's V1 recipe: 90 epochs, batch 256, SGD 0.1, StepLR 30 x 0.1)
    epochs: int = 90
    batch_size: int = 32  # per process; the global batch is batch_size x world size
    lr: float = 0.1  # for the global batch, unless lr_scaling = linear
    lr_scaling: Literal["none", "linear"] = "none"  # linear: lr x global_batch / 256 (Goyal et al.)
    optimizer: Literal["sgd", "adamw", "rmsprop"] = "sgd"  # rmsprop: alpha 0.9, eps 0.0316 as torchvision
    momentum: float = 0.9  # sgd and rmsprop
    nesterov: bool = False
    weight_decay: float = 1e-4
    norm_weight_decay: float | None = None  # for normalisation layers' parameters; none: weight_decay
    bias_weight_decay: float | None = None  # for every parameter named bias; none: weight_decay
    transformer_embedding_decay: float | None = None  # class token, position embeddings, relative position bias
    scheduler: Literal["step", "multistep", "cosine", "exponential"] = "step"  # all stepped once per epoch
    step_size: int = 30
    milestones: list[int] = field(default_factory=lambda: [30, 60, 80])
    lr_gamma: float = 0.1  # step, multistep and exponential (lr x gamma every epoch)
    lr_min: float = 0.0  # where cosine ends
    warmup_epochs: int = 0  # warmup from lr x warmup_factor (torchvision's --lr-warmup-decay)
    warmup_method: Literal["linear", "constant"] = "linear"  # constant: lr x warmup_factor, then lr
    warmup_factor: float = 0.01
    # loss: ce | focal | smooth_l1 | a weighted sum such as {focal: 1.0, smooth_l1: 1.0} (see loss.py)
    loss: str | dict = "ce"
    label_smoothing: float = 0.0
    # augmentation and eval preprocessing (presets.py)
    train_preset: TrainPresetName = "standard"  # standard (RandomResizedCrop + flip) | original (Resize + CenterCrop)
    train_crop_size: int = 224
    train_resize_size: int = 256  # used by the original preset
    val_resize_size: int = 256
    val_crop_size: int = 224
    interpolation: Interpolation = "bilinear"
    auto_augment: AutoAugment = "none"  # after crop and flip: TrivialAugmentWide | RandAugment | AutoAugment | AugMix
    ra_magnitude: int = 9  # RandAugment's magnitude (of 31 bins)
    augmix_severity: int = 3
    random_erase: float = 0.0  # probability of RandomErasing, applied to the normalised image
    mixup_alpha: float = 0.0  # > 0: MixUp; with cutmix_alpha too, one of the two at random per batch
    cutmix_alpha: float = 0.0
    ra_sampler: bool = False  # repeated augmentation: each image ra_reps times per epoch, on different ranks
    ra_reps: int = 3
    shard_shuffle_buffer: int = 2000  # tar shards: images each loader worker shuffles among (shards.py)
    # speed (the options every script shares: utils.add_runtime_args)
    amp: Amp = "auto"  # bf16 on CUDA; fp16 runs with a GradScaler
    channels_last: ChannelsLast = "auto"  # on for CUDA
    compile: bool = False  # torch.compile the model (minutes of compile, faster epochs)
    workers: int | None = None  # loader processes per rank; None = dataset.default_workers
    # regularisation
    ema_decay: float = 0.0  # > 0: an EMA of the weights, evaluated too; adjusted as torchvision's --model-ema-decay
    ema_steps: int = 32  # update the EMA every N steps; during warmup it copies the weights
    clip_grad_norm: float = 0.0  # > 0 clips the global gradient norm
    sync_bn: bool = False  # SyncBatchNorm across ranks
    # run
    device: Device = "auto"
    seed: int = 0
    deterministic: bool = False  # deterministic kernels (slower); CPU runs are reproducible anyway
    output: str = "checkpoints"
    run_name: str = ""  # default: ARCH-YYYYmmdd-HHMMSS
    resume: str = ""  # auto (this run's last.pt) | a checkpoint path
    save_every_steps: int = 0  # also write last.pt every N steps (resumes mid-epoch, exactly)
    log_interval: int = 20  # steps between progress updates (the only host syncs in the loop)
    skip_bad_images: bool = False  # skip unreadable images (listed at the end) instead of stopping


AT_LEAST_ONE = """epochs batch_size train_crop_size train_resize_size val_resize_size val_crop_size ema_steps
    log_interval dummy_size step_size ra_reps augmix_severity shard_shuffle_buffer""".split()
NON_NEGATIVE = """momentum weight_decay warmup_epochs clip_grad_norm ema_decay save_every_steps warmup_factor
    norm_weight_decay bias_weight_decay transformer_embedding_decay lr_min ra_magnitude mixup_alpha
    cutmix_alpha""".split()


def check_config(cfg: TrainConfig) -> TrainConfig:
    """The bounds that types can't say (load_config has checked types and choices), before anything runs."""
    for key in AT_LEAST_ONE:
        if getattr(cfg, key) < 1:
            raise UserError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    for key in NON_NEGATIVE:
        if (getattr(cfg, key) or 0) < 0:
            raise UserError(f"{key} must be non-negative, got {getattr(cfg, key)}")
    if cfg.lr <= 0:
        raise UserError(f"lr must be positive, got {cfg.lr}")
    if cfg.ema_decay >= 1:
        raise UserError(f"ema_decay must be below 1, got {cfg.ema_decay}")
    if cfg.warmup_epochs and not 0 < cfg.warmup_factor <= 1:
        raise UserError(f"warmup_factor must be in (0, 1], got {cfg.warmup_factor}")
    if cfg.nesterov and cfg.momentum == 0:
        raise UserError("nesterov needs a momentum above 0; drop --nesterov or set --momentum")
    for key in ("dropout", "random_erase"):
        if getattr(cfg, key) is not None and not 0 <= getattr(cfg, key) <= 1:
            raise UserError(f"{key} must be in [0, 1], got {getattr(cfg, key)}")
    if cfg.augmix_severity > 10:  # torchvision's ranges
        raise UserError(f"augmix_severity must be in 1..10, got {cfg.augmix_severity}")
    if cfg.ra_magnitude > 30:
        raise UserError(f"ra_magnitude must be in 0..30, got {cfg.ra_magnitude}")
    if cfg.num_classes is not None and cfg.num_classes < 1:
        raise UserError(f"num_classes must be at least 1, got {cfg.num_classes}")
    if cfg.workers is not None and cfg.workers < 0:
        raise UserError(f"workers must be non-negative, got {cfg.workers}")
    check_label_smoothing(cfg.label_smoothing)
    check_crop_fits(cfg.val_crop_size, cfg.val_resize_size, ("val_crop_size", "val_resize_size"))
    if cfg.train_preset == "original":  # Resize + CenterCrop: a larger crop would pad black borders
        check_crop_fits(cfg.train_crop_size, cfg.train_resize_size, ("train_crop_size", "train_resize_size"))
    check_arch(cfg.arch, int8=False)
    if not cfg.data and not cfg.dummy:
        raise UserError("no data: pass --data DIR (an ImageFolder root with train/ and val/) or --dummy")
    return cfg


# ----------------------------------------------------------------------------- loading


def _unwrap_optional(hint) -> tuple[object, bool]:
    """(X, True) for `X | None`, else (hint, False)."""
    args = typing.get_args(hint)
    if _is_union(hint) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


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
    if _is_union(hint):  # str | dict: a loss name or spec
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
        except (TypeError, ValueError, OverflowError):  # OverflowError: YAML's .inf for an int
            pass
    elif kind is str and isinstance(value, (str, int, float)):  # not a list or a mapping
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
    return parse_config(cls, argv, description)[0]


# where the run is, not how it trains: a resume keeps the ones of this command
NOT_INHERITED = ("resume", "output", "run_name", "device")


def resumed_config(cfg, saved: dict | None, given: frozenset | None) -> tuple:
    """(config, changes) of a resumed run: the settings saved in its checkpoint, except those this
    command gives (given: field names from --config or the command line; None: all of cfg's), so that
    `--run-name NAME --resume auto` alone continues the run as it was. changes: 'key old -> new' for
    each setting given that differs from the saved run."""
    if not saved:
        return cfg, []
    values = dataclasses.asdict(cfg)
    given = set(values) if given is None else set(given) | set(NOT_INHERITED)
    changes = []
    for name in values.keys() & saved.keys():
        if name not in given:
            values[name] = saved[name]
        elif values[name] != saved[name] and name not in NOT_INHERITED:
            changes.append(f"{name} {saved[name]} -> {values[name]}")
    return type(cfg)(**values), sorted(changes)


def resume_notes(cfg, saved: dict, epochs_done: int, saved_world: int, world: int) -> list[str]:
    """What a resume does that its command may not say: another global batch at the same lr (e.g. a
    torchrun run resumed with fewer processes), or nothing left to train."""
    notes = []
    before, now = saved.get("batch_size", cfg.batch_size) * saved_world, cfg.batch_size * world
    if before != now:
        notes.append(
            f"the global batch changes from {before} to {now} (--batch-size {cfg.batch_size} x {world} processes) "
            f"at lr {cfg.lr:g}: launch the run's {saved_world} processes, or scale --lr ({cfg.lr * now / before:g})"
        )
    if epochs_done >= cfg.epochs:
        notes.append(f"the run has done its {epochs_done} epochs: to train further, pass --epochs N above that")
    return notes


def parse_config(cls, argv=None, description: str = "") -> tuple:
    """(load_config's config, the names of the fields that --config or the command line set)."""
    import yaml

    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    parser = _config_parser(cls, hints, description)
    args = parser.parse_args(argv)
    values = _read_yaml_config(args.config) if args.config else {}
    for key in values:
        if key not in fields:
            raise UserError(f"unknown key '{key}' in {args.config}{closest(key, fields)}")
    for name in fields:
        value = getattr(args, name)
        if value is None:
            continue
        try:
            if isinstance(value, list):
                value = [yaml.safe_load(v) for v in value]
            elif dict in typing.get_args(hints[name]) and value.lstrip().startswith("{"):  # {focal: 1.0, ...}
                value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise UserError(f"--{name.replace('_', '-')} {value}: not valid YAML ({getattr(e, 'problem', e)})") from e
        values[name] = value
    return cls(**{name: _coerce(name, value, hints[name]) for name, value in values.items()}), frozenset(values)


def _config_parser(cls, hints: dict, description: str) -> ArgumentParser:
    """--key for every field, grouped and explained by the comments of the dataclass's source, so
    that --help says what TrainConfig says."""
    parser = ArgumentParser(description=description)
    parser.add_argument("--config", metavar="YAML", help="a file of keys that differ from the defaults")
    groups, defaults = _commented_fields(cls), cls()
    for title, comments in groups.items():
        group = parser.add_argument_group(title)
        for name, comment in comments.items():
            default, kind = getattr(defaults, name), _unwrap_optional(hints[name])[0]
            shown = "none" if default is None else default
            options = {"default": None, "help": f"{comment or RUNTIME_HELP.get(name, '')} (default: {shown})"}
            if typing.get_origin(kind) is Literal:
                options["metavar"] = "|".join(typing.get_args(kind))
            elif kind is bool:
                options.update(nargs="?", const="true", metavar="true|false")
            elif typing.get_origin(kind) is list:
                options.update(nargs="*", metavar="VALUE")
            else:
                options["metavar"] = {str: "TEXT", int: "INT", float: "FLOAT"}.get(kind, "SPEC")
            group.add_argument("--" + name.replace("_", "-"), **options)
    return parser


def _commented_fields(cls) -> dict[str, dict[str, str]]:
    """{section comment: {field: its trailing comment}} from the class's source, in order."""
    import inspect
    import re

    names = {f.name for f in dataclasses.fields(cls)}
    sections, title = {}, "options"
    for line in inspect.getsource(cls).splitlines()[1:]:
        section = re.match(r"^\s+# (.+)$", line)
        field_line = re.match(r"^\s+(\w+):[^#]*(?:#\s*(.*))?$", line)
        if section:
            title = section.group(1)
        elif field_line and field_line.group(1) in names:
            sections.setdefault(title, {})[field_line.group(1)] = field_line.group(2) or ""
    return sections
