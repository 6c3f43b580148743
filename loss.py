"""Classification losses: cross-entropy, focal loss, smooth-L1 on probabilities, and a weighted sum of
them built from the config's `losses` entry.

    from loss import build_loss
    criterion = build_loss("ce", num_classes=1000, label_smoothing=0.1)         # torchvision's recipes
    criterion = build_loss({"focal": 1.0, "smooth_l1": 1.0}, num_classes=1000)  # this repo's original recipe
    loss = criterion(logits, target)  # logits (B, C) any float dtype, target (B,) int64 -> scalar
    loss = criterion(logits, soft)    # or (B, C) class probabilities, as MixUp/CutMix make them
    criterion.parts        # {'focal': tensor(..), 'smooth_l1': tensor(..)}: metrics.csv's train_loss_*

Every loss works in float32 from log_softmax/softmax, so it stays finite and accurate under bf16/fp16
autocast. Label smoothing follows F.cross_entropy: q = (1 - eps) * onehot + eps / C, and for a
probability target q = (1 - eps) * target + eps / C. Every loss here is defined for probability
targets (each is a sum over classes weighted by q), so each takes MixUp/CutMix batches.
"""

import inspect
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from utils import UserError, closest


def one_hot(target: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) int64 class indices -> (B, C) float32 smoothed one-hot q = (1 - eps) * onehot + eps / C."""
    # scatter rather than F.one_hot: no int64 (B, C) temporary and no range check that syncs the host
    q = torch.full((target.shape[0], num_classes), smoothing / num_classes, device=target.device)
    return q.scatter_(1, target[:, None], 1.0 - smoothing + smoothing / num_classes)


def target_probs(target: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) class indices or (B, C) class probabilities -> smoothed (B, C) float32 probabilities q."""
    if target.ndim == 2:
        return target.float() * (1.0 - smoothing) + smoothing / num_classes
    return one_hot(target, num_classes, smoothing)


def check_label_smoothing(label_smoothing) -> float:
    """The one rule for label smoothing, wherever it enters (config, loss spec, LabelCoder): [0, 1],
    the range F.cross_entropy accepts (1 is a uniform target)."""
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise UserError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    return float(label_smoothing)


class CrossEntropy(nn.Module):
    """F.cross_entropy with label smoothing, on float32 logits (and float32 probability targets)."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = check_label_smoothing(label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.float() if target.is_floating_point() else target
        return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al. 2017), -sum_c alpha_c q_c (1 - p_c)^gamma log p_c, mean over
    the batch. With one-hot q this is -alpha_t (1 - p_t)^gamma log p_t; gamma=0 without alpha is
    exactly F.cross_entropy (with the same label_smoothing). alpha: optional per-class weights (C,);
    the batch mean is a plain mean, not F.cross_entropy(weight=...)'s mean divided by the weights."""

    def __init__(
        self,
        gamma: float = 2.0,
        alpha: Sequence[float] | torch.Tensor | None = None,
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        if float(gamma) < 0:
            raise UserError(f"focal gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        alpha = None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32)
        if alpha is not None and (alpha.ndim != 1 or (alpha < 0).any()):
            raise UserError(
                f"focal alpha must be a list of non-negative per-class weights, got {alpha.tolist()}"
            )
        self.register_buffer("alpha", alpha)  # moves with criterion.to(device)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits.float(), dim=1)  # (B, C), finite even where softmax underflows
        # -expm1(log p) is 1 - p without cancellation when p -> 1; the clamp keeps the gradient of
        # x^gamma finite at x = 0 for gamma < 1 (log p is 0 there, so the value is unchanged)
        focal_weight = (-torch.expm1(log_probs)).clamp(min=torch.finfo(torch.float32).tiny) ** self.gamma
        q = target_probs(target, logits.shape[1], self.label_smoothing)
        if self.alpha is not None:
            q = q * self.alpha.to(q.device)  # a no-op once the criterion is on the logits' device
        return -(q * focal_weight * log_probs).sum(1).mean()


class SmoothL1ProbLoss(nn.Module):
    """Smooth-L1 between softmax probabilities and the (smoothed) one-hot target, summed over classes
    and averaged over the batch. The sum keeps the loss per-sample sized: a mean over all B*C
    elements would shrink it by 1/C (1000x on ImageNet) next to cross-entropy or focal loss.
    With beta >= 1 every |p - q| <= 1 is in the quadratic zone: a scaled Brier score."""

    def __init__(self, beta: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        if float(beta) < 0:
            raise UserError(f"smooth_l1 beta must be >= 0, got {beta}")
        self.beta = float(beta)
        self.label_smoothing = check_label_smoothing(label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(logits.float(), dim=1)  # (B, C) float32
        q = target_probs(target, logits.shape[1], self.label_smoothing)
        return F.smooth_l1_loss(probs, q, beta=self.beta, reduction="none").sum(1).mean()


class WeightedSum(nn.Module):
    """sum_i weight_i * loss_i. After each call `parts` holds every term's unweighted value, detached
    and still on the device (no .item(), so no host sync): engine.train_one_epoch reports each term's
    epoch mean (train_loss_<name> in metrics.csv)."""

    def __init__(self, losses: dict[str, nn.Module], weights: dict[str, float]):
        super().__init__()
        self.losses = nn.ModuleDict(losses)
        self.weights = dict(weights)
        self.parts: dict[str, torch.Tensor] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        values = {name: loss(logits, target) for name, loss in self.losses.items()}
        self.parts = {name: value.detach() for name, value in values.items()}
        return sum(self.weights[name] * value for name, value in values.items())


LOSSES = {"ce": CrossEntropy, "focal": FocalLoss, "smooth_l1": SmoothL1ProbLoss}


def build_loss(spec: str | dict, num_classes: int, label_smoothing: float = 0.0) -> nn.Module:
    """'ce' | {'ce': 1.0} | {'focal': {'weight': 1.0, 'gamma': 2.0}, 'smooth_l1': 1.0, ...} -> criterion.
    Each value is a weight or a dict of 'weight' (default 1) plus the loss's keyword arguments;
    `label_smoothing` applies to every term unless the term sets its own. A single term of weight 1
    is returned as is, anything else as a WeightedSum."""
    terms = {spec: 1.0} if isinstance(spec, str) else spec
    if not isinstance(terms, dict) or not terms:
        raise UserError(
            f"losses must be a loss name or a non-empty mapping of name -> weight, got {spec!r}; "
            f"valid names: {', '.join(LOSSES)}"
        )
    losses, weights = {}, {}
    for name, value in terms.items():
        if name not in LOSSES:
            raise UserError(f"unknown loss '{name}'{closest(name, LOSSES)}; valid: {', '.join(LOSSES)}")
        kwargs = {} if value is None else value if isinstance(value, dict) else {"weight": value}
        valid = ["weight", *inspect.signature(LOSSES[name]).parameters]
        for key in kwargs:
            if key not in valid:
                raise UserError(
                    f"unknown key '{key}' in losses.{name}{closest(key, valid)}; valid: {', '.join(valid)}"
                )
        kwargs = {"label_smoothing": label_smoothing, **kwargs}
        weight = kwargs.pop("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise UserError(f"losses.{name} weight must be a number >= 0, got {weight!r}")
        try:
            losses[name] = LOSSES[name](**kwargs)
        except (TypeError, ValueError) as e:  # e.g. gamma: "two"
            raise UserError(f"losses.{name}: {e}") from e
        alpha = getattr(losses[name], "alpha", None)
        if alpha is not None and len(alpha) != num_classes:
            raise UserError(
                f"losses.{name} alpha must list one weight per class ({num_classes}), got {len(alpha)}"
            )
        weights[name] = float(weight)
    if len(losses) == 1 and next(iter(weights.values())) == 1.0:
        return next(iter(losses.values()))
    return WeightedSum(losses, weights)
