"""The image index (dataset.py): compact samples that behave like a list, the cache (reused, invalidated
when a folder changes, skipped for folders changed seconds ago), one walker per node under torchrun."""

import os
import time
from pathlib import Path

import numpy as np
import pytest

import dataset
from conftest import ROOT, run_script
from dataset import find_samples

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def make_tree(root, classes=("a", "b", "c"), per_class=4, age_s=60):
    """root/<class>/<i>.jpg zero-byte files (the index never opens them), folders `age_s` seconds old."""
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"{i}.jpg").write_bytes(b"")
    age(root, age_s)
    return root


def age(root, seconds=60):
    past = time.time() - seconds
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        os.utime(folder, (past, past))


def listing(samples):
    return [(s.path, s.target) for s in samples]


def test_samples_hold_paths_compactly_and_behave_like_a_list():
    paths = ["a/0.jpg", "a/1.jpg", os.fsdecode(b"b/caf\xe9.jpg"), "b/\u00e9t\u00e9.JPEG"]  # not UTF-8; UTF-8
    samples = dataset.Samples.from_paths("/data", paths, [0, 0, 1, 1])
    expected = [(os.path.join("/data", p), t) for p, t in zip(paths, [0, 0, 1, 1])]
    assert len(samples) == 4 and listing(samples) == expected
    assert os.fsencode(samples[2].path) == b"/data/b/caf\xe9.jpg"  # the file's own bytes, back unchanged
    assert (samples[-1].path, samples[-1].target) == expected[-1]
    assert listing(samples[1:3]) == expected[1:3] and listing(samples[::2]) == expected[::2]
    assert listing(samples.take(np.array([3, 0]))) == [expected[3], expected[0]]
    assert len(samples[4:]) == 0
    with pytest.raises(IndexError):
        samples[4]
    beside_paths = samples.offsets.nbytes + samples.targets.nbytes
    assert beside_paths / len(samples) <= 12 + 8 / len(samples)  # int64 offsets + int32 targets
    assert samples.blob.nbytes == sum(len(os.fsencode(p)) for p in paths)


def test_the_cache_is_reused_and_invalidated_when_a_class_folder_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGENET_INDEX_CACHE", str(tmp_path / "cache"))
    tree = make_tree(tmp_path / "train")
    first, classes = find_samples(tree, "train", imagenet_labels=False)
    assert len(first) == 12 and classes == ["a", "b", "c"]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    walks = []
    real_scan = dataset.scan
    monkeypatch.setattr(dataset, "scan", lambda *a: walks.append(a) or real_scan(*a))
    assert listing(find_samples(tree, "train", imagenet_labels=False)[0]) == listing(first)
    assert walks == []  # read from the cache

    (tree / "b" / "new.jpg").write_bytes(b"")  # b's modification time changes
    again = find_samples(tree, "train", imagenet_labels=False)[0]
    assert len(walks) == 3 and str(tree / "b" / "new.jpg") in [s.path for s in again]
    # b changed seconds ago: not cached yet (a same-second change could hide on coarse timestamps)
    find_samples(tree, "train", imagenet_labels=False)
    assert len(walks) == 6
    age(tree)
    find_samples(tree, "train", imagenet_labels=False)  # walks and caches
    find_samples(tree, "train", imagenet_labels=False)
    assert len(walks) == 9

    (tree / "c" / "deeper").mkdir()
    age(tree)
    find_samples(tree, "train", imagenet_labels=False)
    (tree / "c" / "deeper" / "x.png").write_bytes(b"")  # a change inside a nested folder
    assert len(find_samples(tree, "train", imagenet_labels=False)[0]) == 14 and len(walks) == 15

    (tree / "a").rename(tree / "z")  # a class renamed: another class list
    age(tree)
    renamed, classes = find_samples(tree, "train", imagenet_labels=False)
    assert classes == ["b", "c", "z"] and len(renamed) == 14


def test_a_damaged_cache_entry_is_walked_again(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGENET_INDEX_CACHE", str(tmp_path / "cache"))
    tree = make_tree(tmp_path / "train")
    first = listing(find_samples(tree, "train", imagenet_labels=False)[0])
    (entry,) = (tmp_path / "cache").glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:100])  # cut short (a full disk, a killed writer)
    assert listing(find_samples(tree, "train", imagenet_labels=False)[0]) == first


def test_old_cache_entries_are_evicted(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGENET_INDEX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dataset, "KEEP_ENTRIES", 2)
    for i in range(4):
        find_samples(make_tree(tmp_path / f"t{i}"), "train", imagenet_labels=False)
        time.sleep(0.01)  # distinct modification times
    kept = {p.name for p in (tmp_path / "cache").glob("*.npz")}
    # the newest
    assert kept == {dataset.cache_file(Path(os.path.abspath(tmp_path / f"t{i}"))).name for i in (2, 3)}


def test_nested_folders_are_ordered_as_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("IMAGENET_INDEX_CACHE", "off")
    for sub in ("x", "x-y"):  # as strings 'a/x-y/0.jpg' < 'a/x/0.jpg'; as paths a/x comes first
        (tmp_path / "val" / "a" / sub).mkdir(parents=True)
        (tmp_path / "val" / "a" / sub / "0.jpg").write_bytes(b"")
    samples, _ = find_samples(tmp_path / "val", imagenet_labels=False)
    assert [os.path.relpath(s.path, tmp_path / "val") for s in samples] == ["a/x/0.jpg", "a/x-y/0.jpg"]


def test_no_cache_when_turned_off_or_unwritable(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "val")
    monkeypatch.setenv("IMAGENET_INDEX_CACHE", "off")
    assert len(find_samples(tree, "val", imagenet_labels=False)[0]) == 12
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("IMAGENET_INDEX_CACHE", str(blocker / "cache"))  # can't be created: no error, no cache
    assert len(find_samples(tree, "val", imagenet_labels=False)[0]) == 12


@pytest.mark.slow
def test_one_process_per_node_walks_under_torchrun(tmp_path):
    tree = make_tree(tmp_path / "train", per_class=5)
    script = tmp_path / "count_walks.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "import os, dataset, utils\n"
        "from dataset import find_samples\n"
        "utils.setup_distributed('cpu')\n"
        "walks, real = [], dataset.scan\n"
        "dataset.scan = lambda *a: walks.append(a) or real(*a)\n"
        f"samples, _ = find_samples({str(tree)!r}, 'train', imagenet_labels=False)\n"
        f"out = os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK'])\n"
        "open(out, 'w').write(f'{len(walks)} {len(samples)}')\n"
        "utils.cleanup_distributed()\n"
    )
    (tmp_path / "a_file").write_text("")
    for cache, walks in (
        (tmp_path / "cache", ["3 15", "0 15"]),
        (tmp_path / "a_file" / "cache", ["3 15", "3 15"]),
    ):
        result = run_script(*TORCHRUN, script, env={"IMAGENET_INDEX_CACHE": str(cache)})
        assert result.returncode == 0, result.stderr[-3000:]
        assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == walks  # unwritable: rank 0 walks once
