"""Render bench.json (pipeline/bench.py) as bench.md: one table row per variant, every number from the JSON."""

from __future__ import annotations

BENCH_JSON = "bench.json"
BENCH_MD = "bench.md"


def _count(n: int) -> str:
    return f"{n / 1e6:.3f} M" if n >= 1e5 else f"{n:,}"


def _accuracy(acc: dict | None) -> str:
    if not acc:
        return "-"
    value = acc["value"]
    if acc["metric"] == "top1_percent":
        return f"{value:.2f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v:.4g}" for k, v in value.items())
    return f"{value:.4g}"


def _rounds(row: dict) -> str:
    r = row.get("speedup_rounds")
    return f"{r[0]:.2f}-{r[1]:.2f}" if r else "-"


def table(bench: dict) -> list[str]:
    """The Markdown table alone (the CLI prints it): the original first, then the variants in grid order."""
    keys = list(bench["grid"])
    rows = [bench["original"], *bench["variants"]]
    has_acc = any(r["accuracy"] for r in rows)
    acc_head = ["top-1 %" if rows[0]["accuracy"] is None or rows[0]["accuracy"]["metric"] == "top1_percent"
                else rows[0]["accuracy"]["metric"]] if has_acc else []
    head = ["variant", *keys, "precision", "params", "MACs", "MACs cut", *acc_head, "p50 ms", "p90 ms", "speedup",
            "speedup by round", "parity max abs diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        over = [str(r["overrides"].get(k, "-")) for k in keys]
        parity = "-" if r["parity_max_abs_err"] is None else f"{r['parity_max_abs_err']:.1e}"
        cells = [r["name"], *over, r["precision"], _count(r["params"]), _count(r["macs"]),
                 f"{100 * r['macs_cut']:.1f}%", *([_accuracy(r["accuracy"])] if has_acc else []),
                 f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['speedup']:.2f}x", _rounds(r), parity]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _split(acc: dict | None) -> str:
    if not acc:
        return ""
    first = acc.get("start", 0)
    return (f" {'Top-1' if acc['metric'] == 'top1_percent' else acc['metric']} on images {first}–"
            f"{first + acc['n'] - 1} of `{acc['data']}`.")


def render_bench_markdown(bench: dict) -> str:
    t, p, env = bench["target"], bench["protocol"], bench["environment"]
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "onnx", "onnxruntime", "tensorrt") if k in env)
    machine = f"{env.get('cpu', '?')} ({env.get('cores', '?')} logical cores)" + (
        f", GPU {', '.join(env['gpus'])}" if env.get("gpus") else "")
    threads = t["threads"] if t["threads"] is not None else "backend default"
    lines = [f"# dfp-deploy bench: {bench['model']}", ""]
    if bench.get("command"):
        lines += ["```", bench["command"], "```", ""]
    lines += [f"{t['backend']}, batch {t['batch']}, threads {threads}: the original (fp32) and every variant timed "
              f"in one run, {p['runs']} runs each in {p['rounds']} interleaved rounds (rotating order) after "
              f"{p['warmup']} warm-up calls; speedup = the original's p50 / the variant's p50 in that run, by round "
              f"= the lowest and highest ratio of the rounds' medians.{_split(bench['original']['accuracy'])}", ""]
    lines += table(bench)
    lines += ["", f"Machine: {machine}; {env.get('platform', '')}; Python {env.get('python', '?')}; {versions}; "
              f"dfp-deploy {bench.get('dfp_deploy_version', '?')}. Each variant's build (report.json, plan.json, "
              "engine graph) is in the folder named in the first column.", ""]
    return "\n".join(lines)
