"""Top-k ImageNet-1k predictions for a few images, with a torchvision classifier.

    python predict.py cat.jpg dog.png --arch resnet50                     # DEFAULT weights, top 5
    python predict.py cat.jpg --arch vit_b_16 --weights IMAGENET1K_SWAG_E2E_V1 --topk 3
    python predict.py cat.jpg --arch resnet50 --weights checkpoints/resnet50-11ad3fa6.pth
    python predict.py cat.jpg --arch resnet50 --weights-dir /data/weights --json > predictions.json

Weights come from torchvision's cache ($TORCH_HOME/hub/checkpoints), --weights-dir, or a file. Images
get the weights' own eval preprocessing (torchvision's DEFAULT weights' for a file).
"""
import argparse
import json

import torch
from PIL import Image

from coder import LabelCoder
from dataset import EvalPreset, load_rgb, normalize
from model import build_model, is_weights_file, resolve_weights, torchvision_weights_for_file
from utils import ArgumentParser, UserError, cli, resolve_device


def read_image(path: str, preset: EvalPreset) -> torch.Tensor:
    """(3, crop, crop) uint8, or a UserError naming the file."""
    try:
        return preset(load_rgb(path))
    except FileNotFoundError as e:
        raise UserError(f"image file {path} does not exist") from e
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise UserError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def format_predictions(path: str, predictions: list[dict]) -> str:
    """The image path, then one aligned line per class: rank, probability, name, wnid."""
    rank_width, name_width = len(str(len(predictions))), max(len(p["name"]) for p in predictions)
    lines = [f"  {rank:>{rank_width}}. {p['prob']:7.2%}  {p['name']:<{name_width}}  {p['wnid'] or ''}".rstrip()
             for rank, p in enumerate(predictions, 1)]
    return "\n".join([path, *lines])


@cli
def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--arch", default="resnet50", help="any torchvision classifier (default: resnet50)")
    p.add_argument("--weights", default="DEFAULT", help="DEFAULT, an enum name like IMAGENET1K_V2, or a .pth file")
    p.add_argument("--weights-dir", help="folder holding torchvision's weights files (default: torchvision's cache)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    args = p.parse_args(argv)
    if args.topk < 1:
        raise UserError(f"--topk must be at least 1, got {args.topk}")

    # The enum gives the preprocessing and class names; a file takes those of its torchvision weights
    # (matched by file name) or of the arch's DEFAULT weights.
    enum = (torchvision_weights_for_file(args.arch, args.weights) or resolve_weights(args.arch, "DEFAULT")
            if is_weights_file(args.weights) else resolve_weights(args.arch, args.weights))
    preset = EvalPreset.from_weights(enum)
    images = [read_image(path, preset) for path in args.images]  # every image checked before the model loads
    device = resolve_device(args.device)
    weights = args.weights if is_weights_file(args.weights) else enum  # the enum: 'none' means random init
    model = build_model(args.arch, weights, weights_dir=args.weights_dir).to(device).eval()
    coder = LabelCoder.imagenet(enum)

    results = []
    with torch.inference_mode():
        for path, image in zip(args.images, images):  # one at a time: activations of one image, however many
            batch = normalize(image[None].to(device), preset.mean, preset.std)  # (1, 3, crop, crop) float32
            results.append({"image": path, "predictions": coder.decode(model(batch), k=args.topk)[0]})
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print("\n\n".join(format_predictions(r["image"], r["predictions"]) for r in results))


if __name__ == "__main__":
    main()
