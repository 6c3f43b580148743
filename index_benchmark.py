"""What indexing a large folder costs: `python benchmark.py --parts index --files 1281167` generates a
tree of that many zero-byte .JPEG files in 1000 wnid folders (ImageNet-1k train's shape; the index
never opens a file), then times, in turn, our index without its cache and with it, torchvision's
ImageFolder, and a bare two-level os.scandir walk; and measures the memory: bytes per image beside the
path bytes, and what 4 loader workers add over one pass that reads every sample, for our index and
for a Python list of Sample objects (what the index was before).
"""

import os
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import torch
from torchvision.datasets import ImageFolder

import index
from dataset import find_samples, imagenet_wnids
from index import Sample
from utils import timed

LOADER_WORKERS = 4


def make_tree(root: Path, files: int, classes: int = 1000) -> None:
    for c, wnid in enumerate(imagenet_wnids()[:classes]):
        folder = root / wnid
        folder.mkdir(parents=True)
        for i in range(c, files, classes):
            os.close(os.open(folder / f"{wnid}_{i}.JPEG", os.O_CREAT | os.O_WRONLY, 0o644))


def bare_scandir(root: Path) -> int:
    with os.scandir(root) as classes:
        return sum(sum(1 for _ in os.scandir(c.path)) for c in classes if c.is_dir())


def memory_kb() -> tuple[int, int]:
    """(resident, private) kB of this process: private pages are the ones it does not share."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":")
        fields[name] = int(value.split()[0])
    return fields["Rss"], fields["Private_Clean"] + fields["Private_Dirty"]


class TouchEverySample(torch.utils.data.Dataset):
    """Items are batches of indices; each item reads every sample's path and target (as a loader
    worker does) and returns this process's pid and its memory before and now."""

    def __init__(self, samples):
        self.samples, self.start = samples, None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, indices):
        self.start = self.start or memory_kb()
        touched = sum(len(self.samples[i].path) + self.samples[i].target for i in indices)
        return os.getpid(), self.start, memory_kb(), touched


def worker_growth_mb(samples) -> tuple[float, float]:
    """The largest (resident, private) MB that one of 4 loader workers gains over one pass in shuffled
    order. Resident memory counts the pages a worker shares with the main process from the start (fork
    maps them all); private memory grows by the pages it copies: the cost the compact index avoids."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()  # as training reads
    batches = torch.utils.data.BatchSampler(order, 4096, drop_last=False)
    loader = torch.utils.data.DataLoader(
        TouchEverySample(samples), batch_size=None, sampler=batches, num_workers=LOADER_WORKERS
    )
    first, last = {}, {}
    for pid, start, now, _ in loader:
        first.setdefault(pid, start)
        last[pid] = now
    growth = [(last[p][0] - first[p][0], last[p][1] - first[p][1]) for p in last]
    return max(g[0] for g in growth) / 1024, max(g[1] for g in growth) / 1024


def bench_index(args) -> list[dict]:
    files = args.files
    tmp = Path(tempfile.mkdtemp(prefix="index_tree_"))
    cache_setting = os.environ.get(index.CACHE_ENV)
    try:
        tree = tmp / "train"
        started = time.perf_counter()
        make_tree(tree, files)
        print(f"generated {files} zero-byte files in 1000 folders in {time.perf_counter() - started:.1f} s")
        past = time.time() - 60  # older than index.FRESH_SECONDS, so the walk may be cached
        for folder in [tree, *(p for p in tree.iterdir())]:
            os.utime(folder, (past, past))

        def ours(cache: str):
            def run():
                os.environ[index.CACHE_ENV] = cache
                return find_samples(tree, "train", imagenet_labels=False)

            return run

        cache = str(tmp / "cache")
        ours(cache)()  # writes the cache
        runs = {
            "ours, no cache": (ours("off"), files),
            "ours, cached": (ours(cache), files),
            "torchvision ImageFolder": (lambda: ImageFolder(str(tree), loader=lambda p: p), files),
            "bare os.scandir, 2 levels, unsorted": (lambda: bare_scandir(tree), files),
        }
        times = timed(runs, args.repeats, torch.device("cpu"))
        rows = [{"part": "index", "variant": name, **t} for name, t in times.items()]
        base = times["torchvision ImageFolder"]["img_per_s"]
        for row in rows[:2]:
            row.update(baseline="torchvision ImageFolder", ratio=row["img_per_s"] / base)

        os.environ[index.CACHE_ENV] = cache
        samples, _ = find_samples(tree, "train", imagenet_labels=False)
        beside_paths = (samples.offsets.nbytes + samples.targets.nbytes) / files
        tracemalloc.start()
        objects = [Sample(s.path, s.target) for s in samples]
        object_bytes = tracemalloc.get_traced_memory()[0] / files
        tracemalloc.stop()
        ours_rss, ours_private = worker_growth_mb(samples)
        list_rss, list_private = worker_growth_mb(objects)
        rows.append(
            {
                "part": "index_memory",
                "files": files,
                "workers": LOADER_WORKERS,
                "path_bytes_per_image": samples.blob.nbytes / files,
                "bytes_per_image_beside_paths": beside_paths,
                "list_of_samples_bytes_per_image": object_bytes,
                "worker_growth_mb": {"ours": [ours_rss, ours_private], "list": [list_rss, list_private]},
            }
        )
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if cache_setting is None:
            os.environ.pop(index.CACHE_ENV, None)
        else:
            os.environ[index.CACHE_ENV] = cache_setting
