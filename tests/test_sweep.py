"""`python -m launch.sweep`: a config's sweep expanded into run folders with their resolved configs, the
commands each launcher would run, a local sweep of two tiny runs to completion (a rerun is a no-op), and
`--summarize`."""

import json
import os
import shlex
import subprocess
import sys

import pytest
from conftest import REPO

from s3_jax import config_lib


def _sweep(*args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on a laptop
  return subprocess.run([sys.executable, "-m", "launch.sweep", *args], capture_output=True, text=True,
                        cwd=REPO, env=env)


@pytest.mark.parametrize("launcher", ["local", "tpu_vm", "gpu_vm"])
def test_dry_run_prints_each_runs_command(launcher, tmp_path):
  spec = "configs/smollm2_wiki.py:runlocal"
  done = _sweep("--config", spec, "--root", str(tmp_path), "--launcher", launcher, "--dry-run")
  assert done.returncode == 0, done.stderr
  commands = [shlex.split(line) for line in done.stdout.splitlines()]
  runs = config_lib.sweep_runs(str(REPO / spec))
  assert len(commands) == len(runs) >= 10
  for command, (_, overrides) in zip(commands, runs, strict=True):
    if launcher != "local":
      assert command[:5] == ["bash", str(REPO / "launch" / f"{launcher}.sh"), "run", "--", "python"]
      command = command[4:]
    assert command[1:5] == ["-m", "s3_jax.train", "--config", spec]
    assert command[5:-2] == [f"--config.{o}" for o in overrides] and command[-2] == "--workdir"
    resolved = json.loads((tmp_path / command[-1].split("/")[-1] / "config.json").read_text())
    assert resolved == json.loads(config_lib.load(str(REPO / spec), overrides).to_json_best_effort())
  listing = json.loads((tmp_path / "sweep.json").read_text())
  assert [r["name"] for r in listing["runs"]] == [name for name, _ in runs]


def test_bad_sweep_launches_nothing(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from s3_jax import config_lib\n\ndef get_config(arg=None):\n"
                 "  return config_lib.default_config()\n\n\n"
                 "def sweep(add):\n  add(**{'ppo.actor_lrr': 1e-5})\n")
  done = _sweep("--config", str(bad), "--root", str(tmp_path / "runs"))
  assert done.returncode == 1 and "no such config key" in done.stderr
  assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.entry
@pytest.mark.late(seconds=190)
def test_local_sweep_of_two_tiny_runs(tmp_path):
  done = _sweep("--config", "configs/tiny.py:steps=1", "--root", str(tmp_path))
  assert done.returncode == 0, done.stderr[-3000:]
  for name in ("base", "reward.kind=genacc"):
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    assert (tmp_path / name / "checkpoints" / "1").is_dir()
  config = json.loads((tmp_path / "reward.kind=genacc" / "config.json").read_text())
  assert config["reward"]["kind"] == "genacc" and config["total_steps"] == 1
  again = _sweep("--config", "configs/tiny.py:steps=1", "--root", str(tmp_path))
  assert again.returncode == 0 and again.stderr.count("finished, skipped") == 2
  summary = _sweep("--summarize", str(tmp_path))
  assert summary.returncode == 0, summary.stderr
  table = (tmp_path / "summary.md").read_text()
  base = json.loads((tmp_path / "base" / "metrics.jsonl").read_text().splitlines()[-1])
  row = next(line for line in table.splitlines() if line.startswith("| base |"))
  assert row.startswith(f"| base | 1 | {base['reward/mean']:.4g} | {base['reward/genacc']:.4g} |")
  assert (tmp_path / "summary.png").stat().st_size > 1000


def test_summary_names_who_answered_and_judged(tmp_path):
  from launch.sweep import summarize

  for run, judge in (("base", "jax:g (the generator)"), ("other", "openai:haiku at http://h/v1")):
    (tmp_path / run / "eval" / "rag").mkdir(parents=True)
    (tmp_path / run / "config.json").write_text("{}")
    (tmp_path / run / "eval" / "rag" / "summary.json").write_text(json.dumps(
        {"average": {"genacc": 0.5, "em": 0.25}}))
    (tmp_path / run / "eval" / "rag" / "predictions.jsonl").write_text(json.dumps(
        {"generator": "jax:g", "judge": judge}) + "\n")
  table = summarize(tmp_path).read_text()
  assert "| base | – |" in table and "| 50.0 (25.0) |" in table
  assert table.splitlines()[-2:] == ["- eval rag: answers by jax:g, judged by jax:g (the generator)",
                                     "- eval rag: answers by jax:g, judged by openai:haiku at http://h/v1"]
