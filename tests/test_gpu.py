"""The CUDA paths, run as a user runs them: `python -m pytest -m gpu` on a machine with an NVIDIA GPU
(skipped elsewhere). AMP training (bf16; fp16 with its GradScaler) on channels_last with a resume,
--decode gpu against the exact CPU path, torchrun with NCCL, and --compile. Each test prints one
'GPU:' line with what it measured (pytest -s shows them)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import models

from coder import imagenet_wnids
from conftest import read_csv, run_script
from model import weights_file_name
from test_train import make_colour_dataset

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TRAIN = "--arch resnet18 --train-crop-size 56 --val-resize-size 64 --val-crop-size 56 --workers 4".split()
TRAIN += "--batch-size 32 --lr 0.01 --label-smoothing 0.1 --channels-last true --device cuda".split()
TORCHRUN_ONE = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
CLASSES = (1, 151, 285, 340, 417, 530, 675, 817, 920, 985)  # 10 ImageNet classes, 20 JPEGs each
WEIGHTS = models.ResNet18_Weights.IMAGENET1K_V1


def history(run_dir) -> list[dict]:
    return [{k: float(v) for k, v in row.items()} for row in read_csv(run_dir / "metrics.csv")]


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_dataset(tmp_path_factory.mktemp("colours"), per_class=(96, 12), size=(64, 64))


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_training_learns_and_resumes(colours, tmp_path, amp):
    """2 epochs straight vs 1 epoch, then --resume auto to 2, both with --deterministic: cuDNN's
    autotuned kernels (the default, cudnn.benchmark) are not bit-deterministic, and from-scratch
    training amplifies their differences, so a resume is compared where kernels are deterministic.
    Every logged loss within 1e-3 relative; the weights' largest difference is printed."""
    args = ["train.py", "--data", colours, *TRAIN, "--amp", amp, "--deterministic", "--output", tmp_path]
    straight = run_script(*args, "--epochs", "2", "--run-name", "straight")
    first = run_script(*args, "--epochs", "1", "--run-name", "split")
    resumed = run_script(*args, "--epochs", "2", "--run-name", "split", "--resume", "auto")
    for result in (straight, first, resumed):
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "device cuda:0" in straight.stdout and "resumed from" in resumed.stdout
    full, split = history(tmp_path / "straight"), history(tmp_path / "split")
    assert len(full) == len(split) == 2
    losses = [row[k] for row in full + split for k in ("train_loss", "val_loss")]
    assert all(math.isfinite(x) for x in losses), losses
    assert full[1]["train_loss"] < full[0]["train_loss"]
    for a, b in zip(full, split):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)
    weights = [
        torch.load(tmp_path / r / "last.pt", weights_only=True)["model"] for r in ("straight", "split")
    ]
    largest = max((weights[0][k].float() - weights[1][k].float()).abs().max().item() for k in weights[0])
    print(
        f"\nGPU: --amp {amp}: train loss {full[0]['train_loss']:.4f} -> {full[1]['train_loss']:.4f}; "
        f"resumed epoch 2 train loss {split[1]['train_loss']:.4f}; largest weight difference {largest:.2e}"
    )


@pytest.fixture(scope="module")
def classified(tmp_path_factory):
    """(val folder, TORCH_HOME): 10 classes of distinct colour and texture as 160x120 JPEGs, plus a PNG
    and a CMYK JPEG (which nvjpeg refuses), and resnet18 IMAGENET1K_V1 weights that tell them apart:
    random convolutions, BatchNorm statistics measured on these images and a nearest-centroid fc layer."""
    root = tmp_path_factory.mktemp("classified")
    rng, wnids, paths = np.random.default_rng(0), imagenet_wnids(), []
    for n, cls in enumerate(CLASSES):
        colour = rng.integers(30, 226, 3)
        for i in range(20):
            pixels = (
                colour
                + rng.normal(0, 25, (120, 160, 3))
                + 40 * np.sin(np.arange(160) / (2 + n))[None, :, None]
            )
            path = root / "val" / wnids[cls] / (f"{i:02d}.png" if i == 0 else f"{i:02d}.JPEG")
            path.parent.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
            (image.convert("CMYK") if i == 1 else image).save(path, **({} if i == 0 else {"quality": 90}))
            paths.append((path, cls))
    model = models.resnet18().eval()
    images = torch.stack([WEIGHTS.transforms()(Image.open(p).convert("RGB")) for p, _ in paths])
    for module in model.modules():  # running statistics = these images' (a cumulative average)
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats(), setattr(module, "momentum", None)
    with torch.no_grad():
        model.train()(images)
        model.fc = torch.nn.Identity()
        features = torch.nn.functional.normalize(model.eval()(images), dim=1)
    fc = torch.nn.Linear(512, 1000)
    fc.weight.data.zero_(), fc.bias.data.fill_(-100.0)
    targets = torch.tensor([cls for _, cls in paths])
    for cls in CLASSES:
        centroid = features[targets == cls].mean(0)
        fc.weight.data[cls], fc.bias.data[cls] = 50 * centroid / centroid.norm(), 0.0
    model.fc = fc
    home = root / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(model.state_dict(), home / "hub" / "checkpoints" / weights_file_name(WEIGHTS))
    return root / "val", home


def evaluate_folder(classified, out, *options, launcher=()) -> tuple[dict, list[dict]]:
    val, home = classified
    args = [
        *launcher,
        "test_torchvision.py",
        "--data",
        val,
        "--models",
        "resnet18",
        "--output",
        out,
        *options,
    ]
    result = run_script(*args, "--batch-size", "64", env={"TORCH_HOME": str(home)})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    record = json.loads((out / "eval.json").read_text())[0]
    return record, read_csv(out / record["predictions"])


def top1_agreement(a: list[dict], b: list[dict]) -> float:
    assert [row["path"] for row in a] == [row["path"] for row in b]
    return 100 * sum(x["top1"] == y["top1"] for x, y in zip(a, b)) / len(a)


def test_gpu_decode_agrees_with_the_exact_path(classified, tmp_path):
    exact, exact_rows = evaluate_folder(classified, tmp_path / "cpu")
    fast, fast_rows = evaluate_folder(classified, tmp_path / "gpu", "--decode", "gpu")
    assert (exact["decode"], fast["decode"]) == ("cpu", "gpu")
    assert exact["n_images"] == fast["n_images"] == 200 and not fast["bad_images"]  # the PNG and CMYK too
    assert exact["acc1"] >= 90, exact["acc1"]  # the model tells the classes apart: agreement means something
    agreement = top1_agreement(exact_rows, fast_rows)
    assert agreement >= 99
    print(
        f"\nGPU: --decode gpu: top-1 {fast['acc1']:.1f} vs exact {exact['acc1']:.1f}, "
        f"agreement {agreement:.1f}%"
    )


def test_torchrun_one_process_with_nccl_trains_and_evaluates(colours, classified, tmp_path):
    args = ["train.py", "--data", colours, *TRAIN, "--amp", "bf16", "--epochs", "1", "--output", tmp_path]
    trained = run_script(*TORCHRUN_ONE, *args)
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    assert "process group nccl" in trained.stdout, trained.stdout[-2000:]
    plain, plain_rows = evaluate_folder(classified, tmp_path / "plain")
    ranked, ranked_rows = evaluate_folder(classified, tmp_path / "torchrun", launcher=TORCHRUN_ONE)
    assert plain["n_images"] == ranked["n_images"] == 200
    assert top1_agreement(plain_rows, ranked_rows) == 100 and plain["acc1"] == ranked["acc1"]
    print(
        "\nGPU: torchrun + NCCL: trained 1 epoch; evaluation equal to one process "
        f"(top-1 {ranked['acc1']:.1f})"
    )


def test_compile_trains_and_evaluates(colours, classified, tmp_path):
    args = [
        "train.py",
        "--data",
        colours,
        *TRAIN,
        "--amp",
        "bf16",
        "--epochs",
        "2",
        "--compile",
        "--output",
        tmp_path,
    ]
    trained = run_script(*args, "--run-name", "compiled")
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-3000:]
    rows = history(tmp_path / "compiled")
    assert (
        all(math.isfinite(row["train_loss"]) for row in rows)
        and rows[1]["train_loss"] < rows[0]["train_loss"]
    )
    eager, eager_rows = evaluate_folder(classified, tmp_path / "eager")
    compiled, compiled_rows = evaluate_folder(classified, tmp_path / "compiled_eval", "--compile")
    agreement = top1_agreement(eager_rows, compiled_rows)
    assert agreement >= 99 and abs(compiled["acc1"] - eager["acc1"]) <= 1
    print(
        f"\nGPU: --compile: train loss {rows[0]['train_loss']:.4f} -> {rows[1]['train_loss']:.4f}; "
        f"evaluation top-1 {compiled['acc1']:.1f} vs eager {eager['acc1']:.1f}, agreement {agreement:.1f}%"
    )
