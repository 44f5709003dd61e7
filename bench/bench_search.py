"""Benchmark the AutoDFP search: does the data-free proxy rank plans like real accuracy, and does the search
find a better plan than a uniform ratio?

Sections (--sections, comma separated):
  proxy   random per-group plans (round_to and min_keep as the search uses them), some spread over a range of MAC
          budgets and some all at one budget; for every plan and every channel selection the candidate is
          compressed with --method exactly as the search does, then scored by the search's proxy (KL / top-1
          agreement to the original on the SAME cached BN-matched synthetic inputs the pipeline uses), by the
          analytical lmmse error Σ_g e_g(k_g) (compress/select/paths.py), optionally on more synthetic samples
          (--extra-synthetic), and by real top-1 (and KL to the original on the real images, a diagnostic the
          search can never see). Prints Spearman rank correlations with real top-1, over all plans and at fixed MACs.
  replay  real top-1 of the best plan in finished search logs (--replay-logs), with --search-selections' first
  search  search at --budget of the MACs (SAC with warm-up, and pure random search with the same number of
          episodes, per seed and selection), then real top-1 of every searched plan against the uniform plan with
          the same reconstruction (l2 and lmmse selection) and against select_plan(budget="macs"); all of them
          exported and timed as ORT CPU engines, interleaved (--latency-batch, --threads).

    python bench/bench_search.py --sections proxy                       # CIFAR ResNet-56
    python bench/bench_search.py --sections proxy --model efficientnet_lite0 \
        --weights ../shared/imagenet/efficientnet-lite0-57934424.pth \
        --eval ../shared/imagenet/imagenet_val1300_acuity_jpeg.npz --eval-limit 300
    python bench/bench_search.py --sections search                      # ResNet-56, -50% MACs

Single-threaded by default (--threads 1): other jobs share the machine. Synthetic inputs come from (and go to) the
pipeline's cache (~/.cache/dfp-deploy/synthetic), so the proxy here is bit-for-bit the one a recipe search uses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dfp_deploy.analysis import analyze, count_macs
from dfp_deploy.compress import LmmseSelector, make_plan
from dfp_deploy.core import PrunePlan
from dfp_deploy.data import bn_matched_inputs
from dfp_deploy.models import load_model
from dfp_deploy.search import MacCost, PruneEnv, build_space, fidelity
from data_root import add_data_root, fill  # bench/data_root.py (the script's folder is on sys.path)
from mdtable import markdown  # bench/mdtable.py


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cifar_resnet56")
    add_data_root(ap)
    ap.add_argument("--weights", default=None, help="default: models/resnet56-4bfd9763.th under --data-root")
    ap.add_argument("--eval", default=None, help="default: data/cifar10_test_exact932.npz under --data-root")
    ap.add_argument("--eval-limit", type=int, default=None, help="first N evaluation images only")
    ap.add_argument("--sections", default="proxy")
    ap.add_argument("--method", default="lmmse", help="reconstruction: none | neuron_merging | udfc | lmmse")
    ap.add_argument("--selections", default="l2,lmmse", help="channel selection(s): an importance name or lmmse")
    ap.add_argument("--round-to", type=int, default=4, help="as the pipeline on ort-cpu")
    ap.add_argument("--min-keep", type=float, default=0.2, help="advanced.search.min_keep")
    ap.add_argument("--synthetic", type=int, default=64, help="search.samples")
    ap.add_argument("--synthetic-steps", type=int, default=50, help="advanced.search.synthetic_steps")
    ap.add_argument("--extra-synthetic", type=int, default=0, help="also score on this many synthetic samples")
    ap.add_argument("--seed", type=int, default=0, help="recipe seed (synthetic inputs)")
    ap.add_argument("--no-lmmse-paths", dest="lmmse_paths", action="store_false",
                    help="skip the lmmse elimination paths (no lmmse selection, no analytical error)")
    # proxy
    ap.add_argument("--spread-plans", type=int, default=24)
    ap.add_argument("--spread", default="0.4,0.8", help="kept-MACs fractions the spread plans are drawn from")
    ap.add_argument("--fixed-plans", type=int, default=20)
    ap.add_argument("--fixed", type=float, default=0.5, help="kept-MACs fraction of the fixed plans")
    ap.add_argument("--plan-seed", type=int, default=123)
    # search
    ap.add_argument("--budget", type=float, default=0.5, help="kept fraction of the MACs")
    ap.add_argument("--episodes", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=15)
    ap.add_argument("--search-seeds", default="0,1")
    ap.add_argument("--agents", default="sac,random")
    ap.add_argument("--no-fill", dest="fill", action="store_false",
                    help="no budget floor in the environment (plans may end under the budget)")
    ap.add_argument("--proxy-metric", default="kl", help="kl | top1 | lmmse_error")
    ap.add_argument("--search-selections", default="lmmse,l2")
    ap.add_argument("--replay-logs", default="", help="replay section: search logs (comma separated)")
    ap.add_argument("--latency-batch", type=int, default=8)
    ap.add_argument("--latency-runs", type=int, default=50)
    ap.add_argument("--latency-rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--log-dir", default="/tmp/bench_search")
    ap.add_argument("--out", default=None, help="write all numbers as JSON here")
    return fill(ap.parse_args(argv), {"weights": "models/resnet56-4bfd9763.th",
                                      "eval": "data/cifar10_test_exact932.npz"})


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dfp-deploy" / "synthetic"  # pipeline.cache_dir() / "synthetic"


def spearman(a, b) -> float:
    """Spearman's ρ: Pearson correlation of the ranks (ties get their average rank)."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    if len(ra) < 3 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for value in np.unique(x):
        tied = x == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


class Bench:
    def __init__(self, args):
        from dfp_deploy.data import load_images, to_tensor

        torch.set_num_threads(args.threads)
        self.args = args
        loaded = load_model(args.model, args.weights)
        self.loaded, self.model = loaded, loaded.module.eval()
        self.one = torch.zeros(1, *loaded.input_shape)
        self.analysis = analyze(self.model, self.one)
        self.base_macs = count_macs(self.model, self.one)
        self.space = build_space(self.model, self.analysis, self.one, min_keep=args.min_keep,
                                 round_to=args.round_to)
        t = time.perf_counter()
        self.x_syn = bn_matched_inputs(self.model, loaded.input_shape, args.synthetic, steps=args.synthetic_steps,
                                       seed=args.seed, cache_dir=cache_dir())
        self.x_extra = None
        if args.extra_synthetic:
            self.x_extra = bn_matched_inputs(self.model, loaded.input_shape, args.extra_synthetic,
                                             steps=args.synthetic_steps, seed=args.seed, cache_dir=cache_dir())
        self.synthetic_s = time.perf_counter() - t
        x8, y = load_images(args.eval, loaded.preprocess, limit=args.eval_limit)
        self.x_eval, self.y_eval = torch.from_numpy(to_tensor(x8, loaded.preprocess)), torch.from_numpy(y)
        with torch.inference_mode():
            self.ref_syn = self.model(self.x_syn)
            self.ref_extra = self.model(self.x_extra) if self.x_extra is not None else None
            self.ref_eval = self.logits(self.model, self.x_eval)
        self.base_top1 = self.top1(self.ref_eval)
        t = time.perf_counter()
        choices = {name: self.space.choices(g) for g, name in enumerate(self.space.groups)}
        self.lmmse = LmmseSelector(self.model, self.analysis, choices) if args.lmmse_paths else None
        self.selector_s = time.perf_counter() - t
        self.cost = MacCost(self.space)
        print(f"# {args.model}: {self.space.size} searched groups, {self.base_macs / 1e6:.2f} M MACs, top-1 "
              f"{self.base_top1:.2f} on {len(self.y_eval)} images; synthetic inputs {self.synthetic_s:.1f} s, "
              f"lmmse paths {self.selector_s:.1f} s; "
              f"fallback groups {self.lmmse.fallback if self.lmmse else '-'}", flush=True)

    @staticmethod
    def logits(model, x: torch.Tensor, chunk: int = 100) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([model(x[i:i + chunk]) for i in range(0, len(x), chunk)])

    def top1(self, logits: torch.Tensor) -> float:
        return 100.0 * float((logits.argmax(1) == self.y_eval).double().mean())

    def plan(self, kept: list[int], selection: str) -> PrunePlan:
        if selection == "lmmse":
            return self.lmmse.plan(kept)
        ratios = self.space.ratios(list(kept))
        if not ratios:
            return PrunePlan()
        return make_plan(self.model, self.analysis, ratio=0.0, ratios=ratios, round_to=1, importance=selection)

    def compress(self, plan: PrunePlan):
        from dfp_deploy.compress import compress_model, prune_model

        if self.args.method == "none":
            return prune_model(self.model, self.analysis, plan).eval()
        return compress_model(self.model, self.analysis, plan, method=self.args.method).eval()

    def proxy_scores(self, model, kept=None) -> dict:
        with torch.inference_mode():
            fid = fidelity(self.ref_syn, model(self.x_syn))
            out = {"kl": fid["kl"], "agree": fid["top1_agreement"]}
            if self.x_extra is not None:
                fid = fidelity(self.ref_extra, self.logits(model, self.x_extra))
                out.update(kl_extra=fid["kl"], agree_extra=fid["top1_agreement"])
        if kept is not None and self.lmmse is not None:
            out["lmmse_error"] = self.lmmse.predicted_error(list(kept))
        return out

    def real_scores(self, model) -> dict:
        logits = self.logits(model, self.x_eval)
        fid = fidelity(self.ref_eval, logits)
        return {"top1": self.top1(logits), "kl_real": fid["kl"], "agree_real": fid["top1_agreement"]}

    def macs_fraction(self, kept) -> float:
        return self.cost(np.asarray(kept, dtype=np.float64) / np.asarray(self.space.channels)) / \
            self.cost(np.ones(self.space.size))

    # --- random plans ---------------------------------------------------------------------------------------

    def random_plan(self, rng: np.random.Generator, target: float) -> list[int]:
        """Random per-group keep ratios r_g = m_g + (1 − m_g)·u_g^λ, u_g ~ U(0, 1), λ bisected so that the MACs
        are target · MACs(original); then snapped to the allowed counts (the MACs move by a rounding error)."""
        m = np.asarray(self.space.min_kept, dtype=np.float64) / np.asarray(self.space.channels)
        u = rng.uniform(0.02, 1.0, self.space.size)
        full = self.cost(np.ones(self.space.size))

        def frac(lam: float) -> float:
            return self.cost(m + (1 - m) * u ** lam) / full

        lo, hi = 1e-3, 1e3  # frac(lo) ≈ 1, frac(hi) ≈ frac(min)
        for _ in range(80):
            mid = np.sqrt(lo * hi)
            lo, hi = (mid, hi) if frac(mid) > target else (lo, mid)
        r = m + (1 - m) * u ** hi
        return [self.space.snap(g, float(r[g])) for g in range(self.space.size)]


# --- proxy section -------------------------------------------------------------------------------------------

def section_proxy(bench: Bench, results: dict) -> None:
    args = bench.args
    rng = np.random.default_rng(args.plan_seed)
    lo, hi = (float(v) for v in args.spread.split(","))
    targets = [("spread", t) for t in rng.uniform(lo, hi, args.spread_plans)] + \
              [("fixed", args.fixed)] * args.fixed_plans
    selections = [s for s in args.selections.split(",") if s]
    rows = []
    t0 = time.perf_counter()
    for i, (kind, target) in enumerate(targets):
        kept = bench.random_plan(rng, float(target))
        for selection in selections:
            t = time.perf_counter()
            model = bench.compress(bench.plan(kept, selection))
            compress_s = time.perf_counter() - t
            t = time.perf_counter()
            row = {"plan": i, "kind": kind, "selection": selection, "kept": kept,
                   "macs": count_macs(model, bench.one) / bench.base_macs, **bench.proxy_scores(model, kept)}
            proxy_s = time.perf_counter() - t
            row.update(bench.real_scores(model))
            row.update(compress_s=compress_s, proxy_s=proxy_s)
            rows.append(row)
            print(f"[{time.perf_counter() - t0:6.0f} s] plan {i:2d} {kind:6s} {selection:5s} MACs "
                  f"{row['macs']:.3f} kl {row['kl']:.3f} agree {row['agree']:.3f} err {row.get('lmmse_error', -1):.3f} "
                  f"top-1 {row['top1']:.2f} (compress {compress_s:.1f} s, proxy {proxy_s:.1f} s)", flush=True)
    results["proxy_rows"] = rows
    print(proxy_table(rows, bench))
    results["proxy_table"] = proxy_table(rows, bench)


def proxy_table(rows: list[dict], bench: Bench) -> str:
    metrics = [("−KL (search proxy)", lambda r: -r["kl"]), ("top-1 agreement", lambda r: r["agree"])]
    if all("lmmse_error" in r for r in rows):
        metrics.append(("−lmmse error Σe_g (analytical)", lambda r: -r["lmmse_error"]))
    if any("kl_extra" in r for r in rows):
        n = bench.args.extra_synthetic
        metrics += [(f"−KL, {n} synthetic", lambda r: -r["kl_extra"]),
                    (f"agreement, {n} synthetic", lambda r: r["agree_extra"])]
    metrics += [("MACs kept (size alone)", lambda r: r["macs"]),
                ("−KL on the real images (not data-free)", lambda r: -r["kl_real"])]
    subsets = []
    for selection in sorted({r["selection"] for r in rows}):
        for kind in ("spread", "fixed"):
            sub = [r for r in rows if r["selection"] == selection and r["kind"] == kind]
            if len(sub) >= 3:
                subsets.append((selection, kind, sub))
    headers = ["proxy"] + [f"{sel} / {kind} (n={len(sub)})" for sel, kind, sub in subsets]
    table = [[name] + [f"{spearman([f(r) for r in sub], [r['top1'] for r in sub]):+.2f}" for _, _, sub in subsets]
             for name, f in metrics]
    ranges = [["MACs kept (range)"] + [f"{min(r['macs'] for r in sub):.2f}–{max(r['macs'] for r in sub):.2f}"
                                        for _, _, sub in subsets],
              ["real top-1 (range)"] + [f"{min(r['top1'] for r in sub):.1f}–{max(r['top1'] for r in sub):.1f}"
                                         for _, _, sub in subsets]]
    return "Spearman ρ(proxy, real top-1):\n\n" + markdown(headers, table + ranges)


# --- search section ------------------------------------------------------------------------------------------

def section_search(bench: Bench, results: dict) -> None:
    from dfp_deploy.compress import select_plan
    from dfp_deploy.search import run_search

    args = bench.args
    seeds = [int(s) for s in args.search_seeds.split(",") if s]
    agents = [a for a in args.agents.split(",") if a]
    selections = [s for s in args.search_selections.split(",") if s]
    candidates: dict[str, dict] = {}
    runs = []
    for selection in selections:
        for agent in agents:
            for seed in seeds:
                memo_calls = {"n": 0, "s": 0.0}

                def evaluate(ratios, selection=selection, memo_calls=memo_calls):
                    t = time.perf_counter()
                    kept = [int(round(c * (1.0 - ratios.get(g, 0.0))))
                            for g, c in zip(bench.space.groups, bench.space.channels)]
                    if args.proxy_metric == "lmmse_error":
                        score = {"lmmse_error": bench.lmmse.predicted_error(kept)}
                        model = None
                    else:
                        model = bench.compress(bench.plan(kept, selection))
                        score = bench.proxy_scores(model)
                    proxy = {"kl": lambda: -score["kl"], "top1": lambda: score["agree"] - 1.0,
                             "lmmse_error": lambda: -score["lmmse_error"]}[args.proxy_metric]()
                    memo_calls["n"] += 1
                    memo_calls["s"] += time.perf_counter() - t
                    return {"proxy": proxy, **score,
                            "macs": int(bench.cost(np.asarray(kept) / np.asarray(bench.space.channels)))}

                name = f"{agent} seed {seed} ({selection} selection)"
                log = Path(args.log_dir) / f"{args.model}_{selection}_{agent}_{seed}_{args.proxy_metric}.jsonl"
                warmup = args.episodes if agent == "random" else args.warmup
                t = time.perf_counter()
                res = run_search(bench.space, evaluate, episodes=args.episodes, warmup=warmup, seed=seed,
                                 target=args.budget, log_path=log, resume=False, progress=False,
                                 greedy_last=agent != "random", fill=args.fill)
                wall = time.perf_counter() - t
                kept = [res.best_kept[g] for g in bench.space.groups]
                lines = [json.loads(x) for x in open(log, encoding="utf-8")]
                run = {"name": name, "agent": agent, "seed": seed, "selection": selection, "wall_s": wall,
                       "evaluations": res.evaluations, "evaluate_s": memo_calls["s"], "best_episode": res.best_episode,
                       "best_proxy": res.best_result["proxy"], "kept": kept,
                       "proxy_by_quarter": [float(np.mean([r["proxy"] for r in lines[q::4]])) for q in range(4)],
                       "last_quarter_mean_proxy": float(np.mean([r["proxy"] for r in
                                                                 lines[-max(1, len(lines) // 4):]])),
                       "greedy_proxy": lines[-1]["proxy"] if lines[-1].get("greedy") else None}
                runs.append(run)
                candidates[name] = {"plan": bench.plan(kept, selection), "kept": kept, "run": run}
                print(f"search {name}: {wall:.0f} s wall ({res.evaluations} plans evaluated, "
                      f"{memo_calls['s']:.0f} s in evaluate), best proxy {res.best_result['proxy']:.4f} "
                      f"at episode {res.best_episode}, kept {kept}", flush=True)
    # references at the same MACs: the uniform ratio the recipe would use, and select_plan's MAC allocation
    ratio = 1.0 - args.budget
    uniform_kept = None
    for selection in ("l2", "lmmse"):
        if selection == "lmmse":
            plan, _ = select_plan(bench.model, bench.analysis, ratio=ratio, budget="uniform", round_to=args.round_to)
        else:
            plan = make_plan(bench.model, bench.analysis, ratio=ratio, round_to=args.round_to, importance="l2")
        candidates[f"uniform {ratio:g} ({selection} selection)"] = {"plan": plan}
    plan, _ = select_plan(bench.model, bench.analysis, ratio=ratio, budget="macs", round_to=args.round_to)
    candidates[f"select_plan(budget=macs) {ratio:g}"] = {"plan": plan}
    rows = []
    models = {}
    for name, c in candidates.items():
        model = bench.compress(c["plan"])
        models[name] = model
        row = {"name": name, "macs": count_macs(model, bench.one) / bench.base_macs,
               **bench.proxy_scores(model), **bench.real_scores(model)}
        rows.append(row)
        print(f"{name}: MACs {row['macs']:.3f} top-1 {row['top1']:.2f} kl {row['kl']:.3f}", flush=True)
    latency = measure_latency(bench, models)
    for row in rows:
        row.update(latency.get(row["name"], {}))
    results["search_runs"] = runs
    results["search_rows"] = rows
    table = markdown(["plan", "MACs kept", "proxy −KL (synthetic)", "real top-1", "ORT p50 ms (batch "
                      f"{args.latency_batch})", "p90/p50"],
                     [[r["name"], f"{r['macs']:.3f}", f"{-r['kl']:.3f}", f"{r['top1']:.2f}",
                       f"{r.get('p50_ms', float('nan')):.2f}", f"{r.get('spread', float('nan')):.2f}"]
                      for r in [{"name": "original", "macs": 1.0, "kl": 0.0, "top1": bench.base_top1,
                                 **latency.get("original", {})}] + rows])
    runs_table = markdown(["search", "wall s", "plans evaluated", "best proxy", "best episode",
                           "mean proxy per quarter of the episodes"],
                          [[r["name"], f"{r['wall_s']:.0f}", r["evaluations"], f"{r['best_proxy']:.4f}",
                            r["best_episode"], " / ".join(f"{v:.3f}" for v in r["proxy_by_quarter"])] for r in runs])
    print(runs_table + "\n\n" + table)
    results["search_table"] = runs_table + "\n\n" + table


def section_replay(bench: Bench, results: dict) -> None:
    """Real top-1 of the best plan of finished search logs (--replay-logs), e.g. of a run stopped after its search."""
    rows = []
    for path in [p for p in bench.args.replay_logs.split(",") if p]:
        lines = [json.loads(x) for x in open(path, encoding="utf-8") if x.strip()]
        best = max(lines, key=lambda r: r["reward"])
        selection = bench.args.search_selections.split(",")[0]
        model = bench.compress(bench.plan(best["kept"], selection))
        row = {"log": path, "episodes": len(lines), "best_episode": best["episode"], "kept": best["kept"],
               "macs": count_macs(model, bench.one) / bench.base_macs, **bench.proxy_scores(model),
               **bench.real_scores(model)}
        rows.append(row)
        print(f"{path}: {len(lines)} episodes, best at {best['episode']} (proxy {best['proxy']:.4f}), MACs "
              f"{row['macs']:.3f}, real top-1 {row['top1']:.2f}", flush=True)
    results["replay_rows"] = rows


def measure_latency(bench: Bench, models: dict) -> dict:
    from dfp_deploy.backends import get_backend
    from dfp_deploy.export import export_onnx
    from dfp_deploy.measure import time_interleaved

    args = bench.args
    backend = get_backend("ort-cpu")
    example = torch.randn((args.latency_batch, *bench.loaded.input_shape), generator=torch.Generator().manual_seed(0))
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, m) in enumerate({"original": bench.model, **models}.items()):
            exp = export_onnx(m, example, Path(tmp) / f"m{i}.onnx")
            engine = backend.build(exp.path, precision="fp32", threads=args.threads, out_dir=Path(tmp))
            runners[name] = engine.prepare(example.numpy())
        stats = time_interleaved(runners, warmup=10, runs=args.latency_runs, rounds=args.latency_rounds,
                                 batch=args.latency_batch, threads=args.threads)
    return {name: {"p50_ms": s.p50_ms, "spread": s.p90_ms / s.p50_ms} for name, s in stats.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    bench = Bench(args)
    results: dict = {"args": vars(args), "base_top1": bench.base_top1, "base_macs": bench.base_macs,
                     "synthetic_s": bench.synthetic_s, "selector_s": bench.selector_s}
    for section in args.sections.split(","):
        {"proxy": section_proxy, "search": section_search, "replay": section_replay}[section](bench, results)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
