"""The command line every script shares: the same runtime options with the same names, choices and
defaults, and test_torchvision.py's modes that exclude each other."""

import typing

import pytest

import benchmark
import test_torchvision
from config import TrainConfig, load_config, parse_config, resume_notes, resumed_config
from utils import RUNTIME_HELP, Amp, ChannelsLast, Device, UserError

SHARED = {"device": Device, "amp": Amp, "channels_last": ChannelsLast}


def test_train_config_uses_the_shared_option_types():
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for name, kind in SHARED.items():
        assert hints[name] is kind and getattr(defaults, name) == "auto"
    assert defaults.workers is None  # dataset.default_workers, as in every script


@pytest.mark.parametrize("parse", [test_torchvision.parse_args, benchmark.parse_args])
def test_scripts_take_the_shared_options(parse):
    args = parse(["--data", "somewhere"] if parse is test_torchvision.parse_args else ["--parts", "model"])
    assert (args.device, args.amp, args.channels_last, args.workers) == ("auto", "auto", "auto", None)
    for name, kind in SHARED.items():
        value = typing.get_args(kind)[-1]
        flag = "--" + name.replace("_", "-")
        assert (
            getattr(parse(["--parts", "model", flag, value] if parse is benchmark.parse_args else [flag, value]), name)
            == value
        )
    with pytest.raises(UserError, match="--amp"):
        parse(["--amp", "fp32"])
    with pytest.raises(UserError, match="--batch-size"):
        parse(["--batch-size", "0"])


def test_train_config_choices_come_from_the_types():
    with pytest.raises(UserError, match="amp must be one of auto, none, bf16, fp16"):
        load_config(TrainConfig, ["--amp", "fp32"])
    assert load_config(TrainConfig, ["--channels-last", "true", "--workers", "2"]).channels_last == "true"
    assert "bf16 when training on CUDA" in RUNTIME_HELP["amp"]


def test_data_and_runs_exclude_each_other():
    with pytest.raises(UserError, match="--runs.*not allowed with.*--data|--data.*not allowed with.*--runs"):
        test_torchvision.parse_args(["--data", "val", "--runs", "checkpoints"])


def test_a_resume_takes_the_runs_settings_except_those_given():
    """train.py --run-name X --resume auto [--epochs N]: the checkpoint's config, but for the settings the
    command gives (said as changes) and where the run is (output, run name, device: this command's)."""
    saved = TrainConfig(arch="resnet18", batch_size=8, epochs=2, lr=0.05, device="cuda", output="old").__dict__
    saved = {k: v for k, v in saved.items() if k != "label_smoothing"}  # a checkpoint from before that field
    cfg, given = parse_config(TrainConfig, "--run-name r --resume auto --epochs 3 --label-smoothing 0.1".split())
    assert given == {"run_name", "resume", "epochs", "label_smoothing"}
    resumed, changes = resumed_config(cfg, saved, given)
    assert (resumed.arch, resumed.batch_size, resumed.lr, resumed.epochs) == ("resnet18", 8, 0.05, 3)
    assert (resumed.device, resumed.output, resumed.run_name, resumed.label_smoothing) == ("auto", cfg.output, "r", 0.1)
    assert changes == ["epochs 2 -> 3"]
    # a config object (train.main(cfg) from Python): every setting counts as given
    same, changes = resumed_config(TrainConfig(arch="resnet18", batch_size=32), saved, None)
    assert (same.batch_size, same.lr) == (32, TrainConfig().lr) and "batch_size 8 -> 32" in changes
    assert resumed_config(cfg, None, given) == (cfg, [])  # a new run


def test_a_resume_says_what_its_command_may_not():
    """A torchrun run (2 x batch 8) resumed by one process halves the global batch at the same lr; a
    finished run resumed without more epochs trains nothing."""
    saved = {"batch_size": 8, "lr": 0.1}
    cfg = TrainConfig(batch_size=8, lr=0.1, epochs=4)
    [note] = resume_notes(cfg, saved, 2, 2, 1)
    assert "global batch changes from 16 to 8" in note and "launch the run's 2 processes" in note and "0.05" in note
    assert resume_notes(cfg, saved, 2, 2, 2) == []
    assert "done its 4 epochs" in resume_notes(cfg, saved, 4, 1, 1)[-1]
