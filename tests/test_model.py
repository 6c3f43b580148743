import json

import pytest
import torch
from torchvision import models

from conftest import assert_user_error, read_csv, run_script
from model import ARCHS, QUANTIZED_ARCHS, all_weights, build_model, weights_enum, weights_file_name
from test_torchvision import complexity, complexity_records, select_weights
from utils import UserError

ALL_PAIRS = [(arch, w) for arch in ARCHS + QUANTIZED_ARCHS for w in all_weights(arch)]


def test_every_weights_matches_torchvision_metadata():
    """params == meta['num_params'] exactly and GMACs == meta['_ops'] at its 3 decimals, all 129 weights
    (115 float, 14 int8: counted as their float architecture, as their metadata is)."""
    assert (
        len(ARCHS) >= 80
        and len(ALL_PAIRS) >= 129
        and sum(a.startswith("quantized_") for a, _ in ALL_PAIRS) == 14
    )
    # as earlier tests of this process leave it: OpenMP's thread pool has run (the pool's forked workers
    # hung in their first multi-threaded region until they ran on one thread)
    torch.nn.functional.conv2d(torch.randn(4, 32, 64, 64), torch.randn(32, 32, 3, 3))
    records = complexity_records(ALL_PAIRS, thop=False)
    mismatches = [
        (r["weights"], r["params"], w.meta["num_params"], r["gmacs"], w.meta["_ops"])
        for r, (_, w) in zip(records, ALL_PAIRS)
        if r["params"] != w.meta["num_params"] or round(r["gmacs"], 3) != w.meta["_ops"]
    ]
    assert mismatches == []


def test_attention_is_counted_where_thop_is_blind():
    vit = complexity("vit_b_16", "IMAGENET1K_V1", thop=True)
    assert round(vit["gmacs"], 3) == 17.564 and vit["gflops"] == pytest.approx(2 * vit["gmacs"])
    assert vit["thop_gmacs"] < 12  # thop skips the attention matmuls


@pytest.mark.parametrize("name", ["DEFAULT", "IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V2"])
def test_resolve_weights_names(name):
    assert weights_enum("resnet50", name) is models.ResNet50_Weights.IMAGENET1K_V2


def test_unknown_names_suggest_the_closest():
    with pytest.raises(UserError, match="resnet50"):
        build_model("resnet5O")
    with pytest.raises(UserError, match="IMAGENET1K_V2"):
        weights_enum("resnet50", "IMAGENET1K_V3")


def test_num_classes_replaces_the_head():
    model = build_model("resnet18", num_classes=10)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 10)
    squeeze = build_model("squeezenet1_1", num_classes=7)
    assert squeeze(torch.zeros(2, 3, 64, 64)).shape == (2, 7)


def test_weights_load_from_torchvision_cache(torch_home):
    weights = models.ResNet18_Weights.IMAGENET1K_V1
    saved = models.resnet18()
    torch.save(saved.state_dict(), torch_home / "hub" / "checkpoints" / weights_file_name(weights))
    model = build_model("resnet18", "DEFAULT")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
    finetune = build_model("resnet18", "DEFAULT", num_classes=5)
    assert finetune.fc.out_features == 5 and torch.equal(finetune.conv1.weight, saved.conv1.weight)


def test_googlenet_keeps_torchvision_builder_settings(torch_home):
    weights = models.GoogLeNet_Weights.IMAGENET1K_V1
    state = models.googlenet(aux_logits=True, init_weights=False).state_dict()
    torch.save(state, torch_home / "hub" / "checkpoints" / weights_file_name(weights))
    model = build_model("googlenet", weights)
    assert model.transform_input and model.aux1 is None  # as torchvision's builder leaves them


def test_missing_weights_offline_names_file_and_url(torch_home, offline):
    with pytest.raises(UserError) as info:
        build_model("resnet18", "DEFAULT")
    message = str(info.value)
    assert (
        "resnet18-f37072fd.pth" in message
        and "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    )
    assert str(torch_home / "hub" / "checkpoints") in message


def test_a_missing_int8_file_is_found_before_the_model_is_built(torch_home, offline, monkeypatch):
    """A sweep skips it in milliseconds, not after building and observing the quantizable model."""
    import model

    monkeypatch.setattr(model.models, "get_model", lambda *args, **kwargs: pytest.fail("built first"))
    with pytest.raises(model.MissingWeights, match="resnet18_fbgemm"):
        build_model("quantized_resnet18", "DEFAULT")


def test_select_weights_globs():
    assert [a for a, _ in select_weights(["resnet1*"], "default")] == ["resnet101", "resnet152", "resnet18"]
    assert len(select_weights(["resnet50"], "all")) == 2
    with pytest.raises(UserError, match="resnet50"):
        select_weights(["resnet500"], "all")


def test_main_job_writes_tables_and_plot(tmp_path, torch_home, offline):
    # offline
    result = run_script("test_torchvision.py", "--models", "resnet18", "vit_b_16", "--output", tmp_path)
    assert result.returncode == 0, result.stderr
    records = json.loads((tmp_path / "complexity.json").read_text())
    vit = next(r for r in records if r["weights"] == "ViT_B_16_Weights.IMAGENET1K_V1")
    assert vit["params"] == 86567656 and vit["gmacs"] == 17.564 and vit["acc1_published"] == 81.072
    assert {"model", "weights", "params", "gmacs", "gflops"} <= set(vit)
    assert (tmp_path / "complexity.md").read_text().count("\n") == 2 + 4  # resnet18 x1, vit_b_16 x3
    assert [row["weights"] for row in read_csv(tmp_path / "complexity.csv")] == [
        r["weights"] for r in records
    ]
    assert (tmp_path / "acc_vs_gmacs.png").stat().st_size > 10000 and "<circle" in (
        tmp_path / "acc_vs_gmacs.html"
    ).read_text()
    assert "resnet18" in result.stdout
    assert not any(torch_home.rglob("*.pth")) and not any(torch_home.rglob("*.partial"))  # no download tried


def test_main_job_unknown_model_is_one_clear_line(tmp_path):
    assert_user_error(
        run_script("test_torchvision.py", "--models", "resnet5O", "--output", tmp_path), "resnet50"
    )
