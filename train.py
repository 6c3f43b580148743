"""Train a torchvision architecture on ImageNet (or any ImageFolder), on one CPU/GPU or many.

    python train.py --config configs/torchvision_v1.yaml --data /data/imagenet --arch resnet50
    python train.py --config configs/seed.yaml --data /data/imagenet --arch alexnet          # the original recipe
    python train.py --config configs/finetune.yaml --data /data/flowers --arch resnet50      # new head, pretrained body
    torchrun --nproc_per_node=8 train.py --config configs/torchvision_v1.yaml --data /data/imagenet --arch resnet50
    python train.py --run-name NAME --resume auto ...                                        # continue a run
Every key of TrainConfig below is also --key value; precedence: defaults < --config < command line.
"""
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from dataset import (EvalPreset, ImageDataset, ShardSampler, SyntheticDataset, TrainSampler, build_loader,
                     check_bad_images, find_samples, to_device, train_preset)
from loss import build_loss
from model import build_model, check_arch, load_checked
from report import plot_curves, write_metrics
from utils import (UserError, all_gather_objects, all_reduce_sum, amp_dtype, atomic_write_text, autocast,
                   broadcast_buffers, broadcast_object, check_ranks_in_step, cleanup_distributed, cli,
                   default_workers, is_main, load_checkpoint, load_config, merge_predictions, rank as global_rank,
                   run_dir_for, run_info, save_checkpoint, setup_distributed, tensorboard_writer, topk_correct,
                   world_size)


@dataclass
class TrainConfig:
    # data and model
    data: str = ""                      # ImageFolder root with train/ and val/ (class names need not be wnids)
    arch: str = "resnet18"              # any name in torchvision.models.list_models()
    weights: str | None = None          # start from pretrained weights (DEFAULT, IMAGENET1K_V2, a .pth) to fine-tune
    num_classes: int | None = None      # from the train folder's classes unless set; a new head when it differs
    dropout: float | None = None        # the architecture's dropout probability, where it has one
    dummy: bool = False                 # synthetic images instead of --data, for throughput runs
    dummy_size: int = 512               # images per epoch with --dummy
    # schedule (torchvision's V1 recipe: 90 epochs, batch 256, SGD 0.1, StepLR 30 x 0.1)
    epochs: int = 90
    batch_size: int = 32                # per process; the global batch is batch_size x world size
    lr: float = 0.1                     # for the global batch, unless lr_scaling = linear
    lr_scaling: str = "none"            # none | linear: lr x global_batch / 256 (Goyal et al.), for changing world sizes
    optimizer: str = "sgd"              # sgd | adamw
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    no_decay_norm_bias: bool = False    # no weight decay on normalisation weights and biases (1-D parameters)
    scheduler: str = "step"             # step | multistep | cosine (all stepped once per epoch)
    step_size: int = 30
    milestones: list = field(default_factory=lambda: [30, 60, 80])
    lr_gamma: float = 0.1
    warmup_epochs: int = 0              # linear warmup from lr x warmup_factor
    warmup_factor: float = 0.01
    # loss: ce | focal | smooth_l1 | a weighted sum such as {focal: 1.0, smooth_l1: 1.0} (see loss.py)
    loss: str = "ce"
    label_smoothing: float = 0.0
    # augmentation and eval preprocessing (dataset.py presets)
    train_preset: str = "standard"      # standard (RandomResizedCrop + flip) | original (Resize + CenterCrop)
    train_crop_size: int = 224
    train_resize_size: int = 256        # used by the original preset
    val_resize_size: int = 256
    val_crop_size: int = 224
    interpolation: str = "bilinear"
    # speed
    amp: str = "auto"                   # auto (bf16 on CUDA, off on CPU) | none | bf16 | fp16 (with GradScaler)
    channels_last: str = "auto"         # auto (on for CUDA) | true | false
    compile: bool = False               # torch.compile the model (minutes of compile, faster epochs)
    workers: int = -1                   # loader processes per rank; -1 = utils.default_workers
    # regularisation
    ema_decay: float = 0.0              # > 0 keeps an exponential moving average of the weights, evaluated too
    ema_steps: int = 32                 # update the EMA every N steps (torchvision's recipe)
    clip_grad_norm: float = 0.0         # > 0 clips the global gradient norm
    sync_bn: bool = False               # SyncBatchNorm across ranks
    # run
    device: str = "auto"                # auto | cpu | cuda
    seed: int = 0
    deterministic: bool = False         # deterministic kernels (slower); CPU runs are reproducible anyway
    output: str = "checkpoints"
    run_name: str = ""                  # default: ARCH-YYYYmmdd-HHMMSS
    resume: str = ""                    # auto (this run's last.pt) | a checkpoint path
    save_every_steps: int = 0           # also write last.pt every N steps (resumes mid-epoch, exactly)
    log_interval: int = 20              # steps between progress updates (the only host syncs in the loop)
    skip_bad_images: bool = False       # skip unreadable images (listed at the end) instead of stopping


CHOICES = {"lr_scaling": ("none", "linear"), "optimizer": ("sgd", "adamw"), "scheduler": ("step", "multistep", "cosine"),
           "train_preset": ("standard", "original"), "amp": ("auto", "none", "bf16", "fp16"),
           "channels_last": ("auto", "true", "false"), "device": ("auto", "cpu", "cuda"),
           "interpolation": ("bilinear", "bicubic", "nearest")}


def validate(cfg: TrainConfig) -> TrainConfig:
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise UserError(f"{key} must be one of {', '.join(choices)}, got '{getattr(cfg, key)}'")
    for key in ("epochs", "batch_size", "train_crop_size", "val_resize_size", "val_crop_size", "ema_steps",
                "log_interval", "dummy_size", "step_size"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    for key in ("lr", "momentum", "weight_decay", "label_smoothing", "warmup_epochs", "clip_grad_norm", "ema_decay",
                "save_every_steps", "warmup_factor"):
        if getattr(cfg, key) < 0 or key == "lr" and cfg.lr == 0:
            raise UserError(f"{key} must be {'positive' if key == 'lr' else 'non-negative'}, got {getattr(cfg, key)}")
    if cfg.val_crop_size > cfg.val_resize_size:
        raise UserError(f"val_crop_size {cfg.val_crop_size} is larger than val_resize_size {cfg.val_resize_size}")
    if cfg.ema_decay >= 1 or cfg.label_smoothing >= 1:
        raise UserError("ema_decay and label_smoothing must be below 1")
    if cfg.num_classes is not None and (not isinstance(cfg.num_classes, int) or cfg.num_classes < 1):
        raise UserError(f"num_classes must be a positive integer, got {cfg.num_classes!r}")
    check_arch(cfg.arch)
    if not cfg.data and not cfg.dummy:
        raise UserError("no data: pass --data DIR (an ImageFolder root with train/ and val/) or --dummy")
    return cfg


@torch.inference_mode()
def evaluate(model, loader, device, mean, std, *, criterion=None, channels_last=False, amp_dtype=None,
             skip_bad_images=False, keep_predictions=False, desc="eval") -> dict:
    """Top-1/top-5 and mean loss over every image of the loader's dataset, each counted once in any
    world size (each rank sees its own shard, sums are all-reduced). With keep_predictions, rank 0
    also gets the top-5 indices and probabilities of every image, ordered by dataset index."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    predictions, bad = [], []
    samples = loader.dataset.samples
    start, batches = time.perf_counter(), 0
    for images, targets, indices, errors in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not is_main() or None):
        bad += check_bad_images(errors, samples, skip_bad_images)
        if len(targets) == 0:
            continue
        images = to_device(images, device, mean, std, channels_last)
        targets = targets.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
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
    result = {"n_images": int(n), "acc1": 100 * top1 / max(n, 1), "acc5": 100 * top5 / max(n, 1),
              "loss": loss_sum / max(n, 1), "seconds": seconds, "img_per_s": n / seconds if seconds else 0.0,
              "ms_per_batch": 1000 * seconds / max(batches, 1), "bad_images": bad}
    if keep_predictions:
        columns = [torch.cat(parts) for parts in zip(*predictions)] if predictions else []
        result["predictions"] = merge_predictions(all_gather_objects(columns), samples)
    return result


def build_data(cfg: TrainConfig, world: int, rank: int, device):
    """(train loader, val loader, class names); labels index the train folder's classes from 0."""
    train_tf = train_preset(cfg.train_preset, cfg.train_crop_size, cfg.train_resize_size, cfg.interpolation)
    val_tf = EvalPreset(cfg.val_resize_size, cfg.val_crop_size, cfg.interpolation)
    if cfg.dummy:
        classes = [str(i) for i in range(cfg.num_classes or 1000)]
        train_set = SyntheticDataset(cfg.dummy_size, len(classes), train_tf, cfg.seed)
        val_set = SyntheticDataset(max(1, cfg.dummy_size // 4), len(classes), val_tf)
    else:
        train_samples, classes = find_samples(cfg.data, "train", imagenet_labels=False, need_split=True)
        val_samples, val_classes = find_samples(cfg.data, "val", imagenet_labels=False, need_split=True)
        if val_classes != classes:
            raise UserError(f"the val classes of {cfg.data} differ from its train classes "
                            f"(e.g. {sorted(set(val_classes) ^ set(classes))[:3]}); both need the same class folders")
        train_set, val_set = ImageDataset(train_samples, train_tf, cfg.seed), ImageDataset(val_samples, val_tf)
    workers = default_workers(device) if cfg.workers < 0 else cfg.workers
    sampler = TrainSampler(train_set, world, rank, cfg.seed)
    train_loader = build_loader(train_set, cfg.batch_size, workers, shuffle=True, sampler=sampler,
                                pin_memory=device.type == "cuda", drop_last=len(train_set) >= cfg.batch_size * world)
    val_loader = build_loader(val_set, cfg.batch_size, workers, sampler=ShardSampler(len(val_set), world, rank),
                              pin_memory=device.type == "cuda")
    return train_loader, val_loader, classes


def build_optimizer(cfg: TrainConfig, model, lr: float):
    decay = [p for p in model.parameters() if p.requires_grad and not (cfg.no_decay_norm_bias and p.ndim <= 1)]
    no_decay = [p for p in model.parameters() if p.requires_grad and cfg.no_decay_norm_bias and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=lr)


def build_scheduler(cfg: TrainConfig, optimizer):
    """Stepped once per epoch, after an optional linear warmup (torchvision's recipes)."""
    sched = torch.optim.lr_scheduler
    main_epochs = max(1, cfg.epochs - cfg.warmup_epochs)
    if cfg.scheduler == "step":
        main = sched.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.lr_gamma)
    elif cfg.scheduler == "multistep":
        main = sched.MultiStepLR(optimizer, milestones=[m - cfg.warmup_epochs for m in cfg.milestones], gamma=cfg.lr_gamma)
    else:
        main = sched.CosineAnnealingLR(optimizer, T_max=main_epochs)
    if not cfg.warmup_epochs:
        return main
    warmup = sched.LinearLR(optimizer, start_factor=cfg.warmup_factor, total_iters=cfg.warmup_epochs)
    return sched.SequentialLR(optimizer, [warmup, main], milestones=[cfg.warmup_epochs])


def train_one_epoch(model, criterion, optimizer, scaler, loader, device, epoch: int, cfg: TrainConfig, run) -> dict:
    """One pass over this rank's shard. Loss and accuracy stay on the device between log intervals."""
    model.train()
    sampler, mean, std = loader.sampler, run["mean"], run["std"]
    sampler.set_epoch(epoch)
    sums = run.pop("train_sums", None)
    sums = torch.zeros(3, dtype=torch.float64, device=device) if sums is None else sums.to(device)  # loss, top-1, n
    first_bad_step = torch.tensor(-1, device=device)
    start, seen = time.perf_counter(), 0  # images this process trained on in this call
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", disable=not is_main() or None,
               initial=run["batch"], total=run["batch"] + len(loader))
    for images, targets, indices, errors in bar:
        run["bad_images"] += check_bad_images(errors, loader.dataset.samples, cfg.skip_bad_images)
        if len(targets) == 0:  # every image of the batch was unreadable and skipped
            if world_size() > 1:  # the other ranks wait in the gradient all-reduce: stop instead of hanging
                raise UserError(f"a whole batch was unreadable on rank {global_rank()} ({', '.join(run['bad_images'][-3:])}"
                                "...); remove the unreadable files")
            run["batch"] += 1
            continue
        seen += len(targets)
        images, targets = to_device(images, device, mean, std, run["channels_last"]), targets.to(device, non_blocking=True)
        with autocast(device, run["amp_dtype"]):
            logits = model(images)
        loss = criterion(logits, targets)
        scaler.scale(loss).backward()
        if cfg.clip_grad_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        run["step"] += 1
        run["batch"] += 1
        if run["ema"] is not None and run["step"] % cfg.ema_steps == 0:
            run["ema"].update_parameters(run["model"])
        loss = loss.detach()
        first_bad_step = torch.where(~torch.isfinite(loss) & (first_bad_step < 0), run["step"], first_bad_step)
        sums += torch.stack([loss.double() * len(targets), topk_correct(logits.detach(), targets, (1,))[0],
                             torch.tensor(len(targets), device=device)])
        last = run["batch"] == bar.total
        if run["step"] % cfg.log_interval == 0 or last or cfg.save_every_steps and run["step"] % cfg.save_every_steps == 0:
            if first_bad_step.item() >= 0:  # the only host syncs of the loop: at log and save points
                raise UserError(f"loss became {loss.item()} at step {first_bad_step.item()} (epoch {epoch + 1}); "
                                f"the last good checkpoint is kept in {run['dir']}; lower --lr or enable --clip-grad-norm")
            loss_sum, top1, n = all_reduce_sum(sums.clone()).tolist()
            rate = seen * world_size() / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss_sum / n:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.4g}", img_s=f"{rate:.1f}")
            if cfg.save_every_steps and run["step"] % cfg.save_every_steps == 0 and not last:
                run["save"](epoch, sums)
    loss_sum, top1, n = all_reduce_sum(sums).tolist()
    seconds = time.perf_counter() - start
    return {"train_loss": loss_sum / n, "train_acc1": 100 * top1 / n, "train_time_s": seconds,
            "img_per_s": seen * world_size() / seconds}


def main(cfg: TrainConfig) -> dict:
    validate(cfg)
    device = setup_distributed(cfg.device)
    try:
        return fit(cfg, device)
    finally:
        cleanup_distributed()


def fit(cfg: TrainConfig, device) -> dict:
    world, rank = world_size(), global_rank()
    # torchrun --max-restarts starts failed jobs again: those continue from last.pt
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
    resume = cfg.resume or ("auto" if restarted else "")
    # rank 0 names the run (a timestamp) and checks it; every rank uses its answer
    run_dir, resume_from = broadcast_object(run_dir_for(cfg.output, cfg.run_name, cfg.arch, resume) if rank == 0 else None)
    checkpoint = load_checkpoint(resume_from) if resume_from else None
    if checkpoint is not None and not {"model", "optimizer", "epoch"} <= set(checkpoint):
        raise UserError(f"{resume_from} is not a train.py checkpoint (no optimizer state); use --weights to start from it")
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not cfg.deterministic  # autotuned conv kernels, as torchvision's references
    train_loader, val_loader, classes = build_data(cfg, world, rank, device)
    num_classes = cfg.num_classes or len(classes)
    try:
        model = build_model(cfg.arch, cfg.weights, num_classes, **({} if cfg.dropout is None else {"dropout": cfg.dropout}))
    except TypeError as e:  # the builder has no such keyword
        raise UserError(f"{cfg.arch} has no dropout setting; remove --dropout") from e
    model = model.to(device)
    if checkpoint is not None:
        load_checked(lambda: model.load_state_dict(checkpoint["model"]), f"{cfg.arch} with {num_classes} classes",
                     f"{resume_from} (a {checkpoint.get('config', {}).get('arch')} run)")
    channels_last = cfg.channels_last == "true" or cfg.channels_last == "auto" and device.type == "cuda"
    amp = amp_dtype(cfg.amp, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA GPUs (torch's SyncBatchNorm has no CPU kernel); drop it on CPU")
    if cfg.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    lr = cfg.lr * cfg.batch_size * world / 256 if cfg.lr_scaling == "linear" else cfg.lr
    optimizer = build_optimizer(cfg, model, lr)
    scheduler = build_scheduler(cfg, optimizer)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    ema = None
    if cfg.ema_decay:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
    criterion = build_loss(cfg.loss, num_classes, cfg.label_smoothing).to(device)
    run = {"model": model, "ema": ema, "dir": run_dir, "mean": val_loader.dataset.transform.mean,
           "std": val_loader.dataset.transform.std, "channels_last": channels_last, "amp_dtype": amp, "step": 0, "batch": 0,
           "bad_images": [], "history": [], "best_acc1": -1.0, "epoch": 0}
    stateful = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "ema": ema}
    if checkpoint is not None:
        for key, obj in stateful.items():
            if obj is not None and checkpoint.get(key) is not None:
                obj.load_state_dict(checkpoint[key])
        run.update({key: checkpoint[key] for key in ("step", "batch", "history", "best_acc1", "epoch")})
        if checkpoint["batch"] and rank == 0:  # a mid-epoch checkpoint: the epoch's sums so far, counted once
            run["train_sums"] = checkpoint["train_sums"]
        train_loader.sampler.skip = checkpoint["batch"] * cfg.batch_size
        torch.set_rng_state(checkpoint["rng"]["torch"])
        if device.type == "cuda" and checkpoint["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
    elif rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        atomic_write_text(run_dir / "run.json", json.dumps({**run_info(cfg.seed), "classes": classes}, indent=1))
    trained = model
    if world > 1:
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if cfg.compile:
        trained = torch.compile(trained)

    def save(epoch: int, sums=None, best: bool = False):
        """last.pt (and best.pt): the unwrapped, uncompiled model and all that a resume needs."""
        global_sums = all_reduce_sum(sums.clone()) if sums is not None else None
        if rank != 0:
            return
        state = {"model": model.state_dict(), **{k: v.state_dict() if v is not None else None for k, v in stateful.items()},
                 "epoch": epoch, "batch": run["batch"] if sums is not None else 0, "step": run["step"],
                 "train_sums": global_sums.cpu() if global_sums is not None else None, "best_acc1": run["best_acc1"],
                 "history": run["history"], "config": dataclasses.asdict(cfg), "classes": classes,
                 "rng": {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}
        save_checkpoint(state, run_dir / "last.pt")
        if best:
            save_checkpoint(state, run_dir / "best.pt")

    run["save"] = save
    writer = tensorboard_writer(run_dir) if rank == 0 else None
    if rank == 0:
        print(f"run dir {run_dir}: {cfg.arch}, {num_classes} classes, {len(train_loader.dataset)} train / "
              f"{len(val_loader.dataset)} val images, world size {world}, device {device}"
              + (f", resumed from {resume_from} at epoch {run['epoch'] + 1}" if checkpoint else ""))
    for epoch in range(run["epoch"], cfg.epochs):
        train_stats = train_one_epoch(trained, criterion, optimizer, scaler, train_loader, device, epoch, cfg, run)
        train_loader.sampler.skip, run["batch"] = 0, 0
        broadcast_buffers(model)  # BatchNorm running stats: rank 0's, so every rank evaluates and saves the same model
        lr_used = optimizer.param_groups[0]["lr"]
        scheduler.step()
        val = evaluate(model, val_loader, device, run["mean"], run["std"], criterion=criterion,
                       channels_last=channels_last, amp_dtype=amp, skip_bad_images=cfg.skip_bad_images)
        run["bad_images"] += val["bad_images"]
        row = {"epoch": epoch + 1, "lr": lr_used, **train_stats, "val_loss": val["loss"], "val_acc1": val["acc1"],
               "val_acc5": val["acc5"]}
        if ema is not None:
            ema_val = evaluate(ema.module, val_loader, device, run["mean"], run["std"], criterion=criterion,
                               channels_last=channels_last, amp_dtype=amp, skip_bad_images=cfg.skip_bad_images)
            row.update(ema_acc1=ema_val["acc1"], ema_acc5=ema_val["acc5"])
        row["epoch_time_s"] = train_stats.pop("train_time_s") + val["seconds"]
        run["history"].append(row)
        is_best = val["acc1"] > run["best_acc1"]
        run["best_acc1"] = max(run["best_acc1"], val["acc1"])
        save(epoch + 1, best=is_best)
        if rank == 0:
            write_metrics(run["history"], run_dir, writer)
            tqdm.write(f"epoch {epoch + 1}: train loss {row['train_loss']:.4f} top-1 {row['train_acc1']:.2f} | val loss "
                       f"{row['val_loss']:.4f} top-1 {row['val_acc1']:.2f} top-5 {row['val_acc5']:.2f} | "
                       f"{row['img_per_s']:.1f} img/s, {row['epoch_time_s']:.1f} s")
    check_ranks_in_step(model)
    if rank == 0 and run["history"]:
        plot_curves(run["history"], run_dir)
        if run["bad_images"]:
            bad = sorted(set(run["bad_images"]))
            print(f"skipped {len(bad)} unreadable images:\n  " + "\n  ".join(bad))
        print(f"done: best val top-1 {run['best_acc1']:.3f}; checkpoints and metrics in {run_dir}")
    return {"run_dir": str(run_dir), "history": run["history"], "best_acc1": run["best_acc1"]}


@cli
def cli_main(argv=None) -> dict:
    return main(load_config(TrainConfig, argv, description=__doc__))


if __name__ == "__main__":
    cli_main()
