"""Masked reconstruction loss: checked against an independent float64 NumPy evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.reconstruction import masked_reconstruction_loss


def _loss_ref(x, x_rec, mask_px, weight=None, kind="l1", delta=1.0):
    """sum(M * w * err) / (sum(M) + 1e-5) / C with explicit per-pixel error formulas (float64).

    ``mask_px`` is (B, 1, H, W): the denominator counts each masked image pixel once.
    """
    x, x_rec, m = (np.asarray(a, dtype=np.float64) for a in (x, x_rec, mask_px))
    d = x_rec - x
    if kind == "l1":
        err = np.abs(d)
    elif kind == "mse":
        err = d * d
    else:  # huber
        err = np.where(np.abs(d) <= delta, 0.5 * d * d, delta * (np.abs(d) - 0.5 * delta))
    w = (
        np.ones_like(x)
        if weight is None
        else np.broadcast_to(np.asarray(weight, np.float64), x.shape)
    )
    num = 0.0
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            num += np.sum(m[b, 0] * w[b, c] * err[b, c])
    return num / (m.sum() + 1e-5) / x.shape[1]


def _inputs(seed: int, channels: int):
    rng = np.random.default_rng(seed)
    shape = (3, channels, 16, 16)
    x = rng.normal(size=shape).astype(np.float32)
    x_rec = (x + rng.normal(scale=1.5, size=shape)).astype(np.float32)  # errors on both sides of 1
    mask = rng.random((3, 1, 16, 16)) < 0.6
    weight = rng.uniform(1.0, np.e, size=shape).astype(np.float32)
    return x, x_rec, mask, weight


@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("kind", ["l1", "mse", "huber"])
@pytest.mark.parametrize("use_weight", [False, True])
def test_matches_numpy(channels, kind, use_weight):
    x, x_rec, mask, weight = _inputs(channels * 10 + len(kind), channels)
    w = weight if use_weight else None
    loss = masked_reconstruction_loss(
        torch.from_numpy(x),
        torch.from_numpy(x_rec),
        torch.from_numpy(mask),
        None if w is None else torch.from_numpy(w),
        kind=kind,
        huber_delta=0.7,
    )
    assert loss.ndim == 0 and loss.dtype == torch.float32
    ref = _loss_ref(x, x_rec, mask, w, kind=kind, delta=0.7)
    assert loss.item() == pytest.approx(ref, rel=1e-5, abs=1e-5)


def test_hand_computed_example():
    # one image, C = 2, 2x2 pixels, two masked pixels, weights only on channel 1
    x = torch.zeros(1, 2, 2, 2)
    x_rec = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [0.0, 2.0]]]])
    mask = torch.tensor([[[[True, False], [False, True]]]])
    weight = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[3.0, 1.0], [1.0, 0.5]]]])
    # numerator: ch0 |1| + |4| = 5; ch1 3*|-1| + 0.5*|2| = 4  -> 9 / (2 + 1e-5) / 2
    loss = masked_reconstruction_loss(x, x_rec, mask, weight)
    assert loss.item() == pytest.approx(9 / (2 + 1e-5) / 2, rel=1e-6)
    # plain SimMIM (w = 1): ch1 gives 1 + 2 = 3 -> 8 / 2 / 2
    assert masked_reconstruction_loss(x, x_rec, mask).item() == pytest.approx(
        8 / (2 + 1e-5) / 2, rel=1e-6
    )


@pytest.mark.parametrize("kind", ["l1", "mse", "huber"])
def test_only_masked_pixels_count(kind):
    x, x_rec, mask, weight = _inputs(5, 2)
    xt, rt, mt, wt = map(torch.from_numpy, (x, x_rec, mask, weight))
    base = masked_reconstruction_loss(xt, rt, mt, wt, kind=kind)
    visible = ~mt.expand_as(rt)
    changed = rt.clone()
    changed[visible] += 100.0  # arbitrary garbage where the image was visible
    assert masked_reconstruction_loss(xt, changed, mt, wt, kind=kind).item() == base.item()
    changed = rt.clone()
    changed[~visible] += 1.0
    assert masked_reconstruction_loss(xt, changed, mt, wt, kind=kind).item() != base.item()
    # and no gradient reaches visible pixels
    rt_g = rt.clone().requires_grad_(True)
    masked_reconstruction_loss(xt, rt_g, mt, wt, kind=kind).backward()
    assert torch.all(rt_g.grad[visible] == 0)
    assert torch.any(rt_g.grad[~visible] != 0)


def test_mask_and_weight_layouts():
    x, x_rec, mask, weight = _inputs(6, 2)
    xt, rt, mt = map(torch.from_numpy, (x, x_rec, mask))
    w1 = torch.from_numpy(weight[:, :1])  # (B, 1, H, W) broadcasts over channels
    a = masked_reconstruction_loss(xt, rt, mt, w1)
    b = masked_reconstruction_loss(xt, rt, mt[:, 0], w1.expand(-1, 2, -1, -1))  # (B, H, W) mask
    c = masked_reconstruction_loss(xt, rt, mt.float(), w1)  # {0, 1} float mask
    assert a.item() == pytest.approx(b.item(), rel=1e-6) == pytest.approx(c.item(), rel=1e-6)
    assert a.item() == pytest.approx(_loss_ref(x, x_rec, mask, weight[:, :1]), rel=1e-5)


def test_empty_mask_gives_zero():
    x = torch.randn(2, 1, 8, 8)
    loss = masked_reconstruction_loss(x, x + 1, torch.zeros(2, 1, 8, 8, dtype=torch.bool))
    assert loss.item() == 0.0


def test_bad_inputs_raise():
    x = torch.zeros(2, 2, 8, 8)
    with pytest.raises(ValueError, match="mask_px"):
        masked_reconstruction_loss(x, x, torch.ones(2, 2, 8, 8))  # one channel required
    with pytest.raises(ValueError, match="equal shape"):
        masked_reconstruction_loss(x, x[:, :1], torch.ones(2, 1, 8, 8))
    with pytest.raises(ValueError, match="kind"):
        masked_reconstruction_loss(x, x, torch.ones(2, 1, 8, 8), kind="l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="broadcast"):
        masked_reconstruction_loss(x, x, torch.ones(2, 1, 8, 8), weight=torch.ones(2, 3, 8, 8))
