"""export.py: an ONNX file that describes itself, equals PyTorch, and runs in predict.py."""

import gc
import json

import pytest
import torch
from torchvision import models

from backends import OnnxRuntimeModel
from coder import imagenet_wnids
from conftest import make_image, read_csv, run_main, run_script, save_torchvision_checkpoint
from export import main
from model import onnx_metadata, resolve_weights, weights_enum
from presets import EvalPreset

WEIGHTS = models.ResNet18_Weights.IMAGENET1K_V1


def test_exported_resnet18_equals_pytorch_and_describes_itself(tmp_path, torch_home, capsys):
    # random weights, torchvision's file name
    model = save_torchvision_checkpoint(torch_home, "resnet18", WEIGHTS)
    for i in range(4):
        make_image(tmp_path / "images" / imagenet_wnids()[i] / f"{i}.JPEG", (90 + 10 * i, 80), seed=i)
    out = tmp_path / "r18.onnx"
    options = [
        "--arch",
        "resnet18",
        "--weights",
        "DEFAULT",
        "--output",
        str(out),
        "--images",
        str(tmp_path / "images"),
    ]
    result = main(options)
    assert result["max_abs_diff"] <= 1e-4 and result["top5_agreement"] == 100.0
    assert "top-5 agree on 100%" in capsys.readouterr().out
    # independently: torchvision's model on other inputs, any batch size (the batch dimension is dynamic)
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        expected = model(x)
    actual = OnnxRuntimeModel(out)(x)
    assert actual.shape == (3, 1000) and (actual - expected).abs().max() <= 1e-4
    assert torch.equal(actual.topk(5).indices, expected.topk(5).indices)
    meta = onnx_metadata(out)  # the metadata round trip
    assert (meta["arch"], meta["source"]) == ("resnet18", str(WEIGHTS))
    preset = EvalPreset.from_weights(WEIGHTS)
    assert meta["preprocessing"] == json.loads(json.dumps(preset.__dict__))
    assert meta["classes"] == WEIGHTS.meta["categories"] and meta["wnids"] == imagenet_wnids()


def test_predict_runs_the_onnx_file_like_the_pytorch_weights(tmp_path, torch_home, capsys):
    import predict

    save_torchvision_checkpoint(torch_home, "resnet18", WEIGHTS)
    out = tmp_path / "r18.onnx"
    main(["--arch", "resnet18", "--weights", "DEFAULT", "--output", str(out), "--count", "2"])
    image = make_image(tmp_path / "cat.jpg", (120, 100), seed=3)
    capsys.readouterr()
    predict.main([str(image), "--arch", "resnet18", "--json"])
    from_pytorch = json.loads(capsys.readouterr().out)[0]["predictions"]
    predict.main([str(image), "--weights", str(out), "--json"])
    from_onnx = json.loads(capsys.readouterr().out)[0]["predictions"]
    assert [p["index"] for p in from_onnx] == [p["index"] for p in from_pytorch]
    assert [p["prob"] for p in from_onnx] == pytest.approx([p["prob"] for p in from_pytorch], abs=1e-5)
    assert from_onnx[0]["name"] == from_pytorch[0]["name"]


def test_a_train_py_checkpoint_exports_with_its_classes_and_preprocessing(tmp_path):
    net = models.resnet18(num_classes=2)
    config = {"arch": "resnet18", "val_resize_size": 72, "val_crop_size": 64, "interpolation": "bicubic"}
    state = {
        "model": net.state_dict(),
        "optimizer": {},
        "epoch": 1,
        "config": config,
        "classes": ["cat", "dog"],
    }
    torch.save(state, tmp_path / "best.pt")
    out = tmp_path / "pets.onnx"
    result = main(["--weights", str(tmp_path / "best.pt"), "--output", str(out)])  # the checkpoint's own arch
    assert result["max_abs_diff"] <= 1e-4
    meta = onnx_metadata(out)
    assert meta["arch"] == "resnet18" and meta["classes"] == ["cat", "dog"] and meta["wnids"] is None
    assert (meta["preprocessing"]["resize"], meta["preprocessing"]["crop"]) == (72, 64)
    assert meta["preprocessing"]["interpolation"] == "bicubic"
    assert OnnxRuntimeModel(out)(torch.randn(1, 3, 64, 64)).shape == (1, 2)


def save_train_checkpoint(path, logit_scale: float = 1.0):
    """A train.py checkpoint of a random resnet18 with 10 classes at crop 64, its head scaled by
    `logit_scale`."""
    torch.manual_seed(0)
    net = models.resnet18(num_classes=10)
    with torch.no_grad():
        net.fc.weight.mul_(logit_scale), net.fc.bias.mul_(logit_scale)
    config = {"arch": "resnet18", "val_resize_size": 72, "val_crop_size": 64}
    classes = [f"class{i}" for i in range(10)]
    torch.save(
        {"model": net.state_dict(), "optimizer": {}, "epoch": 1, "config": config, "classes": classes}, path
    )
    return net.eval()


def test_large_logits_export_within_a_tolerance_relative_to_their_size(tmp_path):
    """A run whose loss blew up: logits ~1e5 differ from ONNX Runtime's by ~0.1 from float32 rounding
    alone, far over an absolute 1e-3, yet the export is right: the check scales with the logits."""
    net = save_train_checkpoint(tmp_path / "best.pt", logit_scale=1e5)
    with torch.no_grad():
        assert net(torch.randn(2, 3, 64, 64)).abs().max() > 3e4
    result = main(
        ["--arch", "resnet18", "--weights", str(tmp_path / "best.pt"), "--output", str(tmp_path / "big.onnx")]
    )
    assert result["top5_agreement"] == 100.0 and result["max_rel_diff"] <= 1e-5
    assert result["max_abs_diff"] > 1e-3  # the case an absolute tolerance refused
    assert OnnxRuntimeModel(tmp_path / "big.onnx")(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_an_export_that_fails_the_check_is_never_written(tmp_path, monkeypatch, capsys):
    """The exported model's head corrupted between export and check (as a mistranslation would): one
    line, exit 2, no file at --output, no temporary file beside it, and a previous file there untouched."""
    import onnx
    from onnx import numpy_helper

    import backends

    exported = backends.onnx_bytes

    def corrupted(*args, **kwargs):
        proto = onnx.load_from_string(exported(*args, **kwargs))
        [head] = [t for t in proto.graph.initializer if t.name == "fc.weight"]
        head.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(head), head.name))
        return proto.SerializeToString()

    save_train_checkpoint(tmp_path / "best.pt")
    monkeypatch.setattr(backends, "onnx_bytes", corrupted)
    previous = tmp_path / "old.onnx"
    previous.write_bytes(b"a previous export")
    for out in (tmp_path / "new.onnx", previous):
        with pytest.raises(SystemExit) as stop:
            main(
                [
                    "--arch",
                    "resnet18",
                    "--weights",
                    str(tmp_path / "best.pt"),
                    "--output",
                    str(out),
                    "--count",
                    "2",
                ]
            )
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: the ONNX export of resnet18 differs from PyTorch") and "\n" not in err
        assert f"{out} was not written" in err
    assert "the previous file is kept" in err and previous.read_bytes() == b"a previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "old.onnx"]
    # no ONNX Runtime session left in the error's traceback: a process forked later (a Pool, a DataLoader
    # worker) that collects it as garbage hangs on the session's thread-pool locks
    assert not [o for o in gc.get_objects() if isinstance(o, backends.OnnxRuntimeModel)]


def test_an_export_failure_is_one_line_naming_the_model(tmp_path, torch_home, monkeypatch, capsys):
    def unsupported(*args, **kwargs):
        raise RuntimeError("Unsupported: aten::frobnicate has no ONNX translation\nlong trace...")

    monkeypatch.setattr(torch.onnx, "export", unsupported)
    with pytest.raises(SystemExit) as stop:
        main(
            [
                "--arch",
                "squeezenet1_1",
                "--weights",
                "none",
                "--output",
                str(tmp_path / "s.onnx"),
                "--count",
                "1",
            ]
        )
    assert stop.value.code == 2 and not (tmp_path / "s.onnx").exists()
    err = capsys.readouterr().err
    assert err.strip() == (
        "error: squeezenet1_1 cannot be exported to ONNX: RuntimeError: Unsupported: aten::frobnicate has no "
        "ONNX translation"
    )
    with pytest.raises(SystemExit):
        main(["--arch", "resnet18", "--weights", "none", "--output", str(tmp_path)])  # a folder, not a file
    assert "is a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a checkpoint's suffix: every script would read it as one
        main(["--arch", "resnet18", "--weights", "none", "--output", str(tmp_path / "r18.pt")])
    assert f"name it {tmp_path / 'r18.onnx'}" in capsys.readouterr().err


def test_onnxruntime_backend_evaluates_like_pytorch(tmp_path, torch_home):
    save_torchvision_checkpoint(torch_home, "resnet18", WEIGHTS)
    for i in range(12):
        make_image(tmp_path / "val" / imagenet_wnids()[i % 4] / f"{i}.JPEG", (70 + 5 * i, 64), seed=i)
    options = "--models resnet18 --resize 64 --crop 56 --batch-size 5 --workers 0".split()
    args = ["test_torchvision.py", "--data", tmp_path / "val", *options, "--output", tmp_path / "out"]
    env = {"TORCH_HOME": str(torch_home)}
    for backend in ("pytorch", "onnxruntime"):
        result = run_main(*args, "--backend", backend, env=env)
        assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [r["backend"] for r in rows] == ["pytorch", "onnxruntime"]  # the backend is part of the row's key
    assert [(r["n_images"], r["acc1"], r["acc5"]) for r in rows[:1]] == [
        (r["n_images"], r["acc1"], r["acc5"]) for r in rows[1:]
    ]
    top1 = [{p["path"]: p["top1"] for p in read_csv(tmp_path / "out" / r["predictions"])} for r in rows]
    assert top1[0] == top1[1] and len(top1[0]) == 12
    # named by the weights and a metadata hash
    [cached] = (tmp_path / "out" / "onnx").glob(f"{WEIGHTS}_*.onnx")
    again = run_main(*args, "--backend", "onnxruntime", env=env)
    assert "already in" in again.stdout + again.stderr
    written = cached.stat().st_mtime_ns
    assert run_script(*args, "--backend", "onnxruntime", "--force", env=env).returncode == 0
    assert cached.stat().st_mtime_ns == written  # reused, not exported again
    # --weights FILE.onnx: export.py's file, its architecture and preprocessing from its metadata
    exported = tmp_path / "r18.onnx"
    main(["--arch", "resnet18", "--weights", "DEFAULT", "--output", str(exported), "--count", "1"])
    given = run_script(
        "test_torchvision.py",
        "--data",
        tmp_path / "val",
        "--weights",
        exported,
        "--output",
        tmp_path / "given",
        "--workers",
        "0",
        env=env,
    )
    assert given.returncode == 0, given.stderr
    row = json.loads((tmp_path / "given" / "eval.json").read_text())[0]
    assert (row["model"], row["backend"], row["crop"]) == ("resnet18", "onnxruntime", 224)
    # the weights it was exported from give its published numbers (on all of ImageNet val: test_new_user.py)
    assert resolve_weights(exported).published == weights_enum("resnet18", "DEFAULT")


def test_out_of_memory_retries_with_half_the_batch_and_records_it(tmp_path, torch_home, monkeypatch, capsys):
    """A model whose forward raises torch's OutOfMemoryError above batch 2: the row is evaluated at batch
    2 (8 -> 4 -> 2), equal to an evaluation at batch 2 from the start; a model that never fits is skipped."""
    import test_torchvision

    save_torchvision_checkpoint(torch_home, "resnet18", WEIGHTS)
    for i in range(7):
        make_image(tmp_path / "val" / imagenet_wnids()[i % 3] / f"{i}.JPEG", (70 + 5 * i, 64), seed=i)
    out_of_memory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)

    class Greedy(torch.nn.Module):
        def __init__(self, model, fits: int):
            super().__init__()
            self.model, self.fits = model, fits

        def forward(self, x):
            if x.shape[0] > self.fits:
                raise out_of_memory(f"tried to allocate for a batch of {x.shape[0]}")
            return self.model(x)

    build = test_torchvision.build_model
    options = "--models resnet18 --resize 64 --crop 56 --workers 0 --force".split()
    args = ["--data", str(tmp_path / "val"), *options]
    test_torchvision.main([*args, "--batch-size", "2", "--output", str(tmp_path / "fits")])
    monkeypatch.setattr(test_torchvision, "build_model", lambda *a, **k: Greedy(build(*a, **k), fits=2))
    test_torchvision.main([*args, "--batch-size", "8", "--output", str(tmp_path / "retried")])
    fits, retried = (json.loads((tmp_path / d / "eval.json").read_text())[0] for d in ("fits", "retried"))
    assert retried["batch_size"] == 2 and (retried["n_images"], retried["acc1"], retried["acc5"]) == (
        fits["n_images"],
        fits["acc1"],
        fits["acc5"],
    )
    assert "trying again with batch 4" in capsys.readouterr().out
    monkeypatch.setattr(test_torchvision, "build_model", lambda *a, **k: Greedy(build(*a, **k), fits=0))
    test_torchvision.main([*args, "--batch-size", "4", "--output", str(tmp_path / "never")])
    assert "out of memory even at batch 1, skipped" in capsys.readouterr().out
    assert not (tmp_path / "never" / "eval.json").exists()
