"""The zoo's speed on this machine (test_torchvision.py --speed): for each selected weights, inference
images/s at --batch-size, the p50 and p99 latency of one image (batch 1) and the peak memory; with
--speed train also a training step's images/s and peak memory.

The model alone, on synthetic input of the weights' eval crop: speed does not depend on the values, so
the weights are random (nothing is downloaded) and built as the weights' builder makes them (a ViT's
image size, inception_v3's aux head). Weights of one architecture at one crop run the same model: they
share one measurement (the row's `measured_as` names the weights it was taken with).

Each timing: two untimed calls (cuDNN's autotuning, --compile's compilation), then single calls,
each synchronised, for --speed-seconds and at least MIN_CALLS; throughput is the batch over the median
call, latency the nearest-rank percentiles of the batch-1 calls. Memory is the peak from the model's
building to its last call, above what was in use before: CUDA's max allocated memory, or on a CPU the
process's peak resident set (the C heap's free pages handed back between models).

Rows are keyed by the machine (GPU or CPU model, threads, torch) and the settings: a sweep run again
skips the rows it has and measures the rest, so a cut sweep resumes. A model that doesn't fit or fails is
skipped with one line and the sweep goes on.
"""

import contextlib
import ctypes
import ctypes.util
import dataclasses
import gc
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from backends import exported_model, memory_now, peak, percentile, reset_peak, run_once
from engine import Runtime
from model import build_model, is_quantized, prepare_for_eval, resolve_weights
from presets import EvalPreset
from report import markdown_table, plot_acc_vs_cost, write_csv
from utils import OUT_OF_MEMORY, UserError, amp_name, atomic_write_text, autocast, machine_info

MIN_CALLS = 5
LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform == "linux" else None
TRIM = getattr(LIBC, "malloc_trim", None)  # glibc's: hands the C heap's free pages back to the OS
KEY = "machine device threads torch backend amp channels_last compile batch_size train".split()
SPEED_COLUMNS = (  # speed.md's, under a heading that gives the machine and the settings
    "model weights crop img_per_s latency_p50_ms latency_p99_ms peak_mem_mb train_img_per_s "
    "train_peak_mem_mb acc1_published measured_as"
).split()


@dataclasses.dataclass(frozen=True)
class SpeedSettings:
    """What every row of a sweep shares; the key fields say on what and how it was measured."""

    device: torch.device
    amp: torch.dtype | None
    channels_last: bool
    compile: bool
    backend: str  # pytorch | onnxruntime
    batch_size: int
    train: bool  # also a training step
    seconds: float  # timed calls per measurement, at least MIN_CALLS

    def key(self) -> dict:
        info = machine_info(self.device)
        return {
            "machine": info["gpu"] if self.device.type == "cuda" else info["cpu"],
            "device": self.device.type,
            "threads": info["threads"],
            "torch": info["torch"],
            "backend": self.backend,
            "amp": amp_name(self.amp),
            "channels_last": self.channels_last,
            "compile": self.compile,
            "batch_size": self.batch_size,
            "train": self.train,
        }


def timed_calls(call, seconds: float) -> list[float]:
    """Two untimed calls, then the seconds of each call until `seconds` have passed (MIN_CALLS at least,
    1000 at most)."""
    call(), call()
    times = []
    while len(times) < MIN_CALLS or (sum(times) < seconds and len(times) < 1000):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


@contextlib.contextmanager
def peak_above(device, into: dict, key: str):
    """into[key]: the peak memory (MB) while the block runs, above what was in use before it."""
    free_memory(device)
    reset_peak(device)
    before = memory_now(device)
    yield
    into[key] = round(max(0.0, peak(device) - before), 1)


def free_memory(device) -> None:
    """What the last model held, given back: CUDA's cached blocks, or on Linux the C heap's free pages
    (so that the next model's resident set grows from its own allocations)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif TRIM is not None:
        TRIM(0)


def built(arch: str, weights, device) -> nn.Module:
    """The weights' model with random values, made on `device` (initialising on a GPU is much faster
    than on a CPU for the largest models); on the CPU where a builder can't run there."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet's and inception_v3's notes on their default init
        if is_quantized(arch):  # int8 of random values, calibrated and converted, for the CPU's kernels
            return build_model(arch, quantize=True)
        try:
            with device:
                return build_model(arch, weights, load=False)
        except RuntimeError:
            return build_model(arch, weights, load=False).to(device)


def inference_model(model: nn.Module, arch: str, preset: EvalPreset, settings: SpeedSettings, folder):
    """(the callable measured, its Runtime): the evaluation form (BatchNorm folded), compiled with
    --compile, or exported and run by ONNX Runtime; an int8 model as it is, on the CPU in its own
    precision."""
    if is_quantized(arch) or settings.backend == "onnxruntime":
        cpu = Runtime.on_cpu(preset)
        if is_quantized(arch):
            return model, cpu
        evaluated = prepare_for_eval(model.cpu(), channels_last=False)
        return exported_model(evaluated, resolve_weights(None, arch), preset, Path(folder)), cpu
    runtime = Runtime(settings.device, settings.amp, settings.channels_last, preset.mean, preset.std)
    evaluated = prepare_for_eval(model, settings.channels_last)
    return (torch.compile(evaluated) if settings.compile else evaluated), runtime


def synthetic(batch: int, crop: int, runtime: Runtime) -> torch.Tensor:
    x = torch.randn(batch, 3, crop, crop, device=runtime.device)  # normalised (B, 3, H, W) float32
    return x.contiguous(memory_format=torch.channels_last) if runtime.channels_last else x


def measure_inference(model, runtime: Runtime, crop: int, settings: SpeedSettings) -> dict:
    x = synthetic(settings.batch_size, crop, runtime)
    seconds = timed_calls(lambda: run_once(model, x, runtime), settings.seconds)
    one = x[:1].clone(memory_format=torch.channels_last if runtime.channels_last else torch.contiguous_format)
    latency = timed_calls(lambda: run_once(model, one, runtime), settings.seconds)
    return {
        "img_per_s": round(settings.batch_size / statistics.median(seconds), 1),
        "latency_p50_ms": round(1000 * statistics.median(latency), 3),
        "latency_p99_ms": round(1000 * percentile(latency, 99), 3),
    }


def measure_training(model: nn.Module, crop: int, settings: SpeedSettings) -> dict:
    """Forward, cross-entropy, backward and an SGD step on synthetic batches, in train mode."""
    device, batch = settings.device, settings.batch_size
    model = model.train().to(memory_format=torch.channels_last) if settings.channels_last else model.train()
    runtime = Runtime(device, settings.amp, settings.channels_last)
    x, y = synthetic(batch, crop, runtime), torch.randint(0, 1000, (batch,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=settings.amp == torch.float16)
    forward = torch.compile(model) if settings.compile else model

    def step():
        with autocast(device, settings.amp):
            logits = forward(x)
            logits = getattr(logits, "logits", logits)  # googlenet and inception_v3 add aux outputs
            loss = nn.functional.cross_entropy(logits, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    seconds = timed_calls(step, settings.seconds)
    return {"train_img_per_s": round(batch / statistics.median(seconds), 1)}


def measure(arch: str, weights, crop: int, settings: SpeedSettings, folder) -> dict:
    """Every figure of one model at `crop`: inference, and with settings.train a training step (on a
    fresh copy: the inference form's BatchNorm is folded). Each peak memory is taken from before the
    model is built: its parameters, the activations of the largest call, the kernels' workspace (and
    for training the gradients and the optimizer's state); for ONNX Runtime, the peak once the export is
    done."""
    device, result = settings.device, {}
    with peak_above(device, result, "peak_mem_mb"):
        preset = EvalPreset.from_weights(weights)
        model, runtime = inference_model(built(arch, weights, device), arch, preset, settings, folder)
        if settings.backend == "onnxruntime":  # the peak of the session, not of torch.export's tracing
            free_memory(device)
            reset_peak(device)
        result.update(measure_inference(model, runtime, crop, settings))
        del model
    if settings.train and is_quantized(arch):  # torchvision's int8 models are for inference only
        result.update(train_img_per_s=None, train_peak_mem_mb=None)
    elif settings.train:
        with peak_above(device, result, "train_peak_mem_mb"):
            result.update(measure_training(built(arch, weights, device), crop, settings))
    return result


def refusal(arch: str, settings: SpeedSettings) -> str | None:
    """Why these weights can't run with these settings, or None."""
    if is_quantized(arch) and settings.device.type != "cpu":
        return "runs on the CPU's int8 kernels: measure it with --device cpu"
    if settings.backend == "onnxruntime" and settings.device.type != "cpu":
        return "ONNX Runtime runs on the CPU here: measure it with --device cpu"
    return None


def why_failed(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def speed_sweep(selected: list[tuple], settings: SpeedSettings, out: Path, force: bool = False) -> list[dict]:
    """selected: (arch, weights enum, {crop, family, acc1_published, ...}) of each weights, in order.
    Measures those without a row of these settings in OUT/speed.json (all of them with force), writing
    OUT/speed.{md,csv,json} after each, then the plot. Returns the rows of these settings."""
    out.mkdir(parents=True, exist_ok=True)
    if settings.backend == "onnxruntime" and settings.train:
        raise UserError("--speed train times PyTorch's training step: drop --backend onnxruntime")
    key = settings.key()
    rows = read_speed_rows(out)
    measured, skipped, start = {}, [], time.perf_counter()
    # ONNX Runtime's files of random weights: made for one measurement, never kept
    with tempfile.TemporaryDirectory() as exports:
        for arch, weights, described in selected:
            name = f"{type(weights).__name__}.{weights.name}"
            if not force and any(same_row(r, name, key) for r in rows):
                print(f"{name}: measured before (OUT/speed.json), skipped")
                continue
            shared = (arch, described["crop"])  # one model, one input: one measurement
            reason = refusal(arch, settings)
            if reason is None and shared not in measured:
                result, reason = measured_or_why(arch, weights, described["crop"], settings, Path(exports))
                if result is not None:
                    measured[shared] = {**result, "measured_as": name}
            if reason is not None:
                print(f"{name}: skipped, {reason}", file=sys.stderr)
                skipped.append(name)
                continue
            row = {"model": arch, "weights": name, **described, **key, **measured[shared]}
            rows = [r for r in rows if not same_row(r, name, key)] + [row]
            write_speed(rows, out)
            print(speed_line(row))
    if rows:  # speed.md's layout as of this version, also where nothing was measured anew
        write_speed(rows, out)
    mine = [r for r in rows if same_key(r, key)]
    print(
        f"{len(mine)} rows of these settings in {out / 'speed.md'}; this sweep took "
        f"{time.perf_counter() - start:.0f} s" + (f"; skipped: {', '.join(skipped)}" if skipped else "")
    )
    if mine:
        plot_speed(mine, out / "acc_vs_speed.png")
    return mine


def measured_or_why(arch: str, weights, crop: int, settings: SpeedSettings, exports: Path):
    """(measure()'s figures, None), or (None, why not) for a model that doesn't fit or fails to run."""
    try:
        return measure(arch, weights, crop, settings, exports), None
    except OUT_OF_MEMORY as e:
        return None, f"does not fit at batch {settings.batch_size}: {why_failed(e)}"
    except (RuntimeError, UserError, ValueError, AssertionError) as e:  # a model that fails to run
        return None, f"failed: {type(e).__name__}: {why_failed(e)}"
    finally:
        free_memory(settings.device)


def same_key(row: dict, key: dict) -> bool:
    return all(row.get(k) == v for k, v in key.items())


def same_row(row: dict, weights: str, key: dict) -> bool:
    """The row of these weights measured with these settings."""
    return row["weights"] == weights and same_key(row, key)


def read_speed_rows(out: Path) -> list[dict]:
    path = out / "speed.json"
    return json.loads(path.read_text()) if path.exists() else []


def write_speed(rows: list[dict], out: Path) -> None:
    """OUT/speed.csv and .json (every row, every key) and OUT/speed.md: a table per machine and settings,
    headed by them."""
    write_csv(rows, out / "speed.csv")
    atomic_write_text(out / "speed.json", json.dumps(rows, indent=1) + "\n")
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row.get(k) for k in KEY), []).append(row)
    sections = []
    for group in groups.values():
        r = group[0]
        heading = (
            f"### {r['machine']} ({r['device']}, {r['threads']} threads, torch {r['torch']}): "
            f"{r['backend']}, amp {r['amp']}, channels_last {r['channels_last']}, compile {r['compile']}, "
            f"batch {r['batch_size']}"
        )
        columns = SPEED_COLUMNS if r["train"] else [c for c in SPEED_COLUMNS if not c.startswith("train_")]
        sections.append(f"{heading}\n\n{markdown_table(group, columns)}")
    atomic_write_text(out / "speed.md", "\n".join(sections))


def speed_line(row: dict) -> str:
    text = (
        f"{row['weights']}: {row['img_per_s']:,.1f} img/s at batch {row['batch_size']}, batch 1 "
        f"p50 {row['latency_p50_ms']:.2f} ms p99 {row['latency_p99_ms']:.2f} ms, "
        f"peak {row['peak_mem_mb']:,.0f} MB"
    )
    if row.get("train_img_per_s") is not None:
        text += f"; training {row['train_img_per_s']:,.1f} img/s, peak {row['train_peak_mem_mb']:,.0f} MB"
    return text


def plot_speed(rows: list[dict], path: Path) -> None:
    """Published top-1 against the measured time per image at the batch size (1 / throughput), with the
    Pareto front; the HTML beside it names every point."""
    points = [
        {**r, "ms_per_image": 1000 / r["img_per_s"]}
        for r in rows
        if r.get("acc1_published") is not None and r["img_per_s"]
    ]
    where = f"{rows[0]['machine']}, {rows[0]['backend']}, amp {rows[0]['amp']}"
    with contextlib.suppress(ValueError):  # nothing published to plot
        plot_acc_vs_cost(
            points,
            path,
            cost="ms_per_image",
            xlabel=f"ms per image at batch {rows[0]['batch_size']} (log scale; {where})",
            title=f"torchvision ImageNet-1K weights: accuracy vs measured speed ({where})",
        )
