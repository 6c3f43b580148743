"""Experiment trackers besides TensorBoard (report.tensorboard_writer): Weights & Biases and MLflow, both
optional packages, imported only when --tracker names them. Each gets a run's resolved config, its
metrics per epoch (step: the epoch) and, at the end (also of a failed run), its files; a resume
continues the same tracker run, whose id the run folder keeps in tracker.json.

    with open_tracker("mlflow", run_dir, config, resumed=False, project="imagenet-classification") as t:
        t.log_epoch({"epoch": 1, "val_acc1": 71.2})

WANDB_MODE=offline keeps a W&B run in RUN_DIR/wandb/ (`wandb sync` uploads it later); MLflow logs to
MLFLOW_TRACKING_URI, or to the folder store mlruns/ beside the run folders.
"""

import importlib
import json
import os
import secrets
import sys
import time
from pathlib import Path

from utils import UserError, atomic_write_text

PACKAGES = {"wandb": "wandb", "mlflow": "mlflow-skinny"}  # what pip installs for each
# the files a tracker gets; not the .pt checkpoints: hundreds of MB each, uploaded at every run's end
RUN_FILES = ("config.yaml", "run.json", "metrics.csv", "curves.png")
IDS_FILE = "tracker.json"
# the shortest param value limit of MLflow's servers (500 before MLflow 1.28, 6000 since)
PARAM_LENGTH = 500
PARAMS_PER_BATCH = 100  # MLflow's log_batch limit


def tracker_module(name: str):
    """The tracker's package, imported here and only here: wandb takes ~0.4 s to import and mlflow ~0.7 s,
    and no other path needs them. A missing one ends in one line, before anything is trained or written."""
    if name == "none":
        return None
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise UserError(f"--tracker {name} needs the {name} package: pip install {PACKAGES[name]}") from e


class Tracker:
    """--tracker none, and what every tracker does: log_epoch(row) after each epoch; on leaving the
    `with` block (also by an error), the run's files and the run's end. A tracker that fails to log
    warns and training goes on: metrics.csv has every epoch, and the files are sent at the end."""

    name = "none"

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        status = "FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"
        files = [self.run_dir / name for name in RUN_FILES if (self.run_dir / name).is_file()]
        self._guarded("send the run's files", lambda: self._log_files(files))
        self._guarded("end the run", lambda: self._finish(status))
        return False  # an error goes on

    def log_epoch(self, row: dict) -> None:
        """The numbers of one epoch's row of metrics.csv (epoch, lr, losses, accuracies, speed), at step
        row['epoch']; words (which model best.pt holds) stay in metrics.csv."""
        numbers = (int, float)
        metrics = {k: float(v) for k, v in row.items() if isinstance(v, numbers) and not isinstance(v, bool)}
        self._guarded(f"log epoch {row['epoch']}", lambda: self._log(metrics, int(row["epoch"])))

    def _guarded(self, what: str, call) -> None:
        try:
            call()
        except Exception as e:  # the service's or the network's error: the training goes on
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"warning: {self.name} could not {what}: {first[:200]}", file=sys.stderr)

    def _log(self, metrics: dict, step: int) -> None:
        pass

    def _log_files(self, files: list[Path]) -> None:
        pass

    def _finish(self, status: str) -> None:
        pass


def open_tracker(name: str, run_dir: Path, config: dict, resumed: bool, project: str) -> Tracker:
    """The tracker of a run (the caller opens it on rank 0 only), once config.yaml is written: a new
    tracker run, or on a resume the one whose id tracker.json keeps. project: the W&B project or the
    MLflow experiment."""
    module = tracker_module(name)
    run_dir = Path(run_dir)
    ids = read_ids(run_dir) if resumed else {}
    if name == "wandb":
        tracker = WandbTracker(module, run_dir, config, project, ids.get("wandb"))
    elif name == "mlflow":
        tracker = MlflowTracker(module, run_dir, config, project, ids.get("mlflow"))
    else:
        return Tracker(run_dir)
    write_ids(run_dir, {**ids, name: tracker.ids})
    return tracker


def read_ids(run_dir: Path) -> dict:
    """tracker.json: {'wandb': {'id': ...}, 'mlflow': {'run_id': ..., 'tracking_uri': ...}}, or {}."""
    try:
        return json.loads((run_dir / IDS_FILE).read_text())
    except (OSError, ValueError):  # none yet (a run that had no tracker), or unreadable: a new tracker run
        return {}


def write_ids(run_dir: Path, ids: dict) -> None:
    atomic_write_text(run_dir / IDS_FILE, json.dumps(ids, indent=1) + "\n")


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """{'arch': 'resnet18', 'loss.focal': '1.0', 'milestones': '[30, 60, 80]', ...}: MLflow's params are
    strings of at most PARAM_LENGTH characters; a mapping (a weighted loss) becomes one param per key."""
    params = {}
    for key, value in config.items():
        if isinstance(value, dict):
            params.update(flat_params(value, f"{prefix}{key}."))
        else:
            params[f"{prefix}{key}"] = str(value)[:PARAM_LENGTH]
    return params


class WandbTracker(Tracker):
    """A W&B run named as the run folder, kept in RUN_DIR/wandb/; WANDB_MODE (offline: nothing leaves the
    machine), WANDB_ENTITY, WANDB_API_KEY and wandb's other variables apply as wandb documents them."""

    name = "wandb"

    def __init__(self, wandb, run_dir: Path, config: dict, project: str, ids: dict | None):
        super().__init__(run_dir)
        # a resume continues its W&B run; a new run gets a new id, even in the folder of a failed start
        self.ids = ids or {"id": secrets.token_hex(8)}
        try:
            self.run = wandb.init(
                project=project,
                name=run_dir.name,
                dir=str(run_dir),
                config=config,
                id=self.ids["id"],
                resume="allow",
                allow_val_change=True,  # a resume may change a setting (--epochs 120)
            )
        except wandb.errors.Error as e:  # not logged in, no network: the run has not started
            raise UserError(
                f"--tracker wandb could not start its run: {str(e).rstrip('. ')}; `wandb login`, or "
                "WANDB_MODE=offline to keep it in the run folder"
            ) from e

    def _log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def _log_files(self, files: list[Path]) -> None:
        for path in files:
            self.run.save(str(path), base_path=str(self.run_dir), policy="now")

    def _finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


class MlflowTracker(Tracker):
    """An MLflow run named as the run folder, in the experiment `project`, through MlflowClient (no
    active-run globals). The tracking URI: MLFLOW_TRACKING_URI, else a resumed run's own, else the folder
    store file:OUTPUT/mlruns beside the run folders (`mlflow ui --backend-store-uri OUTPUT/mlruns`)."""

    name = "mlflow"

    def __init__(self, mlflow, run_dir: Path, config: dict, project: str, ids: dict | None):
        super().__init__(run_dir)
        # a resume continues in its run's store, unless MLFLOW_TRACKING_URI names another
        default = (ids or {}).get("tracking_uri") or (run_dir.resolve().parent / "mlruns").as_uri()
        uri = os.environ.get("MLFLOW_TRACKING_URI") or default
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps the folder store in maintenance mode and asks for this opt-in: a folder
            # needs no server and no database (mlflow-skinny has no SQLAlchemy for sqlite:)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.mlflow = mlflow
        try:
            self.client = mlflow.MlflowClient(tracking_uri=uri)
            run = self._continued(ids) or self._new_run(project, run_dir)
            self.run_id = run.info.run_id
            known = run.data.params  # a resumed run keeps its params: MLflow's params never change
            params = {k: v for k, v in flat_params(config).items() if k not in known}
            items = [self.mlflow.entities.Param(k, v) for k, v in params.items()]
            for start in range(0, len(items), PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, params=items[start : start + PARAMS_PER_BATCH])
        except mlflow.exceptions.MlflowException as e:
            raise UserError(f"--tracker mlflow could not start its run at {uri}: {e.message}") from e
        self.ids = {"run_id": self.run_id, "tracking_uri": uri}
        print(f"mlflow: run {self.run_id} of experiment {project} in {uri}")

    def _continued(self, ids: dict | None):
        """The resumed run's MLflow run, running again; None where it is not in this tracking store."""
        if not ids:
            return None
        try:
            self.client.update_run(ids["run_id"], status="RUNNING")
            return self.client.get_run(ids["run_id"])
        except self.mlflow.exceptions.MlflowException:
            print(
                f"note: MLflow run {ids['run_id']} is not in this tracking store; the resume starts another"
            )
            return None

    def _new_run(self, project: str, run_dir: Path):
        experiment = self.client.get_experiment_by_name(project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(project)
        return self.client.create_run(
            experiment_id, run_name=run_dir.name, tags={"run_dir": str(run_dir.resolve())}
        )

    def _log(self, metrics: dict, step: int) -> None:
        now = int(time.time() * 1000)
        rows = [self.mlflow.entities.Metric(key, value, now, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=rows)

    def _log_files(self, files: list[Path]) -> None:
        for path in files:
            self.client.log_artifact(self.run_id, str(path))

    def _finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)
