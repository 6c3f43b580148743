import json

import pytest
import torch
import torch.nn.functional as F
from torchvision import models

import predict
from coder import LabelCoder
from conftest import assert_user_error, make_image, run_script
from model import weights_file_name
from utils import UserError

WEIGHTS = models.MobileNet_V3_Small_Weights.DEFAULT


@pytest.fixture(scope="module")
def coder():
    return LabelCoder.imagenet()


def test_imagenet_lookups(coder):
    assert len(coder) == 1000
    assert (coder.wnid(0), coder.name(0)) == ("n01440764", "tench")
    assert (coder.wnid(65), coder.name(65)) == ("n01751748", "sea snake")
    assert coder.index("n01751748") == coder.index("sea snake") == coder.index("Sea Snake") == coder.index(65) == 65
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
        assert row[0]["index"] == row_probs.argmax().item()
        for p in row:
            assert p["prob"] == pytest.approx(row_probs[p["index"]].item())
            assert (p["wnid"], p["name"]) == (coder.wnid(p["index"]), coder.name(p["index"]))
    assert decoded[1][0] == {"index": 65, "wnid": "n01751748", "name": "sea snake", "prob": pytest.approx(1.0)}
    assert len(coder.decode(logits, k=5000)[0]) == 1000
    with pytest.raises(UserError, match="1000 classes"):
        coder.decode(torch.randn(2, 10))


# ----------------------------------------------------------------------------- predict.py end to end

@pytest.fixture
def image(tmp_path):
    return make_image(tmp_path / "photo.jpg", size=(80, 60))


@pytest.mark.slow
def test_predict_text_and_json(torch_home, image):
    torch.manual_seed(0)
    model = models.mobilenet_v3_small().eval()  # random weights under the file name torchvision caches
    torch.save(model.state_dict(), torch_home / "hub" / "checkpoints" / weights_file_name(WEIGHTS))
    env = {"TORCH_HOME": str(torch_home)}
    text = run_script("predict.py", image, "--arch", "mobilenet_v3_small", "--topk", "3", "--device", "cpu", env=env)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.strip().splitlines()
    assert lines[0] == str(image) and len(lines) == 4
    assert all(line.startswith(f"  {rank}. ") and "%" in line and " n0" in line for rank, line in enumerate(lines[1:], 1))

    out = run_script("predict.py", image, image, "--arch", "mobilenet_v3_small", "--weights", "DEFAULT",
                     "--topk", "4", "--json", env=env)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert [r["image"] for r in results] == [str(image)] * 2
    predictions = results[0]["predictions"]
    probs = [p["prob"] for p in predictions]
    assert len(predictions) == 4 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    assert set(predictions[0]) == {"index", "wnid", "name", "prob"}
    # the same class as the saved model on the weights' own preprocessing, in this process
    from dataset import EvalPreset, load_rgb, normalize
    preset = EvalPreset.from_weights(WEIGHTS)
    with torch.inference_mode():
        logits = model(normalize(preset(load_rgb(str(image)))[None], preset.mean, preset.std))
    assert predictions[0]["index"] == logits.argmax(1).item()
    assert predictions[0]["name"] in lines[1]


@pytest.mark.slow
def test_predict_missing_image_and_missing_weights(torch_home, image, tmp_path):
    env = {"TORCH_HOME": str(torch_home)}
    missing = run_script("predict.py", tmp_path / "nope.jpg", "--arch", "mobilenet_v3_small", env=env)
    assert_user_error(missing, "nope.jpg", "does not exist")
    no_weights = run_script("predict.py", image, "--arch", "mobilenet_v3_small", "--weights-dir", tmp_path, env=env)
    assert_user_error(no_weights, "mobilenet_v3_small", "is not in", str(tmp_path))


def test_predict_unreadable_image_and_unknown_names(tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a picture")
    for options, needles in [([], ["cannot read image", str(broken)]),
                             (["--arch", "resnet5O"], ["unknown model", "resnet50"]),
                             (["--arch", "resnet50", "--weights", "IMAGENET1K_V3"], ["unknown weights", "IMAGENET1K_V2"])]:
        with pytest.raises(SystemExit) as exit_info:
            predict.main([str(broken), *options])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("error: ") and all(n in error for n in needles), error
