"""Which rows go into which micro-batch, and how long each micro-batch is (`ppo.micro_batch_padding=own`).

A step's batch is padded to its longest episode, but episodes differ a lot in length: the 16 episodes of a
3-3-3 SmolLM2 step hold 1,100-3,000 tokens (mean ~1,570), so one `[16, 3,072]` batch is half padding, and
attention's cost grows with the square of it. Padding each micro-batch only to its own longest row (and its
response window to its own widest) removes most of that work; grouping rows of similar length into the same
micro-batch removes most of the rest (verl's `use_dynamic_bsz` and remove-padding serve the same end).

    layout = plan(lengths, widths, settings, length=t, width=w)
    layout.score            micro-batches over the whole batch (rows sorted by length: scoring is per row)
    layout.actor[m]         minibatch m's micro-batches for the actor (and .critic[m] for a separate critic)

Within a minibatch rows are sorted by length only when `ppo.loss_agg=token_mean`, whose gradient is one token
mean over the minibatch whatever the split; s3's `micro_token_mean` averages per-micro-batch means, so there
the micro-batches keep s3's rows (in order) and are only trimmed. Minibatches themselves are never reordered
(minibatch m holds rows m·mini ... (m+1)·mini - 1, as s3). Lengths are rounded up to `train_length`'s buckets
(4 per power of two), so a run compiles each function for a handful of shapes, never once per step.

`layout.prefix` (`ppo.shared_prefix`): how many leading tokens every row shares — s3's prompt is a ~650-token
instruction template before the question, so at laptop sizes (~1,400 tokens an episode) nearly half of every
row is the same. The learner computes that prefix once (batch 1) and runs the micro-batches on the rest of
their rows (`learner.PPOLearner._learn_in_layout`). Rounded down to a multiple of `PREFIX_MULTIPLE`, so the
shapes stay few, and cut before the first position any window reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from s3_jax.rl.batch import train_length

# ppo.micro_batch_padding: each micro-batch padded to its own rows' length (`plan`) or the whole batch's.
PADDINGS = ("own", "batch")

MINIMUM = 16  # the shortest padded length / width (below it, rows are padded to it)
PREFIX_MULTIPLE = 64  # a shared prefix is rounded down to this (0 when shorter)


@dataclasses.dataclass(frozen=True)
class MicroBatch:
  rows: tuple[int, ...]  # rows of the (global) batch, in the order they are stacked
  length: int  # the padded sequence length of these rows
  width: int  # the padded response-window width


@dataclasses.dataclass(frozen=True)
class Layout:
  score: tuple[MicroBatch, ...]
  actor: tuple[tuple[MicroBatch, ...], ...]  # per minibatch
  critic: tuple[tuple[MicroBatch, ...], ...]  # per minibatch (empty without a separate critic)
  prefix: int = 0  # leading tokens every row shares, computed once (0: none)


def common_prefix_length(tokens: np.ndarray) -> int:
  """How many leading positions every row of `tokens [b, t]` holds the same token at."""
  tokens = np.asarray(tokens)
  same = np.all(tokens == tokens[:1], axis=0)
  return int(same.size if same.all() else np.argmin(same))


def shared_prefix_length(batch: dict[str, Any], multiple: int | None = None) -> int:
  """The shared prefix of a host batch's rows: their common leading tokens (all real, none padding), cut
  before the first position a response window predicts from (`index - 1`: those hidden states must be
  computed per row), rounded down to a multiple of `multiple` (default `PREFIX_MULTIPLE`)."""
  multiple = multiple or PREFIX_MULTIPLE
  attention = np.asarray(batch["attention_mask"]).astype(bool)
  real = attention.all(axis=0)
  n = min(common_prefix_length(batch["tokens"]), int(real.size if real.all() else np.argmin(real)))
  n = min(n, int(np.asarray(batch["index"])[:, 0].min()) - 1)
  return max(n, 0) // multiple * multiple


def row_extents(batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """Per row of a host batch: the tokens it holds (its attention mask's extent) and the window slots it
  trains on (the last slot of its response mask, plus one; 0 for a row with no response)."""
  attention = np.asarray(batch["attention_mask"]).astype(bool)
  response = np.asarray(batch["response_mask"]).astype(bool)
  t, w = attention.shape[1], response.shape[1]
  lengths = np.where(attention.any(axis=1), t - np.argmax(attention[:, ::-1], axis=1), 0)
  widths = np.where(response.any(axis=1), w - np.argmax(response[:, ::-1], axis=1), 0)
  return lengths.astype(np.int64), widths.astype(np.int64)


def _group(rows: Sequence[int], size: int, lengths, widths, length: int, width: int,
           by_length: bool) -> tuple[MicroBatch, ...]:
  rows = list(rows)
  if by_length:  # longest first, stable: equal lengths keep their order
    rows.sort(key=lambda r: -int(lengths[r]))
  out = []
  for i in range(0, len(rows), size):
    chunk = tuple(rows[i:i + size])
    longest = max(int(lengths[r]) for r in chunk)
    widest = max(int(widths[r]) for r in chunk)
    out.append(MicroBatch(chunk, min(train_length(max(longest, 2), minimum=MINIMUM), length),
                          min(train_length(max(widest, 1), minimum=MINIMUM), width)))
  return tuple(out)


def plan(lengths: np.ndarray, widths: np.ndarray, settings: Any, *, length: int, width: int,
         prefix: int = 0) -> Layout:
  """The layout for a batch whose rows hold `lengths` tokens and train on `widths` window slots, padded to
  `[b, length]` with windows `[b, width]`, the first `prefix` tokens shared by every row; `settings` is the
  learner's `PPOSettings`."""
  s = settings
  b = len(lengths)
  if b != s.batch_size or len(widths) != b:
    raise ValueError(f"layout: {b} rows ({len(widths)} widths) for a batch of {s.batch_size} episodes")
  if int(np.max(lengths, initial=0)) > length or int(np.max(widths, initial=0)) > width:
    raise ValueError(f"layout: rows of up to {int(np.max(lengths))} tokens / {int(np.max(widths))} window "
                     f"slots do not fit the batch's [{length}] / [{width}]")
  if prefix < 0 or (prefix and prefix >= int(np.min(lengths))):
    raise ValueError(f"layout: a shared prefix of {prefix} tokens must be shorter than every row "
                     f"(the shortest holds {int(np.min(lengths))})")
  by_length = s.loss_agg == "token_mean"
  score = _group(range(b), s.score_micro_batch_size, lengths, widths, length, width, True)
  minibatches = [range(m, m + s.mini_batch_size) for m in range(0, b, s.mini_batch_size)]
  actor = tuple(_group(rows, s.actor_micro_batch_size, lengths, widths, length, width, by_length)
                for rows in minibatches)
  separate = s.separate_critic and s.uses_critic
  critic = tuple(_group(rows, s.critic_micro_batch_size, lengths, widths, length, width, by_length)
                 for rows in minibatches) if separate else ()
  return Layout(score, actor, critic, prefix)
