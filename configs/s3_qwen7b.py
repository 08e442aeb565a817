"""The paper's setup (s3_protocol.md §1, §6) for a TPU pod or a GPU cluster.

Searcher Qwen2.5-7B-Instruct, dense E5-base-v2 over wiki-18 (FAISS, `query: `/`passage: ` prefixes),
Qwen2.5-14B-Instruct generator on vLLM, 120 questions per PPO step, 20 steps. The retriever and
generator run as services (launch/); point their addresses and the data paths at your hosts.

  --config configs/s3_qwen7b.py[:X-Y-Z][,seed=N][,faithful]

X-Y-Z = docs retrieved per query - docs selected per turn - turns (paper Table 3): 8-3-3 (default),
5-3-3, 3-3-3, 3-3-4, 5-3-4, ...
"""

import re
from pathlib import Path

from s3_jax import config_lib

# the paper's ablations (Tables 3, 5, 6 and GRPO), shared with the other configs
ABLATIONS = config_lib.load_module(Path(__file__).parent / "sweeps/paper_ablations.py")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, variant="8-3-3", seed=0, faithful=False)
  match = re.fullmatch(r"(\d+)-(\d+)-(\d+)", arg.variant)
  if not match:
    raise ValueError(f"configs/s3_qwen7b.py: variant {arg.variant!r} must be X-Y-Z, e.g. 8-3-3")
  c = config_lib.default_config()
  c.seed = arg.seed
  c.rollout.topk, c.rollout.max_select, c.rollout.max_turns = (int(g) for g in match.groups())

  c.data.train = "data/nq_hotpotqa_train/train_e5_s3.parquet"
  c.data.test = "data/nq_hotpotqa_train/test_e5_s3.parquet"
  c.data.corpus = "data/wiki-18/wiki-18.jsonl"

  c.searcher.init_from = "models/Qwen2.5-7B-Instruct"
  c.searcher.tokenizer = "models/Qwen2.5-7B-Instruct"
  c.searcher.compute_dtype = "bfloat16"
  c.rollout.param_dtype = "bfloat16"  # the sampler's copy: 15 GB instead of 30 (the masters stay fp32)

  c.retriever.kind = "dense"
  c.retriever.address = "127.0.0.1:50051"
  c.retriever.encoder = "models/e5-base-v2"
  c.retriever.query_prefix = "query: "
  c.retriever.passage_prefix = "passage: "

  c.generator.backend = "vllm"
  c.generator.model = "Qwen/Qwen2.5-14B-Instruct-GPTQ-Int4"
  c.generator.address = "127.0.0.1:50052"

  c.checkpoint.every = 10
  if arg.faithful:  # every s3_jax default that departs from s3's released code, switched to s3's
    config_lib.use_s3_faithful(c)
  return c



def sweep(add):
  """The paper's ablations as runs of this config (launch: python -m launch.sweep)."""
  # GRPO: 120 episodes per step, as PPO's 120 questions.
  ABLATIONS.add_runs(add, grpo_batch_size=30, grpo_mini_batch_size=15)
