"""compress/repair (Neuron Merging, UDFC, lmmse, joint quantization) and the lmmse selection of compress/select."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dfp_deploy.analysis import analyze
from dfp_deploy.compress.bnfold import folded_filters
from dfp_deploy.compress.prune import prune_model
from dfp_deploy.compress.quantize.bias_correction import remove_output_shift
from dfp_deploy.compress.quantize.weights import quantize_weight
from dfp_deploy.compress.repair.apply import METHODS, RepairOptions, build_reconstruction, compress_model
from dfp_deploy.compress.repair.moments import activation_moments, cosine_gram
from dfp_deploy.compress.repair.nm import cosine_matrix
from dfp_deploy.compress.repair.sites import find_site
from dfp_deploy.compress.repair.udfc import (guard_merges, nnls_rows, udfc_prune_partners, udfc_quant_scales,
                                             udfc_vectors)
from dfp_deploy.compress.select.lmmse import greedy_elimination, select_plan
from dfp_deploy.compress.select.plan import kept_count
from dfp_deploy.core.errors import InputError
from dfp_deploy.core.types import PrunePlan

P, Q = 1, 3  # pruned channel p is an exact positive multiple of kept channel q
RAW_RATIO, BN_RATIO = 2.0, 1.5  # W_p = 2 W_q; after BN, y_p = 1.5 y_q


class ConvBnReluConv(nn.Module):
    def __init__(self, cin: int = 3, mid: int = 6, cout: int = 5, activation: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.act = activation or nn.ReLU()
        self.conv2 = nn.Conv2d(mid, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))


class DepthwiseBlock(nn.Module):
    """expand (1x1) → BN → ReLU → depthwise 3x3 → BN → ReLU → project (1x1)."""

    def __init__(self, cin: int = 4, mid: int = 8, cout: int = 4) -> None:
        super().__init__()
        self.expand = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.dw = nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.project = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)

    def forward(self, x):
        x = torch.relu(self.bn1(self.expand(x)))
        x = torch.relu(self.bn2(self.dw(x)))
        return self.bn3(self.project(x))


class Residual(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        s = torch.relu(self.bn1(self.conv1(x)))
        s = torch.relu(s + self.bn2(self.conv2(s)))
        return self.head(torch.relu(self.bn3(self.conv3(s))))


def _random_bn(bn: nn.BatchNorm2d, gen: torch.Generator) -> None:
    c = bn.num_features
    with torch.no_grad():
        bn.weight.copy_(0.5 + torch.rand(c, generator=gen))
        bn.bias.copy_(0.3 * torch.randn(c, generator=gen))
        bn.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
        bn.running_var.copy_(0.5 + torch.rand(c, generator=gen))


def _seeded(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / math.sqrt(m.weight[0].numel()))
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            elif isinstance(m, nn.BatchNorm2d):
                _random_bn(m, gen)
    return module.eval()


def _make_multiple(conv: nn.Conv2d, bn: nn.BatchNorm2d, p: int = P, q: int = Q) -> None:
    """Channel p = exact positive multiple of q, with BN statistics consistent with it:
    W_p = r W_q, μ_p = r μ_q, σ_p = r σ_q, γ_p = λ γ_q, β_p = λ β_q  ⇒  y_p = λ y_q."""
    r, lam = RAW_RATIO, BN_RATIO
    with torch.no_grad():
        conv.weight[p] = r * conv.weight[q]
        bn.running_mean[p] = r * bn.running_mean[q]
        bn.running_var[p] = r * r * (bn.running_var[q] + bn.eps) - bn.eps
        bn.weight[p] = lam * bn.weight[q]
        bn.bias[p] = lam * bn.bias[q]


def _toy(seed: int = 0, **kw) -> tuple[nn.Module, object]:
    model = _seeded(ConvBnReluConv(**kw), seed)
    _make_multiple(model.conv1, model.bn1)
    return model, analyze(model, torch.zeros(1, 3, 8, 8))


def _without(channel: int, channels: int = 6) -> PrunePlan:
    return PrunePlan(keep={"conv1": tuple(c for c in range(channels) if c != channel)})


def _inputs(seed: int = 1, n: int = 16, c: int = 3, hw: int = 8) -> torch.Tensor:
    return torch.randn(n, c, hw, hw, generator=torch.Generator().manual_seed(seed))


def _max_err(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return float((ya - yb).abs().max() / ya.abs().max())


def _mixing(model, analysis, plan, **kwargs) -> dict[str, torch.Tensor]:
    return build_reconstruction(model, analysis, plan, **kwargs).mixing


def nm_scale_from_raw(raw_ratio: float, gamma_p: float, sigma_p: float, gamma_q: float, sigma_q: float) -> float:
    """Neuron Merging's z for W_p = raw_ratio·W_q: z = raw_ratio·γ_p·σ_q/(γ_q·σ_p) (σ = sqrt(var + eps))."""
    return raw_ratio * gamma_p * sigma_q / (gamma_q * sigma_p)


# --- exact merging ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,options", [
    ("neuron_merging", {}),
    ("udfc", {"alpha": 0.0}), ("udfc", {"alpha": 0.01}), ("udfc", {"alpha": 1.0}), ("udfc", {"alpha": 100.0}),
])
def test_merging_an_exact_multiple_restores_the_output_exactly(method, options):
    model, analysis = _toy()
    plain = prune_model(model, analysis, _without(P))
    merged = compress_model(model, analysis, _without(P), method=method, options=RepairOptions(**options))
    x = _inputs()
    assert _max_err(model, plain, x) > 1e-2  # pruning alone does hurt
    assert _max_err(model, merged, x) < 1e-5
    mixing = _mixing(model, analysis, _without(P), method=method, options=RepairOptions(**options))["conv1"]
    assert mixing[P, Q - 1].item() == pytest.approx(BN_RATIO, rel=1e-6)  # column of q among kept (0,2,3,4,5)


def test_lmmse_recovers_an_exact_multiple_from_bn_statistics_alone():
    model, analysis = _toy()
    merged = compress_model(model, analysis, _without(P), method="lmmse")
    mixing = _mixing(model, analysis, _without(P), method="lmmse")["conv1"]
    assert mixing[P, Q - 1].item() == pytest.approx(BN_RATIO, rel=1e-3)
    assert _max_err(model, merged, _inputs()) < 5e-3


def test_neuron_merging_scale_needs_sigma_not_variance():
    model, analysis = _toy()
    bn = model.bn1
    sigma = torch.sqrt(bn.running_var + bn.eps)
    g = bn.weight.detach()
    right = nm_scale_from_raw(RAW_RATIO, g[P].item(), sigma[P].item(), g[Q].item(), sigma[Q].item())
    wrong = nm_scale_from_raw(RAW_RATIO, g[P].item(), (sigma[P] ** 2).item(), g[Q].item(), (sigma[Q] ** 2).item())
    assert right == pytest.approx(BN_RATIO, rel=1e-6)
    assert abs(wrong - right) > 0.5
    plan = _without(P)
    outputs = {}
    for label, z in (("sigma", right), ("var", wrong)):
        mixing = torch.zeros(6, 5, dtype=torch.float64)
        mixing[[0, 2, 3, 4, 5], torch.arange(5)] = 1.0
        mixing[P, Q - 1] = z
        outputs[label] = _max_err(model, prune_model(model, analysis, plan, {"conv1": mixing}), _inputs())
    assert outputs["sigma"] < 1e-5
    assert outputs["var"] > 1e-2


def test_depthwise_site_merges_exactly_when_both_stages_are_proportional():
    model = _seeded(DepthwiseBlock(), 3)
    p, q, t = 2, 5, 1.25
    _make_multiple(model.expand, model.bn1, p, q)  # a_p = 1.5 a_q
    with torch.no_grad():  # dw stage: κ_p·1.5 ∝ κ_q and biases in the same ratio so that u_p = t u_q
        model.dw.weight[p] = model.dw.weight[q]
        model.bn2.running_mean[p] = BN_RATIO * model.bn2.running_mean[q]
        model.bn2.running_var[p] = BN_RATIO ** 2 * (model.bn2.running_var[q] + model.bn2.eps) - model.bn2.eps
        model.bn2.weight[p] = t * model.bn2.weight[q]
        model.bn2.bias[p] = t * model.bn2.bias[q]
    analysis = analyze(model, torch.zeros(1, 4, 6, 6))
    site, why = find_site(model, analysis, "expand")
    assert site is not None and site.depthwise == "dw", why
    plan = PrunePlan(keep={"expand": tuple(c for c in range(8) if c != p)})
    x = _inputs(c=4, hw=6)
    assert _max_err(model, prune_model(model, analysis, plan), x) > 1e-2
    for method in ("neuron_merging", "udfc"):
        merged = compress_model(model, analysis, plan, method=method)
        assert _max_err(model, merged, x) < 1e-4, method  # float32 round-off through two stages
    mixing = _mixing(model, analysis, plan, method="udfc")["expand"]
    assert mixing[p, q - 1].item() == pytest.approx(t, rel=1e-6)


# --- never worse than plain pruning (analytic) ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(20))
def test_udfc_merge_never_raises_the_bound_above_plain_pruning(seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 27, generator=gen, dtype=torch.float64)
    b = torch.randn(12, generator=gen, dtype=torch.float64)
    alpha = [0.0, 0.01, 1.0][seed % 3]
    v = udfc_vectors(w, b, alpha)
    v_p, v_k = v[:5], v[5:]
    partner, scale, loss = udfc_prune_partners(v_p, v_k)
    plain = (v_p ** 2).sum(dim=1)
    assert bool((loss <= plain + 1e-12).all())
    for i in range(5):
        if partner[i] >= 0:
            assert scale[i] > 0
            direct = ((v_p[i] - scale[i] * v_k[partner[i]]) ** 2).sum()
            assert loss[i].item() == pytest.approx(direct.item(), rel=1e-9, abs=1e-12)
    # the non-negative multi-channel form contains every single-partner merge, so it can only do better
    coeffs = nnls_rows(v_k @ v_k.T, v_p @ v_k.T)
    multi = ((v_p - coeffs @ v_k) ** 2).sum(dim=1)
    assert bool((coeffs >= 0).all())
    assert bool((multi <= loss + 1e-9).all())


def test_udfc_vector_form_bound_holds_and_is_tight():
    """|a_p − Σ s_k a_k| ≤ |y_p − Σ s_k y_k| + Σ s_k relu(−y_k) for s ≥ 0 (docs/methods/reconstruction.md, 2): on random
    pre-activations, and with equality on the docstring's case."""
    relu = torch.relu
    gen = torch.Generator().manual_seed(0)
    y_p = 2 * torch.randn(10000, generator=gen, dtype=torch.float64)
    y_k = 2 * torch.randn(10000, 4, generator=gen, dtype=torch.float64)
    s = torch.rand(4, generator=gen, dtype=torch.float64) * 2
    error = (relu(y_p) - relu(y_k) @ s).abs()
    bound = (y_p - y_k @ s).abs() + relu(-y_k) @ s
    assert bool((error <= bound + 1e-12).all())
    assert bool((error > (y_p - y_k @ s).abs() + 1e-9).any())  # the extra term is needed: Lipschitz alone fails
    one, two = torch.tensor([1.0], dtype=torch.float64), torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    ones = torch.ones(2, dtype=torch.float64)
    assert (relu(one) - relu(two) @ ones).abs().item() == 1.0
    assert ((one - two @ ones).abs() + relu(-two) @ ones).item() == 1.0


def residual_error(cov: torch.Tensor, gram: torch.Tensor, keep: list[int], jitter: float = 1e-9) -> float:
    """E(K) = tr(G (C − C_{:,K} C_KK^{-1} C_{K,:})) computed directly: the oracle for greedy_elimination's downdates."""
    if not keep:
        return float((gram * cov).sum())
    idx = torch.as_tensor(keep, dtype=torch.long)
    ckk = cov[idx][:, idx]
    ckk = ckk + jitter * ckk.diagonal().mean().clamp_min(1e-300) * torch.eye(len(keep), dtype=cov.dtype)
    explained = cov[:, idx] @ torch.linalg.solve(ckk, cov[idx, :])
    return float((gram * (cov - explained)).sum())


@pytest.mark.parametrize("seed", range(10))
def test_lmmse_error_never_exceeds_mean_only_or_plain_pruning(seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(10, 18, generator=gen, dtype=torch.float64)
    corr = cosine_matrix(w, w)
    mean = torch.randn(10, generator=gen, dtype=torch.float64)
    std = 0.5 + torch.rand(10, generator=gen, dtype=torch.float64)
    expect, cov = activation_moments(mean, std, corr, "relu")
    consumer = torch.randn(7, 10, generator=gen, dtype=torch.float64)
    gram = consumer.T @ consumer
    keep = [0, 2, 3, 5, 7, 8]
    pruned = [1, 4, 6, 9]
    lmmse = residual_error(cov, gram, keep)
    mean_only = float((gram[pruned][:, pruned] * cov[pruned][:, pruned]).sum())
    second = cov + expect[:, None] * expect[None, :]
    plain = float((gram[pruned][:, pruned] * second[pruned][:, pruned]).sum())
    assert lmmse <= mean_only + 1e-12 <= plain + 1e-12


def test_activation_moments_match_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    cov = a @ a.T + torch.eye(4, dtype=torch.float64)
    sd = cov.diagonal().sqrt()
    corr = cov / sd[:, None] / sd[None, :]
    mean = torch.tensor([0.5, -0.3, 1.0, 4.0], dtype=torch.float64)
    std = torch.tensor([1.0, 0.7, 2.0, 3.0], dtype=torch.float64)
    y = mean + (torch.randn(400_000, 4, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(corr).T) * std
    for activation, f in (("relu", lambda t: t.clamp_min(0)), ("relu6", lambda t: t.clamp(0, 6))):
        expect, cov_a = activation_moments(mean, std, corr, activation)
        sample = f(y)
        assert torch.allclose(expect, sample.mean(0), atol=0.01)
        assert torch.allclose(cov_a, torch.cov(sample.T), rtol=0.01, atol=0.01)


def test_greedy_drop_formula_matches_brute_force():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(9, 9, generator=gen, dtype=torch.float64)
    cov = a @ a.T + 0.1 * torch.eye(9, dtype=torch.float64)
    g = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    gram = g.T @ g
    path = greedy_elimination(cov, gram, list(range(9, 2, -1)))
    keep = list(range(9))
    for kept, err in path[1:]:
        options = {j: residual_error(cov, gram, [c for c in keep if c != j]) for j in keep}
        best = min(options, key=options.get)
        assert sorted(kept) == sorted(c for c in keep if c != best)
        # E comes from the downdated inverse (regularised with the previous set's 1e-9 jitter): agrees to ~1e-8
        assert err == pytest.approx(options[best], rel=1e-6)
        keep = kept


# --- quantization compensation ------------------------------------------------------------------------------------

def _calibrated_toy(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """BN statistics that are the true statistics of N(0, I) inputs, so the data-free models are honest."""
    model = _seeded(ConvBnReluConv(cin=4, mid=12, cout=8), seed)
    x = torch.randn(64, 4, 10, 10, generator=torch.Generator().manual_seed(100 + seed))
    for bn in (model.bn1, model.bn2):
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average = exact batch statistics
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval(), x


def _consumer_error(model: nn.Module, compressed: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((model(x) - compressed(x)) ** 2).mean())


def test_quantization_compensation_reduces_next_layer_error_on_average():
    # iid N(0, I) inputs: UDFC's isotropic assumption holds; lmmse with round-to-nearest (its spatial prior for
    # Hessian rounding assumes natural images and is tested separately below)
    options = {"udfc": {}, "lmmse": {"rounding": "nearest"}}
    gains = {method: [] for method in options}
    for seed in range(8):
        model, x = _calibrated_toy(seed)
        analysis = analyze(model, x[:1])
        rtn = compress_model(model, analysis, PrunePlan(), method="none", weight_bits=3)
        base = _consumer_error(model, rtn, x)
        for method, kw in options.items():
            comp = compress_model(model, analysis, PrunePlan(), method=method, weight_bits=3, **kw)
            gains[method].append(base - _consumer_error(model, comp, x))
    for method, values in gains.items():
        assert sum(values) / len(values) > 0, (method, values)


def _smooth_inputs(seed: int, n: int = 64, c: int = 4, hw: int = 10) -> torch.Tensor:
    """Spatially correlated, positive-mean inputs (like post-ReLU feature maps of natural images)."""
    noise = torch.randn(n, c, hw + 4, hw + 4, generator=torch.Generator().manual_seed(seed))
    blur = torch.ones(c, 1, 5, 5) / 5.0
    return 1.0 + torch.nn.functional.conv2d(noise, blur, groups=c)


def test_hessian_rounding_helps_when_inputs_are_smooth():
    gains = []
    for seed in range(6):
        model = _seeded(ConvBnReluConv(cin=4, mid=12, cout=8), seed)
        x = _smooth_inputs(200 + seed)
        for bn in (model.bn1, model.bn2):
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        with torch.no_grad():
            model(x)
        model.eval()
        analysis = analyze(model, x[:1])
        near = compress_model(model, analysis, PrunePlan(), method="lmmse", weight_bits=3, rounding="nearest")
        hess = compress_model(model, analysis, PrunePlan(), method="lmmse", weight_bits=3, rounding="hessian")
        gains.append(_consumer_error(model, near, x) - _consumer_error(model, hess, x))
    assert sum(gains) / len(gains) > 0, gains


@pytest.mark.parametrize("seed", range(10))
def test_udfc_quant_scale_beats_no_rescale_on_its_objective(seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 36, generator=gen, dtype=torch.float64)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    from dfp_deploy.compress.quantize.weights import quantize_weight

    w_q = quantize_weight(w, 3)
    alpha_q = 0.01

    def objective(s):
        return ((w - s[:, None] * w_q) ** 2).sum(dim=1) + alpha_q * b ** 2 * (1 - s) ** 2

    s = udfc_quant_scales(w, w_q, b, alpha_q)
    assert bool((objective(s) < objective(torch.ones(6, dtype=torch.float64))).all())


# --- structure, selection, errors, determinism --------------------------------------------------------------------

def test_residual_groups_get_plain_selection_with_a_reason():
    model = _seeded(Residual(), 0)
    analysis = analyze(model, torch.zeros(1, 4, 6, 6))
    residual = [g for g in analysis.groups if g.residual]
    assert residual
    site, why = find_site(model, analysis, residual[0].name)
    assert site is None and "residual" in why
    site, why = find_site(model, analysis, "conv3")
    assert site is not None and site.activation == "relu", why


def test_select_plan_uniform_and_mac_budget():
    model = _seeded(Residual(c=8), 1)
    analysis = analyze(model, torch.zeros(1, 8, 6, 6))
    plan, skipped = select_plan(model, analysis, ratio=0.5)
    assert set(plan.keep) == {"conv3"} and len(plan.keep["conv3"]) == kept_count(8, 0.5)
    assert all("residual" in why for why in skipped.values())
    macs_plan, _ = select_plan(model, analysis, ratio=0.5, budget="macs")
    group = analysis.group("conv3")
    saved = (8 - len(macs_plan.keep["conv3"])) * group.macs / 8
    assert saved >= (8 - kept_count(8, 0.5)) * group.macs / 8


def test_selection_prefers_the_redundant_channel():
    model, analysis = _toy()
    plan, _ = select_plan(model, analysis, ratio=1 / 6 + 1e-3)
    assert len(plan.keep["conv1"]) == 5
    assert P not in plan.keep["conv1"] or Q not in plan.keep["conv1"]


def test_compress_is_deterministic():
    model, analysis = _toy(seed=5)
    plan = _without(0)
    for method in METHODS:
        a = compress_model(model, analysis, plan, method=method, weight_bits=4).state_dict()
        b = compress_model(model, analysis, plan, method=method, weight_bits=4).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), method


def _levels_per_row(w: torch.Tensor) -> int:
    """Most distinct values in one output channel's weights."""
    return max(len(torch.unique(row)) for row in w.detach().reshape(w.shape[0], -1))


@pytest.mark.parametrize("method", METHODS)
def test_layer_bits_override_one_layer_and_leave_the_rest_at_weight_bits(method):
    model, analysis = _toy(seed=3)
    plain = compress_model(model, analysis, _without(0), method=method, weight_bits=3)
    mixed = compress_model(model, analysis, _without(0), method=method, weight_bits=3, layer_bits={"conv2": 8})
    # 3 bits: levels -3..3 per channel; conv2 at 8 bits has far more distinct values than 7
    assert _levels_per_row(mixed.conv1.weight) <= 7 and _levels_per_row(plain.conv2.weight) <= 7
    assert _levels_per_row(mixed.conv2.weight) > 7
    assert torch.equal(mixed.conv1.weight, plain.conv1.weight)
    # every layer overridden to 8 bits is exactly weight_bits=8: the repair also sees each producer's own bits
    all8 = compress_model(model, analysis, _without(0), method=method, weight_bits=3,
                            layer_bits={"conv1": 8, "conv2": 8}).state_dict()
    w8 = compress_model(model, analysis, _without(0), method=method, weight_bits=8).state_dict()
    assert all(torch.equal(all8[k], w8[k]) for k in w8)
    with pytest.raises(InputError, match="bits of layer conv2"):
        compress_model(model, analysis, PrunePlan(), method=method, weight_bits=3, layer_bits={"conv2": 1})


def test_bad_options_raise_input_errors():
    model, analysis = _toy()
    with pytest.raises(InputError, match="compress.reconstruct"):
        compress_model(model, analysis, PrunePlan(), method="magic")
    with pytest.raises(InputError, match="weight_bits"):
        compress_model(model, analysis, PrunePlan(), method="udfc", weight_bits=1)
    with pytest.raises(InputError, match="alpha"):
        RepairOptions(alpha=-1.0)
    with pytest.raises(InputError, match="merge_grid_growth"):
        RepairOptions(merge_grid_growth=-0.5)
    with pytest.raises(InputError, match="spatial_rho"):
        RepairOptions(spatial_rho=1.0)
    with pytest.raises(InputError, match="budget"):
        select_plan(model, analysis, ratio=0.3, budget="latency")


def test_folded_filters_reproduce_the_bn_output():
    model, _ = _toy()
    w, b = folded_filters(model.conv1.weight, None, model.bn1)
    x = _inputs(n=2)
    with torch.no_grad():
        y = model.bn1(model.conv1(x))
        patches = torch.nn.functional.unfold(x, 3, padding=1)  # [N, D, L]
        direct = torch.einsum("cd,ndl->ncl", w.float(), patches) + b.float()[None, :, None]
    assert torch.allclose(direct.reshape(y.shape), y, atol=1e-5)


def test_activation_moments_accept_grad_tensors_and_memoise():
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    corr = cosine_gram(rows)
    mean = torch.randn(6, generator=gen, dtype=torch.float64).requires_grad_()
    std = (torch.rand(6, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    first = activation_moments(mean, std, corr, "relu6")
    second = activation_moments(mean.detach(), std.detach(), corr, "relu6")
    assert not first[1].requires_grad
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    active = torch.tensor([True, False, True, True, False, True])
    _, sub = activation_moments(mean, std, corr, "relu6", active=active)
    pair = active[:, None] & active[None, :]
    assert torch.allclose(sub[pair], first[1][pair], rtol=1e-12, atol=1e-15)



@pytest.mark.parametrize("method", ["udfc", "lmmse"])
def test_folded_weights_have_standard_strides(method):
    """A 1×1 consumer's folded weight once kept channels-last strides (still "contiguous"): convs then produced
    channels-last activations and the dynamic-batch ONNX export broke (EfficientNet-Lite0)."""
    model = _seeded(nn.Sequential(nn.Conv2d(8, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
                                  nn.Conv2d(12, 16, 1, bias=False), nn.BatchNorm2d(16)), 0)
    analysis = analyze(model, torch.zeros(1, 8, 4, 4))
    group = analysis.groups[0].name
    compressed = compress_model(model, analysis, PrunePlan(keep={group: tuple(range(0, 12, 2))}), method=method)
    assert compressed[3].weight.shape == (16, 6, 1, 1)
    for name, p in compressed.named_parameters():
        assert p.stride() == torch.empty(p.shape).stride(), (name, p.stride())
    with torch.no_grad():
        assert compressed(torch.randn(2, 8, 4, 4)).is_contiguous()


# --- merges into quantized consumers ----------------------------------------------------------------------------------

def test_guard_keeps_only_merges_that_leave_the_rounding_grid_alone():
    # two kept channels (0, 1), two pruned ones merged into channel 0; one consumer row, one tap:
    # without merges the row is [1, 2] (grid set by 2); merging p=2 (column 3, scale 0.2) gives column 0 = 1.6 (fits),
    # then p=3 (column 1, scale 1) would give 2.6 > 2: dropped at growth 0, kept at growth 0.5 (limit 3)
    w = torch.tensor([[[1.0], [2.0], [3.0], [1.0]]], dtype=torch.float64)  # [O=1, C=4, T=1]
    mixing = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.2, 0.0], [1.0, 0.0]], dtype=torch.float64)
    priority = torch.tensor([0.0, 0.0, 2.0, 1.0])
    tight = guard_merges(mixing, [0, 1], [w], priority, 0.0)
    assert torch.equal(tight, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.2, 0.0], [0.0, 0.0]], dtype=torch.float64))
    assert torch.equal(guard_merges(mixing, [0, 1], [w], priority, 0.5), mixing)
    assert torch.equal(guard_merges(mixing, [0, 1], [w], priority, math.inf), mixing)
    # the order matters: p=3 first takes all the room (column 0 = 2, the limit), then p=2 no longer fits
    swapped = guard_merges(mixing, [0, 1], [w], torch.tensor([0.0, 0.0, 1.0, 2.0]), 0.0)
    assert torch.equal(swapped, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("growth", [0.0, 0.25])
def test_guarded_udfc_never_widens_a_quantized_consumer_row_beyond_the_growth(growth):
    gen = torch.Generator().manual_seed(3)
    model = _seeded(ConvBnReluConv(mid=12), 3)
    analysis = analyze(model, torch.zeros(1, 3, 8, 8))
    keep = (0, 2, 5, 7, 9, 11)
    plan = PrunePlan(keep={"conv1": keep})
    with torch.no_grad():
        model.conv1.weight[1] = 3.0 * model.conv1.weight[0] + 0.1 * torch.randn(model.conv1.weight[0].shape,
                                                                                  generator=gen)
    unguarded = RepairOptions(merge_grid_growth=math.inf)
    free = _mixing(model, analysis, plan, method="udfc", weight_bits=4, options=unguarded)["conv1"]
    kept_only = torch.zeros_like(free)
    kept_only[list(keep)] = free[list(keep)]  # the kept columns with UDFC's quantization rescale s', no merges
    selected = torch.einsum("oc...,ck->ok...", model.conv2.weight.detach().double(), kept_only).abs().amax(dim=(1, 2, 3))
    options = RepairOptions(merge_grid_growth=growth)
    guarded = _mixing(model, analysis, plan, method="udfc", weight_bits=4, options=options)["conv1"]
    fp32 = _mixing(model, analysis, plan, method="udfc", options=options)["conv1"]
    merged = torch.einsum("oc...,ck->ok...", model.conv2.weight.detach().double(), guarded)
    assert (merged.abs().amax(dim=(1, 2, 3)) <= (1 + growth) * selected * (1 + 1e-12)).all()
    unguarded = torch.einsum("oc...,ck->ok...", model.conv2.weight.detach().double(), free)
    assert (unguarded.abs().amax(dim=(1, 2, 3)) > (1 + growth) * selected).any()  # the guard had work to do
    assert torch.equal(guarded[list(keep)], free[list(keep)])  # kept rows (s') untouched
    assert ((guarded == 0) | (guarded == free)).all()  # merges are kept whole or dropped
    assert not torch.equal(fp32, guarded) and torch.count_nonzero(fp32) >= torch.count_nonzero(guarded)


@pytest.mark.parametrize("through_bn", [False, True])
def test_bias_correction_removes_the_exact_mean_shift_of_a_constant_input(through_bn):
    """Exact case: with a constant input x = m (no spread), the quantized layer's output error is exactly
    (Q(W) − W)·m, so after bias correction the quantized layer reproduces the float output (through its own bias
    or through the BN after it)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 3, padding=0, bias=not through_bn).double()
    modules = {"conv": conv}
    bn_name = None
    if through_bn:
        bn = nn.BatchNorm2d(3).double().eval()
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        modules["bn"], bn_name = bn, "bn"
    head = (lambda y: modules["bn"](y)) if through_bn else (lambda y: y)
    mean = torch.tensor([0.5, 1.5, 0.0, 2.0], dtype=torch.float64)
    x = mean[None, :, None, None].expand(1, 4, 5, 5).contiguous()
    with torch.no_grad():
        want = head(conv(x))
        full = conv.weight.detach().clone()
        conv.weight.copy_(quantize_weight(full, 3))
        before = (head(conv(x)) - want).abs().max().item()
        remove_output_shift(conv, bn_name, modules, full, mean)
        after = (head(conv(x)) - want).abs().max().item()
    assert before > 1e-2  # 3-bit rounding moved the output
    assert after < 1e-10
