"""BN-matched synthetic inputs: the statistic loss drops, seeds are deterministic, the disk cache is used."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dfp_deploy.data.synthetic as synthetic
from dfp_deploy.core.errors import InputError
from dfp_deploy.data.synthetic import bn_matched_inputs, bn_statistic_loss

torch.set_num_threads(1)


class SmallNet(nn.Module):
    """Two conv-BN stages whose running statistics come from "real" data far from N(0, 1): x = 1.5 + 3·noise
    with a per-channel offset, so the statistics are reachable but the Gaussian start is far off."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None)
        self.fc = nn.Linear(8, 5)
        data = 1.5 + 3.0 * torch.randn(64, 3, 8, 8, generator=gen) + torch.tensor([2.0, -1.0, 0.5])[:, None, None]
        self.train()
        with torch.no_grad():
            self(data)  # momentum=None: the running statistics are exactly this batch's
        self.eval()

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_bn_statistic_loss_drops_by_a_large_factor():
    model = SmallNet()
    start = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    x = bn_matched_inputs(model, (3, 8, 8), 16, steps=150, seed=5, lr=0.1)
    with torch.no_grad():
        before, after = bn_statistic_loss(model, start).item(), bn_statistic_loss(model, x).item()
    assert x.shape == (16, 3, 8, 8) and x.dtype == torch.float32
    assert after < before / 20, (before, after)
    # the caller's model is left as it was: eval mode, trainable weights, no gradients stored
    assert not model.training and all(p.requires_grad and p.grad is None for p in model.parameters())


def test_same_seed_same_tensor_and_chunks_are_independent():
    model = SmallNet()
    a = bn_matched_inputs(model, (3, 8, 8), 6, steps=5, seed=1, batch_size=3)
    b = bn_matched_inputs(model, (3, 8, 8), 6, steps=5, seed=1, batch_size=3)
    c = bn_matched_inputs(model, (3, 8, 8), 6, steps=5, seed=2, batch_size=3)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[:3], a[3:])


def test_cache_hit_returns_the_same_tensor_without_work(tmp_path, monkeypatch):
    model = SmallNet()
    first = bn_matched_inputs(model, (3, 8, 8), 4, steps=5, seed=0, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("bn_inputs-*.pt"))) == 1

    def no_work(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(synthetic, "_optimise_all", no_work)
    assert torch.equal(bn_matched_inputs(model, (3, 8, 8), 4, steps=5, seed=0, cache_dir=tmp_path), first)
    with pytest.raises(AssertionError, match="cache"):  # another seed is another key
        bn_matched_inputs(model, (3, 8, 8), 4, steps=5, seed=1, cache_dir=tmp_path)
    with torch.no_grad():
        model.bn1.running_mean.add_(1.0)
    with pytest.raises(AssertionError, match="cache"):  # changed weights are another key
        bn_matched_inputs(model, (3, 8, 8), 4, steps=5, seed=0, cache_dir=tmp_path)


def test_bad_arguments_and_models_without_bn_are_input_errors():
    with pytest.raises(InputError, match="BatchNorm"):
        bn_matched_inputs(nn.Sequential(nn.Conv2d(3, 2, 1)), (3, 4, 4), 2, steps=1)
    with pytest.raises(InputError, match="shape"):
        bn_matched_inputs(SmallNet(), (3, 0, 4), 2, steps=1)
    with pytest.raises(InputError, match="batch_size"):
        bn_matched_inputs(SmallNet(), (3, 4, 4), 4, steps=1, batch_size=1)


def test_progress_is_reported_step_by_step_across_chunks_and_not_for_a_cache_hit(tmp_path):
    model, calls = SmallNet(), []
    bn_matched_inputs(model, (3, 8, 8), 6, steps=4, seed=0, batch_size=3, cache_dir=tmp_path,
                      progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 8) for i in range(1, 9)]  # 2 chunks x 4 steps, one call per optimiser step
    calls.clear()
    bn_matched_inputs(model, (3, 8, 8), 6, steps=4, seed=0, batch_size=3, cache_dir=tmp_path,
                      progress=lambda done, total: calls.append((done, total)))
    assert calls == []
