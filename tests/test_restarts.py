"""When a process dies (restarts.py): torchrun --max-restarts continues the job's own run exactly, a
preempted run saves and the same command continues it, one rank's non-finite loss stops every rank with
one line, an evaluation sweep restarted mid-sweep writes every row once, and a killed write's temporary
file is removed by the next run. 2 processes with gloo on the CPU; tests/lost_processes.py makes one
process fail as a cluster fails it."""

import hashlib
import os
import shutil
import time

import pytest
import torch
from torchvision import models

from coder import imagenet_wnids
from conftest import ROOT, make_image, read_csv, run_main, run_script, save_torchvision_checkpoint
from test_train import TINY, make_colour_dataset
from utils import HOST, remove_stale_temporaries

TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
LOST = str(ROOT / "tests" / "lost_processes.py")
OPTIONS = [*TINY, *"--epochs 1 --batch-size 4 --lr 0.01 --save-every-steps 2 --log-interval 1".split()]
TIMING = {"epoch_time_s", "img_per_s"}  # how long, not what: differs between any two runs


def train(output, data, failure="none", *options, restarts=0, timeout=90):  # runs take ~20 s: no hang
    launcher = [*TORCHRUN, f"--max-restarts={restarts}"] if failure != "single" else []
    failure = "sigterm:3" if failure == "single" else failure
    args = [*launcher, LOST, failure, "train.py", "--data", data, *OPTIONS, "--output", output, *options]
    return run_script(*args, timeout=timeout)


def weights(run_dir) -> dict:
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


def metrics(run_dir) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in read_csv(run_dir / "metrics.csv")]


def assert_same_run(run_dir, reference) -> None:
    ours, theirs = weights(run_dir), weights(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), run_dir
    assert metrics(run_dir) == metrics(reference)


def digest(folder) -> dict:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(data, the run dir of an uninterrupted 2-process run)."""
    root = tmp_path_factory.mktemp("reference")
    data = make_colour_dataset(root / "data")
    result = train(root / "out", data, "none", "--run-name", "ref")
    assert result.returncode == 0, result.stderr[-3000:]
    return data, root / "out" / "ref"


def with_decoy(output, reference) -> tuple:
    """A finished run of the same architecture in OUTPUT whose name sorts last and whose files are the
    newest: what a restart used to continue. (its folder, its files' digests)."""
    decoy = output / "resnet18-99999999-999999"
    shutil.copytree(reference, decoy)
    later = time.time() + 3600
    for path in decoy.iterdir():
        os.utime(path, (later, later))
    return decoy, digest(decoy)


def new_runs(output, decoy) -> list:
    return [d for d in output.iterdir() if d.is_dir() and d.name.startswith("resnet18-") and d != decoy]


def test_lost_processes_restart_their_own_run_afresh_or_from_its_checkpoint_exactly(tmp_path, reference):
    """One job under --max-restarts=2 beside a finished decoy run: rank 1 SIGKILLed as the first start's
    epoch begins (no checkpoint: the restart starts the same folder afresh), then after the second start's
    2nd mid-epoch checkpoint (the restart continues from it). It ends with the weights and metrics of an
    uninterrupted run; the decoy is byte-identical; no temporary file is left."""
    data, ref = reference
    decoy, before = with_decoy(tmp_path, ref)
    result = train(tmp_path, data, "kill-at-start,kill-after-checkpoint:2@1", restarts=2)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = new_runs(tmp_path, decoy)
    assert f"note: restart 1 of this job: starting {run} afresh" in result.stdout
    assert f"note: restart 2 of this job: continuing {run} from its last.pt" in result.stdout
    assert "resumed from" in result.stdout and "batch 5, after 4 optimizer steps" in result.stdout
    assert_same_run(run, ref)
    assert digest(decoy) == before and not list(run.glob(".*.tmp"))


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_one_line(tmp_path, reference):
    data, _ = reference
    start = time.time()
    result = train(tmp_path, data, "nan-on-rank-1:3", "--run-name", "nan")
    assert result.returncode != 0 and time.time() - start < 60
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "loss became non-finite" in errors[0] and "on rank 1" in errors[0], errors
    assert "exitcode  : 2" in result.stderr  # the error's exit code (torchrun may end the other rank first)


def test_a_preempted_run_saves_and_the_same_command_continues_it(tmp_path, reference):
    """SIGTERM reaches rank 0 at its 3rd batch and rank 1 at its 4th: both stop at the next log point (at
    every step here), after step 3, save, mark the run preempted and exit with 75 (torchrun itself exits
    1); the same command again continues to the uninterrupted run's weights and metrics."""
    data, ref = reference
    stopped = train(tmp_path, data, "sigterm:3", "--run-name", "pre")
    assert stopped.returncode != 0
    assert "preempted by SIGTERM at epoch 1, batch 3, after 3 optimizer steps" in stopped.stderr, (
        stopped.stderr
    )
    assert stopped.stderr.count("exitcode  : 75") == 2 and (tmp_path / "pre" / "preempted.json").is_file()
    again = train(tmp_path, data, "none", "--run-name", "pre")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "was preempted: the same command continues it" in again.stdout
    assert_same_run(tmp_path / "pre", ref)
    assert not (tmp_path / "pre" / "preempted.json").exists()


def test_one_process_preempted_exits_with_the_requeue_code(tmp_path, reference):
    data, _ = reference
    result = train(tmp_path, data, "single", "--run-name", "one")
    assert result.returncode == 75, result.stderr[-2000:]
    assert "preempted by SIGTERM" in result.stderr and (tmp_path / "one" / "last.pt").is_file()


def test_an_evaluation_sweep_restarted_mid_sweep_writes_every_row_once(tmp_path, torch_home):
    wnids = imagenet_wnids()
    for i in range(12):
        make_image(tmp_path / "val" / wnids[i % 3] / f"{i}.JPEG", (48, 40), seed=i)
    for arch, enum in (
        ("resnet18", models.ResNet18_Weights),
        ("squeezenet1_1", models.SqueezeNet1_1_Weights),
    ):
        save_torchvision_checkpoint(torch_home, arch, enum.IMAGENET1K_V1)
    options = "--models resnet18 squeezenet1_1 --resize 40 --crop 32 --batch-size 4 --workers 0".split()
    args = [
        *TORCHRUN,
        "--max-restarts=1",
        LOST,
        "kill-eval:2",
        "test_torchvision.py",
        "--data",
        tmp_path / "val",
    ]
    result = run_script(*args, *options, "--output", tmp_path / "out", env={"TORCH_HOME": str(torch_home)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "already in" in result.stdout + result.stderr  # the restart skipped the row written before
    rows = read_csv(tmp_path / "out" / "eval.csv")
    assert sorted(row["model"] for row in rows) == ["resnet18", "squeezenet1_1"]
    assert all(row["n_images"] == "12" for row in rows)


def test_stale_temporary_files_are_removed_and_live_ones_kept(tmp_path):
    """atomic_write names its temporary file after its writer (host and pid): the next run of a folder
    removes those whose writer is gone, keeps a live writer's, and another host's only once a day old."""
    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    names = {
        "stale": f".last.pt.{HOST}-{dead}.abc123.tmp",
        "live": f".last.pt.{HOST}-{os.getpid()}.def456.tmp",
        "other host, new": f".eval.json.elsewhere-{dead}.ghi789.tmp",
        "other host, old": f".eval.json.elsewhere-{dead}.jkl012.tmp",
        "not ours": ".notes.tmp",
    }
    for name in names.values():
        (tmp_path / name).write_text("x")
    old = time.time() - 2 * 24 * 3600
    os.utime(tmp_path / names["other host, old"], (old, old))
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([names["stale"], names["other host, old"]])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [names["live"], names["other host, new"], names["not ours"]]
    )


def test_a_run_folder_is_cleared_of_a_killed_writes_temporary_file(tmp_path, reference):
    data, _ = reference
    (tmp_path / "kept").mkdir()
    stale = tmp_path / "kept" / f".last.pt.{HOST}-{2**22 + 1}.xyz987.tmp"
    stale.write_bytes(b"half a checkpoint")
    result = run_main("train.py", "--data", data, *OPTIONS, "--output", tmp_path, "--run-name", "kept")
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and (tmp_path / "kept" / "last.pt").is_file()
