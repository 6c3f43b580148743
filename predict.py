"""Top-k predictions for a few images, with a torchvision classifier or a model trained here.

    python predict.py cat.jpg dog.png --arch resnet50                     # DEFAULT weights, top 5
    python predict.py cat.jpg --arch vit_b_16 --weights IMAGENET1K_SWAG_E2E_V1 --topk 3
    python predict.py cat.jpg --arch resnet50 --weights checkpoints/resnet50-11ad3fa6.pth
    python predict.py cat.jpg --arch resnet50 --weights-dir /data/weights --json > predictions.json
    python predict.py rose.jpg --weights checkpoints/flowers/best.pt      # its run's arch and class names
    python predict.py cat.jpg --weights resnet50.onnx                      # export.py's file, on ONNX Runtime

Weights come from torchvision's cache ($TORCH_HOME/hub/checkpoints), --weights-dir, or a file. Images
get the weights' own eval preprocessing (torchvision's DEFAULT weights' for a file); a train.py
checkpoint (checkpoints/RUN/best.pt) brings its run's architecture, preprocessing and class names.
"""

import json
from pathlib import Path

import torch

from backends import OnnxRuntimeModel
from decoding import IMAGE_ERRORS, image_error, load_rgb
from engine import Runtime
from model import ARCH_HELP, build_model, check_input_size, is_quantized, prepare_for_eval, resolve_weights
from presets import EvalPreset, add_preprocessing_args
from utils import (
    ArgumentParser,
    UserError,
    add_runtime_args,
    add_weights_args,
    autocast,
    cli,
    positive_int,
    resolve_device,
    switch,
)


def read_image(path: str, preset: EvalPreset) -> torch.Tensor:
    """(3, crop, crop) uint8, or a UserError naming the file."""
    try:
        return preset(load_rgb(path))
    except FileNotFoundError as e:
        raise UserError(f"image file {path} does not exist") from e
    except IsADirectoryError as e:
        raise UserError(f"{path} is a folder; pass its images ({Path(path) / '*.jpg'})") from e
    except IMAGE_ERRORS as e:
        raise UserError(f"cannot read image {path}: {image_error(e)}") from e


def format_predictions(path: str, predictions: list[dict]) -> str:
    """The image path, then one aligned line per class: rank, probability, name, wnid."""
    rank_width, name_width = len(str(len(predictions))), max(len(p["name"]) for p in predictions)
    lines = [
        f"  {rank:>{rank_width}}. {p['prob']:7.2%}  {p['name']:<{name_width}}  {p['wnid'] or ''}".rstrip()
        for rank, p in enumerate(predictions, 1)
    ]
    return "\n".join([path, *lines])


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--arch", help=ARCH_HELP)
    weights_help = "DEFAULT, an enum name, a .pth file, a train.py checkpoint or an export.py .onnx file"
    add_weights_args(p, "DEFAULT", weights_help)
    p.add_argument("--topk", type=positive_int, default=5)
    add_preprocessing_args(p)
    switch(p, "--json", "print one JSON list instead of text")
    add_runtime_args(p)
    return p


@cli
def main(argv=None):
    args = build_parser().parse_args(argv)

    weights = resolve_weights(args.weights, args.arch)  # a given --arch must match a checkpoint's
    if weights.onnx is not None and (args.resize or args.crop or args.interpolation):
        raise UserError(f"{args.weights} holds its preprocessing; drop --resize, --crop and --interpolation")
    preset = weights.preset(args.resize, args.crop, args.interpolation)
    if args.crop:  # its one size (ViT, MaxViT), or its minimum
        check_input_size(weights.arch, preset.crop, "--crop", weights.built_for)
    images = [read_image(path, preset) for path in args.images]  # every image checked before the model loads
    if weights.onnx is not None:  # export.py's file: its own preprocessing and class names, on ONNX Runtime
        model, runtime = OnnxRuntimeModel(weights.source), Runtime.on_cpu(preset)
    else:
        if is_quantized(weights.arch):
            runtime = Runtime.on_cpu(preset)
        else:
            runtime = Runtime.create(resolve_device(args.device), args.amp, args.channels_last, False, preset)
        model = build_model(weights.arch, weights.source, weights_dir=args.weights_dir).to(runtime.device)
        # a few images: folding BatchNorm (a trace of the model) does not pay off
        model = prepare_for_eval(model, runtime.channels_last, fuse_bn=False)
    coder = weights.label_coder()

    results = []
    with torch.inference_mode(), autocast(runtime.device, runtime.amp_dtype):
        for path, image in zip(args.images, images):  # one at a time: activations of one image, however many
            batch, _ = runtime.inputs(image[None], torch.zeros(1))  # (1, 3, crop, crop) float32
            results.append({"image": path, "predictions": coder.decode(model(batch), k=args.topk)[0]})
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print("\n\n".join(format_predictions(r["image"], r["predictions"]) for r in results))


if __name__ == "__main__":
    main()
