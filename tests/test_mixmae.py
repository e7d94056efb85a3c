"""MixMAE / SAR-W-MixMAE model: shapes, shift-free Swin, image isolation at every stage,
loss wiring, overfitting, export into SwinEncoder, the reconstruction figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

from training.mixing import (
    mask_to_grid,
    mix_pairs,
    mixmae_mask,
    patchify,
    plot_mixmae_reconstruction,
    unmix_reconstruction,
)
from training.models import load_encoder_weights, swin_base, swin_tiny
from training.models.mixmae import (
    MixMAE,
    isolation_attn_mask,
    mixmae_base,
    mixmae_tiny,
    window_attention_block,
)
from training.sar_weight import sar_intensity_weight


def _model(seed: int = 0, **kwargs) -> MixMAE:
    torch.manual_seed(seed)
    return mixmae_tiny(**kwargs)


def _mask(seed: int = 0) -> torch.Tensor:
    return mixmae_mask(256, 32, 0.5, generator=torch.Generator().manual_seed(seed))


def _sources(mask: torch.Tensor, batch: int, size: int) -> torch.Tensor:
    """(B, size, size): index of the original image behind each token/pixel of the mixed batch."""
    m = mask_to_grid(mask, size)
    own = torch.arange(batch)[:, None, None]
    return torch.where(m, batch - 1 - own, own)


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


def _np_loss(x, pred_dual, mask_l, weight=None):
    """Independent numpy SAR-W-MixMAE loss (float64, per-patch normalised targets, 32-px
    patches)."""
    p = 32
    b, c, h, _ = x.shape
    g = h // p

    def patches(a):  # (B, C, H, W) -> (B, L, p*p*C), pixel-major with channel last
        a = a.astype(np.float64).reshape(b, c, g, p, g, p).transpose(0, 2, 4, 3, 5, 1)
        return a.reshape(b, g * g, p * p * c)

    t = patches(x)
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
    pa, pb = pred_dual[:b].astype(np.float64), pred_dual[b:].astype(np.float64)
    u = np.stack([np.where(mask_l[:, None], pa[i], pb[b - 1 - i]) for i in range(b)])
    wt = 1.0 if weight is None else patches(np.broadcast_to(weight, x.shape))
    return float(np.mean(wt * (u - t) ** 2))


@pytest.fixture(scope="module")
def tiny() -> MixMAE:
    return _model().eval()


# -- structure -------------------------------------------------------------------------------------


def test_forward_shapes_and_structure(tiny):
    x = torch.randn(4, 1, 256, 256)
    with torch.no_grad():
        loss, pred, mask = tiny(x)
        z = tiny.forward_encoder(x, mask)
        dual = tiny.forward_decoder(z, mask)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (4, 64, 32 * 32 * 1)
    assert mask.shape == (8, 8) and mask.dtype == torch.bool and int(mask.sum()) == 32
    assert z.shape == (4, 64, 256) and dual.shape == (8, 64, 1024)
    # shift-free Swin, windows 8 (the 8x8 last stage is one window: global attention)
    blocks = [b for st in tiny.encoder.layers for b in st.blocks]
    assert all(b.shift_size == (0, 0) and b.attn_mask is None for b in blocks)
    assert [b.window_size for b in blocks] == [(8, 8)] * 5
    assert tiny.stage_grids == [64, 32, 16, 8]
    # fixed sin-cos APE inside the SwinEncoder parameter, frozen; decoder positions fixed too
    ape = tiny.encoder.absolute_pos_embed
    assert not ape.requires_grad
    torch.testing.assert_close(ape.detach(), build_sincos2d_pos_embed([64, 64], 32)[None])
    torch.testing.assert_close(tiny.decoder_pos_embed, build_sincos2d_pos_embed([8, 8], 64)[None])
    assert "decoder_pos_embed" not in tiny.state_dict()
    assert {"mask_token", "encoder.absolute_pos_embed"} <= tiny.no_weight_decay()
    assert any("relative_position_bias_table" in n for n in tiny.no_weight_decay())


def test_small_image_stages_attend_globally():
    m = _model(img_size=128)  # grids 32/16/8/4: the 4x4 last stage gets a 4x4 window
    assert [st.blocks[0].window_size for st in m.encoder.layers] == [(8, 8), (8, 8), (8, 8), (4, 4)]
    with torch.no_grad():
        loss, pred, mask = m(torch.randn(2, 1, 128, 128))
    assert pred.shape == (2, 16, 1024) and mask.shape == (4, 4) and torch.isfinite(loss)


def test_invalid_configuration():
    with pytest.raises(ValueError, match="mask_unit"):
        mixmae_tiny(mask_unit=16)
    with pytest.raises(ValueError, match="weight_domain"):
        mixmae_tiny(weight_domain="linear")


def test_isolation_attn_mask_layout():
    m = _mask(4)
    tok = mask_to_grid(m, 16)  # stage-2 grid
    am = isolation_attn_mask(tok, (8, 8))
    assert am.shape == (4, 64, 64)
    for w in range(4):
        r0, c0 = (w // 2) * 8, (w % 2) * 8  # timm window order: row-major over windows
        flat = tok[r0 : r0 + 8, c0 : c0 + 8].reshape(64)
        same = flat[:, None] == flat[None, :]
        assert torch.equal(am[w] == 0, same)
        assert torch.isneginf(am[w][~same]).all()
    assert (torch.diagonal(am, dim1=1, dim2=2) == 0).all()


def test_hand_written_block_matches_timm():
    m = _model().eval()
    blk = m.encoder.layers[2].blocks[1]  # a block that was shifted in swin_tiny, shift removed
    h = torch.randn(2, 16, 16, blk.norm1.normalized_shape[0])
    with torch.no_grad():
        torch.testing.assert_close(window_attention_block(blk, h), blk(h), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="shifted"):
        window_attention_block(swin_tiny().layers[2].blocks[1], h)
    # with nothing mixed (m = 0) the MixMAE encoder is exactly timm's (shift-free) Swin path
    x = torch.randn(2, 1, 256, 256)
    zero = torch.zeros(8, 8, dtype=torch.bool)
    with torch.no_grad():
        ours = m.forward_encoder(x, zero)  # (B, L, C3)
        ref = m.encoder.forward_features(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# -- (a) isolation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("window_size", [8, (16, 16, 16, 8)])
def test_isolation_autograd_every_stage(window_size):
    """Output tokens that came from image k have zero gradient w.r.t. every pixel of every other
    image, at the embedding and at each stage output (so across the three patch mergings)."""
    model = _model(seed=1, window_size=window_size).eval()
    batch = 4
    mask = _mask(1)
    x = torch.randn(batch, 1, 256, 256, requires_grad=True)
    outs = model.forward_encoder_intermediates(x, mask)
    assert [tuple(o.shape[1:3]) for o in outs] == [(64, 64), (64, 64), (32, 32), (16, 16), (8, 8)]
    gen = torch.Generator().manual_seed(0)
    for h in outs:
        src = _sources(mask, batch, h.shape[1])  # (B, G, G)
        for k in (0, batch - 1):  # both images of the mixed pair (0, 3)
            sel = (src == k)[..., None].to(h.dtype)
            probe = torch.randn(h.shape, generator=gen)
            (g,) = torch.autograd.grad((h * sel * probe).sum(), x, retain_graph=True)
            others = [j for j in range(batch) if j != k]
            assert torch.count_nonzero(g[others]) == 0, (
                f"leak from other images at grid {h.shape[1]}"
            )
            assert g[k].abs().sum() > 0

    # the check has power: without the isolation masks the images do leak into each other
    # (stage 1: its 8x8-token windows span 2x2 mask units; stage-0 windows lie inside one unit)
    if window_size == 8:
        assert model.stage_attn_masks(mask)[0] is None
        assert all(am is not None for am in model.stage_attn_masks(mask)[1:])
    model.stage_attn_masks = lambda mask, dtype=torch.float32: [None] * 4
    h = model.forward_encoder_intermediates(x, mask)[2]
    src = _sources(mask, batch, 32)
    (g,) = torch.autograd.grad((h * (src == 0)[..., None]).sum(), x)
    assert torch.count_nonzero(g[1:]) > 0


def test_isolation_finite_difference_every_stage():
    """Perturbing every pixel of image 1 changes the stage outputs of image 1's tokens only."""
    model = _model(seed=2).eval()
    batch = 4
    mask = _mask(2)
    x = torch.randn(batch, 1, 256, 256)
    x2 = x.clone()
    x2[1] += 3.0 * torch.randn(1, 256, 256)
    with torch.no_grad():
        before = model.forward_encoder_intermediates(x, mask)
        after = model.forward_encoder_intermediates(x2, mask)
    for h0, h1 in zip(before, after, strict=True):
        src = _sources(mask, batch, h0.shape[1])
        torch.testing.assert_close(h1[src != 1], h0[src != 1], rtol=0, atol=1e-6)
        assert (h1[src == 1] - h0[src == 1]).abs().amax(-1).min() > 1e-4  # every token moved


def test_predictions_never_see_the_pixels_they_predict():
    """Unmixed prediction of image i at positions with m = a depends only on image i's pixels with
    m = 1 - a (through the full encoder and the dual-branch decoder)."""
    model = _model(seed=3).eval()
    batch, i = 4, 1
    mask = _mask(3)
    m_l = mask.flatten()
    mpx = mask_to_grid(mask, 256)
    x = torch.randn(batch, 1, 256, 256, requires_grad=True)
    _, pred, _ = model(x, mask=mask)
    for a in (False, True):
        (g,) = torch.autograd.grad(pred[i, m_l == a].sum(), x, retain_graph=True)
        allowed = torch.zeros_like(g, dtype=torch.bool)
        allowed[i, 0] = mpx != a
        assert torch.count_nonzero(g[~allowed]) == 0
        assert torch.count_nonzero(g[allowed]) > 0


# -- (b) unmixing through the model's decoder ------------------------------------------------------


def test_identity_decoder_unmixes_to_the_targets():
    """The model's decoder with identity layers (decoder width = 32^2 C, no blocks, zero positions,
    NaN mask token) fed the patchified mixed batch: the visible-side unmix is the targets exactly
    and every loss-side value is a mask token."""
    model = _model(decoder_dim=1024, decoder_depth=0, decoder_heads=1, norm_pix_loss=False).eval()
    model.decoder_embed = model.decoder_norm = model.decoder_pred = torch.nn.Identity()
    model.decoder_pos_embed.zero_()
    model.mask_token.data.fill_(float("nan"))
    x = torch.randn(4, 1, 256, 256)
    mask = _mask(8)
    m_l = mask.flatten()
    z = patchify(mix_pairs(x, mask_to_grid(mask, 256)), 32)  # identity "encoder"
    with torch.no_grad():
        dual = model.forward_decoder(z, mask)
    assert torch.equal(unmix_reconstruction(dual, m_l, take="visible"), model.targets(x))
    assert torch.isnan(unmix_reconstruction(dual, m_l)).all()
    assert int(mask.sum()) == 32  # ratio 0.5 of the 64 units, exactly


# -- (c) loss wiring -------------------------------------------------------------------------------


@pytest.mark.parametrize("with_weight", [False, True])
def test_forward_loss_matches_numpy(with_weight):
    model = _model(seed=4).eval()
    x_db, x = _sar_batch(4, seed=1)
    w = model.sar_weight(x_db) if with_weight else None
    mask = _mask(5)
    captured = {}
    decode = model.forward_decoder
    model.forward_decoder = lambda z, m: captured.setdefault("dual", decode(z, m))
    with torch.no_grad():
        loss, _, _ = model(x, weight=w, mask=mask)
    ref = _np_loss(
        x.numpy(),
        captured["dual"].numpy(),
        mask.flatten().numpy(),
        None if w is None else w.numpy(),
    )
    np.testing.assert_allclose(loss.item(), ref, rtol=1e-5)


def test_sar_weight_domains_and_ones():
    x_db, x = _sar_batch(2)
    torch.testing.assert_close(_model().sar_weight(x_db), sar_intensity_weight(x_db))
    m = _model(weight_domain="normalized", weight_k=2.0)
    torch.testing.assert_close(m.sar_weight(x), sar_intensity_weight(x, k=2.0, domain="normalized"))
    mask = _mask(0)
    with torch.no_grad():
        plain = m(x, mask=mask)[0]
        ones = m(x, weight=torch.ones(2, 1, 1, 1), mask=mask)[0]  # broadcastable weight
    torch.testing.assert_close(plain, ones)


def test_grad_checkpointing_is_equivalent():
    x = torch.randn(2, 1, 256, 256)
    mask = _mask(6)
    grads = []
    for ckpt in (False, True):
        m = _model(seed=5)
        m.set_grad_checkpointing(ckpt)
        loss, _, _ = m(x, mask=mask)
        loss.backward()
        grads.append((loss.detach(), m.encoder.layers[0].blocks[0].attn.qkv.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)


# -- (d) overfit -----------------------------------------------------------------------------------


def test_overfits_one_batch_with_sar_weight():
    model = _model(seed=6)
    x_db, x = _sar_batch(2, seed=2)
    w = model.sar_weight(x_db)
    mask = _mask(7)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(30):
        loss, _, _ = model(x, weight=w, mask=mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.95 * losses[0], losses


# -- (e) export ------------------------------------------------------------------------------------


def test_encoder_loads_strictly_into_swin_tiny():
    model = _model(seed=7)
    sd = model.encoder.state_dict()
    assert not any(k.startswith(("decoder", "mask_token")) for k in sd)
    enc = swin_tiny()
    assert set(sd) == set(enc.state_dict())
    enc.load_state_dict(sd, strict=True)
    torch.testing.assert_close(enc.absolute_pos_embed.detach(), sd["absolute_pos_embed"])
    assert enc.absolute_pos_embed.requires_grad  # learnable again in fine-tuning
    for k, v in enc.state_dict().items():
        assert torch.equal(v, sd[k]), k
    with torch.no_grad():  # the loaded encoder runs (with its own shifted windows)
        assert enc(torch.randn(1, 1, 256, 256)).shape == (1, 256, 8, 8)


def test_whole_checkpoint_loads_with_the_fine_tuning_loader(tmp_path):
    model = _model(seed=8)
    path = tmp_path / "mixmae.pth"
    torch.save({"model": model.state_dict(), "epoch": 1}, path)
    enc = swin_tiny()
    report = load_encoder_weights(enc, path, source="SAR-W-MixMAE test")
    assert "absolute_pos_embed" in report.loaded
    assert "mask_token" in report.ignored and any(k.startswith("decoder_") for k in report.ignored)
    torch.testing.assert_close(enc.absolute_pos_embed, model.encoder.absolute_pos_embed)


def test_other_window_sizes_export_to_matching_swin():
    model = _model(window_size=(16, 16, 16, 8))  # MixMAE-paper-like: global stages 2 and 3
    assert [st.blocks[0].window_size for st in model.encoder.layers] == [(16, 16)] * 3 + [(8, 8)]
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 1, 256, 256))[0])
    swin_tiny(window_size=(16, 16, 16, 8)).load_state_dict(model.encoder.state_dict(), strict=True)
    with pytest.raises(RuntimeError, match="size mismatch"):
        swin_tiny().load_state_dict(model.encoder.state_dict(), strict=True)


def test_mixmae_base_sizes_and_export():
    """Swin-B MixMAE is constructible on CPU (no forward) and exports into swin_base()."""
    model = mixmae_base()
    enc = model.encoder
    assert enc.num_features == [128, 256, 512, 1024] and enc.depths == (2, 2, 18, 2)
    assert [st.blocks[0].attn.num_heads for st in enc.layers] == [4, 8, 16, 32]
    assert all(b.shift_size == (0, 0) for st in enc.layers for b in st.blocks)
    assert model.decoder_embed.in_features == 1024 and model.decoder_embed.out_features == 512
    assert len(model.decoder_blocks) == 8
    assert model.decoder_blocks[0].attn.num_heads == 16
    assert model.decoder_pred.out_features == 32 * 32 * 1
    assert model.mask_ratio == 0.5 and model.mask_unit == 32 and model.norm_pix_loss
    swin_base().load_state_dict(enc.state_dict(), strict=True)


# -- figure ----------------------------------------------------------------------------------------


def test_reconstruction_figure_from_model(tmp_path, tiny):
    x = torch.randn(4, 1, 256, 256)
    with torch.no_grad():
        _, pred, mask = tiny(x)
    x_pair, mixed, recon_pair = tiny.figure_pair(x, pred, mask, i=1)
    assert x_pair.shape == (2, 1, 256, 256) and mixed.shape == (1, 256, 256)
    assert recon_pair.shape == (2, 1, 256, 256)
    assert torch.equal(x_pair[1], x[2])
    out = plot_mixmae_reconstruction(x_pair, mixed, recon_pair, tmp_path / "mixmae.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
