"""Model factory, weights resolution and complexity counting for every torchvision classifier.
In code:
    from model import build_model, complexity
    model = build_model("resnet50", "DEFAULT")     # weights from torchvision's cache ($TORCH_HOME/hub/checkpoints)
    complexity("vit_b_16", "IMAGENET1K_V1")        # {'params': 86567656, 'gmacs': 17.564, ...}
"""

import contextlib
import io
import math
import os
import warnings
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from torchvision import models
from torchvision.models import WeightsEnum

from utils import UserError, closest, load_checkpoint


def _quantized_archs() -> tuple[list[str], str]:
    """(torchvision's int8 classifiers, '' or why there are none): torch.ao.quantization is deprecated
    upstream, and a torch without it leaves these rows out instead of failing."""
    try:
        import torch.ao.quantization  # noqa: F401
        from torchvision.models import quantization

        return sorted(models.list_models(module=quantization)), ""
    except ImportError as e:
        return [], f"torchvision's int8 weights are left out: this torch has no torch.ao.quantization ({e})"


ARCHS = sorted(models.list_models(module=models))  # the float classifiers (80 in torchvision 0.29)
QUANTIZED_ARCHS, NO_QUANTIZATION = _quantized_archs()  # quantized_resnet50, ... (12): evaluation only


def is_quantized(arch: str) -> bool:
    """An int8 model of torchvision.models.quantization (its weights run on the CPU, with their backend)."""
    return arch in QUANTIZED_ARCHS


def float_arch(arch: str) -> str:
    """'quantized_resnet50' -> 'resnet50': the architecture an int8 model quantizes."""
    return arch.removeprefix("quantized_")


def check_arch(arch: str, int8: bool = True) -> str:
    """A torchvision classifier name; int8 models (evaluation only) unless int8=False."""
    if is_quantized(arch) and not int8:
        raise UserError(f"{arch} is an int8 model for evaluation; train its float architecture {float_arch(arch)}")
    if arch not in ARCHS and not is_quantized(arch):
        raise UserError(f"unknown model '{arch}'{closest(arch, ARCHS)}; see torchvision.models.list_models()")
    return arch


def all_weights(arch: str) -> list[WeightsEnum]:
    """Every pretrained weights enum of an architecture, in torchvision's order."""
    return list(models.get_model_weights(check_arch(arch)))


def is_weights_file(weights) -> bool:
    return isinstance(weights, (str, Path)) and (str(weights).endswith((".pth", ".pt")) or os.sep in str(weights))


def resolve_weights(arch: str, weights) -> WeightsEnum | None:
    """None/'none' -> None; 'DEFAULT', 'IMAGENET1K_V2' or 'ResNet50_Weights.IMAGENET1K_V2' -> the enum."""
    if isinstance(weights, WeightsEnum):
        return weights
    if weights is None or str(weights).lower() in ("", "none"):
        return None
    enum = models.get_model_weights(check_arch(arch))
    prefix, _, name = str(weights).rpartition(".")
    if name.upper() == "DEFAULT":
        return enum.DEFAULT
    names = [m for m in enum.__members__ if m != "DEFAULT"]  # DEFAULT is an alias of one of them
    if (prefix and prefix != enum.__name__) or name not in names:
        valid = ["DEFAULT", *names, *(f"{enum.__name__}.{m}" for m in names)]
        raise UserError(
            f"unknown weights '{weights}' for {arch}{closest(weights, valid)}; valid: DEFAULT, {', '.join(names)}"
        )
    return enum[name]


def weights_enum_for(arch: str, weights, file_default: str | None = None) -> WeightsEnum | None:
    """The torchvision weights enum that describes a --weights argument (its preprocessing, class
    names, published accuracy): the named enum; for a file, the torchvision weights it is a download
    of (matched by file name), else `file_default` (e.g. 'DEFAULT' for the arch's preprocessing)."""
    if not is_weights_file(weights):
        return resolve_weights(arch, weights)
    name = Path(weights).name
    match = next((w for w in models.get_model_weights(check_arch(arch)) if weights_file_name(w) == name), None)
    return match or resolve_weights(arch, file_default)


def arch_of_weights(weights, default: str = "resnet50") -> str:
    """The architecture a train.py checkpoint records (its config's), else `default` (for --arch left out)."""
    return (saved_arch(load_checkpoint(weights)) if is_weights_file(weights) else None) or default


def saved_arch(state) -> str | None:
    """The architecture a train.py checkpoint's config names; None for other files."""
    config = state.get("config") if isinstance(state, dict) else None
    arch = config.get("arch") if isinstance(config, dict) else None
    return arch if isinstance(arch, str) and arch else None


def run_of_checkpoint(path, arch: str) -> dict | None:
    """{'classes', 'config'} of a train.py checkpoint of `arch` (a model trained or fine-tuned here: its
    head's class names and its eval preprocessing), None for any other weights file."""
    state = load_checkpoint(path)
    if not isinstance(state, dict):
        return None
    check_saved_arch(state, arch, path)
    if isinstance(state.get("config"), dict) and isinstance(state.get("classes"), list):
        return {"classes": state["classes"], "config": state["config"]}
    return None


def check_saved_arch(state: dict, arch: str, path) -> None:
    """A train.py checkpoint names its architecture: using it as another one is a clear error."""
    saved = saved_arch(state)
    if saved and saved != arch:
        raise UserError(
            f"checkpoint {path} is a {saved} model, not {arch}; use it as {saved} "
            f"(train.py/predict.py --arch {saved}, test_torchvision.py --models {saved})"
        )


def weights_file_name(weights: WeightsEnum) -> str:
    """The file name torchvision caches the weights under, e.g. 'resnet50-11ad3fa6.pth'."""
    return os.path.basename(urlparse(weights.url).path)


def load_weights_state(weights: WeightsEnum, weights_dir=None) -> dict:
    """State dict of a torchvision weights enum, from `weights_dir` or torchvision's cache,
    downloading into the cache when online."""
    name = weights_file_name(weights)
    folder = Path(weights_dir) if weights_dir else Path(torch.hub.get_dir()) / "checkpoints"
    if not (folder / name).is_file():
        if weights_dir:
            raise UserError(f"weights file {name} for {weights} is not in {folder}; download {weights.url} into it")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, str(folder / name), hash_prefix=None, progress=True)
        except Exception as e:
            raise UserError(
                f"weights file {name} for {weights} is not in {folder} and could not be downloaded "
                f"({type(e).__name__}); download {weights.url} and put it there "
                "(or pass --weights-dir DIR)"
            ) from e
    return load_checkpoint(folder / name, f"weights of {weights}")


def build_model(arch: str, weights=None, num_classes: int | None = None, weights_dir=None, **kwargs) -> nn.Module:
    """Any torchvision classifier, randomly initialised or with weights.

    weights: None, 'DEFAULT', an enum name, or a local file (a torchvision .pth or a train.py checkpoint).
    num_classes: a different number than the weights' replaces the classifier head (fine-tuning).
    kwargs go to torchvision's builder (e.g. dropout=0.2 where the architecture has dropout)."""
    check_arch(arch)
    enum_weights = weights_enum_for(arch, weights)
    if enum_weights is not None and is_weights_file(weights):  # a torchvision download, kept elsewhere
        weights_dir = Path(weights).parent
    if is_quantized(arch) and (enum_weights is not None or kwargs.get("quantize")):
        return _build_int8(arch, enum_weights, weights_dir)
    if enum_weights is not None:
        state_dict = load_weights_state(enum_weights, weights_dir)
        # Build through torchvision's own builder, so its per-weights settings hold (ViT image size,
        # googlenet/inception transform_input and aux heads); it asks the enum for the state dict.
        with mock.patch.object(type(enum_weights), "get_state_dict", lambda *args, **kwargs: state_dict):
            model = load_checked(lambda: models.get_model(arch, weights=enum_weights, **kwargs), arch, enum_weights)
    elif is_weights_file(weights):
        state = load_checkpoint(weights)
        state_dict = state.get("model", state) if isinstance(state.get("model"), dict) else state
        check_saved_arch(state, arch, weights)
        head = list(state_dict.values())[-1] if state_dict else None  # torchvision heads end the state dict
        saved_classes = head.shape[0] if isinstance(head, torch.Tensor) and head.ndim == 1 else 1000
        model = models.get_model(arch, weights=None, num_classes=saved_classes, **kwargs)
        load_checked(lambda: model.load_state_dict(state_dict), arch, weights)
    else:
        return models.get_model(arch, weights=None, num_classes=num_classes or 1000, **kwargs)
    if num_classes is not None and num_classes != _num_outputs(model):
        replace_head(model, num_classes)
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
        model = models.get_model(arch, weights=None, quantize=True, backend=backend)
        if weights is not None:
            state_dict = load_weights_state(weights, weights_dir)
            load_checked(lambda: model.load_state_dict(state_dict), arch, weights)
    return model.eval()  # (torchvision's quantize_model has set torch.backends.quantized.engine = backend)


def load_checked(load, arch, source):
    try:
        return load()
    except RuntimeError as e:  # load_state_dict's missing/unexpected keys or size mismatch
        detail = [line.strip() for line in str(e).splitlines() if line.strip()][-1][:200]
        raise UserError(f"weights {source} do not fit {arch}: {detail}") from e


def _head(model: nn.Module) -> tuple[nn.Module, str, nn.Module]:
    """(parent, attribute name, module) of the last Linear/Conv2d, the classifier head."""
    name = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent, attr, getattr(parent, attr)


def _num_outputs(model: nn.Module) -> int:
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


@contextlib.contextmanager
def _on_meta():
    """Create parameters and buffers on the meta device: shapes only, no memory, init or download.
    (torch.device('meta') as a context breaks RegNet, whose builder computes widths with tensors.)"""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def meta_parameter(self, name, param):
        register_parameter(
            self, name, param if param is None else nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        )

    def meta_buffer(self, name, buffer, persistent=True):
        register_buffer(self, name, buffer if buffer is None else buffer.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = meta_parameter, meta_buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def published(weights) -> dict:
    """Resolution, interpolation and published accuracy from the weights' metadata."""
    transform = weights.transforms()
    metrics = weights.meta["_metrics"]["ImageNet-1K"]
    # VGG16's IMAGENET1K_FEATURES (a feature extractor, no trained head) publishes NaN: reported as None
    acc1, acc5 = (None if math.isnan(metrics[k]) else metrics[k] for k in ("acc@1", "acc@5"))
    return {
        "resize": transform.resize_size[0],
        "crop": transform.crop_size[0],
        "interpolation": transform.interpolation.value,
        "acc1_published": acc1,
        "acc5_published": acc5,
        "err1_published": None if acc1 is None else round(100 - acc1, 3),
        "err5_published": None if acc5 is None else round(100 - acc5, 3),
        "file_mb": weights.meta.get("_file_size"),
        "quantized_engine": weights.meta.get("backend"),  # int8 weights: fbgemm or qnnpack
    }


def published_deltas(weights, record: dict) -> dict:
    """The published top-1/top-5 of `weights` and our difference to them (None where none is published)."""
    pub = published(weights)
    deltas = {"acc1_published": pub["acc1_published"], "acc5_published": pub["acc5_published"]}
    for k in ("acc1", "acc5"):
        deltas[f"{k}_delta"] = None if pub[f"{k}_published"] is None else record[k] - pub[f"{k}_published"]
    return deltas


def eval_resolution(weights: WeightsEnum | None) -> int:
    return weights.transforms().crop_size[0] if weights is not None else 224


def meta_model(arch: str, weights: WeightsEnum | None, num_classes: int | None = None) -> nn.Module:
    """The architecture as the weights' builder makes it, on the meta device."""
    kwargs = {"num_classes": len(weights.meta["categories"] or range(1000))} if weights is not None else {}
    arch = float_arch(arch)  # an int8 model counts as its float architecture (as its metadata does)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if arch.startswith("vit_") and weights is not None:
        kwargs["image_size"] = weights.meta["min_size"][0]  # as torchvision's ViT builder does
    if arch == "googlenet":  # torchvision's num_params for googlenet leaves out the aux heads...
        kwargs.update(aux_logits=False, init_weights=False)
    if arch == "inception_v3":  # ...and counts them for inception_v3
        kwargs.update(aux_logits=True, init_weights=False)
    with _on_meta():
        return models.get_model(arch, weights=None, **kwargs).eval()


def complexity(
    arch: str, weights=None, thop: bool = False, size: int | None = None, num_classes: int | None = None
) -> dict:
    """Parameters and multiply-accumulates at the weights' own eval resolution, counted by
    torch.utils.flop_counter on the meta device (attention included: math SDPA backend and
    nn.MultiheadAttention's fused fast path off). GFLOPs = 2 x GMACs, torchvision's convention."""
    weights = resolve_weights(arch, weights)
    model, size = meta_model(arch, weights, num_classes), size or eval_resolution(weights)
    x = torch.empty(1, 3, size, size, device="meta")
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    macs = counter.get_total_flops() / 2
    result = {
        "params": sum(p.numel() for p in model.parameters()),
        "gmacs": macs / 1e9,
        "gflops": 2 * macs / 1e9,
        "resolution": size,
    }
    if thop:
        result["thop_gmacs"] = thop_gmacs(model, x)
    return result


def thop_gmacs(model: nn.Module, x: torch.Tensor) -> float | None:
    """thop's count, as a cross-check (it counts 0 for attention matmuls); None without thop."""
    try:
        import thop
    except ImportError:
        return None
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():  # thop prints per-module warnings
        macs, _ = thop.profile(model, inputs=(x,), verbose=False)
    return float(macs) / 1e9


FAMILIES = (
    "efficientnet_v2",
    "efficientnet",
    "mobilenet_v2",
    "mobilenet_v3",
    "shufflenet_v2",
    "swin_v2",
    "swin",
    "regnet_x",
    "regnet_y",
    "wide_resnet",
    "resnext",
    "resnet",
    "vit",
    "convnext",
    "densenet",
    "vgg",
    "mnasnet",
    "squeezenet",
    "maxvit",
)


def model_family(arch: str) -> str:
    """'resnet50' -> 'resnet', 'efficientnet_v2_s' -> 'efficientnet_v2', every int8 model -> 'int8'
    (for plots and grouping)."""
    return "int8" if is_quantized(arch) else next((f for f in FAMILIES if arch.startswith(f)), arch)


def prepare_for_eval(model: nn.Module, channels_last: bool = True, fuse_bn: bool = True) -> nn.Module:
    """The inference form of a model: BatchNorm folded into the convolutions before it (torch.fx; one
    convolution instead of two passes; logits move by ~1e-6, as with any change of conv algorithm:
    docs/performance.md) and channels_last (NHWC: oneDNN's and cuDNN's fast layout). Models fx cannot
    trace stay unfused. An int8 model is already fused and stays as it is."""
    model = model.eval()
    if type(model).__name__.startswith("Quantizable"):  # torchvision's int8 models: converted and fused
        return model
    if fuse_bn:
        from torch.fx.experimental.optimization import fuse

        with contextlib.suppress(Exception):  # data-dependent control flow (a few architectures): keep it unfused
            model = fuse(model)
    return model.to(memory_format=torch.channels_last) if channels_last else model
