"""The retriever and the generator killed (SIGKILL) and restarted during a real training step: the
services run as `python -m s3_jax.serve` processes on loopback, the trainer talks to them by address, and its
clients retry (each retry logged) until the restarted services answer; the step finishes with searches served
and rewards computed. The tiny random searcher never searches, so its sampler is replaced by a scripted one
that always asks a query (the retriever must be called); everything else is the real trainer."""

import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import REPO

from s3_jax import config_lib
from s3_jax import metrics as metrics_lib

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.late(seconds=220)]


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _serve(args, port):
  process = subprocess.Popen([sys.executable, "-m", "s3_jax.serve", *args, "--port", str(port)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  line = process.stdout.readline()  # "... serving on 127.0.0.1:PORT" once it listens
  assert re.search(rf"serving on 127\.0\.0\.1:{port}", line), line
  return process


def test_services_killed_and_restarted_mid_step(tmp_path, asset, monkeypatch, capfd):
  from s3_jax import train
  from s3_jax.retrieval.index_dir import ensure_config_index
  from s3_jax.rl import experience
  from s3_jax.search import episode

  for name in ("smollm2-135m-instruct", "wiki-vital", "qa-fanout"):
    asset(name)
  ports = {"retriever": _free_port(), "generator": _free_port()}
  config = config_lib.load(f"{REPO / 'configs' / 'tiny.py'}:steps=2", [
      "ppo.batch_size=4", "ppo.mini_batch_size=2", "ppo.actor_micro_batch_size=2",
      "ppo.critic_micro_batch_size=2", "ppo.score_micro_batch_size=2", "mesh.fsdp=2",
      f"retriever.address=127.0.0.1:{ports['retriever']}",
      f"generator.address=127.0.0.1:{ports['generator']}",
      "services.retry_seconds=120"])
  index = ensure_config_index(config, show_progress=False)
  commands = {"retriever": ["retriever", "--index", str(index)],
              "generator": ["generator", "--backend", "jax", "--model", "asset:smollm2-135m-instruct",
                            "--max-tokens", str(config.generator.max_tokens)]}
  running = {name: _serve(commands[name], ports[name]) for name in commands}

  # A searcher that always searches: each step's first turn asks a query, the next turns complete.
  def scripted(self, contexts, max_new_tokens, keys=None):
    del keys
    self.turns = getattr(self, "turns", 0) + 1
    reply = "<query>opera</query>" if self.turns == 1 else "<search_complete>True</search_complete>"
    ids = self.sampler.tokenizer.encode(reply, add_special_tokens=False)
    return [ids[:limit] for limit in max_new_tokens]

  monkeypatch.setattr(episode.SamplerPolicy, "sample", scripted)

  # Before step 2's rollout: both services killed; the retriever restarted 3 s later, the generator 20 s
  # after that (then ~15 s to load), while the step goes on: its searches wait for the one, its rewards for
  # the other.
  original_rollout, calls, restarted = experience.rollout, [], []

  def rollout(*args, **kwargs):
    calls.append(time.monotonic())
    if len(calls) == 2:
      for process in running.values():
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)

      def restart():  # the retriever 3 s later; the generator once the rollout's searches are through
        time.sleep(3)
        running["retriever"] = _serve(commands["retriever"], ports["retriever"])
        time.sleep(20)
        running["generator"] = _serve(commands["generator"], ports["generator"])
        restarted.append(time.monotonic())

      threading.Thread(target=restart, daemon=True).start()
    return original_rollout(*args, **kwargs)

  monkeypatch.setattr(experience, "rollout", rollout)
  try:
    rows = train.main(config, tmp_path / "run", show_progress=False, log=lambda *_: None)
  finally:
    for process in running.values():
      if process.poll() is None:
        process.terminate()
        process.wait(timeout=30)
  assert len(rows) == 2 and restarted
  second = metrics_lib.read_metrics(tmp_path / "run")[1]
  assert second["rollout/searches"] >= 1  # the retriever served step 2's searches after its restart
  assert second["reward/generator_calls"] >= 1  # and the generator its answers
  err = capfd.readouterr().err
  for name in commands:
    retried = rf"{name} at 127\.0\.0\.1:{ports[name]}: UNAVAILABLE .*retry 1 in"
    assert re.search(retried, err), (name, err[-3000:])
