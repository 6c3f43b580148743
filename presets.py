"""Transform presets: uint8 (3, H, W) tensors from PIL images, for evaluation (EvalPreset: a weights'
own resize + center crop) and training (train_preset). `normalize` turns a batch into float on the
device with exactly the operations (and so exactly the numbers) of torchvision's ImageClassification
preset, while the host moves 4x fewer bytes. (torchvision's references/classification/presets.py)

    preset = EvalPreset.from_weights(ResNet50_Weights.IMAGENET1K_V2)   # resize 232, crop 224, bilinear
    batch = normalize(torch.stack([preset(load_rgb(p)) for p in paths]), preset.mean, preset.std)
"""

from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import functional as F

from utils import UserError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's, for every weights
Interpolation = Literal["bilinear", "bicubic", "nearest"]
TrainPresetName = Literal["standard", "original"]


def check_crop_fits(crop: int, resize: int, names: tuple[str, str] = ("crop", "resize")) -> None:
    """The center crop must fit in the resized image (the one rule, for every script)."""
    if crop > resize:
        raise UserError(f"{names[0]} {crop} is larger than {names[1]} {resize}")


@dataclass
class EvalPreset:
    """Resize (shorter side) + center crop, taken from a weights' transforms() unless overridden."""

    resize: int = 256
    crop: int = 224
    interpolation: Interpolation = "bilinear"
    antialias: bool = True
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def __post_init__(self):
        check_crop_fits(self.crop, self.resize)

    @classmethod
    def from_weights(cls, weights=None, resize=None, crop=None, interpolation=None) -> "EvalPreset":
        """The weights' own preprocessing (the defaults without weights), with any setting overridden."""
        settings = {}
        if weights is not None:
            t = weights.transforms()
            settings = {
                "resize": t.resize_size[0],
                "crop": t.crop_size[0],
                "interpolation": t.interpolation.value,
                "antialias": t.antialias,
                "mean": tuple(t.mean),
                "std": tuple(t.std),
            }
        overrides = {"resize": resize, "crop": crop, "interpolation": interpolation}
        settings.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**settings)

    @classmethod
    def from_train_config(cls, config: dict, resize=None, crop=None, interpolation=None) -> "EvalPreset":
        """The validation preprocessing of a train.py run (its saved config), with any setting overridden."""
        return cls(resize or config["val_resize_size"], crop or config["val_crop_size"],
                   interpolation or config.get("interpolation", "bilinear"))  # fmt: skip

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = F.resize(
            image, [self.resize], interpolation=InterpolationMode(self.interpolation), antialias=self.antialias
        )
        return F.pil_to_tensor(F.center_crop(image, [self.crop]))  # (3, crop, crop) uint8


AutoAugment = Literal["none", "ta_wide", "ra", "imagenet", "augmix"]


def train_preset(
    name: TrainPresetName,
    crop: int = 224,
    resize: int = 256,
    interpolation: Interpolation = "bilinear",
    *,
    auto_augment: AutoAugment = "none",
    ra_magnitude: int = 9,
    augmix_severity: int = 3,
    random_erase: float = 0.0,
):
    """'standard': RandomResizedCrop + horizontal flip, then the auto_augment policy (torchvision's
    recipes, in the order of references/classification/presets.py with its PIL backend);
    'original': Resize + CenterCrop, this repo's first recipe (no augmentation).

    Returns uint8 (3, crop, crop), normalised later on the device (engine.Runtime.inputs), except with
    random_erase > 0: erasing writes 0 into the *normalised* image (the mean colour), so those images
    leave the loader as normalised float32, exactly as the references compute them."""
    mode = InterpolationMode(interpolation)
    if name == "standard":
        steps = [v2.RandomResizedCrop(crop, interpolation=mode, antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(resize, interpolation=mode, antialias=True), v2.CenterCrop(crop)]
    policies = {
        "ta_wide": lambda: v2.TrivialAugmentWide(interpolation=mode),
        "ra": lambda: v2.RandAugment(magnitude=ra_magnitude, interpolation=mode),
        "imagenet": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=mode),
        "augmix": lambda: v2.AugMix(severity=augmix_severity, interpolation=mode),
    }
    if auto_augment != "none":
        steps.append(policies[auto_augment]())
    steps.append(v2.PILToTensor())
    if random_erase > 0:
        to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        steps += [*to_float, v2.RandomErasing(random_erase)]
    return v2.Compose(steps)


def train_transform(cfg):
    """The train preset of a TrainConfig (or anything with its fields)."""
    return train_preset(
        cfg.train_preset,
        cfg.train_crop_size,
        cfg.train_resize_size,
        cfg.interpolation,
        auto_augment=cfg.auto_augment,
        ra_magnitude=cfg.ra_magnitude,
        augmix_severity=cfg.augmix_severity,
        random_erase=cfg.random_erase,
    )


def mixup_cutmix(mixup_alpha: float, cutmix_alpha: float, num_classes: int):
    """v2.MixUp and/or v2.CutMix, one of them chosen at random per batch (torchvision's references), or
    None when both alphas are 0. Called as mix(images, targets) on a normalised float batch and (B,)
    int64 targets; returns the mixed images and (B, num_classes) float targets whose rows sum to 1."""
    choices = []
    if mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
    if cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
    return v2.RandomChoice(choices) if choices else None


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32, (x / 255 - mean) / std, as ImageClassification computes it."""
    images = images.float().div_(255)
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return images.sub_(mean).div_(std)


def to_device(images, device, mean, std, channels_last: bool):
    """uint8 (B, 3, H, W) host batch -> normalised float on the device (4x fewer bytes to copy). A float
    batch was normalised by its transform (train_preset with random_erase) and is only moved."""
    images = images.to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = normalize(images, mean, std)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def augmented_batch(cfg, samples, num_classes: int, count: int = 16, seed: int = 0):
    """What a training step of a TrainConfig sees: `count` images drawn (by seed) from `samples`, through
    the config's train preset and MixUp/CutMix. Returns (images (count, 3, H, W) float in [0, 1] for
    display, targets (count, num_classes) float: the soft labels the loss receives)."""
    from dataset import ImageDataset

    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(samples), generator=generator)[:count].tolist()
    dataset = ImageDataset([samples[i] for i in picked], train_transform(cfg), seed)
    items = [dataset[(i, 0, 0)] for i in range(len(dataset))]
    bad = [error for image, _, _, error in items if image is None]
    if bad:
        raise UserError(f"cannot read an image to preview ({bad[0]})")
    images = torch.stack([image for image, _, _, _ in items])
    if images.dtype == torch.uint8:
        images = normalize(images, IMAGENET_MEAN, IMAGENET_STD)
    targets = torch.tensor([target for _, target, _, _ in items])
    mix = mixup_cutmix(cfg.mixup_alpha, cfg.cutmix_alpha, num_classes)
    torch.manual_seed(seed)
    if mix is not None:
        images, targets = mix(images, targets)
    else:
        targets = torch.nn.functional.one_hot(targets, num_classes).float()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1), targets
