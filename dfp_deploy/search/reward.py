"""Data-free reward of a candidate plan: fidelity of the compressed model to the original, minus a latency penalty.

Fidelity on the synthetic inputs x_1..x_N (data/synthetic.py), with p_i = softmax(original logits of x_i) and
q_i = softmax(compressed logits of x_i):
    kl             = (1/N) Σ_i Σ_k p_ik (log p_ik − log q_ik)          (nats, ≥ 0, 0 iff identical predictions)
    top1_agreement = (1/N) Σ_i [argmax_k p_ik = argmax_k q_ik]        (in [0, 1])
The proxy is proxy = −kl (metric "kl", default: smooth, ranks small differences that agreement cannot see) or
proxy = top1_agreement − 1 (metric "top1"), so that 0 is always "as good as the original".

Reward of an episode:
    R = proxy − λ · max(0, ℓ / ℓ* − 1)
with ℓ the measured latency of the candidate and ℓ* the target latency. The budget itself is enforced by the
environment's action wall on a cost model, so within budget R is fidelity only (HAQ-style constraint, not AMC's
−Err·log FLOPs trade-off); the penalty only bites when the cost model was wrong and the real engine still misses
the target. λ is the recipe's `advanced.search.latency_penalty`, 10 by default: missing the target by 10 % costs 1 nat of KL,
more than the fidelity gap between most plans near one budget, so a timed plan that misses the target loses to a
plan that meets it. (With λ = 1, a ResNet-56 search for 0.7 of the original latency on an AVX-512 CPU returned a plan
that ran at 0.79: its first timed candidate missed by 13 % yet kept the best reward, and since only candidates
that could beat the best reward are timed, none was timed after it; with λ = 10, nine candidates were timed and the
plan returned ran at 0.67; docs/BENCHMARKS.md.) With no latency target (a MACs budget) R = proxy.
"""

from __future__ import annotations

import math

import torch

from dfp_deploy.core.errors import InputError

PROXY_METRICS = ("kl", "top1")


def fidelity(orig_logits: torch.Tensor, comp_logits: torch.Tensor) -> dict[str, float]:
    """KL(original ‖ compressed) averaged over inputs, and top-1 agreement (see the module docstring)."""
    if orig_logits.shape != comp_logits.shape or orig_logits.dim() != 2:
        raise InputError(f"fidelity needs two [N, classes] logit tensors of the same shape, got "
                         f"{tuple(orig_logits.shape)} and {tuple(comp_logits.shape)}")
    log_p = torch.log_softmax(orig_logits.double(), dim=1)
    log_q = torch.log_softmax(comp_logits.double(), dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
    agree = (orig_logits.argmax(dim=1) == comp_logits.argmax(dim=1)).double().mean()
    # clamp: rounding can give −1e−17 for identical logits, and the proxy must never reward a copy above 0
    return {"kl": max(0.0, float(kl)), "top1_agreement": float(agree)}


def proxy(fid: dict[str, float], metric: str = "kl") -> float:
    """The fidelity proxy (higher is better, 0 = identical to the original)."""
    if metric == "kl":
        return -fid["kl"]
    if metric == "top1":
        return fid["top1_agreement"] - 1.0
    raise InputError(f"search proxy metric '{metric}' is unknown; choose one of {list(PROXY_METRICS)}")


def reward(proxy_value: float, latency_ms: float | None = None, target_ms: float | None = None, *,
           penalty: float = 1.0) -> float:
    """R = proxy − penalty · max(0, latency/target − 1); the penalty term is 0 without a latency target."""
    if not math.isfinite(proxy_value):
        return -1e6  # a candidate whose outputs blew up is the worst possible, but must stay a finite number
    if target_ms is None or latency_ms is None:
        return float(proxy_value)
    if target_ms <= 0:
        raise InputError(f"search target latency {target_ms!r} ms must be positive")
    return float(proxy_value - penalty * max(0.0, latency_ms / target_ms - 1.0))
