"""Pretrained encoder loading: exact loads of SimMIM exports and checkpoints, clear all-or-nothing
errors (missing / unexpected / shape, absolute position embedding), weights_only file loading."""

from __future__ import annotations

import pickle

import pytest
import torch

from training.models import (
    EncoderWeightsError,
    SimMIM,
    build_segmenter,
    load_encoder_weights,
    swin_tiny,
)


@pytest.fixture(scope="module")
def simmim() -> SimMIM:
    torch.manual_seed(123)
    return SimMIM(swin_tiny())


@pytest.fixture(scope="module")
def export(simmim) -> dict[str, torch.Tensor]:
    """What SimMIM pretraining exports for fine-tuning."""
    return {k: v.clone() for k, v in simmim.encoder.state_dict().items()}


def _segmenter(seed: int = 0):
    torch.manual_seed(seed)
    return build_segmenter("tiny", 9, channels=16)


def _assert_encoder_equals(encoder, sd) -> None:
    got = encoder.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


def _differs(encoder, sd) -> bool:
    got = encoder.state_dict()
    return any(not torch.equal(got[k], v) for k, v in sd.items())


def test_simmim_export_loads_exactly(export):
    model = _segmenter()
    assert _differs(model.encoder, export)  # otherwise the test below proves nothing
    report = load_encoder_weights(model.encoder, export, source="SimMIM export")
    _assert_encoder_equals(model.encoder, export)
    assert report.loaded == sorted(export) and report.ignored == []
    assert "absolute_pos_embed" in report.loaded


@pytest.mark.parametrize("wrap", ["model", "encoder", "raw_full", "ddp"])
def test_checkpoint_layouts(simmim, export, wrap):
    """A whole SimMIM state dict (``encoder.``-prefixed, with mask token and decoder) under
    "model", an "encoder" entry, a bare whole-model dict, and a DDP ``module.`` prefix."""
    full = simmim.state_dict()
    assert any(k.startswith("encoder.") for k in full) and "mask_token" in full
    obj = {
        "model": {"model": full, "optimizer": {}, "epoch": 3},
        "encoder": {"encoder": export, "epoch": 3},
        "raw_full": full,
        "ddp": {"model": {f"module.{k}": v for k, v in full.items()}, "epoch": 3},
    }[wrap]
    model = _segmenter()
    report = load_encoder_weights(model.encoder, obj)
    _assert_encoder_equals(model.encoder, export)
    if wrap != "encoder":
        assert "mask_token" in report.ignored and any(
            k.startswith("decoder.") for k in report.ignored
        )


def _error(export_like, encoder=None) -> EncoderWeightsError:
    encoder = encoder if encoder is not None else _segmenter().encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.raises(EncoderWeightsError) as info:
        load_encoder_weights(encoder, export_like, source="unit-test weights")
    _assert_encoder_equals(encoder, before)  # nothing was loaded
    return info.value


def test_missing_key_is_listed(export):
    sd = dict(export)
    del sd["layers.2.blocks.1.mlp.fc1.weight"]
    err = _error(sd)
    assert err.missing == ["layers.2.blocks.1.mlp.fc1.weight"]
    assert not err.unexpected and not err.mismatched
    msg = str(err)
    assert "missing keys" in msg and "layers.2.blocks.1.mlp.fc1.weight" in msg
    assert "unit-test weights" in msg and "nothing was loaded" in msg


def test_extra_key_is_listed(export):
    err = _error({**export, "layers.3.blocks.1.attn.qkv.weight": torch.zeros(3)})
    assert err.unexpected == ["layers.3.blocks.1.attn.qkv.weight"] and not err.missing
    assert "unexpected keys" in str(err) and "layers.3.blocks.1.attn.qkv.weight" in str(err)


def test_shape_mismatch_lists_both_shapes(export):
    sd = dict(export)
    sd["layers.1.blocks.0.mlp.fc2.weight"] = torch.zeros(64, 100)  # encoder: (64, 256)
    err = _error(sd)
    assert err.mismatched == {"layers.1.blocks.0.mlp.fc2.weight": ((64, 100), (64, 256))}
    assert "layers.1.blocks.0.mlp.fc2.weight: [64, 100] vs [64, 256]" in str(err)


def test_all_three_problems_at_once(export):
    sd = dict(export)
    del sd["norm.weight"]
    sd["head.weight"] = torch.zeros(2)
    sd["patch_embed.proj.weight"] = torch.zeros(32, 3, 4, 4)
    err = _error(sd)
    msg = str(err)
    assert "1 missing key(s), 1 unexpected key(s), 1 shape mismatch(es)" in msg
    for s in ("norm.weight", "head.weight", "[32, 3, 4, 4] vs [32, 1, 4, 4]"):
        assert s in msg


def test_absolute_pos_embed_presence_is_explained(export):
    no_ape = {k: v for k, v in export.items() if k != "absolute_pos_embed"}
    err = _error(no_ape)
    assert err.missing == ["absolute_pos_embed"]
    assert "the weights have none but the encoder was built with an absolute position" in str(err)

    enc_without = swin_tiny(absolute_pos_embed=False)
    err = _error(export, encoder=enc_without)
    assert err.unexpected == ["absolute_pos_embed"]
    assert "the weights have one but the encoder was built without it" in str(err)


def test_other_img_size_is_explained(export):
    err = _error(export, encoder=swin_tiny(img_size=128))
    assert err.mismatched["absolute_pos_embed"] == ((1, 4096, 32), (1, 1024, 32))
    assert "another img_size" in str(err)


def test_file_path_with_weights_only(export, tmp_path):
    path = tmp_path / "simmim_encoder.pth"
    torch.save(export, path)
    torch.manual_seed(0)
    model = build_segmenter("tiny", 9, channels=16, pretrained=str(path))
    _assert_encoder_equals(model.encoder, export)
    # the checkpoint form, from a path object
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"encoder": export, "epoch": 800, "config": {"mask_ratio": 0.6}}, ckpt)
    model = _segmenter(seed=5)
    load_encoder_weights(model.encoder, ckpt)
    _assert_encoder_equals(model.encoder, export)


class NotWeights:  # pickled object that weights_only=True refuses to rebuild
    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def test_bad_files_fail_clearly(export, tmp_path):
    bad = dict(export)
    del bad["layers.0.blocks.0.norm1.bias"]
    path = tmp_path / "broken_export.pth"
    torch.save(bad, path)
    err = _error(str(path))
    assert "broken_export.pth" in str(err) and "layers.0.blocks.0.norm1.bias" in str(err)

    obj_path = tmp_path / "object.pth"
    torch.save({"encoder": NotWeights()}, obj_path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_encoder_weights(swin_tiny(), obj_path)

    tensor_path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_path)
    with pytest.raises(EncoderWeightsError, match=r"tensor\.pth.*expected a state dict"):
        load_encoder_weights(swin_tiny(), tensor_path)

    with pytest.raises(EncoderWeightsError, match="not tensors"):
        load_encoder_weights(swin_tiny(), {**export, "epoch": 3})


def test_scratch_when_pretrained_is_none(export):
    torch.manual_seed(0)
    a = build_segmenter("tiny", 9, channels=16, pretrained=None)
    assert _differs(a.encoder, export)
