"""Phase 2a of calibration: refit each consumer of the pruned model to the teacher's outputs in closed form.

Per consumer (conv with groups=1, or Linear), with input patches P and target outputs T: (PᵀP + λI)Wᵀ = PᵀT + λW₀ᵀ,
λ = ρ·tr(PᵀP)/d, ρ chosen by K-fold cross-validation over whole images from statistics accumulated in one pass
(ρ = ∞ keeps W₀) (docs/methods/calibration.md, "Phase 2a").
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dfp_deploy.analysis import Analysis
from dfp_deploy.compress.calibrate.objective import EPS, Teacher, batches


class _Stop(Exception):
    """Raised from a hook once the wanted activation is captured, so the rest of the forward pass is skipped."""


def least_squares(teacher: Teacher, pruned: nn.Module, analysis: Analysis, keep: dict[str, tuple[int, ...]],
                  inputs: torch.Tensor, batch: int, ridge: float | None, kept_out: dict[str, torch.Tensor],
                  names: list[str], tick: Callable[[], None]) -> dict[str, float]:
    """Refit every supported consumer of a pruned group, in execution order; {name: relative ridge ρ used}.
    `tick()` after each consumer."""
    consumers = {c for group in keep for c in analysis.members(group).consumers}
    modules = dict(pruned.named_modules())
    todo = [n for n in names if n in consumers and _supports_least_squares(modules[n])]
    targets = _TeacherTargets(teacher, todo, inputs, batch, kept_out)
    used = {}
    for name in todo:
        with torch.no_grad():
            used[name] = _solve_consumer(pruned, name, inputs, batch, ridge, targets)
        tick()
    return used


class _TeacherTargets:
    """The original outputs of the least-squares layers, per batch: cached from one teacher pass per batch when they
    fit in `budget_bytes`, otherwise recomputed per layer with a forward pass that stops at that layer."""

    def __init__(self, teacher: Teacher, names: list[str], inputs: torch.Tensor, batch: int,
                 kept_out: dict[str, torch.Tensor], budget_bytes: int = 1 << 30) -> None:
        self.teacher, self.kept_out, self.cache = teacher, kept_out, None
        if not names:
            return
        probe = teacher.outputs(inputs[:1], names)
        per_sample = sum(self._restrict(n, probe[n][0]).numel() * 4 for n in names)
        if per_sample * len(inputs) <= budget_bytes:
            self.cache = [{n: self._restrict(n, outs[0]) for n, outs in teacher.outputs(x, names).items()}
                          for x in batches(inputs, batch)]

    def _restrict(self, name: str, y: torch.Tensor) -> torch.Tensor:
        return y.index_select(1, self.kept_out[name]) if name in self.kept_out else y

    def get(self, name: str, index: int, x: torch.Tensor) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[index][name]
        return self._restrict(name, capture(self.teacher.model, name, x, want="output"))


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
    stats = FoldStatistics(folds)
    start = 0
    for index, x in enumerate(batches(inputs, batch)):
        patches = _patches(module, capture(pruned, name, x, want="input"))
        target = rows_of_output(targets.get(name, index, x))
        stats.add(patches, target, first_image=start, images=len(x))
        start += len(x)
    current = flat_weight(module)
    rho = ridge if ridge is not None else choose_ridge(stats, current)
    if math.isinf(rho):
        return rho
    gram, cross = stats.total()
    set_flat_weight(module, ridge_solution(gram, cross, current, rho))
    return rho


CV_FOLDS = 4
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # relative ridge ρ, λ = ρ·tr(PᵀP)/d


class FoldStatistics:
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
        rows = len(patches) // images  # _patches/rows_of_output keep each image's rows together, in order
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


def ridge_solution(gram: torch.Tensor, cross: torch.Tensor, current: torch.Tensor, rho: float) -> torch.Tensor:
    """argmin_W ‖P Wᵀ − T‖² + λ‖W − W₀‖² with λ = ρ·tr(G)/d, from G = PᵀP and C = PᵀT: (G + λI) Wᵀ = C + λ W₀ᵀ."""
    d = gram.shape[0]
    lam = max(rho * float(torch.trace(gram)) / d, EPS)
    return torch.linalg.solve(gram + lam * torch.eye(d, dtype=gram.dtype), cross + lam * current.T).T


def held_out_error(w: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, sq: float) -> float:
    """‖P W^T − T‖² = tr(W G Wᵀ) − 2 tr(W C) + ‖T‖², from the held-out fold's statistics."""
    return float(((w @ gram) * w).sum() - 2.0 * (w * cross.T).sum() + sq)


def choose_ridge(stats: FoldStatistics, current: torch.Tensor, grid: tuple[float, ...] = RIDGE_GRID) -> float:
    """The relative ridge ρ (or inf: keep `current`) with the lowest K-fold cross-validated output error.

    For fold f the fit uses the other folds, G₋f = Σ_{g≠f} G_g and C₋f likewise, and is scored on f itself with
    held_out_error. With one eigendecomposition G₋f = Q Λ Qᵀ per fold, every λ costs one product:
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
                lam = max(rho * scale, EPS)
                w = (q @ ((qt_c + lam * qt_w) / (eigenvalues + lam)[:, None])).T
            errors[i] += held_out_error(w, stats.gram[f], stats.cross[f], stats.sq[f])
    return candidates[min(range(len(candidates)), key=errors.__getitem__)]  # first minimum: ties -> larger ρ


def capture(model: nn.Module, name: str, x: torch.Tensor, want: str) -> torch.Tensor:
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
    """Input rows P (float64 [N, d]) such that the module's output is P · flat_weightᵀ (see flat_weight)."""
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


def rows_of_output(y: torch.Tensor) -> torch.Tensor:
    """[B, out, *spatial] (or [..., out] for Linear outputs of rank 2) -> float64 [N, out], rows like _patches."""
    if y.dim() > 2:
        y = y.flatten(2).transpose(1, 2)
    return y.reshape(-1, y.shape[-1]).double()


def flat_weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight.detach().reshape(module.weight.shape[0], -1).double()
    if module.bias is not None:
        weight = torch.cat([weight, module.bias.detach().double()[:, None]], dim=1)
    return weight


def set_flat_weight(module: nn.Module, flat: torch.Tensor) -> None:
    weight = module.weight
    if module.bias is not None:
        module.bias.data.copy_(flat[:, -1].to(module.bias.dtype))
        flat = flat[:, :-1]
    weight.data.copy_(flat.reshape(weight.shape).to(weight.dtype))
