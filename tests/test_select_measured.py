"""Measured activation statistics (compress/select/measured.py) and the lmmse selection that reads them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dfp_deploy.analysis import analyze, count_macs
from dfp_deploy.compress.prune import prune_model
from dfp_deploy.compress.repair.sites import find_site
from dfp_deploy.compress.select.lmmse import site_error_path
from dfp_deploy.compress.select.measured import measured_group_statistics, site_activation_moments
from dfp_deploy.compress.select.planner import ChannelPlanner
from dfp_deploy.core.errors import InputError
from dfp_deploy.models import load_model


class _Toy(nn.Module):
    """1×1 conv (3 → 3) → BatchNorm → ReLU → 1×1 conv (3 → 2): one compensable group, conv1's outputs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 2, 1)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn1(self.conv1(x))))


def _identity_bn(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)  # BN(y) = y exactly


def _toy(rows) -> tuple[_Toy, object]:
    torch.manual_seed(0)
    model = _Toy()
    with torch.no_grad():
        model.conv1.weight.copy_(torch.tensor(rows, dtype=torch.float32).reshape(3, 2, 1, 1))
    _identity_bn(model.bn1)
    model.eval()
    analysis = analyze(model, torch.zeros(1, 2, 2, 2))
    return model, analysis


def _group(analysis) -> str:
    (group,) = [g.name for g in analysis.groups if g.prunable and not g.residual]
    return group


def test_moments_are_the_exact_mean_and_centered_covariance_after_the_activation():
    model, analysis = _toy([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])  # channels x0, x1, x0 − x1
    site, why = find_site(model, analysis, _group(analysis))
    assert site is not None, why
    x = torch.tensor([[[[1.0, 2.0], [0.0, -1.0]], [[0.0, 3.0], [1.0, 1.0]]],
                      [[[4.0, -2.0], [1.0, 1.0]], [[2.0, 0.0], [-3.0, 0.5]]]])  # [2 images, 2 ch, 2, 2]
    x0, x1 = x[:, 0].reshape(-1), x[:, 1].reshape(-1)
    a = torch.stack([x0, x1, x0 - x1]).double().clamp_min(0.0)  # ReLU of each channel, 8 positions
    mean = a.mean(dim=1)
    cov = (a - mean[:, None]) @ (a - mean[:, None]).T / a.shape[1]
    moments = site_activation_moments(model, {site.group: site}, x, batch=1)  # batches must add up exactly
    got_mean, got_cov = moments[site.group]
    order = torch.as_tensor(site.bn_index)  # group channel order (here the identity)
    assert torch.allclose(got_mean, mean[order], atol=1e-12)
    assert torch.allclose(got_cov, cov[order][:, order], atol=1e-12)
    assert model.training is False


def test_a_channel_that_is_an_affine_function_of_another_is_dropped_at_zero_error():
    # c0 = x0, c1 = x1, c2 = 2·x0 + 1; with x >= 0 every pre-activation is >= 0, so after the ReLU a2 = 2·a0 + 1
    # exactly: keeping {c0, c1} or {c1, c2} loses nothing (the constant goes into the consumer's bias), dropping c1
    # loses x1's information
    model, analysis = _toy([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    with torch.no_grad():
        model.bn1.bias.copy_(torch.tensor([0.0, 0.0, 1.0]))
    site, _ = find_site(model, analysis, _group(analysis))
    x = torch.rand(64, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    measured = site_activation_moments(model, {site.group: site}, x)[site.group]
    path = site_error_path(model, analysis, site, [3, 2, 1], normalise=False, measured=measured)
    kept, error = path[2]
    assert 1 in [site.bn_index[c] for c in kept] and len(kept) == 2
    assert error == pytest.approx(0.0, abs=1e-6 * path[1][1])
    relative = site_error_path(model, analysis, site, [1], measured=measured)  # E / tr(G C)
    assert relative[1][1] > 0.05  # one channel cannot carry both x0 and x1


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = load_model("cifar_resnet20").module.eval()
    example = torch.zeros(1, 3, 32, 32)
    analysis = analyze(model, example)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    return model, analysis, example, measured_group_statistics(model, analysis, x)


def test_measured_statistics_change_the_selection_but_not_the_counts(resnet):
    model, analysis, example, measured = resnet
    modelled = ChannelPlanner(model, analysis, importance="lmmse").plan(0.5)
    planner = ChannelPlanner(model, analysis, importance="lmmse", measured=measured)
    plan = planner.plan(0.5)
    assert {g: len(k) for g, k in plan.keep.items()} == {g: len(k) for g, k in modelled.keep.items()}
    assert plan.keep != modelled.keep
    for name, kept in plan.keep.items():  # each group's kept set is the measured elimination path's
        site, _ = find_site(model, analysis, name)
        path = site_error_path(model, analysis, site, [len(kept)], measured=measured[name])
        assert tuple(sorted(path[len(kept)][0])) == kept


def test_absolute_mac_allocation_meets_the_budget_and_differs_from_the_relative_one(resnet):
    model, analysis, example, measured = resnet
    uniform = count_macs(prune_model(model, analysis, ChannelPlanner(model, analysis, importance="lmmse")
                                     .plan(0.4)), example)
    plans = {a: ChannelPlanner(model, analysis, importance="lmmse", allocation=a, measured=measured).plan(0.4)
             for a in ("macs", "macs-abs")}
    for plan in plans.values():
        assert count_macs(prune_model(model, analysis, plan), example) <= uniform
    assert plans["macs"].keep != plans["macs-abs"].keep


def test_measured_statistics_need_the_lmmse_selection(resnet):
    model, analysis, _, measured = resnet
    with pytest.raises(InputError, match="statistics: calibration needs compress.prune.importance: lmmse"):
        ChannelPlanner(model, analysis, importance="l2", measured=measured)
    with pytest.raises(InputError, match="allocation: macs-abs needs"):
        ChannelPlanner(model, analysis, importance="l2", allocation="macs-abs")


class _Inverted(nn.Module):
    """EfficientNet-Lite's expand → depthwise → project: the consumers read the depthwise stage's ReLU6 output."""

    def __init__(self):
        super().__init__()
        self.expand = nn.Conv2d(2, 4, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.project = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        h = nn.functional.relu6(self.bn1(self.expand(x)))
        return self.project(nn.functional.relu6(self.bn2(self.dw(h))))


def test_depthwise_sites_are_measured_after_the_depthwise_stage():
    torch.manual_seed(0)
    model = _Inverted().eval()
    with torch.no_grad():
        model.dw.weight.normal_(0.0, 1.0)  # large enough that the depthwise stage reaches ReLU6's ceiling
    analysis = analyze(model, torch.zeros(1, 2, 5, 5))
    site, why = find_site(model, analysis, _group(analysis))
    assert site is not None and site.depthwise == "dw", why
    x = 3.0 * torch.randn(6, 2, 5, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = torch.clamp(model.bn1(model.expand(x)), 0.0, 6.0)
        a = torch.clamp(model.bn2(model.dw(h)), 0.0, 6.0).double()
    a = a.transpose(0, 1).reshape(4, -1)[torch.as_tensor(site.dw_bn_index)]
    mean = a.mean(dim=1)
    cov = (a - mean[:, None]) @ (a - mean[:, None]).T / a.shape[1]
    got_mean, got_cov = measured_group_statistics(model, analysis, x)[site.group]
    assert torch.allclose(got_mean, mean, atol=1e-6) and torch.allclose(got_cov, cov, atol=1e-6)
    assert ((a > 0) & (a < 6)).any() and (a == 6).any()  # both ReLU6 bounds are exercised
