"""What bf16 compute does to the numbers PPO uses, on a real SmolLM2 batch.

16 FanOutQA training episodes of SmolLM2-135M-Instruct (`configs/smollm2_wiki.py:runlocal` rollout, BM25 over
wiki-vital in process, T 0.6 / top-p 0.95), sampled with bf16 compute (fp32 weights, the KV cache kept across
turns). On their policy tokens:

- |log p_learner - log p_sampler| per token (mean, p99, max): the sampler's log-probs of the tokens it drew
  against the learner's score pass (bf16 and fp32) over the whole sequences;
- |log p_learner(bf16) - log p_learner(fp32)|;
- the first minibatch's importance ratio exp(log p_update - log p_old) and the KL to the reference at step 0
  (must be 0: the reference is the initial actor), from a real PPO update of the bf16 learner on the batch.

  python benchmarks/bf16_numerics.py [--episodes 16]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import here  # noqa: F401  (this checkout's s3_jax first on sys.path)
import numpy as np

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class RecordingPolicy:
  """A `SamplerPolicy` that keeps, per episode key, the log-probs of every turn's sampled tokens."""

  def __init__(self, inner):
    self.inner, self.logprobs = inner, {}

  def sample(self, contexts, max_new_tokens, keys=None):
    import jax

    inner = self.inner
    inner.rng, rng = jax.random.split(inner.rng)
    if inner._session is None:
      inner._session = inner.sampler.session()
    out = inner._session.generate(keys, contexts, inner.params, max_new_tokens=max_new_tokens,
                                  stop_strings=("</query>",), rng=rng)
    for key, lp in zip(keys, out.logprobs, strict=True):
      self.logprobs.setdefault(key[1], []).append(lp)
    return out.tokens

  def release(self):
    self.inner.release()


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
  """(start, end) of each run of True."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
  return list(zip(edges[::2], edges[1::2], strict=True))


def _stats(diff: np.ndarray) -> str:
  return (f"mean {diff.mean():.4f}, p99 {np.percentile(diff, 99):.4f}, max {diff.max():.4f} "
          f"({diff.size} tokens)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--episodes", type=int, default=16, help="an even number")
  args = parser.parse_args()

  import jax
  import jax.numpy as jnp

  from s3_jax import assets, config_lib
  from s3_jax.data.qa import read_qa
  from s3_jax.models import heads
  from s3_jax.models.hf import load_hf
  from s3_jax.models.sampler import Sampler
  from s3_jax.models.tokenizer import load_tokenizer
  from s3_jax.retrieval import load_retriever
  from s3_jax.retrieval.index_dir import ensure_index
  from s3_jax.rl import learner as learner_lib
  from s3_jax.rl.batch import make_batch, train_length
  from s3_jax.rl.experience import response_window
  from s3_jax.rl.settings import PPOSettings
  from s3_jax.search.episode import EpisodeConfig, SamplerPolicy, run_episodes

  config = config_lib.load(f"{CONFIGS / 'smollm2_wiki.py'}:runlocal")
  folder = assets.prepare("smollm2-135m-instruct", log=lambda _: None)
  tokenizer = load_tokenizer(folder)
  pad = tokenizer.pad_token_id or 0
  retriever = load_retriever(ensure_index(assets.path("wiki-vital") / "corpus.jsonl", "bm25",
                                          show_progress=False))
  examples = read_qa(assets.path("qa-fanout") / "train.jsonl")[:args.episodes]
  initial = retriever.search([e.question for e in examples], 3)
  model = load_hf(folder, dtype=jnp.float32, compute_dtype=jnp.bfloat16)
  policy = RecordingPolicy(SamplerPolicy(Sampler(model, tokenizer=tokenizer, pad_token_id=pad),
                                         temperature=0.6, top_p=0.95, seed=0))
  episodes = run_episodes(policy, tokenizer, retriever, examples, initial, EpisodeConfig.from_config(config))

  length = train_length(max(len(e.prompt_ids) + len(e.ids) for e in episodes))
  rb = make_batch(episodes, [1.0] * len(episodes), pad, length=length, allow_empty=True)
  width = train_length(max(len(e.ids) for e in episodes), minimum=64)
  window = response_window(rb, [len(e.prompt_ids) for e in episodes], width)
  batch = {"tokens": rb.tokens, "attention_mask": rb.attention_mask, **window,
           "group": np.arange(len(episodes), dtype=np.int32)}
  batch["token_scores"] = np.zeros_like(batch["token_scores"])
  for i in range(len(episodes)):  # the reward on the last policy token (experience.training_batch)
    last = np.flatnonzero(batch["policy_mask"][i])
    if len(last):
      batch["token_scores"][i, last[-1]] = float(np.random.default_rng(i).integers(0, 2))

  # The sampler's log-probs in window coordinates: each policy run of an episode is one turn's kept tokens.
  sampled = np.full(batch["index"].shape, np.nan, np.float32)
  for i, e in enumerate(episodes):
    turns = [lp for lp in policy.logprobs[i]]
    runs = _runs(np.asarray(e.policy_mask))
    kept = [lp for lp in turns if len(lp)]
    for (start, end), lp in zip(runs, kept, strict=False):
      sampled[i, start:end] = lp[:end - start]

  n = len(episodes)  # the PPO batch is these episodes, two minibatches (runlocal's micro-batch sizes)
  settings = dataclasses.replace(PPOSettings.from_config(config), batch_size=n,
                                 mini_batch_size=n // 2)
  actor = model.arrays()
  out = {}
  for name, dtype in (("fp32", jnp.float32), ("bf16", jnp.bfloat16)):
    learner = learner_lib.PPOLearner(settings, model.config, compute_dtype=dtype, remat="dots")
    state = learner.init_state(actor, heads.critic_params(
        load_hf(folder, dtype=jnp.float32, value_head=True, seed=1)) if learner.separate_critic else None)
    ref = learner.place_ref(actor)
    placed = learner.place_batch(batch)
    scored = jax.device_get(learner.score(state, ref, placed))
    out[name] = scored
    if name == "bf16":
      # The first minibatch's new log-probs as the update computes them (rematerialised forward), before any
      # optimizer step: the importance ratio PPO starts from.
      rows = settings.mini_batch_size

      @jax.jit
      def update_logp(params, tokens, mask, index):
        hidden = heads.hidden_states(model.config, params, tokens, mask, jnp.bfloat16, "dots")
        return heads.logprobs_from_hidden(params, hidden, tokens, index, False)[0]

      first = jax.device_get(update_logp(actor, batch["tokens"][:rows], batch["attention_mask"][:rows],
                                         batch["index"][:rows]))
      ratio = np.exp(first - scored["old_logp"][:rows])[batch["policy_mask"][:rows]]
      _, metrics = learner.update(state, {**placed, **scored})
      metrics = jax.device_get(metrics)
  policy_mask = batch["policy_mask"] & ~np.isnan(sampled)
  print(f"{len(episodes)} episodes, {int(batch['policy_mask'].sum())} policy tokens "
        f"({int(policy_mask.sum())} matched to the sampler's records)")
  for name in ("bf16", "fp32"):
    diff = np.abs(out[name]["old_logp"] - sampled)[policy_mask]
    print(f"|log p_learner({name}) - log p_sampler(bf16, cached)|: {_stats(diff)}")
  diff = np.abs(out["bf16"]["old_logp"] - out["fp32"]["old_logp"])[batch["policy_mask"]]
  print(f"|log p_learner(bf16) - log p_learner(fp32)|: {_stats(diff)}")
  print(f"first minibatch importance ratio (bf16): min {ratio.min():.6f}, max {ratio.max():.6f}, "
        f"mean |ratio - 1| {np.abs(ratio - 1).mean():.2e}")
  kl = np.abs(out["bf16"]["ref_logp"] - out["bf16"]["old_logp"])[batch["policy_mask"]]
  print(f"step 0, bf16: |log p_ref - log p_old| max {kl.max():.2e}; reward/kl {metrics['reward/kl']:.2e}; "
        f"first update: actor/approx_kl {metrics['actor/approx_kl']:.2e}, "
        f"pg_clipfrac {metrics['actor/pg_clipfrac']:.4f}")


if __name__ == "__main__":
  main()
