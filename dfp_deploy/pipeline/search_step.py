"""The search step: the evaluate callable handed to the AutoDFP loop, and the latency model fitted on the target."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from dfp_deploy.core.errors import InputError
from dfp_deploy.core.types import PrunePlan
from dfp_deploy.recipe.resolve import BuildPlan
from dfp_deploy.pipeline.compress_step import compress, planner


def refuse_unsearchable(plan: BuildPlan, loaded) -> None:
    """A search needs one [N, classes] logits tensor to score candidates by; the build asks right after loading the
    model, before generating the proxy inputs (seconds to minutes of work that would be thrown away)."""
    if plan.search is not None and loaded.num_classes is None:
        raise InputError(f"search.episodes: the search scores candidates by their logits' fidelity, and "
                         f"{plan.model.name} returns other outputs (not one [N, classes] tensor); set "
                         "search.episodes: 0 and choose compress.prune.ratio")


def search(plan: BuildPlan, loaded, analysis, example, work: Path, backend, adapt_inputs, x_proxy: torch.Tensor,
           *, quiet: bool) -> tuple[PrunePlan, dict]:
    """AutoDFP: the SAC agent picks per-group ratios; each candidate is compressed exactly as the final build will
    be and scored by its fidelity to the original on the proxy inputs (BN-matched synthetic ones, data-free; or
    unlabeled images). The budget is enforced by the agent's action wall on a cost model: MACs, or latency
    predicted per group from MACs and fitted to engines measured on the target backend (the original and the plan
    with every group at its minimum)."""
    from dfp_deploy.analysis import count_macs
    from dfp_deploy.search.env import MacCost
    from dfp_deploy.search.loop import run_search
    from dfp_deploy.search.reward import fidelity, proxy, reward
    from dfp_deploy.search.space import build_space

    S, select, model = plan.search, plan.select, loaded.module
    refuse_unsearchable(plan, loaded)
    one = example[:1]
    space = build_space(model, analysis, one, min_keep=S.min_keep, round_to=select.round_to,
                        include_residual=S.include_residual)
    with torch.inference_mode():
        reference = model(x_proxy)
    plan_for = _plan_maker(plan, model, analysis, space)

    cost, timer, fitted = MacCost(space), None, None
    if S.target == "latency":
        cost, timer, fitted = latency_model(plan, model, analysis, space, example, work, backend, plan_for)
    target_ms = S.budget * timer.reference_ms if timer is not None else None
    best_reward = [-math.inf]

    def evaluate_batch(many: list[dict]) -> list[dict]:
        outs, to_time = [], []
        for ratios in many:
            candidate = compress(plan, model, analysis, plan_for(ratios), adapt_inputs=adapt_inputs).eval()
            with torch.inference_mode():
                fid = fidelity(reference, candidate(x_proxy))
            out = {"proxy": proxy(fid, S.proxy), **fid, "macs": count_macs(candidate, one)}
            # advanced.search.measure "best": a candidate that could become the best (its proxy, the most its reward
            # can be,
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
                            warmup=S.warmup, seed=plan.seed, target=S.budget, log_path=log, resume=S.resume,
                            cost=cost, target_ms=target_ms, penalty=S.latency_penalty,
                            latency_reference_ms=timer.reference_ms if timer is not None else None,
                            plot_path=state / "search_pareto.png", progress=not quiet,
                            scoring=dict(S.scoring), batch=S.batch, evaluate_batch=evaluate_batch)
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
               target=S.target, ratio=round(1.0 - S.budget, 12), budget=S.budget, proxy_metric=S.proxy, proxy_data=plan.inputs[S.inputs].source,
               proxy_samples=int(len(x_proxy)), state_dir=str(state),
               latency_penalty=S.latency_penalty if S.target == "latency" else None,
               latency_model=fitted, batch=S.batch)
    if timer is not None and timer.cache is not None:
        rep["notes"] = rep["notes"] + timer.cache.notes
    return plan_for(result.best_ratios), rep


def _plan_maker(plan: BuildPlan, model, analysis, space):
    """ratios -> PrunePlan for the search's candidates, with the build's channel ranking."""
    if plan.select.importance == "lmmse":
        from dfp_deploy.compress.select.paths import LmmseSelector
        from dfp_deploy.core.threads import torch_threads

        # one elimination path per group gives the kept set of every count the agent may pick
        with torch_threads(1):
            choices = {name: space.choices(g) for g, name in enumerate(space.groups)}
            selector = LmmseSelector(model, analysis, choices)

        def plan_for(ratios: dict) -> PrunePlan:
            return selector.plan(ratios) if ratios else PrunePlan()
        return plan_for
    # the search already snapped kept counts to round_to (round_to=1 reproduces them exactly) and is itself the
    # allocation across groups
    chooser = planner(plan.select, model, analysis, round_to=1, allocation="uniform",
                      include_residual=plan.search.include_residual)

    def plan_for(ratios: dict) -> PrunePlan:
        return chooser.plan(0.0, ratios) if ratios else PrunePlan()
    return plan_for


def latency_model(plan: BuildPlan, model, analysis, space, example, work, backend, plan_for):
    """Fit the per-group latency model to two engines measured on the target: the original and the search's floor
    (every group at its minimum). Every candidate lies between the two, so the line interpolates and never
    extrapolates, and the reachability check compares the budget with a measured floor (with the budget fraction
    as second point, one noisy point under load tilted the line enough to refuse a reachable budget). Returns the
    model, the timer that measures later candidates on the same scale (measure/workers.py CandidateTimer: on
    advanced.measure.workers, through the measurement cache), and what was measured."""
    import itertools

    import numpy as np

    from dfp_deploy.export.onnx_export import export_onnx
    from dfp_deploy.measure.cache import MeasurementCache
    from dfp_deploy.measure.workers import Candidate, CandidateTimer, TargetSpec, make_measurer
    from dfp_deploy.search.env import LatencyModel

    t, M = plan.target, plan.measure
    numbers = itertools.count()

    def export(m) -> Candidate:
        # through the export cache: a rerun or resumed search, or another build of the same recipe, traces the
        # original, the floor and every candidate it already exported only once
        return Candidate(export_onnx(m, example, work / f".search_{next(numbers)}.onnx",
                                     opset=plan.export.opset, cache=plan.cache / "onnx").path, m)

    spec = TargetSpec(t.backend, "fp32", t.batch, t.threads, example.numpy(), warmup=M.warmup, runs=50, rounds=5,
                      options=dict(t.options))
    original, notes = export(model), []
    try:
        measurer = make_measurer(spec, original, workers=M.workers, local_workers=M.local_workers,
                                 resource=M.target_resource, timeout_s=M.worker_timeout, backend=backend, notes=notes)
        cache = MeasurementCache(M.cache)
        timer = CandidateTimer(measurer, original.onnx, spec, cache=cache, export=export, remeasure=M.remeasure)
    finally:
        for leftover in work.glob(f"{original.onnx.name}*"):  # the workers hold what they need
            leftover.unlink()
    floor_kept = list(space.min_kept)
    floor_keep = np.asarray(floor_kept, dtype=np.float64) / np.asarray(space.channels)
    try:
        floor_ms = timer.measure(compress(plan, model, analysis, plan_for(space.ratios(floor_kept))).eval())
    except BaseException:
        timer.close()  # worker processes or actors must not outlive a failed search
        raise
    # the block a partly filled channel group is charged as: measured when the target has a fingerprint
    cost = LatencyModel(space, block=t.channel_block)
    cost.observe(np.ones(space.size), timer.reference_ms)
    cost.observe(floor_keep, floor_ms, prior=True)
    return cost, timer, {"measured_ms": {"original": timer.reference_ms, "floor": floor_ms},
                         "intercept_ms": cost.c0, "scale_ms": cost.scale, "channel_block": cost.block,
                         "workers": measurer.where, "worker_notes": notes}
