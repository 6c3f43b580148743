"""Training configuration: every option with its default and why (TrainConfig, whose fields carry their
own --help text), where the values come from (defaults < a recipe or --config YAML < the command line,
each value checked against its field's annotation: a Literal lists the choices), the checks of their
bounds, what a resume keeps of its run's settings, and the recipe of all torchvision weights: the
config (configs/*.yaml) and settings that re-train them, found through the recipe link all weights
carry (weights.meta["recipe"]), or the reason none can.

    cfg = load_config(TrainConfig, ["--config", "configs/torchvision_v1.yaml", "--lr", "0.05"])
    argv = expand_recipe(["--recipe", "ResNet50_Weights.IMAGENET1K_V2", "--data", "/data/imagenet"])
"""

import argparse
import dataclasses
import shlex
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from torchvision import models

from dataset import is_shard_source
from loss import check_label_smoothing
from model import check_arch
from presets import AutoAugment, Interpolation, TestTimeAugmentation, TrainPresetName, check_crop_fits
from tracking import tracker_module
from utils import (
    RUNTIME_HELP,
    Amp,
    ArgumentParser,
    ChannelsLast,
    Device,
    UserError,
    closest,
    rank,
    world_size,
)


def option(default, help: str, group: str):
    """A TrainConfig field: its default, its --help text and the --help section it is listed in."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, "group": group})
    return field(default=default, metadata={"help": help, "group": group})


DATA = "data and model"
SCHEDULE = "schedule (torchvision's V1 recipe: 90 epochs, batch 256, SGD 0.1, StepLR 30 x 0.1)"
LOSS = "loss"
AUGMENT = "augmentation and eval preprocessing (presets.py)"
SPEED = "speed (the options every script shares)"
REGULARISE = "regularisation"
RUN = "run"


@dataclass
class TrainConfig:
    data: str = option("", "ImageFolder root with train/ and val/ (any class names), or tar shards", DATA)
    arch: str = option("resnet18", "any name in torchvision.models.list_models()", DATA)
    weights: str | None = option(
        None, "start from pretrained weights (DEFAULT, IMAGENET1K_V2, a .pth) to fine-tune", DATA
    )
    weights_dir: str | None = option(None, RUNTIME_HELP["weights_dir"], DATA)
    num_classes: int | None = option(
        None, "from the train folder's classes unless set; a new head when it differs", DATA
    )
    dropout: float | None = option(None, "the architecture's dropout probability, where it has one", DATA)
    dummy: bool = option(
        False, "synthetic images instead of --data, for throughput runs (no checkpoints are written)", DATA
    )
    dummy_size: int = option(512, "images per epoch with --dummy", DATA)
    limit: int | None = option(
        None, "a quick check: train and validate on N images each, spread over the classes", DATA
    )

    epochs: int = option(90, "epochs of the schedule", SCHEDULE)
    batch_size: int = option(
        32,
        "per process and forward pass; the global batch is batch_size x world size x accum_steps",
        SCHEDULE,
    )
    global_batch: int | None = option(
        None,
        "images per optimizer step, as the recipe configs state it: accum_steps follows, global_batch / "
        "(batch_size x world size); none: batch_size x world size x accum_steps",
        SCHEDULE,
    )
    accum_steps: int | None = option(
        None,
        "gradient accumulation: one optimizer step every N batches, the mean over their images; "
        "BatchNorm's statistics are those of each batch, as on N times the GPUs without sync_bn; none: "
        "from global_batch, else 1",
        SCHEDULE,
    )
    lr: float = option(0.1, "for the global batch, unless lr_scaling = linear", SCHEDULE)
    lr_scaling: Literal["none", "linear"] = option(
        "none", "linear: lr x global_batch / 256 (Goyal et al.)", SCHEDULE
    )
    optimizer: Literal["sgd", "adamw", "rmsprop"] = option(
        "sgd", "rmsprop: alpha 0.9, eps 0.0316 as torchvision", SCHEDULE
    )
    momentum: float = option(0.9, "of sgd and rmsprop", SCHEDULE)
    nesterov: bool = option(False, "Nesterov momentum (sgd)", SCHEDULE)
    weight_decay: float = option(1e-4, "L2 penalty of every parameter the next three leave at none", SCHEDULE)
    norm_weight_decay: float | None = option(
        None, "for normalisation layers' parameters; none: weight_decay", SCHEDULE
    )
    bias_weight_decay: float | None = option(
        None, "for every parameter named bias; none: weight_decay", SCHEDULE
    )
    transformer_embedding_decay: float | None = option(
        None, "class token, position embeddings, relative position bias; none: weight_decay", SCHEDULE
    )
    scheduler: Literal["step", "multistep", "cosine", "exponential", "triangular"] = option(
        "step",
        "the lr schedule, stepped once per epoch; triangular: FFCV's, set at every optimizer step",
        SCHEDULE,
    )
    step_size: int = option(30, "epochs between the step schedule's steps", SCHEDULE)
    milestones: list[int] = option([30, 60, 80], "epochs at which the multistep schedule steps", SCHEDULE)
    lr_gamma: float = option(0.1, "step, multistep and exponential (lr x gamma every epoch)", SCHEDULE)
    lr_min: float = option(0.0, "where cosine ends", SCHEDULE)
    lr_peak_epoch: int = option(
        2,
        "triangular: lr rises linearly from lr x 1e-4 at epoch 0 to lr here, then falls to 0 at the last "
        "epoch's end (FFCV's cyclic schedule: its own warmup)",
        SCHEDULE,
    )
    warmup_epochs: int = option(
        0, "warmup from lr x warmup_factor (torchvision's --lr-warmup-decay)", SCHEDULE
    )
    warmup_method: Literal["linear", "constant"] = option(
        "linear", "constant: lr x warmup_factor, then lr", SCHEDULE
    )
    warmup_factor: float = option(0.01, "the warmup's first lr, as a share of lr", SCHEDULE)

    loss: str | dict = option(
        "ce", "ce | focal | smooth_l1 | a weighted sum such as {focal: 1.0, smooth_l1: 1.0} (loss.py)", LOSS
    )
    label_smoothing: float = option(0.0, "of every loss term (F.cross_entropy's convention)", LOSS)

    train_preset: TrainPresetName = option(
        "standard", "standard (RandomResizedCrop + flip) | original (Resize + CenterCrop)", AUGMENT
    )
    train_crop_size: int = option(224, "the training images' size", AUGMENT)
    train_resize_size: int = option(256, "used by the original preset", AUGMENT)
    min_res: int | None = option(
        None,
        "progressive resizing (FFCV's): the train crop up to epoch start_ramp, in place of train_crop_size; "
        "none: train_crop_size every epoch",
        AUGMENT,
    )
    max_res: int | None = option(None, "progressive resizing: the train crop from epoch end_ramp on", AUGMENT)
    start_ramp: int = option(0, "progressive resizing: the last epoch (from 0) at min_res", AUGMENT)
    end_ramp: int = option(
        0,
        "progressive resizing: the first epoch at max_res; in between the crop grows linearly with the "
        "epoch, rounded to the nearest multiple of res_multiple",
        AUGMENT,
    )
    res_multiple: int = option(32, "progressive resizing: crops are multiples of it", AUGMENT)
    val_resize_size: int = option(256, "validation: the shorter side before the center crop", AUGMENT)
    val_crop_size: int = option(224, "validation: the center crop", AUGMENT)
    val_tta: TestTimeAugmentation = option(
        "none",
        "flip: validate each image and its mirror, by the mean of their logits (FFCV's lr_tta adds them: the "
        "same top-1 and top-5)",
        AUGMENT,
    )
    interpolation: Interpolation = option("bilinear", "of every resize, train and val", AUGMENT)
    auto_augment: AutoAugment = option(
        "none", "after crop and flip: TrivialAugmentWide | RandAugment | AutoAugment | AugMix", AUGMENT
    )
    ra_magnitude: int = option(9, "RandAugment's magnitude (of 31 bins)", AUGMENT)
    augmix_severity: int = option(3, "AugMix's severity (1..10)", AUGMENT)
    random_erase: float = option(
        0.0, "probability of RandomErasing, applied to the normalised image", AUGMENT
    )
    mixup_alpha: float = option(
        0.0, "> 0: MixUp; with cutmix_alpha too, one of the two at random per batch", AUGMENT
    )
    cutmix_alpha: float = option(0.0, "> 0: CutMix", AUGMENT)
    ra_sampler: bool = option(
        False, "repeated augmentation: each image ra_reps times per epoch, on different ranks", AUGMENT
    )
    drop_last: bool = option(
        True,
        "drop each epoch's last partial batch of an image folder: the references keep it (their recipes here "
        "too), and a batch of a few images then updates BatchNorm's statistics just before validation",
        AUGMENT,
    )
    ra_reps: int = option(3, "copies of each image per epoch with ra_sampler", AUGMENT)
    shard_shuffle_buffer: int = option(2000, "tar shards: images each loader worker shuffles among", AUGMENT)

    amp: Amp = option("auto", RUNTIME_HELP["amp"], SPEED)
    channels_last: ChannelsLast = option("auto", RUNTIME_HELP["channels_last"], SPEED)
    compile: bool = option(False, RUNTIME_HELP["compile"], SPEED)
    workers: int | None = option(None, RUNTIME_HELP["workers"], SPEED)
    decode: Literal["cpu", "gpu"] = option(
        "cpu",
        "gpu: the loader workers only read the files; JPEGs are decoded in batches on the GPU (nvJPEG) and "
        "cropped, resized and flipped there, with the boxes the CPU path draws. The V1 augmentation only "
        "(no auto_augment, random_erase: those recipes augment on the CPU); on a CPU device, a note and the "
        "CPU path",
        SPEED,
    )
    reduced_decode: bool = option(
        False,
        "decode a JPEG at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling) when its random crop is shrunk "
        "by at least that much: the same boxes, slightly smoother pixels, fewer cycles per image "
        "(docs/performance.md)",
        SPEED,
    )

    ema_decay: float = option(
        0.0,
        "> 0: an EMA of the weights, evaluated too; adjusted as torchvision's --model-ema-decay",
        REGULARISE,
    )
    ema_steps: int = option(
        32, "update the EMA every N steps; during warmup it copies the weights", REGULARISE
    )
    clip_grad_norm: float = option(0.0, "> 0 clips the global gradient norm", REGULARISE)
    sync_bn: bool = option(False, "SyncBatchNorm across ranks", REGULARISE)

    device: Device = option("auto", RUNTIME_HELP["device"], RUN)
    seed: int = option(0, "of the initial weights, the data order and every augmentation", RUN)
    deterministic: bool = option(
        False, "deterministic kernels (slower); CPU runs are reproducible anyway", RUN
    )
    output: str = option("checkpoints", "the folder of the runs' folders", RUN)
    run_name: str = option("", "the run's folder in --output (default: ARCH-YYYYmmdd-HHMMSS)", RUN)
    resume: str = option("", "auto (this run's last.pt) | a checkpoint path", RUN)
    save_every_steps: int = option(0, "also write last.pt every N steps (resumes mid-epoch, exactly)", RUN)
    log_interval: int = option(20, "steps between progress updates (the only host syncs in the loop)", RUN)
    skip_bad_images: bool = option(
        False, "skip unreadable images (listed at the end) instead of stopping", RUN
    )
    tracker: Literal["none", "wandb", "mlflow"] = option(
        "none", "also log the config, each epoch's metrics and the run's files to W&B or MLflow", RUN
    )
    tracker_project: str = option("imagenet-classification", "the W&B project or MLflow experiment", RUN)


def setting(key: str) -> str:
    """A config key as the user gives it: on the command line or in a --config file."""
    return f"--{key.replace('_', '-')} (config key {key})"


AT_LEAST_ONE = (
    "epochs batch_size train_crop_size train_resize_size val_resize_size val_crop_size ema_steps "
    "log_interval dummy_size step_size ra_reps augmix_severity shard_shuffle_buffer res_multiple"
).split()
NON_NEGATIVE = (
    "momentum weight_decay warmup_epochs clip_grad_norm ema_decay save_every_steps warmup_factor "
    "norm_weight_decay bias_weight_decay transformer_embedding_decay lr_min ra_magnitude mixup_alpha "
    "cutmix_alpha start_ramp end_ramp"
).split()


def check_config(cfg: TrainConfig) -> TrainConfig:
    """The bounds that types can't say (load_config has checked types and choices), before anything runs."""
    for key in AT_LEAST_ONE:
        if getattr(cfg, key) < 1:
            raise UserError(f"{setting(key)} must be at least 1, got {getattr(cfg, key)}")
    for key in NON_NEGATIVE:
        if (getattr(cfg, key) or 0) < 0:
            raise UserError(f"{setting(key)} must be non-negative, got {getattr(cfg, key)}")
    if cfg.lr <= 0:
        raise UserError(f"{setting('lr')} must be positive, got {cfg.lr}")
    if cfg.ema_decay >= 1:
        raise UserError(f"{setting('ema_decay')} must be below 1, got {cfg.ema_decay}")
    if cfg.warmup_epochs and not 0 < cfg.warmup_factor <= 1:
        raise UserError(f"{setting('warmup_factor')} must be in (0, 1], got {cfg.warmup_factor}")
    if cfg.nesterov and cfg.momentum == 0:
        raise UserError("nesterov needs a momentum above 0; drop --nesterov or set --momentum")
    for key in ("dropout", "random_erase"):
        if getattr(cfg, key) is not None and not 0 <= getattr(cfg, key) <= 1:
            raise UserError(f"{setting(key)} must be in [0, 1], got {getattr(cfg, key)}")
    if cfg.augmix_severity > 10:  # torchvision's ranges
        raise UserError(f"{setting('augmix_severity')} must be in 1..10, got {cfg.augmix_severity}")
    if cfg.ra_magnitude > 30:
        raise UserError(f"{setting('ra_magnitude')} must be in 0..30, got {cfg.ra_magnitude}")
    for key in ("limit", "global_batch", "accum_steps", "min_res", "max_res"):  # none, or a count
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise UserError(f"{setting(key)} must be at least 1, got {getattr(cfg, key)}")
    if cfg.limit and (cfg.dummy or is_shard_source(cfg.data)):
        raise UserError(
            "--limit picks images from folders; --dummy has --dummy-size, and tar shards are streamed whole"
        )
    if cfg.num_classes is not None and cfg.num_classes < 1:
        raise UserError(f"{setting('num_classes')} must be at least 1, got {cfg.num_classes}")
    if cfg.workers is not None and cfg.workers < 0:
        raise UserError(f"{setting('workers')} must be non-negative, got {cfg.workers}")
    check_schedule(cfg)
    check_resolution_ramp(cfg)
    check_decoding(cfg)
    check_label_smoothing(cfg.label_smoothing)
    check_crop_fits(cfg.val_crop_size, cfg.val_resize_size, ("val_crop_size", "val_resize_size"))
    if cfg.train_preset == "original":  # Resize + CenterCrop: a larger crop would pad black borders
        check_crop_fits(cfg.train_crop_size, cfg.train_resize_size, ("train_crop_size", "train_resize_size"))
    check_arch(cfg.arch, int8=False)
    if not cfg.data and not cfg.dummy:
        raise UserError("no data: pass --data DIR (an ImageFolder root with train/ and val/) or --dummy")
    tracker_module(cfg.tracker)  # its package is installed, before the run folder exists
    return cfg


def check_decoding(cfg: TrainConfig) -> None:
    """--decode gpu runs the V1 augmentation on the device; --reduced-decode needs a random crop."""
    if cfg.decode == "gpu":
        policies = [
            f"--{key.replace('_', '-')} {value}"
            for key, value in (("auto_augment", cfg.auto_augment), ("random_erase", cfg.random_erase))
            if value not in ("none", 0, 0.0)
        ]
        if cfg.train_preset != "standard" or policies:
            what = policies or [f"--train-preset {cfg.train_preset}"]
            raise UserError(
                "--decode gpu crops, resizes and flips on the GPU (the V1 augmentation), not "
                f"{', '.join(what)}; drop --decode gpu (these recipes augment on the CPU) or those options"
            )
        if cfg.reduced_decode:
            raise UserError("--reduced-decode is a CPU decoder's option; drop it or --decode gpu")
    if cfg.reduced_decode and cfg.train_preset != "standard":
        raise UserError(
            f"--reduced-decode shrinks the decode of a random crop; the {cfg.train_preset} preset has none: "
            "drop --reduced-decode"
        )


def check_schedule(cfg: TrainConfig) -> None:
    """The triangular schedule rises to its peak and falls to 0 within the run, and is its own warmup."""
    if cfg.scheduler != "triangular":
        return
    if cfg.warmup_epochs:
        raise UserError(
            "the triangular schedule warms up by itself (up to --lr-peak-epoch); drop --warmup-epochs"
        )
    if not 1 <= cfg.lr_peak_epoch < cfg.epochs:
        raise UserError(
            f"{setting('lr_peak_epoch')} must be in 1..{cfg.epochs - 1} (below --epochs {cfg.epochs}), "
            f"got {cfg.lr_peak_epoch}"
        )


def check_resolution_ramp(cfg: TrainConfig) -> None:
    """Progressive resizing: both ends or neither, in order, multiples of res_multiple (FFCV's ramp then
    never leaves them), and the original preset's fixed Resize + CenterCrop has no crop to grow."""
    given = (cfg.min_res is not None) + (cfg.max_res is not None)
    if given == 1:
        raise UserError("progressive resizing needs both --min-res and --max-res (or neither)")
    if not given:
        return
    if cfg.train_preset == "original":
        raise UserError("progressive resizing grows RandomResizedCrop's output: use --train-preset standard")
    for key in ("min_res", "max_res"):
        size, multiple = getattr(cfg, key), cfg.res_multiple
        if size % multiple:
            raise UserError(
                f"{key} {size} is not a multiple of res_multiple {multiple}; the ramp's crops are, so use "
                f"e.g. {max(1, round(size / multiple)) * multiple}"
            )
    if cfg.min_res > cfg.max_res:
        raise UserError(
            f"min_res {cfg.min_res} is above max_res {cfg.max_res}; the crop grows from min to max"
        )
    if cfg.start_ramp > cfg.end_ramp:
        raise UserError(f"start_ramp {cfg.start_ramp} is after end_ramp {cfg.end_ramp}")


def with_accumulation(cfg: TrainConfig, world: int) -> TrainConfig:
    """The config with both global_batch and accum_steps set for a run of `world` processes: the one
    given derives the other (neither: no accumulation), both must agree; a global batch that
    batch_size x world doesn't divide is refused, with the nearest --batch-size that fits."""
    per_pass = cfg.batch_size * world
    if cfg.global_batch is None:
        steps = cfg.accum_steps or 1
        return dataclasses.replace(cfg, accum_steps=steps, global_batch=per_pass * steps)
    steps, rest = divmod(cfg.global_batch, per_pass)
    processes = f"{world} process{'es' * (world > 1)}"
    if rest or not steps:
        if cfg.global_batch % world:
            hint = f"launch a number of processes that divides {cfg.global_batch}"
        else:
            share = cfg.global_batch // world  # images per process and optimizer step
            fits = max(b for b in range(1, min(cfg.batch_size, share) + 1) if share % b == 0)
            hint = f"e.g. --batch-size {fits} ({share // fits} accumulation steps)"
        raise UserError(
            f"--global-batch {cfg.global_batch} is not a multiple of --batch-size {cfg.batch_size} x "
            f"{processes} = {per_pass}: {hint}, or pass another --global-batch"
        )
    if cfg.accum_steps is not None and cfg.accum_steps != steps:
        raise UserError(
            f"--accum-steps {cfg.accum_steps} and --global-batch {cfg.global_batch} disagree: --batch-size "
            f"{cfg.batch_size} x {processes} x {steps} accumulation steps make {cfg.global_batch}; give one"
        )
    return dataclasses.replace(cfg, accum_steps=steps)


def describe_global_batch(cfg: TrainConfig, world: int) -> str:
    """'global batch 1024 = 128 per step x 1 process x 8 accumulation steps' (cfg: with_accumulation's)."""
    steps = cfg.accum_steps
    return (
        f"global batch {cfg.global_batch} = {cfg.batch_size} per step x {world} "
        f"process{'es' * (world > 1)} x {steps} accumulation step{'s' * (steps > 1)}"
    )


# ----------------------------------------------------------------------------- loading


def load_config(cls, argv=None, description: str = ""):
    """Defaults (the dataclass) < --config YAML < --key value on the command line. Each value is
    checked against its field's annotation (a Literal lists the choices). Unknown keys, in the file or
    on the command line, are errors that suggest the closest valid key."""
    return parse_config(cls, argv, description)[0]


def parse_config(cls, argv=None, description: str = "") -> tuple:
    """(load_config's config, the names of the fields that --config or the command line set)."""
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    args = config_parser(cls, description).parse_args(argv)
    values = _read_yaml_config(args.config) if args.config else {}
    in_file = set(values)  # less those the command line sets below
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
            raise UserError(
                f"--{name.replace('_', '-')} {value}: not valid YAML ({getattr(e, 'problem', e)})"
            ) from e
        values[name] = value
        in_file.discard(name)
    coerced = {}
    for name, value in values.items():
        try:
            coerced[name] = _coerce(name, value, hints[name])
        except UserError as e:
            if name not in in_file:
                raise
            raise UserError(f"{e} in {args.config}") from None  # a value of the file's: say which file
    return cls(**coerced), frozenset(values)


def config_parser(cls, description: str = "") -> ArgumentParser:
    """--key for every field, in the sections and with the help text of the fields' metadata (option)."""
    hints = typing.get_type_hints(cls)
    parser = ArgumentParser(description=description)
    parser.add_argument("--config", metavar="YAML", help="a file of keys that differ from the defaults")
    parser.add_argument(
        "--recipe",
        metavar="WEIGHTS",
        help="the config and settings torchvision trained these weights with (e.g. "
        "ResNet50_Weights.IMAGENET1K_V2; docs/recipes.md), in place of --config; other options override it",
    )
    groups, defaults = {}, cls()
    for f in dataclasses.fields(cls):
        title = f.metadata.get("group", "options")
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        default, kind = getattr(defaults, f.name), _unwrap_optional(hints[f.name])[0]
        shown = "none" if default is None else default
        # default None: a field the command line leaves out keeps the YAML's value or the dataclass's
        options = {"default": None, "help": f"{f.metadata.get('help', '')} (default: {shown})"}
        if typing.get_origin(kind) is Literal:
            options["metavar"] = "|".join(typing.get_args(kind))
        elif kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            options.update(nargs="*", metavar="VALUE")
        else:
            options["metavar"] = {str: "TEXT", int: "INT", float: "FLOAT"}.get(kind, "SPEC")
        groups[title].add_argument("--" + f.name.replace("_", "-"), **options)
    return parser


def _read_yaml_config(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist; pass a YAML file (configs/ holds the recipes')")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"config file {path} is not valid YAML{where}: {getattr(e, 'problem', e)}") from e
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must be a mapping of key: value")
    return values


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
        raise UserError(f"{setting(name)} needs a value")
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        text = str(value).lower() if isinstance(value, bool) else str(value)  # YAML reads `true` as a bool
        if text not in choices:
            raise UserError(f"{setting(name)} must be one of {', '.join(choices)}, got '{value}'")
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
        return value if item is None else [_coerce(name, v, item) for v in value]
    article = "an" if kind.__name__[0] in "aeiou" else "a"
    raise UserError(f"{setting(name)} must be {article} {kind.__name__}, got {value!r}")


# ----------------------------------------------------------------------------- resuming

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
    if "optimizer" in given and saved.get("optimizer", values["optimizer"]) != values["optimizer"]:
        # the saved optimizer state has another optimizer's fields (torch fails at its first step)
        raise UserError(
            f"the run was trained with --optimizer {saved['optimizer']}, whose state its checkpoint holds; "
            f"resume with --optimizer {saved['optimizer']} (or leave it out), or start a new run from its "
            "weights with --weights"
        )
    if "arch" in given and saved.get("arch", values["arch"]) != values["arch"]:  # its weights are that arch's
        raise UserError(
            f"the run trained a {saved['arch']}; resume it with --arch {saved['arch']} (or leave --arch "
            f"out), or train a {values['arch']} as a new run (another --run-name)"
        )
    changes = []
    for name in values.keys() & saved.keys():
        if name not in given:
            values[name] = saved[name]
        elif values[name] != saved[name] and name not in NOT_INHERITED:
            changes.append(f"{name} {saved[name]} -> {values[name]}")
    # The global batch is what the run keeps: its accumulation steps follow from this command's batch and
    # processes (with_accumulation), unless the command gives them, and then the global batch follows.
    if "accum_steps" not in given:
        values["accum_steps"] = None
    elif "global_batch" not in given:
        values["global_batch"] = None
    return type(cfg)(**values), sorted(changes)


def resume_notes(cfg, saved: dict, epochs_done: int, saved_world: int, world: int) -> list[str]:
    """What a resume does that its command may not say: another global batch at the same lr (a run from
    before global_batch was recorded resumed on fewer processes, or another --accum-steps), or nothing left
    to train."""
    cfg, notes = with_accumulation(cfg, world), []
    before = saved.get("global_batch") or saved.get("batch_size", cfg.batch_size) * saved_world
    now = cfg.global_batch
    if before != now:
        notes.append(
            f"the {describe_global_batch(cfg, world)} differs from the run's {before}, at lr "
            f"{cfg.lr:g}: pass --global-batch {before} to keep the run's (accumulating gradients), or "
            f"scale --lr ({cfg.lr * now / before:g})"
        )
    if epochs_done >= cfg.epochs:
        notes.append(
            f"the run has done its {epochs_done} epochs: to train further, pass --epochs N above that"
        )
    return notes


# ----------------------------------------------------------------------------- recipes

REFS = "https://github.com/pytorch/vision/tree/main/references/classification"
NEW_RECIPE = "https://github.com/pytorch/vision/issues/3995"  # the blog post's recipe and its variants
PR = "https://github.com/pytorch/vision/pull/"
RECIPES_DOC = Path(__file__).parent / "docs" / "recipes.md"


@dataclass(frozen=True)
class Recipe:
    config: str | None  # a file in configs/; None: these weights can't be re-trained from ImageNet-1k here
    settings: dict = field(default_factory=dict)  # on top of the config
    note: str = ""  # what differs, what is unconfirmed, or why it is not reproducible


def ported(source: str) -> Recipe:
    return Recipe(None, note=f"not trained by torchvision: {source}")


V1, V2 = "torchvision_v1.yaml", "torchvision_v2.yaml"
BY_RECIPE_LINK = {
    f"{REFS}#resnet": Recipe(V1),
    f"{REFS}#alexnet-and-vgg": Recipe(V1, {"lr": 0.01}, "lr 0.01 without BatchNorm, 0.1 for the _bn models"),
    f"{REFS}#resnext": Recipe(
        V1, {"epochs": 100, "batch_size": 16, "global_batch": 1024, "lr": 0.4}, "64 GPUs x 16"
    ),
    f"{REFS}#mobilenetv2": Recipe("mobilenet_v2.yaml"),
    f"{REFS}#mobilenetv3-large--small": Recipe(
        "mobilenet_v3.yaml", note="the published weights average the last 3 improving checkpoints (by hand)"
    ),
    f"{REFS}#efficientnet-v2": Recipe("efficientnet_v2.yaml"),
    f"{REFS}#small-models": Recipe("regnet.yaml"),
    f"{REFS}#medium-models": Recipe("regnet.yaml", {"batch_size": 64, "global_batch": 512, "lr": 0.4}),
    f"{REFS}#large-models": Recipe("regnet.yaml", {"batch_size": 32, "global_batch": 256, "lr": 0.2}),
    f"{REFS}#vit_b_16": Recipe("vit.yaml"),
    f"{REFS}#vit_l_32": Recipe("vit.yaml"),
    f"{REFS}#vit_b_32": Recipe("vit.yaml", {"batch_size": 256, "auto_augment": "imagenet"}, "16 GPUs x 256"),
    f"{REFS}#vit_l_16": Recipe(
        V2, {"batch_size": 64, "train_crop_size": 224, "ra_reps": 3, "clip_grad_norm": 1.0}, "16 GPUs x 64"
    ),
    f"{REFS}#convnext": Recipe("convnext.yaml"),
    f"{REFS}#swintransformer": Recipe("swin.yaml"),
    f"{REFS}#swintransformer-v2": Recipe("swin.yaml", {"train_crop_size": 256}),
    f"{REFS}#maxvit": Recipe("maxvit.yaml"),
    f"{NEW_RECIPE}#issuecomment-1013906621": Recipe(V2),  # ResNet50 V2, the blog post's
    f"{NEW_RECIPE}#new-recipe-with-fixres": Recipe(V2, {"ra_sampler": False}, "before repeated augmentation"),
    f"{NEW_RECIPE}#new-recipe": Recipe(
        V2,
        {"ra_sampler": False, "train_crop_size": 224},
        "at 224 px, before repeated augmentation; the RegNets' own batch and lr are not published",
    ),
    f"{NEW_RECIPE}#new-recipe-with-reg-tuning": Recipe(
        V2, note="MobileNetV2's command (PR 5560); MobileNetV3-Large's regularisation tuning is not published"
    ),
    f"{NEW_RECIPE}#new-recipe-with-lr-wd-crop-tuning": Recipe(
        V2, note="the tuned lr, weight decay and train crop are not published"
    ),
    f"{PR}5906": Recipe(V2),  # ShuffleNetV2 x1.5 and x2.0
    f"{PR}6019": Recipe(V2),  # MNASNet 0.75 and 1.3
    f"{PR}5935": Recipe(V2),  # ResNeXt101 64x4d
    "https://github.com/facebookresearch/SWAG": Recipe(
        None, note="SWAG: weakly supervised pre-training on 3.6B Instagram images, then fine-tuned"
    ),
    f"{PR}5793": Recipe(None, note="SWAG: a linear classifier on a trunk pre-trained on Instagram images"),
    f"{REFS}#efficientnet-v1": ported("ported from timm (B0-B4) and EfficientNet-PyTorch (B5-B7)"),
    f"{REFS}#googlenet": ported("ported from the paper's TensorFlow weights"),
    f"{REFS}#inception-v3": ported("ported from the paper's TensorFlow weights"),
    f"{PR}116": ported("ported from LuaTorch"),
    f"{PR}49#issuecomment-277560717": ported("a contributed SqueezeNet training, no published command"),
    "https://github.com/1e100/mnasnet_trainer": ported(
        "trained with an external trainer (1e100/mnasnet_trainer)"
    ),
    "https://github.com/ericsun99/Shufflenet-v2-Pytorch": ported("ported from a community repository"),
    f"{PR}912#issue-445437439": Recipe(
        None, note="SGD with cosine warm restarts for 256 epochs in apex fp16: a schedule this repo lacks"
    ),
    "https://github.com/amdegroot/ssd.pytorch#training-ssd": Recipe(
        None, note="SSD's VGG16 feature extractor: no classifier, no ImageNet accuracy"
    ),
}
# Where one weights enum differs from the others of its recipe link
BY_WEIGHTS = {
    **{f"VGG{n}_BN_Weights.IMAGENET1K_V1": {"lr": 0.1} for n in (11, 13, 16, 19)},
    "RegNet_Y_400MF_Weights.IMAGENET1K_V1": {"lr": 0.4},
    "EfficientNet_V2_M_Weights.IMAGENET1K_V1": {"train_crop_size": 384},
}
NOT_TRAINED_HERE = {
    "EfficientNet_V2_L_Weights.IMAGENET1K_V1": ported("ported from the paper's TensorFlow weights")
}


def classification_weights() -> dict[str, str]:
    """{'ResNet50_Weights.IMAGENET1K_V2': 'resnet50', ...} for all of torchvision's classification weights."""
    return {
        str(w): arch for arch in models.list_models(module=models) for w in models.get_model_weights(arch)
    }


def recipe_for(name: str):
    """(weights, arch, Recipe with the weights' own eval sizes and interpolation in its settings). `name`:
    a weights name (ResNet50_Weights.IMAGENET1K_V2) or an architecture (its DEFAULT weights)."""
    archs = classification_weights()
    enums = {n.split(".")[0] for n in archs}
    if name in set(archs.values()):
        name = str(models.get_model_weights(name).DEFAULT)
    elif name.endswith(".DEFAULT") and name.removesuffix(".DEFAULT") in enums:
        name = str(models.get_weight(name))  # ResNet50_Weights.DEFAULT: the weights it stands for
    if name not in archs:
        known = [*archs, *FFCV_RECIPES]
        raise UserError(f"unknown recipe '{name}'{closest(name, known)}; see docs/recipes.md for every name")
    weights = models.get_weight(name)
    link = weights.meta["recipe"]
    recipe = (
        NOT_TRAINED_HERE.get(name) or BY_RECIPE_LINK.get(link) or Recipe(None, note=f"unknown recipe {link}")
    )
    if recipe.config is None:
        return weights, archs[name], recipe
    t = weights.transforms()  # evaluate as the weights are published (sizes tuned after training included)
    evaluation = {
        "val_resize_size": t.resize_size[0],
        "val_crop_size": t.crop_size[0],
        "interpolation": t.interpolation.value,
    }
    settings = {**recipe.settings, **BY_WEIGHTS.get(name, {}), **evaluation}
    return weights, archs[name], Recipe(recipe.config, settings, recipe.note)


# FFCV's ResNet configurations (libffcv/ffcv-imagenet, rn50_configs/ and rn18_configs/): one config file per
# architecture here; the length picks the epochs and the resolution ramp, whose epochs FFCV sets per length.
FFCV_SOURCE = "https://github.com/libffcv/ffcv-imagenet"
IMAGENET_TRAIN_IMAGES = 1_281_167
# one H100, resnet50 training from JPEG files (RandomResizedCrop + flip on 15 loader cores, longer passes):
# docs/performance.md#one-gpu-nvidia-h100; the loader, not the GPU, sets it, at 160-224 px alike
H100_FROM_JPEG_IMG_PER_S = 1555


@dataclass(frozen=True)
class FfcvRecipe:
    """One row of FFCV's published table, and the ramp of its config."""

    config: str  # in configs/
    epochs: int
    start_ramp: int
    end_ramp: int
    top1: float  # published, with BlurPool
    top5: float
    minutes: float
    gpus: str


FFCV_RECIPES = {
    f"ffcv-{arch}-{epochs}": FfcvRecipe(f"ffcv_{arch}.yaml", epochs, start, end, top1, top5, minutes, gpus)
    for arch, gpus, rows in (
        (
            "rn50",
            "8 x A100",
            [
                (16, 11, 13, 73.8, 90.8, 14.9),
                (24, 17, 20, 75.6, 92.1, 21.7),
                (32, 23, 27, 76.6, 92.7, 28.7),
                (40, 29, 34, 77.2, 93.2, 35.6),
                (56, 41, 48, 78.0, 93.7, 49.4),
                (88, 65, 76, 78.4, 94.1, 77.2),
            ],
        ),
        (
            "rn18",
            "1 x A100",
            [
                (16, 11, 13, 66.9, 86.8, 35.0),
                (24, 17, 20, 68.8, 88.1, 51.6),
                (32, 23, 27, 70.0, 88.9, 68.9),
                (40, 29, 34, 70.6, 89.4, 85.5),
                (56, 41, 48, 71.3, 89.9, 119.4),
                (88, 65, 76, 72.4, 90.3, 187.3),
            ],
        ),
    )
    for epochs, start, end, top1, top5, minutes in rows
}


def ffcv_arguments(recipe: FfcvRecipe) -> list[str]:
    """train.py options of an FFCV schedule: its config, length and ramp."""
    return [
        "--config",
        f"configs/{recipe.config}",
        "--epochs",
        str(recipe.epochs),
        "--start-ramp",
        str(recipe.start_ramp),
        "--end-ramp",
        str(recipe.end_ramp),
    ]


def recipe_arguments(arch: str, recipe: Recipe) -> list[str]:
    """train.py options for a recipe: --config, --arch and each setting (a boolean as --key / --no-key)."""
    options = ["--config", f"configs/{recipe.config}", "--arch", arch]
    for key, value in recipe.settings.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            options.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            options += [f"--{flag}", str(value)]
    return options


def expand_recipe(argv: list[str]) -> list[str]:
    """train.py's command line with `--recipe NAME` replaced by that recipe's options, placed first so
    that the user's own options still win; the resolved command is printed."""
    at = next((i for i, a in enumerate(argv) if a == "--recipe" or a.startswith("--recipe=")), None)
    if at is None:
        return argv
    if argv[at] == "--recipe" and at + 1 >= len(argv):
        raise UserError("--recipe needs a weights name, e.g. --recipe ResNet50_Weights.IMAGENET1K_V2")
    name = argv[at].partition("=")[2] or argv[at + 1]
    rest = argv[:at] + argv[at + (1 if "=" in argv[at] else 2) :]
    if "--config" in rest or any(a.startswith("--config=") for a in rest):
        raise UserError(
            "--recipe chooses the config; drop --config (other options still override the recipe)"
        )
    if name in FFCV_RECIPES:
        ffcv = FFCV_RECIPES[name]
        argv = ffcv_arguments(ffcv) + rest
        heading = (
            f"FFCV's {ffcv.epochs}-epoch schedule ({ffcv.top1} / {ffcv.top5} published with BlurPool, "
            f"{ffcv.minutes} min on {ffcv.gpus}; configs/{ffcv.config} says what differs)"
        )
    else:
        weights, arch, recipe = recipe_for(name)
        if recipe.config is None:
            raise UserError(f"{weights} can't be re-trained from ImageNet-1k here: {recipe.note}")
        argv = recipe_arguments(arch, recipe) + rest
        metrics = weights.meta["_metrics"]["ImageNet-1K"]
        note = f"; {recipe.note}" if recipe.note else ""
        heading = f"recipe of {weights} ({metrics['acc@1']} / {metrics['acc@5']}{note})"
    if rank() > 0:  # under torchrun, before the process group exists
        return argv
    print(f"{heading}:")
    print("  python train.py " + shlex.join(argv))
    cfg = with_accumulation(load_config(TrainConfig, argv), world_size())
    print(
        f"  {describe_global_batch(cfg, world_size())}, the original run's: lower --batch-size for a smaller "
        "GPU, launch more processes for fewer steps"
    )
    return argv


def recipes_table() -> str:
    """docs/recipes.md: all weights, their published accuracy and the command that re-trains them."""
    lines = [
        "# Training recipes of torchvision's weights",
        "",
        "Generated by `python test_torchvision.py --recipes --output docs`. `python train.py --recipe",
        "WEIGHTS --data DIR` runs the command of a row. Each config states the original run's global batch",
        "(`global_batch`) and per-process batch: on fewer processes train.py accumulates the gradients of",
        "several batches into each optimizer step to keep the global batch (8 steps on one GPU for 8 GPUs),",
        "and a smaller GPU takes a smaller `--batch-size` with more steps. BatchNorm's statistics are then",
        "those of each batch, as on the original run's GPUs without SyncBatchNorm. Eval sizes and",
        "interpolation are those the weights are published with.",
        "",
        "![the v2 recipe's training images after TrivialAugmentWide, RandomErasing and CutMix]"
        "(preview_torchvision_v2.png)",
        "",
        "(`python prepare_data.py preview --config configs/torchvision_v2.yaml --data DIR --output "
        "docs/preview_torchvision_v2.png`.)",
        "",
        "Where train.py differs from torchvision's references/classification/train.py for the same flags:",
        "",
        "- The train transform is the same, tensor for tensor (tests/test_recipes.py); MixUp/CutMix run",
        "  on the device after normalisation instead of in the loader workers (same distributions, other",
        "  draws).",
        "- Augmentations are seeded per image, epoch and copy, so a resume is exact; the references' draws",
        "  depend on the worker count.",
        "- The repeated-augmentation sampler keeps len(dataset) // world images per rank and epoch; the",
        "  references keep a multiple of 256 (nothing of a folder smaller than 256 images).",
        "- The EMA is updated every `ema_steps` optimizer steps of the run; the references count the steps",
        "  of each epoch from 0. Its decay is adjusted to the global batch as theirs is.",
        "- `--amp auto` is bf16 on GPUs that have it; the references' `--amp` is fp16 with a GradScaler",
        "  (`--amp fp16` here), and a command without `--amp` trained in fp32 (`--amp none` here).",
        "- train.py drops each epoch's last partial batch by default; the recipe configs keep it, as the",
        "  references do (`drop_last: false`): a last batch of a few images updates BatchNorm's running",
        "  statistics just before validation. `python fidelity.py` trains train.py, a textbook loop and",
        "  the reference script itself with the same settings over many seeds ([fidelity.md](fidelity.md));",
        "  in its v1 setting train.py's best top-1 trails the reference's by about 6 points either way.",
        "",
        "| weights | top-1 | top-5 | train.py options | note |",
        "|---|---:|---:|---|---|",
    ]
    for name in sorted(classification_weights(), key=str.lower):
        weights, arch, recipe = recipe_for(name)
        metrics = weights.meta["_metrics"]["ImageNet-1K"]
        options = (
            "not reproducible" if recipe.config is None else f"`{shlex.join(recipe_arguments(arch, recipe))}`"
        )
        lines.append(f"| {name} | {metrics['acc@1']} | {metrics['acc@5']} | {options} | {recipe.note} |")
    return "\n".join(lines + [""] + time_to_accuracy_lines()) + "\n"


def time_to_accuracy_lines() -> list[str]:
    """docs/recipes.md's section on FFCV's schedules: published top-1 per epochs, the images they process
    and what that costs on one GPU fed from JPEG files at the measured rate."""
    lines = [
        "## Fewer epochs: FFCV's ResNet schedules",
        "",
        f"FFCV's published ImageNet configurations ({FFCV_SOURCE}) reach V1's accuracy in a fraction of its",
        "90 epochs: progressive resizing (160 to 192 px), validation at 256 px with flip test-time",
        "augmentation, a triangular lr schedule set at every step, label smoothing, no weight decay on",
        "BatchNorm, and BlurPool, which this repo leaves out (it changes torchvision's architecture). The",
        "configs (`configs/ffcv_rn50.yaml`, `configs/ffcv_rn18.yaml`) say what else differs;",
        "`python train.py --recipe NAME --data DIR` runs a row. Images processed: epochs x the 1,281,167",
        f"training images. One-GPU hours: at {H100_FROM_JPEG_IMG_PER_S:,} img/s, resnet50 training from JPEG",
        "files on one H100 with 15 loader cores ([performance.md](performance.md#one-gpu-nvidia-h100), an",
        "older loader; the loader sets the rate, so resnet18 and 160-192 px crops are no faster there).",
        "",
        "| recipe | published top-1 / top-5 (BlurPool) | epochs | images processed | FFCV's GPU-hours (A100) "
        "| one-GPU hours from JPEG | train.py options |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, recipe in FFCV_RECIPES.items():
        images = recipe.epochs * IMAGENET_TRAIN_IMAGES
        gpu_hours = recipe.minutes * int(recipe.gpus.split(" x ")[0]) / 60
        hours = images / H100_FROM_JPEG_IMG_PER_S / 3600
        lines.append(
            f"| {name} | {recipe.top1} / {recipe.top5} | {recipe.epochs} | {images / 1e6:.1f} M | "
            f"{gpu_hours:.1f} | {hours:.1f} | `{shlex.join(ffcv_arguments(recipe))}` |"
        )
    return lines
