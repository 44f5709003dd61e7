"""The engine side of a build: the int8 graph, the engine that prices rounding, parity, timing and accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dfp_deploy.core.types import PrunePlan
from dfp_deploy.recipe.resolve import BuildPlan, ParitySpec
from dfp_deploy.pipeline.compress_step import compress, metric_function


def int8_onnx(plan: BuildPlan, loaded, compressed, example, fp32_onnx: Path, out: Path,
              calib_inputs: torch.Tensor | None, exports: Path | None = None) -> Path:
    """The Q/DQ graph of the compressed model, with activation ranges from BN statistics or calibration inputs."""
    from dfp_deploy.export.int8 import int8_onnx as make_int8

    q = plan.int8
    calib = calib_inputs.numpy() if q.inputs is not None and calib_inputs is not None else None
    return make_int8(compressed, example, fp32_onnx, out, style=q.style, preprocess=loaded.preprocess,
                     calibration_inputs=calib, range_k=q.range_k, opset=plan.export.opset,
                     threads=plan.target.threads, export_cache=exports)


def unrounded_engine(plan: BuildPlan, loaded, analysis, keep: PrunePlan, example, work: Path, adapt_inputs,
                     backend, calib_inputs: torch.Tensor | None, cache: Path):
    """Build the unrounded plan's engine exactly like the shipped one, to time what rounding cost or gained. Its
    files are hidden in the staging folder and removed once the engine is loaded."""
    from dfp_deploy.analysis import count_macs
    from dfp_deploy.core.digest import file_sha256
    from dfp_deploy.export.onnx_export import export_onnx

    t = plan.target
    model = compress(plan, loaded.module, analysis, keep, adapt_inputs=adapt_inputs).eval()
    path = export_onnx(model, example, work / ".unrounded.onnx", dynamic_batch=plan.export.dynamic_batch,
                       opset=plan.export.opset, cache=cache).path
    path = engine_onnx(plan, loaded, model, example, path, work / ".unrounded", calib_inputs, cache)
    engine = backend.build(path, precision=t.precision, threads=t.threads, out_dir=work, torch_model=model)
    graph = file_sha256(path)  # the timing's cache key names this engine by its graph
    for leftover in work.glob(".unrounded*"):
        leftover.unlink()
    info = {"round_to": plan.select.round_to, "macs_unrounded": count_macs(model, example[:1]), "onnx_sha256": graph}
    return info, engine


def reference_inputs(plan: BuildPlan, loaded) -> tuple[np.ndarray, str]:
    """Parity inputs: real evaluation images when the recipe has them, else seeded Gaussian noise."""
    batch = plan.target.batch
    n = -(-plan.parity.samples // batch) * batch
    if plan.eval.data:
        from dfp_deploy.data.images import load_images, to_tensor

        x, _ = load_images(plan.eval.data, loaded.preprocess, limit=n, require_labels=False, start=plan.eval.start)
        if len(x) >= batch:
            x = x[: len(x) // batch * batch]
            return to_tensor(x, loaded.preprocess), "eval images"
    rng = np.random.default_rng(plan.seed)
    return rng.standard_normal((n, *loaded.input_shape), dtype=np.float32), "gaussian noise"


def engine_onnx(plan: BuildPlan, loaded, compressed, example, fp32_onnx: Path, out_stem: Path,
                calib_inputs: torch.Tensor | None, exports: Path | None = None) -> Path:
    """The graph the compressed engine is built from: the Q/DQ graph for int8, the fp16 rewrite for fp16, else the
    exported fp32 graph (`exports`: the export cache the fp32 graph came from)."""
    if plan.int8 is not None:
        return int8_onnx(plan, loaded, compressed, example, fp32_onnx, out_stem.with_suffix(".int8.onnx"),
                         calib_inputs, exports)
    if plan.target.precision == "fp16":
        from dfp_deploy.export.passes.fp16 import write_fp16_onnx

        return write_fp16_onnx(fp32_onnx, out_stem.with_suffix(".fp16.onnx"))
    return fp32_onnx


def torch_runner(model):
    from dfp_deploy.core.outputs import to_numpy

    def run(x: np.ndarray):
        with torch.inference_mode():
            return to_numpy(model(torch.from_numpy(np.ascontiguousarray(x))))
    return run


def chunked(run, batch: int):
    """Feed an engine built for a static batch: split into chunks of exactly `batch` rows."""
    from dfp_deploy.core.outputs import concat

    def go(x: np.ndarray):
        return concat([run(x[i:i + batch]) for i in range(0, len(x), batch)])
    return go


class ChunkedEngine:
    """Adapter: an engine with a static batch seen as one that takes any multiple of that batch."""

    def __init__(self, engine, batch: int):
        self.name = engine.name
        self.run = chunked(engine.run, batch)


def check_parity(plan: BuildPlan, loaded, compressed, engine, engine_onnx: Path) -> dict:
    """The engine against PyTorch on the reference inputs, with the precision-aware rule; refused when it fails."""
    from dfp_deploy.measure.parity import int8_verdict, parity

    t = plan.target
    x_ref, ref_kind = reference_inputs(plan, loaded)
    par = parity(torch_runner(compressed), ChunkedEngine(engine, t.batch), x_ref,
                 rule=parity_rule(plan.parity, compressed, engine))
    par.update(inputs=ref_kind, precision=t.precision)
    from dfp_deploy.backends.registry import simulates, simulation

    if simulates(t.precision):
        # the float model is not what an int8 engine computes: also compare with the simulated quantization
        simulated = simulation(t.precision, engine_onnx, t.threads)
        sim = parity(chunked(simulated.run, t.batch), ChunkedEngine(engine, t.batch), x_ref)
        par["simulated"] = {k: sim[k] for k in ("max_abs_err", "mean_abs_err", "top1_agreement")}
        par["simulated"]["rel_rms"] = max(o["rel_rms"] for o in sim["outputs"].values())
        if len(sim["outputs"]) > 1:  # several outputs: no class agreement to read, so each output's error
            par["simulated"]["outputs"] = {k: {"max_abs_err": o["max_abs_err"], "rel_err": o["rel_err"],
                                               "rel_rms": o["rel_rms"]} for k, o in sim["outputs"].items()}
        par["simulated"]["rule"] = int8_verdict(sim)
    enforce_parity(plan.parity, par, ref_kind)
    return par


def enforce_parity(spec: ParitySpec, par: dict, ref_kind: str) -> None:
    """fp32/fp16 engines must reproduce PyTorch's logits within the precision-aware rule (measure/parity.py;
    advanced.measure.parity_tolerance is its absolute floor); int8 engines must reproduce their simulated
    quantization on every output (any inputs) and, with one logits output and real images, agree with PyTorch on
    the class."""
    from dfp_deploy.core.errors import ParityError

    if spec.precision == "int8":
        par["min_agreement"] = spec.int8_min_agreement
        sim_rule = par.get("simulated", {}).get("rule")
        if sim_rule is not None and not sim_rule["passed"]:
            raise ParityError(f"parity: {sim_rule['failure']}")
        if (ref_kind == "eval images" and par["top1_agreement"] is not None
                and not par["top1_agreement"] >= spec.int8_min_agreement):
            raise ParityError(f"parity: the int8 engine agrees with PyTorch on {100 * par['top1_agreement']:.1f}% "
                              f"of the images (< advanced.measure.int8_min_agreement {spec.int8_min_agreement:g})")
        return
    from dfp_deploy.measure.parity import enforce

    par["tolerance"] = par["rule"]["tolerance"]
    enforce(par)


def parity_rule(spec: ParitySpec, compressed, engine):
    """The float arithmetic the engine says it runs (fp16, TF32 or fp32) and the net's size; None for int8 (held
    to class agreement)."""
    from dfp_deploy.measure.parity import ParityRule, network_size

    if spec.precision == "int8":
        return None
    layers, max_dot = network_size(compressed)
    return ParityRule(engine.inspect().arithmetic, layers, max_dot, spec.tolerance)


def time_engines(plan: BuildPlan, engines: dict, example, *, quiet: bool, graphs: dict | None = None,
                 target=None) -> tuple[dict, dict | None]:
    """Latency of the engines, interleaved (measure/latency.py), as report.json's `latency`, and the raw stats.

    With `graphs` (engine name -> its ONNX file, or that file's sha256) and `target` (the backend's BackendInfo), the
    run goes through the measurement cache (measure/cache.py): keyed by every engine's graph, the target, the
    device, the runtime version and the protocol, and stored as one run, so a second identical build reports the
    timings measured together the first time (`latency.cached`) instead of pairing timings from different runs. A
    stored run whose rounds disagree (unsettled, measure/latency.py) is not reused; advanced.measure.remeasure times
    again in any case. Either way the fresh run replaces the entry."""
    t, m = plan.target, plan.measure
    latency = {"backend": t.backend, "precision": t.precision, "batch": t.batch}
    if not m.latency:
        return latency, None
    from dfp_deploy.core.types import LatencyStats
    from dfp_deploy.measure.latency import (UNSETTLED_SPREAD, noise, round_speedups, speedup_is_unsettled,
                                            time_interleaved)

    protocol = dict(warmup=m.warmup, runs=m.runs, rounds=m.rounds)
    cache, key, entry = None, None, None
    if graphs is not None and target is not None:
        from dfp_deploy.measure.cache import MeasurementCache

        cache, key = MeasurementCache(m.cache), _timing_key(plan, graphs, target, protocol)
        entry = None if m.remeasure else cache.get(key)
        if entry is not None and set(entry.stats) != set(engines):
            entry = None
    stats = None
    if entry is not None:
        stats = {name: LatencyStats(**{**d, "round_p50_ms": tuple(d["round_p50_ms"])})
                 for name, d in entry.stats.items()}
        if speedup_is_unsettled(round_speedups(stats["before"], stats["after"])):
            # a run the load moved is kept but not reused: a rebuild is how a user asks for a steadier reading
            cache.notes.append("measurement cache: the stored run was unsettled (its rounds' speedups spread over "
                               f"{UNSETTLED_SPREAD:.0%}); timed again")
            entry, stats = None, None
    if stats is None:
        xb = example.numpy()
        stats = time_interleaved({name: engine.prepare(xb) for name, engine in engines.items()}, **protocol,
                                 batch=t.batch, threads=t.threads, progress=not quiet)
        if cache is not None:
            cache.put(key, stats["after"].p50_ms, stats["before"].p50_ms, protocol,
                      {name: s.as_dict() for name, s in stats.items()})
    after = engines["after"]
    latency.update(threads=getattr(after, "threads", None) or stats["after"].threads,
                   before=stats["before"].as_dict(), after=stats["after"].as_dict(),
                   speedup=stats["before"].p50_ms / stats["after"].p50_ms,
                   speedup_rounds=round_speedups(stats["before"], stats["after"]),
                   noise={name: noise(stats[name]) for name in ("before", "after")},
                   protocol=dict(protocol, order="interleaved, rotating"))
    if cache is not None:
        latency.update(cached=entry is not None, cache_entry=str(cache.path_for(key)), cache_notes=cache.notes)
    return latency, stats


def _timing_key(plan: BuildPlan, graphs: dict, target, protocol: dict):
    """The cache key of one build's timing run: the compressed graph as candidate, the original's as original, the
    other engines' graphs (the unrounded plan) and the protocol as extras."""
    from dfp_deploy.core.digest import file_sha256
    from dfp_deploy.measure.cache import make_key
    from dfp_deploy.measure.workers import engine_options

    t = plan.target
    digest = {name: g if isinstance(g, str) else file_sha256(g) for name, g in graphs.items()}
    extra = {**{f"engine:{name}": d for name, d in digest.items() if name not in ("before", "after")},
             **{f"protocol:{k}": v for k, v in protocol.items()}, **engine_options(dict(t.options))}
    return make_key(candidate=digest["after"], original=digest["before"], backend=t.backend, precision=t.precision,
                    batch=t.batch, threads=t.threads, device=target.device, versions={t.backend: target.version},
                    extra=extra)


def accuracy(plan: BuildPlan, loaded, eng_before, eng_after, *, quiet: bool, original: Path | None = None,
             target=None) -> dict:
    """Top-1 of both engines on eval.data (or the user's eval.metric). With the original's ONNX file and the backend's
    BackendInfo, the original's top-1 goes through the accuracy cache (measure/accuracy_cache.py): measured once per
    graph, image set and target, and reported as `before_cached`; advanced.measure.remeasure evaluates it again."""
    from dfp_deploy.data.images import load_images, to_tensor
    from dfp_deploy.measure.accuracy import top1

    if plan.eval.metric != "top1":
        return custom_metric(plan, loaded, eng_before, eng_after, quiet=quiet)
    x8, y = load_images(plan.eval.data, loaded.preprocess, limit=plan.eval.limit, start=plan.eval.start)
    x = to_tensor(x8, loaded.preprocess)
    kw = dict(batch=plan.target.batch, static_batch=not plan.export.dynamic_batch, progress=not quiet)
    cache = key = stored = None
    if original is not None and target is not None:
        from dfp_deploy.measure.accuracy_cache import AccuracyCache

        cache, key = AccuracyCache(plan.measure.cache / "accuracy"), _accuracy_key(plan, loaded, original, target)
        stored = None if plan.measure.remeasure else cache.get(key)
        if stored is not None and stored[1] != len(y):
            stored = None
    before = stored[0] if stored is not None else top1(eng_before.run, x, y, **kw)
    if cache is not None and stored is None:
        cache.put(key, before, len(y))
    result = {"data": plan.eval.data, "start": plan.eval.start, "n": int(len(y)), "metric": "top1_percent",
              "before": before, "after": top1(eng_after.run, x, y, **kw)}
    if cache is not None:
        result["before_cached"] = stored is not None
    return result


def _accuracy_key(plan: BuildPlan, loaded, original: Path, target) -> dict:
    from dfp_deploy.core.digest import file_sha256
    from dfp_deploy.measure.accuracy_cache import accuracy_key
    from dfp_deploy.measure.workers import engine_options

    t, e = plan.target, plan.eval
    return accuracy_key(graph=file_sha256(original), data=file_sha256(Path(e.data)), start=e.start, limit=e.limit,
                        preprocess=repr(loaded.preprocess), backend=t.backend, precision="fp32", batch=t.batch,
                        static_batch=not plan.export.dynamic_batch, threads=t.threads or 0, device=target.device,
                        version=target.version, options=json.dumps(engine_options(dict(t.options)), sort_keys=True,
                                                                   default=str))


def custom_metric(plan: BuildPlan, loaded, eng_before, eng_after, *, quiet: bool) -> dict:
    """eval.metric: package.module:function on each engine (the call contract: measure/metric.py)."""
    from dfp_deploy.data.images import load_images, to_tensor
    from dfp_deploy.measure.accuracy import run_batched
    from dfp_deploy.measure.metric import eval_data, evaluate, other_arrays

    spec, function, e = plan.eval.metric, metric_function(plan), plan.eval
    x8, _ = load_images(e.data, loaded.preprocess, limit=e.limit, require_labels=False, start=e.start)
    arrays, count = other_arrays(e.data)
    data = eval_data(to_tensor(x8, loaded.preprocess), arrays, count, start=e.start)

    def score(engine):
        def run(x):
            return run_batched(engine.run, x, batch=plan.target.batch, static_batch=not plan.export.dynamic_batch,
                               progress=not quiet)
        return evaluate(spec, function, run, data)

    return {"data": e.data, "n": int(len(x8)), "metric": spec, "before": score(eng_before), "after": score(eng_after)}
