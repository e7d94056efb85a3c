"""SimMIM / SAR-W-SimMIM model: shapes, mask-token replacement, no leakage, loss wiring,
overfitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.masking import simmim_mask
from training.models import SimMIM, swin_tiny
from training.sar_weight import sar_intensity_weight


def _model(seed: int = 0, **kwargs) -> SimMIM:
    torch.manual_seed(seed)
    return SimMIM(swin_tiny(), encoder_stride=32, in_chans=1, **kwargs)


def _mask(batch: int, seed: int = 0, mask_unit: int = 16) -> torch.Tensor:
    return simmim_mask(batch, mask_unit=mask_unit, generator=torch.Generator().manual_seed(seed))


def _sar_batch(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_db, x_norm): a speckled two-region SAR scene in dB, and its z-score."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:256, 0:256]
    x_db = np.empty((batch, 1, 256, 256), np.float32)
    for b in range(batch):
        water = (xx + 40 * np.sin(yy / 30 + b)) < 128  # dark water on the left, brighter land
        level = np.where(water, -22.0, -8.0)
        x_db[b, 0] = level + 10 * np.log10(rng.gamma(4.0, 0.25, size=(256, 256)))
    x_db_t = torch.from_numpy(x_db)
    return x_db_t, (x_db_t - x_db_t.mean()) / x_db_t.std()


def _kron_mask(mask: torch.Tensor, p: int = 4) -> np.ndarray:
    return np.stack([np.kron(m, np.ones((p, p))) for m in mask.numpy().astype(np.float64)])[:, None]


def test_reconstruction_shape_and_parameters():
    model = _model()
    x = torch.randn(2, 1, 256, 256)
    loss, x_rec = model(x, _mask(2))
    assert x_rec.shape == (2, 1, 256, 256)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model.mask_token.shape == (1, 1, 1, 32)
    assert 0 < model.mask_token.abs().max().item() < 0.1  # trunc-normal std .02, not zeros
    assert model.decoder[0].out_channels == 32 * 32 * 1
    assert {"mask_token", "encoder.absolute_pos_embed"} <= model.no_weight_decay()
    # the mask token and decoder stay out of the exported encoder
    assert not any("mask_token" in k or "decoder" in k for k in model.encoder.state_dict())


def test_masked_tokens_are_the_mask_token_plus_pos_embed():
    model = _model().eval()
    x = torch.randn(2, 1, 256, 256)
    mask = _mask(2)
    captured = {}
    # capture what stage 0 actually receives during the SimMIM forward pass
    handle = model.encoder.layers[0].register_forward_pre_hook(
        lambda mod, args: captured.setdefault("tokens", args[0].detach().clone())
    )
    with torch.no_grad():
        model(x, mask)
        embedded = model.encoder.patch_embed(x)  # (B, 64, 64, C0) unmasked embedding
    handle.remove()
    tokens = captured["tokens"]  # (B, 64, 64, C0)
    ape = model.encoder.absolute_pos_embed.detach().view(64, 64, 32)
    token = model.mask_token.detach().view(32)
    for b in range(2):
        for i in range(64):
            for j in range(64):
                expected = (token if mask[b, i, j] else embedded[b, i, j]) + ape[i, j]
                torch.testing.assert_close(tokens[b, i, j], expected)


def test_masked_pixels_do_not_leak_into_the_encoder():
    model = _model().eval()
    x = torch.randn(2, 1, 256, 256)
    mask = _mask(2, seed=3)
    mask_px = torch.from_numpy(_kron_mask(mask) > 0)  # (B, 1, 256, 256)
    with torch.no_grad():
        z = model.forward_encoder(x, mask)
        x_masked_changed = torch.where(mask_px, torch.randn_like(x) * 5, x)
        z_masked = model.forward_encoder(x_masked_changed, mask)
        # one visible pixel changed
        b, _, i, j = torch.nonzero(~mask_px)[0].tolist()
        x_visible_changed = x.clone()
        x_visible_changed[b, 0, i, j] += 5.0
        z_visible = model.forward_encoder(x_visible_changed, mask)
    assert z.shape == (2, 256, 8, 8)
    torch.testing.assert_close(z_masked, z, rtol=0, atol=1e-6)
    assert (z_visible - z).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["l1", "mse", "huber"])
@pytest.mark.parametrize("weighted", [False, True])
def test_forward_loss_matches_numpy(kind, weighted):
    model = _model(loss=kind, huber_delta=0.5)
    x_db, x = _sar_batch(2, seed=1)
    mask = _mask(2, seed=1)
    weight = sar_intensity_weight(x_db) if weighted else None
    with torch.no_grad():
        loss, x_rec = model(x, mask, weight)
    xn, rn = x.double().numpy(), x_rec.double().numpy()
    d = rn - xn
    err = {
        "l1": np.abs(d),
        "mse": d**2,
        "huber": np.where(np.abs(d) <= 0.5, 0.5 * d**2, 0.5 * (np.abs(d) - 0.25)),
    }[kind]
    w = np.ones_like(xn) if weight is None else weight.double().numpy()
    m = _kron_mask(mask)  # (B, 1, H, W), the 4-px token mask at pixels
    ref = np.sum(m * w * err) / (m.sum() + 1e-5) / 1
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_loss_ignores_unmasked_pixels_of_the_reconstruction():
    model = _model()
    x = torch.randn(2, 1, 256, 256)
    mask = _mask(2, seed=2)
    mask_px = torch.from_numpy(_kron_mask(mask) > 0)
    with torch.no_grad():
        loss, x_rec = model(x, mask)
        tampered = torch.where(mask_px, x_rec, x_rec + 10.0)
        assert model.forward_loss(x, tampered, mask_px).item() == loss.item()
        tampered = torch.where(mask_px, x_rec + 0.1, x_rec)
        assert model.forward_loss(x, tampered, mask_px).item() != loss.item()


def test_sar_weight_changes_the_loss():
    model = _model()
    x_db, x = _sar_batch(2)
    mask = _mask(2)
    with torch.no_grad():
        plain, _ = model(x, mask)
        weighted, _ = model(x, mask, sar_intensity_weight(x_db))
    assert weighted.item() > plain.item()  # w >= 1 everywhere, and > 1 on the dark water


def test_mask_unit_32_and_gradients_reach_mask_token():
    model = _model()
    x = torch.randn(1, 1, 256, 256)
    loss, _ = model(x, _mask(1, mask_unit=32))
    loss.backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert model.encoder.absolute_pos_embed.grad.abs().sum() > 0


def test_overfits_one_fixed_batch():
    # 128 px keeps this fast on 2 busy cores (stage grids 32/16/8/4; timm shrinks the last window)
    torch.manual_seed(0)
    model = SimMIM(swin_tiny(img_size=128))
    x_db, x = _sar_batch(2, seed=0)
    x_db, x = x_db[..., :128, :128], x[..., :128, :128]
    mask = simmim_mask(2, img_size=128, generator=torch.Generator().manual_seed(0))
    weight = sar_intensity_weight(x_db)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    losses = []
    for _ in range(30):
        loss, _ = model(x, mask, weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3]), losses


def test_invalid_configuration_raises():
    with pytest.raises(ValueError, match="encoder_stride"):
        SimMIM(swin_tiny(), encoder_stride=16)
    with pytest.raises(ValueError, match="in_chans"):
        SimMIM(swin_tiny(), in_chans=2)
    with pytest.raises(ValueError, match="loss"):
        SimMIM(swin_tiny(), loss="l2")  # type: ignore[arg-type]
    model = _model()
    with pytest.raises(ValueError, match="token grid"):
        model(torch.randn(1, 1, 256, 256), torch.zeros(1, 16, 16, dtype=torch.bool))
