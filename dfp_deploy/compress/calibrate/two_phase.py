"""Few-shot calibration: squeeze the channels a plan removes into the kept ones, prune, then calibrate layer outputs.

Needs a few hundred UNLABELED inputs (labels are never used); the frozen original model is the teacher. Both phases
minimise the normalised layer-output error L(θ) = Σ_l ‖Y_l(x; θ) − Y°_l(x)|_K‖² / ‖Y°_l(x)|_K‖² over every Conv,
Linear and BatchNorm output (|_K: the channels the student still has). Phase 1 (squeeze, on the unpruned model): Adam
on L while the removed weights are pulled to exactly zero by a proximal step w ← w·(T − t)/(T − t + 1). Phase 2 (on
the pruned model): per consumer, ridge least squares (PᵀP + λI)Wᵀ = PᵀT + λW₀ᵀ with λ chosen by K-fold
cross-validation over images; BatchNorm re-estimation; per-layer Adam on L (each step kept only if it lowers L).
The derivation and the choices behind it: docs/methods/calibration.md.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dfp_deploy.analysis import Analysis
from dfp_deploy.compress.prune import prune_model, validate_plan
from dfp_deploy.core.errors import DataError, InputError
from dfp_deploy.core.types import PrunePlan

LAYER_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)
_EPS = 1e-12


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
        teacher = _Teacher(model)
        layer_order = _execution_order(model, inputs[:1])
        if batch is None:
            batch = auto_batch(model, inputs[:1], layer_order)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            bar = _progress_bar(progress, _total_steps(len(inputs), batch, squeeze_epochs, calib_epochs))
            try:
                student = _squeeze(teacher, model, analysis, keep, inputs, layer_order, squeeze_epochs, batch, lr,
                                   seed, bar, log)
                pruned = prune_model(student, analysis, PrunePlan(keep=dict(keep))).eval()
                kept_out = _kept_output_positions(analysis, keep)
                log.after_prune = _mean_loss(teacher, pruned, inputs, batch, layer_order, kept_out)
                log.least_squares_ridge = _least_squares(teacher, pruned, analysis, keep, inputs[:ls_samples],
                                                         batch, ridge, kept_out, layer_order, bar)
                log.least_squares_layers = list(log.least_squares_ridge)
                log.after_least_squares = _mean_loss(teacher, pruned, inputs, batch, layer_order, kept_out)
                kept_bn, loss = _maybe_reestimate_bn(teacher, pruned, inputs, batch, layer_order, kept_out,
                                                     log.after_least_squares)
                log.bn_reestimated.append(kept_bn)
                if calib_epochs:
                    before_adam = copy.deepcopy(pruned.state_dict())
                    _calibrate_layers(teacher, pruned, inputs, layer_order, kept_out, calib_epochs, batch, lr, seed,
                                      bar, log)
                    after_adam = _mean_loss(teacher, pruned, inputs, batch, layer_order, kept_out)
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
        names = names if names is not None else _execution_order(model, example[:1])
        outputs = _Teacher(model).outputs(example[:1], names)
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
    order = _execution_order(reference, inputs[:1])
    return _mean_loss(_Teacher(reference), candidate, inputs.float(), batch, order, kept_out or {})


def kept_output_positions(analysis: Analysis, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """module name -> the original output-channel positions that survive `plan` (only for modules that lose some)."""
    return _kept_output_positions(analysis, validate_plan(analysis, plan))


# --- arguments ----------------------------------------------------------------------------------------------------

def _check_arguments(inputs, squeeze_epochs, calib_epochs, batch, lr, ridge, ls_samples) -> None:
    if not torch.is_tensor(inputs) or not inputs.is_floating_point() or inputs.dim() < 2:
        got = f"{inputs.dtype} {tuple(inputs.shape)}" if torch.is_tensor(inputs) else type(inputs).__name__
        raise DataError(f"compress.calibration: inputs must be a float tensor [N, ...], got {got}")
    if len(inputs) < 1:
        raise DataError("compress.calibration: no calibration inputs; give at least one image (samples >= 1)")
    for key, value in (("compress.calibration.squeeze_epochs", squeeze_epochs),
                       ("compress.calibration.calib_epochs", calib_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{key}: {value!r} must be an integer >= 0")
    for key, value in (("batch", batch), ("ls_samples", ls_samples)):  # arguments of calibrate(), not recipe keys
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"calibrate(): {key}={value!r} must be an integer >= 1")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr):
        raise InputError(f"compress.calibration.lr: {lr!r} must be a positive number, e.g. 1e-3")
    if ridge is not None and (isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0
                              or not math.isfinite(ridge)):
        raise InputError(f"calibrate(): ridge={ridge!r} must be a number >= 0 (e.g. 1e-3) or None "
                         "(cross-validated per layer)")


# --- layer outputs and the objective ------------------------------------------------------------------------------

class _Recorder:
    """Forward hooks that collect every call's output of the named layers (a shared module gives several)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        self.outputs: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        modules = dict(model.named_modules())
        self.handles = [modules[name].register_forward_hook(self._hook(name)) for name in names if name in modules]

    def _hook(self, name: str):
        def hook(module, args, output):
            self.outputs[name].append(output)
        return hook

    def take(self) -> dict[str, list[torch.Tensor]]:
        taken = self.outputs
        self.outputs = {name: [] for name in taken}
        return taken

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class _Teacher:
    """The frozen original: layer outputs without gradients."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def outputs(self, x: torch.Tensor, names: list[str]) -> dict[str, list[torch.Tensor]]:
        recorder = _Recorder(self.model, names)
        try:
            self.model(x)
        finally:
            recorder.close()
        return recorder.take()


def _execution_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the Conv/Linear/BN layers in the order a forward pass first calls them."""
    called: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, LAYER_TYPES):
            handles.append(module.register_forward_hook(
                lambda m, a, o, name=name: called.append(name) if name not in called else None))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return called


def _normalised_error(student: dict[str, list[torch.Tensor]], target: dict[str, list[torch.Tensor]],
                      kept_out: dict[str, torch.Tensor]) -> torch.Tensor:
    terms = []
    for name, outs in student.items():
        for out, ref in zip(outs, target[name]):
            if name in kept_out:
                ref = ref.index_select(1, kept_out[name])
            terms.append((out - ref).pow(2).sum() / (ref.pow(2).sum() + _EPS))
    return torch.stack(terms).sum()


def _loss(teacher: _Teacher, student: nn.Module, x: torch.Tensor, names: list[str],
          kept_out: dict[str, torch.Tensor]) -> torch.Tensor:
    target = teacher.outputs(x, names)
    recorder = _Recorder(student, names)
    try:
        student(x)
    finally:
        recorder.close()
    return _normalised_error(recorder.take(), target, kept_out)


def _mean_loss(teacher: _Teacher, student: nn.Module, inputs: torch.Tensor, batch: int, names: list[str],
               kept_out: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        losses = [_loss(teacher, student, x, names, kept_out).item() for x in _batches(inputs, batch)]
    return float(sum(losses) / len(losses))


def _batches(inputs: torch.Tensor, batch: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    index = torch.randperm(len(inputs), generator=generator) if generator is not None else torch.arange(len(inputs))
    for start in range(0, len(inputs), batch):
        yield inputs[index[start:start + batch]]


def _kept_output_positions(analysis: Analysis, keep: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    masks: dict[str, list[bool]] = {}
    for group, kept in keep.items():
        kept_set = set(kept)
        members = analysis.members(group)
        for table in (members.producers, members.passthrough):
            for name, mapping in table.items():
                mask = masks.setdefault(name, [True] * len(mapping))
                for position, channel in enumerate(mapping):
                    if channel >= 0 and channel not in kept_set:
                        mask[position] = False
    return {name: torch.tensor([i for i, ok in enumerate(mask) if ok], dtype=torch.long)
            for name, mask in masks.items() if not all(mask)}


# --- phase 1: squeeze ---------------------------------------------------------------------------------------------

def _squeeze(teacher: _Teacher, model: nn.Module, analysis: Analysis, keep: dict[str, tuple[int, ...]],
             inputs: torch.Tensor, names: list[str], epochs: int, batch: int, lr: float, seed: int, bar,
             log: CalibrationLog) -> nn.Module:
    student = copy.deepcopy(model).eval()
    if epochs == 0:
        return student
    pulls = _pull_targets(student, analysis, keep)
    params = _layer_parameters(student, names)
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed + 1)
    total = epochs * math.ceil(len(inputs) / batch)
    step = 0
    for _ in range(epochs):
        losses = []
        for x in _batches(inputs, batch, generator):
            optimiser.zero_grad(set_to_none=True)
            loss = _loss(teacher, student, x, names, {})
            loss.backward()
            optimiser.step()
            step += 1
            _proximal_pull(pulls, factor=(total - step) / (total - step + 1))
            losses.append(loss.item())
            _tick(bar, "squeeze", loss.item())
        log.squeeze_loss.append(sum(losses) / len(losses))
    return student


def _pull_targets(model: nn.Module, analysis: Analysis,
                  keep: dict[str, tuple[int, ...]]) -> list[tuple[torch.Tensor, int, torch.Tensor]]:
    """(parameter, dim, positions) of every weight that belongs to a channel the plan removes."""
    modules = dict(model.named_modules())
    removed: dict[tuple[str, int], set[int]] = {}
    for group, kept in keep.items():
        kept_set = set(kept)
        members = analysis.members(group)
        for table, dim in ((members.producers, 0), (members.passthrough, 0), (members.consumers, 1)):
            for name, mapping in table.items():
                positions = {p for p, c in enumerate(mapping) if c >= 0 and c not in kept_set}
                removed.setdefault((name, dim), set()).update(positions)
    targets = []
    for (name, dim), positions in sorted(removed.items()):
        if not positions:
            continue
        index = torch.tensor(sorted(positions), dtype=torch.long)
        module = modules[name]
        if getattr(module, "weight", None) is not None:
            targets.append((module.weight, dim, index))
        if dim == 0 and getattr(module, "bias", None) is not None:
            targets.append((module.bias, 0, index))
    return targets


@torch.no_grad()
def _proximal_pull(targets: list[tuple[torch.Tensor, int, torch.Tensor]], factor: float) -> None:
    for param, dim, index in targets:
        param.index_copy_(dim, index, param.index_select(dim, index) * factor)


def _layer_parameters(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
    modules = dict(model.named_modules())
    return [p for name in names for p in modules[name].parameters(recurse=False)]


# --- phase 2a: closed-form least squares --------------------------------------------------------------------------

class _Stop(Exception):
    """Raised from a hook once the wanted activation is captured, so the rest of the forward pass is skipped."""


def _least_squares(teacher: _Teacher, pruned: nn.Module, analysis: Analysis, keep: dict[str, tuple[int, ...]],
                   inputs: torch.Tensor, batch: int, ridge: float | None, kept_out: dict[str, torch.Tensor],
                   names: list[str], bar) -> dict[str, float]:
    """Refit every supported consumer of a pruned group, in execution order; {name: relative ridge ρ used}."""
    consumers = {c for group in keep for c in analysis.members(group).consumers}
    modules = dict(pruned.named_modules())
    todo = [n for n in names if n in consumers and _supports_least_squares(modules[n])]
    targets = _TeacherTargets(teacher, todo, inputs, batch, kept_out)
    used = {}
    for name in todo:
        with torch.no_grad():
            used[name] = _solve_consumer(pruned, name, inputs, batch, ridge, targets)
        _tick(bar, "least squares", None)
    return used


class _TeacherTargets:
    """The original outputs of the least-squares layers, per batch: cached from one teacher pass per batch when they
    fit in `budget_bytes`, otherwise recomputed per layer with a forward pass that stops at that layer."""

    def __init__(self, teacher: _Teacher, names: list[str], inputs: torch.Tensor, batch: int,
                 kept_out: dict[str, torch.Tensor], budget_bytes: int = 1 << 30) -> None:
        self.teacher, self.kept_out, self.cache = teacher, kept_out, None
        if not names:
            return
        probe = teacher.outputs(inputs[:1], names)
        per_sample = sum(self._restrict(n, probe[n][0]).numel() * 4 for n in names)
        if per_sample * len(inputs) <= budget_bytes:
            self.cache = [{n: self._restrict(n, outs[0]) for n, outs in teacher.outputs(x, names).items()}
                          for x in _batches(inputs, batch)]

    def _restrict(self, name: str, y: torch.Tensor) -> torch.Tensor:
        return y.index_select(1, self.kept_out[name]) if name in self.kept_out else y

    def get(self, name: str, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[index][name]
        return self._restrict(name, _capture(self.teacher.model, name, x, want="output"))


def _supports_least_squares(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def _solve_consumer(pruned: nn.Module, name: str, inputs: torch.Tensor, batch: int, ridge: float | None,
                    targets: _TeacherTargets) -> float:
    """Refit one consumer in closed form (module docstring, (a)); returns the relative ridge ρ it used (inf: the
    cross-validation kept the current weights)."""
    module = dict(pruned.named_modules())[name]
    folds = 1 if ridge is not None else min(CV_FOLDS, len(inputs))
    stats = _FoldStatistics(folds)
    start = 0
    for index, x in enumerate(_batches(inputs, batch)):
        patches = _patches(module, _capture(pruned, name, x, want="input"))
        target = _rows_of_output(targets.get(name, index, x))
        stats.add(patches, target, first_image=start, images=len(x))
        start += len(x)
    current = _flat_weight(module)
    rho = ridge if ridge is not None else choose_ridge(stats, current)
    if math.isinf(rho):
        return rho
    gram, cross = stats.total()
    _set_flat_weight(module, _ridge_solution(gram, cross, current, rho))
    return rho


CV_FOLDS = 4
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # relative ridge ρ, λ = ρ·tr(PᵀP)/d


class _FoldStatistics:
    """Per-fold sufficient statistics of a least-squares problem: G_f = P_fᵀP_f, C_f = P_fᵀT_f, t_f = ‖T_f‖².
    Whole images go to one fold (image j to fold j mod K): the rows of one image (its patches) are strongly
    correlated, so splitting rows would leak the held-out image into the fit."""

    def __init__(self, folds: int) -> None:
        self.folds = folds
        self.gram: list[torch.Tensor | None] = [None] * folds
        self.cross: list[torch.Tensor | None] = [None] * folds
        self.sq = [0.0] * folds

    def add(self, patches: torch.Tensor, target: torch.Tensor, first_image: int, images: int) -> None:
        if self.folds == 1:  # fixed-ridge mode: nothing held out, so no row selection (and no copies)
            self._accumulate(0, patches, target)
            return
        rows = len(patches) // images  # _patches/_rows_of_output keep each image's rows together, in order
        fold_of_row = ((first_image + torch.arange(images)) % self.folds).repeat_interleave(rows)
        for f in range(self.folds):
            mask = fold_of_row == f
            if bool(mask.any()):
                self._accumulate(f, patches[mask], target[mask])

    def _accumulate(self, f: int, p: torch.Tensor, t: torch.Tensor) -> None:
        g, c = p.T @ p, p.T @ t
        self.gram[f] = g if self.gram[f] is None else self.gram[f] + g
        self.cross[f] = c if self.cross[f] is None else self.cross[f] + c
        self.sq[f] += float(t.pow(2).sum())

    def total(self) -> tuple[torch.Tensor, torch.Tensor]:
        grams = [g for g in self.gram if g is not None]
        crosses = [c for c in self.cross if c is not None]
        return sum(grams[1:], grams[0]), sum(crosses[1:], crosses[0])


def _ridge_solution(gram: torch.Tensor, cross: torch.Tensor, current: torch.Tensor, rho: float) -> torch.Tensor:
    """argmin_W ‖P Wᵀ − T‖² + λ‖W − W₀‖² with λ = ρ·tr(G)/d, from G = PᵀP and C = PᵀT: (G + λI) Wᵀ = C + λ W₀ᵀ."""
    d = gram.shape[0]
    lam = max(rho * float(torch.trace(gram)) / d, _EPS)
    return torch.linalg.solve(gram + lam * torch.eye(d, dtype=gram.dtype), cross + lam * current.T).T


def _held_out_error(w: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, sq: float) -> float:
    """‖P W^T − T‖² = tr(W G Wᵀ) − 2 tr(W C) + ‖T‖², from the held-out fold's statistics."""
    return float(((w @ gram) * w).sum() - 2.0 * (w * cross.T).sum() + sq)


def choose_ridge(stats: _FoldStatistics, current: torch.Tensor, grid: tuple[float, ...] = RIDGE_GRID) -> float:
    """The relative ridge ρ (or inf: keep `current`) with the lowest K-fold cross-validated output error.

    For fold f the fit uses the other folds, G₋f = Σ_{g≠f} G_g and C₋f likewise, and is scored on f itself with
    _held_out_error. With one eigendecomposition G₋f = Q Λ Qᵀ per fold, every λ costs one product:
    W_λᵀ = Q (Λ + λ)⁻¹ Qᵀ (C₋f + λ W₀ᵀ). Candidates are tried from the most conservative (inf, i.e. W₀) to the
    least, and a smaller ρ must be strictly better to win, so ties keep the weights closest to W₀. With fewer than
    two non-empty folds there is nothing to validate on: the fixed-ridge default, 1e-3."""
    present = [f for f in range(stats.folds) if stats.gram[f] is not None]
    if len(present) < 2:
        return 1e-3
    gram, cross = stats.total()
    d = gram.shape[0]
    candidates = [math.inf, *sorted(grid, reverse=True)]
    errors = [0.0] * len(candidates)
    for f in present:
        g_fit, c_fit = gram - stats.gram[f], cross - stats.cross[f]
        eigenvalues, q = torch.linalg.eigh(g_fit)
        eigenvalues = eigenvalues.clamp_min(0.0)
        qt_c, qt_w = q.T @ c_fit, q.T @ current.T
        scale = float(eigenvalues.sum()) / d  # tr(G₋f)/d
        for i, rho in enumerate(candidates):
            if math.isinf(rho):
                w = current
            else:
                lam = max(rho * scale, _EPS)
                w = (q @ ((qt_c + lam * qt_w) / (eigenvalues + lam)[:, None])).T
            errors[i] += _held_out_error(w, stats.gram[f], stats.cross[f], stats.sq[f])
    return candidates[min(range(len(candidates)), key=errors.__getitem__)]  # first minimum: ties -> larger ρ


def _capture(model: nn.Module, name: str, x: torch.Tensor, want: str) -> torch.Tensor:
    module = dict(model.named_modules())[name]
    box: list[torch.Tensor] = []

    def grab(tensor: torch.Tensor) -> None:
        box.append(tensor.detach())
        raise _Stop

    if want == "input":
        handle = module.register_forward_pre_hook(lambda m, args: grab(args[0]))
    else:
        handle = module.register_forward_hook(lambda m, args, out: grab(out))
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not box:
        raise ValueError(f"layer '{name}' was not called by the forward pass")
    return box[0]


def _patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input rows P (float64 [N, d]) such that the module's output is P · flat_weightᵀ (see _flat_weight)."""
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
    else:
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                        stride=module.stride)  # [B, C·kh·kw, L], channel-major like weight.reshape(out, -1)
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    rows = rows.double()
    if module.bias is not None:
        rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=rows.dtype)], dim=1)
    return rows


def _rows_of_output(y: torch.Tensor) -> torch.Tensor:
    """[B, out, *spatial] (or [..., out] for Linear outputs of rank 2) -> float64 [N, out], rows like _patches."""
    if y.dim() > 2:
        y = y.flatten(2).transpose(1, 2)
    return y.reshape(-1, y.shape[-1]).double()


def _flat_weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight.detach().reshape(module.weight.shape[0], -1).double()
    if module.bias is not None:
        weight = torch.cat([weight, module.bias.detach().double()[:, None]], dim=1)
    return weight


def _set_flat_weight(module: nn.Module, flat: torch.Tensor) -> None:
    weight = module.weight
    if module.bias is not None:
        module.bias.data.copy_(flat[:, -1].to(module.bias.dtype))
        flat = flat[:, :-1]
    weight.data.copy_(flat.reshape(weight.shape).to(weight.dtype))


# --- phase 2b/d: BatchNorm statistics -----------------------------------------------------------------------------

def _maybe_reestimate_bn(teacher: _Teacher, model: nn.Module, inputs: torch.Tensor, batch: int, names: list[str],
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
        for x in _batches(inputs, batch):
            model(x)
    for m, (_, _, momentum) in zip(bns, saved):
        m.momentum = momentum
        m.eval()
    after = _mean_loss(teacher, model, inputs, batch, names, kept_out)
    if after < before:
        return True, after
    for m, (mean, var, _) in zip(bns, saved):
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
    return False, before


# --- phase 2c: per-layer Adam -------------------------------------------------------------------------------------

def _calibrate_layers(teacher: _Teacher, pruned: nn.Module, inputs: torch.Tensor, names: list[str],
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
        for x in _batches(inputs, batch, generator):
            optimiser.zero_grad(set_to_none=True)
            loss = _loss(teacher, pruned, x, names, kept_out)
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
