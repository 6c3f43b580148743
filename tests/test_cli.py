"""The command line every script shares: each shared option with the same name, kind, choices and default
in every script (old spellings answered with the new ones), booleans as --x/--no-x, train.py's help from
TrainConfig's fields, and test_torchvision.py's modes that exclude each other."""

import argparse
import dataclasses
import typing

import pytest

import benchmark
import test_torchvision
from config import TrainConfig, load_config, parse_config, resume_notes, resumed_config
from utils import RUNTIME_HELP, Amp, ChannelsLast, Device, UserError, non_negative_int, positive_int

SHARED = {"device": Device, "amp": Amp, "channels_last": ChannelsLast}


def test_train_config_uses_the_shared_option_types():
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for name, kind in SHARED.items():
        assert hints[name] is kind and getattr(defaults, name) == "auto"
    assert defaults.workers is None  # loader.default_workers, as in every script


@pytest.mark.parametrize("parse", [test_torchvision.parse_args, benchmark.parse_args])
def test_scripts_take_the_shared_options(parse):
    args = parse(["--data", "somewhere"] if parse is test_torchvision.parse_args else ["--parts", "model"])
    assert (args.device, args.amp, args.channels_last, args.workers) == ("auto", "auto", "auto", None)
    for name, kind in SHARED.items():
        value = typing.get_args(kind)[-1]
        flag = "--" + name.replace("_", "-")
        assert (
            getattr(
                parse(["--parts", "model", flag, value] if parse is benchmark.parse_args else [flag, value]),
                name,
            )
            == value
        )
    with pytest.raises(UserError, match="--amp"):
        parse(["--amp", "fp32"])
    with pytest.raises(UserError, match="--batch-size"):
        parse(["--batch-size", "0"])


def test_train_config_choices_come_from_the_types():
    with pytest.raises(UserError, match=r"--amp \(config key amp\) must be one of auto, none, bf16, fp16"):
        load_config(TrainConfig, ["--amp", "fp32"])
    assert load_config(TrainConfig, ["--channels-last", "true", "--workers", "2"]).channels_last == "true"
    assert "bf16 when training on CUDA" in RUNTIME_HELP["amp"]


def test_data_and_runs_exclude_each_other():
    with pytest.raises(UserError, match="--runs.*not allowed with.*--data|--data.*not allowed with.*--runs"):
        test_torchvision.parse_args(["--data", "val", "--runs", "checkpoints"])


def test_a_weights_file_without_data_says_to_pass_data():
    """Without --data, test_torchvision.py counts torchvision's weights: a file needs images."""
    for weights in ("checkpoints/r18/best.pt", "r18.onnx"):
        with pytest.raises(UserError, match="is a file: pass --data DIR to evaluate it"):
            test_torchvision.main.__wrapped__(["--weights", weights])


def test_a_resume_takes_the_runs_settings_except_those_given():
    """train.py --run-name X --resume auto [--epochs N]: the checkpoint's config, but for the settings the
    command gives (said as changes) and where the run is (output, run name, device: this command's)."""
    saved = TrainConfig(
        arch="resnet18", batch_size=8, epochs=2, lr=0.05, device="cuda", output="old"
    ).__dict__
    saved = {k: v for k, v in saved.items() if k != "label_smoothing"}  # a checkpoint from before that field
    cfg, given = parse_config(
        TrainConfig, "--run-name r --resume auto --epochs 3 --label-smoothing 0.1".split()
    )
    assert given == {"run_name", "resume", "epochs", "label_smoothing"}
    resumed, changes = resumed_config(cfg, saved, given)
    assert (resumed.arch, resumed.batch_size, resumed.lr, resumed.epochs) == ("resnet18", 8, 0.05, 3)
    assert (resumed.device, resumed.output, resumed.run_name, resumed.label_smoothing) == (
        "auto",
        cfg.output,
        "r",
        0.1,
    )
    assert changes == ["epochs 2 -> 3"]
    # a config object (train.main(cfg) from Python): every setting counts as given
    same, changes = resumed_config(TrainConfig(arch="resnet18", batch_size=32), saved, None)
    assert (same.batch_size, same.lr) == (32, TrainConfig().lr) and "batch_size 8 -> 32" in changes
    assert resumed_config(cfg, None, given) == (cfg, [])  # a new run


def test_a_resume_says_what_its_command_may_not():
    """A torchrun run (2 x batch 8) from before global_batch was recorded, resumed by one process, halves the
    global batch at the same lr; a recorded global batch is kept by accumulating; a finished run resumed
    without more epochs trains nothing."""
    saved = {"batch_size": 8, "lr": 0.1}
    cfg = TrainConfig(batch_size=8, lr=0.1, epochs=4)
    [note] = resume_notes(cfg, saved, 2, 2, 1)
    assert "global batch 8 = 8 per step x 1 process x 1 accumulation step differs from the run's 16" in note
    assert "--global-batch 16" in note and "0.05" in note
    assert resume_notes(cfg, saved, 2, 2, 2) == []
    recorded = {**saved, "global_batch": 16, "accum_steps": 1}
    resumed, _ = resumed_config(cfg, recorded, frozenset({"epochs"}))
    assert resume_notes(resumed, recorded, 2, 2, 1) == []  # 8 x 1 process x 2 accumulation steps
    assert "done its 4 epochs" in resume_notes(cfg, saved, 4, 1, 1)[-1]


# ----------------------------------------------------------------------------- one vocabulary in every script


def script_options() -> dict[str, dict[str, argparse.Action]]:
    """{script: {option string: its argparse action}}, the subcommands' options included."""
    import export
    import predict
    import prepare_data
    import train

    parsers = {
        "train.py": train.build_parser(),
        "test_torchvision.py": test_torchvision.build_parser(),
        "benchmark.py": benchmark.build_parser(),
        "predict.py": predict.build_parser(),
        "export.py": export.build_parser(),
        "prepare_data.py": prepare_data.build_parser(),
    }
    options = {}
    for script, parser in parsers.items():
        found, pending = {}, [parser]
        while pending:
            current = pending.pop()
            for action in current._actions:
                found.update({option: action for option in action.option_strings})
                if isinstance(action, argparse._SubParsersAction):
                    pending += action.choices.values()
        options[script] = found
    return options


def default_of(script: str, action: argparse.Action):
    """What a script uses when the option is left out: train.py's come from TrainConfig."""
    return getattr(TrainConfig(), action.dest) if script == "train.py" else action.default


def kind_of(script: str, action: argparse.Action):
    """'switch', the choices, or the type of the value: train.py's from TrainConfig's annotations (its
    values are checked against them after parsing), the others' from argparse."""
    if script == "train.py":
        hint = typing.get_type_hints(TrainConfig)[action.dest]
        if type(None) in typing.get_args(hint):  # X | None -> X
            hint = next(h for h in typing.get_args(hint) if h is not type(None))
        if hint is bool:
            return "switch"
        return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else hint.__name__
    if isinstance(action, argparse.BooleanOptionalAction):
        return "switch"
    if action.choices:
        return tuple(action.choices)
    if action.type in (positive_int, non_negative_int):
        return "int"
    return "str" if action.type is None else action.type.__name__


# option -> the scripts that take it; each takes it with the same kind, choices and default, except the
# defaults listed in DEFAULTS_OF_THEIR_JOB
SHARED_OPTIONS = {
    "--device": ["train.py", "test_torchvision.py", "benchmark.py", "predict.py"],
    "--amp": ["train.py", "test_torchvision.py", "benchmark.py", "predict.py"],
    "--channels-last": ["train.py", "test_torchvision.py", "benchmark.py", "predict.py"],
    "--batch-size": ["train.py", "test_torchvision.py", "benchmark.py"],
    "--workers": ["train.py", "test_torchvision.py", "benchmark.py", "prepare_data.py"],
    "--weights": ["train.py", "test_torchvision.py", "benchmark.py", "predict.py", "export.py"],
    "--weights-dir": ["train.py", "test_torchvision.py", "benchmark.py", "predict.py", "export.py"],
    "--data": ["train.py", "test_torchvision.py", "benchmark.py", "prepare_data.py"],
    "--output": ["train.py", "test_torchvision.py", "benchmark.py", "export.py", "prepare_data.py"],
    "--val-labels": ["test_torchvision.py", "prepare_data.py"],
    "--compile": ["train.py", "test_torchvision.py", "benchmark.py"],
    "--skip-bad-images": ["train.py", "test_torchvision.py"],
}
# per-process training batch (torchvision's V1 recipe: 8 x 32) against evaluation's; where each job writes;
# what each job runs when no weights are named (random for training and benchmarks, DEFAULT to predict)
DEFAULTS_OF_THEIR_JOB = {"--batch-size", "--output", "--weights", "--data"}
RETIRED = {"--out": "--output", "--labels": "--val-labels"}


def test_every_script_spells_a_shared_option_the_same_way():
    options = script_options()
    for option, scripts in SHARED_OPTIONS.items():
        actions = {script: options[script][option] for script in scripts}
        kinds = {script: kind_of(script, action) for script, action in actions.items()}
        assert len(set(kinds.values())) == 1, (option, kinds)
        if option not in DEFAULTS_OF_THEIR_JOB:
            defaults = {script: default_of(script, action) for script, action in actions.items()}
            assert len(set(defaults.values())) == 1, (option, defaults)
    for script, found in options.items():
        assert not set(RETIRED) & set(found), script
        store_true = [option for option, a in found.items() if isinstance(a, argparse._StoreTrueAction)]
        assert store_true == [], f"{script}: booleans are --x/--no-x (utils.switch), not store_true"


def test_every_boolean_is_a_switch_with_its_no_form():
    for script, found in script_options().items():
        for option, action in found.items():
            if isinstance(action, argparse.BooleanOptionalAction) and not option.startswith("--no-"):
                assert f"--no-{option[2:]}" in found, (script, option)
    hints = typing.get_type_hints(TrainConfig)
    train = script_options()["train.py"]
    for field in dataclasses.fields(TrainConfig):
        if hints[field.name] is bool:
            assert isinstance(train["--" + field.name.replace("_", "-")], argparse.BooleanOptionalAction)


def test_train_help_comes_from_the_fields_metadata():
    train = script_options()["train.py"]
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        assert field.metadata["help"] and train[flag].help.startswith(field.metadata["help"]), field.name
        assert train[flag].container.title == field.metadata["group"], field.name


@pytest.mark.parametrize(
    "script, argv, suggestion",
    [
        ("test_torchvision.py", ["--out", "x"], "did you mean --output?"),
        ("benchmark.py", ["--json", "x.json"], "did you mean --output?"),
        ("export.py", ["--out", "x.onnx"], "did you mean --output?"),
        ("prepare_data.py", ["prepare-val", "val", "--labels", "x.csv"], "did you mean --val-labels?"),
        ("train.py", ["--dummy", "true"], "--dummy takes no value (did you mean --dummy or --no-dummy?)"),
        ("train.py", ["--ra-sampler=false"], "did you mean --ra-sampler or --no-ra-sampler?"),
        ("test_torchvision.py", ["--no-thop", "true"], "did you mean --thop or --no-thop?"),
        ("test_torchvision.py", ["--thop", "--data", "x"], "not allowed with"),
    ],
)
def test_an_old_spelling_says_the_new_one(script, argv, suggestion):
    parser = {
        "train.py": lambda: __import__("train").build_parser(),
        "test_torchvision.py": test_torchvision.build_parser,
        "benchmark.py": benchmark.build_parser,
        "export.py": lambda: __import__("export").build_parser(),
        "prepare_data.py": lambda: __import__("prepare_data").build_parser(),
    }[script]()
    if suggestion == "not allowed with":  # --thop is no mode: it goes with --data as before
        assert parser.parse_args(argv).thop
        return
    with pytest.raises(UserError) as info:
        parser.parse_args(argv)
    assert suggestion in str(info.value)
