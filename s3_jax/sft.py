"""A format warm start for the searcher: supervised fine-tuning on mechanically generated s3 protocol traces
that encode no answer, so PPO starts from a searcher that follows the protocol.

  python -m s3_jax.sft --config configs/NAME.py[:arg] --out DIR [--questions 64] [--epochs 2] [--lr 1e-5]
      [--micro 2] [--seed 0] [--config.key=value ...]

then train from it: `python -m s3_jax.train --config ... --config.searcher.init_from=DIR`.

Why: an untrained small model rarely follows s3's protocol (32 SmolLM2 first turns under the s3 prompt: 10
`<search_complete>`, 21 invalid, 1 search whose query was the template's `[search query]`), so PPO sees
almost no valid episode to learn from. This runs `--questions` training questions (the first of
`data.train`, in file order) through the real episode loop — the same prompt, initial block, observations,
nudges and token ids a rollout produces — with a policy whose turns follow a rule that never looks at the
gold answers (`plan`, seeded per question):

  searches: 0, 1 or 2 (weights 0.25 / 0.5 / 0.25, at most the config's search rounds);
  query 1: the question's words without stop words; query 2: the same without its first word;
  after each search: `<important_info>` with the block's first 1-3 documents by retrieval rank, then
  `<search_complete>` False (and the next query) or True.

The traces teach the format only; which queries and documents help is left to PPO. It then fine-tunes
the searcher on each episode's policy tokens (what PPO trains on), plus the EOS token after a final
`<search_complete>` (so the warm-started model stops there instead of running to the turn's token limit),
with a token-mean NLL and AdamW, and saves DIR as a Hugging Face folder (weights and tokenizer) with
`sft.json`: the plans, the loss per step and the settings.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

STOP_WORDS = frozenset(
    "a an and are as at be by did do does for from had has have how in into is it its of on or that the "
    "their there these this those to was were what when where which who whom whose why with would".split())

SEARCH_WEIGHTS = (0.25, 0.5, 0.25)  # P(0, 1, 2 searches)


def keywords(question: str) -> str:
  """The question's words (letters, digits, apostrophes, hyphens) without stop words, in order."""
  words = re.findall(r"[\w'-]+", question)
  kept = [w for w in words if w.lower() not in STOP_WORDS]
  return " ".join(kept or words)


@dataclasses.dataclass(frozen=True)
class Plan:
  """One episode's rule: the queries it sends and how many documents it selects after each search."""
  queries: tuple[str, ...]
  selects: tuple[int, ...]


def plan(question: str, rng: np.random.Generator, max_searches: int, max_select: int) -> Plan:
  searches = int(rng.choice(len(SEARCH_WEIGHTS), p=SEARCH_WEIGHTS))
  searches = min(searches, max_searches)
  first = keywords(question)
  rest = first.split(" ", 1)[1] if " " in first else first + " overview"
  queries = (first, rest)[:searches]
  return Plan(queries, tuple(int(rng.integers(1, max_select + 1)) for _ in queries))


def query_text(query: str) -> str:
  """A `<query>` turn in the prompt's own JSON layout, ending at `</query>` (where sampling stops)."""
  return "<query>\n{\n    \"query\": " + json.dumps(query) + "\n}\n</query>"


def turn_texts(p: Plan) -> list[str]:
  """The policy's text for each turn of `p`: turn 0 follows the initial block, turn i the i-th search."""
  complete = "<search_complete>\nTrue\n</search_complete>"
  if not p.queries:
    return [complete]
  texts = [query_text(p.queries[0])]
  for i, k in enumerate(p.selects):
    select = "<important_info>\n[" + ", ".join(str(j) for j in range(1, k + 1)) + "]\n</important_info>\n"
    more = i + 1 < len(p.queries)
    texts.append(select + ("<search_complete>\nFalse\n</search_complete>\n" + query_text(p.queries[i + 1])
                           if more else complete))
  return texts


class ScriptedPolicy:
  """A `Policy` (`search.episode`) that answers turn t of episode i with `scripts[i][t]`, tokenized."""

  def __init__(self, tokenizer: Any, scripts: Sequence[Sequence[str]]):
    self.tokenizer, self.scripts = tokenizer, scripts
    self.turn: dict[int, int] = {}

  def sample(self, contexts, max_new_tokens, keys=None):
    if keys is None:
      raise ValueError("ScriptedPolicy needs the episode keys (run_episodes passes them)")
    out = []
    for (_, index), limit in zip(keys, max_new_tokens, strict=True):
      t = self.turn.get(index, 0)
      self.turn[index] = t + 1
      script = self.scripts[index]
      if t >= len(script):
        raise RuntimeError(f"episode {index}: turn {t} asked for, the script has {len(script)} turns")
      ids = self.tokenizer(script[t], add_special_tokens=False)["input_ids"]
      if len(ids) > limit:
        raise ValueError(f"episode {index}, turn {t}: the scripted turn is {len(ids)} tokens, the turn may "
                         f"have {limit} (rollout.max_response_length or the context's room)")
      out.append(ids)
    return out


@dataclasses.dataclass
class Trace:
  tokens: list[int]  # prompt + trajectory (+ EOS after a final `<search_complete>`)
  loss_mask: list[bool]  # per token: trained on
  ended: str


def make_traces(config: Any, tokenizer: Any, retriever: Any, examples: Sequence[Any], seed: int
                ) -> tuple[list[Trace], list[Plan]]:
  """Episodes of `examples` under their plans, through `run_episodes` (the rollout's own loop)."""
  from s3_jax.data.eval_sets import retrieval_query
  from s3_jax.search.episode import EpisodeConfig, initial_blocks, run_episodes

  episode_config = EpisodeConfig.from_config(config)
  rounds = episode_config.max_turns + 1 if episode_config.turn_semantics == "s3" else episode_config.max_turns
  rng = np.random.default_rng(seed)
  plans = [plan(ex.question, rng, min(2, rounds), episode_config.max_select) for ex in examples]
  r = config.rollout
  initial = initial_blocks(retriever.search([retrieval_query(ex.question) for ex in examples],
                                            r.initial_docs) if r.begin_with_search else [[]] * len(examples),
                           r.begin_with_search, r.initial_docs)
  episodes = run_episodes(ScriptedPolicy(tokenizer, [turn_texts(p) for p in plans]), tokenizer, retriever,
                          examples, initial, episode_config)
  eos = tokenizer.eos_token_id
  traces = []
  for e, p in zip(episodes, plans, strict=True):
    if len(e.responses) != len(turn_texts(p)):
      raise RuntimeError(f"question {e.example.id!r}: the episode took {len(e.responses)} turns, its plan "
                         f"{len(turn_texts(p))} (ended: {e.ended}); raise rollout.max_prompt_length?")
    tokens, mask = e.prompt_ids + e.ids, [False] * len(e.prompt_ids) + list(e.policy_mask)
    if e.ended == "complete" and eos is not None:
      tokens, mask = [*tokens, eos], [*mask, True]
    traces.append(Trace(tokens, mask, e.ended))
  return traces, plans


def _bucket(n: int, unit: int) -> int:
  return -(-n // unit) * unit


def train(decoder_config: Any, params: Any, traces: Sequence[Trace], *, epochs: int, lr: float, micro: int,
          seed: int, compute_dtype: Any = None, log: Callable[[str], None] = print
          ) -> tuple[Any, list[float]]:
  """AdamW on the token-mean NLL of each micro-batch's trained tokens; returns the params and the losses.
  Rows are padded to `train_length`'s buckets (4 per power of two) and the trained tokens — only those get
  logits — to a multiple of 64, so a run compiles a few shapes only (a SmolLM2 shape compiles in ~20 s)."""
  import jax
  import jax.numpy as jnp
  import optax

  from s3_jax.models import heads
  from s3_jax.rl.batch import train_length

  compute_dtype = compute_dtype or jnp.float32
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.0))
  opt_state = optimizer.init(params)

  def loss_fn(p, tokens, mask, index, weight):
    hidden = heads.hidden_states(decoder_config, p, tokens, mask, compute_dtype, remat="full")
    logp, _ = heads.logprobs_from_hidden(p, hidden, tokens, index, False)
    return -jnp.sum(logp * weight) / jnp.maximum(jnp.sum(weight), 1.0)

  @jax.jit
  def step(p, opt_state, tokens, mask, index, weight):
    loss, grads = jax.value_and_grad(loss_fn)(p, tokens, mask, index, weight)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  losses = []
  for epoch in range(epochs):
    order = rng.permutation(len(traces))
    for start in range(0, len(order), micro):
      rows = [traces[i] for i in order[start:start + micro]]
      length = train_length(max(len(r.tokens) for r in rows))
      trained = [np.flatnonzero(np.asarray(r.loss_mask, bool)) for r in rows]
      width = _bucket(max(len(t) for t in trained), 64)
      tokens = np.zeros((micro, length), np.int32)
      mask = np.zeros((micro, length), bool)
      index = np.ones((micro, width), np.int32)  # the trained positions (padding: position 1, weight 0)
      weight = np.zeros((micro, width), np.float32)
      for i, (r, where) in enumerate(zip(rows, trained, strict=True)):
        n = len(r.tokens)
        tokens[i, :n], mask[i, :n] = r.tokens, True
        index[i, :len(where)] = where
        weight[i, :len(where)] = 1.0
      start_time = time.perf_counter()
      params, opt_state, loss = step(params, opt_state, tokens, mask, index, weight)
      losses.append(float(loss))
      log(f"sft epoch {epoch + 1}/{epochs} step {len(losses)}: loss {losses[-1]:.4f} "
          f"({time.perf_counter() - start_time:.1f} s, {micro} x {length} tokens)")
  return params, losses


def run(config: Any, out: str | Path, *, questions: int, epochs: int, lr: float, micro: int, seed: int,
        log: Callable[[str], None] = print) -> dict[str, Any]:
  """Traces, fine-tuning, and the HF folder `out`; returns what `sft.json` records."""
  from flax import nnx

  from s3_jax import assets
  from s3_jax.data.qa import read_qa
  from s3_jax.models import precision
  from s3_jax.models.decoder import Decoder
  from s3_jax.models.hf import load_hf, save_hf_params
  from s3_jax.models.searcher import decoder_config as searcher_decoder_config
  from s3_jax.models.tokenizer import load_tokenizer
  from s3_jax.retrieval.index_dir import ensure_config_index, load_retriever

  out = Path(out)
  if questions < 1 or epochs < 1 or micro < 1 or lr <= 0:
    raise ValueError(f"--questions {questions}, --epochs {epochs}, --micro {micro} must be positive and "
                     f"--lr {lr} greater than 0")
  examples = read_qa(assets.resolve(config.data.train))[:questions]
  if len(examples) < questions:
    raise ValueError(f"--questions {questions}: {config.data.train} has only {len(examples)} questions")
  tokenizer = load_tokenizer(assets.resolve(config.searcher.tokenizer))
  retriever = load_retriever(ensure_config_index(config, False))
  traces, plans = make_traces(config, tokenizer, retriever, examples, seed)
  trained = sum(sum(t.loss_mask) for t in traces)
  log(f"{len(traces)} traces: searches {np.bincount([len(p.queries) for p in plans], minlength=3).tolist()} "
      f"(0/1/2), {trained} trained tokens, {sum(len(t.tokens) for t in traces)} tokens in all")
  if config.searcher.init_from:
    model = load_hf(assets.resolve(config.searcher.init_from))
  else:
    model = Decoder(searcher_decoder_config(config, tokenizer), rngs=nnx.Rngs(config.seed))
  params, losses = train(model.config, model.arrays(), traces, epochs=epochs, lr=lr, micro=micro, seed=seed,
                         compute_dtype=precision.dtype(config.searcher.compute_dtype), log=log)
  save_hf_params(params, model.config, out, tokenizer)
  record = {"questions": questions, "epochs": epochs, "lr": lr, "micro": micro, "seed": seed,
            "init_from": config.searcher.init_from or "random", "data": config.data.train,
            "searches": [len(p.queries) for p in plans], "selects": [list(p.selects) for p in plans],
            "trained_tokens": trained, "losses": losses}
  (out / "sft.json").write_text(json.dumps(record, indent=1) + "\n")
  log(f"saved {out}: train from it with --config.searcher.init_from={out}")
  return record


def main() -> None:
  from absl import flags

  from s3_jax import cli as cli_lib

  config_flag = cli_lib.config_flag()
  out_flag = flags.DEFINE_string("out", None, "output folder (a Hugging Face model folder)")
  questions_flag = flags.DEFINE_integer("questions", 64, "training questions to trace (data.train's first)")
  epochs_flag = flags.DEFINE_integer("epochs", 2, "passes over the traces")
  lr_flag = flags.DEFINE_float("lr", 1e-5, "AdamW learning rate")
  micro_flag = flags.DEFINE_integer("micro", 2, "traces per optimizer step")
  seed_flag = flags.DEFINE_integer("seed", 0, "plans and order")
  flags.mark_flags_as_required(["out"])

  cli_lib.run(lambda config: run(config, out_flag.value, questions=questions_flag.value,
                                 epochs=epochs_flag.value, lr=lr_flag.value, micro=micro_flag.value,
                                 seed=seed_flag.value),
              config_flag, errors=(ValueError, FileNotFoundError, RuntimeError))


if __name__ == "__main__":
  main()
