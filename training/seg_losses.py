"""Segmentation losses of the fine-tuning stage (docs/design.md §4; arXiv 2601.15705 eq. 1-4).

Shapes and conventions shared by every loss here:

- ``logits``: ``(B, K, H, W)`` float (any float dtype; half/bfloat16 is computed in float32).
- ``target``: ``(B, H, W)`` integer class ids in ``[0, K)``, or ``ignore_index`` (255, JAXA
  "no data") for pixels that must not contribute. Ignored pixels are left out of *every* term:
  they add nothing to the focal/CE/BCE sums, nor to the dice sums of ``p`` or ``g``, and do not
  count in the pixel count ``N``.
- Every loss returns a 0-d tensor. Sums run over the whole batch (all valid pixels of all
  images), as in the paper's equations, not per image.
- A batch in which every pixel is ignored returns ``0`` that is still attached to the graph
  (``backward()`` works and yields zero gradients) rather than ``NaN``: a 0/0 mean would poison
  the weights through one empty crop, and skipping ``backward()`` on one DDP rank would hang the
  others at the gradient all-reduce.

Masks are applied with ``torch.where``/multiplication rather than boolean indexing so that a
step never synchronises with the host and never copies the logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sarcube.classes import IGNORE_INDEX, focal_alpha

# Paper defaults (arXiv 2601.15705 §II-C).
ALPHA_SCALE = 2.25
GAMMA = 1.1
LAMBDA_FOCAL = 0.57
LAMBDA_DICE = 0.32
FOCAL_EPS = 1e-8
# Dice smoothing. The paper only says ε > 0. We use 1.0 (the classic "smooth = 1"): sums run over
# a whole batch (≈10^5-10^6 valid pixels), so ε = 1 moves the score of a present class by < 1e-4,
# while a class absent from the batch (frequent for solar panel / greenhouse, ~0.2 % of pixels)
# scores ε/(Σp + ε) = 1/(Σp + 1): a smooth push towards predicting less of it. With ε = 1e-6 that
# class would score ≈ 0 whatever the model does, adding a constant 1/K to the loss with a
# vanishing gradient (-ε/Σp²).
DICE_EPS = 1.0


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 stays float64 (for gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def _check_seg_inputs(logits: Tensor, target: Tensor) -> None:
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, K, H, W), got shape {tuple(logits.shape)}")
    b, _, h, w = logits.shape
    if tuple(target.shape) != (b, h, w):
        raise ValueError(
            f"target must be (B, H, W) = {(b, h, w)} to match logits {tuple(logits.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if target.is_floating_point():
        raise TypeError(f"target must hold integer class ids, got dtype {target.dtype}")


def _valid_and_labels(target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(valid mask (B, H, W) bool, labels (B, H, W) long with ignored pixels set to class 0)."""
    target = target.long()
    valid = target != ignore_index
    # Class 0 is a placeholder so that gather/one-hot stay in range; masked out afterwards.
    return valid, torch.where(valid, target, torch.zeros_like(target))


def alpha_from_frequencies(
    freqs: Sequence[float] | np.ndarray | Tensor, atol: float = 1e-4
) -> Tensor:
    """Class weights α of eq. 1 as a tensor: :func:`sarcube.classes.focal_alpha` (the formula).

    Args:
        freqs: ``(K,)`` pixel frequency of each class in the train split (non-negative, sum 1,
            K ≥ 2). Pass frequencies, not counts: normalise counts with ``counts / counts.sum()``.
        atol: tolerance on ``|Σ f − 1|``.

    Returns:
        ``(K,)`` float32 tensor summing to 1 (e.g. f = (0.5, 0.3, 0.2) → α = (0.25, 0.35, 0.4)).
    """
    if torch.is_tensor(freqs):
        freqs = freqs.detach().to(device="cpu", dtype=torch.float64).numpy()
    return torch.from_numpy(focal_alpha(freqs, atol)).to(torch.float32)


def focal_loss(
    logits: Tensor,
    target: Tensor,
    alpha: Tensor,
    gamma: float = GAMMA,
    alpha_scale: float = ALPHA_SCALE,
    ignore_index: int = IGNORE_INDEX,
    eps: float = FOCAL_EPS,
) -> Tensor:
    """α-scaled focal loss (eq. 2), mean over the valid pixels of the batch.

    L = (1/N) Σ_{valid n} −α_scale · α_{y_n} · (1 − p_t,n)^γ · log(p_t,n + ε), where p_t,n is the
    softmax probability of the true class and N the number of valid (non-ignored) pixels.

    Args:
        logits: ``(B, K, H, W)`` float.
        target: ``(B, H, W)`` integer, values in ``[0, K)`` or ``ignore_index``.
        alpha: ``(K,)`` class weights (see :func:`alpha_from_frequencies`).
        gamma: focusing exponent γ (may be non-integer; the paper uses 1.1).
        alpha_scale: global factor on α (2.25 in the paper; 1.0 turns the tempering off).
        ignore_index: label of pixels left out.
        eps: ε inside the log, as in the paper. ``eps=0`` uses the exact log-softmax instead.

    Returns:
        0-d tensor; ``0`` (with grad) when every pixel is ignored.
    """
    _check_seg_inputs(logits, target)
    k = logits.shape[1]
    if alpha.shape != (k,):
        raise ValueError(f"alpha must have shape ({k},) to match logits, got {tuple(alpha.shape)}")
    valid, labels = _valid_and_labels(target, ignore_index)
    logp = F.log_softmax(logits.to(_compute_dtype(logits)), dim=1)
    logp_t = logp.gather(1, labels.unsqueeze(1)).squeeze(1)  # (B, H, W)
    p_t = logp_t.exp()
    log_term = logp_t if eps == 0 else torch.log(p_t + eps)
    alpha_t = alpha.to(device=logp.device, dtype=logp.dtype)[labels]
    # clamp: 1 - p_t can round to a hair below 0, and a negative base ** 1.1 is NaN.
    per_pixel = -alpha_scale * alpha_t * (1.0 - p_t).clamp_min(0.0).pow(gamma) * log_term
    per_pixel = torch.where(valid, per_pixel, torch.zeros_like(per_pixel))
    return per_pixel.sum() / valid.sum().clamp_min(1)


def dice_loss(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = IGNORE_INDEX,
    eps: float = DICE_EPS,
) -> Tensor:
    """Multi-class soft dice loss (eq. 3) over the valid pixels of the batch.

    L = 1 − (1/K) Σ_k (2 Σ_n p_nk g_nk + ε) / (Σ_n p_nk + Σ_n g_nk + ε), with p the softmax
    probabilities, g the one-hot labels and n running over valid pixels only (an ignored pixel
    adds to neither Σp nor Σg). All K classes are averaged, including classes absent from the
    batch (for which the score is ε / (Σp + ε)).

    Args:
        logits: ``(B, K, H, W)`` float.
        target: ``(B, H, W)`` integer, values in ``[0, K)`` or ``ignore_index``.
        ignore_index: label of pixels left out.
        eps: smoothing ε > 0 (default 1.0; see ``DICE_EPS`` for why).

    Returns:
        0-d tensor in [0, 1]; ``0`` (with grad) when every pixel is ignored (each class scores
        ε/ε = 1).
    """
    _check_seg_inputs(logits, target)
    if eps <= 0:
        raise ValueError(f"dice eps must be > 0 (0/0 for classes absent from the batch), got {eps}")
    k = logits.shape[1]
    valid, labels = _valid_and_labels(target, ignore_index)
    mask = valid.unsqueeze(1).to(_compute_dtype(logits))  # (B, 1, H, W)
    p = F.softmax(logits.to(mask.dtype), dim=1) * mask
    classes = torch.arange(k, device=labels.device).view(1, k, 1, 1)
    g = (labels.unsqueeze(1) == classes).to(mask.dtype) * mask
    dims = (0, 2, 3)
    inter = (p * g).sum(dims)
    score = (2.0 * inter + eps) / (p.sum(dims) + g.sum(dims) + eps)  # (K,)
    return 1.0 - score.mean()


def focal_dice_loss(
    logits: Tensor,
    target: Tensor,
    alpha: Tensor,
    lambda_focal: float = LAMBDA_FOCAL,
    lambda_dice: float = LAMBDA_DICE,
    gamma: float = GAMMA,
    alpha_scale: float = ALPHA_SCALE,
    ignore_index: int = IGNORE_INDEX,
    focal_eps: float = FOCAL_EPS,
    dice_eps: float = DICE_EPS,
) -> Tensor:
    """The fine-tuning objective (eq. 4): λ_focal · L_focal + λ_dice · L_dice.

    Defaults are the paper's (λ_focal 0.57, λ_dice 0.32, γ 1.1, α_scale 2.25). Shapes as in
    :func:`focal_loss`. Returns a 0-d tensor (0 with grad for an all-ignored batch).
    """
    lf = focal_loss(logits, target, alpha, gamma, alpha_scale, ignore_index, focal_eps)
    ld = dice_loss(logits, target, ignore_index, dice_eps)
    return lambda_focal * lf + lambda_dice * ld


def cross_entropy_loss(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Plain (optionally class-weighted) cross-entropy baseline.

    Same value as ``F.cross_entropy(..., ignore_index=ignore_index)`` (weighted mean
    Σ w_y·CE / Σ w_y over valid pixels), except that an all-ignored batch gives 0 with grad
    instead of NaN.

    Args:
        logits: ``(B, K, H, W)`` float.
        target: ``(B, H, W)`` integer, values in ``[0, K)`` or ``ignore_index``.
        weight: optional ``(K,)`` class weights.
        ignore_index: label of pixels left out.
        label_smoothing: as in ``F.cross_entropy``.
    """
    _check_seg_inputs(logits, target)
    x = logits.to(_compute_dtype(logits))
    valid, labels = _valid_and_labels(target, ignore_index)
    if weight is not None:
        weight = weight.to(device=x.device, dtype=x.dtype)
    # reduction="sum" + our own denominator: PyTorch's "mean" is 0/0 = NaN with no valid pixel.
    total = F.cross_entropy(
        x,
        target.long(),
        weight=weight,
        ignore_index=ignore_index,
        reduction="sum",
        label_smoothing=label_smoothing,
    )
    if weight is None:
        denom = valid.sum().to(x.dtype)
    else:
        denom = (weight[labels] * valid).sum()
    return total / denom.clamp_min(torch.finfo(x.dtype).tiny)


def water_loss(
    logit: Tensor,
    target: Tensor,
    lambda_dice: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    dice_eps: float = DICE_EPS,
    pos_weight: float | None = None,
) -> Tensor:
    """Binary water objective: BCE-with-logits + λ_dice · soft dice of the water class.

    L = (1/N) Σ_valid BCE(z_n, y_n) + λ_dice · (1 − (2 Σ p·y + ε) / (Σ p + Σ y + ε)), with
    p = sigmoid(z) and all sums over the N valid pixels of the batch.

    Args:
        logit: ``(B, 1, H, W)`` float, one logit per pixel (water vs. not water).
        target: ``(B, H, W)`` integer: 1 water, 0 not water, ``ignore_index`` no data.
        lambda_dice: weight of the dice term (1.0 in the paper).
        ignore_index: label of pixels left out.
        dice_eps: dice smoothing ε > 0.
        pos_weight: optional BCE weight of positive pixels (not used by the paper).

    Returns:
        0-d tensor; ``0`` (with grad) when every pixel is ignored.
    """
    if logit.ndim != 4 or logit.shape[1] != 1:
        raise ValueError(f"logit must be (B, 1, H, W), got {tuple(logit.shape)}")
    b, _, h, w = logit.shape
    if tuple(target.shape) != (b, h, w):
        raise ValueError(f"target must be (B, H, W) = {(b, h, w)}, got {tuple(target.shape)}")
    if dice_eps <= 0:
        raise ValueError(f"dice_eps must be > 0, got {dice_eps}")
    z = logit[:, 0].to(_compute_dtype(logit))
    valid, labels = _valid_and_labels(target, ignore_index)
    mask = valid.to(z.dtype)
    y = labels.to(z.dtype)
    pw = None if pos_weight is None else torch.tensor(pos_weight, dtype=z.dtype, device=z.device)
    bce = F.binary_cross_entropy_with_logits(z, y, reduction="none", pos_weight=pw)
    bce = torch.where(valid, bce, torch.zeros_like(bce)).sum() / valid.sum().clamp_min(1)
    p = torch.sigmoid(z) * mask
    y = y * mask
    dice = 1.0 - (2.0 * (p * y).sum() + dice_eps) / (p.sum() + y.sum() + dice_eps)
    return bce + lambda_dice * dice


class FocalDiceLoss(nn.Module):
    """Module form of :func:`focal_dice_loss`; α is a buffer so it follows ``.to(device)``.

    Give either ``alpha`` (K weights) or ``class_freqs`` (train-split pixel frequencies, turned
    into α by :func:`alpha_from_frequencies`).
    """

    alpha: Tensor  # a buffer (declared for the type checker: nn.Module.__getattr__ is untyped)

    def __init__(
        self,
        alpha: Sequence[float] | Tensor | None = None,
        class_freqs: Sequence[float] | np.ndarray | Tensor | None = None,
        lambda_focal: float = LAMBDA_FOCAL,
        lambda_dice: float = LAMBDA_DICE,
        gamma: float = GAMMA,
        alpha_scale: float = ALPHA_SCALE,
        ignore_index: int = IGNORE_INDEX,
        focal_eps: float = FOCAL_EPS,
        dice_eps: float = DICE_EPS,
    ) -> None:
        super().__init__()
        if (alpha is None) == (class_freqs is None):
            raise ValueError("FocalDiceLoss needs exactly one of `alpha` or `class_freqs`")
        a = torch.as_tensor(alpha) if class_freqs is None else alpha_from_frequencies(class_freqs)
        self.register_buffer("alpha", a.detach().clone().to(torch.float32))
        self.lambda_focal, self.lambda_dice = lambda_focal, lambda_dice
        self.gamma, self.alpha_scale = gamma, alpha_scale
        self.ignore_index, self.focal_eps, self.dice_eps = ignore_index, focal_eps, dice_eps

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return focal_dice_loss(
            logits,
            target,
            self.alpha,
            self.lambda_focal,
            self.lambda_dice,
            self.gamma,
            self.alpha_scale,
            self.ignore_index,
            self.focal_eps,
            self.dice_eps,
        )

    def extra_repr(self) -> str:
        return (
            f"lambda_focal={self.lambda_focal}, lambda_dice={self.lambda_dice}, "
            f"gamma={self.gamma}, alpha_scale={self.alpha_scale}, dice_eps={self.dice_eps}"
        )


class CELoss(nn.Module):
    """Module form of :func:`cross_entropy_loss` (optional ``weight`` kept as a buffer)."""

    weight: Tensor | None  # a buffer (declared for the type checker)

    def __init__(
        self,
        weight: Sequence[float] | Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        w = None if weight is None else torch.as_tensor(weight, dtype=torch.float32)
        self.register_buffer("weight", w)
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return cross_entropy_loss(
            logits, target, self.weight, self.ignore_index, self.label_smoothing
        )


class WaterLoss(nn.Module):
    """Module form of :func:`water_loss`."""

    def __init__(
        self,
        lambda_dice: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        dice_eps: float = DICE_EPS,
        pos_weight: float | None = None,
    ) -> None:
        super().__init__()
        self.lambda_dice, self.ignore_index = lambda_dice, ignore_index
        self.dice_eps, self.pos_weight = dice_eps, pos_weight

    def forward(self, logit: Tensor, target: Tensor) -> Tensor:
        return water_loss(
            logit, target, self.lambda_dice, self.ignore_index, self.dice_eps, self.pos_weight
        )
