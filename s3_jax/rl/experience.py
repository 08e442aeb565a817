"""The host side of a PPO step: rollouts → rewards → the padded training batch, with its metrics.

    episodes       = rollout(policy, retriever, questions)       (sampling + retrieval, per turn)
    items, results = reward(scorer, episodes)                    (D_s3 → generator answers, span/judge, GBR)
    batch          = training_batch(episodes, rewards)           (tokens and masks [b, t], reward on the
                                                                  episode's last policy token)
    metrics        = rollout_metrics(episodes, items, results)

`response_mask` (policy ∪ observation tokens) is what GAE, whitening and the critic use; `policy_mask` what
the policy loss, entropy and KL use (s3_protocol.md §2.4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from s3_jax.data.corpus import Doc
from s3_jax.data.qa import QAExample
from s3_jax.metrics import Stopwatch
from s3_jax.reward.scorer import RewardItem, RewardScorer
from s3_jax.rl.batch import make_batch, train_length
from s3_jax.search.episode import Episode, EpisodeConfig, run_episodes
from s3_jax.sharding import host_gather, host_max


def rollout(policy: Any, tokenizer: Any, retriever: Any, examples: Sequence[QAExample],
            initial_docs: Sequence[Sequence[Doc]], episode_config: EpisodeConfig, *,
            samples_per_question: int, watch: Stopwatch) -> list[Episode]:
  """Each question rolled out `samples_per_question` times, in order (a question's samples are adjacent);
  the time goes to `watch` as "rollout", with its "sample" and "retrieve" parts."""
  n = samples_per_question
  examples = [ex for ex in examples for _ in range(n)]
  initial_docs = [docs for docs in initial_docs for _ in range(n)]
  with watch("rollout"):
    return run_episodes(policy, tokenizer, retriever, examples, initial_docs, episode_config, watch)


def reward(scorer: RewardScorer, episodes: Sequence[Episode], tokenizer: Any, rollout_config: Any,
           max_select: int) -> tuple[list[RewardItem], list[Any]]:
  """Each episode's D_s3 (`rollout.doc_extraction`, selection) scored by `scorer`: the generator's answer,
  GenAcc and the reward. Returns the items scored and their results, in episode order."""
  items = [RewardItem(e.example.data_source, e.example.question, e.example.golden_answers,
                      tuple(e.generator_docs(rollout_config.doc_extraction, max_select,
                                             rollout_config.selection, tokenizer)))
           for e in episodes]
  return items, scorer.rewards(items)


def training_batch(episodes: Sequence[Episode], rewards: Sequence[float], *, pad_id: int,
                   samples_per_question: int, max_length: int | None = None,
                   group_offset: int = 0) -> dict[str, np.ndarray]:
  """The padded `[b, t]` batch the learner trains on (`learner.BATCH_KEYS`), each episode's reward on its last
  policy token. Every host pads to the same shapes (the longest episode of any host): the batch is one global
  array. `max_length` caps the padded length (the context cap); samples of a question share a `group` id
  (GRPO), counted from `group_offset` (distinct per host)."""
  longest = host_max(max(len(e.prompt_ids) + len(e.ids) for e in episodes))
  length = train_length(longest)
  if max_length is not None:
    length = min(length, max(train_length(max_length), longest))
  rb = make_batch(episodes, rewards, pad_id, length=length, allow_empty=True)
  questions = len(episodes) // samples_per_question
  return {"tokens": rb.tokens, "attention_mask": rb.attention_mask,
          **response_window(rb, [len(e.prompt_ids) for e in episodes],
                            train_length(host_max(max(len(e.ids) for e in episodes)), minimum=64)),
          "group": group_offset + np.repeat(np.arange(questions, dtype=np.int32), samples_per_question)}


def rollout_metrics(episodes: Sequence[Episode], items: Sequence[RewardItem], results: Sequence[Any],
                    scorer: RewardScorer) -> dict[str, float]:
  """The `reward/*` and `rollout/*` metrics of the step, over every host's episodes (takes the scorer's
  counters)."""
  table = {k: host_gather(v) for k, v in episode_table(episodes, items, results).items()}
  counts = scorer.stats.take()
  totals = host_gather(np.array([[counts[k] for k in _COUNTS]], np.float64)).sum(axis=0)
  return _metrics(table, dict(zip(_COUNTS, totals.tolist(), strict=True)))


def episode_records(episodes: Sequence[Episode], items: Sequence[RewardItem], results: Sequence[Any],
                    step: int) -> list[dict[str, Any]]:
  """One JSON-ready row per episode of a step: the question, what the searcher did each turn (its text as
  parsed, its queries, how the episode ended), the documents the generator saw, its answer, the scores and
  the reward: what `checkpoint.rollouts` writes to `rollouts/step_N.jsonl` (verl's `rollout_data_dir`)."""
  rows = []
  for index, (e, item, result) in enumerate(zip(episodes, items, results, strict=True)):
    rows.append({"step": step, "index": index, "data_source": e.example.data_source, "id": e.example.id,
                 "question": e.example.question, "golden_answers": list(e.example.golden_answers),
                 "responses": list(e.responses), "queries": list(e.queries), "ended": e.ended, **e.stats(),
                 "generator_docs": [d.title for d in item.docs], "answer": result.answer,
                 "finish_reason": result.finish_reason, "scores": result.scores.as_dict(),
                 "rag_genacc": result.rag_genacc, "reward": result.reward})
  return rows


def response_window(rb: Any, prompt_lengths: Sequence[int], width: int) -> dict[str, np.ndarray]:
  """The trained-on part of each row as a `[b, width]` window starting right after its prompt: `index` (the
  positions; slots past the row's end point at its last position and are masked), and the policy mask,
  response mask (policy ∪ observation) and token scores in window coordinates."""
  t = rb.tokens.shape[1]
  positions = np.asarray(prompt_lengths, np.int64)[:, None] + np.arange(width)[None, :]
  inside = positions < t
  index = np.minimum(positions, t - 1).astype(np.int32)

  def take(array):
    return np.where(inside, np.take_along_axis(array, index, axis=1), 0).astype(array.dtype)

  return {"index": index, "policy_mask": take(rb.policy_mask),
          "response_mask": take(rb.policy_mask | rb.obs_mask), "token_scores": take(rb.rewards)}


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
      # the episodes PPO can learn from: with GBR on s3's filtered questions most rewards are 0
      "reward/nonzero": float(np.mean(table["reward"] != 0)) if len(table["reward"]) else 0.0,
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
