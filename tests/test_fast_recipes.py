"""Recipes one GPU can finish (FFCV's): progressive resizing follows its ramp in every train path and
across a resume, the triangular lr schedule is set at every optimizer step as FFCV sets it, flip
test-time augmentation equals a hand-written loop and keeps rows of its own, and a shortened FFCV config
learns with its ramp in metrics.csv."""

import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from torchvision import models

import train
from config import FFCV_RECIPES, TrainConfig, check_config, expand_recipe, load_config
from conftest import ROOT, assert_user_error, make_image, read_csv, run_main, save_torchvision_checkpoint
from dataset import find_samples
from loader import ImageDataset, TrainSampler, build_loader, shard_train_loader
from presets import EvalPreset, ResolutionRamp, normalize, train_transform
from test_accumulation import record_optimizer_steps
from test_shards import write_shards
from test_train import TINY, make_colour_dataset
from utils import UserError


def ffcv_resolution(epoch, min_res, max_res, end_ramp, start_ramp):
    """FFCV's get_resolution (train_imagenet.py), as it is written there."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / 32)) * 32


def ffcv_step_lrs(lr, peak, epochs, steps_per_epoch):
    """FFCV's lr of every step: get_cyclic_lr at each epoch, interpolated over the epoch's steps."""

    def cyclic(epoch):
        return np.interp([epoch], [0, peak, epochs], [1e-4 * lr, lr, 0])[0]

    lrs = []
    for epoch in range(epochs):
        start, end = cyclic(epoch), cyclic(epoch + 1)
        lrs += list(np.interp(np.arange(steps_per_epoch), [0, steps_per_epoch], [start, end]))
    return lrs


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_dataset(tmp_path_factory.mktemp("colours"))


# ----------------------------------------------------------------------------- the ramp


def test_the_ramp_is_ffcvs_before_inside_and_after():
    # every published schedule's ramp, epoch by epoch, as FFCV's own function computes it
    for recipe in FFCV_RECIPES.values():
        ramp = ResolutionRamp(160, 192, recipe.start_ramp, recipe.end_ramp)
        for epoch in range(recipe.epochs):
            expected = ffcv_resolution(epoch, 160, 192, recipe.end_ramp, recipe.start_ramp)
            assert ramp.at(epoch) == expected, (recipe, epoch)
    # before (up to start_ramp itself), inside, after (from end_ramp on); rounding to the nearest
    # multiple, a half to the even one: 176 = 5.5 x 32 -> 192, 208 = 6.5 x 32 -> 192
    ramp = ResolutionRamp(160, 224, start_ramp=2, end_ramp=6)
    assert [ramp.at(e) for e in range(9)] == [160, 160, 160, 192, 192, 192, 224, 224, 224]
    assert [ramp.at(e) for e in (3, 4, 5)] == [ffcv_resolution(e, 160, 224, 6, 2) for e in (3, 4, 5)]
    assert ResolutionRamp(32, 64, 0, 4, multiple=16).at(2) == 48  # another multiple
    assert ResolutionRamp(64, 128, 1, 5, multiple=16).at(2) == 80  # 80 exactly
    assert ResolutionRamp(64, 128, 1, 5, multiple=16).at(3) == 96


def ramp_config(**changes) -> TrainConfig:
    options = "--min-res 32 --max-res 64 --res-multiple 16 --start-ramp 0 --end-ramp 2".split()
    cfg = load_config(TrainConfig, ["--data", "x", *TINY, *options])
    return check_config(TrainConfig(**{**cfg.__dict__, **changes}))


def test_every_train_path_makes_each_epochs_size(colours, tmp_path):
    """The crop of each epoch from the folder dataset (also through persistent loader workers) and from
    tar shards: 32, 48, 64 px; an unchanged config keeps train_crop_size."""
    cfg = ramp_config()
    samples, _ = find_samples(colours, "train", False, need_split=True)
    dataset = ImageDataset(samples, train_transform(cfg), cfg.seed)
    assert [dataset[(0, epoch, 0)][0].shape[-1] for epoch in range(4)] == [32, 48, 64, 64]
    sampler = TrainSampler(dataset, 1, 0)
    loader = build_loader(dataset, 4, workers=2, sampler=sampler, persistent_workers=True)
    sizes = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        sizes.append(tuple(next(iter(loader))[0].shape))
    assert sizes == [(4, 3, 32, 32), (4, 3, 48, 48), (4, 3, 64, 64)]
    write_shards(colours, tmp_path / "shards", 8)
    shards = shard_train_loader(tmp_path / "shards", train_transform(cfg), cfg, 0, 1, 0, False)
    shard_sizes = []
    for epoch in range(3):
        shards.sampler.set_epoch(epoch)
        shard_sizes.append(next(iter(shards))[0].shape[-1])
    assert shard_sizes == [32, 48, 64]
    fixed = ImageDataset(samples, train_transform(load_config(TrainConfig, ["--data", "x", *TINY])), 0)
    assert fixed[(0, 5, 0)][0].shape[-1] == 32


@pytest.mark.parametrize(
    "options, needle",
    [
        ("--min-res 32", "both --min-res and --max-res"),
        ("--min-res 64 --max-res 32", "min_res 64 is above max_res 32"),
        ("--min-res 40 --max-res 64", "min_res 40 is not a multiple of res_multiple 32"),
        ("--min-res 32 --max-res 64 --start-ramp 3 --end-ramp 1", "start_ramp 3 is after end_ramp 1"),
        ("--min-res 32 --max-res 64 --train-preset original", "--train-preset standard"),
        ("--scheduler triangular --epochs 2 --lr-peak-epoch 2", "config key lr_peak_epoch) must be in 1..1"),
        ("--scheduler triangular --warmup-epochs 1", "drop --warmup-epochs"),
    ],
)
def test_bad_ramps_and_schedules_are_named(colours, tmp_path, options, needle):
    result = run_main("train.py", "--data", colours, *TINY, *options.split(), "--output", tmp_path)
    assert_user_error(result, needle)
    assert not any(tmp_path.iterdir())


def test_a_one_size_architecture_refuses_the_ramp(colours, tmp_path):
    options = "--arch vit_b_32 --min-res 32 --max-res 64 --val-crop-size 32 --val-resize-size 36"
    result = run_main("train.py", "--data", colours, *options.split(), "--output", tmp_path)
    assert_user_error(result, "vit_b_32 takes one image size")


# ----------------------------------------------------------------------------- the triangular schedule


@pytest.mark.slow
def test_the_triangular_schedule_sets_every_steps_lr_as_ffcv(colours, tmp_path):
    """48 train images, 6 optimizer steps an epoch, 3 epochs, peak at epoch 1: FFCV's lr at every step, also
    with 2 batches accumulated into each step (the lr follows the step's position in the epoch)."""
    common = [*("--data", colours, *TINY, "--epochs", "3", "--lr", "0.1", "--output", tmp_path)]
    common += ["--scheduler", "triangular", "--lr-peak-epoch", "1"]
    expected = ffcv_step_lrs(0.1, 1, 3, 6)
    for name, options in {
        "plain": ["--batch-size", "8"],
        "accum": ["--batch-size", "4", "--accum-steps", "2"],
    }.items():
        lrs, handle = record_optimizer_steps()
        try:
            result = train.cli_main([*map(str, common), *options, "--run-name", name])
        finally:
            handle.remove()
        assert result["steps"] == 18
        assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-12), name
        rows = read_csv(tmp_path / name / "metrics.csv")
        assert float(rows[-1]["lr"]) == pytest.approx(expected[-1])  # the epoch's last step's


# ----------------------------------------------------------------------------- a shortened FFCV config

SHORT_FFCV = [
    *("--config", "configs/ffcv_rn18.yaml", "--epochs", "8", "--lr-peak-epoch", "2", "--lr", "0.01"),
    *("--min-res", "32", "--max-res", "64", "--res-multiple", "16", "--start-ramp", "0", "--end-ramp", "5"),
    *("--batch-size", "8", "--global-batch", "16", "--val-resize-size", "72", "--val-crop-size", "64"),
    *("--workers", "0", "--save-every-steps", "1"),
]


def mid_ramp(checkpoint) -> bool:
    """A checkpoint saved inside epoch 4 (from 1), whose crop is inside the ramp."""
    return checkpoint["epoch"] == 3 and checkpoint["batch"] > 0


@pytest.mark.slow
def test_a_shortened_ffcv_config_learns_with_its_ramp_and_resumes_inside_it(colours, tmp_path):
    """configs/ffcv_rn18.yaml shortened to 8 epochs at 32 -> 64 px (ramp 0 -> 5: 32, 38 -> 32, 45 -> 48,
    51 -> 48, 58 -> 64, 64, ...), 2 batches of 8 accumulated per step, its triangular schedule and flip
    TTA, on 3 colour classes: a last val top-1 of at least 90% (chance: 33%); a run killed inside epoch 4,
    inside the ramp, resumes to the same weights and rows."""
    args = ["--data", colours, *SHORT_FFCV, "--output", tmp_path]
    straight = run_main("train.py", *args, "--run-name", "straight")
    assert straight.returncode == 0, straight.stderr
    assert "global batch 16 = 8 per step x 1 process x 2 accumulation steps" in straight.stdout
    rows = read_csv(tmp_path / "straight" / "metrics.csv")
    assert [int(r["train_res"]) for r in rows] == [32, 32, 48, 48, 64, 64, 64, 64]
    assert float(rows[-1]["val_acc1"]) >= 90.0, rows
    config = yaml.safe_load((tmp_path / "straight" / "config.yaml").read_text())
    assert (config["val_tta"], config["scheduler"], config["norm_weight_decay"]) == (
        "flip",
        "triangular",
        0.0,
    )
    # killed inside epoch 4 (48 px, inside the ramp), resumed from its mid-epoch checkpoint
    command = [sys.executable, "train.py", *map(str, args), "--run-name", "killed"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last, deadline = tmp_path / "killed" / "last.pt", time.time() + 120
    while time.time() < deadline and not (last.exists() and mid_ramp(torch.load(last, weights_only=True))):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    partial = torch.load(last, weights_only=True)
    assert 3 <= partial["epoch"] < 5, (partial["epoch"], partial["batch"])  # inside the ramp
    resumed = run_main("train.py", *args, "--run-name", "killed", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    one, two = (torch.load(tmp_path / n / "last.pt", weights_only=True) for n in ("straight", "killed"))
    assert all(torch.equal(one["model"][k], two["model"][k]) for k in one["model"])
    untimed = [
        [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in c["history"]]
        for c in (one, two)
    ]
    assert untimed[0] == untimed[1]
    # the run's TTA validation is test_torchvision.py's --tta flip on its best.pt
    table = run_main(
        "test_torchvision.py",
        "--data",
        colours / "val",
        "--weights",
        tmp_path / "straight" / "best.pt",
        "--tta",
        "flip",
        "--no-fuse-bn",
        "--output",
        tmp_path / "eval",
    )
    assert table.returncode == 0, table.stderr
    row = json.loads((tmp_path / "eval" / "eval.json").read_text())[0]
    best = torch.load(tmp_path / "straight" / "best.pt", weights_only=True)
    assert row["tta"] == "flip" and row["acc1"] == pytest.approx(float(rows[best["epoch"] - 1]["val_acc1"]))
    runs = run_main("test_torchvision.py", "--runs", tmp_path, "--output", tmp_path / "runs")
    assert runs.returncode == 0, runs.stderr
    assert [r["tta"] for r in json.loads((tmp_path / "runs" / "our_training.json").read_text())] == [
        "flip"
    ] * 2


NUMBER = r"\s+([\d.]+) "  # a figure of a config header's table


def test_the_configs_carry_ffcvs_published_table():
    """Each FFCV config's header: the source, and every row of FFCV's table that --recipe runs."""
    for name, recipe in FFCV_RECIPES.items():
        header = (ROOT / "configs" / recipe.config).read_text()
        assert "https://github.com/libffcv/ffcv-imagenet" in header
        row = re.search(
            rf"\|\s+{recipe.epochs} \|{NUMBER}\|{NUMBER}\|{NUMBER}\| (\d x A100) \|\s+(\d+) -> (\d+)", header
        )
        assert row is not None, name
        assert (float(row[1]), float(row[2]), float(row[3]), row[4]) == (
            recipe.top1,
            recipe.top5,
            recipe.minutes,
            recipe.gpus,
        )
        assert (int(row[5]), int(row[6])) == (recipe.start_ramp, recipe.end_ramp)
        saved = yaml.safe_load(header)
        assert saved["arch"] == {"rn50": "resnet50", "rn18": "resnet18"}[name.split("-")[1]]


def test_an_ffcv_recipe_name_expands_to_its_config_length_and_ramp(capsys):
    argv = expand_recipe(["--recipe", "ffcv-rn50-16", "--data", "/data/imagenet", "--batch-size", "256"])
    assert argv == [
        *"--config configs/ffcv_rn50.yaml --epochs 16 --start-ramp 11 --end-ramp 13".split(),
        *"--data /data/imagenet --batch-size 256".split(),
    ]
    out = capsys.readouterr().out
    assert (
        "73.8 / 90.8" in out and "global batch 4096 = 256 per step x 1 process x 16 accumulation steps" in out
    )
    with pytest.raises(UserError, match="did you mean ffcv-rn50-56"):
        expand_recipe(["--recipe", "ffcv-rn50-61"])


# ----------------------------------------------------------------------------- flip TTA


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory):
    """12 JPEGs in ImageNet wnid folders, and a TORCH_HOME with random resnet18 IMAGENET1K_V1 weights."""
    from coder import imagenet_wnids

    root = tmp_path_factory.mktemp("tta")
    wnids = imagenet_wnids()
    for i in range(12):
        make_image(root / "val" / wnids[i * 83] / f"{i:02d}.JPEG", (56 + 8 * (i % 3), 48), seed=i)
    home = root / "home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    model = save_torchvision_checkpoint(home, "resnet18", models.ResNet18_Weights.IMAGENET1K_V1)
    return root / "val", home, model


def test_flip_tta_equals_a_hand_written_loop_and_keeps_its_own_row(imagenet_folder, tmp_path):
    val, home, model = imagenet_folder
    env = {"TORCH_HOME": str(home)}
    args = ["test_torchvision.py", "--data", val, "--models", "resnet18", "--resize", "64", "--crop", "56"]
    args += ["--no-fuse-bn", "--workers", "0", "--batch-size", "5", "--output", tmp_path]
    flipped = run_main(*args, "--tta", "flip", env=env)
    assert flipped.returncode == 0, flipped.stderr
    plain = run_main(*args, env=env)
    assert plain.returncode == 0, plain.stderr
    rows = json.loads((tmp_path / "eval.json").read_text())
    assert sorted(r["tta"] for r in rows) == ["flip", "none"]  # the key keeps them apart
    again = run_main(*args, "--tta", "flip", env=env)
    assert "already in" in again.stdout + again.stderr
    assert len(json.loads((tmp_path / "eval.json").read_text())) == 2
    row = next(r for r in rows if r["tta"] == "flip")
    assert row["n_images"] == 12 and row["img_per_s"] > 0
    predictions = read_csv(tmp_path / row["predictions"])
    preset = EvalPreset(64, 56)
    from loader import load_rgb

    hits = 0
    with torch.no_grad():
        for line in predictions:
            x = normalize(preset(load_rgb(line["path"]))[None], preset.mean, preset.std)
            logits = (model(x) + model(torch.flip(x, [-1]))) / 2  # the stated rule: the mean of the logits
            probs, classes = logits.softmax(1).topk(5)
            assert [int(line[f"top{k}"]) for k in range(1, 6)] == classes[0].tolist()
            assert [float(line[f"prob{k}"]) for k in range(1, 6)] == pytest.approx(
                probs[0].tolist(), abs=1e-5
            )
            hits += int(line["top1"]) == int(line["target"])
    assert row["acc1"] == pytest.approx(100 * hits / 12)
