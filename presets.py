"""Transform presets: uint8 (3, H, W) tensors from PIL images, for evaluation (EvalPreset: the weights'
own resize + center crop) and training (train_preset; with progressive resizing, ProgressiveResizing: a
crop that grows with the epoch along FFCV's ResolutionRamp). `normalize` turns a batch into float on the
device with exactly the operations (and so exactly the numbers) of torchvision's ImageClassification
preset, while the host moves 4x fewer bytes. (torchvision's references/classification/presets.py)

    preset = EvalPreset.from_weights(ResNet50_Weights.IMAGENET1K_V2)   # resize 232, crop 224, bilinear
    batch = normalize(torch.stack([preset(load_rgb(p)) for p in paths]), preset.mean, preset.std)
"""

import argparse
import functools
import typing
from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms import functional as F

from utils import UserError, positive_int

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's, for all weights
Interpolation = Literal["bilinear", "bicubic", "nearest"]


def add_preprocessing_args(parser: argparse.ArgumentParser) -> None:
    """--resize, --crop and --interpolation: the eval preprocessing of the weights, overridden
    (test_torchvision.py and predict.py)."""
    parser.add_argument(
        "--resize", type=positive_int, help="override the weights' resize size (shorter side)"
    )
    parser.add_argument("--crop", type=positive_int, help="override the weights' center crop size")
    parser.add_argument(
        "--interpolation", choices=typing.get_args(Interpolation), help="override the weights' interpolation"
    )


TrainPresetName = Literal["standard", "original"]
TestTimeAugmentation = Literal["none", "flip"]
AutoAugment = Literal["none", "ta_wide", "ra", "imagenet", "augmix"]


def check_crop_fits(crop: int, resize: int, names: tuple[str, str] = ("crop", "resize")) -> None:
    """The center crop must fit in the resized image (the one rule, for every script)."""
    if crop > resize:
        raise UserError(
            f"{names[0]} {crop} is larger than {names[1]} {resize}; use a {names[0]} of at most {resize}, "
            f"or a {names[1]} of at least {crop}"
        )


@dataclass
class EvalPreset:
    """Resize (shorter side) + center crop, taken from the weights' transforms() unless overridden."""

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
        return cls(
            resize or config["val_resize_size"],
            crop or config["val_crop_size"],
            interpolation or config.get("interpolation", "bilinear"),
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = F.resize(
            image,
            [self.resize],
            interpolation=InterpolationMode(self.interpolation),
            antialias=self.antialias,
        )
        return F.pil_to_tensor(F.center_crop(image, [self.crop]))  # (3, crop, crop) uint8


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


def crop_box(crop: v2.RandomResizedCrop, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, height, width): the box `crop` draws for an image of this size, from torch's RNG,
    with exactly the draws crop(image) makes (v2's make_params; _get_params before torchvision 0.21)."""
    placeholder = torch.empty(1, 1, 1).expand(1, height, width)  # only its size is read
    make = getattr(crop, "make_params", None) or crop._get_params
    params = make([placeholder])
    return params["top"], params["left"], params["height"], params["width"]


def crop_and_flip_plan(preset: v2.Compose, height: int, width: int) -> tuple[int, int, int, int, bool]:
    """(top, left, height, width, flip) of a RandomResizedCrop + flip preset (config.check_decoding) for an
    image of this size: the draws preset(image) makes, in its order (v2's flip applies when
    torch.rand(1) < p)."""
    crop, flip = preset.transforms[:2]
    return (*crop_box(crop, height, width), bool(torch.rand(1) < flip.p))


def crop_resize_flip(image: torch.Tensor, plan, size: int, interpolation: Interpolation) -> torch.Tensor:
    """A crop_and_flip_plan applied to a (3, H, W) uint8 tensor on any device: the box resized to
    size x size (antialiased, torchvision's tensor kernel), mirrored if the plan says so."""
    top, left, height, width, flip = plan
    box = image[:, top : top + height, left : left + width]
    out = F.resize(box, [size, size], interpolation=InterpolationMode(interpolation), antialias=True)
    return out.flip(-1) if flip else out


class ReducedDecode:
    """A 'standard' train preset (RandomResizedCrop first) that decodes a JPEG at 1/2, 1/4 or 1/8 of its
    size (libjpeg's DCT scaling) when the crop box will be shrunk by at least that factor: the box is the
    one the preset draws (the same RNG draws, in the same order: the rest of the preset draws as before),
    scaled to the reduced image, and resized from there with PIL's box-resize (sub-pixel box). Pixels then
    differ from the full decode by the DCT scaling's own smoothing. Called with load(draft) ->
    PIL image (decoding.load_rgb's draft), so that the size is known before the decode."""

    def __init__(self, preset: v2.Compose):
        self.crop, self.rest = preset.transforms[0], v2.Compose(preset.transforms[1:])

    def __call__(self, load):
        drawn = {}

        def draft(size):
            width, height = size
            drawn.update(size=size, box=crop_box(self.crop, height, width))
            shrink = min(drawn["box"][2] / self.crop.size[0], drawn["box"][3] / self.crop.size[1])
            factor = max((f for f in (8, 4, 2) if f <= shrink), default=1)
            return (-(-width // factor), -(-height // factor)) if factor > 1 else None

        image = load(draft)
        if not drawn:  # not a file (a synthetic image): no draft was asked
            draft(image.size)
        top, left, height, width = drawn["box"]
        if image.size == drawn["size"]:  # decoded at full size: the preset's own crop
            out = F.resized_crop(
                image, top, left, height, width, list(self.crop.size), self.crop.interpolation, antialias=True
            )
        else:
            sx, sy = image.size[0] / drawn["size"][0], image.size[1] / drawn["size"][1]
            box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
            resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
            out = image.resize(self.crop.size[::-1], resample[self.crop.interpolation.value], box=box)
        return self.rest(out)


def reduced_decode_preset(*args, **kwargs) -> ReducedDecode:
    """train_preset(...) decoded at a reduced size where it can (ReducedDecode); 'standard' only."""
    return ReducedDecode(train_preset(*args, **kwargs))


@dataclass(frozen=True)
class ResolutionRamp:
    """Progressive resizing as FFCV's ImageNet example computes it (train_imagenet.py, get_resolution):
    epoch e (from 0) trains at min_res while e <= start_ramp, at max_res once e >= end_ramp, and in between
    at the linear interpolation rounded to the nearest multiple of `multiple` (Python's round, like
    np.round: a half goes to the even multiple). A function of the epoch alone, so a resume is exact."""

    min_res: int
    max_res: int
    start_ramp: int
    end_ramp: int
    multiple: int = 32

    def at(self, epoch: int) -> int:
        if epoch <= self.start_ramp:
            return self.min_res
        if epoch >= self.end_ramp:
            return self.max_res
        share = (epoch - self.start_ramp) / (self.end_ramp - self.start_ramp)
        return round((self.min_res + share * (self.max_res - self.min_res)) / self.multiple) * self.multiple


def resolution_ramp(cfg) -> ResolutionRamp | None:
    """A TrainConfig's ramp (config.check_resolution_ramp has checked it), None without --min-res."""
    if cfg.min_res is None:
        return None
    return ResolutionRamp(cfg.min_res, cfg.max_res, cfg.start_ramp, cfg.end_ramp, cfg.res_multiple)


def train_resolution(cfg, epoch: int) -> int:
    """The train crop of epoch `epoch` (from 0): the ramp's, else train_crop_size."""
    ramp = resolution_ramp(cfg)
    return cfg.train_crop_size if ramp is None else ramp.at(epoch)


class ProgressiveResizing:
    """A train transform whose output size follows a ResolutionRamp: at(epoch) is that epoch's transform
    (each size built once). The datasets call it with the epoch of each image's key, in the loader workers,
    so persistent workers follow the ramp too; RandomResizedCrop draws the same box at any size."""

    def __init__(self, build, ramp: ResolutionRamp):
        self.build, self.ramp, self.built = build, ramp, {}

    def at(self, epoch: int):
        size = self.ramp.at(epoch)
        if size not in self.built:
            self.built[size] = self.build(crop=size)
        return self.built[size]

    def __call__(self, image):  # without an epoch (a recipe's preview, a benchmark): the first epoch's
        return self.at(0)(image)


def transform_of_epoch(transform, epoch: int):
    """The transform of an image of epoch `epoch`: a ProgressiveResizing's of that epoch, else `transform`."""
    return transform.at(epoch) if isinstance(transform, ProgressiveResizing) else transform


def train_transform(cfg):
    """The train preset of a TrainConfig (or anything with its fields), following its resolution ramp."""
    build = functools.partial(  # a partial, not a lambda: loader workers may be spawned (pickled)
        reduced_decode_preset if getattr(cfg, "reduced_decode", False) else train_preset,
        cfg.train_preset,
        resize=cfg.train_resize_size,
        interpolation=cfg.interpolation,
        auto_augment=cfg.auto_augment,
        ra_magnitude=cfg.ra_magnitude,
        augmix_severity=cfg.augmix_severity,
        random_erase=cfg.random_erase,
    )
    ramp = resolution_ramp(cfg)
    return build(crop=cfg.train_crop_size) if ramp is None else ProgressiveResizing(build, ramp)


class MixUpCutMix:
    """v2.MixUp and/or v2.CutMix, one of them chosen at random per batch (torchvision's references).
    Called as mix(images, targets, step, rank) on a normalised float batch and (B,) int64 targets;
    returns the mixed images and (B, num_classes) float targets whose rows sum to 1. Each call draws
    from its own generator seeded by (seed, step, rank): every rank mixes its batch differently (as the
    references' loader workers do), the global RNG is untouched and a resumed run mixes as before."""

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, num_classes: int, seed: int = 0):
        choices = []
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.choice, self.seed = v2.RandomChoice(choices), seed

    @classmethod
    def from_config(cls, cfg, num_classes: int) -> "MixUpCutMix | None":
        """None when both alphas are 0."""
        if not (cfg.mixup_alpha or cfg.cutmix_alpha):
            return None
        return cls(cfg.mixup_alpha, cfg.cutmix_alpha, num_classes, cfg.seed)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, step: int, rank: int = 0):
        with torch.random.fork_rng(devices=[]):  # v2's draws (choice, lambda, box) are on the CPU
            torch.manual_seed(hash((self.seed, step, rank)) & 0xFFFF_FFFF_FFFF)
            return self.choice(images, targets)


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
