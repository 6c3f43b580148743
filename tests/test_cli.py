"""The command line every script shares: the same runtime options with the same names, choices and
defaults, and test_torchvision.py's modes that exclude each other."""

import typing

import pytest

import benchmark
import test_torchvision
from config import TrainConfig, load_config
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
