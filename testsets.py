"""ImageNet's relabelled and shifted test sets: the name an eval row gives its set, the classes a
subset holds (ImageNet-A and -R: 200 each), and the ReaL labels of the validation images.

    python test_torchvision.py --data /data/imagenetv2-matched-frequency-format-val   # folders 0..999
    python test_torchvision.py --data /data/imagenet-a --mask-classes                  # the 200-class protocol
    python test_torchvision.py --data /data/imagenet/val --real-labels real.json       # ReaL top-1/top-5 too
ImageNetV2's folders are class indices, ImageNet-Sketch, -A and -R are wnid folders (dataset.find_samples).
ReaL (Beyer et al. 2020): real.json lists, in val-file order (ILSVRC2012_val_00000001.JPEG first), the
labels each image truly shows; a prediction is right when it is among them, images with none are left out.
"""

import json
import re
from pathlib import Path

from utils import UserError

SPLIT_NAMES = ("val", "validation", "test", "train")
KNOWN_SETS = {  # a folder whose name contains the key is this set (the ImageNetV2 variants keep their names)
    "imagenetv2": None,
    "imagenet-v2": None,
    "sketch": "imagenet-sketch",
    "imagenet-a": "imagenet-a",
    "imagenet_a": "imagenet-a",
    "imagenet-r": "imagenet-r",
    "imagenet_r": "imagenet-r",
}
VAL_FILE = re.compile(r"ILSVRC2012_val_(\d{8})\.", re.IGNORECASE)


def dataset_name(data, num_classes: int, explicit: str | None = None) -> str:
    """The `dataset` of an eval row: `explicit`, a known set recognised from the folder's name, 'imagenet'
    for any other folder of all 1000 classes, else the folder's name (root/val counts as root)."""
    if explicit:
        return explicit
    folder = Path(data).resolve()
    name = (folder.parent.name if folder.name.lower() in SPLIT_NAMES else folder.name).lower()
    for key, known in KNOWN_SETS.items():
        if key in name:
            return known or name
    return "imagenet" if num_classes == 1000 else name


def class_mask(samples, num_classes: int = 1000):
    """(num_classes,) bool tensor: the classes that occur among the samples' targets."""
    import torch

    mask = torch.zeros(num_classes, dtype=torch.bool)
    mask[sorted({s.target for s in samples})] = True
    return mask


def load_real_labels(path) -> list[list[int]]:
    """real.json: a list (one entry per val image, in file order) of lists of class indices."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"ReaL labels file {path} does not exist (real.json from google-research/reassessed-imagenet)")
    try:
        labels = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); pass ReaL's real.json") from e
    valid = isinstance(labels, list) and all(
        isinstance(entry, list) and all(isinstance(c, int) and 0 <= c < 1000 for c in entry) for entry in labels
    )
    if not valid:
        raise UserError(f"{path} is not ReaL's format: a list of lists of class indices 0..999, one per val image")
    return labels


def real_accuracy(predictions: list[dict], labels: list[list[int]]) -> dict:
    """ReaL top-1 and top-5 (%) and the images scored, from evaluate()'s per-image predictions (path,
    top5). An image is scored when its file name is a val file with a non-empty label list."""
    top1 = top5 = scored = 0
    for row in predictions:
        match = VAL_FILE.search(Path(row["path"]).name)
        if match is None:
            raise UserError(f"{row['path']} is not an ILSVRC2012_val_*.JPEG file, so ReaL has no labels for it")
        number = int(match.group(1))
        if not 1 <= number <= len(labels):
            raise UserError(f"{Path(row['path']).name} is beyond the {len(labels)} images of the ReaL labels file")
        real = set(labels[number - 1])
        if real:
            scored += 1
            top1 += row["top5"][0] in real
            top5 += bool(real & set(row["top5"]))
    return {"real_acc1": 100 * top1 / max(scored, 1), "real_acc5": 100 * top5 / max(scored, 1), "real_n_images": scored}
