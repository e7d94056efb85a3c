"""Layer-wise lr decay by Swin depth: a hand-derived table for the tiny Swin (depths 1/1/2/1),
the ``encoder.`` prefix (the authors' SimMIM code silently lost decay there), weight-decay
exclusions, and that every parameter lands in exactly one group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.layer_decay import param_groups_layer_decay, swin_layer_id
from training.models import build_segmenter, swin_tiny

D = 0.7
BASE_LR = 6e-4
WD = 0.05

# Tiny Swin: depths (1, 1, 2, 1) -> L = 5 blocks, ids 0..6, scale = 0.7 ** (6 - id).
# (full name, layer id, lr scale, weight decay), derived by hand from the convention:
# id 0 stem; block j of stage i -> sum(depths[:i]) + j + 1; layers.{i}.downsample with the first
# block of stage i; encoder.norm and the decoder at the top (6).
EXPECTED = [
    ("encoder.patch_embed.proj.weight", 0, D**6, WD),
    ("encoder.patch_embed.proj.bias", 0, D**6, 0.0),
    ("encoder.patch_embed.norm.weight", 0, D**6, 0.0),
    ("encoder.absolute_pos_embed", 0, D**6, 0.0),  # 3-D, still no decay
    ("encoder.layers.0.blocks.0.attn.qkv.weight", 1, D**5, WD),  # first block
    ("encoder.layers.0.blocks.0.attn.relative_position_bias_table", 1, D**5, 0.0),  # 2-D, no wd
    ("encoder.layers.0.blocks.0.norm1.weight", 1, D**5, 0.0),
    ("encoder.layers.1.downsample.reduction.weight", 2, D**4, WD),  # merging -> stage 1 block 0
    ("encoder.layers.1.downsample.norm.bias", 2, D**4, 0.0),
    ("encoder.layers.1.blocks.0.mlp.fc1.weight", 2, D**4, WD),
    ("encoder.layers.2.downsample.reduction.weight", 3, D**3, WD),
    ("encoder.layers.2.blocks.0.attn.proj.weight", 3, D**3, WD),
    ("encoder.layers.2.blocks.1.attn.qkv.weight", 4, D**2, WD),
    ("encoder.layers.2.blocks.1.mlp.fc2.bias", 4, D**2, 0.0),
    ("encoder.layers.3.downsample.reduction.weight", 5, D**1, WD),
    ("encoder.layers.3.blocks.0.mlp.fc2.weight", 5, D**1, WD),  # last block
    ("encoder.norm.weight", 6, 1.0, 0.0),  # encoder final norm: undecayed
    ("encoder.norm.bias", 6, 1.0, 0.0),
    ("decode_head.ppm.branches.0.1.0.weight", 6, 1.0, WD),
    ("decode_head.stage_norms.0.weight", 6, 1.0, 0.0),
    ("decode_head.hires_proj.1.0.weight", 6, 1.0, WD),
    ("decode_head.fusion.0.weight", 6, 1.0, WD),
    ("decode_head.fusion.1.weight", 6, 1.0, 0.0),  # GroupNorm
    ("refine.steps.1.0.weight", 6, 1.0, WD),
    ("classifier.weight", 6, 1.0, WD),
    ("classifier.bias", 6, 1.0, 0.0),
]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_segmenter("tiny", 9, hires_injection=True, refine_up=True, channels=16)


def _table(groups) -> dict[str, tuple[int, float, float, float]]:
    """{name: (layer id, lr scale, weight decay, lr)}; fails on a name in two groups."""
    out: dict[str, tuple[int, float, float, float]] = {}
    for g in groups:
        assert len(g["params"]) == len(g["param_names"])
        for name in g["param_names"]:
            assert name not in out, f"{name} in two groups"
            out[name] = (g["layer_id"], g["lr_scale"], g["weight_decay"], g["lr"])
    return out


def test_hand_derived_table(model):
    table = _table(param_groups_layer_decay(model, BASE_LR, weight_decay=WD, layer_decay=D))
    for name, layer_id, scale, wd in EXPECTED:
        got_id, got_scale, got_wd, got_lr = table[name]
        assert (got_id, got_wd) == (layer_id, wd), name
        assert got_scale == pytest.approx(scale, rel=1e-12), name
        assert got_lr == pytest.approx(BASE_LR * scale, rel=1e-12), name
    # the stem is the deepest-decayed, 0.7 ** (L + 1) with L = 5
    assert min(s for _, s, _, _ in table.values()) == pytest.approx(0.7**6)
    assert sorted({i for i, _, _, _ in table.values()}) == list(range(7))


def test_every_parameter_in_exactly_one_group(model):
    groups = param_groups_layer_decay(model, BASE_LR)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    named = dict(model.named_parameters())
    for g in groups:  # names and tensors agree
        assert all(named[n] is p for n, p in zip(g["param_names"], g["params"], strict=True))
    # one group per (id, decay?) pair, ordered by id
    keys = [(g["layer_id"], g["weight_decay"] == 0.0) for g in groups]
    assert keys == sorted(keys) and len(keys) == len(set(keys))


def test_no_weight_decay_set(model):
    table = _table(param_groups_layer_decay(model, BASE_LR, weight_decay=WD))
    no_wd = {n for n, (_, _, wd, _) in table.items() if wd == 0.0}
    named = dict(model.named_parameters())
    # independent count: every >= 2-D tensor that is not a position table is a conv / linear weight
    weights = {
        f"{name}.weight"
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }
    assert set(named) - no_wd == weights
    assert "encoder.absolute_pos_embed" in no_wd
    rel_tables = {n for n in named if n.endswith("relative_position_bias_table")}
    assert len(rel_tables) == 5 and rel_tables <= no_wd  # one per block
    assert all(named[n].ndim >= 2 for n in rel_tables)  # excluded by name, not by ndim


def test_encoder_prefix_is_decayed_not_silently_top(model):
    """The segmenter's names start with ``encoder.``; a DDP wrapper adds ``module.``: the encoder
    must still be decayed. A matcher on bare names (the authors' SimMIM bug) would put everything
    at scale 1."""
    assert all(
        n.startswith(("encoder.", "decode_head.", "refine.", "classifier."))
        for n, _ in model.named_parameters()
    )

    class DDPLike(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.module = m

    plain = _table(param_groups_layer_decay(model, BASE_LR))
    wrapped = _table(param_groups_layer_decay(DDPLike(model), BASE_LR))
    assert {f"module.{n}": v for n, v in plain.items()} == wrapped
    enc_scales = {s for n, (_, s, _, _) in plain.items() if n.startswith("encoder.layers.")}
    assert len(enc_scales) == 5 and max(enc_scales) < 1.0
    # the bare encoder (no prefix) gives the same ids
    bare = _table(param_groups_layer_decay(model.encoder, BASE_LR))
    assert {n: v[0] for n, v in bare.items()} == {
        n[len("encoder.") :]: v[0] for n, v in plain.items() if n.startswith("encoder.")
    }


def test_swin_base_ids_by_depth():
    depths = (2, 2, 18, 2)  # Swin-B, L = 24
    assert swin_layer_id("patch_embed.proj.weight", depths) == 0
    assert swin_layer_id("absolute_pos_embed", depths) == 0
    assert swin_layer_id("layers.0.blocks.0.norm1.weight", depths) == 1
    assert swin_layer_id("layers.0.blocks.1.norm1.weight", depths) == 2
    assert swin_layer_id("layers.1.downsample.reduction.weight", depths) == 3
    assert swin_layer_id("layers.1.blocks.1.attn.qkv.weight", depths) == 4
    assert swin_layer_id("layers.2.downsample.norm.weight", depths) == 5
    assert swin_layer_id("layers.2.blocks.17.mlp.fc2.weight", depths) == 22
    assert swin_layer_id("layers.3.downsample.reduction.weight", depths) == 23
    assert swin_layer_id("layers.3.blocks.1.attn.proj.bias", depths) == 24
    assert swin_layer_id("norm.weight", depths) == 25
    with pytest.raises(ValueError, match="outside"):
        swin_layer_id("layers.2.blocks.18.mlp.fc2.weight", depths)


def test_errors_instead_of_silent_fallback():
    with pytest.raises(ValueError, match="no SwinEncoder"):
        param_groups_layer_decay(nn.Linear(3, 3), BASE_LR)
    enc = swin_tiny()
    enc.extra_scale = nn.Parameter(torch.ones(3))  # a new encoder parameter without a rule
    with pytest.raises(ValueError, match=r"no layer-decay rule.*extra_scale"):
        param_groups_layer_decay(enc, BASE_LR)
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups_layer_decay(swin_tiny(), BASE_LR, layer_decay=0.0)


def test_decay_one_frozen_params_and_optimizer(model):
    flat = _table(param_groups_layer_decay(model, BASE_LR, layer_decay=1.0))
    assert {s for _, s, _, _ in flat.values()} == {1.0}

    model.encoder.patch_embed.proj.weight.requires_grad_(False)
    try:
        groups = param_groups_layer_decay(model, BASE_LR)
        assert "encoder.patch_embed.proj.weight" not in _table(groups)
    finally:
        model.encoder.patch_embed.proj.weight.requires_grad_(True)

    opt = torch.optim.AdamW(param_groups_layer_decay(model, BASE_LR))
    lrs = {g["group_name"]: g["lr"] for g in opt.param_groups}
    assert lrs["layer_0_decay"] == pytest.approx(BASE_LR * 0.7**6)
    assert lrs["layer_6_decay"] == pytest.approx(BASE_LR)
    opt.load_state_dict(opt.state_dict())  # extra group keys survive a checkpoint round trip
