"""Reliability of the options: unknown models and weights, weights missing offline, bad config files
and command lines, checkpoints of another architecture, truncated or carrying a code payload. Each
ends in one clear 'error:' line, no traceback, and no half-made run folder.

    python -m pytest -q tests/test_reliability_options.py
"""

import os

import pytest
import torch
from torchvision import models

from conftest import assert_user_error, make_image, run_main
from reliability_inputs import WEIGHTS, assert_no_run_dir, eval_folder, evaluate, train

# ----------------------------------------------------------------------------- models and weights


@pytest.mark.parametrize(
    "script, case",
    [("train.py", "unknown_model"), ("predict.py", "unknown_weights"), ("predict.py", "offline")],
)
def test_model_and_weights_errors(tmp_path, train_data, torch_home, offline, script, case):
    """(test_eval.py covers test_torchvision.py for the same cases.)"""
    arch = "resnt18" if case == "unknown_model" else "mobilenet_v3_small"
    weights = "IMAGENET1K_V9" if case == "unknown_weights" else "DEFAULT"
    # an empty weights cache, and (the offline fixture) no way to download
    env = {"TORCH_HOME": str(torch_home)}
    if script == "train.py":
        result = train(train_data, tmp_path / "out", "--arch", arch, "--weights", weights, env=env)
    else:
        image = make_image(tmp_path / "cat.jpg")
        result = run_main("predict.py", image, "--arch", arch, "--weights", weights, env=env)
    expected = {
        "unknown_model": ["'resnt18'", "resnet18"],
        "unknown_weights": ["IMAGENET1K_V9", "IMAGENET1K_V1"],
        "offline": ["mobilenet_v3_small-047dcff4.pth", WEIGHTS.url, "--weights-dir"],
    }[case]
    assert_user_error(result, *expected)
    assert_no_run_dir(tmp_path / "out")


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("case", ["malformed", "unknown_key", "wrong_type"])
def test_config_file_errors(tmp_path, train_data, case):
    config = tmp_path / "run.yaml"
    config.write_text(
        {
            "malformed": "epochs: 2\nmilestones: [30, 60\nlr: 0.1\n",
            "unknown_key": "epoch: 2\n",
            "wrong_type": 'lr: "fast"\n',
        }[case]
    )
    result = train(train_data, tmp_path / "out", "--config", config)
    expected = {
        "malformed": ["run.yaml", "YAML", "line"],
        "unknown_key": ["'epoch'", "run.yaml", "epochs"],
        "wrong_type": ["lr", "float", "'fast'"],
    }[case]
    assert_user_error(result, *expected)
    assert_no_run_dir(tmp_path / "out")


COMMAND_LINE_ERRORS = {  # extra options: what the error line must say
    # suggested as it is typed
    "unknown_option": (["--lr-sheduler", "cosine"], ["--lr-sheduler", "--scheduler"]),
    "wrong_type": (["--epochs", "abc"], ["epochs", "'abc'", "int"]),
    "negative_lr": (["--lr", "-0.1"], ["lr", "positive", "-0.1"]),
    "zero_epochs": (["--epochs", "0"], ["epochs", "at least 1"]),
    "zero_batch_size": (["--batch-size", "0"], ["batch_size", "at least 1"]),
    "cuda_without_gpu": (["--device", "cuda"], ["cuda", "--device cpu"]),
}


@pytest.mark.parametrize("case", COMMAND_LINE_ERRORS)
def test_command_line_errors(tmp_path, train_data, case):
    if case == "cuda_without_gpu" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available")
    extra, expected = COMMAND_LINE_ERRORS[case]
    assert_user_error(train(train_data, tmp_path / "out", *extra), *expected)
    assert_no_run_dir(tmp_path / "out")


# ----------------------------------------------------------------------------- checkpoints


def run_with_checkpoint(route, path, tmp_path, data, home):
    """The checkpoint at `path` used by train.py --resume, test_torchvision.py --weights or predict.py
    --weights (the two latter as mobilenet_v3_small)."""
    if route == "train_resume":
        return train(data, tmp_path / "out", "--resume", path, "--arch", "mobilenet_v3_small")
    if route == "eval_weights":
        eval_folder(tmp_path / "data")
        return evaluate(tmp_path / "data", tmp_path / "out", "--weights", path, home=home)
    return run_main(
        "predict.py",
        make_image(tmp_path / "cat.jpg"),
        *"--arch mobilenet_v3_small --weights".split(),
        path,
        env={"TORCH_HOME": str(home)},
    )


@pytest.mark.parametrize(
    "route, name, expected",
    [
        ("train_resume", "resnet18-train.pt", ["resnet18", "mobilenet_v3_small"]),
        ("eval_weights", "resnet18-train.pt", ["resnet18", "mobilenet_v3_small", "architecture out"]),
        ("predict_weights", "resnet18-plain.pth", ["resnet18-plain.pth", "do not fit mobilenet_v3_small"]),
    ],
)
def test_checkpoint_of_another_architecture(
    tmp_path, train_data, weights_home, checkpoints, route, name, expected
):
    result = run_with_checkpoint(route, checkpoints / name, tmp_path, train_data, weights_home)
    assert_user_error(result, *expected)
    assert_no_run_dir(tmp_path / "out")


def test_truncated_checkpoint(tmp_path, train_data, weights_home, checkpoints):
    result = run_with_checkpoint("train_resume", checkpoints / "cut.pt", tmp_path, train_data, weights_home)
    assert_user_error(result, "cut.pt", "truncated")
    assert_no_run_dir(tmp_path / "out")


class Payload:
    """Unpickling this runs `touch MARKER`: what a hostile .pt can do to torch.load(weights_only=False)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("route", ["train_resume", "predict_weights"])  # test_torchvision.py: as predict.py
def test_checkpoint_with_a_code_payload_is_refused(tmp_path, train_data, weights_home, route):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pt"
    model = models.mobilenet_v3_small()
    torch.save({"model": model.state_dict(), "optimizer": {}, "epoch": 1, "payload": Payload(marker)}, path)
    result = run_with_checkpoint(route, path, tmp_path, train_data, weights_home)
    assert_user_error(result, "hostile.pt", "weights_only=True")
    assert not marker.exists(), "loading the checkpoint ran the code in its pickle"
    assert_no_run_dir(tmp_path / "out")
    torch.load(path, weights_only=False)  # the control: the payload is live, so the refusal above is real
    assert marker.exists()


def test_resume_auto_with_nothing_to_resume(tmp_path, train_data):
    result = train(train_data, tmp_path / "out", "--resume", "auto")
    assert_user_error(result, "--resume auto", "nothing to resume", "without --resume")
    assert_no_run_dir(tmp_path / "out")
