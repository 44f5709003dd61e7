"""Benchmark int8 Q/DQ engines against fp32 on ONNX Runtime CPU: top-1, agreement with fp32, interleaved latency.

Engines (CIFAR ResNet-56 by default):
  fp32            the project's export (export_onnx, dynamic batch)
  int8-df         ort-cpu style Q/DQ, data-free ranges from the BN-kept export (k = ranges.DEFAULT_K unless --k)
  int8-cal        ort-cpu style Q/DQ, min/max ranges from --calib-samples training images
                  (both with prepare_int8_onnx's default reduce_range: 7-bit weights on x86 without VNNI)
  int8-df-w8, int8-cal-w8   the same with full 8-bit weights (accuracy only: shows the u8 x s8 saturation)
  trt-style-df, trt-style-cal   tensorrt style Q/DQ (symmetric int8, no Q on outputs, 8-bit weights), on ORT CPU
  ort-qstatic     ONNX Runtime's own quantize_static (QDQ, per-channel S8 weights, U8 activations, MinMax),
                  calibrated on the same images: the peer; ort-qstatic-rr with its reduce_range=True
"as written": the same int8 graph run with ORT's graph optimizations off, i.e. the Q/DQ arithmetic as ONNX defines
it, without the integer kernels' own effects (u8 x s8 saturation on AVX2 without VNNI).
Latency: every engine runs once per round, rounds repeated (--runs), so load changes on this shared machine hit
all engines alike; median and p90 per engine and batch. Accuracy on --test (exact CIFAR-10 test images).

    python bench/bench_int8_cpu.py --threads 1 --runs 60 --out /tmp/bench_int8.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from dfp_deploy.export import (DEFAULT_K, calibration_ranges, data_free_ranges, default_reduce_range, export_onnx,
                               prepare_int8_onnx)
from dfp_deploy.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_root import add_data_root, fill  # noqa: E402  (bench/data_root.py)

INTEGER_KERNELS = ("QLinearConv", "QLinearAdd", "QGemm", "QLinearGlobalAveragePool", "QLinearMatMul",
                   "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear")


def preprocess_images(path: str, preprocess, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(path)
    x, y = data["x"][:limit], data["y"][:limit]
    mean = np.asarray(preprocess.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(preprocess.std, np.float32).reshape(1, 3, 1, 1)
    nchw = x.transpose(0, 3, 1, 2).astype(np.float32)
    return (nchw - mean) / std, y.astype(np.int64)


def input_range(preprocess) -> tuple[np.ndarray, np.ndarray]:
    mean, std = np.asarray(preprocess.mean), np.asarray(preprocess.std)
    return (0.0 - mean) / std, (255.0 - mean) / std


def export_bn_kept(module, example, path: Path) -> None:
    """The dynamo export without the onnxscript optimizer: BN stays, tensor names match the optimized export."""
    torch.onnx.export(module, (example,), str(path), dynamo=True, optimize=False, input_names=["input"],
                      output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
                      report=False)


class _Reader:
    def __init__(self, x: np.ndarray, name: str, batch: int = 64):
        self.batches = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)


def ort_quantize_static(fp32: Path, out: Path, calib_x: np.ndarray, reduce_range: bool) -> Path:
    """The peer, used as its documentation advises: quant_pre_process first, then quantize_static."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_name(out.stem + ".pre.onnx")
    quant_pre_process(str(fp32), str(prepared))
    # Small calibration batches bound the memory. The calibrator keeps only per-batch ReduceMin/ReduceMax scalars;
    # what grows is its own session's activation arena (graph optimizations off), ~100 MB per 224x224 image on
    # EfficientNet-Lite0: 7.7 GB peak with batches of 64 (the OOM in the Lite0 peers run), 1.7 GB with 8. MinMax
    # ranges do not depend on the batching: the quantized models are byte-identical (ResNet-56 64 vs 8, Lite0 32 vs 8).
    # Not CalibMaxIntermediateOutputs: ORT 1.32's MinMaxCalibrater.collect_data discards the collected outputs when
    # that count is reached instead of merging them into the ranges (512 images in batches of 64 with N = 1 raise
    # "No data is collected").
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(calib_x, "input", batch=8)
    quantize_static(str(prepared), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return out


def session(path: Path, threads: int, optimized_to: Path | None = None, optimize: bool = True):
    """An ORT CPU session; optimize=False runs the graph as written (Q/DQ as float simulation, ONNX semantics)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    if optimized_to is not None:
        options.optimized_model_filepath = str(optimized_to)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def kernel_counts(path: Path, work: Path) -> dict[str, int]:
    optimized = work / f"{path.stem}.optimized.onnx"
    session(path, 1, optimized)
    ops = collections.Counter(n.op_type for n in onnx.load(str(optimized)).graph.node)
    return {op: ops[op] for op in (*INTEGER_KERNELS, "Conv", "FusedConv", "DequantizeLinear", "QuantizeLinear")
            if ops[op]}


def predictions(sess, x: np.ndarray, batch: int = 100) -> np.ndarray:
    return np.concatenate([sess.run(None, {"input": x[i:i + batch]})[0].argmax(1) for i in range(0, len(x), batch)])


def interleaved_latency(sessions: dict, batch: int, runs: int, warmup: int, seed: int = 0) -> dict[str, dict]:
    """Median/p90/min of `runs` timed calls per engine; each round times every engine once, in a shuffled order."""
    x = np.random.default_rng(seed).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, {"input": x})
    times = {name: [] for name in sessions}
    order = list(sessions)
    rng = np.random.default_rng(seed)
    for _ in range(runs):
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            sessions[name].run(None, {"input": x})
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: {"p50_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)), "min_ms": float(np.min(t)),
                   "runs": len(t)} for name, t in times.items()}


def build_engines(args, work: Path, log) -> tuple[dict[str, Path], dict]:
    loaded = load_model(args.model, args.weights)
    example = torch.zeros(1, *loaded.input_shape)
    fp32 = work / "fp32.onnx"
    export_onnx(loaded.module, example, fp32, dynamic_batch=True)
    bn_kept = work / "fp32_bn.onnx"
    export_bn_kept(loaded.module, example, bn_kept)
    calib_x, _ = preprocess_images(args.calib, loaded.preprocess, args.calib_samples)
    t = time.perf_counter()
    free = data_free_ranges(bn_kept, input_range(loaded.preprocess), k=args.k)
    log(f"data-free ranges: {len(free)} tensors in {time.perf_counter() - t:.2f} s (k={args.k})")
    t = time.perf_counter()
    calib = calibration_ranges(fp32, calib_x, threads=args.threads)
    log(f"calibration ranges: {len(calib)} tensors from {len(calib_x)} images in {time.perf_counter() - t:.2f} s")
    engines = {"fp32": fp32}
    for name, style, ranges, reduce_range in (("int8-df", "ort-cpu", free, None),
                                              ("int8-cal", "ort-cpu", calib, None),
                                              ("int8-df-w8", "ort-cpu", free, False),
                                              ("int8-cal-w8", "ort-cpu", calib, False),
                                              ("trt-style-df", "tensorrt", free, None),
                                              ("trt-style-cal", "tensorrt", calib, None)):
        engines[name] = prepare_int8_onnx(fp32, work / f"{name}.onnx", style=style, ranges=ranges,
                                          reduce_range=reduce_range)
    for name, reduce_range in (("ort-qstatic", False), ("ort-qstatic-rr", True)):
        engines[name] = ort_quantize_static(fp32, work / f"{name}.onnx", calib_x, reduce_range)
    return engines, {"preprocess": str(loaded.preprocess), "calib_images": len(calib_x),
                     "default_reduce_range_ort_cpu": default_reduce_range("ort-cpu")}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar_resnet56")
    add_data_root(parser)
    parser.add_argument("--weights", default=None, help="default: models/resnet56-4bfd9763.th under --data-root")
    parser.add_argument("--test", default=None, help="default: data/cifar10_test_exact932.npz under --data-root")
    parser.add_argument("--calib", default=None, help="default: data/cifar10_train_exact4660.npz under --data-root")
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--k", type=float, default=DEFAULT_K)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--latency-engines", default="fp32,int8-df,int8-cal,trt-style-cal,ort-qstatic")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--work", default=None, help="keep the ONNX files here (default: a temp dir)")
    args = fill(parser.parse_args(argv), {"weights": "models/resnet56-4bfd9763.th",
                                          "test": "data/cifar10_test_exact932.npz",
                                          "calib": "data/cifar10_train_exact4660.npz"})
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        engines, meta = build_engines(args, work, log)
        loaded = load_model(args.model, args.weights)
        test_x, test_y = preprocess_images(args.test, loaded.preprocess)
        result = {"env": {"cpu": cpu_name(), "threads": args.threads,
                          "load_avg_start": os.getloadavg(), "onnxruntime": __import__("onnxruntime").__version__,
                          "test": args.test, "test_images": len(test_y), **meta}, "engines": {}}
        sessions = {name: session(path, args.threads) for name, path in engines.items()}
        reference = predictions(sessions["fp32"], test_x)
        for name, path in engines.items():
            pred = predictions(sessions[name], test_x)
            # the same graph without ORT's rewrites: what the Q/DQ graph means (and what TensorRT should compute),
            # separating quantization error from the CPU kernels' own (e.g. u8 x s8 saturation)
            as_written = predictions(session(path, args.threads, optimize=False), test_x) if name != "fp32" else pred
            result["engines"][name] = {"top1": float((pred == test_y).mean() * 100),
                                       "agree_with_fp32": float((pred == reference).mean() * 100),
                                       "top1_as_written": float((as_written == test_y).mean() * 100),
                                       "agree_with_fp32_as_written": float((as_written == reference).mean() * 100),
                                       "optimized_ops": kernel_counts(path, work),
                                       "size_kb": round(path.stat().st_size / 1024, 1)}
            e = result["engines"][name]
            log(f"{name:14s} top1 {e['top1']:.2f} agree {e['agree_with_fp32']:.2f} | as written: top1 "
                f"{e['top1_as_written']:.2f} agree {e['agree_with_fp32_as_written']:.2f} | {e['optimized_ops']}")
        timed = {n: sessions[n] for n in args.latency_engines.split(",")}
        for batch in (int(b) for b in args.batches.split(",")):
            stats = interleaved_latency(timed, batch, args.runs, args.warmup)
            for name, s in stats.items():
                s["speedup_vs_fp32"] = stats["fp32"]["p50_ms"] / s["p50_ms"]
                result["engines"][name][f"latency_b{batch}"] = s
                log(f"batch {batch} {name:14s} p50 {s['p50_ms']:.2f} ms  p90 {s['p90_ms']:.2f} ms  "
                    f"x{s['speedup_vs_fp32']:.2f}")
        result["env"]["load_avg_end"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
