"""Resolve a Recipe once into a frozen BuildPlan: every cross-key rule, every target policy, one spec per stage.

The pipeline reads the recipe only here. A stage receives its spec (or tensors and callables), so what it does is
visible in one place: a coupling between keys is a field with the value the rule chose (`RepairSpec.rounding` is
"hessian" because `compress.reconstruct` is lmmse; the BatchNorm-adaptation inputs carry their seed, the recipe's
seed + 1), never a test on another section deep inside a stage.

Environment facts the policy depends on come in as arguments: the stored latency fingerprint of the target (a
lookup, so this module imports no backend) and the per-user cache folder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType

from dfp_deploy.core.errors import InputError
from dfp_deploy.data.sources import SYNTHETIC, InputSpec
from dfp_deploy.recipe.schema import Recipe

FINGERPRINTABLE = ("ort-cpu", "ort-cuda", "tensorrt")  # the backends that build engines from the ONNX probes
MAX_INPUT_ELEMENTS = 2**28  # one input batch of 1 GiB float32; beyond it the example tensor alone exhausts memory
SYNTHETIC_CHUNK = 64  # calibration and BN adaptation match BatchNorm statistics per chunk of this many inputs

# a lookup (backend, precision, batch, threads) -> (channel multiple, where it is stored) or None
FingerprintLookup = Callable[[str, str, int, "int | None"], "tuple[int, str] | None"]


def default_round_to(backend: str, precision: str) -> int:
    """Channel multiple a target likes (docs/ARCHITECTURE.md): TensorRT int8 tensor cores want 32, fp16 8; CPUs the
    block of their NCHWc conv layout (core/env.cpu_channel_block: 8 with AVX2, 16 with AVX-512)."""
    if backend in ("tensorrt", "ort-cuda", "torch-cuda"):
        return 32 if precision == "int8" else 8
    from dfp_deploy.core.env import cpu_channel_block

    return cpu_channel_block()


def qdq_style(backend: str) -> str:
    """TensorRT and ORT's GPU provider want symmetric int8 Q/DQ; ORT on CPU runs uint8 activations fastest."""
    return "ort-cpu" if backend in ("ort-cpu", "torch-cpu") else "tensorrt"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    weights: str | None
    kwargs: Mapping[str, object]
    input_shape: tuple[int, ...] | None  # None: the model's own
    resize: int | None  # short-side resize before the centre crop (None: the model's own preprocessing)


@dataclass(frozen=True)
class SelectSpec:
    """Which channels the plan keeps (compress.prune), with the channel multiple already chosen."""

    ratio: float
    ratios: Mapping[str, float]
    exclude: tuple[str, ...]
    importance: str
    allocation: str
    statistics: str  # model (data-free) | calibration (activations measured on the calibration inputs)
    round_to: int
    round_to_source: str  # "recipe", "fingerprint <path>" or "table (...)"
    min_channels: int
    include_residual: bool

    @property
    def prunes(self) -> bool:
        return self.ratio > 0 or bool(self.ratios)

    @property
    def measures_statistics(self) -> bool:
        return self.statistics == "calibration"


@dataclass(frozen=True)
class RepairSpec:
    """The data-free path: closed-form repair, weight quantization and its rounding."""

    method: str  # none | neuron_merging | udfc | lmmse
    udfc_form: str | None  # udfc only
    weight_bits: int | None
    first_last_bits: int | None
    bias_correction: bool | None  # None: nothing is quantized on the data-free path
    rounding: str  # nearest | hessian (lmmse's data-free input model makes Hessian-aware rounding possible)

    @property
    def multi(self) -> bool:
        return self.udfc_form == "vector"


@dataclass(frozen=True)
class CalibrateSpec:
    """Two-phase few-shot calibration on `inputs` (replaces the data-free repair)."""

    inputs: str
    squeeze_epochs: int
    calib_epochs: int
    lr: float
    seed: int


@dataclass(frozen=True)
class BnAdaptSpec:
    """BatchNorm statistics re-estimated on `inputs` after the data-free repair."""

    inputs: str


@dataclass(frozen=True)
class Int8Spec:
    """How an int8 engine's Q/DQ graph is made."""

    activations: str  # data_free | calibration
    inputs: str | None  # the named inputs activation ranges are measured on (activations: calibration)
    range_k: float
    style: str  # Q/DQ placement and types of the target (qdq_style)


@dataclass(frozen=True)
class ExportSpec:
    opset: int
    dynamic_batch: bool


@dataclass(frozen=True)
class TargetSpec:
    backend: str
    precision: str
    batch: int
    threads: int | None
    options: Mapping[str, object]  # backend constructor options
    fingerprint: str  # target.fingerprint: auto | stored | table
    measure_fingerprint: bool  # measure the target's missing latency fingerprint before building (then resolve again)
    channel_block: int  # the block a partly filled channel group is charged as by the latency search's model


@dataclass(frozen=True)
class ParitySpec:
    """The inputs of the precision-aware parity rule (measure/parity.py); the engine adds whether it runs TF32."""

    precision: str  # int8 engines are held to class agreement, float ones to the rule of the arithmetic they run
    tolerance: float  # absolute floor
    samples: int
    int8_min_agreement: float


@dataclass(frozen=True)
class MeasureSpec:
    latency: bool
    warmup: int
    runs: int
    rounds: int
    rounding_cost: bool  # also build and time the plan without channel rounding
    workers: str
    local_workers: int
    target_resource: str | None
    worker_timeout: float
    cache: Path
    remeasure: bool = False  # time again although the measurement cache holds the timing


@dataclass(frozen=True)
class SearchSpec:
    episodes: int
    warmup: int
    target: str  # macs | latency
    budget: float  # the fraction of the original MACs or latency kept: 1 - search.ratio (kept_fraction)
    min_keep: float
    include_residual: bool
    proxy: str
    inputs: str
    measure: str
    latency_penalty: float
    resume: bool
    batch: int
    scoring: Mapping[str, object]  # what a candidate's proxy depends on besides its plan (a resumed search checks it)


@dataclass(frozen=True)
class EvalSpec:
    data: str | None
    limit: int | None
    start: int  # the first image evaluated (images before it may have tuned the recipe)
    metric: str  # top1, or package.module:function (measure/metric.py)


@dataclass(frozen=True)
class BuildPlan:
    """Everything a build does, decided before anything slow runs."""

    seed: int
    model: ModelSpec
    select: SelectSpec
    repair: RepairSpec
    calibrate: CalibrateSpec | None
    bn_adapt: BnAdaptSpec | None
    int8: Int8Spec | None
    export: ExportSpec
    target: TargetSpec
    parity: ParitySpec
    measure: MeasureSpec
    search: SearchSpec | None
    eval: EvalSpec
    inputs: Mapping[str, InputSpec]  # named unlabeled inputs, loaded once and shared by the stages that name them
    data_files: tuple[tuple[str, str], ...]  # (recipe key, file) of every data file, checked before the model runs
    cache: Path = field(default=Path("."))

    def describe(self, kept_groups: int) -> str:
        """One line saying how the model is compressed (the build's progress line)."""
        parts = [f"prune {kept_groups} groups" if kept_groups else "no pruning"]
        if kept_groups and self.select.measures_statistics:
            parts[0] += " (channels chosen on calibration-input activations)"
        if self.calibrate is not None:
            parts.append(f"two-phase calibration on {self.inputs[self.calibrate.inputs].samples} inputs")
        r = self.repair
        if r.method != "none":
            parts.append(f"reconstruct {r.method}")
        if self.bn_adapt is not None:
            spec = self.inputs[self.bn_adapt.inputs]
            parts.append(f"BatchNorm re-estimated on {spec.samples} "
                         + ("synthetic inputs" if spec.synthetic else "images"))
        if r.weight_bits:
            parts.append(f"w{r.weight_bits}" + (f" (first/last w{r.first_last_bits})"
                                                if r.first_last_bits not in (None, r.weight_bits) else "")
                         + (" + bias correction" if r.bias_correction else ""))
        return ", ".join(parts)


def resolve(recipe: Recipe, *, fingerprint: FingerprintLookup | None = None,
            cache: Path | None = None) -> BuildPlan:
    """The BuildPlan of `recipe`; contradictory settings are refused here, with the key to change."""
    check_consistency(recipe)
    cache = Path(cache) if cache is not None else Path.home() / ".cache" / "dfp-deploy"
    c, t, m = recipe.compress, recipe.target, recipe.advanced.measure
    ac = recipe.advanced.compress
    inputs = _inputs(recipe)
    calibrate = (CalibrateSpec("calibration", ac.calibration.squeeze_epochs, ac.calibration.calib_epochs,
                               ac.calibration.lr, recipe.seed) if _two_phase(recipe) else None)
    select = _select(recipe, fingerprint)
    return BuildPlan(
        seed=recipe.seed,
        model=_model(recipe),
        select=select,
        repair=_repair(recipe),
        calibrate=calibrate,
        bn_adapt=BnAdaptSpec("bn_adapt") if c.bn_adapt.data else None,
        int8=(Int8Spec(ac.quantize.activations, "calibration" if ac.quantize.activations == "calibration" else None,
                       ac.quantize.range_k, qdq_style(t.backend))
              if t.precision == "int8" else None),
        export=ExportSpec(recipe.advanced.export.opset, recipe.advanced.export.dynamic_batch),
        target=_target(recipe, fingerprint, cache),
        parity=ParitySpec(t.precision, m.parity_tolerance, m.parity_samples, m.int8_min_agreement),
        measure=MeasureSpec(recipe.measure.latency, m.warmup, m.runs, m.rounds,
                            # calibrated builds skip it: a second calibration would double their cost
                            m.rounding_cost and recipe.measure.latency and calibrate is None and select.round_to != 1,
                            m.workers, m.local_workers, m.target_resource, m.worker_timeout,
                            Path(m.cache) if m.cache else cache / "measurements", m.remeasure),
        search=_search(recipe),
        eval=EvalSpec(recipe.eval.data, recipe.eval.limit, recipe.advanced.eval.start, recipe.eval.metric),
        inputs=MappingProxyType(inputs),
        data_files=_data_files(recipe),
        cache=cache,
    )


def check_consistency(recipe: Recipe) -> None:
    """Settings that contradict each other, refused before anything slow runs (each message names the key)."""
    c, p, s = recipe.compress, recipe.compress.prune, recipe.search
    ap, aq = recipe.advanced.compress.prune, recipe.advanced.compress.quantize
    shape = recipe.model.input_size
    if shape is not None and recipe.target.batch * math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise InputError(f"model.input_size: {list(shape)} at target.batch {recipe.target.batch} is "
                         f"{recipe.target.batch * math.prod(shape):,} values per batch, above {MAX_INPUT_ELEMENTS:,}; "
                         "use a smaller input or batch")
    udfc_form = recipe.advanced.compress.udfc_form
    if udfc_form != "merge" and c.reconstruct != "udfc":
        raise InputError(f"advanced.compress.udfc_form: {udfc_form} applies to compress.reconstruct: udfc "
                         f"only, not {c.reconstruct}; remove it or set reconstruct: udfc")
    if p.allocation != "uniform" and p.importance != "lmmse":
        raise InputError(f"compress.prune.allocation: {p.allocation} needs compress.prune.importance: lmmse "
                         "(only the reconstruction error compares groups with each other)")
    if p.allocation != "uniform" and ap.ratios:
        raise InputError(f"compress.prune.allocation: {p.allocation} shares one budget across groups; it "
                         "cannot be combined with per-group advanced.compress.prune.ratios")
    if ap.statistics == "calibration":
        if p.importance != "lmmse":
            raise InputError("advanced.compress.prune.statistics: calibration needs compress.prune.importance: lmmse "
                             "(only the lmmse selection reads activation statistics)")
        if not c.calibration.data:
            raise InputError("advanced.compress.prune.statistics: calibration needs compress.calibration.data (the "
                             "images whose activations are measured)")
        if s.episodes:
            raise InputError("advanced.compress.prune.statistics: calibration cannot be combined with search (the "
                             "search is data-free); set advanced.compress.prune.statistics: model")
    if s.episodes and ap.exclude:
        # the agent's budget wall counts every group of its space; silently skipping some would break the budget
        raise InputError("advanced.compress.prune.exclude cannot be combined with search yet (the agent prunes "
                         "every group of its search space); remove it")
    if (recipe.target.precision == "int8" and aq.activations == "calibration"
            and not c.calibration.data):
        raise InputError("advanced.compress.quantize.activations: calibration needs compress.calibration.data "
                         "(an .npz of unlabeled images, or 'synthetic')")
    if not _two_phase(recipe):
        return
    if c.bn_adapt.data:
        raise InputError("compress.bn_adapt.data and compress.calibration.data are both set; two-phase calibration "
                         "already re-estimates the BatchNorm statistics: remove bn_adapt")
    if c.reconstruct != "none":
        raise InputError(f"compress.reconstruct: {c.reconstruct} and compress.calibration.data "
                         "are both set; calibration replaces the data-free repair: set one of them (or "
                         "advanced.compress.calibration.two_phase: false to use the images only for int8 ranges)")
    if aq.bias_correction:
        raise InputError("advanced.compress.quantize.bias_correction: applies to the data-free repair; with "
                         "compress.calibration.data the calibrated layers need no BN-based correction: remove it")


def backend_options(recipe: Recipe, cache: Path) -> dict:
    """The target backend's constructor options."""
    t, a = recipe.target, recipe.advanced.target
    if t.backend == "tensorrt":
        return {"opt_level": a.opt_level, "workspace_mb": a.workspace_mb, "cuda_graph": a.cuda_graph,
                "timing_cache_dir": cache / "trt-timing", "engine_cache_dir": cache / "trt-engines"}
    if t.backend == "torch-cuda":
        return {"cuda_graph": a.cuda_graph}
    return {}


def round_to_source(recipe: Recipe, fingerprint: FingerprintLookup | None) -> tuple[int, str]:
    """The channel multiple and where it came from: the recipe, else the target's stored latency fingerprint
    (`dfp-deploy fingerprint`, measured), else the table of default_round_to (assumed)."""
    if recipe.compress.prune.round_to:
        return recipe.compress.prune.round_to, "recipe"
    t = recipe.target
    stored = _stored(recipe, fingerprint)
    if stored is not None:
        multiple, path = stored
        return multiple, f"fingerprint {path}"
    why = ("advanced.target.fingerprint: table" if recipe.advanced.target.fingerprint == "table" else
           "advanced.target.fingerprint: auto, int8 on ort-cpu" if _probe_misleads(recipe) else
           "no fingerprint stored for this target")
    return default_round_to(t.backend, t.precision), f"table ({why})"


def _stored(recipe: Recipe, fingerprint: FingerprintLookup | None) -> tuple[int, str] | None:
    """(multiple, file) of the fingerprint the recipe's defaults follow: the one stored for exactly its target;
    None under advanced.target.fingerprint: table."""
    t = recipe.target
    if recipe.advanced.target.fingerprint == "table" or fingerprint is None or _probe_misleads(recipe):
        return None
    return fingerprint(t.backend, t.precision, t.batch, t.threads)


def _probe_misleads(recipe: Recipe) -> bool:
    """auto leaves int8 on ONNX Runtime CPU to the table: there the one-conv probe's multiple (2) made whole networks
    slower than the table's 16 (depthwise, 1x1 and sub-16-channel convs; docs/research/latency-fingerprint.md).
    `stored` still applies a stored one."""
    t = recipe.target
    return recipe.advanced.target.fingerprint == "auto" and t.precision == "int8" and t.backend == "ort-cpu"


def _target(recipe: Recipe, fingerprint: FingerprintLookup | None, cache: Path) -> TargetSpec:
    t, p, s = recipe.target, recipe.compress.prune, recipe.search
    mode = recipe.advanced.target.fingerprint
    stored = _stored(recipe, fingerprint)
    # auto measures a fingerprint when the default channel multiple is used (pruning with round_to unset), none is
    # stored, and the build times the target here: a build that times nothing may run on another machine than the
    # target, whose fingerprint it would then be
    prunes = bool(p.ratio or recipe.advanced.compress.prune.ratios or s.episodes)
    times_here = recipe.measure.latency or bool(s.episodes and s.target == "latency")
    measure = (mode == "auto" and t.backend in FINGERPRINTABLE and prunes and not p.round_to
               and times_here and fingerprint is not None and stored is None and not _probe_misleads(recipe))
    block = stored[0] if stored is not None else default_round_to(t.backend, t.precision)
    return TargetSpec(t.backend, t.precision, t.batch, t.threads, MappingProxyType(backend_options(recipe, cache)),
                      mode, measure, block)


def _two_phase(recipe: Recipe) -> bool:
    return bool(recipe.compress.calibration.data) and recipe.advanced.compress.calibration.two_phase


def _needs_calibration_inputs(recipe: Recipe) -> bool:
    """Whether any step reads compress.calibration.data: two-phase calibration, channels chosen on the inputs'
    activations, or int8 activation ranges from them."""
    a = recipe.advanced.compress
    return (_two_phase(recipe) or a.prune.statistics == "calibration"
            or (recipe.target.precision == "int8" and a.quantize.activations == "calibration"))


def _inputs(recipe: Recipe) -> dict[str, InputSpec]:
    c, s, a = recipe.compress, recipe.search, recipe.advanced
    out = {}
    if c.calibration.data and _needs_calibration_inputs(recipe):
        out["calibration"] = InputSpec(c.calibration.data, c.calibration.samples,
                                       a.compress.calibration.synthetic_steps, recipe.seed, SYNTHETIC_CHUNK,
                                       "compress.calibration")
    if c.bn_adapt.data:
        # seed + 1: not the inputs the search scores candidates on (a proxy measured on the inputs the statistics
        # were fitted to would flatter every candidate)
        out["bn_adapt"] = InputSpec(c.bn_adapt.data, c.bn_adapt.samples, a.compress.bn_adapt.synthetic_steps,
                                    recipe.seed + 1, SYNTHETIC_CHUNK, "compress.bn_adapt")
    if s.episodes:
        # the search matches the statistics over all its inputs in one chunk; its cached inputs are what every
        # documented search ran on
        out["search"] = InputSpec(s.data, s.samples, a.search.synthetic_steps, recipe.seed, None, "search")
    return out


def _model(recipe: Recipe) -> ModelSpec:
    m = recipe.model
    return ModelSpec(m.name, m.weights, MappingProxyType(dict(m.kwargs or {})),
                     tuple(m.input_size) if m.input_size else None, recipe.advanced.model.resize)


def _select(recipe: Recipe, fingerprint: FingerprintLookup | None) -> SelectSpec:
    p, a = recipe.compress.prune, recipe.advanced.compress.prune
    round_to, source = round_to_source(recipe, fingerprint)
    return SelectSpec(p.ratio, MappingProxyType(dict(a.ratios)), tuple(a.exclude), p.importance, p.allocation,
                      a.statistics, round_to, source, a.min_channels, a.include_residual)


def _repair(recipe: Recipe) -> RepairSpec:
    c, a = recipe.compress, recipe.advanced.compress
    bits = c.quantize.weight_bits
    if bits is None or _two_phase(recipe):
        bias_correction = None
    else:  # the methods' published defaults: DFQ-style correction with lmmse, none with the others
        bias_correction = (a.quantize.bias_correction if a.quantize.bias_correction is not None
                           else c.reconstruct == "lmmse")
    return RepairSpec(c.reconstruct, a.udfc_form if c.reconstruct == "udfc" else None, bits,
                      a.quantize.first_last_bits if bits is not None else None, bias_correction,
                      "hessian" if c.reconstruct == "lmmse" else "nearest")


def _search(recipe: Recipe) -> SearchSpec | None:
    s = recipe.search
    if not s.episodes:
        return None
    a = recipe.advanced
    # the search log's resume check compares this record: a log written before the compression keys moved under
    # advanced: (or with search.proxy_data) names another layout and is refused, whatever its budget
    scoring = {"model": {**asdict(recipe.model), "resize": a.model.resize}, "compress": asdict(recipe.compress),
               "compress_advanced": asdict(a.compress), "proxy": a.search.proxy,
               "proxy_data": s.data, "samples": s.samples,
               "steps": a.search.synthetic_steps if s.data == SYNTHETIC else None}
    return SearchSpec(s.episodes, a.search.warmup if a.search.warmup is not None else s.episodes // 4, s.target,
                      kept_fraction(s.ratio), a.search.min_keep, a.search.include_residual, a.search.proxy, "search",
                      a.search.measure, a.search.latency_penalty, a.search.resume, a.search.batch,
                      MappingProxyType(scoring))


def kept_fraction(ratio: float) -> float:
    """search.ratio (the fraction of the MACs or latency removed, as compress.prune.ratio) -> the fraction the
    search keeps. Rounded to 12 decimals so that a decimal ratio gives the double a user writing the kept
    fraction would get (1 - 0.7 is 0.30000000000000004, not 0.3): the budget, and the search log's check of it,
    do not move by an ulp."""
    return round(1.0 - ratio, 12)


def _data_files(recipe: Recipe) -> tuple[tuple[str, str], ...]:
    c = recipe.compress
    return tuple((key, path) for key, path in (
        ("eval.data", recipe.eval.data), ("compress.calibration.data", c.calibration.data),
        ("compress.bn_adapt.data", c.bn_adapt.data), ("search.data", recipe.search.data))
        if path and path != SYNTHETIC)
