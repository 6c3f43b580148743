"""torchvision's classifiers and their weights: which architectures there are, what a --weights argument
names (resolve_weights, the one reading every script uses), building a model with those weights (from
torchvision's cache, a folder or a file, checked before use), a new head for fine-tuning, torchvision's
int8 models, and the inference form of a model (BatchNorm folded, channels_last).

    from model import build_model, resolve_weights
    model = build_model("resnet50", "DEFAULT")   # from torchvision's cache ($TORCH_HOME/hub/checkpoints)
    weights = resolve_weights("checkpoints/flowers/best.pt")   # its arch, classes and eval preprocessing
"""

import contextlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse
from torchvision import models
from torchvision.models import WeightsEnum

from coder import LabelCoder, imagenet_wnids
from presets import EvalPreset
from utils import UserError, closest, load_checkpoint

DEFAULT_ARCH = "resnet50"  # for weights names without their enum class ('DEFAULT', 'IMAGENET1K_V2')
ARCH_HELP = (
    "any torchvision classifier (default: the one --weights names: a train.py checkpoint, a torchvision "
    f"download, an .onnx file, an enum; else {DEFAULT_ARCH})"
)


def _quantized_archs() -> tuple[list[str], str]:
    """(torchvision's int8 classifiers, '' or why there are none): torch.ao.quantization is deprecated
    upstream, and a torch without it leaves these rows out instead of failing."""
    try:
        import torch.ao.quantization  # noqa: F401
        from torchvision.models import quantization

        return sorted(models.list_models(module=quantization)), ""
    except ImportError as e:
        return [], f"torchvision's int8 weights are left out: this torch has no torch.ao.quantization ({e})"


# the float classifiers (80 in torchvision 0.29)
ARCHS = sorted(models.list_models(module=models))
# quantized_resnet50, ... (12): evaluation only
QUANTIZED_ARCHS, NO_QUANTIZATION = _quantized_archs()


def is_quantized(arch: str) -> bool:
    """An int8 model of torchvision.models.quantization (its weights run on the CPU, with their backend)."""
    return arch in QUANTIZED_ARCHS


def float_arch(arch: str) -> str:
    """'quantized_resnet50' -> 'resnet50': the architecture an int8 model quantizes."""
    return arch.removeprefix("quantized_")


def check_arch(arch: str, int8: bool = True) -> str:
    """A torchvision classifier name; int8 models (evaluation only) unless int8=False."""
    if is_quantized(arch) and not int8:
        raise UserError(
            f"{arch} is an int8 model for evaluation; train its float architecture {float_arch(arch)}"
        )
    if arch not in ARCHS and not is_quantized(arch):
        raise UserError(f"unknown model '{arch}'{closest(arch, ARCHS)}; see torchvision.models.list_models()")
    return arch


def all_weights(arch: str) -> list[WeightsEnum]:
    """Every pretrained weights enum of an architecture, in torchvision's order."""
    return list(models.get_model_weights(check_arch(arch)))


# ----------------------------------------------------------------------------- what --weights names


def is_weights_file(weights) -> bool:
    """A .pth/.pt file or a path (not a weights name); export.py's .onnx files: is_onnx_file."""
    if not isinstance(weights, (str, Path)) or is_onnx_file(weights):
        return False
    return str(weights).endswith((".pth", ".pt")) or os.sep in str(weights)


def is_onnx_file(weights) -> bool:
    return isinstance(weights, (str, Path)) and str(weights).endswith(".onnx")


def weights_enum(arch: str, name) -> WeightsEnum | None:
    """None/'none' -> None; 'DEFAULT', 'IMAGENET1K_V2' or 'ResNet50_Weights.IMAGENET1K_V2' -> the enum."""
    if isinstance(name, WeightsEnum):
        return name
    if name is None or str(name).lower() in ("", "none"):
        return None
    enum = models.get_model_weights(check_arch(arch))
    prefix, _, member = str(name).rpartition(".")
    if member.upper() == "DEFAULT":
        return enum.DEFAULT
    members = [m for m in enum.__members__ if m != "DEFAULT"]  # DEFAULT is an alias of one of them
    if (prefix and prefix != enum.__name__) or member not in members:
        valid = ["DEFAULT", *members, *(f"{enum.__name__}.{m}" for m in members)]
        if prefix and not prefix.endswith("_Weights"):  # 'r18.onx', 'best.ptt': a file name, mistyped
            raise UserError(
                f"--weights {name} is neither a .pt, .pth or .onnx file nor a {arch} weights name; pass "
                f"such a file, or one of DEFAULT, {', '.join(members)}"
            )
        raise UserError(
            f"unknown weights '{name}' for {arch}{closest(name, valid)}; valid: DEFAULT, {', '.join(members)}"
        )
    return enum[member]


def arch_of_enum(weights) -> str | None:
    """The architecture of a weights enum, or of a name such as 'ResNet50_Weights.IMAGENET1K_V2'; None
    for a name without its enum class ('DEFAULT', 'IMAGENET1K_V2') and for no weights."""
    enum_name = (
        type(weights).__name__ if isinstance(weights, WeightsEnum) else str(weights).rpartition(".")[0]
    )
    return next(
        (arch for arch in ARCHS + QUANTIZED_ARCHS if models.get_model_weights(arch).__name__ == enum_name),
        None,
    )


def weights_file_name(weights: WeightsEnum) -> str:
    """The file name torchvision caches the weights under, e.g. 'resnet50-11ad3fa6.pth'."""
    return os.path.basename(urlparse(weights.url).path)


def downloaded_weights(arch: str, path) -> WeightsEnum | None:
    """The torchvision weights a file is a download of, by its file name (None for any other file)."""
    name = Path(path).name
    return next((w for w in models.get_model_weights(arch) if weights_file_name(w) == name), None)


def saved_arch(state) -> str | None:
    """The architecture a train.py checkpoint's config names; None for other files."""
    config = state.get("config") if isinstance(state, dict) else None
    arch = config.get("arch") if isinstance(config, dict) else None
    return arch if isinstance(arch, str) and arch else None


def check_saved_arch(state: dict, arch: str, path) -> None:
    """A train.py checkpoint names its architecture: using it as another one is a clear error."""
    saved = saved_arch(state)
    if saved and saved != arch:
        raise UserError(
            f"checkpoint {path} is a {saved} model, not {arch}; leave the architecture out (the file names "
            f"it) or name {saved}"
        )


# The metadata export.py writes into an .onnx file (backends.export_metadata)
ONNX_KEYS = ("arch", "source", "preprocessing", "classes", "wnids")


def onnx_metadata(path) -> dict:
    """The metadata of an .onnx file: {'arch', 'source', 'preprocessing', 'classes', ...}."""
    import onnx  # here: only .onnx files need it, and its import takes ~0.7 s

    proto = onnx.load(str(path), load_external_data=False)
    return {prop.key: _json_or_text(prop.value) for prop in proto.metadata_props}


def _json_or_text(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:  # metadata another tool wrote
        return value


def onnx_file_metadata(path) -> dict:
    """onnx_metadata of a file export.py wrote (one without its keys is refused)."""
    if not Path(path).is_file():
        raise UserError(f"ONNX file {path} does not exist")
    meta = onnx_metadata(path)
    missing = set(ONNX_KEYS) - set(meta)
    if missing:
        raise UserError(
            f"{path} has no {', '.join(sorted(missing))} in its metadata; export it with export.py"
        )
    return meta


@dataclass(frozen=True)
class Weights:
    """What a --weights argument names, read once by resolve_weights.

    source: what build_model loads (torchvision's weights, a file, or None: random initialisation).
    enum: the torchvision weights that describe it (eval preprocessing, class names, published accuracy):
        the named ones; for a file, the ones it is a download of (matched by file name), else the arch's
        DEFAULT weights; for an .onnx file, the weights it was exported from.
    run: a train.py checkpoint's {'classes', 'config'} (its head's class names, its eval preprocessing).
    onnx: an .onnx file's metadata (export.py's: architecture, preprocessing, classes, source)."""

    arch: str
    source: WeightsEnum | str | None
    enum: WeightsEnum | None
    run: dict | None = None
    onnx: dict | None = None

    @property
    def is_file(self) -> bool:
        """A file of the user's, not torchvision's weights by name."""
        return isinstance(self.source, str)

    @property
    def published(self) -> WeightsEnum | None:
        """The torchvision weights whose published accuracy is this one's: named weights, or those an .onnx
        file was exported from; None for a .pth file, which may hold anything under a download's name."""
        return self.enum if self.onnx is not None or not self.is_file else None

    def preset(self, resize=None, crop=None, interpolation=None) -> EvalPreset:
        """The eval preprocessing: an .onnx file's own, a train.py run's validation preprocessing, else the
        weights' (the defaults for random weights), with any setting overridden."""
        if self.onnx is not None:
            return EvalPreset(**self.onnx["preprocessing"])
        if self.run is not None:
            return EvalPreset.from_train_config(self.run["config"], resize, crop, interpolation)
        return EvalPreset.from_weights(self.enum, resize, crop, interpolation)

    @property
    def built_for(self) -> int | None:
        """The one image size a ViT or MaxViT of these weights is built for (torchvision's weights': theirs; a
        train.py run's: its train crop; a plain state dict or none: the builder's 224); None for the other
        architectures, which take any size above their minimum."""
        if not takes_one_size(self.arch):
            return None
        if self.onnx is not None:
            return self.onnx["preprocessing"]["crop"]
        if self.run is not None and "train_crop_size" in self.run["config"]:
            return self.run["config"]["train_crop_size"]
        if self.is_file and downloaded_weights(self.arch, self.source) is None:  # a plain state dict
            return 224
        return self.enum.meta["min_size"][0] if self.enum is not None else 224

    @property
    def classes(self) -> list[str] | None:
        """The classes of a head trained here on other classes than ImageNet-1k's; None for ImageNet's."""
        if self.onnx is not None:
            return None if self.onnx["wnids"] is not None else list(self.onnx["classes"])
        if self.run is not None and self.run["classes"] != imagenet_wnids():
            return list(self.run["classes"])
        return None

    def label_coder(self) -> LabelCoder:
        """The names (and, for ImageNet-1k, the wnids) of the head's classes."""
        if self.onnx is not None:
            return LabelCoder(self.onnx["classes"], self.onnx.get("wnids"))
        classes = self.classes
        return LabelCoder(classes) if classes is not None else LabelCoder.imagenet(self.enum)


def resolve_weights(weights, arch: str | None = None) -> Weights:
    """The one reading of a --weights argument, in every script:

      None, 'none'                  random initialisation;
      'DEFAULT', 'IMAGENET1K_V2', 'ResNet50_Weights.IMAGENET1K_V2' or the enum: torchvision's weights;
      a .pth/.pt file (or a path)   a torchvision download (matched by file name), a train.py checkpoint
                                    (its classes and config), or any other state dict of the architecture;
      an .onnx file                 export.py's file, described by its metadata.

    arch: the architecture; None takes the one the weights name (a train.py checkpoint's config, a
    torchvision download's file name, an .onnx file's metadata, an enum or 'ResNet50_Weights.IMAGENET1K_V2');
    a name without its enum class takes DEFAULT_ARCH, a file that names none is an error. A file that names
    another architecture than `arch` is an error: one rule in every script."""
    if is_onnx_file(weights):
        return _onnx_weights(str(weights), arch)
    if not is_weights_file(weights):
        arch = check_arch(arch or arch_of_enum(weights) or DEFAULT_ARCH)
        enum = weights_enum(arch, weights)
        return Weights(arch, enum, enum)
    path = str(weights)
    state = load_checkpoint(path)
    arch = check_arch(arch or saved_arch(state) or download_arch(path) or _unnamed_arch(path))
    check_saved_arch(state, arch, path)
    downloaded = downloaded_weights(arch, path)
    trained_here = isinstance(state.get("config"), dict) and isinstance(state.get("classes"), list)
    run = {"classes": state["classes"], "config": state["config"]} if trained_here else None
    return Weights(arch, path, downloaded or weights_enum(arch, "DEFAULT"), run)


def download_arch(path) -> str | None:
    """The architecture of a torchvision download, by its file name ('resnet50-11ad3fa6.pth')."""
    return next((arch for arch in ARCHS + QUANTIZED_ARCHS if downloaded_weights(arch, path)), None)


def _unnamed_arch(path) -> str:
    raise UserError(
        f"{path} does not name its architecture (no train.py config, not a torchvision download's file "
        "name); name it: --arch ARCH (test_torchvision.py: --models ARCH)"
    )


def _onnx_weights(path: str, arch: str | None) -> Weights:
    meta = onnx_file_metadata(path)
    if arch is not None and arch != meta["arch"]:
        raise UserError(
            f"{path} is a {meta['arch']} model, not {arch}; leave the architecture out (the file names it)"
        )
    exported_from = meta["source"]
    named = exported_from != "random" and not is_weights_file(exported_from)
    return Weights(
        meta["arch"], path, weights_enum(meta["arch"], exported_from) if named else None, onnx=meta
    )


# ----------------------------------------------------------------------------- input sizes

# Builders made for one image size, taken as an argument: ViT's position embeddings (image_size) and
# MaxViT's attention grids (input_size); pretrained weights fix it to the size they were trained at.
SIZE_ARGUMENTS = {"vit_": "image_size", "maxvit_": "input_size"}
PROBED_SIZES = range(16, 513, 16)  # where a size is refused, the sizes the message offers instead


@contextlib.contextmanager
def on_meta():
    """Create parameters and buffers on the meta device: shapes only, no memory, init or download.
    (torch.device('meta') as a context breaks RegNet, whose builder computes widths with tensors.)"""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def meta_parameter(self, name, param):
        if param is not None:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def meta_buffer(self, name, buffer, persistent=True):
        register_buffer(self, name, buffer if buffer is None else buffer.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = meta_parameter, meta_buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def size_argument(arch: str, crop: int) -> dict:
    """The builder argument that makes a randomly initialised ViT or MaxViT for `crop` px images ({} for
    every other architecture, which takes any size above its minimum)."""
    for prefix, name in SIZE_ARGUMENTS.items():
        if float_arch(arch).startswith(prefix):
            return {name: crop if name == "image_size" else (crop, crop)}
    return {}


def takes_one_size(arch: str) -> bool:
    return bool(size_argument(arch, 224))


def _fits(arch: str, size: int, train: bool, kwargs: dict) -> str | None:
    """None when the architecture runs on (2, 3, size, size) images, else why not (shapes only: the meta
    device computes no values)."""
    try:
        with on_meta(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # googlenet's and inception_v3's notes on their default init
            model = models.get_model(float_arch(arch), weights=None, **kwargs).train(train)
            model(torch.empty(2, 3, size, size, device="meta"))
    except (RuntimeError, AssertionError, ValueError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return why if len(why) <= 150 else why[:150].rsplit(" ", 1)[0] + " ..."
    return None


def check_input_size(arch: str, size: int, option: str, built_for: int | None = None, train=False) -> None:
    """A UserError, before anything is written, when `arch` can't take `size` px images (--option size):
    each architecture's minimum, ViT's patch multiples, MaxViT's grids, the one size a ViT or MaxViT is
    built for; the message says which sizes work. built_for: that one size (Weights.built_for); None: a
    new model built for `size` (train.py without weights)."""

    def kwargs_at(px: int) -> dict:
        return size_argument(arch, built_for or px)

    why = _fits(arch, size, train, kwargs_at(size))
    if why is None:
        return
    if float_arch(arch).startswith("vit_") and built_for is None:  # a new ViT: its patches tile the image
        with on_meta():
            patch = models.get_model(float_arch(arch), weights=None).patch_size
        working = []
        takes = f"multiples of its patch size, {patch} px"
    else:
        working = [px for px in PROBED_SIZES if _fits(arch, px, train, kwargs_at(px)) is None]
        takes = _describe_sizes(working)
    if working and size > working[0] and working == [px for px in PROBED_SIZES if px >= working[0]]:
        takes = f"multiples of {math.gcd(*working)} px from {working[0]}"  # above its minimum, refused
    elif working and working == [px for px in PROBED_SIZES if px >= working[0]]:
        # a minimum size: found to the pixel between the probed sizes
        low, high = working[0] - PROBED_SIZES.step, working[0]  # low fails (or is below the probes)
        while high - low > 1:
            middle = (low + high) // 2
            fits = _fits(arch, middle, train, kwargs_at(middle)) is None
            low, high = (low, middle) if fits else (middle, high)
        takes = f"{high} px or more"
    built = f" (built for {built_for} px)" if built_for and takes_one_size(arch) else ""
    raise UserError(f"{arch}{built} can't take {size} px images ({option} {size}: {why}); it takes {takes}")


def _describe_sizes(working: list[int]) -> str:
    if not working:
        return f"none from {PROBED_SIZES.start} to {PROBED_SIZES[-1]} px"
    if len(working) == 1:
        return f"{working[0]} px only"
    step = math.gcd(*working)
    if working == [px for px in PROBED_SIZES if px >= working[0] and px % step == 0]:
        return f"multiples of {step} px"
    return ", ".join(map(str, working[:6])) + " px" + (", ..." if len(working) > 6 else "")


# ----------------------------------------------------------------------------- building


def weights_path(weights: WeightsEnum, weights_dir=None) -> Path:
    """Where the file of torchvision's weights is read from: `weights_dir`, else torchvision's cache."""
    folder = Path(weights_dir) if weights_dir else Path(torch.hub.get_dir()) / "checkpoints"
    return folder / weights_file_name(weights)


class MissingWeights(UserError):
    """A torchvision weights file that is neither here nor downloadable: a sweep skips those weights.
    url: where to download it from; folder: where to put it."""

    def __init__(self, message: str, url: str, folder: Path):
        super().__init__(message)
        self.url, self.folder = url, folder


def load_weights_state(weights: WeightsEnum, weights_dir=None) -> dict:
    """State dict of a torchvision weights enum, from `weights_dir` or torchvision's cache,
    downloading into the cache when online."""
    name, folder = weights_file_name(weights), weights_path(weights, weights_dir).parent
    if not (folder / name).is_file():
        if weights_dir:
            raise MissingWeights(
                f"weights file {name} for {weights} is not in {folder}; download {weights.url} into it",
                weights.url,
                folder,
            )
        try:
            folder.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(folder / name), hash_prefix=None, progress=True)
        except Exception as e:
            raise MissingWeights(
                f"weights file {name} for {weights} is not in {folder} and could not be downloaded "
                f"({type(e).__name__}); download {weights.url} and put it there "
                "(or pass --weights-dir DIR)",
                weights.url,
                folder,
            ) from e
    return load_checkpoint(folder / name, f"weights of {weights}")


def build_model(
    arch: str, weights=None, num_classes: int | None = None, weights_dir=None, load=True, **kwargs
) -> nn.Module:
    """Any torchvision classifier, randomly initialised or with weights.

    weights: None, 'DEFAULT', an enum name, or a local file (a torchvision .pth or a train.py checkpoint).
    num_classes: a different number than the weights' replaces the classifier head (fine-tuning).
    load=False: torchvision's weights by name build the model they make, without reading their file (a
    resumed run loads its own checkpoint over them).
    kwargs go to torchvision's builder (e.g. dropout=0.2 where the architecture has dropout)."""
    check_arch(arch)
    if is_weights_file(weights):
        enum = downloaded_weights(arch, weights)
        if enum is not None:  # a torchvision download, kept elsewhere
            weights_dir = Path(weights).parent
    else:
        enum = weights_enum(arch, weights)
    if is_quantized(arch) and (enum is not None or kwargs.get("quantize")):
        return _build_int8(arch, enum, weights_dir)
    if enum is not None and not load and not is_weights_file(weights):
        # the builder's per-weights settings without the weights' values
        with (
            mock.patch.object(type(enum), "get_state_dict", lambda *args, **kwargs: {}),
            mock.patch.object(nn.Module, "load_state_dict", lambda *args, **kwargs: None),
        ):
            model = models.get_model(arch, weights=enum, **kwargs)
    elif enum is not None:
        state_dict = load_weights_state(enum, weights_dir)

        def build():
            return models.get_model(arch, weights=enum, **kwargs)

        # Build through torchvision's own builder, so its per-weights settings hold (ViT image size,
        # googlenet/inception transform_input and aux heads); it asks the enum for the state dict.
        with mock.patch.object(type(enum), "get_state_dict", lambda *args, **kwargs: state_dict):
            model = load_checked(build, arch, enum)
    elif is_weights_file(weights):
        model = _build_from_file(arch, weights, kwargs)
    else:
        return models.get_model(arch, weights=None, num_classes=num_classes or 1000, **kwargs)
    if num_classes is not None and num_classes != num_outputs(model):
        replace_head(model, num_classes)
    return model


def _build_from_file(arch: str, path, kwargs: dict) -> nn.Module:
    """A train.py checkpoint or a plain state dict, with as many classes as its head has."""
    state = load_checkpoint(path)
    state_dict = state.get("model", state) if isinstance(state.get("model"), dict) else state
    check_saved_arch(state, arch, path)
    head = list(state_dict.values())[-1] if state_dict else None  # torchvision heads end the state dict
    saved_classes = head.shape[0] if isinstance(head, torch.Tensor) and head.ndim == 1 else 1000
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    if takes_one_size(arch) and "train_crop_size" in config:  # a ViT or MaxViT trained here at its size
        kwargs = {**size_argument(arch, config["train_crop_size"]), **kwargs}
    model = models.get_model(arch, weights=None, num_classes=saved_classes, **kwargs)
    load_checked(lambda: model.load_state_dict(state_dict), arch, path)
    return model


def _build_int8(arch: str, weights: WeightsEnum | None, weights_dir=None) -> nn.Module:
    """torchvision's int8 model: the quantizable architecture fused, observed on a random batch and
    converted (with the backend the weights name: fbgemm, or qnnpack for the MobileNets), then the
    weights' int8 state dict (weights_only, as everywhere). Without weights: int8 of random weights,
    with the backend of the architecture's DEFAULT weights."""
    backend = (weights or models.get_model_weights(arch).DEFAULT).meta["backend"]
    if backend not in torch.backends.quantized.supported_engines:
        raise UserError(f"{arch} needs the {backend} quantized engine, which this torch build lacks")
    with warnings.catch_warnings():  # torch deprecates torch.ao.quantization and its tensors; both still work
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        # googlenet's note on its default init: the int8 weights replace every initialised value
        warnings.simplefilter("ignore", FutureWarning)
        # the file first: a sweep skips a missing one before seconds of building and observing
        state_dict = load_weights_state(weights, weights_dir) if weights is not None else None
        model = models.get_model(arch, weights=None, quantize=True, backend=backend)
        if state_dict is not None:
            load_checked(lambda: model.load_state_dict(state_dict), arch, weights)
    return model.eval()  # (torchvision's quantize_model has set torch.backends.quantized.engine = backend)


def load_checked(load, arch, source):
    """load(), with load_state_dict's missing or unexpected keys and size mismatches as one line."""
    try:
        return load()
    except RuntimeError as e:
        detail = [line.strip() for line in str(e).splitlines() if line.strip()][-1][:200]
        raise UserError(f"weights {source} do not fit {arch}: {detail}") from e


def _head(model: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute name, module) of the last Linear/Conv2d, the classifier head."""
    name = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attr, getattr(parent, attr)


def num_outputs(model: nn.Module) -> int:
    head = _head(model)[2]
    return head.out_features if isinstance(head, nn.Linear) else head.out_channels


def replace_head(model: nn.Module, num_classes: int) -> None:
    """A new, randomly initialised classifier with `num_classes` outputs (aux heads are dropped)."""
    for aux in ("aux1", "aux2", "AuxLogits"):
        if getattr(model, aux, None) is not None:
            setattr(model, aux, None)
            model.aux_logits = False
    parent, attr, head = _head(model)
    if isinstance(head, nn.Linear):
        new = nn.Linear(head.in_features, num_classes)
    else:  # squeezenet's 1x1 conv classifier
        new = nn.Conv2d(head.in_channels, num_classes, kernel_size=head.kernel_size)
    setattr(parent, attr, new)
    if hasattr(model, "num_classes"):
        model.num_classes = num_classes


# What torch.fx raises for a model it cannot trace (data-dependent control flow: none of torchvision 0.29's
# classifiers, but a model of another release or a user's own may have it)
UNTRACEABLE = (torch.fx.proxy.TraceError, TypeError, RuntimeError, NotImplementedError)


def prepare_for_eval(model: nn.Module, channels_last: bool = True, fuse_bn: bool = True) -> nn.Module:
    """The inference form of a model: BatchNorm folded into the convolutions before it (torch.fx; one
    convolution instead of two passes; logits move by ~1e-6, as with any change of conv algorithm:
    docs/performance.md) and channels_last (NHWC: oneDNN's and cuDNN's fast layout). Models fx cannot
    trace stay unfused. An int8 model is already fused and stays as it is."""
    model = model.eval()
    if type(model).__name__.startswith("Quantizable"):  # torchvision's int8 models: converted and fused
        return model
    if fuse_bn:
        with contextlib.suppress(*UNTRACEABLE):  # keeps the module's own forward, unfused
            model = fuse(model)
    return model.to(memory_format=torch.channels_last) if channels_last else model
