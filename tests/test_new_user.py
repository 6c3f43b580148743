"""What a new user hit, each as the command that showed it: architectures of one image size checked before
a run starts, a resume with another optimizer, sweeps that go on past missing weights files, checkpoints
that name their architecture in every script, fine-tuning that says what it loaded, rows that compare with
the published numbers only where those apply, and the small ones."""

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
import yaml
from torchvision import models

import train
from conftest import (
    assert_user_error,
    make_image,
    read_csv,
    run_main,
    run_script,
    save_torchvision_checkpoint,
)
from dataset import corruption, dataset_name, is_shifted_set
from engine import TrainState
from model import build_model, check_input_size, resolve_weights
from report import robustness_table
from test_torchvision import measures_published
from test_train import TINY, make_colour_dataset
from train import best_weights, position, spread
from utils import UserError

WNIDS = ("n01440764", "n01443537")  # tench, goldfish: an ImageNet class subset
SMALL = "--epochs 1 --batch-size 8 --lr 0.01".split()


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    return make_colour_dataset(tmp_path_factory.mktemp("colours") / "data", per_class=(8, 3))


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, colours):
    """A finished 2-epoch resnet18 run on three colour classes that keeps an EMA: best.pt, ema.pt."""
    out = tmp_path_factory.mktemp("runs")
    args = [*TINY, *SMALL, "--epochs", "2", "--ema-decay", "0.5", "--ema-steps", "1"]
    result = run_main("train.py", "--data", colours, *args, "--output", out, "--run-name", "ema")
    assert result.returncode == 0, result.stderr
    return out / "ema"


# ----------------------------------------------------------------------------- 1. input sizes


def test_an_architecture_of_one_image_size_is_refused_before_the_run_starts(tmp_path, colours):
    result = run_script(
        "train.py", "--arch", "vit_b_16", "--train-crop-size", "32", "--data", colours, "--output", tmp_path
    )
    assert_user_error(result, "vit_b_16 is made for one image size", "--val-crop-size 32 too")
    assert not any(tmp_path.iterdir())  # no run folder
    with_weights = ["--weights", "DEFAULT", "--val-crop-size", "32"]
    assert_user_error(
        run_main(
            "train.py", "--arch", "vit_b_16", "--train-crop-size", "32", *with_weights, "--data", colours
        ),
        "vit_b_16 (built for 224 px) can't take 32 px",
        "it takes 224 px only",
    )


@pytest.mark.parametrize(
    "arch, size, expected",
    [
        ("inception_v3", 64, "it takes 299 px or more"),  # its aux head, in training
        ("alexnet", 32, "it takes 63 px or more"),
        ("vit_b_32", 48, "multiples of its patch size, 32 px"),  # a new ViT is built for the size
        ("vit_b_16", 30, "multiples of its patch size, 16 px"),
        ("maxvit_t", 160, "multiples of 224 px"),  # its 7 x 7 windows, at every stage
    ],
)
def test_each_architecture_says_which_sizes_it_takes(arch, size, expected):
    with pytest.raises(UserError, match=expected):
        check_input_size(arch, size, "--train-crop-size", train=True)
    check_input_size("swin_t", size, "--train-crop-size", train=True)  # Swin pads its windows


def test_a_new_vit_trains_at_its_own_size_and_every_script_reads_it_back(tmp_path, colours):
    size = ["--train-crop-size", "64", "--val-crop-size", "64", "--val-resize-size", "72"]
    run = run_main(
        "train.py",
        "--arch",
        "vit_b_32",
        *size,
        *SMALL,
        "--workers",
        "0",
        "--data",
        colours,
        "--output",
        tmp_path,
    )
    assert run.returncode == 0, run.stderr
    best = next(tmp_path.glob("vit_b_32-*")) / "best.pt"
    evaluated = run_main(
        "test_torchvision.py", "--data", colours / "val", "--weights", best, "--output", tmp_path
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "eval.json").read_text())[0]["crop"] == 64
    table = run_main("test_torchvision.py", "--runs", tmp_path, "--output", tmp_path / "runs")
    assert table.returncode == 0, table.stderr  # its GMACs counted at 64 px
    # the run's one size, whichever script is given another; train.py takes the arch from the file
    other = ["--train-crop-size", "96", "--val-crop-size", "96", "--val-resize-size", "110"]
    assert_user_error(
        run_main("train.py", "--weights", best, *other, "--data", colours, "--output", tmp_path / "ft"),
        "vit_b_32 (built for 64 px) can't take 96 px",
    )
    assert not (tmp_path / "ft").exists()
    for script, args in (
        ("predict.py", [colours / "val" / "red" / "0.png"]),
        ("test_torchvision.py", ["--data", colours / "val", "--output", tmp_path / "o"]),
    ):
        refused = run_main(script, *args, "--weights", best, "--resize", "110", "--crop", "96")
        assert_user_error(refused, "built for 64 px", "64 px only")


# ----------------------------------------------------------------------------- 2. resume


def test_resuming_with_another_optimizer_is_refused_in_one_line(tmp_path, colours):
    args = ["train.py", "--data", colours, *TINY, *SMALL, "--output", tmp_path, "--run-name", "r"]
    assert run_main(*args, "--optimizer", "adamw", "--lr", "0.001").returncode == 0
    saved = (tmp_path / "r" / "last.pt").stat().st_mtime_ns
    for optimizer in ("sgd", "rmsprop"):
        assert_user_error(
            run_main(*args, "--epochs", "2", "--optimizer", optimizer, "--resume", "auto"),
            "trained with --optimizer adamw",
            "resume with --optimizer adamw",
        )
    assert_user_error(  # its weights are a resnet18's
        run_main(*args, "--epochs", "2", "--arch", "mobilenet_v3_small", "--resume", "auto"),
        "the run trained a resnet18; resume it with --arch resnet18 (or leave --arch out)",
    )
    assert (tmp_path / "r" / "last.pt").stat().st_mtime_ns == saved
    # a checkpoint from before metrics rows had best_pt resumes and reports
    checkpoint = torch.load(tmp_path / "r" / "last.pt", weights_only=True)
    checkpoint["history"] = [
        {k: v for k, v in row.items() if k != "best_pt"} for row in checkpoint["history"]
    ]
    torch.save(checkpoint, tmp_path / "r" / "last.pt")
    resumed = run_main(*args, "--epochs", "2", "--resume", "auto")
    assert resumed.returncode == 0 and "done: best val top-1" in resumed.stdout, resumed.stderr


def test_a_resume_says_where_inside_the_epoch_it_continues():
    assert position(TrainState(epoch=1, step=7, batch=3)) == "epoch 2, batch 4, after 7 optimizer steps"
    assert position(TrainState(epoch=2, step=8)) == "epoch 3, after 8 optimizer steps"


# ----------------------------------------------------------------------------- 3. sweeps


def imagenet_subset(root):
    for i, wnid in enumerate(WNIDS):
        make_image(root / wnid / f"{i}.JPEG", seed=i)
    return root


def test_a_sweep_skips_weights_whose_files_are_missing_and_lists_them(tmp_path, torch_home, offline):
    save_torchvision_checkpoint(torch_home, "resnet18", models.ResNet18_Weights.IMAGENET1K_V1)
    data = imagenet_subset(tmp_path / "val")
    args = ["test_torchvision.py", "--data", data, "--workers", "0", "--output", tmp_path / "out"]
    result = run_main(*args, "--models", "resnet1*", "--weights", "all")
    assert result.returncode == 0, result.stderr
    assert "ResNet101_Weights.IMAGENET1K_V1: skipped: its file is not in" in result.stdout + result.stderr
    assert "skipped 4 of 5 weights" in result.stdout
    assert "https://download.pytorch.org/models/resnet152-f82ba261.pth" in result.stdout
    rows = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [r["weights"] for r in rows] == ["ResNet18_Weights.IMAGENET1K_V1"]
    assert_user_error(run_main(*args, "--models", "resnet101", "--weights", "all"), "could be loaded")
    assert_user_error(run_main(*args, "--models", "resnet101"), "resnet101-cd907fc2.pth", "is not in")
    int8 = run_main(
        *args, "--models", "quantized_*"
    )  # none of the 12 int8 files: each skipped, then one line
    assert_user_error(int8, "none of the 12 selected weights could be loaded")
    assert "GoogLeNet_QuantizedWeights.IMAGENET1K_FBGEMM_V1: skipped" in int8.stdout + int8.stderr


# ----------------------------------------------------------------------------- 4. one rule for files


@pytest.mark.slow
def test_every_script_takes_a_checkpoint_without_its_architecture(tmp_path, ema_run, colours):
    val, image = colours / "val", colours / "val" / "red" / "0.png"
    onnx = tmp_path / "colours.onnx"
    for name in ("best.pt", "ema.pt"):
        evaluated = run_main(
            "test_torchvision.py", "--data", val, "--weights", ema_run / name, "--output", tmp_path / name
        )
        assert evaluated.returncode == 0, evaluated.stderr
        row = json.loads((tmp_path / name / "eval.json").read_text())[0]
        assert row["model"] == "resnet18" and row["acc5"] is None  # 3 classes: no top-5
        assert "no top-5: with 5 classes or fewer" in evaluated.stdout
        predicted = run_main("predict.py", image, "--weights", ema_run / name, "--json")
        assert predicted.returncode == 0, predicted.stderr
        export = run_script if name == "ema.pt" else run_main  # one export in a process of its own
        exported = export("export.py", "--weights", ema_run / name, "--output", onnx)
        assert exported.returncode == 0, exported.stderr
    for script, args in (
        ("test_torchvision.py", ["--data", val, "--output", tmp_path / "o"]),
        ("predict.py", [image]),
    ):
        assert run_main(script, *args, "--weights", onnx).returncode == 0  # its arch from its metadata
        arch = "--models" if script == "test_torchvision.py" else "--arch"
        for weights in (ema_run / "best.pt", onnx):
            assert_user_error(
                run_main(script, *args, "--weights", weights, arch, "resnet50"),
                "resnet18 model, not resnet50",
                "leave the architecture out",
            )
    # the exported EMA, on ONNX Runtime with its own 3 classes, scores as the EMA's checkpoint does
    rows = [json.loads((tmp_path / folder / "eval.json").read_text())[0] for folder in ("ema.pt", "o")]
    assert rows[1]["backend"] == "onnxruntime" and rows[0]["acc1"] == rows[1]["acc1"]
    torch.save(models.resnet18(num_classes=3).state_dict(), tmp_path / "plain.pth")
    assert_user_error(
        run_main("predict.py", image, "--weights", tmp_path / "plain.pth"),
        "does not name its architecture",
        "--arch ARCH",
    )


# ----------------------------------------------------------------------------- 5. fine-tuning


def test_fine_tuning_says_which_weights_it_loaded_and_that_the_head_is_new(tmp_path, torch_home, colours):
    save_torchvision_checkpoint(torch_home, "resnet18", models.ResNet18_Weights.IMAGENET1K_V1)
    args = [*TINY, *SMALL, "--weights", "DEFAULT", "--output", tmp_path, "--run-name", "ft"]
    result = run_main("train.py", "--data", colours, *args)
    assert result.returncode == 0, result.stderr
    assert f"weights: ResNet18_Weights.IMAGENET1K_V1 from {torch_home}" in result.stdout
    assert "its 1000-class head is replaced by a new, randomly initialised 3-class head" in result.stdout
    config = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())
    assert config["weights"] == "ResNet18_Weights.IMAGENET1K_V1"  # what DEFAULT named on this torchvision
    # a resume needs only its checkpoint, and says nothing of weights it does not load
    for pretrained in (torch_home / "hub" / "checkpoints").iterdir():
        pretrained.unlink()
    resumed = run_main(
        "train.py", "--output", tmp_path, "--run-name", "ft", "--resume", "auto", "--epochs", "2"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "weights:" not in resumed.stdout and len(read_csv(tmp_path / "ft" / "metrics.csv")) == 2


# ----------------------------------------------------------------------------- 6. rows


def test_published_numbers_only_on_all_of_imagenet_val_with_the_weights_own_preprocessing():
    weights = resolve_weights("IMAGENET1K_V1", "resnet18")
    row = {"masked": False, "dataset": "imagenet", "limit": None, "resize": 256, "crop": 224}
    row.update(interpolation="bilinear", tta="none")
    full = SimpleNamespace(all_classes=True)
    assert measures_published(weights, row, full)
    assert not measures_published(weights, row, SimpleNamespace(all_classes=False))  # a class subset
    for change in (
        {"limit": 100},
        {"crop": 192},
        {"resize": 232},
        {"masked": True},
        {"dataset": "imagenet-a"},
        {"tta": "flip"},  # two passes per image
    ):
        assert not measures_published(weights, {**row, **change}, full), change


def test_a_subset_row_has_no_published_numbers_and_no_robustness_note(tmp_path, torch_home):
    save_torchvision_checkpoint(torch_home, "resnet18", models.ResNet18_Weights.IMAGENET1K_V1)
    args = ["test_torchvision.py", "--models", "resnet18", "--workers", "0", "--output", tmp_path]
    result = run_main(*args, "--data", imagenet_subset(tmp_path / "val"))
    assert result.returncode == 0, result.stderr
    row = json.loads((tmp_path / "eval.json").read_text())[0]
    assert "acc1_published" not in row and "acc1_delta" not in row and row["acc5"] is not None
    assert "robustness" not in result.stdout + result.stderr
    # an ImageNet-C folder: a shifted set, its corruption and severity in the row, then the report
    shifted = run_main(*args, "--data", imagenet_subset(tmp_path / "imagenet-c" / "fog" / "3"))
    assert shifted.returncode == 0, shifted.stderr
    row = json.loads((tmp_path / "eval.json").read_text())[-1]
    assert (row["dataset"], row["corruption"], row["severity"]) == ("imagenet-c", "fog", 3)
    assert "note: no row on 'imagenet'" in shifted.stdout  # a shifted set, nothing to compare it with


# ----------------------------------------------------------------------------- 7. small ones


def test_train_help_lists_recipe_and_the_benchmark_example_is_a_users_path():
    help_text = run_main("train.py", "--help").stdout
    assert "--recipe WEIGHTS" in help_text and "docs/recipes.md" in help_text
    assert "shared" not in run_main("benchmark.py", "--help").stdout


def test_int8_googlenet_builds_without_torchvisions_init_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        build_model("quantized_googlenet", None, quantize=True)


def test_dummy_runs_reuse_one_folder_and_never_another_runs(tmp_path):
    args = [
        "train.py",
        "--dummy",
        "--dummy-size",
        "8",
        "--num-classes",
        "3",
        *TINY,
        *SMALL,
        "--output",
        tmp_path,
    ]
    assert run_main(*args).returncode == 0
    again = run_main(*args)
    assert again.returncode == 0 and "replacing the previous --dummy run" in again.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["dummy-resnet18"]
    assert len(read_csv(tmp_path / "dummy-resnet18" / "metrics.csv")) == 1
    (tmp_path / "dummy-resnet18" / "config.yaml").write_text("dummy: false\n")  # someone else's run
    assert_user_error(run_main(*args), "not a --dummy run")


# ----------------------------------------------------------------------------- 10. --crop, --limit


def test_predict_takes_the_eval_sizes_and_refuses_one_the_model_cant_take(tmp_path):
    image = make_image(tmp_path / "cat.jpg")
    result = run_main(
        "predict.py", image, "--weights", "none", "--arch", "resnet18", "--resize", "40", "--crop", "32"
    )
    assert result.returncode == 0, result.stderr
    assert_user_error(
        run_main("predict.py", image, "--weights", "none", "--arch", "vit_b_16", "--crop", "192"),
        "vit_b_16 (built for 224 px) can't take 192 px",
        "224 px only",
    )


def test_train_limit_is_a_quick_check_over_every_class(tmp_path, colours):
    result = run_main("train.py", "--data", colours, *TINY, *SMALL, "--limit", "6", "--output", tmp_path)
    assert result.returncode == 0, result.stderr
    assert "6 train / 6 val images" in result.stdout
    assert_user_error(run_main("train.py", "--dummy", "--limit", "6", *TINY), "--dummy-size")
    samples = [SimpleNamespace(target=t) for t in (0,) * 8 + (1,) * 8 + (2,) * 8]
    spread_samples = spread(ListSamples(samples), 6)
    assert sorted({s.target for s in spread_samples}) == [0, 1, 2]


class ListSamples(list):
    def take(self, indices):
        return [self[i] for i in indices]


# ----------------------------------------------------------------------------- 11. ImageNet-C, best.pt


def test_imagenet_c_folders_are_a_shifted_set_with_their_corruption_and_severity(tmp_path):
    folder = tmp_path / "imagenet-c" / "gaussian_noise" / "3"
    assert dataset_name(folder) == "imagenet-c" and is_shifted_set("imagenet-c")
    assert corruption(folder) == {"corruption": "gaussian_noise", "severity": 3}
    assert corruption(tmp_path / "pets" / "3") == {"corruption": None, "severity": None}
    rows = [
        {"weights": "W", "dataset": "imagenet", "acc1": 80.0},
        {"weights": "W", "dataset": "imagenet-c", "corruption": "fog", "severity": 1, "acc1": 60.0},
        {"weights": "W", "dataset": "imagenet-c", "corruption": "fog", "severity": 5, "acc1": 30.0},
    ]
    table, sets = robustness_table(rows)
    assert sets == ["imagenet-c"] and table[0]["imagenet-c"] == 45.0 and table[0]["imagenet-c drop"] == 35.0


def test_best_pt_holds_the_ema_when_its_top1_is_higher():
    assert best_weights({"val_acc1": 70.0, "ema_acc1": 72.0}, best_acc1=71.0) == "ema"
    assert best_weights({"val_acc1": 72.0, "ema_acc1": 72.0}, best_acc1=71.0) == "model"  # a tie
    assert best_weights({"val_acc1": 70.0}, best_acc1=71.0) == ""


def test_the_runs_table_says_which_weights_best_pt_holds(tmp_path, colours, monkeypatch):
    monkeypatch.setattr(train, "best_weights", lambda row, best_acc1: "ema")  # the EMA's top-1 is higher
    args = [*TINY, *SMALL, "--epochs", "2", "--ema-decay", "0.5", "--ema-steps", "1", "--output", tmp_path]
    result = run_main("train.py", "--data", colours, *args, "--run-name", "ema")
    assert result.returncode == 0, result.stderr
    assert "(best.pt: the EMA of epoch 2)" in result.stdout
    best = torch.load(tmp_path / "ema" / "best.pt", weights_only=True)
    ema = torch.load(tmp_path / "ema" / "ema.pt", weights_only=True)
    assert best["best_of"] == "ema" and best["epoch"] == 2 and "optimizer" not in best
    assert all(torch.equal(best["model"][k], ema["model"][k]) for k in ema["model"])
    assert [row["best_pt"] for row in read_csv(tmp_path / "ema" / "metrics.csv")] == ["ema", "ema"]
    table = run_main("test_torchvision.py", "--runs", tmp_path, "--output", tmp_path / "table")
    assert table.returncode == 0, table.stderr
    row = json.loads((tmp_path / "table" / "our_training.json").read_text())[0]
    assert row["best_pt"] == "ema, epoch 2" and row["acc1"] == float(
        read_csv(tmp_path / "ema" / "metrics.csv")[-1]["ema_acc1"]
    )
