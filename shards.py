"""WebDataset tar shards: many small files turned into a few large sequential reads, for clusters
whose shared storage or object store is slow at opening millions of files.

    python dataset.py make-shards /data/imagenet /data/shards --shard-size 5000
    torchrun --nproc_per_node=8 train.py --data /data/shards --arch resnet50
    python test_torchvision.py --data 'https://host/shards/val-{000000..000009}.tar' --models resnet50

make-shards writes DST/<split>-000000.tar ... for each split (train/ and val/ of a root, or the one
folder given) and DST/<split>.index.npz, the manifest: every image's relative path and labels (its
ImageNet class index and its folder's position among the sorted class folders), the class names and
each shard's first image. Each tar sample holds the image's bytes (under its suffix, jpg for JPEG),
`cls` (class index), `class` (folder name, the wnid) and `path`, so other WebDataset readers can use
the shards too. --data takes the folder (or URL) of the manifests, or a brace pattern of one split's
shards; local paths and any URL webdataset's gopen opens (http, https, pipe:, ...) work.

Evaluation: rank r of w reads shards r, r + w, ...; each shard is read by one loader worker, so every
image is counted exactly once in any world size, and predictions equal the folder's image by image.
Training: each epoch shuffles the shard order by (seed, epoch), deals the shards to the ranks and their
loader workers, and shuffles within a buffer of --shard-shuffle-buffer images per worker (seeded by seed,
epoch, rank, worker); every rank takes the same number of batches (its shards are read again when they
run short). Augmentations are seeded per image, as from folders. A resume is exact at epoch boundaries,
with the same world size and --workers: an interrupted epoch starts again from its beginning.
"""

import io
import itertools
import json
import os
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dataset import SPLITS, collate, find_samples, imagenet_wnids, load_rgb, seeded_transform
from index import IMAGE_EXTENSIONS, Samples
from utils import UserError, atomic_write


def is_shard_source(data) -> bool:
    """--data names tar shards: a folder holding make-shards' manifests, a pattern or path ending in
    .tar, or a URL (http://, pipe:, ...)."""
    text = str(data)
    if Path(text).is_dir():
        return any((Path(text) / f"{split}.index.npz").is_file() for split in SPLITS)
    return "://" in text or text.startswith("pipe:") or text.endswith(".tar")


@dataclass
class Manifest:
    urls: list[str]  # the split's shards, in order
    starts: np.ndarray  # index of each shard's first image, then the total
    samples: Samples  # paths relative to the split folder; ImageNet or folder targets (imagenet_labels)
    classes: list[str]


def _read_bytes(location: str) -> bytes:
    if "://" in location or location.startswith("pipe:"):
        import webdataset as wds

        with wds.gopen(location, "rb") as f:
            return f.read()
    return Path(location).read_bytes()


def read_manifest(data, split: str, imagenet_labels: bool, strict: bool = False) -> Manifest:
    """The shards and images of `split`. For a pattern: the split its file names start with, unless
    `strict` (train.py) asks for another split of the same folder (its val/ beside its train/)."""
    text = str(data)
    if text.endswith(".tar"):
        import braceexpand

        urls = list(braceexpand.braceexpand(text))
        folder, name = urls[0].rsplit("/", 1) if "/" in urls[0] else (".", urls[0])
        if strict and name.rsplit("-", 1)[0] != split:
            urls = None
        else:
            split = name.rsplit("-", 1)[0]
    else:
        folder, urls = text.rstrip("/"), None
    location = f"{folder}/{split}.index.npz"
    try:
        with np.load(io.BytesIO(_read_bytes(location)), allow_pickle=False) as saved:
            arrays = {k: saved[k] for k in saved.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(
            f"cannot read the shard manifest {location} ({e}); --data takes shards written by "
            "`python dataset.py make-shards SRC DST` (their folder, or a pattern of one split's .tar files)"
        ) from e
    names = json.loads(str(arrays["shards"]))
    if urls is None:
        urls = [f"{folder}/{name}" for name in names]
    elif [u.rsplit("/", 1)[-1] for u in urls] != names:
        raise UserError(f"{data} names {len(urls)} shards, but {location} lists {len(names)} ({names[0]} ...)")
    if imagenet_labels and not bool(arrays["imagenet"]):
        raise UserError(f"the classes of {data} are not ImageNet classes, so a 1000-way ImageNet head can't score them")
    targets = arrays["targets_imagenet" if imagenet_labels else "targets_folder"]
    samples = Samples("", arrays["blob"], arrays["offsets"], targets)
    classes = json.loads(str(arrays["classes"]))
    if imagenet_labels:
        classes = imagenet_wnids()
    return Manifest(urls, arrays["starts"], samples, classes)


def shard_samples(data, split: str, imagenet_labels: bool, strict: bool = False) -> tuple[Samples, list[str]]:
    manifest = read_manifest(data, split, imagenet_labels, strict)
    return manifest.samples, manifest.classes


# ----------------------------------------------------------------------------- reading


def _images_of(urls: list[str]):
    """(index, image bytes) of every image of these shards, in order."""
    import webdataset as wds

    keep = lambda shards: shards  # noqa: E731 - the shards are dealt to ranks and workers here already
    stream = wds.WebDataset(urls, shardshuffle=False, nodesplitter=keep, workersplitter=keep, empty_check=False)
    for sample in stream:
        image = next((sample[k] for k in sample if k.lower() in _IMAGE_KEYS), None)
        yield int(sample["__key__"]), image


_IMAGE_KEYS = {e.lstrip(".") for e in IMAGE_EXTENSIONS}


def _decode(data: bytes | None):
    """(PIL image, '') or (None, why not)."""
    if data is None:
        return None, "no image in the shard sample"
    try:
        return load_rgb(io.BytesIO(data)), ""
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad image; name it like ImageDataset
        return None, f"{type(e).__name__}: {e}"


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ShardEvalStream(torch.utils.data.IterableDataset):
    """(image, target, index, error) items of rank `rank`'s shards, each shard read by one loader
    worker; images whose index is at least len(samples) (--limit) are left out."""

    def __init__(self, manifest: Manifest, samples, transform, rank: int, world: int):
        self.samples, self.transform = samples, transform
        mine = range(rank, len(manifest.urls), world)
        self.urls = [manifest.urls[i] for i in mine if manifest.starts[i] < len(samples)]
        self.count = int(sum(max(0, min(manifest.starts[i + 1], len(samples)) - manifest.starts[i]) for i in mine))

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        worker, workers = _worker()
        if not self.urls[worker::workers]:  # more ranks (or workers) than shards: nothing to read here
            return
        for index, data in _images_of(self.urls[worker::workers]):
            if index < len(self.samples):
                image, error = _decode(data)
                target = self.samples[index].target
                yield (self.transform(image) if image is not None else None), target, index, error


class ShardTrainStream(torch.utils.data.IterableDataset):
    """An epoch of (image, target, index, error) items for one rank (see the module's docstring)."""

    def __init__(self, manifest: Manifest, transform, seed: int, rank: int, world: int, buffer: int):
        self.urls, self.samples, self.transform = manifest.urls, manifest.samples, transform
        self.seed, self.rank, self.world, self.buffer, self.epoch = seed, rank, world, buffer, 0
        self.per_rank = len(self.samples) // world

    def __len__(self) -> int:  # the images of the split, as len() of a folder dataset
        return len(self.samples)

    def quota(self, worker: int, workers: int) -> int:
        return self.per_rank // workers + (worker < self.per_rank % workers)

    def _stream(self, urls):
        while True:  # a rank whose shards hold fewer images than its quota reads them again
            found = 0
            for item in _images_of(urls):
                found += 1
                yield item
            if not found:
                raise UserError(f"no images in the shards {', '.join(urls[:3])}")

    def __iter__(self):
        worker, workers = _worker()
        order = list(range(len(self.urls)))
        random.Random(hash((self.seed, self.epoch))).shuffle(order)
        urls = [self.urls[i] for i in order[self.rank :: self.world][worker::workers]]
        rng = random.Random(hash((self.seed, self.epoch, self.rank, worker)))
        buffer, stream, quota = [], self._stream(urls), self.quota(worker, workers)
        for taken in range(quota):
            while len(buffer) < min(self.buffer, quota - taken):  # read no image more than the quota needs
                buffer.append(next(stream))
            index, data = buffer.pop(rng.randrange(len(buffer)))
            image, error = _decode(data)
            target = int(self.samples.targets[index])
            if image is None:
                yield None, target, index, error
            else:
                yield seeded_transform(self.transform, image, (self.seed, self.epoch, index)), target, index, ""


class _Epochs:
    """What train.py and the training loop ask of a sampler: set_epoch, and skip (mid-epoch resumes
    restart the epoch for a stream, so skip stays 0)."""

    def __init__(self, stream: ShardTrainStream):
        self.stream, self.skip = stream, 0

    def set_epoch(self, epoch: int) -> None:
        self.stream.epoch = epoch


class ShardLoader:
    """A DataLoader over a stream with the attributes the loops use: dataset (samples, transform),
    sampler (set_epoch, skip) and len (batches per rank)."""

    def __init__(self, stream, batch_size: int, workers: int, pin_memory: bool, drop_last: bool):
        self.dataset, self.sampler = stream, _Epochs(stream) if isinstance(stream, ShardTrainStream) else None
        self.loader = torch.utils.data.DataLoader(
            stream,
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            drop_last=drop_last,
            prefetch_factor=4 if workers > 0 else None,
        )
        if isinstance(stream, ShardTrainStream):
            self.batches = sum(stream.quota(k, max(workers, 1)) // batch_size for k in range(max(workers, 1)))
        else:
            self.batches = -(-len(stream) // batch_size)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        return iter(self.loader)


def shard_workers(manifest: Manifest, world: int, workers: int) -> int:
    """Loader workers per rank: no more than the rank's shards (each worker reads whole shards)."""
    if len(manifest.urls) < world:
        raise UserError(
            f"{len(manifest.urls)} shards can't feed {world} processes; write at least one shard per process "
            "(dataset.py make-shards --shard-size smaller)"
        )
    return min(workers, len(manifest.urls) // world)


def shard_eval_loader(data, samples, transform, batch_size, workers, rank, world, pin, split="val", strict=False):
    """Evaluation batches of rank `rank` of `world`: the images of `samples` (by index), from the shards."""
    manifest = read_manifest(data, split, imagenet_labels=False, strict=strict)
    stream = ShardEvalStream(manifest, samples, transform, rank, world)
    return ShardLoader(stream, batch_size, min(workers, len(stream.urls)), pin, drop_last=False)


def shard_train_loader(data, transform, cfg, rank: int, world: int, workers: int, pin: bool) -> ShardLoader:
    if cfg.ra_sampler:
        raise UserError(
            "repeated augmentation (ra_sampler) deals images by index, which a tar stream can't; "
            "pass --ra-sampler false to train from shards"
        )
    manifest = read_manifest(data, "train", imagenet_labels=False, strict=True)
    workers = shard_workers(manifest, world, workers)
    slots = world * max(workers, 1)
    if len(manifest.urls) % slots and rank == 0:
        print(
            f"note: {len(manifest.urls)} shards over {world} processes x {max(workers, 1)} loader workers: each "
            f"epoch, slots with a shard less read some images twice and skip as many; write a multiple of {slots} "
            "shards for epochs that read every image once"
        )
    stream = ShardTrainStream(manifest, transform, cfg.seed, rank, world, cfg.shard_shuffle_buffer)
    loader = ShardLoader(stream, cfg.batch_size, workers, pin, drop_last=True)
    if len(loader) == 0:
        raise UserError(
            f"{len(manifest.samples)} training images give no full batch of {cfg.batch_size} per loader worker "
            f"({world} processes x {max(workers, 1)} workers); lower --batch-size or --workers"
        )
    return loader


# ----------------------------------------------------------------------------- writing


def _labels(folder: Path, split: str):
    """(samples with their folder-position targets, their ImageNet targets or None, class names)."""
    try:
        imagenet = find_samples(folder, split, imagenet_labels=True)[0]
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


def _split_items(samples, root: Path, labels, classes):
    """The tar sample of each image of a split, in order (bytes read as they are written)."""
    for i, sample in enumerate(samples):
        relative = os.path.relpath(sample.path, root)
        suffix = Path(relative).suffix.lower().lstrip(".")
        yield {
            "__key__": f"{i:08d}",
            {"jpeg": "jpg"}.get(suffix, suffix): Path(sample.path).read_bytes(),
            "cls": str(int(labels[i])).encode(),
            "class": os.fsencode(classes[sample.target]),
            "path": os.fsencode(relative),
        }


def make_shards(src, dst, shard_size: int, split: str = "val") -> list[Path]:
    """Shards and a manifest for each split of `src` (see the module's docstring); the paths written."""
    src, dst = Path(src), Path(dst)
    written, splits = [], [s for s in SPLITS if (src / s).is_dir()] or [split]
    for name in splits:  # before writing anything: hours of shards must not end in this error
        if list(dst.glob(f"{name}-*.tar")) or (dst / f"{name}.index.npz").exists():
            raise UserError(f"{dst} already holds {name} shards; choose an empty folder or remove them")
    for name in splits:
        samples, imagenet_targets, classes = _labels(src, name)
        root = src / name if (src / name).is_dir() else src
        folder_targets = [s.target for s in samples]
        labels = imagenet_targets if imagenet_targets is not None else folder_targets
        items, shard_names = _split_items(samples, root, labels, classes), []
        for first in range(0, len(samples), shard_size):
            shard_names.append(f"{name}-{len(shard_names):06d}.tar")
            count = min(shard_size, len(samples) - first)
            atomic_write(
                dst / shard_names[-1], lambda f, n=count, items=items: _write_tar(f, itertools.islice(items, n)), "wb"
            )
            written.append(dst / shard_names[-1])
        compact = Samples.from_paths("", [os.path.relpath(s.path, root) for s in samples], folder_targets)
        arrays = {
            "blob": compact.blob,
            "offsets": compact.offsets,
            "targets_folder": compact.targets,
            "targets_imagenet": np.asarray(labels if imagenet_targets is not None else [-1] * len(samples), np.int32),
            "imagenet": np.array(imagenet_targets is not None),
            "classes": np.array(json.dumps(classes)),
            "shards": np.array(json.dumps(shard_names)),
            "starts": np.array([*range(0, len(samples), shard_size), len(samples)], dtype=np.int64),
        }
        atomic_write(dst / f"{name}.index.npz", lambda f, arrays=arrays: np.savez(f, **arrays), "wb")
        written.append(dst / f"{name}.index.npz")
        print(f"{root}: {len(samples)} images in {len(shard_names)} shards {dst / name}-*.tar, manifest {written[-1]}")
    return written
