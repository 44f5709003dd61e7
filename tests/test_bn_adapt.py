"""Adaptive BatchNorm: the statistics become the exact input moments of the compressed model, an affine change of a
BN input is undone exactly, and bad input fails with a DfpError."""

import copy

import pytest
import torch
from torch import nn

from dfp_deploy.compress.calibrate.bn_adapt import adapt_batchnorm, self_agreement
from dfp_deploy.core.errors import DataError


def two_bn_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():  # statistics unrelated to any input, as after pruning
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-2, 2)
            bn.running_var.uniform_(0.2, 5)
            bn.weight.uniform_(0.5, 2)
            bn.bias.uniform_(-1, 1)
    return net.eval()


def inputs(n: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randn((n, 3, 8, 8), generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.3


def bn_input_moments(net: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Mean and unbiased variance of each BN's input over (N, H, W), with the model in eval mode."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
             for m in net if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return [(a.double().mean((0, 2, 3)), a.double().transpose(0, 1).reshape(a.shape[1], -1).var(1, correction=0))
            for a in seen]


def test_statistics_become_the_exact_input_moments_of_the_adapted_model():
    net, x = two_bn_net(), inputs()
    assert adapt_batchnorm(net, x) == 2
    assert not any(m.training for m in net.modules())
    # a fixed point: in eval mode, every BN's input (computed with the earlier BN's NEW statistics) has exactly the
    # moments that BN now stores
    for bn, (mean, var) in zip((net[1], net[4]), bn_input_moments(net, x)):
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-5)
    # the first BN's input does not depend on any statistic: its moments are those of the conv's output
    with torch.no_grad():
        first = net[0](x).double()
    torch.testing.assert_close(net[1].running_mean.double(), first.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)


def test_statistics_that_already_match_are_left_unchanged():
    net, x = two_bn_net(), inputs()
    adapt_batchnorm(net, x)
    state = copy.deepcopy(net.state_dict())
    adapt_batchnorm(net, x)
    for key, value in net.state_dict().items():
        if "num_batches_tracked" not in key:
            torch.testing.assert_close(value, state[key], rtol=1e-5, atol=1e-6)


def test_an_affine_change_of_a_bn_input_is_undone_exactly():
    original, x = two_bn_net(), inputs()
    for bn in (original[1], original[4]):
        bn.eps = 1e-12  # exactness holds up to eps in sqrt(var + eps)
    adapt_batchnorm(original, x)  # "the original": statistics that describe its inputs
    changed = copy.deepcopy(original)
    scale = torch.tensor([0.5, 2.0, 3.0, 1.0, 0.25, 7.0])
    shift = torch.tensor([1.0, -2.0, 0.0, 0.5, 3.0, -0.1])
    with torch.no_grad():  # a "compression" that scales and shifts conv0's output channels, then stale statistics
        changed[0].weight.mul_(scale.view(-1, 1, 1, 1))
        changed[0].bias.mul_(scale).add_(shift)
    with torch.no_grad():
        stale = (changed(x) - original(x)).abs().max().item()
    assert stale > 0.1
    adapt_batchnorm(changed, x)
    held_out = inputs(7, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(changed[1].running_mean, scale * original[1].running_mean + shift, rtol=1e-4,
                                   atol=1e-4)
        torch.testing.assert_close(changed(held_out), original(held_out), rtol=1e-4, atol=1e-4)


def test_bad_inputs_fail_with_one_line_errors():
    net = two_bn_net()
    with pytest.raises(DataError, match="at least 2 inputs"):
        adapt_batchnorm(net, inputs(1))
    with pytest.raises(DataError, match="float tensor"):
        adapt_batchnorm(net, torch.zeros((4, 3, 8, 8), dtype=torch.uint8))
    assert adapt_batchnorm(nn.Sequential(nn.Conv2d(3, 3, 1)), inputs(4)) == 0  # no BN: nothing to do


def test_self_agreement_is_one_for_matching_statistics_and_lower_for_stale_ones():
    net, x = two_bn_net(), inputs(50)
    before = copy.deepcopy(net.state_dict())
    stale = self_agreement(net, x)  # statistics unrelated to x: re-estimating them changes some predictions
    assert 0.0 <= stale < 1.0
    for key, value in net.state_dict().items():  # the model itself is untouched
        assert torch.equal(value, before[key]), key
    adapt_batchnorm(net, x)
    assert self_agreement(net, x) == 1.0  # already the inputs' moments: the adapted copy is the same model
