"""Quantization parameters (scale, zero point, integer values) for activations, weights and biases.

Affine 8-bit quantization maps a real x to q = clamp(round(x / s) + z, qmin, qmax) and back to s * (q - z).

Activations, per tensor, from a range (lo, hi) that is first widened to contain 0 (so that 0, i.e. padding
and ReLU's floor, is represented exactly):
- asymmetric uint8 (ONNX Runtime on CPU): s = (hi - lo) / 255, z = round(-lo / s) in [0, 255];
- symmetric int8 (TensorRT): s = max(|lo|, |hi|) / 127, z = 0.
A degenerate range (lo = hi = 0) gets s = 1, which represents the only value it holds (0) exactly.

Weights, symmetric int8 per output channel k: s_k = max|W_k| / qmax, z_k = 0, qmax = 127, or 64 with
`reduce_range`. The reduced 7-bit range exists for AVX2 CPUs without VNNI, whose u8 x s8 dot product
(VPMADDUBSW) adds two products into a saturating int16: 2 * 255 * 127 = 64770 overflows 32767, while
2 * 255 * 64 = 32640 does not.

Bias of a quantized Conv/Gemm (ONNX Runtime's integer kernels add it in the int32 accumulator):
s_b,k = s_x * s_w,k, z = 0, q_b,k = round(b_k / s_b,k) as int32. A channel whose weights are (nearly) zero but
whose bias is not (BN folding of a dead channel) would overflow int32; there the weight scale is raised to
s_w,k >= |b_k| / (s_x * 2^30), which keeps q_b within half the int32 range and costs nothing, since such a
channel's weights are negligible next to its bias.
"""

from __future__ import annotations

import numpy as np

from dfp_deploy.core.errors import ExportError

INT8_QMAX = 127
INT8_QMAX_REDUCED = 64
UINT8_QMAX = 255
INT32_LIMIT = 2**31 - 1
BIAS_HEADROOM = 2.0**30


def _widened(lo: float, hi: float, tensor: str) -> tuple[float, float]:
    lo, hi = float(lo), float(hi)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo > hi:
        raise ExportError(f"activation range of {tensor!r} is ({lo}, {hi}); expected finite lo <= hi")
    return min(lo, 0.0), max(hi, 0.0)


def asymmetric_uint8(lo: float, hi: float, tensor: str = "?") -> tuple[np.float32, np.uint8]:
    """(scale, zero_point) for asymmetric uint8 activations covering [lo, hi]."""
    lo, hi = _widened(lo, hi, tensor)
    if hi == lo:
        return np.float32(1.0), np.uint8(0)
    scale = (hi - lo) / UINT8_QMAX
    zero_point = int(np.clip(round(-lo / scale), 0, UINT8_QMAX))
    return np.float32(scale), np.uint8(zero_point)


def symmetric_int8(lo: float, hi: float, tensor: str = "?") -> tuple[np.float32, np.int8]:
    """(scale, zero_point = 0) for symmetric int8 activations covering [lo, hi]."""
    lo, hi = _widened(lo, hi, tensor)
    bound = max(-lo, hi)
    return np.float32(bound / INT8_QMAX if bound > 0 else 1.0), np.int8(0)


def bias_safe_scale_floor(bias: np.ndarray, input_scale: float) -> np.ndarray:
    """Smallest weight scale per channel for which the int32 bias stays within +-2^30 (see module docstring)."""
    return np.abs(bias.astype(np.float64)) / (float(input_scale) * BIAS_HEADROOM)


def per_channel_int8(weight: np.ndarray, axis: int, reduce_range: bool = False, min_scales: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int8 weight, float32 scales [K], int8 zero points [K]) for symmetric per-channel quantization on `axis`."""
    qmax = INT8_QMAX_REDUCED if reduce_range else INT8_QMAX
    moved = np.moveaxis(weight.astype(np.float64), axis, 0)
    bound = np.abs(moved.reshape(moved.shape[0], -1)).max(axis=1)
    scales = bound / qmax
    if min_scales is not None:
        scales = np.maximum(scales, min_scales)
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    quantized = np.clip(np.round(weight / scales.reshape(shape)), -qmax, qmax).astype(np.int8)
    return quantized, scales, np.zeros_like(scales, dtype=np.int8)


def int32_bias(bias: np.ndarray, input_scale: float, weight_scales: np.ndarray, tensor: str = "?"
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int32 bias, float32 scales s_x * s_w [K], int32 zero points [K])."""
    scales = (np.float32(input_scale) * weight_scales.astype(np.float32)).astype(np.float32)
    quantized = np.round(bias.astype(np.float64) / scales.astype(np.float64))
    if np.abs(quantized).max(initial=0) > INT32_LIMIT:
        raise ExportError(f"bias {tensor!r} does not fit int32 at scale s_x * s_w; quantize the weights with "
                          "bias_safe_scale_floor as their minimum scale")
    return quantized.astype(np.int32), scales, np.zeros_like(quantized, dtype=np.int32)

