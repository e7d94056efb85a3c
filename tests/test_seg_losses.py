"""The fine-tuning losses against independent float64 numpy transcriptions of the paper's formulas
(arXiv 2601.15705 eq. 1-4), with ignored pixels, plus the all-ignored edge case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.seg_losses import (
    CELoss,
    FocalDiceLoss,
    alpha_from_frequencies,
    cross_entropy_loss,
    dice_loss,
    focal_dice_loss,
    focal_loss,
    water_loss,
)

IGN = 255
TOL = dict(rtol=1e-5, atol=1e-6)


def _batch(seed: int = 0, b: int = 2, k: int = 5, h: int = 7, w: int = 6, ignored: float = 0.25):
    """Random logits (float32) and labels with ~`ignored` of the pixels set to IGN; the last class
    never appears in the labels (so dice sees a class absent from the batch)."""
    g = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(b, k, h, w, generator=g)
    target = torch.randint(0, k - 1, (b, h, w), generator=g)
    target[torch.rand(b, h, w, generator=g) < ignored] = IGN
    assert (target == IGN).any() and (target != IGN).any()
    return logits, target


# ---- numpy references: the formulas written out, pixel by pixel, in float64 -------------------


def _np_softmax(logits: np.ndarray) -> np.ndarray:  # (B, K, H, W) -> probabilities
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _np_pixels(logits: torch.Tensor, target: torch.Tensor):
    """(probabilities (N, K), labels (N,)) of the valid pixels, as float64/int64 numpy."""
    p = _np_softmax(logits.double().numpy())
    t = target.numpy().astype(np.int64)
    p = np.moveaxis(p, 1, -1)  # (B, H, W, K)
    keep = t != IGN
    return p[keep], t[keep]


def np_focal(logits, target, alpha, gamma, alpha_scale, eps=1e-8) -> float:
    p, y = _np_pixels(logits, target)
    alpha = np.asarray(alpha, dtype=np.float64)
    total = 0.0
    for n in range(len(y)):
        pt = p[n, y[n]]
        total += -alpha_scale * alpha[y[n]] * (1.0 - pt) ** gamma * np.log(pt + eps)
    return total / len(y)


def np_dice(logits, target, eps) -> float:
    p, y = _np_pixels(logits, target)
    k = p.shape[1]
    scores = []
    for c in range(k):
        g = (y == c).astype(np.float64)
        scores.append((2.0 * np.sum(p[:, c] * g) + eps) / (np.sum(p[:, c]) + np.sum(g) + eps))
    return 1.0 - float(np.mean(scores))


def np_ce(logits, target, weight=None) -> float:
    p, y = _np_pixels(logits, target)
    w = np.ones(p.shape[1]) if weight is None else np.asarray(weight, dtype=np.float64)
    nll = -np.log(p[np.arange(len(y)), y])
    return float(np.sum(w[y] * nll) / np.sum(w[y]))


def np_water(logit, target, lambda_dice, eps) -> float:
    z = logit[:, 0].double().numpy()
    t = target.numpy().astype(np.int64)
    keep = t != IGN
    z, y = z[keep], t[keep].astype(np.float64)
    p = 1.0 / (1.0 + np.exp(-z))
    bce = np.mean(-(y * np.log(p) + (1.0 - y) * np.log(1.0 - p)))
    dice = 1.0 - (2.0 * np.sum(p * y) + eps) / (np.sum(p) + np.sum(y) + eps)
    return float(bce + lambda_dice * dice)


# ---- alpha -------------------------------------------------------------------------------------


def test_alpha_from_hand_computed_frequencies():
    # f = (0.5, 0.3, 0.2): 1 - f = (0.5, 0.7, 0.8), sum 2.0 -> alpha = (0.25, 0.35, 0.40).
    a = alpha_from_frequencies([0.5, 0.3, 0.2])
    assert a.dtype == torch.float32
    np.testing.assert_allclose(a.numpy(), [0.25, 0.35, 0.40], rtol=1e-6)
    # f = (0.7, 0.1, 0.1, 0.1): 1 - f = (0.3, 0.9, 0.9, 0.9), sum 3.0 -> (0.1, 0.3, 0.3, 0.3).
    a = alpha_from_frequencies(torch.tensor([0.7, 0.1, 0.1, 0.1]))
    np.testing.assert_allclose(a.numpy(), [0.1, 0.3, 0.3, 0.3], rtol=1e-6)


@pytest.mark.parametrize(
    ("freqs", "match"),
    [
        ([10.0, 30.0, 60.0], "sum to 1"),  # counts, not frequencies
        ([0.5, 0.3, 0.1], "sum to 1"),
        ([1.2, -0.2], ">= 0"),
        ([0.5, float("nan"), 0.5], "finite"),
        ([1.0], "K >= 2"),
        ([[0.5, 0.5]], "1-D"),
    ],
)
def test_alpha_rejects_bad_frequencies(freqs, match):
    with pytest.raises(ValueError, match=match):
        alpha_from_frequencies(freqs)


# ---- the losses against numpy ------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_focal_matches_numpy(seed):
    logits, target = _batch(seed)
    alpha = torch.tensor([0.1, 0.3, 0.15, 0.25, 0.2])
    got = focal_loss(logits, target, alpha, gamma=1.1, alpha_scale=2.25)
    want = np_focal(logits, target, alpha.numpy(), gamma=1.1, alpha_scale=2.25)
    np.testing.assert_allclose(got.item(), want, **TOL)
    got = focal_loss(logits, target, alpha, gamma=2.0, alpha_scale=1.0)
    want = np_focal(logits, target, alpha.numpy(), gamma=2.0, alpha_scale=1.0)
    np.testing.assert_allclose(got.item(), want, **TOL)


@pytest.mark.parametrize("eps", [1.0, 1e-6])
def test_dice_matches_numpy(eps):
    logits, target = _batch(3)
    np.testing.assert_allclose(
        dice_loss(logits, target, eps=eps).item(), np_dice(logits, target, eps), **TOL
    )


def test_focal_dice_matches_numpy_with_paper_defaults():
    logits, target = _batch(4, b=3, k=9, h=8, w=8)
    freqs = np.array([0.05, 0.10, 0.15, 0.10, 0.40, 0.05, 0.05, 0.05, 0.05])
    alpha = alpha_from_frequencies(freqs)
    alpha_np = (1 - freqs) / np.sum(1 - freqs)  # eq. 1, in numpy
    focal, dice = np_focal(logits, target, alpha_np, 1.1, 2.25), np_dice(logits, target, 1.0)
    want = 0.57 * focal + 0.32 * dice
    np.testing.assert_allclose(focal_dice_loss(logits, target, alpha).item(), want, **TOL)
    module = FocalDiceLoss(class_freqs=freqs)
    np.testing.assert_allclose(module(logits, target).item(), want, **TOL)


def test_cross_entropy_matches_numpy():
    logits, target = _batch(5)
    np.testing.assert_allclose(
        cross_entropy_loss(logits, target).item(), np_ce(logits, target), **TOL
    )
    w = [0.5, 2.0, 1.0, 3.0, 1.5]
    got = CELoss(weight=w)(logits, target).item()
    np.testing.assert_allclose(got, np_ce(logits, target, w), **TOL)


@pytest.mark.parametrize("lambda_dice", [1.0, 0.3])
def test_water_matches_numpy(lambda_dice):
    g = torch.Generator().manual_seed(6)
    logit = 2.0 * torch.randn(2, 1, 9, 7, generator=g)
    target = torch.randint(0, 2, (2, 9, 7), generator=g).to(torch.uint8)
    target[torch.rand(2, 9, 7, generator=g) < 0.3] = IGN
    got = water_loss(logit, target, lambda_dice=lambda_dice).item()
    np.testing.assert_allclose(got, np_water(logit, target, lambda_dice, 1.0), **TOL)


def test_focal_without_focusing_is_weighted_cross_entropy():
    # gamma = 0, eps = 0: -alpha_scale * alpha_y * log p_t, i.e. PyTorch's CE with per-pixel
    # weights alpha_scale * alpha_y, summed and divided by N (not by the sum of weights).
    logits, target = _batch(7)
    alpha = torch.tensor([0.1, 0.3, 0.15, 0.25, 0.2])
    n = (target != IGN).sum()
    ce_sum = F.cross_entropy(logits, target, weight=2.0 * alpha, ignore_index=IGN, reduction="sum")
    got = focal_loss(logits, target, alpha, gamma=0.0, alpha_scale=2.0, eps=0.0)
    torch.testing.assert_close(got, ce_sum / n)


# ---- ignored pixels ----------------------------------------------------------------------------


LOSSES = {
    "focal": lambda x, t: focal_loss(x, t, torch.full((x.shape[1],), 1.0 / x.shape[1])),
    "dice": dice_loss,
    "focal_dice": lambda x, t: focal_dice_loss(x, t, torch.full((x.shape[1],), 1.0 / x.shape[1])),
    "ce": cross_entropy_loss,
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_ignored_pixels_neither_count_nor_get_gradient(name):
    logits, target = _batch(8)
    ignored = target == IGN
    logits.requires_grad_(True)
    loss = LOSSES[name](logits, target)
    loss.backward()
    grad_ign = logits.grad.permute(0, 2, 3, 1)[ignored]
    assert torch.count_nonzero(grad_ign) == 0
    assert torch.count_nonzero(logits.grad.permute(0, 2, 3, 1)[~ignored]) > 0
    # changing the logits of ignored pixels leaves the loss unchanged
    other = logits.detach().clone()
    other.permute(0, 2, 3, 1)[ignored] = 100.0 * torch.randn(int(ignored.sum()), other.shape[1])
    assert LOSSES[name](other, target).item() == loss.item()


@pytest.mark.parametrize("name", [*sorted(LOSSES), "water"])
def test_all_ignored_batch_gives_zero_with_gradient(name):
    if name == "water":
        logits = torch.randn(2, 1, 5, 5, requires_grad=True)
        loss = water_loss(logits, torch.full((2, 5, 5), IGN, dtype=torch.uint8))
    else:
        logits = torch.randn(2, 4, 5, 5, requires_grad=True)
        loss = LOSSES[name](logits, torch.full((2, 5, 5), IGN, dtype=torch.long))
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert logits.grad is not None
    assert torch.count_nonzero(logits.grad) == 0


# ---- behaviour and plumbing --------------------------------------------------------------------


def test_confident_correct_prediction_has_near_zero_loss():
    _, target = _batch(9)
    logits = 30.0 * F.one_hot(target.clamp_max(4), 5).permute(0, 3, 1, 2).float()
    alpha = torch.full((5,), 0.2)
    assert focal_loss(logits, target, alpha).item() < 1e-6
    # class 4 is absent from the labels and nearly unpredicted: with eps = 1 its score ~ 1.
    assert dice_loss(logits, target).item() < 1e-3


def test_gradcheck_focal_dice_in_float64():
    logits, target = _batch(10, b=1, k=3, h=3, w=3)
    x = logits.double().requires_grad_(True)
    alpha = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: focal_dice_loss(z, target, alpha), (x,))


def test_half_precision_logits_are_computed_in_float32():
    logits, target = _batch(11)
    alpha = torch.full((5,), 0.2)
    got = focal_dice_loss(logits.bfloat16(), target, alpha)
    assert got.dtype == torch.float32
    want = focal_dice_loss(logits.bfloat16().float(), target, alpha)
    torch.testing.assert_close(got, want)


def test_focal_dice_loss_needs_exactly_one_of_alpha_and_frequencies():
    m = FocalDiceLoss(alpha=[0.25, 0.35, 0.4], alpha_scale=1.0)
    assert "alpha" in dict(m.named_buffers())
    with pytest.raises(ValueError, match="exactly one"):
        FocalDiceLoss()


def test_shape_errors():
    logits, target = _batch(12)
    with pytest.raises(ValueError, match="alpha must have shape"):
        focal_loss(logits, target, torch.ones(3))
    with pytest.raises(ValueError, match="target must be"):
        dice_loss(logits, target[:, :-1])
    with pytest.raises(TypeError, match="integer"):
        dice_loss(logits, target.float())
    with pytest.raises(ValueError, match="eps must be > 0"):
        dice_loss(logits, target, eps=0.0)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        water_loss(logits, target)
