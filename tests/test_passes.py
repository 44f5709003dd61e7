"""Invariants of the fp32 graph passes (BN folding, cleanup) and of data-free / calibrated activation ranges."""

import io
import math
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from dfp_deploy.core.errors import ExportError, InputError
from dfp_deploy.export.passes import pass_cleanup, pass_fold_bn, pass_insert_qdq
from dfp_deploy.export.gaussian_moments import clipped_normal_moments
from dfp_deploy.export.calibrated_ranges import calibration_ranges
from dfp_deploy.export.ranges import data_free_ranges


class TinyResNet(nn.Module):
    """Stem conv-BN-ReLU, one residual block, global pool, linear head: every pattern the passes handle."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        x = torch.relu(y + x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _randomised_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=gen) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=gen) * 0.3
            m.running_mean = torch.randn(m.num_features, generator=gen) * 0.2
            m.running_var = torch.rand(m.num_features, generator=gen) + 0.5
    return model.eval()


def export_with_bn(model: nn.Module, batch: int = 4) -> onnx.ModelProto:
    """Legacy exporter in PRESERVE mode: BatchNormalization stays, parameters behind Identity nodes."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(batch, 3, 8, 8),), buffer, dynamo=False, opset_version=17,
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                          input_names=["input"], output_names=["logits"])
    return onnx.load_from_string(buffer.getvalue())


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # compare our graphs, not ORT's
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.fixture(scope="module")
def bn_model() -> onnx.ModelProto:
    torch.manual_seed(0)
    return export_with_bn(_randomised_bn(TinyResNet()))


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32)


# ---------------------------------------------------------------- cleanup


def _with_constant_chains(model: onnx.ModelProto) -> onnx.ModelProto:
    """Route every BN scale through Identity -> Mul(by 1), as exporters do with shared or cast parameters."""
    chained = onnx.ModelProto()
    chained.CopyFrom(model)
    chained.graph.initializer.append(helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]))
    nodes = []
    for node in chained.graph.node:
        if node.op_type == "BatchNormalization":
            scale = node.input[1]
            nodes += [helper.make_node("Identity", [scale], [scale + "_id"]),
                      helper.make_node("Mul", [scale + "_id", "one"], [scale + "_chained"])]
            node.input[1] = scale + "_chained"
        nodes.append(node)
    del chained.graph.node[:]
    chained.graph.node.extend(nodes)
    return chained


def test_cleanup_folds_constant_chains_and_keeps_outputs(bn_model, x):
    chained = _with_constant_chains(bn_model)
    assert {"Identity", "Mul"} <= set(ops(chained))
    folded, changed = pass_cleanup(chained, fold_constants=True)
    assert changed
    assert not {"Identity", "Mul"} & set(ops(folded))
    onnx.checker.check_model(folded, full_check=True)
    np.testing.assert_allclose(run(folded, x), run(chained, x), rtol=1e-5, atol=1e-5)
    unfolded, changed_without_folding = pass_cleanup(chained)
    assert not changed_without_folding and ops(unfolded).count("Identity") == 3
    again, changed_again = pass_cleanup(folded, fold_constants=True)
    assert not changed_again
    assert ops(again) == ops(folded)


def test_cleanup_removes_dead_nodes_only_when_present(bn_model):
    clean, _ = pass_cleanup(bn_model, fold_constants=True)
    dead = onnx.ModelProto()
    dead.CopyFrom(clean)
    dead.graph.node.append(helper.make_node("Relu", [clean.graph.input[0].name], ["unused_relu"]))
    cleaned, changed = pass_cleanup(dead)
    assert changed and "unused_relu" not in {o for n in cleaned.graph.node for o in n.output}
    _, changed_again = pass_cleanup(cleaned)
    assert not changed_again


# ---------------------------------------------------------------- BN folding


def test_fold_bn_removes_every_bn_and_keeps_outputs(bn_model, x):
    clean, _ = pass_cleanup(bn_model, fold_constants=True)
    bn_outputs = {n.output[0] for n in clean.graph.node if n.op_type == "BatchNormalization"}
    assert len(bn_outputs) == 3
    folded, changed = pass_fold_bn(clean)
    assert changed
    assert "BatchNormalization" not in ops(folded)
    onnx.checker.check_model(folded, full_check=True)
    np.testing.assert_allclose(run(folded, x), run(clean, x), rtol=1e-5, atol=1e-5)
    # the Conv takes over the BN's output name, so ranges computed before folding still apply
    conv_outputs = {n.output[0] for n in folded.graph.node if n.op_type == "Conv"}
    assert bn_outputs <= conv_outputs
    _, changed_again = pass_fold_bn(folded)
    assert not changed_again


def _conv_bn_two_readers() -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    inits = [helper.make_tensor(name, TensorProto.FLOAT, values.shape, values.reshape(-1))
             for name, values in {"w": rng.standard_normal((2, 1, 1, 1)).astype(np.float32),
                                  "g": np.ones(2, np.float32), "b": np.zeros(2, np.float32),
                                  "m": np.zeros(2, np.float32), "v": np.ones(2, np.float32)}.items()]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"]),
             helper.make_node("Add", ["bn", "c"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 2, 2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 2, 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_fold_bn_leaves_a_conv_whose_output_is_read_elsewhere():
    model = _conv_bn_two_readers()
    folded, changed = pass_fold_bn(model)
    assert not changed
    assert ops(folded).count("BatchNormalization") == 1


# ---------------------------------------------------------------- data-free ranges


def test_clipped_normal_moments_match_sampling():
    rng = np.random.default_rng(0)
    for mu, sigma, a, b in [(0.0, 1.0, 0.0, np.inf), (0.5, 2.0, 0.0, 6.0), (-1.0, 0.5, -np.inf, np.inf),
                            (1.0, 1.0, -0.5, 1.5)]:
        samples = np.clip(rng.normal(mu, sigma, 400_000), a, b)
        mean, var = clipped_normal_moments(mu, sigma, a, b)
        assert mean == pytest.approx(samples.mean(), abs=0.01)
        assert var == pytest.approx(samples.var(), abs=0.02)
    mean, var = clipped_normal_moments(2.0, 0.0, 0.0, 1.0)  # no spread: the clipped value itself
    assert (mean, var) == (1.0, 0.0)


def _hand_graph() -> onnx.ModelProto:
    """input -> BN(gamma [1, 2], beta [0.5, -1]) -> Relu -> Add(r, Relu(BN2 standard)) -> Clip(0, 6) -> Pad channels."""
    def tensor(name, values):
        values = np.asarray(values, np.float32)
        return helper.make_tensor(name, TensorProto.FLOAT, values.shape, values.reshape(-1))

    inits = [tensor("g1", [1, 2]), tensor("b1", [0.5, -1]), tensor("g2", [1, 1]), tensor("b2", [0, 0]),
             tensor("m", [0, 0]), tensor("v", [1, 1]), tensor("lo", 0.0), tensor("hi", 6.0),
             helper.make_tensor("pads", TensorProto.INT64, [8], [0, 1, 0, 0, 0, 2, 0, 0])]
    nodes = [helper.make_node("BatchNormalization", ["input", "g1", "b1", "m", "v"], ["bn1"]),
             helper.make_node("Relu", ["bn1"], ["r1"]),
             helper.make_node("BatchNormalization", ["input", "g2", "b2", "m", "v"], ["bn2"]),
             helper.make_node("Relu", ["bn2"], ["r2"]),
             helper.make_node("Add", ["r1", "r2"], ["sum"]),
             helper.make_node("Clip", ["sum", "lo", "hi"], ["clipped"]),
             helper.make_node("Pad", ["clipped", "pads"], ["padded"])]
    graph = helper.make_graph(nodes, "hand", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("padded", TensorProto.FLOAT, [1, 5, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_data_free_ranges_known_answer():
    r = data_free_ranges(_hand_graph(), (-2.0, 3.0), k=3.0)
    assert r["input"] == (-2.0, 3.0)
    # beta +- k |gamma|: channel 0 [0.5 - 3, 0.5 + 3], channel 1 [-1 - 6, -1 + 6]; the union
    assert r["bn1"] == pytest.approx((-7.0, 5.0))
    assert r["r1"] == pytest.approx((0.0, 5.0))
    assert r["bn2"] == pytest.approx((-3.0, 3.0))
    # Add: mean m1 + m2, std s1 + s2 of the clipped inputs; channel 1 of r1 is relu(N(-1, 4))
    m0, v0 = clipped_normal_moments(0.0, 1.0, 0.0, np.inf)  # relu(N(0, 1)): 1/sqrt(2 pi), 1/2 - 1/(2 pi)
    assert m0 == pytest.approx(1 / math.sqrt(2 * math.pi))
    assert v0 == pytest.approx(0.5 - 1 / (2 * math.pi))
    m_a, v_a = clipped_normal_moments(np.array([0.5, -1.0]), np.array([1.0, 2.0]), 0.0, np.inf)
    hi = np.max(m_a + m0 + 3.0 * (np.sqrt(v_a) + math.sqrt(v0)))
    assert r["sum"] == pytest.approx((0.0, hi))
    assert r["clipped"] == pytest.approx((0.0, min(hi, 6.0)))
    assert r["padded"] == pytest.approx(r["clipped"])  # zero channels are inside [0, hi]


def test_data_free_ranges_need_bn(bn_model):
    folded, _ = pass_fold_bn(pass_cleanup(bn_model, fold_constants=True)[0])
    with pytest.raises(ExportError, match="BatchNormalization"):
        data_free_ranges(folded, (-1.0, 1.0))
    with pytest.raises(InputError, match="k="):
        data_free_ranges(bn_model, (-1.0, 1.0), k=0)


def test_data_free_ranges_cover_what_qdq_needs_after_folding(bn_model):
    ranges = data_free_ranges(bn_model, (-3.0, 3.0))
    folded, _ = pass_fold_bn(pass_cleanup(bn_model, fold_constants=True)[0])
    for style in ("ort-cpu", "tensorrt"):
        _, changed = pass_insert_qdq(folded, style=style, ranges=ranges)
        assert changed


# ---------------------------------------------------------------- calibration ranges


def test_calibration_minmax_and_percentile(bn_model, x):
    more = np.concatenate([x, 2 * x, x[:2]])  # 10 samples: not a multiple of the fixed batch (4) of the model
    ranges = calibration_ranges(bn_model, more)
    assert ranges["input"] == pytest.approx((float(more.min()), float(more.max())))
    assert ranges["logits"][0] <= ranges["logits"][1]
    relu_out = [n.output[0] for n in bn_model.graph.node if n.op_type == "Relu"]
    assert all(ranges[name][0] == 0.0 for name in relu_out)
    clipped = calibration_ranges(bn_model, more, method="percentile", percentile=99.0)
    assert clipped["input"][1] < ranges["input"][1] and clipped["input"][0] > ranges["input"][0]
    with pytest.raises(InputError, match="calibration method"):
        calibration_ranges(bn_model, more, method="entropy")


def test_cleanup_folds_castlike_of_constants(x):
    """The dynamo exporter's Clip bounds: CastLike(Constant, activation) must fold, or ReLU6 ranges are lost."""
    nodes = [helper.make_node("Constant", [], ["six"], value=helper.make_tensor("v", TensorProto.DOUBLE, [], [6.0])),
             helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("z", TensorProto.DOUBLE, [], [0.0])),
             helper.make_node("CastLike", ["six", "input"], ["six_cast"]),
             helper.make_node("CastLike", ["zero", "input"], ["zero_cast"]),
             helper.make_node("Clip", ["input", "zero_cast", "six_cast"], ["out"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [4, 3, 8, 8])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [4, 3, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    folded, changed = pass_cleanup(model, fold_constants=True)
    assert changed and ops(folded) == ["Clip"]
    np.testing.assert_array_equal(run(folded, 4 * x), np.clip(4 * x, 0, 6))
