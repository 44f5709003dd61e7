"""Frozen artifacts that stages hand to each other (docs/ARCHITECTURE.md: stages never reach into each other's internals)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be pruned together: output channels of `producers` tied by adds/BN/depthwise.

    `name` is stable (the first producer's module name) and is what recipes refer to.
    `prunable` is False for boundaries (model input/output, unknown ops); `reason` says why.
    `residual` is True when the group is tied across a residual add.
    """

    name: str
    channels: int
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    passthrough: tuple[str, ...] = ()  # BN, depthwise convs and other per-channel modules of the group
    prunable: bool = True
    reason: str = ""
    residual: bool = False
    macs: int = 0  # MACs of the producers + consumers touching this group (for budgets and reports)
    # kinds of ops the channels pass through between producers and consumers, e.g. ("bn", "relu", "add"),
    # so reconstruction can tell where a closed-form merge is valid (positively homogeneous paths only)
    path_ops: tuple[str, ...] = ()


@dataclass(frozen=True)
class PrunePlan:
    """Which channels of each group survive. Groups absent from `keep` are untouched."""

    keep: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def removed_fraction(self, groups: list[ChannelGroup]) -> float:
        by_name = {g.name: g for g in groups}
        total = sum(by_name[n].channels for n in self.keep)
        kept = sum(len(k) for k in self.keep.values())
        return 0.0 if total == 0 else 1.0 - kept / total


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one engine under one protocol (milliseconds per batch)."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    mean_ms: float
    std_ms: float
    runs: int
    warmup: int
    batch: int
    threads: int | None
    round_p50_ms: tuple[float, ...] = ()  # median of each interleaved round's block (measure/latency.py)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["round_p50_ms"] = list(self.round_p50_ms)
        return d


@dataclass(frozen=True)
class Preprocess:
    """How a model wants its images: optional short-side resize, centre crop to `size`, then (x - mean) / std.

    `mean` and `std` are in 0..255 pixel units, per RGB channel, so CIFAR's ImageNet normalisation is
    mean=(0.485*255, ...), std=(0.229*255, ...) and EfficientNet-Lite's is mean=127, std=128.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: int | None = None
