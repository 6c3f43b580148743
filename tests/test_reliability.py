"""Reliability: every script, run exactly as a user would, meets bad input with one clear 'error:' line
(the problem and what to do, no traceback), and meets merely unusual input by working.

    python -m pytest -q tests/test_reliability.py              # ~33 runs of a script, ~5 s each
"""
import json
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import models

from conftest import assert_user_error, make_image, run_script, save_torchvision_checkpoint
from dataset import imagenet_wnids, load_rgb

WNIDS = imagenet_wnids()
WEIGHTS = models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
OFFLINE = {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": "", "no_proxy": ""}


# ----------------------------------------------------------------------------- inputs

def random_bytes(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


def truncated_jpeg(path):
    whole = make_image(path, (200, 200)).read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    return path


def huge_png(path, width, height):
    """A valid 1-bit PNG of width x height zeros: a few kB on disk, a decompression bomb in memory."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row, packer = b"\0" * (1 + (width + 7) // 8), zlib.compressobj(9)  # filter byte + packed bits
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return path


def bomb(path):  # > 2 x MAX_IMAGE_PIXELS: PIL raises DecompressionBombError already in Image.open
    assert 20_000 * 20_000 > 2 * Image.MAX_IMAGE_PIXELS
    return huge_png(path, 20_000, 20_000)


def near_bomb(path):  # between MAX_IMAGE_PIXELS and twice that: PIL only warns, load_rgb must refuse it too
    assert Image.MAX_IMAGE_PIXELS < 10_000 * 10_000 < 2 * Image.MAX_IMAGE_PIXELS
    return huge_png(path, 10_000, 10_000)


def sixteen_bit_png(path):
    """A horizontal ramp over the full 16-bit range, (48, 64) uint16."""
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (48, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ramp).save(path)
    return path, ramp


def exif_rotated_jpeg(path):
    image = Image.open(make_image(path, (80, 60), seed=7))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    image.save(path, exif=exif)
    return path


def train_folder(root, bad_train=None, bad_val=None):
    """root/{train,val}/{a,b}/*.png: 4 + 2 images a class, 40x40 (plus the given broken files)."""
    for c, name in enumerate("ab"):
        for split, count in (("train", 4), ("val", 2)):
            for i in range(count):
                make_image(root / split / name / f"{i}.png", (40, 40), fmt="PNG", seed=100 * c + 10 * i + len(split))
    if bad_train:
        bad_train(root / "train" / "a" / "broken.png")
    if bad_val:
        bad_val(root / "val" / "b" / "broken.png")
    return root


def eval_folder(root, *extra):
    """root/<wnid>/good.JPEG for two ImageNet classes, plus extra (name, maker) files in the first."""
    for c in (1, 2):
        make_image(root / WNIDS[c] / "good.JPEG", (64, 48), seed=c)
    return [maker(root / WNIDS[1] / name) for name, maker in extra]


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    return train_folder(tmp_path_factory.mktemp("train_data"))


@pytest.fixture(scope="module")
def weights_home(tmp_path_factory):
    """A TORCH_HOME holding (random) mobilenet_v3_small IMAGENET1K_V1 weights."""
    home = tmp_path_factory.mktemp("weights_home")
    (home / "hub" / "checkpoints").mkdir(parents=True)
    save_torchvision_checkpoint(home, "mobilenet_v3_small", WEIGHTS)
    return home


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A resnet18 checkpoint in train.py's format (2 classes), its plain state dict, and a truncated copy."""
    folder = tmp_path_factory.mktemp("checkpoints")
    model = models.resnet18(num_classes=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 1, "batch": 0, "step": 4,
             "config": {"arch": "resnet18"}, "classes": ["a", "b"]}
    torch.save(state, folder / "resnet18-train.pt")
    torch.save(model.state_dict(), folder / "resnet18-plain.pth")
    whole = (folder / "resnet18-train.pt").read_bytes()
    (folder / "cut.pt").write_bytes(whole[: len(whole) // 3])
    return folder


def train(data, out, *extra, **kwargs):
    """train.py on tiny settings (a few seconds on 2 cores); later options override earlier ones."""
    return run_script("train.py", "--data", data, "--arch", "resnet18", "--epochs", "1", "--batch-size", "4",
                      "--train-crop-size", "32", "--val-resize-size", "36", "--val-crop-size", "32", "--workers", "0",
                      "--output", out, "--run-name", "x", *extra, **kwargs)


def evaluate(data, out, *extra, home):
    return run_script("test_torchvision.py", "--data", data, "--models", "mobilenet_v3_small", "--out", out,
                      "--workers", "0", "--batch-size", "4", *extra, env={"TORCH_HOME": str(home)})


def assert_no_run_dir(out):
    """A run that failed to start leaves no half-made run dir behind (it would block --run-name x)."""
    assert not (out / "x").exists(), sorted(p.name for p in (out / "x").iterdir())


# ----------------------------------------------------------------------------- data folders

@pytest.mark.parametrize("case", ["missing", "empty", "class_without_images", "no_split_folders"])
def test_bad_data_folder(tmp_path, weights_home, case):
    data = tmp_path / "data"
    if case == "empty":
        data.mkdir()
        result = evaluate(data, tmp_path / "out", home=weights_home)
    elif case == "class_without_images":  # ImageFolder refuses it too: a class with nothing to learn
        train_folder(data)
        for split in ("train", "val"):
            (data / split / "c").mkdir()
            (data / split / "c" / "notes.txt").write_text("no images here")
    elif case == "no_split_folders":  # class folders straight in --data: train and val would be the same images
        for name in "ab":
            make_image(data / name / "0.png", (40, 40), fmt="PNG")
    if case != "empty":
        result = train(data, tmp_path / "out")
    expected = {"missing": [str(data), "does not exist"], "empty": [str(data), "no class folders"],
                "class_without_images": ["'c'", "no images"],
                "no_split_folders": ["train/", "val/"]}[case]
    assert_user_error(result, *expected)
    assert_no_run_dir(tmp_path / "out")


@pytest.mark.parametrize("maker", [random_bytes, truncated_jpeg, bomb], ids=["random_bytes", "truncated", "bomb"])
def test_unreadable_image_stops_evaluation(tmp_path, weights_home, maker):
    eval_folder(tmp_path / "data", ("broken.JPEG", maker))
    result = evaluate(tmp_path / "data", tmp_path / "out", home=weights_home)
    needles = {"bomb": ["DecompressionBomb"], "truncated": ["truncated"]}.get(maker.__name__, [])
    assert_user_error(result, "broken.JPEG", "--skip-bad-images", *needles)
    assert not (tmp_path / "out" / "eval.json").exists()


@pytest.mark.slow
def test_evaluation_skips_counts_and_lists_bad_images(tmp_path, weights_home):
    bad = eval_folder(tmp_path / "data", ("random.JPEG", random_bytes), ("truncated.JPEG", truncated_jpeg),
                      ("bomb.png", bomb), ("near_bomb.png", near_bomb))
    result = evaluate(tmp_path / "data", tmp_path / "out", "--skip-bad-images", home=weights_home)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "skipped 4 unreadable images" in output
    assert all(path.name in output for path in bad), output
    record = json.loads((tmp_path / "out" / "eval.json").read_text())[0]
    assert record["n_images"] == 2 and record["bad_images"] == sorted(map(str, bad))


@pytest.mark.slow
def test_unusual_images_load_and_are_counted(tmp_path, weights_home):
    data = tmp_path / "data"
    unusual = eval_folder(data, ("gray.JPEG", lambda p: make_image(p, mode="L", seed=3)),
                          ("cmyk.JPEG", lambda p: make_image(p, mode="CMYK", seed=4)),
                          ("png.JPEG", lambda p: make_image(p, fmt="PNG", seed=5)),
                          ("exif.JPEG", exif_rotated_jpeg),
                          ("rgba.png", lambda p: make_image(p, mode="RGBA", fmt="PNG", seed=6)),
                          ("palette.png", lambda p: make_image(p, mode="P", fmt="PNG", seed=8)),
                          ("16bit.png", lambda p: sixteen_bit_png(p)[0]))  # loads; its pixels: see below
    assert [Image.open(p).mode for p in unusual] == ["L", "CMYK", "RGB", "RGB", "RGBA", "P", "I;16"]
    assert Image.open(unusual[2]).format == "PNG" and Image.open(unusual[3]).getexif()[0x0112] == 6
    result = evaluate(data, tmp_path / "out", home=weights_home)  # no --skip-bad-images: any failure stops it
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "out" / "eval.json").read_text())[0]
    assert record["n_images"] == 2 + len(unusual) and record["bad_images"] == []


def test_16bit_png_keeps_its_picture(tmp_path):
    """A 16-bit PNG (PIL mode I;16) loads as RGB without error (and is counted, see above), but PIL's
    plain convert('RGB') clips 0..65535 at 255: the picture turns white. It must map to 0..255 instead."""
    path, ramp = sixteen_bit_png(tmp_path / "16bit.png")
    rgb = np.asarray(load_rgb(str(path))).astype(int)  # (48, 64, 3) uint8
    assert rgb.shape == (48, 64, 3)
    assert np.abs(rgb[..., 0] - (ramp.astype(int) >> 8)).max() <= 1, rgb[0, ::8, 0]


def test_non_wnid_folders_with_a_1000_way_head(tmp_path, weights_home):
    for name in ("cats", "dogs"):
        make_image(tmp_path / "data" / name / "0.JPEG")
    result = evaluate(tmp_path / "data", tmp_path / "out", home=weights_home)
    assert_user_error(result, "cats", "wnid", "fine-tune")


# ----------------------------------------------------------------------------- models and weights

@pytest.mark.parametrize("script, case", [("train.py", "unknown_model"), ("predict.py", "unknown_weights"),
                                          ("predict.py", "offline")])
def test_model_and_weights_errors(tmp_path, train_data, torch_home, script, case):
    """(test_eval.py covers test_torchvision.py for the same cases.)"""
    arch = "resnt18" if case == "unknown_model" else "mobilenet_v3_small"
    weights = "IMAGENET1K_V9" if case == "unknown_weights" else "DEFAULT"
    env = {"TORCH_HOME": str(torch_home), **OFFLINE}  # an empty weights cache, and no way to download
    if script == "train.py":
        result = train(train_data, tmp_path / "out", "--arch", arch, "--weights", weights, env=env)
    else:
        image = make_image(tmp_path / "cat.jpg")
        result = run_script("predict.py", image, "--arch", arch, "--weights", weights, env=env)
    expected = {"unknown_model": ["'resnt18'", "resnet18"], "unknown_weights": ["IMAGENET1K_V9", "IMAGENET1K_V1"],
                "offline": ["mobilenet_v3_small-047dcff4.pth", WEIGHTS.url, "--weights-dir"]}[case]
    assert_user_error(result, *expected)
    assert_no_run_dir(tmp_path / "out")


# ----------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("case", ["malformed", "unknown_key", "wrong_type"])
def test_config_file_errors(tmp_path, train_data, case):
    config = tmp_path / "run.yaml"
    config.write_text({"malformed": "epochs: 2\nmilestones: [30, 60\nlr: 0.1\n",
                       "unknown_key": "epoch: 2\n", "wrong_type": 'lr: "fast"\n'}[case])
    result = train(train_data, tmp_path / "out", "--config", config)
    expected = {"malformed": ["run.yaml", "YAML", "line"], "unknown_key": ["'epoch'", "run.yaml", "epochs"],
                "wrong_type": ["lr", "float", "'fast'"]}[case]
    assert_user_error(result, *expected)
    assert_no_run_dir(tmp_path / "out")


COMMAND_LINE_ERRORS = {  # extra options: what the error line must say
    "unknown_option": (["--lr-sheduler", "cosine"], ["--lr-sheduler", "--scheduler"]),  # suggested as it is typed
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
    """The checkpoint at `path` used by train.py --resume, test_torchvision.py --weights or predict.py --weights
    (the two latter as mobilenet_v3_small)."""
    if route == "train_resume":
        return train(data, tmp_path / "out", "--resume", path, "--arch", "mobilenet_v3_small")
    if route == "eval_weights":
        eval_folder(tmp_path / "data")
        return evaluate(tmp_path / "data", tmp_path / "out", "--weights", path, home=home)
    return run_script("predict.py", make_image(tmp_path / "cat.jpg"), "--arch", "mobilenet_v3_small", "--weights", path,
                      env={"TORCH_HOME": str(home)})


@pytest.mark.parametrize("route, name, expected", [
    ("train_resume", "resnet18-train.pt", ["resnet18", "mobilenet_v3_small"]),
    ("eval_weights", "resnet18-train.pt", ["resnet18", "mobilenet_v3_small", "--models resnet18"]),
    ("predict_weights", "resnet18-plain.pth", ["resnet18-plain.pth", "do not fit mobilenet_v3_small"]),
])
def test_checkpoint_of_another_architecture(tmp_path, train_data, weights_home, checkpoints, route, name, expected):
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


# ----------------------------------------------------------------------------- bad images in training

def test_training_stops_on_a_bad_image(tmp_path):
    data = train_folder(tmp_path / "data", bad_train=random_bytes)
    result = train(data, tmp_path / "out")
    assert_user_error(result, "broken.png", "--skip-bad-images")


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [4, 1])  # 1: a bad image's batch is empty once it is skipped
def test_training_skips_counts_and_lists_bad_images(tmp_path, batch_size):
    data = train_folder(tmp_path / "data", bad_train=random_bytes, bad_val=truncated_jpeg)
    # a 64 crop leaves resnet18's last BatchNorm 2x2 positions: batch size 1 trains
    result = train(data, tmp_path / "out", "--skip-bad-images", "--batch-size", str(batch_size),
                   "--train-crop-size", "64", "--val-resize-size", "64", "--val-crop-size", "64")
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert "skipped 2 unreadable images" in output, output  # one in train/, one in val/
    for path in (data / "train" / "a" / "broken.png", data / "val" / "b" / "broken.png"):
        assert str(path) in output, output
    assert (tmp_path / "out" / "x" / "last.pt").is_file()
