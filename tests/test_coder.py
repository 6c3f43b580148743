import json
import re
import subprocess

import pytest
import torch
import torch.nn.functional as F
from torchvision import models

import predict
from coder import LabelCoder
from conftest import assert_user_error, make_image, run_script
from loader import load_rgb
from model import weights_file_name
from presets import EvalPreset, normalize
from utils import UserError

WEIGHTS = models.MobileNet_V3_Small_Weights.DEFAULT


@pytest.fixture(scope="module")
def coder():
    return LabelCoder.imagenet()


def test_imagenet_lookups(coder):
    assert len(coder) == 1000
    assert (coder.wnid(0), coder.name(0)) == ("n01440764", "tench")
    assert (coder.wnid(65), coder.name(65)) == ("n01751748", "sea snake")
    assert (
        coder.index("n01751748")
        == coder.index("sea snake")
        == coder.index("Sea Snake")
        == coder.index(65)
        == 65
    )
    assert coder.index(torch.tensor(65)) == 65
    assert coder.name("n01440764") == "tench" and coder.wnid("tench") == "n01440764"
    assert LabelCoder.imagenet(models.ResNet50_Weights.DEFAULT).names == coder.names


def test_weights_without_categories_fall_back_to_the_imagenet_names(coder):
    assert models.VGG16_Weights.IMAGENET1K_FEATURES.meta["categories"] is None
    assert LabelCoder.imagenet(models.VGG16_Weights.IMAGENET1K_FEATURES).names == coder.names


def test_unknown_keys_suggest_the_closest(coder):
    with pytest.raises(UserError, match="did you mean sea snake"):
        coder.index("see snake")
    with pytest.raises(UserError, match="n01440764"):
        coder.wnid("n01440765")
    with pytest.raises(UserError, match="out of range 0..999"):
        coder.name(1000)
    with pytest.raises(UserError, match="did you mean one_hot"):
        coder.encode([0], "onehot")


def test_custom_coder():
    custom = LabelCoder(["cat", "dog", "horse"])
    assert custom.index("dog") == 1 and custom.wnid(1) is None and custom.name(2) == "horse"
    assert custom.encode(["horse", "cat"]).tolist() == [2, 0]
    top = custom.decode(torch.tensor([[0.0, 2.0, 1.0]]), k=10)[0]
    assert [p["name"] for p in top] == ["dog", "horse", "cat"] and top[0]["wnid"] is None
    with pytest.raises(UserError, match="did you mean horse"):
        custom.index("hors")
    with pytest.raises(ValueError):
        LabelCoder(["cat", "cat"])


def test_encode_kinds(coder):
    targets = torch.tensor([0, 65, 999])
    index = coder.encode(targets)
    assert index.dtype == torch.long and index.tolist() == [0, 65, 999]
    assert coder.encode(["tench", "n01751748", 999]).tolist() == [0, 65, 999]
    one_hot = coder.encode(targets, "one_hot")
    assert one_hot.dtype == torch.float32 and torch.equal(one_hot, F.one_hot(targets, 1000).float())
    eps = 0.1
    q = coder.encode(targets, "smooth", smoothing=eps)
    assert q.shape == (3, 1000) and q.dtype == torch.float32
    assert torch.allclose(q.sum(1), torch.ones(3))
    assert torch.allclose(q, (1 - eps) * F.one_hot(targets, 1000).float() + eps / 1000)
    assert coder.encode(targets, "smooth", smoothing=0.0).equal(one_hot)
    with pytest.raises(UserError, match="out of range"):
        coder.encode(torch.tensor([1000]))
    with pytest.raises(UserError, match="smoothing"):
        coder.encode(targets, "smooth", smoothing=1.5)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_smooth_targets_match_cross_entropy_label_smoothing(eps):
    torch.manual_seed(0)
    small = LabelCoder([f"class{i}" for i in range(7)])
    logits, targets = torch.randn(16, 7, dtype=torch.float64), torch.randint(0, 7, (16,))
    q = small.encode(targets, "smooth", smoothing=eps).double()
    expected = F.cross_entropy(logits, targets, label_smoothing=eps)
    assert torch.allclose(-(q * logits.log_softmax(1)).sum(1).mean(), expected)
    assert torch.allclose(F.cross_entropy(logits, q), expected)  # soft-target cross-entropy agrees too


def test_decode_is_sorted_softmax(coder):
    torch.manual_seed(0)
    logits = torch.randn(4, 1000)
    logits[1, 65] = 30.0
    decoded = coder.decode(logits.bfloat16(), k=5)
    assert len(decoded) == 4 and all(len(row) == 5 for row in decoded)
    probs = logits.bfloat16().float().softmax(1)
    for row, row_probs in zip(decoded, probs):
        assert [p["prob"] for p in row] == sorted((p["prob"] for p in row), reverse=True)
        assert row[0]["prob"] == pytest.approx(row_probs.max().item())  # (bf16 may tie: compare probs)
        for p in row:
            assert p["prob"] == pytest.approx(row_probs[p["index"]].item())
            assert (p["wnid"], p["name"]) == (coder.wnid(p["index"]), coder.name(p["index"]))
    assert decoded[1][0] == {
        "index": 65,
        "wnid": "n01751748",
        "name": "sea snake",
        "prob": pytest.approx(1.0),
    }
    assert len(coder.decode(logits, k=5000)[0]) == 1000
    with pytest.raises(UserError, match="1000 classes"):
        coder.decode(torch.randn(2, 10))


# ----------------------------------------------------------------------------- predict.py end to end
# Each subprocess costs ~4 s of torch import, so the two successful runs are end to end (as a user
# types them) and the error paths run predict.main in this process, reported as run_script reports.


def run_predict(capsys, *argv) -> subprocess.CompletedProcess:
    try:
        predict.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err)


@pytest.fixture
def mobilenet(torch_home):
    """A random mobilenet_v3_small in torchvision's cache, its head bias spread so the top-k is clear-cut."""
    torch.manual_seed(0)
    model = models.mobilenet_v3_small().eval()
    with torch.no_grad():
        model.classifier[-1].bias.copy_(torch.randn(1000) * 3)
    torch.save(model.state_dict(), torch_home / "hub" / "checkpoints" / weights_file_name(WEIGHTS))
    return model


@pytest.mark.slow
def test_predict_text_and_json(torch_home, mobilenet, tmp_path):
    images = [
        make_image(tmp_path / "a.jpg", size=(80, 60)),
        make_image(tmp_path / "b.png", (60, 80), fmt="PNG", seed=1),
    ]
    preset = EvalPreset.from_weights(WEIGHTS)
    with torch.inference_mode():
        batch = torch.stack([preset(load_rgb(str(path))) for path in images])
        expected = mobilenet(normalize(batch, preset.mean, preset.std)).topk(4).indices.tolist()

    env = {"TORCH_HOME": str(torch_home)}
    out = run_script("predict.py", *images, "--arch", "mobilenet_v3_small", "--topk", "4", "--json", env=env)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert [r["image"] for r in results] == [str(path) for path in images]
    for result, top in zip(results, expected):
        probs = [p["prob"] for p in result["predictions"]]
        assert len(probs) == 4 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert [p["index"] for p in result["predictions"]] == top
        assert set(result["predictions"][0]) == {"index", "wnid", "name", "prob"}

    text = run_script(
        "predict.py",
        images[0],
        *"--arch mobilenet_v3_small --weights DEFAULT --topk 3 --device cpu".split(),
        env=env,
    )
    assert text.returncode == 0, text.stderr
    lines = text.stdout.rstrip("\n").splitlines()
    assert lines[0] == str(images[0]) and len(lines) == 4
    for rank, (line, p) in enumerate(zip(lines[1:], results[0]["predictions"]), 1):
        assert (
            line.startswith(f"  {rank}. ")
            and f"{p['prob']:.2%}" in line
            and p["name"] in line
            and p["wnid"] in line
        )
    assert len({re.search(r" n\d{8}$", line).start() for line in lines[1:]}) == 1  # wnids in one column


def test_predict_bad_inputs_are_one_line_errors(torch_home, tmp_path, capsys):
    image, broken = make_image(tmp_path / "photo.jpg"), tmp_path / "broken.jpg"
    broken.write_text("not a picture")
    assert_user_error(
        run_predict(capsys, image, tmp_path / "nope.jpg"), "image file", "nope.jpg", "does not exist"
    )
    assert_user_error(
        run_predict(capsys, image, broken), f"cannot read image {broken}: not an image file PIL can read"
    )
    assert_user_error(run_predict(capsys, tmp_path), f"{tmp_path} is a folder; pass its images")
    no_checkpoint = run_predict(capsys, image, "--weights", tmp_path)  # a run's folder, not its file
    assert_user_error(no_checkpoint, f"{tmp_path} is a folder (no .pt files); pass one file")
    assert_user_error(  # a mistyped file name, not a weights name
        run_predict(capsys, image, "--weights", "r18.onx"),
        "--weights r18.onx is neither a .pt, .pth or .onnx",
    )
    assert_user_error(run_predict(capsys, image, "--arch", "resnet5O"), "unknown model", "resnet50")
    assert_user_error(
        run_predict(capsys, image, "--weights", "IMAGENET1K_V3"), "unknown weights", "IMAGENET1K_V2"
    )
    assert_user_error(run_predict(capsys, image, "--topk", "0"), "--topk")
    no_weights = run_predict(capsys, image, "--arch", "mobilenet_v3_small", "--weights-dir", tmp_path)
    assert_user_error(no_weights, "mobilenet_v3_small", "is not in", str(tmp_path))


def test_predict_takes_the_architecture_of_a_train_py_checkpoint(torch_home, tmp_path, capsys):
    """No --arch: a train.py checkpoint's own arch (resnet18), not the default resnet50; an --arch that
    contradicts it is still an error naming both."""
    torch.manual_seed(0)
    config = {"arch": "resnet18", "val_resize_size": 72, "val_crop_size": 64}
    state = {
        "model": models.resnet18(num_classes=2).state_dict(),
        "config": config,
        "classes": ["cat", "dog"],
    }
    torch.save({**state, "optimizer": {}, "epoch": 1}, tmp_path / "best.pt")
    image = make_image(tmp_path / "photo.JPEG", (90, 80))
    result = run_predict(capsys, image, "--weights", tmp_path / "best.pt", "--json")
    assert result.returncode == 0, result.stderr
    assert sorted(p["name"] for p in json.loads(result.stdout)[0]["predictions"]) == ["cat", "dog"]
    wrong = run_predict(capsys, image, "--arch", "resnet50", "--weights", tmp_path / "best.pt")
    assert_user_error(wrong, "is a resnet18 model, not resnet50")
