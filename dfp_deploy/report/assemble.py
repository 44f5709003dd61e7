"""Assemble a build's report: a frozen BuildReport from the stages' results, and the warnings they imply.

report.json is `BuildReport.as_dict()`; its keys and their order are the README's report contract.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field

from dfp_deploy import __version__

REPORT_NAME = "report.json"


@dataclass(frozen=True)
class BuildReport:
    model: dict
    params: dict
    macs: dict
    prune: dict
    compress: dict
    latency: dict
    parity: dict
    environment: dict
    recipe: dict
    recipe_path: str | None
    artifacts: dict
    warnings: tuple[str, ...]
    rounding: dict | None = None
    accuracy: dict | None = None
    search: dict | None = None
    engine: dict | None = None
    quantization: dict | None = None
    version: str = __version__
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def as_dict(self) -> dict:
        out = {"dfp_deploy_version": self.version, "created": self.created, "model": self.model,
               "params": self.params, "macs": self.macs, "prune": self.prune, "compress": self.compress,
               "latency": self.latency}
        if self.rounding is not None:
            out["rounding"] = self.rounding
        out.update(parity=self.parity, environment=self.environment, recipe=self.recipe,
                   recipe_path=self.recipe_path, artifacts=self.artifacts, warnings=list(self.warnings))
        for key in ("accuracy", "search", "engine", "quantization"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def sizes(params: tuple[int, int], macs: tuple[int, int]) -> dict:
    """report.json `params` and `macs`: before, after and the fraction removed."""
    out = {}
    for name, (before, after) in (("params", params), ("macs", macs)):
        out[name] = {"before": before, "after": after, "reduction": 1.0 - after / before if before else 0.0}
    return out


def prune_summary(analysis, plan) -> dict:
    groups = []
    for g in analysis.groups:
        kept = len(plan.keep[g.name]) if g.name in plan.keep else g.channels
        groups.append({"name": g.name, "channels": g.channels, "kept": kept, "prunable": g.prunable,
                       "residual": g.residual, **({"reason": g.reason} if g.reason else {})})
    total = sum(g["channels"] for g in groups if g["prunable"])
    kept = sum(g["kept"] for g in groups if g["prunable"])
    return {"groups_pruned": len(plan.keep), "prunable_channels": total,
            "removed_fraction": 1.0 - kept / total if total else 0.0, "groups": groups}


def cuda_graph_report(engines: dict) -> dict:
    """{engine: {requested, used, error}} for engines that can replay CUDA graphs: what the timing really was."""
    graphs = {name: engine.inspect().cuda_graph for name, engine in engines.items()}
    return {name: status.as_dict() for name, status in graphs.items() if status is not None}


def warnings(*, analysis_warnings, engine: dict | None, latency: dict, parity: dict, bn_adapt: dict | None,
             search: dict | None, macs: dict) -> tuple[str, ...]:
    """Every warning of a build, in report order."""
    out = list(analysis_warnings)
    out += engine_warnings((engine or {}).get("layers"))
    out += latency_warnings(latency)
    out += parity["warnings"]
    out += [f"{name} engine: CUDA graph capture failed ({g['error']}); it was timed without graphs"
            for name, g in latency.get("cuda_graph", {}).items() if g["requested"] and not g["used"]]
    out += bn_adapt_warnings(bn_adapt)
    out += search_budget_warnings(macs, search)
    return tuple(out)


def latency_warnings(latency: dict) -> list[str]:
    """A speedup that moved between the interleaved rounds (the load changed while it was measured) is said to be
    uncertain (measure/latency.py)."""
    from dfp_deploy.measure.latency import unsettled_range

    span = unsettled_range(latency.get("speedup_rounds"))
    if span is None:
        return []
    return [f"the speedup moved between timing rounds ({span[0]:.2f}x to {span[1]:.2f}x; reported "
            f"{latency['speedup']:.2f}x): the machine's load changed while it was measured; rerun on a quiet machine "
            "or with more advanced.measure.runs"]


def search_budget_warnings(macs: dict, search: dict | None) -> list[str]:
    """The search meets a MAC budget by construction (its cost model, search/space.py); this says so if the built
    plan does not, rather than trusting the model (0.5 % slack for the rounding of kept counts)."""
    if search is None or search["target"] != "macs":
        return []
    allowed = search["budget"] * macs["before"]
    if macs["after"] <= allowed * 1.005:
        return []
    return [f"search: the built plan keeps {macs['after'] / macs['before']:.3f} of the MACs, over the budget "
            f"{search['budget']:g}: the search's MAC model mispriced this model's groups; please report it"]


def bn_adapt_warnings(bn_adapt: dict | None) -> list[str]:
    from dfp_deploy.compress.calibrate.bn_adapt import SELF_AGREEMENT_WARN

    agreement = bn_adapt.get("self_agreement") if bn_adapt else None
    if agreement is None or agreement >= SELF_AGREEMENT_WARN:
        return []
    fix = ("raise advanced.compress.bn_adapt.synthetic_steps" if bn_adapt["data"] == "synthetic"
           else "give more or more representative images")
    return [f"compress.bn_adapt: re-estimating the UNCHANGED model's BatchNorm statistics on these inputs changes "
            f"its top-1 class on {100 * (1 - agreement):.0f} % of them (self_agreement {agreement:.2f} < "
            f"{SELF_AGREEMENT_WARN}); they describe the data poorly, so the adapted statistics are suspect: {fix}, "
            f"or compare with bn_adapt off"]


def engine_warnings(layers: dict | None) -> list[str]:
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
