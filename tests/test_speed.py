"""test_torchvision.py --speed (speed.py): the zoo's speed rows on this CPU, resumed and skipped, one
measurement for weights of one architecture and crop, failures skipped with a line, and the plot's
Pareto front."""

import json
import re

import pytest
import torch

import speed
from conftest import assert_user_error, read_csv, run_main
from report import pareto_front

FAST = ["--batch-size", "2", "--speed-seconds", "0.01", "--device", "cpu"]


def sweep(out, *options, train=False):
    mode = ["--speed", "train"] if train else ["--speed"]
    result = run_main("test_torchvision.py", *mode, *FAST, *options, "--output", out)
    assert result.returncode == 0, result.stderr
    return result, json.loads((out / "speed.json").read_text())


def test_speed_rows_measure_share_resume_and_skip(tmp_path):
    """mobilenet_v3_large's two weights (one architecture, one crop) share a measurement; int8 runs on the
    CPU's kernels; --speed train adds the step; a second run skips every row, another batch size measures
    anew, and --force measures again."""
    models = ["--models", "mobilenet_v3_large", "quantized_mobilenet_v3_large", "--weights", "all"]
    result, rows = sweep(tmp_path, *models, train=True)
    assert [r["weights"] for r in rows] == [
        "MobileNet_V3_Large_Weights.IMAGENET1K_V1",
        "MobileNet_V3_Large_Weights.IMAGENET1K_V2",
        "MobileNet_V3_Large_QuantizedWeights.IMAGENET1K_QNNPACK_V1",
    ]
    v1, v2, int8 = rows
    assert v2["measured_as"] == v1["weights"] and v2["img_per_s"] == v1["img_per_s"]
    assert v1["acc1_published"] == 74.042 and v2["acc1_published"] == 75.274 and v2["crop"] == 224
    for row in rows:
        assert row["img_per_s"] > 0 and 0 < row["latency_p50_ms"] <= row["latency_p99_ms"]
        assert row["peak_mem_mb"] > 0 and row["device"] == "cpu" and row["batch_size"] == 2
        assert row["machine"] and row["threads"] == torch.get_num_threads() and row["train"] is True
    assert v1["train_img_per_s"] > 0 and v1["train_peak_mem_mb"] > v1["peak_mem_mb"] * 0.5
    assert int8["train_img_per_s"] is None  # torchvision's int8 models are for inference
    columns = read_csv(tmp_path / "speed.csv")[0].keys()
    assert {"model", "weights", "device", "backend", "batch_size", "img_per_s", "latency_p50_ms"} <= set(
        columns
    )
    assert {"latency_p99_ms", "peak_mem_mb"} <= set(columns)
    table = (tmp_path / "speed.md").read_text()
    assert "| MobileNet_V3_Large_Weights.IMAGENET1K_V2 |" in table and "| train_img_per_s |" in table
    assert f"### {v1['machine']} (cpu, {v1['threads']} threads, torch {torch.__version__}): pytorch" in table
    assert (tmp_path / "acc_vs_speed.png").stat().st_size > 10_000

    again, same = sweep(tmp_path, *models, train=True)
    assert same == rows and again.stdout.count("measured before") == 3
    one_at_3 = [*models[:2], "--weights", "default", "--batch-size", "3"]
    _, more = sweep(tmp_path, *one_at_3, train=True)
    assert len(more) == 4 and more[-1]["batch_size"] == 3 and more[:3] == rows
    assert (tmp_path / "speed.md").read_text().count("### ") == 2  # a table per settings
    forced, redone = sweep(tmp_path, *one_at_3, "--force", train=True)
    assert len(redone) == 4 and "measured before" not in forced.stdout and redone[-1] != more[-1]


def test_a_model_that_fails_or_does_not_fit_is_skipped_and_the_sweep_goes_on(tmp_path, monkeypatch):
    measure = speed.measure

    def failing(arch, *args):
        if arch == "squeezenet1_0":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if arch == "squeezenet1_1":
            raise RuntimeError("Given groups=1, weight of size [64, 3, 3, 3], expected input ...")
        return measure(arch, *args)

    monkeypatch.setattr(speed, "measure", failing)
    result, rows = sweep(tmp_path, "--models", "squeezenet*", "mobilenet_v3_small")
    assert [r["model"] for r in rows] == ["mobilenet_v3_small"]
    assert re.search(r"SqueezeNet1_0_Weights.IMAGENET1K_V1: skipped, does not fit at batch 2", result.stderr)
    assert (
        "SqueezeNet1_1_Weights.IMAGENET1K_V1: skipped, failed: RuntimeError: Given groups=1" in result.stderr
    )
    assert (
        "skipped: SqueezeNet1_0_Weights.IMAGENET1K_V1, SqueezeNet1_1_Weights.IMAGENET1K_V1" in result.stdout
    )


def test_what_a_device_cannot_run_is_refused_with_the_way_out():
    cuda = speed.SpeedSettings(torch.device("cuda"), None, True, False, "pytorch", 8, False, 1.0)
    assert "--device cpu" in speed.refusal("quantized_resnet50", cuda)
    assert speed.refusal("resnet50", cuda) is None
    onnx = speed.SpeedSettings(torch.device("cuda"), None, True, False, "onnxruntime", 8, False, 1.0)
    assert "ONNX Runtime runs on the CPU" in speed.refusal("resnet50", onnx)


def test_speed_train_with_onnxruntime_is_a_user_error(tmp_path):
    options = [
        "--speed",
        "train",
        "--models",
        "resnet18",
        "--backend",
        "onnxruntime",
        *FAST,
        "--output",
        tmp_path,
    ]
    result = run_main("test_torchvision.py", *options, "--output", tmp_path)
    assert_user_error(result, "drop --backend onnxruntime")


@pytest.mark.parametrize("seconds", ["0", "-1", "nan"])
def test_speed_seconds_must_be_positive(seconds):
    assert_user_error(run_main("test_torchvision.py", "--speed", "--speed-seconds", seconds), "above 0")


def test_the_speed_plot_rings_the_pareto_front(tmp_path):
    """Published top-1 against ms per image: the HTML rings exactly the points no other beats (as fast
    or faster and at least as accurate)."""
    rates = {"a": (1000, 70.0), "b": (500, 75.0), "c": (400, 74.0), "d": (100, 80.0), "e": (2000, 60.0)}
    rows = [
        {
            "model": name,
            "weights": f"W.{name}",
            "family": "f",
            "machine": "cpu",
            "backend": "pytorch",
            "amp": "none",
            "batch_size": 8,
            "img_per_s": rate,
            "latency_p50_ms": 1.0,
            "latency_p99_ms": 2.0,
            "peak_mem_mb": 10.0,
            "acc1_published": acc,
            "acc5_published": None,
        }
        for name, (rate, acc) in rates.items()
    ]
    speed.plot_speed(rows, tmp_path / "acc_vs_speed.png")
    page = (tmp_path / "acc_vs_speed.html").read_text()
    circles = re.findall(r"<circle([^>]*)>\s*<title>([a-z]) —", page)
    ringed = sorted(name for attributes, name in circles if 'stroke="black"' in attributes)
    front = pareto_front([(1000 / rate, acc) for rate, acc in rates.values()])
    assert ringed == sorted(list(rates)[i] for i in front) == ["a", "b", "d", "e"]  # c: b beats it
    assert (tmp_path / "acc_vs_speed.png").stat().st_size > 10_000 and "img/s" in page
