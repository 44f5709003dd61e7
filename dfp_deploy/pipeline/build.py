"""The build sequence: recipe → BuildPlan → model → channels → compressed model → ONNX → engines → checks → report.

Every artifact is first written into a private staging folder next to the output folder; only a build that
finished (parity checked, report written) replaces the output folder, so an interrupted or failed build never
leaves files that look complete and never destroys the previous good output.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dfp_deploy.analysis import analyze, count_macs, count_params, nothing_pruned_notice, partly_pruned_notice
from dfp_deploy.backends.registry import get_backend
from dfp_deploy.core import output
from dfp_deploy.core.atomic import write_json_atomic, write_text_atomic
from dfp_deploy.core.env import environment
from dfp_deploy.core.errors import BackendUnavailable
from dfp_deploy.data.sources import InputSources
from dfp_deploy.export.onnx_export import export_onnx
from dfp_deploy.pipeline import compress_step as cs
from dfp_deploy.pipeline import engine_step as es
from dfp_deploy.pipeline.context import (Stages, cache_dir, fingerprint_report, measure_target_fingerprint, output_dir,
                                         resolve_recipe)
from dfp_deploy.pipeline.search_step import refuse_unsearchable, search
from dfp_deploy.recipe import Recipe, recipe_to_dict
from dfp_deploy.report import assemble
from dfp_deploy.report.assemble import REPORT_NAME
from dfp_deploy.report.markdown import render_markdown


def build(recipe: Recipe, recipe_path: Path | None = None, *, quiet: bool = False, out: Path | None = None,
          timed: bool = True) -> dict:
    """Run the whole build; return the report dict (also written to <out>/report.json). `out` replaces the recipe's
    output folder without changing the recipe the report records; timed=False skips the latency measurement (and the
    unrounded plan's engine, built only to be timed) whatever the recipe says, for a caller that times the engines
    itself: the plan, and the fingerprint a timed build would measure first, stay those of the recipe."""
    named = Path(out) if out is not None else output_dir(recipe, recipe_path)
    out = output.resolve(named)  # a symlinked --out: its target is replaced, the link stays a link
    output.check_replaceable(out)  # never replace a folder dfp-deploy did not provably write
    out.parent.mkdir(parents=True, exist_ok=True)
    output.remove_stale(out)
    stage_dir = output.start_staging(out)
    try:
        with cs.recipe_code(recipe_path):
            report = _build_into(recipe, recipe_path, stage_dir, Stages(total=8, quiet=quiet), timed)
        output.commit(stage_dir, out)  # manifest, then the locked swap; the user's files move into the new output
    except BaseException:
        output.discard_staging(stage_dir)
        raise
    report["artifacts"]["dir"] = str(named)
    return report


def _build_into(recipe: Recipe, recipe_path: Path | None, work: Path, stage: Stages, timed: bool = True) -> dict:
    plan = _untimed(resolve_recipe(recipe), timed)
    torch.manual_seed(plan.seed)
    t = plan.target
    backend = get_backend(t.backend, **t.options)
    info = backend.info()  # the device and runtime version that key the measurement and accuracy caches
    if not info.available:
        raise BackendUnavailable(f"target.backend: {t.backend} is unavailable here: {info.reason}")
    fingerprint_s = None
    if t.measure_fingerprint:
        stage.total += 1
        stage(f"measuring the latency fingerprint of {t.backend} {t.precision} batch {t.batch} (once: stored for "
              "later builds; advanced.target.fingerprint: table skips it)")
        fingerprint_s = measure_target_fingerprint(plan, quiet=stage.quiet)
        plan = _untimed(resolve_recipe(recipe), timed)  # the channel multiple now follows the fingerprint just stored

    stage(f"loading model {plan.model.name}")
    loaded = cs.load(plan)
    refuse_unsearchable(plan, loaded)
    model = loaded.module
    example = cs.example_input(loaded, t.batch, plan.seed)
    one = example[:1]

    adapt_spec = plan.inputs.get("bn_adapt")
    stage("analysing channel groups, choosing channels"
          + (", BN-matched inputs for bn_adapt (generated once per model)" if adapt_spec and adapt_spec.synthetic
             else "")
          + (" from activations measured on the calibration inputs" if plan.select.measures_statistics else ""))
    analysis = analyze(model, one)
    # each named input set is loaded once, for every step that reads it
    sources = InputSources(model, loaded.preprocess, loaded.input_shape, cache_dir=plan.cache / "synthetic",
                           progress=stage.bar)
    adapt_inputs = sources.load(adapt_spec) if plan.bn_adapt is not None else None
    adapt_trust = None
    if adapt_inputs is not None:
        from dfp_deploy.compress.calibrate.bn_adapt import self_agreement

        adapt_trust = self_agreement(model, adapt_inputs)
    calib_inputs = sources.load(plan.inputs["calibration"]) if "calibration" in plan.inputs else None
    measured = cs.measured_statistics(plan.select, model, analysis, calib_inputs)
    search_report = None
    if plan.search is not None:
        x_proxy = sources.load(plan.inputs[plan.search.inputs])
        keep, search_report = search(plan, loaded, analysis, example, work, backend, adapt_inputs, x_proxy,
                                     quiet=stage.quiet)
    else:
        keep = cs.choose_channels(plan.select, model, analysis, progress=not stage.quiet, measured=measured)

    stage(f"compressing ({plan.describe(len(keep.keep))})")
    unrounded = cs.unrounded_plan(plan, model, analysis, keep, measured) if search_report is None else None
    compressed = cs.compress(plan, model, analysis, keep, calib_inputs if plan.calibrate else None,
                             adapt_inputs).eval()
    sizes = assemble.sizes((count_params(model), count_params(compressed)),
                           (count_macs(model, one), count_macs(compressed, one)))
    torch.save(compressed, work / "model.pt")
    write_json_atomic(work / "plan.json", {"keep": {k: list(v) for k, v in keep.keep.items()},
                                          "channels": {g.name: g.channels for g in analysis.groups}})

    stage("exporting ONNX")
    exports = cache_dir() / "onnx"  # the unchanged original is exported once per machine, not once per build
    opset, dyn = plan.export.opset, plan.export.dynamic_batch
    exp_before = export_onnx(model, example, work / "original.onnx", dynamic_batch=dyn, opset=opset, cache=exports)
    exp_after = export_onnx(compressed, example, work / "model.onnx", dynamic_batch=dyn, opset=opset, cache=exports)

    stage(f"building {t.backend} engines: original fp32, compressed {t.precision} (batch {t.batch})")
    engine_onnx = es.engine_onnx(plan, loaded, compressed, example, exp_after.path, work / "model", calib_inputs,
                                 exports)
    # the original is always the fp32 engine: the report compares what the user has with what they ship
    eng_before = backend.build(exp_before.path, precision="fp32", threads=t.threads, out_dir=work,
                               torch_model=model)
    eng_after = backend.build(engine_onnx, precision=t.precision, threads=t.threads, out_dir=work,
                              torch_model=compressed)
    engines = {"before": eng_before, "after": eng_after}
    timed_graphs = {"before": exp_before.path, "after": engine_onnx}  # what the measurement cache files timings by
    rounding = None
    if unrounded is not None:
        rounding, engines["unrounded"] = es.unrounded_engine(plan, loaded, analysis, unrounded, example, work,
                                                             adapt_inputs, backend, calib_inputs, exports)
        timed_graphs["unrounded"] = rounding.pop("onnx_sha256")

    stage("checking parity engine vs PyTorch")
    par = es.check_parity(plan, loaded, compressed, eng_after, engine_onnx)

    stage("timing engines (before/after interleaved)" if plan.measure.latency else "timing skipped")
    latency, stats = es.time_engines(plan, engines, example, quiet=stage.quiet, graphs=timed_graphs,
                                     target=info)
    if rounding is not None and stats is not None:
        rounding.update(macs_rounded=sizes["macs"]["after"], p50_ms_rounded=stats["after"].p50_ms,
                        p50_ms_unrounded=stats["unrounded"].p50_ms,
                        latency_gain=stats["unrounded"].p50_ms / stats["after"].p50_ms)
    graphs = assemble.cuda_graph_report(engines)
    if graphs:
        latency["cuda_graph"] = graphs

    stage("evaluating accuracy" if plan.eval.data else "accuracy skipped (no eval.data)")
    accuracy = es.accuracy(plan, loaded, eng_before, eng_after, quiet=stage.quiet, original=exp_before.path,
                           target=info) if plan.eval.data else None

    bn_adapt = _bn_adapt_report(plan, adapt_inputs, adapt_trust)
    engine = eng_after.inspect().report() or None
    r = plan.repair
    report = assemble.BuildReport(
        model={"name": loaded.name, "weights": loaded.weights, "input_shape": list(loaded.input_shape)},
        **sizes,
        prune={**assemble.prune_summary(analysis, keep), "selection": _selection_report(plan, search_report),
               "round_to": {"value": plan.select.round_to, "source": plan.select.round_to_source,
                            "fingerprint": fingerprint_report(plan, fingerprint_s)},
               # pruning asked for, nothing prunable: the CLI prints why on stdout
               **({"notice": nothing_pruned_notice(analysis, include_residual=plan.select.include_residual)}
                  if plan.select.prunes and not keep.keep else
                  {"notice": partly_pruned_notice(analysis)} if keep.keep and partly_pruned_notice(analysis) else {})},
        compress={"reconstruct": r.method, "udfc_form": r.udfc_form, "weight_bits": r.weight_bits,
                  "layer_bits": cs.layer_bits(plan, model, analysis), "bias_correction": r.bias_correction,
                  "bn_adapt": bn_adapt,
                  "calibration": ({"data": plan.inputs["calibration"].source,
                                   "samples": plan.inputs["calibration"].samples} if plan.calibrate else None)},
        latency=latency, rounding=rounding, parity=par, environment=environment(),
        recipe=recipe_to_dict(recipe), recipe_path=str(recipe_path) if recipe_path else None,
        artifacts={"model_pt": "model.pt", "onnx": engine_onnx.name, "original_onnx": "original.onnx",
                   "plan": "plan.json", "report_json": REPORT_NAME, "report_md": "report.md"},
        warnings=assemble.warnings(analysis_warnings=analysis.warnings, engine=engine, latency=latency,
                                   parity=par, bn_adapt=bn_adapt, search=search_report, macs=sizes["macs"]),
        accuracy=accuracy, search=search_report, engine=engine,
        quantization=({"activations": plan.int8.activations, "range_k": plan.int8.range_k,
                       "style": plan.int8.style, "onnx": engine_onnx.name} if plan.int8 else None),
    ).as_dict()
    write_text_atomic(work / "report.md", render_markdown(report))
    write_json_atomic(work / REPORT_NAME, report)  # last file; build() then writes the marker listing them all
    return report


def _untimed(plan, timed: bool):
    if timed:
        return plan
    return dataclasses.replace(plan, measure=dataclasses.replace(plan.measure, latency=False, rounding_cost=False))


def _bn_adapt_report(plan, inputs: torch.Tensor | None, agreement: float | None) -> dict | None:
    if inputs is None:
        return None
    spec = plan.inputs["bn_adapt"]
    return {"data": spec.source, "samples": int(len(inputs)), "synthetic_steps": spec.steps if spec.synthetic else None,
            "self_agreement": agreement}


def _selection_report(plan, search_report: dict | None) -> dict:
    """How the kept channels were chosen (the search's plan, or the prune section's ranking and allocation)."""
    s = plan.select
    out = {"importance": s.importance, "allocation": "search" if search_report is not None else s.allocation}
    if s.importance == "lmmse":
        out["statistics"] = s.statistics
    return out


def inspect(recipe: Recipe, recipe_path: Path | None = None) -> dict:
    """Channel groups, channel counts and MACs of the recipe's model (and of the plan the recipe would apply)."""
    plan = resolve_recipe(recipe)
    torch.manual_seed(plan.seed)  # as build does: a model without weights gets the same random ones, so the same plan
    with cs.recipe_code(recipe_path):
        loaded = cs.load(plan)
    one = cs.example_input(loaded, 1, plan.seed)
    analysis = analyze(loaded.module, one)
    calib = plan.inputs.get("calibration")
    calib_inputs = (InputSources(loaded.module, loaded.preprocess, loaded.input_shape,
                                 cache_dir=plan.cache / "synthetic").load(calib)
                    if calib is not None and plan.select.measures_statistics else None)
    keep = cs.choose_channels(plan.select, loaded.module, analysis,
                              measured=cs.measured_statistics(plan.select, loaded.module, analysis, calib_inputs))
    return {"model": loaded.name, "input_shape": list(loaded.input_shape),
            "params": count_params(loaded.module), "macs": count_macs(loaded.module, one),
            "groups": analysis.groups, "plan": keep, "warnings": list(analysis.warnings)}
