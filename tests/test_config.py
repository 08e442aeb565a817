"""Config files, the `:arg` syntax, overrides and validation."""

import copy
import json
import subprocess
import sys

import pytest
from conftest import REPO

from s3_jax import config_lib
from s3_jax.models.config import DecoderConfig

CONFIG_FILES = sorted(p.name for p in (REPO / "configs").glob("*.py"))
# Every file with its default arg, plus the variants its docstring advertises.
SPECS = [f"configs/{name}" for name in CONFIG_FILES] + [
    "configs/tiny.py:dense,steps=2",
    "configs/smollm2_wiki.py:dense,qa=trivia,runlocal",
    "configs/s3_qwen7b.py:5-3-4,seed=3",
    "configs/s3_qwen7b.py:3-3-3",
]


def test_the_shipped_configs_exist():
  assert {"tiny.py", "smollm2_wiki.py", "s3_qwen7b.py"} <= set(CONFIG_FILES)


@pytest.mark.parametrize("spec", SPECS)
def test_every_config_loads_and_validates(spec):
  config = config_lib.load(str(REPO / spec))
  assert config.is_locked
  with pytest.raises(AttributeError):
    config.ppo.clip_ratoi = 0.3  # locked: a typo fails at once


def test_paper_config_has_the_spec_hyper_parameters():
  """Values from s3_protocol.md §6's hyper-parameter table and §1.1's X-Y-Z naming."""
  c = config_lib.load(str(REPO / "configs/s3_qwen7b.py"))
  assert (c.rollout.topk, c.rollout.max_select, c.rollout.max_turns) == (8, 3, 3)
  assert (c.ppo.batch_size, c.ppo.mini_batch_size) == (120, 30)
  assert (c.ppo.actor_micro_batch_size, c.ppo.critic_micro_batch_size) == (15, 10)
  assert (c.ppo.actor_lr, c.ppo.critic_lr) == (1e-6, 1e-5)
  assert (c.ppo.actor_warmup_ratio, c.ppo.critic_warmup_ratio) == (0.0, 0.01)
  assert (c.ppo.clip_ratio, c.ppo.value_clip, c.ppo.entropy_coef) == (0.2, 0.5, 0.001)
  assert (c.ppo.gamma, c.ppo.lam, c.ppo.kl_coef, c.ppo.kl_mode) == (1.0, 1.0, 0.001, "reward")
  assert (c.ppo.epochs, c.ppo.grad_clip, c.ppo.weight_decay) == (1, 1.0, 0.01)
  assert (c.rollout.temperature, c.rollout.top_p, c.rollout.top_k) == (0.6, 0.95, -1)
  assert (c.rollout.max_prompt_length, c.rollout.max_response_length) == (8000, 500)
  assert c.rollout.max_obs_length == 1400
  assert c.data.shuffle_seed == 42 and c.total_steps == 20
  assert (c.retriever.query_prefix, c.retriever.passage_prefix) == ("query: ", "passage: ")
  variant = config_lib.load(str(REPO / "configs/s3_qwen7b.py:5-3-4"))
  assert (variant.rollout.topk, variant.rollout.max_select, variant.rollout.max_turns) == (5, 3, 4)


def test_parse_arg():
  arg = config_lib.parse_arg("dense,runlocal,steps=7,lr=3e-4,name=x", variant="bm25", runlocal=False,
                             steps=3, lr=1e-3, name="", flag=True)
  assert arg.to_dict() == {"variant": "dense", "runlocal": True, "steps": 7, "lr": 3e-4, "name": "x",
                           "flag": True}
  assert config_lib.parse_arg(None, variant="a", runlocal=False).to_dict() == {"variant": "a",
                                                                               "runlocal": False}
  assert config_lib.parse_arg("runlocal=false", runlocal=True).runlocal is False


@pytest.mark.parametrize("arg, message", [
    ("seeds=1", r"unknown config arg 'seeds'; known keys: \['runlocal', 'seed'\]"),
    ("seed=one", r"config arg seed='one': expected int"),
    ("runlocal=maybe", r"config arg runlocal='maybe': expected a boolean"),
    ("dense", r"config arg 'dense' is not a boolean key"),
])
def test_parse_arg_errors(arg, message):
  with pytest.raises(ValueError, match=message):
    config_lib.parse_arg(arg, runlocal=False, seed=0)


def test_overrides_take_the_type_of_the_key():
  config = config_lib.load(str(REPO / "configs/tiny.py"),
                           ["ppo.clip_ratio=0.3", "rollout.topk=5", "retriever.kind=dense"])
  assert (config.ppo.clip_ratio, config.rollout.topk, config.retriever.kind) == (0.3, 5, "dense")
  with pytest.raises(ValueError, match=r"override 'ppo.clip_ratoi': no such config key"):
    config_lib.load(str(REPO / "configs/tiny.py"), ["ppo.clip_ratoi=0.3"])
  with pytest.raises(ValueError, match=r"override ppo.epochs='two': expected int"):
    config_lib.load(str(REPO / "configs/tiny.py"), ["ppo.epochs=two"])


@pytest.mark.parametrize("override, message", [
    ("retriever.kind=splade", r"config.retriever.kind='splade': must be one of bm25, dense"),
    ("ppo.mini_batch_size=3", r"config.ppo.mini_batch_size=3: must divide ppo.batch_size=8"),
    ("ppo.actor_micro_batch_size=3", r"config.ppo.actor_micro_batch_size=3: must divide"),
    ("rollout.topk=0", r"config.rollout.topk=0: must be a positive integer"),
    ("rollout.max_select=4", r"config.rollout.max_select=4: cannot exceed rollout.topk=3"),
    ("rollout.top_p=1.5", r"config.rollout.top_p=1.5: must be in \[0, 1\]"),
    ("rollout.top_k=0", r"config.rollout.top_k=0: must be -1 \(off\) or a positive integer"),
    ("ppo.actor_lr=-1e-6", r"config.ppo.actor_lr=-1e-06: must be a non-negative number"),
    ("ppo.dual_clip=0.5", r"config.ppo.dual_clip=0.5: must be 0 \(off\) or greater than 1"),
    ("mesh.tensor=-1", r"config.mesh=.*at most one axis may be -1"),
    ("mesh.data=0", r"config.mesh.data=0: must be a positive integer or -1"),
    ("data.train=asset:qa fanout", r"config.data.train='asset:qa fanout': must be a file path or asset"),
    ("searcher.model.num_kv_heads=3", r"config.searcher.model.num_kv_heads=3: must divide"),
    ("reward.kind=gbr", r"config.reward.kind='gbr': must be one of paper, code, genacc, em, f1"),
    ("generator.compute_dtype=fp16", r"config.generator.compute_dtype='fp16': must be one of auto, float32"),
    ("rollout.matmul_kernel=amx", r"config.rollout.matmul_kernel='amx': must be one of auto, cpu, xla"),
    # the learner's choices, checked here once (settings.PPOSettings does not check them again)
    ("ppo.micro_batch_padding=rows", r"config.ppo.micro_batch_padding='rows': must be one of own, batch"),
    ("ppo.micro_batch_padding=batch", r"config.ppo.shared_prefix=True: needs ppo.micro_batch_padding=own"),
    ("ppo.adv_estimator=vtrace", r"config.ppo.adv_estimator='vtrace': must be one of gae, grpo"),
    ("ppo.loss_agg=seq_mean", r"config.ppo.loss_agg='seq_mean': must be one of token_mean, micro_token_mean"),
])
def test_validate_names_the_key_and_the_value(override, message):
  with pytest.raises(ValueError, match=message):
    config_lib.load(str(REPO / "configs/tiny.py"), [override])


def test_config_without_get_config_is_rejected(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("x = 1\n")
  with pytest.raises(ValueError, match=r"bad.py: a config file must define get_config"):
    config_lib.load(str(bad))
  with pytest.raises(FileNotFoundError, match=r"missing\.py"):
    config_lib.load(str(tmp_path / "missing.py"))


@pytest.mark.faults
@pytest.mark.entry
def test_cli_resolves_arg_and_overrides_with_absl_flags():
  def run(*flags):
    return subprocess.run([sys.executable, "-m", "s3_jax.config_lib", *flags], capture_output=True,
                          text=True, cwd=REPO)

  done = run("--config", "configs/s3_qwen7b.py:3-3-4,seed=5", "--config.ppo.clip_ratio=0.25")
  assert done.returncode == 0, done.stderr
  resolved = json.loads(done.stdout)
  assert (resolved["rollout"]["topk"], resolved["rollout"]["max_turns"]) == (3, 4)
  assert (resolved["seed"], resolved["ppo"]["clip_ratio"]) == (5, 0.25)
  typo = run("--config", "configs/tiny.py", "--config.ppo.clip_ratoi=0.3")
  # one line naming the flag, ml_collections' suggestion kept; no trace
  assert typo.returncode == 1 and typo.stderr.strip() == (
      "error: --config.ppo.clip_ratoi=0.3: no config key 'clip_ratoi' (Did you mean \"clip_ratio\" "
      "instead of \"clip_ratoi\"?)")
  missing = run("--config", "configs/tiny.py", "--config.nosection.key=1")
  assert missing.stderr.strip() == "error: --config.nosection.key=1: no config key 'nosection'"
  wrong_type = run("--config", "configs/tiny.py", "--config.ppo.batch_size=eight")
  assert wrong_type.returncode == 1 and len(wrong_type.stderr.strip().splitlines()) == 1
  assert "--config.ppo.batch_size=eight" in wrong_type.stderr
  invalid = run("--config", "configs/tiny.py", "--config.ppo.mini_batch_size=3")
  assert invalid.returncode == 1
  assert "config.ppo.mini_batch_size=3: must divide ppo.batch_size=8" in invalid.stderr


@pytest.mark.parametrize("spec", ["configs/s3_qwen7b.py", "configs/s3_qwen7b.py:5-3-4",
                                  "configs/smollm2_wiki.py"])
def test_ablation_sweeps_expand_to_valid_distinct_runs(spec):
  runs = config_lib.sweep_runs(str(REPO / spec))
  names = [name for name, _ in runs]
  assert len(names) == len(set(names)) >= 10
  by_name = dict(runs)
  assert by_name["reward.kind=em"] == ["reward.kind=em"]
  assert "rollout.selection=False" in by_name
  grpo = config_lib.load(str(REPO / spec), by_name["grpo"])
  assert grpo.ppo.adv_estimator == "grpo" and grpo.rollout.samples_per_question == 4
  topk = config_lib.load(str(REPO / spec), by_name["rollout.topk=3,rollout.max_turns=4"])
  assert (topk.rollout.topk, topk.rollout.max_turns) == (3, 4)


def test_a_sweep_with_a_bad_key_fails_before_launch(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from s3_jax import config_lib\n\ndef get_config(arg=None):\n"
                 "  return config_lib.default_config()\n\n"
                 "def sweep(add):\n  add(**{'ppo.actor_lrr': 1e-5})\n")
  with pytest.raises(ValueError, match=r"sweep run 'ppo\.actor_lrr=1e-05'.*no such config key"):
    config_lib.sweep_runs(str(bad))


@pytest.mark.parametrize("spec", ["configs/s3_qwen7b.py:8-3-3,faithful",
                                  "configs/smollm2_wiki.py:bm25,faithful", "configs/tiny.py:faithful"])
def test_faithful_variant_switches_every_choice_to_s3s(spec):
  """`faithful`: D_s3 by s3's parser, the RAG cache from s3's one-line context, s3's 12 initial docs in
  training prompts and 3 at evaluation, s3's turn count; nothing else changes."""
  plain = config_lib.load(str(REPO / spec.replace(",faithful", "").replace(":faithful", "")))
  faithful = config_lib.load(str(REPO / spec))
  changed = {k for k, v in config_lib.flatten(faithful.to_dict()).items()
             if config_lib.flatten(plain.to_dict())[k] != v}
  assert faithful.rollout.doc_extraction == "faithful" and faithful.reward.rag_context_format == "s3"
  assert faithful.rollout.initial_docs == 12 and faithful.evaluate.initial_docs == 3
  assert faithful.rollout.turn_semantics == "s3"
  assert changed <= {"rollout.doc_extraction", "rollout.initial_docs"}


def test_an_old_record_reads_a_renamed_key_under_its_new_name():
  """A run recorded before `searcher.model.mlp_size` became `intermediate_size` (the decoder's own name) is
  compared with today's config under the new name: same value, no difference."""
  config = config_lib.load(str(REPO / "configs/tiny.py"))
  record = json.loads(config.to_json_best_effort(sort_keys=True))
  old = copy.deepcopy(record)
  old["searcher"]["model"]["mlp_size"] = old["searcher"]["model"].pop("intermediate_size")
  assert config_lib.flatten_record(old) == config_lib.flatten(record)
  assert "searcher.model.mlp_size" in config_lib.flatten(old)


def test_a_random_searcher_is_built_from_the_model_section_by_field_name():
  config = config_lib.load(str(REPO / "configs/tiny.py"))
  decoder = DecoderConfig.from_fields(config.searcher.model, eos_token_id=7)
  m = config.searcher.model
  assert (decoder.hidden_size, decoder.intermediate_size, decoder.num_layers, decoder.eos_token_id) == (
      m.hidden_size, m.intermediate_size, m.num_layers, 7)
  with pytest.raises(ValueError, match=r"searcher.model: unknown decoder field\(s\) mlp_size"):
    DecoderConfig.from_fields({**m.to_dict(), "mlp_size": 3})
