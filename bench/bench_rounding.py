"""Benchmark: realized ORT-CPU speedup ÷ MAC reduction of pipeline builds that differ only in their channel multiple.

  python bench/bench_rounding.py --reference /tmp/fab/r56/int8_orig --builds /tmp/fab/r56/int8_r4 /tmp/fab/r56/int8_fp \
      --threads 1 --runs 100 --rounds 10 --repeats 3 [--profile 20]

Every folder is a `dfp-deploy build` output (measure.latency=false is enough). The reference is an unpruned build at
the same precision (`--set compress.prune.ratio=0`), or, for fp32, any build's original.onnx (--reference-original).
Each build's shipped engine (report.json artifacts.onnx) and the reference are timed on ORT CPU in ONE interleaved
schedule (measure/latency.py), --repeats times with the engine order reversed every other time; "rel." is the median
over repeats of p50 / p50 of the reference in the same repeat, its range the per-repeat min-max. Speedup = 1 / rel.,
MAC cut = reference MACs / build MACs, realized = speedup / MAC cut (1.0: latency falls as fast as MACs). Top-1 and
the channel multiple (and where it came from) are read from each build's report.json.

--profile N: also run each engine N times under ONNX Runtime's profiler (nodes of its optimized graph, matched by
name) and print, per convolution, each build's kept channels and its time and MACs as fractions of the reference's
(a conv whose time fraction is above its MAC fraction is where the realized ratio is lost), then conv and other
ops (reorders, adds, pads) in total.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from dfp_deploy.backends import get_backend
from dfp_deploy.measure import time_interleaved


def engine_onnx(folder: Path, original: bool = False) -> Path:
    rep = json.loads((folder / "report.json").read_text())
    return folder / rep["artifacts"]["original_onnx" if original else "onnx"]


def describe(folder: Path) -> dict:
    rep = json.loads((folder / "report.json").read_text())
    top1 = (rep.get("accuracy") or {}).get("after")  # the shipped engine's top-1 on eval.data
    rnd = rep["prune"].get("round_to") or {}
    return {"macs": rep["macs"]["after"], "macs_before": rep["macs"]["before"], "top1": top1,
            "round_to": rnd.get("value") if rep["prune"].get("groups_pruned") else None, "source": (rnd.get("source") or "").split(" ")[0],
            "precision": rep["recipe"]["target"]["precision"], "batch": rep["recipe"]["target"]["batch"],
            "input_shape": rep["model"]["input_shape"]}


def profile(path: Path, x: np.ndarray, threads: int, runs: int, tmp: Path) -> dict[str, dict]:
    """Every node of ORT's optimized graph by name: op, median µs per run, and for convolutions the channels
    (in, out) and MACs per image from the shapes the profiler records."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp / path.stem)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for _ in range(runs + 5):
        sess.run(None, {name: x})
    trace = json.loads(Path(sess.end_profiling()).read_text())
    durations: dict[str, list[float]] = defaultdict(list)
    nodes: dict[str, dict] = {}
    for e in trace:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        node = e["name"][: -len("_kernel_time")]
        durations[node].append(float(e["dur"]))
        if node not in nodes:
            args = e.get("args", {})
            info = {"op": args.get("op_name", "?")}
            shapes = [next(iter(d.values())) for d in args.get("input_type_shape", [])]
            out = [next(iter(d.values())) for d in args.get("output_type_shape", [])]
            w = shapes[3] if info["op"] == "QLinearConv" and len(shapes) > 3 else (shapes[1] if len(shapes) > 1
                                                                                    else None)
            if info["op"] == "QLinearConv" and w and len(w) == 1 and out and len(out[0]) == 4:
                # ORT's int8 convs run NHWC with prepacked weights: the profile has the channels, not the kernel, so
                # MACs here assume a dense conv (c_in · c_out · H · W, kernel area left out): fractions of the same
                # node are exact for dense convs, not for depthwise ones
                n, h, wd, cin = shapes[0]
                info.update(cin=cin, cout=out[0][3], macs=float(cin * out[0][3] * out[0][1] * out[0][2]))
            elif info["op"] in ("Conv", "FusedConv") and w and len(w) == 4 and out and len(out[0]) == 4:
                groups = max(1, shapes[0][1] // w[1]) if shapes and len(shapes[0]) == 4 and w[1] else 1
                info.update(cin=w[1] * groups, cout=w[0],
                            macs=float(w[0] * w[1] * w[2] * w[3] * out[0][2] * out[0][3]))
            nodes[node] = info
    # the first five calls were warm-up; the median resists the load's preemptions
    return {n: {**nodes[n], "us": float(np.median(d[5:] or d))} for n, d in durations.items()}


def print_profiles(profiles: dict[str, dict], builds: list[str], runs: int) -> None:
    """Where the realized ratio is lost: per convolution of the reference (slowest first), each build's kept
    channels, time and MACs as fractions of the reference's; then conv and non-conv time in total."""
    ref = profiles["reference"]
    convs = sorted((n for n, d in ref.items() if "macs" in d), key=lambda n: -ref[n]["us"])
    print(f"\n## Per convolution ({runs} profiled runs, median µs): build time / reference time, build MACs / "
          "reference MACs\n")
    print("| conv (reference in→out) | reference µs | " + " | ".join(f"{b}: in→out, time, MACs" for b in builds)
          + " |\n|---|---|" + "---|" * len(builds))
    for n in convs:
        cells = []
        for b in builds:
            d = profiles[b].get(n)
            if d is None or "macs" not in d:
                cells.append("-")
                continue
            cells.append(f"{d['cin']}→{d['cout']}, {d['us'] / ref[n]['us']:.2f}, {d['macs'] / ref[n]['macs']:.2f}")
        print(f"| {n} ({ref[n]['cin']}→{ref[n]['cout']}) | {ref[n]['us']:.0f} | " + " | ".join(cells) + " |")
    print("\n| engine | conv µs | conv MACs per image (M) | other ops µs | conv time / reference | conv MACs / reference |"
          " other ops time / reference |\n|---|---|---|---|---|---|---|")
    def split(p):
        conv = sum(d["us"] for d in p.values() if "macs" in d)
        return conv, sum(d.get("macs", 0.0) for d in p.values()), sum(d["us"] for d in p.values()) - conv
    rc, rm, ro = split(ref)
    if not (rc and rm and ro):
        print("\n(no convolution found in the reference's profile)")
        return
    for name in ["reference", *builds]:
        c, m, o = split(profiles[name])
        print(f"| {name} | {c:.0f} | {m / 1e6:.2f} | {o:.0f} | {c / rc:.2f} | {m / rm:.2f} | {o / ro:.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reference", required=True, help="unpruned build folder at the builds' precision")
    ap.add_argument("--reference-original", action="store_true",
                    help="time the reference folder's original.onnx (fp32) instead of its engine")
    ap.add_argument("--builds", nargs="+", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", type=int, default=0, help="profiled runs per engine for the per-conv table (0: off)")
    args = ap.parse_args(argv)

    ref_dir = Path(args.reference)
    info = {"reference": describe(ref_dir)}
    ref = info["reference"]
    if args.reference_original:
        ref.update(macs=ref["macs_before"], top1=None, round_to=None, source="original", precision="fp32")
    paths = {"reference": engine_onnx(ref_dir, original=args.reference_original)}
    for folder in map(Path, args.builds):
        info[folder.name], paths[folder.name] = describe(folder), engine_onnx(folder)
    precision = {d["precision"] for n, d in info.items() if n != "reference"}
    batch = ref["batch"]
    x = np.random.default_rng(0).standard_normal((batch, *ref["input_shape"])).astype(np.float32)
    backend = get_backend("ort-cpu")
    with tempfile.TemporaryDirectory() as tmp:
        runners = {}
        for name, path in paths.items():
            p = info[name]["precision"]
            engine = backend.build(path, precision=p, threads=args.threads, out_dir=Path(tmp))
            runners[name] = engine.prepare(x)
        reps = []
        for k in range(args.repeats):
            order = list(runners)[::-1 if k % 2 else 1]
            reps.append(time_interleaved({n: runners[n] for n in order}, warmup=10, runs=args.runs,
                                         rounds=args.rounds, batch=batch, threads=args.threads,
                                         progress=sys.stderr.isatty()))
        profiles = ({n: profile(p, x, args.threads, args.profile, Path(tmp)) for n, p in paths.items()}
                    if args.profile else None)

    print(f"# ORT CPU, {'/'.join(sorted(precision))} builds against {ref_dir.name}"
          f"{' (original.onnx)' if args.reference_original else ''}, batch {batch}, {args.threads} thread(s), "
          f"{args.runs} runs per engine in {args.rounds} interleaved rounds, {args.repeats} repeats\n")
    print("| engine | precision | channel multiple (source) | MACs (M) | MAC cut | p50 ms | rel. p50 (range) | speedup "
          "| realized ÷ MAC cut | top-1 |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, d in info.items():
        rel = [rep[name].p50_ms / rep["reference"].p50_ms for rep in reps]
        p50 = float(np.median([rep[name].p50_ms for rep in reps]))
        cut = ref["macs"] / d["macs"]
        r = float(np.median(rel))
        top1 = f"{d['top1']:.2f}" if isinstance(d["top1"], (int, float)) else "-"
        multiple = f"{d['round_to']} ({d['source']})" if d["round_to"] else "-"
        print(f"| {name} | {d['precision']} | {multiple} | {d['macs'] / 1e6:.2f} | {cut:.2f}x | {p50:.2f} | "
              f"{r:.3f} ({min(rel):.3f}-{max(rel):.3f}) | {1 / r:.2f}x | {1 / r / cut:.2f} | {top1} |")

    if profiles:
        print_profiles(profiles, [n for n in info if n != "reference"], args.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
