"""Channel analysis: groups, boundaries, MAC/param counts on tiny hand-built models (and the zoo when present)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfp_deploy.analysis import analyze, count_macs, count_params
from dfp_deploy.core.errors import InputError

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    """Module initialisation uses the global RNG: seed it so every run checks the same weights."""
    torch.manual_seed(0)


# --- tiny models (also used by test_prune.py) ------------------------------------------------------------------

class ChannelPadShortcut(nn.Module):
    """Option-A shortcut: subsample H, W by stride, zero-pad channels (same contract as the model zoo's class)."""

    def __init__(self, stride: int, pad_before: int, pad_after: int):
        super().__init__()
        self.stride, self.pad_before, self.pad_after = stride, pad_before, pad_after

    def forward(self, x):
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class Chain(nn.Module):
    """conv-bn-relu-conv-bn-relu-pool-linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        extra = cout - cin
        self.shortcut = ChannelPadShortcut(stride, extra // 2, extra - extra // 2) if extra else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    """Stem 4, one identity block at 4, one option-A block 4 -> 8 (2 zero channels before, 2 after)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False), nn.BatchNorm2d(4)
        self.layer1 = Block(4, 4, 1)
        self.layer2 = Block(4, 8, 2)
        self.linear = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


class DepthwiseResidual(nn.Module):
    """Stem, then an MBConv-like block: 1x1 expand -> BN -> ReLU6 -> 3x3 depthwise -> BN -> ReLU6 -> 1x1 project
    -> BN, plus identity residual."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.expand, self.bn1 = nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.project, self.bn3 = nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.act(self.bn0(self.stem(x)))
        y = self.act(self.bn1(self.expand(x)))
        y = self.act(self.bn2(self.dw(y)))
        x = x + self.bn3(self.project(y))
        return self.fc(x.mean((2, 3)))


class Concat(nn.Module):
    """Two branches concatenated, then one BN over the concat and a consumer conv."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 5, 3, padding=1)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        y = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        return self.fc(F.relu(self.c(y)).mean((2, 3)))


class RollBoundary(nn.Module):
    """torch.roll over channels is not understood: it must freeze conv1's group but leave conv2's alone."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.conv3 = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 5, 3), nn.Conv2d(5, 4, 1)

    def forward(self, x):
        x = torch.roll(F.relu(self.conv1(x)), 1, dims=1)
        return self.conv3(F.relu(self.conv2(x))).mean((2, 3))


class PermuteBoundary(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        x = F.relu(self.conv1(x)).permute(0, 2, 3, 1).permute(0, 3, 1, 2)
        return self.conv2(x)


class ConvOutput(nn.Module):
    """The model output is a conv's output: that conv's channels are frozen."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.conv2 = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.conv2(F.relu(self.bn1(self.conv1(x))))


def small_input(batch: int = 2, size: int = 8) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def by_name(analysis):
    return {g.name: g for g in analysis.groups}


# --- groups ----------------------------------------------------------------------------------------------------

def test_chain_groups():
    analysis = analyze(Chain(), small_input())
    groups = by_name(analysis)
    assert list(groups) == ["conv1", "conv2", "fc"]
    g1 = groups["conv1"]
    assert (g1.channels, g1.producers, g1.consumers, g1.passthrough) == (8, ("conv1",), ("conv2",), ("bn1",))
    assert g1.prunable and not g1.residual and g1.path_ops == ("bn", "relu")
    g2 = groups["conv2"]
    assert g2.consumers == ("fc",) and g2.path_ops == ("bn", "relu", "pool", "flatten")
    assert not groups["fc"].prunable and "output" in groups["fc"].reason
    assert analysis.bn_after == {"conv1": "bn1", "conv2": "bn2"}
    assert analysis.warnings == []
    members = analysis.members("conv2")
    assert members.producers == {"conv2": list(range(6))}
    assert members.consumers == {"fc": list(range(6))}


def test_residual_option_a_is_one_group_across_padding():
    analysis = analyze(TinyResNet(), small_input())
    groups = by_name(analysis)
    assert set(groups) == {"conv1", "layer1.conv1", "layer2.conv1", "linear"}
    res = groups["conv1"]
    assert res.residual and res.prunable and res.channels == 8
    assert res.producers == ("conv1", "layer1.conv2", "layer2.conv2")
    assert res.consumers == ("layer1.conv1", "layer2.conv1", "linear")
    assert "add" in res.path_ops and "pad" in res.path_ops
    members = analysis.members("conv1")
    # canonical order = layer2.conv2's output order (the widest producer); the stem sits at positions 2..5
    assert members.producers["layer2.conv2"] == list(range(8))
    assert members.producers["conv1"] == [2, 3, 4, 5]
    assert members.producers["layer1.conv2"] == [2, 3, 4, 5]
    assert members.consumers["layer2.conv1"] == [2, 3, 4, 5]
    assert members.shortcuts == {"layer2.shortcut": ((0, 1), (6, 7))}
    inner = groups["layer2.conv1"]
    assert not inner.residual and inner.channels == 8 and inner.consumers == ("layer2.conv2",)
    # group MACs: producers + consumers touching the group
    assert inner.macs == 8 * 4 * 4 * (4 * 9) + 8 * 4 * 4 * (8 * 9)


def test_depthwise_group_includes_depthwise_conv():
    analysis = analyze(DepthwiseResidual(), small_input())
    groups = by_name(analysis)
    expand = groups["expand"]
    assert expand.passthrough == ("bn1", "dw", "bn2") and expand.consumers == ("project",)
    assert expand.path_ops == ("bn", "relu6", "depthwise") and not expand.residual
    stem = groups["stem"]
    assert stem.producers == ("stem", "project") and stem.residual
    assert stem.consumers == ("expand", "fc")
    assert analysis.members("expand").passthrough["dw"] == list(range(16))
    assert expand.macs == 16 * 64 * 8 + 16 * 64 * 9 + 8 * 64 * 16


def test_concat_splits_consumer_inputs_between_groups():
    analysis = analyze(Concat(), small_input())
    groups = by_name(analysis)
    assert groups["a"].channels == 4 and groups["b"].channels == 6
    assert analysis.members("a").consumers == {"c": [0, 1, 2, 3] + [-1] * 6}
    assert analysis.members("b").consumers == {"c": [-1] * 4 + list(range(6))}
    assert analysis.members("a").passthrough == {"bn": [0, 1, 2, 3] + [-1] * 6}
    assert "cat" in groups["a"].path_ops
    # the concat BN is not directly after a single producer
    assert analysis.bn_after == {}


@pytest.mark.parametrize("model, frozen, free", [(RollBoundary(), "conv1", "conv2"),
                                                 (PermuteBoundary(), "conv1", None)])
def test_unknown_op_is_a_boundary_with_warning(model, frozen, free):
    analysis = analyze(model, small_input())
    groups = by_name(analysis)
    assert not groups[frozen].prunable and "boundary" in groups[frozen].reason
    assert analysis.warnings and all("boundary" in w for w in analysis.warnings)
    if free:
        assert groups[free].prunable


def test_spatial_permute_is_not_a_boundary():
    class SpatialPermute(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 1)

        def forward(self, x):
            return self.conv2(self.conv1(x).transpose(2, 3)).mean((2, 3))

    analysis = analyze(SpatialPermute(), small_input())
    assert by_name(analysis)["conv1"].prunable and analysis.warnings == []


def test_output_conv_is_frozen():
    groups = by_name(analyze(ConvOutput(), small_input()))
    assert groups["conv1"].prunable
    assert not groups["conv2"].prunable and "model output" in groups["conv2"].reason


class _Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.shared = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.conv1(x))
        return self.relu(self.shared(self.relu(self.shared(x)))).mean((2, 3))


class _HardCodedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.fc = nn.Conv2d(3, 6, 3), nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.conv1(x), 1).view(-1, 6))


class _DynamicView(_HardCodedView):
    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(self.conv1(x), 1).view(x.size(0), -1))


class _FunctionalPad(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 3, padding=1), \
            nn.Linear(8, 2)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.conv2(x) + F.pad(x, (0, 0, 0, 0, 2, 2))
        return self.fc(x.mean((2, 3)))


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2)

    def forward(self, x):
        return self.conv2(self.conv1(x)).mean((2, 3))


class _SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.reduce, self.excite = nn.Conv2d(8, 2, 1), nn.Conv2d(2, 8, 1)
        self.conv2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        s = torch.sigmoid(self.excite(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return self.conv2(x * s).mean((2, 3))


class _ControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # data-dependent: fx cannot trace this
            return y
        return -y


def test_module_called_twice_is_a_boundary():
    analysis = analyze(_Reused(), small_input())
    assert not by_name(analysis)["conv1"].prunable
    assert any("called 2 times" in w for w in analysis.warnings)


def test_hard_coded_view_is_a_boundary_but_dynamic_view_is_not():
    hard = analyze(_HardCodedView(), small_input())
    assert not by_name(hard)["conv1"].prunable and any("hard-coded" in w for w in hard.warnings)
    dynamic = analyze(_DynamicView(), small_input())
    assert by_name(dynamic)["conv1"].prunable and dynamic.warnings == []


def test_functional_channel_pad_freezes_the_add_group():
    groups = by_name(analyze(_FunctionalPad(), small_input()))
    # conv1's channels reach conv2's add through F.pad, whose sizes are literals: that group cannot shrink
    assert not groups["conv1"].prunable and "F.pad" in groups["conv1"].reason
    assert groups["conv1"].producers == ("conv1", "conv2")


def test_grouped_conv_is_a_boundary():
    analysis = analyze(_Grouped(), small_input())
    assert not by_name(analysis)["conv1"].prunable and any("grouped" in w for w in analysis.warnings)


def test_squeeze_excite_mul_couples_the_gate_with_the_features():
    analysis = analyze(_SqueezeExcite(), small_input())
    group = by_name(analysis)["conv1"]
    assert group.prunable and group.producers == ("conv1", "excite")
    assert set(group.consumers) == {"reduce", "conv2"} and "mul" in group.path_ops
    assert by_name(analysis)["reduce"].consumers == ("excite",)


class _ChannelConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 6, 3), nn.Conv2d(3, 4, 3)
        self.register_buffer("scale", torch.ones(1, 6, 1, 1))
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return (self.conv1(x) * self.scale).mean((2, 3)), (self.conv2(x) * self.gain).mean((2, 3))


def test_per_channel_constant_is_a_boundary_but_a_scalar_one_is_not():
    analysis = analyze(_ChannelConstant(), small_input())
    groups = by_name(analysis)
    assert not groups["conv1"].prunable and any("'scale'" in w for w in analysis.warnings)
    assert len(analysis.warnings) == 1 and "scale" in groups["conv2"].path_ops


def test_untraceable_model_gives_no_groups_and_a_warning():
    analysis = analyze(_ControlFlow(), small_input())
    assert analysis.groups == [] and len(analysis.warnings) == 1 and "unprunable" in analysis.warnings[0]


def test_analysis_does_not_touch_bn_statistics_or_mode():
    model = Chain().train()
    before = model.bn1.running_mean.clone()
    analyze(model, small_input())
    assert model.training and torch.equal(model.bn1.running_mean, before)


def test_unknown_group_name_is_input_error():
    analysis = analyze(Chain(), small_input())
    with pytest.raises(InputError, match="no channel group named 'nope'"):
        analysis.members("nope")


def test_analysis_is_deterministic():
    model = DepthwiseResidual()
    first, second = analyze(model, small_input()), analyze(model, small_input())
    assert first.groups == second.groups
    assert all(first.members(g.name) == second.members(g.name) for g in first.groups)


# --- cost ------------------------------------------------------------------------------------------------------

def test_count_macs_and_params_by_hand():
    model = Chain()
    x = small_input(batch=3)
    conv1 = 8 * 8 * 8 * (3 * 9)
    conv2 = 6 * 8 * 8 * (8 * 9)
    assert count_macs(model, x) == conv1 + conv2 + 6 * 4
    assert count_params(model) == 8 * 27 + 2 * 8 + 6 * 72 + 6 + 2 * 6 + 6 * 4 + 4
    depthwise = DepthwiseResidual()
    assert count_macs(depthwise, x) == 8 * 64 * 27 + 16 * 64 * 8 + 16 * 64 * 9 + 8 * 64 * 16 + 8 * 3


# --- the model zoo (skipped until dfp_deploy.models exists) ----------------------------------------------------

def _zoo():
    return pytest.importorskip("dfp_deploy.models")


def test_cifar_resnet20_groups_and_macs():
    zoo = _zoo()
    loaded = zoo.load_model("cifar_resnet20")
    x = torch.zeros(1, *loaded.input_shape)
    analysis = analyze(loaded.module, x)
    prunable = [g for g in analysis.groups if g.prunable]
    internal = [g for g in prunable if not g.residual]
    residual = [g for g in prunable if g.residual]
    assert [g.channels for g in internal] == [16, 16, 16, 32, 32, 32, 64, 64, 64]
    assert all(g.producers == (g.name,) and g.name.endswith("conv1") for g in internal)
    assert len(residual) == 1 and residual[0].channels == 64 and residual[0].name == "conv1"
    assert len(residual[0].producers) == 10 and len(analysis.members("conv1").shortcuts) == 2
    assert analysis.warnings == []
    assert count_macs(loaded.module, x) == 40_551_040  # BASELINES.md: 40.55 M
    assert count_params(loaded.module) == 269_722


def test_efficientnet_lite0_groups_make_sense():
    zoo = _zoo()
    loaded = zoo.load_model("efficientnet_lite0")
    analysis = analyze(loaded.module, torch.zeros(1, *loaded.input_shape))
    assert analysis.warnings == []
    groups = by_name(analysis)
    expand = [g for g in analysis.groups if g.name.endswith("_expand_conv")]
    assert len(expand) == 15  # every block but the first has an expand conv
    for g in expand:
        block = g.name.rsplit(".", 1)[0]
        assert f"{block}._depthwise_conv" in g.passthrough and g.consumers == (f"{block}._project_conv",)
        assert g.path_ops == ("bn", "relu6", "depthwise") and g.prunable and not g.residual
    # the first block has no expand conv: its depthwise conv joins the stem's group
    assert "_blocks.0._depthwise_conv" in groups["_conv_stem"].passthrough
    assert not groups["_fc"].prunable
    assert groups["_conv_head"].consumers == ("_fc",)
