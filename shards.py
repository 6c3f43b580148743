"""WebDataset tar shards: many small files turned into a few large sequential reads, for clusters
whose shared storage or object store is slow at opening millions of files.

    python dataset.py make-shards /data/imagenet /data/shards --shard-size 5005
    torchrun --nproc_per_node=8 train.py --data /data/shards --arch resnet50
    python test_torchvision.py --data 'https://host/shards/val-{000000..000009}.tar' --models resnet50

make-shards writes DST/<split>-000000.tar ... for each split (train/ and val/ of a root, or the one
folder given) and DST/<split>.index.npz, the manifest: every image's relative path and labels (its
ImageNet class index and its folder's position among the sorted class folders), the class names and
each shard's first image. Each tar sample holds the image's bytes (under its suffix, jpg for JPEG),
`cls` (class index), `class` (folder name, the wnid) and `path`, so other WebDataset readers can use
the shards too. --data takes the folder (or URL) of the manifests, or a brace pattern of one split's
shards; local paths and any URL webdataset's gopen opens (http, https, pipe: commands that end with
the shard's name, ...) work.

Evaluation: rank r of w reads shards r, r + w, ...; each shard is read by one loader worker, so every
image is counted exactly once in any world size, and predictions equal the folder's image by image.
Training: each epoch shuffles the shard order by (seed, epoch), deals the shards to the ranks and their
loader workers, and shuffles within a buffer of --shard-shuffle-buffer images per worker (seeded by seed,
epoch, rank, worker); every rank takes the same number of batches (its shards are read again when they
run short). Augmentations are seeded per image, as from folders. A resume is exact at epoch boundaries,
with the same world size and --workers: an interrupted epoch starts again from its beginning.
"""

import functools
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dataset import SPLITS, collate, imagenet_wnids, load_rgb, seeded_transform
from index import IMAGE_EXTENSIONS, Samples
from utils import UserError


def is_url(text: str) -> bool:
    """Read through webdataset's gopen (http://, s3://, pipe: ...), not as a local path."""
    return "://" in text or text.startswith("pipe:")


def is_shard_source(data) -> bool:
    """--data names tar shards: a folder holding make-shards' manifests, a pattern or path ending in
    .tar, or a URL (http://, pipe:, ...)."""
    text = str(data)
    if Path(text).is_dir():
        return any((Path(text) / f"{split}.index.npz").is_file() for split in SPLITS)
    return is_url(text) or text.endswith(".tar")


@dataclass
class Manifest:
    urls: list[str]  # the split's shards, in order
    starts: np.ndarray  # index of each shard's first image, then the total
    samples: Samples  # paths relative to the split folder; ImageNet or folder targets (imagenet_labels)
    classes: list[str]
    dataset: str  # the source folder's test-set name (testsets.dataset_name), for result rows


CURL = "curl -f -s -S -L --connect-timeout 20 --speed-limit 1 --speed-time 60 --retry 3 --retry-delay 2"


def _opened(url: str) -> str:
    """http(s) through curl with time limits (webdataset's own retries for minutes when a server is silent)."""
    return f"pipe:{CURL} {url!r}" if url.startswith(("http://", "https://")) else url


@functools.lru_cache(maxsize=8)
def _manifest_arrays(location: str) -> dict:
    """The arrays of a manifest, read once per process: the samples, the loaders, the row's dataset
    name and every model of a sweep ask for it, and a URL's would be downloaded each time."""
    if location.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(location, timeout=60) as f:
            data = f.read()
    elif is_url(location):
        import webdataset as wds

        with wds.gopen(location, "rb") as f:
            data = f.read()
    else:
        data = Path(location).read_bytes()
    with np.load(io.BytesIO(data), allow_pickle=False) as saved:
        return {k: saved[k] for k in saved.files}


def read_manifest(data, split: str, imagenet_labels: bool, strict: bool = False) -> Manifest:
    """The shards and images of `split`. For a pattern: the split its file names start with, unless
    `strict` (train.py) asks for another split of the same folder (its val/ beside its train/)."""
    text = str(data)
    if "*" in text or "?" in text:
        raise UserError(
            f"{data}: globs are not expanded here; pass the shards' folder or a brace pattern such as "
            "'DST/val-{000000..000009}.tar'"
        )
    if Path(text).name.startswith("ILSVRC2012_img_"):
        raise UserError(f"{data} is ImageNet's archive, not shards; pass the folder holding it and the devkit")
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
        arrays = _manifest_arrays(location)
    except Exception as e:  # noqa: BLE001 - missing, cut short, a server's error: one line that says where
        raise UserError(
            f"cannot read the shard manifest {location} ({e}); --data takes shards written by "
            "`python dataset.py make-shards SRC DST` (their folder, or a pattern of one split's .tar files)"
        ) from e
    names = json.loads(str(arrays["shards"]))
    if urls is None:
        urls = [f"{folder}/{name}" for name in names]
    elif [u.rsplit("/", 1)[-1] for u in urls] != names:
        given = {u.rsplit("/", 1)[-1] for u in urls}
        odd = sorted(given - set(names)) or sorted(set(names) - given)
        raise UserError(
            f"{data} does not name the {len(names)} shards {location} lists ({odd[0]} differs); pass the folder "
            f"{folder} or '{folder}/{split}-{{000000..{len(names) - 1:06d}}}.tar'"
        )
    missing = [u for u in urls if not is_url(u) and not Path(u).is_file()]
    if missing:
        raise UserError(f"shard {missing[0]} is missing ({len(missing)} of {len(urls)}); write the shards again")
    if imagenet_labels and not bool(arrays["imagenet"]):
        raise UserError(
            f"the classes of {data} are not ImageNet classes, so a 1000-way ImageNet head can't score them; "
            "fine-tune a model on them with train.py, or make shards of wnid class folders"
        )
    targets = arrays["targets_imagenet" if imagenet_labels else "targets_folder"]
    samples = Samples("", arrays["blob"], arrays["offsets"], targets)
    classes = json.loads(str(arrays["classes"]))
    if imagenet_labels:
        classes = imagenet_wnids()
    return Manifest(urls, arrays["starts"], samples, classes, str(arrays.get("dataset", split)))


def shard_samples(data, split: str, imagenet_labels: bool, strict: bool = False) -> tuple[Samples, list[str]]:
    manifest = read_manifest(data, split, imagenet_labels, strict)
    return manifest.samples, manifest.classes


# ----------------------------------------------------------------------------- reading


def _images_of(shards: list[tuple[str, int, int]]):
    """(index, image bytes) of every image of these (url, first index, end index) shards, in order.
    A shard that can't be read, or holds other images than the manifest says, ends the run."""
    import webdataset as wds

    keep = lambda urls: urls  # noqa: E731 - the shards are dealt to ranks and workers here already
    for url, first, end in shards:
        expected = first
        try:
            for sample in wds.WebDataset([_opened(url)], shardshuffle=False, nodesplitter=keep, workersplitter=keep):
                index = int(sample["__key__"])
                if index != expected:
                    break
                expected += 1
                yield index, next((sample[k] for k in sample if k.lower() in _IMAGE_KEYS), None)
        except Exception as e:  # noqa: BLE001 - tarfile, curl and file errors, from a loader worker
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot read shard {url} ({why}); check it, or write the shards again") from None
        if expected != end:
            raise UserError(
                f"shard {url} holds other images than its manifest lists (image {expected} of {first}..{end - 1}); "
                "write the shards again"
            )


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
        starts = manifest.starts.tolist()
        mine = range(rank, len(manifest.urls), world)
        self.urls = [(manifest.urls[i], starts[i], starts[i + 1]) for i in mine if starts[i] < len(samples)]
        self.count = sum(max(0, min(starts[i + 1], len(samples)) - starts[i]) for i in mine)  # this rank's

    def __len__(self) -> int:  # the images evaluated, as len() of a folder dataset
        return len(self.samples)

    def __iter__(self):
        worker, workers = _worker()
        if not self.urls[worker::workers]:  # more ranks (or workers) than shards: nothing to read here
            return
        for index, data in _images_of(self.urls[worker::workers]):
            if index >= len(self.samples):  # --limit: the rest of this shard is not evaluated
                break
            image, error = _decode(data)
            target = self.samples[index].target
            yield (self.transform(image) if image is not None else None), target, index, error


class ShardTrainStream(torch.utils.data.IterableDataset):
    """An epoch of (image, target, index, error) items for one rank (see the module's docstring)."""

    def __init__(self, manifest: Manifest, transform, seed: int, rank: int, world: int, buffer: int):
        starts = manifest.starts.tolist()
        self.urls = [(url, starts[i], starts[i + 1]) for i, url in enumerate(manifest.urls)]
        self.samples, self.transform = manifest.samples, transform
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
                raise UserError(f"no images in the shards {', '.join(url for url, _, _ in urls[:3])}")

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
            self.batches = -(-stream.count // batch_size)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        try:
            yield from self.loader
        except UserError as e:  # from a loader worker: its message arrives inside the worker's traceback
            raise UserError(str(e).strip().splitlines()[-1].split("UserError: ", 1)[-1]) from None


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
    if cfg.save_every_steps and rank == 0:
        print("note: from tar shards, a run stopped inside an epoch resumes at that epoch's start (--save-every-steps)")
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
