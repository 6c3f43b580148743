import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loss import CrossEntropy, FocalLoss, SmoothL1ProbLoss, WeightedSum, build_loss, one_hot
from utils import UserError

# The hand-worked example: 2 classes, logits [0, ln 3] -> p = [1/4, 3/4], for targets 1 and 0.
LOGITS = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
TARGET = torch.tensor([1, 0])


def random_batch(batch=16, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, classes, generator=g) * 3, torch.randint(classes, (batch,), generator=g)


def test_one_hot_smoothing_matches_cross_entropy_convention():
    # eps 0.3, C 3: off-target 0.3/3 = 0.1, target 0.7 + 0.1 = 0.8
    q = one_hot(torch.tensor([2, 0]), 3, smoothing=0.3)
    assert q.dtype == torch.float32
    assert torch.allclose(q, torch.tensor([[0.1, 0.1, 0.8], [0.8, 0.1, 0.1]]))
    assert torch.equal(one_hot(torch.tensor([1]), 3), torch.tensor([[0.0, 1.0, 0.0]]))


def test_focal_hand_value():
    # target 1: p_t 3/4 -> (1/4)^2 * -ln(3/4) = 0.0625 * 0.287682 = 0.0179801
    # target 0: p_t 1/4 -> (3/4)^2 * -ln(1/4) = 0.5625 * 1.386294 = 0.7797905; mean 0.3988853
    assert FocalLoss(gamma=2.0)(LOGITS, TARGET).item() == pytest.approx(0.3988853, abs=1e-6)
    # alpha [0.25, 1]: (1 * 0.0179801 + 0.25 * 0.7797905) / 2 = (0.0179801 + 0.1949476) / 2 = 0.1064639
    assert FocalLoss(gamma=2.0, alpha=[0.25, 1.0])(LOGITS, TARGET).item() == pytest.approx(
        0.1064639, abs=1e-6
    )


def test_focal_label_smoothing_hand_value():
    # eps 0.2, C 2, target 1: q = [0.1, 0.9]
    # 0.1 * (3/4)^2 * 1.386294 + 0.9 * (1/4)^2 * 0.287682 = 0.0779791 + 0.0161821 = 0.0941612
    loss = FocalLoss(gamma=2.0, label_smoothing=0.2)(LOGITS[:1], TARGET[:1])
    assert loss.item() == pytest.approx(0.0941612, abs=1e-6)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_focal_gamma0_is_cross_entropy(eps):
    logits, target = random_batch()
    expected = F.cross_entropy(logits, target, label_smoothing=eps)
    assert torch.allclose(
        FocalLoss(gamma=0.0, label_smoothing=eps)(logits, target), expected, atol=1e-6, rtol=0
    )
    assert torch.allclose(CrossEntropy(eps)(logits, target), expected, atol=1e-6, rtol=0)


def test_focal_alpha_is_a_per_sample_class_weight():
    logits, target = random_batch()
    alpha = torch.rand(5, generator=torch.Generator().manual_seed(1))
    expected = F.cross_entropy(logits, target, weight=alpha, reduction="none").mean()  # plain batch mean
    assert torch.allclose(FocalLoss(gamma=0.0, alpha=alpha)(logits, target), expected, atol=1e-6, rtol=0)


def test_focal_down_weights_easy_examples():
    logits, target = random_batch()
    ce = F.cross_entropy(logits, target, reduction="none")
    focal = torch.stack(
        [FocalLoss(gamma=2.0)(logits[i : i + 1], target[i : i + 1]) for i in range(len(target))]
    )
    assert (focal <= ce + 1e-7).all() and (focal > 0).all()
    # the weight is (1 - p_t)^gamma: an easy example (p_t = 0.9) keeps 1%, a hard one (p_t = 0.1) 81%
    easy, hard = torch.tensor([[math.log(9.0), 0.0]]), torch.tensor([[math.log(1 / 9), 0.0]])
    for logits_1, kept in ((easy, 0.01), (hard, 0.81)):
        ratio = FocalLoss(gamma=2.0)(logits_1, torch.tensor([0])) / F.cross_entropy(
            logits_1, torch.tensor([0])
        )
        assert ratio.item() == pytest.approx(kept, rel=1e-5)


def test_smooth_l1_hand_value():
    # target 1: |p - q| = [1/4, 1/4]; target 0: [3/4, 3/4]
    # beta 1 (all quadratic, 0.5 d^2): (2 * 0.03125 + 2 * 0.28125) / 2 = 0.3125
    assert SmoothL1ProbLoss(beta=1.0)(LOGITS, TARGET).item() == pytest.approx(0.3125, abs=1e-6)
    # beta 0.5: 1/4 < beta -> 0.5 * 0.0625 / 0.5 = 0.0625; 3/4 >= beta -> 0.75 - 0.25 = 0.5
    # (2 * 0.0625 + 2 * 0.5) / 2 = 0.5625
    assert SmoothL1ProbLoss(beta=0.5)(LOGITS, TARGET).item() == pytest.approx(0.5625, abs=1e-6)


def test_smooth_l1_label_smoothing():
    # eps 0.2, C 2, target 1: q = [0.1, 0.9], p = [0.25, 0.75]: 2 * 0.5 * 0.15^2 = 0.0225
    assert SmoothL1ProbLoss(label_smoothing=0.2)(LOGITS[:1], TARGET[:1]).item() == pytest.approx(
        0.0225, abs=1e-6
    )


CRITERIA = {
    "ce": CrossEntropy(0.1),
    "focal_g0": FocalLoss(gamma=0.0),
    "focal_g05": FocalLoss(gamma=0.5, label_smoothing=0.1),  # x^0.5 has an infinite slope at x = 0
    "focal_g2_alpha": FocalLoss(gamma=2.0, alpha=[0.5, 1.0, 2.0]),
    "smooth_l1": SmoothL1ProbLoss(),
    "sum": build_loss({"focal": 1.0, "smooth_l1": 1.0}, 3, label_smoothing=0.1),
}


@pytest.mark.parametrize("name", CRITERIA)
def test_extreme_logits_under_bf16_autocast(name):
    # one confidently wrong row (loss ~200 for CE/focal), one confidently right, one mild;
    # +-100 and 0 are exact in bf16, so the bf16 result must match fp32
    criterion = CRITERIA[name]
    x = torch.tensor([[100.0, -100.0, 0.0], [-100.0, 100.0, 0.0], [1.0, 0.0, -1.0]], requires_grad=True)
    target = torch.tensor([1, 1, 2])
    layer = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(3))
    expected = criterion(x.detach(), target)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        assert logits.dtype == torch.bfloat16
        loss = criterion(logits, target)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.allclose(loss, expected, rtol=1e-2, atol=1e-2)
    loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all()
    half = criterion(x.detach().half(), target)  # fp16 logits outside autocast
    assert torch.isfinite(half) and torch.allclose(half, expected, rtol=1e-3, atol=1e-3)


def test_build_loss_single_terms():
    ce = build_loss("ce", 10, label_smoothing=0.1)
    assert isinstance(ce, CrossEntropy) and ce.label_smoothing == 0.1
    assert isinstance(build_loss({"ce": 1.0}, 10), CrossEntropy)
    focal = build_loss({"focal": {"gamma": 1.5, "alpha": [1.0] * 10}}, 10)
    assert isinstance(focal, FocalLoss) and focal.gamma == 1.5 and focal.alpha.shape == (10,)
    # yaml 'smooth_l1:' with no value
    assert isinstance(build_loss({"smooth_l1": None}, 10), SmoothL1ProbLoss)
    scaled = build_loss({"ce": 0.5}, 10)
    assert isinstance(scaled, WeightedSum) and scaled.weights == {"ce": 0.5}


def test_build_loss_weighted_sum_and_parts():
    spec = {
        "focal": {"weight": 1.0, "gamma": 2.0, "alpha": None, "label_smoothing": 0.0},
        "smooth_l1": {"weight": 0.5, "beta": 1.0},
    }
    criterion = build_loss(spec, 5, label_smoothing=0.1)
    assert isinstance(criterion, WeightedSum) and criterion.weights == {"focal": 1.0, "smooth_l1": 0.5}
    assert criterion.losses["focal"].label_smoothing == 0.0  # the term's own value wins
    assert criterion.losses["smooth_l1"].label_smoothing == 0.1
    logits, target = random_batch()
    logits.requires_grad_()
    total = criterion(logits, target)
    parts = criterion.parts
    assert set(parts) == {"focal", "smooth_l1"} and not any(p.requires_grad for p in parts.values())
    assert torch.allclose(parts["focal"], FocalLoss(2.0)(logits, target))
    assert torch.allclose(total, parts["focal"] + 0.5 * parts["smooth_l1"])
    total.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize(
    "spec, needles",
    [
        ("focall", ["unknown loss 'focall'", "did you mean focal"]),
        ({"smoth_l1": 1.0}, ["did you mean smooth_l1"]),
        ({"focal": {"gama": 2.0}}, ["unknown key 'gama' in losses.focal", "did you mean gamma"]),
        ({"smooth_l1": {"weight": 1.0, "betta": 1.0}}, ["did you mean beta"]),
        ({"ce": -1.0}, ["losses.ce weight must be a number >= 0"]),
        ({"ce": "heavy"}, ["weight must be a number"]),
        ({"focal": {"gamma": -1.0}}, ["gamma must be >= 0"]),
        ({"focal": {"gamma": "two"}}, ["losses.focal"]),
        ({"focal": {"alpha": [1.0, 2.0]}}, ["one weight per class (3), got 2"]),
        ({"focal": {"alpha": 0.25}}, ["alpha must be a list"]),
        ({"smooth_l1": {"beta": -0.5}}, ["beta must be >= 0"]),
        ({"ce": {"label_smoothing": 1.5}}, ["label_smoothing must be in [0, 1]"]),
        ({}, ["non-empty mapping"]),
        (["ce"], ["non-empty mapping"]),
    ],
)
def test_build_loss_user_errors(spec, needles):
    with pytest.raises(UserError) as info:
        build_loss(spec, 3)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
