"""The image index of a class-folder tree: which image files each class folder holds.

Found by one os.scandir walk (no stat per file, as torchvision's ImageFolder), held compactly (one
bytes buffer of paths and two numpy arrays instead of a Python object per image: 12 bytes per image
beside the path bytes, and loader workers share those pages instead of copying them as they touch
reference counts), and cached, so a restart and every rank of a job read it in a fraction of a second:

    $IMAGENET_INDEX_CACHE/<hash of the folder>.npz   (default ~/.cache/imagenet-index; 'off': no cache)

A cache entry is used while every folder it lists (the class folders and any folders inside them)
keeps its modification time: adding, removing or renaming an image changes its folder's. Entries are
written atomically, and not for folders changed in the last few seconds (a file system with
one-second timestamps could hide a change made in the same second). Under torchrun the first process
of each node walks and writes; the others wait for it and read.
"""

import contextlib
import hashlib
import json
import operator
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utils import UserError, atomic_write, barrier, is_distributed, local_rank

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_ENV = "IMAGENET_INDEX_CACHE"
FRESH_SECONDS = 3  # folders changed this recently are not cached (coarse timestamps, see above)
CACHE_VERSION = 1
KEEP_ENTRIES = 16  # cached folders kept, most recently used first


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
        return cls(root, *encode_paths(paths), np.asarray(targets, dtype=np.int32))

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


def scan(folder: str, prefix_len: int = 0) -> tuple[list[str], list[tuple[str, int]]]:
    """(image files below `folder`, sorted as paths and without their first `prefix_len` characters;
    `folder` and the folders below it, each with the modification time the walk found). Symlinks to
    files count, as prepare-val makes them; symlinked folders don't. Directory entries tell files from
    folders without a stat per file on most file systems, which matters on millions of images and on
    network file systems."""
    found, pending, folders = [], [folder], []
    while pending:
        current = pending.pop()
        folders.append((current, os.stat(current).st_mtime_ns))  # before listing: a change during the walk shows
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
    except Exception:  # noqa: BLE001 - truncated, unreadable or from another version: walk again
        return None


def _walk(folder: str, class_dirs: list[str]):
    started = time.time_ns()
    scanned = [scan(os.path.join(folder, d), len(folder) + 1) for d in class_dirs]
    counts = np.array([len(found) for found, _ in scanned], dtype=np.int64)
    blob, offsets = encode_paths([p for found, _ in scanned for p in found])
    return blob, offsets, counts, [f for _, folders in scanned for f in folders], started


def _write_cache(path: Path, folder: str, class_dirs: list[str], walked) -> None:
    blob, offsets, counts, folders, started = walked
    mtimes = [mtime for _, mtime in folders]
    if max(mtimes, default=0) > started - FRESH_SECONDS * 10**9:
        return  # changed just before we walked it: don't vouch for it
    key = {"version": CACHE_VERSION, "folder": folder, "classes": class_dirs, "mtimes": mtimes}
    key["folders"] = [os.path.relpath(f, folder) for f, _ in folders]
    with contextlib.suppress(UserError, OSError):  # a cache that can't be written (read-only home) costs only time
        atomic_write(path, lambda f: np.savez(f, blob=blob, offsets=offsets, counts=counts, key=json.dumps(key)), "wb")
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
            return walked[:3]
    found = _read_cache(path, folder, class_dirs)
    if found is not None:
        return found
    walked = _walk(folder, class_dirs)
    if path is not None:
        _write_cache(path, folder, class_dirs, walked)
    return walked[:3]
