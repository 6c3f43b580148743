"""WebDataset tar shards (loader.py): `prepare_data.py make-shards` writes what the folder holds; evaluation
from shards equals the folder's image by image in 1 and 2 processes; training streams them and
resumes exactly at epoch boundaries; clear errors."""

import functools
import http.server
import io
import json
import os
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from torchvision import models

from coder import imagenet_wnids
from conftest import (
    assert_user_error,
    make_image,
    read_csv,
    run_main,
    run_script,
    save_torchvision_checkpoint,
)
from dataset import find_samples
from test_train import TINY, make_colour_dataset

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory):
    """val/<wnid>/: 25 images of 5 ImageNet classes, JPEGs of several sizes and one PNG."""
    root = tmp_path_factory.mktemp("shard_data")
    wnids = imagenet_wnids()
    for i in range(25):
        suffix = "png" if i == 7 else "JPEG"
        make_image(
            root / "val" / wnids[(3, 58, 238, 381, 999)[i % 5]] / f"{i:02d}.{suffix}",
            (48 + i % 4 * 8, 40),
            fmt="PNG" if suffix == "png" else "JPEG",
            seed=i,
        )
    return root / "val"


def write_shards(src, dst, shard_size: int):
    """prepare_data.py make-shards SRC DST --shard-size N (in this process: the make-shards tests run it as
    a process)."""
    result = run_main("prepare_data.py", "make-shards", src, dst, "--shard-size", str(shard_size))
    assert result.returncode == 0, result.stderr
    return result


def test_make_shards_writes_every_image_with_its_labels(val_folder, tmp_path):
    result = run_script(
        "prepare_data.py", "make-shards", val_folder, tmp_path / "shards", "--shard-size", "10"
    )
    assert result.returncode == 0, result.stderr
    names = sorted(os.listdir(tmp_path / "shards"))
    assert names == ["val-000000.tar", "val-000001.tar", "val-000002.tar", "val.index.npz"]
    samples, _ = find_samples(val_folder)
    with tarfile.open(tmp_path / "shards" / "val-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    first = samples[0]
    assert members["00000000.jpg"] == Path(first.path).read_bytes()
    assert members["00000000.cls"] == str(first.target).encode()
    assert members["00000000.class"] == os.path.basename(os.path.dirname(first.path)).encode()
    assert members["00000000.path"] == os.path.relpath(first.path, val_folder).encode()
    # the manifest, as --data reads it
    shard_samples, classes = find_samples(tmp_path / "shards", shards_ok=True)
    assert [(os.path.join(val_folder, s.path), s.target) for s in shard_samples] == [
        (s.path, s.target) for s in samples
    ]
    assert len(classes) == 1000
    again = run_script(
        "prepare_data.py", "make-shards", val_folder, tmp_path / "shards", "--shard-size", "10"
    )
    assert_user_error(again, "already holds val shards")  # nothing is overwritten


def rows_by_relative_path(out, folder=None) -> list[tuple]:
    record = json.loads((out / "eval.json").read_text())[0]
    rows = read_csv(out / record["predictions"])
    return record, [
        (os.path.relpath(r["path"], folder) if folder else r["path"], r["target"], r["top5"], r["prob1"])
        for r in rows
    ]


@pytest.mark.slow
def test_shards_evaluate_to_the_folders_predictions_in_one_and_two_processes(
    val_folder, tmp_path, torch_home
):
    write_shards(val_folder, tmp_path / "s", 4)
    save_torchvision_checkpoint(torch_home, "resnet18", models.ResNet18_Weights.IMAGENET1K_V1)
    env = {"TORCH_HOME": str(torch_home)}
    options = "--models resnet18 --resize 64 --crop 56 --batch-size 4".split()
    pattern = str(tmp_path / "s" / "val-{000000..000006}.tar")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "s"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # shards from a URL, through curl
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    env.update(NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    runs = {
        "folder": ["test_torchvision.py", "--data", val_folder, *options, "--workers", "0"],
        "pattern": ["test_torchvision.py", "--data", pattern, *options, "--workers", "2"],
        "two": [*TORCHRUN, "test_torchvision.py", "--data", tmp_path / "s", *options, "--workers", "2"],
        "url": [
            "test_torchvision.py",
            "--data",
            url + "/val-{000000..000006}.tar",
            *options,
            "--workers",
            "1",
        ],
    }
    try:
        for name, args in runs.items():  # the two processes of torchrun, the others in this process
            run = run_script if name == "two" else run_main
            result = run(*args, "--output", tmp_path / name, env=env)
            assert result.returncode == 0, result.stderr[-3000:]
    finally:
        server.shutdown()
    folder, expected = rows_by_relative_path(tmp_path / "folder", val_folder)
    assert folder["n_images"] == 25 and len(expected) == 25
    for name in ("pattern", "two", "url"):
        record, rows = rows_by_relative_path(tmp_path / name)
        assert rows == expected, name
        assert record["dataset"] == folder["dataset"]  # the source folder's name, kept in the manifest
        assert (record["n_images"], record["acc1"], record["acc5"]) == (25, folder["acc1"], folder["acc5"])
    limited = run_main(*runs["pattern"], "--limit", "9", "--output", tmp_path / "limit", env=env)
    assert limited.returncode == 0, limited.stderr[-3000:]
    assert rows_by_relative_path(tmp_path / "limit")[1] == expected[:9]
    # one shard for two processes: rank 1 has nothing to read; --limit under torchrun
    write_shards(val_folder, tmp_path / "one", 100)
    one = [*TORCHRUN, "test_torchvision.py", "--data", tmp_path / "one", *options, "--limit", "5"]
    one = run_script(*one, "--workers", "2", "--output", tmp_path / "o", env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    record, rows = rows_by_relative_path(tmp_path / "o")
    assert rows == expected[:5] and record["n_images"] == 5


@pytest.mark.slow
def test_training_on_shards_resumes_exactly_at_epoch_boundaries(tmp_path):
    data = make_colour_dataset(tmp_path / "data")
    write_shards(data, tmp_path / "s", 5)
    args = ["train.py", "--data", tmp_path / "s", *TINY[:-2], "--workers", "2", "--batch-size", "4"]
    args += ["--lr", "0.01", "--shard-shuffle-buffer", "6", "--output", tmp_path / "runs"]
    # the uninterrupted run and the first half in this process, the resume as a user runs it
    straight = run_main(*args, "--epochs", "2", "--run-name", "straight")
    first = run_main(*args, "--epochs", "1", "--run-name", "split")
    resumed = run_script(*args, "--epochs", "2", "--run-name", "split", "--resume", "auto")
    for result in (straight, first, resumed):
        assert result.returncode == 0, result.stderr[-3000:]
    assert "48 train / 18 val images" in straight.stdout
    a, b = (read_csv(tmp_path / "runs" / r / "metrics.csv") for r in ("straight", "split"))
    assert [(r["train_loss"], r["val_loss"]) for r in a] == [(r["train_loss"], r["val_loss"]) for r in b]
    weights = [
        torch.load(tmp_path / "runs" / r / "last.pt", weights_only=True)["model"]
        for r in ("straight", "split")
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    two = run_script(*TORCHRUN, *args, "--epochs", "1", "--run-name", "two")  # ranks take equal batch counts
    assert two.returncode == 0 and "process group gloo" in two.stdout, two.stderr[-3000:]
    assert "note: 10 shards over 2 processes x 2 loader workers" in two.stdout  # 10 is no multiple of 4
    val_pattern = str(tmp_path / "s" / "val-{000000..000003}.tar")  # names the folder; train.py takes train/
    from_val = run_main("train.py", "--data", val_pattern, *args[3:], "--epochs", "1", "--run-name", "v")
    assert from_val.returncode == 0 and "48 train / 18 val images" in from_val.stdout, from_val.stderr[-3000:]


def test_shard_errors_end_in_one_line(tmp_path):
    missing = run_script("test_torchvision.py", "--data", str(tmp_path / "val-{000000..000001}.tar"))
    assert_user_error(missing, "val.index.npz", "make-shards")
    data = make_colour_dataset(tmp_path / "data", per_class=(2, 1))
    write_shards(data, tmp_path / "s", 100)
    too_few = run_main("train.py", "--data", tmp_path / "s", *TINY, "--batch-size", "8", "--output", tmp_path)
    assert_user_error(too_few, "no full batch")
    repeated = run_main("train.py", "--data", tmp_path / "s", *TINY, "--ra-sampler", "--output", tmp_path)
    assert_user_error(repeated, "--no-ra-sampler")
    files_only = run_main(
        "prepare_data.py", "preview", "--config", "configs/torchvision_v2.yaml", "--data", tmp_path / "s"
    )
    assert_user_error(files_only, "is tar shards", "image folder")
    labels = run_main(
        "test_torchvision.py", "--data", tmp_path / "s", "--val-labels", "x.csv", "--models", "resnet18"
    )
    assert_user_error(labels, "--val-labels does not apply")
    (tmp_path / "s" / "val.index.npz").write_bytes(b"PK\x03\x04 cut short")  # a half-downloaded manifest
    assert_user_error(
        run_main("test_torchvision.py", "--data", tmp_path / "s"), "cannot read the shard manifest"
    )


def test_make_shards_keeps_class_and_file_names_that_are_not_utf8(tmp_path):
    data = make_colour_dataset(tmp_path / "data", per_class=(2, 1))
    odd = os.fsdecode(b"caf\xe9")
    for split in ("train", "val"):
        (data / split / "red").rename(data / split / odd)
        (data / split / odd / "0.png").rename(data / split / odd / os.fsdecode(b"\xff.png"))
    result = run_script("prepare_data.py", "make-shards", data, tmp_path / "s", "--shard-size", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    shard_samples, classes = find_samples(tmp_path / "s", "val", imagenet_labels=False, shards_ok=True)
    folder_samples, folder_classes = find_samples(data, "val", imagenet_labels=False)
    assert classes == folder_classes and odd in classes
    assert [(os.path.join(data, "val", s.path), s.target) for s in shard_samples] == [
        (s.path, s.target) for s in folder_samples
    ]


def test_damaged_or_mismatched_shards_end_in_one_line(val_folder, tmp_path, torch_home):
    write_shards(val_folder, tmp_path / "s", 10)
    save_torchvision_checkpoint(torch_home, "resnet18", models.ResNet18_Weights.IMAGENET1K_V1)
    args = ["test_torchvision.py", "--models", "resnet18", "--resize", "64", "--crop", "56", "--workers", "1"]
    env = {"TORCH_HOME": str(torch_home)}
    shard = tmp_path / "s" / "val-000002.tar"
    good = shard.read_bytes()
    # another shard's images under its name
    shard.write_bytes((tmp_path / "s" / "val-000001.tar").read_bytes())
    assert_user_error(
        run_script(*args, "--data", tmp_path / "s", env=env), "val-000002.tar", "write the shards again"
    )
    shard.write_bytes(good[: len(good) // 2])  # cut short
    assert_user_error(
        run_main(*args, "--data", tmp_path / "s", env=env), "cannot read shard", "val-000002.tar"
    )
    shard.unlink()
    assert_user_error(run_main(*args, "--data", tmp_path / "s", env=env), "val-000002.tar is missing")
    partial = run_main(*args, "--data", str(tmp_path / "s" / "val-{000000..000001}.tar"), env=env)
    assert_user_error(partial, "val-{000000..000002}.tar", "pass the folder")
    assert_user_error(run_main(*args, "--data", str(tmp_path / "s" / "*.tar")), "globs are not expanded")


def test_make_shards_names_a_split_folder_by_its_name_and_refuses_to_write_inside_it(tmp_path):
    data = make_colour_dataset(tmp_path / "data", per_class=(2, 1))
    assert run_script("prepare_data.py", "make-shards", data / "train", tmp_path / "s").returncode == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["train-000000.tar", "train.index.npz"]
    inside = run_script("prepare_data.py", "make-shards", data, data / "shards")
    assert_user_error(inside, "is inside")


def train_stream(tmp_path, buffer):
    """A training stream over 8 shards of 6 images (equal worker shares: nothing is read twice)."""
    from dataset import read_manifest
    from loader import ShardTrainStream
    from prepare_data import make_shards

    if not (tmp_path / "s").exists():
        make_shards(make_colour_dataset(tmp_path / "data", per_class=(16, 1)), tmp_path / "s", 6)
    manifest = read_manifest(tmp_path / "s", "train", imagenet_labels=False, strict=True)
    return ShardTrainStream(manifest, lambda image: 0, seed=0, rank=0, world=1, buffer=buffer)


def test_the_training_stream_is_shuffled_by_epoch_and_by_worker(tmp_path, monkeypatch):
    import loader

    stream = train_stream(tmp_path, buffer=1)  # a buffer of 1 yields the shards in their dealt order
    first = [index for _, _, index, _ in stream]
    assert sorted(first) == list(range(48))  # one epoch, one worker: every image once
    stream.epoch = 1
    assert [index for _, _, index, _ in stream] != first
    orders = []
    for worker in (0, 1):
        monkeypatch.setattr(loader, "_worker", lambda w=worker: (w, 2))
        read = [index for _, _, index, _ in train_stream(tmp_path, buffer=1)]
        shuffled = [index for _, _, index, _ in train_stream(tmp_path, buffer=100)]
        assert sorted(read) == sorted(shuffled) and len(read) == 24
        orders.append([read.index(i) for i in shuffled])
    assert orders[0] != orders[1]  # each worker's buffer draws its own order


def test_worker_quotas_share_the_remainder():
    import numpy as np

    from dataset import Manifest, Samples
    from loader import ShardTrainStream

    samples = Samples.from_paths("", [f"{i}.jpg" for i in range(10)], [0] * 10)
    stream = ShardTrainStream(Manifest(["x.tar"], np.array([0, 10]), samples, ["a"], "x"), None, 0, 0, 1, 1)
    assert [stream.quota(w, 4) for w in range(4)] == [3, 3, 2, 2]


def test_pre_resized_shards_shrink_only_large_images_and_keep_val_unless_asked(tmp_path):
    """make-shards --max-size 128 --quality 90: images longer than 128 px come back from the shards shrunk
    to 128 (aspect kept) as JPEG, close to PIL's own resize of the original; smaller ones byte for byte;
    the manifest records it. A val split is refused unless --resize-val, whose rows name another dataset."""
    import numpy as np
    from PIL import Image

    from dataset import dataset_name
    from loader import _images_of, load_rgb

    root = tmp_path / "data"
    big = make_image(root / "train" / "a" / "big.JPEG", (300, 200), seed=1)
    small = make_image(root / "train" / "a" / "small.JPEG", (100, 60), seed=2)
    make_image(root / "train" / "b" / "gray.JPEG", (90, 400), "L", seed=3)
    make_image(root / "train" / "b" / "wide.png", (260, 100), fmt="PNG", seed=4)
    result = run_main("prepare_data.py", "make-shards", root, tmp_path / "shards", "--max-size", "128")
    assert result.returncode == 0, result.stderr
    assert "3 of 4 images were longer than 128 px" in result.stdout
    with np.load(tmp_path / "shards" / "train.index.npz") as manifest:
        assert int(manifest["max_size"]) == 128 and int(manifest["quality"]) == 90
    with tarfile.open(tmp_path / "shards" / "train-000000.tar") as tar:
        names = sorted(m.name for m in tar.getmembers() if not m.name.endswith(("cls", "class", "path")))
    assert names == ["00000000.jpg", "00000001.jpg", "00000002.jpg", "00000003.jpg"]  # the PNG became a JPEG
    stored = dict(_images_of([(str(tmp_path / "shards" / "train-000000.tar"), 0, 4)]))
    sizes = [Image.open(io.BytesIO(stored[i])).size for i in range(4)]
    assert sizes == [(128, 85), (100, 60), (29, 128), (128, 49)]
    assert stored[1] == small.read_bytes()
    reference = load_rgb(big).resize((128, 85), Image.Resampling.LANCZOS)
    difference = np.abs(np.asarray(load_rgb(io.BytesIO(stored[0])), float) - np.asarray(reference, float))
    assert difference.mean() < 2  # JPEG quality 90 on top of the resize

    make_image(root / "val" / "a" / "v.JPEG", (300, 200), seed=5)
    refused = run_main("prepare_data.py", "make-shards", root, tmp_path / "both", "--max-size", "128")
    assert_user_error(refused, "published evaluation protocol", "--resize-val")
    assert not (tmp_path / "both").exists() or not list((tmp_path / "both").iterdir())
    for quality in ("0", "101"):
        options = ["--max-size", "9", "--quality", quality]
        bad = run_main("prepare_data.py", "make-shards", root / "train", tmp_path / "q", *options)
        assert_user_error(bad, "quality", quality)
    asked = run_main(
        "prepare_data.py", "make-shards", root, tmp_path / "both", "--max-size", "128", "--resize-val"
    )
    assert asked.returncode == 0, asked.stderr
    assert dataset_name(tmp_path / "both") == "data-max128q90"
