"""The CI pulse: a random 3.2M-parameter searcher with the SmolLM2 tokenizer, a corpus subset, the real
SmolLM2 generator, and 3 PPO steps: about 40 s per step on 2 CPU cores (half of it the generator's answers),
about 2.5 minutes with start-up once the naive-RAG precompute is cached.

  --config configs/tiny.py[:bm25|dense][,steps=N][,faithful]
"""

from s3_jax import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="bm25", steps=3, faithful=False)
  if arg.variant not in ("bm25", "dense"):
    raise ValueError(f"configs/tiny.py: variant {arg.variant!r} must be bm25 or dense")
  c = config_lib.default_config()
  c.total_steps = arg.steps
  c.checkpoint.every = arg.steps
  c.checkpoint.hf_export_every = 0

  c.data.corpus_limit = 2000
  c.data.train_limit = 64

  c.searcher.init_from = ""  # random init of c.searcher.model (vocab 49152, hidden 64, 2 layers)
  c.retriever.kind = arg.variant
  c.generator.max_tokens = 16
  c.reward.use_judge = False  # GenAcc = the span check alone: halves the generator's work in the CI pulse

  c.rollout.topk = 3
  c.rollout.max_select = 2
  c.rollout.max_turns = 1
  c.rollout.max_prompt_length = 2048  # the s3 prompt with 3 initial docs is ~1,000 tokens
  c.rollout.max_response_length = 48
  c.rollout.max_obs_length = 256

  c.ppo.batch_size = 8
  c.ppo.mini_batch_size = 4
  c.ppo.actor_micro_batch_size = 2
  c.ppo.critic_micro_batch_size = 2
  c.ppo.score_micro_batch_size = 4
  c.ppo.actor_lr = 1e-4
  c.ppo.critic_lr = 1e-4
  c.ppo.critic_warmup_ratio = 0.0

  c.evaluate.agent_max_tokens = 32  # the agent baselines' calls, kept short for the CI

  c.precompute.splits = "train"  # the trainer needs only the training questions' naive-RAG results
  if arg.faithful:  # every s3_jax default that departs from s3's released code, switched to s3's
    config_lib.use_s3_faithful(c)
  return c


def sweep(add):
  """Two short runs, the CI's sweep (python -m launch.sweep --config configs/tiny.py:steps=1)."""
  add(name="base")
  add(**{"reward.kind": "genacc"})
