"""Calibration against hand-worked values of σ⁰ = 10·log10(DN²) + CF, CF = −83 dB."""

from __future__ import annotations

import numpy as np
import pytest

from sarcube.radiometry import calibration_factor, db_to_dn, dn_to_db, dn_to_linear, linear_to_db


def test_hand_worked_values():
    dn = np.array([[1000, 10000], [0, 1]], dtype=np.uint16)
    db = dn_to_db(dn, -83.0)
    # 10·log10(1000²) − 83 = 60 − 83 = −23; 10·log10(10000²) − 83 = −3; DN 0 is no data.
    assert db[0, 0] == pytest.approx(-23.0)
    assert db[0, 1] == pytest.approx(-3.0)
    assert np.isnan(db[1, 0])
    assert db[1, 1] == pytest.approx(-83.0)
    # Mosaic nodata is DN 1.
    assert np.isnan(dn_to_db(dn, -83.0, nodata=1)[1, 1])
    assert dn_to_linear(np.array([1000]), -83.0)[0] == pytest.approx(10 ** (-2.3))


def test_db_to_dn_inverts_and_never_hits_nodata():
    db = np.array([-23.0, -3.0, -120.0, 60.0])
    dn = db_to_dn(db, -83.0)
    assert dn.dtype == np.uint16
    assert list(dn) == [1000, 10000, 1, 65535]
    rng = np.random.default_rng(0)
    x = rng.uniform(-30, 5, 1000)
    assert np.abs(dn_to_db(db_to_dn(x, -83.0), -83.0) - x).max() < 0.01  # DN rounding only


def test_linear_to_db_nan_for_nonpositive():
    out = linear_to_db(np.array([1.0, 0.0, -1.0, np.nan]))
    assert out[0] == 0.0 and np.isnan(out[1:]).all()


def test_calibration_table():
    assert (
        calibration_factor("L2.1")
        == calibration_factor("L1.5")
        == calibration_factor("mosaic")
        == -83.0
    )
    with pytest.raises(KeyError, match="no calibration factor"):
        calibration_factor("L9")
