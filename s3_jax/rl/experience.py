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
  longest = max(len(e.prompt_ids) + len(e.ids) for e in episodes)
  length = train_length(longest)
  if max_length is not None:
    length = min(length, max(train_length(max_length), longest))
  rb = make_batch(episodes, rewards, pad_id, length=length, allow_empty=True)
  batch = {"tokens": rb.tokens, "attention_mask": rb.attention_mask,
           **response_window(rb, [len(e.prompt_ids) for e in episodes],
                             train_length(max(len(e.ids) for e in episodes), minimum=64)),
           "group": group_offset + np.repeat(np.arange(len(examples) // n, dtype=np.int32), n)}
  return Experience(batch, _metrics(episodes, items, results, scorer), episodes, rewards)


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


def _metrics(episodes: Sequence[Episode], items: Sequence[RewardItem], results: Sequence[Any],
             scorer: RewardScorer) -> dict[str, float]:
  stats = [e.stats() for e in episodes]

  def mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else 0.0

  turns = sum(s["turns"] for s in stats)
  out = {
      "reward/mean": mean(r.reward for r in results),
      "reward/std": float(np.std([r.reward for r in results])),
      "reward/genacc": mean(r.scores.genacc for r in results),
      "reward/em": mean(r.scores.em for r in results),
      "reward/span": mean(r.scores.span for r in results),
      "reward/f1": mean(r.scores.f1 for r in results),
      "rollout/turns": mean(s["turns"] for s in stats),
      "rollout/searches": mean(s["searches"] for s in stats),
      "rollout/docs_selected": mean(s["docs_selected"] for s in stats),
      "rollout/invalid_action_rate": sum(s["invalid_actions"] for s in stats) / max(turns, 1),
      "rollout/duplicate_queries": mean(s["duplicate_queries"] for s in stats),
      "rollout/context_tokens": mean(s["context_tokens"] for s in stats),
      "rollout/policy_tokens": mean(s["policy_tokens"] for s in stats),
      "rollout/ended_by_completion": mean(s["ended_by_completion"] for s in stats),
      "rollout/ended_by_cap": mean(s["ended_by_cap"] for s in stats),
      "rollout/empty_episodes": float(sum(s["policy_tokens"] == 0 for s in stats)),
      "rollout/generator_docs": mean(len(item.docs) for item in items),
  }
  rag = [r.rag_genacc for r in results if r.rag_genacc is not None]
  if rag:
    out["reward/rag_genacc"] = mean(rag)
  scorer_stats = scorer.stats.take()
  out["reward/cache_hit_rate"] = scorer_stats["cache_hit_rate"]
  out["reward/generator_calls"] = float(scorer_stats["generator_calls"])
  out["reward/judge_calls"] = float(scorer_stats["judge_calls"])
  out["reward/prompt_too_long"] = float(scorer_stats["prompt_too_long"])
  return out

