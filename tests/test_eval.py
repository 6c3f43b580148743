"""Data layer and pretrained evaluation: preprocessing equal to torchvision's, labels right in every
layout, evaluation equal to an independent reference loop, and clear errors."""

import gc
import itertools
import json
import threading
import time
import weakref

import pytest
import torch
from PIL import Image
from torchvision import models
from torchvision.datasets import ImageFolder

import loader
from coder import imagenet_wnids
from conftest import (
    assert_user_error,
    make_image,
    read_csv,
    run_main,
    run_script,
    save_torchvision_checkpoint,
)
from dataset import Sample, find_samples, val_labels
from engine import add_to_bins
from loader import GpuDecodeLoader, ImageDataset, build_loader, decoded_ahead, load_rgb
from model import ARCHS, QUANTIZED_ARCHS, all_weights
from prepare_data import prepare_val
from presets import EvalPreset, normalize
from utils import OUT_OF_MEMORY, UserError

WNIDS = imagenet_wnids()
WEIGHTS = models.MobileNet_V3_Small_Weights.IMAGENET1K_V1


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory):
    """Several sizes and aspect ratios, grayscale, CMYK and a PNG saved under a .JPEG name."""
    folder = tmp_path_factory.mktemp("odd")
    return [
        make_image(folder / "wide.JPEG", (300, 120), seed=1),
        make_image(folder / "tall.JPEG", (90, 257), seed=2),
        make_image(folder / "small.JPEG", (33, 47), seed=3),
        make_image(folder / "gray.JPEG", (200, 150), "L", seed=4),
        make_image(folder / "cmyk.JPEG", (160, 161), "CMYK", seed=5),
        make_image(folder / "png.JPEG", (120, 90), fmt="PNG", seed=6),
    ]


def test_eval_preprocessing_equals_weights_transforms_for_all_weights(odd_images):
    pil = [load_rgb(p) for p in odd_images]
    assert [Image.open(p).mode for p in odd_images[3:5]] == ["L", "CMYK"]
    weights = [w for arch in ARCHS + QUANTIZED_ARCHS for w in all_weights(arch)]
    assert len(weights) >= 129  # the int8 weights too
    checked = {}  # weights with the same transforms() settings are compared once
    for w in weights:
        preset, reference = EvalPreset.from_weights(w), w.transforms()
        key = (repr(reference), reference.antialias)  # the repr lists sizes, mean, std, interpolation
        if key in checked:
            assert checked[key] == preset, w
            continue
        for image in pil:
            ours = normalize(preset(image)[None], preset.mean, preset.std)[0]
            assert (ours - reference(image)).abs().max().item() <= 1e-6, (w, image.size)
        checked[key] = preset
    assert len(checked) >= 10


def make_folder(root, classes, per_class=2, seed=0):
    for c, name in enumerate(classes):
        for i in range(per_class):
            make_image(root / name / f"img_{i}.JPEG", (64 + 16 * i, 48 + 8 * c), seed=seed + 10 * c + i)
    return root


def test_subset_folder_keeps_imagenet_indices(tmp_path):
    make_folder(tmp_path / "val", [WNIDS[5], WNIDS[500], WNIDS[999]], per_class=1)
    samples, classes = find_samples(tmp_path, "val")  # the root: val/ is found
    assert [s.target for s in samples] == [5, 500, 999] and len(classes) == 1000


def test_custom_class_names_index_from_zero_when_not_imagenet(tmp_path):
    make_folder(tmp_path, ["cat", "dog"], per_class=1)
    samples, classes = find_samples(tmp_path, "train", imagenet_labels=False)
    assert [s.target for s in samples] == [0, 1] and classes == ["cat", "dog"]


def test_an_extracted_devkit_labels_the_flat_val_folder(tmp_path):
    """ILSVRC2012_devkit_t12/: data/meta.mat maps the devkit's own class ids (not in wnid order) to
    wnids, data/ILSVRC2012_validation_ground_truth.txt gives each val image's id; the folder, or the
    ground-truth file inside it, labels the flat val folder."""
    import numpy as np
    import scipy.io

    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    shuffled = np.random.default_rng(0).permutation(1000)  # devkit id i + 1 is wnid shuffled[i]
    fields = [(name, "O") for name in ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children")]
    leaves = [(i + 1, WNIDS[shuffled[i]], "words", "gloss", 0) for i in range(1000)]
    synsets = np.array([*leaves, (1001, "n00001740", "entity", "a parent synset", 3)], dtype=fields)
    scipy.io.savemat(devkit / "meta.mat", {"synsets": synsets})
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("5\n1\n1000\n")
    for i in (1, 2, 3):
        make_image(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", seed=i)
    expected = [int(shuffled[4]), int(shuffled[0]), int(shuffled[999])]
    for labels in (devkit.parent, devkit / "ILSVRC2012_validation_ground_truth.txt"):
        assert [s.target for s in find_samples(tmp_path / "val", labels_file=labels)[0]] == expected
    (devkit / "meta.mat").write_bytes(b"not a MAT file")
    with pytest.raises(UserError, match="not a readable ImageNet devkit"):
        val_labels(devkit.parent)


def test_flat_val_folder_labels_from_package_and_files(tmp_path):
    for i in (1, 2, 3):
        make_image(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", seed=i)
    samples, _ = find_samples(tmp_path / "val")
    package = val_labels()
    assert [s.target for s in samples] == [package[f"ILSVRC2012_val_{i:08d}.JPEG"] for i in (1, 2, 3)]
    assert samples[0].target == 65  # ILSVRC2012_val_00000001 is a sea snake (n01751748)
    kaggle = tmp_path / "LOC_val_solution.csv"
    kaggle.write_text(
        "ImageId,PredictionString\n"
        + "".join(
            f"ILSVRC2012_val_{i:08d},{WNIDS[i * 10]} 1 2 3 4 {WNIDS[i * 10]} 5 6 7 8\n" for i in (1, 2, 3)
        )
    )
    assert [s.target for s in find_samples(tmp_path / "val", labels_file=kaggle)[0]] == [10, 20, 30]
    prepare_val(tmp_path / "val", kaggle)
    prepare_val(tmp_path / "val", kaggle)  # idempotent
    link = tmp_path / "val" / WNIDS[10] / "ILSVRC2012_val_00000001.JPEG"
    assert (
        link.is_symlink() and link.resolve() == (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").resolve()
    )
    assert [s.target for s in find_samples(tmp_path / "val")[0]] == [10, 20, 30]


def reference_predictions(model, folder, weights):
    """pytorch/examples-style loop: ImageFolder + weights.transforms(), no code of ours."""
    dataset = ImageFolder(str(folder), transform=weights.transforms())
    index = {w: i for i, w in enumerate(WNIDS)}
    rows = []
    with torch.no_grad():
        for path, folder_target in dataset.samples:
            probs = model(weights.transforms()(Image.open(path).convert("RGB"))[None]).softmax(1)[0]
            top, target = probs.topk(5), index[dataset.classes[folder_target]]
            rows.append(
                (path, target, top.indices.tolist(), top.values.tolist(), -probs[target].log().item())
            )
    return rows


@pytest.mark.slow
def test_evaluation_equals_reference_loop(tmp_path, torch_home):
    # a random resnet18's logits are O(1): top-5 order is stable
    weights = models.ResNet18_Weights.IMAGENET1K_V1
    model = save_torchvision_checkpoint(torch_home, "resnet18", weights)
    # put each image in the folder of the class the model ranks 1st (8 images), 5th (4), 3rd (2) or
    # nowhere near (1) for it: top-1 8/15, top-5 14/15, and top-k with a k other than 5 scores otherwise
    scratch = make_folder(tmp_path / "scratch", ["a", "b", "c", "d", "e"], per_class=3)
    val = tmp_path / "imagenet" / "val"
    for i, path in enumerate(sorted(scratch.rglob("*.JPEG"))):
        with torch.no_grad():
            top = model(weights.transforms()(load_rgb(path))[None]).topk(5).indices[0].tolist()
        rank = 0 if i % 2 == 0 else 4 if i % 4 == 1 else 2 if i % 8 == 3 else None
        dest = val / WNIDS[top[rank] if rank is not None else (top[4] + 100) % 1000] / f"{i}.JPEG"
        dest.parent.mkdir(parents=True, exist_ok=True)
        path.rename(dest)
    args = [
        "test_torchvision.py",
        "--data",
        tmp_path / "imagenet",
        "--models",
        "resnet18",
        "--output",
        tmp_path / "out",
    ]
    result = run_script(*args, "--batch-size", "4", "--workers", "1", env={"TORCH_HOME": str(torch_home)})
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "out" / "eval.json").read_text())[0]
    reference = reference_predictions(model, val, weights)
    n = len(reference)
    assert record["n_images"] == n == 15
    assert record["acc1"] == pytest.approx(100 * sum(r[1] == r[2][0] for r in reference) / n)
    assert record["acc5"] == pytest.approx(100 * sum(r[1] in r[2] for r in reference) / n)
    assert (record["acc1"], record["acc5"]) == (pytest.approx(100 * 8 / 15), pytest.approx(100 * 14 / 15))
    assert record["loss"] == pytest.approx(sum(r[4] for r in reference) / n, rel=1e-4)  # mean cross-entropy
    assert set("model weights n_images acc1 acc5 img_per_s".split()) <= set(record)
    # 15 images of 2 classes: ImageNet val's published numbers say nothing about them (test_new_user.py)
    assert "acc1_published" not in record
    rows = read_csv(tmp_path / "out" / record["predictions"])
    assert [r["path"] for r in rows] == [r[0] for r in reference]
    for ours, (_, target, top5, probs, _) in zip(rows, reference):
        assert int(ours["target"]) == target and [int(ours[f"top{k}"]) for k in range(1, 6)] == top5
        assert [float(ours[f"prob{k}"]) for k in range(1, 6)] == pytest.approx(probs, abs=1e-5)
    # calibration and per-class results from the reference loop's probabilities, by hand
    assert record["nll"] == record["loss"] == pytest.approx(sum(r[4] for r in reference) / n, rel=1e-4)
    bins = [[0, 0.0, 0] for _ in range(15)]  # images, sum of top-1 probabilities, top-1 hits
    for _, target, top5, probs, _ in reference:
        b = bins[min(14, int(probs[0] * 15))]
        b[0], b[1], b[2] = b[0] + 1, b[1] + probs[0], b[2] + (top5[0] == target)
    ece = 100 * sum(abs(hits / k - total / k) * k / n for k, total, hits in bins if k)
    assert record["ece"] == pytest.approx(ece, abs=1e-4) and record["ece"] > 0
    assert [b[0] for b in record["calibration"]] == [b[0] for b in bins]
    by_class = {}
    for _, target, top5, _, _ in reference:
        counts = by_class.setdefault(WNIDS[target], [0, 0, 0])
        counts[0], counts[1], counts[2] = (
            counts[0] + 1,
            counts[1] + (top5[0] == target),
            counts[2] + (target in top5),
        )
    per_class = read_csv(tmp_path / "out" / record["per_class"])
    assert [row["class"] for row in per_class] == sorted(by_class, key=WNIDS.index)
    for row in per_class:
        k, top1, top5 = by_class[row["class"]]
        assert (int(row["n"]), float(row["top1"]), float(row["top5"])) == (k, 100 * top1 / k, 100 * top5 / k)
    worst = sorted(per_class, key=lambda r: (float(r["top1"]), -int(r["n"]), r["class"]))[:5]
    assert record["worst_classes"].split(", ")[0] == f"{worst[0]['class']} ({float(worst[0]['top1']):.1f}%)"
    assert len(record["worst_classes"].split(", ")) == min(5, len(per_class))
    assert (tmp_path / "out" / record["reliability"]).stat().st_size > 10_000  # the sweep's best row's
    again = run_script(*args, env={"TORCH_HOME": str(torch_home)})
    assert again.returncode == 0 and "skipped" in again.stdout + again.stderr


def test_unreadable_image_stops_or_is_skipped_and_listed(tmp_path, torch_home):
    save_torchvision_checkpoint(torch_home, "mobilenet_v3_small", WEIGHTS)
    data = tmp_path / "val"
    make_image(data / WNIDS[1] / "good.JPEG")
    good = make_image(data / WNIDS[2] / "cut.JPEG", (200, 200)).read_bytes()
    bad = [data / WNIDS[2] / "cut.JPEG", data / WNIDS[3] / "cut.JPEG"]  # batch 1: each in a batch of its own
    for path in bad:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(good[: len(good) // 2])
    args = [
        "test_torchvision.py",
        "--data",
        data,
        "--models",
        "mobilenet_v3_small",
        "--output",
        tmp_path / "out",
    ]
    args += ["--workers", "0", "--batch-size", "1"]
    assert_user_error(run_script(*args, env={"TORCH_HOME": str(torch_home)}), "cut.JPEG", "--skip-bad-images")
    # --decode gpu without a GPU: a note, then the exact CPU path (the row says so)
    skipped = run_script(*args, "--skip-bad-images", "--decode", "gpu", env={"TORCH_HOME": str(torch_home)})
    assert skipped.returncode == 0, skipped.stderr
    assert (
        "cut.JPEG" in skipped.stdout + skipped.stderr
        and "note: --decode gpu is not possible here" in skipped.stderr
    )
    record = json.loads((tmp_path / "out" / "eval.json").read_text())[0]
    assert record["n_images"] == 1 and record["bad_images"] == [str(path) for path in bad]  # from every batch
    assert record["decode"] == "cpu"


@pytest.mark.parametrize("workers", [0, 2])
def test_batched_decode_loader_matches_the_exact_path(tmp_path, odd_images, workers):
    """GpuDecodeLoader run on the CPU: the code path of --decode gpu, with libjpeg in place of nvjpeg.
    Same images, targets and order as build_loader, pixels within 1 level (another antialiasing
    kernel); a file the worker can't read and a truncated JPEG (which fails the batched call: the
    per-image fallback finds it) are reported as build_loader reports them. With workers, each batch's
    JPEGs cross from the worker packed in one tensor."""
    good = odd_images[0].read_bytes()
    (tmp_path / "cut.JPEG").write_bytes(good[: len(good) // 2])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(20))
    files = [*odd_images, tmp_path / "broken.png", tmp_path / "cut.JPEG"]
    samples = [Sample(str(p), i) for i, p in enumerate(files)]
    preset = EvalPreset(resize=64, crop=56)
    exact = list(build_loader(ImageDataset(samples, preset), 4, 0))
    batched = list(GpuDecodeLoader(samples, preset, 4, workers, torch.device("cpu")))
    assert len(exact) == len(batched) == 2
    for (a, targets_a, indices_a, errors_a), (b, targets_b, indices_b, errors_b) in zip(exact, batched):
        assert b.dtype == torch.uint8 and a.shape == b.shape
        assert targets_a.tolist() == targets_b.tolist() and indices_a.tolist() == indices_b.tolist()
        assert [i for i, _ in errors_a] == [i for i, _ in errors_b]
        assert (a.int() - b.int()).abs().float().mean() < 0.3 and (a.int() - b.int()).abs().max() <= 1
    assert [i for i, _ in batched[1][3]] == [6, 7]
    assert sum(len(batch[1]) for batch in batched) == 6


def decode_threads() -> int:
    return sum(thread.name == "decode-ahead" for thread in threading.enumerate())


def test_decoding_ahead_runs_in_a_thread_keeps_order_and_stops():
    """GpuDecodeLoader's thread: batches in order, produced ahead of the caller while it holds one,
    the thread's error raised in the caller, and a loop left early ends the thread."""
    cpu, made, ahead = torch.device("cpu"), [], threading.Event()

    def produce(n=None, fail_at=None):
        for i in itertools.count() if n is None else range(n):
            if i == fail_at:
                raise OSError("disk gone")
            made.append(i)
            if len(made) == 3:
                ahead.set()
            yield torch.tensor([i]), i

    batches = decoded_ahead(lambda: produce(5), cpu, depth=2)
    assert next(batches)[1] == 0 and ahead.wait(10)  # made ahead while the caller holds batch 0
    time.sleep(0.5)
    assert len(made) == 4  # no further: batch 0 in hand, 1 and 2 queued, 3 waiting for room
    assert [i for _, i in batches] == [1, 2, 3, 4] and decode_threads() == 0
    with pytest.raises(OSError, match="disk gone"):
        list(decoded_ahead(lambda: produce(5, fail_at=2), cpu))
    endless = decoded_ahead(produce, cpu)
    assert next(endless)[1] == 0 and decode_threads() == 1
    closing = threading.Thread(target=endless.close)  # what leaving a for loop early does
    closing.start()
    closing.join(10)
    assert not closing.is_alive() and decode_threads() == 0


def test_a_batch_the_device_refuses_is_decoded_image_by_image(odd_images, monkeypatch):
    """decode_jpeg refusing every call (as nvjpeg refuses a CMYK JPEG): each image comes back from the
    CPU fallback, none is reported unreadable."""

    def refuse(*args, **kwargs):
        raise RuntimeError("Error while decoding JPEG images: unsupported")

    monkeypatch.setattr(loader, "decode_jpeg", refuse)
    samples = [Sample(str(path), i) for i, path in enumerate(odd_images)]
    batches = list(GpuDecodeLoader(samples, EvalPreset(resize=64, crop=56), 4, 0, torch.device("cpu")))
    assert sum(len(batch[1]) for batch in batches) == len(odd_images) and not any(
        batch[3] for batch in batches
    )


def test_decoding_ahead_frees_a_failed_pass_for_the_retry(tmp_path, odd_images, monkeypatch):
    """with_smaller_batches retries after an out-of-memory error and needs the failed pass's memory back:
    nothing of it may outlive the except block (no reference cycle through the thread's error). The
    GPU decoder raises CUDA's out-of-memory as a RuntimeError; it must reach the retry as one."""
    held = []

    def produce():
        yield torch.zeros(1), 0
        tensor = torch.zeros(1000)  # e.g. the decoded images of the failing batch
        held.append(weakref.ref(tensor))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    gc.disable()  # reference counting alone must free it, as on a GPU between the error and the retry
    try:
        raised = False
        try:
            list(decoded_ahead(produce, torch.device("cpu")))
        except OUT_OF_MEMORY:
            raised = True
        assert raised and held[0]() is None
    finally:
        gc.enable()

    calls = []

    def refuse(data, **_):
        calls.append(len(data))
        raise RuntimeError("Error while decoding JPEG images: CUDA error: out of memory")

    monkeypatch.setattr(loader, "decode_jpeg", refuse)
    samples = [Sample(str(path), 0) for path in odd_images[:2]]
    with pytest.raises(OUT_OF_MEMORY, match="out of memory"):
        list(GpuDecodeLoader(samples, EvalPreset(resize=64, crop=56), 4, 0, torch.device("cpu")))
    assert calls == [2]  # the batch's call: not retried image by image as if the device refused an image


@pytest.mark.parametrize(
    "case", ["missing", "empty", "not_wnids", "unknown_model", "unknown_weights", "offline"]
)
def test_clear_errors(tmp_path, torch_home, offline, case):
    data = tmp_path / "data"
    args = ["--models", "mobilenet_v3_small"]
    if case == "empty":
        data.mkdir()
    elif case != "missing":
        make_folder(data, ["cats", "dogs"] if case == "not_wnids" else [WNIDS[0]], per_class=1)
    if case == "unknown_model":
        args = ["--models", "mobilenet_v3_smal"]
    if case == "unknown_weights":
        args += ["--weights", "IMAGENET1K_V9"]
    # one case as a process, the others in this process (the same one error line, without a start)
    run = run_script if case == "missing" else run_main
    result = run(
        "test_torchvision.py",
        "--data",
        data,
        *args,
        "--output",
        tmp_path / "out",
        env={"TORCH_HOME": str(torch_home)},
    )
    expected = {
        "missing": ["does not exist"],
        "empty": ["no class folders"],
        "not_wnids": ["cats", "wnid"],
        "unknown_model": ["mobilenet_v3_small"],
        "unknown_weights": ["IMAGENET1K_V1"],
        "offline": ["mobilenet_v3_small-047dcff4.pth", "https://download.pytorch.org/models/"],
    }[case]
    assert_user_error(result, *expected)


def test_image_listing_matches_pathlib_order_and_rules(tmp_path):
    """dataset's os.scandir walk finds what Path.rglob + is_file found, in the same (Path) order:
    nested folders, upper-case suffixes, symlinked files, no other files, no symlinked folders."""
    from dataset import IMAGE_EXTENSIONS
    from dataset import images_in as _images_in

    for name in ("a/x.JPEG", "a-b/y.jpg", "a/b/c/z.png", "top.PNG", "notes.txt", "jpg", ".hidden.jpeg"):
        (tmp_path / "cls" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cls" / name).write_bytes(b"")
    (tmp_path / "cls" / "link.jpeg").symlink_to(tmp_path / "cls" / "top.PNG")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "w.jpg").write_bytes(b"")
    (tmp_path / "cls" / "linked_dir").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    folder = tmp_path / "cls"
    expected = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    assert _images_in(folder) == [str(p) for p in expected]
    assert [p.split("/cls/")[1] for p in _images_in(folder)][:3] == [
        ".hidden.jpeg",
        "a/b/c/z.png",
        "a/x.JPEG",
    ]


def test_calibration_bins_take_a_diverged_models_probabilities():
    """A NaN top-1 probability (the logits of a diverged model) counts in the first bin, not a crash;
    1.0 in the last bin, 0.5 in bin 7 of 15."""
    bins = torch.zeros(3, 15, dtype=torch.float64)
    confidence, predicted = torch.tensor([0.5, float("nan"), 1.0, 0.0]), torch.tensor([1, 2, 3, 4])
    add_to_bins(bins, confidence, predicted, torch.tensor([1, 0, 3, 0]))
    assert bins[0].tolist() == [2.0] + [0.0] * 6 + [1.0] + [0.0] * 6 + [1.0]
    assert bins[1].sum().item() == 1.5 and bins[2].tolist()[7] == 1.0 and bins[2].tolist()[14] == 1.0
