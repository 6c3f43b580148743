"""Reliability: every script, run exactly as a user would, meets bad input with one clear 'error:' line
(the problem and what to do, no traceback), and meets merely unusual input by working.

    python -m pytest -q tests/test_reliability.py              # data folders and images
    python -m pytest -q tests/test_reliability_options.py      # models, weights, configs, checkpoints
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import assert_user_error, make_image, run_main
from loader import load_rgb
from reliability_inputs import (
    WNIDS,
    assert_no_run_dir,
    bomb,
    eval_folder,
    evaluate,
    exif_rotated_jpeg,
    near_bomb,
    random_bytes,
    sixteen_bit_png,
    train,
    train_folder,
    truncated_jpeg,
)

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
    # class folders straight in --data: train and val would be the same images
    elif case == "no_split_folders":
        for name in "ab":
            make_image(data / name / "0.png", (40, 40), fmt="PNG")
    if case != "empty":
        result = train(data, tmp_path / "out")
    expected = {
        "missing": [str(data), "does not exist"],
        "empty": [str(data), "no class folders"],
        "class_without_images": ["'c'", "no images"],
        "no_split_folders": ["train/", "val/"],
    }[case]
    assert_user_error(result, *expected)
    assert_no_run_dir(tmp_path / "out")


@pytest.mark.parametrize(
    "maker", [random_bytes, truncated_jpeg, bomb], ids=["random_bytes", "truncated", "bomb"]
)
def test_unreadable_image_stops_evaluation(tmp_path, weights_home, maker):
    eval_folder(tmp_path / "data", ("broken.JPEG", maker))
    result = evaluate(tmp_path / "data", tmp_path / "out", home=weights_home)
    needles = {"bomb": ["DecompressionBomb"], "truncated": ["truncated"]}.get(maker.__name__, [])
    assert_user_error(result, "broken.JPEG", "--skip-bad-images", "prepare_data.py check", *needles)
    assert not (tmp_path / "out" / "eval.json").exists()


@pytest.mark.slow
def test_evaluation_skips_counts_and_lists_bad_images(tmp_path, weights_home):
    bad = eval_folder(
        tmp_path / "data",
        ("random.JPEG", random_bytes),
        ("truncated.JPEG", truncated_jpeg),
        ("bomb.png", bomb),
        ("near_bomb.png", near_bomb),
    )
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
    # loads; its pixels: see below
    unusual = eval_folder(
        data,
        ("gray.JPEG", lambda p: make_image(p, mode="L", seed=3)),
        ("cmyk.JPEG", lambda p: make_image(p, mode="CMYK", seed=4)),
        ("png.JPEG", lambda p: make_image(p, fmt="PNG", seed=5)),
        ("exif.JPEG", exif_rotated_jpeg),
        ("rgba.png", lambda p: make_image(p, mode="RGBA", fmt="PNG", seed=6)),
        ("palette.png", lambda p: make_image(p, mode="P", fmt="PNG", seed=8)),
        ("16bit.png", lambda p: sixteen_bit_png(p)[0]),
    )
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


def test_file_names_that_are_not_utf8_are_evaluated_and_written(tmp_path, weights_home):
    """Scraped datasets hold file names that are not valid UTF-8: they are read, counted, printed and
    written back to the predictions file as the same bytes."""
    eval_folder(tmp_path / "data")
    good = tmp_path / "data" / WNIDS[1] / "good.JPEG"
    odd = os.fsencode(good.parent) + b"/caf\xe9.JPEG"
    with open(odd, "wb") as f:
        f.write(good.read_bytes())
    result = evaluate(tmp_path / "data", tmp_path / "out", home=weights_home)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "out" / "eval.json").read_text())[0]
    assert record["n_images"] == 3
    assert b"caf\xe9.JPEG" in (tmp_path / "out" / record["predictions"]).read_bytes()


def test_out_that_is_a_file(tmp_path, weights_home):
    eval_folder(tmp_path / "data")
    (tmp_path / "out").write_text("my notes")
    assert_user_error(evaluate(tmp_path / "data", tmp_path / "out", home=weights_home), "out", "is a file")
    assert (tmp_path / "out").read_text() == "my notes"


def test_non_wnid_folders_with_a_1000_way_head(tmp_path, weights_home):
    for name in ("cats", "dogs"):
        make_image(tmp_path / "data" / name / "0.JPEG")
    result = evaluate(tmp_path / "data", tmp_path / "out", home=weights_home)
    assert_user_error(result, "cats", "wnid", "fine-tune")


# ----------------------------------------------------------------------------- bad images in training


def test_training_stops_on_a_bad_image(tmp_path):
    data = train_folder(tmp_path / "data", bad_train=random_bytes)
    result = train(data, tmp_path / "out")
    assert_user_error(result, "broken.png", "--skip-bad-images", "prepare_data.py check")


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [4, 1])  # 1: a bad image's batch is empty once it is skipped
def test_training_skips_counts_and_lists_bad_images(tmp_path, batch_size):
    data = train_folder(tmp_path / "data", bad_train=random_bytes, bad_val=truncated_jpeg)
    # a 64 crop leaves resnet18's last BatchNorm 2x2 positions: batch size 1 trains
    result = train(
        data,
        tmp_path / "out",
        "--skip-bad-images",
        "--batch-size",
        str(batch_size),
        *"--train-crop-size 64 --val-resize-size 64 --val-crop-size 64".split(),
    )
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert "skipped 2 unreadable images" in output, output  # one in train/, one in val/
    for path in (data / "train" / "a" / "broken.png", data / "val" / "b" / "broken.png"):
        assert str(path) in output, output
    assert (tmp_path / "out" / "x" / "last.pt").is_file()


# ----------------------------------------------------------------------------- a dataset checked before a run


def test_check_lists_every_unreadable_image_of_a_dataset(tmp_path):
    """prepare_data.py check DIR decodes every image of train/ and val/ in worker processes, as a run
    would: a truncated JPEG and a zero-byte file are listed with why, one line each, after them a summary,
    and one error line; their paths go to --output. Without them it passes."""
    data = train_folder(tmp_path / "data")  # 12 PNGs
    for split in ("train", "val"):
        make_image(data / split / "b" / "photo.jpg", (40, 30))
    cut = truncated_jpeg(data / "train" / "a" / "cut.JPEG")
    empty = data / "val" / "b" / "empty.jpg"
    empty.write_bytes(b"")
    listing = tmp_path / "unreadable.txt"
    result = run_main("prepare_data.py", "check", data, "--workers", "2", "--output", listing)
    assert_user_error(result, "2 of the 16 images", str(data), "--skip-bad-images")
    *bad, summary = result.stdout.splitlines()
    assert [line.split(": ")[0] for line in bad] == [str(cut), str(empty)], result.stdout
    assert "truncated" in bad[0].lower() and bad[1].endswith(": an empty file (0 bytes)")
    assert summary.startswith("16 images checked in ")
    assert summary.endswith(f", 2 unreadable (their paths: {listing})")
    assert listing.read_text().splitlines() == [str(cut), str(empty)]

    cut.unlink()
    empty.unlink()
    clean = run_main("prepare_data.py", "check", data, "--output", listing)
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.startswith("14 images checked in ") and clean.stdout.endswith(", 0 unreadable\n")
    assert listing.read_text() == ""
