"""fidelity.py: the three trainers run with the same settings, interleaved and resumable, and the summary's
statistics. torchvision's reference script is not in this repo: a stand-in with its command line and its
summary lines checks how it is called (seeded, from its folder) and read."""

import json
import textwrap

import numpy as np
import pytest

import fidelity
import train
from config import TrainConfig, load_config
from conftest import assert_user_error, make_image, run_main
from fidelity import SETTINGS, Setting, reference_command, variance_ratio_p
from test_train import TINY, make_colour_dataset

STAND_IN = """
import argparse, torch
p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int)
args, _ = p.parse_known_args()
for epoch in range(args.epochs):  # a seeded global RNG gives the same numbers for the same seed
    print(f"Test:  Acc@1 {100 * torch.rand(1).item():.3f} Acc@5 100.000")
"""


@pytest.fixture
def tiny(monkeypatch, tmp_path):
    """A 1-epoch setting, ten classes of three tiny images, and a stand-in reference folder."""
    monkeypatch.setitem(SETTINGS, "tiny", Setting(epochs=1, batch_size=8, lr=0.01, weight_decay=1e-4))
    data = tmp_path / "digits"
    for split, count in (("train", 3), ("val", 1)):
        for digit in range(10):
            for i in range(count):
                make_image(data / split / str(digit) / f"{i}.png", (32, 32), fmt="PNG", seed=digit * 10 + i)
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "train.py").write_text(textwrap.dedent(STAND_IN))
    (reference / "presets.py").write_text("")
    return data, reference


def test_every_trainer_runs_each_seed_once_and_the_table_compares_them(tiny, tmp_path):
    data, reference = tiny
    args = ["--setting", "tiny", "--seeds", "2", "--data", data, "--output", tmp_path / "out"]
    result = run_main("fidelity.py", *args, "--reference", reference)
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "out" / "fidelity.json").read_text())
    assert [(r["seed"], r["trainer"]) for r in rows] == [
        (s, t) for s in (0, 1) for t in ("ours", "plain", "reference")
    ]
    assert all(0 <= r["final_acc1"] <= 100 and len(r["acc1_per_epoch"]) == 1 for r in rows)
    table = (tmp_path / "out" / "fidelity.md").read_text()
    assert "| ours - plain | final_acc1 |" in table and "| ours - reference | best_acc1 |" in table
    again = run_main("fidelity.py", *args, "--reference", reference)  # resumable: nothing left to run
    assert again.returncode == 0 and "seed 0" not in again.stdout
    more = run_main(
        "fidelity.py",
        *args[:2],
        "--seeds",
        "3",
        *args[4:],
        "--trainers",
        "reference",
        "--reference",
        reference,
    )
    assert more.returncode == 0 and "tiny seed 2 reference" in more.stdout
    stand_in = [r["final_acc1"] for r in json.loads((tmp_path / "out" / "fidelity.json").read_text())]
    assert len(set(stand_in[2::3])) == 2  # its two seeds differ: the global RNG was seeded per run


def test_runs_of_another_environment_are_not_mixed_into_a_settings_table(tiny, tmp_path, monkeypatch):
    """Each run records its environment; a file's setting takes runs of one environment only (a seed gives
    other numbers on another CPU), and its table names it."""
    data, _ = tiny
    args = ["--setting", "tiny", "--seeds", "1", "--data", data, "--output", tmp_path, "--trainers", "plain"]
    assert run_main("fidelity.py", *args).returncode == 0
    [row] = json.loads((tmp_path / "fidelity.json").read_text())
    here = fidelity.environment(data)
    assert row["environment"] == here and here["cpu_capability"] and len(here["data_sha256"]) == 16
    assert f"Environment: {fidelity.describe_environment(here)}." in (tmp_path / "fidelity.md").read_text()
    measured = fidelity.environment
    elsewhere = {**here, "cpu_capability": "AVX2" if here["cpu_capability"] != "AVX2" else "DEFAULT"}
    monkeypatch.setattr(fidelity, "environment", lambda data: elsewhere)
    refused = run_main("fidelity.py", *args[:3], "2", *args[4:])
    assert_user_error(refused, "holds tiny runs of another environment", "pass another --output")
    make_image(data / "val" / "0" / "0.png", (32, 32), fmt="PNG", seed=99)  # one image changed
    assert measured(data)["data_sha256"] != here["data_sha256"]


def test_the_reference_runs_unmodified_with_its_rng_seeded_and_the_same_settings():
    command = reference_command(SETTINGS["v2"], "digits", seed=7)
    assert "torch.manual_seed(7)" in command[2] and "runpy.run_path('train.py'" in command[2]
    flags = " ".join(command[3:])
    for expected in (
        "--auto-augment ta_wide",
        "--mixup-alpha 0.2",
        "--cutmix-alpha 1.0",
        "--label-smoothing 0.1",
    ):
        assert expected in flags
    assert "--lr-scheduler cosineannealinglr" in flags and "--norm-weight-decay 0.0" in flags


def test_variance_ratio_p_tells_a_wider_spread_from_noise():
    values = np.random.default_rng(1).normal(0, 1, 20)
    alike = variance_ratio_p(values, values[::-1] + 5, permutations=2000)  # the same spread, shifted
    wider = variance_ratio_p(3 * values, values, permutations=2000)
    assert alike > 0.5 and wider < 0.01
    assert np.isnan(variance_ratio_p(np.full(5, 10.0), values[:5]))  # runs that all end alike: no ratio


def test_a_reference_folder_that_is_not_one_is_one_line(tiny, tmp_path):
    data, _ = tiny
    args = ["--setting", "tiny", "--seeds", "1", "--data", data, "--output", tmp_path / "out"]
    assert_user_error(run_main("fidelity.py", *args, "--trainers", "reference"), "needs --reference DIR")
    assert_user_error(
        run_main("fidelity.py", *args, "--trainers", "reference", "--reference", tmp_path),
        "is not torchvision's references/classification folder",
    )


def test_the_recipes_train_on_each_epochs_last_partial_batch_as_the_references(tmp_path):
    """The difference fidelity.py found: a last batch of a few images updates BatchNorm's statistics just
    before validation. train.py drops it by default; the recipe configs keep it, as the references do."""

    data = make_colour_dataset(tmp_path / "data", per_class=(8, 2))  # 24 train images
    args = ["--data", str(data), *TINY, "--epochs", "1", "--batch-size", "10", "--lr", "0.01"]
    kept = train.cli_main([*args, "--no-drop-last", "--output", str(tmp_path), "--run-name", "kept"])
    dropped = train.cli_main([*args, "--output", str(tmp_path), "--run-name", "dropped"])
    assert (kept["steps"], dropped["steps"]) == (3, 2)  # 10 + 10 + 4 images, or 10 + 10
    for recipe in ("torchvision_v1", "torchvision_v2", "mobilenet_v3", "regnet", "vit", "swin", "convnext"):
        config = load_config(TrainConfig, ["--config", str(fidelity.ROOT / "configs" / f"{recipe}.yaml")])
        assert config.drop_last is False, recipe
