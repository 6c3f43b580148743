"""What steps the weights: the optimizer and its weight-decay groups, the learning-rate schedule and the
EMA of the weights, built from a TrainConfig as torchvision's references/classification/train.py
builds them from its flags (--norm-weight-decay, --lr-warmup-method, --model-ema-decay, ...).

    optimizer = build_optimizer(cfg, model, lr=cfg.lr)
    scheduler = build_scheduler(cfg, optimizer)      # stepped once per epoch
    ema = build_ema(cfg, model, world_size=1)        # None unless cfg.ema_decay > 0
"""

import torch
from torch import nn

# Layers whose parameters norm_weight_decay applies to (those of torchvision's set_weight_decay)
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
               nn.LocalResponseNorm)  # fmt: skip
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


def build_scheduler(cfg, optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Stepped once per epoch, after an optional warmup of warmup_epochs (torchvision's recipes)."""
    sched = torch.optim.lr_scheduler
    if cfg.scheduler == "step":
        main = sched.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.lr_gamma)
    elif cfg.scheduler == "multistep":
        milestones = [m - cfg.warmup_epochs for m in cfg.milestones]
        main = sched.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.lr_gamma)
    elif cfg.scheduler == "exponential":
        main = sched.ExponentialLR(optimizer, gamma=cfg.lr_gamma)
    else:
        main = sched.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs - cfg.warmup_epochs), eta_min=cfg.lr_min)
    if not cfg.warmup_epochs:
        return main
    if cfg.warmup_method == "linear":
        warmup = sched.LinearLR(optimizer, start_factor=cfg.warmup_factor, total_iters=cfg.warmup_epochs)
    else:
        warmup = sched.ConstantLR(optimizer, factor=cfg.warmup_factor, total_iters=cfg.warmup_epochs)
    return sched.SequentialLR(optimizer, [warmup, main], milestones=[cfg.warmup_epochs])


def ema_decay_per_update(cfg, world_size: int) -> float:
    """torchvision's adjustment of --model-ema-decay (from pycls): 1 - decay scales with the images per
    EMA update over the epochs, so the averaging horizon stays about the same fraction of the run when
    the batch, the world size, ema_steps or the epochs change."""
    adjust = world_size * cfg.batch_size * cfg.ema_steps / cfg.epochs
    return 1.0 - min(1.0, (1.0 - cfg.ema_decay) * adjust)


def build_ema(cfg, model: nn.Module, world_size: int) -> torch.optim.swa_utils.AveragedModel | None:
    """An AveragedModel of the weights and buffers (None when ema_decay is 0)."""
    if not cfg.ema_decay:
        return None
    average = torch.optim.swa_utils.get_ema_multi_avg_fn(ema_decay_per_update(cfg, world_size))
    return torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=average, use_buffers=True)
