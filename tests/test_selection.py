"""The recipe's channel selection: score rankings, lmmse ranking, MAC allocation, and their validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dfp_deploy.analysis import analyze, count_macs
from dfp_deploy.compress.prune import prune_model
from dfp_deploy.compress.select.plan import make_plan
from dfp_deploy.compress.select.planner import ChannelPlanner
from dfp_deploy.core.errors import InputError
from dfp_deploy.models import load_model


def _stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights with BatchNorm statistics that vary per channel (as in a trained net)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=gen))
                m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = _stats(load_model("cifar_resnet20").module)
    example = torch.zeros(1, 3, 32, 32)
    return model, analyze(model, example), example


def test_score_rankings_are_make_plan(resnet):
    model, analysis, _ = resnet
    planner = ChannelPlanner(model, analysis, importance="l1", round_to=2)
    assert planner.plan(0.3).keep == make_plan(model, analysis, ratio=0.3, importance="l1", round_to=2).keep


def test_lmmse_ranking_keeps_the_uniform_counts(resnet):
    model, analysis, example = resnet
    l2 = make_plan(model, analysis, ratio=0.5, include_residual=True)
    planner = ChannelPlanner(model, analysis, importance="lmmse", include_residual=True)
    plan = planner.plan(0.5)
    assert {g: len(k) for g, k in plan.keep.items()} == {g: len(k) for g, k in l2.keep.items()}
    residual = [g.name for g in analysis.groups if g.residual and g.name in plan.keep]
    assert residual and all(plan.keep[g] == l2.keep[g] for g in residual)  # not compensable: l2 ranking
    assert any(plan.keep[g] != l2.keep[g] for g in plan.keep if g not in residual)
    assert planner.plan(0.5).keep == plan.keep  # cached selections reproduce the plan
    pruned = prune_model(model, analysis, plan)
    assert count_macs(pruned, example) == count_macs(prune_model(model, analysis, l2), example)


def test_mac_allocation_removes_at_least_the_uniform_macs(resnet):
    model, analysis, example = resnet
    base = count_macs(model, example)
    uniform = prune_model(model, analysis, ChannelPlanner(model, analysis, importance="lmmse").plan(0.4))
    plan = ChannelPlanner(model, analysis, importance="lmmse", allocation="macs").plan(0.4)
    allocated = prune_model(model, analysis, plan)
    assert count_macs(allocated, example) <= count_macs(uniform, example) < base
    assert len({len(k) / analysis.group(g).channels for g, k in plan.keep.items()}) > 1  # not uniform any more


def test_bad_combinations_are_input_errors(resnet):
    model, analysis, _ = resnet
    with pytest.raises(InputError, match="allocation: macs needs"):
        ChannelPlanner(model, analysis, importance="l2", allocation="macs")
    with pytest.raises(InputError, match="importance"):
        ChannelPlanner(model, analysis, importance="random")
    planner = ChannelPlanner(model, analysis, importance="lmmse", allocation="macs")
    with pytest.raises(InputError, match="per-group"):
        planner.plan(0.0, {"layer1*": 0.5})
