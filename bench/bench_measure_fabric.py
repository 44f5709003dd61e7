"""How search wall time scales with measurement workers, on a simulated target of known latency (no sleeping, so the
result does not depend on the machine's load).

The real search loop (search/loop.py) runs on the ResNet-56 search space with batch = workers, and every candidate
is timed through the real CandidateTimer and latency protocol; only the target is simulated:
- each engine's runner returns its device time (ms), t(keep) = T0 · (0.2 + 0.8 · MACs(keep) / MACs(1)), as a
  GPU backend's CUDA-event runner does (measure/latency.py `_time_block`);
- a worker's clock advances by the build time plus the device time its interleaved run reported; queued candidates
  go to the worker that frees up first, as RayMeasurer hands them to idle actors;
- the host scores each candidate in turn (`--score-s` each, the ~1.5 s a ResNet-56 proxy costs on an idle CPU core,
  docs/research/search.md), then times the batch's candidates concurrently.
Simulated wall = Σ over batches (scoring + the batch's timing makespan). The proxy is a fixed quadratic of the keep
ratios (as in tests/test_search.py), so the best reward shows what batching costs the search itself.

    python bench/bench_measure_fabric.py --workers 1 2 4 8 --episodes 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dfp_deploy.analysis import analyze
from dfp_deploy.measure import Candidate, CandidateTimer, TargetSpec, time_interleaved
from dfp_deploy.models import load_model
from dfp_deploy.search import build_space, run_search

sys.path.insert(0, str(Path(__file__).parent))
from mdtable import markdown  # noqa: E402


class SimulatedTargets:
    """A Measurer (measure/workers.py) over `n` simulated devices whose runners report known device times."""

    def __init__(self, n: int, latency, *, build_s: float, warmup: int, runs: int, rounds: int):
        self.n, self.latency, self.build_s = n, latency, build_s
        self.protocol = dict(warmup=warmup, runs=runs, rounds=rounds, batch=8, threads=1)
        self.where = f"simulated x{n}"
        self.device_s = 0.0  # simulated seconds spent timing, all workers together
        self.makespan_s = 0.0  # simulated seconds the host waited for timings

    def describe(self) -> dict:
        return {"device": "simulated", "versions": {}}

    def measure(self, candidates):
        free = [0.0] * self.n
        out = []
        for c in candidates:
            w = int(np.argmin(free))
            spent = [0.0]

            def runner(ms):
                def run():
                    spent[0] += ms
                    return ms
                return run

            runners = {"original": runner(self.latency(None)), "candidate": runner(self.latency(c.module))}
            stats = time_interleaved(runners, **self.protocol)
            free[w] += self.build_s + spent[0] / 1e3
            self.device_s += self.build_s + spent[0] / 1e3
            out.append((stats["candidate"].p50_ms, stats["original"].p50_ms))
        self.makespan_s += max(free)
        return out

    def close(self):
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--score-s", type=float, default=1.5, help="host seconds to score one candidate")
    ap.add_argument("--build-s", type=float, default=1.0, help="seconds to build one engine on a worker")
    ap.add_argument("--t0-ms", type=float, default=23.79, help="the original's p50 (ResNet-56, batch 8, 1 thread)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)  # random weights, but the same ones every run: the agent's state depends on them

    loaded = load_model("cifar_resnet56", None)
    one = torch.zeros(1, *loaded.input_shape)
    space = build_space(loaded.module, analyze(loaded.module, one), one, min_keep=0.2, round_to=4)
    full = space.terms.macs_at(np.ones(space.size))
    w = np.random.default_rng(1).uniform(0.1, 2.0, space.size)

    def latency(keep):
        return args.t0_ms if keep is None else args.t0_ms * (0.2 + 0.8 * space.terms.macs_at(keep) / full)

    rows = []
    for n in args.workers:
        sim = SimulatedTargets(n, latency, build_s=args.build_s, warmup=args.warmup, runs=args.runs,
                               rounds=args.rounds)
        spec = TargetSpec("simulated", "fp32", 8, 1, np.zeros(1, np.float32), warmup=args.warmup, runs=args.runs,
                          rounds=args.rounds)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "original.onnx").write_bytes(b"simulated")
            timer = CandidateTimer(sim, Path(tmp) / "original.onnx", spec)
            scored = [0]

            def evaluate_batch(many):
                scored[0] += len(many)
                keeps = [np.asarray([1.0 - r.get(g, 0.0) for g in space.groups]) for r in many]
                ms = timer.measure_many([Candidate(Path("simulated"), k) for k in keeps])
                return [{"proxy": -float((w * (1 - k) ** 2).sum()), "latency_ms": m} for k, m in zip(keeps, ms)]

            cpu0, wall0 = time.process_time(), time.perf_counter()
            result = run_search(space, None, episodes=args.episodes, warmup=args.episodes // 4, seed=args.seed,
                                target=0.5, log_path=Path(tmp) / "log.jsonl", progress=False, batch=n,
                                evaluate_batch=evaluate_batch, target_ms=0.5 * args.t0_ms, penalty=10.0,
                                plot_path=Path(tmp) / "p.png")
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        simulated = scored[0] * args.score_s + sim.makespan_s
        rows.append([n, n, scored[0], f"{scored[0] * args.score_s:.0f}", f"{sim.device_s:.0f}",
                     f"{sim.makespan_s:.0f}", f"{simulated:.0f}", None, f"{result.best_reward:.4f}",
                     f"{cpu:.1f}", f"{wall:.1f}"])
    base = float(rows[0][6])
    for r in rows:
        r[7] = f"{base / float(r[6]):.2f}x"
    print(markdown(["workers", "batch", "candidates timed", "scoring s", "device s (all workers)", "timing makespan s",
                 "simulated wall s", "speedup", "best reward", "loop CPU s (real)", "loop wall s (real)"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
