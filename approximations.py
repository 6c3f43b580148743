"""What each speed option of evaluation changes in the results, measured against the exact path on the
same images: `python benchmark.py --data DIR --parts approx [--weights DEFAULT]` (docs/performance.md).
"""

import copy

import torch

from backends import benchmark_model
from decode import eval_loader, use_gpu_decode
from engine import Runtime, evaluate
from model import prepare_for_eval


def bench_approx(args, device, samples, preset, workers: int) -> list[dict]:
    """What each speed option does to the results on these images, against the exact path (PIL
    preprocessing equal to weights.transforms(), BatchNorm unfolded, fp32, NCHW): accuracy, its change,
    the share of images whose top-1 class (and top-5 list) stays the same, and the largest relative change
    of the top-1 probability. One pass each. Random weights predict nearly one class for every image, so
    only the top-5 and probability columns mean something: --weights DEFAULT (torchvision's cache) gives
    real accuracies."""
    base = benchmark_model(args).to(device)
    decode = "batched decode, CPU (--decode gpu's code with libjpeg)"
    if use_gpu_decode("gpu", device, note_to=None):
        decode = "--decode gpu"
    variants = [
        ("exact (weights.transforms(), BN unfolded, fp32)", {"exact": True}),
        ("default: BN folded", {}),
        ("--amp bf16", {"amp": "bf16"}),
        *([("--amp fp16", {"amp": "fp16"})] if device.type == "cuda" else []),
        (decode, {"decode": True}),
        *([("--compile", {"compile": True})] if args.compile else []),
    ]
    rows, exact = [], None
    for name, v in variants:
        fast = not v.get("exact")  # BN folded and channels_last, as test_torchvision.py evaluates
        model = prepare_for_eval(copy.deepcopy(base), channels_last=fast, fuse_bn=fast)
        model = torch.compile(model) if v.get("compile") else model
        loader = eval_loader(samples, preset, args.batch_size, workers, device, v.get("decode", False))
        runtime = Runtime.create(device, v.get("amp", "none"), "true" if fast else "false", False, preset)
        result = evaluate(model, loader, runtime, keep_predictions=True)
        exact = exact or result
        pairs = list(zip(result["predictions"], exact["predictions"]))
        same_top1 = [(a, b) for a, b in pairs if a["top5"][0] == b["top5"][0]]
        rows.append(
            {
                "part": "approx",
                "variant": name,
                "img_per_s": result["img_per_s"],
                "seconds": [result["seconds"]],
                "acc1": result["acc1"],
                "acc1_delta": result["acc1"] - exact["acc1"],
                "top1_agreement": 100 * len(same_top1) / len(pairs),
                "top5_agreement": 100 * sum(a["top5"] == b["top5"] for a, b in pairs) / len(pairs),
                "top1_prob_change": max(
                    (abs(a["probs"][0] - b["probs"][0]) / b["probs"][0] for a, b in same_top1), default=0.0
                ),
            }
        )
    return rows
