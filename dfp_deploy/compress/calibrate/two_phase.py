"""Few-shot calibration: squeeze the channels a plan removes into the kept ones, prune, then calibrate layer outputs.

Needs a few hundred UNLABELED inputs (labels are never used); the frozen original model is the teacher. Both phases
minimise the normalised layer-output error L(θ) = Σ_l ‖Y_l(x; θ) − Y°_l(x)|_K‖² / ‖Y°_l(x)|_K‖² over every Conv,
Linear and BatchNorm output (|_K: the channels the student still has). Phase 1 (squeeze, on the unpruned model): Adam
on L while the removed weights are pulled to exactly zero by a proximal step w ← w·(T − t)/(T − t + 1). Phase 2 (on
the pruned model): per consumer, ridge least squares (PᵀP + λI)Wᵀ = PᵀT + λW₀ᵀ with λ chosen by K-fold
cross-validation over images; BatchNorm re-estimation; per-layer Adam on L (each step kept only if it lowers L).
The objective is objective.py, phase 1 squeeze.py, phase 2a least_squares.py; this module sequences them and holds
the BatchNorm and Adam steps. The derivation and the choices behind it: docs/methods/calibration.md.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

from dfp_deploy.analysis import Analysis
from dfp_deploy.compress.calibrate.least_squares import least_squares
from dfp_deploy.compress.calibrate.objective import (Teacher, batches, execution_order, kept_positions, layer_loss,
                                                     mean_layer_loss)
from dfp_deploy.compress.calibrate.squeeze import squeeze
from dfp_deploy.compress.prune import prune_model, validate_plan
from dfp_deploy.core.errors import DataError, InputError
from dfp_deploy.core.types import PrunePlan



@dataclass
class CalibrationLog:
    """What happened, for reports and benchmarks (losses are L averaged per batch on the calibration inputs)."""

    squeeze_loss: list[float] = field(default_factory=list)  # per squeeze epoch
    after_prune: float = math.nan           # L of the pruned model before any phase-2 step
    after_least_squares: float = math.nan
    calib_loss: list[float] = field(default_factory=list)   # per calibration epoch
    final: float = math.nan
    least_squares_layers: list[str] = field(default_factory=list)
    least_squares_ridge: dict[str, float] = field(default_factory=dict)  # ρ per layer; inf = weights kept
    calib_kept: bool | None = None  # whether (c) lowered L and was kept (None: not run)
    bn_reestimated: list[bool] = field(default_factory=list)  # after (a), after (c)


def calibrate(model: nn.Module, analysis: Analysis, plan: PrunePlan, inputs: torch.Tensor, *,
              squeeze_epochs: int = 2, calib_epochs: int = 2, batch: int | None = None, lr: float = 3e-4,
              ridge: float | None = None, ls_samples: int = 1024, seed: int = 0, progress: bool = True,
              log: CalibrationLog | None = None) -> nn.Module:
    """The physically pruned, calibrated model (see the module docstring); `model` itself is left untouched.

    `inputs`: float [N, ...] calibration inputs, already normalised like the model expects. `ridge`: the relative
    ridge ρ of the least squares; None (default) cross-validates it per layer. `ls_samples`: how many of the inputs
    (the first, in the seeded order) the least-squares step uses. Epochs may be 0 to skip a phase. `batch`: None
    picks the largest batch up to 64 whose layer outputs (teacher, student and autograd's saved tensors, estimated as
    3× the recorded outputs) fit in 2.5 GiB (auto_batch): 64 for CIFAR ResNets, 16 for EfficientNet-Lite0 at 224,
    which needs about 10 GB at batch 64."""
    _check_arguments(inputs, squeeze_epochs, calib_epochs, batch if batch is not None else 1, lr, ridge, ls_samples)
    keep = validate_plan(analysis, plan)
    log = log if log is not None else CalibrationLog()
    inputs = inputs.detach().float()
    order = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(seed))
    inputs = inputs[order]  # a seeded shuffle, so `ls_samples` takes a random subset of the images
    was_training = model.training
    model.eval()
    try:
        teacher = Teacher(model)
        layer_order = execution_order(model, inputs[:1])
        if batch is None:
            batch = auto_batch(model, inputs[:1], layer_order)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            bar = _progress_bar(progress, _total_steps(len(inputs), batch, squeeze_epochs, calib_epochs))
            try:
                student, losses = squeeze(teacher, model, analysis, keep, inputs, layer_order, squeeze_epochs,
                                          batch, lr, seed, lambda loss: _tick(bar, "squeeze", loss))
                log.squeeze_loss.extend(losses)
                pruned = prune_model(student, analysis, PrunePlan(keep=dict(keep))).eval()
                kept_out = kept_positions(analysis, keep)
                log.after_prune = mean_layer_loss(teacher, pruned, inputs, batch, layer_order, kept_out)
                log.least_squares_ridge = least_squares(teacher, pruned, analysis, keep, inputs[:ls_samples],
                                                        batch, ridge, kept_out, layer_order,
                                                        lambda: _tick(bar, "least squares", None))
                log.least_squares_layers = list(log.least_squares_ridge)
                log.after_least_squares = mean_layer_loss(teacher, pruned, inputs, batch, layer_order, kept_out)
                kept_bn, loss = _maybe_reestimate_bn(teacher, pruned, inputs, batch, layer_order, kept_out,
                                                     log.after_least_squares)
                log.bn_reestimated.append(kept_bn)
                if calib_epochs:
                    before_adam = copy.deepcopy(pruned.state_dict())
                    _calibrate_layers(teacher, pruned, inputs, layer_order, kept_out, calib_epochs, batch, lr, seed,
                                      bar, log)
                    after_adam = mean_layer_loss(teacher, pruned, inputs, batch, layer_order, kept_out)
                    log.calib_kept = after_adam < loss
                    if not log.calib_kept:  # the few noisy steps made things worse: undo them
                        pruned.load_state_dict(before_adam)
                        after_adam = loss
                    kept_bn, loss = _maybe_reestimate_bn(teacher, pruned, inputs, batch, layer_order, kept_out,
                                                         after_adam)
                    log.bn_reestimated.append(kept_bn)
                log.final = loss
            finally:
                bar.close()
    finally:
        model.train(was_training)
    _restore_requires_grad(model, pruned)
    return pruned.eval()


def auto_batch(model: nn.Module, example: torch.Tensor, names: list[str] | None = None, *, cap: int = 64,
               budget_bytes: int = 5 << 29) -> int:
    """The largest batch <= `cap` whose calibration step fits in `budget_bytes` (default 2.5 GiB): 3 × the bytes of
    every recorded layer output of one `example` (teacher outputs, student outputs, tensors saved for backward)."""
    was_training = model.training
    model.eval()  # BatchNorm must not update its running statistics on the probe
    try:
        names = names if names is not None else execution_order(model, example[:1])
        outputs = Teacher(model).outputs(example[:1], names)
    finally:
        model.train(was_training)
    per_sample = 3 * sum(t.numel() * t.element_size() for outs in outputs.values() for t in outs)
    return max(1, min(cap, int(budget_bytes // max(per_sample, 1))))


def layer_output_error(reference: nn.Module, candidate: nn.Module, inputs: torch.Tensor,
                       kept_out: dict[str, torch.Tensor] | None = None, batch: int = 64) -> float:
    """Mean per-batch normalised layer-output error L of `candidate` against `reference` (both in eval mode) on
    `inputs`; `kept_out[name]` = original channel positions the candidate kept (see kept_output_positions)."""
    reference.eval()
    candidate.eval()
    order = execution_order(reference, inputs[:1])
    return mean_layer_loss(Teacher(reference), candidate, inputs.float(), batch, order, kept_out or {})


def kept_output_positions(analysis: Analysis, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """module name -> the original output-channel positions that survive `plan` (only for modules that lose some)."""
    return kept_positions(analysis, validate_plan(analysis, plan))


# --- arguments ----------------------------------------------------------------------------------------------------

def _check_arguments(inputs, squeeze_epochs, calib_epochs, batch, lr, ridge, ls_samples) -> None:
    if not torch.is_tensor(inputs) or not inputs.is_floating_point() or inputs.dim() < 2:
        got = f"{inputs.dtype} {tuple(inputs.shape)}" if torch.is_tensor(inputs) else type(inputs).__name__
        raise DataError(f"compress.calibration: inputs must be a float tensor [N, ...], got {got}")
    if len(inputs) < 1:
        raise DataError("compress.calibration: no calibration inputs; give at least one image (samples >= 1)")
    for key, value in (("advanced.compress.calibration.squeeze_epochs", squeeze_epochs),
                       ("advanced.compress.calibration.calib_epochs", calib_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{key}: {value!r} must be an integer >= 0")
    for key, value in (("batch", batch), ("ls_samples", ls_samples)):  # arguments of calibrate(), not recipe keys
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"calibrate(): {key}={value!r} must be an integer >= 1")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr):
        raise InputError(f"advanced.compress.calibration.lr: {lr!r} must be a positive number, e.g. 1e-3")
    if ridge is not None and (isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0
                              or not math.isfinite(ridge)):
        raise InputError(f"calibrate(): ridge={ridge!r} must be a number >= 0 (e.g. 1e-3) or None "
                         "(cross-validated per layer)")


# --- phase 2b/d: BatchNorm statistics -----------------------------------------------------------------------------

def _maybe_reestimate_bn(teacher: Teacher, model: nn.Module, inputs: torch.Tensor, batch: int, names: list[str],
                         kept_out: dict[str, torch.Tensor], before: float) -> tuple[bool, float]:
    """Re-estimate every BatchNorm's running statistics on `inputs`; keep them only if L (`before`: its current value)
    goes down. Returns (kept?, L afterwards).

    After phase 1/2 trained against the running statistics, fresh statistics can undo what was learned, while right
    after pruning they usually repair the shifted channel statistics; measuring L decides instead of guessing."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and m.running_mean is not None]
    if not bns:
        return False, before
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.momentum) for m in bns]
    with torch.no_grad():
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
            m.train()
        for x in batches(inputs, batch):
            model(x)
    for m, (_, _, momentum) in zip(bns, saved):
        m.momentum = momentum
        m.eval()
    after = mean_layer_loss(teacher, model, inputs, batch, names, kept_out)
    if after < before:
        return True, after
    for m, (mean, var, _) in zip(bns, saved):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
    return False, before


# --- phase 2c: per-layer Adam -------------------------------------------------------------------------------------

def _calibrate_layers(teacher: Teacher, pruned: nn.Module, inputs: torch.Tensor, names: list[str],
                      kept_out: dict[str, torch.Tensor], epochs: int, batch: int, lr: float, seed: int, bar,
                      log: CalibrationLog) -> None:
    if epochs == 0:
        return
    modules = dict(pruned.named_modules())
    groups = []
    for k, name in enumerate(names, start=1):
        params = list(modules[name].parameters(recurse=False))
        for p in params:
            p.requires_grad_(True)
        if params:
            groups.append({"params": params, "lr": lr * k / len(names)})
    optimiser = torch.optim.Adam(groups)
    generator = torch.Generator().manual_seed(seed + 2)
    for _ in range(epochs):
        losses = []
        for x in batches(inputs, batch, generator):
            optimiser.zero_grad(set_to_none=True)
            loss = layer_loss(teacher, pruned, x, names, kept_out)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
            _tick(bar, "calibrate", loss.item())
        log.calib_loss.append(sum(losses) / len(losses))


def _restore_requires_grad(original: nn.Module, pruned: nn.Module) -> None:
    wanted = {name: p.requires_grad for name, p in original.named_parameters()}
    for name, p in pruned.named_parameters():
        p.requires_grad_(wanted.get(name, True))
        p.grad = None


# --- progress -----------------------------------------------------------------------------------------------------

def _total_steps(n: int, batch: int, squeeze_epochs: int, calib_epochs: int) -> int:
    return (squeeze_epochs + calib_epochs) * math.ceil(n / batch)


def _progress_bar(enabled: bool, total: int):
    from tqdm import tqdm
    return tqdm(total=total, desc="calibration", unit="step", file=sys.stderr, leave=False,
                disable=not (enabled and sys.stderr.isatty()))


def _tick(bar, phase: str, loss: float | None) -> None:
    if loss is None:  # least-squares layers are not counted in the total; only show the phase
        bar.set_description(phase, refresh=False)
        return
    bar.update(1)
    bar.set_description(phase, refresh=False)
    bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
