"""The inference backends a model runs on, and how fast: PyTorch's evaluation form (BatchNorm folded,
channels_last), compiled, ONNX Runtime and torchvision's int8 model (the last two on a CPU). An ONNX file
describes itself (its eval preprocessing, class names and source weights in the ONNX metadata) and is
checked against PyTorch on the same images (largest logit difference, top-5 agreement) before it is used
or written. Timing runs every contender in turn; latency is given as percentiles, memory as the peak
above what was in use before.

torch.onnx.export's exporter (torch.export, dynamo=True), opset 18, a dynamic batch dimension; the model is
exported in its inference form and the file takes normalised float32 (B, 3, crop, crop) images and gives
(B, classes) logits.
"""

import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from engine import Runtime
from model import Weights, build_model, is_quantized, prepare_for_eval
from presets import EvalPreset
from utils import UserError, atomic_write, autocast, barrier, is_main

# ----------------------------------------------------------------------------- ONNX

OPSET = 18  # the opset torch's ONNX exporter targets natively
# float32 keeps ~7 significant digits, and the exporter reorders and fuses operations (BatchNorm folded,
# other kernels), so the logits' rounding differences grow with their magnitude: a run whose loss blew up
# has logits near 1e5 that differ by ~0.1 (~1e-6 of them) in a correct export. Each image's logits may
# differ by ABS_TOL + REL_TOL x its largest |logit|: REL_TOL is ~1000 float32 roundings (a mistranslated
# operation differs by far more), ABS_TOL is for the usual logits of order 1-10 (exports match to ~3e-6).
ABS_TOL, REL_TOL = 1e-3, 1e-4


def onnx_bytes(model: nn.Module, crop: int, metadata: dict, opset: int = OPSET) -> bytes:
    """`model` (eval form, on the CPU) as a serialised ONNX model, with `metadata` (str -> JSON-able) in
    its metadata_props. An architecture the exporter can't handle is a UserError."""
    example = torch.randn(2, 3, crop, crop)
    try:
        with warnings.catch_warnings():  # the exporter warns about its own internals
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=opset,
                verbose=False,
                input_names=["images"],
                output_names=["logits"],
            )
    except Exception as e:  # torch.export and the ONNX translation raise many kinds
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(
            f"{metadata.get('arch')} cannot be exported to ONNX: {type(e).__name__}: {reason}"
        ) from e
    proto = program.model_proto
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    if proto.ByteSize() >= 2**31:  # protobuf's limit for one message
        raise UserError(f"{metadata.get('arch')} is over 2 GB as ONNX, beyond a single .onnx file's limit")
    return proto.SerializeToString()


def export_onnx(
    model: nn.Module, path, crop: int, metadata: dict, opset: int = OPSET, images: torch.Tensor | None = None
) -> dict | None:
    """Write `model` (eval form, on the CPU) to `path` atomically, as onnx_bytes. With `images`, the
    model is first checked by ONNX Runtime from memory (check_export) and written only if it passes, so
    a file that fails is never at `path` (a previous file there stays as it was); returns the check."""
    data = onnx_bytes(model, crop, metadata, opset)
    check = None
    if images is not None:
        kept = " (the previous file is kept)" if Path(path).exists() else ""
        action = (
            f"{path} was not written{kept}; try another --opset, or report the model to PyTorch's exporter"
        )
        name = f"the ONNX export of {metadata.get('arch')}"
        check = check_export(model, OnnxRuntimeModel(data), images, name, action)
    atomic_write(path, lambda f: f.write(data), mode="wb")
    return check


def export_metadata(weights: Weights, preset: EvalPreset) -> dict:
    """What an exported file says of itself (model.onnx_metadata reads it back): its architecture, the
    weights it was made from, its preprocessing and its head's classes (a fine-tuned run's, or
    ImageNet-1k's names with their wnids)."""
    coder = weights.label_coder()
    return {
        "arch": weights.arch,
        "source": str(weights.source) if weights.source is not None else "random",
        "preprocessing": dataclasses.asdict(preset),  # resize, crop, interpolation, antialias, mean, std
        "classes": coder.names,
        "wnids": coder.wnids,
        "input": "float32 (B, 3, crop, crop), normalised: (x / 255 - mean) / std",
    }


class OnnxRuntimeModel(nn.Module):
    """An exported file run by ONNX Runtime (CPU provider), callable like the PyTorch model: normalised
    float32 (B, 3, H, W) -> (B, classes) logits. `source`: the file, or its bytes."""

    def __init__(self, source, threads: int | None = None):
        super().__init__()
        try:
            import onnxruntime as ort  # here: only the ONNX backend needs it
        except ImportError as e:
            raise UserError("ONNX Runtime is not installed: pip install onnxruntime") from e
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        model = source if isinstance(source, bytes) else str(source)
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().float().cpu().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: x})[0])


def compare(reference: nn.Module, exported: nn.Module, images: torch.Tensor) -> dict:
    """Largest absolute logit difference; the largest relative to the image's largest |PyTorch logit|;
    whether every image is within ABS_TOL + REL_TOL x that; the share of images whose top-5 (in order)
    agree."""
    with torch.inference_mode():
        ours, theirs = reference(images).float(), exported(images)
    k = min(5, ours.shape[1])  # a fine-tuned head may have fewer classes
    same = (ours.topk(k).indices == theirs.topk(k).indices).all(1)
    diff, scale = (ours - theirs).abs().amax(1), ours.abs().amax(1)  # (B,) each
    return {
        "max_abs_diff": diff.max().item(),
        "max_rel_diff": (diff / scale.clamp_min(torch.finfo(torch.float32).tiny)).max().item(),
        "within_tolerance": bool((diff <= ABS_TOL + REL_TOL * scale).all()),
        "top5_agreement": 100 * same.float().mean().item(),
    }


def check_export(
    model: nn.Module, exported: "OnnxRuntimeModel", images: torch.Tensor, name, action: str = "do not use it"
) -> dict:
    """compare(); an export whose top-5 differs from PyTorch's, or whose logits differ by more than
    ABS_TOL + REL_TOL x the largest |logit|, is an error naming it (`name`) and saying `action`."""
    check = compare(model, exported, images)
    # the error's traceback holds this frame: with the session in it, a garbage collection in a process
    # forked later (a DataLoader worker, a Pool) destroys the copied session, whose thread pool's locks hang
    del exported
    if check["top5_agreement"] < 100 or not check["within_tolerance"]:
        raise UserError(
            f"{name} differs from PyTorch (logits by up to {check['max_abs_diff']:.2g}, "
            f"{check['max_rel_diff']:.2g} of the largest |logit|, allowed {ABS_TOL:g} + {REL_TOL:g} of it; "
            f"top-5 agree on {check['top5_agreement']:.0f}% of {len(images)} images); {action}"
        )
    return check


def exported_model(model: nn.Module, weights: Weights, preset: EvalPreset, folder: Path) -> OnnxRuntimeModel:
    """ONNX Runtime running `model` (eval form, CPU), exported into `folder` under a name that holds the
    weights and a hash of the metadata (so other preprocessing makes another file), reused while it
    passes check_export on random input, exported again (once) when it does not. Rank 0 exports."""
    metadata = export_metadata(weights, preset)
    digest = hashlib.sha1(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:8]
    random = weights.source is None  # random weights differ at every call: exported every time
    path = folder / f"{'random' if random else Path(str(weights.source)).name}_{digest}.onnx"
    images = torch.randn(2, 3, preset.crop, preset.crop)
    for attempt in range(2):
        if is_main() and (attempt or random or not path.is_file()):
            export_onnx(model, path, preset.crop, metadata)
        barrier()
        exported = OnnxRuntimeModel(path)
        try:
            check_export(model, exported, images, path)
            return exported
        except UserError:
            if attempt:
                raise


# ----------------------------------------------------------------------------- the backends


def inference_backends(
    model: nn.Module, weights: Weights, preset: EvalPreset, runtime: Runtime, compile: bool, folder
):
    """name -> (model, Runtime) of every backend for `model` (`weights` built): PyTorch's eval path,
    compiled (with `compile`), and on a CPU ONNX Runtime (exported into `folder`) and torchvision's int8
    model where it has one (random weights, calibrated and converted)."""
    device = runtime.device
    evaluated = prepare_for_eval(copy.deepcopy(model).to(device), runtime.channels_last)
    backends = {"pytorch": (evaluated, runtime)}
    if compile:
        backends["compiled"] = (torch.compile(evaluated), runtime)
    if device.type == "cpu":
        cpu = Runtime.on_cpu(preset)
        try:
            exported = exported_model(
                prepare_for_eval(model, channels_last=False), weights, preset, Path(folder)
            )
            backends["onnxruntime"] = (exported, cpu)
        except UserError as e:  # an architecture the exporter can't handle: the other backends still run
            print(f"note: no onnxruntime row: {e}")
        if is_quantized(f"quantized_{weights.arch}"):
            backends["int8"] = (build_model(f"quantized_{weights.arch}", quantize=True), cpu)
    return backends


# ----------------------------------------------------------------------------- timing and memory


def timed(runs: dict, repeats: int, device) -> dict:
    """runs: name -> (function, images one call processes). One untimed warm-up call of each, then
    `repeats` rounds that time each once, in turn, so that drifts of the machine's speed (large on
    shared VMs) hit all of them alike. name -> {img/s of the median call, seconds of every call}."""
    sync = functools.partial(torch.cuda.synchronize, device) if device.type == "cuda" else lambda: None
    for run, _ in runs.values():
        run()
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (run, _) in runs.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            seconds[name].append(time.perf_counter() - start)
    return {
        name: {"img_per_s": runs[name][1] / statistics.median(s), "seconds": [round(x, 3) for x in s]}
        for name, s in seconds.items()
    }


def forward_loop(model, x, batches: int, runtime: Runtime):
    """The model alone: `batches` forward passes on the synthetic batch x, under inference_mode."""

    def run():
        with torch.inference_mode(), autocast(runtime.device, runtime.amp_dtype):
            for _ in range(batches):
                model(x)

    return run


def run_once(model, x, runtime: Runtime) -> None:
    """One forward call, finished (synchronised on CUDA)."""
    with torch.inference_mode(), autocast(runtime.device, runtime.amp_dtype):
        model(x)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize(runtime.device)


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-th percentile: the smallest value with at least q% of the values at or below it
    (with 10 values, p99 is the slowest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def process_mb(field: str) -> float:
    """A memory line of Linux's /proc/self/status in MB ('VmRSS': resident now, 'VmHWM': its peak)."""
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    values = [line.split()[1] for line in status.splitlines() if line.startswith(field + ":")]
    return int(values[0]) / 1024 if values else math.nan


def memory_now(device) -> float:
    """MB in use: CUDA's allocated memory, or this process's resident set."""
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else process_mb("VmRSS")


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # the kernel's peak RSS (VmHWM) restarts from now


def peak(device) -> float:
    """MB at the peak since reset_peak: CUDA's max allocated, or the process's VmHWM."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else process_mb("VmHWM")


def busy_seconds() -> tuple[float, float] | None:
    """(CPU seconds all processes used, CPU seconds this one and its finished workers used), from
    /proc/stat."""
    if not Path("/proc/stat").exists():
        return None
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    own = os.times()
    idle = ticks[3] + ticks[4]  # idle and iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK"), own[0] + own[1] + own[2] + own[3]
