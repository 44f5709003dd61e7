"""Data-free activation ranges on the families the project supports: inverted residuals, non-ReLU activations,
squeeze-excitation gates, and the moments each nonlinearity's rule rests on (docs/methods/data_free_ranges.md)."""

import math

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from dfp_deploy.core.errors import InputError
from dfp_deploy.core.types import Preprocess
from dfp_deploy.export.int8 import has_dynamic_batch, int8_onnx
from dfp_deploy.export.onnx_export import export_onnx
from dfp_deploy.export.gaussian_moments import (
    ChannelStats, clipped_normal_moments, hardsigmoid_moments, hardswish_moments, normal_partial_moments,
)
from dfp_deploy.export.ranges import data_free_ranges

PRE = Preprocess(size=16, mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))


class InvertedResidual(nn.Module):
    """expand 1x1 -> BN -> act -> depthwise 3x3 -> BN -> act -> [SE] -> project 1x1 -> BN, plus the identity."""

    def __init__(self, channels: int, act: type[nn.Module], gate: type[nn.Module] | None = None):
        super().__init__()
        wide = channels * 4
        self.expand = nn.Sequential(nn.Conv2d(channels, wide, 1, bias=False), nn.BatchNorm2d(wide), act())
        self.depthwise = nn.Sequential(nn.Conv2d(wide, wide, 3, padding=1, groups=wide, bias=False),
                                       nn.BatchNorm2d(wide), act())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(wide, 4, 1), act(), nn.Conv2d(4, wide, 1),
                                gate()) if gate else None
        self.project = nn.Sequential(nn.Conv2d(wide, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        y = self.depthwise(self.expand(x))
        if self.se is not None:
            y = y * self.se(y)
        return x + self.project(y)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: split the channels, transform one half, concatenate, shuffle the two groups."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
                                    nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False), nn.BatchNorm2d(half))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = x.shape
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class TinyMobileNet(nn.Module):
    """Stem, two inverted-residual blocks, head conv, pool, linear: the EfficientNet/MobileNet pattern in small.

    `blocks`: (activation, squeeze-excitation gate or None) per block; the stem and head use `head_act`;
    `shuffle` adds a ShuffleNetV2 unit after the blocks."""

    def __init__(self, blocks=((nn.ReLU6, None), (nn.ReLU6, None)), head_act: type[nn.Module] = nn.ReLU6,
                 shuffle: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8),
                                  head_act())
        self.blocks = nn.Sequential(*(InvertedResidual(8, act, gate) for act, gate in blocks),
                                    *([ShuffleUnit(8)] if shuffle else []))
        self.head = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), head_act())
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _non_degenerate(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters, so that activations have unit scale and every channel differs."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=gen) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=gen) * 0.5
            m.running_mean = torch.randn(m.num_features, generator=gen) * 0.2
            m.running_var = torch.rand(m.num_features, generator=gen) + 0.5
    return model.eval()


def _model(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return _non_degenerate(TinyMobileNet(**kwargs))


def _images(n: int = 32) -> np.ndarray:
    pixels = np.random.default_rng(0).integers(0, 256, size=(n, 3, 16, 16)).astype(np.float32)
    return (pixels - 127.0) / 128.0


def _run(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch = session.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) else len(x)
    return np.concatenate([session.run(None, {"input": x[i:i + step]})[0] for i in range(0, len(x), step)])


@pytest.mark.parametrize("kwargs", [
    {},  # EfficientNet-Lite (ReLU6): a static export names the sums add, add_1, ..., a dynamic one add_130, ...
    # EfficientNet (SiLU = x * Sigmoid(x), squeeze-excitation), MobileNetV3 (Hardswish, Hardsigmoid gate), GELU,
    # ShuffleNetV2 (the optimizer renames the channel split's outputs: recomputed on the fp32 graph)
    {"blocks": ((nn.SiLU, nn.Sigmoid), (nn.Hardswish, nn.Hardsigmoid)), "head_act": nn.GELU, "shuffle": True},
], ids=["relu6", "silu-hardswish-gelu-se-shuffle"])
def test_inverted_residual_int8_builds_data_free_from_a_static_batch_export(tmp_path, kwargs):
    model = _model(**kwargs)
    example = torch.zeros(2, 3, 16, 16)
    fp32 = export_onnx(model, example, tmp_path / "fp32.onnx").path  # the default export: static batch
    assert not has_dynamic_batch(fp32)
    out = int8_onnx(model, example, fp32, tmp_path / "int8.onnx", style="ort-cpu", preprocess=PRE)
    x = _images()
    reference, quantized = _run(fp32, x), _run(out, x)
    assert np.abs(quantized - reference).max() < 0.15 * np.abs(reference).max()
    assert (quantized.argmax(1) == reference.argmax(1)).mean() >= 0.9
    assert not list(tmp_path.glob(".*bn_kept*"))


# ---------------------------------------------------------------- the moments each rule rests on

MU = np.array([0.4, -1.5, 2.0, 0.0])
SIGMA = np.array([1.0, 2.0, 0.5, 3.0])
INF = np.full(4, np.inf)


@pytest.fixture(scope="module")
def samples() -> np.ndarray:
    """10^6 draws of N(MU_c, SIGMA_c^2) per channel, fixed seed."""
    return MU[:, None] + SIGMA[:, None] * np.random.default_rng(0).standard_normal((4, 1_000_000))


def assert_monte_carlo(mean, var, y: np.ndarray) -> None:
    """mean/var within 5 standard errors of the sample's (the error of a mean of n draws is std / sqrt n; of a
    variance, the std of the squared deviations / sqrt n): a false failure at 5 SE has probability 6e-7."""
    n = y.shape[1]
    deviations = np.square(y - y.mean(axis=1, keepdims=True))
    assert np.all(np.abs(mean - y.mean(axis=1)) <= 5 * y.std(axis=1) / math.sqrt(n) + 1e-12)
    assert np.all(np.abs(var - y.var(axis=1)) <= 5 * deviations.std(axis=1) / math.sqrt(n) + 1e-12)


def _gaussian() -> ChannelStats:
    return ChannelStats(MU, SIGMA, -INF, INF)


def _tabulated(fn) -> ChannelStats:
    s = _gaussian()
    return s.mapped(fn(s.as_function().values))


def _silu(v):
    return v / (1.0 + np.exp(-v))


def _gelu(v):
    return 0.5 * v * (1.0 + torch.special.erf(torch.from_numpy(v / math.sqrt(2.0))).numpy())


def test_relu6_moments_are_the_clipped_normals(samples):
    mean, var = clipped_normal_moments(MU, SIGMA, 0.0, 6.0)
    assert_monte_carlo(mean, var, np.clip(samples, 0.0, 6.0))


def test_partial_moments_known_answers():
    # whole line: the raw moments of N(mu, s^2): 1, mu, mu^2 + s^2, mu^3 + 3 mu s^2, mu^4 + 6 mu^2 s^2 + 3 s^4
    m = normal_partial_moments(MU, SIGMA, -np.inf, np.inf, 4)
    expected = [np.ones(4), MU, MU**2 + SIGMA**2, MU**3 + 3 * MU * SIGMA**2,
                MU**4 + 6 * MU**2 * SIGMA**2 + 3 * SIGMA**4]
    for got, want in zip(m, expected):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # half line, standard normal: E[Z 1{Z > 0}] = phi(0), E[Z^2 1{Z > 0}] = 1/2
    half = normal_partial_moments(0.0, 1.0, 0.0, np.inf, 2)
    assert half[1] == pytest.approx(1 / math.sqrt(2 * math.pi)) and half[2] == pytest.approx(0.5)


def test_hardswish_and_hardsigmoid_closed_forms(samples):
    assert_monte_carlo(*hardswish_moments(MU, SIGMA), samples * np.clip(samples + 3.0, 0.0, 6.0) / 6.0)
    assert_monte_carlo(*hardsigmoid_moments(MU, SIGMA, 1 / 6, 0.5), np.clip(samples / 6.0 + 0.5, 0.0, 1.0))


@pytest.mark.parametrize("name, fn", [
    ("sigmoid", lambda v: 1.0 / (1.0 + np.exp(-v))), ("silu", _silu), ("gelu", _gelu),
    ("hardswish", lambda v: v * np.clip(v + 3.0, 0.0, 6.0) / 6.0), ("relu6", lambda v: np.clip(v, 0.0, 6.0)),
])
def test_grid_quadrature_matches_monte_carlo(samples, name, fn):
    assert_monte_carlo(*_tabulated(fn).moments(), fn(samples))


def test_grid_quadrature_matches_the_closed_forms():
    # where the integrand has a kink (hardswish at -3 and 3, relu6 at 0 and 6) the trapezoid rule's error is
    # O((sigma step)^2) relative to the spread: here within 5e-4 relative or 1e-4 absolute (smooth integrands are
    # exact to rounding, see the GELU mean below)
    for fn, exact in [(lambda v: v * np.clip(v + 3.0, 0.0, 6.0) / 6.0, hardswish_moments(MU, SIGMA)),
                      (lambda v: np.clip(v, 0.0, 6.0), clipped_normal_moments(MU, SIGMA, 0.0, 6.0))]:
        for got, want in zip(_tabulated(fn).moments(), exact):
            np.testing.assert_allclose(got, want, rtol=5e-4, atol=1e-4)
    # GELU's mean: E[X Phi(X)] = mu E Phi(X) + s^2 E phi(X) (Stein) = mu Phi(t) + s^2 phi(t) / r, r = sqrt(1 + s^2),
    # t = mu / r; its variance has no elementary form, the quadrature gives it
    r = np.sqrt(1.0 + SIGMA**2)
    t = MU / r
    phi = np.exp(-t**2 / 2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1.0 + torch.special.erf(torch.from_numpy(t / math.sqrt(2))).numpy())
    np.testing.assert_allclose(_tabulated(_gelu).moments()[0], MU * cdf + SIGMA**2 * phi / r, atol=1e-9)


def test_range_is_the_image_of_the_k_sigma_interval():
    silu = _tabulated(_silu)
    lo, hi = silu.range(3.0)
    # every channel's interval mu +- 3 sigma holds SiLU's minimum -0.2785 at x = -1.2785, except channel 2 (0.5, 3.5)
    assert lo == pytest.approx(-0.27846, abs=1e-4)
    assert hi == pytest.approx(max(_silu(MU + 3 * SIGMA)), rel=1e-6)
    narrow = ChannelStats(np.array([2.0]), np.array([0.5]), np.array([-np.inf]), np.array([np.inf]))
    f = narrow.mapped(_silu(narrow.as_function().values))
    assert f.range(3.0) == pytest.approx((_silu(0.5), _silu(3.5)), rel=1e-6)
    assert f.range(2.5) == pytest.approx((_silu(0.75), _silu(3.25)), rel=1e-6)  # between grid points


def _graph(nodes, inits, outputs):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _bn_inits(gamma, beta):
    return [helper.make_tensor(n, TensorProto.FLOAT, [2], v) for n, v in
            [("g", gamma), ("b", beta), ("m", [0.0, 0.0]), ("v", [1.0, 1.0])]]


def test_sum_and_product_rules_on_a_graph():
    # two BN outputs N(1, 4) and N(-1, 1) per channel; their sum, and SiLU(first) * sigmoid(second) (a gate)
    inits = _bn_inits([2.0, 2.0], [1.0, 1.0]) + [helper.make_tensor(n, TensorProto.FLOAT, [2], v) for n, v in
                                                  [("g2", [1.0, 1.0]), ("b2", [-1.0, -1.0])]]
    nodes = [helper.make_node("BatchNormalization", ["input", "g", "b", "m", "v"], ["x"]),
             helper.make_node("BatchNormalization", ["input", "g2", "b2", "m", "v"], ["y"]),
             helper.make_node("Add", ["x", "y"], ["sum"]),
             helper.make_node("Sigmoid", ["x"], ["sx"]), helper.make_node("Mul", ["x", "sx"], ["silu"]),
             helper.make_node("Sigmoid", ["y"], ["gate"]), helper.make_node("Mul", ["silu", "gate"], ["gated"])]
    r = data_free_ranges(_graph(nodes, inits, ["sum", "gated"]), (-1.0, 1.0), k=3.0)
    # sum: mean 1 - 1, std 2 + 1 (the bound for correlated inputs; independent ones would give sqrt 5)
    assert r["sum"] == pytest.approx((-9.0, 9.0))
    # x * sigmoid(x) is recognised as SiLU of one variable: the image of [1 - 6, 1 + 6]
    assert r["silu"] == pytest.approx((-0.27846, _silu(7.0)), abs=1e-4)
    # gated: independent factors, E = m1 m2, Var = (v1 + m1^2)(v2 + m2^2) - m1^2 m2^2, clipped to the product of
    # the factors' supports; checked against Monte Carlo of the same model
    z = np.random.default_rng(1).standard_normal((2, 1_000_000))
    x, y = 1.0 + 2.0 * z[0], -1.0 + z[1]
    product = _silu(x) / (1.0 + np.exp(-y))
    lo, hi = r["gated"]
    assert hi == pytest.approx(product.mean() + 3.0 * product.std(), rel=0.01)
    assert lo == pytest.approx(-0.27846, abs=1e-3)  # mean - 3 std is below the support's floor


def test_has_dynamic_batch_reads_the_first_input(tmp_path):
    import onnx

    model = _graph([helper.make_node("Relu", ["input"], ["y"])], [], ["y"])
    onnx.save(model, tmp_path / "static.onnx")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(model, tmp_path / "dynamic.onnx")
    assert not has_dynamic_batch(tmp_path / "static.onnx") and has_dynamic_batch(tmp_path / "dynamic.onnx")


def test_bn_ranges_are_beta_plus_minus_k_gamma_clipped_by_the_activation():
    # BN outputs N(0.5, 1) and N(4, 4): at k = 3 the channels span [-2.5, 3.5] and [-2, 10]; ReLU raises the floor to
    # 0, Clip(0, 6) (ReLU6) also caps at 6; the tensor's range is the union over its channels
    inits = _bn_inits([1.0, -2.0], [0.5, 4.0]) + [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
                                                  helper.make_tensor("six", TensorProto.FLOAT, [], [6.0])]
    nodes = [helper.make_node("BatchNormalization", ["input", "g", "b", "m", "v"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["relu"]),
             helper.make_node("Clip", ["bn", "zero", "six"], ["relu6"])]
    r = data_free_ranges(_graph(nodes, inits, ["bn", "relu", "relu6"]), (-1.0, 1.0), k=3.0)
    assert r["bn"] == pytest.approx((-2.5, 10.0))
    assert r["relu"] == pytest.approx((0.0, 10.0))
    assert r["relu6"] == pytest.approx((0.0, 6.0))
    with pytest.raises(InputError, match="k"):
        data_free_ranges(_graph(nodes, inits, ["bn"]), (-1.0, 1.0), k=0.0)
