"""No data lost: a failed checkpoint write (a full disk) keeps the previous checkpoint whole, and an
interrupted evaluation sweep keeps every finished row."""

import errno
import hashlib
import json

import pytest
import torch
from torchvision import models

from coder import imagenet_wnids
from config import TrainConfig, load_config, parse_config
from conftest import make_image, save_torchvision_checkpoint
from test_train import TINY, make_colour_dataset
from train import main as train_main
from utils import UserError


def test_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    data = make_colour_dataset(tmp_path / "data", per_class=(4, 2))
    args = ["--data", str(data), *TINY, "--batch-size", "4", "--output", str(tmp_path), "--run-name", "disk"]
    train_main(load_config(TrainConfig, [*args, "--epochs", "1"]))
    last = tmp_path / "disk" / "last.pt"
    before = hashlib.sha256(last.read_bytes()).hexdigest()

    def full_disk(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="No space left on device.*previous file is intact"):
        train_main(load_config(TrainConfig, [*args, "--epochs", "2", "--resume", "auto"]))
    assert hashlib.sha256(last.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in (tmp_path / "disk").iterdir() if p.name.endswith(".tmp")) == []
    monkeypatch.undo()
    assert torch.load(last, weights_only=True)["epoch"] == 1


def test_an_unreadable_val_image_keeps_the_epochs_training(tmp_path, capsys):
    """Validation meets a broken val image after an epoch of training: the run stops with one error,
    last.pt holds the trained epoch (written before validating), and once the file is removed, the
    command the note gives (no --data: the run's own settings) validates that epoch without training it
    again, even at another batch size, and ends as a run that never saw the file."""
    data = make_colour_dataset(tmp_path / "data", per_class=(4, 2))
    clean = make_colour_dataset(tmp_path / "clean", per_class=(4, 2))
    (data / "val" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    args = [*TINY, "--batch-size", "4", "--epochs", "1", "--output", str(tmp_path)]
    with pytest.raises(UserError, match="cannot read image .*broken.png"):
        train_main(load_config(TrainConfig, ["--data", str(data), *args, "--run-name", "broken"]))
    note = capsys.readouterr().err
    assert f"continue with --output {tmp_path} --run-name broken --resume auto" in note, note
    saved = torch.load(tmp_path / "broken" / "last.pt", weights_only=True)
    # 12 images, batch 4: all trained
    assert (saved["epoch"], saved["batch"], saved["trained"]) == (0, 3, True)
    (data / "val" / "red" / "broken.png").unlink()
    resume = note.split("continue with ")[1].split() + ["--batch-size", "2"]  # and a batch of another size
    resumed = train_main(*parse_config(TrainConfig, resume))
    straight = train_main(load_config(TrainConfig, ["--data", str(clean), *args, "--run-name", "straight"]))
    assert resumed["steps"] == straight["steps"] == 3  # validated, not trained again
    rows = [run["history"][0] for run in (resumed, straight)]
    assert len(resumed["history"]) == 1 and rows[0]["img_per_s"] > 0 and rows[0]["epoch_time_s"] > 0
    for key in ("train_loss", "train_acc1", "val_acc1", "val_acc5", "lr"):
        assert rows[0][key] == rows[1][key], key
    assert rows[0]["val_loss"] == pytest.approx(rows[1]["val_loss"], rel=1e-6)  # batches of 2, not 4
    finished = [
        torch.load(tmp_path / r / "last.pt", weights_only=True)["model"] for r in ("broken", "straight")
    ]
    assert all(torch.equal(finished[0][k], finished[1][k]) for k in finished[0])


def test_interrupted_sweep_keeps_finished_rows(tmp_path, torch_home, monkeypatch):
    import test_torchvision

    wnids = imagenet_wnids()
    for i in range(3):
        make_image(tmp_path / "val" / wnids[i] / f"{i}.JPEG", seed=i)
    for arch, weights in (
        ("mobilenet_v3_small", models.MobileNet_V3_Small_Weights.IMAGENET1K_V1),
        ("squeezenet1_1", models.SqueezeNet1_1_Weights.IMAGENET1K_V1),
    ):
        save_torchvision_checkpoint(torch_home, arch, weights)
    real_evaluate, calls = test_torchvision.evaluate, []

    def evaluate_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second model
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(test_torchvision, "evaluate", evaluate_then_interrupt)
    argv = ["--data", str(tmp_path / "val"), "--output", str(tmp_path / "out"), "--workers", "0"]
    argv += ["--models", "mobilenet_v3_small", "squeezenet1_1"]
    with pytest.raises(SystemExit) as exit_info:
        test_torchvision.main(argv)
    assert exit_info.value.code == 130
    rows = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [r["model"] for r in rows] == ["mobilenet_v3_small"] and rows[0]["n_images"] == 3
    monkeypatch.setattr(test_torchvision, "evaluate", real_evaluate)
    test_torchvision.main(argv)  # the re-run skips the finished row and adds the other
    rows = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [r["model"] for r in rows] == ["mobilenet_v3_small", "squeezenet1_1"]
