"""ImageNet's other test sets (dataset.py): ImageNetV2's numeric folders, the 200-class protocol of
ImageNet-A/-R (--mask-classes), ReaL labels, the dataset column of eval rows and the robustness report."""

import json

import pytest
import torch
from PIL import Image
from torchvision import models

from coder import imagenet_wnids
from conftest import (
    assert_user_error,
    make_image,
    read_csv,
    run_main,
    run_script,
    save_torchvision_checkpoint,
)
from dataset import Sample, dataset_name, find_samples, real_accuracy, real_label_sets
from loader import load_rgb
from report import robustness_table, write_robustness
from utils import UserError

WNIDS = imagenet_wnids()
WEIGHTS = models.ResNet18_Weights.IMAGENET1K_V1
CLASSES = [0, 1, 2, 10, 11, 100, 101, 250, 999, 3, 20, 200]  # string order differs from numeric order
EVAL = "--models resnet18 --resize 64 --crop 56 --batch-size 4 --workers 0 --no-fuse-bn --channels-last false"


def evaluate(data, out, torch_home, *options):
    """test_torchvision.py --data DATA in this process (the error cases below run as a process)."""
    result = run_main(
        "test_torchvision.py",
        "--data",
        data,
        *EVAL.split(),
        *options,
        "--output",
        out,
        env={"TORCH_HOME": str(torch_home)},
    )
    assert result.returncode == 0, result.stderr
    return result


def test_imagenet_v2_folders_are_class_indices(tmp_path, torch_home):
    """The same 24 images as ImageNetV2 (folders 0..999) and as wnid folders: the same targets and
    predictions image by image (a string sort of the numeric folders would shuffle the labels)."""
    save_torchvision_checkpoint(torch_home, "resnet18", WEIGHTS)
    v2, wnid = tmp_path / "imagenetv2-matched-frequency-format-val", tmp_path / "wnid" / "val"
    for i, target in enumerate(CLASSES * 2):
        make_image(v2 / str(target) / f"{i}.jpeg", (70 + i, 60), seed=i)
        make_image(wnid / WNIDS[target] / f"{i}.jpeg", (70 + i, 60), seed=i)
    samples, _ = find_samples(v2)
    assert sorted((s.path.split("/")[-1], s.target) for s in samples) == sorted(
        (f"{i}.jpeg", t) for i, t in enumerate(CLASSES * 2)
    )
    evaluate(v2, tmp_path / "out", torch_home)
    evaluate(wnid, tmp_path / "out", torch_home)
    out = tmp_path / "out"
    rows = json.loads((out / "eval.json").read_text())
    assert [r["dataset"] for r in rows] == ["imagenetv2-matched-frequency-format-val", "wnid"]  # both kept
    predictions = [
        sorted(
            (p["path"].split("/")[-1], p["target"], p["top1"], p["top5"])
            for p in read_csv(out / r["predictions"])
        )
        for r in rows
    ]
    assert predictions[0] == predictions[1] and rows[0]["acc5"] == rows[1]["acc5"]


def reference_top5(model, data, weights, mask=None) -> list[tuple[int, list[int]]]:
    """(target, top-5) of every image: torchvision's transforms and model, logits masked by hand."""
    out = []
    for path in sorted(data.rglob("*.JPEG")):
        x = weights.transforms(resize_size=64, crop_size=56)(load_rgb(path))[None]
        with torch.no_grad():
            logits = model(x)[0]
        if mask is not None:
            logits[[c for c in range(1000) if c not in mask]] = float("-inf")
        out.append((WNIDS.index(path.parent.name), logits.topk(5).indices.tolist()))
    return out


def test_rows_written_before_the_dataset_columns_are_still_skipped(tmp_path, torch_home):
    save_torchvision_checkpoint(torch_home, "resnet18", WEIGHTS)
    data = tmp_path / "imagenet" / "val"
    make_image(data / WNIDS[3] / "a.JPEG")
    evaluate(data, tmp_path / "out", torch_home)
    rows = json.loads((tmp_path / "out" / "eval.json").read_text())
    old = [{k: v for k, v in r.items() if k not in ("dataset", "masked", "real_labels")} for r in rows]
    (tmp_path / "out" / "eval.json").write_text(json.dumps(old))
    again = evaluate(data, tmp_path / "out", torch_home)
    assert "already in" in again.stdout + again.stderr
    assert len(json.loads((tmp_path / "out" / "eval.json").read_text())) == 1  # not redone, not doubled


def test_mask_classes_restricts_predictions_to_the_folders_classes(tmp_path, torch_home):
    model = save_torchvision_checkpoint(torch_home, "resnet18", WEIGHTS)
    data = tmp_path / "imagenet-a"  # a 200-class-style subset: 7 of the 1000 classes
    present = [1, 7, 30, 400, 401, 850, 999]
    for i in range(21):
        make_image(data / WNIDS[present[i % 7]] / f"{i}.JPEG", (64 + 3 * i, 60), seed=i)
    evaluate(data, tmp_path / "out", torch_home)
    evaluate(data, tmp_path / "out", torch_home, "--mask-classes")
    plain, masked = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert (plain["dataset"], plain["masked"], masked["dataset"], masked["masked"]) == (
        "imagenet-a",
        False,
        "imagenet-a",
        True,
    )
    for row, mask in ((plain, None), (masked, set(present))):
        reference = reference_top5(model, data, WEIGHTS, mask)
        assert row["acc1"] == pytest.approx(100 * sum(t == top[0] for t, top in reference) / 21)
        assert row["acc5"] == pytest.approx(100 * sum(t in top for t, top in reference) / 21)
        ours = read_csv(tmp_path / "out" / row["predictions"])
        assert all(int(p["top1"]) in (mask or range(1000)) for p in ours)
        per_class = read_csv(tmp_path / "out" / row["per_class"])  # the set's 7 classes, 3 images each
        assert [(r["class"], r["n"]) for r in per_class] == [(WNIDS[c], "3") for c in present]
        for r in per_class:
            hits = sum(WNIDS[top[0]] == r["class"] for t, top in reference if WNIDS[t] == r["class"])
            assert float(r["top1"]) == pytest.approx(100 * hits / 3)
    assert masked["acc5"] > plain["acc5"] and masked["acc5"] >= 5 / 7 * 100  # 5 of 7 classes are in any top-5
    # the weights' published accuracies are ImageNet val's: no "difference" to them on ImageNet-A
    assert all(row.get(k) is None for row in (plain, masked) for k in ("acc1_published", "acc1_delta"))
    # --limit 3 keeps images of one class (sorted by path): the mask is still the set's 7 classes
    evaluate(data, tmp_path / "out", torch_home, "--mask-classes", "--limit", "3")
    limited = json.loads((tmp_path / "out" / "eval.json").read_text())[-1]
    top5 = [
        [int(p[f"top{k}"]) for k in range(1, 6)] for p in read_csv(tmp_path / "out" / limited["predictions"])
    ]
    assert len(top5) == 3 and all(set(t) <= set(present) for t in top5)


def test_real_accuracy_by_hand():
    labels = [[1], [], [2, 3], [4], [7, 8]]
    samples = [Sample(f"v/ILSVRC2012_val_{i:08d}.JPEG", 0) for i in range(1, 6)]
    samples[2] = Sample("n01440764/ILSVRC2012_val_00000003.JPEG", 0)  # the ImageFolder layout of the val set
    top5 = [[1, 0, 2, 3, 4], [5, 6, 7, 8, 9], [3, 9, 9, 9, 9], [0, 4, 5, 6, 9], [0, 1, 2, 3, 5]]
    # right at top-1; no labels (not scored); one of two labels; top-5 only; wrong
    predictions = [{"index": i, "top5": t} for i, t in enumerate(top5)]
    sets = real_label_sets(samples, labels)
    assert real_accuracy(predictions, sets) == {"real_acc1": 50.0, "real_acc5": 75.0, "real_n_images": 4}
    with pytest.raises(UserError, match="beyond the 5 images"):
        real_label_sets([Sample("ILSVRC2012_val_00000006.JPEG", 0)], labels)


def test_real_labels_score_the_val_images_next_to_their_original_labels(tmp_path, torch_home):
    save_torchvision_checkpoint(torch_home, "resnet18", WEIGHTS)
    data = tmp_path / "imagenet" / "val"  # the wnid layout of the val set: file names give ReaL's index
    targets = [5, 5, 9, 9, 12, 12, 40, 40]
    for i, target in enumerate(targets):
        make_image(data / WNIDS[target] / f"ILSVRC2012_val_{i + 1:08d}.JPEG", (60 + 5 * i, 60), seed=i)
    result = evaluate(data, tmp_path / "out", torch_home)
    row = json.loads((tmp_path / "out" / "eval.json").read_text())[0]
    top5 = {
        p["path"].split("/")[-1]: [int(p[f"top{k}"]) for k in range(1, 6)]
        for p in read_csv(tmp_path / "out" / row["predictions"])
    }
    # ReaL labels made up from the predictions: right at top-1, right at top-5 only, wrong, and no label
    names = [f"ILSVRC2012_val_{i + 1:08d}.JPEG" for i in range(8)]
    real = [[top5[names[0]][0]], [top5[names[1]][3], 999], [], [top5[names[3]][0], 7], [], [998], [], [500]]
    (tmp_path / "real.json").write_text(json.dumps(real + [[1]] * 10))  # the file covers more images
    result = evaluate(data, tmp_path / "out", torch_home, "--real-labels", tmp_path / "real.json")
    rows = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert len(rows) == 2 and rows[0]["real_labels"] is None  # a ReaL row does not replace the plain one
    expected1 = sum(top5[n][0] in labels for n, labels in zip(names, real)) / 5 * 100
    expected5 = sum(bool(set(top5[n]) & set(labels)) for n, labels in zip(names, real)) / 5 * 100
    assert (expected1, expected5) == (40.0, 60.0)
    assert (rows[1]["real_acc1"], rows[1]["real_acc5"], rows[1]["real_n_images"]) == (expected1, expected5, 5)
    assert rows[1]["acc1"] == rows[0]["acc1"] and rows[1]["n_images"] == 8
    assert "real_acc1" in result.stdout  # the printed table's column
    (tmp_path / "bad.json").write_text('{"a": 1}')
    bad = run_script("test_torchvision.py", "--data", data, "--real-labels", tmp_path / "bad.json")
    assert_user_error(bad, "not ReaL's format")
    other = tmp_path / "other"
    make_image(other / WNIDS[3] / "cat.JPEG")
    bad = run_main(
        "test_torchvision.py",
        "--data",
        other,
        *EVAL.split(),
        "--real-labels",
        tmp_path / "real.json",
        "--output",
        tmp_path / "o2",
        env={"TORCH_HOME": str(torch_home)},
    )
    assert_user_error(bad, "cat.JPEG is not an ILSVRC2012_val")


def test_dataset_names(tmp_path):
    assert dataset_name(tmp_path / "imagenet" / "val") == "imagenet"
    assert dataset_name(tmp_path / "ILSVRC2012" / "val") == "imagenet"
    assert dataset_name(tmp_path / "ImageNet-A") == "imagenet-a"
    assert dataset_name(tmp_path / "imagenet-r" / "imagenet-r") == "imagenet-r"
    assert dataset_name(tmp_path / "imagenet-sketch" / "sketch") == "imagenet-sketch"
    assert dataset_name(tmp_path / "imagenetv2-top-images-format-val") == "imagenetv2-top-images-format-val"
    assert dataset_name(tmp_path / "imagenet_v2" / "matched-frequency") == "imagenet_v2"
    assert dataset_name(tmp_path / "x", explicit="mine") == "mine"
    # not mistaken for a known set, nor for ImageNet
    assert dataset_name(tmp_path / "imagenet-real" / "val") == "imagenet-real"
    assert dataset_name(tmp_path / "imagenet_resized" / "val") == "imagenet_resized"
    assert dataset_name(tmp_path / "imagenet-c" / "gaussian_noise" / "3") == "imagenet-c"
    assert dataset_name(tmp_path / "pets" / "3") == "pets/3"
    assert dataset_name(tmp_path / "imagenette2" / "val") == "imagenette2"
    link = tmp_path / "imagenet-a-link"
    link.symlink_to(tmp_path / "imagenet", target_is_directory=True)
    assert dataset_name(link) == "imagenet-a"  # the name given, not the symlink's target


def test_robustness_table_and_plot(tmp_path):
    rows = []
    for i, weights in enumerate(["A.V1", "B.V1", "C.V1"]):
        clean = 70.0 + 5 * i
        rows.append(
            {
                "weights": weights,
                "dataset": "imagenet",
                "masked": False,
                "acc1": clean,
                "real_acc1": clean + 6 if i else None,
            }
        )
        rows.append({"weights": weights, "dataset": "imagenetv2-matched-frequency", "acc1": clean - 12})
        rows.append({"weights": weights, "dataset": "imagenet-a", "masked": True, "acc1": 2.0 + 4 * i})
    rows.append({"weights": "D.V1", "dataset": "imagenet-a", "acc1": 1.0})  # no clean row: left out
    table, sets = robustness_table(rows)
    assert sets == ["imagenet-a (masked)", "imagenetv2-matched-frequency", "real"]
    assert [r["weights"] for r in table] == ["A.V1", "B.V1", "C.V1"] and "real" not in table[0]
    assert (
        table[1]["imagenetv2-matched-frequency drop"] == 12.0 and table[2]["imagenet-a (masked) drop"] == 70.0
    )
    assert table[2]["real drop"] == -6.0
    paths = write_robustness(rows, tmp_path)
    assert [p.name for p in paths] == ["robustness.md", "robustness.csv", "robustness.png"]
    md = (tmp_path / "robustness.md").read_text()
    assert md.startswith("| weights | imagenet | imagenet-a (masked) | imagenet-a (masked) drop |")
    assert "| B.V1 | 75.000 | 6.000 | 69.000 | 63.000 | 12.000 | 81.000 | -6.000 |" in md
    assert len(read_csv(tmp_path / "robustness.csv")) == 3
    assert Image.open(tmp_path / "robustness.png").size == (700, 550)
    clean_only = [{**r, "real_acc1": None} for r in rows if r["dataset"] == "imagenet"]
    assert write_robustness(clean_only, tmp_path / "none") == [] and not (tmp_path / "none").exists()


def test_int8_weights_evaluate_like_torchvisions_quantized_model(tmp_path, torch_home):
    """A calibrated, converted int8 shufflenet saved under the file name torchvision caches its FBGEMM
    weights as: test_torchvision.py's row and per-image top-5 equal torchvision's int8 model run on
    torchvision's transforms, image by image."""
    import warnings

    weights = models.quantization.ShuffleNet_V2_X0_5_QuantizedWeights.IMAGENET1K_FBGEMM_V1
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = models.get_model("quantized_shufflenet_v2_x0_5", weights=None, quantize=True).eval()
    from model import weights_file_name

    torch.save(model.state_dict(), torch_home / "hub" / "checkpoints" / weights_file_name(weights))
    data = tmp_path / "val"
    for i in range(10):
        make_image(data / WNIDS[(i * 97) % 1000] / f"{i}.JPEG", (80 + 4 * i, 64), seed=i)
    options = "--models quantized_shufflenet_v2_x0_5 --batch-size 4 --workers 0".split()
    result = run_main(
        "test_torchvision.py",
        "--data",
        data,
        *options,
        "--output",
        tmp_path / "out",
        env={"TORCH_HOME": str(torch_home)},
    )
    assert result.returncode == 0, result.stderr
    row = json.loads((tmp_path / "out" / "eval.json").read_text())[0]
    assert (row["weights"], row["quantized_engine"], row["n_images"]) == (str(weights), "fbgemm", 10)
    ours = {
        p["path"].split("/")[-1]: [int(p[f"top{k}"]) for k in range(1, 6)]
        for p in read_csv(tmp_path / "out" / row["predictions"])
    }
    hits = 0
    for path in sorted(data.rglob("*.JPEG")):
        with torch.no_grad():
            top5 = (
                model(weights.transforms()(Image.open(path).convert("RGB"))[None]).topk(5).indices[0].tolist()
            )
        assert ours[path.name] == top5, path.name
        hits += WNIDS.index(path.parent.name) in top5
    assert row["acc5"] == pytest.approx(100 * hits / 10)


def test_without_torch_ao_quantization_the_int8_rows_are_left_out_with_one_line(monkeypatch, capsys):
    import sys

    import model
    import test_torchvision

    monkeypatch.setitem(sys.modules, "torch.ao.quantization", None)  # what a torch without it raises
    archs, reason = model._quantized_archs()
    assert archs == [] and "no torch.ao.quantization" in reason
    monkeypatch.setattr(test_torchvision, "QUANTIZED_ARCHS", archs)
    monkeypatch.setattr(test_torchvision, "NO_QUANTIZATION", reason)
    with pytest.raises(UserError, match="int8 weights are left out"):
        test_torchvision.select_models(["quantized_*"])
    assert test_torchvision.select_models(["*"]) == model.ARCHS  # the sweep goes on without them
    assert capsys.readouterr().err.count("note: torchvision's int8 weights are left out") == 1
