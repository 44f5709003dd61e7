"""The model side of a build: load it, choose the channels, compress (calibrate, or repair and quantize)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from dfp_deploy.core.errors import InputError
from dfp_deploy.core.types import PrunePlan
from dfp_deploy.recipe.resolve import BuildPlan, SelectSpec


def load(plan: BuildPlan):
    """The model with its weights, and every input checked that can be checked without running it."""
    from dfp_deploy.data.images import check_file, check_geometry, check_labels
    from dfp_deploy.models import load_model

    m = plan.model
    loaded = load_model(m.name, m.weights, kwargs=dict(m.kwargs) or None, input_shape=m.input_shape, resize=m.resize)
    for key, path in plan.data_files:
        check_file(path, key)
        check_geometry(path, loaded.preprocess, key)
    if plan.eval.data and plan.eval.metric == "top1":
        if loaded.num_classes is None:
            raise InputError(f"eval.metric: top1 needs a model that returns one [N, classes] logits tensor; "
                             f"{m.name} returns other outputs: set eval.metric: package.module:function "
                             "(README: Your own model, end to end)")
        check_labels(plan.eval.data, loaded.num_classes, plan.eval.limit, start=plan.eval.start)
    metric_function(plan)  # imported before any work: a wrong path fails now, not after the build
    return loaded


def metric_function(plan: BuildPlan):
    """The eval.metric function (measure/metric.py), or None for the built-in top-1."""
    if plan.eval.metric == "top1":
        return None
    from dfp_deploy.core.user_code import resolve_function

    return resolve_function(plan.eval.metric, "eval.metric")


def recipe_code(recipe_path: Path | None):
    """The recipe's folder importable (after sys.path) for the model factory and the metric (core/user_code.py)."""
    from dfp_deploy.core.user_code import importable_from

    return importable_from(Path(recipe_path).parent if recipe_path else None)


def example_input(loaded, batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *loaded.input_shape), generator=gen)


def planner(select: SelectSpec, model, analysis, *, round_to: int | None = None, allocation: str | None = None,
            include_residual: bool | None = None, progress: bool = False, measured: dict | None = None):
    from dfp_deploy.compress.select.planner import ChannelPlanner

    return ChannelPlanner(model, analysis, importance=select.importance, allocation=allocation or select.allocation,
                          exclude=select.exclude, min_channels=select.min_channels,
                          round_to=round_to or select.round_to,
                          include_residual=select.include_residual if include_residual is None else include_residual,
                          progress=progress, measured=measured)


def choose_channels(select: SelectSpec, model, analysis, *, progress: bool = False,
                    measured: dict | None = None) -> PrunePlan:
    if not select.prunes:
        return PrunePlan()
    check_prunable(select, analysis)
    return planner(select, model, analysis, progress=progress, measured=measured).plan(select.ratio,
                                                                                         dict(select.ratios))


def check_prunable(select: SelectSpec, analysis) -> None:
    """Pruning was asked for, but round_to or min_channels is at least every prunable group's width: the plan
    would keep every channel and the build would succeed unchanged. Refused rather than warned: an unattended
    pipeline reads the exit code, not the warnings."""
    widths = [g.channels for g in analysis.groups if g.prunable]
    if not widths:
        return
    # only values the recipe set: the target's default multiple is reported under `rounding`, not refused
    set_round_to = select.round_to if select.round_to_source == "recipe" else 1
    for key, value in (("compress.prune.round_to", set_round_to), ("advanced.compress.prune.min_channels",
    select.min_channels)):
        if value >= max(widths):
            raise InputError(f"{key}: {value} is at least the width of every prunable group "
                             f"(the widest has {max(widths)} channels), so nothing would be pruned; use a smaller "
                             f"{key.rsplit('.', 1)[1]}")


def measured_statistics(select: SelectSpec, model, analysis, inputs: torch.Tensor | None) -> dict | None:
    """advanced.compress.prune.statistics: calibration — the activation statistics of every compensable group,
    measured on the calibration inputs in the original model (compress/activation_stats.py); None for the data-free
    model."""
    if not select.measures_statistics:
        return None
    from dfp_deploy.compress.select.measured import measured_group_statistics
    from dfp_deploy.compress.calibrate.two_phase import auto_batch

    return measured_group_statistics(model, analysis, inputs, batch=auto_batch(model, inputs[:1]))


def layer_bits(plan: BuildPlan, model, analysis) -> dict[str, int] | None:
    """advanced.compress.quantize.first_last_bits as per-module overrides of weight_bits."""
    r = plan.repair
    if r.weight_bits is None or r.first_last_bits is None:
        return None
    from dfp_deploy.compress.quantize.weights import edge_layers

    return {name: r.first_last_bits for name in edge_layers(model, analysis.module_order)}


def compress(plan: BuildPlan, model, analysis, keep: PrunePlan, calib_inputs=None, adapt_inputs=None):
    """The compressed model: two-phase calibration (calib_inputs), or the data-free path — prune, repair and
    quantize jointly, or with adapt_inputs (compress.bn_adapt) prune and repair, re-estimate the BatchNorm
    statistics, then quantize the adapted model (its BN statistics feed the quantizer's repair and bias
    correction, so they must be final first)."""
    bits = plan.repair.weight_bits
    per_layer = layer_bits(plan, model, analysis)
    if calib_inputs is not None:
        from dfp_deploy.compress.calibrate.two_phase import calibrate

        c = plan.calibrate
        out = calibrate(model, analysis, keep, calib_inputs, squeeze_epochs=c.squeeze_epochs,
                        calib_epochs=c.calib_epochs, lr=c.lr, seed=c.seed, progress=sys.stderr.isatty())
        if bits is not None:
            from dfp_deploy.compress.quantize.weights import quantize_model_weights

            out = quantize_model_weights(out, bits, layer_bits=per_layer)
        return out
    if adapt_inputs is not None:
        from dfp_deploy.analysis import analyze
        from dfp_deploy.compress.calibrate.bn_adapt import adapt_batchnorm

        repaired = repair(plan, model, analysis, keep, bits=None, layer_bits=None)
        adapt_batchnorm(repaired, adapt_inputs)
        if bits is None:
            return repaired
        return repair(plan, repaired, analyze(repaired, adapt_inputs[:1]), PrunePlan(), bits=bits,
                      layer_bits=per_layer)
    return repair(plan, model, analysis, keep, bits=bits, layer_bits=per_layer)


def repair(plan: BuildPlan, model, analysis, keep: PrunePlan, *, bits, layer_bits):
    """The data-free path: prune `keep`, repair with the plan's method, quantize to `bits`."""
    r = plan.repair
    if r.method == "none" and bits is None:
        from dfp_deploy.compress.prune import prune_model

        return prune_model(model, analysis, keep)
    from dfp_deploy.compress.repair.apply import compress_model
    from dfp_deploy.core.threads import torch_threads

    with torch_threads(1):  # closed-form math on small matrices (core/threads.py)
        return compress_model(model, analysis, keep, method=r.method, weight_bits=bits, layer_bits=layer_bits,
                              bias_correction=r.bias_correction, rounding=r.rounding, multi=r.multi)


def unrounded_plan(plan: BuildPlan, model, analysis, keep: PrunePlan, measured: dict | None) -> PrunePlan | None:
    """The plan without the target's channel rounding, when rounding changed it and its engine will be timed (else
    None)."""
    s = plan.select
    if not (keep.keep and plan.measure.rounding_cost):
        return None
    exact = planner(s, model, analysis, round_to=1, measured=measured).plan(s.ratio, dict(s.ratios))
    return exact if exact.keep != keep.keep else None
