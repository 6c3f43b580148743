"""torchrun with 2 CPU processes (gloo): exact evaluation, ranks in step, the same losses as one
process, and a failing rank that ends the job quickly."""

import json
import math
import time

import pytest
import torch
from torchvision import models

from coder import imagenet_wnids
from conftest import make_image, read_csv, run_main, run_script, save_torchvision_checkpoint
from test_train import TINY, make_colour_dataset

pytestmark = pytest.mark.slow
TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
DIGEST = "tests/ddp_weights_digest.py"  # train.py's command line, then each rank's sha256 of its weights


def assert_ranks_identical(digests) -> None:
    """Both ranks of a finished 2-process run wrote the same sha256 of their trained weights."""
    values = [(digests / f"rank{r}.sha256").read_text() for r in (0, 1)]
    assert values[0] == values[1] and len(values[0].strip()) == 64, values


def squeezenet_one_and_two_processes(tmp_path, lr: str, single_options: list, double_options: list):
    """(the run in this process, the torchrun run of 2 processes, each rank writing its weights' digest):
    squeezenet1_1 with dropout 0 (no BatchNorm, no dropout) for 2 epochs on the colour dataset's 48
    train images, in tmp_path's runs one and two; both finished."""
    data = make_colour_dataset(tmp_path / "data")
    tiny = [a if a != "resnet18" else "squeezenet1_1" for a in TINY]
    common = [
        "train.py",
        "--data",
        data,
        *tiny,
        "--dropout",
        "0",
        "--epochs",
        "2",
        "--lr",
        lr,
        "--output",
        tmp_path,
    ]
    single = run_main(*common, *single_options, "--run-name", "one")  # in this process: the reference
    double = run_script(
        *TORCHRUN, DIGEST, tmp_path / "digests", *common[1:], *double_options, "--run-name", "two"
    )
    assert single.returncode == 0 and double.returncode == 0, single.stderr + double.stderr
    return single, double


def test_evaluation_counts_every_image_once_in_any_world_size(tmp_path, torch_home):
    """2 processes give 1 process's rows and predictions, image by image, with flip TTA (two passes per
    image; the plain path's world sizes: test_shards.py's folder against shards in 1 and 2 processes)."""
    wnids = imagenet_wnids()
    for i in range(101):  # not divisible by the world size
        cls = (238, 381, 58, i * 7)[i % 4]  # classes a random resnet18 tends to predict, and others
        make_image(tmp_path / "val" / wnids[cls] / f"{i:03d}.JPEG", (48 + i % 5 * 8, 40), seed=i)
    save_torchvision_checkpoint(torch_home, "resnet18", models.ResNet18_Weights.IMAGENET1K_V1)
    env = {"TORCH_HOME": str(torch_home)}
    options = "--models resnet18 --resize 64 --crop 56 --batch-size 8 --workers 0 --tta flip".split()
    args = ["test_torchvision.py", "--data", tmp_path / "val", *options]
    single = run_main(*args, "--output", tmp_path / "one", env=env)  # in this process: the reference
    double = run_script(*TORCHRUN, *args, "--output", tmp_path / "two", env=env)
    assert single.returncode == 0 and double.returncode == 0, single.stderr + double.stderr
    one, two = (json.loads((tmp_path / d / "eval.json").read_text())[0] for d in ("one", "two"))
    assert one["n_images"] == two["n_images"] == 101
    assert (one["acc1"], one["acc5"]) == (two["acc1"], two["acc5"]) and one["acc5"] > 0
    assert one["tta"] == two["tta"] == "flip"
    # calibration and per-class results: the same sums, whatever the world size
    assert (one["ece"], one["nll"]) == (pytest.approx(two["ece"]), pytest.approx(two["nll"]))
    assert [b[0] for b in one["calibration"]] == [b[0] for b in two["calibration"]]
    assert one["worst_classes"] == two["worst_classes"]
    per_class = [read_csv(tmp_path / d / record["per_class"]) for d, record in (("one", one), ("two", two))]
    assert per_class[0] == per_class[1] and sum(int(row["n"]) for row in per_class[0]) == 101
    rows = [read_csv(tmp_path / d / record["predictions"]) for d, record in (("one", one), ("two", two))]
    assert len(rows[0]) == len(rows[1]) == 101
    for a, b in zip(*rows):
        assert (a["path"], a["target"], a["top1"], a["top5"]) == (
            b["path"],
            b["target"],
            b["top1"],
            b["top5"],
        )
        assert float(a["prob1"]) == pytest.approx(float(b["prob1"]), abs=1e-5)


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    """2 x batch 4 sees exactly the images and augmentations of 1 x batch 8 (samples and their random
    crops are seeded by (seed, epoch, index)), and DDP averages the two half-batch gradients into the
    full-batch one. squeezenet1_1 with dropout 0 has no BatchNorm (whose statistics would be per
    process on CPU, where SyncBatchNorm does not run) and no dropout (whose masks come from each
    process's RNG), so the runs differ only by float summation order in the gradient all-reduce:
    ~1e-7 relative per step, hence the 1e-4 tolerance on the per-epoch loss."""
    # 48 train images: 6 steps of 8, no padding
    single, double = squeezenet_one_and_two_processes(
        tmp_path, "0.001", ["--batch-size", "8"], ["--batch-size", "4"]
    )
    assert_ranks_identical(tmp_path / "digests")
    one, two = (read_csv(tmp_path / run / "metrics.csv") for run in ("one", "two"))
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-4)
        assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), rel=1e-4)
    # signal in every compared number: none is the ln 3 of a network whose logits all died to 0
    losses = [float(row[key]) for row in one for key in ("train_loss", "val_loss")]
    assert all(abs(loss - math.log(3)) > 1e-3 for loss in losses) and len(set(losses)) == 4, losses
    last = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and not any(k.startswith("module.") for k in last["model"])


def test_two_processes_accumulating_two_batches_step_as_one_batch_of_16(tmp_path):
    """4 per batch x 2 processes x 2 accumulation steps (DDP all-reducing only each step's last batch) train
    squeezenet1_1 without dropout as one process with batch 16 does: the weights within 1e-5."""
    # 48 train images: 3 steps of 16
    single, double = squeezenet_one_and_two_processes(
        tmp_path, "0.01", ["--batch-size", "16"], ["--batch-size", "4", "--accum-steps", "2"]
    )
    assert "global batch 16 = 4 per step x 2 processes x 2 accumulation steps" in double.stdout
    assert_ranks_identical(tmp_path / "digests")
    one, two = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("one", "two"))
    assert one["step"] == two["step"] == 6
    for key, value in one["model"].items():
        assert torch.allclose(value, two["model"][key], atol=1e-5, rtol=0), key
    assert any(not torch.allclose(v, torch.zeros_like(v)) for v in one["model"].values())


def test_torchrun_with_one_process_runs_ddp_and_trains_like_a_plain_process(tmp_path):
    """torchrun --nproc_per_node=1 starts the process group (gloo here, NCCL on a GPU: tests/test_gpu.py)
    and trains through DDP, as torchvision's references do; the all-reduce over one rank changes no bit."""
    data = make_colour_dataset(tmp_path / "data")
    common = [
        "train.py",
        "--data",
        data,
        *TINY,
        *"--epochs 1 --batch-size 8 --lr 0.01 --output".split(),
        tmp_path,
    ]
    plain = run_main(*common, "--run-name", "plain")  # in this process: the reference
    one = run_script(*TORCHRUN[:-1], "--nproc_per_node=1", *common, "--run-name", "one")
    assert plain.returncode == 0 and one.returncode == 0, plain.stderr + one.stderr
    assert "process group none" in plain.stdout and "process group gloo" in one.stdout, one.stdout
    weights = [torch.load(tmp_path / run / "last.pt", weights_only=True)["model"] for run in ("plain", "one")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], torch.zeros_like(weights[0][k])) for k in weights[0])


def test_batchnorm_ranks_end_identical(tmp_path):
    """With BatchNorm the ranks' running statistics would drift apart; rank 0's are broadcast each epoch."""
    data = make_colour_dataset(tmp_path / "data")
    options = [*TINY, *"--epochs 1 --batch-size 4 --run-name bn --output".split(), tmp_path]
    result = run_script(*TORCHRUN, DIGEST, tmp_path / "digests", "--data", data, *options)
    assert result.returncode == 0, result.stderr
    assert_ranks_identical(tmp_path / "digests")


def test_a_failing_rank_ends_the_job_quickly(tmp_path):
    data = make_colour_dataset(tmp_path / "data")
    (data / "train" / "red" / "0.png").write_bytes(b"not an image at all")
    start = time.time()
    options = [*TINY, *"--epochs 3 --batch-size 4 --run-name fails --output".split(), tmp_path]
    result = run_script(*TORCHRUN, "train.py", "--data", data, *options, timeout=120)
    assert result.returncode != 0
    assert time.time() - start < 60
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "0.png" in errors[0] and errors[0].startswith("error: rank "), errors


def test_two_processes_resume_the_v2_recipe_exactly(tmp_path):
    """Under torchrun the repeated-augmentation sampler, MixUp/CutMix (drawn per rank) and dropout (each
    rank its own masks, its own RNG state saved) resume exactly: 2 epochs straight == 1 + 1 resumed."""
    from test_train import RECIPE, TINY_DROPOUT, state_of

    data = make_colour_dataset(tmp_path / "data")
    options = [*TINY_DROPOUT, *RECIPE.split(), *"--batch-size 4 --lr 0.01 --output".split(), tmp_path]
    common = [*TORCHRUN, "train.py", "--data", data, *options]
    assert run_script(*common, "--epochs", "2", "--run-name", "straight").returncode == 0
    assert run_script(*common, "--epochs", "1", "--run-name", "split").returncode == 0
    resumed = run_script(*common, "--epochs", "2", "--run-name", "split", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    straight, split = state_of(tmp_path / "straight"), state_of(tmp_path / "split")
    assert split[1] == straight[1] and all(torch.equal(straight[0][k], split[0][k]) for k in straight[0])
    rngs = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["rng"]
    assert len(rngs) == 2 and not torch.equal(rngs[0]["torch"], rngs[1]["torch"])  # per rank
