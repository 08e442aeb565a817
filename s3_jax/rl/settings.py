"""The PPO update's static settings, read once from a validated config (`PPOSettings.from_config`).

The config's choices (estimator, KL, loss aggregation, padding) are checked once by `config_lib.validate`
against their owners' registries; what is left to check here is what depends on the devices: that the batch,
minibatch and micro-batch sizes divide each other and shard evenly over the mesh (`check`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from s3_jax.rl import ppo as ppo_lib


@dataclasses.dataclass(frozen=True)
class PPOSettings:
  """The static hyper-parameters of the update (sizes in episodes)."""

  batch_size: int
  mini_batch_size: int
  actor_micro_batch_size: int
  critic_micro_batch_size: int
  score_micro_batch_size: int
  epochs: int = 1
  clip_ratio: float = 0.2
  dual_clip: float = 0.0
  value_clip: float = 0.5
  entropy_coef: float = 0.001
  vf_coef: float = 1.0
  gamma: float = 1.0
  lam: float = 1.0
  kl_coef: float = 0.001
  kl_estimator: str = "k1"
  kl_mode: str = "reward"
  adv_estimator: str = "gae"
  loss_agg: str = "token_mean"
  actor_lr: float = 1e-6
  critic_lr: float = 1e-5
  actor_warmup_steps: int = 0
  critic_warmup_steps: int = 0
  weight_decay: float = 0.01
  grad_clip: float = 1.0
  separate_critic: bool = True
  micro_batch_padding: str = "own"
  shared_prefix: bool = False
  # The rollout's sampling temperature: old, reference and new log-probs and the entropy are those of
  # softmax(logits / temperature), the distribution the tokens were sampled from (s3/verl divide the logits by
  # it; s3_protocol.md §2.2). 1.0 for greedy rollouts (temperature 0).
  temperature: float = 1.0

  @classmethod
  def from_config(cls, config: Any) -> PPOSettings:
    """From a full config: sizes in questions × `rollout.samples_per_question`; warm-up steps as s3 computes
    them, `int(ratio × ppo.schedule_steps)`."""
    p, n = config.ppo, config.rollout.samples_per_question
    return cls(
        batch_size=p.batch_size * n, mini_batch_size=p.mini_batch_size * n,
        actor_micro_batch_size=p.actor_micro_batch_size, critic_micro_batch_size=p.critic_micro_batch_size,
        score_micro_batch_size=p.score_micro_batch_size, epochs=p.epochs, clip_ratio=p.clip_ratio,
        dual_clip=p.dual_clip, value_clip=p.value_clip, entropy_coef=p.entropy_coef, vf_coef=p.vf_coef,
        gamma=p.gamma, lam=p.lam, kl_coef=p.kl_coef, kl_estimator=p.kl_estimator, kl_mode=p.kl_mode,
        adv_estimator=p.adv_estimator, loss_agg=p.loss_agg, actor_lr=p.actor_lr, critic_lr=p.critic_lr,
        actor_warmup_steps=int(p.actor_warmup_ratio * p.schedule_steps),
        critic_warmup_steps=int(p.critic_warmup_ratio * p.schedule_steps),
        weight_decay=p.weight_decay, grad_clip=p.grad_clip, separate_critic=config.critic.separate_model,
        micro_batch_padding=p.micro_batch_padding, shared_prefix=p.shared_prefix,
        temperature=config.rollout.temperature or 1.0)

  @property
  def uses_critic(self) -> bool:
    return ppo_lib.ADVANTAGE_ESTIMATORS[self.adv_estimator].uses_critic

  @property
  def updates_per_step(self) -> int:
    return self.epochs * (self.batch_size // self.mini_batch_size)

  def check(self, batch_shards: int = 1) -> None:
    """Raises `ValueError` naming the size that does not divide (or does not shard evenly)."""
    if self.batch_size % self.mini_batch_size:
      raise ValueError(f"ppo.mini_batch_size: {self.mini_batch_size} episodes do not divide the batch of "
                       f"{self.batch_size}")
    for name in ("actor_micro_batch_size", "critic_micro_batch_size"):
      if self.mini_batch_size % getattr(self, name):
        raise ValueError(f"ppo.{name}={getattr(self, name)} must divide the minibatch of "
                         f"{self.mini_batch_size} episodes")
    if self.batch_size % self.score_micro_batch_size:
      raise ValueError(f"ppo.score_micro_batch_size={self.score_micro_batch_size} must divide the batch of "
                       f"{self.batch_size} episodes")
    names = ("actor_micro_batch_size", "critic_micro_batch_size", "score_micro_batch_size")
    for name in names:
      if getattr(self, name) % batch_shards:
        # the largest batch sharding every micro-batch size allows: what to pass on this host instead
        fits = max(d for d in range(1, batch_shards + 1)
                   if batch_shards % d == 0 and all(getattr(self, n) % d == 0 for n in names))
        raise ValueError(f"ppo.{name}={getattr(self, name)} must be a multiple of the mesh's batch shards "
                         f"(data × fsdp = {batch_shards}): on these devices pass --config.mesh.data=1 "
                         f"--config.mesh.fsdp={fits} (a mesh over the first {fits} device(s)), or "
                         f"micro-batch sizes that are multiples of {batch_shards}")
