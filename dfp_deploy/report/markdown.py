"""Render report.json as a short human-readable report.md (every number comes from the JSON)."""

from __future__ import annotations


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _count(n: int) -> str:
    return f"{n / 1e6:.3f} M" if n >= 1e5 else f"{n:,}"


def render_markdown(r: dict) -> str:
    m = r["model"]
    lines = [f"# dfp-deploy report: {m['name']}", ""]
    lines += [f"Built {r['created']} with dfp-deploy {r['dfp_deploy_version']}; weights `{m['weights']}`; "
              f"input {'x'.join(map(str, m['input_shape']))}.", ""]
    c = r["compress"]
    p = r["prune"]
    lines += [f"Compression: {p['groups_pruned']} channel groups pruned, "
              f"{100 * p['removed_fraction']:.1f}% of prunable channels removed{_selection(p)}{_multiple(p)}; {_repair(c)}; "
              f"weight bits `{c['weight_bits'] or 'float'}`{_overrides(c)}"
              f"{_bias_correction(c)}{_bn_adapt(c)}.", ""]
    lines += ["| | before | after | change |", "|---|---|---|---|"]
    for key in ("params", "macs"):
        d = r[key]
        lines.append(f"| {key} | {_count(d['before'])} | {_count(d['after'])} | {_pct(-d['reduction'])} |")
    lat = r["latency"]
    if "before" in lat:
        b, a = lat["before"], lat["after"]
        lines.append(f"| latency p50 ({lat['backend']}, {lat['precision']}, batch {lat['batch']}) | "
                     f"{b['p50_ms']:.3f} ms | {a['p50_ms']:.3f} ms | {lat['speedup']:.2f}x faster |")
        lines.append(f"| latency p90 | {b['p90_ms']:.3f} ms | {a['p90_ms']:.3f} ms | |")
    acc = r.get("accuracy")
    if acc and acc["metric"] == "top1_percent":
        first = acc.get("start", 0)
        which = f"images {first}–{first + acc['n'] - 1}" if first else f"{acc['n']} images"
        lines.append(f"| top-1 ({which}) | {acc['before']:.2f}% | {acc['after']:.2f}% | "
                     f"{acc['after'] - acc['before']:+.2f} pt |")
    elif acc:  # eval.metric: the user's numbers, one row each
        before, after = ((v if isinstance(v, dict) else {"": v}) for v in (acc["before"], acc["after"]))
        for k in before:
            lines.append(f"| {acc['metric']}{' ' + k if k else ''} ({acc['n']} images) | {before[k]:.4g} | "
                         f"{after.get(k, float('nan')):.4g} | |")
    lines.append("")
    if "before" in lat:
        pr = lat["protocol"]
        lines += [f"Latency: {pr['warmup']} warm-up runs, then {pr['runs']} timed runs per engine in {pr['rounds']} "
                  f"rounds, before and after engines interleaved in one process, {lat.get('threads')} threads. "
                  "Compare the ratio, not absolute times, on a shared machine."
                  + (f" Timings read from the measurement cache ({lat['cache_entry']}), measured together by an "
                     "earlier build of the same graphs on this device; advanced.measure.remeasure: true times them "
                     "again." if lat.get("cached") else ""), ""]
    else:
        lines += ["Latency: not measured (measure.latency is false).", ""]
    if acc and acc.get("before_cached"):
        lines += ["The original's top-1 was read from the accuracy cache: measured by an earlier build on the same "
                  "graph, images and target; advanced.measure.remeasure: true evaluates it again.", ""]
    rnd = r.get("rounding")
    if rnd:
        lines += [f"Channel rounding to multiples of {rnd['round_to']}: {_count(rnd['macs_unrounded'])} → "
                  f"{_count(rnd['macs_rounded'])} MACs, p50 {rnd['p50_ms_unrounded']:.3f} → "
                  f"{rnd['p50_ms_rounded']:.3f} ms ({rnd['latency_gain']:.2f}x; the unrounded plan's engine was timed "
                  "in the same rounds).", ""]
    par = r["parity"]
    sim_rule = (par.get("simulated") or {}).get("rule")
    gate = (f"tolerance {par['tolerance']:g}" if par.get("tolerance") is not None
            else "tolerance per output" if "tolerance" in par
            else "int8: gates are "
                 + (f"RMS error vs the simulated quantization ≤ {sim_rule['max_rel_rms']:g}x each output's RMS and "
                    if sim_rule else "")
                 + f"top-1 agreement ≥ {100 * par['min_agreement']:g}% on real images")
    agree = (f", top-1 agreement {100 * par['top1_agreement']:.2f}%" if par.get("top1_agreement") is not None
             else "")
    lines += [f"Parity (engine vs PyTorch, {par['n']} inputs from {par['inputs']}): max |diff| "
              f"{par['max_abs_err']:.2e} ({gate}){agree}.", ""]
    outs = par.get("outputs") or {}
    if len(outs) > 1 or any(not o["informative"] for o in outs.values()):
        lines += ["| output | max abs err | scale max abs | tolerance | pass | informative |", "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {o['max_abs_err']:.2e} | {o['scale']:.2e} | "
                  f"{format(o['tolerance'], '.2e') if o.get('tolerance') is not None else '-'} | "
                  f"{'-' if 'passed' not in o else 'yes' if o['passed'] else 'NO'} | "
                  f"{'yes' if o['informative'] else 'NO (scale too small)'} |" for k, o in outs.items()]
        lines += [""]
    if par.get("simulated"):
        sim = par["simulated"]
        sim_agree = (f"top-1 agreement {100 * sim['top1_agreement']:.2f}%, " if sim.get("top1_agreement") is not None
                     else "")
        lines += [f"Against the simulated quantization (the Q/DQ graph run as float ops): {sim_agree}"
                  f"max |diff| {sim['max_abs_err']:.2e}"
                  + (f", RMS error {sim['rel_rms']:.2g}x the output's RMS" if "rel_rms" in sim else "")
                  + ": what the integer "
                  "kernels' own rounding changes.", ""]
    if "quantization" in r:
        q = r["quantization"]
        lines += [f"int8 engine: {q['style']}-style Q/DQ (`{q['onnx']}`), activation ranges "
                  f"{'from BatchNorm statistics, k=' + format(q['range_k'], 'g') if q['activations'] == 'data_free' else 'from calibration images'}.",
                  ""]
    kernels = r.get("engine", {}).get("kernels")
    if kernels:
        lines += [f"ORT's optimized graph runs {kernels['integer_conv_gemm']} conv/gemm as integer kernels and "
                  f"{kernels['float_conv_gemm']} in float.", ""]
    srch = r.get("search")
    if srch:
        lines += [f"Search (AutoDFP, SAC): {srch['episodes']} episodes, {srch['evaluations']} candidates scored in "
                  f"{srch['seconds']:.0f} s; search.ratio {srch['ratio']:g} (at most {srch['budget']:g} of the original "
                  f"{srch['target']} kept); best episode "
                  f"{srch['best_episode']} (proxy {srch['best_proxy']:.4g}, {_proxy_inputs(srch)}). "
                  f"Log `{srch['log']}`"
                  + (f", Pareto plot `{srch['pareto_plot']}`." if srch.get("pareto_plot") else "."), ""]
        lat = srch.get("latency_model") or {}
        if lat.get("engines_timed"):
            lines += [f"Latency on the target: {lat['engines_timed']} engines timed during the search (the original, "
                      f"the floor plan and {lat['candidates_timed']} candidates that could become the best, each "
                      f"against the original); target {lat['target_ms']:.3f} ms, latency model "
                      f"{lat['final_intercept_ms']:.3f} ms + {lat['final_scale_ms']:.3f} ms × MAC share.", ""]
    env = r["environment"]
    lines += ["Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    if r.get("warnings"):
        lines += ["Warnings:", *[f"- {w}" for w in r["warnings"]], ""]
    art = r["artifacts"]
    lines += ["Artifacts: " + ", ".join(f"`{v}`" for k, v in art.items() if k != "dir"), ""]
    return "\n".join(lines)


def _repair(compress: dict) -> str:
    cal = compress.get("calibration")
    if cal:
        return f"two-phase calibration on {cal['samples']} inputs (`{cal['data']}`)"
    form = compress.get("udfc_form")
    return f"reconstruction `{compress['reconstruct']}`" + (f" ({form} form)" if form == "vector" else "")


def _selection(prune: dict) -> str:
    sel = prune.get("selection")
    if not sel or not prune["groups_pruned"]:
        return ""
    how = {"search": "allocated by the search", "uniform": "uniformly"}.get(sel["allocation"],
                                                                           f"allocated by `{sel['allocation']}`")
    stats = {"calibration": ", on activations measured on the calibration inputs",
             "model": ", on the data-free activation model"}.get(sel.get("statistics"), "")
    return f" (ranking `{sel['importance']}`{stats}, {how})"


def _multiple(prune: dict) -> str:
    """The channel multiple and where it came from; for a fingerprint, its file and measured cost of not rounding."""
    rnd = prune.get("round_to")
    if not isinstance(rnd, dict) or not prune["groups_pruned"]:
        return ""
    fp = rnd.get("fingerprint")
    if not fp:
        source = rnd["source"]  # "recipe", or "table (why)"
        if source.endswith(")") and " (" in source:
            source = source[:-1].replace(" (", ": ", 1)
        return f", kept counts in multiples of {rnd['value']} ({source})"
    when = f", measured by this build in {fp['measured_s']:.0f} s" if fp.get("measured_s") else ""
    return (f", kept counts in multiples of {rnd['value']} (the target's latency fingerprint `{fp['file']}`{when}: "
            f"a count off the multiple runs {100 * fp['cost_of_not_rounding']:+.0f} % against the next multiple up)")


def _bias_correction(compress: dict) -> str:
    """Said only when weights are quantized on the data-free path (None otherwise; older reports lack the key)."""
    on = compress.get("bias_correction")
    return "" if on is None else f", bias correction {'on' if on else 'off'}"


def _bn_adapt(compress: dict) -> str:
    """', BatchNorm statistics re-estimated on 256 synthetic inputs' when compress.bn_adapt was on."""
    a = compress.get("bn_adapt")
    if not a:
        return ""
    source = "synthetic inputs" if a["data"] == "synthetic" else f"images of `{a['data']}`"
    return f", BatchNorm statistics re-estimated on {a['samples']} {source}"


def _overrides(compress: dict) -> str:
    """' (8 in conv1, linear)' for per-layer bit overrides; '' when there are none (or an older report)."""
    by_bits: dict[int, list[str]] = {}
    for name, bits in (compress.get("layer_bits") or {}).items():
        by_bits.setdefault(bits, []).append(f"`{name}`")
    return "".join(f" ({bits} in {', '.join(names)})" for bits, names in by_bits.items())


def _proxy_inputs(srch: dict) -> str:
    """What the search scored candidates on (reports before proxy_data existed always used synthetic inputs)."""
    data = srch.get("proxy_data", "synthetic")
    if data == "synthetic":
        return f"data-free {srch['proxy_metric']} on BN-matched synthetic inputs"
    return f"{srch['proxy_metric']} on {srch.get('proxy_samples', '?')} real images of `{data}`, not data-free"
