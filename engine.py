"""The two loops every script shares: `evaluate` (test_torchvision.py, train.py, benchmark.py) and
`train_one_epoch` (train.py, benchmark.py), with the settings they run under (`Runtime`) and the
training progress that outlives a step (`TrainState`).

    runtime = Runtime.create(device, amp="auto", channels_last="auto", training=False, preset=preset)
    result = evaluate(model, loader, runtime)            # {'n_images', 'acc1', 'acc5', 'loss', ...}
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dataset import check_bad_images
from presets import IMAGENET_MEAN, IMAGENET_STD, to_device
from utils import (
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
        return cls(
            device,
            amp_dtype(amp, device, training),
            use_channels_last(channels_last, device, training),
            preset.mean,
            preset.std,
        )

    @classmethod
    def on_cpu(cls, preset) -> "Runtime":
        """For kernels that run on the CPU in their own precision and layout: the int8 models and ONNX
        Runtime's CPU provider (fp32, NCHW)."""
        return cls(torch.device("cpu"), None, False, preset.mean, preset.std)

    def inputs(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, H, W) uint8 host batch -> normalised float on the device, and the targets there."""
        images = to_device(images, self.device, self.mean, self.std, self.channels_last)
        return images, targets.to(self.device, non_blocking=True)


@dataclass
class TrainState:
    """Training progress that outlives a step, saved in every checkpoint."""

    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken
    batch: int = 0  # batches done in the current epoch (> 0 only in a mid-epoch checkpoint)
    best_acc1: float = -1.0
    history: list = field(default_factory=list)  # one row per finished epoch (metrics.csv)
    bad_images: list = field(default_factory=list)  # unreadable files skipped so far
    world_size: int = 1  # of the run that saved it: a mid-epoch position is in its batches
    train_sums: torch.Tensor | None = None  # a mid-epoch checkpoint's sums of the epoch so far
    train_seconds: float = 0.0  # a mid-epoch checkpoint's training time of the epoch so far
    trained: bool = False  # a checkpoint saved after the epoch's last step, before its validation

    CHECKPOINT_KEYS = tuple("epoch step batch best_acc1 history bad_images world_size train_seconds trained".split())

    def checkpoint_fields(self) -> dict:
        return {key: getattr(self, key) for key in self.CHECKPOINT_KEYS}

    @classmethod
    def from_checkpoint(cls, checkpoint: dict) -> "TrainState":
        fields = {key: checkpoint[key] for key in cls.CHECKPOINT_KEYS if key in checkpoint}
        return cls(**fields, train_sums=checkpoint.get("train_sums"))


def topk_correct(logits, targets, ks=(1, 5)) -> list:
    """Number of samples whose target is among the top-k logits, for each k (tensors, no host sync)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (B, k)
    hits = top == targets[:, None]
    return [hits[:, :k].sum() for k in ks]


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
    desc="eval",
) -> dict:
    """Top-1/top-5 and mean loss over every image of the loader's dataset, each counted once in any
    world size (each rank sees its own shard, sums are all-reduced). With keep_predictions, rank 0
    also gets the top-5 indices and probabilities of every image, ordered by dataset index.
    class_mask: a (C,) bool tensor; predictions, loss and probabilities are restricted to its classes
    (ImageNet-A's and -R's protocol: the logits of the other classes become -inf)."""
    model.eval()
    device = runtime.device
    mask_bias = None  # (C,): 0 for the kept classes, -inf for the others
    if class_mask is not None:
        mask_bias = torch.zeros(len(class_mask), device=device).masked_fill(~class_mask.to(device), float("-inf"))
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    predictions, bad = [], []
    samples = loader.dataset.samples
    start, batches = time.perf_counter(), 0
    for images, targets, indices, errors in tqdm(
        loader, desc=desc, unit="batch", leave=False, disable=not is_main() or None
    ):
        bad += check_bad_images(errors, samples, skip_bad_images)
        if len(targets) == 0:
            continue
        images, targets = runtime.inputs(images, targets)
        with autocast(device, runtime.amp_dtype):
            logits = model(images)
        logits = logits.float() if mask_bias is None else logits.float() + mask_bias
        loss = criterion(logits, targets) if criterion is not None else F.cross_entropy(logits, targets)
        top1, top5 = topk_correct(logits, targets)
        sums += torch.stack([loss.double() * len(targets), top1, top5, torch.tensor(len(targets), device=device)])
        batches += 1
        if keep_predictions:
            probs, classes = logits.softmax(dim=1).topk(min(5, logits.shape[1]), dim=1)
            predictions.append((indices, targets.cpu(), classes.cpu(), probs.cpu()))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    loss_sum, top1, top5, n = all_reduce_sum(sums).tolist()
    bad = sorted(path for shard in all_gather_objects(bad) for path in shard)
    result = {
        "n_images": int(n),
        "acc1": 100 * top1 / max(n, 1),
        "acc5": 100 * top5 / max(n, 1),
        "loss": loss_sum / max(n, 1),
        "seconds": seconds,
        "img_per_s": n / seconds if seconds else 0.0,
        "ms_per_batch": 1000 * seconds / max(batches, 1),
        "bad_images": bad,
    }
    if keep_predictions:
        columns = [torch.cat(parts) for parts in zip(*predictions)] if predictions else []
        result["predictions"] = merge_predictions(all_gather_objects(columns), samples)
    return result


OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)  # CUDA's, the host's


def with_smaller_batches(run: Callable[[int], dict], batch_size: int, device) -> tuple[dict | None, int]:
    """(run(batch), batch) for the first batch that fits, halving it after an out-of-memory error (CUDA's
    or the host's) down to 1; (None, 1) when even 1 does not fit, so a sweep goes on with the next model.
    Under torchrun the ranks would stop disagreeing on the batch, so there the error ends the run."""
    while True:
        try:
            return run(batch_size), batch_size
        except OUT_OF_MEMORY as e:
            if world_size() > 1:
                raise UserError(f"out of memory at batch {batch_size} ({type(e).__name__}); lower --batch-size") from e
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


def train_one_epoch(
    model,
    criterion,
    optimizer,
    scaler,
    loader,
    runtime: Runtime,
    state: TrainState,
    *,
    ema=None,
    ema_steps: int = 32,
    warmup_epochs: int = 0,
    mix: Callable | None = None,
    clip_grad_norm: float = 0.0,
    log_interval: int = 20,
    checkpoint_every: int = 0,
    on_checkpoint: Callable[[torch.Tensor], None] | None = None,
    skip_bad_images: bool = False,
    epochs: int | None = None,
) -> dict:
    """One pass over this rank's shard of epoch `state.epoch`, advancing state.step and state.batch.
    Loss and accuracy stay on the device between log intervals, the loop's only host syncs. Every
    `checkpoint_every` steps and after the last one, `on_checkpoint(sums)` saves a mid-epoch checkpoint
    (sums: this rank's loss, top-1 and image counts so far). `ema` (an AveragedModel of `model`'s
    unwrapped module) is updated every `ema_steps` steps; during the first `warmup_epochs` it copies the
    weights, as torchvision's references do. `mix` (presets.MixUpCutMix) turns each normalised batch and
    its labels into mixed images and soft targets; train top-1 then counts the largest target. A
    WeightedSum criterion's terms are reported too."""
    model.train()
    device, epoch = runtime.device, state.epoch
    loader.sampler.set_epoch(epoch)
    terms = loss_terms(criterion)
    sums = torch.zeros(3 + len(terms), dtype=torch.float64, device=device)  # loss, top-1, n, terms...
    if state.train_sums is not None:  # resumed mid-epoch: rank 0 carries the epoch's (global) sums so far
        if global_rank() == 0:
            sums[: len(state.train_sums)] += state.train_sums.to(device)
        state.train_sums = None
    first_bad_step = torch.tensor(-1, device=device)
    start, seen, carried = time.perf_counter(), 0, state.train_seconds  # seen: images of this call
    bar = tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{epochs or '?'}",
        unit="batch",
        disable=not is_main() or None,
        initial=state.batch,
        total=state.batch + len(loader),
    )
    for images, targets, _, errors in bar:
        state.bad_images += check_bad_images(errors, loader.dataset.samples, skip_bad_images)
        if len(targets) == 0:  # every image of the batch was unreadable and skipped
            if world_size() > 1:  # the other ranks wait in the gradient all-reduce: stop instead of hanging
                raise UserError(
                    f"a whole batch was unreadable on rank {global_rank()} ({', '.join(state.bad_images[-3:])}"
                    "...); remove the unreadable files"
                )
            state.batch += 1
            continue
        seen += len(targets)
        images, targets = runtime.inputs(images, targets)
        if mix is not None:
            images, targets = mix(images, targets, state.step, global_rank())  # (B, C) soft targets
        with autocast(device, runtime.amp_dtype):
            logits = model(images)
        logits = getattr(logits, "logits", logits)  # googlenet and inception_v3 add aux outputs when training
        loss = criterion(logits, targets)
        scaler.scale(loss).backward()
        if clip_grad_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.batch += 1
        if ema is not None and state.step % ema_steps == 0:
            ema.update_parameters(model)  # DDP and compile wrap the same parameters
            if epoch < warmup_epochs:
                ema.n_averaged.fill_(0)  # the next update copies again
        loss = loss.detach()
        first_bad_step = torch.where(~torch.isfinite(loss) & (first_bad_step < 0), state.step, first_bad_step)
        count = torch.tensor(len(targets), device=device)
        parts = [criterion.parts[t].double() * len(targets) for t in terms]
        labels = targets.argmax(1) if targets.ndim == 2 else targets
        top1 = topk_correct(logits.detach(), labels, (1,))[0]
        sums += torch.stack([loss.double() * len(targets), top1, count, *parts])
        last = state.batch == bar.total
        # also after the epoch's last step, before validation: a validation that fails (an unreadable val
        # image, a crash) then keeps the epoch's training, and the resume validates it
        every = bool(checkpoint_every) and state.step % checkpoint_every == 0
        save_now = on_checkpoint is not None and (every or last)
        if state.step % log_interval == 0 or last or save_now:
            if first_bad_step.item() >= 0:  # the only host syncs of the loop: at log and save points
                raise UserError(
                    f"loss became {loss.item()} at step {first_bad_step.item()} (epoch {epoch + 1}); the last good "
                    "checkpoint is kept; lower --lr or enable --clip-grad-norm"
                )
            loss_sum, _, n = all_reduce_sum(sums[:3].clone()).tolist()
            rate = seen * world_size() / (time.perf_counter() - start)
            lr = optimizer.param_groups[0]["lr"]
            bar.set_postfix(loss=f"{loss_sum / n:.4f}", lr=f"{lr:.4g}", img_s=f"{rate:.1f}")
            if save_now:
                state.trained, state.train_seconds = last, carried + time.perf_counter() - start
                on_checkpoint(sums)
    seconds = time.perf_counter() - start
    return epoch_stats(all_reduce_sum(sums).tolist(), terms, carried + seconds, seen * world_size() / seconds)


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
