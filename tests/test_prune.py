"""Importance, plans and physical pruning: exactness, mixing algebra, validation, cost drop, re-tracing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.fx as fx
from torch import nn

from dfp_deploy.analysis import analyze, count_macs, count_params
from dfp_deploy.compress.prune import prune_model
from dfp_deploy.compress.select.importance import IMPORTANCE, channel_importance
from dfp_deploy.compress.select.plan import kept_count, make_plan, top_channels
from dfp_deploy.core.errors import InputError
from dfp_deploy.core.types import PrunePlan

try:  # pytest puts tests/ on sys.path when it has no __init__.py
    from test_analysis import Chain, Concat, DepthwiseResidual, TinyResNet, small_input
except ImportError:  # pragma: no cover - tests/ as a package
    from tests.test_analysis import Chain, Concat, DepthwiseResidual, TinyResNet, small_input

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    """Module initialisation uses the global RNG: seed it so every run checks the same weights."""
    torch.manual_seed(0)


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Eval-mode model with non-trivial BN statistics, so slicing mistakes show up in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def keep_all(analysis) -> PrunePlan:
    return PrunePlan({g.name: tuple(range(g.channels)) for g in analysis.groups if g.prunable})


def silence(model: nn.Module, analysis, group: str, channels: list[int]) -> None:
    """Make `channels` of `group` output exactly zero everywhere: γ = β = 0 in every BN of the group."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, mapping in analysis.members(group).passthrough.items():
            if isinstance(modules[name], nn.BatchNorm2d):
                for position, channel in enumerate(mapping):
                    if channel in channels:
                        modules[name].weight[position] = 0.0
                        modules[name].bias[position] = 0.0


def plan_without(analysis, group: str, removed: list[int]) -> PrunePlan:
    channels = analysis.group(group).channels
    return PrunePlan({group: tuple(c for c in range(channels) if c not in removed)})


# --- exactness -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("factory", [Chain, TinyResNet, DepthwiseResidual, Concat])
def test_keeping_every_channel_is_bit_identical(factory):
    model = randomized(factory())
    x = small_input()
    analysis = analyze(model, x)
    pruned = prune_model(model, analysis, keep_all(analysis))
    assert torch.equal(pruned(x), model(x))


@pytest.mark.parametrize("factory, group, removed", [
    (Chain, "conv1", [0, 3, 7]),                    # block-internal
    (TinyResNet, "layer1.conv1", [1, 2]),           # block-internal in a residual net
    (TinyResNet, "conv1", [1, 3, 6]),               # residual stream: a pad-only channel on each side + a stem one
    (DepthwiseResidual, "expand", [0, 5, 9, 15]),   # expand -> depthwise -> project
    (DepthwiseResidual, "stem", [2, 4]),            # residual stream through an identity add
    (Concat, "b", [1, 4]),                          # second half of a concat, BN shared with the first half
])
def test_pruning_silent_channels_preserves_the_output(factory, group, removed):
    model = randomized(factory())
    x = small_input()
    analysis = analyze(model, x)
    silence(model, analysis, group, removed)
    pruned = prune_model(model, analysis, plan_without(analysis, group, removed))
    torch.testing.assert_close(pruned(x), model(x), rtol=0, atol=1e-5)
    # and the removal is real: something shrank
    assert count_params(pruned) < count_params(model)


def test_residual_pruning_recomputes_option_a_pads():
    model = randomized(TinyResNet())
    analysis = analyze(model, small_input())
    assert analysis.members("conv1").shortcuts["layer2.shortcut"] == ((0, 1), (6, 7))
    pruned = prune_model(model, analysis, plan_without(analysis, "conv1", [1, 3, 6]))
    shortcut = pruned.layer2.shortcut
    assert (shortcut.pad_before, shortcut.pad_after) == (1, 1)
    assert pruned.conv1.out_channels == 3 and pruned.layer2.conv2.out_channels == 5
    assert pruned.layer2.conv1.in_channels == 3 and pruned.linear.in_features == 5
    assert (model.layer2.shortcut.pad_before, model.conv1.out_channels) == (2, 4)  # original untouched


def test_depthwise_conv_is_sliced_and_regrouped():
    model = randomized(DepthwiseResidual())
    analysis = analyze(model, small_input())
    pruned = prune_model(model, analysis, plan_without(analysis, "expand", [0, 5, 9, 15]))
    dw = pruned.dw
    assert dw.groups == dw.in_channels == dw.out_channels == 12 and tuple(dw.weight.shape) == (12, 1, 3, 3)
    assert pruned.bn2.num_features == 12 and pruned.bn2.running_var.shape == (12,)
    assert torch.equal(dw.weight, model.dw.weight[[c for c in range(16) if c not in (0, 5, 9, 15)]])


def test_concat_bn_is_sliced_by_both_groups():
    model = randomized(Concat())
    analysis = analyze(model, small_input())
    plan = PrunePlan({"a": (0, 2), "b": (1, 2, 5)})
    pruned = prune_model(model, analysis, plan)
    kept = [0, 2, 4 + 1, 4 + 2, 4 + 5]
    assert torch.equal(pruned.bn.running_mean, model.bn.running_mean[kept])
    assert torch.equal(pruned.c.weight, model.c.weight[:, kept])
    assert pruned(small_input()).shape == (2, 2)


# --- mixing ----------------------------------------------------------------------------------------------------

def selection(channels: int, keep: tuple[int, ...]) -> torch.Tensor:
    matrix = torch.zeros(channels, len(keep))
    for k, c in enumerate(keep):
        matrix[c, k] = 1.0
    return matrix


@pytest.mark.parametrize("factory, group", [(Chain, "conv1"), (TinyResNet, "conv1"), (Concat, "b")])
def test_selection_mixing_equals_plain_pruning(factory, group):
    model = randomized(factory())
    x = small_input()
    analysis = analyze(model, x)
    plan = plan_without(analysis, group, [1, 2])
    plain = prune_model(model, analysis, plan)
    mixed = prune_model(model, analysis, plan, {group: selection(analysis.group(group).channels, plan.keep[group])})
    for (name, a), (_, b) in zip(plain.state_dict().items(), mixed.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.equal(plain(x), mixed(x))


def test_merge_mixing_adds_the_scaled_column():
    model = randomized(Chain())
    analysis = analyze(model, small_input())
    p, q, s = 2, 5, 0.75
    keep = tuple(c for c in range(8) if c != p)
    matrix = selection(8, keep)
    matrix[p, keep.index(q)] = s
    pruned = prune_model(model, analysis, PrunePlan({"conv1": keep}), {"conv1": matrix})
    w = model.conv2.weight
    torch.testing.assert_close(pruned.conv2.weight[:, keep.index(q)], w[:, q] + s * w[:, p], rtol=0, atol=1e-7)
    other = keep.index(0)
    assert torch.equal(pruned.conv2.weight[:, other], w[:, 0])


def test_merge_of_a_scaled_duplicate_channel_is_exact():
    # channel p = s * channel q after BN and ReLU (s > 0), so folding p into q loses nothing
    model = randomized(Chain())
    p, q, s = 6, 1, 1.7
    with torch.no_grad():
        model.conv1.weight[p] = model.conv1.weight[q]
        for attr in ("running_mean", "running_var"):
            getattr(model.bn1, attr)[p] = getattr(model.bn1, attr)[q]
        model.bn1.weight[p] = s * model.bn1.weight[q]
        model.bn1.bias[p] = s * model.bn1.bias[q]
    x = small_input()
    analysis = analyze(model, x)
    keep = tuple(c for c in range(8) if c != p)
    matrix = selection(8, keep)
    matrix[p, keep.index(q)] = s
    merged = prune_model(model, analysis, PrunePlan({"conv1": keep}), {"conv1": matrix})
    torch.testing.assert_close(merged(x), model(x), rtol=0, atol=1e-5)
    dropped = prune_model(model, analysis, PrunePlan({"conv1": keep}))
    assert (dropped(x) - model(x)).abs().max() > 1e-3  # without the merge the channel is really lost


def test_mixing_without_pruning_rescales_consumer_columns():
    model = randomized(Chain())
    analysis = analyze(model, small_input())
    matrix = torch.diag(torch.arange(1.0, 9.0))
    pruned = prune_model(model, analysis, PrunePlan(), {"conv1": matrix})
    torch.testing.assert_close(pruned.conv2.weight, model.conv2.weight * torch.arange(1.0, 9.0)[None, :, None, None])
    assert torch.equal(pruned.conv1.weight, model.conv1.weight)


def test_wrong_mixing_shape_is_a_value_error():
    model = randomized(Chain())
    analysis = analyze(model, small_input())
    with pytest.raises(ValueError, match=r"shape \(8, 7\)"):
        prune_model(model, analysis, plan_without(analysis, "conv1", [0]), {"conv1": torch.eye(8)})
    with pytest.raises(ValueError, match="unknown group"):
        prune_model(model, analysis, PrunePlan(), {"nope": torch.eye(8)})


# --- plan validation -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keep, message", [
    ({"nope": (0,)}, "no channel group named 'nope'"),
    ({"fc": (0,)}, "cannot be pruned"),
    ({"conv1": ()}, "keeps no channel"),
    ({"conv1": (1, 1)}, "twice"),
    ({"conv1": (0, 8)}, "outside 0..7"),
    ({"conv1": (0.5,)}, "non-integer"),
])
def test_bad_plans_are_input_errors(keep, message):
    model = Chain()
    analysis = analyze(model, small_input())
    with pytest.raises(InputError, match=message):
        prune_model(model, analysis, PrunePlan(keep))


def test_plan_emptying_a_module_is_an_input_error():
    model = TinyResNet()
    analysis = analyze(model, small_input())
    # keeping only pad-side channels would leave the stem with no output channel
    with pytest.raises(InputError, match="every output channel of module 'conv1'"):
        prune_model(model, analysis, PrunePlan({"conv1": (0, 7)}))


# --- cost drop, re-trace, export -------------------------------------------------------------------------------

def test_params_and_macs_drop_by_the_expected_amounts():
    model = randomized(Chain())
    x = small_input()
    analysis = analyze(model, x)
    pruned = prune_model(model, analysis, plan_without(analysis, "conv1", [0, 1, 2]))
    removed = 3
    assert count_params(model) - count_params(pruned) == removed * (27 + 2 + 6 * 9)
    assert count_macs(model, x) - count_macs(pruned, x) == removed * 64 * 27 + 6 * 64 * removed * 9
    assert count_macs(pruned, x) == count_macs(pruned, small_input(batch=5))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_pruned_model_traces_and_exports_to_onnx():
    model = randomized(TinyResNet())
    x = small_input()
    analysis = analyze(model, x)
    plan = make_plan(model, analysis, ratio=0.5, include_residual=True)
    pruned = prune_model(model, analysis, plan)
    assert type(pruned.layer2.shortcut) is type(model.layer2.shortcut)
    traced = fx.symbolic_trace(pruned)
    torch.testing.assert_close(traced(x), pruned(x))
    again = analyze(pruned, x)
    assert by_name_channels(again) == {name: len(k) for name, k in plan.keep.items()} | {"linear": 5}
    buffer = io.BytesIO()
    torch.onnx.export(pruned, (x,), buffer, dynamo=False)
    assert buffer.tell() > 1000


def by_name_channels(analysis) -> dict[str, int]:
    return {g.name: g.channels for g in analysis.groups}


# --- importance ------------------------------------------------------------------------------------------------

def test_l1_l2_bn_l2_on_known_weights():
    model = randomized(Chain())
    analysis = analyze(model, small_input())
    with torch.no_grad():
        model.conv1.weight.zero_()
        model.conv1.weight[3, 0, 0, 0] = 3.0
        model.conv1.weight[3, 1, 0, 0] = -4.0
        model.conv1.weight[5, 2, 1, 1] = 2.0
        model.bn1.weight[3] = 2.0
        model.bn1.running_var[3] = 4.0 - model.bn1.eps
    l1 = channel_importance(model, analysis, "conv1", "l1")
    l2 = channel_importance(model, analysis, "conv1", "l2")
    bn = channel_importance(model, analysis, "conv1", "bn_l2")
    assert l1.dtype == np.float64 and l1.shape == (8,)
    assert (l1[3], l1[5], l1[0]) == (7.0, 2.0, 0.0)
    assert (l2[3], l2[5]) == (5.0, 2.0)
    assert bn[3] == pytest.approx(5.0 * 2.0 / 2.0)
    gamma_over_sigma = model.bn1.weight[5].item() / (model.bn1.running_var[5].item() + model.bn1.eps) ** 0.5
    assert bn[5] == pytest.approx(2.0 * abs(gamma_over_sigma))


def test_l2_sums_over_every_producer_of_a_residual_channel():
    model = randomized(TinyResNet())
    analysis = analyze(model, small_input())
    scores = channel_importance(model, analysis, "conv1", "l2")
    w = [model.conv1.weight, model.layer1.conv2.weight, model.layer2.conv2.weight]
    expected_2 = (w[0][0].square().sum() + w[1][0].square().sum() + w[2][2].square().sum()).sqrt().item()
    expected_0 = w[2][0].square().sum().sqrt().item()
    assert scores[2] == pytest.approx(expected_2) and scores[0] == pytest.approx(expected_0)


def test_group_l2_normalises_each_module_by_its_mean():
    model = randomized(Chain())
    analysis = analyze(model, small_input())
    scores = channel_importance(model, analysis, "conv1", "group_l2")
    producer = model.conv1.weight.detach().double().square().flatten(1).sum(1)
    gamma = model.bn1.weight.detach().double().square()
    consumer = model.conv2.weight.detach().double().square().transpose(0, 1).flatten(1).sum(1)
    expected = (producer / producer.mean() + gamma / gamma.mean() + consumer / consumer.mean()) / 3
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-12)
    assert scores.mean() == pytest.approx(1.0)
    raw = channel_importance(model, analysis, "conv1", "group_l2_raw")
    np.testing.assert_allclose(raw, ((producer + gamma + consumer) / 3).numpy(), rtol=1e-12)


@pytest.mark.parametrize("method", sorted(IMPORTANCE))
def test_every_importance_ranks_a_planted_strong_channel_first(method):
    model = randomized(Chain())
    analysis = analyze(model, small_input())
    with torch.no_grad():
        model.conv1.weight[4] *= 50
        model.conv2.weight[:, 4] *= 50
        model.bn1.weight[4] = 5.0
    scores = channel_importance(model, analysis, "conv1", method)
    assert int(np.argmax(scores)) == 4


def test_unknown_importance_is_input_error():
    model = Chain()
    analysis = analyze(model, small_input())
    with pytest.raises(InputError, match="unknown importance"):
        channel_importance(model, analysis, "conv1", "taylor")


# --- make_plan -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels, ratio, round_to, min_channels, expected", [
    (16, 0.3, 1, 1, 11), (64, 0.3, 1, 1, 45), (64, 0.5, 1, 1, 32), (5, 0.3, 1, 1, 4),  # 3.5 rounds up
    (64, 0.3, 8, 1, 48), (64, 0.35, 8, 1, 40), (10, 0.1, 8, 1, 8), (16, 0.99, 8, 1, 8), (6, 0.5, 8, 1, 6),
    (16, 0.9, 1, 4, 4), (16, 0.95, 1, 1, 1), (3, 0.9, 1, 1, 1),
])
def test_kept_count_rounding(channels, ratio, round_to, min_channels, expected):
    assert kept_count(channels, ratio, round_to=round_to, min_channels=min_channels) == expected


def test_top_channels_breaks_ties_by_lower_index():
    assert top_channels(np.array([1.0, 3.0, 3.0, 0.5, 3.0]), 2) == (1, 2)


def test_make_plan_skips_residual_by_default_and_keeps_the_most_important():
    model = randomized(TinyResNet())
    analysis = analyze(model, small_input())
    plan = make_plan(model, analysis, ratio=0.5)
    assert set(plan.keep) == {"layer1.conv1", "layer2.conv1"}
    scores = channel_importance(model, analysis, "layer2.conv1", "l2")
    assert plan.keep["layer2.conv1"] == tuple(sorted(np.argsort(-scores)[:4].tolist()))
    assert "conv1" in make_plan(model, analysis, ratio=0.5, include_residual=True).keep
    assert make_plan(model, analysis, ratio=0.5) == plan  # deterministic


def test_make_plan_ratios_exclude_and_errors():
    model = randomized(TinyResNet())
    analysis = analyze(model, small_input())
    plan = make_plan(model, analysis, ratio=0.5, ratios={"layer2.*": 0.25, "layer*": 0.0})
    assert set(plan.keep) == {"layer2.conv1"} and len(plan.keep["layer2.conv1"]) == 6
    # exclude by member module name (layer2.bn1 belongs to layer2.conv1's group) and by group name
    assert set(make_plan(model, analysis, ratio=0.5, exclude=["layer2.bn1"]).keep) == {"layer1.conv1"}
    assert set(make_plan(model, analysis, ratio=0.5, exclude=["layer1.*"]).keep) == {"layer2.conv1"}
    assert set(make_plan(model, analysis, ratio=0.5, exclude=["layer*"]).keep) == set()
    assert make_plan(model, analysis, ratio=0.5, round_to=4).keep["layer2.conv1"].__len__() == 4
    assert make_plan(model, analysis, ratio=0.9, min_channels=3).keep["layer1.conv1"].__len__() == 3
    with pytest.raises(InputError, match="'stage9.*' matches no channel group"):
        make_plan(model, analysis, ratio=0.5, ratios={"stage9.*": 0.5})
    with pytest.raises(InputError, match="exclude pattern 'nothing'"):
        make_plan(model, analysis, ratio=0.5, exclude=["nothing"])
    with pytest.raises(InputError, match="not a number in"):
        make_plan(model, analysis, ratio=1.0)
    with pytest.raises(InputError, match="round_to"):
        make_plan(model, analysis, ratio=0.5, round_to=0)
    with pytest.raises(InputError, match="unknown importance"):
        make_plan(model, analysis, ratio=0.5, importance="random")


# --- the model zoo ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("include_residual", [False, True])
def test_efficientnet_lite0_prunes_at_half(include_residual):
    zoo = pytest.importorskip("dfp_deploy.models")
    loaded = zoo.load_model("efficientnet_lite0")
    model = randomized(loaded.module, seed=1)
    x = torch.randn(1, *loaded.input_shape, generator=torch.Generator().manual_seed(0))
    analysis = analyze(model, x)
    plan = make_plan(model, analysis, ratio=0.5, include_residual=include_residual)
    assert any(name.endswith("_expand_conv") for name in plan.keep)
    assert any(analysis.group(name).residual for name in plan.keep) == include_residual
    pruned = prune_model(model, analysis, plan)
    out = fx.symbolic_trace(pruned)(x)
    assert out.shape == (1, loaded.num_classes) and torch.isfinite(out).all()
    assert count_macs(pruned, x) < 0.6 * count_macs(model, x)


def test_cifar_resnet20_residual_pruning_runs():
    zoo = pytest.importorskip("dfp_deploy.models")
    torch.manual_seed(0)  # the zoo's random init
    model = randomized(zoo.load_model("cifar_resnet20").module)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    analysis = analyze(model, x)
    silence(model, analysis, "conv1", [0, 20, 40, 63])  # one channel per stage region + a layer3-only one
    pruned = prune_model(model, analysis, plan_without(analysis, "conv1", [0, 20, 40, 63]))
    reference = model(x)
    # 20 layers of float32 sums in a different order: compare relative to the logits' scale (~100 here)
    torch.testing.assert_close(pruned(x), reference, rtol=0, atol=1e-6 * reference.abs().max().item())
    assert fx.symbolic_trace(pruned)(x).shape == (2, 10)
