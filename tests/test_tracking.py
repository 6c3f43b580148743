"""--tracker wandb and --tracker mlflow: a tiny train.py run's config, per-epoch metrics and files reach
the tracker (W&B offline, MLflow's folder store in tmp_path: no network), a resume continues the same
tracker run, a missing package ends in one line before anything is written, and neither package is
imported without --tracker."""

import json
import struct
import sys

import pytest

from conftest import assert_user_error, run_main, run_script
from reliability_inputs import random_bytes, train_folder
from test_train import TINY
from tracking import PARAM_LENGTH, flat_params

RUN = [*TINY, "--batch-size", "4", "--run-name", "tracked"]
RESUME = ["--run-name", "tracked", "--resume", "auto"]


@pytest.fixture
def wandb_env(tmp_path):
    """W&B offline, with its settings, cache and staging folders in tmp_path (never ~/.config, ~/.cache);
    afterwards its service process ends, which would keep these settings for the rest of the session."""
    import wandb

    folders = {name: tmp_path / "wandb_home" / name for name in ("config", "cache", "data")}
    yield {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": folders["config"],
        "WANDB_CACHE_DIR": folders["cache"],
        "WANDB_DATA_DIR": folders["data"],
    }
    wandb.teardown()


def wandb_records(path) -> list:
    """The protobuf records of an offline run's .wandb file. Its format is LevelDB's log (wandb's Python
    reader, wandb.sdk.internal.datastore, went with the move to wandb-core): a 7-byte header, then 32 KiB
    blocks of chunks, each a 7-byte header (crc32, length, kind: 1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, parts, records = path.read_bytes(), 7, [], []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def offline_run(wandb_dir) -> dict:
    """One offline run's id, config, per-epoch history and the files it saved."""
    run = {"config": {}, "history": [], "files": set()}
    for record in wandb_records(next(wandb_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"], run["name"] = record.run.run_id, record.run.display_name
            run["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            items = record.history.item  # a key as one name, or as its nested path
            run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items})
        elif kind == "files":
            run["files"] |= {file.path for file in record.files.files}
    return run


def test_wandb_offline_gets_the_config_metrics_and_files_and_a_resume_continues_its_run(
    tmp_path, train_data, offline, wandb_env
):
    env, out = wandb_env, tmp_path / "out"
    args = ["train.py", "--data", train_data, *RUN, "--output", out, "--tracker", "wandb"]
    first = run_main(*args, "--epochs", "1", env=env)
    assert first.returncode == 0, first.stderr
    run_dir = out / "tracked"
    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    run = offline_run(folder)
    assert run["name"] == "tracked" and run["config"]["arch"] == "resnet18" and run["config"]["epochs"] == 1
    assert [row["epoch"] for row in run["history"]] == [1]
    assert all(row["_step"] == row["epoch"] and "val_acc1" in row for row in run["history"])
    assert {"config.yaml", "run.json", "metrics.csv", "curves.png"} <= run["files"]
    assert (folder / "files" / "metrics.csv").read_text() == (run_dir / "metrics.csv").read_text()
    assert json.loads((run_dir / "tracker.json").read_text()) == {"wandb": {"id": run["id"]}}

    resumed = run_main("train.py", *RESUME, "--output", out, "--epochs", "2", env=env)
    assert resumed.returncode == 0, resumed.stderr
    (later,) = set((run_dir / "wandb").glob("offline-run-*")) - {folder}
    run_again = offline_run(later)
    assert run_again["id"] == run["id"]  # `wandb sync` adds it to the same W&B run
    assert [row["epoch"] for row in run_again["history"]] == [2]


def test_mlflow_folder_store_gets_params_metrics_and_artifacts_and_a_resume_continues_its_run(
    tmp_path, train_data, offline, monkeypatch
):
    import mlflow

    store = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3's opt-in, as tracking.py sets it
    out, env = tmp_path / "out", {"MLFLOW_TRACKING_URI": store}
    args = ["train.py", "--data", train_data, *RUN, "--output", out, "--tracker", "mlflow"]
    first = run_main(*args, "--epochs", "1", "--loss", "{ce: 1.0}", env=env)
    assert first.returncode == 0, first.stderr
    # without MLFLOW_TRACKING_URI: the run's own store, kept in tracker.json
    resumed = run_main("train.py", *RESUME, "--output", out, "--epochs", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert not (out / "mlruns").exists()

    client = mlflow.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("imagenet-classification")
    (run,) = client.search_runs([experiment.experiment_id])
    assert json.loads((out / "tracked" / "tracker.json").read_text())["mlflow"]["run_id"] == run.info.run_id
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert run.data.params["arch"] == "resnet18" and run.data.params["loss.ce"] == "1.0"
    assert run.data.params["epochs"] == "1"  # MLflow's params never change: config.yaml has the resume's
    history = client.get_metric_history(run.info.run_id, "val_acc1")
    assert sorted(metric.step for metric in history) == [1, 2]
    artifacts = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "run.json", "metrics.csv", "curves.png"} <= artifacts
    assert not any(path.endswith(".pt") for path in artifacts)


def test_a_failed_run_ends_its_mlflow_run_as_failed_with_its_files_in_the_default_store(
    tmp_path, offline, monkeypatch
):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    data = train_folder(tmp_path / "data", bad_val=random_bytes)  # epoch 1's validation stops the run
    out = tmp_path / "out"
    args = ["--data", data, *RUN, "--output", out, "--tracker", "mlflow", "--tracker-project", "mine"]
    assert_user_error(run_main("train.py", *args, "--epochs", "1"), "broken.png")
    store = json.loads((out / "tracked" / "tracker.json").read_text())["mlflow"]["tracking_uri"]
    assert store == (out / "mlruns").resolve().as_uri()  # beside the run folders
    client = mlflow.MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("mine").experiment_id])
    assert run.info.status == "FAILED"
    assert {"config.yaml", "run.json"} <= {
        artifact.path for artifact in client.list_artifacts(run.info.run_id)
    }


@pytest.mark.parametrize("tracker, package", [("wandb", "wandb"), ("mlflow", "mlflow-skinny")])
def test_a_missing_tracker_package_is_one_line_and_writes_nothing(
    tmp_path, train_data, monkeypatch, tracker, package
):
    monkeypatch.setitem(sys.modules, tracker, None)  # what `import wandb` raises where it is not installed
    out = tmp_path / "out"
    result = run_main("train.py", "--data", train_data, *RUN, "--output", out, "--tracker", tracker)
    assert_user_error(result, f"--tracker {tracker} needs the {tracker} package: pip install {package}")
    assert not out.exists()


def test_params_are_flat_strings_within_mlflows_limit():
    config = {"loss": {"focal": 1.0, "smooth_l1": 0.5}, "milestones": [30, 60], "weights": None}
    params = flat_params({**config, "data": "x" * 1000})
    assert params == {
        "loss.focal": "1.0",
        "loss.smooth_l1": "0.5",
        "milestones": "[30, 60]",
        "weights": "None",
        "data": "x" * PARAM_LENGTH,
    }


def test_no_tracker_package_is_imported_without_tracker():
    code = "import sys, train; print(sorted({'wandb', 'mlflow'} & set(sys.modules)))"
    result = run_script("-c", code)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
