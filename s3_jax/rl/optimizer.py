"""The learners' optimizer: s3's (verl's) AdamW with global-norm clipping and a linear warm-up counted in PPO
steps, with a second rate for a value head that shares the actor's trunk."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def lr_schedule(lr: float, warmup_steps: int, updates_per_step: int):
  """s3's (verl's) constant schedule with linear warm-up, counted in PPO steps: at PPO step s the rate is
  `lr · min(1, s / warmup)` (so with warm-up the first step has rate 0, as in s3)."""
  def schedule(count):
    if warmup_steps <= 0:
      return jnp.asarray(lr, jnp.float32)
    step = (count // updates_per_step).astype(jnp.float32)
    return lr * jnp.minimum(1.0, step / warmup_steps)
  return schedule


def make_optimizer(schedule, weight_decay: float, grad_clip: float,
                   head_schedule=None) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (β = 0.9, 0.999; ε = 1e-8; decoupled weight decay, as torch).

  With `head_schedule` (a value head on the actor) the `value_head` subtree steps at that rate and the rest at
  `schedule`, after the one clip over the whole gradient: AdamW is elementwise, so this is two AdamWs, the
  critic's rate for the critic's parameters as with a separate critic (at the actor's 1e-6 a fresh head
  barely moves in a laptop run)."""
  if head_schedule is None:
    return optax.chain(optax.clip_by_global_norm(grad_clip),
                       optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=weight_decay))
  return optax.chain(optax.clip_by_global_norm(grad_clip), optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8),
                     optax.add_decayed_weights(weight_decay), _scale_by_rates(schedule, head_schedule))


def _scale_by_rates(schedule, head_schedule) -> optax.GradientTransformation:
  """`optax.scale_by_learning_rate` with a second schedule for the `value_head` subtree."""
  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    rates = {"trunk": schedule(state.count), "head": head_schedule(state.count)}
    scaled = {k: jax.tree.map(lambda u, r=rates["head" if k == "value_head" else "trunk"]: -r * u, v)
              for k, v in updates.items()}
    return scaled, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def update_count(opt_state) -> jax.Array:
  """How many updates an optimizer state of `make_optimizer` has applied (Adam's step counter; with a value
  head the rates' counter counts the same updates)."""
  counts = [c for _, c in optax.tree_utils.tree_get_all_with_path(opt_state, "count")]
  if not counts:
    raise ValueError("optimizer state has no AdamW step counter")
  return counts[0]
