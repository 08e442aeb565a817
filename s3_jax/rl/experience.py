"""The host side of a PPO step: rollouts → rewards → the padded training batch, with its metrics.

    episodes = run_episodes(policy, retriever, questions)      (sampling + retrieval, per turn)
    D_s3     = each episode's documents for the generator      (rollout.doc_extraction, selection)
    rewards  = RewardScorer.score(D_s3)                        (generator answers, span/judge, GBR)
    batch    = tokens and masks [b, t], the reward on each episode's last policy token

`response_mask` (policy ∪ observation tokens) is what GAE, whitening and the critic use; `policy_mask` what
the policy loss, entropy and KL use (spec §2.4).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from s3_jax.data.corpus import Doc
from s3_jax.data.qa import QAExample
from s3_jax.metrics import Stopwatch
from s3_jax.reward.service import RewardItem, RewardScorer
from s3_jax.search.batch import make_batch, train_length
from s3_jax.search.episode import Episode, EpisodeConfig, run_episodes
from s3_jax.sharding import host_gather, host_max


@dataclasses.dataclass
class Experience:
  batch: dict[str, np.ndarray]
  metrics: dict[str, float]
  episodes: list[Episode]
  rewards: list[float]


def collect(policy: Any, tokenizer: Any, retriever: Any, scorer: RewardScorer, examples: Sequence[QAExample],
            initial_docs: Sequence[Sequence[Doc]], episode_config: EpisodeConfig, rollout: Any, *,
            pad_id: int, watch: Stopwatch, max_length: int | None = None,
            group_offset: int = 0) -> Experience:
  """One batch of experience. Each question is rolled out `rollout.samples_per_question` times (its samples
  share a `group` id, for GRPO; ids start at `group_offset`, distinct per host). `max_length` caps the padded
  length (the context cap)."""
  n = rollout.samples_per_question
  examples = [ex for ex in examples for _ in range(n)]
  initial_docs = [docs for docs in initial_docs for _ in range(n)]
  timings: dict[str, float] = {}
  with watch("rollout"):
    episodes = run_episodes(policy, tokenizer, retriever, examples, initial_docs, episode_config, timings)
  for name, seconds in timings.items():
    watch.add(name, seconds)
  with watch("reward"):
    items = [RewardItem(e.example.data_source, e.example.question, e.example.golden_answers,
                        tuple(e.generator_docs(rollout.doc_extraction, episode_config.max_select,
                                               rollout.selection, tokenizer)))
             for e in episodes]
    results = scorer.score(items)
  rewards = [r.reward for r in results]
  # Every host pads to the same shapes (the longest episode of any host): the batch is one global array.
  longest = host_max(max(len(e.prompt_ids) + len(e.ids) for e in episodes))
  length = train_length(longest)
  if max_length is not None:
    length = min(length, max(train_length(max_length), longest))
  rb = make_batch(episodes, rewards, pad_id, length=length, allow_empty=True)
  batch = {"tokens": rb.tokens, "attention_mask": rb.attention_mask,
           **response_window(rb, [len(e.prompt_ids) for e in episodes],
                             train_length(host_max(max(len(e.ids) for e in episodes)), minimum=64)),
           "group": group_offset + np.repeat(np.arange(len(examples) // n, dtype=np.int32), n)}
  table = {k: host_gather(v) for k, v in episode_table(episodes, items, results).items()}
  counts = scorer.stats.take()
  totals = host_gather(np.array([[counts[k] for k in _COUNTS]], np.float64)).sum(axis=0)
  metrics = _metrics(table, dict(zip(_COUNTS, totals.tolist(), strict=True)))
  return Experience(batch, metrics, episodes, rewards)


def response_window(rb: Any, prompt_lengths: Sequence[int], width: int) -> dict[str, np.ndarray]:
  """The trained-on part of each row as a `[b, width]` window starting right after its prompt: `index` (the
  positions; slots past the row's end point at its last position and are masked), and the policy mask,
  response mask (policy ∪ observation) and scores in window coordinates."""
  t = rb.tokens.shape[1]
  positions = np.asarray(prompt_lengths, np.int64)[:, None] + np.arange(width)[None, :]
  inside = positions < t
  index = np.minimum(positions, t - 1).astype(np.int32)

  def take(array):
    return np.where(inside, np.take_along_axis(array, index, axis=1), 0).astype(array.dtype)

  return {"index": index, "policy_mask": take(rb.policy_mask),
          "response_mask": take(rb.policy_mask | rb.obs_mask), "scores": take(rb.rewards)}


_STATS = ("turns", "searches", "docs_selected", "invalid_actions", "duplicate_queries", "context_tokens",
          "policy_tokens", "ended_by_completion", "ended_by_cap")
_COUNTS = ("items", "cache_hits", "generator_calls", "judge_calls", "prompt_too_long")


def episode_table(episodes: Sequence[Episode], items: Sequence[RewardItem],
                  results: Sequence[Any]) -> dict[str, np.ndarray]:
  """One number per episode for every metric's input (gathered over hosts before the metrics)."""
  stats = [e.stats() for e in episodes]
  table = {k: np.array([float(s[k]) for s in stats]) for k in _STATS}
  table["reward"] = np.array([r.reward for r in results], np.float64)
  for k in ("genacc", "em", "span"):
    table[k] = np.array([float(getattr(r.scores, k)) for r in results])
  table["f1"] = np.array([r.scores.f1 for r in results], np.float64)
  table["rag_genacc"] = np.array([np.nan if r.rag_genacc is None else float(r.rag_genacc) for r in results])
  table["generator_docs"] = np.array([float(len(item.docs)) for item in items])
  return table


def _metrics(table: dict[str, np.ndarray], counts: dict[str, float]) -> dict[str, float]:
  def mean(key: str) -> float:
    return float(np.mean(table[key])) if len(table[key]) else 0.0

  out = {
      "reward/mean": mean("reward"),
      "reward/std": float(np.std(table["reward"])),
      "reward/genacc": mean("genacc"),
      "reward/em": mean("em"),
      "reward/span": mean("span"),
      "reward/f1": mean("f1"),
      "rollout/turns": mean("turns"),
      "rollout/searches": mean("searches"),
      "rollout/docs_selected": mean("docs_selected"),
      "rollout/invalid_action_rate": float(table["invalid_actions"].sum() / max(table["turns"].sum(), 1)),
      "rollout/duplicate_queries": mean("duplicate_queries"),
      "rollout/context_tokens": mean("context_tokens"),
      "rollout/policy_tokens": mean("policy_tokens"),
      "rollout/ended_by_completion": mean("ended_by_completion"),
      "rollout/ended_by_cap": mean("ended_by_cap"),
      "rollout/empty_episodes": float(np.sum(table["policy_tokens"] == 0)),
      "rollout/generator_docs": mean("generator_docs"),
  }
  rag = table["rag_genacc"][np.isfinite(table["rag_genacc"])]
  if len(rag):
    out["reward/rag_genacc"] = float(np.mean(rag))
  out["reward/cache_hit_rate"] = counts["cache_hits"] / counts["items"] if counts["items"] else 0.0
  out["reward/generator_calls"] = float(counts["generator_calls"])
  out["reward/judge_calls"] = float(counts["judge_calls"])
  out["reward/prompt_too_long"] = float(counts["prompt_too_long"])
  return out
