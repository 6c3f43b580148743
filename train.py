"""Evaluation and training loops.

    python train.py --arch resnet50 --data /data/imagenet --config configs/torchvision_v1.yaml
"""
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dataset import normalize
from utils import UserError, all_gather_objects, all_reduce_sum, is_main, topk_correct


@torch.inference_mode()
def evaluate(model, loader, device, mean, std, *, criterion=None, channels_last=False, amp_dtype=None,
             skip_bad_images=False, keep_predictions=False, desc="eval") -> dict:
    """Top-1/top-5 and mean loss over every image of the loader's dataset, each counted once in any
    world size (each rank sees its own shard, sums are all-reduced). With keep_predictions, rank 0
    also gets the top-5 indices and probabilities of every image, ordered by dataset index."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    predictions, bad = [], []
    samples = loader.dataset.samples
    start, batches = time.perf_counter(), 0
    for images, targets, indices, errors in tqdm(loader, desc=desc, unit="batch", leave=False, disable=not is_main() or None):
        for index, error in errors:
            if not skip_bad_images:
                raise UserError(f"cannot read image {samples[index].path} ({error}); fix or remove it, "
                                "or pass --skip-bad-images to skip and list such files")
            bad.append(samples[index].path)
        if len(targets) == 0:
            continue
        images = normalize(images.to(device, non_blocking=True), mean, std)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        loss = criterion(logits, targets) if criterion is not None else F.cross_entropy(logits, targets)
        top1, top5 = topk_correct(logits, targets)
        sums += torch.stack([loss.double() * len(targets), top1, top5, torch.tensor(len(targets), device=device)])
        batches += 1
        if keep_predictions:
            probs, classes = logits.softmax(dim=1).topk(min(5, logits.shape[1]), dim=1)
            predictions.append((indices, targets.cpu(), classes.cpu(), probs.cpu()))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    loss_sum, top1, top5, n = all_reduce_sum(sums).tolist()
    bad = sorted(path for shard in all_gather_objects(bad) for path in shard)
    result = {"n_images": int(n), "acc1": 100 * top1 / max(n, 1), "acc5": 100 * top5 / max(n, 1),
              "loss": loss_sum / max(n, 1), "seconds": seconds, "img_per_s": n / seconds if seconds else 0.0,
              "ms_per_batch": 1000 * seconds / max(batches, 1), "bad_images": bad}
    if keep_predictions:
        columns = [torch.cat(parts) if parts else torch.empty(0) for parts in zip(*predictions)] or [torch.empty(0)] * 4
        shards = all_gather_objects(columns)
        result["predictions"] = _merge_predictions(shards, samples)
    return result


def _merge_predictions(shards, samples) -> list[dict]:
    rows = []
    for indices, targets, classes, probs in shards:
        for i in range(len(indices)):
            rows.append({"index": int(indices[i]), "path": samples[int(indices[i])].path, "target": int(targets[i]),
                         "top5": classes[i].tolist(), "probs": [round(p, 6) for p in probs[i].tolist()]})
    return sorted(rows, key=lambda row: row["index"])
