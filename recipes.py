"""From a weights row to a training command: the config (configs/*.yaml) and settings that re-train
each of torchvision's classification weights, found through the recipe link every weights carries
(weights.meta["recipe"]), or the reason none can.

    python train.py --recipe ResNet50_Weights.IMAGENET1K_V2 --data /data/imagenet   # prints, then runs, the command
    python recipes.py                                                                 # writes docs/recipes.md
"""

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from utils import ArgumentParser, UserError, atomic_write_text, cli, closest

REFS = "https://github.com/pytorch/vision/tree/main/references/classification"
NEW_RECIPE = "https://github.com/pytorch/vision/issues/3995"  # the blog post's recipe and its variants
PR = "https://github.com/pytorch/vision/pull/"
DOC = Path(__file__).parent / "docs" / "recipes.md"


@dataclass(frozen=True)
class Recipe:
    config: str | None  # a file in configs/; None: these weights can't be re-trained from ImageNet-1k here
    settings: dict = field(default_factory=dict)  # on top of the config
    note: str = ""  # what differs, what is unconfirmed, or why it is not reproducible


def ported(source: str) -> Recipe:
    return Recipe(None, note=f"not trained by torchvision: {source}")


V1, V2 = "torchvision_v1.yaml", "torchvision_v2.yaml"
BY_RECIPE_LINK = {
    f"{REFS}#resnet": Recipe(V1),
    f"{REFS}#alexnet-and-vgg": Recipe(V1, {"lr": 0.01}, "lr 0.01 without BatchNorm, 0.1 for the _bn models"),
    f"{REFS}#resnext": Recipe(V1, {"epochs": 100, "batch_size": 16, "lr": 0.4}, "64 GPUs x 16"),
    f"{REFS}#mobilenetv2": Recipe("mobilenet_v2.yaml"),
    f"{REFS}#mobilenetv3-large--small": Recipe(
        "mobilenet_v3.yaml", note="the published weights average the last 3 improving checkpoints (by hand)"
    ),
    f"{REFS}#efficientnet-v2": Recipe("efficientnet_v2.yaml"),
    f"{REFS}#small-models": Recipe("regnet.yaml"),
    f"{REFS}#medium-models": Recipe("regnet.yaml", {"batch_size": 64, "lr": 0.4}),
    f"{REFS}#large-models": Recipe("regnet.yaml", {"batch_size": 32, "lr": 0.2}),
    f"{REFS}#vit_b_16": Recipe("vit.yaml"),
    f"{REFS}#vit_l_32": Recipe("vit.yaml"),
    f"{REFS}#vit_b_32": Recipe("vit.yaml", {"batch_size": 256, "auto_augment": "imagenet"}, "16 GPUs x 256"),
    f"{REFS}#vit_l_16": Recipe(
        V2, {"batch_size": 64, "train_crop_size": 224, "ra_reps": 3, "clip_grad_norm": 1.0}, "16 GPUs x 64"
    ),
    f"{REFS}#convnext": Recipe("convnext.yaml"),
    f"{REFS}#swintransformer": Recipe("swin.yaml"),
    f"{REFS}#swintransformer-v2": Recipe("swin.yaml", {"train_crop_size": 256}),
    f"{REFS}#maxvit": Recipe("maxvit.yaml"),
    f"{NEW_RECIPE}#issuecomment-1013906621": Recipe(V2),  # ResNet50 V2, the blog post's
    f"{NEW_RECIPE}#new-recipe-with-fixres": Recipe(V2, {"ra_sampler": False}, "before repeated augmentation"),
    f"{NEW_RECIPE}#new-recipe": Recipe(
        V2,
        {"ra_sampler": False, "train_crop_size": 224},
        "at 224 px, before repeated augmentation; the RegNets' own batch and lr are not published",
    ),
    f"{NEW_RECIPE}#new-recipe-with-reg-tuning": Recipe(
        V2, note="MobileNetV2's command (PR 5560); MobileNetV3-Large's regularisation tuning is not published"
    ),
    f"{NEW_RECIPE}#new-recipe-with-lr-wd-crop-tuning": Recipe(
        V2, note="the tuned lr, weight decay and train crop are not published"
    ),
    f"{PR}5906": Recipe(V2),  # ShuffleNetV2 x1.5 and x2.0
    f"{PR}6019": Recipe(V2),  # MNASNet 0.75 and 1.3
    f"{PR}5935": Recipe(V2),  # ResNeXt101 64x4d
    "https://github.com/facebookresearch/SWAG": Recipe(
        None, note="SWAG: weakly supervised pre-training on 3.6B Instagram images, then fine-tuned"
    ),
    f"{PR}5793": Recipe(None, note="SWAG: a linear classifier on a trunk pre-trained on Instagram images"),
    f"{REFS}#efficientnet-v1": ported("ported from timm (B0-B4) and EfficientNet-PyTorch (B5-B7)"),
    f"{REFS}#googlenet": ported("ported from the paper's TensorFlow weights"),
    f"{REFS}#inception-v3": ported("ported from the paper's TensorFlow weights"),
    f"{PR}116": ported("ported from LuaTorch"),
    f"{PR}49#issuecomment-277560717": ported("a contributed SqueezeNet training, no published command"),
    "https://github.com/1e100/mnasnet_trainer": ported("trained with an external trainer (1e100/mnasnet_trainer)"),
    "https://github.com/ericsun99/Shufflenet-v2-Pytorch": ported("ported from a community repository"),
    f"{PR}912#issue-445437439": Recipe(
        None, note="SGD with cosine warm restarts for 256 epochs in apex fp16: a schedule this repo lacks"
    ),
    "https://github.com/amdegroot/ssd.pytorch#training-ssd": Recipe(
        None, note="SSD's VGG16 feature extractor: no classifier, no ImageNet accuracy"
    ),
}
# Where one weights differs from the others of its recipe link
BY_WEIGHTS = {
    **{f"VGG{n}_BN_Weights.IMAGENET1K_V1": {"lr": 0.1} for n in (11, 13, 16, 19)},
    "RegNet_Y_400MF_Weights.IMAGENET1K_V1": {"lr": 0.4},
    "EfficientNet_V2_M_Weights.IMAGENET1K_V1": {"train_crop_size": 384},
}
NOT_TRAINED_HERE = {"EfficientNet_V2_L_Weights.IMAGENET1K_V1": ported("ported from the paper's TensorFlow weights")}


def classification_weights() -> dict[str, str]:
    """{'ResNet50_Weights.IMAGENET1K_V2': 'resnet50', ...} for every classification weights of torchvision."""
    from torchvision import models

    return {str(w): arch for arch in models.list_models(module=models) for w in models.get_model_weights(arch)}


def recipe_for(name: str):
    """(weights, arch, Recipe with the weights' own eval sizes and interpolation in its settings). `name`:
    a weights name (ResNet50_Weights.IMAGENET1K_V2) or an architecture (its DEFAULT weights)."""
    from torchvision import models

    archs = classification_weights()
    if name in set(archs.values()):
        name = str(models.get_model_weights(name).DEFAULT)
    elif name.endswith(".DEFAULT") and name.removesuffix(".DEFAULT") in {n.split(".")[0] for n in archs}:
        name = str(models.get_weight(name))  # ResNet50_Weights.DEFAULT: the weights it stands for
    if name not in archs:
        raise UserError(f"unknown weights '{name}'{closest(name, archs)}; see docs/recipes.md for every name")
    weights = models.get_weight(name)
    link = weights.meta["recipe"]
    recipe = NOT_TRAINED_HERE.get(name) or BY_RECIPE_LINK.get(link) or Recipe(None, note=f"unknown recipe {link}")
    if recipe.config is None:
        return weights, archs[name], recipe
    t = weights.transforms()  # evaluate as the weights are published (sizes tuned after training included)
    evaluation = {"val_resize_size": t.resize_size[0], "val_crop_size": t.crop_size[0]}
    evaluation["interpolation"] = t.interpolation.value
    settings = {**recipe.settings, **BY_WEIGHTS.get(name, {}), **evaluation}
    return weights, archs[name], Recipe(recipe.config, settings, recipe.note)


def recipe_arguments(arch: str, recipe: Recipe) -> list[str]:
    """train.py options for a recipe: --config, --arch and each setting."""
    options = ["--config", f"configs/{recipe.config}", "--arch", arch]
    for key, value in recipe.settings.items():
        options += [f"--{key.replace('_', '-')}", str(value).lower() if isinstance(value, bool) else str(value)]
    return options


def expand_recipe(argv: list[str]) -> list[str]:
    """train.py's command line with `--recipe NAME` replaced by that recipe's options, placed first so
    that the user's own options still win; the resolved command is printed."""
    if not any(a == "--recipe" or a.startswith("--recipe=") for a in argv):
        return argv
    at = next(i for i, a in enumerate(argv) if a == "--recipe" or a.startswith("--recipe="))
    if argv[at] == "--recipe" and at + 1 >= len(argv):
        raise UserError("--recipe needs a weights name, e.g. --recipe ResNet50_Weights.IMAGENET1K_V2")
    name = argv[at].partition("=")[2] or argv[at + 1]
    rest = argv[:at] + argv[at + (1 if "=" in argv[at] else 2) :]
    if "--config" in rest or any(a.startswith("--config=") for a in rest):
        raise UserError("--recipe chooses the config; drop --config (other options still override the recipe)")
    weights, arch, recipe = recipe_for(name)
    if recipe.config is None:
        raise UserError(f"{weights} can't be re-trained from ImageNet-1k here: {recipe.note}")
    argv = recipe_arguments(arch, recipe) + rest
    if int(os.environ.get("RANK", 0)) > 0:  # under torchrun, before the process group exists
        return argv
    metrics = weights.meta["_metrics"]["ImageNet-1K"]
    print(f"recipe of {weights} ({metrics['acc@1']} / {metrics['acc@5']}{'; ' + recipe.note if recipe.note else ''}):")
    print("  python train.py " + shlex.join(argv))
    print(f"  (--batch-size is per process: launch as many as the original run, configs/{recipe.config}'s header)")
    return argv


def recipes_table() -> str:
    """docs/recipes.md: every weights, its published accuracy and the command that re-trains it."""
    lines = [
        "# Training recipes of torchvision's weights",
        "",
        "Generated by `python recipes.py`. `python train.py --recipe WEIGHTS --data DIR` runs the command of a",
        "row; the per-process batch is that of the original run, so launch as many processes as it used",
        "(each config's header gives the launch command). Eval sizes and interpolation are those the weights",
        "are published with.",
        "",
        "Where train.py differs from torchvision's references/classification/train.py for the same flags:",
        "",
        "- The train transform is the same, tensor for tensor (tests/test_recipes.py); MixUp/CutMix run on",
        "  the device after normalisation instead of in the loader workers (same distributions, other draws).",
        "- Augmentations are seeded per image, epoch and copy, so a resume is exact; the references' draws",
        "  depend on the worker count.",
        "- The repeated-augmentation sampler keeps len(dataset) // world images per rank and epoch; the",
        "  references keep a multiple of 256 (nothing of a folder smaller than 256 images).",
        "- The EMA is updated every `ema_steps` optimizer steps of the run; the references count the steps",
        "  of each epoch from 0. Its decay is adjusted to the global batch as theirs is.",
        "- `--amp auto` is bf16 on GPUs that have it; the references' `--amp` is fp16 with a GradScaler",
        "  (`--amp fp16` here), and a command without `--amp` trained in fp32 (`--amp none` here).",
        "",
        "| weights | top-1 | top-5 | train.py options | note |",
        "|---|---:|---:|---|---|",
    ]
    for name in sorted(classification_weights(), key=str.lower):
        weights, arch, recipe = recipe_for(name)
        metrics = weights.meta["_metrics"]["ImageNet-1K"]
        options = "not reproducible" if recipe.config is None else f"`{shlex.join(recipe_arguments(arch, recipe))}`"
        lines.append(f"| {name} | {metrics['acc@1']} | {metrics['acc@5']} | {options} | {recipe.note} |")
    return "\n".join(lines) + "\n"


@cli
def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(DOC), help="where to write the table (default: docs/recipes.md)")
    args = parser.parse_args(argv)
    atomic_write_text(Path(args.out), recipes_table())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
