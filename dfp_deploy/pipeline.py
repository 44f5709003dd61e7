"""The only module that sequences stages: recipe → model → analysis → compress → export → engine → measure → report.

Every artifact is first written into a private staging folder next to the output folder; only a build that
finished (parity checked, report written) replaces the output folder, so an interrupted or failed build never
leaves files that look complete and never destroys the previous good output.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dfp_deploy import __version__
from dfp_deploy.core.errors import InputError
from dfp_deploy.core.progress import progress_bar
from dfp_deploy.core.types import PrunePlan
from dfp_deploy.recipe import Recipe, recipe_to_dict

REPORT_NAME = "report.json"


def default_round_to(backend: str, precision: str) -> int:
    """Channel multiple a target likes (docs/ARCHITECTURE.md): TensorRT int8 tensor cores want 32, fp16 8; CPUs the block of
    their NCHWc conv layout (core/env.cpu_channel_block: 8 with AVX2, 16 with AVX-512)."""
    if backend in ("tensorrt", "ort-cuda", "torch-cuda"):
        return 32 if precision == "int8" else 8
    from dfp_deploy.core.env import cpu_channel_block

    return cpu_channel_block()


@dataclass
class Stages:
    """Numbered progress lines on stderr, so a user sees where a slow build is."""

    total: int
    quiet: bool = False
    done: int = 0
    started: float = field(default_factory=time.perf_counter)

    def __call__(self, what: str) -> None:
        self.done += 1
        if not self.quiet:
            elapsed = time.perf_counter() - self.started
            print(f"[{self.done}/{self.total}] {what} (t={elapsed:.1f}s)", file=sys.stderr, flush=True)


def output_dir(recipe: Recipe, recipe_path: Path | None) -> Path:
    if recipe.output.dir:
        return Path(recipe.output.dir)
    stem = recipe_path.stem if recipe_path else "default"
    return Path("runs") / stem


def _check_output_dir(out: Path) -> None:
    """Refuse to replace a folder dfp-deploy did not provably write (its marker and manifest, core/output.py):
    we never delete a user's files."""
    from dfp_deploy.core.output import check_replaceable

    check_replaceable(out)


MAX_INPUT_ELEMENTS = 2**28  # one input batch of 1 GiB float32; beyond it the example tensor alone exhausts memory


def _load(recipe: Recipe):
    """The model with its weights, and every input checked that can be checked without running it."""
    from dfp_deploy.models import load_model

    shape = recipe.model.input_size
    if shape is not None and (len(shape) != 3 or min(shape) < 1):
        raise InputError(f"model.input_size: expected [C, H, W] with positive sizes, got {shape}")
    if shape is not None and recipe.target.batch * math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise InputError(f"model.input_size: {list(shape)} at target.batch {recipe.target.batch} is "
                         f"{recipe.target.batch * math.prod(shape):,} values per batch, above {MAX_INPUT_ELEMENTS:,}; "
                         "use a smaller input or batch")
    loaded = load_model(recipe.model.name, recipe.model.weights, kwargs=recipe.model.kwargs or None,
                        input_shape=tuple(shape) if shape else None, resize=recipe.model.resize)
    from dfp_deploy.data.images import check_file, check_geometry, check_labels

    c = recipe.compress
    for key, path in (("eval.data", recipe.eval.data), ("compress.calibration.data", c.calibration.data),
                      ("compress.bn_adapt.data", c.bn_adapt.data), ("search.proxy_data", recipe.search.proxy_data)):
        if path and path != "synthetic":
            check_file(path, key)
            check_geometry(path, loaded.preprocess, key)
    if recipe.eval.data and recipe.eval.metric == "top1":
        if loaded.num_classes is None:
            raise InputError(f"eval.metric: top1 needs a model that returns one [N, classes] logits tensor; "
                             f"{recipe.model.name} returns other outputs: set eval.metric: package.module:function "
                             "(README: custom metrics)")
        check_labels(recipe.eval.data, loaded.num_classes, recipe.eval.limit, start=recipe.eval.start)
    _metric_function(recipe)  # imported before any work: a wrong path fails now, not after the build
    return loaded


def _metric_function(recipe: Recipe):
    """The eval.metric function (measure/metric.py), or None for the built-in top-1."""
    if recipe.eval.metric == "top1":
        return None
    from dfp_deploy.core.user_code import resolve_function

    return resolve_function(recipe.eval.metric, "eval.metric")


def _example_input(loaded, batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *loaded.input_shape), generator=gen)


def _round_to(recipe: Recipe) -> int:
    return _round_to_source(recipe)[0]


def _round_to_source(recipe: Recipe) -> tuple[int, str]:
    """The channel multiple and where it came from: the recipe, else the target's stored latency fingerprint
    (`dfp-deploy fingerprint`, measured), else the table of default_round_to (assumed)."""
    if recipe.compress.prune.round_to:
        return recipe.compress.prune.round_to, "recipe"
    t = recipe.target
    stored = _recipe_fingerprint(recipe)
    if stored is not None:
        fingerprint, path = stored
        return fingerprint.multiple, f"fingerprint {path}"
    why = "target.fingerprint: table" if t.fingerprint == "table" else "no fingerprint stored for this target"
    return default_round_to(t.backend, t.precision), f"table ({why})"


def _recipe_fingerprint(recipe: Recipe):
    """(Fingerprint, path) the recipe's defaults follow: the one stored for exactly its target; None under
    target.fingerprint: table."""
    t = recipe.target
    if t.fingerprint == "table":
        return None
    return _stored_fingerprint(t.backend, t.precision, t.batch, t.threads)


FINGERPRINTABLE = ("ort-cpu", "ort-cuda", "tensorrt")  # the backends that build engines from the ONNX probes
# the sweep a build measures by itself: 65..128 channels covers U_32 of every count, in 3 interleaved rounds instead of
# 5; about 0.4 of `dfp-deploy fingerprint`'s 33..128 in 5 (docs/research/latency-fingerprint.md, its cost)
AUTO_FINGERPRINT_CHANNELS = tuple(range(65, 129))
AUTO_FINGERPRINT_ROUNDS = 3


def _fingerprint_needed(recipe: Recipe) -> bool:
    """target.fingerprint: auto measures one when the default channel multiple is used (pruning with round_to
    unset), none is stored for this target, and the build times the target here: a build that times nothing may
    run on another machine than the target, whose fingerprint it would then be."""
    t, p, s = recipe.target, recipe.compress.prune, recipe.search
    prunes = bool(p.ratio or p.ratios or s.episodes)
    times_here = recipe.measure.latency or (s.episodes and s.target == "latency")
    return (t.fingerprint == "auto" and t.backend in FINGERPRINTABLE and prunes and not p.round_to
            and bool(times_here) and _stored_fingerprint(t.backend, t.precision, t.batch, t.threads) is None)


def _fingerprint_report(recipe: Recipe, measured_s: float | None) -> dict | None:
    """The fingerprint a build used, for report.json: its file, multiple, swept counts, the measured cost of not
    rounding to its multiple, and what measuring it took in this build (None: read from the store)."""
    stored = None if recipe.compress.prune.round_to else _recipe_fingerprint(recipe)
    if stored is None:
        return None
    fingerprint, path = stored
    return {"file": str(path), "device": fingerprint.key.device, "multiple": fingerprint.multiple,
            "channels": [fingerprint.channels[0], fingerprint.channels[-1]],
            "cost_of_not_rounding": round(fingerprint.cost_of_not_rounding(), 4),
            "rounding_costs": fingerprint.rounding_costs, "measured_s": measured_s}


def _fingerprint_key(backend, backend_name: str, precision: str, batch: int, size: int, threads: int | None):
    from dfp_deploy.export.probe import PROBE_OPSET
    from dfp_deploy.measure import fingerprint as fp

    info = backend.info()
    return fp.make_key(device=info.device, backend=backend_name, precision=precision, batch=batch, size=size,
                       threads=threads, versions={backend_name: info.version, "probe-opset": str(PROBE_OPSET)})


def _stored_fingerprint(backend_name: str, precision: str, batch: int, threads: int | None, size: int = 14):
    """(Fingerprint, path) stored for exactly this target, or None (also when the backend cannot run here)."""
    from dfp_deploy.backends.registry import get_backend
    from dfp_deploy.measure import fingerprint as fp

    backend = get_backend(backend_name)
    if not backend.info().available:
        return None
    key = _fingerprint_key(backend, backend_name, precision, batch, size, threads)
    folder = cache_dir() / "fingerprints"
    stored = fp.load(key, folder)
    return (stored, folder / key.file_name()) if stored is not None else None


def _planner(recipe: Recipe, model, analysis, *, round_to: int | None = None, allocation: str | None = None,
             include_residual: bool | None = None, progress: bool = False, measured: dict | None = None):
    from dfp_deploy.compress.select.planner import ChannelPlanner

    p = recipe.compress.prune
    return ChannelPlanner(model, analysis, importance=p.importance, allocation=allocation or p.allocation,
                          exclude=p.exclude, min_channels=p.min_channels, round_to=round_to or _round_to(recipe),
                          include_residual=p.include_residual if include_residual is None else include_residual,
                          progress=progress, measured=measured)


def _plan(recipe: Recipe, model, analysis, *, progress: bool = False, measured: dict | None = None) -> PrunePlan:
    p = recipe.compress.prune
    if p.ratio == 0 and not p.ratios:
        return PrunePlan()
    _check_prunable(recipe, analysis)
    return _planner(recipe, model, analysis, progress=progress, measured=measured).plan(p.ratio, p.ratios)


def _check_prunable(recipe: Recipe, analysis) -> None:
    """Pruning was asked for, but round_to or min_channels is at least every prunable group's width: the plan
    would keep every channel and the build would succeed unchanged. Refused rather than warned: an unattended
    pipeline reads the exit code, not the warnings."""
    widths = [g.channels for g in analysis.groups if g.prunable]
    if not widths:
        return
    p = recipe.compress.prune
    # only values the recipe set: the target's default multiple is reported under `rounding`, not refused
    for key, value in (("compress.prune.round_to", p.round_to or 1), ("compress.prune.min_channels", p.min_channels)):
        if value >= max(widths):
            raise InputError(f"{key}: {value} is at least the width of every prunable group "
                             f"(the widest has {max(widths)} channels), so nothing would be pruned; use a smaller "
                             f"{key.rsplit('.', 1)[1]}")


def _measured_statistics(recipe: Recipe, loaded, analysis, inputs: torch.Tensor | None = None) -> dict | None:
    """compress.prune.statistics: calibration — the activation statistics of every compensable group, measured on
    the calibration inputs (loaded here unless given) in the original model (compress/select/measured.py); None for
    the data-free model."""
    if recipe.compress.prune.statistics != "calibration":
        return None
    from dfp_deploy.compress.calibrate.two_phase import auto_batch
    from dfp_deploy.compress.select.measured import measured_group_statistics

    if inputs is None:
        inputs = torch.from_numpy(_calibration_images(recipe, loaded))
    model = loaded.module
    return measured_group_statistics(model, analysis, inputs, batch=auto_batch(model, inputs[:1]))


def _check_consistency(recipe: Recipe) -> None:
    """Settings that contradict each other, refused before anything slow runs."""
    p = recipe.compress.prune
    if recipe.compress.udfc_form != "merge" and recipe.compress.reconstruct != "udfc":
        raise InputError(f"compress.udfc_form: {recipe.compress.udfc_form} applies to compress.reconstruct: udfc "
                         f"only, not {recipe.compress.reconstruct}; remove it or set reconstruct: udfc")
    if p.statistics == "calibration":
        if p.importance != "lmmse":
            raise InputError("compress.prune.statistics: calibration needs compress.prune.importance: lmmse (only "
                             "the lmmse selection reads activation statistics)")
        if not recipe.compress.calibration.data:
            raise InputError("compress.prune.statistics: calibration needs compress.calibration.data (the images "
                             "whose activations are measured)")
        if recipe.search.episodes:
            raise InputError("compress.prune.statistics: calibration cannot be combined with search (the search "
                             "is data-free); set compress.prune.statistics: model")
    if not _uses_calibration(recipe):
        return
    if recipe.compress.bn_adapt.data:
        raise InputError("compress.bn_adapt.data and compress.calibration.data are both set; two-phase calibration "
                         "already re-estimates the BatchNorm statistics: remove bn_adapt")
    if recipe.compress.reconstruct != "none":
        raise InputError(f"compress.reconstruct: {recipe.compress.reconstruct} and compress.calibration.data "
                         "are both set; calibration replaces the data-free repair: set one of them (or "
                         "compress.calibration.two_phase: false to use the images only for int8 ranges)")
    if recipe.compress.quantize.bias_correction:
        raise InputError("compress.quantize.bias_correction: applies to the data-free repair; with "
                         "compress.calibration.data the calibrated layers need no BN-based correction: remove it")


def _bias_correction(recipe: Recipe) -> bool | None:
    """Whether the data-free path removes the quantized layers' mean output shift (None: nothing is quantized there)."""
    q = recipe.compress.quantize
    if q.weight_bits is None or _uses_calibration(recipe):
        return None
    return q.bias_correction if q.bias_correction is not None else recipe.compress.reconstruct == "lmmse"


def _needs_calibration_images(recipe: Recipe) -> bool:
    """Whether any step reads compress.calibration.data: two-phase calibration, channels chosen on the images'
    activations, or int8 activation ranges from them."""
    return (_uses_calibration(recipe) or recipe.compress.prune.statistics == "calibration"
            or (recipe.target.precision == "int8" and recipe.compress.quantize.activations == "calibration"))


def _uses_calibration(recipe: Recipe) -> bool:
    c = recipe.compress.calibration
    return bool(c.data) and c.two_phase


def _layer_bits(recipe: Recipe, model, analysis) -> dict[str, int] | None:
    """compress.quantize.first_last_bits as per-module overrides of weight_bits."""
    q = recipe.compress.quantize
    if q.weight_bits is None or q.first_last_bits is None:
        return None
    from dfp_deploy.compress.quantize.weights import edge_layers

    return {name: q.first_last_bits for name in edge_layers(model, analysis.module_order)}


def _compress(recipe: Recipe, model, analysis, plan: PrunePlan, calib_inputs=None, adapt_inputs=None):
    """The compressed model: two-phase calibration (calib_inputs), or the data-free path — prune, repair and
    quantize jointly, or with adapt_inputs (compress.bn_adapt) prune and repair, re-estimate the BatchNorm
    statistics, then quantize the adapted model (its BN statistics feed the quantizer's repair and bias
    correction, so they must be final first)."""
    method = recipe.compress.reconstruct
    bits = recipe.compress.quantize.weight_bits
    layer_bits = _layer_bits(recipe, model, analysis)
    if calib_inputs is not None:
        from dfp_deploy.compress.calibrate.two_phase import calibrate

        c = recipe.compress.calibration
        out = calibrate(model, analysis, plan, calib_inputs, squeeze_epochs=c.squeeze_epochs,
                        calib_epochs=c.calib_epochs, lr=c.lr, seed=recipe.seed, progress=sys.stderr.isatty())
        if bits is not None:
            from dfp_deploy.compress.quantize.weights import quantize_model_weights

            out = quantize_model_weights(out, bits, layer_bits=layer_bits)
        return out
    if adapt_inputs is not None:
        from dfp_deploy.analysis import analyze
        from dfp_deploy.compress.calibrate.bn_adapt import adapt_batchnorm

        repaired = _repair(recipe, model, analysis, plan, bits=None, layer_bits=None)
        adapt_batchnorm(repaired, adapt_inputs)
        if bits is None:
            return repaired
        return _repair(recipe, repaired, analyze(repaired, adapt_inputs[:1]), PrunePlan(), bits=bits,
                       layer_bits=layer_bits)
    return _repair(recipe, model, analysis, plan, bits=bits, layer_bits=layer_bits)


def _repair(recipe: Recipe, model, analysis, plan: PrunePlan, *, bits, layer_bits):
    """The data-free path: prune `plan`, repair with compress.reconstruct, quantize to `bits`."""
    method = recipe.compress.reconstruct
    if method == "none" and bits is None:
        from dfp_deploy.compress.prune import prune_model

        return prune_model(model, analysis, plan)
    from dfp_deploy.compress.repair.apply import compress_model
    from dfp_deploy.core.threads import torch_threads

    with torch_threads(1):  # closed-form math on small matrices (core/threads.py)
        return compress_model(model, analysis, plan, method=method, weight_bits=bits, layer_bits=layer_bits,
                              bias_correction=_bias_correction(recipe),
                              multi=method == "udfc" and recipe.compress.udfc_form == "vector")


def _reference_inputs(recipe: Recipe, loaded, batch: int) -> tuple[np.ndarray, str]:
    """Parity inputs: real evaluation images when the recipe has them, else seeded Gaussian noise."""
    n = -(-recipe.measure.parity_samples // batch) * batch
    if recipe.eval.data:
        from dfp_deploy.data.images import load_images, to_tensor

        x, _ = load_images(recipe.eval.data, loaded.preprocess, limit=n, require_labels=False,
                           start=recipe.eval.start)
        if len(x) >= batch:
            x = x[: len(x) // batch * batch]
            return to_tensor(x, loaded.preprocess), "eval images"
    rng = np.random.default_rng(recipe.seed)
    return rng.standard_normal((n, *loaded.input_shape), dtype=np.float32), "gaussian noise"


def _torch_runner(model):
    from dfp_deploy.core.outputs import to_numpy

    def run(x: np.ndarray):
        with torch.inference_mode():
            return to_numpy(model(torch.from_numpy(np.ascontiguousarray(x))))
    return run


def _chunked(run, batch: int):
    """Feed an engine built for a static batch: split into chunks of exactly `batch` rows."""
    from dfp_deploy.core.outputs import concat

    def go(x: np.ndarray):
        return concat([run(x[i:i + batch]) for i in range(0, len(x), batch)])
    return go


def build(recipe: Recipe, recipe_path: Path | None = None, *, quiet: bool = False) -> dict:
    """Run the whole build; return the report dict (also written to <out>/report.json)."""
    from dfp_deploy.core import output

    named = output_dir(recipe, recipe_path)
    out = output.resolve(named)  # a symlinked --out: its target is replaced, the link stays a link
    _check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    output.remove_stale(out)
    stage_dir = output.start_staging(out)
    try:
        with _recipe_code(recipe_path):
            report = _build_into(recipe, recipe_path, stage_dir, Stages(total=8, quiet=quiet))
        _swap_into_place(stage_dir, out)
    except BaseException:
        output.discard_staging(stage_dir)
        raise
    report["artifacts"]["dir"] = str(named)
    return report


def _swap_into_place(stage_dir: Path, out: Path) -> None:
    """Manifest, then the locked swap; the user's files in the previous output move into the new one."""
    from dfp_deploy.core.output import commit

    commit(stage_dir, out)


def _build_into(recipe: Recipe, recipe_path: Path | None, work: Path, stage: Stages) -> dict:
    from dfp_deploy.analysis import analyze, count_macs, count_params
    from dfp_deploy.backends.registry import get_backend, simulates, simulation
    from dfp_deploy.core.atomic import write_json_atomic, write_text_atomic
    from dfp_deploy.core.env import environment
    from dfp_deploy.export.onnx_export import export_onnx
    from dfp_deploy.export.passes.fp16 import write_fp16_onnx
    from dfp_deploy.report.markdown import render_markdown

    _check_consistency(recipe)
    torch.manual_seed(recipe.seed)
    t = recipe.target
    backend = get_backend(t.backend, **_backend_options(recipe))
    info = backend.info()
    if not info.available:
        from dfp_deploy.core.errors import BackendUnavailable

        raise BackendUnavailable(f"target.backend: {t.backend} is unavailable here: {info.reason}")

    fingerprint_s = None
    if _fingerprint_needed(recipe):
        stage.total += 1
        stage(f"measuring the latency fingerprint of {t.backend} {t.precision} batch {t.batch} (once: stored for "
              "later builds; target.fingerprint: table skips it)")
        started = time.perf_counter()
        fingerprint(t.backend, t.precision, t.batch, threads=t.threads, channels=AUTO_FINGERPRINT_CHANNELS,
                    rounds=AUTO_FINGERPRINT_ROUNDS, quiet=stage.quiet)
        fingerprint_s = round(time.perf_counter() - started, 1)

    stage(f"loading model {recipe.model.name}")
    loaded = _load(recipe)
    model = loaded.module
    example = _example_input(loaded, t.batch, recipe.seed)
    one = example[:1]

    stage("analysing channel groups, choosing channels"
          + (", BN-matched inputs for bn_adapt (generated once per model)"
             if recipe.compress.bn_adapt.data == "synthetic" else "")
          + (" from activations measured on the calibration inputs"
             if recipe.compress.prune.statistics == "calibration" else ""))
    analysis = analyze(model, one)
    adapt_inputs = _bn_adapt_inputs(recipe, loaded, quiet=stage.quiet)
    adapt_trust = None
    if adapt_inputs is not None:
        from dfp_deploy.compress.calibrate.bn_adapt import self_agreement

        adapt_trust = self_agreement(model, adapt_inputs)
    # loaded once for every use: two-phase calibration, channels chosen on their activations, int8 ranges
    calib_images = (_calibration_images(recipe, loaded, quiet=stage.quiet) if _needs_calibration_images(recipe)
                    else None)
    calib_inputs = torch.from_numpy(calib_images) if calib_images is not None else None
    measured = _measured_statistics(recipe, loaded, analysis, calib_inputs)
    search_report = None
    if recipe.search.episodes:
        plan, search_report = _search(recipe, loaded, analysis, example, work, backend, adapt_inputs,
                                      quiet=stage.quiet)
    else:
        plan = _plan(recipe, model, analysis, progress=not stage.quiet, measured=measured)

    stage(f"compressing ({_describe(recipe, plan)})")
    unrounded = _unrounded_plan(recipe, model, analysis, plan, measured) if search_report is None else None
    compressed = _compress(recipe, model, analysis, plan, calib_inputs if _uses_calibration(recipe) else None,
                           adapt_inputs)
    compressed.eval()
    sizes = {
        "params": {"before": count_params(model), "after": count_params(compressed)},
        "macs": {"before": count_macs(model, one), "after": count_macs(compressed, one)},
    }
    for d in sizes.values():
        d["reduction"] = 1.0 - d["after"] / d["before"] if d["before"] else 0.0
    torch.save(compressed, work / "model.pt")
    write_json_atomic(work / "plan.json", {"keep": {k: list(v) for k, v in plan.keep.items()},
                                          "channels": {g.name: g.channels for g in analysis.groups}})

    stage("exporting ONNX")
    dyn = recipe.export.dynamic_batch
    exports = cache_dir() / "onnx"  # the unchanged original is exported once per machine, not once per build
    exp_before = export_onnx(model, example, work / "original.onnx", dynamic_batch=dyn, opset=recipe.export.opset,
                             cache=exports)
    exp_after = export_onnx(compressed, example, work / "model.onnx", dynamic_batch=dyn, opset=recipe.export.opset,
                            cache=exports)

    stage(f"building {t.backend} engines: original fp32, compressed {t.precision} (batch {t.batch})")
    engine_onnx = exp_after.path
    if t.precision == "int8":
        engine_onnx = _int8_onnx(recipe, loaded, compressed, example, exp_after.path, work / "model.int8.onnx",
                                 calib_images)
    elif t.precision == "fp16":
        engine_onnx = write_fp16_onnx(exp_after.path, work / "model.fp16.onnx")
    # the original is always the fp32 engine: the report compares what the user has with what they ship
    eng_before = backend.build(exp_before.path, precision="fp32", threads=t.threads, out_dir=work,
                               torch_model=model)
    eng_after = backend.build(engine_onnx, precision=t.precision, threads=t.threads, out_dir=work,
                              torch_model=compressed)
    engines = {"before": eng_before, "after": eng_after}
    rounding = None
    if unrounded is not None:
        rounding, engines["unrounded"] = _unrounded_engine(recipe, loaded, analysis, unrounded, example, work,
                                                           adapt_inputs, backend, calib_images)

    stage("checking parity engine vs PyTorch")
    from dfp_deploy.measure.parity import parity

    x_ref, ref_kind = _reference_inputs(recipe, loaded, t.batch)
    par = parity(_torch_runner(compressed), _ChunkedEngine(eng_after, t.batch), x_ref,
                 rule=_parity_rule(recipe, compressed, eng_after))
    par.update(inputs=ref_kind, precision=t.precision)
    if simulates(t.precision):
        # the float model is not what an int8 engine computes: also compare with the simulated quantization
        simulated = simulation(t.precision, engine_onnx, t.threads)
        sim = parity(_chunked(simulated.run, t.batch), _ChunkedEngine(eng_after, t.batch), x_ref)
        par["simulated"] = {k: sim[k] for k in ("max_abs_err", "mean_abs_err", "top1_agreement")}
        if len(sim["outputs"]) > 1:  # several outputs: no class agreement to read, so each output's error
            par["simulated"]["outputs"] = {k: {"max_abs_err": o["max_abs_err"], "rel_err": o["rel_err"]}
                                           for k, o in sim["outputs"].items()}
    _check_parity(recipe, par, ref_kind)

    latency = {"backend": t.backend, "precision": t.precision, "batch": t.batch}
    stage("timing engines (before/after interleaved)" if recipe.measure.latency else "timing skipped")
    if recipe.measure.latency:
        from dfp_deploy.measure.latency import noise, round_speedups, time_interleaved

        xb = example.numpy()
        stats = time_interleaved({name: engine.prepare(xb) for name, engine in engines.items()},
                                 warmup=recipe.measure.warmup, runs=recipe.measure.runs,
                                 rounds=recipe.measure.rounds, batch=t.batch, threads=t.threads,
                                 progress=not stage.quiet)
        latency.update(threads=getattr(eng_after, "threads", None) or stats["after"].threads, before=stats["before"].as_dict(),
                       after=stats["after"].as_dict(),
                       speedup=stats["before"].p50_ms / stats["after"].p50_ms,
                       speedup_rounds=round_speedups(stats["before"], stats["after"]),
                       noise={name: noise(stats[name]) for name in ("before", "after")},
                       protocol=dict(warmup=recipe.measure.warmup, runs=recipe.measure.runs,
                                     rounds=recipe.measure.rounds, order="interleaved, rotating"))
        if rounding is not None:
            rounding.update(macs_rounded=sizes["macs"]["after"], p50_ms_rounded=stats["after"].p50_ms,
                            p50_ms_unrounded=stats["unrounded"].p50_ms,
                            latency_gain=stats["unrounded"].p50_ms / stats["after"].p50_ms)

    graphs = _cuda_graph_report(engines)
    if graphs:
        latency["cuda_graph"] = graphs

    stage("evaluating accuracy" if recipe.eval.data else "accuracy skipped (no eval.data)")
    accuracy = None
    if recipe.eval.data:
        accuracy = _accuracy(recipe, loaded, eng_before, eng_after, t.batch, dyn, quiet=stage.quiet)

    report = {
        "dfp_deploy_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": loaded.name, "weights": loaded.weights, "input_shape": list(loaded.input_shape)},
        **sizes,
        "prune": {**_prune_summary(analysis, plan), "selection": _selection_report(recipe, search_report),
                  "round_to": {**dict(zip(("value", "source"), _round_to_source(recipe))),
                               "fingerprint": _fingerprint_report(recipe, fingerprint_s)}},
        "compress": {"reconstruct": recipe.compress.reconstruct,
                     "udfc_form": recipe.compress.udfc_form if recipe.compress.reconstruct == "udfc" else None,
                     "weight_bits": recipe.compress.quantize.weight_bits,
                     "layer_bits": _layer_bits(recipe, model, analysis),
                     "bias_correction": _bias_correction(recipe),
                     "bn_adapt": _bn_adapt_report(recipe, adapt_inputs, adapt_trust),
                     "calibration": ({"data": recipe.compress.calibration.data,
                                      "samples": recipe.compress.calibration.samples}
                                     if _uses_calibration(recipe) else None)},
        "latency": latency,
        **({"rounding": rounding} if rounding is not None else {}),
        "parity": par,
        "environment": environment(),
        "recipe": recipe_to_dict(recipe),
        "recipe_path": str(recipe_path) if recipe_path else None,
        "artifacts": {"model_pt": "model.pt", "onnx": engine_onnx.name, "original_onnx": "original.onnx",
                      "plan": "plan.json", "report_json": REPORT_NAME, "report_md": "report.md"},
        "warnings": list(analysis.warnings),
    }
    if (recipe.compress.prune.ratio or recipe.compress.prune.ratios) and not plan.keep:
        from dfp_deploy.analysis import nothing_pruned_notice

        report["prune"]["notice"] = nothing_pruned_notice(  # the CLI prints it on stdout
            analysis, include_residual=recipe.compress.prune.include_residual)
    if accuracy is not None:
        report["accuracy"] = accuracy
    if search_report is not None:
        report["search"] = search_report
    engine_info = eng_after.inspect().report()
    if engine_info:
        report["engine"] = engine_info
    report["warnings"] += _engine_warnings(engine_info.get("layers"))
    report["warnings"] += _latency_warnings(latency)
    report["warnings"] += par["warnings"]
    report["warnings"] += [f"{name} engine: CUDA graph capture failed ({g['error']}); it was timed without graphs"
                           for name, g in latency.get("cuda_graph", {}).items() if g["requested"] and not g["used"]]
    report["warnings"] += _bn_adapt_warnings(recipe, adapt_trust)
    report["warnings"] += _search_budget_warnings(recipe, report["macs"], search_report)
    if t.precision == "int8":
        report["quantization"] = {"activations": recipe.compress.quantize.activations,
                                  "range_k": recipe.compress.quantize.range_k,
                                  "style": _qdq_style(t.backend), "onnx": engine_onnx.name}
    write_text_atomic(work / "report.md", render_markdown(report))
    write_json_atomic(work / REPORT_NAME, report)  # last file; build() then writes the marker listing them all
    return report


def cache_dir() -> Path:
    """Per-user cache (synthetic inputs, TensorRT timing caches): $XDG_CACHE_HOME/dfp-deploy or ~/.cache/dfp-deploy."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dfp-deploy"


def _search(recipe: Recipe, loaded, analysis, example, work: Path, backend, adapt_inputs, *, quiet: bool):
    """AutoDFP: the SAC agent picks per-group ratios; each candidate is compressed exactly as the final build will
    be and scored by its fidelity to the original on BN-matched synthetic inputs (no data; or, with
    search.proxy_data, on unlabeled images). The budget is enforced
    by the agent's action wall on a cost model: MACs, or latency predicted per group from MACs and fitted to
    engines measured on the target backend (the original and the plan with every group at its minimum)."""
    from dfp_deploy.analysis import count_macs
    from dfp_deploy.search.env import LatencyModel, MacCost
    from dfp_deploy.search.loop import run_search
    from dfp_deploy.search.reward import fidelity, proxy, reward
    from dfp_deploy.search.space import build_space
    from dfp_deploy.data.synthetic import bn_matched_inputs

    S, p, model = recipe.search, recipe.compress.prune, loaded.module
    if loaded.num_classes is None:
        raise InputError(f"search.episodes: the search scores candidates by their logits' fidelity, and "
                         f"{recipe.model.name} returns other outputs (not one [N, classes] tensor); set "
                         "search.episodes: 0 and choose compress.prune.ratio")
    if p.exclude:
        # the agent's budget wall counts every group of its space; silently skipping some would break the budget
        raise InputError("compress.prune.exclude cannot be combined with search yet (the agent prunes every group "
                         "of its search space); remove it")
    one = example[:1]
    space = build_space(model, analysis, one, min_keep=S.min_keep, round_to=_round_to(recipe),
                        include_residual=S.include_residual)
    if S.proxy_data == "synthetic":
        # not load_calibration_inputs: the search matches the statistics over all its inputs in one chunk (that
        # function uses chunks of 64), and its cached inputs are what every documented search ran on
        x_proxy = bn_matched_inputs(model, loaded.input_shape, S.synthetic_samples, steps=S.synthetic_steps,
                                    seed=recipe.seed, cache_dir=cache_dir() / "synthetic",
                                    progress=progress_bar("search synthetic inputs", "step", enabled=not quiet))
    else:  # real unlabeled images: a seeded subset, as for compress.calibration (no longer data-free)
        from dfp_deploy.data.sources import load_calibration_inputs
        x_proxy = load_calibration_inputs(S.proxy_data, S.synthetic_samples, model=model,
                                          preprocess=loaded.preprocess, input_shape=loaded.input_shape,
                                          seed=recipe.seed, what="search", samples_key="synthetic_samples")
    with torch.inference_mode():
        reference = model(x_proxy)

    if p.importance == "lmmse":
        from dfp_deploy.compress.select.paths import LmmseSelector
        from dfp_deploy.core.threads import torch_threads

        # one elimination path per group gives the kept set of every count the agent may pick
        with torch_threads(1):
            choices = {name: space.choices(g) for g, name in enumerate(space.groups)}
            selector = LmmseSelector(model, analysis, choices)

        def plan_for(ratios: dict) -> PrunePlan:
            return selector.plan(ratios) if ratios else PrunePlan()
    else:
        # the search already snapped kept counts to round_to (round_to=1 reproduces them exactly) and is itself the
        # allocation across groups
        planner = _planner(recipe, model, analysis, round_to=1, allocation="uniform",
                           include_residual=S.include_residual)

        def plan_for(ratios: dict) -> PrunePlan:
            return planner.plan(0.0, ratios) if ratios else PrunePlan()

    cost, timer, fitted = MacCost(space), None, None
    if S.target == "latency":
        cost, timer, fitted = _latency_model(recipe, model, analysis, space, example, work, backend, plan_for,
                                             LatencyModel)
    target_ms = S.budget * timer.reference_ms if timer is not None else None
    best_reward = [-math.inf]

    def evaluate_batch(many: list[dict]) -> list[dict]:
        outs, to_time = [], []
        for ratios in many:
            candidate = _compress(recipe, model, analysis, plan_for(ratios), adapt_inputs=adapt_inputs).eval()
            with torch.inference_mode():
                fid = fidelity(reference, candidate(x_proxy))
            out = {"proxy": proxy(fid, S.proxy), **fid, "macs": count_macs(candidate, one)}
            # search.measure "best": a candidate that could become the best (its proxy, the most its reward can be,
            # beats the best reward so far) is timed on the target; the loop corrects the latency model with it and
            # the reward penalises it if the real engine misses the target. So the plan the search returns was timed.
            # In a batch "so far" means before the batch, so which candidates are timed depends on the proposals
            # only, never on the order the workers finish in.
            if timer is not None and S.measure == "best" and out["proxy"] > best_reward[0]:
                to_time.append((out, candidate))
            outs.append(out)
        if to_time:
            for (out, _), ms in zip(to_time, timer.measure_many([c for _, c in to_time])):
                out["latency_ms"] = ms
                best_reward[0] = max(best_reward[0], reward(out["proxy"], ms, target_ms, penalty=S.latency_penalty))
        return outs

    state = work.parent / f".{work.name.split('.building-')[0].lstrip('.')}.search"
    log = state / "search_log.jsonl"
    try:
        result = run_search(space, lambda ratios: evaluate_batch([ratios])[0], episodes=S.episodes,
                            warmup=S.warmup if S.warmup is not None else S.episodes // 4, seed=recipe.seed,
                            target=S.budget, log_path=log, resume=S.resume, cost=cost, target_ms=target_ms,
                            penalty=S.latency_penalty,
                            latency_reference_ms=timer.reference_ms if timer is not None else None,
                            plot_path=state / "search_pareto.png", progress=not quiet,
                            scoring=_search_scoring(recipe), batch=S.batch, evaluate_batch=evaluate_batch)
    finally:
        if timer is not None:
            timer.close()
    if timer is not None:
        fitted.update(engines_timed=1 + timer.timed, candidates_timed=timer.timed - 1, final_intercept_ms=cost.c0,
                      final_scale_ms=cost.scale, target_ms=target_ms, measurement=timer.summary())
    for f in (log, result.plot_path):
        if f is not None and Path(f).is_file():
            shutil.copy2(f, work / Path(f).name)
    rep = result.as_report()
    rep.update(log="search_log.jsonl", pareto_plot="search_pareto.png" if result.plot_path else None,
               target=S.target, budget=S.budget, proxy_metric=S.proxy, proxy_data=S.proxy_data,
               proxy_samples=int(len(x_proxy)), state_dir=str(state),
               latency_penalty=S.latency_penalty if S.target == "latency" else None,
               latency_model=fitted, batch=S.batch)
    if timer is not None and timer.cache is not None:
        rep["notes"] = rep["notes"] + timer.cache.notes
    return plan_for(result.best_ratios), rep


def _search_scoring(recipe: Recipe) -> dict:
    """Everything a candidate's proxy depends on besides its plan: the model, how it is compressed, and the proxy's
    inputs. A resumed search compares it with the interrupted one's (search/loop.py)."""
    S = recipe.search
    return {"model": asdict(recipe.model), "compress": asdict(recipe.compress),
            "proxy": S.proxy, "proxy_data": S.proxy_data, "samples": S.synthetic_samples,
            "steps": S.synthetic_steps if S.proxy_data == "synthetic" else None}


def _latency_model(recipe, model, analysis, space, example, work, backend, plan_for, LatencyModel):
    """Fit the per-group latency model to two engines measured on the target: the original and the search's floor
    (every group at its minimum). Every candidate lies between the two, so the line interpolates and never
    extrapolates, and the reachability check compares the budget with a measured floor. (A plan at the budget
    fraction was the second point before: under load one noisy point tilted the line so far that a reachable
    latency budget of 0.5 on ResNet-56 was refused; docs/BENCHMARKS.md.) Returns the model, the timer that
    measures later candidates on the same scale (measure/workers.py CandidateTimer: on measure.workers, through the
    measurement cache), and what was measured."""
    import itertools

    import numpy as _np

    from dfp_deploy.export.onnx_export import export_onnx
    from dfp_deploy.measure.cache import MeasurementCache
    from dfp_deploy.measure.workers import Candidate, CandidateTimer, TargetSpec, make_measurer

    t, M = recipe.target, recipe.measure
    numbers = itertools.count()

    def export(m) -> Candidate:
        return Candidate(export_onnx(m, example, work / f".search_{next(numbers)}.onnx",
                                     opset=recipe.export.opset).path, m)

    spec = TargetSpec(t.backend, "fp32", t.batch, t.threads, example.numpy(), warmup=M.warmup, runs=50, rounds=5,
                      options=_backend_options(recipe))
    original, notes = export(model), []
    try:
        measurer = make_measurer(spec, original, workers=M.workers, local_workers=M.local_workers,
                                 resource=M.target_resource, timeout_s=M.worker_timeout, backend=backend, notes=notes)
        cache = MeasurementCache(Path(M.cache) if M.cache else cache_dir() / "measurements")
        timer = CandidateTimer(measurer, original.onnx, spec, cache=cache, export=export)
    finally:
        for leftover in work.glob(f"{original.onnx.name}*"):  # the workers hold what they need
            leftover.unlink()
    floor_kept = list(space.min_kept)
    floor_keep = _np.asarray(floor_kept, dtype=_np.float64) / _np.asarray(space.channels)
    try:
        floor_ms = timer.measure(_compress(recipe, model, analysis, plan_for(space.ratios(floor_kept))).eval())
    except BaseException:
        timer.close()  # worker processes or actors must not outlive a failed search
        raise
    # the block a partly filled channel group is charged as: measured when the target has a fingerprint
    stored = _recipe_fingerprint(recipe)
    cost = LatencyModel(space, block=stored[0].multiple if stored else default_round_to(t.backend, t.precision))
    cost.observe(_np.ones(space.size), timer.reference_ms)
    cost.observe(floor_keep, floor_ms, prior=True)
    return cost, timer, {"measured_ms": {"original": timer.reference_ms, "floor": floor_ms},
                         "intercept_ms": cost.c0, "scale_ms": cost.scale, "channel_block": cost.block,
                         "workers": measurer.where, "worker_notes": notes}


def _latency_warnings(latency: dict) -> list[str]:
    """A speedup that moved between the interleaved rounds (the load changed while it was measured) is said to be
    uncertain (measure/latency.py)."""
    from dfp_deploy.measure.latency import unsettled_range

    span = unsettled_range(latency.get("speedup_rounds"))
    if span is None:
        return []
    return [f"the speedup moved between timing rounds ({span[0]:.2f}x to {span[1]:.2f}x; reported "
            f"{latency['speedup']:.2f}x): the machine's load changed while it was measured; rerun on a quiet machine "
            "or with more measure.runs"]


def _bn_adapt_report(recipe: Recipe, inputs: torch.Tensor | None, agreement: float | None) -> dict | None:
    a = recipe.compress.bn_adapt
    if inputs is None:
        return None
    return {"data": a.data, "samples": int(len(inputs)),
            "synthetic_steps": a.synthetic_steps if a.data == "synthetic" else None, "self_agreement": agreement}


def _search_budget_warnings(recipe: Recipe, macs: dict, search_report: dict | None) -> list[str]:
    """The search meets a MAC budget by construction (its cost model, search/space.py); this says so if the built
    plan does not, rather than trusting the model (0.5 % slack for the rounding of kept counts)."""
    if search_report is None or recipe.search.target != "macs":
        return []
    allowed = recipe.search.budget * macs["before"]
    if macs["after"] <= allowed * 1.005:
        return []
    return [f"search: the built plan keeps {macs['after'] / macs['before']:.3f} of the MACs, over the budget "
            f"{recipe.search.budget:g}: the search's MAC model mispriced this model's groups; please report it"]


def _bn_adapt_warnings(recipe: Recipe, agreement: float | None) -> list[str]:
    from dfp_deploy.compress.calibrate.bn_adapt import SELF_AGREEMENT_WARN

    if agreement is None or agreement >= SELF_AGREEMENT_WARN:
        return []
    fix = ("raise compress.bn_adapt.synthetic_steps" if recipe.compress.bn_adapt.data == "synthetic"
           else "give more or more representative images")
    return [f"compress.bn_adapt: re-estimating the UNCHANGED model's BatchNorm statistics on these inputs changes "
            f"its top-1 class on {100 * (1 - agreement):.0f} % of them (self_agreement {agreement:.2f} < "
            f"{SELF_AGREEMENT_WARN}); they describe the data poorly, so the adapted statistics are suspect: {fix}, "
            f"or compare with bn_adapt off"]


def _engine_warnings(layers: dict | None) -> list[str]:
    """What the built engine says against the plan: layers meant to run int8 that do not (TensorRT inspector)."""
    if not layers:
        return []
    out = []
    if layers.get("not_int8"):
        names = ", ".join(f"{d['onnx_node']} ({d['precision']})" for d in layers["not_int8"][:5])
        more = len(layers["not_int8"]) - 5
        out.append(f"{len(layers['not_int8'])} conv/gemm layer(s) meant to run int8 do not: {names}"
                   + (f" and {more} more" if more > 0 else "") + " (report.json engine.layers)")
    if layers.get("unmatched_int8_nodes"):
        out.append(f"{len(layers['unmatched_int8_nodes'])} Q/DQ-fed node(s) were found in no engine layer "
                   "(fused away or renamed; report.json engine.layers)")
    return out


def _backend_options(recipe: Recipe) -> dict:
    t = recipe.target
    if t.backend == "tensorrt":
        return {"opt_level": t.opt_level, "workspace_mb": t.workspace_mb, "cuda_graph": t.cuda_graph,
                "timing_cache_dir": cache_dir() / "trt-timing", "engine_cache_dir": cache_dir() / "trt-engines"}
    if t.backend == "torch-cuda":
        return {"cuda_graph": t.cuda_graph}
    return {}


def _check_parity(recipe: Recipe, par: dict, ref_kind: str) -> None:
    """fp32/fp16 engines must reproduce PyTorch's logits within the precision-aware rule (measure/parity.py;
    measure.parity_tolerance is its absolute floor); int8 engines must agree on the predicted class."""
    from dfp_deploy.core.errors import ParityError

    m = recipe.measure
    if recipe.target.precision == "int8":
        par["min_agreement"] = m.int8_min_agreement
        if (ref_kind == "eval images" and par["top1_agreement"] is not None
                and not par["top1_agreement"] >= m.int8_min_agreement):
            raise ParityError(f"parity: the int8 engine agrees with PyTorch on {100 * par['top1_agreement']:.1f}% "
                              f"of the images (< measure.int8_min_agreement {m.int8_min_agreement:g})")
        return
    from dfp_deploy.measure.parity import enforce

    par["tolerance"] = par["rule"]["tolerance"]
    enforce(par)


def _cuda_graph_report(engines: dict) -> dict:
    """{engine: {requested, used, error}} for engines that can replay CUDA graphs: what the timing really was."""
    graphs = {name: engine.inspect().cuda_graph for name, engine in engines.items()}
    return {name: status.as_dict() for name, status in graphs.items() if status is not None}


def _parity_rule(recipe: Recipe, compressed, engine):
    """The float arithmetic the engine runs (fp16; TF32 where the engine says so; else fp32) and the net's size."""
    from dfp_deploy.measure.parity import ParityRule, network_size

    precision = recipe.target.precision
    if precision == "int8":
        return None
    arithmetic = engine.inspect().arithmetic
    layers, max_dot = network_size(compressed)
    return ParityRule(arithmetic, layers, max_dot, recipe.measure.parity_tolerance)


def _qdq_style(backend: str) -> str:
    """TensorRT and ORT's GPU provider want symmetric int8 Q/DQ; ORT on CPU runs uint8 activations fastest."""
    return "ort-cpu" if backend in ("ort-cpu", "torch-cpu") else "tensorrt"


def _int8_onnx(recipe: Recipe, loaded, compressed, example, fp32_onnx: Path, out: Path,
               calib_images: np.ndarray | None) -> Path:
    """The Q/DQ graph of the compressed model, with activation ranges from BN statistics or calibration images."""
    from dfp_deploy.export.int8 import int8_onnx

    q = recipe.compress.quantize
    calib = calib_images if q.activations == "calibration" else None
    return int8_onnx(compressed, example, fp32_onnx, out, style=_qdq_style(recipe.target.backend),
                     preprocess=loaded.preprocess, calibration_inputs=calib, range_k=q.range_k,
                     opset=recipe.export.opset, threads=recipe.target.threads)


def _unrounded_plan(recipe: Recipe, model, analysis, plan: PrunePlan, measured: dict | None) -> PrunePlan | None:
    """The plan without the target's channel rounding, when rounding changed it and its engine will be timed (else
    None). Calibrated builds skip it: a second calibration would double their cost."""
    p = recipe.compress.prune
    m = recipe.measure
    if not (plan.keep and m.rounding_cost and m.latency) or _uses_calibration(recipe) or _round_to(recipe) == 1:
        return None
    exact = _planner(recipe, model, analysis, round_to=1, measured=measured).plan(p.ratio, p.ratios)
    return exact if exact.keep != plan.keep else None


def _unrounded_engine(recipe: Recipe, loaded, analysis, plan: PrunePlan, example, work: Path, adapt_inputs,
                      backend, calib_images: np.ndarray | None):
    """Build the unrounded plan's engine exactly like the shipped one, to time what rounding cost or gained. Its
    files are hidden in the staging folder and removed once the engine is loaded."""
    from dfp_deploy.analysis import count_macs
    from dfp_deploy.export.onnx_export import export_onnx
    from dfp_deploy.export.passes.fp16 import write_fp16_onnx

    t = recipe.target
    model = _compress(recipe, loaded.module, analysis, plan, adapt_inputs=adapt_inputs).eval()
    path = export_onnx(model, example, work / ".unrounded.onnx", dynamic_batch=recipe.export.dynamic_batch,
                       opset=recipe.export.opset, cache=cache_dir() / "onnx").path
    if t.precision == "int8":
        path = _int8_onnx(recipe, loaded, model, example, path, work / ".unrounded.int8.onnx", calib_images)
    elif t.precision == "fp16":
        path = write_fp16_onnx(path, work / ".unrounded.fp16.onnx")
    engine = backend.build(path, precision=t.precision, threads=t.threads, out_dir=work, torch_model=model)
    for leftover in work.glob(".unrounded*"):
        leftover.unlink()
    info = {"round_to": _round_to(recipe), "macs_unrounded": count_macs(model, example[:1])}
    return info, engine


def _bn_adapt_inputs(recipe: Recipe, loaded, *, quiet: bool = True) -> torch.Tensor | None:
    """compress.bn_adapt.data as model inputs (None: off). Synthetic ones use seed + 1, so that they are not the
    inputs the search scores candidates on (a proxy measured on the inputs the statistics were fitted to would
    flatter every candidate)."""
    a = recipe.compress.bn_adapt
    return _section_inputs(a, loaded, seed=recipe.seed + 1, what="compress.bn_adapt", quiet=quiet) if a.data else None


def _section_inputs(section, loaded, *, seed: int, what: str, quiet: bool = True) -> torch.Tensor:
    """The inputs a recipe section names (its data, samples and synthetic_steps), normalised for the model."""
    from dfp_deploy.data.sources import load_calibration_inputs

    return load_calibration_inputs(section.data, section.samples, model=loaded.module, preprocess=loaded.preprocess,
                                   input_shape=loaded.input_shape, seed=seed, synthetic_steps=section.synthetic_steps,
                                   cache_dir=cache_dir() / "synthetic", what=what,
                                   progress=progress_bar(f"{what} synthetic inputs", "step", enabled=not quiet))


def _calibration_images(recipe: Recipe, loaded, *, quiet: bool = True) -> np.ndarray:
    """compress.calibration.data as model inputs: a seeded subset of unlabeled images, or BN-matched synthetic ones."""
    c = recipe.compress.calibration
    if not c.data:
        raise InputError("compress.quantize.activations: calibration needs compress.calibration.data "
                         "(an .npz of unlabeled images, or 'synthetic')")
    return _section_inputs(c, loaded, seed=recipe.seed, what="compress.calibration", quiet=quiet).numpy()


class _ChunkedEngine:
    """Adapter: an engine with a static batch seen as one that takes any multiple of that batch."""

    def __init__(self, engine, batch: int):
        self.name = engine.name
        self.run = _chunked(engine.run, batch)


def _accuracy(recipe, loaded, eng_before, eng_after, batch, dynamic, *, quiet):
    from dfp_deploy.measure.accuracy import top1
    from dfp_deploy.data.images import load_images, to_tensor

    if recipe.eval.metric != "top1":
        return _custom_metric(recipe, loaded, eng_before, eng_after, batch, dynamic, quiet=quiet)
    x8, y = load_images(recipe.eval.data, loaded.preprocess, limit=recipe.eval.limit, start=recipe.eval.start)
    x = to_tensor(x8, loaded.preprocess)
    kw = dict(batch=batch, static_batch=not dynamic, progress=not quiet)
    return {"data": recipe.eval.data, "start": recipe.eval.start, "n": int(len(y)), "metric": "top1_percent",
            "before": top1(eng_before.run, x, y, **kw), "after": top1(eng_after.run, x, y, **kw)}


def _custom_metric(recipe, loaded, eng_before, eng_after, batch, dynamic, *, quiet):
    """eval.metric: package.module:function on each engine (the call contract: measure/metric.py)."""
    from dfp_deploy.measure.accuracy import run_batched
    from dfp_deploy.data.images import load_images, to_tensor
    from dfp_deploy.measure.metric import eval_data, evaluate, other_arrays

    spec, function = recipe.eval.metric, _metric_function(recipe)
    x8, _ = load_images(recipe.eval.data, loaded.preprocess, limit=recipe.eval.limit, require_labels=False,
                        start=recipe.eval.start)
    arrays, count = other_arrays(recipe.eval.data)
    data = eval_data(to_tensor(x8, loaded.preprocess), arrays, count, start=recipe.eval.start)

    def score(engine):
        def run(x):
            return run_batched(engine.run, x, batch=batch, static_batch=not dynamic, progress=not quiet)
        return evaluate(spec, function, run, data)

    return {"data": recipe.eval.data, "n": int(len(x8)), "metric": spec,
            "before": score(eng_before), "after": score(eng_after)}


def _describe(recipe: Recipe, plan: PrunePlan) -> str:
    parts = [f"prune {len(plan.keep)} groups" if plan.keep else "no pruning"]
    if plan.keep and recipe.compress.prune.statistics == "calibration":
        parts[0] += " (channels chosen on calibration-input activations)"
    if _uses_calibration(recipe):
        parts.append(f"two-phase calibration on {recipe.compress.calibration.samples} inputs")
    if recipe.compress.reconstruct != "none":
        parts.append(f"reconstruct {recipe.compress.reconstruct}")
    a = recipe.compress.bn_adapt
    if a.data:
        parts.append(f"BatchNorm re-estimated on {a.samples} "
                     + ("synthetic inputs" if a.data == "synthetic" else "images"))
    q = recipe.compress.quantize
    if q.weight_bits:
        parts.append(f"w{q.weight_bits}" + (f" (first/last w{q.first_last_bits})"
                                            if q.first_last_bits not in (None, q.weight_bits) else "")
                     + (" + bias correction" if _bias_correction(recipe) else ""))
    return ", ".join(parts)


def _selection_report(recipe: Recipe, search_report: dict | None) -> dict:
    """How the kept channels were chosen (the search's plan, or the prune section's ranking and allocation)."""
    p = recipe.compress.prune
    out = {"importance": p.importance, "allocation": "search" if search_report is not None else p.allocation}
    if p.importance == "lmmse":
        out["statistics"] = p.statistics
    return out


def _prune_summary(analysis, plan: PrunePlan) -> dict:
    groups = []
    for g in analysis.groups:
        kept = len(plan.keep[g.name]) if g.name in plan.keep else g.channels
        groups.append({"name": g.name, "channels": g.channels, "kept": kept, "prunable": g.prunable,
                       "residual": g.residual, **({"reason": g.reason} if g.reason else {})})
    total = sum(g["channels"] for g in groups if g["prunable"])
    kept = sum(g["kept"] for g in groups if g["prunable"])
    return {"groups_pruned": len(plan.keep), "prunable_channels": total,
            "removed_fraction": 1.0 - kept / total if total else 0.0, "groups": groups}


def _recipe_code(recipe_path: Path | None):
    """The recipe's folder importable (after sys.path) for the model factory and the metric (core/user_code.py)."""
    from dfp_deploy.core.user_code import importable_from

    return importable_from(Path(recipe_path).parent if recipe_path else None)


def inspect(recipe: Recipe, recipe_path: Path | None = None) -> dict:
    """Channel groups, channel counts and MACs of the recipe's model (and of the plan the recipe would apply)."""
    from dfp_deploy.analysis import analyze, count_macs, count_params

    _check_consistency(recipe)
    with _recipe_code(recipe_path):
        loaded = _load(recipe)
    one = _example_input(loaded, 1, recipe.seed)
    analysis = analyze(loaded.module, one)
    plan = _plan(recipe, loaded.module, analysis, measured=_measured_statistics(recipe, loaded, analysis))
    return {"model": loaded.name, "input_shape": list(loaded.input_shape),
            "params": count_params(loaded.module), "macs": count_macs(loaded.module, one),
            "groups": analysis.groups, "plan": plan, "warnings": list(analysis.warnings)}


def fingerprint(backend_name: str, precision: str, batch: int, *, size: int = 14, threads: int | None = None,
                channels=None, runs: int = 50, rounds: int = 5, refresh: bool = False, folder: Path | None = None,
                quiet: bool = False):
    """The target's latency fingerprint (measure/fingerprint.py): loaded when one exists for exactly this target,
    else measured on one-conv probes built by the real backend, then stored. Returns (Fingerprint, path, reused)."""
    import tempfile

    from dfp_deploy.backends.registry import get_backend
    from dfp_deploy.core.errors import BackendUnavailable
    from dfp_deploy.export.probe import write_conv_probe
    from dfp_deploy.measure import fingerprint as fp

    backend = get_backend(backend_name)
    info = backend.info()
    if not info.available:
        raise BackendUnavailable(f"--backend: {backend_name} is unavailable here: {info.reason}")
    folder = Path(folder) if folder is not None else cache_dir() / "fingerprints"
    key = _fingerprint_key(backend, backend_name, precision, batch, size, threads)
    if not refresh:
        stored = fp.load(key, folder)
        if stored is not None:
            return stored, folder / key.file_name(), True
    x = np.random.default_rng(0).standard_normal((batch, 1, size, size)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="dfp-fingerprint-") as tmp:
        def make_runner(c: int):
            path = write_conv_probe(Path(tmp) / f"probe{c}.onnx", c, batch=batch, size=size, precision=precision,
                                    qdq_style=_qdq_style(backend_name))
            engine = backend.build(path, precision=precision, threads=threads, out_dir=Path(tmp))
            return engine.prepare(np.repeat(x, c, axis=1))

        result = fp.measure(key, make_runner, **({"channels": tuple(channels)} if channels else {}), runs=runs,
                            rounds=rounds, threads=threads, progress=not quiet)
    return result, fp.save(result, folder), False
