"""Train a torchvision architecture on ImageNet (or any ImageFolder), on one CPU/GPU or many.

    python train.py --config configs/torchvision_v1.yaml --data /data/imagenet --arch resnet50
    python train.py --config configs/seed.yaml --data /data/imagenet --arch alexnet      # the original recipe
    python train.py --config configs/finetune.yaml --data /data/flowers --arch resnet50  # a new head
    torchrun --nproc_per_node=8 train.py --config configs/torchvision_v1.yaml --data /data/imagenet
    python train.py --recipe ResNet50_Weights.IMAGENET1K_V2 --data /data/imagenet  # any weights row's recipe
    python train.py --run-name NAME --resume auto ...                                    # continue a run
Every key of TrainConfig (config.py) is also --key value; precedence: defaults < --config < command line.
"""

import dataclasses
import os
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from config import (
    TrainConfig,
    check_config,
    config_parser,
    describe_global_batch,
    expand_recipe,
    parse_config,
    resume_notes,
    resumed_config,
    with_accumulation,
)
from dataset import find_samples, is_shard_source
from engine import (
    LoopSettings,
    Runtime,
    Training,
    TrainState,
    epoch_sampler,
    evaluate,
    train_one_epoch,
    trained_epoch_stats,
)
from loader import (
    EvalSampler,
    GpuTrainDataset,
    GpuTrainLoader,
    ImageDataset,
    SyntheticDataset,
    TrainSampler,
    build_loader,
    default_workers,
    shard_eval_loader,
    shard_train_loader,
    use_gpu_decode,
)
from loss import build_loss
from model import (
    build_model,
    check_input_size,
    is_weights_file,
    load_checked,
    num_outputs,
    replace_head,
    resolve_weights,
    size_argument,
    takes_one_size,
    weights_enum,
    weights_path,
)
from presets import EvalPreset, MixUpCutMix, resolution_ramp, train_resolution, train_transform
from report import plot_curves, tensorboard_writer, write_metrics, write_run_config, write_run_files
from restarts import (
    REQUEUE_EXIT,
    Preempted,
    clear_preempted,
    command_key,
    ignore_stop_signals,
    install_stop_handlers,
    is_preempted,
    job_identity,
    mark_preempted,
    record_run,
    recorded_run,
    restart_count,
    restore_stop_handlers,
    stop_requested,
)
from tracking import open_tracker
from utils import (
    AgreedError,
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
    remove_stale_temporaries,
    save_checkpoint,
    setup_distributed,
    world_size,
)
from utils import rank as global_rank

# ----------------------------------------------------------------------------- building blocks


def with_weights_named(cfg: TrainConfig) -> TrainConfig:
    """--weights DEFAULT (or IMAGENET1K_V2) as the weights it names, 'ResNet50_Weights.IMAGENET1K_V2', which
    the run's config.yaml then records; files and no weights as given."""
    if cfg.weights is None or is_weights_file(cfg.weights):
        return cfg
    enum = weights_enum(cfg.arch, cfg.weights)
    return dataclasses.replace(cfg, weights=None if enum is None else str(enum))


def check_input_sizes(cfg: TrainConfig) -> None:
    """Before anything is written: the architecture takes the run's train crops (train_crop_size, or the
    ends of its resolution ramp) and val crop (ViT's and MaxViT's one size: its weights', or the run's for a
    new one; every architecture's minimum)."""
    ramp = resolution_ramp(cfg)
    if ramp is not None and takes_one_size(cfg.arch):
        raise UserError(f"{cfg.arch} takes one image size: progressive resizing needs another architecture")
    built_for = None if cfg.weights is None else resolve_weights(cfg.weights, cfg.arch).built_for
    if takes_one_size(cfg.arch) and built_for is None and cfg.train_crop_size != cfg.val_crop_size:
        raise UserError(
            f"{cfg.arch} is made for one image size, not --train-crop-size {cfg.train_crop_size} and "
            f"--val-crop-size {cfg.val_crop_size}; use --val-crop-size {cfg.train_crop_size} too: a new "
            f"{cfg.arch} is made for that size"
        )
    train_sizes = [(cfg.train_crop_size, "--train-crop-size")]
    if ramp is not None:
        train_sizes = [(ramp.min_res, "--min-res"), (ramp.max_res, "--max-res")]
    for size, flag in train_sizes:
        check_input_size(cfg.arch, size, flag, built_for, train=True)
    check_input_size(cfg.arch, cfg.val_crop_size, "--val-crop-size", built_for)


def class_mismatch(data, classes: list[str], val_classes: list[str]) -> str:
    """What differs between the train and val class folders, and what to do."""

    def some(names) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    only_val = sorted(set(val_classes) - set(classes))
    only_train = sorted(set(classes) - set(val_classes))
    differences = [f"val/ has {some(only_val)}, which train/ lacks"] if only_val else []
    differences += [f"train/ has {some(only_train)}, which val/ lacks"] if only_train else []
    return (
        f"the class folders of {data}/train and {data}/val differ: {'; '.join(differences)}; give both "
        "the same class folders (validation scores every class the model learns)"
    )


def build_data(cfg: TrainConfig, device) -> tuple:
    """(train loader, val loader, class names); labels index the train folder's classes from 0."""
    train_tf = train_transform(cfg)
    val_tf = EvalPreset(cfg.val_resize_size, cfg.val_crop_size, cfg.interpolation)
    world, rank = world_size(), global_rank()
    workers = default_workers(device) if cfg.workers is None else cfg.workers
    pin = device.type == "cuda"
    on_gpu = gpu_decode(cfg, device, rank)
    if cfg.dummy:
        classes = [str(i) for i in range(cfg.num_classes or 1000)]
        train_set = SyntheticDataset(cfg.dummy_size, len(classes), train_tf, cfg.seed)
        val_set = SyntheticDataset(max(1, cfg.dummy_size // 4), len(classes), val_tf)
    else:
        train_samples, classes = find_samples(cfg.data, "train", False, need_split=True, shards_ok=True)
        val_samples, val_classes = find_samples(cfg.data, "val", False, need_split=True, shards_ok=True)
        if cfg.limit:  # a quick check: a few images of every class, not the first class's
            train_samples, val_samples = spread(train_samples, cfg.limit), spread(val_samples, cfg.limit)
        if val_classes != classes:  # targets are indices into each split's sorted class folders
            raise UserError(class_mismatch(cfg.data, classes, val_classes))
        if is_shard_source(cfg.data):  # tar shards, read as streams (loader.py)
            train_loader = shard_train_loader(cfg.data, train_tf, cfg, rank, world, workers, pin)
            val_loader = shard_eval_loader(
                cfg.data, val_samples, val_tf, cfg.batch_size, workers, rank, world, pin, strict=True
            )
            return train_loader, val_loader, classes
        train_set, val_set = (
            ImageDataset(train_samples, train_tf, cfg.seed),
            ImageDataset(val_samples, val_tf),
        )
    if on_gpu:  # the workers read bytes and draw the boxes; the GPU decodes and crops
        train_set = GpuTrainDataset(train_set.samples, train_tf, cfg.seed)
    sampler = TrainSampler(train_set, world, rank, cfg.seed, cfg.ra_reps if cfg.ra_sampler else 1)
    # full steps (unless the set is smaller than one), or also the last partial one, as the references
    drop_last = cfg.drop_last and len(train_set) >= cfg.global_batch
    options = {"sampler": sampler, "drop_last": drop_last, "persistent_workers": True}
    options["accum_steps"] = cfg.accum_steps
    if on_gpu:
        interpolation = cfg.interpolation
        train_loader = GpuTrainLoader(train_set, cfg.batch_size, workers, device, interpolation, **options)
    else:
        train_loader = build_loader(train_set, cfg.batch_size, workers, pin_memory=pin, **options)
    val_loader = build_loader(val_set, cfg.batch_size, workers, EvalSampler(len(val_set), world, rank), pin)
    return train_loader, val_loader, classes


def gpu_decode(cfg: TrainConfig, device, rank: int) -> bool:
    """Whether the training images are decoded on the GPU (--decode gpu, image folders on a CUDA device
    whose nvJPEG works); otherwise rank 0 notes why the CPU decodes them."""
    if cfg.decode != "gpu":
        return False
    note_to = sys.stdout if rank == 0 else None
    if cfg.dummy or is_shard_source(cfg.data):
        if note_to is not None:
            print("note: --decode gpu reads image folders; these images are decoded on the CPU", file=note_to)
        return False
    return use_gpu_decode("gpu", device, note_to=note_to)


def spread(samples, count: int):
    """`count` samples evenly spaced over the sorted list: every class's share, as far as count allows."""
    if count >= len(samples):
        return samples
    return samples.take(np.linspace(0, len(samples) - 1, count).round().astype(np.int64))


def build_network(cfg: TrainConfig, num_classes: int, runtime: Runtime, resumed: bool) -> torch.nn.Module:
    """The architecture (pretrained with --weights, then a new head where the classes differ), on the device,
    in the runtime's memory layout; rank 0 says which weights a new run starts from."""
    options = {} if cfg.dropout is None else {"dropout": cfg.dropout}
    if cfg.weights is None:  # a ViT or MaxViT is made for the run's image size
        options.update(size_argument(cfg.arch, cfg.train_crop_size), num_classes=num_classes)
    try:
        # a resume loads its checkpoint over the weights: their file is not read again
        model = build_model(cfg.arch, cfg.weights, weights_dir=cfg.weights_dir, load=not resumed, **options)
    except TypeError as e:  # the builder has no such keyword
        raise UserError(f"{cfg.arch} has no dropout setting; remove --dropout") from e
    pretrained_classes = num_outputs(model)
    if pretrained_classes != num_classes:
        replace_head(model, num_classes)
    if global_rank() == 0 and cfg.weights is not None and not resumed:
        head = (
            f"; its {pretrained_classes}-class head is replaced by a new, randomly initialised "
            f"{num_classes}-class head (fine-tuning)"
            if pretrained_classes != num_classes
            else f" ({num_classes} classes, head kept)"
        )
        enum = None if is_weights_file(cfg.weights) else weights_enum(cfg.arch, cfg.weights)
        where = cfg.weights if enum is None else f"{enum} from {weights_path(enum, cfg.weights_dir)}"
        print(f"weights: {where}{head}")
    if cfg.sync_bn and world_size() > 1 and runtime.device.type != "cuda":
        raise UserError("--sync-bn needs CUDA GPUs (torch's SyncBatchNorm has no CPU kernel); drop it on CPU")
    if cfg.sync_bn and world_size() > 1:  # one process: its statistics are already the batch's
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(runtime.device)
    return model.to(memory_format=torch.channels_last) if runtime.channels_last else model


def wrap(model: torch.nn.Module, cfg: TrainConfig, device) -> torch.nn.Module:
    """What the loop calls: DDP under torchrun (with one process too: the path its users scale out
    from), then torch.compile with --compile."""
    wrapped = model
    if is_distributed():
        device_ids = [device] if device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return torch.compile(wrapped) if cfg.compile else wrapped


def seed_ranks(cfg: TrainConfig) -> None:
    """Once the model and its EMA are built, each rank its own random stream: dropout and stochastic depth
    draw other masks on every rank, as the data differs."""
    if world_size() > 1:
        torch.manual_seed(hash((cfg.seed, global_rank())) & 0xFFFF_FFFF_FFFF)


def seed_and_kernels(cfg: TrainConfig) -> None:
    """The seed of the weights' initialisation, and the kernels: deterministic ones with --deterministic."""
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:  # cuBLAS is deterministic only with a fixed workspace, set before its first call
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    # autotuned conv kernels, as torchvision's references
    torch.backends.cudnn.benchmark = not cfg.deterministic


def save(
    run_dir, training: Training, state: TrainState, cfg: TrainConfig, classes, partial_sums=None, best=""
):
    """last.pt on rank 0: the unwrapped, uncompiled model and all that a resume needs; best.pt when this
    epoch's top-1 is the best so far (best: 'model', that checkpoint; 'ema', the EMA's weights, whose top-1
    was higher). partial_sums: a mid-epoch checkpoint's per-rank sums of the epoch so far (summed over ranks
    here). --dummy runs measure speed and save nothing."""
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
    if best == "model":
        save_checkpoint({**checkpoint, "best_of": "model"}, run_dir / "best.pt")
    if training.ema is not None and partial_sums is None:  # the EMA weights, as --weights of every script
        ema = {"model": training.ema.module.state_dict(), "config": checkpoint["config"], "classes": classes}
        save_checkpoint(ema, run_dir / "ema.pt")
        if best == "ema":
            save_checkpoint({**ema, "epoch": state.epoch, "best_of": "ema"}, run_dir / "best.pt")


# ----------------------------------------------------------------------------- run folders


def open_run(cfg: TrainConfig, given: frozenset | None) -> tuple[Path, Path | None]:
    """(run dir, checkpoint path to resume from or None). Rank 0 chooses (choose_run) and every rank
    uses its answer, or raises its error."""
    choice = None
    if global_rank() == 0:
        try:
            choice = choose_run(cfg, given)
        except UserError as e:  # e.g. the run exists: every rank stops with it, none waits
            choice = e
    choice = broadcast_object(choice)
    if isinstance(choice, UserError):
        raise AgreedError(str(choice))
    return choice


def choose_run(cfg: TrainConfig, given: frozenset | None) -> tuple[Path, Path | None]:
    """The run folder of this command, and its checkpoint where it continues one:

      --resume FILE or auto      as asked (choose_run_dir);
      a restart of this job      the folder this job's command recorded (restarts.py): from its last.pt,
                                 or afresh where it saved none yet;
      the same command again     the preempted run it recorded, from its last.pt;
      else                       a new run (--run-name, or ARCH-TIMESTAMP); a --dummy run without
                                 --run-name replaces the previous one's folder, dummy-ARCH (metrics only).

    Each choice is recorded under the command, and the stale temporary files of a write that a kill
    interrupted are removed from the folder."""
    output = Path(cfg.output)
    if cfg.dummy and not (cfg.run_name or cfg.resume):
        return replace_dummy_run(output / f"dummy-{cfg.arch}"), None
    key = command_key(command_settings(cfg, given))
    record = recorded_run(output, key)
    earlier = output / record["run_dir"] if record is not None else None
    if cfg.resume:
        run_dir, resume_from = choose_run_dir(output, cfg.run_name, cfg.arch, cfg.resume)
    elif restart_count() and record is not None and record["job"] == job_identity():
        run_dir, resume_from = earlier, earlier / "last.pt" if (earlier / "last.pt").is_file() else None
        how = f"continuing {run_dir} from its last.pt" if resume_from else f"starting {run_dir} afresh"
        print(f"note: restart {restart_count()} of this job: {how}")
    elif earlier is not None and is_preempted(earlier) and (earlier / "last.pt").is_file():
        run_dir, resume_from = earlier, earlier / "last.pt"
        print(f"note: {run_dir} was preempted: the same command continues it from its last.pt")
    else:
        run_dir, resume_from = choose_run_dir(output, cfg.run_name, cfg.arch, "")
    clear_preempted(run_dir)
    remove_stale_temporaries(run_dir)
    record_run(output, key, run_dir)
    return run_dir, resume_from


def command_settings(cfg: TrainConfig, given: frozenset | None) -> dict:
    """What names a command across its restarts: the settings it gives (all of them without `given`),
    --resume aside."""
    settings = dataclasses.asdict(cfg)
    names = settings if given is None else given
    return {name: settings[name] for name in sorted(names) if name != "resume"}


def replace_dummy_run(run_dir: Path) -> Path:
    """The folder of a --dummy run, emptied of an earlier --dummy run's files (never of another run's)."""
    if not run_dir.exists():
        return run_dir
    config = run_dir / "config.yaml"
    earlier = yaml.safe_load(config.read_text()) if config.is_file() else None
    if not (isinstance(earlier, dict) and earlier.get("dummy")) or any(run_dir.glob("*.pt")):
        raise UserError(f"{run_dir} holds a run that is not a --dummy run; pass --run-name NAME or move it")
    print(f"note: replacing the previous --dummy run's metrics in {run_dir}")
    shutil.rmtree(run_dir)
    return run_dir


def choose_run_dir(output, run_name: str, arch: str, resume: str) -> tuple[Path, Path | None]:
    """(run dir, checkpoint to resume from). A run never reuses another run's dir without --resume."""
    output = Path(output)
    if resume and resume != "auto":
        return (output / run_name if run_name else Path(resume).parent), Path(resume)
    if resume == "auto":
        return run_to_resume(output, run_name, arch)
    if run_name:
        run_dir = output / run_name
        if (run_dir / "last.pt").exists() or (run_dir / "best.pt").exists():
            raise UserError(
                f"run dir {run_dir} already exists; continue it with --resume auto or choose another "
                "--run-name"
            )
        if run_dir.exists() and any(run_dir.iterdir()):  # no checkpoint: a start that failed, or --dummy
            print(f"note: {run_dir} holds no checkpoint (a run that never saved one); starting afresh in it")
        return run_dir, None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir, n = output / f"{arch}-{stamp}", 1
    while run_dir.exists():
        n += 1
        run_dir = output / f"{arch}-{stamp}-{n}"
    return run_dir, None


def run_to_resume(output: Path, run_name: str, arch: str) -> tuple[Path, Path]:
    """--resume auto: the named run, else the newest run of this architecture, with a last.pt."""
    if run_name:
        candidates = [output / run_name]
    else:
        candidates = sorted(output.glob(f"{arch}-*"), key=last_saved, reverse=True)
    found = [d for d in candidates if (d / "last.pt").is_file()]
    if not found:
        where = output / run_name if run_name else f"{output}/{arch}-*"
        raise UserError(
            f"--resume auto found nothing to resume: no last.pt in {where}; start a new run without --resume"
        )
    return found[0], found[0] / "last.pt"


def last_saved(run_dir: Path) -> float:
    """When the run's last.pt was written (0 without one)."""
    last = run_dir / "last.pt"
    return last.stat().st_mtime if last.exists() else 0.0


def load_train_checkpoint(path) -> dict | None:
    """The train.py checkpoint to resume from (loaded weights-only: no code runs), None for a new run."""
    if path is None:
        return None
    checkpoint = load_checkpoint(path)
    if not {"model", "optimizer", "epoch"} <= set(checkpoint):
        raise UserError(
            f"{path} is not a train.py checkpoint (no optimizer state); use --weights to start from it"
        )
    return checkpoint


def how_to_continue(run_dir: Path, what: str, when: str = "") -> str:
    if (run_dir / "last.pt").is_file():
        where = f"--output {shlex.quote(str(run_dir.parent))} --run-name {shlex.quote(run_dir.name)}"
        return f"{what}; {run_dir / 'last.pt'} is kept: {when}continue with {where} --resume auto"
    return f"{what} before the first checkpoint; the run name {run_dir.name} can be used again"


def write_run_record(run_dir: Path, cfg: TrainConfig, classes: list[str], resumed: bool) -> None:
    """On rank 0: a new run's config.yaml and run.json (also a --resume FILE into a new folder); a
    resume's config.yaml, once its settings are restored (test_torchvision.py --runs reads them)."""
    if global_rank() != 0:
        return
    if resumed and (run_dir / "config.yaml").exists():
        write_run_config(run_dir, dataclasses.asdict(cfg))
    else:
        write_run_files(run_dir, dataclasses.asdict(cfg), classes)


# ----------------------------------------------------------------------------- resuming


def restore(
    cfg: TrainConfig, training: Training, checkpoint: dict | None, resume_from, train_loader
) -> TrainState:
    """The TrainState to start from: a new one, or the checkpoint's, with its optimizer, scaler and EMA
    loaded into `training`, the sampler placed where a mid-epoch checkpoint stopped, and every rank's RNG
    where it was."""
    if checkpoint is None:
        return TrainState(world_size=world_size())
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
    restart_interrupted_epoch(cfg, state, saved, resume_from)
    state.world_size = world_size()
    epoch_sampler(train_loader).skip = state.batch * cfg.batch_size  # a mid-epoch checkpoint continues there
    training.load_rng_state(checkpoint["rng"])  # after everything that draws random numbers was built
    checkpoint.clear()  # main() holds it too: its tensors (GBs for large models) are no longer needed
    return state


def position(state: TrainState) -> str:
    """Where a resumed run continues: 'epoch 3, batch 40, after 240 optimizer steps' inside an epoch, else
    'epoch 3, after 234 optimizer steps'."""
    inside = f", batch {state.batch + 1}" if state.batch else ""
    return f"epoch {state.epoch + 1}{inside}, after {state.step} optimizer steps"


def restart_interrupted_epoch(cfg: TrainConfig, state: TrainState, saved: dict, resume_from) -> None:
    """A mid-epoch position is in batches of the saved run, after an optimizer step. With the same global
    batch and processes, each rank's images so far are the same whatever its batch size: the position is
    counted again in this run's batches. Another global batch or number of processes deals the epoch
    otherwise, and a tar-shard stream can't start inside an epoch: there the epoch starts again."""
    if not state.batch or state.trained:
        return
    saved_batch = saved.get("batch_size", cfg.batch_size)
    saved_global = saved.get("global_batch") or saved_batch * state.world_size  # before it was recorded
    images = state.batch * saved_batch  # this rank's, so far in the epoch
    stream = is_shard_source(cfg.data) and not cfg.dummy
    same = (saved_global, state.world_size) == (cfg.global_batch, world_size())
    if same and not stream and images % cfg.batch_size == 0:
        state.batch = images // cfg.batch_size
        return
    if global_rank() == 0:
        if stream:
            why = "a tar-shard stream resumes at epoch starts"
        else:
            why = f"it ran with a global batch of {saved_global} on {state.world_size} processes"
        print(f"note: {resume_from} stopped inside epoch {state.epoch + 1}; {why}: its data starts again")
    state.batch = 0
    state.train_sums = None
    state.train_seconds = 0.0


# ----------------------------------------------------------------------------- the run


def main(cfg: TrainConfig, given: frozenset | None = None) -> dict:
    """given: the fields the user set (parse_config); on a resume the others come from the checkpoint."""
    cfg = with_weights_named(cfg)
    arch_given = given is None or "arch" in given
    if cfg.weights is not None and is_weights_file(cfg.weights) and not arch_given:
        # a file names its architecture (a train.py checkpoint, a torchvision download): no --arch needed
        cfg = dataclasses.replace(cfg, arch=resolve_weights(cfg.weights).arch)
    if not cfg.resume:  # a --resume's settings are checked once its run's are known
        check_config(cfg)
        check_input_sizes(cfg)
        cfg = with_accumulation(cfg, world_size())
    device = setup_distributed(cfg.device)
    install_stop_handlers()
    try:
        run_dir, resume_from = open_run(cfg, given)
        checkpoint = load_train_checkpoint(resume_from)
        cfg, changes = resumed_config(cfg, (checkpoint or {}).get("config"), given)
        check_config(cfg)
        if resume_from is not None:  # a new run's sizes were checked above; a resume's once its are known
            check_input_sizes(cfg)
            cfg = with_accumulation(cfg, world_size())
        if changes and global_rank() == 0:
            print(f"note: {resume_from} continues with settings other than its run's: {'; '.join(changes)}")
        try:
            return fit(cfg, device, run_dir, resume_from, checkpoint)
        except Preempted as e:
            # a Python handler gives way to the default one while the interpreter exits, and torchrun's
            # SIGTERM (sent once another rank is gone) would then end this process before its exit code
            ignore_stop_signals()
            stopped = f"{stop_requested()} at {e}"
            if global_rank() == 0:
                mark_preempted(run_dir, {"signal": stop_requested(), "at": str(e)})
                print(
                    f"preempted by {stopped}: {run_dir / 'last.pt'} is saved; the same command continues "
                    f"it (exit code {REQUEUE_EXIT}: requeue)",
                    file=sys.stderr,
                )
            sys.exit(REQUEUE_EXIT)
        except BaseException as e:
            # Ctrl-C (also inside torch.save), or a UserError such as an unreadable val image: say what is
            # kept and how to go on
            if interrupt_in(e) is not None:
                raise KeyboardInterrupt(how_to_continue(run_dir, "interrupted")) from None
            if isinstance(e, UserError) and (run_dir / "last.pt").is_file() and global_rank() == 0:
                print(f"note: {how_to_continue(run_dir, 'stopped', 'once that is fixed, ')}", file=sys.stderr)
            raise
    finally:
        cleanup_distributed()
        if stop_requested() is None:  # a stopping process ignores them: a second one must not cut its exit
            restore_stop_handlers()


def fit(cfg: TrainConfig, device, run_dir: Path, resume_from: Path | None, checkpoint: dict | None) -> dict:
    """Build, restore, loop, report. Returns the run dir, the per-epoch history, the best val top-1, the
    trained (unwrapped) model and the optimizer steps taken."""
    # build
    seed_and_kernels(cfg)
    train_loader, val_loader, classes = build_data(cfg, device)
    num_classes = cfg.num_classes or len(classes)
    if num_classes < len(classes):
        raise UserError(
            f"--num-classes {num_classes} is below the {len(classes)} class folders of {cfg.data}"
        )
    runtime = Runtime.create(device, cfg.amp, cfg.channels_last, True, val_loader.dataset.transform)
    model = build_network(cfg, num_classes, runtime, resumed=checkpoint is not None)
    criterion = build_loss(cfg.loss, num_classes, cfg.label_smoothing).to(device)

    # restore: the weights first, as the optimizer and the EMA are made from the model
    if checkpoint is not None:
        source = f"{resume_from} (a {checkpoint.get('config', {}).get('arch')} run)"
        load_checked(
            lambda: model.load_state_dict(checkpoint["model"]), f"{cfg.arch}, {num_classes} classes", source
        )
    training = Training.build(cfg, model, runtime)
    seed_ranks(cfg)
    state = restore(cfg, training, checkpoint, resume_from, train_loader)
    if checkpoint is None or state.epoch < cfg.epochs:  # a finished run resumed: nothing trains or changes
        write_run_record(run_dir, cfg, classes, resumed=checkpoint is not None)
    training.wrapped = wrap(model, cfg, device)

    # loop
    settings, mix = LoopSettings.from_config(cfg), MixUpCutMix.from_config(cfg, num_classes)
    writer = tensorboard_writer(run_dir) if global_rank() == 0 else None
    if global_rank() == 0:
        resumed = f", resumed from {resume_from} at {position(state)}" if checkpoint is not None else ""
        print(
            f"run dir {run_dir}: {cfg.arch}, {num_classes} classes, {len(train_loader.dataset)} train / "
            f"{len(val_loader.dataset)} val images, world size {world_size()}, process group "
            f"{process_group_name()}, device {device}{resumed}"
        )
        print(describe_global_batch(cfg, world_size()))

    def save_mid_epoch(sums):
        save(run_dir, training, state, cfg, classes, partial_sums=sums)

    # W&B or MLflow on rank 0 (--tracker); leaving the block, also by an error, sends the run's files
    tracker_name = cfg.tracker if global_rank() == 0 else "none"
    with open_tracker(
        tracker_name, run_dir, dataclasses.asdict(cfg), checkpoint is not None, cfg.tracker_project
    ) as tracker:
        while state.epoch < cfg.epochs:
            if state.trained:  # resumed from the checkpoint between the epoch's last step and its validation
                train_stats = trained_epoch_stats(criterion, state)
            else:
                train_stats = train_one_epoch(
                    training,
                    criterion,
                    train_loader,
                    runtime,
                    state,
                    settings,
                    mix,
                    on_checkpoint=save_mid_epoch,
                )
            row = finish_epoch(cfg, training, train_stats, val_loader, runtime, criterion, state)
            epoch_sampler(train_loader).skip = 0
            save(run_dir, training, state, cfg, classes, best=row["best_pt"])
            if global_rank() == 0:
                write_metrics(state.history, run_dir, writer)
                tracker.log_epoch(row)
                plot_curves(state.history, run_dir)  # every epoch: a run stopped early has its curves too
                tqdm.write(epoch_line(row, num_classes))
            if state.epoch < cfg.epochs and stop_agreed(device):  # a stop signal during validation
                raise Preempted(f"the end of epoch {state.epoch}, after {state.step} optimizer steps")

    # report
    if global_rank() == 0 and state.history:
        if state.bad_images:
            bad = sorted(set(state.bad_images))
            print(f"skipped {len(bad)} unreadable images:\n  " + "\n  ".join(bad))
        saved = "metrics" if cfg.dummy else "checkpoints and metrics"
        # rows of a run resumed from before best_pt existed have none
        best = max((r for r in state.history if r.get("best_pt")), key=lambda r: r["epoch"], default=None)
        held = ""
        if best is not None and not cfg.dummy:
            holder = "EMA" if best["best_pt"] == "ema" else "model"
            held = f" (best.pt: the {holder} of epoch {best['epoch']})"
        print(f"done: best val top-1 {state.best_acc1:.3f}%{held}; {saved} in {run_dir}")
    return {
        "run_dir": str(run_dir),
        "history": state.history,
        "best_acc1": state.best_acc1,
        "model": model,
        "steps": state.step,
    }


def stop_agreed(device) -> bool:
    """Whether any rank received a stop signal (a collective: every rank calls it at the same point)."""
    flag = torch.tensor([float(stop_requested() is not None)], dtype=torch.float64, device=device)
    return all_reduce_sum(flag).item() > 0


def epoch_line(row: dict, num_classes: int) -> str:
    """An epoch's line: train loss and top-1, val loss, top-1 (and the EMA's) and top-5 (with 5 classes or
    fewer every image's class is among the top 5: left out), speed."""
    top5 = f" top-5 {row['val_acc5']:.2f}%" if num_classes > 5 else ""
    ema = f" (EMA {row['ema_acc1']:.2f}%)" if "ema_acc1" in row else ""
    return (
        f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} top-1 {row['train_acc1']:.2f}% | "
        f"val loss {row['val_loss']:.4f} top-1 {row['val_acc1']:.2f}%{ema}{top5} | "
        f"{row['img_per_s']:.1f} img/s, {row['epoch_time_s']:.1f} s"
    )


def finish_epoch(
    cfg: TrainConfig, training: Training, train_stats: dict, val_loader, runtime, criterion, state
):
    """After an epoch's steps: sync BatchNorm statistics, step the schedule, validate (and the EMA),
    and record the epoch's row in state (epoch, history, best accuracy). Returns the row; its best_pt says
    which weights best.pt gets: 'model' or 'ema' when this epoch's top-1 (of the model, or of the EMA where
    that is higher) is the best so far, else ''."""
    # rank 0's BatchNorm statistics: every rank evaluates and saves the same model
    broadcast_buffers(training.model)
    lr_used = training.optimizer.param_groups[0]["lr"]
    with warnings.catch_warnings():  # a resume at the end of an epoch's steps takes no step before this one
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler", UserWarning)
        training.scheduler.step()
    val = validate(training.model, val_loader, runtime, criterion, cfg)
    state.bad_images += val["bad_images"]
    row = {
        "epoch": state.epoch + 1,
        "lr": lr_used,
        "train_res": train_resolution(cfg, state.epoch),
        **train_stats,
        "val_loss": val["loss"],
        "val_acc1": val["acc1"],
        "val_acc5": val["acc5"],
        "val_nll": val["nll"],  # the plain cross-entropy, where val_loss has the criterion's smoothing
        "val_ece": val["ece"],
    }
    if training.ema is not None:
        ema_val = validate(training.ema.module, val_loader, runtime, criterion, cfg)
        row.update(ema_acc1=ema_val["acc1"], ema_acc5=ema_val["acc5"])
    row["epoch_time_s"] = row.pop("train_time_s") + val["seconds"]
    row["best_pt"] = best_weights(row, state.best_acc1)
    state.best_acc1 = max(state.best_acc1, row["val_acc1"], row.get("ema_acc1", -1.0))
    state.history.append(row)
    state.epoch += 1
    state.batch = 0
    state.trained = False
    state.train_seconds = 0.0
    return row


def best_weights(row: dict, best_acc1: float) -> str:
    """What best.pt holds after this epoch's row: 'model' or 'ema' (the EMA's weights, where its top-1 is
    higher; a tie keeps the model) when that top-1 beats the best so far, else '' (best.pt unchanged)."""
    acc1, holder = max((row["val_acc1"], "model"), (row.get("ema_acc1", -1.0), "ema"))
    return holder if acc1 > best_acc1 else ""


def validate(model, val_loader, runtime: Runtime, criterion, cfg: TrainConfig) -> dict:
    """engine.evaluate on the val images with the training loss, the run's --skip-bad-images and --val-tta."""
    return evaluate(
        model, val_loader, runtime, criterion=criterion, skip_bad_images=cfg.skip_bad_images, tta=cfg.val_tta
    )


def build_parser():
    """train.py's command line: --config, then --key for every TrainConfig field."""
    return config_parser(TrainConfig, __doc__)


@cli
def cli_main(argv=None) -> dict:
    argv = expand_recipe(sys.argv[1:] if argv is None else [str(a) for a in argv])
    config, given = parse_config(TrainConfig, argv, description=__doc__)
    return main(config, given)


if __name__ == "__main__":
    cli_main()
