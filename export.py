"""Export a torchvision classifier or a train.py checkpoint to ONNX: a file that describes itself (its
eval preprocessing, class names and source weights in the ONNX metadata) and is checked at once
against PyTorch on the same images (largest logit difference, top-5 agreement) before it is written:
a file that differs is never written.

    python export.py --arch resnet50 --weights IMAGENET1K_V2 --out resnet50.onnx
    python export.py --weights checkpoints/flowers/best.pt --out flowers.onnx --images DIR   # its run's arch
    python predict.py cat.jpg --weights resnet50.onnx                  # ONNX Runtime, the file's preprocessing

torch.onnx.export's exporter (torch.export, dynamo=True), opset 18, a dynamic batch dimension. The model
is exported in its inference form (BatchNorm folded, as test_torchvision.py evaluates); the file takes
normalised float32 (B, 3, crop, crop) images and gives (B, classes) logits.
"""

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from coder import LabelCoder
from dataset import find_samples, imagenet_wnids, load_rgb
from model import arch_of_weights, build_model, is_weights_file, prepare_for_eval, resolve_weights, weights_enum_for
from presets import EvalPreset, eval_source, normalize
from utils import ArgumentParser, UserError, atomic_write, barrier, cli, is_main, positive_int

OPSET = 18  # the opset torch's ONNX exporter targets natively


def onnx_bytes(model: nn.Module, crop: int, metadata: dict, opset: int = OPSET) -> bytes:
    """`model` (eval form, on the CPU) as a serialised ONNX model, with `metadata` (str -> JSON-able) in
    its metadata_props. An architecture the exporter can't handle is a UserError."""
    example = torch.randn(2, 3, crop, crop)
    try:
        with warnings.catch_warnings():  # the exporter warns about its own internals
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model, (example,), dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=opset, verbose=False, input_names=["images"], output_names=["logits"],
            )  # fmt: skip
    except Exception as e:  # torch.export and the ONNX translation raise many kinds
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"{metadata.get('arch')} cannot be exported to ONNX: {type(e).__name__}: {reason}") from e
    proto = program.model_proto
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    if proto.ByteSize() >= 2**31:  # protobuf's limit for one message
        raise UserError(f"{metadata.get('arch')} is over 2 GB as ONNX, beyond a single .onnx file's limit")
    return proto.SerializeToString()


def export_onnx(
    model: nn.Module, path, crop: int, metadata: dict, opset: int = OPSET, images: torch.Tensor | None = None
) -> dict | None:
    """Write `model` (eval form, on the CPU) to `path` atomically, as onnx_bytes. With `images`, the
    model is first checked by ONNX Runtime from memory (check_export) and written only if it passes, so
    a file that fails is never at `path` (a previous file there stays as it was); returns the check."""
    data = onnx_bytes(model, crop, metadata, opset)
    check = None
    if images is not None:
        kept = " (the previous file is kept)" if Path(path).exists() else ""
        action = f"{path} was not written{kept}; try another --opset, or report the model to PyTorch's exporter"
        name = f"the ONNX export of {metadata.get('arch')}"
        check = check_export(model, OnnxRuntimeModel(data), images, name, action)
    atomic_write(path, lambda f: f.write(data), mode="wb")
    return check


def onnx_metadata(path) -> dict:
    """The metadata export_onnx stored: {'arch', 'source', 'preprocessing', 'classes', ...}."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {prop.key: _json_or_text(prop.value) for prop in proto.metadata_props}


def _json_or_text(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:  # metadata another tool wrote
        return value


def onnx_file_metadata(path, imagenet: bool = True) -> dict:
    """onnx_metadata of a file export.py wrote; with imagenet, one for the 1000 ImageNet classes."""
    if not Path(path).is_file():
        raise UserError(f"ONNX file {path} does not exist")
    meta = onnx_metadata(path)
    missing = {"arch", "source", "preprocessing", "classes", "wnids"} - set(meta)
    if missing:
        raise UserError(f"{path} has no {', '.join(sorted(missing))} in its metadata; export it with export.py")
    if imagenet and meta["wnids"] is None:
        raise UserError(f"{path} is a model of its own classes; evaluate its train.py checkpoint instead")
    return meta


def source_weights(meta: dict):
    """The torchvision weights enum an exported file was made from (None: random, or a file)."""
    source = meta["source"]
    return None if source == "random" or is_weights_file(source) else resolve_weights(meta["arch"], source)


class OnnxRuntimeModel(nn.Module):
    """An exported file run by ONNX Runtime (CPU provider), callable like the PyTorch model: normalised
    float32 (B, 3, H, W) -> (B, classes) logits. `source`: the file, or its bytes."""

    def __init__(self, source, threads: int | None = None):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise UserError("ONNX Runtime is not installed: pip install onnxruntime") from e
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        model = source if isinstance(source, bytes) else str(source)
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().float().cpu().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0])


# float32 keeps ~7 significant digits, and the exporter reorders and fuses operations (BatchNorm folded,
# other kernels), so the logits' rounding differences grow with their magnitude: a run whose loss blew up
# has logits near 1e5 that differ by ~0.1 (~1e-6 of them) in a correct export. Each image's logits may
# differ by ABS_TOL + REL_TOL x its largest |logit|: REL_TOL is ~1000 float32 roundings (a mistranslated
# operation differs by far more), ABS_TOL is for the usual logits of order 1-10 (exports match to ~3e-6).
ABS_TOL, REL_TOL = 1e-3, 1e-4


def compare(reference: nn.Module, exported: nn.Module, images: torch.Tensor) -> dict:
    """Largest absolute logit difference; the largest relative to the image's largest |PyTorch logit|;
    whether every image is within ABS_TOL + REL_TOL x that; the share of images whose top-5 (in order) agree."""
    with torch.inference_mode():
        ours, theirs = reference(images).float(), exported(images)
    k = min(5, ours.shape[1])  # a fine-tuned head may have fewer classes
    same = (ours.topk(k).indices == theirs.topk(k).indices).all(1)
    diff, scale = (ours - theirs).abs().amax(1), ours.abs().amax(1)  # (B,) each
    return {
        "max_abs_diff": diff.max().item(),
        "max_rel_diff": (diff / scale.clamp_min(torch.finfo(torch.float32).tiny)).max().item(),
        "within_tolerance": bool((diff <= ABS_TOL + REL_TOL * scale).all()),
        "top5_agreement": 100 * same.float().mean().item(),
    }


def export_metadata(arch: str, weights, preset: EvalPreset, classes: list | None = None) -> dict:
    """What an exported file says of itself. classes: a fine-tuned run's (default: ImageNet-1k's, with
    the names of the weights' metadata and the wnids)."""
    coder = LabelCoder.imagenet(weights_enum_for(arch, weights)) if classes is None else None
    return {
        "arch": arch,
        "source": str(weights) if weights is not None else "random",
        "preprocessing": dataclasses.asdict(preset),  # resize, crop, interpolation, antialias, mean, std
        "classes": coder.names if coder is not None else list(classes),
        "wnids": coder.wnids if coder is not None else None,
        "input": "float32 (B, 3, crop, crop), normalised: (x / 255 - mean) / std",
    }


def check_export(
    model: nn.Module, exported: "OnnxRuntimeModel", images: torch.Tensor, name, action: str = "do not use it"
) -> dict:
    """compare(); an export whose top-5 differs from PyTorch's, or whose logits differ by more than
    ABS_TOL + REL_TOL x the largest |logit|, is an error naming it (`name`) and saying `action`."""
    check = compare(model, exported, images)
    # the error's traceback holds this frame: with the session in it, a garbage collection in a process
    # forked later (a DataLoader worker, a Pool) destroys the copied session, whose thread pool's locks hang
    del exported
    if check["top5_agreement"] < 100 or not check["within_tolerance"]:
        raise UserError(
            f"{name} differs from PyTorch (logits by up to {check['max_abs_diff']:.2g}, {check['max_rel_diff']:.2g} "
            f"of the largest |logit|, allowed {ABS_TOL:g} + {REL_TOL:g} of it; top-5 agree on "
            f"{check['top5_agreement']:.0f}% of {len(images)} images); {action}"
        )
    return check


def onnx_model(model: nn.Module, arch: str, weights, preset: EvalPreset, folder: Path) -> "OnnxRuntimeModel":
    """ONNX Runtime running `model` (eval form, CPU), exported into `folder` under a name that holds the
    weights and a hash of the metadata (so other preprocessing makes another file), reused while it
    passes check_export on random input, exported again (once) when it does not. Rank 0 exports."""
    metadata = export_metadata(arch, weights, preset)
    digest = hashlib.sha1(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:8]
    path = folder / f"{Path(str(weights)).name if weights is not None else 'random'}_{digest}.onnx"
    images = torch.randn(2, 3, preset.crop, preset.crop)
    for attempt in range(2):
        if is_main() and (attempt or weights is None or not path.is_file()):
            export_onnx(model, path, preset.crop, metadata)
        barrier()
        exported = OnnxRuntimeModel(path)
        try:
            check_export(model, exported, images, path)
            return exported
        except UserError:
            if attempt:
                raise


def validation_images(folder, preset: EvalPreset, count: int) -> torch.Tensor:
    """Up to `count` images of `folder` (any layout dataset.py reads), or random pixels without one."""
    if folder is None:
        pixels = torch.randint(0, 256, (count, 3, preset.crop, preset.crop), generator=torch.Generator().manual_seed(0))
        return normalize(pixels.to(torch.uint8), preset.mean, preset.std)
    samples, _ = find_samples(folder, "val", imagenet_labels=False)
    step = max(1, len(samples) // count)
    batch = torch.stack([preset(load_rgb(s.path)) for s in samples[::step][:count]])
    return normalize(batch, preset.mean, preset.std)


@cli
def main(argv=None) -> dict:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--arch", help="any torchvision classifier (default: a train.py checkpoint's own, else resnet50)")
    p.add_argument("--weights", default="DEFAULT", help="DEFAULT, an enum name, a .pth or a train.py checkpoint")
    p.add_argument("--weights-dir", help="folder holding torchvision's weights files (default: torchvision's cache)")
    p.add_argument("--out", help="the .onnx file to write (default: ARCH.onnx)")
    p.add_argument("--images", help="a folder of images to validate on (default: 8 random images)")
    p.add_argument("--count", type=positive_int, default=8, help="images to validate on (default: 8)")
    p.add_argument("--opset", type=positive_int, default=OPSET, help=f"ONNX opset (default: {OPSET})")
    args = p.parse_args(argv)
    args.arch = args.arch or arch_of_weights(args.weights)  # given, it must match a checkpoint's
    out = Path(args.out or f"{args.arch}.onnx")
    if out.exists() and out.is_dir():
        raise UserError(f"--out {out} is a folder; pass a file name such as {out / (args.arch + '.onnx')}")

    weights, _, run, preset = eval_source(args.arch, args.weights)
    model = prepare_for_eval(build_model(args.arch, weights, weights_dir=args.weights_dir), channels_last=False)
    own_classes = run is not None and run["classes"] != imagenet_wnids()
    metadata = export_metadata(args.arch, weights, preset, run["classes"] if own_classes else None)
    images = validation_images(args.images, preset, args.count)  # checked before the minutes of export
    replaced = out.exists()
    check = export_onnx(model, out, preset.crop, metadata, args.opset, images)  # written only if it passes
    size_mb = out.stat().st_size / 2**20
    print(
        f"wrote {out}{' (replacing the previous file)' if replaced else ''} ({size_mb:.1f} MB, opset {args.opset}, "
        f"dynamic batch): {args.arch} from {metadata['source']}; "
        f"on {len(images)} images the logits differ from PyTorch's by at most {check['max_abs_diff']:.2e} "
        f"({check['max_rel_diff']:.1e} of the largest |logit|), "
        f"top-5 agree on {check['top5_agreement']:.0f}%"
    )
    return {"path": str(out), **check, "metadata": metadata}


if __name__ == "__main__":
    main()
