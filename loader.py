"""How images become batches: reading an image (PIL, or decoding.py's JPEG codec), the datasets that
apply a transform to dataset.py's samples (seeded per image), the samplers that deal them to the ranks,
the loaders of image files and of tar shards, and `--decode gpu`, batched JPEG decoding on the GPU.

Every loader yields (images, targets, indices, errors) batches: images (B, 3, H, W) uint8 (or normalised
float32 from a train preset with random erasing), targets and dataset indices (B,) int64, and the
(index, why) of each image that could not be read, which the loops stop on or skip (engine.py).

Tar shards (dataset.py says what they hold). Evaluation: rank r of w reads shards r, r + w, ...; each shard
is read by one loader worker, so every image is counted exactly once in any world size, and predictions
equal the folder's image by image. Training: each epoch shuffles the shard order by (seed, epoch), deals
the shards to the ranks and their loader workers, and shuffles within a buffer of --shard-shuffle-buffer
images per worker (seeded by seed, epoch, rank, worker); every rank takes the same number of batches (its
shards are read again when they run short). Augmentations are seeded per image, as from folders. A resume
is exact at epoch boundaries, with the same world size and --workers: an interrupted epoch starts again
from its beginning.

`--decode gpu` decodes with nvJPEG (decoding.py: torchcodec, else torchvision.io) and resizes with tensor
ops: pixels differ slightly from the PIL path of presets.EvalPreset (another IDCT and antialiasing kernel),
so its results are an approximation (docs/performance.md). For training (train.py --decode gpu), the
workers read the bytes and draw each image's crop box and flip as the CPU path draws them; the GPU decodes,
crops, resizes and flips (GpuTrainLoader).
"""

import contextlib
import functools
import io
import os
import queue
import random
import sys
import threading
from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from dataset import IMAGE_EXTENSIONS, Manifest, Sample, read_manifest
from decoding import IMAGE_ERRORS, decode_jpeg, encode_jpeg, exif_rotated, image_error, load_rgb, read_bytes
from presets import EvalPreset, ReducedDecode, crop_and_flip_plan, crop_resize_flip, transform_of_epoch
from restarts import ignore_stop_signals
from utils import OUT_OF_MEMORY, UserError, available_cores

# ----------------------------------------------------------------------------- datasets


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
            transform = transform_of_epoch(self.transform, epoch or 0)
            # a ReducedDecode loads the image itself, at the size its crop box needs
            image = (
                functools.partial(self.load, index)
                if isinstance(transform, ReducedDecode)
                else self.load(index)
            )
            if epoch is None:
                return transform(image), sample.target, index, ""
            key = augmentation_key(self.seed, epoch, index, copy)
            return seeded_transform(transform, image, key), sample.target, index, ""
        except IMAGE_ERRORS as e:
            return None, sample.target, index, image_error(e)

    def load(self, index: int, draft=None):
        """The image, or for a ReducedDecode transform the function that loads it at the size it asks."""
        return load_rgb(self.samples[index].path, draft)


def augmentation_key(seed: int, epoch: int, index: int, copy: int = 0) -> tuple:
    """What an image's augmentation is seeded by; the first copy keeps the key it had before repeated
    augmentation existed."""
    return (seed, epoch, index, copy) if copy else (seed, epoch, index)


def seeded_transform(transform, image, key: tuple):
    """transform(image) with torch's RNG seeded by `key` (e.g. seed, epoch, index), the global RNG
    untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hash(key) & 0xFFFF_FFFF_FFFF)
        return transform(image)


class SyntheticDataset(ImageDataset):
    """Random 3-channel images (a fixed one per index) for throughput runs without data (--dummy)."""

    def __init__(self, size: int, num_classes: int, transform, seed: int = 0, image_size=(375, 500)):
        super().__init__([Sample(f"synthetic/{i}", i % num_classes) for i in range(size)], transform, seed)
        self.image_size = image_size

    def load(self, index: int, draft=None):  # an image in memory: no reduced decode
        generator = torch.Generator().manual_seed(index)
        pixels = torch.randint(0, 256, (*self.image_size, 3), dtype=torch.uint8, generator=generator)
        return Image.fromarray(pixels.numpy())


# ----------------------------------------------------------------------------- samplers and loaders


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
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        copies = len(self.dataset) * self.repeats
        # position p of the repeated order [a, a, a, b, b, b, ...], padded by wrapping to a multiple of the
        # world size; this rank takes p = rank, rank + world, ... (without building the whole order)
        positions = (
            p % copies for p in range(self.rank, self.num_samples * self.num_replicas, self.num_replicas)
        )
        return [(order[p // self.repeats], self.epoch, p % self.repeats) for p in positions]

    def __iter__(self):
        return iter(self.epoch_items()[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


class EvalSampler(torch.utils.data.Sampler):
    """Rank r of w gets images r, r + w, r + 2w, ...: every image exactly once, no padded duplicates."""

    def __init__(self, size: int, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, size, num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class StepBatchSampler(torch.utils.data.Sampler):
    """Batches of `batch_size` in optimizer steps of `accum_steps` batches, each batch what one of that many
    ranks would take: full batches, and an epoch's last, smaller step split evenly among its batches, as
    DistributedSampler splits an epoch among ranks (34 images: 9, 9, 8, 8, not 16, 16, 2, whose BatchNorm
    statistics would be those of 2 images). drop_last drops that last step whole, as each of that many
    ranks drops its last partial batch."""

    def __init__(self, sampler, batch_size: int, accum_steps: int, drop_last: bool):
        self.sampler, self.batch_size, self.accum_steps = sampler, batch_size, accum_steps
        self.drop_last = drop_last

    def _split(self, count: int) -> tuple[int, list[int]]:
        """(images in full steps, the sizes of the last step's batches)."""
        full = count // (self.batch_size * self.accum_steps) * self.batch_size * self.accum_steps
        rest = count - full
        if not rest or self.drop_last:
            return full, []
        parts = min(self.accum_steps, rest)
        return full, [rest // parts + (i < rest % parts) for i in range(parts)]

    def __iter__(self):
        items = list(self.sampler)  # a resume's sampler starts after whole steps: the steps stay aligned
        full, last = self._split(len(items))
        for start in range(0, full, self.batch_size):
            yield items[start : start + self.batch_size]
        start = full
        for size in last:
            yield items[start : start + size]
            start += size

    def __len__(self) -> int:
        full, last = self._split(len(self.sampler))
        return full // self.batch_size + len(last)


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
    accum_steps: int = 1,
    collate_fn=collate,
) -> torch.utils.data.DataLoader:
    """A DataLoader of (images, targets, indices, errors) batches (see collate); persistent_workers keeps
    the loader processes between epochs (training); accum_steps > 1 batches as StepBatchSampler does. Each
    epoch's iterator draws its workers' base seed from the loader's own generator, not torch's global RNG:
    a run resumed in the middle of an epoch then finds the global RNG (dropout's) where the uninterrupted
    run had it. (Augmentations are seeded per image by ImageDataset, whatever the worker seeds.)"""
    batching = {"batch_size": batch_size, "sampler": sampler, "drop_last": drop_last}
    if accum_steps > 1:
        batching = {"batch_sampler": StepBatchSampler(sampler, batch_size, accum_steps, drop_last)}
    return torch.utils.data.DataLoader(
        dataset,
        **batching,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
        worker_init_fn=ignore_stop_signals,  # SIGTERM/SIGUSR1: the main process saves, then stops them
        persistent_workers=workers > 0 and persistent_workers,
        prefetch_factor=4 if workers > 0 else None,
    )


def default_workers(device) -> int:
    """Loader processes per process. On a GPU the JPEG pipeline is the bottleneck: every core of this
    process's share decodes. On a CPU the model's intra-op threads already use every core, so images
    are decoded in the main process between batches (0): a loader process beside the model competes
    for the same cores (measurements: docs/performance.md)."""
    per_process = max(1, available_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    return min(per_process, 16) if device.type == "cuda" else 0


def eval_loader(
    samples, preset: EvalPreset, batch_size: int, workers: int, device, gpu_decode: bool, sampler=None
):
    """The evaluation loader of image files: exact PIL preprocessing (build_loader), or batched decoding
    on the GPU."""
    if gpu_decode:
        return GpuDecodeLoader(samples, preset, batch_size, workers, device, sampler)
    dataset = ImageDataset(samples, preset)
    return build_loader(dataset, batch_size, workers, sampler=sampler, pin_memory=device.type == "cuda")


# ----------------------------------------------------------------------------- tar shards

CURL = "curl -f -s -S -L --connect-timeout 20 --speed-limit 1 --speed-time 60 --retry 3 --retry-delay 2"
_IMAGE_KEYS = {e.lstrip(".") for e in IMAGE_EXTENSIONS}


def _opened(url: str) -> str:
    """http(s) through curl with time limits (webdataset's own retries go on for minutes when a server is
    silent)."""
    return f"pipe:{CURL} {url!r}" if url.startswith(("http://", "https://")) else url


def _keep_all(urls):
    """webdataset's node and worker splitter: the shards are dealt to ranks and workers here already."""
    return urls


def _images_of(shards: list[tuple[str, int, int]]):
    """(index, image bytes) of every image of these (url, first index, end index) shards, in order.
    A shard that can't be read, or holds other images than the manifest says, ends the run."""
    import webdataset as wds  # here: only tar shards need it, and its import takes ~2 s

    for url, first, end in shards:
        expected = first
        try:
            stream = wds.WebDataset(
                [_opened(url)], shardshuffle=False, nodesplitter=_keep_all, workersplitter=_keep_all
            )
            for sample in stream:
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
                f"shard {url} holds other images than its manifest lists (image {expected} of "
                f"{first}..{end - 1}); write the shards again"
            )


def _decode(data: bytes | None):
    """(PIL image, '') or (None, why not)."""
    if data is None:
        return None, "no image in the shard sample"
    try:
        return load_rgb(io.BytesIO(data)), ""
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad image; name it like ImageDataset
        return None, image_error(e)


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
        # this rank's images
        self.count = sum(max(0, min(starts[i + 1], len(samples)) - starts[i]) for i in mine)

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
        self.seed, self.rank, self.world, self.buffer = seed, rank, world, buffer
        self.epoch = 0  # set by train.py through ShardLoader.sampler.set_epoch
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
            target, key = int(self.samples.targets[index]), augmentation_key(self.seed, self.epoch, index)
            transform = transform_of_epoch(self.transform, self.epoch)
            if isinstance(transform, ReducedDecode) and data is not None:  # it decodes the bytes itself
                try:
                    load = functools.partial(load_rgb, io.BytesIO(data))
                    yield seeded_transform(transform, load, key), target, index, ""
                except IMAGE_ERRORS as e:
                    yield None, target, index, image_error(e)
                continue
            image, error = _decode(data)
            yield (None if image is None else seeded_transform(transform, image, key)), target, index, error


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
        training = isinstance(stream, ShardTrainStream)
        self.dataset = stream
        self.sampler = _Epochs(stream) if training else None
        self.loader = torch.utils.data.DataLoader(
            stream,
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            drop_last=drop_last,
            prefetch_factor=4 if workers > 0 else None,
        )
        if training:
            slots = max(workers, 1)
            self.batches = sum(stream.quota(k, slots) // batch_size for k in range(slots))
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
            "(prepare_data.py make-shards --shard-size smaller)"
        )
    return min(workers, len(manifest.urls) // world)


def shard_eval_loader(
    data, samples, transform, batch_size: int, workers: int, rank: int, world: int, pin: bool, strict=False
) -> ShardLoader:
    """Evaluation batches of rank `rank` of `world`: the images of `samples` (by index), from the val
    shards."""
    manifest = read_manifest(data, "val", imagenet_labels=False, strict=strict)
    stream = ShardEvalStream(manifest, samples, transform, rank, world)
    return ShardLoader(stream, batch_size, min(workers, len(stream.urls)), pin, drop_last=False)


def shard_train_loader(data, transform, cfg, rank: int, world: int, workers: int, pin: bool) -> ShardLoader:
    """Training batches of rank `rank` of `world` from the train shards (cfg: a TrainConfig)."""
    if cfg.ra_sampler:
        raise UserError(
            "repeated augmentation (ra_sampler) deals images by index, which a tar stream can't; "
            "pass --no-ra-sampler to train from shards"
        )
    manifest = read_manifest(data, "train", imagenet_labels=False, strict=True)
    workers = shard_workers(manifest, world, workers)
    if cfg.save_every_steps and rank == 0:
        print(
            "note: from tar shards, a run stopped inside an epoch resumes at that epoch's start "
            "(--save-every-steps)"
        )
    slots = world * max(workers, 1)
    if len(manifest.urls) % slots and rank == 0:
        print(
            f"note: {len(manifest.urls)} shards over {world} processes x {max(workers, 1)} loader workers: "
            "each epoch, slots with a shard less read some images twice and skip as many; write a multiple "
            f"of {slots} shards for epochs that read every image once"
        )
    stream = ShardTrainStream(manifest, transform, cfg.seed, rank, world, cfg.shard_shuffle_buffer)
    loader = ShardLoader(stream, cfg.batch_size, workers, pin, drop_last=True)
    if len(loader) == 0:
        raise UserError(
            f"{len(manifest.samples)} training images give no full batch of {cfg.batch_size} per loader "
            f"worker ({world} processes x {max(workers, 1)} workers); lower --batch-size or --workers"
        )
    return loader


# ----------------------------------------------------------------------------- --decode gpu


def is_jpeg(data: torch.Tensor | bytes) -> bool:
    """A JPEG's first two bytes, in a file's bytes or a uint8 tensor of them."""
    return bytes(data[:2]) == b"\xff\xd8"


def decode_rgb(path: str, data: torch.Tensor | None = None) -> torch.Tensor:
    """(3, H, W) uint8 by decoding.py's libjpeg; PIL for other formats, EXIF-rotated JPEGs (exif_rotated)
    and JPEGs the codec refuses.
    `data`: the file's bytes, when the caller has read them already."""
    data = read_bytes(path) if data is None else data
    if is_jpeg(data) and not exif_rotated(data):
        try:
            return decode_jpeg(data)
        except RuntimeError:
            pass
    return F.pil_to_tensor(load_rgb(path))


def resize_crop(image: torch.Tensor, preset: EvalPreset) -> torch.Tensor:
    """EvalPreset on a (3, H, W) uint8 tensor on any device: pixels within 1 level of PIL's with libjpeg
    decoding (tests/test_eval.py); on a GPU, nvjpeg's IDCT differs a little more."""
    interpolation = InterpolationMode(preset.interpolation)
    image = F.resize(image, [preset.resize], interpolation=interpolation, antialias=preset.antialias)
    return F.center_crop(image, [preset.crop])


def resize_crop_batch(images: list[torch.Tensor], preset: EvalPreset) -> torch.Tensor:
    """resize_crop of each image, stacked: images of one size are resized in one call (most of
    ImageNet's val images share a handful of sizes), which saves a kernel launch per image on a GPU."""
    out = [None] * len(images)
    by_size = {}
    for i, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(i)
    for indices in by_size.values():
        for i, image in zip(indices, resize_crop(torch.stack([images[i] for i in indices]), preset)):
            out[i] = image
    return torch.stack(out)


class TensorImageDataset(ImageDataset):
    """Images decoded by decoding.py's codec (transform e.g. resize_crop), or, with raw_jpeg, JPEGs left as
    file bytes for GpuDecodeLoader to decode in batches (other formats are decoded here)."""

    def __init__(self, samples, transform, raw_jpeg: bool = False):
        super().__init__(samples, transform)
        self.raw_jpeg = raw_jpeg

    def load(self, index: int):
        path = self.samples[index].path
        if not self.raw_jpeg:
            return decode_rgb(path)
        with open(path, "rb") as f:
            data = f.read()
        if is_jpeg(data) and not exif_rotated(data):
            # bytes, which pack_jpegs joins into one tensor a batch: a tensor an image would cross from
            # the worker as a shared-memory file each, which cost more than the GPU's decode (H100)
            return data
        return decode_rgb(path, torch.frombuffer(bytearray(data), dtype=torch.uint8))


def pack_jpegs(items: list) -> dict:
    """GpuDecodeLoader's collate_fn, run in the loader workers: the batch's JPEG bytes joined in one
    uint8 tensor, which crosses to the main process as one shared-memory block: as a list of byte
    strings, every image's bytes went through a pipe and were unpickled and copied by the main
    process, which also runs the decoder and the model.
    items: ImageDataset's (image, target, index, error); image is bytes, a decoded tensor or None."""
    jpegs = [item[0] for item in items if isinstance(item[0], bytes)]
    joined = bytearray().join(jpegs)
    return {
        "jpeg_bytes": torch.frombuffer(joined, dtype=torch.uint8)
        if joined
        else torch.empty(0, dtype=torch.uint8),
        "jpeg_sizes": [len(data) for data in jpegs],
        # in batch order; None where the image is among the JPEG bytes, in the same order
        "items": [
            (None if isinstance(image, bytes) else image, t, i) for image, t, i, error in items if not error
        ],
        "errors": [(index, error) for _, _, index, error in items if error],
    }


class GpuDecodeLoader:
    """Iterates like build_loader's loader (so engine.evaluate runs on it unchanged), but each batch of
    JPEG bytes is decoded in one batched decode_jpeg call on `device` and resized and cropped there.
    A thread decodes the next batches while the model runs on this one (decode_jpeg releases the GIL),
    on a CUDA stream of its own. When the device refuses a batch (e.g. for a CMYK JPEG in it), its
    images are decoded one by one, on the device where it takes them, else on the CPU; an image
    nothing can decode is reported like build_loader reports it."""

    def __init__(self, samples, preset: EvalPreset, batch_size: int, workers: int, device, sampler=None):
        self.dataset = TensorImageDataset(samples, torch.nn.Identity(), raw_jpeg=True)
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=pack_jpegs,  # decode_jpeg copies the bytes to the GPU itself: nothing to pin
            prefetch_factor=4 if workers > 0 else None,
        )
        self.preset, self.device = preset, device

    def __len__(self) -> int:
        return len(self.loader)

    def decode_one(self, index: int, data: torch.Tensor):
        """(image, '') on the device, else on the CPU (libjpeg, then PIL), else (None, why not)."""
        try:
            return decode_jpeg([data], device=self.device)[0], ""
        except RuntimeError as e:
            raise_if_out_of_memory(e)
        try:
            return decode_rgb(self.dataset.samples[index].path), ""
        except (RuntimeError, *IMAGE_ERRORS) as e:
            return None, image_error(e)

    def decode_jpegs(self, batch: dict) -> tuple[list, list]:
        """(the packed batch's JPEGs decoded on the device, None where nothing could; the batch's errors)."""
        sizes, errors = batch["jpeg_sizes"], list(batch["errors"])
        data = list(batch["jpeg_bytes"].split(sizes)) if sizes else []  # views: nothing is copied
        try:
            return (decode_jpeg(data, device=self.device) if data else []), errors
        except RuntimeError as e:
            # an image the device refuses (CMYK, say) fails the batch: the others are decoded one by one
            raise_if_out_of_memory(e)
        jpeg_indices = [index for image, _, index in batch["items"] if image is None]
        decoded = []
        for index, one in zip(jpeg_indices, data):
            image, error = self.decode_one(index, one)
            decoded.append(image)
            errors += [(index, error)] if error else []
        return decoded, errors

    def assemble(self, batch: dict, jpegs: list, errors: list, stack):
        """(stack(images on the device), targets, indices, errors) in the batch's order: `jpegs` in place of
        its JPEGs (None: unreadable, left out), the workers' own images elsewhere."""
        jpegs = iter(jpegs)
        items = [(next(jpegs) if image is None else image, t, i) for image, t, i in batch["items"]]
        items = [item for item in items if item[0] is not None]
        images = [image.to(self.device, non_blocking=True) for image, _, _ in items]
        return (
            stack(images) if images else torch.empty(0, dtype=torch.uint8),
            torch.tensor([target for _, target, _ in items], dtype=torch.long),
            torch.tensor([index for _, _, index in items], dtype=torch.long),
            errors,
        )

    def decode_batch(self, batch: dict):
        """One packed batch as build_loader gives it: (images on the device, targets, indices, errors)."""
        decoded, errors = self.decode_jpegs(batch)
        return self.assemble(batch, decoded, errors, lambda images: resize_crop_batch(images, self.preset))

    def __iter__(self):
        batches = iter(self.loader)  # here, not in the thread: workers are forked from the main thread
        return decoded_ahead(lambda: map(self.decode_batch, batches), self.device)


class GpuTrainDataset(ImageDataset):
    """Training items for GpuTrainLoader, keyed as ImageDataset's: a JPEG's bytes with its
    presets.crop_and_flip_plan (the box and flip the CPU path draws for that key: the same seeded draws)
    and crop size; for another format or an EXIF-rotated JPEG, the CPU path's own output."""

    def __getitem__(self, key):
        index, epoch, copy = key
        sample, transform = self.samples[index], transform_of_epoch(self.transform, epoch)
        key = augmentation_key(self.seed, epoch, index, copy)
        try:
            with open(sample.path, "rb") as f:
                data = f.read()
            if not is_jpeg(data) or exif_rotated(data):
                return seeded_transform(transform, load_rgb(io.BytesIO(data)), key), sample.target, index, ""
            with Image.open(io.BytesIO(data)) as header:  # the size, from the header: nothing is decoded
                width, height = header.size
            plan = seeded_transform(lambda _: crop_and_flip_plan(transform, height, width), None, key)
            return (data, plan, transform.transforms[0].size[0]), sample.target, index, ""
        except IMAGE_ERRORS as e:
            return None, sample.target, index, image_error(e)


def pack_train_jpegs(items: list) -> dict:
    """GpuTrainLoader's collate_fn (in the loader workers): pack_jpegs of the JPEG bytes, with each JPEG's
    plan and crop size in the same order."""
    jpegs = [item[0] for item in items if isinstance(item[0], tuple)]
    packed = pack_jpegs([(image[0] if isinstance(image, tuple) else image, *rest) for image, *rest in items])
    packed["plans"] = [(plan, size) for _, plan, size in jpegs]
    return packed


class GpuTrainLoader(GpuDecodeLoader):
    """train.py --decode gpu: iterates like build_loader's training loader (the same samplers, so resume,
    world sizes and accumulation behave as there), but the workers only read the files and draw each
    image's box and flip; each batch's JPEGs are decoded in one batched call on `device` (nvJPEG), then
    cropped, resized (torchvision's antialiased tensor kernel: within a few levels of PIL's, tests/
    test_decoding.py) and flipped there, on a side stream, ahead of the model. Images the device refuses
    are decoded on the CPU one by one (GpuDecodeLoader.decode_one) and cropped the same way."""

    def __init__(
        self, dataset: GpuTrainDataset, batch_size: int, workers: int, device, interpolation, **loader_options
    ):
        self.dataset, self.device, self.interpolation = dataset, device, interpolation
        # the bytes cross as one shared-memory tensor, which the decoder copies itself: nothing to pin
        self.loader = build_loader(
            dataset, batch_size, workers, **loader_options, collate_fn=pack_train_jpegs
        )

    def __iter__(self):
        if self.loader.num_workers == 0:
            # the dataset draws the boxes from torch's global RNG, seeded per image: in a decode-ahead thread
            # those draws would interleave with the training thread's (dropout, MixUp)
            return map(self.decode_batch, iter(self.loader))
        return super().__iter__()

    @property
    def batch_sampler(self):  # what engine.epoch_sampler sets epochs and resume skips on
        return self.loader.batch_sampler

    @property
    def sampler(self):
        return self.loader.sampler

    def decode_batch(self, batch: dict):
        """(images (B, 3, S, S) uint8 on the device, targets, indices, errors), in the loader's order."""
        decoded, errors = self.decode_jpegs(batch)
        cropped = [
            None if image is None else crop_resize_flip(image.to(self.device), plan, size, self.interpolation)
            for image, (plan, size) in zip(decoded, batch["plans"])
        ]
        return self.assemble(batch, cropped, errors, torch.stack)


def raise_if_out_of_memory(error: RuntimeError) -> None:
    """Raise `error` as the out-of-memory error it may be (for the caller's retry with a smaller batch),
    not as an image the device refuses: torch's own, or CUDA's that the GPU decoder re-raises
    as a plain RuntimeError."""
    if isinstance(error, OUT_OF_MEMORY):
        raise error
    if "out of memory" in str(error):
        raise OUT_OF_MEMORY[0](str(error)) from error


@functools.cache
def side_stream(index: int):
    """One stream per GPU for decoding ahead: memory the allocator caches for a stream serves only that
    stream, so a stream per pass would hold a cache per pass."""
    return torch.cuda.Stream(index)


def decoded_ahead(produce, device, depth: int = 2):
    """Iterates produce() (batches whose first item is a tensor on `device`) in a thread, up to `depth`
    batches ahead of the caller, on a CUDA stream of its own: each batch is handed over after its
    stream's work, and kept from the allocator until the caller's stream is done with it. The
    thread's errors are raised here; leaving the loop early stops the thread."""
    results, stop = queue.Queue(depth), threading.Event()
    cuda = device.type == "cuda"
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None

    def hand_over(item) -> bool:
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            if cuda:
                torch.cuda.set_device(index)  # the current device is per thread
            side = side_stream(index) if cuda else None
            with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                for batch in produce():
                    event = torch.cuda.Event() if cuda else None
                    if event is not None:
                        event.record(side)
                    if not hand_over((batch, event, None)):
                        return
                    if event is not None:
                        # nvjpeg writes on a stream of its own into memory allocated on this one: the next
                        # batch's decode may reuse blocks this batch's queued resize still reads
                        event.synchronize()
        except BaseException as e:  # noqa: BLE001 - every error reaches the caller, re-raised there
            hand_over((None, None, e))
            return
        hand_over((None, None, None))

    thread = threading.Thread(target=work, name="decode-ahead", daemon=True)
    thread.start()
    try:
        while True:
            batch, event, error = results.get()
            if error is not None:
                try:
                    raise error
                finally:
                    # this frame is in the error's traceback: no cycle that keeps its tensors alive (an
                    # out-of-memory retry needs their GPU memory back)
                    error = None
            if batch is None:
                return
            if event is not None:
                stream = torch.cuda.current_stream(index)
                stream.wait_event(event)
                if batch[0].is_cuda:  # not the empty CPU tensor of a batch whose every image failed
                    batch[0].record_stream(stream)
            yield batch
    finally:
        stop.set()
        thread.join()


def gpu_decode_error(device) -> str:
    """'' when batched decode_jpeg works on `device`, else why not. Tried on a JPEG made here: a user's
    file that nvjpeg refuses (CMYK, say) is decoded on the CPU alone and must not turn the GPU off."""
    if device.type != "cuda":
        return f"decoding on the GPU needs a CUDA device, not {device.type}"
    try:
        decode_jpeg([encode_jpeg(torch.zeros(3, 16, 16, dtype=torch.uint8))], device=device)
        return ""
    except (RuntimeError, TypeError) as e:
        return f"decode_jpeg on {device} failed: {str(e).splitlines()[0][:120]}"


def use_gpu_decode(decode: str, device, note_to=sys.stderr) -> bool:
    """Whether --decode `decode` ("cpu" or "gpu") decodes on the GPU here; where it can't, a note says
    why and the exact CPU path is used."""
    why_not = gpu_decode_error(device) if decode == "gpu" else ""
    if why_not and note_to is not None:
        print(f"note: --decode gpu is not possible here ({why_not}); decoding on the CPU", file=note_to)
    return decode == "gpu" and not why_not
