"""The actor's and critic's heads over plain parameter trees: log-probs of a response window under the
(tempered) policy, values from the value head, and the trees' logical sharding axes.

A sequence batch is `tokens, attention_mask [b, t]`; `index [b, w]` names the positions a head is evaluated
at (the response window after the prompt), so the vocabulary projection runs on the window only. The learner
(`rl/learner.py`), the warm start (`sft.py`) and the exports use these; the sampler has its own decode path.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from s3_jax.models.config import DecoderConfig
from s3_jax.models.decoder import (
  VALUE_HEAD_AXES,
  apply_value_head,
  default_positions,
  forward,
  lm_logits,
  nest_params,
  param_specs,
)
from s3_jax.rl import ppo as ppo_lib

Params = dict[str, Any]

def policy_params(actor: Params) -> Params:
  """The decoder parameters of the actor (without a shared value head): what the sampler and exports use."""
  return {k: v for k, v in actor.items() if k != "value_head"}


def cast_floats(params: Params, dtype: Any) -> Params:
  """`params` with every floating-point array cast to `dtype` (shardings kept); `dtype` None: unchanged."""
  if dtype is None:
    return params
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def hidden_states(config: DecoderConfig, params: Params, tokens, attention_mask, compute_dtype,
                  remat: str = "none", unroll: bool = False, constrain=None, prefix=None):
  """Final hidden states of right-padded rows `[b, t]`, or with `prefix` (`prefix_kv` of the p tokens every
  row begins with) of their continuations `tokens [b, t]` at positions p, p + 1, ..."""
  mask = attention_mask.astype(bool)
  positions = default_positions(mask)
  if prefix is not None:
    positions = positions + prefix[0].shape[3]
  hidden, _ = forward(config, params, tokens, positions, attention_mask=mask, compute_dtype=compute_dtype,
                      remat=remat, unroll=unroll, constrain=constrain, prefix=prefix)
  return hidden


def _before(hidden, index):
  """The hidden states that predict the tokens at `index [b, w]` (those at index - 1): `[b, w, d]`."""
  return jnp.take_along_axis(hidden, (index - 1)[..., None], axis=1)


# The vocabulary projection runs over the window in chunks of this many positions (`logprobs_from_hidden`).
LOGITS_CHUNK = 512


def _window_logprobs(head: Params, before, targets, with_entropy: bool, temperature: float = 1.0):
  logits = lm_logits(head, before)
  if temperature != 1.0:
    logits = logits / temperature
  log_norm = jax.nn.logsumexp(logits, axis=-1)
  logp = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] - log_norm
  return logp, (ppo_lib.entropy_from_logits(logits) if with_entropy else None)


def logprobs_from_hidden(params: Params, hidden, tokens, index, with_entropy: bool,
                         temperature: float = 1.0):
  """Log-probs (and entropies) of `tokens` at `index [b, w]` from the final hidden states `[b, t, d]`, under
  the distribution `softmax(logits / temperature)` (PPO: the rollout's temperature, as s3/verl).

  Over more than `LOGITS_CHUNK` positions the window goes in chunks, each rematerialised in the backward
  pass: the float32 logits `[b, w, vocab]` (SmolLM2, 2 rows x 2,560 positions: 1 GB, and the softmax and
  its gradient as much again each) are never held whole; the recomputed projection costs ~7% of an update."""
  before = _before(hidden, index)
  targets = jnp.take_along_axis(tokens, index, axis=1)
  head = {k: params[k] for k in ("embed", "lm_head") if k in params}
  w = index.shape[1]
  if w <= LOGITS_CHUNK:
    return _window_logprobs(head, before, targets, with_entropy, temperature)
  chunk = jax.checkpoint(functools.partial(_window_logprobs, with_entropy=with_entropy,
                                           temperature=temperature))
  parts = [chunk(head, before[:, i:i + LOGITS_CHUNK], targets[:, i:i + LOGITS_CHUNK])
           for i in range(0, w, LOGITS_CHUNK)]
  logp = jnp.concatenate([lp for lp, _ in parts], axis=1)
  return logp, (jnp.concatenate([e for _, e in parts], axis=1) if with_entropy else None)


def values_from_hidden(head: Params, hidden, index):
  """`V [b, w]` at the positions `index [b, w]` from the final hidden states (the head on token i-1's)."""
  return apply_value_head(head, _before(hidden, index))


def token_logprobs(config: DecoderConfig, params: Params, tokens, attention_mask, index,
                   compute_dtype=jnp.float32, unroll: bool = False, constrain=None, prefix=None,
                   temperature: float = 1.0) -> jax.Array:
  """`logπ(token_i | tokens_<i)` for each position i of `index [b, w]` (π at `temperature`). The vocabulary
  projection runs on the window only: the prompt, most of a sequence, needs no logits."""
  hidden = hidden_states(config, params, tokens, attention_mask, compute_dtype, unroll=unroll,
                         constrain=constrain, prefix=prefix)
  return logprobs_from_hidden(params, hidden, tokens, index, False, temperature)[0]


def token_values(config: DecoderConfig, critic: Params, tokens, attention_mask, index,
                 compute_dtype=jnp.float32, remat: str = "none", unroll: bool = False, constrain=None,
                 prefix=None):
  """`V` for each position i of `index`: the head on the hidden state of token i-1 (s3's `[:, -L-1:-1]`)."""
  hidden = hidden_states(config, critic["backbone"], tokens, attention_mask, compute_dtype, remat, unroll,
                         constrain, prefix)
  return values_from_hidden(critic["value_head"], hidden, index)


def critic_params(model: Any) -> Params:
  """`{"backbone", "value_head"}` arrays of a `ValueModel` (a separate critic)."""
  return {"backbone": model.backbone.arrays(), "value_head": model.head_arrays()}


def actor_logical_axes(config: DecoderConfig, shared_head: bool) -> Params:
  """The logical axes of every actor weight (`sharding.Placement` maps them onto a mesh)."""
  axes = nest_params({name: spec[1] for name, spec in param_specs(config).items()})
  if shared_head:
    axes["value_head"] = dict(VALUE_HEAD_AXES)
  return axes


def critic_logical_axes(config: DecoderConfig) -> Params:
  """The logical axes of a separate critic's `{"backbone", "value_head"}`."""
  backbone = {name: spec[1] for name, spec in param_specs(config, lm_head=False).items()}
  return {"backbone": nest_params(backbone), "value_head": dict(VALUE_HEAD_AXES)}
