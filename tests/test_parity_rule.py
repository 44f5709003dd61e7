"""The precision-aware parity rule (measure/parity.py) and the CPU emulation of GPU arithmetic it is derived for.

Known answers for the formulas of docs/methods/parity_tolerance.md, then the point of the rule on a small CNN:
the fp16- and TF32-emulated model passes, the same model with one corrupted weight fails.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dfp_deploy.core.errors import ParityError
from dfp_deploy.core.types import EngineSummary
from dfp_deploy.measure.emulate import corrupt_one_weight, emulated, round_fp16, round_tf32
from dfp_deploy.measure.parity import (SCALE_TOO_SMALL, ParityRule, enforce, network_size, parity,
                                       relative_tolerance)


class _Engine:
    name = "emulated"

    def __init__(self, run):
        self._run = run

    def run(self, x):
        return self._run(x)


def _torch_run(model):
    def run(x):
        with torch.no_grad():
            return model(torch.from_numpy(np.asarray(x, np.float32))).numpy()
    return run


@pytest.fixture(scope="module")
def small_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(32, 32, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    with torch.no_grad():  # non-trivial BN statistics, so the fp16 rounding of buffers matters
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 2.0)
    x = np.random.default_rng(0).normal(size=(32, 3, 16, 16)).astype(np.float32)
    return model, x


def test_relative_tolerance_known_answers():
    u16 = 2.0 ** -11
    assert relative_tolerance("fp16", 3, 1000) == pytest.approx(2 * math.sqrt(3 * 3) * u16)  # 6 u
    assert relative_tolerance("tf32", 8, 1000) == pytest.approx(2 * math.sqrt(2 * 8) * u16)  # 8 u
    assert relative_tolerance("fp32", 1, 8) == pytest.approx(2 * math.sqrt(2 * 8 * 1) * 2.0 ** -24)  # 8 u32
    # ResNet-56 (56 conv/linear layers, longest dot 9*64): the numbers quoted in the doc
    assert relative_tolerance("fp16", 56, 576) == pytest.approx(1.2658e-2, rel=1e-3)
    assert relative_tolerance("fp32", 56, 576) == pytest.approx(3.03e-5, rel=1e-2)
    with pytest.raises(ValueError, match="arithmetic"):
        ParityRule("int8", 1, 1, 1e-3)


def test_network_size_counts_layers_and_the_longest_dot(small_cnn):
    model, _ = small_cnn
    # convs: 3*9=27, 16/4*9=36, 16*9=144, 32*1=32; linear 32
    assert network_size(model) == (5, 144)


def test_roundings_match_the_formats():
    one = torch.tensor([1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -11 + 2 ** -20, -(1 + 2 ** -12), 3.0e38])
    assert round_tf32(one).tolist() == [1.0, 1 + 2 ** -9, 1 + 2 ** -10, -1.0, round_tf32(one)[4].item()]
    assert round_tf32(torch.tensor([float("inf"), float("nan")]))[0] == float("inf")
    x = torch.from_numpy(np.random.default_rng(1).normal(size=1000).astype(np.float32) * 100)
    assert np.array_equal(round_fp16(x).numpy(), x.numpy().astype(np.float16).astype(np.float32))
    assert round_fp16(torch.tensor([1e6])).item() == 65504.0  # clamped like the TensorRT fp16 rewrite


def test_large_logits_pass_with_a_relative_tolerance_and_the_abs_floor_still_helps_small_ones():
    ref = np.linspace(-2.5e4, 2.5e4, 40).reshape(4, 10)
    close = parity(lambda x: ref, _Engine(lambda x: ref * (1 + 2e-7)), np.zeros((4, 1)),
                   rule=ParityRule("fp32", 56, 576, 1e-3))
    assert close["max_abs_err"] > 1e-3 and close["rule"]["passed"]  # the old absolute 1e-3 failed this fp32 engine
    enforce(close)
    tiny = np.linspace(-1e-3, 1e-3, 40).reshape(4, 10)
    floor = parity(lambda x: tiny, _Engine(lambda x: tiny + 5e-4), np.zeros((4, 1)),
                   rule=ParityRule("fp32", 56, 576, 1e-3))
    assert floor["rule"]["tolerance"] == 1e-3 and floor["rule"]["passed"]


def test_a_changed_decisive_class_fails_even_under_a_huge_abs_floor():
    ref = np.tile(np.arange(10, dtype=np.float64), (4, 1))
    swapped = ref.copy()
    swapped[0, [8, 9]] = swapped[0, [9, 8]]
    result = parity(lambda x: ref, _Engine(lambda x: swapped), np.zeros((4, 1)),
                    rule=ParityRule("fp16", 10, 100, abs_floor=1e9))
    assert result["rule"]["decisive_changed"] == 1 and not result["rule"]["passed"]
    with pytest.raises(ParityError, match="1 of 4 inputs whose top-1 margin"):
        enforce(result)


def test_near_zero_reference_is_flagged():
    ref = np.full((2, 10), 1e-9)
    result = parity(lambda x: ref, _Engine(lambda x: ref), np.zeros((2, 1)), rule=ParityRule("fp32", 3, 27, 1e-3))
    assert result["rule"]["passed"] and "cannot tell" in result["rule"]["warnings"][0]
    assert result["ref_scale"] < SCALE_TOO_SMALL


@pytest.mark.parametrize("arithmetic", ["fp16", "tf32"])
def test_rule_passes_the_emulated_engine_and_fails_one_corrupted_weight(small_cnn, arithmetic):
    model, x = small_cnn
    layers, max_dot = network_size(model)
    rule = ParityRule(arithmetic, layers, max_dot, abs_floor=1e-6)
    reference = _torch_run(model)
    good = parity(reference, _Engine(_torch_run(emulated(model, arithmetic))), x, rule=rule)
    assert good["max_abs_err"] > 0 and good["rule"]["passed"], good  # rounding happened, within the rule
    assert good["rule"]["rel_err"] < rule.rel_tolerance
    broken, where = corrupt_one_weight(model, layer="3")  # the grouped conv: its flip moves logits ~2% of scale
    bad = parity(reference, _Engine(_torch_run(emulated(broken, arithmetic))), x, rule=rule)
    assert not bad["rule"]["passed"], (where, bad["rule"])
    assert "differ by" in bad["rule"]["failure"]


def test_fp32_rule_is_far_tighter_than_the_fp16_one(small_cnn):
    model, x = small_cnn
    layers, max_dot = network_size(model)
    fp16_engine = _Engine(_torch_run(emulated(model, "fp16")))
    as_fp32 = parity(_torch_run(model), fp16_engine, x, rule=ParityRule("fp32", layers, max_dot, 1e-6))
    assert not as_fp32["rule"]["passed"]  # an fp16 engine cannot pass as fp32


class _Inspected:
    """An engine that only describes itself (Engine.inspect), for the pipeline's choice of parity rule."""

    def __init__(self, precision: str, arithmetic: str):
        self.summary = EngineSummary("fake", precision, arithmetic)

    def inspect(self) -> EngineSummary:
        return self.summary


def test_pipeline_check_accepts_an_fp32_engine_on_large_logits_and_names_the_rule_on_failure():
    from dfp_deploy.pipeline.engine_step import enforce_parity, parity_rule
    from dfp_deploy.recipe import load_recipe
    from dfp_deploy.recipe.resolve import resolve

    spec = resolve(load_recipe(None)).parity  # the default recipe: fp32, advanced.measure.parity_tolerance 1e-3
    # ResNet-56's shape for the rule (55 convs up to 64x3x3 inputs, one linear); its random-weight logits are ~2.5e4
    model = nn.Sequential(*[nn.Conv2d(64, 64, 3) for _ in range(55)], nn.Flatten(), nn.Linear(64, 10))
    ref = np.linspace(-2.5e4, 2.5e4, 40).reshape(4, 10)
    rule = parity_rule(spec, model, engine=_Inspected("fp32", "fp32"))
    assert (rule.arithmetic, rule.layers, rule.max_dot, rule.abs_floor) == ("fp32", 56, 576, 1e-3)
    ok = parity(lambda x: ref, _Engine(lambda x: ref + 1.2e-2), np.zeros((4, 1)), rule=rule)
    enforce_parity(spec, ok, "gaussian noise")
    assert ok["tolerance"] == ok["rule"]["tolerance"] > 1e-3
    bad = parity(lambda x: ref, _Engine(lambda x: ref * 1.01), np.zeros((4, 1)), rule=rule)
    with pytest.raises(ParityError, match=r"> tolerance .* for fp32 arithmetic"):
        enforce_parity(spec, bad, "gaussian noise")
    fp16 = resolve(load_recipe(None, ["target.precision=fp16"])).parity
    assert parity_rule(fp16, model, engine=_Inspected("fp16", "fp16")).arithmetic == "fp16"
    assert parity_rule(spec, model, _Inspected("fp32", "tf32")).arithmetic == "tf32"  # the engine says TF32
