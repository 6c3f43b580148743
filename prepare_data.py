"""Get data ready for the other scripts: sort a flat validation folder into class folders, write WebDataset
tar shards, preview what a training recipe feeds the model, and find unreadable images before a long run.

Turn a flat validation folder into class folders of symlinks (idempotent, copies nothing):
    python prepare_data.py prepare-val /data/imagenet/val [--val-labels LOC_val_solution.csv] [--output DIR]
Tar shards of every split of a folder (what they hold: dataset.py; how they are read: loader.py):
    python prepare_data.py make-shards /data/imagenet /data/shards --shard-size 5005
    torchrun --nproc_per_node=8 train.py --data /data/shards --arch resnet50
    python test_torchvision.py --data 'https://host/shards/val-{000000..000009}.tar' --models resnet50
See what a training recipe feeds the model (augmentations, then MixUp/CutMix, with the soft labels):
    python prepare_data.py preview --config configs/torchvision_v2.yaml --data /data/imagenet --output p.png
Decode every image of every split (all cores), list the unreadable ones and exit non-zero if any:
    python prepare_data.py check /data/imagenet [--workers N] [--output unreadable.txt]
"""

import contextlib
import gc
import itertools
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from coder import LabelCoder, imagenet_wnids
from config import TrainConfig, load_config
from dataset import (
    FLAT_VAL,
    SPLITS,
    WNID,
    Samples,
    find_samples,
    folder_set_name,
    is_shard_source,
    split_folder,
    val_labels,
)
from decoding import load_rgb, pre_resized
from loader import ImageDataset
from presets import IMAGENET_MEAN, IMAGENET_STD, MixUpCutMix, normalize, train_transform
from report import plot_preview
from utils import (
    RUNTIME_HELP,
    ArgumentParser,
    UserError,
    atomic_write,
    atomic_write_text,
    available_cores,
    cli,
    non_negative_int,
    positive_int,
    switch,
)

# ----------------------------------------------------------------------------- prepare-val


def prepare_val(val_dir, labels_file=None, out_dir=None) -> Path:
    """Class folders of symlinks for a flat validation folder (in place by default); safe to re-run."""
    val_dir, wnids = Path(val_dir), imagenet_wnids()
    out_dir = Path(out_dir) if out_dir else val_dir
    labels = val_labels(labels_file)
    flat = sorted(p for p in val_dir.iterdir() if p.is_file() and FLAT_VAL.match(p.name))
    if not flat:
        raise UserError(f"{val_dir} holds no ILSVRC2012_val_*.JPEG files to sort into class folders")
    for image in flat:
        if image.name not in labels:
            raise UserError(f"no label for {image.name}; pass --val-labels with the matching ground truth")
        link = out_dir / wnids[labels[image.name]] / image.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink() and not link.exists():
            link.symlink_to(os.path.relpath(image.resolve(), link.parent))
    return out_dir


# ----------------------------------------------------------------------------- make-shards


def make_shards(
    src,
    dst,
    shard_size: int,
    split: str | None = None,
    labels_file=None,
    max_size: int = 0,
    quality: int = 90,
    resize_val: bool = False,
) -> list[Path]:
    """Shards and a manifest for each split of `src` (train/ and val/ of a root, or `src` itself as
    `split`: by default its own name when that is train or val, else val); the paths written.
    max_size > 0 stores pre-resized images (pre_resized): a val split only with resize_val."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise UserError(f"{src} is not a folder; pass a root with train/ and val/, or one split's folder")
    if dst.resolve().is_relative_to(src.resolve()):
        raise UserError(
            f"{dst} is inside {src}, whose class folders it would join; write the shards elsewhere"
        )
    split = split or (src.name if src.name in SPLITS else "val")
    splits = [s for s in SPLITS if (src / s).is_dir()] or [split]
    for name in splits:  # before writing anything: hours of shards must not end in this error
        if list(dst.glob(f"{name}-*.tar")) or (dst / f"{name}.index.npz").exists():
            raise UserError(f"{dst} already holds {name} shards; choose an empty folder or remove them")
    if max_size and "val" in splits and not resize_val:
        raise UserError(
            f"--max-size {max_size} would re-encode the val images, which changes the published evaluation "
            f"protocol (its rows could not be compared with the weights' published accuracy); make shards of "
            f"{src / 'train'} alone, or pass --resize-val to shrink val too"
        )
    if not 1 <= quality <= 100:
        raise UserError(f"--quality {quality} is not a JPEG quality; use 1 to 100 (e.g. 90)")
    written = []
    for name in splits:
        resized = max_size if name == "train" or resize_val else 0
        written += write_split_shards(src, dst, name, shard_size, labels_file, resized, quality)
    return written


def write_split_shards(
    src: Path, dst: Path, split: str, shard_size: int, labels_file, max_size: int = 0, quality: int = 90
) -> list[Path]:
    """One split's shards, then its manifest (dataset.py describes both); the paths written."""
    samples, imagenet_targets, classes = split_labels(src, split, labels_file)
    root = src / split if (src / split).is_dir() else src
    relative = [os.path.relpath(s.path, root) for s in samples]
    labels = imagenet_targets if imagenet_targets is not None else samples.targets
    resized = [0]  # images re-encoded (max_size)
    items = tar_samples(samples, relative, labels, classes, max_size, quality, resized)
    shard_names, written = [], []
    for first in range(0, len(samples), shard_size):
        shard_names.append(f"{split}-{len(shard_names):06d}.tar")
        count = min(shard_size, len(samples) - first)
        atomic_write(dst / shard_names[-1], lambda f, n=count: write_tar(f, itertools.islice(items, n)), "wb")
        written.append(dst / shard_names[-1])
    compact = Samples.from_paths("", relative, samples.targets)
    no_imagenet_targets = np.full(len(samples), -1)
    arrays = {
        "blob": compact.blob,
        "offsets": compact.offsets,
        "targets_folder": compact.targets,
        "targets_imagenet": np.asarray(
            labels if imagenet_targets is not None else no_imagenet_targets, np.int32
        ),
        "imagenet": np.array(imagenet_targets is not None),
        "classes": np.array(json.dumps(classes)),
        "shards": np.array(json.dumps(shard_names)),
        "starts": np.array([*range(0, len(samples), shard_size), len(samples)], dtype=np.int64),
        # pre-resized images are another test set than the folder's: their rows never mix with its own
        "dataset": np.array(folder_set_name(root) + (f"-max{max_size}q{quality}" if max_size else "")),
        "max_size": np.array(max_size),
        "quality": np.array(quality if max_size else 0),
    }
    atomic_write(dst / f"{split}.index.npz", lambda f: np.savez(f, **arrays), "wb")
    written.append(dst / f"{split}.index.npz")
    pattern = f"'{dst}/{split}-{{000000..{len(shard_names) - 1:06d}}}.tar'"
    print(
        f"{root}: {len(samples)} images in {len(shard_names)} shards {pattern} and the manifest {written[-1]}"
    )
    if max_size:
        print(
            f"{resized[0]} of {len(samples)} images were longer than {max_size} px: shrunk to it and stored "
            f"as JPEG quality {quality}; the others are stored as they were"
        )
    return written


def split_labels(folder: Path, split: str, labels_file=None):
    """(samples with their folder-position targets, their ImageNet targets or None, class names)."""
    try:
        imagenet = find_samples(folder, split, imagenet_labels=True, labels_file=labels_file)[0]
    except UserError:  # class folders that are not ImageNet's
        imagenet = None
    try:
        samples, classes = find_samples(folder, split, imagenet_labels=False)
    except UserError:
        if imagenet is None:
            raise
        samples, classes = imagenet, imagenet_wnids()  # a flat val folder: ImageNet's classes only
    return samples, None if imagenet is None else imagenet.targets, classes


def write_tar(f, items) -> None:
    import webdataset as wds  # here: only tar shards need it, and its import takes ~2 s

    with wds.TarWriter(f, encoder=False) as tar:
        for item in items:
            tar.write(item)


def tar_samples(samples, relative: list[str], labels, classes, max_size=0, quality=90, resized=None):
    """The tar sample of each image of a split, in order (bytes read as they are written); with max_size,
    pre_resized's images (counted in resized[0])."""
    for i, sample in enumerate(samples):
        suffix = Path(relative[i]).suffix.lower().lstrip(".")
        data = Path(sample.path).read_bytes()
        shrunk = pre_resized(data, max_size, quality) if max_size else None
        if shrunk is not None:
            data, suffix, resized[0] = shrunk, "jpg", resized[0] + 1
        yield {
            "__key__": f"{i:08d}",
            {"jpeg": "jpg"}.get(suffix, suffix): data,
            "cls": str(int(labels[i])).encode(),
            "class": os.fsencode(classes[sample.target]),
            "path": os.fsencode(relative[i]),
        }


# ----------------------------------------------------------------------------- preview


def augmented_batch(cfg, samples, num_classes: int, count: int = 16, seed: int = 0):
    """What a training step of a TrainConfig sees: `count` images drawn (by seed) from `samples`, through
    the config's train preset and MixUp/CutMix. Returns (images (count, 3, H, W) float in [0, 1] for
    display, targets (count, num_classes) float: the soft labels the loss receives)."""
    picked = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    dataset = ImageDataset([samples[i] for i in picked], train_transform(cfg), seed)
    # keys (index, epoch 0, copy 0): the images as the first epoch sees them
    items = [dataset[(i, 0, 0)] for i in range(len(dataset))]
    bad = [error for image, _, _, error in items if image is None]
    if bad:
        raise UserError(f"cannot read an image to preview ({bad[0]})")
    images, targets = torch.stack([item[0] for item in items]), torch.tensor([item[1] for item in items])
    if images.dtype == torch.uint8:  # normalised on the device in training; MixUp needs floats
        images = normalize(images, IMAGENET_MEAN, IMAGENET_STD)
    mix = MixUpCutMix.from_config(cfg, num_classes)
    if mix is not None:
        images, targets = mix(images, targets, step=seed)
    else:
        targets = torch.nn.functional.one_hot(targets, num_classes).float()
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1), targets


def write_preview(config, data, out, count: int = 16, seed: int = 0) -> None:
    """The PNG of augmented_batch for a config and a folder of images."""
    cfg = load_config(TrainConfig, ["--config", config, "--data", data])
    samples, classes = find_samples(data, "train", imagenet_labels=False)
    names = classes
    if all(WNID.match(c) for c in classes) and set(classes) <= set(imagenet_wnids()):  # readable names
        coder = LabelCoder.imagenet()
        names = [coder.name(coder.index(c)) for c in classes]
    images, targets = augmented_batch(cfg, samples, len(classes), count, seed)
    plot_preview(images, targets, names, out, title=f"{config}: what the model sees (soft labels)")
    print(f"wrote {out}: {len(images)} training images of {data} as {config} augments and mixes them")


# ----------------------------------------------------------------------------- check


def check_images(data, workers: int | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """(every image file of every split of `data`: train/ and val/ of a root, or `data` itself as one
    split; (path, why) of each one that does not decode as a run decodes it), decoded by `workers`
    processes (default: every usable core; 0 or 1: this process)."""
    if is_shard_source(data):
        raise UserError(f"{data} is tar shards, which check does not read; check the image folder instead")
    splits = [s for s in SPLITS if (Path(data) / s).is_dir()] or ["val"]
    paths = [path for split in splits for path in split_images(data, split)]
    workers = available_cores() if workers is None else workers
    bar = tqdm(total=len(paths), desc="decoding", unit="image", disable=None)
    bad, parallel = [], workers > 1 and len(paths) > 1
    if parallel:
        gc.collect()  # no garbage for forked workers to collect: a native object in it may hang them (ORT's)
    # fork: the workers need only loader.load_rgb, imported already (macOS can't fork torch: spawn there)
    context = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
    with context.Pool(min(workers, len(paths))) if parallel else contextlib.nullcontext() as pool:
        # chunks: a message per 64 images at most, yet every worker busy to the end
        chunk = max(1, min(64, len(paths) // (8 * max(workers, 1))))
        results = pool.imap(decode_error, paths, chunksize=chunk) if parallel else map(decode_error, paths)
        for path, why in zip(paths, results):
            if why:
                bad.append((path, why))
            bar.update()
    bar.close()
    return paths, bad


def split_images(data, split: str) -> list[str]:
    """The image files a run reads from one split of `data` (a flat val folder's too: no labels needed)."""
    try:
        return [sample.path for sample in find_samples(data, split, imagenet_labels=False)[0]]
    except UserError:
        folder = split_folder(data, split)
        flat = sorted(p for p in folder.iterdir() if p.is_file() and FLAT_VAL.match(p.name))
        if not flat:
            raise
        return [str(p) for p in flat]


def decode_error(path: str) -> str:
    """'' when the image decodes fully as a run decodes it (loader.load_rgb), else why not, on one line."""
    try:
        load_rgb(path)
    except Exception as e:  # noqa: BLE001 - whatever would stop a run on this file, named as the run names it
        empty = os.path.getsize(path) == 0 if os.path.exists(path) else False
        return "an empty file (0 bytes)" if empty else f"{type(e).__name__}: {e}".replace("\n", " ")
    return ""


def check_dataset(data, workers: int | None = None, output=None) -> None:
    """check_images, said: one line per unreadable image and a summary; --output lists their paths;
    any unreadable image is a UserError (exit code 2)."""
    start = time.perf_counter()
    paths, bad = check_images(data, workers)
    seconds = time.perf_counter() - start
    for path, why in bad:
        print(f"{path}: {why}")
    if output:
        atomic_write_text(output, "".join(f"{path}\n" for path, _ in bad))
    listed = f" (their paths: {output})" if output and bad else ""
    print(f"{len(paths)} images checked in {seconds:.1f} s, {len(bad)} unreadable{listed}")
    if bad:
        raise UserError(
            f"{len(bad)} of the {len(paths)} images of {data} are unreadable (listed above); fix or remove "
            "them, or pass --skip-bad-images to train.py and test_torchvision.py to skip and list them"
        )


# ----------------------------------------------------------------------------- the command line


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, renamed={"--out": "--output", "--labels": "--val-labels"})
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare-val", help="sort a flat val folder into <wnid>/ folders of symlinks")
    prep.add_argument("val_dir")
    prep.add_argument("--val-labels", help=RUNTIME_HELP["val_labels"])
    prep.add_argument("--output", help="where to create the class folders (default: in val_dir)")
    tar = sub.add_parser("make-shards", help="WebDataset tar shards and their manifest from a folder")
    tar.add_argument("src", help="a root with train/ and val/, or one split folder (any layout --data takes)")
    tar.add_argument("dst", help="the folder to write <split>-000000.tar ... and <split>.index.npz into")
    tar.add_argument("--shard-size", type=positive_int, default=5000, help="images per shard (default: 5000)")
    tar.add_argument(
        "--split", help="one split folder's shard name (default: its name if train or val, else val)"
    )
    tar.add_argument("--val-labels", help=RUNTIME_HELP["val_labels"])
    tar.add_argument(
        "--max-size",
        type=positive_int,
        help="store images whose longer side exceeds this many pixels shrunk to it, as JPEG (FFCV's "
        "max_resolution; e.g. 512): fewer pixels to decode per image. Train split only, unless --resize-val",
    )
    tar.add_argument(
        "--quality",
        type=positive_int,
        default=90,
        help="JPEG quality of the shrunk images (default: 90, FFCV's)",
    )
    switch(
        tar,
        "--resize-val",
        "shrink the val images too: their rows then name another dataset (e.g. imagenet-max512q90), not the "
        "published protocol",
    )
    show = sub.add_parser(
        "preview", help="a PNG grid of augmented, mixed training images and their soft labels"
    )
    show.add_argument("--config", required=True, help="a train.py config (configs/*.yaml)")
    show.add_argument(
        "--data", required=True, help="an ImageFolder root (its train/ folder is used) or class folders"
    )
    show.add_argument("--output", default="preview.png", help="the PNG to write (default: preview.png)")
    show.add_argument("--count", type=positive_int, default=16, help="images in the grid (default: 16)")
    show.add_argument("--seed", type=int, default=0)
    check = sub.add_parser("check", help="decode every image of a folder (all cores), list the unreadable")
    check.add_argument(
        "data", metavar="DIR", help="a root with train/ and val/, or one split folder (any --data layout)"
    )
    check.add_argument(
        "--workers",
        type=non_negative_int,
        default=None,
        help="decoding processes (default: every usable core; 0: in this process)",
    )
    check.add_argument("--output", help="also write the unreadable images' paths to this file, one a line")
    return p


@cli
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "make-shards":
        return make_shards(
            args.src,
            args.dst,
            args.shard_size,
            args.split,
            args.val_labels,
            max_size=args.max_size or 0,
            quality=args.quality,
            resize_val=args.resize_val,
        )
    if args.command == "preview":
        return write_preview(args.config, args.data, args.output, args.count, args.seed)
    if args.command == "check":
        return check_dataset(args.data, args.workers, args.output)
    out = prepare_val(args.val_dir, args.val_labels, args.output)
    classes = sum(1 for d in out.iterdir() if d.is_dir())
    print(
        f"{out}: {classes} class folders of symlinks; evaluate with: python test_torchvision.py --data {out}"
    )


if __name__ == "__main__":
    main()
