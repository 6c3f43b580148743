"""benchmark.py run as a user would, on a tiny generated ImageFolder (a smoke test: timings are not
checked), and scripts/gpu_check.sh skipping cleanly where there is no GPU."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torchvision import models

import benchmark
from coder import imagenet_wnids
from conftest import ROOT, assert_user_error, make_image, run_main, run_script, save_torchvision_checkpoint
from model import resolve_weights
from presets import normalize


def test_benchmark_runs_every_part_and_writes_json(tmp_path, torch_home):
    wnids, weights = imagenet_wnids(), models.MobileNet_V3_Small_Weights.IMAGENET1K_V1
    # benchmark.py --weights DEFAULT
    model = save_torchvision_checkpoint(torch_home, "mobilenet_v3_small", weights)
    # logits of O(1), not the near-uniform ones of a fresh head: bf16 then moves probabilities
    with torch.no_grad():
        model.classifier[-1].weight.mul_(100)
    torch.save(model.state_dict(), next((torch_home / "hub" / "checkpoints").glob("*.pth")))
    for i in range(8):  # a grayscale JPEG and a PNG named .JPEG take the fallbacks
        mode, fmt = ("L", "JPEG") if i == 3 else ("RGB", "PNG") if i == 6 else ("RGB", "JPEG")
        image = make_image(tmp_path / f"{i}.JPEG", (96 + 8 * i, 72), mode, fmt, seed=i)
        # the independent exact run: torchvision's transforms and model, no code of ours
        with torch.no_grad():
            top1 = model(weights.transforms()(Image.open(image).convert("RGB"))[None]).argmax().item()
        folder = tmp_path / "val" / wnids[top1 if i % 2 == 0 else (top1 + 1) % 1000]  # exact top-1: 4 of 8
        folder.mkdir(parents=True, exist_ok=True)
        image.rename(folder / image.name)
    out = tmp_path / "bench.json"
    # one model thread: quick, and gentle on a shared CPU; --decode gpu must fall back with a note here
    options = (
        "--arch mobilenet_v3_small --batch-size 4 --limit 8 --repeats 1 --train-batch-size 2 --train-steps 2"
    )
    options += " --worker-counts 0 --workers 1 --threads 1 --decode gpu --parts data,model,eval,train,approx"
    result = run_script(
        "benchmark.py",
        "--data",
        tmp_path,
        *options.split(),
        "--weights",
        "DEFAULT",
        "--output",
        out,
        timeout=180,
        env={"TORCH_HOME": str(torch_home)},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert {"cpu", "cores", "gpu", "torch", "torchvision", "threads"} <= set(report["machine"])
    assert report["machine"]["threads"] == 1 and report["machine"]["torch"] == torch.__version__
    rows, approx = report["rows"][:9], report["rows"][9:]
    assert [r["part"] for r in rows] == ["data"] * 3 + ["forward", "step", "eval", "eval", "train", "train"]
    assert [r["variant"].split(",")[0].split(":")[0] for r in rows] == [
        "pil",
        "tensor",
        "batched on cpu",  # --decode gpu's loader, with libjpeg where there is no GPU
        "mobilenet_v3_small batch 4",
        "mobilenet_v3_small batch 2",
        *"ours plain ours plain".split(),
    ]
    assert (
        all(r["img_per_s"] > 0 and len(r["seconds"]) == 1 for r in rows)
        and rows[1]["baseline"] == rows[2]["baseline"] == rows[0]["variant"]
    )
    assert all(
        "ratio" in r for r in rows if r["part"] in ("eval", "train") and r["variant"].startswith("ours")
    )
    assert "cpu decode" in rows[5]["variant"] and "note: --decode gpu is not possible here" in result.stdout
    assert "eval: ours / baseline = " in result.stdout and "train: ours / baseline = " in result.stdout
    assert "eval: note: 2 batches a pass for 1 loader worker times" in result.stdout  # 8 images, batch 4
    assert (
        "train: note: 2 batches a pass for 1 loader worker" in result.stdout
        and "at least 4 batches" in rows[7]["note"]
    )
    assert (
        "% of the model alone" in result.stdout and "| part | variant | img/s | vs | ratio |" in result.stdout
    )
    # timed in turn with ours
    assert rows[5]["model_only"]["img_per_s"] > 0 and rows[5]["share_of_model_only"] > 0
    # approx: its exact row is the independent exact run; folded BatchNorm changes no top-1 class; the
    # approximations are measured against the exact row, not against themselves
    assert [r["variant"].split(" ")[0] for r in approx] == ["exact", "default:", "--amp", "batched"]
    assert approx[0]["acc1"] == approx[1]["acc1"] == 50.0
    # bf16 moves something
    assert any(r["top1_agreement"] < 100 or r["top1_prob_change"] > 0 for r in approx[2:])
    assert (
        approx[0]["top1_agreement"] == 100
        and approx[0]["acc1_delta"] == 0
        and approx[1]["top1_agreement"] == 100
    )
    assert all(0 <= r["top1_agreement"] <= 100 and r["part"] == "approx" for r in approx)
    assert approx[0]["top5_agreement"] == 100 and approx[0]["top1_prob_change"] == 0
    # fold ~1e-6, bf16 ~1e-2
    assert approx[1]["top1_prob_change"] < 1e-3 and approx[2]["top1_prob_change"] < 0.2
    assert "| variant | acc1 | acc1 change | same top-1 | same top-5, in order |" in result.stdout
    merged = run_script("benchmark.py", "--merge", out, out)  # scripts/gpu_check.sh's table
    assert merged.returncode == 0, merged.stderr
    assert (
        "| run | part | variant | img/s | vs | ratio |" in merged.stdout
        and "bench: eval: ours / baseline" in merged.stdout
    )
    assert_user_error(run_main("benchmark.py", "--merge", tmp_path / "missing.json"), "missing.json")


def run_part(tmp_path, options: str):
    """benchmark.py on 4 generated JPEGs: (the finished process, the rows of its --output)."""
    for i in range(4):
        make_image(tmp_path / "val" / imagenet_wnids()[i] / f"{i}.JPEG", (120 + 10 * i, 90), seed=i)
    args = [*options.split(), "--repeats", "1", "--output", tmp_path / "b.json"]
    result = run_script("benchmark.py", "--data", tmp_path, *args, timeout=180)
    assert result.returncode == 0, result.stderr
    return result, json.loads((tmp_path / "b.json").read_text())["rows"]


def test_benchmark_times_every_recipe_train_transform(tmp_path):
    result, rows = run_part(tmp_path, "--parts augment --gpu-img-per-s 1000")
    loaders = [r for r in rows if r["part"] == "loader"]
    rows = [r for r in rows if r["part"] != "loader"]
    assert [r["variant"].split(" (")[0] for r in loaders] == [
        "references: ImageFolder + their train preset",
        "ours: PIL",
        "ours: --reduced-decode",
        "ours: pre-resized",
        "ours: --decode gpu's code, torchcodec on cpu",
    ]
    assert loaders[0]["ratio"] == 1.0 and all(r["img_per_s"] > 0 and r["cores_per_gpu"] >= 1 for r in loaders)
    configs = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert [r["variant"].split(":")[0] for r in rows] == configs and all(r["part"] == "augment" for r in rows)
    assert all(r["workers_per_gpu"] == -(-1000 // r["img_per_s"]) and r["img_per_s"] > 0 for r in rows)
    v1 = next(r for r in rows if r["variant"].startswith("torchvision_v1.yaml"))
    assert v1["ratio"] == 1.0 and "torchvision_v2.yaml: 176 px, ta_wide, erase 0.1" in result.stdout
    assert "augment: swin.yaml needs" in result.stdout and "at 1000 img/s" in result.stdout


def test_benchmark_times_int8_against_fp32_on_the_same_images(tmp_path):
    result, (fp32, int8) = run_part(tmp_path, "--parts int8 --arch resnet18 --batch-size 2")
    assert (
        fp32["variant"] == "fp32 resnet18 batch 2, channels_last, BN folded"
        and int8["baseline"] == fp32["variant"]
    )
    assert (
        int8["variant"].startswith("int8 resnet18 batch 2 (")
        and int8["ratio"] == int8["img_per_s"] / fp32["img_per_s"]
    )
    assert "int8: int8 resnet18 batch 2 / fp32 = " in result.stdout
    no_int8 = run_main("benchmark.py", "--data", tmp_path, "--parts", "int8", "--arch", "vgg11")
    assert_user_error(no_int8, "no int8 vgg11", "resnet50")
    # weights looked for in --weights-dir (as in the other scripts), not downloaded
    empty = tmp_path / "weights"
    missing = run_script(
        "benchmark.py",
        "--data",
        tmp_path,
        "--parts",
        "int8",
        "--arch",
        "resnet18",
        "--weights",
        "DEFAULT",
        "--weights-dir",
        empty,
    )
    assert_user_error(missing, "resnet18-f37072fd.pth", str(empty))


def test_benchmark_latency_of_every_cpu_backend_per_batch_size(tmp_path):
    result, rows = run_part(tmp_path, "--parts latency --arch resnet18 --batch-sizes 1,3 --latency-runs 2")
    assert [(r["backend"], r["batch"]) for r in rows] == [
        (backend, batch) for batch in (1, 3) for backend in ("pytorch", "onnxruntime", "int8")
    ]
    assert all(0 < r["p50_ms"] <= r["p99_ms"] and len(r["seconds"]) == 2 and r["peak_mb"] >= 0 for r in rows)
    assert all(r["img_per_s"] == pytest.approx(r["batch"] / (r["p50_ms"] / 1000)) for r in rows)
    from backends import percentile

    assert (
        percentile(list(range(1, 101)), 99),
        percentile(list(range(1, 11)), 99),
        percentile([3.0], 50),
    ) == (99, 10, 3)
    assert "latency: onnxruntime resnet18 batch 3: p50" in result.stdout
    assert Image.open(tmp_path / "b.png").size == (1100, 400)
    bad = run_main("benchmark.py", "--data", tmp_path, "--parts", "latency", "--batch-sizes", "1,x")
    assert_user_error(bad, "--batch-sizes 1,x")


def test_benchmark_takes_a_train_py_checkpoint_with_its_classes_and_sizes(tmp_path):
    """--weights best.pt, no --arch: the run's architecture, its 2-class head (the step's labels, the
    images of its class folders) and its validation sizes (40 -> 32 px), for us and for the plain loop."""
    import dataclasses

    from config import TrainConfig

    config = TrainConfig(arch="mobilenet_v3_small", val_resize_size=40, val_crop_size=32)
    model = models.mobilenet_v3_small(num_classes=2)
    state = {"model": model.state_dict(), "config": dataclasses.asdict(config), "classes": ["cat", "dog"]}
    torch.save(state, tmp_path / "best.pt")
    for i in range(4):
        make_image(tmp_path / "val" / ("cat", "dog")[i % 2] / f"{i}.JPEG", (48 + 8 * i, 44), seed=i)
    options = "--parts model,eval,approx --batch-size 2 --train-batch-size 2 --train-steps 1 --repeats 1"
    options += f" --workers 0 --threads 1 --output {tmp_path / 'bench.json'}"
    result = run_main("benchmark.py", "--data", tmp_path, "--weights", tmp_path / "best.pt", *options.split())
    assert result.returncode == 0, result.stderr
    assert "mobilenet_v3_small on " in result.stdout and "; 4 images" in result.stdout
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["args"]["arch"] == "mobilenet_v3_small" and report["args"]["train_size"] == 224
    parts = [r["part"] for r in report["rows"]]
    assert parts == ["forward", "step", "eval", "eval", *["approx"] * 4], parts
    approx = [r for r in report["rows"] if r["part"] == "approx"]
    assert all(r["top1_agreement"] == 100.0 and 0 <= r["acc1"] <= 100 for r in approx[:2]), approx
    # the plain loop's transform: torchvision's, at the run's sizes, equal to ours
    weights = resolve_weights(str(tmp_path / "best.pt"))
    preset = weights.preset()
    plain = benchmark.plain_transform(weights, preset)
    assert (plain.resize_size, plain.crop_size) == ([40], [32]) and (preset.resize, preset.crop) == (40, 32)
    image = Image.open(tmp_path / "val" / "dog" / "1.JPEG").convert("RGB")
    ours = normalize(preset(image)[None], preset.mean, preset.std)[0]
    assert torch.equal(plain(image), ours)
    dog = tmp_path / "val" / "dog"
    dog.rename(tmp_path / "val" / "wolf")  # a class folder the head does not have
    unknown = run_main(
        "benchmark.py", "--data", tmp_path, "--weights", tmp_path / "best.pt", *options.split()
    )
    assert_user_error(unknown, "class folder 'wolf'", "not one of the 2 classes")
    other_arch = run_main(
        "benchmark.py", "--parts", "model", "--weights", tmp_path / "best.pt", "--arch", "resnet18"
    )
    assert_user_error(other_arch, "mobilenet_v3_small model, not resnet18")
    for given, arch in (([], "resnet18"), (["--weights", "ResNet50_Weights.IMAGENET1K_V2"], "resnet50")):
        assert benchmark.benchmark_weights(benchmark.parse_args(["--parts", "model", *given])).arch == arch
    onnx = run_main("benchmark.py", "--parts", "model", "--weights", tmp_path / "m.onnx")
    assert_user_error(onnx, "test_torchvision.py")


def test_benchmark_needs_data_for_the_image_parts(tmp_path):
    assert_user_error(run_script("benchmark.py", "--parts", "eval"), "--data")
    assert_user_error(run_main("benchmark.py", "--parts", "model,decode"), "unknown part")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this is the real 5-minute check")
def test_gpu_check_skips_cleanly_without_a_gpu():
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "no CUDA GPU" in result.stdout and "skipping" in result.stdout


def test_index_part_times_our_index_against_imagefolder_and_measures_memory(tmp_path):
    out = tmp_path / "index.json"
    result = run_script(
        "benchmark.py", "--parts", "index", "--files", "3000", "--repeats", "1", "--output", out
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    timings = {r["variant"]: r for r in rows if r["part"] == "index"}
    assert list(timings) == [
        "ours, no cache",
        "ours, cached",
        "torchvision ImageFolder",
        "bare os.scandir, 2 levels, unsorted",
    ]
    assert all(r["img_per_s"] > 0 and len(r["seconds"]) == 1 for r in timings.values())
    assert timings["ours, cached"]["baseline"] == "torchvision ImageFolder"
    memory = next(r for r in rows if r["part"] == "index_memory")
    assert memory["files"] == 3000 and memory["bytes_per_image_beside_paths"] == pytest.approx(12, abs=0.01)
    assert 20 < memory["path_bytes_per_image"] < 30  # 'n01440764/n01440764_12.JPEG': relative paths
    assert memory["list_of_samples_bytes_per_image"] > 100
    assert "bytes per image beside" in result.stdout and "loader workers: resident +" in result.stdout


def test_the_index_parts_cached_timing_reads_the_cache(monkeypatch):
    import argparse

    import benchmark
    import dataset

    hits, read = [], dataset._read_cache
    monkeypatch.setattr(dataset, "_read_cache", lambda *a: hits.append(read(*a)) or hits[-1])
    benchmark.bench_index(argparse.Namespace(files=3000, repeats=1))
    assert sum(hit is not None for hit in hits) >= 2  # the warm-up and the timed call of "ours, cached"


def test_profile_part_says_where_a_from_jpeg_training_pass_waits(tmp_path):
    """--parts profile: one profiled pass of the from-JPEG training loop at --train-size; the share of the
    pass spent waiting for the loader is a share, the busiest operators are named, and on a CPU there is
    no GPU share. --train-size reaches the synthetic step and the training loader alike."""
    for i in range(4):
        make_image(tmp_path / "val" / imagenet_wnids()[i] / f"{i}.JPEG", (120 + 10 * i, 90), seed=i)
    options = "--arch resnet18 --parts step,train,profile --train-size 48 --train-batch-size 2"
    options += " --train-steps 2 --workers 1 --threads 1 --repeats 1 --no-baselines"
    # a process of its own: torch.profiler's threads would stay in the test process, whose later forks
    # (the complexity table's pool) then hang on a lock one of them held
    result = run_script("benchmark.py", "--data", tmp_path, *options.split(), "--output", tmp_path / "b.json")
    assert result.returncode == 0, result.stderr
    step, train, profile = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert (step["part"], train["part"], profile["part"]) == ("step", "train", "profile")
    assert "48 px" in train["variant"] and "48 px" in profile["variant"]
    assert 0 <= profile["loader_wait_share"] <= 1 and profile["gpu_busy_share"] is None
    assert profile["top_cpu_ops"] and all(seconds >= 0 for _, seconds in profile["top_cpu_ops"])
    assert any("convolution" in name for name, _ in profile["top_cpu_ops"])
    assert "the main process waited for the loader" in result.stdout and "GPU ran" not in result.stdout


def test_gpu_goals_tables_from_what_the_steps_left(tmp_path, capsys):
    """scripts/gpu_goals.py on a folder as gpu_check.sh leaves it: a step cut at its limit and one not
    run are said so; the goals are computed from the rows (from-JPEG training over the synthetic step,
    bf16 over fp32) and a failed CUDA test is named and fails its goal."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import gpu_goals

    MACHINE = {"gpu": "NVIDIA H200", "cpu": "Xeon", "cores": 16, "torch": "2.11", "torchvision": "0.26"}
    (tmp_path / "steps.tsv").write_text("model_bf16\t0\t20\nfrom_jpeg\t124\t80\nzoo_speed\tnot run\t0\n")

    def rows(name, *rows):
        result = {"machine": MACHINE, "rows": list(rows), "summary": []}
        (tmp_path / f"{name}.json").write_text(json.dumps(result))

    rows("model_bf16", {"part": "step", "variant": "resnet50 batch 256, bf16", "img_per_s": 4000.0})
    rows("model_fp32", {"part": "step", "variant": "resnet50 batch 256, fp32", "img_per_s": 1600.0})
    rows(
        "from_jpeg",
        {"part": "train", "variant": "ours: 15 workers", "img_per_s": 3800.0},
        {"part": "train", "variant": "plain: ImageFolder", "img_per_s": 300.0},
    )
    rows("gpu_decode", {"part": "eval", "variant": "ours: gpu decode", "img_per_s": 4000.0})
    (tmp_path / "gpu_tests.xml").write_text(
        '<testsuites><testsuite><testcase name="test_a"/><testcase name="test_b"><failure message="x"/>'
        '</testcase><testcase name="test_c"><skipped/></testcase></testsuite></testsuites>'
    )
    assert gpu_goals.goal_values(tmp_path) == {
        "from_jpeg_train": 0.95,
        "gpu_decode_train": None,
        "gpu_decode_eval": 4000.0,
        "amp_speedup": 2.5,
        "tests": 1,
    }
    gpu_goals.main([str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| from_jpeg | cut at its limit | 80 |" in printed and "| zoo_speed | not run | 0 |" in printed
    assert "CUDA tests: 3 run, 1 skipped, failed: test_b" in printed
    tables = [line for line in printed.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in tables]
    goals = {row[0]: row[-1] for row in cells if len(row) == 4}
    assert goals["training from JPEG, CPU decoding / synthetic step (resnet50, 224 px)"] == "met"
    assert goals["training from JPEG, --decode gpu / synthetic step (resnet50, 224 px)"] == "not measured"
    assert goals["evaluation with --decode gpu, img/s"] == "NOT met"
    assert goals["training step bf16 + channels_last / fp32 NCHW"] == "met"
    assert goals["python -m pytest -m gpu: tests failed or errored"] == "NOT met"
    gpu_goals.main(["--step-rate", str(tmp_path)])
    assert capsys.readouterr().out.strip() == "4000"
