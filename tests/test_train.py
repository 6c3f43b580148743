"""Training: config precedence and validation, convergence, exact resume, safe run dirs, checkpoints."""

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from config import TrainConfig, check_config, load_config
from conftest import ROOT, assert_user_error, read_csv, run_main, run_script
from utils import UserError

TINY = "--arch resnet18 --train-crop-size 32 --val-resize-size 36 --val-crop-size 32 --workers 0".split()
TINY_DROPOUT = [a if a != "resnet18" else "mobilenet_v3_small" for a in TINY]  # dropout before its classifier


def make_colour_dataset(root: Path, per_class=(16, 6), size=(40, 48), seed=0) -> Path:
    """Three learnable classes: noisy red, green and blue pictures (train/ and val/ ImageFolders)."""
    rng = np.random.default_rng(seed)
    colours = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
    for split, n in zip(("train", "val"), per_class):
        for name, colour in colours.items():
            for i in range(n):
                pixels = np.clip(np.array(colour) + rng.normal(0, 40, (*size, 3)), 0, 255).astype(np.uint8)
                (root / split / name).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_dataset(tmp_path_factory.mktemp("colours"))


def test_precedence_defaults_file_command_line(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("lr: 0.5\nepochs: 7\nloss: {focal: 1.0, smooth_l1: 1.0}\nmilestones: [2, 4]\n")
    cfg = load_config(TrainConfig, ["--config", str(config), "--lr", "0.25", "--nesterov", "--arch", "vgg11"])
    assert (cfg.lr, cfg.epochs, cfg.nesterov, cfg.arch, cfg.batch_size) == (0.25, 7, True, "vgg11", 32)
    assert cfg.loss == {"focal": 1.0, "smooth_l1": 1.0} and cfg.milestones == [2, 4]
    assert load_config(TrainConfig, ["--loss", "{ce: 1.0}", "--milestones", "3", "6"]).milestones == [3, 6]
    assert load_config(TrainConfig, ["--run-name", "{a}"]).run_name == "{a}"  # only a loss spec is YAML
    config.write_text("data: [a, b]\n")
    with pytest.raises(UserError, match="data"):
        load_config(TrainConfig, ["--config", str(config)])


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--lr-sheduler", "x"], "did you mean"),
        (["--epoch", "3"], "--epochs"),
        (["--epochs", "abc"], "epochs"),
        (["--lr", "-1"], "lr"),
        (["--epochs", "0"], "epochs"),
        (["--batch-size", "0"], "batch_size"),
        (["--val-crop-size", "300"], "val_crop_size"),
        (["--optimizer", "adam"], "sgd, adamw"),
        (["--loss", "{focal: 1.0"], "not valid YAML"),
        (["--warmup-epochs", "5", "--warmup-factor", "0"], "warmup_factor"),
        (["--nesterov", "--momentum", "0"], "nesterov"),
        (["--dropout", "1.5"], "dropout"),
        (["--train-preset", "original", "--train-crop-size", "300"], "train_crop_size"),
        (
            ["--arch", "quantized_resnet50"],
            "int8 model for evaluation; train its float architecture resnet50",
        ),
    ],
)
def test_bad_options_are_named(args, needle):
    with pytest.raises(UserError, match=needle):
        check_config(load_config(TrainConfig, ["--dummy", *args]))


def test_unknown_yaml_key_suggests_the_closest(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("learning_rate: 0.1\nwieght_decay: 0.0001\n")
    with pytest.raises(UserError, match="unknown key 'learning_rate'"):
        load_config(TrainConfig, ["--config", str(config)])
    config.write_text("wieght_decay: 0.0001\n")
    with pytest.raises(UserError, match="weight_decay"):
        load_config(TrainConfig, ["--config", str(config)])
    config.write_text("lr: fast\n")  # a bad value names its file, unless the command line gave it
    with pytest.raises(UserError, match=f"got 'fast' in {config}$"):
        load_config(TrainConfig, ["--config", str(config)])
    with pytest.raises(UserError, match="got 'quick'$"):
        load_config(TrainConfig, ["--config", str(config), "--lr", "quick"])


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        check_config(load_config(TrainConfig, ["--config", str(path), "--data", "x"]))
        assert (
            path.read_text().startswith("#") and f"train.py --config configs/{path.name}" in path.read_text()
        )


@pytest.mark.slow
def test_converges_on_a_learnable_dataset(colours, tmp_path):
    recipe = "--epochs 4 --batch-size 8 --optimizer adamw --lr 0.001 --weight-decay 0.01 --scheduler cosine"
    options = [*TINY, *recipe.split(), "--run-name", "converge", "--output", tmp_path]
    result = run_script("train.py", "--data", colours, *options)
    assert result.returncode == 0, result.stderr
    rows = read_csv(tmp_path / "converge" / "metrics.csv")
    assert len(rows) == 4 and float(rows[-1]["val_acc1"]) >= 90.0, rows
    expected = (
        "epoch lr train_loss train_acc1 val_loss val_acc1 val_acc5 val_nll val_ece epoch_time_s img_per_s"
    )
    assert set(expected.split()) <= set(rows[0])
    for row in rows:  # no label smoothing: the training criterion's val loss is the plain cross-entropy
        assert 0 <= float(row["val_ece"]) <= 100 and float(row["val_nll"]) == pytest.approx(
            float(row["val_loss"])
        )
    run = tmp_path / "converge"
    info = json.loads((run / "run.json").read_text())
    assert (
        info["classes"] == ["blue", "green", "red"]
        and info["seed"] == 0
        and info["torch"] == torch.__version__
    )
    assert Image.open(run / "curves.png").size == (1320, 480)  # the two panels of plots.plot_curves
    best = torch.load(run / "best.pt", weights_only=True)
    assert float(rows[best["epoch"] - 1]["val_acc1"]) == max(float(row["val_acc1"]) for row in rows)
    assert yaml.safe_load((run / "config.yaml").read_text())["lr"] == 0.001
    checkpoint = torch.load(run / "last.pt", weights_only=True)  # plain containers only
    assert checkpoint["epoch"] == 4 and checkpoint["config"]["arch"] == "resnet18"
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint["model"])
    table = run_script("test_torchvision.py", "--runs", tmp_path, "--output", tmp_path / "results")
    assert table.returncode == 0, table.stderr
    assert "| resnet18 | converge | 11,178,051 |" in (tmp_path / "results" / "our_training.md").read_text()


def state_of(run_dir: Path):
    checkpoint = torch.load(run_dir / "last.pt", weights_only=True)
    return checkpoint["model"], [
        {k: v for k, v in row.items() if "time" not in k and "per_s" not in k}
        for row in checkpoint["history"]
    ]


@pytest.mark.slow
def test_resume_is_exact(colours, tmp_path):
    """3 epochs straight == 1 epoch + resume: the same weights, EMA and metrics. A dropout model (the
    torch RNG state must be restored) and an lr milestone inside the run (the schedule must be).
    The mid-epoch resume: test_sigkill_mid_epoch_then_resume_matches."""
    args = [
        "--data",
        colours,
        *TINY_DROPOUT,
        *"--batch-size 8 --lr 0.01 --ema-decay 0.9 --ema-steps 2".split(),
    ]
    args += ["--scheduler", "multistep", "--milestones", "2", "--output", tmp_path]
    # the uninterrupted run and the first epoch in this process, the resume as a user runs it
    assert run_main("train.py", *args, "--epochs", "3", "--run-name", "straight").returncode == 0
    assert run_main("train.py", *args, "--epochs", "1", "--run-name", "split").returncode == 0
    resumed = run_script("train.py", *args, "--epochs", "3", "--run-name", "split", "--resume", "auto")
    assert resumed.returncode == 0 and "resumed" in resumed.stdout, resumed.stderr
    straight, split = state_of(tmp_path / "straight"), state_of(tmp_path / "split")
    assert split[1] == straight[1]
    assert all(torch.equal(straight[0][k], split[0][k]) for k in straight[0])
    # ema.pt: the EMA weights as a model checkpoint, which every script takes as --weights
    ema = torch.load(tmp_path / "straight" / "ema.pt", weights_only=True)
    averaged = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)["ema"]
    assert ema.keys() >= {"model", "config", "classes"} and "optimizer" not in ema
    assert all(torch.equal(v, averaged[f"module.{k}"]) for k, v in ema["model"].items())
    image = next((colours / "val" / "red").iterdir())
    predicted = run_script("predict.py", image, "--weights", tmp_path / "straight" / "ema.pt", "--json")
    assert predicted.returncode == 0, predicted.stderr
    # its classes
    assert json.loads(predicted.stdout)[0]["predictions"][0]["name"] in ("red", "green", "blue")


RECIPE = (
    "--ra-sampler --ra-reps 2 --auto-augment ta_wide --random-erase 0.5 --mixup-alpha 0.2 --cutmix-alpha 1"
)
RECIPE += " --label-smoothing 0.1 --ema-decay 0.99 --ema-steps 1 --norm-weight-decay 0 --warmup-epochs 1"


@pytest.mark.slow
# the plain recipe's mid-epoch kill and exact resume: tests/test_restarts.py (2 processes, a torchrun restart)
@pytest.mark.parametrize("recipe", [RECIPE + " --accum-steps 2"], ids=["v2-recipe-accumulated"])
def test_sigkill_mid_epoch_then_resume_matches(colours, tmp_path, recipe):
    """kill -9 in the middle of an epoch (last.pt written every 2 steps), resume: the same final metrics
    and weights (dropout model, an lr milestone after epoch 1). v2-recipe-accumulated: with the repeated-
    augmentation sampler, TrivialAugmentWide, RandomErasing, MixUp/CutMix and the EMA, and 2 batches
    accumulated into each optimizer step (checkpoints after every second step: every 4 batches), the resume
    is exact too (v1 covers the unaccumulated loop)."""
    options = "--batch-size 4 --lr 0.01 --epochs 2 --save-every-steps 2".split()
    options += "--scheduler multistep --milestones 1".split()
    options += recipe.split()
    args = ["train.py", "--data", colours, *TINY_DROPOUT, *options, "--output", tmp_path]
    assert run_main(*args, "--run-name", "straight").returncode == 0
    command = [sys.executable, *map(str, args), "--run-name", "killed"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not (last.exists() and torch.load(last, weights_only=True)["batch"] > 0):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)  # at once: the next save is 2 steps away
    process.wait()
    partial = torch.load(last, weights_only=True)  # loadable whatever the moment of the kill
    assert partial["epoch"] < 2 and partial["batch"] > 0  # a mid-epoch checkpoint
    if "--accum-steps" in recipe:  # saved after an optimizer step: 2 batches each
        assert partial["batch"] % 2 == 0 and partial["step"] == 6 * partial["epoch"] + partial["batch"] // 2
    resumed = run_script(*args, "--run-name", "killed", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    straight, killed = state_of(tmp_path / "straight"), state_of(tmp_path / "killed")
    assert killed[1] == straight[1]
    assert all(torch.equal(straight[0][k], killed[0][k]) for k in straight[0])
    if recipe:  # the EMA too (copies in the warmup epoch, averages after)
        ema = [
            torch.load(tmp_path / run / "last.pt", weights_only=True)["ema"] for run in ("straight", "killed")
        ]
        assert ema[0].keys() == ema[1].keys() and all(torch.equal(ema[0][k], ema[1][k]) for k in ema[0])
        assert any(not torch.equal(ema[0][f"module.{k}"], v) for k, v in straight[0].items())  # it averaged


@pytest.mark.slow
def test_a_run_extended_with_more_epochs_follows_the_longer_schedule(colours, tmp_path):
    """A cosine run stopped after 1 of 1 epochs and resumed with --epochs 3 trains as a 3-epoch run:
    the saved schedule (1 epoch long) would train epochs 2 and 3 at lr 0. The resume names only the
    run and the new epoch count: every other setting (arch, sizes, batch, lr, schedule) is the run's
    own, from its checkpoint, not the defaults; the change is said."""
    args = [
        "--data",
        colours,
        *TINY,
        *"--batch-size 8 --lr 0.01 --scheduler cosine".split(),
        "--output",
        tmp_path,
    ]
    assert run_main("train.py", *args, "--epochs", "3", "--run-name", "straight").returncode == 0
    assert run_main("train.py", *args, "--epochs", "1", "--run-name", "extended").returncode == 0
    short = ["--data", colours, "--output", tmp_path, "--run-name", "extended", "--resume", "auto"]
    longer = run_script("train.py", *short, "--epochs", "3")
    assert longer.returncode == 0, longer.stderr
    assert "continues with settings other than its run's: epochs 1 -> 3" in longer.stdout, longer.stdout
    # --runs reads it
    assert yaml.safe_load((tmp_path / "extended" / "config.yaml").read_text())["epochs"] == 3
    done = run_main("train.py", *short)  # nothing left to train: said, not silent
    assert (
        done.returncode == 0
        and "the run has done its 3 epochs: to train further, pass --epochs" in done.stdout
    )
    other = run_main("train.py", *short, "--epochs", "4", "--optimizer", "adamw")  # another optimizer state
    assert_user_error(other, "trained with --optimizer sgd", "resume with --optimizer sgd", "--weights")
    # untouched
    assert yaml.safe_load((tmp_path / "extended" / "config.yaml").read_text())["optimizer"] == "sgd"
    assert "resnet18" in longer.stdout and "->" not in longer.stdout.split("epochs 1 -> 3")[1].split("\n")[0]
    straight, extended = state_of(tmp_path / "straight"), state_of(tmp_path / "extended")
    assert [row["lr"] for row in extended[1]] == [row["lr"] for row in straight[1]] and extended[1][1][
        "lr"
    ] > 0
    assert extended[1] == straight[1]
    assert all(torch.equal(straight[0][k], extended[0][k]) for k in straight[0])


def digest(folder: Path) -> dict:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.slow
def test_a_run_started_again_in_a_folder_without_checkpoint_writes_its_own_run_files(colours, tmp_path):
    """A run that stopped before its first checkpoint leaves its name free: the next run under that name
    writes its own config.yaml and run.json, not keeping the failed one's."""
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "config.yaml").write_text("arch: vgg11\nlr: 0.5\n")
    (tmp_path / "again" / "run.json").write_text('{"command": "the failed one"}')
    args = ["train.py", "--data", colours, *TINY, "--batch-size", "16", "--epochs", "1", "--output", tmp_path]
    assert run_script(*args, "--run-name", "again").returncode == 0
    assert yaml.safe_load((tmp_path / "again" / "config.yaml").read_text())["arch"] == "resnet18"
    assert "the failed one" not in (tmp_path / "again" / "run.json").read_text()
    assert (tmp_path / "again" / "curves.png").is_file()


def test_same_run_name_never_overwrites(colours, tmp_path):
    args = ["train.py", "--data", colours, *TINY, "--batch-size", "16", "--epochs", "1", "--output", tmp_path]
    assert run_main(*args, "--run-name", "mine").returncode == 0
    before = digest(tmp_path / "mine")
    assert_user_error(
        run_script(*args, "--run-name", "mine", "--lr", "0.5"), "already exists", "--resume auto"
    )
    assert digest(tmp_path / "mine") == before
    auto = run_main(*args)  # no name: a fresh, timestamped one
    assert (
        auto.returncode == 0 and len([d for d in tmp_path.iterdir() if d.name.startswith("resnet18-")]) == 1
    )


@pytest.mark.slow
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(colours, tmp_path):
    args = [
        "train.py",
        "--data",
        colours,
        *TINY,
        "--batch-size",
        "8",
        "--output",
        tmp_path,
        "--run-name",
        "nan",
    ]
    assert run_main(*args, "--epochs", "1", "--lr", "0.001").returncode == 0
    good = digest(tmp_path / "nan")["last.pt"]
    # a resume follows the new lr
    result = run_script(*args, "--epochs", "2", "--resume", "auto", "--lr", "1e30")
    assert_user_error(result, "loss became", "at step")
    assert digest(tmp_path / "nan")["last.pt"] == good


def test_one_epoch_equals_the_plain_loop_on_the_same_batches(tmp_path):
    """engine.train_one_epoch is the textbook loop: from the same weights, on the same batches in the
    same order (ImageFolder + Resize + CenterCrop + ToTensor + Normalize, SGD with momentum and weight
    decay, cross-entropy), both end with the same weights. A gap in accuracy between train.py and a
    plain loop is then one of data order and initialisation, i.e. of seeds (see the closing runs)."""
    import copy

    import torch.nn.functional as F
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    from dataset import find_samples
    from engine import LoopSettings, Runtime, Training, TrainState, build_optimizer, train_one_epoch
    from loader import ImageDataset, TrainSampler, build_loader
    from loss import build_loss
    from model import build_model
    from presets import EvalPreset, train_preset

    data = make_colour_dataset(tmp_path, per_class=(8, 1), size=(36, 40))
    cfg = TrainConfig(arch="resnet18", batch_size=8, lr=0.05, momentum=0.9, weight_decay=1e-4)
    torch.manual_seed(0)
    ours = build_model("resnet18", None, 3)
    plain = copy.deepcopy(ours)
    samples, _ = find_samples(data, "train", imagenet_labels=False, need_split=True)
    dataset = ImageDataset(samples, train_preset("original", crop=32, resize=32))
    sampler = TrainSampler(dataset, 1, 0, cfg.seed)
    loader = build_loader(dataset, cfg.batch_size, 0, sampler, drop_last=True)
    optimizer = build_optimizer(cfg, ours, cfg.lr)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    runtime = Runtime(torch.device("cpu"))  # ImageNet mean and std, fp32, NCHW
    training = Training(ours, optimizer, None, scaler, None, runtime.device, wrapped=ours)
    train_one_epoch(
        training, build_loss("ce", 3), loader, runtime, TrainState(), LoopSettings(log_interval=100)
    )

    mean, std = EvalPreset().mean, EvalPreset().std
    transform = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor(), T.Normalize(mean, std)])
    folder = ImageFolder(str(data / "train"), transform)
    order = [index for index, _, _ in sampler]  # the epoch-0 order train.py used
    sgd = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    plain.train()
    for start in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
        batch = [folder[i] for i in order[start : start + cfg.batch_size]]
        x, y = torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch])
        sgd.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        sgd.step()
    for (name, a), b in zip(ours.state_dict().items(), plain.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name


def test_train_and_val_class_folders_that_differ_are_named_by_side():
    import train

    message = train.class_mismatch("d", ["blue", "green", "red"], ["blue", "cat", "red"])
    assert "val/ has cat, which train/ lacks; train/ has green, which val/ lacks" in message
    subset = train.class_mismatch("d", [f"c{i}" for i in range(6)], ["c0"])  # a subset: refused too
    assert "train/ has c1, c2, c3 and 2 more, which val/ lacks; give both the same class folders" in subset
