"""The s3 searcher as an evaluation method: load a searcher (a training run, an HF folder such as the
released `pat-jj/s3-8-3-3-20steps`, or the config's own initial searcher), roll it out with the s3 protocol
over the evaluation questions, and hand D_s3 to the generator.

Rollouts sample as in training, at `rollout.temperature` / `rollout.top_p` (0.6 / 0.95): s3's evaluation is
not greedy either (its `do_sample=False` never reaches vLLM, s3_protocol.md §2.2 and §12 item 7), which is why
the paper averages 3 runs (`--runs 3`). The initial block is the question's top `evaluate.initial_docs` (3, as
s3's test prompts) naive-retrieval documents; turns, top-k and selection follow `rollout.*` (8-3-3 by
default).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from s3_jax import assets
from s3_jax.baselines.base import MethodOutput, Timings
from s3_jax.data.eval_sets import retrieval_query
from s3_jax.data.qa import QAExample
from s3_jax.models import precision
from s3_jax.models.config import DecoderConfig
from s3_jax.search.episode import EpisodeConfig, SamplerPolicy, run_episodes


def decoder_config(config: ml_collections.ConfigDict, tokenizer: Any) -> DecoderConfig:
  """The randomly initialised searcher of a config without `searcher.init_from` (`searcher.model`)."""
  m = config.searcher.model
  return DecoderConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.mlp_size,
                       num_layers=m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
                       head_dim=m.head_dim, rope_theta=m.rope_theta, tie_embeddings=m.tie_embeddings,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       max_position_embeddings=max(8192, 2 * config.rollout.max_prompt_length))


def resolve_checkpoint(checkpoint: str) -> tuple[Path, str]:
  """An HF folder (or `asset:NAME`) as is; a training workdir (or its `hf/`) -> its newest `hf/step_N`
  export. Returns the folder and a description."""
  folder = assets.resolve(checkpoint) if checkpoint.startswith("asset:") else Path(checkpoint).expanduser()
  # A training workdir holds a config.json too (the run's config record): it is a run when it has hf/ or
  # checkpoints/.
  run = (folder / "hf").is_dir() or (folder / "checkpoints").is_dir()
  if (folder / "config.json").is_file() and not run:
    return folder, str(folder)
  exports = folder / "hf" if (folder / "hf").is_dir() else folder
  steps = sorted((int(m.group(1)), p) for p in exports.glob("step_*")
                 if (m := re.fullmatch(r"step_(\d+)", p.name)) and (p / "config.json").is_file())
  if steps:
    step, path = steps[-1]
    return path, f"{folder} (step {step})"
  if (folder / "checkpoints").is_dir():
    raise FileNotFoundError(f"{folder}: a training run without HF exports; evaluate one of its exports "
                            f"(train with checkpoint.hf_export_every > 0) or pass an HF model folder")
  raise FileNotFoundError(f"checkpoint {checkpoint!r}: not an HF model folder (no config.json) nor a "
                          f"training run with hf/step_N exports")


def load_searcher(config: ml_collections.ConfigDict, checkpoint: str | None) -> tuple[Any, Any, str]:
  """`(decoder, tokenizer, description)`: `checkpoint`, else `searcher.init_from`, else a random searcher
  (`searcher.model`, seeded by `seed`)."""
  from flax import nnx

  from s3_jax.models.decoder import Decoder
  from s3_jax.models.hf import load_hf
  from s3_jax.models.tokenizer import load_tokenizer

  dtype = precision.DTYPES[config.searcher.param_dtype]
  compute = precision.dtype(config.searcher.compute_dtype)
  source = checkpoint or config.searcher.init_from
  if source:
    folder, description = resolve_checkpoint(source)
    tokenizer = load_tokenizer(folder if (folder / "tokenizer.json").is_file()
                               else assets.resolve(config.searcher.tokenizer))
    return load_hf(folder, dtype=dtype, compute_dtype=compute), tokenizer, description
  tokenizer = load_tokenizer(assets.resolve(config.searcher.tokenizer))
  model = Decoder(decoder_config(config, tokenizer), rngs=nnx.Rngs(config.seed), param_dtype=dtype,
                  compute_dtype=compute)
  return model, tokenizer, f"random searcher (seed {config.seed})"


class S3Searcher:
  """`s3`: the trained searcher's D_s3 (selected documents first, then the initial block's unclaimed ones)."""

  name = "s3"

  def __init__(self, config: ml_collections.ConfigDict, retriever: Any, agent: Any = None, *,
               checkpoint: str | None = None, timings: Timings | None = None, mesh: Any = None):
    from s3_jax.models import tokenizer as tokenizer_lib
    from s3_jax.models.sampler import Sampler

    self.config, self.retriever = config, retriever
    self.timings = timings if timings is not None else Timings()
    model, self.tokenizer, self.source = load_searcher(config, checkpoint)
    self.pad_id = tokenizer_lib.pad_id(self.tokenizer)
    self.sampler = Sampler(model, tokenizer=self.tokenizer, pad_token_id=self.pad_id, mesh=mesh,
                           rules=[tuple(r) for r in config.sampling_sharding_rules])
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
    own: dict[str, float] = {}  # the episode loop times its own sampling and retrieval
    episodes = run_episodes(policy, self.tokenizer, getattr(self.retriever, "retriever", self.retriever),
                            examples, initial,
                            self.episode_config, own)
    self.timings.add("sample", own.get("sample", 0.0))
    self.timings.add("retrieve", own.get("retrieve", 0.0))
    return [MethodOutput(docs=e.generator_docs(r.doc_extraction, self.episode_config.max_select, r.selection,
                                               self.tokenizer),
                         trace={"queries": e.queries, "turns": len(e.responses), "ended": e.ended,
                                "docs_selected": e.docs_selected(), "responses": e.responses})
            for e in episodes]
