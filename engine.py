"""Training and evaluation: the two loops every script shares, `evaluate` (test_torchvision.py, train.py,
benchmark.py) and `train_one_epoch` (train.py, benchmark.py); what they run under (Runtime); what steps the
weights (Training: the model with its optimizer, learning-rate schedule, gradient scaler and EMA, built
from a TrainConfig as torchvision's references/classification/train.py builds them from its flags:
--norm-weight-decay, --lr-warmup-method, --model-ema-decay, ...); the loop's settings (LoopSettings); and
the training progress that outlives a step (TrainState).

    runtime = Runtime.create(device, amp="auto", channels_last="auto", training=False, preset=preset)
    result = evaluate(model, loader, runtime)            # {'n_images', 'acc1', 'acc5', 'loss', ...}
    training = Training.build(cfg, model, runtime)       # optimizer, schedule (per epoch), scaler, EMA
    stats = train_one_epoch(training, criterion, loader, runtime, TrainState(), LoopSettings.from_config(cfg))
"""

import contextlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from presets import IMAGENET_MEAN, IMAGENET_STD, to_device
from restarts import Preempted, stop_requested
from utils import (
    OUT_OF_MEMORY,
    AgreedError,
    UserError,
    all_gather_objects,
    all_reduce_sum,
    amp_dtype,
    autocast,
    is_main,
    use_channels_last,
    world_size,
)
from utils import rank as global_rank


@dataclass
class Runtime:
    """How a loop runs the model: on which device, in which autocast dtype and memory layout, and the
    normalisation that turns the loader's uint8 batches into its input."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    @classmethod
    def create(cls, device, amp: str, channels_last: str, training: bool, preset) -> "Runtime":
        """From the shared --amp and --channels-last options; mean and std from an EvalPreset."""
        dtype = amp_dtype(amp, device, training)
        return cls(device, dtype, use_channels_last(channels_last, device, training), preset.mean, preset.std)

    @classmethod
    def on_cpu(cls, preset) -> "Runtime":
        """For kernels that run on the CPU in their own precision and layout: the int8 models and ONNX
        Runtime's CPU provider (fp32, NCHW)."""
        return cls(torch.device("cpu"), None, False, preset.mean, preset.std)

    def inputs(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) uint8 host batch -> normalised float on the device, and the targets there."""
        images = to_device(images, self.device, self.mean, self.std, self.channels_last)
        return images, targets.to(self.device, non_blocking=True)


def check_bad_images(errors, samples, skip: bool) -> list[str]:
    """Paths of the unreadable images of a batch; without skip, the first one stops the run."""
    for index, error in errors:
        if not skip:
            raise UserError(
                f"cannot read image {samples[index].path} ({error}); fix or remove it, or pass "
                "--skip-bad-images to skip and list such files; `python prepare_data.py check DIR` "
                "lists every unreadable image of a dataset before a run"
            )
    return [samples[index].path for index, _ in errors]


def topk_correct(logits, targets, ks=(1, 5)) -> list:
    """Number of samples whose target is among the top-k logits, for each k (tensors, no host sync)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (B, k)
    hits = top == targets[:, None]
    return [hits[:, :k].sum() for k in ks]


# ----------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def evaluate(
    model,
    loader,
    runtime: Runtime,
    *,
    criterion=None,
    skip_bad_images=False,
    keep_predictions=False,
    class_mask=None,
    tta="none",
    desc="eval",
) -> dict:
    """Top-1/top-5 and mean loss over every image of the loader's dataset, each counted once in any
    world size (each rank sees its own shard, sums are all-reduced). With keep_predictions, rank 0
    also gets the top-5 indices and probabilities of every image, ordered by dataset index.
    class_mask: a (C,) bool tensor; predictions, loss and probabilities are restricted to its classes
    (ImageNet-A's and -R's protocol: the logits of the other classes become -inf). tta "flip": each image
    and its left-right mirror, by the mean of their logits (FFCV adds them: the same top-k; the mean keeps
    the loss on the scale of one pass); the images counted (and per second) are the images, not passes.

    Calibration: `nll` is the mean cross-entropy of the (masked) logits, the `loss` itself where no
    criterion is given; `ece` (%) is the expected calibration error over CALIBRATION_BINS equal-width bins
    of the top-1 probability (bin k holds [k/15, (k+1)/15), the last one 1 too): the sum over bins of
    their share of the images times |their top-1 accuracy - their mean top-1 probability|.
    `calibration` gives each bin's (images, sum of top-1 probabilities, top-1 hits), for the reliability
    diagram (report.plot_reliability)."""
    model.eval()
    device = runtime.device
    mask_bias = None  # (C,): 0 for the kept classes, -inf for the others
    if class_mask is not None:
        mask_bias = torch.zeros(len(class_mask), device=device).masked_fill(
            ~class_mask.to(device), float("-inf")
        )
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits, images, nll
    bins = torch.zeros(3, CALIBRATION_BINS, dtype=torch.float64, device=device)  # images, confidence, hits
    predictions, bad = [], []
    samples = loader.dataset.samples
    start, batches = time.perf_counter(), 0
    progress = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not is_main() or None)
    for images, targets, indices, errors in progress:
        bad += check_bad_images(errors, samples, skip_bad_images)
        if len(targets) == 0:
            continue
        images, targets = runtime.inputs(images, targets)
        with autocast(device, runtime.amp_dtype):
            logits = model(images).float()
            if tta == "flip":
                logits = (logits + model(torch.flip(images, [-1])).float()) / 2
        logits = logits if mask_bias is None else logits + mask_bias
        nll = F.cross_entropy(logits, targets)
        loss = criterion(logits, targets) if criterion is not None else nll
        top1, top5 = topk_correct(logits, targets)
        count = torch.tensor(len(targets), device=device)
        sums += torch.stack([loss.double() * len(targets), top1, top5, count, nll.double() * len(targets)])
        probabilities = logits.softmax(dim=1)
        add_to_bins(bins, *probabilities.max(dim=1), targets)
        batches += 1
        if keep_predictions:
            probs, classes = probabilities.topk(min(5, logits.shape[1]), dim=1)
            predictions.append((indices, targets.cpu(), classes.cpu(), probs.cpu()))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    loss_sum, top1, top5, n, nll_sum = all_reduce_sum(sums).tolist()
    bins = all_reduce_sum(bins)
    bad = sorted(path for shard in all_gather_objects(bad) for path in shard)
    result = {
        "n_images": int(n),
        "acc1": 100 * top1 / max(n, 1),
        "acc5": 100 * top5 / max(n, 1),
        "loss": loss_sum / max(n, 1),
        "nll": nll_sum / max(n, 1),
        "ece": 100 * (bins[2] - bins[1]).abs().sum().item() / max(n, 1),
        "calibration": [[int(images), confidence, hits] for images, confidence, hits in bins.T.tolist()],
        "seconds": seconds,
        "img_per_s": n / seconds if seconds else 0.0,
        "ms_per_batch": 1000 * seconds / max(batches, 1),
        "bad_images": bad,
    }
    if keep_predictions:
        columns = [torch.cat(parts) for parts in zip(*predictions)] if predictions else []
        result["predictions"] = merge_predictions(all_gather_objects(columns), samples)
    return result


CALIBRATION_BINS = 15  # the usual count (Guo et al. 2017, "On Calibration of Modern Neural Networks")


def add_to_bins(bins: torch.Tensor, confidence: torch.Tensor, predicted: torch.Tensor, targets) -> None:
    """Adds each image's (1, top-1 probability, top-1 hit) to the calibration bin of its probability."""
    confidence = confidence.double().nan_to_num(0.0)  # the logits of a diverged model: bin 0, not a crash
    index = (confidence * CALIBRATION_BINS).long().clamp(0, CALIBRATION_BINS - 1)
    hits = (predicted == targets).double()
    bins.index_add_(1, index, torch.stack([torch.ones_like(hits), confidence, hits]))


def with_smaller_batches(run: Callable[[int], dict], batch_size: int, device) -> tuple[dict | None, int]:
    """(run(batch), batch) for the first batch that fits, halving it after an out-of-memory error (CUDA's
    or the host's) down to 1; (None, 1) when even 1 does not fit, so a sweep goes on with the next model.
    Under torchrun the ranks would stop disagreeing on the batch, so there the error ends the run."""
    while True:
        try:
            return run(batch_size), batch_size
        except OUT_OF_MEMORY as e:
            if world_size() > 1:
                raise UserError(
                    f"out of memory at batch {batch_size} ({type(e).__name__}); lower --batch-size"
                ) from e
            error = type(e).__name__
        if device.type == "cuda":  # outside the except block, whose traceback holds the batch's tensors
            torch.cuda.empty_cache()
        if batch_size == 1:
            return None, 1
        batch_size //= 2
        tqdm.write(f"note: out of memory ({error}); trying again with batch {batch_size}")


def merge_predictions(shards, samples) -> list[dict]:
    """Every rank's (indices, targets, top-5 classes, top-5 probabilities) as one row per image, by index."""
    rows = []
    for shard in shards:
        if not shard:
            continue
        indices, targets, classes, probs = shard
        for i in range(len(indices)):
            rows.append(
                {
                    "index": int(indices[i]),
                    "path": samples[int(indices[i])].path,
                    "target": int(targets[i]),
                    "top5": classes[i].tolist(),
                    "probs": [round(p, 6) for p in probs[i].tolist()],
                }
            )
    return sorted(rows, key=lambda row: row["index"])


def per_class_accuracy(predictions: list[dict], names: list[str]) -> list[dict]:
    """{class, n, top1, top5} (percent) of every class with images, in class order, from each image's
    target and top-5 (merge_predictions' rows: every image once, whatever the world size)."""
    counts: dict[int, list[int]] = {}
    for row in predictions:
        n_hits = counts.setdefault(row["target"], [0, 0, 0])
        n_hits[0] += 1
        n_hits[1] += row["top5"][0] == row["target"]
        n_hits[2] += row["target"] in row["top5"]
    return [
        {"class": names[target], "n": n, "top1": 100 * top1 / n, "top5": 100 * top5 / n}
        for target, (n, top1, top5) in sorted(counts.items())
    ]


# ----------------------------------------------------------------------------- what steps the weights

# Layers whose parameters norm_weight_decay applies to (those of torchvision's set_weight_decay)
NORM_LAYERS = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)
# Parameter names transformer_embedding_decay applies to, exactly the references' list: ViT's class
# token, Swin's and MaxViT's relative position bias tables. ViT's position embedding is named
# pos_embedding, so the references' "position_embedding" matches nothing and it keeps weight_decay.
EMBEDDING_NAMES = ("class_token", "position_embedding", "relative_position_bias_table")


def weight_decay_groups(model: nn.Module, cfg) -> list[dict]:
    """The trainable parameters in groups of equal weight decay: a parameter named bias gets
    bias_weight_decay, an embedding (EMBEDDING_NAMES) transformer_embedding_decay, one of a
    normalisation layer norm_weight_decay, the rest weight_decay; a setting left at None falls
    through to the next rule. Empty groups are dropped, the order of first appearance is kept."""
    groups: dict[float, list] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            decay = None
            if name == "bias":
                decay = cfg.bias_weight_decay
            if decay is None and name in EMBEDDING_NAMES:
                decay = cfg.transformer_embedding_decay
            if decay is None and isinstance(module, NORM_LAYERS):
                decay = cfg.norm_weight_decay
            groups.setdefault(cfg.weight_decay if decay is None else decay, []).append(param)
    return [{"params": params, "weight_decay": decay} for decay, params in groups.items()]


def build_optimizer(cfg, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """SGD, AdamW or RMSprop over weight_decay_groups. RMSprop takes torchvision's alpha 0.9 and eps
    0.0316 = sqrt(1e-3): TensorFlow's RMSprop (that of the MobileNetV3 paper) adds its eps 1e-3 inside
    the square root, torch's outside."""
    groups = weight_decay_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, momentum=cfg.momentum, eps=0.0316, alpha=0.9)
    return torch.optim.AdamW(groups, lr=lr)


class TriangularLR(torch.optim.lr_scheduler.LambdaLR):
    """FFCV's cyclic schedule (train_imagenet.py, get_cyclic_lr): lr x 1e-4 at epoch 0, linear up to lr at
    `peak`, linear down to 0 at `epochs`. Stepped once per epoch like the others; inside an epoch the loop
    sets each optimizer step's lr at its position (set_position), as FFCV interpolates between the lr of
    the epoch and the next one's at every step."""

    def __init__(self, optimizer, peak: int, epochs: int):
        self.peak, self.epochs = peak, epochs
        super().__init__(optimizer, self.factor)

    def factor(self, epoch: float) -> float:
        """The share of the initial lr at (fractional) epoch `epoch`."""
        if epoch <= self.peak:
            return 1e-4 + (1 - 1e-4) * epoch / self.peak
        return max(0.0, (self.epochs - epoch) / (self.epochs - self.peak))

    def set_position(self, epoch: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * self.factor(epoch)


def build_scheduler(cfg, optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch, after an optional warmup of warmup_epochs (torchvision's recipes); the
    triangular schedule is also set at every optimizer step (TriangularLR)."""
    sched = torch.optim.lr_scheduler
    if cfg.scheduler == "triangular":
        return TriangularLR(optimizer, cfg.lr_peak_epoch, cfg.epochs)
    if cfg.scheduler == "step":
        main = sched.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.lr_gamma)
    elif cfg.scheduler == "multistep":
        milestones = [m - cfg.warmup_epochs for m in cfg.milestones]
        main = sched.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.lr_gamma)
    elif cfg.scheduler == "exponential":
        main = sched.ExponentialLR(optimizer, gamma=cfg.lr_gamma)
    else:
        main = sched.CosineAnnealingLR(
            optimizer, T_max=max(1, cfg.epochs - cfg.warmup_epochs), eta_min=cfg.lr_min
        )
    if not cfg.warmup_epochs:
        return main
    if cfg.warmup_method == "linear":
        warmup = sched.LinearLR(optimizer, start_factor=cfg.warmup_factor, total_iters=cfg.warmup_epochs)
    else:
        warmup = sched.ConstantLR(optimizer, factor=cfg.warmup_factor, total_iters=cfg.warmup_epochs)
    return sched.SequentialLR(optimizer, [warmup, main], milestones=[cfg.warmup_epochs])


def global_batch(cfg, world_size: int) -> int:
    """Images per optimizer step: batch_size x world size x accum_steps."""
    return cfg.batch_size * world_size * (cfg.accum_steps or 1)


def ema_decay_per_update(cfg, world_size: int) -> float:
    """torchvision's adjustment of --model-ema-decay (from pycls): 1 - decay scales with the images per
    EMA update over the epochs, so the averaging horizon stays about the same fraction of the run when
    the global batch (accumulation included), ema_steps (optimizer steps) or the epochs change."""
    adjust = global_batch(cfg, world_size) * cfg.ema_steps / cfg.epochs
    return 1.0 - min(1.0, (1.0 - cfg.ema_decay) * adjust)


def build_ema(cfg, model: nn.Module, world_size: int) -> torch.optim.swa_utils.AveragedModel | None:
    """An AveragedModel of the weights and buffers (None when ema_decay is 0)."""
    if not cfg.ema_decay:
        return None
    average = torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay_per_update(cfg, world_size))
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=average, use_buffers=True)


@dataclass
class Training:
    """The model and everything that steps with it; with TrainState, what a checkpoint holds."""

    model: nn.Module  # unwrapped and uncompiled: what checkpoints hold and the EMA averages
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: torch.optim.swa_utils.AveragedModel | None
    device: torch.device
    # what the loop calls: the model itself, or the model under DDP and/or torch.compile (same parameters)
    wrapped: nn.Module

    @classmethod
    def build(cls, cfg, model: nn.Module, runtime: Runtime) -> "Training":
        """From a TrainConfig (or anything with its fields), for a run of world_size() processes."""
        images_per_step = global_batch(cfg, world_size())
        lr = cfg.lr * images_per_step / 256 if cfg.lr_scaling == "linear" else cfg.lr
        optimizer = build_optimizer(cfg, model, lr)
        scheduler = build_scheduler(cfg, optimizer)
        scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
        ema = build_ema(cfg, model, world_size())
        return cls(model, optimizer, scheduler, scaler, ema, runtime.device, wrapped=model)

    def restored(self) -> dict:
        """What a resume loads besides the model (the schedule is not: see load_state_dict)."""
        return {"optimizer": self.optimizer, "scaler": self.scaler, "ema": self.ema}

    def state_dict(self) -> dict:
        states = {key: None if obj is None else obj.state_dict() for key, obj in self.restored().items()}
        return {"model": self.model.state_dict(), "scheduler": self.scheduler.state_dict(), **states}

    def load_state_dict(self, checkpoint: dict) -> None:
        """All but the model, which is loaded (and checked against the architecture) before. The learning
        rate schedule is this config's, stepped to the checkpoint's epoch, not the saved one: a run
        resumed with more --epochs follows the longer schedule (a saved cosine would end at lr 0)."""
        with warnings.catch_warnings():  # stepped before any optimizer step, on purpose
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(checkpoint["epoch"]):
                self.scheduler.step()
        lrs = [(group["lr"], group["initial_lr"]) for group in self.optimizer.param_groups]
        for key, obj in self.restored().items():
            if obj is not None and checkpoint.get(key):  # {}: a scaler that was off
                obj.load_state_dict(checkpoint[key])
        for group, (lr, initial_lr) in zip(self.optimizer.param_groups, lrs):
            group.update(lr=lr, initial_lr=initial_lr)

    def rng_state(self) -> dict:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {"torch": torch.get_rng_state(), "cuda": cuda}

    def load_rng_state(self, saved: list | dict) -> None:
        """This rank's saved RNG state (a list has one per rank; a rank beyond it keeps its own seed)."""
        saved = saved if isinstance(saved, list) else [saved]
        if global_rank() >= len(saved):
            return
        rng = saved[global_rank()]
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng.get("cuda") is not None:
            torch.cuda.set_rng_state(rng["cuda"], self.device)


# ----------------------------------------------------------------------------- training


@dataclass
class TrainState:
    """Training progress that outlives a step, saved in every checkpoint."""

    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken
    # batches done in the current epoch (> 0 only in a mid-epoch checkpoint, which is saved after an
    # optimizer step: a multiple of the accumulation steps)
    batch: int = 0
    best_acc1: float = -1.0
    history: list = field(default_factory=list)  # one row per finished epoch (metrics.csv)
    bad_images: list = field(default_factory=list)  # unreadable files skipped so far
    world_size: int = 1  # of the run that saved it: a mid-epoch position is in its batches
    train_sums: torch.Tensor | None = None  # a mid-epoch checkpoint's sums of the epoch so far
    train_seconds: float = 0.0  # a mid-epoch checkpoint's training time of the epoch so far
    trained: bool = False  # a checkpoint saved after the epoch's last step, before its validation

    CHECKPOINT_KEYS = (
        "epoch",
        "step",
        "batch",
        "best_acc1",
        "history",
        "bad_images",
        "world_size",
        "train_seconds",
        "trained",
    )

    def checkpoint_fields(self) -> dict:
        return {key: getattr(self, key) for key in self.CHECKPOINT_KEYS}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "TrainState":
        fields = {key: checkpoint[key] for key in cls.CHECKPOINT_KEYS if key in checkpoint}
        return cls(**fields, train_sums=checkpoint.get("train_sums"))


@dataclass(frozen=True)
class LoopSettings:
    """How train_one_epoch runs, fixed for a run (LoopSettings.from_config)."""

    epochs: int | None = None  # of the run, for the progress bar
    accum_steps: int = 1  # batches per optimizer step
    batch_size: int = 0  # a full batch's images (with accum_steps > 1: the weight of each batch's loss)
    ema_steps: int = 32  # optimizer steps between EMA updates
    warmup_epochs: int = 0  # epochs in which the EMA copies the weights, as torchvision's references do
    clip_grad_norm: float = 0.0  # > 0 clips the global gradient norm
    log_interval: int = 20  # steps between progress updates (and the host syncs they need)
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: only after the epoch's last step)
    skip_bad_images: bool = False  # skip unreadable images (and list them) instead of stopping

    @classmethod
    def from_config(cls, cfg) -> "LoopSettings":
        return cls(
            epochs=cfg.epochs,
            accum_steps=cfg.accum_steps or 1,
            batch_size=cfg.batch_size,
            ema_steps=cfg.ema_steps,
            warmup_epochs=cfg.warmup_epochs,
            clip_grad_norm=cfg.clip_grad_norm,
            log_interval=cfg.log_interval,
            checkpoint_every=cfg.save_every_steps,
            skip_bad_images=cfg.skip_bad_images,
        )


def train_one_epoch(
    training: Training,
    criterion,
    loader,
    runtime: Runtime,
    state: TrainState,
    settings: LoopSettings,
    mix: Callable | None = None,
    on_checkpoint: Callable[[torch.Tensor], None] | None = None,
) -> dict:
    """One pass over this rank's shard of epoch `state.epoch`, advancing state.step and state.batch.
    The optimizer steps once every `settings.accum_steps` batches (and after the epoch's last one): each
    batch's loss weighs its share of the step's images, so the update is the mean over them; under DDP
    only a step's last batch all-reduces the gradients. Loss and accuracy stay on the device between log
    intervals, the loop's only host syncs. Every `settings.checkpoint_every` optimizer steps and after the
    last one, `on_checkpoint(sums)` saves a mid-epoch checkpoint (sums: this rank's loss, top-1 and image
    counts so far). The EMA (of training.model) is updated every `ema_steps` optimizer steps; during the
    first `warmup_epochs` it copies the weights. `mix` (presets.MixUpCutMix) turns each normalised batch
    and its labels into mixed images and soft targets; train top-1 then counts the largest target. A
    WeightedSum criterion's terms are reported too. At each log point the ranks agree, in the all-reduce
    they do there anyway, on a non-finite loss (an AgreedError naming the first rank) and on a stop
    signal (restarts.py: a checkpoint, then Preempted), so that they all stop at the same step."""
    wrapped, optimizer, scaler, ema = training.wrapped, training.optimizer, training.scaler, training.ema
    wrapped.train()
    device, epoch, accum = runtime.device, state.epoch, settings.accum_steps
    ddp = ddp_module(wrapped)
    statistics = RunningStatistics(training.model) if accum > 1 else None
    epoch_sampler(loader).set_epoch(epoch)
    terms = loss_terms(criterion)
    sums = torch.zeros(3 + len(terms), dtype=torch.float64, device=device)  # loss, top-1, n, terms...
    if state.train_sums is not None:  # resumed mid-epoch: rank 0 carries the epoch's (global) sums so far
        if global_rank() == 0:
            sums[: len(state.train_sums)] += state.train_sums.to(device)
        state.train_sums = None
    first_bad_step = torch.tensor(-1, device=device)
    start, carried = time.perf_counter(), state.train_seconds
    seen = 0  # images of this call
    planned, read = 0, 0  # images of this optimizer step so far: the loader's (unreadable ones too), read
    bar = tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{settings.epochs or '?'}",
        unit="batch",
        disable=not is_main() or None,
        initial=state.batch,
        total=state.batch + len(loader),
    )
    for images, targets, _, errors in bar:
        state.bad_images += check_bad_images(errors, loader.dataset.samples, settings.skip_bad_images)
        if len(targets) == 0 and world_size() > 1:  # the other ranks would wait in the all-reduce: stop
            raise UserError(
                f"a whole batch was unreadable on rank {global_rank()} "
                f"({', '.join(state.bad_images[-3:])}...); remove the unreadable files"
            )
        micro = state.batch % accum  # this batch's place in its optimizer step
        ends_step = micro == accum - 1 or state.batch + 1 == bar.total
        loaded = len(targets) + len(errors)  # the loader's images, the unreadable ones too
        planned += loaded
        state.batch += 1
        if statistics is not None:
            statistics.update(micro == 0)
        if len(targets):  # else every image of the batch was unreadable and skipped
            seen, read = seen + len(targets), read + len(targets)
            images, targets = runtime.inputs(images, targets)
            if mix is not None:  # (B, C) soft targets, drawn as rank * accum + micro of accum_steps = 1
                images, targets = mix(images, targets, state.step, global_rank() * accum + micro)
            # only the step's last batch all-reduces: the others add to the gradients where they are
            with contextlib.nullcontext() if ends_step or ddp is None else ddp.no_sync():
                with autocast(device, runtime.amp_dtype):
                    logits = wrapped(images)
                logits = getattr(logits, "logits", logits)  # googlenet and inception_v3 add aux outputs
                loss = criterion(logits, targets)
                # a full step's batches weigh 1 / accum each; the loader's last, smaller batch less
                weighed = loss if accum == 1 else loss * loaded / (settings.batch_size * accum)
                scaler.scale(weighed).backward()
            loss = loss.detach()
            bad = ~torch.isfinite(loss) & (first_bad_step < 0)
            first_bad_step = torch.where(bad, state.step + 1, first_bad_step)
            count = torch.tensor(len(targets), device=device)
            parts = [criterion.parts[t].double() * len(targets) for t in terms]
            labels = targets.argmax(1) if targets.ndim == 2 else targets
            top1 = topk_correct(logits.detach(), labels, (1,))[0]
            sums += torch.stack([loss.double() * len(targets), top1, count, *parts])
        if not ends_step:
            continue
        if read:  # (a step of only unreadable images has no gradients: no step)
            if isinstance(training.scheduler, TriangularLR):  # at the step's first batch, as FFCV's steps
                training.scheduler.set_position(epoch + (state.batch - micro - 1) / bar.total)
            if accum > 1 and state.batch == bar.total:
                mean_over_last_step(training.model, planned, settings.batch_size * accum)
            if settings.clip_grad_norm:  # of the step's whole gradient
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(wrapped.parameters(), settings.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            if ema is not None and state.step % settings.ema_steps == 0:
                ema.update_parameters(wrapped)  # DDP and compile wrap the same parameters
                if epoch < settings.warmup_epochs:
                    ema.n_averaged.fill_(0)  # the next update copies again
        planned = read = 0
        last = state.batch == bar.total
        # A checkpoint also after the epoch's last step, before validation: a validation that fails (an
        # unreadable val image, a crash) then keeps the epoch's training, and the resume validates it.
        every = bool(settings.checkpoint_every) and state.step % settings.checkpoint_every == 0
        save_now = on_checkpoint is not None and (every or last)
        if state.step % settings.log_interval == 0 or last or save_now:
            # the only host syncs of the loop: at log and save points, where the ranks also agree on a
            # non-finite loss (each rank's first bad step) and a stop signal, so that all stop together
            agreed = all_reduce_sum(torch.cat([sums[:3], log_point_flags(first_bad_step, device)]))
            (loss_sum, _, n), bad_steps, stop = agreed[:3].tolist(), agreed[3:-1], agreed[-1].item()
            raise_if_not_finite(bad_steps, loss, epoch)
            rate = seen * world_size() / (time.perf_counter() - start)
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss_sum / max(n, 1):.4f}", lr=f"{lr:.4g}", img_s=f"{rate:.1f}")
            if save_now or (stop and on_checkpoint is not None):
                state.trained = last
                state.train_seconds = carried + time.perf_counter() - start
                on_checkpoint(sums)
            if stop:
                raise Preempted(f"epoch {epoch + 1}, batch {state.batch}, after {state.step} optimizer steps")
    if statistics is not None:
        statistics.update(True)
    seconds = time.perf_counter() - start
    return epoch_stats(all_reduce_sum(sums).tolist(), terms, carried + seconds, seen * world_size() / seconds)


def log_point_flags(first_bad_step: torch.Tensor, device) -> torch.Tensor:
    """(world size + 1,) float64: at this rank's place, its first step with a non-finite loss + 1 (0:
    none); last, 1 where this process received a stop signal. Summed over the ranks, every rank knows."""
    flags = torch.zeros(world_size() + 1, dtype=torch.float64, device=device)
    flags[global_rank()] = first_bad_step + 1
    flags[-1] = float(stop_requested() is not None)
    return flags


def raise_if_not_finite(bad_steps: torch.Tensor, loss: torch.Tensor, epoch: int) -> None:
    """After the ranks' flags are summed: the first rank whose loss was not finite, named on every rank."""
    bad = [(int(step) - 1, r) for r, step in enumerate(bad_steps.tolist()) if step > 0]
    if not bad:
        return
    step, bad_rank = min(bad)
    value = f"{loss.item()}" if bad_rank == global_rank() else "non-finite"
    where = f" on rank {bad_rank}" if world_size() > 1 else ""
    raise AgreedError(
        f"loss became {value} at step {step}{where} (epoch {epoch + 1}); the last good checkpoint is "
        "kept; lower --lr or enable --clip-grad-norm"
    )


class RunningStatistics:
    """BatchNorm's running statistics updated by the first batch of each optimizer step only, as DDP keeps
    them on N GPUs (it broadcasts rank 0's before every forward: one batch's update per step); each batch is
    still normalised by its own statistics. Updated by every batch, they would average over N times the
    batches per step, which no run on N GPUs does."""

    def __init__(self, model: nn.Module):
        self.layers = [
            (m, m.momentum)
            for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None
        ]

    def update(self, on: bool) -> None:
        """on: this batch updates them (its layer's momentum); off: momentum 0 keeps them."""
        for layer, momentum in self.layers:
            layer.momentum = momentum if on else 0.0


def epoch_sampler(loader):
    """The sampler a training loader's epochs are set on (set_epoch, skip): that of its batch sampler (the
    DataLoader's own, or loader.StepBatchSampler), or a tar-shard loader's."""
    inner = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    # `is None`, not `or`: a sampler resumed at its epoch's last item has len 0, which is falsy
    return loader.sampler if inner is None else inner


def ddp_module(wrapped: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DistributedDataParallel module the loop calls (also under torch.compile), or None."""
    inner = getattr(wrapped, "_orig_mod", wrapped)  # torch.compile's OptimizedModule keeps the module here
    return inner if isinstance(inner, nn.parallel.DistributedDataParallel) else None


def mean_over_last_step(model: nn.Module, planned: int, full: int) -> None:
    """An epoch's last optimizer step may hold fewer images than `full` (accum_steps x batch_size per
    rank): its gradient, the sum of each batch's loss x images / full, becomes the mean over the images it
    has (summed over the ranks, whose counts DistributedSampler keeps equal: one all-reduce an epoch)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return
    count = torch.tensor([float(planned)], dtype=torch.float64, device=params[0].device)  # NCCL: on the GPU
    factor = full * world_size() / all_reduce_sum(count).item()
    if factor != 1.0:
        for param in params:
            param.grad.mul_(factor)


def loss_terms(criterion) -> list[str]:
    """A WeightedSum's terms, whose means an epoch's row reports beside the total; [] for one loss."""
    return list(getattr(criterion, "losses", {}))


def epoch_stats(totals: list, terms: list, seconds: float, img_per_s: float) -> dict:
    """An epoch's train row from its global sums (loss, top-1, images, each loss term)."""
    n = totals[2]
    result = {"train_loss": totals[0] / n, "train_acc1": 100 * totals[1] / n}
    result.update({f"train_loss_{term}": total / n for term, total in zip(terms, totals[3:])})
    return {**result, "train_time_s": seconds, "img_per_s": img_per_s}


def trained_epoch_stats(criterion, state: TrainState) -> dict:
    """train_one_epoch's row for an epoch whose steps a checkpoint holds (state.trained): from its sums,
    already summed over the ranks, and its training time."""
    totals, seconds = state.train_sums.tolist(), state.train_seconds
    state.train_sums = None
    return epoch_stats(totals, loss_terms(criterion), seconds, totals[2] / max(seconds, 1e-9))
