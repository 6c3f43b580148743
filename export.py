"""Export a torchvision classifier or a train.py checkpoint to ONNX: a file that describes itself (its
eval preprocessing, class names and source weights in the ONNX metadata) and is checked at once
against PyTorch on the same images (largest logit difference, top-5 agreement) before it is written:
a file that differs is never written (backends.py: how).

    python export.py --arch resnet50 --weights IMAGENET1K_V2 --output resnet50.onnx
    python export.py --weights checkpoints/flowers/best.pt --output flowers.onnx --images DIR   # its arch
    python predict.py cat.jpg --weights resnet50.onnx     # ONNX Runtime, with the file's preprocessing

The model is exported in its inference form (BatchNorm folded, as test_torchvision.py evaluates); the
file takes normalised float32 (B, 3, crop, crop) images and gives (B, classes) logits.
"""

from pathlib import Path

import torch

from backends import OPSET, export_metadata, export_onnx
from dataset import find_samples
from decoding import load_rgb
from model import ARCH_HELP, build_model, is_onnx_file, prepare_for_eval, resolve_weights
from presets import EvalPreset, normalize
from utils import ArgumentParser, UserError, add_weights_args, cli, positive_int


def validation_images(folder, preset: EvalPreset, count: int) -> torch.Tensor:
    """Up to `count` images of `folder` (any layout dataset.py reads), or random pixels without one."""
    if folder is None:
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randint(0, 256, (count, 3, preset.crop, preset.crop), generator=generator)
        return normalize(pixels.to(torch.uint8), preset.mean, preset.std)
    samples, _ = find_samples(folder, "val", imagenet_labels=False)
    step = max(1, len(samples) // count)
    batch = torch.stack([preset(load_rgb(s.path)) for s in samples[::step][:count]])
    return normalize(batch, preset.mean, preset.std)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, renamed={"--out": "--output"})
    p.add_argument("--arch", help=ARCH_HELP)
    add_weights_args(p, "DEFAULT", "DEFAULT, an enum name, a .pth or a train.py checkpoint")
    p.add_argument("--output", help="the .onnx file to write (default: ARCH.onnx)")
    p.add_argument("--images", help="a folder of images to validate on (default: 8 random images)")
    p.add_argument("--count", type=positive_int, default=8, help="images to validate on (default: 8)")
    p.add_argument("--opset", type=positive_int, default=OPSET, help=f"ONNX opset (default: {OPSET})")
    return p


@cli
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if is_onnx_file(args.weights):
        raise UserError(f"{args.weights} is an ONNX file already; export a .pth or a train.py checkpoint")
    weights = resolve_weights(args.weights, args.arch)  # a given --arch must match a checkpoint's
    out = Path(args.output or f"{weights.arch}.onnx")
    if out.exists() and out.is_dir():
        raise UserError(
            f"--output {out} is a folder; pass a file name such as {out / (weights.arch + '.onnx')}"
        )
    if out.suffix != ".onnx":  # every script tells an exported file from a checkpoint by its suffix
        raise UserError(f"--output {out}: export.py writes ONNX files; name it {out.with_suffix('.onnx')}")

    preset = weights.preset()
    model = build_model(weights.arch, weights.source, weights_dir=args.weights_dir)
    model = prepare_for_eval(model, channels_last=False)
    metadata = export_metadata(weights, preset)
    images = validation_images(args.images, preset, args.count)  # checked before the minutes of export
    replaced = out.exists()
    check = export_onnx(model, out, preset.crop, metadata, args.opset, images)  # written only if it passes
    size_mb = out.stat().st_size / 2**20
    replacing = " (replacing the previous file)" if replaced else ""
    print(
        f"wrote {out}{replacing} ({size_mb:.1f} MB, opset {args.opset}, dynamic batch): "
        f"{weights.arch} from {metadata['source']}; "
        f"on {len(images)} images the logits differ from PyTorch's by at most {check['max_abs_diff']:.2e} "
        f"({check['max_rel_diff']:.1e} of the largest |logit|), "
        f"top-5 agree on {check['top5_agreement']:.0f}%"
    )
    return {"path": str(out), **check, "metadata": metadata}


if __name__ == "__main__":
    main()
