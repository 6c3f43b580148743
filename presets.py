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


def train_preset(name: TrainPresetName, crop: int = 224, resize: int = 256, interpolation: Interpolation = "bilinear"):
    """'standard': RandomResizedCrop + horizontal flip (torchvision's recipes);
    'original': Resize + CenterCrop, this repo's first recipe (no augmentation)."""
    mode = InterpolationMode(interpolation)
    if name == "standard":
        steps = [v2.RandomResizedCrop(crop, interpolation=mode, antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(resize, interpolation=mode, antialias=True), v2.CenterCrop(crop)]
    return v2.Compose([*steps, v2.PILToTensor()])


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32, (x / 255 - mean) / std, as ImageClassification computes it."""
    images = images.float().div_(255)
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return images.sub_(mean).div_(std)


def to_device(images, device, mean, std, channels_last: bool):
    """uint8 (B, 3, H, W) host batch -> normalised float on the device (4x fewer bytes to copy)."""
    images = normalize(images.to(device, non_blocking=True), mean, std)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images
