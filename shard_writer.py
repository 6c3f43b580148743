"""`python dataset.py make-shards SRC DST --shard-size N`: WebDataset tar shards and their manifest
from any folder layout --data takes (what they hold and how they are read: shards.py).
"""

import itertools
import json
import os
from pathlib import Path

import numpy as np

from dataset import SPLITS, find_samples, imagenet_wnids
from index import Samples
from testsets import dataset_name
from utils import UserError, atomic_write


def _labels(folder: Path, split: str, labels_file=None):
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


def _write_tar(f, items) -> None:
    import webdataset as wds

    with wds.TarWriter(f, encoder=False) as tar:
        for item in items:
            tar.write(item)


def _split_items(samples, relative: list[str], labels, classes):
    """The tar sample of each image of a split, in order (bytes read as they are written)."""
    for i, sample in enumerate(samples):
        suffix = Path(relative[i]).suffix.lower().lstrip(".")
        yield {
            "__key__": f"{i:08d}",
            {"jpeg": "jpg"}.get(suffix, suffix): Path(sample.path).read_bytes(),
            "cls": str(int(labels[i])).encode(),
            "class": os.fsencode(classes[sample.target]),
            "path": os.fsencode(relative[i]),
        }


def make_shards(src, dst, shard_size: int, split: str | None = None, labels_file=None) -> list[Path]:
    """Shards and a manifest for each split of `src` (train/ and val/ of a root, or `src` itself as
    `split`: by default its own name when that is train or val, else val); the paths written."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise UserError(f"{src} is not a folder; pass a root with train/ and val/, or one split's folder")
    if dst.resolve().is_relative_to(src.resolve()):
        raise UserError(f"{dst} is inside {src}, whose class folders it would join; write the shards elsewhere")
    split = split or (src.name if src.name in SPLITS else "val")
    written, splits = [], [s for s in SPLITS if (src / s).is_dir()] or [split]
    for name in splits:  # before writing anything: hours of shards must not end in this error
        if list(dst.glob(f"{name}-*.tar")) or (dst / f"{name}.index.npz").exists():
            raise UserError(f"{dst} already holds {name} shards; choose an empty folder or remove them")
    for name in splits:
        samples, imagenet_targets, classes = _labels(src, name, labels_file)
        root = src / name if (src / name).is_dir() else src
        relative = [os.path.relpath(s.path, root) for s in samples]
        labels = imagenet_targets if imagenet_targets is not None else samples.targets
        items, shard_names = _split_items(samples, relative, labels, classes), []
        for first in range(0, len(samples), shard_size):
            shard_names.append(f"{name}-{len(shard_names):06d}.tar")
            count = min(shard_size, len(samples) - first)
            atomic_write(
                dst / shard_names[-1], lambda f, n=count, items=items: _write_tar(f, itertools.islice(items, n)), "wb"
            )
            written.append(dst / shard_names[-1])
        compact = Samples.from_paths("", relative, samples.targets)
        arrays = {
            "blob": compact.blob,
            "offsets": compact.offsets,
            "targets_folder": compact.targets,
            "targets_imagenet": np.asarray(
                labels if imagenet_targets is not None else np.full(len(samples), -1), np.int32
            ),
            "imagenet": np.array(imagenet_targets is not None),
            "classes": np.array(json.dumps(classes)),
            "shards": np.array(json.dumps(shard_names)),
            "starts": np.array([*range(0, len(samples), shard_size), len(samples)], dtype=np.int64),
            "dataset": np.array(dataset_name(root)),
        }
        atomic_write(dst / f"{name}.index.npz", lambda f, arrays=arrays: np.savez(f, **arrays), "wb")
        written.append(dst / f"{name}.index.npz")
        pattern = f"'{dst}/{name}-{{000000..{len(shard_names) - 1:06d}}}.tar'"
        print(f"{root}: {len(samples)} images in {len(shard_names)} shards {pattern} and the manifest {written[-1]}")
    return written
