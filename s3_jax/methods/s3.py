"""The s3 searcher as an evaluation method: load a searcher (`models/searcher.py`: a training run, an HF
folder such as the released `pat-jj/s3-8-3-3-20steps`, or the config's own initial searcher), roll it out
with the s3 protocol over the evaluation questions, and hand D_s3 to the generator.

Rollouts sample as in training, at `rollout.temperature` / `rollout.top_p` (0.6 / 0.95): s3's evaluation is
not greedy either (its `do_sample=False` never reaches vLLM, s3_protocol.md §2.2 and §12 item 7), which is why
the paper averages 3 runs (`--runs 3`). The initial block is the question's top `evaluate.initial_docs` (3, as
s3's test prompts) naive-retrieval documents; turns, top-k and selection follow `rollout.*` (8-3-3 by
default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_collections

from s3_jax.data.eval_sets import retrieval_query
from s3_jax.data.qa import QAExample
from s3_jax.methods.base import MethodOutput
from s3_jax.metrics import Stopwatch
from s3_jax.models import precision
from s3_jax.models.searcher import load_searcher
from s3_jax.search.episode import EpisodeConfig, SamplerPolicy, run_episodes


class S3Searcher:
  """`s3`: the trained searcher's D_s3 (selected documents first, then the initial block's unclaimed ones)."""

  name = "s3"

  def __init__(self, config: ml_collections.ConfigDict, retriever: Any, agent: Any = None, *,
               checkpoint: str | None = None, watch: Stopwatch | None = None, mesh: Any = None):
    from s3_jax.models import tokenizer as tokenizer_lib
    from s3_jax.models.sampler import Sampler

    self.config, self.retriever = config, retriever
    self.watch = watch if watch is not None else Stopwatch()
    model, self.tokenizer, self.source = load_searcher(config, checkpoint)
    self.pad_id = tokenizer_lib.pad_id(self.tokenizer)
    self.sampler = Sampler(model, tokenizer=self.tokenizer, pad_token_id=self.pad_id, mesh=mesh,
                           rules=[tuple(r) for r in config.sampling_sharding_rules],
                           attention_kernel=config.rollout.attention_kernel,
                           matmul_kernel=config.rollout.matmul_kernel,
                           compute_dtype=precision.sampling_dtype(config))
    self.episode_config = EpisodeConfig.from_config(config)
    r = config.rollout
    self.label = f"s3 {r.topk}-{r.max_select}-{r.max_turns} ({self.source})"

  def run(self, examples: Sequence[QAExample], seed: int = 0) -> list[MethodOutput]:
    import jax

    r = self.config.rollout
    initial = (self.retriever.search([retrieval_query(ex.question) for ex in examples],
                                     self.config.evaluate.initial_docs)
               if r.begin_with_search else [[] for _ in examples])
    policy = SamplerPolicy(self.sampler, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                           rng=jax.random.key(seed), keep_cache=r.keep_cache)
    # the episode loop times its own sampling and retrieval (so the untimed retriever, not the timed one)
    episodes = run_episodes(policy, self.tokenizer, getattr(self.retriever, "retriever", self.retriever),
                            examples, initial, self.episode_config, self.watch)
    return [MethodOutput(docs=e.generator_docs(r.doc_extraction, self.episode_config.max_select, r.selection,
                                               self.tokenizer),
                         trace={"queries": e.queries, "turns": len(e.responses), "ended": e.ended,
                                "docs_selected": e.docs_selected(), "responses": e.responses})
            for e in episodes]
