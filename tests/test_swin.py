"""Swin encoder: shapes, absolute position embedding, agreement with timm's own Swin, Swin-B
size."""

from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer

from training.models import SwinEncoder, swin_base, swin_tiny


@pytest.fixture(scope="module")
def tiny() -> SwinEncoder:
    torch.manual_seed(0)
    return swin_tiny().eval()


def test_tiny_intermediate_shapes_at_256(tiny):
    x = torch.randn(2, 1, 256, 256)
    with torch.no_grad():
        feats = tiny.forward_intermediates(x)
        final = tiny.forward_features(x)
    assert [tuple(f.shape) for f in feats] == [
        (2, 32, 64, 64),  # post patch embedding (+ APE), H/4
        (2, 32, 64, 64),  # stage 0, H/4
        (2, 64, 32, 32),  # stage 1, H/8
        (2, 128, 16, 16),  # stage 2, H/16
        (2, 256, 8, 8),  # stage 3, H/32
    ]
    assert all(f.is_contiguous() for f in feats)
    assert tuple(final.shape) == (2, 256, 8, 8)
    assert tiny.num_features == [32, 64, 128, 256]
    assert tiny.reductions == [4, 8, 16, 32]
    assert tiny.grid_size == (64, 64)
    # stage windows: 8 everywhere; the 8x8 last stage is one window without shift
    windows = [blk.window_size for stage in tiny.layers for blk in stage.blocks]
    assert windows == [(8, 8)] * 5
    assert tiny.layers[3].blocks[0].shift_size == (0, 0)
    assert tiny.layers[2].blocks[1].shift_size == (4, 4)  # stage 2 has a shifted-window block


def test_absolute_pos_embed_is_added_row_major(tiny):
    ape = tiny.absolute_pos_embed
    assert isinstance(ape, torch.nn.Parameter) and ape.shape == (1, 64 * 64, 32)
    assert 0.017 < ape.std().item() < 0.023  # trunc-normal, std .02
    x = torch.randn(1, 1, 256, 256)
    with torch.no_grad():
        embed = tiny.forward_intermediates(x)[0]  # (1, C0, 64, 64)
        pe = tiny.patch_embed(x)  # (1, 64, 64, C0) NHWC, timm's own output
    for i, j in [(0, 0), (0, 63), (5, 17), (63, 0), (63, 63)]:
        torch.testing.assert_close(embed[0, :, i, j], pe[0, i, j] + ape[0, i * 64 + j])


def test_state_dict_names(tiny):
    keys = list(tiny.state_dict())
    assert {k.split(".")[0] for k in keys} == {
        "patch_embed",
        "absolute_pos_embed",
        "layers",
        "norm",
    }
    for k in [
        "patch_embed.proj.weight",
        "patch_embed.norm.weight",
        "absolute_pos_embed",
        "layers.0.blocks.0.attn.relative_position_bias_table",
        "layers.1.downsample.reduction.weight",
        "layers.3.blocks.0.mlp.fc2.weight",
        "norm.weight",
    ]:
        assert k in keys, k
    assert "absolute_pos_embed" in tiny.no_weight_decay()
    assert "layers.0.blocks.0.attn.relative_position_bias_table" in tiny.no_weight_decay()
    no_ape = swin_tiny(absolute_pos_embed=False)
    assert no_ape.absolute_pos_embed is None and "absolute_pos_embed" not in no_ape.state_dict()


def test_stages_agree_with_timm_swin():
    """Without APE our stage outputs are timm's NHWC Swin intermediates, transposed to NCHW."""
    torch.manual_seed(1)
    ours = swin_tiny(absolute_pos_embed=False).eval()
    ref = SwinTransformer(
        img_size=256,
        patch_size=4,
        in_chans=1,
        num_classes=0,
        embed_dim=32,
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 4, 8),
        window_size=8,
    ).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 1, 256, 256)
    with torch.no_grad():
        mine = ours.forward_intermediates(x)[1:]
        theirs = ref.forward_intermediates(x, intermediates_only=True)
        final_ref = ref.forward_features(x)  # (B, 8, 8, 256) NHWC, normed
        final = ours.forward_features(x)
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(final, final_ref.permute(0, 3, 1, 2))


def test_mask_token_fn_runs_before_pos_embed(tiny):
    x = torch.randn(1, 1, 256, 256)
    with torch.no_grad():
        embed = tiny.forward_intermediates(x, mask_token_fn=torch.zeros_like)[0]
    # all tokens zeroed by the hook: what is left is exactly the position embedding
    torch.testing.assert_close(
        embed[0].permute(1, 2, 0).reshape(-1, 32), tiny.absolute_pos_embed[0]
    )


def test_norm_option_and_forward(tiny):
    x = torch.randn(1, 1, 256, 256)
    with torch.no_grad():
        raw = tiny.forward_intermediates(x)[-1]
        normed = tiny.forward_intermediates(x, norm=True)[-1]
        final = tiny(x)
    torch.testing.assert_close(normed, final)
    assert not torch.allclose(raw, normed)
    # LayerNorm over channels: zero mean per position
    assert normed.mean(dim=1).abs().max() < 1e-4


def test_wrong_input_size_raises(tiny):
    with pytest.raises(AssertionError, match="doesn't match"):
        tiny(torch.randn(1, 1, 128, 128))


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(2)
    enc = swin_tiny()
    x = torch.randn(1, 1, 256, 256)
    enc(x).square().mean().backward()
    g0 = enc.patch_embed.proj.weight.grad.clone()
    enc.zero_grad()
    enc.set_grad_checkpointing(True)
    enc(x).square().mean().backward()
    torch.testing.assert_close(enc.patch_embed.proj.weight.grad, g0)


def test_layer_decay_groups_cover_every_parameter():
    from timm.optim import param_groups_layer_decay

    enc = swin_tiny()
    groups = param_groups_layer_decay(
        enc, weight_decay=0.05, no_weight_decay_list=enc.no_weight_decay(), layer_decay=0.7
    )
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(list(enc.parameters()))
    stem = min(groups, key=lambda g: g["lr_scale"])  # the most-decayed group holds the stem + APE
    assert any(p is enc.absolute_pos_embed for p in stem["params"])


def test_swin_base_config():
    enc = swin_base()  # construct only
    n_params = sum(p.numel() for p in enc.parameters())
    assert 86e6 < n_params < 89e6  # Swin-B ~ 87-88M (1 input channel, no head, 256 px APE)
    assert enc.num_features == [128, 256, 512, 1024]
    assert [len(s.blocks) for s in enc.layers] == [2, 2, 18, 2]
    assert [s.blocks[0].attn.num_heads for s in enc.layers] == [4, 8, 16, 32]
    assert enc.patch_embed.proj.weight.shape == (128, 1, 4, 4)
    assert enc.absolute_pos_embed.shape == (1, 64 * 64, 128)
    assert [s.blocks[0].window_size for s in enc.layers] == [(8, 8)] * 4


def test_config_mismatch_raises():
    with pytest.raises(ValueError, match="equal length"):
        SwinEncoder(embed_dim=32, depths=(1, 1), num_heads=(1, 2, 4))
