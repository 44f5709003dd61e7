"""AutoDFP search: space features and cost terms, the action wall, reward, SAC learning, determinism and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfp_deploy.analysis import analyze, count_macs
from dfp_deploy.compress.prune import prune_model
from dfp_deploy.compress.select.plan import make_plan
from dfp_deploy.core.errors import InputError
from dfp_deploy.search.agent import SacConfig
from dfp_deploy.search.env import LatencyModel, MacCost, PruneEnv
from dfp_deploy.search.loop import checkpoint_path, pareto_front, run_search
from dfp_deploy.search.reward import fidelity, proxy, reward
from dfp_deploy.search.space import build_space, channel_similarity, cluster_count, cosine_matrix

from _helpers import Deep, example, randomise

torch.set_num_threads(1)

SMALL = SacConfig(batch=16)  # learning starts after two episodes instead of eight


@pytest.fixture(scope="module")
def space():
    model = Deep()
    return build_space(model, analyze(model, example()), example(), min_keep=0.2)


def fake_problem(space):
    """proxy = −Σ w_g (1 − r_g)², latency = Σ c_g r_g: pruning an important (large w) group costs more."""
    w = np.random.default_rng(1).uniform(0.1, 2.0, space.size)
    c = np.random.default_rng(2).uniform(0.5, 1.5, space.size)

    def evaluate(ratios):
        keep = np.asarray([1.0 - ratios.get(g, 0.0) for g in space.groups])
        return {"proxy": -float((w * (1 - keep) ** 2).sum()), "latency_ms": float((c * keep).sum()),
                "macs": int(space.terms.macs_at(keep))}

    return evaluate


def records(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


# --- space -----------------------------------------------------------------------------------------------------

def test_cost_terms_predict_the_real_pruned_macs(space):
    model = Deep()
    analysis = analyze(model, example())
    assert space.terms.macs_at(np.ones(space.size)) == count_macs(model, example())
    kept = [space.snap(g, k) for g, k in enumerate([0.3, 1.0, 0.55, 0.8, 0.2, 0.6])]
    plan = make_plan(model, analysis, ratio=0, ratios=space.ratios(kept), round_to=1)
    assert [len(plan.keep.get(g, range(c))) for g, c in zip(space.groups, space.channels)] == kept
    pruned = prune_model(model, analysis, plan)
    ratios = np.asarray(kept) / np.asarray(space.channels)
    assert space.terms.macs_at(ratios) == count_macs(pruned, example())


class SameWidthResidual(nn.Module):
    """stem -> two identity-shortcut blocks of one width -> pool -> fc: a residual stream whose members all carry
    every one of its channels."""

    def __init__(self, width=16, inner=(24, 8)):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.a = nn.ModuleList(nn.Conv2d(width, c, 3, padding=1, bias=False) for c in inner)
        self.a_bn = nn.ModuleList(nn.BatchNorm2d(c) for c in inner)
        self.b = nn.ModuleList(nn.Conv2d(c, width, 3, padding=1, bias=False) for c in inner)
        self.b_bn = nn.ModuleList(nn.BatchNorm2d(width) for _ in inner)
        self.fc = nn.Linear(width, 4)
        randomise(self)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        for a, a_bn, b, b_bn in zip(self.a, self.a_bn, self.b, self.b_bn):
            x = F.relu(x + b_bn(b(F.relu(a_bn(a(x))))))
        return self.fc(x.mean((2, 3)))


def test_residual_groups_of_one_width_are_priced_exactly():
    model = SameWidthResidual()
    analysis = analyze(model, example())
    space = build_space(model, analysis, example(), include_residual=True)
    assert len(space.groups) == 3  # the stream and the two block-internal groups
    rng = np.random.default_rng(0)
    for _ in range(3):
        kept = [space.snap(g, k) for g, k in enumerate(rng.uniform(0.2, 1.0, space.size))]
        plan = make_plan(model, analysis, ratio=0, ratios=space.ratios(kept), round_to=1, include_residual=True)
        pruned = prune_model(model, analysis, plan)
        assert space.terms.macs_at(np.asarray(kept) / np.asarray(space.channels)) == count_macs(pruned, example())


def test_a_group_joining_layers_of_different_widths_is_refused():
    """CIFAR ResNets' zero-padded shortcuts join a 16/32/64-channel stream into one group of 64: which layers a cut
    shrinks depends on which channels go, so the ratio-based MAC model cannot price it (it priced a halving of it at
    50 % of ResNet-20's MACs where the pruned model kept 85 %)."""
    from dfp_deploy.models import load_model

    loaded = load_model("cifar_resnet20", None)
    one = torch.zeros(1, *loaded.input_shape)
    analysis = analyze(loaded.module, one)
    with pytest.raises(InputError, match="different widths"):
        build_space(loaded.module, analysis, one, include_residual=True)
    assert len(build_space(loaded.module, analysis, one).groups) == 9  # the block-internal groups stay searchable


def test_a_missed_mac_budget_is_reported():
    from dfp_deploy.report.assemble import search_budget_warnings

    searched = {"episodes": 4, "target": "macs", "budget": 0.5}  # report.json `search`
    assert search_budget_warnings({"before": 1000, "after": 502}, searched) == []
    assert "over the budget 0.5" in search_budget_warnings({"before": 1000, "after": 540}, searched)[0]
    assert search_budget_warnings({"before": 1000, "after": 540}, None) == []
    assert search_budget_warnings({"before": 1000, "after": 900}, {**searched, "target": "latency"}) == []


def test_space_features_are_normalised_and_snap_respects_round_to():
    model = Deep()
    s = build_space(model, analyze(model, example()), example(), min_keep=0.3, round_to=8)
    assert s.size == 6 and s.static.shape == (6, 9)
    assert np.allclose(s.static[:, 0], np.linspace(0, 1, 6))  # index, min-max normalised
    assert s.static[:, :6].min() >= 0 and s.static[:, :6].max() <= 1
    for g, c in enumerate(s.channels):
        choices = s.choices(g)
        assert choices[0] >= 0.3 * c and choices[-1] == c
        assert all(k % 8 == 0 for k in choices[:-1])
    assert s.snap(2, 0.5) == 16 and s.snap(2, 0.0) == s.min_kept[2]


def test_cluster_count_finds_duplicate_filters_and_matches_dbscan():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(5, 40))
    filters = np.concatenate([base, base[:3] * 2.0 + rng.normal(scale=1e-3, size=(3, 40))])  # 3 scaled copies
    ratio, mean_cos, max_cos = channel_similarity(filters, eps=0.05)
    assert ratio == pytest.approx(5 / 8) and max_cos > 0.99 and mean_cos < max_cos
    sklearn = pytest.importorskip("sklearn.cluster")
    for eps in (0.6, 0.8, 0.95):
        x = rng.normal(size=(30, 6))
        labels = sklearn.DBSCAN(eps=eps, min_samples=2, metric="cosine").fit(x).labels_
        expected = len(set(labels) - {-1}) + int((labels == -1).sum())
        assert cluster_count(cosine_matrix(x), eps) == expected


def test_no_searchable_group_and_bad_arguments_are_input_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 1))  # its only group reaches the output
    with pytest.raises(InputError, match="no prunable"):
        build_space(model, analyze(model, example()), example())
    with pytest.raises(InputError, match="min_keep"):
        build_space(Deep(), analyze(Deep(), example()), example(), min_keep=0)


# --- environment -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [0.25, 0.5, 0.9])
def test_action_wall_meets_the_budget_whatever_the_agent_does(space, target):
    env = PruneEnv(space, MacCost(space), target)
    full = space.terms.macs_at(np.ones(space.size))
    rng = np.random.default_rng(0)
    for act in [lambda s: 1.0, lambda s: -1.0, lambda s: float(rng.uniform(-1, 1))] * 5:
        episode = env.rollout(act)
        ratios = np.asarray(episode.kept) / np.asarray(space.channels)
        assert space.terms.macs_at(ratios) <= target * full * (1 + 1e-9)
        assert all(lo <= k <= c for k, lo, c in zip(episode.kept, space.min_kept, space.channels))
    greedy = env.rollout(lambda s: 1.0)
    assert greedy.cost >= 0.9 * target * full  # keeping as much as allowed uses (almost) all of the budget


@pytest.mark.parametrize("target", [0.25, 0.5, 0.9])
def test_budget_floor_spends_the_budget_and_can_be_turned_off(space, target):
    full = space.terms.macs_at(np.ones(space.size))
    rng = np.random.default_rng(1)
    filled = PruneEnv(space, MacCost(space), target)
    for act in [lambda s: -1.0, lambda s: float(rng.uniform(-1, 1))] * 5:
        episode = filled.rollout(act)
        assert 0.95 * target * full <= episode.cost <= target * full * (1 + 1e-9)
        assert filled.replay(list(episode.kept)).kept == episode.kept
    assert filled.fill
    unfilled = PruneEnv(space, MacCost(space), target, fill=False).rollout(lambda s: -1.0)
    assert list(unfilled.kept) == list(space.min_kept) or target == 0.25


def test_unreachable_target_is_an_input_error(space):
    with pytest.raises(InputError, match="unreachable"):
        PruneEnv(space, MacCost(space), 0.01).rollout(lambda s: 0.0)
    with pytest.raises(InputError, match="target"):
        PruneEnv(space, MacCost(space), 1.5)


def test_replay_reproduces_states_and_taken_actions(space):
    env = PruneEnv(space, MacCost(space), 0.5)
    rng = np.random.default_rng(3)
    episode = env.rollout(lambda s: float(rng.uniform(-1, 1)))
    again = env.replay(list(episode.kept))
    assert again.kept == episode.kept
    assert np.array_equal(again.states, episode.states) and np.array_equal(again.actions, episode.actions)


def test_latency_model_is_corrected_by_measurements(space):
    model = LatencyModel(space)
    ones, half = np.ones(space.size), np.full(space.size, 0.5)
    true = lambda keep: 2.0 + 10.0 * model.raw(keep)  # noqa: E731 - a fixed overhead the prior does not know
    model.observe(ones, true(ones))
    assert model(ones) == pytest.approx(true(ones))
    model.observe(half, true(half))
    quarter = np.full(space.size, 0.25)
    assert model(quarter) == pytest.approx(true(quarter))
    assert (model.c0, model.scale) == pytest.approx((2.0, 10.0))
    # noisy candidates move the slope but never the original: cost(1) stays its measurement
    model.observe(np.full(space.size, 0.6), 1.05 * true(np.full(space.size, 0.6)))
    model.observe(np.full(space.size, 0.7), 1.04 * true(np.full(space.size, 0.7)))
    assert model(ones) == pytest.approx(true(ones))
    assert true(half) < model(half) < 1.05 * true(half)
    # exact answer of the anchored least squares: s = Σ dx dy / Σ dx², c0 = y1 − s x1
    x = [model.raw(np.full(space.size, v)) for v in (0.5, 0.6, 0.7)]
    y = [true(half), 1.05 * true(np.full(space.size, 0.6)), 1.04 * true(np.full(space.size, 0.7))]
    x1, y1 = model.raw(ones), true(ones)
    s = sum((a - x1) * (b - y1) for a, b in zip(x, y)) / sum((a - x1) ** 2 for a in x)
    assert (model.c0, model.scale) == pytest.approx((y1 - s * x1, s))
    # a prior point (the search's floor) shapes the line only until a candidate is measured
    prior = LatencyModel(space)
    prior.observe(ones, 12.0)
    prior.observe(quarter, 5.0, prior=True)
    assert prior(quarter) == pytest.approx(5.0) and prior(ones) == pytest.approx(12.0)
    prior.observe(half, 9.0)
    assert prior(half) == pytest.approx(9.0) and prior(ones) == pytest.approx(12.0)  # the line through 1 and half
    assert prior(quarter) != pytest.approx(5.0)


# --- reward ----------------------------------------------------------------------------------------------------

def test_fidelity_kl_and_agreement():
    logits = torch.randn(50, 10, generator=torch.Generator().manual_seed(0))
    same = fidelity(logits, logits.clone())
    assert same["kl"] == pytest.approx(0.0, abs=1e-12) and same["top1_agreement"] == 1.0
    noisy = fidelity(logits, logits + torch.randn(50, 10, generator=torch.Generator().manual_seed(1)))
    assert noisy["kl"] > 0.05 and noisy["top1_agreement"] < 1.0
    assert proxy(noisy) == -noisy["kl"] and proxy(noisy, "top1") == noisy["top1_agreement"] - 1
    with pytest.raises(InputError):
        fidelity(logits, logits[:10])
    with pytest.raises(InputError, match="metric"):
        proxy(noisy, "acc")


def test_latency_model_charges_a_partly_filled_channel_block_as_a_whole_one(space):
    flat, blocked = LatencyModel(space), LatencyModel(space, block=8)
    channels = np.asarray(space.channels)
    full = np.ones(space.size)
    # every group keeps one channel more than a multiple of 8 below its width: the blocked model rounds it back up
    one_over = np.maximum(8 * ((channels - 1) // 8) + 1, 1) / channels
    whole_blocks = np.minimum(8 * np.ceil(one_over * channels / 8), channels) / channels
    assert blocked.raw(one_over) == pytest.approx(blocked.raw(whole_blocks))
    assert flat.raw(one_over) < flat.raw(whole_blocks)
    assert blocked.raw(full) == pytest.approx(flat.raw(full))  # nothing to pad when every channel is kept
    # monotone in every ratio, as the action wall's bisection needs
    ratios = np.linspace(0.2, 1.0, 33)
    values = [blocked.raw(np.full(space.size, r)) for r in ratios]
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))
    with pytest.raises(InputError):
        LatencyModel(space, block=0)


def test_reward_penalises_only_a_missed_latency_target():
    assert reward(-0.2) == -0.2
    assert reward(-0.2, latency_ms=9.0, target_ms=10.0) == -0.2
    assert reward(-0.2, latency_ms=11.0, target_ms=10.0, penalty=2.0) == pytest.approx(-0.4)
    assert reward(float("nan")) < -1e5


# --- loop ------------------------------------------------------------------------------------------------------

def test_pareto_front():
    points = [(1.0, -3.0), (2.0, -1.0), (1.5, -4.0), (3.0, -1.0), (0.5, -5.0), (2.5, -0.5)]
    assert pareto_front(points) == [4, 0, 1, 5]


def test_same_seed_same_plan_and_budget_in_every_episode(space, tmp_path):
    evaluate = fake_problem(space)
    kwargs = dict(episodes=8, warmup=3, target=0.5, config=SMALL)
    a = run_search(space, evaluate, seed=7, log_path=tmp_path / "a.jsonl", **kwargs)
    b = run_search(space, evaluate, seed=7, log_path=tmp_path / "b.jsonl", **kwargs)
    c = run_search(space, evaluate, seed=8, log_path=tmp_path / "c.jsonl", **kwargs)
    assert a.best_kept == b.best_kept and a.best_reward == b.best_reward
    assert records(tmp_path / "a.jsonl") == records(tmp_path / "b.jsonl")
    assert records(tmp_path / "a.jsonl") != records(tmp_path / "c.jsonl")
    for r in records(tmp_path / "a.jsonl"):
        assert r["cost"] <= r["budget"] * (1 + 1e-9)
        assert set(r) >= {"episode", "reward", "proxy", "latency_ms", "macs", "ratios", "kept"}
    assert a.plot_path is None or a.plot_path.stat().st_size > 1000
    report = a.as_report()
    assert report["ratios"] == a.best_ratios and report["episodes"] == 8


class Interrupted(Exception):
    pass


def test_resume_after_interruption_gives_the_uninterrupted_result(space, tmp_path):
    evaluate = fake_problem(space)
    kwargs = dict(episodes=10, warmup=3, seed=3, target=0.5, config=SMALL)
    whole = run_search(space, evaluate, log_path=tmp_path / "whole.jsonl", **kwargs)
    calls = []

    def dies_at_episode_seven(ratios):
        calls.append(ratios)
        if len(calls) == 7:
            raise Interrupted  # like Ctrl-C in the middle of building an engine
        return evaluate(ratios)

    with pytest.raises(Interrupted):
        run_search(space, dies_at_episode_seven, log_path=tmp_path / "part.jsonl", **kwargs)
    assert len(records(tmp_path / "part.jsonl")) == 6
    # a torn append after the checkpoint's last episode must be dropped too
    with open(tmp_path / "part.jsonl", "a") as f:
        f.write('{"episode": 6, "rew')
    calls.clear()
    resumed = run_search(space, counting_calls(evaluate, calls), log_path=tmp_path / "part.jsonl", resume=True,
                         **kwargs)
    assert records(tmp_path / "part.jsonl") == records(tmp_path / "whole.jsonl")
    assert resumed.best_kept == whole.best_kept and resumed.best_episode == whole.best_episode
    assert len(calls) <= 4  # the first six episodes came from the log, not from evaluate


def test_resumed_latency_search_puts_logged_readings_on_its_new_scale(space, tmp_path):
    """A latency search is interrupted, then resumed on a machine that now runs everything twice as slow: the resumed
    run's original reads 2× and so does every new candidate. Rescaled, the logged readings agree with the new ones,
    so the resumed search is exactly the search that ran at the new speed throughout."""
    fake = fake_problem(space)
    original_ms = fake({})["latency_ms"]

    def at_speed(factor):
        def evaluate(ratios):
            out = dict(fake(ratios))
            out["latency_ms"] *= factor
            return out
        return evaluate

    def search(factor, evaluate, log, **extra):
        cost = LatencyModel(space)
        cost.observe(np.ones(space.size), factor * original_ms)
        return run_search(space, evaluate, episodes=10, warmup=3, seed=5, target=0.75, config=SMALL, cost=cost,
                          target_ms=0.75 * factor * original_ms, latency_reference_ms=factor * original_ms,
                          log_path=log, **extra), cost

    whole, whole_cost = search(2.0, at_speed(2.0), tmp_path / "whole.jsonl")
    calls = []

    def dies_at_episode_seven(ratios):
        calls.append(ratios)
        if len(calls) == 7:
            raise Interrupted
        return at_speed(1.0)(ratios)

    with pytest.raises(Interrupted):
        search(1.0, dies_at_episode_seven, tmp_path / "part.jsonl")
    resumed, resumed_cost = search(2.0, at_speed(2.0), tmp_path / "part.jsonl", resume=True)
    logged, reference = records(tmp_path / "part.jsonl"), records(tmp_path / "whole.jsonl")
    assert [r["kept"] for r in logged] == [r["kept"] for r in reference]
    assert [r["reward"] for r in logged] == pytest.approx([r["reward"] for r in reference])
    assert resumed.best_kept == whole.best_kept and resumed.best_episode == whole.best_episode
    assert (resumed_cost.c0, resumed_cost.scale) == pytest.approx((whole_cost.c0, whole_cost.scale))
    # the log keeps each reading as measured, with the scale it was measured on
    assert [r["latency_reference_ms"] for r in logged] == pytest.approx([original_ms] * 6 + [2 * original_ms] * 4)
    rescaled = [r["latency_ms"] * 2 * original_ms / r["latency_reference_ms"] for r in logged]
    assert rescaled == pytest.approx([r["latency_ms"] for r in reference])


def counting_calls(evaluate, calls):
    def counted(ratios):
        calls.append(ratios)
        return evaluate(ratios)
    return counted


def test_resume_refuses_a_log_of_another_search(space, tmp_path):
    evaluate = fake_problem(space)
    run_search(space, evaluate, episodes=2, warmup=2, seed=0, target=0.5, log_path=tmp_path / "log.jsonl")
    assert checkpoint_path(tmp_path / "log.jsonl").exists()
    with pytest.raises(InputError, match="different search"):
        run_search(space, evaluate, episodes=4, warmup=2, seed=0, target=0.6, log_path=tmp_path / "log.jsonl",
                   resume=True)


def test_sac_learns_the_fake_problem(space, tmp_path):
    """Not a benchmark (on this 6-group toy a pure random search of the same length finds about as good a best plan),
    but the policy must move clearly away from random: its late episodes and its final greedy plan are better."""
    evaluate = fake_problem(space)
    warmup, episodes = 20, 90
    run_search(space, evaluate, episodes=episodes, warmup=warmup, seed=0, target=0.4, log_path=tmp_path / "log.jsonl",
               config=SacConfig(batch=32), plot_path=tmp_path / "p.png")
    logged = records(tmp_path / "log.jsonl")
    rewards = [r["reward"] for r in logged]
    random_mean, random_std = np.mean(rewards[:warmup]), np.std(rewards[:warmup])
    assert np.mean(rewards[-16:-1]) > random_mean + 0.5 * random_std, (random_mean, random_std, rewards[-16:-1])
    assert logged[-1]["greedy"] and not any(r["greedy"] for r in logged[:-1])
    assert rewards[-1] > random_mean + 1.0 * random_std
