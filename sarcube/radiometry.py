"""PALSAR-2 radiometric calibration: amplitude DN <-> σ⁰/γ⁰ in dB and linear power.

σ⁰[dB] = 10·log10(DN²) + CF, with the calibration factor CF from a table keyed by product
(JAXA: CF = −83.0 dB for L1.5 / L2.1 and for the yearly mosaics, where the result is γ⁰).
Resampling and mosaicking are done on linear power, DN²·10^(CF/10); dB is taken once, at the end.
"""

from __future__ import annotations

import numpy as np

# Calibration factor (dB) by product type; JAXA's published value for PALSAR-2.
CALIBRATION_FACTORS_DB: dict[str, float] = {
    "L1.5": -83.0,
    "L2.1": -83.0,
    "mosaic": -83.0,
}
CALIBRATION_FORMULA = "sigma0_db = 10*log10(DN^2) + CF"


def calibration_factor(product: str) -> float:
    """CF in dB for a product key (``"L1.5"``, ``"L2.1"``, ``"mosaic"``)."""
    try:
        return CALIBRATION_FACTORS_DB[product]
    except KeyError:
        raise KeyError(
            f"no calibration factor for product {product!r} "
            f"(known: {', '.join(sorted(CALIBRATION_FACTORS_DB))})"
        ) from None


def dn_to_linear(dn: np.ndarray, cf_db: float, nodata: int | None = 0) -> np.ndarray:
    """Amplitude DN -> linear power DN²·10^(CF/10) (float64), NaN where DN == nodata."""
    p = np.square(dn.astype(np.float64)) * 10.0 ** (cf_db / 10.0)
    if nodata is not None:
        p[dn == nodata] = np.nan
    return p


def linear_to_db(power: np.ndarray) -> np.ndarray:
    """Linear power -> dB (NaN stays NaN; non-positive power becomes NaN)."""
    power = np.asarray(power)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 10.0 * np.log10(power)
    out[~np.isfinite(out)] = np.nan
    return out


def dn_to_db(dn: np.ndarray, cf_db: float, nodata: int | None = 0) -> np.ndarray:
    """Amplitude DN -> backscatter in dB, 20·log10(DN) + CF, NaN where DN == nodata."""
    return linear_to_db(dn_to_linear(dn, cf_db, nodata))


def db_to_dn(db: np.ndarray, cf_db: float, nodata: int = 0) -> np.ndarray:
    """Backscatter in dB -> uint16 amplitude DN = round(sqrt(10^((dB − CF)/10))).

    DN is clipped to [nodata + 1, 65535] so that a valid pixel never collides with no-data.
    """
    amp = np.sqrt(np.power(10.0, (np.asarray(db, dtype=np.float64) - cf_db) / 10.0))
    return np.clip(np.rint(amp), nodata + 1, 65535).astype(np.uint16)
