"""Episodes -> a `RolloutBatch` of padded arrays for the trainer (s3_protocol.md §2.4 masks).

Each row is the prompt followed by the trajectory, right-padded to a bucketed length (multiples of
`length_multiple`) so the jitted score/update steps see few shapes. Masks say what each position is:

    prompt_mask      the chat-formatted prompt (never trained on)
    policy_mask      tokens the policy sampled — the only ones the policy loss and entropy use
    obs_mask         tokens the environment inserted (observations, the invalid-action nudge)
    attention_mask   prompt | policy | obs (everything that is not padding)

and `rewards` holds each episode's scalar reward on its last policy token (s3's placement), 0 elsewhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from s3_jax import tracing
from s3_jax.search.episode import Episode


@dataclasses.dataclass(frozen=True)
class RolloutBatch:
  tokens: np.ndarray  # [b, t] int32
  attention_mask: np.ndarray  # [b, t] bool
  prompt_mask: np.ndarray  # [b, t] bool
  policy_mask: np.ndarray  # [b, t] bool
  obs_mask: np.ndarray  # [b, t] bool
  rewards: np.ndarray  # [b, t] float32, the reward on the last policy token

  @property
  def shape(self) -> tuple[int, int]:
    return self.tokens.shape


def train_length(longest: int, minimum: int = 128) -> int:
  """The padded length of a training batch: `longest` rounded up to one of four steps per power of two (at
  most 25% padding, and few distinct shapes, so the jitted score/update compile a handful of times)."""
  return tracing.bucket_length(longest, minimum, min_step=minimum // 4)


def make_batch(episodes: Sequence[Episode], rewards: Sequence[float], pad_id: int,
               length_multiple: int = 128, *, length: int | None = None,
               allow_empty: bool = False) -> RolloutBatch:
  """Pads `episodes` into one batch (to `length`, or the longest rounded up to `length_multiple`);
  `rewards[i]` goes on episode i's last policy token. An episode whose policy generated nothing cannot carry a
  reward: an error, or with `allow_empty` a row with every mask but the prompt's cleared (it adds nothing to
  any loss; the trainer counts such rows)."""
  if len(rewards) != len(episodes):
    raise ValueError(f"{len(rewards)} rewards for {len(episodes)} episodes")
  longest = max(len(e.prompt_ids) + len(e.ids) for e in episodes)
  if length is None:
    length = -(-longest // length_multiple) * length_multiple
  elif length < longest:
    raise ValueError(f"length={length} is shorter than the longest episode ({longest} tokens)")
  shape = (len(episodes), length)
  tokens = np.full(shape, pad_id, np.int32)
  prompt_mask, policy_mask, obs_mask = (np.zeros(shape, bool) for _ in range(3))
  reward_array = np.zeros(shape, np.float32)
  for row, (episode, reward) in enumerate(zip(episodes, rewards, strict=True)):
    p, n = len(episode.prompt_ids), len(episode.ids)
    tokens[row, :p + n] = episode.prompt_ids + episode.ids
    prompt_mask[row, :p] = True
    policy = np.asarray(episode.policy_mask, bool)
    policy_mask[row, p:p + n] = policy
    obs_mask[row, p:p + n] = ~policy
    if not policy.any():
      if allow_empty:
        obs_mask[row] = False
        continue
      raise ValueError(f"episode {row} ({episode.example.id!r}) has no policy tokens to carry its reward")
    reward_array[row, p + int(np.flatnonzero(policy)[-1])] = reward
  return RolloutBatch(tokens, prompt_mask | policy_mask | obs_mask, prompt_mask, policy_mask, obs_mask,
                      reward_array)
