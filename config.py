"""Every training option, with its default and why (TrainConfig), and the checks of their bounds.
Each field is also a train.py option: --key value; precedence: defaults < --config YAML < command line.
Field types are checked by utils.load_config (a Literal lists the choices)."""

from dataclasses import dataclass, field
from typing import Literal

from loss import check_label_smoothing
from model import check_arch
from presets import Interpolation, TrainPresetName, check_crop_fits
from utils import Amp, ChannelsLast, Device, UserError


@dataclass
class TrainConfig:
    # data and model
    data: str = ""  # ImageFolder root with train/ and val/ (class names need not be wnids)
    arch: str = "resnet18"  # any name in torchvision.models.list_models()
    weights: str | None = None  # start from pretrained weights (DEFAULT, IMAGENET1K_V2, a .pth) to fine-tune
    num_classes: int | None = None  # from the train folder's classes unless set; a new head when it differs
    dropout: float | None = None  # the architecture's dropout probability, where it has one
    dummy: bool = False  # synthetic images instead of --data, for throughput runs
    dummy_size: int = 512  # images per epoch with --dummy
    # schedule (torchvision's V1 recipe: 90 epochs, batch 256, SGD 0.1, StepLR 30 x 0.1)
    epochs: int = 90
    batch_size: int = 32  # per process; the global batch is batch_size x world size
    lr: float = 0.1  # for the global batch, unless lr_scaling = linear
    lr_scaling: Literal["none", "linear"] = "none"  # linear: lr x global_batch / 256 (Goyal et al.)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    no_decay_norm_bias: bool = False  # no weight decay on normalisation weights and biases (1-D parameters)
    scheduler: Literal["step", "multistep", "cosine"] = "step"  # all stepped once per epoch
    step_size: int = 30
    milestones: list[int] = field(default_factory=lambda: [30, 60, 80])
    lr_gamma: float = 0.1
    warmup_epochs: int = 0  # linear warmup from lr x warmup_factor
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
    # speed (the options every script shares: utils.add_runtime_args)
    amp: Amp = "auto"  # bf16 on CUDA; fp16 runs with a GradScaler
    channels_last: ChannelsLast = "auto"  # on for CUDA
    compile: bool = False  # torch.compile the model (minutes of compile, faster epochs)
    workers: int | None = None  # loader processes per rank; None = dataset.default_workers
    # regularisation
    ema_decay: float = 0.0  # > 0 keeps an exponential moving average of the weights, evaluated too
    ema_steps: int = 32  # update the EMA every N steps (torchvision's recipe)
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


AT_LEAST_ONE = (
    "epochs",
    "batch_size",
    "train_crop_size",
    "train_resize_size",
    "val_resize_size",
    "val_crop_size",
    "ema_steps",
    "log_interval",
    "dummy_size",
    "step_size",
)
NON_NEGATIVE = (
    "momentum",
    "weight_decay",
    "warmup_epochs",
    "clip_grad_norm",
    "ema_decay",
    "save_every_steps",
    "warmup_factor",
)


def check_config(cfg: TrainConfig) -> TrainConfig:
    """The bounds that types can't say (load_config has checked types and choices), before anything runs."""
    for key in AT_LEAST_ONE:
        if getattr(cfg, key) < 1:
            raise UserError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    for key in NON_NEGATIVE:
        if getattr(cfg, key) < 0:
            raise UserError(f"{key} must be non-negative, got {getattr(cfg, key)}")
    if cfg.lr <= 0:
        raise UserError(f"lr must be positive, got {cfg.lr}")
    if cfg.ema_decay >= 1:
        raise UserError(f"ema_decay must be below 1, got {cfg.ema_decay}")
    for key in ("num_classes", "workers"):
        value = getattr(cfg, key)
        if value is not None and value < (1 if key == "num_classes" else 0):
            raise UserError(f"{key} must be {'at least 1' if key == 'num_classes' else 'non-negative'}, got {value}")
    check_label_smoothing(cfg.label_smoothing)
    check_crop_fits(cfg.val_crop_size, cfg.val_resize_size, ("val_crop_size", "val_resize_size"))
    check_arch(cfg.arch)
    if not cfg.data and not cfg.dummy:
        raise UserError("no data: pass --data DIR (an ImageFolder root with train/ and val/) or --dummy")
    return cfg
