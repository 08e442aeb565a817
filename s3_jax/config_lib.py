"""Experiment configs: the `:arg` syntax, loading, the default schema, and validation.

A config file is `configs/NAME.py` with `get_config(arg=None) -> ml_collections.ConfigDict`. On the
command line (absl `config_flags`, locked so a mistyped key fails at once):

    --config configs/s3_qwen7b.py:8-3-3,runlocal --config.ppo.actor_lr=2e-6

`arg` is `variant,key=value,flag`: a bare word is `True` for a boolean key and otherwise the value of
`variant` (big_vision's `parse_arg`, plus the positional variant). Print a resolved config with
`python -m s3_jax.config_lib --config configs/tiny.py`.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def _coerce(key: str, text: str, default: Any, label: str = "config arg") -> Any:
  kind = type(default)
  if kind is bool:
    if text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise ValueError(f"{label} {key}={text!r}: expected a boolean ({'/'.join(_TRUE + _FALSE)})")
  if kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      raise ValueError(f"{label} {key}={text!r}: expected {kind.__name__}") from None
  return text


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a config file's `:arg` string against `defaults` (their types give the value types).

  `parse_arg("8-3-3,runlocal,seed=3", variant="8-3-3", runlocal=False, seed=0)` gives
  `variant="8-3-3", runlocal=True, seed=3`. Unknown keys and malformed values raise `ValueError`.
  """
  values = dict(defaults)
  for token in filter(None, (t.strip() for t in (arg or "").split(","))):
    key, sep, text = token.partition("=")
    if not sep:
      if isinstance(defaults.get(key), bool):
        values[key] = True
        continue
      if "variant" in defaults:
        key, text = "variant", token
      else:
        raise ValueError(f"config arg {token!r} is not a boolean key; known keys: {sorted(defaults)}")
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; known keys: {sorted(defaults)}")
    values[key] = _coerce(key, text, defaults[key])
  return ml_collections.ConfigDict(values)


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]`, applies `key.sub=value` overrides, locks and validates the config.

  The programmatic twin of `--config path.py:arg --config.key=value`; overrides parse their value as
  the type of the existing key, and an unknown key raises.
  """
  path, _, arg = spec.partition(":")
  module = load_module(path)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path}: a config file must define get_config(arg=None)")
  config = module.get_config(arg or None)
  config.lock()
  for override in overrides:
    key, sep, text = override.partition("=")
    if not sep:
      raise ValueError(f"override {override!r} must be key=value")
    try:
      current = _lookup(config, key)
    except (KeyError, AttributeError):
      raise ValueError(f"override {key!r}: no such config key") from None
    value = text if current is None else _coerce(key, text, current, label="override")
    config.update_from_flattened_dict({key: value})
  validate(config)
  return config


def load_module(path: str | Path) -> Any:
  """A config file (or a sweep fragment under configs/sweeps/) as a module, run from its path."""
  file = Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"config file not found: {file}")
  module_spec = importlib.util.spec_from_file_location(f"_s3_jax_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def sweep_runs(spec: str) -> list[tuple[str, list[str]]]:
  """The runs of a config file's `sweep(add)`: `[(name, overrides)]`, each override a `key=value` string for
  `load`. `add(name=None, **{"dotted.key": value})` adds one run; the name defaults to its overrides joined.
  Every run is loaded and validated here, so a bad sweep fails before anything is launched."""
  path, _, _ = spec.partition(":")
  module = load_module(path)
  if not hasattr(module, "sweep"):
    raise ValueError(f"{path}: no sweep(add) function")
  runs: list[tuple[str, list[str]]] = []

  def add(name: str | None = None, **overrides: Any) -> None:
    texts = [f"{k}={v}" for k, v in overrides.items()]
    run_name = name or ",".join(texts) or "base"
    if any(run_name == existing for existing, _ in runs):
      raise ValueError(f"{path}: sweep run {run_name!r} added twice")
    runs.append((run_name, texts))

  module.sweep(add)
  for name, overrides in runs:
    try:
      load(spec, overrides)
    except ValueError as e:
      raise ValueError(f"{path}: sweep run {name!r}: {e}") from None
  return runs


# Keys renamed since a run could have recorded them (old name -> new), so a resumed run or evaluation reads an
# old record's value under its new name.
RENAMED_KEYS = {"searcher.model.mlp_size": "searcher.model.intermediate_size"}


def flatten_record(tree: dict[str, Any]) -> dict[str, str]:
  """`flatten` of a recorded config (a run's config.json or run.json), with renamed keys under their new
  names."""
  return {RENAMED_KEYS.get(k, k): v for k, v in flatten(tree).items()}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
  """A nested dict (a resolved config) as `{"dotted.key": JSON of the value}`, for comparing configs."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = json.dumps(v)
  return out


def _lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node: Any = config
  for part in dotted.split("."):
    node = node[part]
  return node


def _judge_section() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({"backend": "same", "model": "", "address": "", "base_url": "",
                                    "key_env": "OPENAI_API_KEY", "retry": "generator"})


def use_s3_faithful(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Every choice where s3_jax's default departs from s3's released code switched to s3's behaviour (the
  configs' `faithful` flag; README, "Differences from s3"): D_s3 by s3's parser on the decoded trajectory,
  the RAG cache answered from s3's one-line context, training prompts with all 12 precomputed initial docs
  (s3's `train_s3.py` does not truncate them; its test prompts keep 3), s3's turn count."""
  c.rollout.doc_extraction = "faithful"
  c.reward.rag_context_format = "s3"
  c.rollout.initial_docs = c.precompute.retrieval_topk
  c.evaluate.initial_docs = 3
  c.rollout.turn_semantics = "s3"
  return c


def default_config() -> ml_collections.ConfigDict:
  """Every key the project reads, with s3's values (s3_protocol.md §6) where s3 has one.

  Config files start from this and change what their experiment changes.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 20  # s3 reports its step-20 checkpoint
  # JAX's persistent compilation cache (s3_jax/compile_cache.py): "auto" = $S3_JAX_CACHE/xla, "" = off, or a
  # folder. A rerun, a resumed run or the next seed loads its compiled programs instead of compiling again.
  c.compile_cache = "auto"

  # Device mesh ("data", "fsdp", "tensor"); one size may be -1 to take the remaining devices.
  c.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
  # Logical parameter/activation axis -> mesh axes; sampling drops fsdp on weights.
  c.sharding_rules = [("batch", ("data", "fsdp")), ("vocab", "tensor"), ("embed", "fsdp"),
                      ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor")]
  c.sampling_sharding_rules = [("batch", ("data", "fsdp")), ("vocab", "tensor"), ("embed", None),
                               ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor")]

  # Datasets: a path, or `asset:NAME/FILE` for an offline asset (python -m s3_jax.assets).
  c.data = ml_collections.ConfigDict()
  c.data.train = "asset:qa-fanout/train.jsonl"
  c.data.test = "asset:qa-fanout/test.jsonl"
  c.data.corpus = "asset:wiki-vital/corpus.jsonl"
  c.data.corpus_limit = 0  # 0 = the whole corpus
  c.data.train_limit = 0  # 0 = every question (also the precompute's limit per split)
  c.data.test_limit = 0
  c.data.shuffle_seed = 42  # s3's data.random_seed

  # The searcher (policy) and its critic. init_from: an HF folder or asset; "" = random init of `model`.
  c.searcher = ml_collections.ConfigDict()
  c.searcher.init_from = "asset:smollm2-135m-instruct"
  c.searcher.tokenizer = "asset:smollm2-135m-instruct"
  c.searcher.param_dtype = "float32"
  c.searcher.compute_dtype = "float32"
  # Gradient checkpointing per layer in the update (s3: on for actor and critic): full (keep layer inputs) |
  # dots (also keep weight-matmul outputs) | none.
  c.searcher.remat = "dots"
  c.searcher.model = ml_collections.ConfigDict({
      "vocab_size": 49152, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
      "head_dim": 16, "intermediate_size": 128, "rope_theta": 10000.0, "tie_embeddings": True})
  c.critic = ml_collections.ConfigDict({"separate_model": True})  # s3: a separate critic network
  # With separate_model=False, a value head on the actor's trunk: learns at ppo.critic_lr (the trunk at
  # ppo.actor_lr); its kernel starts as HF initialises a `score` head (normal) or at zero (values start at 0).
  c.critic.head_init = "normal"  # normal | zeros

  c.retriever = ml_collections.ConfigDict()
  c.retriever.kind = "bm25"  # bm25 | dense
  # "" = start an embedded service on a free loopback port; "h1:p1,h2:p2" = replicas (batches spread over
  # them, failing over when one stops answering; s3_jax/services/replicas.py). The same for generator.address.
  c.retriever.address = ""
  c.retriever.encoder = "asset:minilm-l6-v2"
  c.retriever.query_prefix = ""  # E5: "query: "
  c.retriever.passage_prefix = ""  # E5: "passage: "
  c.retriever.faiss = "flat"  # flat | ivf | hnsw

  # How long the retriever and generator clients keep retrying a service that does not answer (a restart),
  # each retry logged; past it the job stops with the service's address. 120 s covers `python -m s3_jax.serve`
  # coming back on wiki-vital (benchmarks/README.md). The configured services are also asked for their
  # Health at start-up, within the same budget.
  c.services = ml_collections.ConfigDict({"retry_seconds": 120.0})

  c.generator = ml_collections.ConfigDict()
  c.generator.backend = "jax"  # jax | vllm | openai
  c.generator.model = "asset:smollm2-135m-instruct"
  c.generator.address = ""
  c.generator.max_tokens = 64
  # jax backend in this process: the compute dtype (the loaded weights stay float32; a bf16 sampler keeps a
  # bf16 copy); "auto" = bfloat16 where the hardware has bf16 units (s3 generates with vLLM in bf16). On this
  # CPU bf16 answers the reward benchmark's 120 prompts 1.34x faster; 15 answers change, one verdict
  # (benchmarks/README.md, generator_dtype.py). A bf16 generator is another generator in answer caches.
  c.generator.compute_dtype = "auto"
  c.generator.base_url = ""  # openai backend: the endpoint, e.g. http://127.0.0.1:8000/v1
  c.generator.key_env = "OPENAI_API_KEY"  # openai backend: the environment variable holding the API key

  # The s3 protocol and rollout (s3_protocol.md §1.1, §2): X-Y-Z = topk-max_select-max_turns.
  c.rollout = ml_collections.ConfigDict()
  c.rollout.topk = 8
  c.rollout.max_select = 3
  c.rollout.max_turns = 3
  c.rollout.turn_semantics = "s3"  # s3 (max_turns + 1 search rounds) | exact
  c.rollout.doc_extraction = "safe"  # safe | faithful (s3_protocol.md §2.6, §12 item 6)
  # Ablations (paper Table 6): the initial naive-RAG block in the prompt ("begin with search") and how many of
  # its docs (3 as the paper says, 12 as s3's released training data has, s3_protocol.md §12 item 1); "w/o
  # selection" hands the generator every retrieved doc instead of the selected ones.
  c.rollout.begin_with_search = True
  c.rollout.initial_docs = 3
  c.rollout.selection = True
  c.rollout.samples_per_question = 1  # s3: n_agent=1; GRPO needs >= 2 (a group per question)
  c.rollout.temperature = 0.6
  c.rollout.top_p = 0.95
  c.rollout.top_k = -1  # -1 = off
  c.rollout.max_prompt_length = 8000
  c.rollout.max_response_length = 500
  c.rollout.max_obs_length = 1400
  # The sampler's copy of the policy: "" = searcher.param_dtype; bfloat16 halves its memory and decode traffic
  # (s3/verl sample with vLLM in bf16); the update keeps the master weights' dtype.
  c.rollout.param_dtype = ""
  # The sampler's compute (searcher sampling in training, evaluation and probes): "" = searcher.compute_dtype;
  # auto = bfloat16 where the hardware has bf16 units (TPU, GPU, AMX/AVX512-BF16 CPU), else float32. In bf16
  # the sampler keeps bf16 weights and a bf16 cache and decodes in bf16 (a warm SmolLM2 rollout 19.4 s vs 31.7
  # s in fp32, benchmarks/README.md); the learner rescores every sampled token in its own dtype, so sampling
  # in bf16 changes which tokens are drawn, never the loss's log-probs (s3 and verl sample in bf16 with vLLM).
  c.rollout.compute_dtype = "auto"
  # Keep each episode's KV cache across turns and prefill only what the environment appended (s3/verl
  # re-prefill the whole context every turn: False, the reference the cached path is tested against).
  c.rollout.keep_cache = True
  # Decode steps' and chunked prefills' attention over the cache: auto (the CPU kernel, s3_jax/kernels, on a
  # one-device AVX-512 CPU host with a C++ compiler; else XLA's) | cpu (the kernel, or an error saying why
  # not) | xla.
  c.rollout.attention_kernel = "auto"
  # Decode steps' weight matmuls (a few rows by every weight): auto (the CPU kernel, kernels/cpu_matmul, where
  # the sampler computes in bf16 on a one-device CPU host with AVX512-BF16; else XLA's) | cpu | xla.
  c.rollout.matmul_kernel = "auto"

  # cache: the scored-answer SQLite file; "" = WORKDIR/answers.sqlite (per run, so metrics never depend on
  # what earlier runs cached).
  c.reward = ml_collections.ConfigDict({"kind": "paper", "use_judge": True, "cache": ""})
  # The naive-RAG baseline's generator context (precompute, method rag; s3_protocol.md §3.3): "s3" = the
  # one-line format s3's RAG cache was answered from, `Doc {i} (Title: "{title}") {text}\n`; "d_s3" = the D_s3
  # context format.
  c.reward.rag_context_format = "s3"
  # The LLM judge of training and the precompute: "same" = the answer generator (s3's training); or its own
  # generator (backend jax | vllm | openai, at `address` or in process). retry: an unclear verdict is asked
  # again of the answer "generator" (s3: its default Qwen, whatever judged first) or of the "judge".
  c.reward.judge = _judge_section()

  # Naive-RAG precompute (python -m s3_jax.precompute; s3_protocol.md §3.3). dir "" = a cache folder named by
  # a hash of the settings the results depend on.
  c.precompute = ml_collections.ConfigDict({"dir": "", "retrieval_topk": 12, "context_docs": 3,
                                            "chunk_size": 64, "splits": "train,test"})

  c.ppo = ml_collections.ConfigDict()
  c.ppo.batch_size = 120
  c.ppo.mini_batch_size = 30
  c.ppo.actor_micro_batch_size = 15
  c.ppo.critic_micro_batch_size = 10
  c.ppo.score_micro_batch_size = 30  # old/ref log-probs and values (s3: log_prob_micro_batch_size 30)
  c.ppo.epochs = 1
  c.ppo.clip_ratio = 0.2
  c.ppo.dual_clip = 0.0  # 0 = off; otherwise the dual-clip constant c > 1
  c.ppo.value_clip = 0.5
  c.ppo.vf_coef = 1.0  # value-loss weight of a critic head on the actor (critic.separate_model=False)
  c.ppo.entropy_coef = 0.001
  c.ppo.gamma = 1.0
  c.ppo.lam = 1.0
  c.ppo.kl_coef = 0.001
  c.ppo.kl_estimator = "k1"
  c.ppo.kl_mode = "reward"  # reward (s3) | loss
  c.ppo.adv_estimator = "gae"  # gae | grpo | reinforce_pp
  c.ppo.actor_lr = 1e-6
  c.ppo.critic_lr = 1e-5
  c.ppo.actor_warmup_ratio = 0.0
  c.ppo.critic_warmup_ratio = 0.01
  c.ppo.weight_decay = 0.01
  c.ppo.grad_clip = 1.0
  # token_mean: one token mean over each minibatch (independent of the micro-batch split);
  # micro_token_mean: s3 / verl v0.1, a token mean per micro-batch averaged over the micro-batches.
  c.ppo.loss_agg = "token_mean"
  # own: each micro-batch of the score and update passes padded to its own longest row and window, rows of
  # similar length grouped (rl/layout.py); batch: the whole batch's shape, one program (s3 pads per batch).
  c.ppo.micro_batch_padding = "own"
  # The leading tokens every row of a batch shares (s3's ~650-token instruction template) run once per
  # minibatch instead of once per row in the score and update passes (rl/layout.py); the same loss and
  # gradient. Needs micro_batch_padding=own.
  c.ppo.shared_prefix = True
  c.ppo.schedule_steps = 1500  # the step count warm-up ratios refer to (s3: total_training_steps=1500)

  # python -m s3_jax.evaluate (s3_protocol.md §8-9). datasets: comma-separated names or files ("" =
  # data.test); sample: at most this many questions per data source (s3 evaluates <= 3000, seed 42; 0 = all);
  # runs: how often each question is run (the paper averages 3); rag_topk: naive RAG's docs (paper: 3); the
  # multi-turn baselines search at most max_searches times for search_topk docs (s3_protocol.md §8: 4 and 3).
  # The baselines' LLM ("agent"): --checkpoint loaded with agent_backend (jax | vllm), or the generator
  # service at agent_address, or (neither) the configured generator itself; agent_temperature < 0 /
  # agent_max_tokens 0 = the method's own default (s3_protocol.md §8).
  c.evaluate = ml_collections.ConfigDict({
      "datasets": "", "flashrag_dir": "", "mirage_file": "", "sample": 0, "sample_seed": 42, "runs": 1,
      "batch_size": 16, "seed": 0, "rag_topk": 3, "max_searches": 4, "search_topk": 3,
      "agent_backend": "jax", "agent_address": "", "agent_temperature": -1.0, "agent_max_tokens": 0})
  # The s3 searcher's initial block at evaluation (s3's test prompts: the top 3; rollout.initial_docs is
  # the training prompts'); the Search-R1 baseline's prompt: "code" (the released code's text, which its
  # checkpoints were trained on) | "paper"; the evaluation's judge (the paper: Claude-3-Haiku), as
  # reward.judge.
  c.evaluate.initial_docs = 3
  c.evaluate.search_r1_prompt = "code"
  c.evaluate.judge = _judge_section()

  # every: a checkpoint each N steps; keep: the newest K; hf_export_every: the searcher as a HF folder each N
  # steps (0 = never); rollouts: each step's episodes (question, turns, queries, the generator's documents and
  # answer, scores, reward) as rollouts/step_N.jsonl in the workdir (verl's trainer.rollout_data_dir).
  c.checkpoint = ml_collections.ConfigDict({"every": 10, "keep": 3, "hf_export_every": 20, "rollouts": True})
  c.wandb = ml_collections.ConfigDict({"project": "", "entity": "", "mode": "online"})  # project "" = off
  return c


# The agent baselines' LLM in process: the generator backends that load a model folder (not openai).
_AGENT_BACKENDS = ("jax", "vllm")
_POSITIVE_INTS = (
    "total_steps", "rollout.topk", "rollout.max_select", "rollout.max_turns",
    "rollout.max_prompt_length", "rollout.max_response_length",
    "rollout.max_obs_length", "generator.max_tokens", "ppo.batch_size", "ppo.mini_batch_size",
    "ppo.actor_micro_batch_size", "ppo.critic_micro_batch_size", "ppo.epochs", "checkpoint.every",
    "checkpoint.keep", "searcher.model.vocab_size", "searcher.model.hidden_size",
    "searcher.model.num_layers", "searcher.model.num_heads", "searcher.model.num_kv_heads",
    "searcher.model.head_dim", "searcher.model.intermediate_size", "precompute.retrieval_topk",
    "precompute.context_docs", "precompute.chunk_size", "rollout.initial_docs",
    "rollout.samples_per_question", "ppo.score_micro_batch_size", "ppo.schedule_steps", "evaluate.runs",
    "evaluate.batch_size", "evaluate.rag_topk", "evaluate.max_searches", "evaluate.search_topk",
    "evaluate.initial_docs")
_NON_NEGATIVE_INTS = ("data.corpus_limit", "data.train_limit", "data.test_limit",
                      "checkpoint.hf_export_every", "evaluate.sample", "evaluate.agent_max_tokens")
_UNIT_INTERVAL = ("rollout.top_p", "ppo.gamma", "ppo.lam", "ppo.actor_warmup_ratio",
                  "ppo.critic_warmup_ratio")
_NON_NEGATIVE_FLOATS = ("rollout.temperature", "ppo.clip_ratio", "ppo.value_clip", "ppo.entropy_coef",
                        "ppo.kl_coef", "ppo.actor_lr", "ppo.critic_lr", "ppo.weight_decay",
                        "ppo.grad_clip", "ppo.vf_coef", "services.retry_seconds")
_MESH_AXES = ("data", "fsdp", "tensor")
_DATA_PATH = re.compile(r"^asset:[a-z0-9-]+/.+$")


def _bad(key: str, value: Any, why: str) -> ValueError:
  return ValueError(f"config.{key}={value!r}: {why}")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every key `default_config` defines; raises `ValueError` naming the key and the value."""
  flat = config.to_dict()

  def get(key: str) -> Any:
    try:
      return _lookup(flat, key)
    except KeyError:
      raise ValueError(f"config.{key} is missing (start config files from "
                       f"config_lib.default_config())") from None

  # Choices owned by a registry are read from it (imported here: loading a config file needs no JAX).
  from s3_jax.methods.search_r1 import PROMPTS as SEARCH_R1_PROMPTS
  from s3_jax.models.decoder import REMAT_POLICIES, VALUE_HEAD_INITS
  from s3_jax.models.precision import DTYPES
  from s3_jax.models.sampler import ATTENTION_KERNELS
  from s3_jax.retrieval.dense import FAISS_KINDS
  from s3_jax.retrieval.index_dir import RETRIEVER_KINDS
  from s3_jax.reward.gbr import REWARD_KINDS
  from s3_jax.reward.scorer import JUDGE_RETRIES
  from s3_jax.rl import ppo
  from s3_jax.rl.layout import PADDINGS
  from s3_jax.search.episode import DOC_EXTRACTIONS, TURN_SEMANTICS
  from s3_jax.search.formats import RAG_CONTEXT_FORMATS
  from s3_jax.services.generator_backends import BACKENDS

  dtypes = tuple(DTYPES)
  choices_of = {"ppo.kl_estimator": ppo.KL_ESTIMATORS, "ppo.kl_mode": ppo.KL_MODES,
                "ppo.adv_estimator": tuple(ppo.ADVANTAGE_ESTIMATORS), "ppo.loss_agg": ppo.LOSS_AGGREGATIONS,
                "reward.kind": REWARD_KINDS, "generator.backend": BACKENDS,
                "retriever.kind": tuple(RETRIEVER_KINDS), "retriever.faiss": FAISS_KINDS,
                "rollout.turn_semantics": TURN_SEMANTICS, "rollout.doc_extraction": DOC_EXTRACTIONS,
                "reward.rag_context_format": RAG_CONTEXT_FORMATS,
                "reward.judge.backend": ("same", *BACKENDS), "evaluate.judge.backend": ("same", *BACKENDS),
                "evaluate.search_r1_prompt": tuple(SEARCH_R1_PROMPTS), "ppo.micro_batch_padding": PADDINGS,
                "searcher.param_dtype": dtypes, "searcher.compute_dtype": ("auto", *dtypes),
                "generator.compute_dtype": ("auto", *dtypes), "rollout.param_dtype": ("", *dtypes),
                "rollout.compute_dtype": ("", "auto", *dtypes),
                "searcher.remat": tuple(REMAT_POLICIES), "critic.head_init": VALUE_HEAD_INITS,
                "reward.judge.retry": JUDGE_RETRIES, "evaluate.judge.retry": JUDGE_RETRIES,
                "evaluate.agent_backend": _AGENT_BACKENDS, "rollout.attention_kernel": ATTENTION_KERNELS,
                "rollout.matmul_kernel": ATTENTION_KERNELS}
  for key, choices in choices_of.items():
    if get(key) not in choices:
      raise _bad(key, get(key), f"must be one of {', '.join(choices)}")
  for key in _POSITIVE_INTS:
    value = get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise _bad(key, value, "must be a positive integer")
  for key in _NON_NEGATIVE_INTS:
    value = get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise _bad(key, value, "must be a non-negative integer")
  for key in _UNIT_INTERVAL + _NON_NEGATIVE_FLOATS:
    value = get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      raise _bad(key, value, "must be a non-negative number")
    if key in _UNIT_INTERVAL and value > 1:
      raise _bad(key, value, "must be in [0, 1]")

  mesh = get("mesh")
  if sorted(mesh) != sorted(_MESH_AXES):
    raise _bad("mesh", mesh, f"must have exactly the axes {', '.join(_MESH_AXES)}")
  for axis, size in mesh.items():
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise _bad(f"mesh.{axis}", size, "must be a positive integer or -1 (take the rest)")
  if sum(size == -1 for size in mesh.values()) > 1:
    raise _bad("mesh", mesh, "at most one axis may be -1")
  for key in ("sharding_rules", "sampling_sharding_rules"):
    for rule in get(key):
      if len(rule) != 2 or not isinstance(rule[0], str):
        raise _bad(key, rule, "each rule is (logical_axis, mesh_axis | tuple of mesh axes | None)")
      targets = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
      for target in targets:
        if target is not None and target not in _MESH_AXES:
          raise _bad(key, rule, f"mesh axis {target!r} is not one of {', '.join(_MESH_AXES)}")

  if not isinstance(get("compile_cache"), str):
    raise _bad("compile_cache", get("compile_cache"), "must be a string: 'auto', '' (off) or a folder")
  for key in ("data.train", "data.test", "data.corpus"):
    value = get(key)
    if not isinstance(value, str) or not value or (value.startswith("asset:")
                                                   and not _DATA_PATH.match(value)):
      raise _bad(key, value, "must be a file path or asset:NAME/FILE")

  rollout, ppo = get("rollout"), get("ppo")
  if rollout["top_k"] != -1 and rollout["top_k"] < 1:
    raise _bad("rollout.top_k", rollout["top_k"], "must be -1 (off) or a positive integer")
  if rollout["top_p"] == 0:
    raise _bad("rollout.top_p", 0, "must be in (0, 1]")
  if rollout["max_select"] > rollout["topk"]:
    raise _bad("rollout.max_select", rollout["max_select"],
               f"cannot exceed rollout.topk={rollout['topk']}")
  if ppo["batch_size"] % ppo["mini_batch_size"]:
    raise _bad("ppo.mini_batch_size", ppo["mini_batch_size"],
               f"must divide ppo.batch_size={ppo['batch_size']}")
  mini_episodes = ppo["mini_batch_size"] * rollout["samples_per_question"]
  for key in ("actor_micro_batch_size", "critic_micro_batch_size"):
    if mini_episodes % ppo[key]:
      raise _bad(f"ppo.{key}", ppo[key], f"must divide the minibatch of {mini_episodes} episodes "
                 f"(ppo.mini_batch_size={ppo['mini_batch_size']} × rollout.samples_per_question)")
  episodes = ppo["batch_size"] * rollout["samples_per_question"]
  if episodes % ppo["score_micro_batch_size"]:
    raise _bad("ppo.score_micro_batch_size", ppo["score_micro_batch_size"],
               f"must divide the {episodes} episodes of a batch "
               f"(ppo.batch_size × rollout.samples_per_question)")
  if ppo["adv_estimator"] == "grpo" and rollout["samples_per_question"] < 2:
    raise _bad("ppo.adv_estimator", "grpo", "normalises within groups of samples of one question: set "
               "rollout.samples_per_question >= 2")
  if ppo["shared_prefix"] and ppo["micro_batch_padding"] != "own":
    raise _bad("ppo.shared_prefix", True, "needs ppo.micro_batch_padding=own (set ppo.shared_prefix=False "
               "with batch padding)")
  if ppo["dual_clip"] != 0 and ppo["dual_clip"] <= 1:
    raise _bad("ppo.dual_clip", ppo["dual_clip"], "must be 0 (off) or greater than 1")

  splits = [x.strip() for x in get("precompute.splits").split(",")]
  if not all(x in ("train", "test") for x in splits) or not any(splits):
    raise _bad("precompute.splits", get("precompute.splits"),
               "must be a comma-separated subset of train,test")

  for key in ("reward.judge", "evaluate.judge"):
    section = get(key)
    if section["backend"] != "same" and not section["model"]:
      raise _bad(f"{key}.model", section["model"], f"names the judge model ({key}.backend="
                 f"{section['backend']!r}); or set {key}.backend=same to judge with the generator")
    if section["backend"] == "openai" and not section["address"] and not section["base_url"]:
      raise _bad(f"{key}.base_url", "", "the openai judge needs its endpoint, e.g. http://127.0.0.1:8000/v1")

  model = get("searcher.model")
  if model["num_heads"] % model["num_kv_heads"]:
    raise _bad("searcher.model.num_kv_heads", model["num_kv_heads"],
               f"must divide searcher.model.num_heads={model['num_heads']}")
  return config


def _cli() -> None:
  from s3_jax import cli

  flag = cli.config_flag()
  cli.run(lambda config: print(json.dumps(config.to_dict(), indent=2, sort_keys=True)), flag)


if __name__ == "__main__":
  _cli()
