"""MixMAE mixing/unmixing/loss functions: exact masks and pairing, identity-model unmixing, the loss
against an independent numpy computation, and the reconstruction figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.mixing import (
    dual_mask_fill,
    mask_to_grid,
    mix_pairs,
    mixmae_loss,
    mixmae_mask,
    normalize_patches,
    patchify,
    plot_mixmae_reconstruction,
    unmix_reconstruction,
    unpatchify,
)

P = 32  # decoder patch = mask unit


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _np_patchify(x: np.ndarray, p: int = P) -> np.ndarray:
    """(B, C, H, W) -> (B, L, p*p*C), written independently of the torch einsum."""
    b, c, h, w = x.shape
    g_h, g_w = h // p, w // p
    out = np.empty((b, g_h * g_w, p * p * c), dtype=np.float64)
    for i in range(b):
        for r in range(g_h):
            for q in range(g_w):
                patch = x[i, :, r * p : (r + 1) * p, q * p : (q + 1) * p]  # (C, p, p)
                out[i, r * g_w + q] = np.moveaxis(patch, 0, -1).reshape(-1)  # pixel-major, C last
    return out


def _np_loss(x, pred_dual, mask_l, weight=None, norm_pix=True):
    """Independent numpy SAR-W-MixMAE loss (float64)."""
    t = _np_patchify(x.astype(np.float64))
    if norm_pix:
        t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
    b = x.shape[0]
    branch_a, branch_b = pred_dual[:b].astype(np.float64), pred_dual[b:].astype(np.float64)
    u = np.empty_like(t)
    for i in range(b):
        for n in range(t.shape[1]):
            # image i is masked in branch A of sample i where m = 1, and in branch B of its partner
            # sample B-1-i where m = 0
            u[i, n] = branch_a[i, n] if mask_l[n] else branch_b[b - 1 - i, n]
    w = 1.0 if weight is None else _np_patchify(np.broadcast_to(weight, x.shape).astype(np.float64))
    return float(np.mean(w * (u - t) ** 2))


# -- masks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ratio", "count"), [(0.5, 32), (0.25, 16), (0.0, 0), (1.0, 64)])
def test_mask_ratio_is_exact(ratio, count):
    for seed in range(5):
        m = mixmae_mask(256, 32, ratio, generator=_gen(seed))
        assert m.shape == (8, 8) and m.dtype == torch.bool
        assert int(m.sum()) == count


def test_mask_is_random_reproducible_and_ranges_work():
    a, b = mixmae_mask(generator=_gen(0)), mixmae_mask(generator=_gen(0))
    assert torch.equal(a, b)
    assert not torch.equal(a, mixmae_mask(generator=_gen(1)))
    counts = {int(mixmae_mask(ratio=(0.3, 0.7), generator=_gen(s)).sum()) for s in range(40)}
    assert min(counts) >= 20 and max(counts) <= 45 and len(counts) > 5
    with pytest.raises(ValueError):
        mixmae_mask(ratio=1.5)
    with pytest.raises(ValueError):
        mixmae_mask(ratio=(0.7, 0.3))
    with pytest.raises(ValueError):
        mixmae_mask(img_size=250, mask_unit=32)


def test_mask_to_grid_blocks():
    m = mixmae_mask(generator=_gen(3))
    for g in (8, 16, 32, 64, 256):
        up = mask_to_grid(m, g)
        s = g // 8
        assert up.shape == (g, g)
        assert torch.equal(
            up.view(8, s, 8, s).permute(0, 2, 1, 3), m[:, :, None, None].expand(8, 8, s, s)
        )
    with pytest.raises(ValueError):
        mask_to_grid(m, 12)


# -- mixing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [2, 4, 6])
def test_mix_pairs_pairing_is_exact_and_an_involution(batch):
    x = torch.randn(batch, 1, 256, 256)
    m = mixmae_mask(generator=_gen(batch))
    mpx = mask_to_grid(m, 256)  # (256, 256)
    mixed = mix_pairs(x, mpx)
    for i in range(batch):
        j = batch - 1 - i
        assert torch.equal(mixed[i, 0][~mpx], x[i, 0][~mpx])  # own image where m = 0
        assert torch.equal(mixed[i, 0][mpx], x[j, 0][mpx])  # partner B-1-i where m = 1
    assert torch.equal(mix_pairs(mixed, mpx), x)  # unmixing the inputs = mixing again
    # NHWC tokens with an (H, W, 1) mask: same pairing
    tok = torch.randn(batch, 64, 64, 8)
    mt = mask_to_grid(m, 64)
    tmix = mix_pairs(tok, mt[..., None])
    assert torch.equal(tmix[0][mt], tok[batch - 1][mt]) and torch.equal(tmix[0][~mt], tok[0][~mt])


def test_mix_pairs_odd_batch_keeps_middle_image():
    x = torch.randn(3, 1, 64, 64)
    m = mask_to_grid(mixmae_mask(64, 32, generator=_gen(0)), 64)
    assert torch.equal(mix_pairs(x, m)[1], x[1])


# -- patchify --------------------------------------------------------------------------------------


def test_patchify_layout_and_roundtrip():
    x = torch.randn(2, 3, 64, 96)
    t = patchify(x, 32)
    assert t.shape == (2, 6, 32 * 32 * 3)
    np.testing.assert_array_equal(t.numpy(), _np_patchify(x.numpy()).astype(np.float32))
    y = torch.randn(2, 3, 64, 64)
    assert torch.equal(unpatchify(patchify(y, 32), 32, 3), y)


def test_normalize_patches_matches_numpy():
    t = torch.randn(2, 5, 1024) * 3 + 1
    n, mean, std = normalize_patches(t)
    a = t.numpy().astype(np.float64)
    ref = (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(n.numpy(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(n * std + mean, t)


# -- unmixing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [2, 4])
def test_identity_model_unmixes_to_the_targets_exactly(batch):
    """An identity "model" (decoder output = its input tokens) applied to the patchified mixed
    batch: the visible-side unmix is the targets bit for bit, and the loss side (take="masked")
    consists only of mask tokens, i.e. no loss position was visible to the branch predicting it."""
    x = torch.randn(batch, 2, 256, 256)
    m = mixmae_mask(generator=_gen(7))
    mixed = mix_pairs(x, mask_to_grid(m, 256))
    tokens = patchify(mixed, P)  # "encoder output" (B, L, P)
    m_l = m.flatten()
    nan_token = torch.full((tokens.shape[-1],), float("nan"))
    dual = dual_mask_fill(tokens, m_l, nan_token)  # identity decoder
    assert dual.shape == (2 * batch, 64, P * P * 2)
    target = patchify(x, P)
    assert torch.equal(unmix_reconstruction(dual, m_l, take="visible"), target)
    assert torch.isnan(unmix_reconstruction(dual, m_l)).all()
    # a perfect model: branch A of sample i outputs image i, branch B outputs image B-1-i
    oracle = torch.cat([target, target.flip(0)], dim=0)
    assert torch.equal(unmix_reconstruction(oracle, m_l), target)
    assert mixmae_loss(unmix_reconstruction(oracle, m_l), target).item() == 0.0


def test_dual_mask_fill_branches_are_complementary():
    tok = torch.randn(4, 64, 16)
    m = mixmae_mask(generator=_gen(2)).flatten()
    token = torch.randn(1, 1, 16)
    dual = dual_mask_fill(tok, m, token)
    a, b = dual[:4], dual[4:]
    assert torch.equal(a[:, ~m], tok[:, ~m]) and torch.equal(b[:, m], tok[:, m])
    assert (a[:, m] == token.view(16)).all() and (b[:, ~m] == token.view(16)).all()
    with pytest.raises(ValueError):
        dual_mask_fill(tok, m[:10], token)


# -- loss ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_numpy(with_weight, norm_pix):
    rng = np.random.default_rng(0)
    batch, c = 4, 1
    x = rng.normal(size=(batch, c, 256, 256)).astype(np.float32) * 2 + 0.5
    pred_dual = rng.normal(size=(2 * batch, 64, P * P * c)).astype(np.float32)
    w = np.exp(rng.uniform(size=(batch, 1, 256, 256))).astype(np.float32) if with_weight else None
    m = mixmae_mask(generator=_gen(5)).flatten()

    target = patchify(torch.from_numpy(x), P)
    if norm_pix:
        target = normalize_patches(target)[0]
    pred = unmix_reconstruction(torch.from_numpy(pred_dual), m)
    wt = None if w is None else patchify(torch.from_numpy(w), P)
    loss = mixmae_loss(pred, target, wt)
    ref = _np_loss(x, pred_dual, m.numpy(), w, norm_pix=norm_pix)
    assert loss.ndim == 0
    np.testing.assert_allclose(loss.item(), ref, rtol=1e-5)


def test_loss_weight_of_ones_is_plain_and_weight_has_no_grad():
    pred = torch.randn(2, 64, 1024, requires_grad=True)
    t = torch.randn(2, 64, 1024)
    w = torch.ones(2, 64, 1024, requires_grad=True)
    assert torch.equal(mixmae_loss(pred, t, w), mixmae_loss(pred, t))
    mixmae_loss(pred, t, w).backward()
    assert w.grad is None and pred.grad is not None
    with pytest.raises(ValueError):
        mixmae_loss(pred, t, torch.ones(2, 64, 1))


# -- figure ----------------------------------------------------------------------------------------


def test_plot_mixmae_reconstruction_writes_png(tmp_path):
    x = torch.randn(2, 1, 64, 64)
    m = mask_to_grid(mixmae_mask(64, 32, generator=_gen(0)), 64)
    mixed = mix_pairs(x, m)[0]
    out = plot_mixmae_reconstruction(
        x, mixed, x + 0.1 * torch.randn_like(x), tmp_path / "f" / "r.png"
    )
    assert out.exists() and out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # numpy (H, W) inputs work too
    arr = [a[0].numpy() for a in x]
    plot_mixmae_reconstruction(arr, mixed[0].numpy(), arr, tmp_path / "g.png")
    assert (tmp_path / "g.png").exists()
