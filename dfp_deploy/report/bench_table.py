"""Render bench.json (pipeline/bench.py) as bench.md: one table row per variant, every number from the JSON; and
the equal-latency / equal-MAC interpolation the bench stores for its --with builds (docs/methods/equal-latency.md)."""

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


def _rounds(row: dict, key: str = "speedup_rounds") -> str:
    r = row.get(key)
    return f"{r[0]:.2f}-{r[1]:.2f}" if r else "-"


def interpolate(x: float, points) -> float | None:
    """y at abscissa x, linear between the two neighbouring (abscissa, y) points, in abscissa order, that bracket
    x; None when x lies outside them all. Two points at x's own abscissa average their ys."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return (y0 + y1) / 2 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def _top1(row: dict) -> float | None:
    acc = row.get("accuracy")
    return acc["value"] if acc and acc["metric"] == "top1_percent" else None


def equal_points(grid_rows: list[dict], built: list[dict]) -> list[dict]:
    """Each --with row's top-1 beside the grid's top-1 interpolated at its latency relative to the original
    (1 / speedup: equal latency) and at its MACs (equal MACs); None where no two grid rows bracket it. Empty when
    the rows carry no top-1."""
    scored = [r for r in grid_rows if _top1(r) is not None]
    out = []
    for b in built:
        if _top1(b) is None or not scored:
            continue
        rel = 1 / b["speedup"]
        out.append({"name": b["name"], "top1": _top1(b), "relative_p50": rel, "macs": b["macs"],
                    "grid_top1_at_equal_latency": interpolate(rel, [(1 / r["speedup"], _top1(r)) for r in scored]),
                    "grid_top1_at_equal_macs": interpolate(b["macs"], [(r["macs"], _top1(r)) for r in scored])})
    return out


def table(bench: dict) -> list[str]:
    """The Markdown table alone (the CLI prints it): the original first, then the variants in grid order."""
    keys = list(bench["grid"])
    built = bench.get("with", [])
    rows = [bench["original"], *bench["variants"], *built]
    by_repeat = bench["protocol"].get("repeats", 1) > 1
    has_acc = any(r["accuracy"] for r in rows)
    acc_head = ["top-1 %" if rows[0]["accuracy"] is None or rows[0]["accuracy"]["metric"] == "top1_percent"
                else rows[0]["accuracy"]["metric"]] if has_acc else []
    head = ["variant", *keys, "precision", "params", "MACs", "MACs cut", *acc_head, "p50 ms", "p90 ms", "speedup",
            "speedup by round", *(["speedup by repeat"] if by_repeat else []), "parity max abs diff"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, r in enumerate(rows):
        from_report = i > len(bench["variants"])  # a --with build: its top-1 is its own report's
        over = [str(r["overrides"].get(k, "-")) for k in keys]
        parity = "-" if r["parity_max_abs_err"] is None else f"{r['parity_max_abs_err']:.1e}"
        acc = _accuracy(r["accuracy"]) + (" (its report.json)" if from_report and r["accuracy"] else "")
        cells = [r["name"] + (" (--with)" if from_report else ""), *over, r["precision"], _count(r["params"]),
                 _count(r["macs"]), f"{100 * r['macs_cut']:.1f}%", *([acc] if has_acc else []),
                 f"{r['p50_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['speedup']:.2f}x", _rounds(r),
                 *([_rounds(r, "speedup_repeats")] if by_repeat else []), parity]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def equal_section(bench: dict) -> list[str]:
    """bench.md's comparison of the --with builds with the grid at equal latency and equal MACs (empty without)."""
    points = bench.get("equal")
    if not points:
        return []

    def cell(y):
        return "outside the grid" if y is None else f"{y:.2f}"

    lines = ["## --with builds against the grid at equal latency and equal MACs", "",
             "Each --with build's top-1 (from its report.json) beside the grid variants' top-1, linearly interpolated "
             "between the two variants that bracket the build in p50 relative to the original's (equal latency) "
             "and in MACs (equal MACs); \"outside the grid\" where no two variants bracket it.", "",
             "| build | top-1 % | p50 / original's | grid top-1 at equal latency | MACs | grid top-1 at equal MACs |",
             "|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['name']} | {p['top1']:.2f} | {p['relative_p50']:.3f} | "
                     f"{cell(p['grid_top1_at_equal_latency'])} | {_count(p['macs'])} | "
                     f"{cell(p['grid_top1_at_equal_macs'])} |")
    return lines + [""]


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
    repeats = p.get("repeats", 1)
    again = (f" The run was repeated {repeats} times, the order reversed every other time: p50 and p90 are the "
             "medians over the repeats, speedup the median of each repeat's ratio, by repeat its range."
             if repeats > 1 else "")
    built = (" A row marked --with is an existing build folder timed in the same run; its MACs, params, parity and "
             "top-1 come from its report.json, and bench.json names its folder (`dir`)." if bench.get("with") else "")
    lines = [f"# dfp-deploy bench: {bench['model']}", ""]
    if bench.get("command"):
        lines += ["```", bench["command"], "```", ""]
    lines += [f"{t['backend']}, batch {t['batch']}, threads {threads}: the original (fp32) and every variant timed "
              f"in one run, {p['runs']} runs each in {p['rounds']} interleaved rounds (rotating order) after "
              f"{p['warmup']} warm-up calls; speedup = the original's p50 / the variant's p50 in that run, by round "
              f"= the lowest and highest ratio of the rounds' medians.{again}{built}"
              f"{_split(bench['original']['accuracy'])}", ""]
    lines += table(bench)
    lines += ["", f"Machine: {machine}; {env.get('platform', '')}; Python {env.get('python', '?')}; {versions}; "
              f"dfp-deploy {bench.get('dfp_deploy_version', '?')}. Each variant's build (report.json, plan.json, "
              "engine graph) is in the folder named in the first column.", ""]
    lines += equal_section(bench)
    return "\n".join(lines)
