"""Train a torchvision architecture on ImageNet (or any ImageFolder), on one CPU/GPU or many.

    python train.py --config configs/torchvision_v1.yaml --data /data/imagenet --arch resnet50
    python train.py --config configs/seed.yaml --data /data/imagenet --arch alexnet          # the original recipe
    python train.py --config configs/finetune.yaml --data /data/flowers --arch resnet50      # new head, pretrained body
    torchrun --nproc_per_node=8 train.py --config configs/torchvision_v1.yaml --data /data/imagenet --arch resnet50
    python train.py --recipe ResNet50_Weights.IMAGENET1K_V2 --data /data/imagenet   # the config of any weights row
    python train.py --run-name NAME --resume auto ...                                        # continue a run
Every key of TrainConfig (config.py) is also --key value; precedence: defaults < --config < command line.
"""

import dataclasses
import os
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from config import TrainConfig, check_config, parse_config, resume_notes, resumed_config
from dataset import (
    ImageDataset,
    ShardSampler,
    SyntheticDataset,
    TrainSampler,
    build_loader,
    default_workers,
    find_samples,
)
from engine import Runtime, TrainState, evaluate, train_one_epoch, trained_epoch_stats
from loss import build_loss
from model import build_model, load_checked
from optimizer import build_ema, build_optimizer, build_scheduler
from plots import plot_curves
from presets import EvalPreset, MixUpCutMix, train_transform
from recipes import expand_recipe
from report import choose_run_dir, tensorboard_writer, write_metrics, write_run_config, write_run_files
from shards import is_shard_source, shard_eval_loader, shard_train_loader
from utils import (
    UserError,
    all_gather_objects,
    all_reduce_sum,
    broadcast_buffers,
    broadcast_object,
    cleanup_distributed,
    cli,
    interrupt_in,
    is_distributed,
    load_checkpoint,
    process_group_name,
    save_checkpoint,
    setup_distributed,
    world_size,
)
from utils import rank as global_rank

# ----------------------------------------------------------------------------- building blocks


def build_data(cfg: TrainConfig, device) -> tuple:
    """(train loader, val loader, class names); labels index the train folder's classes from 0."""
    train_tf = train_transform(cfg)
    val_tf = EvalPreset(cfg.val_resize_size, cfg.val_crop_size, cfg.interpolation)
    if cfg.dummy:
        classes = [str(i) for i in range(cfg.num_classes or 1000)]
        train_set = SyntheticDataset(cfg.dummy_size, len(classes), train_tf, cfg.seed)
        val_set = SyntheticDataset(max(1, cfg.dummy_size // 4), len(classes), val_tf)
    else:
        train_samples, classes = find_samples(cfg.data, "train", False, need_split=True, shards_ok=True)
        val_samples, val_classes = find_samples(cfg.data, "val", False, need_split=True, shards_ok=True)
        if val_classes != classes:
            raise UserError(
                f"the val classes of {cfg.data} differ from its train classes "
                f"(e.g. {sorted(set(val_classes) ^ set(classes))[:3]}); both need the same class folders"
            )
        train_set, val_set = ImageDataset(train_samples, train_tf, cfg.seed), ImageDataset(val_samples, val_tf)
    world, rank = world_size(), global_rank()
    workers = default_workers(device) if cfg.workers is None else cfg.workers
    pin = device.type == "cuda"
    if not cfg.dummy and is_shard_source(cfg.data):  # tar shards, read as streams (shards.py)
        train_loader = shard_train_loader(cfg.data, train_tf, cfg, rank, world, workers, pin)
        val_args = (val_samples, val_tf, cfg.batch_size, workers, rank, world, pin)
        return train_loader, shard_eval_loader(cfg.data, *val_args, strict=True), classes
    sampler = TrainSampler(train_set, world, rank, cfg.seed, cfg.ra_reps if cfg.ra_sampler else 1)
    drop_last = len(train_set) >= cfg.batch_size * world  # full batches, unless the set is smaller than one
    train_loader = build_loader(train_set, cfg.batch_size, workers, sampler, pin, drop_last, persistent_workers=True)
    val_loader = build_loader(val_set, cfg.batch_size, workers, ShardSampler(len(val_set), world, rank), pin)
    return train_loader, val_loader, classes


def build_network(cfg: TrainConfig, num_classes: int, runtime: Runtime) -> torch.nn.Module:
    """The architecture (pretrained with --weights), on the device, in the runtime's memory layout."""
    options = {} if cfg.dropout is None else {"dropout": cfg.dropout}
    try:
        model = build_model(cfg.arch, cfg.weights, num_classes, weights_dir=cfg.weights_dir, **options)
    except TypeError as e:  # the builder has no such keyword
        raise UserError(f"{cfg.arch} has no dropout setting; remove --dropout") from e
    if cfg.sync_bn and world_size() > 1 and runtime.device.type != "cuda":
        raise UserError("--sync-bn needs CUDA GPUs (torch's SyncBatchNorm has no CPU kernel); drop it on CPU")
    if cfg.sync_bn and world_size() > 1:  # one process: its statistics are already the batch's
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(runtime.device)
    return model.to(memory_format=torch.channels_last) if runtime.channels_last else model


@dataclass
class Training:
    """The model and everything that steps with it; with TrainState, what a checkpoint holds."""

    model: torch.nn.Module  # unwrapped and uncompiled: what checkpoints hold
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: torch.optim.swa_utils.AveragedModel | None
    device: torch.device

    @classmethod
    def build(cls, cfg: TrainConfig, model, runtime: Runtime) -> "Training":
        lr = cfg.lr * cfg.batch_size * world_size() / 256 if cfg.lr_scaling == "linear" else cfg.lr
        optimizer = build_optimizer(cfg, model, lr)
        scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
        ema = build_ema(cfg, model, world_size())
        return cls(model, optimizer, build_scheduler(cfg, optimizer), scaler, ema, runtime.device)

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


def save(run_dir, training: Training, state: TrainState, cfg: TrainConfig, classes, partial_sums=None, best=False):
    """last.pt (and best.pt) on rank 0: the unwrapped, uncompiled model and all that a resume needs.
    partial_sums: a mid-epoch checkpoint's per-rank sums of the epoch so far (summed over ranks here).
    --dummy runs measure speed and save nothing."""
    if cfg.dummy:
        return
    sums = None if partial_sums is None else all_reduce_sum(partial_sums.clone()).cpu()
    rngs = all_gather_objects(training.rng_state())  # every rank's: its dropout masks are its own
    if global_rank() != 0:
        return
    checkpoint = {
        **training.state_dict(),
        **state.checkpoint_fields(),
        "train_sums": sums,
        "config": dataclasses.asdict(cfg),
        "classes": classes,
        "rng": rngs,
    }
    save_checkpoint(checkpoint, run_dir / "last.pt")
    if best:
        save_checkpoint(checkpoint, run_dir / "best.pt")
    if training.ema is not None and partial_sums is None:  # the EMA weights, as --weights of every script
        ema = {"model": training.ema.module.state_dict(), "config": checkpoint["config"], "classes": classes}
        save_checkpoint(ema, run_dir / "ema.pt")


# ----------------------------------------------------------------------------- the run


def main(cfg: TrainConfig, given: frozenset | None = None) -> dict:
    """given: the fields the user set (parse_config); on a resume the others come from the checkpoint."""
    if not resuming(cfg):  # a resume's settings are checked once its run's are known
        check_config(cfg)
    device = setup_distributed(cfg.device)
    try:
        run_dir, resume_from = open_run(cfg)
        checkpoint = load_train_checkpoint(resume_from)
        cfg, changes = resumed_config(cfg, (checkpoint or {}).get("config"), given)
        check_config(cfg)
        if changes and global_rank() == 0:
            print(f"note: {resume_from} continues with settings other than its run's: {'; '.join(changes)}")
        try:
            return fit(cfg, device, run_dir, resume_from, checkpoint)
        except BaseException as e:  # Ctrl-C (also inside torch.save), or e.g. an unreadable val image: say
            if interrupt_in(e) is not None:  # what is kept and how to go on
                raise KeyboardInterrupt(how_to_continue(run_dir, "interrupted")) from None
            if isinstance(e, UserError) and (run_dir / "last.pt").is_file() and global_rank() == 0:
                print(f"note: {how_to_continue(run_dir, 'stopped', 'once that is fixed, ')}", file=sys.stderr)
            raise
    finally:
        cleanup_distributed()


def how_to_continue(run_dir: Path, what: str, when: str = "") -> str:
    if (run_dir / "last.pt").is_file():
        where = f"--output {shlex.quote(str(run_dir.parent))} --run-name {shlex.quote(run_dir.name)}"
        return f"{what}; {run_dir / 'last.pt'} is kept: {when}continue with {where} --resume auto"
    return f"{what} before the first checkpoint; the run name {run_dir.name} can be used again"


def fit(cfg: TrainConfig, device, run_dir: Path, resume_from: Path | None, checkpoint: dict | None) -> dict:
    """Build, restore, loop, report. Returns the run dir, the per-epoch history, the best val top-1, the
    trained (unwrapped) model and the optimizer steps taken."""
    # build
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:  # cuBLAS is deterministic only with a fixed workspace, set before its first call
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not cfg.deterministic  # autotuned conv kernels, as torchvision's references
    train_loader, val_loader, classes = build_data(cfg, device)
    num_classes = cfg.num_classes or len(classes)
    if num_classes < len(classes):
        raise UserError(f"--num-classes {num_classes} is below the {len(classes)} class folders of {cfg.data}")
    runtime = Runtime.create(device, cfg.amp, cfg.channels_last, True, val_loader.dataset.transform)
    model = build_network(cfg, num_classes, runtime)
    criterion = build_loss(cfg.loss, num_classes, cfg.label_smoothing).to(device)

    # restore: the weights first, as the optimizer and the EMA are made from the model
    state = TrainState(world_size=world_size())
    if checkpoint is not None:
        source = f"{resume_from} (a {checkpoint.get('config', {}).get('arch')} run)"
        load_checked(lambda: model.load_state_dict(checkpoint["model"]), f"{cfg.arch}, {num_classes} classes", source)
    training = Training.build(cfg, model, runtime)
    if world_size() > 1:  # dropout and stochastic depth draw other masks on every rank, as the data differs
        torch.manual_seed(hash((cfg.seed, global_rank())) & 0xFFFF_FFFF_FFFF)
    if checkpoint is not None:
        try:
            training.load_state_dict(checkpoint)
        except (ValueError, KeyError, RuntimeError) as e:  # torch's words for "another optimizer structure"
            raise UserError(
                f"the optimizer state of {resume_from} does not fit this command's optimizer settings "
                f"({type(e).__name__}: {e}); resume with the run's own, or start a new run from it with --weights"
            ) from e
        state = TrainState.from_checkpoint(checkpoint)
        saved = checkpoint.get("config", {})
        if global_rank() == 0:  # what the resume does that its command may not say
            for note in resume_notes(cfg, saved, state.epoch, state.world_size, world_size()):
                print(f"note: {note}")
        saved_batch = saved.get("batch_size", cfg.batch_size)
        stream = is_shard_source(cfg.data) and not cfg.dummy  # a shard stream resumes at epoch starts
        other_batches = stream or (saved_batch, state.world_size) != (cfg.batch_size, world_size())
        if state.batch and not state.trained and other_batches:
            if global_rank() == 0:  # its position counts batches of another size, or a stream's: redo the epoch
                why = (
                    "a tar-shard stream resumes at epoch starts"
                    if stream
                    else (f"it ran with batch {saved_batch} x {state.world_size} processes, another global batch")
                )
                print(f"note: {resume_from} stopped inside epoch {state.epoch + 1}; {why}: its data starts again")
            state.batch, state.train_sums, state.train_seconds = 0, None, 0.0
        state.world_size = world_size()
        train_loader.sampler.skip = state.batch * cfg.batch_size  # a mid-epoch checkpoint continues there
        training.load_rng_state(checkpoint["rng"])  # after everything that draws random numbers was built
        checkpoint.clear()  # main() holds it too: its tensors (GBs for large models) are no longer needed
    if global_rank() == 0 and (checkpoint is None or not (run_dir / "config.yaml").exists()):  # a new run
        write_run_files(run_dir, dataclasses.asdict(cfg), classes)  # (or --resume FILE into a new folder)
    elif global_rank() == 0:  # a resume: its settings, once restored (test_torchvision.py --runs reads them)
        write_run_config(run_dir, dataclasses.asdict(cfg))
    trained = model
    if is_distributed():  # torchrun with one process too: the path its users scale out from
        trained = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    if cfg.compile:
        trained = torch.compile(trained)

    # loop
    writer = tensorboard_writer(run_dir) if global_rank() == 0 else None
    if global_rank() == 0:
        resumed = f", resumed from {resume_from} at epoch {state.epoch + 1}" if checkpoint is not None else ""
        print(
            f"run dir {run_dir}: {cfg.arch}, {num_classes} classes, {len(train_loader.dataset)} train / "
            f"{len(val_loader.dataset)} val images, world size {world_size()}, process group "
            f"{process_group_name()}, device {device}{resumed}"
        )

    def save_mid_epoch(sums):
        save(run_dir, training, state, cfg, classes, partial_sums=sums)

    options = {"ema": training.ema, "ema_steps": cfg.ema_steps, "warmup_epochs": cfg.warmup_epochs}
    options.update(mix=MixUpCutMix.from_config(cfg, num_classes), clip_grad_norm=cfg.clip_grad_norm)
    options.update(log_interval=cfg.log_interval, checkpoint_every=cfg.save_every_steps, on_checkpoint=save_mid_epoch)
    options.update(skip_bad_images=cfg.skip_bad_images, epochs=cfg.epochs)
    while state.epoch < cfg.epochs:
        if state.trained:  # resumed from the checkpoint between the epoch's last step and its validation
            train_stats = trained_epoch_stats(criterion, state)
        else:
            loop = (trained, criterion, training.optimizer, training.scaler, train_loader, runtime, state)
            train_stats = train_one_epoch(*loop, **options)
        row, is_best = finish_epoch(cfg, training, train_stats, val_loader, runtime, criterion, state)
        train_loader.sampler.skip = 0
        save(run_dir, training, state, cfg, classes, best=is_best)
        if global_rank() == 0:
            write_metrics(state.history, run_dir, writer)
            plot_curves(state.history, run_dir)  # every epoch: a run stopped early has its curves too
            tqdm.write(
                f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} top-1 {row['train_acc1']:.2f}% | val "
                f"loss {row['val_loss']:.4f} top-1 {row['val_acc1']:.2f}% top-5 {row['val_acc5']:.2f}% | "
                f"{row['img_per_s']:.1f} img/s, {row['epoch_time_s']:.1f} s"
            )

    # report
    if global_rank() == 0 and state.history:
        if state.bad_images:
            bad = sorted(set(state.bad_images))
            print(f"skipped {len(bad)} unreadable images:\n  " + "\n  ".join(bad))
        saved = "metrics" if cfg.dummy else "checkpoints and metrics"
        print(f"done: best val top-1 {state.best_acc1:.3f}%; {saved} in {run_dir}")
    return {"run_dir": str(run_dir), "history": state.history, "best_acc1": state.best_acc1, "model": model,
            "steps": state.step}  # fmt: skip


def resuming(cfg: TrainConfig) -> bool:
    """--resume, or a job torchrun --max-restarts started again (open_run resumes it from last.pt)."""
    return bool(cfg.resume) or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0


def open_run(cfg: TrainConfig):
    """(run dir, checkpoint path to resume from or None). Rank 0 names the run (a timestamp) and checks
    it; every rank uses its answer. Under torchrun --max-restarts a restarted job continues from last.pt."""
    resume = cfg.resume or ("auto" if resuming(cfg) else "")
    named = choose_run_dir(cfg.output, cfg.run_name, cfg.arch, resume) if global_rank() == 0 else None
    return broadcast_object(named)


def load_train_checkpoint(path) -> dict | None:
    """The train.py checkpoint to resume from (loaded weights-only: no code runs), None for a new run."""
    if path is None:
        return None
    checkpoint = load_checkpoint(path)
    if not {"model", "optimizer", "epoch"} <= set(checkpoint):
        raise UserError(f"{path} is not a train.py checkpoint (no optimizer state); use --weights to start from it")
    return checkpoint


def finish_epoch(cfg: TrainConfig, training: Training, train_stats: dict, val_loader, runtime, criterion, state):
    """After an epoch's steps: sync BatchNorm statistics, step the schedule, validate (and the EMA),
    and record the epoch's row in state (epoch, history, best accuracy). Returns (row, whether it is the
    best epoch so far)."""
    broadcast_buffers(training.model)  # rank 0's BatchNorm statistics: every rank evaluates and saves the same model
    lr_used = training.optimizer.param_groups[0]["lr"]
    with warnings.catch_warnings():  # a resume at the end of an epoch's steps takes no step before this one
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler", UserWarning)
        training.scheduler.step()
    val = evaluate(training.model, val_loader, runtime, criterion=criterion, skip_bad_images=cfg.skip_bad_images)
    state.bad_images += val["bad_images"]
    row = {
        "epoch": state.epoch + 1,
        "lr": lr_used,
        **train_stats,
        "val_loss": val["loss"],
        "val_acc1": val["acc1"],
        "val_acc5": val["acc5"],
    }
    if training.ema is not None:
        ema_val = evaluate(
            training.ema.module, val_loader, runtime, criterion=criterion, skip_bad_images=cfg.skip_bad_images
        )
        row.update(ema_acc1=ema_val["acc1"], ema_acc5=ema_val["acc5"])
    row["epoch_time_s"] = row.pop("train_time_s") + val["seconds"]
    state.history.append(row)
    state.epoch, state.batch, state.trained, state.train_seconds = state.epoch + 1, 0, False, 0.0
    is_best = val["acc1"] > state.best_acc1
    state.best_acc1 = max(state.best_acc1, val["acc1"])
    return row, is_best


@cli
def cli_main(argv=None) -> dict:
    argv = expand_recipe(sys.argv[1:] if argv is None else [str(a) for a in argv])
    return main(*parse_config(TrainConfig, argv, description=__doc__))


if __name__ == "__main__":
    cli_main()
