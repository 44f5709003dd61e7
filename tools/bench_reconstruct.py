"""Benchmark data-free reconstruction on a CIFAR ResNet: pruning × reconstruction × weight bits, and quantization alone.

Sections (--sections, comma separated):
  tune    hyper-parameter sweeps (UDFC α, α', multi-channel form; lmmse rounding, bias correction, spatial ρ; NM t),
          on TUNING images only: the first --tune-train exact training images plus JPEG test images
          [--jpeg-start, --jpeg-start + --tune-jpeg) (relative numbers only; disjoint from the exact test images)
  prune   top-1 on the exact test images for ratio × channel selection × method × weight bits (block-internal
          groups only, as make_plan does by default); selection "l2"/"group_l2" = make_plan's rankings,
          "lmmse-u" = select_plan(budget="uniform"), "lmmse-macs" = select_plan(budget="macs") (same MACs removed
          as the uniform plan, allocated across blocks)
  quant   top-1 for weight quantization alone: round-to-nearest, + bias correction, + Hessian rounding, UDFC, lmmse

    python tools/bench_reconstruct.py --sections tune            # choose defaults (never looks at the test images)
    python tools/bench_reconstruct.py --sections prune,quant     # the tables for docs/BENCHMARKS.md

Single-threaded by default (--threads 1): other jobs share the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dfp_deploy.analysis import analyze, count_macs
from dfp_deploy.compress import reconstruct as R
from dfp_deploy.compress.plan import make_plan
from dfp_deploy.core.types import PrunePlan
from dfp_deploy.measure.dataset import to_tensor
from dfp_deploy.models import load_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
METHOD_LABEL = {"none": "plain", "neuron_merging": "NM", "udfc": "UDFC", "lmmse": "lmmse"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cifar_resnet56")
    ap.add_argument("--weights", default=str(SHARED / "models" / "resnet56-4bfd9763.th"))
    ap.add_argument("--test", default=str(SHARED / "data" / "cifar10_test_exact932.npz"))
    ap.add_argument("--train", default=str(SHARED / "data" / "cifar10_train_exact4660.npz"))
    ap.add_argument("--jpeg", default=str(SHARED / "data" / "cifar10_test.npz"))
    ap.add_argument("--tune-train", type=int, default=1000)
    ap.add_argument("--tune-jpeg", type=int, default=3000)
    ap.add_argument("--jpeg-start", type=int, default=5000)
    ap.add_argument("--ratios", default="0.1,0.3,0.5")
    ap.add_argument("--bits", default="32,8,6,4", help="32 = float weights")
    ap.add_argument("--quant-bits", default="8,6,4,3")
    ap.add_argument("--sections", default="prune,quant")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write all numbers as JSON here")
    return ap.parse_args(argv)


class Evaluator:
    """Top-1 on one or more labelled image sets (float NCHW tensors, already preprocessed)."""

    def __init__(self, sets: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.sets = sets

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        model.eval()
        out = {}
        for name, (x, y) in self.sets.items():
            correct = sum(int((model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum()) for i in range(0, len(x), 500))
            out[name] = 100.0 * correct / len(x)
        return out


def load_set(path: str, preprocess, start: int = 0, count: int | None = None):
    data = np.load(path)
    end = None if count is None else start + count
    if "x" in data.files:
        x = data["x"][start:end]
    else:  # JPEG layout of the full test set
        from dfp_deploy.measure.dataset import load_images

        x, _ = load_images(path, preprocess, limit=end)
        x = x[start:]
    y = data["y"][start:end]
    return torch.from_numpy(to_tensor(np.ascontiguousarray(x), preprocess)), torch.from_numpy(y.astype(np.int64))


def fmt(v: float) -> str:
    return f"{v:.2f}"


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


class Bench:
    def __init__(self, args):
        torch.set_num_threads(args.threads)
        self.args = args
        loaded = load_model(args.model, args.weights)
        self.model, self.pre = loaded.module.eval(), loaded.preprocess
        self.example = torch.zeros(1, *loaded.input_shape)
        self.analysis = analyze(self.model, self.example)
        self.base_macs = count_macs(self.model, self.example)
        self.results: dict = {"model": args.model, "base_macs": self.base_macs}
        self._plans: dict = {}

    def macs_cut(self, model) -> float:
        return 100.0 * (1 - count_macs(model, self.example) / self.base_macs)

    def plan(self, ratio: float, selection: str) -> PrunePlan:
        key = (ratio, selection)
        if key not in self._plans:
            if selection in ("l2", "group_l2", "bn_l2"):
                self._plans[key] = make_plan(self.model, self.analysis, ratio=ratio, importance=selection)
            else:
                budget = {"lmmse-u": "uniform", "lmmse-macs": "macs"}[selection]
                self._plans[key], _ = R.select_plan(self.model, self.analysis, ratio=ratio, budget=budget)
        return self._plans[key]

    def run(self, evaluate, plan, method, bits, **kw) -> tuple[dict, float]:
        model = R.compress_model(self.model, self.analysis, plan, method=method,
                                 weight_bits=None if bits == 32 else bits, **kw)
        return evaluate(model), self.macs_cut(model)

    # ------------------------------------------------------------------------------------------------ tune
    def tune(self):
        a = self.args
        ev = Evaluator({"train": load_set(a.train, self.pre, 0, a.tune_train),
                        "jpeg": load_set(a.jpeg, self.pre, a.jpeg_start, a.tune_jpeg)})
        base = ev(self.model)
        print(f"\n## Tuning (train {a.tune_train} exact / JPEG test {a.jpeg_start}..{a.jpeg_start + a.tune_jpeg}); "
              f"fp32: train {fmt(base['train'])}, JPEG {fmt(base['jpeg'])}\n")
        rows, record = [], []

        def go(label, plan, method, bits, **kw):
            t = time.time()
            acc, cut = self.run(ev, plan, method, bits, **kw)
            rows.append([label, fmt(cut), fmt(acc["train"]), fmt(acc["jpeg"]), f"{time.time() - t:.0f}s"])
            record.append({"config": label, "macs_cut": cut, **acc})
            print(f"  {label}: MACs -{cut:.1f}% train {acc['train']:.2f} jpeg {acc['jpeg']:.2f}", flush=True)

        for ratio in (0.3, 0.5):
            plan = self.plan(ratio, "l2")
            for alpha in (0.0, 0.001, 0.01, 0.1, 1.0):
                go(f"UDFC prune r={ratio} l2 α={alpha}", plan, "udfc", 32, alpha=alpha)
            go(f"UDFC prune r={ratio} l2 α=0.01 multi (NNLS)", plan, "udfc", 32, alpha=0.01, multi=True)
            for t in (0.1, 0.3, 0.5):
                go(f"NM prune r={ratio} l2 t={t}", plan, "neuron_merging", 32, nm_threshold=t)
        for bits in (4, 3):
            for alpha_q in (0.001, 0.01, 0.1, 1.0, 10.0):
                go(f"UDFC quant w{bits} α'={alpha_q}", PrunePlan(), "udfc", bits, alpha_q=alpha_q)
        for bits, ratio in ((3, 0.0), (4, 0.3), (3, 0.3)):
            plan = self.plan(ratio, "lmmse-macs") if ratio else PrunePlan()
            for rounding in ("nearest", "hessian"):
                for bc in (False, True):
                    go(f"lmmse r={ratio} w{bits} rounding={rounding} bias_correction={bc}", plan, "lmmse", bits,
                       rounding=rounding, bias_correction=bc)
            for rho in (0.5, 0.9):
                go(f"lmmse r={ratio} w{bits} hessian ρ={rho}", plan, "lmmse", bits, spatial_rho=rho)
        print(markdown(["config", "MACs −%", "train top-1", "JPEG top-1", "time"], rows))
        self.results["tune"] = {"base": base, "rows": record}

    # ------------------------------------------------------------------------------------------------ prune
    def prune(self, ev):
        a = self.args
        ratios = [float(r) for r in a.ratios.split(",")]
        bits_list = [int(b) for b in a.bits.split(",")]
        methods = list(R.METHODS)
        headers = ["ratio", "selection", "MACs −%"] + [f"{METHOD_LABEL[m]} {'fp32' if b == 32 else f'w{b}'}"
                                                        for b in bits_list for m in methods]
        rows, record = [], []
        for ratio in ratios:
            for selection in ("l2", "group_l2", "lmmse-u", "lmmse-macs"):
                plan = self.plan(ratio, selection)
                full = selection in ("l2", "lmmse-macs")
                cells, cut = [], None
                for bits in bits_list:
                    for method in methods:
                        if not full and bits != 32:
                            cells.append("")
                            continue
                        acc, cut = self.run(ev, plan, method, bits)
                        cells.append(fmt(acc["test"]))
                        record.append({"ratio": ratio, "selection": selection, "method": method, "bits": bits,
                                       "macs_cut": cut, "top1": acc["test"]})
                        print(f"  r={ratio} {selection} {method} w{bits}: {acc['test']:.2f} (MACs -{cut:.1f}%)",
                              flush=True)
                rows.append([str(ratio), selection, fmt(cut)] + cells)
        print("\n## Pruning (top-1 %, exact test images)\n")
        print(markdown(headers, rows))
        self.results["prune"] = record

    # ------------------------------------------------------------------------------------------------ quant
    def quant(self, ev):
        configs = [("RTN", "none", {}), ("RTN + bias corr.", "none", {"bias_correction": True}),
                   ("Hessian rounding + bias corr.", "none", {"rounding": "hessian", "bias_correction": True}),
                   ("UDFC", "udfc", {}), ("UDFC + bias corr.", "udfc", {"bias_correction": True}),
                   ("lmmse (Hessian + bias corr.)", "lmmse", {})]
        bits_list = [int(b) for b in self.args.quant_bits.split(",")]
        rows, record = [], []
        for label, method, kw in configs:
            cells = []
            for bits in bits_list:
                acc, _ = self.run(ev, PrunePlan(), method, bits, **kw)
                cells.append(fmt(acc["test"]))
                record.append({"config": label, "bits": bits, "top1": acc["test"]})
                print(f"  {label} w{bits}: {acc['test']:.2f}", flush=True)
            rows.append([label] + cells)
        print("\n## Weight quantization alone (top-1 %, exact test images)\n")
        print(markdown(["method"] + [f"w{b}" for b in bits_list], rows))
        self.results["quant"] = record


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"tune", "prune", "quant"}
    if unknown:
        print(f"error: unknown section(s) {sorted(unknown)}; choose from tune, prune, quant", file=sys.stderr)
        return 2
    if "tune" in sections:
        bench.tune()
    if {"prune", "quant"} & set(sections):
        ev = Evaluator({"test": load_set(args.test, bench.pre)})
        base = ev(bench.model)
        bench.results["base_top1"] = base["test"]
        print(f"\n{args.model}: fp32 top-1 {base['test']:.2f} on {args.test} ({bench.base_macs / 1e6:.2f} M MACs)")
        if "prune" in sections:
            bench.prune(ev)
        if "quant" in sections:
            bench.quant(ev)
    if args.out:
        Path(args.out).write_text(json.dumps(bench.results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
