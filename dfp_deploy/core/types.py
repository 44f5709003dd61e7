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


@dataclass(frozen=True)
class LayerPrecision:
    """One ONNX node meant to run int8 and the engine layer that runs it in another precision."""

    onnx_node: str
    layer: str
    precision: str


@dataclass(frozen=True)
class LayerSummary:
    """What an engine's own layer listing says (TensorRT's inspector): layers by precision, reformatting copies.

    Precision counts are (precision, count) pairs sorted by name. The int8 fields are None unless the build
    expected int8 layers (a Q/DQ graph): then `int8_expected` nodes were meant to run int8, `int8_ok` do,
    `not_int8` lists the ones that do not and `unmatched_int8_nodes` those that no engine layer names.
    """

    layers: int
    reformats: int
    reformat_layers: tuple[str, ...]
    qdq_layers: int
    by_precision: tuple[tuple[str, int], ...]
    weighted_layers: int
    weighted_by_precision: tuple[tuple[str, int], ...]
    text: str  # one line for humans: "6/7 conv/gemm layers run INT8, 4 reformats"
    int8_expected: int | None = None
    int8_ok: int | None = None
    not_int8: tuple[LayerPrecision, ...] = ()
    unmatched_int8_nodes: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        """The report.json form (`engine.layers`)."""
        d = {"layers": self.layers, "reformats": self.reformats, "reformat_layers": list(self.reformat_layers),
             "qdq_layers": self.qdq_layers, "by_precision": dict(self.by_precision),
             "weighted_layers": self.weighted_layers, "weighted_by_precision": dict(self.weighted_by_precision)}
        if self.int8_expected is not None:
            d.update(int8_expected=self.int8_expected, int8_ok=self.int8_ok,
                     not_int8=[dict(p.__dict__) for p in self.not_int8],
                     unmatched_int8_nodes=list(self.unmatched_int8_nodes))
        d["text"] = self.text
        return d


@dataclass(frozen=True)
class KernelCounts:
    """Convolutions and GEMMs of the graph a runtime really runs (ONNX Runtime's optimized graph), integer vs float."""

    integer_conv_gemm: int
    float_conv_gemm: int
    ops: tuple[tuple[str, int], ...]  # (op type, count) of the whole optimized graph, sorted by op type

    def as_dict(self) -> dict:
        """The report.json form (`engine.kernels`)."""
        return {"integer_conv_gemm": self.integer_conv_gemm, "float_conv_gemm": self.float_conv_gemm,
                "ops": dict(self.ops)}


@dataclass(frozen=True)
class CudaGraphStatus:
    """Whether the timed inference replayed a CUDA graph: requested by the recipe, used by the last runner."""

    requested: bool
    used: bool
    error: str | None = None  # why capture failed, when it was requested and not used

    def as_dict(self) -> dict:
        return {"requested": self.requested, "used": self.used, "error": self.error}


@dataclass(frozen=True)
class EngineSummary:
    """What a built engine says about itself (Engine.inspect()): what each backend knows, typed, None where it
    does not know. A snapshot: `cuda_graph.used` describes the last prepare() before the call."""

    backend: str
    precision: str
    arithmetic: str  # the float arithmetic it computes in: "fp32", "tf32" (fp32 engine with TF32 convs), "fp16", "int8"
    layers: LayerSummary | None = None  # the engine's layer listing (TensorRT)
    kernels: KernelCounts | None = None  # integer vs float kernels of an int8 graph (ONNX Runtime)
    cuda_graph: CudaGraphStatus | None = None  # None: the engine cannot replay CUDA graphs
    notes: tuple[str, ...] = ()  # build remarks that are not failures (e.g. a timing cache not saved)

    def report(self) -> dict:
        """report.json's `engine` section: only what this engine knows."""
        out = {}
        if self.kernels is not None:
            out["kernels"] = self.kernels.as_dict()
        if self.layers is not None:
            out["layers"] = self.layers.as_dict()
        return out
