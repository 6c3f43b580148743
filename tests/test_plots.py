"""The accuracy-vs-GMACs figure of all torchvision weights: readable labels, a style per family, the
Pareto front named, and an HTML page that names every point."""

import math

from torchvision import models

from model import ARCHS, QUANTIZED_ARCHS, all_weights, weights_enum
from report import family_styles, pareto_front, plot_acc_vs_gmacs, point_label
from test_torchvision import model_family


def metadata_records() -> list[dict]:
    """The complexity table's columns for all weights, from torchvision's metadata (fast: no counting)."""
    records = []
    for arch in ARCHS + QUANTIZED_ARCHS:
        for w in all_weights(arch):
            metrics = w.meta["_metrics"]["ImageNet-1K"]
            acc1 = None if math.isnan(metrics["acc@1"]) else metrics["acc@1"]
            records.append(
                {
                    "model": arch,
                    "weights": str(w),
                    "default": w is weights_enum(arch, "DEFAULT"),
                    "family": model_family(arch),
                    "params": w.meta["num_params"],
                    "gmacs": w.meta["_ops"],
                    "acc1_published": acc1,
                    "acc5_published": metrics["acc@5"],
                }
            )
    return records


def test_pareto_front():
    points = [(1, 70), (2, 75), (2, 74), (3, 74), (4, 80), (0.5, 60), (4, 79)]
    assert pareto_front(points) == [5, 0, 1, 4]


def test_every_family_has_its_own_colour_and_marker():
    families = sorted({model_family(arch) for arch in ARCHS + QUANTIZED_ARCHS})
    styles = family_styles(families)
    assert len(families) >= 20 and len({c for c, _ in styles.values()}) == len(families)
    assert len(set(styles.values())) == len(families)


def test_labels_never_overlap_and_name_the_front_and_the_defaults(tmp_path):
    records = metadata_records()
    labels = plot_acc_vs_gmacs(records, tmp_path / "acc_vs_gmacs.png")
    boxes = [box for _, box in labels]
    assert all(not a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    named = {text for text, _ in labels}
    rows = [r for r in records if r["acc1_published"] is not None]
    front = pareto_front([(r["gmacs"], r["acc1_published"]) for r in rows])
    assert {point_label(rows[i]) for i in front} <= named
    defaults = [r for r in rows if r["default"]]
    assert sum(point_label(r) in named for r in defaults) >= 0.6 * len(defaults), (len(named), len(defaults))
    assert (tmp_path / "acc_vs_gmacs.png").stat().st_size > 50_000
    page = (tmp_path / "acc_vs_gmacs.html").read_text()
    assert page.count("<circle") == len(rows) == 128  # 114 float (VGG16's features publish none) + 14 int8
    assert (
        "ResNet50_Weights.IMAGENET1K_V2" in page
        and str(models.ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1) in page
    )
