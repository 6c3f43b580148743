"""Gradient accumulation: batches accumulated into one optimizer step train as one large batch; the global
batch derives the steps; a resume keeps the global batch; a recipe on one process keeps its own; the
benchmark's memory part picks the batch that fits."""

import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import benchmark
import engine
import loader
import train
from config import TrainConfig, resumed_config, with_accumulation
from conftest import assert_user_error, read_csv, run_main
from engine import TrainState, ema_decay_per_update
from test_train import TINY, make_colour_dataset
from utils import UserError

SQUEEZENET = [
    a if a != "resnet18" else "squeezenet1_1" for a in TINY
]  # no BatchNorm; --dropout 0: no dropout


@pytest.fixture(scope="module")
def colours54(tmp_path_factory):
    """54 train images: 3 steps of 16 and a last one of 6 per epoch."""
    return make_colour_dataset(tmp_path_factory.mktemp("colours54"), per_class=(18, 4))


def record_optimizer_steps():
    """(the lr of every optimizer step, in order; the hook's handle), for every optimizer of the process."""
    lrs = []
    handle = register_optimizer_step_post_hook(
        lambda optimizer, args, kwargs: lrs.append(optimizer.param_groups[0]["lr"])
    )
    return lrs, handle


def test_accumulated_batches_step_as_one_large_batch(colours54, tmp_path, capsys):
    """squeezenet1_1 without dropout has no layer coupling a batch's images: 4 batches of 4 accumulated
    (--accum-steps 4, or --global-batch 16) step its weights as one batch of 16 does, the epoch's last,
    smaller step (6 images: 4 + 2) too; the lr of each optimizer step (a warmup epoch, then cosine) and the
    EMA, updated every optimizer step, are the same."""
    common = [
        *("--data", colours54, *SQUEEZENET, "--dropout", "0", "--epochs", "3", "--lr", "0.01"),
        *("--no-drop-last", "--scheduler", "cosine", "--warmup-epochs", "1", "--ema-decay", "0.9"),
        *("--ema-steps", "1", "--output", tmp_path),
    ]
    runs = {
        "large": ["--batch-size", "16"],
        "accum": ["--batch-size", "4", "--accum-steps", "4"],
        "global": ["--batch-size", "4", "--global-batch", "16"],
    }
    lrs, results = {}, {}
    for name, options in runs.items():
        lrs[name], handle = record_optimizer_steps()
        try:
            results[name] = train.cli_main([*map(str, common), *options, "--run-name", name])
        finally:
            handle.remove()
        header = "global batch 16 = 16 per step x 1 process x 1 accumulation step"
        if name != "large":
            header = "global batch 16 = 4 per step x 1 process x 4 accumulation steps"
        assert header in capsys.readouterr().out, name
    assert {name: result["steps"] for name, result in results.items()} == {
        "large": 12,
        "accum": 12,
        "global": 12,
    }
    assert lrs["large"] == lrs["accum"] == lrs["global"] and len(set(lrs["large"])) == 3  # one per epoch
    assert lrs["large"][0] == pytest.approx(0.01 * 0.01) and lrs["large"][-1] < 0.01
    checkpoints = {name: torch.load(tmp_path / name / "last.pt", weights_only=True) for name in runs}
    for name in ("accum", "global"):
        for part in ("model", "ema"):
            large, accumulated = checkpoints["large"][part], checkpoints[name][part]
            assert large.keys() == accumulated.keys()
            for key in large:
                assert torch.allclose(large[key], accumulated[key], atol=1e-5, rtol=0), (name, part, key)
        for row, large_row in zip(
            read_csv(tmp_path / name / "metrics.csv"), read_csv(tmp_path / "large" / "metrics.csv")
        ):
            assert float(row["train_loss"]) == pytest.approx(float(large_row["train_loss"]), rel=1e-4)
    # signal in the compared numbers: the losses move, none is the ln 3 of logits that all died to 0
    losses = [float(row["train_loss"]) for row in read_csv(tmp_path / "large" / "metrics.csv")]
    assert len(set(losses)) == 3 and all(abs(loss - math.log(3)) > 1e-3 for loss in losses), losses


def test_the_ema_decay_and_linear_lr_scaling_count_the_accumulated_global_batch():
    one = TrainConfig(batch_size=16, epochs=10, ema_decay=0.9999, ema_steps=4)
    accumulated = TrainConfig(batch_size=4, accum_steps=4, epochs=10, ema_decay=0.9999, ema_steps=4)
    assert (
        ema_decay_per_update(one, 1)
        == ema_decay_per_update(accumulated, 1)
        == ema_decay_per_update(
            TrainConfig(batch_size=2, accum_steps=4, epochs=10, ema_decay=0.9999, ema_steps=4), 2
        )
    )
    assert ema_decay_per_update(one, 1) != ema_decay_per_update(
        TrainConfig(batch_size=4, epochs=10, ema_decay=0.9999, ema_steps=4), 1
    )


def test_the_global_batch_derives_the_accumulation_steps_and_refuses_what_does_not_divide():
    def steps(world=1, **fields):
        cfg = with_accumulation(TrainConfig(**fields), world)
        return cfg.accum_steps, cfg.global_batch

    assert steps(batch_size=128, global_batch=1024) == (8, 1024)
    assert steps(batch_size=64, global_batch=1024) == (16, 1024)
    assert steps(world=8, batch_size=128, global_batch=1024) == (1, 1024)
    assert steps(world=2, batch_size=32, accum_steps=3) == (3, 192)
    assert steps(batch_size=32) == (1, 32)
    assert steps(batch_size=128, global_batch=1024, accum_steps=8) == (8, 1024)
    with pytest.raises(
        UserError, match=r"--batch-size 100 x 1 process = 100: e\.g\. --batch-size 64 \(16 accumulation"
    ):
        steps(batch_size=100, global_batch=1024)
    with pytest.raises(UserError, match="launch a number of processes that divides 1000"):
        steps(world=3, batch_size=10, global_batch=1000)
    with pytest.raises(UserError, match="is not a multiple"):
        steps(world=8, batch_size=256, global_batch=1024)  # fewer than one batch per process and step
    with pytest.raises(UserError, match="--accum-steps 4 and --global-batch 1024 disagree"):
        steps(batch_size=128, global_batch=1024, accum_steps=4)


def test_a_global_batch_that_does_not_divide_ends_with_one_line(tmp_path):
    result = run_main(
        "train.py", "--dummy", *TINY, "--batch-size", "6", "--global-batch", "16", "--output", tmp_path
    )
    assert_user_error(result, "--global-batch 16 is not a multiple of --batch-size 6", "--batch-size 4")
    assert not list(tmp_path.iterdir())  # refused before any run folder


def test_a_resume_keeps_the_global_batch_whatever_its_batch_size():
    """A resume with another --batch-size re-derives the accumulation steps from the run's global batch; a
    mid-epoch position, saved after an optimizer step, is counted again in the new batches; another global
    batch or number of processes starts the interrupted epoch again."""
    saved = {"batch_size": 4, "global_batch": 8, "accum_steps": 2}
    cfg, changes = resumed_config(TrainConfig(batch_size=2), saved, frozenset({"batch_size"}))
    cfg = with_accumulation(cfg, 1)
    assert (cfg.global_batch, cfg.accum_steps) == (8, 4) and changes == ["batch_size 4 -> 2"]
    again = with_accumulation(
        resumed_config(TrainConfig(accum_steps=4), saved, frozenset({"accum_steps"}))[0], 1
    )
    assert (again.batch_size, again.global_batch) == (4, 16)  # --accum-steps given: the global batch follows

    def position(saved_run, cfg, world=1):
        state = TrainState(batch=6, world_size=world, train_sums=torch.ones(3), train_seconds=1.0)
        train.restart_interrupted_epoch(with_accumulation(cfg, 1), state, saved_run, "last.pt")
        return state.batch

    assert position(saved, TrainConfig(batch_size=2, global_batch=8)) == 12  # 24 images so far
    assert position(saved, TrainConfig(batch_size=4, global_batch=8)) == 6
    assert position(saved, TrainConfig(batch_size=4, global_batch=16)) == 0  # another global batch
    assert position(saved, TrainConfig(batch_size=2, global_batch=8), world=2) == 0  # another world size
    assert position({"batch_size": 4}, TrainConfig(batch_size=4)) == 6  # a run from before global_batch


@pytest.mark.slow
def test_a_run_resumed_with_a_smaller_batch_keeps_its_global_batch(colours54, tmp_path):
    args = ["train.py", "--data", colours54, *TINY, "--lr", "0.01", "--output", tmp_path, "--run-name", "r"]
    first = run_main(*args, "--epochs", "1", "--batch-size", "4", "--global-batch", "8")
    assert first.returncode == 0, first.stderr
    resumed = run_main(*args, "--epochs", "2", "--batch-size", "2", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "global batch 8 = 2 per step x 1 process x 4 accumulation steps" in resumed.stdout
    assert "differs from the run's" not in resumed.stdout
    assert len(read_csv(tmp_path / "r" / "metrics.csv")) == 2


def test_a_recipe_on_one_process_accumulates_to_its_global_batch(tmp_path, capsys):
    """ResNet50 V2's recipe (8 GPUs x 128) on one process: 8 accumulation steps of 128, said by the printed
    command and the run header (here shortened: resnet18 at 32 px on 16 synthetic images)."""
    small = "--dummy --dummy-size 16 --epochs 1 --num-classes 3 --arch resnet18 --workers 0".split()
    small += "--train-crop-size 32 --val-resize-size 32 --val-crop-size 32".split()
    result = train.cli_main(["--recipe", "ResNet50_Weights.IMAGENET1K_V2", *small, "--output", str(tmp_path)])
    printed = capsys.readouterr().out
    command, header = printed.split("run dir")
    line = "global batch 1024 = 128 per step x 1 process x 8 accumulation steps"
    assert "python train.py --config configs/torchvision_v2.yaml" in command and line in command
    assert line in header and result["steps"] == 1  # 16 images: one (smaller) step
    assert (tmp_path / "dummy-resnet18" / "config.yaml").read_text().count("accum_steps: 8") == 1


def test_the_memory_part_measures_each_batch_in_a_new_process(tmp_path):
    """On a CPU: the growth of a new process's peak resident set, larger for the larger batch."""
    config = tmp_path / "small.yaml"
    config.write_text("train_crop_size: 32\noptimizer: adamw\n")
    options = [
        "--parts",
        "memory",
        "--arch",
        "mobilenet_v3_small",
        "--config",
        config,
        "--batch-sizes",
        "4,64",
    ]
    rows = benchmark.main(list(map(str, options)))["rows"]
    assert [r["batch"] for r in rows] == [4, 64] and 5 < rows[0]["peak_mb"] < rows[1]["peak_mb"], rows
    assert rows[0]["settings"] == "32 px, adamw, fp32"


def test_the_memory_part_finds_the_largest_batch_within_a_budget(monkeypatch):
    """A line through the measured peaks, then steps at the batch the line predicts until it holds: here a
    peak of 100 MB + 2 MB per image, and 0.001 MB more per image squared, which the first line misses."""

    def measured(arch, config, batch, args, device):
        steps.append(batch)
        if batch > device_holds:
            raise MemoryError
        peak_mb = 100 + 2 * batch + batch**2 / 1000
        return {
            "part": "memory",
            "arch": arch,
            "config": "defaults",
            "settings": "",
            "batch": batch,
            "peak_mb": peak_mb,
        }

    def fit(budget: str) -> dict:
        steps.clear()
        rows = benchmark.main(["--parts", "memory", "--batch-sizes", "8,16", "--fit-memory", budget])["rows"]
        assert [r["batch"] for r in rows if r["part"] == "memory"] == [8, 16]
        return rows[-1]

    steps, device_holds = [], 10**6
    monkeypatch.setattr(benchmark, "train_step_memory", measured)
    best = max(b for b in range(1, 1000) if 100 + 2 * b + b**2 / 1000 <= 1000)  # 378
    found = fit("1000MB")
    assert steps == [8, 16, 444, 368, 378] and found["batch"] == best, (steps, found)  # 444: above the budget
    assert found["checked_peak_mb"] == pytest.approx(100 + 2 * best + best**2 / 1000)
    assert found["part"] == "memory_fit" and found["from_batches"] == [8, 16]
    assert fit("100MB")["batch"] == 0 and steps == [8, 16]  # not even the fixed part fits
    device_holds = 400  # the first prediction runs out of memory: it is given, unchecked
    unchecked = fit("1000MB")
    assert (unchecked["batch"], unchecked["checked_peak_mb"], steps) == (444, None, [8, 16, 444])


def test_largest_batch_and_memory_sizes():
    rows = [{"batch": 32, "peak_mb": 4000.0}, {"batch": 64, "peak_mb": 7000.0}]  # 1000 MB + 93.75 per image
    assert benchmark.largest_batch(rows, 24 * 1024) == 251
    assert benchmark.largest_batch(rows, 900) == 0
    assert benchmark.memory_size("24GB") == benchmark.memory_size("24 GiB") == 24 * 1024
    assert benchmark.memory_size("8000MB") == 8000
    with pytest.raises(UserError, match="24GB"):
        benchmark.memory_size("24")


def test_batchnorm_running_statistics_follow_each_steps_first_batch_only():
    """As DDP keeps rank 0's: the other batches of a step are normalised by their own statistics but leave
    the running ones as they were; the layers' momentum is theirs again after the epoch."""
    from engine import RunningStatistics

    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3, momentum=0.3)).train()
    statistics = RunningStatistics(model)
    first, other = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2) + 5
    statistics.update(True)
    model(first)
    after_first = [layer.running_mean.clone() for layer in model]
    statistics.update(False)
    normalised = model(other)
    assert all(torch.equal(layer.running_mean, mean) for layer, mean in zip(model, after_first))
    assert normalised.mean().abs() < 1e-5  # by its own statistics
    statistics.update(True)
    assert [layer.momentum for layer in model] == [0.1, 0.3]


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_a_sampler_resumed_at_its_epochs_end_is_still_the_one_epochs_are_set_on(accum_steps):
    """A checkpoint written at an epoch's last step resumes with nothing left of that epoch: the sampler's
    len is 0, and the sampler the loop sets epochs on must still be it (not the DataLoader's placeholder)."""
    dataset = torch.utils.data.TensorDataset(torch.zeros(8))
    sampler = loader.TrainSampler(dataset, num_replicas=1, rank=0)
    sampler.skip = len(sampler)
    train_loader = loader.build_loader(dataset, 2, 0, sampler=sampler, accum_steps=accum_steps)
    assert len(sampler) == 0 and engine.epoch_sampler(train_loader) is sampler
