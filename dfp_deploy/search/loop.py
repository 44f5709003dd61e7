"""Run the search: episodes of the environment driven by SAC, one JSON log line per episode, resumable, best plan.

Episode e: the agent (uniform random actions while e < warmup) walks the groups under the action wall (and, with
`fill`, the budget floor: env.py); the finished
plan is evaluated once (`evaluate(prune_ratios) -> {"proxy", "latency_ms"?, "macs"?}`, memoised by kept counts), the
reward R (search/reward.py) is given to every transition of the episode, and after the warm-up the agent takes one
gradient step per transition. Episodes go in batches of `batch`: the agent proposes `batch` plans with its current
policy, they are evaluated together (`evaluate_batch(list of ratios) -> list of results`, which may time them
concurrently on several workers), then observed and learned from in proposal order. So the episodes depend on the
seed and the batch size only, never on which worker finished first; batch 1 is the sequential search. The last
episode (when past the warm-up and `greedy_last`) plays the policy's mean
action instead of a sample, so the learned policy itself is evaluated once. A cost model with an
`observe(keep_ratios, latency_ms)` method (LatencyModel) is corrected with each measured latency.

Files next to `log_path` (all written so that an interruption never leaves a half-written one):
  log_path          one JSON line per episode: episode, reward, proxy, latency_ms (+ latency_reference_ms, the
                    scale it is on), macs, cost, budget, random,
                    greedy, kept (channel counts), ratios (prune ratios, make_plan's convention); appended and fsynced;
  <log>.ckpt        agent weights, optimisers, temperature and RNG states after the last logged episode (atomic);
  <plot_path>       Pareto plot of proxy against latency (or MACs), PNG, when matplotlib is installed.
Resume: the first `checkpoint.episode` log lines are replayed through the environment (states are recomputed from
the kept counts, so the replay buffer, the cost model's corrections, the evaluation memo and the best plan are
rebuilt; logged latencies are first rescaled to this run's latency_reference_ms), the agent's state is loaded, and
the loop continues with episode `checkpoint.episode`. Since every random
draw comes from the agent's saved generators, a resumed search gives the same episodes as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dfp_deploy.core.atomic import atomic_path, write_text_atomic
from dfp_deploy.core.errors import InputError
from dfp_deploy.search.agent import SacAgent, SacConfig
from dfp_deploy.search.env import Episode, MacCost, PruneEnv
from dfp_deploy.search.reward import reward as episode_reward
from dfp_deploy.search.space import SearchSpace

Evaluate = Callable[[dict[str, float]], dict]
EvaluateBatch = Callable[[list[dict[str, float]]], list[dict]]


@dataclass(frozen=True)
class SearchResult:
    """The best plan found and how the search went."""

    best_ratios: dict[str, float]     # prune ratios for make_plan(ratios=..., round_to=1)
    best_kept: dict[str, int]
    best_reward: float
    best_episode: int
    best_result: dict                 # what evaluate returned for it
    episodes: int
    evaluations: int                  # distinct plans evaluated in this process (memo misses)
    seconds: float
    log_path: Path
    plot_path: Path | None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_report(self) -> dict:
        """The `search` section of report.json."""
        return {"best_episode": self.best_episode, "best_reward": self.best_reward,
                "best_proxy": self.best_result.get("proxy"), "best_latency_ms": self.best_result.get("latency_ms"),
                "best_macs": self.best_result.get("macs"), "episodes": self.episodes,
                "evaluations": self.evaluations, "seconds": round(self.seconds, 3),
                "ratios": self.best_ratios, "kept": self.best_kept, "log": str(self.log_path),
                "pareto_plot": str(self.plot_path) if self.plot_path else None, "notes": list(self.notes)}


def checkpoint_path(log_path: Path) -> Path:
    return Path(log_path).with_name(Path(log_path).name + ".ckpt")


def run_search(space: SearchSpace, evaluate: Evaluate, *, episodes: int, warmup: int, seed: int, target: float,
               log_path: Path, resume: bool = False, cost: Callable[[np.ndarray], float] | None = None,
               target_ms: float | None = None, penalty: float = 1.0, config: SacConfig = SacConfig(),
               plot_path: Path | None = None, progress: bool = True, greedy_last: bool = True,
               fill: bool = True, latency_reference_ms: float | None = None,
               scoring: dict | None = None, batch: int = 1,
               evaluate_batch: EvaluateBatch | None = None) -> SearchResult:
    """Search keep ratios for `space` under budget target · cost(1) (cost defaults to MACs); see module docstring.
    `latency_reference_ms`: the scale measured latencies are on (measure/workers.py CandidateTimer: the original's reading); logged
    with every measured episode so that a resumed search puts the logged readings on its own new scale.
    `scoring`: what `evaluate` depends on (plain data: the compression settings, the proxy and its inputs); a resume
    whose scoring changed is refused like one whose budget changed, since the logged proxies would no longer compare
    with the new ones.
    `batch`, `evaluate_batch`: episodes per policy update, and how a batch's plans are evaluated (default: `evaluate`
    on each in turn); see the module docstring."""
    _check_counts(episodes, warmup, seed)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InputError(f"advanced.search.batch: {batch!r} must be an integer >= 1")
    log_path = Path(log_path)
    started = time.perf_counter()
    cost = cost if cost is not None else MacCost(space)
    env = PruneEnv(space, cost, target, fill=fill)
    env.check_reachable()
    agent = SacAgent(space.state_dim, 1, seed=seed, capacity=config.buffer_episodes * space.size, config=config)
    state = _State(space=space, env=env, agent=agent,
                   evaluate_batch=evaluate_batch or (lambda many: [evaluate(ratios) for ratios in many]),
                   target_ms=target_ms, penalty=penalty, latency_reference_ms=latency_reference_ms)
    meta = {"groups": list(space.groups), "channels": list(space.channels), "seed": seed, "target": target,
            "warmup": warmup, "config": config.__dict__, "fill": fill, "penalty": penalty, "scoring": scoring,
            "batch": batch}
    start = _resume(state, log_path, meta) if resume else 0
    if start == 0:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint_path(log_path).unlink(missing_ok=True)  # a stale checkpoint must not pair with the new log
        write_text_atomic(log_path, "")
    bar = _progress(episodes, start, progress)
    try:
        for e in range(start, episodes, batch):
            numbers = range(e, min(e + batch, episodes))
            for record in state.play([(n, n < warmup, greedy_last and n == episodes - 1 and n >= warmup)
                                      for n in numbers]):
                _append_line(log_path, record)
            _save_checkpoint(log_path, agent, numbers[-1] + 1, meta)
            bar.update(len(numbers))
            bar.set_postfix(best=f"{state.best_reward:.4g}", refresh=False)
    finally:
        bar.close()
    notes = list(state.notes)
    plot = _pareto_plot(state.records, plot_path or log_path.with_name("search_pareto.png"), cost, notes)
    best = state.records[state.best_episode]
    return SearchResult(best_ratios=best["ratios"], best_kept=dict(zip(space.groups, best["kept"])),
                        best_reward=best["reward"], best_episode=state.best_episode,
                        best_result=state.memo[tuple(best["kept"])], episodes=episodes,
                        evaluations=state.evaluations, seconds=time.perf_counter() - started, log_path=log_path,
                        plot_path=plot, notes=tuple(notes))


@dataclass
class _State:
    space: SearchSpace
    env: PruneEnv
    agent: SacAgent
    evaluate_batch: EvaluateBatch
    target_ms: float | None
    penalty: float
    latency_reference_ms: float | None = None
    memo: dict[tuple[int, ...], dict] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)
    best_reward: float = -float("inf")
    best_episode: int = -1
    evaluations: int = 0
    notes: list[str] = field(default_factory=list)

    def play(self, batch: list[tuple[int, bool, bool]]) -> list[dict]:
        """Episodes (number, explore, greedy) proposed with the current policy, evaluated together, then learned
        from in proposal order; returns their records."""
        episodes = []
        with _one_thread():
            for _, explore, greedy in batch:
                if explore:
                    episodes.append(self.env.rollout(lambda s: float(self.agent.random_action()[0])))
                else:
                    episodes.append(self.env.rollout(lambda s: float(self.agent.act(s, deterministic=greedy)[0])))
        results = self._evaluate([episode.kept for episode in episodes])
        records = []
        for (e, explore, greedy), episode, result in zip(batch, episodes, results):
            record = self._record(e, episode, result, explore)
            record["greedy"] = greedy
            self.learn(episode, record, update=not explore)
            records.append(record)
        return records

    def learn(self, episode: Episode, record: dict, *, update: bool) -> None:
        """Store the episode's transitions, correct the cost model, track the best; train if `update`."""
        r = record["reward"]
        for s, a, s2, d in zip(episode.states, episode.actions, episode.next_states(), episode.dones()):
            self.agent.buffer.add(s, a, r, s2, d)
        if update:
            with _one_thread():
                for _ in range(len(episode.kept) * self.agent.config.updates_per_step):
                    self.agent.update()
        observe = getattr(self.env.cost, "observe", None)
        if observe is not None and record.get("latency_ms") is not None:
            observe(np.asarray(episode.kept, dtype=np.float64) / np.asarray(self.space.channels),
                    record["latency_ms"])
        self.records.append(record)
        if r > self.best_reward:
            self.best_reward, self.best_episode = r, record["episode"]

    def _evaluate(self, kepts: list[tuple[int, ...]]) -> list[dict]:
        new = list(dict.fromkeys(k for k in kepts if k not in self.memo))  # each distinct plan once, in order
        if new:
            results = self.evaluate_batch([self.space.ratios(list(kept)) for kept in new])
            if not isinstance(results, list) or len(results) != len(new):
                raise TypeError(f"evaluate_batch must return one result per plan ({len(new)})")
            for kept, result in zip(new, results):
                if not isinstance(result, dict) or "proxy" not in result:
                    raise TypeError("evaluate(ratios) must return a dict with at least 'proxy'")
                self.memo[kept] = dict(result)
            self.evaluations += len(new)
        return [self.memo[kept] for kept in kepts]

    def _record(self, e: int, episode: Episode, result: dict, explore: bool) -> dict:
        proxy = float(result["proxy"])
        latency = result.get("latency_ms")
        return {"episode": e,
                "reward": episode_reward(proxy, latency, self.target_ms, penalty=self.penalty),
                "proxy": proxy,
                "latency_ms": None if latency is None else float(latency),
                "latency_reference_ms": None if latency is None else self.latency_reference_ms,
                "macs": None if result.get("macs") is None else int(result["macs"]),
                "cost": episode.cost, "budget": episode.budget, "random": explore,
                "kept": list(episode.kept), "ratios": self.space.ratios(list(episode.kept))}


# --- resume ----------------------------------------------------------------------------------------------------

def _resume(state: _State, log_path: Path, meta: dict) -> int:
    ckpt_path = checkpoint_path(log_path)
    if not log_path.exists() or not ckpt_path.exists():
        if log_path.exists():
            state.notes.append(f"{log_path.name} had no checkpoint next to it; the search started over")
        return 0
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    checkpoint["meta"] = {"batch": 1, **checkpoint["meta"]}  # written before batches existed: one at a time
    if checkpoint["meta"] != meta:
        changed = sorted(k for k in meta if checkpoint["meta"].get(k) != meta[k])
        raise InputError(f"search log {log_path} belongs to a different search ({', '.join(changed)} changed); "
                         "delete it or turn resume off to start over")
    done = int(checkpoint["episode"])
    lines = _read_lines(log_path)
    if len(lines) < done:
        raise InputError(f"search log {log_path} has {len(lines)} episodes but its checkpoint says {done}; "
                         "delete both to start over")
    for record in lines[:done]:
        record = _on_current_scale(record, state.latency_reference_ms)
        episode = state.env.replay(record["kept"])
        if list(episode.kept) != list(record["kept"]):
            raise InputError(f"search log {log_path} episode {record['episode']} does not replay under the current "
                             "budget (was the target or the cost model changed?); delete it to start over")
        state.memo.setdefault(tuple(record["kept"]), {k: record[k] for k in ("proxy", "latency_ms", "macs")})
        state.learn(episode, record, update=False)
    # drop what follows the checkpoint (a line logged just before a crash, or a torn one): it is played again
    write_text_atomic(log_path, "".join(json.dumps(r) + "\n" for r in lines[:done]))
    state.agent.load_state_dict(checkpoint["agent"])
    return done


def _on_current_scale(record: dict, reference_ms: float | None) -> dict:
    """A logged latency reading moved onto this run's scale: the interrupted run scaled its readings by its own
    measurement of the original, this one by a new one (the machine's load may differ), so reading × new / old.
    The reward needs no change: its latency term depends only on latency / target, and the target is budget × the
    same reference."""
    old = record.get("latency_reference_ms")
    if record.get("latency_ms") is None or not old or not reference_ms or old == reference_ms:
        return record
    return {**record, "latency_ms": record["latency_ms"] * reference_ms / old}


def _read_lines(log_path: Path) -> list[dict]:
    records = []
    with open(log_path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a crash mid-write: everything before it is intact
    return records


def _append_line(log_path: Path, record: dict) -> None:
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _save_checkpoint(log_path: Path, agent: SacAgent, episodes_done: int, meta: dict) -> None:
    with atomic_path(checkpoint_path(log_path)) as temp:
        torch.save({"episode": episodes_done, "meta": meta, "agent": agent.state_dict()}, temp)


# --- helpers ---------------------------------------------------------------------------------------------------

def _check_counts(episodes: int, warmup: int, seed: int) -> None:
    for key, value, low in (("search.episodes", episodes, 1), ("advanced.search.warmup", warmup, 0), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{key}: {value!r} must be an integer >= {low}")


@contextmanager
def _one_thread() -> Iterator[None]:
    """The agent's tiny MLPs are fastest (and reproducible) on one thread; the evaluate callable keeps its own."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress(total: int, done: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=done, desc="search", unit="ep", file=sys.stderr, leave=False,
                disable=not (enabled and sys.stderr.isatty()))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated by another (lower cost x and higher proxy y), sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best_y = [], -float("inf")
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def _pareto_plot(records: list[dict], path: Path, cost, notes: list[str]) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        notes.append("no Pareto plot: matplotlib is not installed (pip install matplotlib)")
        return None
    use_latency = all(r.get("latency_ms") is not None for r in records)
    xs = [r["latency_ms"] if use_latency else (r["macs"] if r.get("macs") is not None else r["cost"])
          for r in records]
    label = "latency (ms)" if use_latency else ("MACs" if all(r.get("macs") is not None for r in records)
                                                  else f"cost ({getattr(cost, 'unit', 'model')})")
    ys = [r["proxy"] for r in records]
    front = pareto_front(list(zip(xs, ys)))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    colours = ["tab:gray" if r["random"] else "tab:blue" for r in records]
    ax.scatter(xs, ys, c=colours, s=12, alpha=0.6, label="episodes (grey: random warm-up)")
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "-o", color="tab:red", ms=4, label="Pareto front")
    ax.set_xlabel(label)
    ax.set_ylabel("proxy (higher is better)")
    ax.set_title("search: proxy against cost")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_path(path) as temp:
            fig.savefig(temp, format="png")
    finally:
        plt.close(fig)
    return path
