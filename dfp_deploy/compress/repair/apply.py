"""Prune, repair in closed form and quantize a model jointly: the mixing of every site folded into its consumers.

If a pruned channel's activation a_c ≈ Σ_k M[c,k]·a_k + d_c over the kept channels k, each consumer's new input
column k is Σ_c W'_c M[c,k] and Σ_c W'_c d_c goes into its bias; each method only chooses M (C × K) and d:
Neuron Merging (nm.py), UDFC (udfc.py), lmmse (lmmse.py). Sites (sites.py) say where this is valid. The
derivations, error bounds and the measurements behind the defaults are in docs/methods/reconstruction.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from dfp_deploy.analysis import Analysis
from dfp_deploy.compress.prune import prune_model
from dfp_deploy.compress.quantize.bias_correction import remove_output_shift, shift_output
from dfp_deploy.compress.quantize.rounding import ROUNDINGS, layer_hessian, quantize_weight_hessian
from dfp_deploy.compress.quantize.weights import QUANTIZABLE, bits_lookup, check_bits, quantize_weight
from dfp_deploy.compress.repair.input_model import input_models
from dfp_deploy.compress.repair.lmmse import lmmse_site
from dfp_deploy.compress.repair.nm import NM_LAMBDA, NM_THRESHOLD, nm_site
from dfp_deploy.compress.repair.sites import find_site, position_channels, site_tensors
from dfp_deploy.compress.repair.udfc import (DEFAULT_ALPHA, DEFAULT_ALPHA_Q, MERGE_GRID_GROWTH, guard_site_merges,
                                             udfc_site)
from dfp_deploy.core.errors import InputError
from dfp_deploy.core.types import PrunePlan

METHODS = ("none", "neuron_merging", "udfc", "lmmse")
SPATIAL_RHO_DEFAULT = 0.8  # input model: correlation of neighbouring pixels (natural images), chosen on train images


def _check_positive(what: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
        raise InputError(f"reconstruction {what}: {value!r} must be a finite number >= 0")


@dataclass(frozen=True)
class RepairOptions:
    """Tuning constants of the closed forms. The defaults are the values measured best on training images
    (docs/methods/reconstruction.md, docs/research/reconstruction.md); builds use them, benchmarks sweep them."""

    alpha: float = DEFAULT_ALPHA  # UDFC: weight of the bias term in ‖ŵ_p − s ŵ_q‖² + α(b̂_p − s b̂_q)²
    alpha_q: float = DEFAULT_ALPHA_Q  # UDFC: the same weight α' for a quantized kept channel's own rescale s'*
    nm_threshold: float = NM_THRESHOLD  # Neuron Merging: smallest cosine between merged filters
    nm_lambda: float = NM_LAMBDA  # Neuron Merging: weight of the cosine against the bias gap in choosing a partner
    merge_grid_growth: float = MERGE_GRID_GROWTH  # UDFC: widest growth of a quantized consumer's grid (inf: off)
    spatial_rho: float = SPATIAL_RHO_DEFAULT  # quantization's input model: correlation of neighbouring taps

    def __post_init__(self) -> None:
        _check_positive("alpha", self.alpha)
        _check_positive("alpha_q", self.alpha_q)
        growth = self.merge_grid_growth
        if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not growth >= 0:
            raise InputError(f"reconstruction merge_grid_growth: {growth!r} must be a number >= 0 (inf: off)")
        rho = self.spatial_rho
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 <= rho < 1:
            raise InputError(f"spatial_rho: {rho!r} is not a correlation in [0, 1)")


DEFAULTS = RepairOptions()


@dataclass
class Reconstruction:
    """Per group: the mixing M [C, K], the offsets d [C] (constant per original channel, lmmse only) and the mean and
    covariance of the kept channels' deployed activations (lmmse only; the consumers' quantization uses them)."""

    mixing: dict[str, torch.Tensor] = field(default_factory=dict)
    offsets: dict[str, torch.Tensor] = field(default_factory=dict)
    kept_means: dict[str, torch.Tensor] = field(default_factory=dict)
    kept_covs: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # group -> why it got plain selection


def check_method(method) -> str:
    if method not in METHODS:
        raise InputError(f"compress.reconstruct: {method!r} is not one of {', '.join(METHODS)}")
    return method


def build_reconstruction(model: nn.Module, analysis: Analysis, plan: PrunePlan, *, method: str,
                         weight_bits: int | None = None, layer_bits: dict[str, int] | None = None,
                         multi: bool = False, groups: list[str] | None = None,
                         options: RepairOptions = DEFAULTS) -> Reconstruction:
    """Mixing (and lmmse offsets) for every planned group, and, when quantizing, every compensable group.
    `layer_bits` {module: bits} overrides weight_bits per module (only when weight_bits is set); `multi`: UDFC's
    vector form; `groups`: only these groups (default all)."""
    check_method(method)
    bits = check_bits(weight_bits) if weight_bits is not None else None
    bits_of = bits_lookup(bits, layer_bits)
    result = Reconstruction()
    if method == "none":
        return result
    modules = dict(model.named_modules())
    names = groups if groups is not None else [g.name for g in analysis.groups]
    for name in names:
        planned = name in plan.keep
        if not planned and bits is None:
            continue
        if not planned and method == "neuron_merging":
            continue  # NM has nothing to say about quantization
        site, why = find_site(model, analysis, name)
        if site is None:
            if analysis.group(name).prunable:
                result.skipped[name] = why
            continue
        channels = analysis.group(name).channels
        keep = sorted(plan.keep.get(name, range(channels)))
        if not planned and method == "udfc" and site.depthwise is not None:
            continue
        st = site_tensors(modules, site, bits_of)
        if method in ("neuron_merging", "udfc"):
            mixing = (nm_site(st, keep, options.nm_threshold, options.nm_lambda) if method == "neuron_merging"
                      else udfc_site(st, keep, options.alpha, options.alpha_q, multi))
            if method == "udfc" and planned and bits is not None:
                mixing = guard_site_merges(mixing, keep, modules, site, st, bits_of, options.merge_grid_growth)
            result.mixing[name] = mixing
        else:
            mixing, offset, kept_mean, kept_cov = lmmse_site(st, keep, site.activation)
            result.mixing[name], result.offsets[name] = mixing, offset
            result.kept_means[name], result.kept_covs[name] = kept_mean, kept_cov
    return result


def compress_model(model: nn.Module, analysis: Analysis, plan: PrunePlan, *, method: str,
                   weight_bits: int | None = None, layer_bits: dict[str, int] | None = None, multi: bool = False,
                   bias_correction: bool | None = None, rounding: str | None = None,
                   options: RepairOptions = DEFAULTS) -> nn.Module:
    """Prune (plan), reconstruct (method) and fake-quantize (weight_bits) jointly; returns a new model.

    Order, and why: (1) every reconstruction is computed from the ORIGINAL model, with the producers' kept filters
    quantized, so merges land on the filters that will be deployed; (2) prune_model folds the mixing into the
    consumers and lmmse's constant offsets go into their biases; (3) all conv/linear weights are quantized, the
    consumers AFTER their compensation (quantizing first would leave the compensation itself unquantized), by
    round-to-nearest or, with rounding="hessian", by Hessian-aware rounding with the data-free input model below;
    (4) with bias_correction, each quantized layer's mean output shift (Q(W) − W)·E[x] is removed using the same
    input means. Defaults: lmmse uses both (3, hessian) and (4); the other methods neither (as published).
    `layer_bits` {module name: bits} gives some layers other bits than weight_bits (quantize.edge_layers at 8 is
    the usual low-bit mixed precision); steps (1) and (3) use each module's own bits. `multi`: UDFC's vector form
    (advanced.compress.udfc_form: vector). `options`: the closed forms' tuning constants (RepairOptions).
    A producer that is itself the consumer of another compensated group (a chain) is modelled with its original
    filters' quantization, an approximation (ResNets have no such chain; EfficientNet-Lite0 has one: stem → block 0's
    projection, whose own pruned output rows the offsets follow)."""
    check_method(method)
    bits = check_bits(weight_bits) if weight_bits is not None else None
    if bias_correction is None:
        bias_correction = method == "lmmse"
    rounding = rounding or ("hessian" if method == "lmmse" else "nearest")
    if rounding not in ROUNDINGS:
        raise InputError(f"weight rounding: {rounding!r} is not one of {', '.join(ROUNDINGS)}")
    recon = build_reconstruction(model, analysis, plan, method=method, weight_bits=bits, layer_bits=layer_bits,
                                 multi=multi, options=options)
    bits_of = bits_lookup(bits, layer_bits)
    compressed = prune_model(model, analysis, plan, recon.mixing)
    original = dict(model.named_modules())
    modules = dict(compressed.named_modules())
    for name, offset in recon.offsets.items():
        _add_consumer_offsets(original, modules, analysis, name, offset, plan)
    if bits is None:
        return compressed
    needed = bias_correction or rounding == "hessian"
    inputs = input_models(model, analysis, plan, {g: (m, recon.kept_covs[g]) for g, m in recon.kept_means.items()},
                          options.spatial_rho) if needed else {}
    with torch.no_grad():
        for name, module in modules.items():
            if not isinstance(module, QUANTIZABLE):
                continue
            full = module.weight.detach().clone()
            known = inputs.get(name)
            own = bits_of(name)
            if rounding == "hessian" and known is not None:
                hessian = layer_hessian(module, *known, options.spatial_rho)
                module.weight.copy_(quantize_weight_hessian(full, own, hessian))
            else:
                module.weight.copy_(quantize_weight(full, own))
            if bias_correction and known is not None:
                remove_output_shift(module, analysis.bn_after.get(name), modules, full, known[0])
    return compressed


def _add_consumer_offsets(original: dict[str, nn.Module], modules: dict[str, nn.Module], analysis: Analysis,
                          group: str, offset: torch.Tensor, plan: PrunePlan | None = None) -> None:
    """Σ_c W'_c d_c (over taps; exact away from zero padding) into each consumer's output. A consumer whose own
    output channels are pruned too (EfficientNet-Lite0: stem → block 0's projection, itself a planned group) gets
    the rows it keeps."""
    for consumer, mapping in analysis.members(group).consumers.items():
        weight = original[consumer].weight.detach().double()
        per_position = weight.reshape(weight.shape[0], weight.shape[1], -1).sum(dim=2)  # [out, in]
        delta = torch.zeros(weight.shape[0], dtype=torch.float64)
        for position, channel in position_channels(mapping):
            delta += per_position[:, position] * offset[channel]
        delta = delta[_kept_output_rows(analysis, plan, consumer, len(delta))]
        shift_output(modules[consumer], analysis.bn_after.get(consumer), modules, delta)


def _kept_output_rows(analysis: Analysis, plan: PrunePlan | None, module: str, rows: int) -> torch.Tensor:
    """Output rows of `module` that survive the plan (all of them unless it produces a planned group)."""
    alive = torch.ones(rows, dtype=torch.bool)
    for name, keep in (plan.keep.items() if plan is not None else ()):
        mapping = analysis.members(name).producers.get(module)
        if mapping is not None:
            kept = set(keep)
            for row, channel in enumerate(mapping):
                if channel >= 0 and channel not in kept:
                    alive[row] = False
    return alive.nonzero().squeeze(1)
