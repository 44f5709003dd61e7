"""Soft Actor-Critic (Haarnoja et al. 2018, with automatic entropy tuning) for a continuous per-step action, on CPU.

Networks: actor π(s) → (μ, log σ) with u ~ N(μ, σ²), a = tanh(u) ∈ (−1, 1) and
    log π(a|s) = log N(u; μ, σ²) − Σ log(1 − tanh²(u))     (the change of variables of the squashing);
twin critics Q1, Q2(s, a) with Polyak-averaged target copies Q̄1, Q̄2 (θ̄ ← (1 − τ) θ̄ + τ θ).
Losses on a replay batch (s, a, r, s', d):
    y       = r + γ (1 − d) (min_i Q̄_i(s', a') − α log π(a'|s')),   a' ~ π(s')
    L_Q     = Σ_i mean (Q_i(s, a) − y)²
    L_π     = mean (α log π(ã|s) − min_i Q_i(s, ã)),                  ã ~ π(s) (reparameterised)
    L_α     = −mean log α · (log π(ã|s) + H̄),                        H̄ = −action_dim (target entropy)
Rewards are standardised with the mean and standard deviation of all rewards in the buffer before use, so the
same hyper-parameters work for a KL proxy (≈ 0.01..3) and a fake objective alike.

Hyper-parameters (`SacConfig`, defaults chosen for ~10-60 groups and a few hundred episodes on a 2-core CPU):
    hidden 64 (2 layers, ReLU), lr 1e-3 for actor, critics and α, batch 64, τ = 0.01, initial α = 0.2,
    γ = 0: every transition of an episode carries the episode's terminal reward (AMC's assignment), so Q(s_t, a_t)
    regresses the final reward directly instead of bootstrapping it back over G steps,
    log σ clamped to [−5, 1], replay buffer of 100 · G transitions (AMC), `updates_per_step` (1) gradient updates
    per transition. On a fake 8-group problem lr 1e-3 learned faster than 3e-4 within 150 episodes; 4 updates per
    step helped a little more but costs 4x the time.
All randomness comes from the agent's own torch.Generator and numpy Generator (seeded, saved in `state_dict`), so
runs are reproducible and a resumed run continues bit-identically.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

_LOG_STD_MIN, _LOG_STD_MAX = -5.0, 1.0


@dataclass(frozen=True)
class SacConfig:
    hidden: int = 64
    lr: float = 1e-3
    batch: int = 64
    tau: float = 0.01
    gamma: float = 0.0
    init_alpha: float = 0.2
    buffer_episodes: int = 100
    updates_per_step: int = 1


def _mlp(inputs: int, outputs: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, outputs))


class _Actor(nn.Module):
    def __init__(self, state_dim: int, action_dim: int, hidden: int):
        super().__init__()
        self.body = _mlp(state_dim, 2 * action_dim, hidden)

    def forward(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.body(state).chunk(2, dim=-1)
        return mean, log_std.clamp(_LOG_STD_MIN, _LOG_STD_MAX)


class _Critic(nn.Module):
    def __init__(self, state_dim: int, action_dim: int, hidden: int):
        super().__init__()
        self.q1 = _mlp(state_dim + action_dim, 1, hidden)
        self.q2 = _mlp(state_dim + action_dim, 1, hidden)

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sa = torch.cat((state, action), dim=-1)
        return self.q1(sa), self.q2(sa)


class ReplayBuffer:
    """A ring of (s, a, r, s', d) transitions; its content is rebuilt from the search log on resume."""

    def __init__(self, capacity: int, state_dim: int, action_dim: int):
        self.capacity = capacity
        self.s = np.zeros((capacity, state_dim), dtype=np.float32)
        self.a = np.zeros((capacity, action_dim), dtype=np.float32)
        self.r = np.zeros((capacity, 1), dtype=np.float32)
        self.s2 = np.zeros((capacity, state_dim), dtype=np.float32)
        self.d = np.zeros((capacity, 1), dtype=np.float32)
        self.size, self.next = 0, 0

    def add(self, s, a, r, s2, d) -> None:
        i = self.next
        self.s[i], self.a[i], self.r[i], self.s2[i], self.d[i] = s, a, r, s2, d
        self.next = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, rng: np.random.Generator, batch: int) -> tuple[torch.Tensor, ...]:
        idx = rng.integers(0, self.size, size=batch)
        rewards = self.r[:self.size]
        std = float(rewards.std())
        r = (self.r[idx] - float(rewards.mean())) / (std if std > 1e-8 else 1.0)
        return tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in (self.s[idx], self.a[idx], r,
                                                                          self.s2[idx], self.d[idx]))


class SacAgent:
    """SAC with a tanh-squashed Gaussian actor, twin critics, target critics and learned temperature."""

    def __init__(self, state_dim: int, action_dim: int, *, seed: int, capacity: int,
                 config: SacConfig = SacConfig()):
        self.config, self.action_dim = config, action_dim
        with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's global RNG
            torch.manual_seed(seed)
            self.actor = _Actor(state_dim, action_dim, config.hidden)
            self.critic = _Critic(state_dim, action_dim, config.hidden)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.tensor(math.log(config.init_alpha), requires_grad=True)
        self.target_entropy = -float(action_dim)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=config.lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=config.lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=config.lr)
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.rng = np.random.default_rng(seed + 2)
        self.buffer = ReplayBuffer(capacity, state_dim, action_dim)

    # --- acting ---------------------------------------------------------------------------------------------

    def random_action(self) -> np.ndarray:
        return self.rng.uniform(-1.0, 1.0, size=self.action_dim)

    def act(self, state: np.ndarray, *, deterministic: bool = False) -> np.ndarray:
        with torch.no_grad():
            mean, log_std = self.actor(torch.as_tensor(state, dtype=torch.float32)[None])
            u = mean if deterministic else mean + log_std.exp() * self._noise(mean.shape)
            return torch.tanh(u)[0].numpy().astype(np.float64)

    def _noise(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator)

    def _sample(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.actor(state)
        std = log_std.exp()
        u = mean + std * self._noise(mean.shape)
        action = torch.tanh(u)
        gaussian = -0.5 * ((u - mean) / std) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
        # log(1 − tanh²u) = 2(log 2 − u − softplus(−2u)), the numerically stable form
        squash = 2.0 * (math.log(2.0) - u - nn.functional.softplus(-2.0 * u))
        return action, (gaussian - squash).sum(dim=-1, keepdim=True)

    # --- learning -------------------------------------------------------------------------------------------

    @property
    def alpha(self) -> float:
        return float(self.log_alpha.detach().exp())

    def update(self) -> dict[str, float]:
        """One gradient step on critics, actor and temperature; a no-op until the buffer holds one batch."""
        cfg = self.config
        if self.buffer.size < cfg.batch:
            return {}
        s, a, r, s2, d = self.buffer.sample(self.rng, cfg.batch)
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            if cfg.gamma > 0:
                a2, logp2 = self._sample(s2)
                q1t, q2t = self.critic_target(s2, a2)
                y = r + cfg.gamma * (1 - d) * (torch.min(q1t, q2t) - alpha * logp2)
            else:
                y = r
        q1, q2 = self.critic(s, a)
        critic_loss = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()

        new_a, logp = self._sample(s)
        q1n, q2n = self.critic(s, new_a)
        actor_loss = (alpha * logp - torch.min(q1n, q2n)).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        self.critic_opt.zero_grad(set_to_none=True)  # the actor's backward left grads on the critics

        alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()

        with torch.no_grad():
            for p, pt in zip(self.critic.parameters(), self.critic_target.parameters()):
                pt.mul_(1 - cfg.tau).add_(p, alpha=cfg.tau)
        return {"critic_loss": float(critic_loss.detach()), "actor_loss": float(actor_loss.detach()), "alpha": self.alpha}

    # --- checkpoint (everything but the buffer, which the log rebuilds) --------------------------------------

    def state_dict(self) -> dict:
        return {
            "config": asdict(self.config),
            "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
            "critic_target": self.critic_target.state_dict(), "log_alpha": self.log_alpha.detach().clone(),
            "actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
            "alpha_opt": self.alpha_opt.state_dict(),
            "generator": self.generator.get_state(), "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.critic_target.load_state_dict(state["critic_target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.alpha_opt.load_state_dict(state["alpha_opt"])
        self.generator.set_state(state["generator"])
        self.rng.bit_generator.state = state["rng"]
