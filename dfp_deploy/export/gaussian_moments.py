"""The Gaussian channel model of data-free ranges: a clipped normal per channel, functions of it tabulated on a
grid, and the closed-form moments of the clipped normal, Hardswish and Hardsigmoid (docs/methods/data_free_ranges.md).

Moments of a clipped normal, alpha = (a - mu) / sigma, beta = (b - mu) / sigma, phi / Phi the standard normal
density / distribution function:
    E[X]   = a Phi(alpha) + b (1 - Phi(beta)) + mu (Phi(beta) - Phi(alpha)) + sigma (phi(alpha) - phi(beta))
    E[X^2] = a^2 Phi(alpha) + b^2 (1 - Phi(beta)) + (mu^2 + sigma^2)(Phi(beta) - Phi(alpha))
             + 2 mu sigma (phi(alpha) - phi(beta)) + sigma^2 (alpha phi(alpha) - beta phi(beta)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


# The grid on which a function of a clipped Gaussian is tabulated: z in [-GRID_Z, GRID_Z] (the mass beyond 10
# standard deviations is 1.5e-23) in steps of GRID_STEP; expectations are the trapezoid rule with normal weights.
GRID_Z = 10.0
GRID_STEP = 0.025
GRID = np.linspace(-GRID_Z, GRID_Z, int(round(2 * GRID_Z / GRID_STEP)) + 1)
_WEIGHTS = np.exp(-0.5 * GRID**2)
_WEIGHTS /= _WEIGHTS.sum()


@dataclass(eq=False)
class ChannelStats:
    """Per channel: X_c = clip(N(mean_c, std_c^2), lo_c, hi_c) (arrays of the channel count), or, when `values` is
    set, a function of it: values[c, g] = f_c(clip(mean_c + std_c GRID_g, lo_c, hi_c)). `base` is the plain
    ChannelStats that function reads, so that x * sigmoid(x) is seen as one variable, not a product of two."""

    mean: np.ndarray
    std: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    values: np.ndarray | None = None
    base: ChannelStats | None = None
    exact: tuple[np.ndarray, np.ndarray] | None = None  # closed-form (mean, variance) of the function, when known

    def range(self, k: float) -> tuple[float, float]:
        if self.values is None:
            low = np.clip(self.mean - k * self.std, self.lo, self.hi)
            high = np.clip(self.mean + k * self.std, self.lo, self.hi)
            return float(low.min()), float(high.max())
        # the image of the base's k-sigma interval: f at the grid points inside it and at its ends
        inside = self.values[:, np.abs(GRID) <= k]
        ends = np.concatenate([_interpolate(self.values, -k), _interpolate(self.values, k)])
        return float(min(inside.min(), ends.min())), float(max(inside.max(), ends.max()))

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        """True (mean, variance) of each channel: the clipped normal's closed form, or f's (closed form or grid)."""
        if self.values is None:
            return clipped_normal_moments(self.mean, self.std, self.lo, self.hi)
        if self.exact is not None:
            return self.exact
        mean = self.values @ _WEIGHTS
        return mean, np.maximum(np.square(self.values) @ _WEIGHTS - mean**2, 0.0)

    def support(self) -> tuple[np.ndarray, np.ndarray]:
        """Hard bounds of each channel (for a function: its extremes over the grid, i.e. within 10 sigma)."""
        if self.values is None:
            return self.lo, self.hi
        return self.values.min(axis=1), self.values.max(axis=1)

    def root(self) -> ChannelStats:
        return self.base if self.base is not None else self

    def as_function(self) -> ChannelStats:
        """The same distribution tabulated on the grid (f = identity), based on self."""
        if self.values is not None:
            return self
        grid = np.clip(self.mean[:, None] + self.std[:, None] * GRID, self.lo[:, None], self.hi[:, None])
        return ChannelStats(self.mean, self.std, self.lo, self.hi, grid, base=self)

    def mapped(self, values: np.ndarray, exact=None) -> ChannelStats:
        """g(self) given g's values on the grid: same base, new function."""
        f = self.as_function()
        return ChannelStats(f.mean, f.std, f.lo, f.hi, values, base=f.root(), exact=exact)

    def gaussian(self) -> ChannelStats:
        """A plain clipped Gaussian with this tensor's true moments and hard bounds (drops the function's shape)."""
        if self.values is None:
            return self
        (mean, var), (lo, hi) = self.moments(), self.support()
        return ChannelStats(mean, np.sqrt(var), lo, hi)

    def take(self, index) -> ChannelStats:
        values = None if self.values is None else self.values[index]
        return ChannelStats(self.mean[index], self.std[index], self.lo[index], self.hi[index], values)


def _interpolate(values: np.ndarray, z: float) -> np.ndarray:
    """values at z (per channel) by linear interpolation between grid points; the grid's edge beyond it."""
    position = np.clip((z + GRID_Z) / GRID_STEP, 0.0, len(GRID) - 1.0)
    i = min(int(position), len(GRID) - 2)
    t = position - i
    return values[:, i] * (1.0 - t) + values[:, i + 1] * t


_erf = np.vectorize(math.erf, otypes=[float])


def _cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))


def _pdf(z: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * np.square(z)) / math.sqrt(2.0 * math.pi)


def clipped_normal_moments(mu, sigma, a, b) -> tuple[np.ndarray, np.ndarray]:
    """(E[X], Var[X]) of X = clip(N(mu, sigma^2), a, b), elementwise; a, b may be infinite, sigma may be 0."""
    mu, sigma, a, b = (np.asarray(v, dtype=np.float64) for v in (mu, sigma, a, b))
    safe_sigma = np.where(sigma > 0, sigma, 1.0)
    alpha, beta = (a - mu) / safe_sigma, (b - mu) / safe_sigma
    finite_a, finite_b = np.isfinite(a), np.isfinite(b)
    # an infinite bound contributes nothing (a Phi(alpha) -> 0 and alpha phi(alpha) -> 0 as a -> -inf): zero it
    # before multiplying, so no inf * 0 appears
    a0, b0 = np.where(finite_a, a, 0.0), np.where(finite_b, b, 0.0)
    alpha0, beta0 = np.where(finite_a, alpha, 0.0), np.where(finite_b, beta, 0.0)
    cdf_a, cdf_b = _cdf(alpha), _cdf(beta)
    pdf_a, pdf_b = _pdf(alpha), _pdf(beta)
    tail_a, tail_b = a0 * cdf_a, b0 * (1.0 - cdf_b)
    tail_a2, tail_b2 = a0 * a0 * cdf_a, b0 * b0 * (1.0 - cdf_b)
    edge = alpha0 * pdf_a - beta0 * pdf_b
    inside = cdf_b - cdf_a
    mean = tail_a + tail_b + mu * inside + sigma * (pdf_a - pdf_b)
    second = tail_a2 + tail_b2 + (mu**2 + sigma**2) * inside + 2 * mu * sigma * (pdf_a - pdf_b) + sigma**2 * edge
    deterministic = np.clip(mu, a, b)
    mean = np.where(sigma > 0, mean, deterministic)
    variance = np.where(sigma > 0, np.maximum(second - mean**2, 0.0), 0.0)
    return mean, variance


def normal_partial_moments(mu, sigma, a, b, order: int) -> list[np.ndarray]:
    """[E[X^n 1{a < X < b}] for n = 0..order], X ~ N(mu, sigma^2), sigma > 0, a < b (a, b may be infinite).

    With Z standard, alpha = (a - mu) / sigma, beta = (b - mu) / sigma and I_j = int_alpha^beta z^j phi(z) dz:
    I_0 = Phi(beta) - Phi(alpha), I_1 = phi(alpha) - phi(beta),
    I_j = (j - 1) I_{j-2} + alpha^{j-1} phi(alpha) - beta^{j-1} phi(beta)   (integration by parts),
    and E[X^n 1{...}] = sum_j C(n, j) mu^{n-j} sigma^j I_j.
    """
    mu, sigma, a, b = (np.asarray(v, dtype=np.float64) for v in (mu, sigma, a, b))
    alpha, beta = (a - mu) / sigma, (b - mu) / sigma
    # z^j phi(z) -> 0 at an infinite bound: evaluate the boundary terms at 0 there and zero them
    alpha0, beta0 = np.where(np.isfinite(alpha), alpha, 0.0), np.where(np.isfinite(beta), beta, 0.0)
    pdf_a = np.where(np.isfinite(alpha), _pdf(alpha0), 0.0)
    pdf_b = np.where(np.isfinite(beta), _pdf(beta0), 0.0)
    standard = [_cdf(beta) - _cdf(alpha), pdf_a - pdf_b]
    for j in range(2, order + 1):
        standard.append((j - 1) * standard[j - 2] + alpha0 ** (j - 1) * pdf_a - beta0 ** (j - 1) * pdf_b)
    return [sum(math.comb(n, j) * mu ** (n - j) * sigma**j * standard[j] for j in range(n + 1))
            for n in range(order + 1)]


def hardswish_moments(mu, sigma) -> tuple[np.ndarray, np.ndarray]:
    """(E, Var) of hardswish(X) = X clip(X + 3, 0, 6) / 6, X ~ N(mu, sigma^2): 0 below -3, X(X + 3)/6 on
    (-3, 3), X above 3, so E = (M2 + 3 M1)/6 + M1', E[h^2] = (M4 + 6 M3 + 9 M2)/36 + M2' with M the partial
    moments on (-3, 3) and M' on (3, inf)."""
    m = normal_partial_moments(mu, sigma, -3.0, 3.0, 4)
    upper = normal_partial_moments(mu, sigma, 3.0, np.inf, 2)
    mean = (m[2] + 3 * m[1]) / 6 + upper[1]
    second = (m[4] + 6 * m[3] + 9 * m[2]) / 36 + upper[2]
    return mean, np.maximum(second - mean**2, 0.0)


def hardsigmoid_moments(mu, sigma, alpha: float = 0.2, beta: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(E, Var) of clip(alpha X + beta, 0, 1), X ~ N(mu, sigma^2), alpha > 0: an affine map of X clipped to
    [-beta / alpha, (1 - beta) / alpha], whose moments are the clipped normal's."""
    mean, var = clipped_normal_moments(mu, sigma, -beta / alpha, (1.0 - beta) / alpha)
    return alpha * mean + beta, alpha**2 * var
