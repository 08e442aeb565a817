"""How much signal a searcher gives PPO before training: its episodes on training questions, scored with the
training reward, no update (the untrained searcher vs a warm start).

  python -m s3_jax.probe --config configs/NAME.py[:arg] [--init DIR] [--questions 32] [--skip 64]
      [--seed 0] [--out FILE.json] [--config.key=value ...]

Runs `--questions` questions of the trainer's own training set (s3's filtered questions, in file order; those
among the first `--skip` questions of `data.train` are left out, e.g. the ones `python -m s3_jax.sft` traced)
through the trainer's `experience.rollout` and `experience.reward` with the config's rollout settings
(temperature, sizes, begin-with-search) and the searcher `--init` (an HF folder; default
`searcher.init_from`), and prints what the trainer's step-1 metrics would say: the reward (GBR), rollout
GenAcc, protocol use (searches, selections, invalid actions, how episodes ended), how many episodes earn a
nonzero reward — the ones PPO can learn from — and the generator's ceiling on the same questions (`_ceiling`:
its GenAcc given answer-bearing documents, an analysis that reads the gold answers). `--out` writes the
metrics and every episode (queries, selections, answer verdict, reward) as JSON.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# The s3 template's example query (s3_protocol.md §2.1): copying it is not a search.
PLACEHOLDER = "[search query]"


def probe(config: Any, *, init: str | None, questions: int, skip: int, seed: int,
          log: Callable[[str], None] = print, policy_for: Callable[[list, Any], Any] | None = None
          ) -> dict[str, Any]:
  """The probe's record: settings, metrics (the trainer's keys plus `probe/*`) and one row per episode.
  `policy_for(examples, tokenizer)`: a `Policy` to use instead of the searcher `init` (tests)."""
  import jax

  from s3_jax import assets
  from s3_jax.data.qa import read_qa
  from s3_jax.metrics import Stopwatch
  from s3_jax.models import precision
  from s3_jax.models import tokenizer as tokenizer_lib
  from s3_jax.models.hf import load_hf
  from s3_jax.models.sampler import Sampler
  from s3_jax.models.tokenizer import load_tokenizer
  from s3_jax.precompute import precompute_dir, run_precompute
  from s3_jax.reward.cache import AnswerCache
  from s3_jax.reward.scorer import scorer_from_config
  from s3_jax.rl import experience
  from s3_jax.search.episode import EpisodeConfig, SamplerPolicy
  from s3_jax.services.connect import open_services
  from s3_jax.train import _with_splits

  if questions < 1 or skip < 0:
    raise ValueError(f"--questions {questions} must be positive and --skip {skip} at least 0")
  init = init or config.searcher.init_from
  if not init and policy_for is None:
    raise ValueError("no searcher: pass --init DIR (an HF folder) or set searcher.init_from")
  skipped = {(e.data_source, e.question) for e in read_qa(assets.resolve(config.data.train))[:skip]}
  start = time.perf_counter()
  with open_services(config, show_progress=False, log=log) as services:
    folder = precompute_dir(config)
    run_precompute(_with_splits(config, "train"), folder, retriever=services.retriever,
                   generator=services.generator, show_progress=False, log=log)
    from s3_jax.data.training import load_training_data

    data = load_training_data(folder, batch_size=1, seed=config.data.shuffle_seed)
    examples = [e for e in data.examples if (e.data_source, e.question) not in skipped][:questions]
    if len(examples) < questions:
      raise ValueError(f"--questions {questions}: only {len(examples)} filtered training questions are left "
                       f"after --skip {skip} (raise data.train_limit or lower --questions)")
    initial = [data.retrieved[(e.data_source, e.question)][:config.rollout.initial_docs]
               if config.rollout.begin_with_search else [] for e in examples]
    tokenizer = load_tokenizer(assets.resolve(config.searcher.tokenizer))
    pad_id = tokenizer_lib.pad_id(tokenizer)
    if policy_for is not None:
      policy = policy_for(examples, tokenizer)
    else:
      model = load_hf(assets.resolve(init), compute_dtype=precision.dtype(config.searcher.compute_dtype))
      sampler = Sampler(model, tokenizer=tokenizer, pad_token_id=pad_id,
                        attention_kernel=config.rollout.attention_kernel,
                        matmul_kernel=config.rollout.matmul_kernel,
                        compute_dtype=precision.sampling_dtype(config))
      policy = SamplerPolicy(sampler, temperature=config.rollout.temperature, top_p=config.rollout.top_p,
                             top_k=config.rollout.top_k, rng=jax.random.key(seed),
                             keep_cache=config.rollout.keep_cache)
    scorer = scorer_from_config(config, services.generator, kind=config.reward.kind, rag_cache=data.rag_cache,
                                cache=AnswerCache(folder / "answers.sqlite"))
    watch = Stopwatch()
    episode_config = EpisodeConfig.from_config(config)
    episodes = experience.rollout(policy, tokenizer, services.retriever, examples, initial, episode_config,
                                  samples_per_question=config.rollout.samples_per_question, watch=watch)
    items, results = experience.reward(scorer, episodes, tokenizer, config.rollout, episode_config.max_select)
    step_metrics = experience.rollout_metrics(episodes, items, results, scorer)
    ceiling = _ceiling(scorer, examples, data.retrieved, config.precompute.context_docs)
  rewards = np.asarray([r.reward for r in results], np.float64)
  queries = [q for e in episodes for q in e.queries]
  metrics = {**step_metrics,
             "probe/episodes": float(len(episodes)),
             "probe/nonzero_reward": float(np.sum(rewards != 0)),
             "probe/positive_reward": float(np.sum(rewards > 0)),
             "probe/episodes_with_a_search": float(sum(bool(e.queries) for e in episodes)),
             "probe/placeholder_queries": float(sum(PLACEHOLDER in q for q in queries)),
             "probe/queries": float(len(queries)),
             "probe/answer_in_top12": float(sum(c["found"] for c in ceiling)),
             "probe/oracle_genacc": float(np.mean([c["genacc"] for c in ceiling])),
             "probe/seconds": time.perf_counter() - start}
  rows = [{"question": e.example.question, "answers": list(e.example.golden_answers), "queries": e.queries,
           "responses": e.responses, "block_sizes": [len(b) for b in e.blocks], "ended": e.ended,
           "invalid_actions": e.invalid_actions, "docs_selected": e.docs_selected(), "reward": r,
           "oracle": c} for e, r, c in zip(episodes, rewards.tolist(), ceiling, strict=True)]
  return {"init": str(init or "scripted"), "questions": questions, "skip": skip, "seed": seed,
          "data": config.data.train, "metrics": metrics, "episodes": rows}


def _ceiling(scorer: Any, examples: Sequence[Any], retrieved: dict, k: int) -> list[dict[str, Any]]:
  """The generator's ceiling on these questions (an analysis that reads the gold answers, never a training
  signal): its GenAcc given the first `k` of the question's own top-12 BM25 documents that contain a gold
  answer (span match on title and text). `found`: whether any of the 12 does. A question whose answer is in
  none of them can still be answered after a reformulated query; one whose oracle documents do not get a right
  answer is beyond this generator whatever the searcher does."""
  from s3_jax.reward.answers import span_match
  from s3_jax.reward.scorer import RewardItem

  chosen = [[d for d in retrieved[(e.data_source, e.question)]
             if span_match(f"{d.title} {d.text}", e.golden_answers)][:k] for e in examples]
  items = [RewardItem(e.data_source, e.question, e.golden_answers, tuple(docs))
           for e, docs in zip(examples, chosen, strict=True) if docs]
  results = iter(scorer.rewards(items)) if items else iter(())
  return [{"found": bool(docs), "docs": len(docs),
           "genacc": float(next(results).scores.genacc) if docs else 0.0}
          for docs in chosen]


def summary(record: dict[str, Any]) -> str:
  m = record["metrics"]
  n = int(m["probe/episodes"])
  return (f"{record['init']}: {n} episodes | reward (GBR) {m['reward/mean']:.3f}, rollout GenAcc "
          f"{m['reward/genacc']:.3f}, nonzero reward {int(m['probe/nonzero_reward'])}/{n} "
          f"(positive {int(m['probe/positive_reward'])}) | searches/episode {m['rollout/searches']:.2f} "
          f"({int(m['probe/episodes_with_a_search'])}/{n} episodes search; "
          f"{int(m['probe/placeholder_queries'])}/{int(m['probe/queries'])} queries are the template's "
          f"placeholder), docs selected/episode "
          f"{m['rollout/docs_selected']:.2f}, invalid-action rate {m['rollout/invalid_action_rate']:.3f}, "
          f"ended by <search_complete> {m['rollout/ended_by_completion']:.2f} | ceiling: an answer in the "
          f"question's top 12 for {int(m['probe/answer_in_top12'])}/{n}, GenAcc on those documents "
          f"{m['probe/oracle_genacc']:.3f} | {m['probe/seconds']:.0f} s")


def main() -> None:
  from absl import flags

  from s3_jax import cli as cli_lib

  config_flag = cli_lib.config_flag()
  init_flag = flags.DEFINE_string("init", None, "the searcher: an HF folder (default searcher.init_from)")
  questions_flag = flags.DEFINE_integer("questions", 32, "filtered training questions to roll out")
  skip_flag = flags.DEFINE_integer("skip", 64, "leave out the first N questions of data.train (SFT's)")
  seed_flag = flags.DEFINE_integer("seed", 0, "the sampling RNG")
  out_flag = flags.DEFINE_string("out", None, "write the record (metrics and episodes) here as JSON")

  def body(config) -> None:
    record = probe(config, init=init_flag.value, questions=questions_flag.value, skip=skip_flag.value,
                   seed=seed_flag.value)
    print(summary(record))
    if out_flag.value:
      Path(out_flag.value).parent.mkdir(parents=True, exist_ok=True)
      Path(out_flag.value).write_text(json.dumps(record, indent=1) + "\n")
      print(f"wrote {out_flag.value}")

  cli_lib.run(body, config_flag, errors=(ValueError, FileNotFoundError, RuntimeError))


if __name__ == "__main__":
  main()
