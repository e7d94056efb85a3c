"""SimMIM mask generator: exact masked-unit counts, block structure, determinism, pixel
upsampling."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from training.masking import mask_to_pixels, num_masked_units, simmim_mask


def _units(mask: torch.Tensor, mask_unit: int, token_size: int) -> np.ndarray:
    """(B, G, G) token mask -> (B, g, g) unit mask, asserting it is constant inside every unit."""
    m = mask.numpy()
    b, gt, _ = m.shape
    s = mask_unit // token_size
    blocks = m.reshape(b, gt // s, s, gt // s, s)
    assert np.all(blocks == blocks[:, :, :1, :, :1]), "mask is not constant within a mask unit"
    return blocks[:, :, 0, :, 0]


# hand-computed: 256 px / 16 px = 16^2 = 256 units; 256 / 32 = 8^2 = 64 units
EXPECTED = {
    (16, 0.6): 154,  # ceil(153.6)
    (16, 0.5): 128,
    (16, 0.33): 85,  # ceil(84.48)
    (16, 0.75): 192,
    (32, 0.6): 39,  # ceil(38.4)
    (32, 0.5): 32,
    (32, 0.33): 22,  # ceil(21.12)
    (32, 0.75): 48,
}


@pytest.mark.parametrize("mask_unit", [16, 32])
@pytest.mark.parametrize("ratio", [0.6, 0.5, 0.33, 0.75])
def test_exact_count_and_block_structure(mask_unit, ratio):
    gen = torch.Generator().manual_seed(123)
    mask = simmim_mask(
        8, img_size=256, mask_unit=mask_unit, token_size=4, ratio=ratio, generator=gen
    )
    assert mask.shape == (8, 64, 64) and mask.dtype == torch.bool
    units = _units(mask, mask_unit, 4)
    n_units = (256 // mask_unit) ** 2
    expected = math.ceil(Fraction(str(ratio)) * n_units)  # exact rational arithmetic
    assert expected == EXPECTED[(mask_unit, ratio)]
    assert units.reshape(8, -1).sum(axis=1).tolist() == [expected] * 8
    # token count follows: every masked unit covers (mask_unit / 4)^2 tokens
    assert mask.reshape(8, -1).sum(dim=1).tolist() == [expected * (mask_unit // 4) ** 2] * 8
    # independent masks per image
    assert len({units[i].tobytes() for i in range(8)}) == 8


def test_deterministic_with_seeded_generator():
    a = simmim_mask(4, generator=torch.Generator().manual_seed(7))
    b = simmim_mask(4, generator=torch.Generator().manual_seed(7))
    c = simmim_mask(4, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # consecutive draws from one generator differ
    g = torch.Generator().manual_seed(7)
    assert not torch.equal(simmim_mask(4, generator=g), simmim_mask(4, generator=g))


def test_every_unit_is_equally_likely():
    # 4000 masks over 64 units at ratio 0.5: each unit's masking frequency ~ 0.5 +- 0.008 (1 sd)
    mask = simmim_mask(4000, mask_unit=32, ratio=0.5, generator=torch.Generator().manual_seed(0))
    freq = _units(mask, 32, 4).mean(axis=0)
    assert np.abs(freq - 0.5).max() < 0.05


def test_extreme_ratios_and_other_sizes():
    g = torch.Generator().manual_seed(0)
    assert not simmim_mask(2, ratio=0.0, generator=g).any()
    assert simmim_mask(2, ratio=1.0, generator=g).all()
    # SimMIM's ImageNet setting: 192 px, 32 px units, 4 px tokens -> 36 units, ceil(21.6) = 22
    m = simmim_mask(3, img_size=192, mask_unit=32, token_size=4, ratio=0.6, generator=g)
    assert m.shape == (3, 48, 48)
    assert _units(m, 32, 4).reshape(3, -1).sum(axis=1).tolist() == [22] * 3


def test_num_masked_units_is_robust_to_float_round_off():
    assert 0.07 * 100 > 7  # the float product is 7.000000000000001 ...
    assert num_masked_units(100, 0.07) == 7  # ... but the count is ceil(7) = 7
    assert num_masked_units(256, 0.6) == 154
    assert num_masked_units(10, 0.01) == 1  # a genuine fraction still rounds up


def test_mask_to_pixels_matches_kron():
    mask = simmim_mask(3, generator=torch.Generator().manual_seed(1))
    px = mask_to_pixels(mask, token_size=4)
    assert px.shape == (3, 1, 256, 256) and px.dtype == torch.bool
    ref = np.stack([np.kron(m, np.ones((4, 4), dtype=np.int64)) for m in mask.numpy()])
    np.testing.assert_array_equal(px[:, 0].numpy().astype(np.int64), ref)
    # masked pixel fraction equals the masked unit fraction: 154 / 256 units
    assert px.float().mean().item() == pytest.approx(154 / 256)


def test_device_argument():
    m = simmim_mask(1, generator=torch.Generator().manual_seed(0), device="cpu")
    assert m.device.type == "cpu"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(img_size=250, mask_unit=16), "img_size"),
        (dict(mask_unit=16, token_size=5), "mask_unit"),
        (dict(mask_unit=24, img_size=256), "img_size"),
        (dict(ratio=1.5), "ratio"),
        (dict(ratio=-0.1), "ratio"),
        (dict(token_size=0), "positive"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        simmim_mask(2, **kwargs)


def test_mask_to_pixels_rejects_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        mask_to_pixels(torch.zeros(2, 1, 8, 8, dtype=torch.bool))
