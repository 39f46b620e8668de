"""Fitting a profile's efficiency factors to measured kernel times.

A GEMM's time on the profile's roofline (:func:`moesim.costs.roofline.gemm_time_us`, the
rule the simulator times every GEMM by where a device has no measured table) is::

    t = smoothmax(flops x (M N + H) / (M N x peak x e), bytes / (hbm x hbm efficiency))

with ``e`` the GEMM efficiency (``efficiency.gemm``, or ``gemm_fp8``) and ``H`` its half
outputs (``gemm_half_outputs``, ``gemm_fp8_half_outputs``): the efficiency is a function of
the rows M (tokens per expert, in a grouped GEMM), of N (too few output tiles leave SMs
idle) and of K and N through the weights' bytes.
:func:`fit_gemm` finds ``e`` and ``h`` by least squares on log time, as the profiles'
figures were fitted to the public tables in ``hardware_profiles/tables/``
(``python benchmarks/fit_gemm.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from moesim.hardware import HardwareProfile
from moesim.paths import hardware_dir

__all__ = ["GemmFit", "fit_gemm", "gemm_table", "with_efficiency"]


@dataclass(frozen=True)
class GemmFit:
    """A fitted GEMM efficiency, its half outputs and the fit's signed errors (pred / meas - 1)."""

    efficiency: float
    half_outputs: float
    errors: np.ndarray


def with_efficiency(hw: HardwareProfile, **fields: float | None) -> HardwareProfile:
    """``hw`` with the given ``efficiency`` fields replaced."""
    return hw.model_copy(update={"efficiency": hw.efficiency.model_copy(update=fields)})


def _fields(hw: HardwareProfile, dtype: str) -> tuple[str, str]:
    return (
        ("gemm_fp8", "gemm_fp8_half_outputs")
        if hw.runs_fp8(dtype)
        else ("gemm", "gemm_half_outputs")
    )


def fit_gemm(
    m: np.ndarray,
    n: np.ndarray,
    k: np.ndarray,
    time_us: np.ndarray,
    hw: HardwareProfile,
    dtype: str,
) -> GemmFit:
    """Efficiency and half outputs of ``dtype`` GEMMs on ``hw`` that best match ``time_us``
    (kernel times, no launch) of ``(m, k) @ (k, n)`` calls, by least squares on log time."""
    from moesim.costs.roofline import gemm_time_us

    m, n, k, t = (np.asarray(x, dtype=np.float64) for x in (m, n, k, time_us))
    eff_field, half_field = _fields(hw, dtype)

    def predict(x: np.ndarray) -> np.ndarray:
        p = with_efficiency(hw, **{eff_field: float(x[0]), half_field: float(x[1])})
        return np.array(
            [float(gemm_time_us(mi, ni, ki, p, dtype)) for mi, ni, ki in zip(m, n, k, strict=True)]
        )

    res = least_squares(
        lambda x: np.log(predict(x)) - np.log(t), [0.5, 1e5], bounds=([1e-3, 0.0], [1.0, 1e9])
    )
    return GemmFit(float(res.x[0]), float(res.x[1]), predict(res.x) / t - 1)


def gemm_table(path: Path | None = None) -> pd.DataFrame:
    """The public GEMM tables (``hardware_profiles/tables/gemm.csv``) with ``time_us``."""
    df = pd.read_csv(path or hardware_dir() / "tables" / "gemm.csv")
    return df.assign(time_us=2.0 * df["m"] * df["n"] * df["k"] / (df["tflops"] * 1e6))
