"""The search space: which channel groups the agent decides, their per-step state features and a MAC cost model.

Decisions. The agent walks the searchable groups g = 0..G−1 (prunable groups in graph order; residual groups only
when asked) and picks for each a kept channel count k_g, a multiple of `round_to` in [k_min(g), C_g]. The keep
ratio handed to the pipeline is exactly k_g / C_g, so `make_plan(..., ratios={g: 1 − k_g/C_g}, round_to=1)`
reproduces k_g (the search snaps, the plan does not).

Cost terms. Every conv / Linear m (and every depthwise conv, which is a pass-through of one group) keeps a fraction
    f_m(r) = (a_m0 + Σ_g a_mg r_g) · (b_m0 + Σ_g b_mg r_g)
of its MACs, where r_g = k_g / C_g, a_mg (b_mg) is the share of m's input (output) channels that belong to group g
and a_m0 (b_m0) the share that belongs to no searched group (those never shrink). A depthwise conv has a = [1, 0...]
because its MACs per output channel do not depend on the channel count. Then
    MACs(r) = Σ_m MACs_m · f_m(r)
which is exact for chains and block-internal groups, and for any group whose members each carry all of its
channels. A group that joins layers of different widths (zero-padded shortcuts) cannot be priced by its ratio at
all and is refused (_check_priceable). It is non-decreasing in every r_g, which is what the action wall needs.

State of step t (AMC's layer descriptor plus AutoDFP's similarity features; the first six min-max normalised over
the searched groups, a constant column becoming 0):
    t, c_in, c_out, kernel, stride, MACs touching the group,
    cluster ratio, mean cosine, max cosine          (of the BN-folded producer filters, see below; in [−1, 1])
    reduced, rest, previous keep ratio, wall         (dynamic, filled in by the environment)
with reduced = 1 − MACs(decisions so far, others at 1)/MACs(1), rest = Σ_{j>t} MACs touching j / Σ_j MACs touching j,
and wall = the largest keep ratio the budget allows at this step.

Channel similarity. The filter of channel c is the concatenation over the group's producers p of the BN-folded row
    w̃_c = (γ_c/σ_c) · W_p[c],  b̃_c = β_c − γ_c μ_c / σ_c (+ γ_c/σ_c · bias_p[c]),  σ_c = sqrt(var_c + eps)
(raw W_p[c] and bias when p has no BatchNorm right after it). With S the pairwise cosine similarity of these
vectors: mean cosine = mean over pairs c ≠ c' of S, max cosine = max over c ≠ c'. The cluster ratio is
(number of DBSCAN clusters + number of noise points) / C for DBSCAN with cosine distance 1 − S, radius `eps` and
min_samples = 2. With min_samples = 2 every point with a neighbour is a core point, so that count equals the number
of connected components of the graph "1 − S ≤ eps": that is how it is computed here (no sklearn needed, and it
matches sklearn's DBSCAN exactly). A ratio well below 1 says many channels have near-duplicates, which merging-based
reconstruction can absorb.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dfp_deploy.analysis import Analysis, macs_by_module
from dfp_deploy.core.errors import InputError

STATIC_FEATURES = ("index", "c_in", "c_out", "kernel", "stride", "macs", "cluster_ratio", "mean_cos", "max_cos")
DYNAMIC_FEATURES = ("reduced", "rest", "prev_keep", "wall")
_NORMALISED = 6  # the first six static features are min-max normalised, the similarity ones are already bounded


@dataclass(frozen=True)
class CostTerms:
    """MACs_m and the input/output channel-share coefficients of every costed module (see the module docstring)."""

    modules: tuple[str, ...]
    macs: np.ndarray   # [M]
    a: np.ndarray      # [M, G+1] input shares, column 0 = not searched
    b: np.ndarray      # [M, G+1] output shares

    def macs_at(self, keep: np.ndarray) -> float:
        """MACs per image with keep ratios `keep` [G] for the searched groups (others untouched)."""
        r = np.concatenate(([1.0], np.asarray(keep, dtype=np.float64)))
        return float(np.sum(self.macs * (self.a @ r) * (self.b @ r)))

    def fractions(self, keep: np.ndarray) -> np.ndarray:
        """f_m(r) per module [M]."""
        r = np.concatenate(([1.0], np.asarray(keep, dtype=np.float64)))
        return (self.a @ r) * (self.b @ r)


@dataclass(frozen=True)
class SearchSpace:
    """Everything the environment needs about the model, and nothing that needs the model itself again."""

    groups: tuple[str, ...]
    channels: tuple[int, ...]
    min_kept: tuple[int, ...]      # smallest kept count per group (min_keep snapped, at least round_to or C)
    round_to: int
    static: np.ndarray             # [G, len(STATIC_FEATURES)], normalised
    group_macs: tuple[int, ...]    # MACs touching each group (ChannelGroup.macs), for `rest`
    terms: CostTerms

    @property
    def size(self) -> int:
        return len(self.groups)

    @property
    def state_dim(self) -> int:
        return len(STATIC_FEATURES) + len(DYNAMIC_FEATURES)

    def choices(self, g: int) -> np.ndarray:
        """The allowed kept counts of group g, ascending."""
        lo, c = self.min_kept[g], self.channels[g]
        counts = list(range(lo, c + 1, self.round_to))
        if counts[-1] != c:
            counts.append(c)  # keeping everything is always allowed, even when C is not a multiple
        return np.asarray(counts)

    def snap(self, g: int, keep_ratio: float) -> int:
        """The allowed kept count nearest to keep_ratio · C_g (halves round up)."""
        counts = self.choices(g)
        target = keep_ratio * self.channels[g]
        return int(counts[np.argmin(np.abs(counts - target - 1e-9))])

    def state(self, t: int, keep_so_far: list[int], prev_keep: float, wall: float) -> np.ndarray:
        """State of step t given the kept counts chosen for groups 0..t−1."""
        ratios = np.ones(self.size)
        ratios[:t] = np.asarray(keep_so_far[:t], dtype=np.float64) / np.asarray(self.channels[:t])
        full = self.terms.macs_at(np.ones(self.size))
        reduced = 1.0 - self.terms.macs_at(ratios) / full if full > 0 else 0.0
        touching = np.asarray(self.group_macs, dtype=np.float64)
        rest = float(touching[t + 1:].sum() / touching.sum()) if touching.sum() > 0 else 0.0
        return np.concatenate((self.static[t], [reduced, rest, prev_keep, wall])).astype(np.float32)

    def ratios(self, kept: list[int]) -> dict[str, float]:
        """Prune ratios (fraction removed, make_plan's convention) of a full decision, untouched groups left out."""
        return {name: 1.0 - k / c for name, k, c in zip(self.groups, kept, self.channels) if k < c}


def build_space(model: nn.Module, analysis: Analysis, example_input: torch.Tensor, *, min_keep: float = 0.2,
                round_to: int = 1, include_residual: bool = False, similarity_eps: float = 0.3) -> SearchSpace:
    """Describe the searchable groups of `model` (prunable, not residual unless `include_residual`)."""
    _check_args(min_keep, round_to, similarity_eps)
    groups = [g for g in analysis.groups if g.prunable and (include_residual or not g.residual)]
    if not groups:
        raise InputError("search: the model has no prunable channel groups to search over; check the analysis "
                         "warnings (boundaries) or set advanced.search.include_residual")
    for group in groups:
        _check_priceable(analysis, group)
    modules = dict(model.named_modules())
    module_cost = macs_by_module(model, example_input[:1])
    rows = []
    for index, group in enumerate(groups):
        first = modules[group.producers[0]]
        similarity = channel_similarity(_folded_filters(modules, analysis, group.name, group.channels),
                                        similarity_eps)
        rows.append([index, _in_channels(first), group.channels, _kernel(first), _stride(first), group.macs,
                     *similarity])
    static = _normalise(np.asarray(rows, dtype=np.float64))
    min_kept = tuple(_min_kept(g.channels, min_keep, round_to) for g in groups)
    return SearchSpace(groups=tuple(g.name for g in groups), channels=tuple(g.channels for g in groups),
                       min_kept=min_kept, round_to=round_to, static=static,
                       group_macs=tuple(g.macs for g in groups),
                       terms=_cost_terms(analysis, [g.name for g in groups], modules, module_cost))


def _check_priceable(analysis: Analysis, group) -> None:
    """The cost terms shrink every member of a group by the group's keep ratio, which holds when each member
    carries all of the group's channels. Zero-padded shortcuts (CIFAR ResNets' option A) join a residual stream of
    16, 32 and 64 channels into one group of 64: which layers a cut shrinks then depends on WHICH channels go
    (channels that exist only in the widest stage shrink nothing else), so no ratio-based model can price it; on
    ResNet-20 halving that group was priced at 50 % of the MACs and kept 85 %. Refused rather than mispriced."""
    members = analysis.members(group.name)
    for role in (members.producers, members.consumers, members.passthrough):
        for name, mapping in role.items():
            carried = len({c for c in mapping if c >= 0})
            if carried < group.channels:
                raise InputError(
                    f"search: group '{group.name}' joins layers of different widths ('{name}' carries {carried} of "
                    f"its {group.channels} channels, e.g. through zero-padded shortcuts), so the search's MAC model "
                    "cannot price a cut of it; leave advanced.search.include_residual off for this model")


def _check_args(min_keep: float, round_to: int, eps: float) -> None:
    if isinstance(min_keep, bool) or not isinstance(min_keep, (int, float)) or not 0 < min_keep <= 1:
        raise InputError(f"search min_keep: {min_keep!r} is not a number in (0, 1]")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise InputError(f"search round_to: {round_to!r} must be an integer >= 1")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps <= 2:
        raise InputError(f"search similarity_eps: {eps!r} is not a cosine distance in [0, 2]")


def _min_kept(channels: int, min_keep: float, round_to: int) -> int:
    # round UP to the multiple, so the floor the user asked for is never undercut
    kept = math.ceil(channels * min_keep / round_to - 1e-9) * round_to
    return max(1, min(channels, kept if kept > 0 else round_to))


def _in_channels(module: nn.Module) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels
    return getattr(module, "in_features", 0)


def _kernel(module: nn.Module) -> int:
    return int(module.kernel_size[0]) if isinstance(module, nn.modules.conv._ConvNd) else 1


def _stride(module: nn.Module) -> int:
    return int(module.stride[0]) if isinstance(module, nn.modules.conv._ConvNd) else 1


def _normalise(rows: np.ndarray) -> np.ndarray:
    out = rows.copy()
    for j in range(_NORMALISED):
        lo, hi = rows[:, j].min(), rows[:, j].max()
        out[:, j] = (rows[:, j] - lo) / (hi - lo) if hi > lo else 0.0
    return out


# --- channel similarity ----------------------------------------------------------------------------------------

def _folded_filters(modules: dict[str, nn.Module], analysis: Analysis, group: str, channels: int) -> np.ndarray:
    """[C, D]: per channel, the BN-folded weights and bias of every producer, concatenated (zeros where absent)."""
    blocks = []
    for name, mapping in analysis.members(group).producers.items():
        module = modules[name]
        weight = module.weight.detach().to(torch.float64).reshape(module.weight.shape[0], -1).cpu().numpy()
        bias = (module.bias.detach().double().cpu().numpy() if getattr(module, "bias", None) is not None
                else np.zeros(weight.shape[0]))
        if name in analysis.bn_after:
            scale, shift = _bn_affine(modules[analysis.bn_after[name]])
            weight, bias = weight * scale[:, None], bias * scale + shift
        rows = np.concatenate((weight, bias[:, None]), axis=1)
        block = np.zeros((channels, rows.shape[1]))
        for position, channel in enumerate(mapping):
            if channel >= 0:
                block[channel] = rows[position]
        blocks.append(block)
    return np.concatenate(blocks, axis=1)


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[np.ndarray, np.ndarray]:
    """(γ/σ, β − γμ/σ): BatchNorm in eval mode as y = scale·x + shift."""
    n = bn.num_features
    gamma = bn.weight.detach().double().numpy() if bn.weight is not None else np.ones(n)
    beta = bn.bias.detach().double().numpy() if bn.bias is not None else np.zeros(n)
    mean = bn.running_mean.detach().double().numpy() if bn.running_mean is not None else np.zeros(n)
    var = bn.running_var.detach().double().numpy() if bn.running_var is not None else np.ones(n)
    scale = gamma / np.sqrt(var + bn.eps)
    return scale, beta - scale * mean


def cosine_matrix(filters: np.ndarray) -> np.ndarray:
    """Pairwise cosine similarity of the rows; an all-zero row is similar to nothing (0)."""
    norms = np.linalg.norm(filters, axis=1)
    unit = filters / np.where(norms > 0, norms, 1.0)[:, None]
    return np.clip(unit @ unit.T, -1.0, 1.0)


def cluster_count(similarity: np.ndarray, eps: float) -> int:
    """DBSCAN(metric=cosine, eps, min_samples=2) clusters + noise points = connected components of 1 − S ≤ eps."""
    n = similarity.shape[0]
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    close = np.argwhere(np.triu(1.0 - similarity <= eps, k=1))
    for i, j in close:
        ri, rj = find(int(i)), find(int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return len({find(i) for i in range(n)})


def channel_similarity(filters: np.ndarray, eps: float) -> tuple[float, float, float]:
    """(cluster ratio, mean cosine, max cosine) of a group's filters [C, D] (see the module docstring)."""
    n = filters.shape[0]
    if n < 2:
        return 1.0, 0.0, 0.0
    similarity = cosine_matrix(filters)
    off = similarity[~np.eye(n, dtype=bool)]
    return cluster_count(similarity, eps) / n, float(off.mean()), float(off.max())


# --- MAC cost terms --------------------------------------------------------------------------------------------

def _cost_terms(analysis: Analysis, searched: list[str], modules: dict[str, nn.Module],
                module_cost: dict[str, int]) -> CostTerms:
    names = [n for n in module_cost if module_cost[n] > 0]
    row = {n: i for i, n in enumerate(names)}
    a = np.zeros((len(names), len(searched) + 1))
    b = np.zeros((len(names), len(searched) + 1))
    for g, group in enumerate(searched, start=1):
        members = analysis.members(group)
        for name, mapping in members.producers.items():
            if name in row:
                b[row[name], g] += _share(mapping)
        for name, mapping in members.consumers.items():
            if name in row:
                a[row[name], g] += _share(mapping)
        for name, mapping in members.passthrough.items():
            if name in row:  # a depthwise conv: its output channels shrink with the group, its per-channel work not
                b[row[name], g] += _share(mapping)
    for name, i in row.items():
        module = modules[name]
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels:
            a[i] = 0.0  # depthwise: no input-side factor
        a[i, 0] = 1.0 - a[i, 1:].sum()
        b[i, 0] = 1.0 - b[i, 1:].sum()
    return CostTerms(modules=tuple(names), macs=np.asarray([module_cost[n] for n in names], dtype=np.float64),
                     a=a, b=b)


def _share(mapping: list[int]) -> float:
    return sum(1 for c in mapping if c >= 0) / len(mapping) if mapping else 0.0
