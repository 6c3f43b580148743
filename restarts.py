"""How a training job outlives its processes: which run a restarted, requeued or repeated command
continues, and the stop that SIGTERM or SIGUSR1 asks for.

torchrun --max-restarts starts every worker again after one dies; SLURM's --requeue starts the whole
job again after a preemption or a node failure. Either way train.py runs again with the same command.
Rank 0 records each run's folder under the command that made it (OUTPUT/.jobs/<key>.json, with the
job's identity), so that

  - a restart of the job (torchrun's restart count, SLURM's) continues that folder from its last.pt, or
    starts that same folder afresh when the run had saved no checkpoint yet: never another run of the
    architecture, with or without --run-name;
  - the same command run again after a preemption continues the preempted run (a requeued SLURM job,
    or a user starting it by hand); after a finished or failed run it starts a new one, as always.

SIGTERM (what SLURM, Kubernetes and torchrun send before they kill) and SIGUSR1 (what `sbatch
--signal=USR1@120` sends ahead of a time limit) only set a flag: the training loop's ranks agree on it
at their next log point (the all-reduce they already do there), save a checkpoint, mark the run
preempted (preempted.json in its folder) and exit with REQUEUE_EXIT. Loader worker processes ignore
both signals: the main process decides when to stop.
"""

import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

from utils import atomic_write_text

REQUEUE_EXIT = 75  # sysexits.h's EX_TEMPFAIL: a temporary failure, run the same command again
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
PREEMPTED = "preempted.json"
_stop: list[str] = []  # the names of the stop signals this process received
_previous: dict = {}  # the handlers install_stop_handlers replaced


class Preempted(Exception):
    """The ranks agreed to stop for a stop signal; the run's checkpoint is saved."""


def install_stop_handlers() -> None:
    """SIGTERM and SIGUSR1 set the stop flag instead of ending the process (from the main thread; a
    no-op in another, where Python can't set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return
    _stop.clear()
    for signum in STOP_SIGNALS:
        _previous[signum] = signal.signal(signum, _note_stop)


def _note_stop(number, frame) -> None:
    _stop.append(signal.Signals(number).name)


def restore_stop_handlers() -> None:
    """The handlers before install_stop_handlers (a process that runs train.py's main more than once)."""
    for signum, handler in _previous.items():
        signal.signal(signum, handler)
    _previous.clear()


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """A DataLoader's worker_init_fn: loader processes leave the stop to the main process, which saves
    and then ends them."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def stop_requested() -> str | None:
    """The first stop signal received ('SIGTERM', 'SIGUSR1'), or None."""
    return _stop[0] if _stop else None


def restart_count() -> int:
    """How many times the job was started again: by torchrun --max-restarts, or by SLURM's requeue."""
    counts = (os.environ.get(name, 0) for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))
    return sum(map(int, counts))


def job_identity() -> str | None:
    """What stays the same across the restarts of one job and differs between jobs: SLURM's job id (and
    array task), else torchrun's rendezvous id (--rdzv-id; a fresh one per torchrun with --standalone),
    else, where torchrun runs with the default id 'none', the torchrun process of rank 0's node (the
    workers' parent); None outside both."""
    if "SLURM_JOB_ID" in os.environ:
        return f"slurm-{os.environ['SLURM_JOB_ID']}-{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return f"torchrun-{run_id}"
    if run_id == "none":
        return f"torchrun-{os.uname().nodename}-{os.getppid()}"
    return None


def command_key(settings: dict) -> str:
    """A name for a command: the settings it gives (train.py's given fields and their values)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def job_file(output, key: str) -> Path:
    return Path(output) / ".jobs" / f"{key}.json"


def record_run(output, key: str, run_dir: Path) -> None:
    """Rank 0, once a command's run folder is chosen: the folder, for this job's restarts and for the
    same command after a preemption."""
    record = {"run_dir": run_dir.name, "job": job_identity(), "recorded": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_text(job_file(output, key), json.dumps(record) + "\n")


def recorded_run(output, key: str) -> dict | None:
    """The record of the command's last run ({'run_dir', 'job', ...}), or None."""
    path = job_file(output, key)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or unreadable: as if none
        return None
    return record if isinstance(record, dict) and isinstance(record.get("run_dir"), str) else None


def mark_preempted(run_dir: Path, info: dict) -> None:
    atomic_write_text(run_dir / PREEMPTED, json.dumps(info) + "\n")


def is_preempted(run_dir: Path) -> bool:
    return (run_dir / PREEMPTED).is_file()


def clear_preempted(run_dir: Path) -> None:
    (run_dir / PREEMPTED).unlink(missing_ok=True)
