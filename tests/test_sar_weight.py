"""SAR intensity weight: checked against an independent float64 NumPy evaluation of the formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.sar_weight import sar_intensity_weight


def _weight_ref(v: np.ndarray, k: float, eps: float = 1e-6) -> np.ndarray:
    """docs/design.md §4 written out with explicit loops over images and channels (float64)."""
    v = v.astype(np.float64)
    out = np.empty_like(v)
    for b in range(v.shape[0]):
        for c in range(v.shape[1]):
            p = 10.0 ** (v[b, c] / 10.0)
            n = (p - p.min()) / (p.max() - p.min() + eps)
            out[b, c] = np.exp(k * (1.0 - n))
    return out


def _sar_db(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Plausible L-band dB values: a class level per image/channel plus gamma speckle (4 looks)."""
    level = rng.uniform(-22.0, -2.0, size=(*shape[:2], 1, 1))
    speckle = rng.gamma(4.0, 1.0 / 4.0, size=shape)
    return (level + 10.0 * np.log10(speckle)).astype(np.float32)


@pytest.mark.parametrize("shape", [(3, 1, 16, 16), (2, 2, 12, 20)])
@pytest.mark.parametrize("k", [1.0, 0.5, 2.0])
def test_db_weight_matches_numpy(shape, k):
    rng = np.random.default_rng(0)
    x = _sar_db(rng, shape)
    w = sar_intensity_weight(torch.from_numpy(x), k=k)
    assert w.shape == shape and w.dtype == torch.float32
    np.testing.assert_allclose(w.numpy(), _weight_ref(x, k), rtol=1e-5, atol=1e-5)


def test_weight_range_and_extremes():
    rng = np.random.default_rng(1)
    x = _sar_db(rng, (2, 2, 32, 32))
    w = sar_intensity_weight(torch.from_numpy(x)).numpy()
    for b in range(2):
        for c in range(2):
            img, wi = x[b, c], w[b, c]
            # darkest pixel gets e, brightest ~1: dark, low-backscatter pixels weigh more
            assert wi[np.unravel_index(img.argmin(), img.shape)] == pytest.approx(math.e, abs=1e-6)
            assert wi[np.unravel_index(img.argmax(), img.shape)] == pytest.approx(1.0, abs=1e-4)
            assert wi.min() >= 1.0 - 1e-6 and wi.max() <= math.e + 1e-6
            # monotone: brighter pixel, smaller weight
            order = np.argsort(img.ravel())
            assert np.all(np.diff(wi.ravel()[order]) <= 1e-6)


def test_per_image_and_channel_and_offset_invariance():
    rng = np.random.default_rng(2)
    x = _sar_db(rng, (2, 2, 16, 16))
    w = sar_intensity_weight(torch.from_numpy(x)).numpy()
    # a dB offset is a factor on P, which min-max removes: weight of each image/channel unchanged
    x2 = x.copy()
    x2[0, 1] += 7.0
    w2 = sar_intensity_weight(torch.from_numpy(x2)).numpy()
    np.testing.assert_allclose(w2, w, atol=1e-5)
    # changing one channel of one image leaves the others untouched (statistics are not shared)
    x3 = x.copy()
    x3[1, 0] = _sar_db(rng, (1, 1, 16, 16))[0, 0]
    w3 = sar_intensity_weight(torch.from_numpy(x3)).numpy()
    np.testing.assert_array_equal(w3[0], w[0])
    np.testing.assert_array_equal(w3[1, 1], w[1, 1])
    assert not np.allclose(w3[1, 0], w[1, 0])


def test_unbatched_input():
    rng = np.random.default_rng(3)
    x = _sar_db(rng, (1, 2, 8, 8))
    w = sar_intensity_weight(torch.from_numpy(x[0]))  # (C, H, W), one sample in a loader
    np.testing.assert_allclose(w.numpy(), _weight_ref(x, 1.0)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels", [1, 2])
def test_normalized_domain_matches_numpy(channels):
    rng = np.random.default_rng(4)
    x = _sar_db(rng, (3, channels, 16, 16))
    mu, sigma = -14.0, 4.5
    z = ((x - mu) / sigma).astype(np.float32)
    w = sar_intensity_weight(torch.from_numpy(z), domain="normalized").numpy()
    # the authors' variant: the formula applied to the z-scored values
    np.testing.assert_allclose(w, _weight_ref(z, 1.0), rtol=1e-5, atol=1e-5)
    # ... which is the min-max of P^(1/sigma) computed from the dB values (documented equivalence)
    p_root = (10.0 ** (x.astype(np.float64) / 10.0)) ** (1.0 / sigma)
    lo = p_root.min(axis=(-2, -1), keepdims=True)
    hi = p_root.max(axis=(-2, -1), keepdims=True)
    np.testing.assert_allclose(w, np.exp(1.0 - (p_root - lo) / (hi - lo)), atol=1e-4)
    # and it differs from the dB-domain weight of the same scene (softer contrast)
    w_db = sar_intensity_weight(torch.from_numpy(x)).numpy()
    assert np.abs(w - w_db).max() > 0.05


def test_constant_image_and_k_zero():
    x = torch.full((1, 1, 4, 4), -12.0)
    np.testing.assert_allclose(sar_intensity_weight(x).numpy(), math.e, rtol=1e-6)
    rng = np.random.default_rng(5)
    xr = torch.from_numpy(_sar_db(rng, (1, 1, 8, 8)))
    np.testing.assert_array_equal(sar_intensity_weight(xr, k=0.0).numpy(), 1.0)


def test_low_precision_input_is_computed_in_float32():
    rng = np.random.default_rng(6)
    x = _sar_db(rng, (2, 1, 16, 16))
    w = sar_intensity_weight(torch.from_numpy(x).to(torch.bfloat16))
    assert w.dtype == torch.float32
    x_bf = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_allclose(w.numpy(), _weight_ref(x_bf, 1.0), rtol=1e-5, atol=1e-5)


def test_no_gradient():
    x = torch.randn(1, 1, 8, 8, requires_grad=True)
    assert not sar_intensity_weight(x).requires_grad


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_raises(bad):
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 2] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        sar_intensity_weight(x)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="domain"):
        sar_intensity_weight(torch.zeros(1, 1, 4, 4), domain="linear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        sar_intensity_weight(torch.zeros(4))
