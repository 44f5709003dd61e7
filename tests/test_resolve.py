"""Resolving a recipe into a BuildPlan: the target policy, the visible couplings, and the cross-key rules."""

from __future__ import annotations

import pytest

from dfp_deploy.core.errors import InputError
from dfp_deploy.recipe import load_recipe
from dfp_deploy.recipe.resolve import default_round_to, qdq_style, resolve


def plan_of(*settings, fingerprint=None):
    return resolve(load_recipe(None, list(settings)), fingerprint=fingerprint, cache=None)


def test_channel_multiple_comes_from_the_recipe_then_the_fingerprint_then_the_table():
    asked = []

    def stored(backend, precision, batch, threads):
        asked.append((backend, precision, batch, threads))
        return (4, "/cache/fp.json") if backend == "ort-cpu" else None

    set_ = plan_of("compress.prune.round_to=2", fingerprint=stored)
    assert (set_.select.round_to, set_.select.round_to_source) == (2, "recipe")
    assert set_.target.channel_block == 4  # the latency search's block still follows the fingerprint
    measured = plan_of("target.batch=8", "target.threads=2", fingerprint=stored).select
    assert (measured.round_to, measured.round_to_source) == (4, "fingerprint /cache/fp.json")
    assert asked[-1] == ("ort-cpu", "fp32", 8, 2)
    table = plan_of("target.backend=tensorrt", "target.precision=int8", fingerprint=stored)
    assert (table.select.round_to, table.select.round_to_source[:5], table.target.channel_block) == (32, "table", 32)
    asked.clear()
    ignored = plan_of("advanced.target.fingerprint=table", fingerprint=stored)
    assert ignored.select.round_to_source == "table (advanced.target.fingerprint: table)" and asked == []
    assert default_round_to("tensorrt", "fp16") == 8


def test_a_missing_fingerprint_is_measured_only_by_a_build_that_prunes_with_the_default_and_times_here():
    def measures(*settings, stored=None):
        return plan_of(*settings, fingerprint=lambda *target: stored).target.measure_fingerprint

    assert measures("compress.prune.ratio=0.5")
    assert not measures("compress.prune.ratio=0.5", stored=(8, "/fp.json"))
    assert not measures("compress.prune.ratio=0.5", "compress.prune.round_to=8")
    assert not measures("compress.prune.ratio=0.5", "measure.latency=false")
    assert measures("measure.latency=false", "search.episodes=4", "search.target=latency")
    assert not measures("compress.prune.ratio=0.5", "advanced.target.fingerprint=stored")
    assert not measures("compress.prune.ratio=0.5", "target.backend=torch-cpu")


def test_target_policy_qdq_style_parity_arithmetic_and_backend_options():
    cpu = plan_of("target.precision=int8")
    assert cpu.int8.style == "ort-cpu" == qdq_style("torch-cpu") and cpu.parity.precision == "int8"
    trt = plan_of("target.backend=tensorrt", "target.precision=fp16", "advanced.target.opt_level=2")
    assert trt.int8 is None and trt.parity.precision == "fp16"
    assert trt.target.options["opt_level"] == 2 and "timing_cache_dir" in trt.target.options
    assert dict(plan_of().target.options) == {}


def test_hidden_couplings_are_fields_hessian_rounding_bias_correction_and_the_bn_adapt_seed():
    lmmse = plan_of("compress.reconstruct=lmmse", "compress.quantize.weight_bits=4", "seed=7",
                    "compress.bn_adapt.data=synthetic", "compress.prune.ratio=0.3").repair
    assert (lmmse.rounding, lmmse.bias_correction) == ("hessian", True)
    udfc = plan_of("compress.reconstruct=udfc", "compress.quantize.weight_bits=4").repair
    assert (udfc.rounding, udfc.bias_correction, udfc.multi) == ("nearest", False, False)
    assert plan_of("compress.reconstruct=lmmse").repair.bias_correction is None  # nothing quantized
    forced = plan_of("compress.reconstruct=udfc", "compress.quantize.weight_bits=4",
                     "advanced.compress.quantize.bias_correction=true", "advanced.compress.udfc_form=vector").repair
    assert forced.bias_correction and forced.multi
    adapt = plan_of("compress.bn_adapt.data=synthetic", "seed=7").inputs["bn_adapt"]
    assert (adapt.seed, adapt.synthetic, adapt.steps, adapt.chunk) == (8, True, 200, 64)


def test_named_inputs_only_where_a_step_reads_them(tmp_path):
    data = str(tmp_path / "x.npz")
    assert dict(plan_of().inputs) == {}
    ranges_only = plan_of(f"compress.calibration.data={data}", "advanced.compress.calibration.two_phase=false")
    assert ranges_only.calibrate is None and "calibration" not in ranges_only.inputs
    int8 = plan_of(f"compress.calibration.data={data}", "advanced.compress.calibration.two_phase=false",
                   "target.precision=int8", "advanced.compress.quantize.activations=calibration")
    assert int8.inputs["calibration"].source == data and int8.int8.inputs == "calibration"
    two_phase = plan_of(f"compress.calibration.data={data}", "compress.calibration.samples=32")
    assert two_phase.calibrate.inputs == "calibration" and two_phase.inputs["calibration"].samples == 32
    assert not two_phase.measure.rounding_cost  # a second calibration would double the build
    searched = plan_of("search.episodes=8", "search.samples=16").inputs["search"]
    assert (searched.samples, searched.chunk, searched.key) == (16, None, "search")
    assert plan_of("search.episodes=8").search.warmup == 2


@pytest.mark.parametrize("settings, message", [
    (["advanced.compress.udfc_form=vector"], "advanced.compress.udfc_form: vector applies to compress.reconstruct"),
    (["compress.prune.allocation=macs"], "compress.prune.allocation: macs needs compress.prune.importance: lmmse"),
    (["compress.prune.importance=lmmse", "compress.prune.allocation=macs", "advanced.compress.prune.ratios={a: 0.5}"],
     "cannot be combined with per-group advanced.compress.prune.ratios"),
    (["advanced.compress.prune.statistics=calibration"],
     "advanced.compress.prune.statistics: calibration needs compress.prune.imp"),
    (["search.episodes=4", "advanced.compress.prune.exclude=[a]"],
     "advanced.compress.prune.exclude cannot be combined with search"),
    (["target.precision=int8", "advanced.compress.quantize.activations=calibration"],
     "advanced.compress.quantize.activations: calibration needs compress.calibration.data"),
    (["compress.calibration.data=synthetic", "compress.bn_adapt.data=synthetic"], "remove bn_adapt"),
    (["compress.calibration.data=synthetic", "compress.reconstruct=lmmse"], "calibration replaces the data-free"),
    (["compress.calibration.data=synthetic", "advanced.compress.quantize.bias_correction=true"],
     "advanced.compress.quantize.bias_correction: applies to the data-free repair"),
    (["model.input_size=[3, 4096, 4096]", "target.batch=64"], "model.input_size: [3, 4096, 4096] at target.batch"),
])
def test_contradictions_are_refused_with_the_key_to_change(settings, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plan_of(*settings)
