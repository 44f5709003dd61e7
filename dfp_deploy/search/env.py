"""The pruning environment: walk the searchable groups, turn actions into kept counts under an action wall, so that
every finished plan meets the cost budget by construction; plus the cost models the wall uses.

Action. a_t ∈ [−1, 1] (the agent's tanh range) maps to a keep ratio
    κ_t = κ_min(t) + (a_t + 1)/2 · (1 − κ_min(t)),   κ_min(t) = k_min(t)/C_t,
which is snapped to the nearest allowed kept count k_t (a multiple of round_to, see space.py).

Action wall (AMC). With budget B = target · cost(1) and the rest of the groups at their minimum,
    k_t ≤ W_t = max{k allowed : cost(k_0..k_{t−1}, k, k_min(t+1..G−1)) ≤ B}
found by bisection (cost is non-decreasing in every ratio). If cost(k_min everywhere) ≤ B (checked up front, else
the target is unreachable), every step has a feasible choice and the finished plan has cost ≤ B: the budget is met
by construction, whatever the agent does.
Budget floor (`fill`, default on). Symmetrically, with the rest of the groups kept whole,
    k_t ≥ F_t = min{k allowed : cost(k_0..k_{t−1}, k, C_{t+1..G−1}) ≥ B}      (k_t = min(max(k, F_t), W_t))
so a plan never leaves budget unused that it could have spent: the finished plan costs B up to the snapping of the
last groups (when F_t > W_t the wall wins and the plan ends a little under B). Measured on ResNet-56 at 50% MACs:
without the floor, random and early SAC episodes often ended at 40-46% of the MACs, wasting accuracy on a budget
nobody asked to undercut (bench/bench_search.py). The recorded action is the one actually taken (κ of the clipped k_t mapped
back to [−1, 1]), so the critic learns about what happened, not about what was asked for.

Cost models, both of the form cost(r) with r the keep ratios of the searched groups:
  MacCost:      MACs(r) per image (space.CostTerms, exact for chains and block-internal groups).
  LatencyModel: ℓ(r) = c0 + s · Σ_m t_m f_m(r̂), a linear per-module table (t_m ∝ MACs_m unless a measured table is
                given) on the kept counts rounded UP to the target's channel block (r̂; `block`, the pipeline passes
                the target's preferred multiple: ORT's NCHWc block, 8 with AVX2 and 16 with AVX-512, or TensorRT's
                tensor-core multiple), since a kernel pads a partly filled block and pays for all of it (measured on
                AVX-512: ResNet-56 at uniform ratios 0.5 and 0.55, kept counts 8/16/32 vs 8/16/28, ran equally fast),
                corrected by real measurements: (c0, s) is the least-squares fit of every observed
                (x = Σ_m t_m f_m(r), measured ms) pair, constrained to c0 ≥ 0, s > 0; with a single observation (or
                observations that all predict the same) c0 = 0 and s = mean(measured / predicted). Once the
                original (r = 1, x = x1, measured y1) has been observed, the line is held through it:
                s = Σ_i (x_i − x1)(y_i − y1) / Σ_i (x_i − x1)² over the other points, c0 = y1 − s·x1, so that
                cost(1) stays the measured original and the budget target · cost(1) stays the absolute latency
                the reward's penalty uses, however later candidates move the slope (an unanchored fit had moved
                cost(1) up 2% and let every candidate of a ResNet-56 search miss the target by 3-5%). A point
                observed as a `prior` (the search's floor plan, far from the budget) shapes the line only until
                a candidate has been measured: the candidates sit at the budget, where the line must be right,
                and a far point's leverage would otherwise swamp them (a ResNet-56 floor at 0.48 of the
                latency kept the line 4% under candidates measured at 0.73).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dfp_deploy.core.errors import InputError
from dfp_deploy.search.space import SearchSpace

_TOLERANCE = 1e-9


class MacCost:
    """cost(r) = MACs per image."""

    unit = "MACs"

    def __init__(self, space: SearchSpace):
        self.terms = space.terms

    def __call__(self, keep: np.ndarray) -> float:
        return self.terms.macs_at(keep)


class LatencyModel:
    """Predicted latency in ms, corrected by `observe` (see the module docstring)."""

    unit = "ms"

    def __init__(self, space: SearchSpace, *, table_ms: dict[str, float] | None = None, block: int = 1):
        terms = space.terms
        self.terms = terms
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise InputError(f"latency model block: {block!r} must be an integer >= 1")
        self.block = block
        self.channels = np.asarray(space.channels, dtype=np.float64)
        if table_ms:
            unknown = sorted(set(table_ms) - set(terms.modules))
            if unknown:
                raise InputError(f"search latency table names modules that are not costed convs: {unknown[:3]}")
            self.table = np.asarray([table_ms.get(m, 0.0) for m in terms.modules], dtype=np.float64)
        else:
            self.table = terms.macs / terms.macs.sum()
        self.observations: list[tuple[float, float]] = []  # (x, ms) of the measured candidates
        self.priors: list[tuple[float, float]] = []  # (x, ms) of points used only until a candidate is measured
        self.anchor: float | None = None  # the original's measured ms
        self.c0, self.scale = 0.0, 1.0

    def raw(self, keep: np.ndarray) -> float:
        return float(self.table @ self.terms.fractions(self.padded(keep)))

    def padded(self, keep: np.ndarray) -> np.ndarray:
        """Keep ratios of the kept counts rounded up to the block (a partly filled block costs a whole one)."""
        keep = np.asarray(keep, dtype=np.float64)
        if self.block == 1:
            return keep
        kept = np.round(keep * self.channels, 6)
        return np.minimum(np.ceil(kept / self.block) * self.block, self.channels) / self.channels

    def __call__(self, keep: np.ndarray) -> float:
        return self.c0 + self.scale * self.raw(keep)

    def observe(self, keep: np.ndarray, measured_ms: float, *, prior: bool = False) -> None:
        """Add one real measurement and refit (c0, s); `prior` points count only while there is no other."""
        if measured_ms is None or not np.isfinite(measured_ms) or measured_ms <= 0:
            return
        keep = np.asarray(keep, dtype=np.float64)
        if np.all(keep == 1.0):
            self.anchor = float(measured_ms)  # the original (its latest measurement)
        else:
            (self.priors if prior else self.observations).append((self.raw(keep), float(measured_ms)))
        points = self.observations or self.priors
        self.c0, self.scale = _fit_line(points, self.anchor, self.raw(np.ones(keep.shape)))


def _fit_line(points: list[tuple[float, float]], anchor: float | None = None,
              x_anchor: float = 1.0) -> tuple[float, float]:
    """(c0, s) of the module docstring; `anchor` = the original's measured latency (at x_anchor), or None."""
    if anchor is not None:
        if not points:
            return 0.0, anchor / max(x_anchor, 1e-12)
        dx = np.asarray([p for p, _ in points]) - x_anchor
        dy = np.asarray([m for _, m in points]) - anchor
        slope = float(dx @ dy / max(float(dx @ dx), 1e-300))
        intercept = anchor - slope * x_anchor
        if slope <= 0 or intercept < 0:
            return 0.0, anchor / max(x_anchor, 1e-12)  # noise made the line unphysical: a pure scale
        return intercept, slope
    x = np.asarray([p for p, _ in points])
    y = np.asarray([m for _, m in points])
    proportional = (0.0, float(np.mean(y / np.maximum(x, 1e-12))))
    if len(points) < 2 or np.ptp(x) < 1e-6 * max(np.abs(x).max(), 1e-12):
        return proportional
    slope, intercept = np.polyfit(x, y, 1)
    if slope <= 0 or intercept < 0:
        return proportional  # noise made the line unphysical; a pure scale is the safer model
    return float(intercept), float(slope)


@dataclass(frozen=True)
class Episode:
    """One walk over the groups: the states seen, the actions taken (in [−1, 1]) and the kept counts."""

    states: np.ndarray   # [G, state_dim]
    actions: np.ndarray  # [G, 1]
    kept: tuple[int, ...]
    cost: float
    budget: float

    def next_states(self) -> np.ndarray:
        return np.concatenate((self.states[1:], np.zeros_like(self.states[:1])))

    def dones(self) -> np.ndarray:
        done = np.zeros(len(self.kept), dtype=np.float32)
        done[-1] = 1.0
        return done


class PruneEnv:
    """Budgeted walk over `space`'s groups with cost model `cost` and budget target · cost(1)."""

    def __init__(self, space: SearchSpace, cost: Callable[[np.ndarray], float], target: float, *,
                 fill: bool = True):
        if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
            raise InputError(f"search target: {target!r} is not a fraction of the original cost in (0, 1]")
        self.space, self.cost, self.target, self.fill = space, cost, float(target), bool(fill)
        self.min_ratio = np.asarray(space.min_kept, dtype=np.float64) / np.asarray(space.channels)

    def budget(self) -> float:
        return self.target * self.cost(np.ones(self.space.size))

    def check_reachable(self) -> None:
        floor, budget = self.cost(self.min_ratio), self.budget()
        if floor > budget * (1 + _TOLERANCE):
            full = self.cost(np.ones(self.space.size))
            raise InputError(f"search target {self.target:g} is unreachable: even keeping the minimum of every "
                             f"searched group costs {floor / full:.3f} of the original; raise the target, lower "
                             "advanced.search.min_keep or compress.prune.round_to (kept counts snap up to that "
                             "multiple), or include residual groups")

    def action_to_keep(self, t: int, action: float) -> float:
        a = float(np.clip(action, -1.0, 1.0))
        return self.min_ratio[t] + (a + 1.0) / 2.0 * (1.0 - self.min_ratio[t])

    def keep_to_action(self, t: int, keep: float) -> float:
        span = 1.0 - self.min_ratio[t]
        return 1.0 if span <= 0 else float(np.clip(2.0 * (keep - self.min_ratio[t]) / span - 1.0, -1.0, 1.0))

    def wall(self, t: int, kept: list[int]) -> int:
        """The largest allowed kept count of group t that still lets the rest reach the budget."""
        choices = self.space.choices(t)
        channels = np.asarray(self.space.channels, dtype=np.float64)
        ratios = self.min_ratio.copy()
        ratios[:t] = np.asarray(kept[:t], dtype=np.float64) / channels[:t]
        limit = self.budget() * (1 + _TOLERANCE)

        def fits(count: int) -> bool:
            ratios[t] = count / channels[t]
            return self.cost(ratios) <= limit

        lo, hi = 0, len(choices) - 1
        if fits(int(choices[hi])):
            return int(choices[hi])
        while hi - lo > 1:  # invariant: choices[lo] fits, choices[hi] does not
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(int(choices[mid])) else (lo, mid)
        return int(choices[lo])

    def floor(self, t: int, kept: list[int]) -> int:
        """The smallest allowed kept count of group t with which the rest, kept whole, can still spend the budget."""
        choices = self.space.choices(t)
        channels = np.asarray(self.space.channels, dtype=np.float64)
        ratios = np.ones(self.space.size)
        ratios[:t] = np.asarray(kept[:t], dtype=np.float64) / channels[:t]
        limit = self.budget() * (1 - _TOLERANCE)

        def reaches(count: int) -> bool:
            ratios[t] = count / channels[t]
            return self.cost(ratios) >= limit

        lo, hi = 0, len(choices) - 1
        if reaches(int(choices[lo])):
            return int(choices[lo])
        if not reaches(int(choices[hi])):
            return int(choices[hi])
        while hi - lo > 1:  # invariant: choices[hi] reaches, choices[lo] does not
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if reaches(int(choices[mid])) else (mid, hi)
        return int(choices[hi])

    def rollout(self, act: Callable[[np.ndarray], float]) -> Episode:
        """Play one episode, asking `act(state) -> action in [−1, 1]` at every step."""
        return self._walk(lambda t, state: self.space.snap(t, self.action_to_keep(t, act(state))))

    def replay(self, kept: list[int]) -> Episode:
        """Rebuild the episode that chose `kept` (states and taken actions), without asking anyone."""
        if len(kept) != self.space.size:
            raise InputError(f"search log entry has {len(kept)} kept counts, the space has {self.space.size} groups")
        return self._walk(lambda t, state: int(kept[t]))

    def _walk(self, choose: Callable[[int, np.ndarray], int]) -> Episode:
        self.check_reachable()
        kept: list[int] = []
        states, actions = [], []
        prev = 1.0
        for t in range(self.space.size):
            wall_count = self.wall(t, kept)
            state = self.space.state(t, kept, prev, wall_count / self.space.channels[t])
            chosen = choose(t, state)
            if self.fill:
                chosen = max(chosen, self.floor(t, kept))
            count = min(chosen, wall_count)
            keep = count / self.space.channels[t]
            kept.append(count)
            states.append(state)
            actions.append([self.keep_to_action(t, keep)])
            prev = keep
        ratios = np.asarray(kept, dtype=np.float64) / np.asarray(self.space.channels)
        return Episode(states=np.asarray(states, dtype=np.float32), actions=np.asarray(actions, dtype=np.float32),
                       kept=tuple(kept), cost=self.cost(ratios), budget=self.budget())
