"""decoding.py: torchcodec's CPU decode against PIL's and torchvision.io's, the fallback to torchvision.io,
and no deprecated torchvision decoder on the tensor paths."""

import io
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import decoding
import loader
from conftest import make_image


def pil_rgb(path) -> torch.Tensor:
    return torch.from_numpy(np.array(loader.load_rgb(path))).permute(2, 0, 1)


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    """The JPEG kinds of ImageNet: RGB at two chroma subsamplings and qualities, progressive, grayscale,
    CMYK, odd sizes."""
    folder = tmp_path_factory.mktemp("jpegs")
    paths = [
        make_image(folder / "rgb.JPEG", (300, 120), seed=1),
        make_image(folder / "odd.JPEG", (33, 47), seed=2),
        make_image(folder / "gray.JPEG", (200, 150), "L", seed=3),
        make_image(folder / "cmyk.JPEG", (160, 161), "CMYK", seed=4),
    ]
    image = Image.open(paths[0]).convert("RGB")
    for name, options in {
        "444_q95": {"subsampling": 0, "quality": 95},
        "420_q60": {"subsampling": 2, "quality": 60},
        "progressive": {"progressive": True, "quality": 90},
    }.items():
        paths.append(folder / f"{name}.JPEG")
        image.save(paths[-1], "JPEG", **options)
    return paths


def test_torchcodec_decodes_every_kind_of_jpeg_as_pil_and_torchvision_do(jpegs):
    """All three decode with libjpeg-turbo's default (islow) IDCT and fancy upsampling: equal pixels."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as torchvision_decode

    assert decoding.codec_name() == "torchcodec"
    for path in jpegs:
        ours = decoding.decode_jpeg(decoding.read_bytes(path))
        assert ours.dtype == torch.uint8 and ours.shape[0] == 3
        assert torch.equal(ours, pil_rgb(path)), path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            reference = torchvision_decode(decoding.read_bytes(path), mode=ImageReadMode.RGB)
        assert torch.equal(ours, reference), path.name
    batch = decoding.decode_jpeg([decoding.read_bytes(p) for p in jpegs])
    assert all(torch.equal(b, pil_rgb(p)) for b, p in zip(batch, jpegs))
    encoded = decoding.encode_jpeg(pil_rgb(jpegs[0]), quality=90)
    assert encoded.dtype == torch.uint8 and Image.open(io.BytesIO(encoded.numpy().tobytes())).size == (
        300,
        120,
    )


def test_a_refused_jpeg_falls_back_to_pil_and_nothing_warns(jpegs, tmp_path):
    """loader.decode_rgb: torchcodec for JPEGs; PIL for a PNG named .JPEG and a JPEG torchcodec refuses
    (truncated after its header); no torchvision deprecation warning on the way."""
    png = make_image(tmp_path / "png.JPEG", (40, 30), fmt="PNG")
    truncated = tmp_path / "truncated.JPEG"
    truncated.write_bytes(jpegs[0].read_bytes()[:2000])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(loader.decode_rgb(str(png)), pil_rgb(png))
        assert torch.equal(loader.decode_rgb(str(jpegs[2])), pil_rgb(jpegs[2]))
        with pytest.raises(RuntimeError):
            decoding.decode_jpeg(decoding.read_bytes(truncated))
        with pytest.raises(OSError):  # PIL refuses it too: the loaders report the file, as for PIL
            loader.decode_rgb(str(truncated))


def test_without_torchcodec_torchvision_io_decodes_with_one_note(jpegs, monkeypatch, capsys):
    """torchcodec that can't be imported (as under torch < 2.11): torchvision.io decodes the same pixels,
    one note says so, and no deprecation warning reaches the user."""
    for name in ("torchcodec", "torchcodec.decoders", "torchcodec.encoders"):
        monkeypatch.setitem(sys.modules, name, None)  # importing them raises ImportError
    decoding.codec.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            images = [decoding.decode_jpeg(decoding.read_bytes(p)) for p in jpegs]
            batch = decoding.decode_jpeg([decoding.read_bytes(p) for p in jpegs])
            assert decoding.codec_name() == "torchvision.io"
    finally:
        decoding.codec.cache_clear()
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "torchcodec is not usable here" in notes[0], notes
    for path, one, batched in zip(jpegs, images, batch):
        assert torch.equal(one, pil_rgb(path)) and torch.equal(batched, one), path


@pytest.fixture(scope="module")
def train_images(tmp_path_factory):
    """Training JPEGs large enough for reduced decoding, one grayscale, a PNG and an EXIF-rotated JPEG
    (both left to the CPU path by --decode gpu)."""
    folder = tmp_path_factory.mktemp("train_images")
    paths = [make_image(folder / f"{i}.JPEG", (200 + 37 * i, 160 + 23 * i), seed=10 + i) for i in range(6)]
    paths.append(make_image(folder / "gray.JPEG", (240, 180), "L", seed=20))
    paths.append(make_image(folder / "png.JPEG", (150, 120), fmt="PNG", seed=21))
    rotated, exif = Image.open(paths[0]), Image.Exif()
    exif[0x0112] = 6
    rotated.save(folder / "rotated.JPEG", "JPEG", exif=exif.tobytes())
    return [*paths, folder / "rotated.JPEG"]


def ramp_config(*extra):
    """A TrainConfig whose train crop grows 32 -> 64 px over epochs 0..2."""
    from config import TrainConfig, load_config

    ramp = "--min-res 32 --max-res 64 --start-ramp 0 --end-ramp 2 --res-multiple 32".split()
    return load_config(TrainConfig, ["--dummy", *ramp, *extra])


def drawn_boxes(monkeypatch) -> list:
    """Every box v2.RandomResizedCrop draws from now on (the CPU path's own draws)."""
    from torchvision.transforms import v2

    boxes, name = [], "make_params" if hasattr(v2.RandomResizedCrop, "make_params") else "_get_params"
    original = getattr(v2.RandomResizedCrop, name)

    def spy(self, flat_inputs):
        params = original(self, flat_inputs)
        boxes.append((params["top"], params["left"], params["height"], params["width"]))
        return params

    monkeypatch.setattr(v2.RandomResizedCrop, name, spy)
    return boxes


def test_the_gpu_train_path_crops_the_cpu_paths_boxes_within_a_few_levels(train_images, monkeypatch):
    """--decode gpu's loader (the same code on a CPU here): per image and epoch, the box and flip the CPU
    path draws for that seed (along the resolution ramp); pixels differ only by the resize kernel
    (torchvision's antialiased tensor bilinear against PIL's): mean |difference| below 0.5 level of 255,
    none above 2 (on the 300 sample ImageNet JPEGs at 32 and 64 px: mean 0.07-0.10, max 1). The PNG and
    the EXIF-rotated JPEG come from the CPU path itself: equal. Without loader workers the draws leave
    torch's global RNG as they found it. A batch the device refuses is decoded image by image on the CPU,
    to the same images."""
    from presets import train_transform

    samples = [loader.Sample(str(p), i % 3) for i, p in enumerate(train_images)]
    transform = train_transform(ramp_config())
    cpu = loader.ImageDataset(samples, transform, seed=5)
    gpu = loader.GpuTrainDataset(samples, transform, seed=5)
    boxes = drawn_boxes(monkeypatch)
    for epoch, size in ((0, 32), (1, 64), (2, 64)):
        boxes.clear()
        expected = [cpu[(i, epoch, 0)][0] for i in range(len(samples))]
        plans = [gpu[(i, epoch, 0)][0] for i in range(6)]  # the JPEGs: their plans, not decoded
        assert [plan[1][:4] for plan in plans] == boxes[:6] and all(p[2] == size for p in plans)
        flips = [plan[1][4] for plan in plans]
        sampler = loader.TrainSampler(gpu, 1, 0, seed=5)
        sampler.set_epoch(epoch)
        state = torch.get_rng_state()
        batches = list(loader.GpuTrainLoader(gpu, 4, 0, torch.device("cpu"), "bilinear", sampler=sampler))
        assert torch.equal(torch.get_rng_state(), state)
        images = {int(i): image for batch in batches for image, i in zip(batch[0], batch[2])}
        assert sorted(images) == list(range(len(samples))) and not any(batch[3] for batch in batches)
        for i, image in images.items():
            difference = (image.int() - expected[i].int()).abs()
            assert (
                image.shape == (3, size, size) and difference.float().mean() < 0.5 and difference.max() <= 2
            )
            if i >= 7:  # the PNG and the rotated JPEG
                assert torch.equal(image, expected[i])
    assert True in flips and False in flips

    def refuse(data, device="cpu"):
        raise RuntimeError("Error while decoding JPEG images: unsupported")

    monkeypatch.setattr(loader, "decode_jpeg", refuse)
    again = list(loader.GpuTrainLoader(gpu, 4, 0, torch.device("cpu"), "bilinear", sampler=sampler))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(again, batches))


def test_reduced_decoding_keeps_the_boxes_and_stays_close(train_images, monkeypatch):
    """--reduced-decode: the CPU path's boxes and flips (the same draws, so the rest of the preset draws as
    before); an image whose box is shrunk less than 2x is decoded whole and equals the CPU path exactly;
    the others are decoded at 1/2 to 1/8 and stay within a mean of 3 levels of 255."""
    from presets import ReducedDecode, train_transform

    samples = [loader.Sample(str(p), 0) for p in train_images]
    plain = loader.ImageDataset(samples, train_transform(ramp_config()), seed=1)
    reduced = loader.ImageDataset(samples, train_transform(ramp_config("--reduced-decode")), seed=1)
    assert isinstance(reduced.transform.at(0), ReducedDecode)
    boxes = drawn_boxes(monkeypatch)
    exact = shrunk = 0
    for epoch in (0, 2):
        for i in range(len(samples)):
            boxes.clear()
            ours, reference = reduced[(i, epoch, 0)][0], plain[(i, epoch, 0)][0]
            assert boxes[0] == boxes[1] and ours.shape == reference.shape
            factor = min(boxes[0][2:]) / ours.shape[-1]
            if factor < 2 or i == 7:  # decoded whole (the PNG always)
                exact += 1
                assert torch.equal(ours, reference)
            else:
                shrunk += 1
                assert (ours.float() - reference.float()).abs().mean() < 3, (i, epoch, factor)
    assert shrunk >= 6 and exact >= 1


def test_train_decode_gpu_without_a_gpu_notes_it_and_refuses_cpu_policies(tmp_path):
    """train.py --decode gpu on a CPU: a note, then the CPU path; with a policy it can't run on the device,
    one line saying which recipes augment on the CPU."""
    from conftest import assert_user_error, run_main
    from test_train import TINY, make_colour_dataset

    data = make_colour_dataset(tmp_path / "data", per_class=(4, 2))
    args = ["train.py", "--data", data, *TINY, "--epochs", "1", "--batch-size", "4", "--output", tmp_path]
    ran = run_main(*args, "--decode", "gpu")
    assert ran.returncode == 0, ran.stderr
    assert "note: --decode gpu is not possible here (decoding on the GPU needs a CUDA device" in ran.stdout
    for policy in (["--auto-augment", "ta_wide"], ["--random-erase", "0.25"], ["--train-preset", "original"]):
        assert_user_error(run_main(*args, "--decode", "gpu", *policy), "--decode gpu", policy[0])
    assert_user_error(run_main(*args, "--decode", "gpu", "--reduced-decode"), "--reduced-decode")
    assert_user_error(run_main(*args, "--train-preset", "original", "--reduced-decode"), "--reduced-decode")


def test_reduced_decoding_from_tar_shards_equals_the_folders(train_images, tmp_path):
    """The shard stream's --reduced-decode decodes the same bytes with the same seeded draws as the folder
    path: image for image equal."""
    import shutil

    from conftest import run_main
    from dataset import find_samples, read_manifest
    from presets import train_transform

    for i, path in enumerate(train_images):
        (tmp_path / "train" / "abc"[i % 3]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, tmp_path / "train" / "abc"[i % 3] / path.name)
    written = run_main(
        "prepare_data.py", "make-shards", tmp_path / "train", tmp_path / "s", "--split", "train"
    )
    assert written.returncode == 0, written.stderr
    transform = train_transform(ramp_config("--reduced-decode"))
    manifest = read_manifest(tmp_path / "s", "train", imagenet_labels=False, strict=True)
    stream = loader.ShardTrainStream(manifest, transform, seed=3, rank=0, world=1, buffer=4)
    samples = find_samples(tmp_path / "train", imagenet_labels=False)[0]
    folder = loader.ImageDataset(samples, transform, seed=3)
    for epoch in (0, 2):
        stream.epoch = epoch
        items = list(stream)
        assert sorted(index for _, _, index, _ in items) == list(range(len(train_images)))
        for image, _, index, error in items:
            assert not error and torch.equal(image, folder[(index, epoch, 0)][0])
