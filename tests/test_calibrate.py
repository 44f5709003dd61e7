"""Few-shot calibration: it beats plain pruning on held-out inputs, least squares is exact when it can be, it is
deterministic, and bad arguments fail with DfpErrors."""

import pytest
import torch
from torch import nn

from dfp_deploy.analysis import analyze
from dfp_deploy.compress.calibrate.two_phase import (CalibrationLog, auto_batch, calibrate, kept_output_positions,
                                                     layer_output_error)
from dfp_deploy.compress.prune import prune_model
from dfp_deploy.compress.select.plan import make_plan
from dfp_deploy.core.errors import DataError, InputError
from dfp_deploy.core.types import PrunePlan
from dfp_deploy.data.sources import load_calibration_inputs


class TinyNet(nn.Module):
    """conv-BN-ReLU x3 (the middle one with a residual add) -> pool -> linear: internal groups to prune."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.conv3 = nn.Conv2d(12, 8, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean(dim=(2, 3)))


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial, trained-looking statistics
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def images(n: int, seed: int) -> torch.Tensor:
    """Smooth random images (low-frequency structure, like natural images, so channels are correlated)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 4, 4, generator=g)
    return nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False) \
        + 0.1 * torch.randn(n, 3, 8, 8, generator=g)


def setup(ratio=0.5):
    model = tiny_model()
    analysis = analyze(model, torch.zeros(1, 3, 8, 8))
    plan = make_plan(model, analysis, ratio=ratio, importance="l2")
    return model, analysis, plan


FAST = dict(squeeze_epochs=3, calib_epochs=3, batch=32, lr=3e-3, progress=False)


def test_calibration_beats_plain_pruning_on_held_out_inputs():
    model, analysis, plan = setup()
    assert plan.keep, "the tiny model must have prunable groups"
    calib, held_out = images(96, seed=1), images(64, seed=2)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    log = CalibrationLog()
    calibrated = calibrate(model, analysis, plan, calib, log=log, **FAST)
    plain = prune_model(model, analysis, plan)
    kept = kept_output_positions(analysis, plan)
    err_plain = layer_output_error(model, plain, held_out, kept)
    err_calibrated = layer_output_error(model, calibrated, held_out, kept)
    assert err_calibrated < 0.7 * err_plain, (err_calibrated, err_plain)
    # each phase-2 step lowers the calibration objective
    assert log.after_least_squares < log.after_prune
    assert log.final <= log.after_least_squares
    assert log.least_squares_layers == ["conv2", "conv3", "fc"]
    # the calibrated model has the pruned shapes, and the original is untouched
    assert [p.shape for p in calibrated.parameters()] == [p.shape for p in plain.parameters()]
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())


def test_squeeze_moves_information_before_the_cut():
    """With the squeeze phase, the objective right after cutting is lower than cutting the original."""
    model, analysis, plan = setup()
    calib = images(64, seed=1)
    squeezed, cut_only = CalibrationLog(), CalibrationLog()
    calibrate(model, analysis, plan, calib, squeeze_epochs=4, calib_epochs=0, batch=16, lr=3e-3, progress=False,
              log=squeezed)
    calibrate(model, analysis, plan, calib, squeeze_epochs=0, calib_epochs=0, progress=False, log=cut_only)
    assert squeezed.after_prune < 0.8 * cut_only.after_prune


class LinearPair(nn.Module):
    """conv1 -> conv2 without a nonlinearity in between, so any linear combination of channels is exact."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=True)

    def forward(self, x):
        return self.conv2(self.conv1(x))


def test_least_squares_is_exact_when_the_pruned_channel_is_a_combination_of_kept_ones():
    torch.manual_seed(0)
    model = LinearPair().eval()
    with torch.no_grad():  # channel 3 = 0.5·channel 0 − 1.5·channel 1
        model.conv1.weight[3] = 0.5 * model.conv1.weight[0] - 1.5 * model.conv1.weight[1]
    analysis = analyze(model, torch.zeros(1, 3, 8, 8))
    plan = PrunePlan(keep={"conv1": (0, 1, 2)})
    x, held_out = images(16, seed=3), images(8, seed=4)
    calibrated = calibrate(model, analysis, plan, x, squeeze_epochs=0, calib_epochs=0, ridge=1e-10,
                           progress=False)
    with torch.no_grad():
        expected = model(held_out)
        plain_error = (prune_model(model, analysis, plan)(held_out) - expected).abs().max()
        error = (calibrated(held_out) - expected).abs().max()
    assert plain_error > 0.1
    assert error < 1e-4 * expected.abs().max()
    w = model.conv2.weight.detach()
    merged = torch.stack([w[:, 0] + 0.5 * w[:, 3], w[:, 1] - 1.5 * w[:, 3], w[:, 2]], dim=1)
    torch.testing.assert_close(calibrated.conv2.weight.detach(), merged, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(calibrated.conv2.bias.detach(), model.conv2.bias.detach(), atol=1e-4, rtol=1e-4)


def test_same_seed_gives_identical_weights_and_another_seed_differs():
    model, analysis, plan = setup()
    calib = images(48, seed=1)
    a = calibrate(model, analysis, plan, calib, seed=7, **FAST)
    b = calibrate(model, analysis, plan, calib, seed=7, **FAST)
    c = calibrate(model, analysis, plan, calib, seed=8, **FAST)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_global_random_state_is_left_alone():
    model, analysis, plan = setup()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    calibrate(model, analysis, plan, images(16, seed=1), squeeze_epochs=1, calib_epochs=1, progress=False)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("kwargs, error", [
    (dict(squeeze_epochs=-1), InputError),
    (dict(calib_epochs=1.5), InputError),
    (dict(batch=0), InputError),
    (dict(lr=0.0), InputError),
    (dict(ridge=-1.0), InputError),
])
def test_bad_arguments_raise_input_errors(kwargs, error):
    model, analysis, plan = setup()
    with pytest.raises(error):
        calibrate(model, analysis, plan, images(4, seed=1), progress=False, **kwargs)


def test_bad_inputs_raise_data_errors(tmp_path):
    model, analysis, plan = setup()
    with pytest.raises(DataError, match="float tensor"):
        calibrate(model, analysis, plan, torch.zeros(4, 3, 8, 8, dtype=torch.uint8), progress=False)
    with pytest.raises(DataError, match="at least one"):
        calibrate(model, analysis, plan, torch.zeros(0, 3, 8, 8), progress=False)
    import numpy as np
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.zeros((5, 8, 8, 3), dtype=np.uint8))  # no labels: fine for calibration
    from dfp_deploy.core.types import Preprocess
    pre = Preprocess(size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    got = load_calibration_inputs(str(path), 3, model=model, preprocess=pre, input_shape=(3, 8, 8))
    assert got.shape == (3, 3, 8, 8) and got.dtype == torch.float32
    with pytest.raises(DataError, match="only 5"):
        load_calibration_inputs(str(path), 6, model=model, preprocess=pre, input_shape=(3, 8, 8))
    with pytest.raises(InputError, match="samples"):
        load_calibration_inputs(str(path), 0, model=model, preprocess=pre, input_shape=(3, 8, 8))


def test_synthetic_calibration_inputs_are_bn_matched_and_seeded():
    model, _, _ = setup()
    from dfp_deploy.data.synthetic import bn_statistic_loss
    a = load_calibration_inputs("synthetic", 8, model=model, preprocess=None, input_shape=(3, 8, 8), seed=1,
                                synthetic_steps=30)
    b = load_calibration_inputs("synthetic", 8, model=model, preprocess=None, input_shape=(3, 8, 8), seed=1,
                                synthetic_steps=30)
    assert a.shape == (8, 3, 8, 8) and torch.equal(a, b)
    with torch.no_grad():
        noise = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
        assert bn_statistic_loss(model, a) < bn_statistic_loss(model, noise)


def test_auto_batch_bounds_the_activation_memory_and_leaves_bn_statistics_alone():
    model, analysis, plan = setup()
    x = images(4, seed=1)
    model.train()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    assert auto_batch(model, x) == 64  # tiny activations: the cap
    assert all(torch.equal(before[n], t) for n, t in model.state_dict().items()) and model.training
    model.eval()
    # outputs recorded per 8x8 sample: 12+12 (conv1, bn1) + 12+12 + 8+8 (conv3, bn3) channels x 64 px + 5 logits
    per_sample = 3 * 4 * ((12 + 12 + 12 + 12 + 8 + 8) * 64 + 5)
    assert auto_batch(model, x, budget_bytes=10 * per_sample) == 10
    assert auto_batch(model, x, budget_bytes=1) == 1
    a = calibrate(model, analysis, plan, images(24, seed=1), squeeze_epochs=1, calib_epochs=1, progress=False)
    b = calibrate(model, analysis, plan, images(24, seed=1), squeeze_epochs=1, calib_epochs=1, batch=64,
                  progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def _fold_statistics(patches, target, folds=4):
    from dfp_deploy.compress.calibrate.least_squares import FoldStatistics
    stats = FoldStatistics(folds)
    stats.add(patches.double(), target.double(), first_image=0, images=len(patches))
    return stats


def test_cross_validation_picks_the_smallest_ridge_when_the_data_determine_the_fit():
    from dfp_deploy.compress.calibrate.least_squares import RIDGE_GRID, choose_ridge
    g = torch.Generator().manual_seed(0)
    p, w_true = torch.randn(400, 10, generator=g), torch.randn(3, 10, generator=g)
    stats = _fold_statistics(p, p @ w_true.T)  # exactly reachable, 40 rows per unknown
    assert choose_ridge(stats, torch.zeros(3, 10, dtype=torch.float64)) == min(RIDGE_GRID)


def test_cross_validation_keeps_the_weights_when_the_target_is_unrelated_noise():
    """N < d and a target independent of the inputs: any fit is pure over-fitting, so the held-out error of what
    cross-validation picks must beat the fixed small ridge on fresh rows."""
    from dfp_deploy.compress.calibrate.least_squares import choose_ridge, held_out_error, ridge_solution
    g = torch.Generator().manual_seed(1)
    d, n = 60, 40
    p, t = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)
    current = torch.zeros(3, d, dtype=torch.float64)
    stats = _fold_statistics(p, t)
    rho = choose_ridge(stats, current)
    assert rho >= 10.0  # infinity (keep) or a strong pull toward the current weights
    gram, cross = stats.total()
    fresh_p = torch.randn(400, d, generator=g, dtype=torch.float64)
    fresh_t = torch.randn(400, 3, generator=g, dtype=torch.float64)
    fresh = (fresh_p.T @ fresh_p, fresh_p.T @ fresh_t, float(fresh_t.pow(2).sum()))
    chosen = current if rho == float("inf") else ridge_solution(gram, cross, current, rho)
    fixed = ridge_solution(gram, cross, current, 1e-3)
    assert held_out_error(chosen, *fresh) < 0.8 * held_out_error(fixed, *fresh)


def test_held_out_error_from_statistics_equals_the_direct_residual():
    from dfp_deploy.compress.calibrate.least_squares import held_out_error
    g = torch.Generator().manual_seed(2)
    p, t = torch.randn(30, 7, generator=g, dtype=torch.float64), torch.randn(30, 4, generator=g, dtype=torch.float64)
    w = torch.randn(4, 7, generator=g, dtype=torch.float64)
    direct = float((p @ w.T - t).pow(2).sum())
    assert held_out_error(w, p.T @ p, p.T @ t, float(t.pow(2).sum())) == pytest.approx(direct, rel=1e-10)


def test_folds_take_whole_images():
    """Rows of one image (its patches) must land in one fold: image j goes to fold (first_image + j) mod K."""
    from dfp_deploy.compress.calibrate.least_squares import FoldStatistics
    stats = FoldStatistics(3)
    rows = torch.arange(5, dtype=torch.float64).repeat_interleave(4)[:, None]  # 5 images x 4 rows, value = image
    stats.add(rows, rows, first_image=1, images=5)  # images 1..5 -> folds 1, 2, 0, 1, 2
    assert [float(c) for c in stats.cross] == [4 * 2.0 ** 2, 4 * (0.0 + 3.0 ** 2), 4 * (1.0 + 4.0 ** 2)]


def test_default_calibration_records_a_cross_validated_ridge_per_layer():
    from dfp_deploy.compress.calibrate.least_squares import RIDGE_GRID
    model, analysis, plan = setup()
    log = CalibrationLog()
    calibrate(model, analysis, plan, images(48, seed=1), squeeze_epochs=0, calib_epochs=0, progress=False, log=log)
    assert list(log.least_squares_ridge) == ["conv2", "conv3", "fc"]
    assert all(r in RIDGE_GRID or r == float("inf") for r in log.least_squares_ridge.values())
    assert log.after_least_squares < log.after_prune


def test_an_adam_phase_that_raises_the_error_is_undone():
    model, analysis, plan = setup()
    x = images(32, seed=1)
    log, reference = CalibrationLog(), CalibrationLog()
    wild = calibrate(model, analysis, plan, x, squeeze_epochs=0, calib_epochs=1, lr=10.0, batch=8, progress=False,
                     log=log)
    without = calibrate(model, analysis, plan, x, squeeze_epochs=0, calib_epochs=0, batch=8, progress=False,
                        log=reference)
    assert log.calib_kept is False and len(log.calib_loss) == 1
    assert log.final <= log.after_least_squares
    # undone means the least-squares weights come back exactly (BN statistics may be re-estimated by both)
    conv = [n for n, _ in wild.named_parameters() if n.endswith("weight") and "bn" not in n]
    assert all(torch.equal(wild.get_parameter(n), without.get_parameter(n)) for n in conv)

