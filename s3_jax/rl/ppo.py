"""PPO math as small pure functions over `[batch, time]` arrays (s3_protocol.md §6).

Conventions: every per-token array is aligned with the token ids, so position `t` holds the quantity of token
`t` (its log-prob under the model given tokens `< t`, the value of the state before it, its reward). Masks are
0/1 (or bool) arrays of the same shape; masked-out positions never contribute to a mean.

s3's recipe (verl v0.1) in these terms, each line one function here:

    r_t = score_t - β · KL_t · policy_mask_t                 `token_rewards` (kl_mode="reward", β = 0.001, k1)
    A, R = gae(r, V, response_mask, γ=1, λ=1);  A <- whiten(A, response_mask)   `advantages_and_returns`
    L_pi = token-mean_policy_mask[ max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)) ] - c_ent · token-mean_policy_mask[H]
           (+ β · token-mean_policy_mask[KL] with kl_mode="loss")                `actor_loss`
    L_V  = 0.5 · token-mean_response_mask[ max((V-R)², (clip(V, V_old ± ε_V) - R)²) ]   `critic_loss`

A value head on the actor's trunk (critic.separate_model=False) minimises L_pi + vf_coef · L_V. The token
means are over the minibatch (`token_mean`) or per micro-batch, averaged (`micro_token_mean`, s3's): the
learner sums each micro-batch's terms and divides by `loss_norm`'s counts. An advantage estimator is one entry
of `ADVANTAGE_ESTIMATORS` (with whether it needs a critic): adding one is a function and a line there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

KL_ESTIMATORS = ("k1", "k2", "k3")  # `kl_penalty`
KL_MODES = ("reward", "loss")  # the KL penalty in the token rewards (s3) or in the actor's loss
LOSS_AGGREGATIONS = ("token_mean", "micro_token_mean")  # `loss_norm`


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  return jnp.sum(x * mask, axis=axis)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """`Σ x·m / Σ m` (0 when the mask is empty)."""
  mask = mask.astype(x.dtype)
  return masked_sum(x, mask, axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)


def masked_var(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Unbiased variance over the masked entries: `Σ m (x - mean)² / (Σ m - 1)`."""
  mask = mask.astype(x.dtype)
  n = jnp.sum(mask)
  centred = x - masked_mean(x, mask)
  return jnp.sum(centred * centred * mask) / jnp.maximum(n - 1.0, 1.0)


def masked_whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
  """`(x - mean) / sqrt(var + eps)` with masked statistics; masked-out entries become 0."""
  mask = mask.astype(x.dtype)
  return (x - masked_mean(x, mask)) * jax.lax.rsqrt(masked_var(x, mask) + eps) * mask


def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma: float,
        lam: float) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation along the time axis (unwhitened).

      V'_{t+1} = V_{t+1} · m_{t+1}                  (0 past the end: right padding ends the sequence)
      δ_t = r_t + γ V'_{t+1} - V_t
      A_t = (δ_t + γλ A_{t+1}) · m_t ,   A_T = 0
      R_t = (A_t + V_t) · m_t                        (the critic's targets)

  Positions with `m_t = 0` get advantage 0 and return 0.
  """
  mask = mask.astype(jnp.float32)
  rewards, values = rewards.astype(jnp.float32), values.astype(jnp.float32)
  next_values = jnp.pad(values[:, 1:] * mask[:, 1:], ((0, 0), (0, 1)))
  deltas = rewards + gamma * next_values - values

  def step(carry, xs):
    delta, m = xs
    advantage = (delta + gamma * lam * carry) * m
    return advantage, advantage

  _, advantages = jax.lax.scan(step, jnp.zeros(rewards.shape[0], jnp.float32),
                               (deltas.T, mask.T), reverse=True)
  advantages = advantages.T
  return advantages, (advantages + values) * mask


def discounted_returns(rewards: jax.Array, mask: jax.Array, gamma: float) -> jax.Array:
  """`G_t = (r_t + γ G_{t+1}) · m_t`, the reward-to-go (REINFORCE++)."""
  mask = mask.astype(jnp.float32)

  def step(carry, xs):
    r, m = xs
    g = (r + gamma * carry) * m
    return g, g

  _, returns = jax.lax.scan(step, jnp.zeros(rewards.shape[0], jnp.float32),
                            (rewards.astype(jnp.float32).T, mask.T), reverse=True)
  return returns.T


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
  """Per-token estimates of KL(π ‖ π_ref) from the sampled token's log-probs, d = logπ - logπ_ref:

      k1 = d                   (unbiased, can be negative; s3's `kl_penalty=kl`)
      k2 = d² / 2              (low variance, biased)
      k3 = exp(-d) - 1 + d     (unbiased and non-negative; Schulman's estimator)
  """
  d = logp - ref_logp
  if estimator == "k1":
    return d
  if estimator == "k2":
    return 0.5 * d * d
  if estimator == "k3":
    return jnp.exp(-d) - 1.0 + d
  raise ValueError(f"ppo.kl_estimator={estimator!r} must be k1, k2 or k3")


def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array,
                clip_ratio: float, dual_clip: float = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Per-token clipped surrogate `[b, t]` (not yet averaged) and its diagnostics (per-token too).

      ρ = exp(logπ - logπ_old)
      ℓ = max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε))
      dual clip (c > 1): ℓ = min(ℓ, -A·c) where A < 0   (bounds the loss of very unlikely negative tokens)

  Diagnostics: `clipped` (the clipped branch was taken), `approx_kl` (½(logπ - logπ_old)²).
  """
  log_ratio = logp - old_logp
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
  loss = jnp.maximum(unclipped, clipped)
  if dual_clip:
    loss = jnp.where(advantages < 0, jnp.minimum(loss, -advantages * dual_clip), loss)
  return loss * mask, {"clipped": (clipped > unclipped).astype(jnp.float32),
                       "approx_kl": 0.5 * log_ratio * log_ratio}


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
               value_clip: float) -> tuple[jax.Array, jax.Array]:
  """Per-token clipped value loss `½ max((V - R)², (clip(V, V_old ± ε_V) - R)²)` and whether the clipped
  branch was the larger one."""
  clipped_values = old_values + jnp.clip(values - old_values, -value_clip, value_clip)
  plain = jnp.square(values - returns)
  clipped = jnp.square(clipped_values - returns)
  # "Clipped" needs the clip to be active: inside the range, V_old + (V - V_old) differs from V by rounding
  # only, and a bare `clipped > plain` would count that noise.
  active = jnp.abs(values - old_values) > value_clip
  return 0.5 * jnp.maximum(plain, clipped) * mask, (active & (clipped > plain)).astype(jnp.float32)


def entropy_from_logits(logits: jax.Array) -> jax.Array:
  """`H = logsumexp(z) - Σ softmax(z)·z`, per position, in float32."""
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(probs * logits, axis=-1)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
  """`1 - Var[R - V] / Var[R]` over the masked entries (1 = perfect critic, ≤ 0 = no better than a
  constant; NaN when the returns are constant)."""
  var = masked_var(returns, mask)
  # Undefined when the returns are constant (e.g. every reward 0): NaN, not a huge negative number.
  return jnp.where(var > 1e-8, 1.0 - masked_var(returns - values, mask) / jnp.maximum(var, 1e-8), jnp.nan)


# -- the recipe's steps ----------------------------------------------------------------------------------

def token_rewards(token_scores: jax.Array, old_logp: jax.Array, ref_logp: jax.Array, policy_mask: jax.Array,
                  *, kl_coef: float, kl_estimator: str, kl_mode: str) -> tuple[jax.Array, jax.Array]:
  """`(r, KL)`: the token rewards `r_t = score_t - β·KL_t` (`kl_mode="reward"`; the token scores alone with
  `kl_mode="loss"` or β = 0) and the per-token KL estimate of the sampling policy against the reference,
  0 off the policy's tokens."""
  policy = policy_mask.astype(jnp.float32)
  kl = kl_penalty(old_logp, ref_logp, kl_estimator) * policy
  if kl_mode == "reward" and kl_coef:
    return token_scores - kl_coef * kl, kl
  return token_scores, kl


def token_counts(policy_mask: jax.Array, response_mask: jax.Array) -> dict[str, jax.Array]:
  """How many policy and response tokens the arrays hold: the denominators of the token means."""
  return {"policy": jnp.sum(policy_mask.astype(jnp.float32)),
          "response": jnp.sum(response_mask.astype(jnp.float32))}


def loss_norm(micro: dict[str, jax.Array], whole: dict[str, jax.Array], *, loss_agg: str,
              n_micro: int) -> dict[str, jax.Array]:
  """What one micro-batch's summed loss terms are divided by (`token_counts` of the micro-batch and of its
  minibatch), so that the micro-batches' losses add up to the configured mean:

      token_mean        Σ over the minibatch / its token count (one token mean per minibatch)
      micro_token_mean  each micro-batch's token mean / n_micro (s3 / verl v0.1)
  """
  if loss_agg == "token_mean":
    return {k: jnp.maximum(v, 1.0) for k, v in whole.items()}
  if loss_agg == "micro_token_mean":
    return {k: jnp.maximum(v, 1.0) * n_micro for k, v in micro.items()}
  raise ValueError(f"ppo.loss_agg={loss_agg!r} must be token_mean or micro_token_mean")


def actor_loss(logp: jax.Array, entropy: jax.Array, old_logp: jax.Array, ref_logp: jax.Array,
               advantages: jax.Array, policy_mask: jax.Array, norm: dict[str, jax.Array], *,
               clip_ratio: float, dual_clip: float, entropy_coef: float, kl_coef: float, kl_estimator: str,
               kl_mode: str) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_pi of one micro-batch, `(Σ ℓ - c_ent·Σ H [+ β·Σ KL, kl_mode="loss"]) / norm["policy"]` over its
  policy tokens, and the summed terms behind the metrics (`pg_loss`, `entropy`, `pg_clipfrac`, `approx_kl`,
  `kl_loss`)."""
  policy = policy_mask.astype(jnp.float32)
  pg, diag = policy_loss(logp, old_logp, advantages, policy, clip_ratio, dual_clip)
  sums = {"pg_loss": jnp.sum(pg), "entropy": jnp.sum(entropy * policy),
          "pg_clipfrac": jnp.sum(diag["clipped"] * policy), "approx_kl": jnp.sum(diag["approx_kl"] * policy)}
  loss = sums["pg_loss"] - entropy_coef * sums["entropy"]
  if kl_mode == "loss" and kl_coef:
    sums["kl_loss"] = jnp.sum(kl_penalty(logp, ref_logp, kl_estimator) * policy)
    loss = loss + kl_coef * sums["kl_loss"]
  return loss / norm["policy"], sums


def critic_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, response_mask: jax.Array,
                norm: dict[str, jax.Array], *, value_clip: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_V of one micro-batch, `Σ value_loss / norm["response"]` over its response tokens, and the summed
  terms behind the metrics (`vf_loss`, `vf_clipfrac`)."""
  response = response_mask.astype(jnp.float32)
  vf, clipped = value_loss(values, old_values, returns, response, value_clip)
  sums = {"vf_loss": jnp.sum(vf), "vf_clipfrac": jnp.sum(clipped * response)}
  return sums["vf_loss"] / norm["response"], sums


# -- advantage estimators -------------------------------------------------------------------------------
# Each maps (token rewards [b, t], values [b, t] or None, response mask [b, t], policy mask [b, t], group ids
# [b]; gamma, lam) to (advantages, returns); advantages are final (whitened where the estimator whitens).

def _gae_estimator(rewards, values, response_mask, policy_mask, groups, *, gamma, lam):
  del policy_mask, groups
  advantages, returns = gae(rewards, values, response_mask, gamma, lam)
  return masked_whiten(advantages, response_mask), returns


def _grpo_estimator(rewards, values, response_mask, policy_mask, groups, *, gamma, lam, eps: float = 1e-6):
  """GRPO (outcome supervision): each episode's total reward, normalised within its group of samples of the
  same question, `(R_i - mean_g) / (std_g + ε)`, on every policy token. Needs `rollout.samples_per_question`
  ≥ 2 (a group of one has zero advantage)."""
  del values, gamma, lam
  score = jnp.sum(rewards * response_mask, axis=1)
  same = (groups[:, None] == groups[None, :]).astype(jnp.float32)
  count = jnp.sum(same, axis=1)
  mean = same @ score / count
  var = same @ jnp.square(score) / count - jnp.square(mean)
  std = jnp.sqrt(jnp.maximum(var * count / jnp.maximum(count - 1.0, 1.0), 0.0))  # unbiased, as torch.std
  advantage = (score - mean) / (std + eps)
  advantages = advantage[:, None] * policy_mask
  return advantages, advantages


def _reinforce_pp_estimator(rewards, values, response_mask, policy_mask, groups, *, gamma, lam):
  """REINFORCE++: the discounted reward-to-go (KL penalty included in the rewards), whitened over the batch;
  no critic."""
  del values, groups, lam
  returns = discounted_returns(rewards, response_mask, gamma)
  return masked_whiten(returns, policy_mask) * policy_mask, returns


@dataclasses.dataclass(frozen=True)
class AdvantageEstimator:
  fn: Callable[..., tuple[jax.Array, jax.Array]]
  uses_critic: bool  # reads the critic's values (so the learner keeps a critic)


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": AdvantageEstimator(_gae_estimator, uses_critic=True),
    "grpo": AdvantageEstimator(_grpo_estimator, uses_critic=False),
    "reinforce_pp": AdvantageEstimator(_reinforce_pp_estimator, uses_critic=False),
}


def advantages_and_returns(estimator: str, rewards, values, response_mask, policy_mask, groups, *,
                           gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
  if estimator not in ADVANTAGE_ESTIMATORS:
    raise ValueError(f"ppo.adv_estimator={estimator!r} must be one of {', '.join(ADVANTAGE_ESTIMATORS)}")
  return ADVANTAGE_ESTIMATORS[estimator].fn(rewards, values, response_mask, policy_mask, groups,
                                            gamma=gamma, lam=lam)
