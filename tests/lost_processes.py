"""Run train.py or test_torchvision.py under torchrun with one process made to fail as a cluster fails it,
at a point the test chooses, on the job's first start (or the start a failure names): the tests of
tests/test_restarts.py. The failures live here, not in the scripts: they are the tests' question.

    torchrun --nproc_per_node=2 --max-restarts=1 tests/lost_processes.py FAILURES SCRIPT ARGS...

FAILURES: comma-separated, each FAILURE or FAILURE@R (on the R-th restart; default: the first start):
kill-after-checkpoint:N (rank 1 is SIGKILLed once the N-th mid-epoch checkpoint is saved), kill-at-start
(rank 1 SIGKILLed as its first epoch starts, before any checkpoint), nan-on-rank-1:N (rank 1's loss is NaN
from its N-th batch on, on every start), sigterm:N (each rank R sends itself SIGTERM at its (N + R)-th
batch, as a cluster's signals reach the ranks apart), kill-eval:N (rank 1 SIGKILLed as the sweep's N-th
weights start), none.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import test_torchvision  # noqa: E402
import train  # noqa: E402 (after the path to the repo)

RANK = int(os.environ.get("RANK", 0))
START = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))  # 0: the job's first start


def counting(function, at: int, then):
    """function, calling then(n) before its n-th call (n >= at)."""
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] >= at:
            then(calls[0])
        return function(*args, **kwargs)

    return wrapper


def on_each_batch(then) -> None:
    """train.py's criterion, with loss = then(batch number, loss) after each call (validation's too)."""
    build_loss = train.build_loss

    def build_then(*args, **kwargs):
        criterion = build_loss(*args, **kwargs)
        forward, calls = criterion.forward, [0]

        def forward_then(logits, targets):
            calls[0] += 1
            return then(calls[0], forward(logits, targets))

        criterion.forward = forward_then
        return criterion

    train.build_loss = build_then


def kill(_=None):
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


FAILURES = ("kill-after-checkpoint", "kill-at-start", "nan-on-rank-1", "sigterm", "kill-eval", "none")


def failing(failure: str) -> None:
    failure, _, start = failure.partition("@")
    name, _, number = failure.partition(":")
    n, on_this_start = int(number or 0), int(start or 0) == START
    if name not in FAILURES:
        raise SystemExit(f"unknown failure {failure}")
    if name == "kill-after-checkpoint" and on_this_start and RANK == 1:
        save = train.save
        saves = [0]

        def save_then_die(*args, **kwargs):
            save(*args, **kwargs)
            if kwargs.get("partial_sums") is not None:
                saves[0] += 1
                if saves[0] == n:
                    kill()

        train.save = save_then_die
    elif name == "kill-at-start" and on_this_start and RANK == 1:
        train.train_one_epoch = counting(train.train_one_epoch, 1, kill)
    elif name == "nan-on-rank-1" and RANK == 1:
        on_each_batch(lambda batch, loss: loss * float("nan") if batch >= n else loss)
    elif name == "sigterm" and on_this_start:

        def signal_once(batch, loss):
            if batch == n + RANK:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss

        on_each_batch(signal_once)
    elif name == "kill-eval" and on_this_start and RANK == 1:
        test_torchvision.evaluate_weights = counting(test_torchvision.evaluate_weights, n, kill)


if __name__ == "__main__":
    for failure in sys.argv[1].split(","):
        failing(failure)
    script = {"train.py": train.cli_main, "test_torchvision.py": test_torchvision.main}[sys.argv[2]]
    script(sys.argv[3:])
