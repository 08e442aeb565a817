"""The trainer end to end on configs/tiny.py: real gRPC retriever (BM25) and generator (SmolLM2) on loopback,
the real precompute, PPO steps, checkpoints, metrics, the plot, HF export — and resumption after a kill gives
the same metrics and parameters as an uninterrupted run."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from s3_jax import config_lib
from s3_jax import metrics as metrics_lib

# Small and fast: 4 questions per step; a 2-device mesh (fsdp=2) of the 8 fake devices, so the real loop runs
# sharded.
OVERRIDES = ["ppo.batch_size=4", "ppo.mini_batch_size=2", "ppo.actor_micro_batch_size=2",
             "ppo.critic_micro_batch_size=2", "ppo.score_micro_batch_size=2", "mesh.fsdp=2"]


def _config(steps, *extra):
  return config_lib.load(f"{REPO / 'configs' / 'tiny.py'}:steps={steps}", [*OVERRIDES, *extra])


def _rows(workdir):
  """Metric rows without the wall-clock times (the only values that differ between identical runs)."""
  return [{k: v for k, v in row.items() if not k.startswith("time/")}
          for row in metrics_lib.read_metrics(workdir)]


def _recording_instances(monkeypatch, cls):
  """Every `cls` made from now on (the trainer builds its sampler, the generator's and its learner itself)."""
  made, init = [], cls.__init__

  def recording_init(self, *args, **kwargs):
    init(self, *args, **kwargs)
    made.append(self)

  monkeypatch.setattr(cls, "__init__", recording_init)
  return made


@pytest.mark.slow
@pytest.mark.late(seconds=120)
def test_train_main_two_steps_on_tiny(tmp_path, asset, monkeypatch):
  from s3_jax import train
  from s3_jax.models.sampler import Sampler
  from s3_jax.rl.learner import PPOLearner

  for name in ("smollm2-135m-instruct", "wiki-vital", "qa-fanout"):
    asset(name)
  samplers = _recording_instances(monkeypatch, Sampler)
  learners = _recording_instances(monkeypatch, PPOLearner)
  workdir = tmp_path / "run"
  lines = []
  rows = train.main(_config(2, "checkpoint.hf_export_every=2"), workdir, show_progress=False,
                    log=lines.append)
  assert len(rows) == 2
  written = metrics_lib.read_metrics(workdir)
  assert [r["step"] for r in written] == [1, 2]
  for key in ("reward/mean", "reward/genacc", "reward/rag_genacc", "reward/kl", "reward/cache_hit_rate",
              "actor/entropy", "actor/pg_clipfrac", "actor/pg_loss", "critic/explained_variance",
              "critic/vf_loss", "rollout/turns", "rollout/searches", "rollout/invalid_action_rate",
              "rollout/docs_selected", "time/sample", "time/retrieve", "time/reward", "time/score",
              "time/update", "data/epoch"):
    assert key in written[0], key
  first = written[0]
  # Every episode of the tiny config takes 3 turns at most (1 max turn, s3 semantics: 2 searches + final).
  assert 1 <= first["rollout/turns"] <= 3
  assert 0 <= first["reward/genacc"] <= 1 and first["reward/rag_genacc"] == 0.0  # s3's filter kept failures
  assert first["actor/entropy"] > 5  # a random 49k-vocabulary policy is nearly uniform (ln 49152 = 10.8)
  # Time split: the parts are measured inside the step and add up to less than it.
  parts = sum(first[f"time/{k}"] for k in ("sample", "retrieve", "reward", "score", "update"))
  assert parts <= first["time/step"] * 1.01
  assert (workdir / "training_curves.png").stat().st_size > 10_000
  # Each step's episodes, one row each: the step's metrics are their means, and each row's counts agree with
  # its own turns (a search is a query; a turn is a response).
  for row in written:
    episodes = [json.loads(line) for line in (workdir / "rollouts" / f"step_{row['step']}.jsonl").open()]
    assert len(episodes) == 4 and {e["step"] for e in episodes} == {row["step"]}
    for key, metric in (("reward", "reward/mean"), ("searches", "rollout/searches"),
                        ("turns", "rollout/turns"), ("docs_selected", "rollout/docs_selected")):
      assert np.mean([e[key] for e in episodes]) == pytest.approx(row[metric]), key
    assert np.mean([e["scores"]["genacc"] for e in episodes]) == pytest.approx(row["reward/genacc"])
    assert np.mean([e["reward"] != 0 for e in episodes]) == pytest.approx(row["reward/nonzero"])
    docs = np.mean([len(e["generator_docs"]) for e in episodes])
    assert docs == pytest.approx(row["rollout/generator_docs"])
    for e in episodes:
      assert e["searches"] == len(e["queries"]) and e["turns"] == len(e["responses"])
      assert e["answer"] and e["question"] and e["golden_answers"]
  assert (workdir / "checkpoints" / "2").is_dir()
  assert json.loads((workdir / "config.json").read_text())["total_steps"] == 2
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  # The exported searcher loads in transformers and matches our forward pass.
  import torch
  import transformers

  from s3_jax.models.hf import load_hf

  export = workdir / "hf" / "step_2"
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
  ours = load_hf(export)
  ids = np.array([[1, 50, 700, 12, 9000]])
  with torch.no_grad():
    expected = hf_model(torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours(ids)), expected, rtol=1e-4, atol=1e-4)
  assert any("embedded retriever" in line for line in lines)
  # No recompilation: every trace of a sampler's or the learner's jitted functions over both steps was for a
  # signature (shapes, dtypes, static arguments) that object had not traced before — a repeat would be a
  # compile on every step.
  assert {name for made in samplers + learners for name, _ in made.traces} >= {"prefill", "decode", "score",
                                                                              "update"}
  for made in samplers + learners:
    repeated = {trace for trace in made.traces if made.traces.count(trace) > 1}
    assert not repeated, (type(made).__name__, repeated)


@pytest.mark.slow
def test_learning_config_runs_a_step_at_tiny_sizes(tmp_path, asset):
  """`configs/smollm2_wiki.py:learn` (the laptop learning experiment) loads, validates and trains: the tiny
  random searcher and a few trivia questions in place of SmolLM2 and 16 questions, the rest (3-3-3, the value
  head on the actor, whole-layer remat) as the experiment runs it."""
  from s3_jax import train

  for name in ("smollm2-135m-instruct", "wiki-vital", "qa-trivia"):
    asset(name)
  config = config_lib.load(f"{REPO / 'configs' / 'smollm2_wiki.py'}:learn", [
      "total_steps=1", "searcher.init_from=", "data.train_limit=8", "data.corpus_limit=2000", "mesh.fsdp=2",
      "ppo.batch_size=2", "ppo.mini_batch_size=2", "ppo.score_micro_batch_size=2",
      "rollout.max_response_length=24", "rollout.max_prompt_length=2048", "rollout.max_obs_length=256",
      "generator.max_tokens=8", "reward.use_judge=False", "checkpoint.hf_export_every=0"])
  assert (config.rollout.topk, config.rollout.max_select, config.rollout.max_turns) == (3, 3, 3)
  rows = train.main(config, tmp_path / "run", show_progress=False, log=lambda _: None)
  assert len(rows) == 1
  assert "critic/vf_loss" in rows[0] and "critic/explained_variance" in rows[0]  # the shared value head


def _cli(workdir, steps, env_extra=None, *extra):
  env = {**os.environ, **(env_extra or {})}
  args = [sys.executable, "-m", "s3_jax.train", f"--config={REPO / 'configs' / 'tiny.py'}:steps={steps}",
          f"--workdir={workdir}", *[f"--config.{o}" for o in [*OVERRIDES, *extra]]]
  return subprocess.run(args, env=env, capture_output=True, text=True, timeout=1200, cwd=REPO)


@pytest.mark.slow
@pytest.mark.entry
@pytest.mark.late(seconds=280)
def test_killed_run_resumes_to_the_same_metrics_and_parameters(tmp_path, asset):
  for name in ("smollm2-135m-instruct", "wiki-vital", "qa-fanout"):
    asset(name)
  extra = ("checkpoint.every=2", "checkpoint.hf_export_every=3")
  straight = _cli(tmp_path / "straight", 3, None, *extra)
  assert straight.returncode == 0, straight.stderr[-3000:]
  killed = _cli(tmp_path / "resumed", 3, {"S3_JAX_KILL_AT_STEP": "3"}, *extra)
  assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
  assert [r["step"] for r in metrics_lib.read_metrics(tmp_path / "resumed")] == [1, 2]
  resumed = _cli(tmp_path / "resumed", 3, None, *extra)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stdout + resumed.stderr
  assert _rows(tmp_path / "straight") == _rows(tmp_path / "resumed")
  assert [r["step"] for r in _rows(tmp_path / "resumed")] == [1, 2, 3]
  # The resumed run rewrote the step the kill interrupted: the same episodes as the uninterrupted run.
  for step in (1, 2, 3):
    name = f"rollouts/step_{step}.jsonl"
    assert (tmp_path / "straight" / name).read_text() == (tmp_path / "resumed" / name).read_text(), name
  from safetensors.numpy import load_file

  a = load_file(tmp_path / "straight" / "hf" / "step_3" / "model.safetensors")
  b = load_file(tmp_path / "resumed" / "hf" / "step_3" / "model.safetensors")
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.faults
@pytest.mark.slow
@pytest.mark.entry
@pytest.mark.late(seconds=110)
def test_a_corrupt_newest_checkpoint_resumes_from_the_previous_one(tmp_path, asset):
  """64 bytes changed in the newest checkpoint's largest data file (orbax alone restored it silently and the
  next step went NaN): the rerun names the file, moves the step aside, resumes from the step before and ends
  with the metrics of the run that was never damaged."""
  for name in ("smollm2-135m-instruct", "wiki-vital", "qa-fanout"):
    asset(name)
  from s3_jax.checkpoint import MANIFEST

  first = _cli(tmp_path / "run", 2, None, "checkpoint.every=1", "checkpoint.hf_export_every=0")
  assert first.returncode == 0, first.stderr[-3000:]
  rows = _rows(tmp_path / "run")
  step2 = tmp_path / "run" / "checkpoints" / "2"
  data = max((p for p in step2.rglob("*") if p.is_file() and p.name != MANIFEST),
             key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  middle = len(raw) // 2
  raw[middle:middle + 64] = bytes(b ^ 0xFF for b in raw[middle:middle + 64])
  data.write_bytes(bytes(raw))
  again = _cli(tmp_path / "run", 2, None, "checkpoint.every=1", "checkpoint.hf_export_every=0")
  assert again.returncode == 0, again.stderr[-3000:]
  said = again.stdout + again.stderr
  assert f"{data} differs from what was written" in said
  assert "resumed from" in said and "at step 1" in said
  # step 2 redone from step 1: the same metrics, except that its answers now come from the answer cache
  cache = ("reward/generator_calls", "reward/cache_hit_rate")
  redone = [{k: v for k, v in r.items() if k not in cache} for r in _rows(tmp_path / "run")]
  assert redone == [{k: v for k, v in r.items() if k not in cache} for r in rows]
  assert _rows(tmp_path / "run")[1]["reward/cache_hit_rate"] == 1.0
