"""Tests for fake weight quantization and data-free activation ranges."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dfp_deploy.compress.quantize.weights import quantize_model_weights, quantize_weight, weight_scale
from dfp_deploy.core.errors import InputError


def _weights(seed: int = 0) -> torch.Tensor:
    w = torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(seed))
    w[3] *= 100.0  # channels with very different ranges
    w[5] = 0.0
    return w


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_levels_scale_and_error_bound(bits):
    w = _weights()
    q = quantize_weight(w, bits)
    n = 2 ** (bits - 1) - 1
    scale = weight_scale(w, bits)
    for c in range(8):
        if c == 5:
            continue
        codes = q[c] / scale[c]
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.round().abs().max() == n  # the largest |w| lands exactly on ±n: per-channel scale
        assert len(torch.unique(codes.round())) <= 2 * n + 1
        assert (w[c] - q[c]).abs().max() <= scale[c].item() / 2 + 1e-6
    assert torch.equal(q[5], torch.zeros_like(q[5]))
    assert torch.equal(quantize_weight(torch.zeros(3, 2), bits), torch.zeros(3, 2))


def test_zero_maps_to_zero_and_quantization_is_idempotent_and_scale_equivariant():
    w = _weights(1)
    w[0, 0, 0, 0] = 0.0
    q = quantize_weight(w, 4)
    assert q[0, 0, 0, 0] == 0
    assert torch.equal(quantize_weight(q, 4), q)
    scaled = quantize_weight(w * torch.arange(1, 9).float().view(-1, 1, 1, 1), 4)
    assert torch.allclose(scaled, q * torch.arange(1, 9).float().view(-1, 1, 1, 1), rtol=1e-5, atol=1e-6)


def test_many_levels_are_used_at_8_bits():
    w = torch.randn(1, 10_000, generator=torch.Generator().manual_seed(2))
    assert len(torch.unique(quantize_weight(w, 8))) > 200


def test_quantize_model_weights_copies_and_respects_skip():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_model_weights(model, 3, skip=lambda name, m: isinstance(m, nn.Linear))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # original untouched
    assert not torch.equal(q[0].weight, model[0].weight)
    assert torch.equal(q[0].weight, quantize_weight(model[0].weight, 3))
    assert torch.equal(q[3].weight, model[3].weight)
    assert torch.equal(q[0].bias, model[0].bias)


def test_edge_layers_follow_execution_order_not_definition_order():
    from dfp_deploy.analysis import analyze
    from dfp_deploy.compress.quantize.weights import edge_layers

    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 2)  # defined first, runs last
            self.body = nn.Conv2d(4, 4, 1)
            self.stem = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.head(self.body(self.stem(x)).mean(dim=(2, 3)))

    model = HeadFirst()
    assert edge_layers(model) == ["head", "stem"]  # definition order, without a trace
    assert edge_layers(model, analyze(model, torch.zeros(1, 3, 6, 6)).module_order) == ["stem", "head"]
    assert edge_layers(nn.Sequential(nn.Linear(2, 2))) == ["0"]


def test_bad_bits_raise_input_error():
    with pytest.raises(InputError, match="weight_bits"):
        quantize_weight(torch.ones(2, 2), 1)
    with pytest.raises(InputError, match="weight_bits"):
        quantize_model_weights(nn.Linear(2, 2), 4.0)


def test_hessian_rounding_is_nearest_for_identity_and_better_in_its_metric():
    from dfp_deploy.compress.quantize.rounding import quantize_weight_hessian

    w = _weights(3)
    assert torch.equal(quantize_weight_hessian(w, 3, torch.eye(36)), quantize_weight(w, 3))
    gen = torch.Generator().manual_seed(7)
    wins = 0
    for trial in range(10):
        a = torch.randn(36, 36, generator=gen, dtype=torch.float64)
        h = a @ a.T / 36 + 4.0 * torch.ones(36, 36, dtype=torch.float64)  # correlated inputs with a large mean
        rows = torch.randn(6, 36, generator=gen)
        q = quantize_weight_hessian(rows, 3, h)
        scale = weight_scale(rows, 3)
        codes = q / scale
        assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.round().abs().max() <= 3

        def cost(x):
            e = (rows - x).double()
            return float(torch.einsum("ci,ij,cj->", e, h, e))

        wins += cost(q) < cost(quantize_weight(rows, 3))
    assert wins >= 9


def test_hessian_rounding_survives_an_indefinite_input_model():
    from dfp_deploy.compress.quantize.rounding import quantize_weight_hessian

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, generator=gen)
    h = torch.eye(6, dtype=torch.float64)
    h[0, 1] = h[1, 0] = 3.0  # eigenvalue -2: not PSD
    out = quantize_weight_hessian(w, 4, h)
    assert out.shape == w.shape and torch.isfinite(out).all()
