"""Bad and unusual inputs for the reliability tests, made on the fly (nothing is shipped), and the
scripts run on tiny settings as a user would run them."""

import struct
import zlib

import numpy as np
from PIL import Image
from torchvision import models

from coder import imagenet_wnids
from conftest import make_image, run_main

WNIDS = imagenet_wnids()
WEIGHTS = models.MobileNet_V3_Small_Weights.IMAGENET1K_V1


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
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )
    return path


def bomb(path):  # > 2 x MAX_IMAGE_PIXELS: PIL raises DecompressionBombError already in Image.open
    assert 2 * Image.MAX_IMAGE_PIXELS < 20_000 * 20_000
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
                make_image(
                    root / split / name / f"{i}.png", (40, 40), fmt="PNG", seed=100 * c + 10 * i + len(split)
                )
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


TINY_TRAIN = (
    "--arch resnet18 --epochs 1 --batch-size 4 --train-crop-size 32 --val-resize-size 36 --val-crop-size 32"
)


def train(data, out, *extra, **kwargs):
    """train.py on tiny settings, run in this process (conftest.run_main: what a user sees of it, without
    a process's start); later options override earlier ones."""
    options = [*TINY_TRAIN.split(), "--workers", "0", "--output", out, "--run-name", "x"]
    return run_main("train.py", "--data", data, *options, *extra, **kwargs)


def evaluate(data, out, *extra, home):
    """test_torchvision.py on `data` with (random) mobilenet_v3_small weights from `home`, in this process."""
    options = ["--models", "mobilenet_v3_small", "--output", out, "--workers", "0", "--batch-size", "4"]
    return run_main("test_torchvision.py", "--data", data, *options, *extra, env={"TORCH_HOME": str(home)})


def assert_no_run_dir(out):
    """A run that failed to start leaves no half-made run dir behind (it would block --run-name x)."""
    assert not (out / "x").exists(), sorted(p.name for p in (out / "x").iterdir())
