"""The naive-RAG precompute on a small embedded subset: real BM25 over the wiki-vital subset and the real
SmolLM2 generator in process; counts add up; an interrupted run resumes without redoing questions."""

import json
from pathlib import Path

import pytest
from conftest import REPO

from s3_jax import assets, config_lib
from s3_jax.data.qa import read_qa
from s3_jax.precompute import YES_NO, make_generator, run_precompute
from s3_jax.reward.gbr import RagCache


class Interrupted(RuntimeError):
  pass


class CountingGenerator:
  """The real generator, recording which questions it answers; raises on answer call `fail_on`."""

  def __init__(self, inner, fail_on=None):
    self.inner, self.fail_on, self.calls, self.questions = inner, fail_on, 0, []

  def complete(self, chats, **kwargs):
    self.calls += 1
    if self.calls == self.fail_on:
      raise Interrupted("simulated interruption")
    self.questions.extend(chat[-1]["content"] for chat in chats)
    return self.inner.complete(chats, **kwargs)

  def generate(self, chats, **kwargs):  # the judge
    return self.inner.generate(chats, **kwargs)


@pytest.fixture(scope="module")
def config(asset, tmp_path_factory):
  for name in ("smollm2-135m-instruct", "wiki-vital", "qa-fanout"):
    asset(name)
  return config_lib.load(str(REPO / "configs/tiny.py"), [
      "data.train_limit=6", "precompute.splits=train", "precompute.chunk_size=3",
      f"precompute.dir={tmp_path_factory.mktemp('precompute')}"])


@pytest.mark.faults
def test_precompute_resumes_and_filters(config):
  out = Path(config.precompute.dir)
  questions = read_qa(assets.resolve(config.data.train))[:6]
  generator = make_generator(config)
  with pytest.raises(Interrupted):
    run_precompute(config, generator=CountingGenerator(generator, fail_on=2), show_progress=False)
  assert len(RagCache.load(out / "rag_cache.json")) == 3  # the first chunk was saved before the failure

  resumed, logs = CountingGenerator(generator), []
  stats = run_precompute(config, generator=resumed, show_progress=False, log=logs.append)
  assert "3 of 6 questions already done" in logs[0]
  assert resumed.questions == [q.question for q in questions[3:]]  # only the unfinished questions

  cache = RagCache.load(out / "rag_cache.json")
  assert len(cache) == 6
  retrieval = [json.loads(line) for line in (out / "retrieval_train.jsonl").read_text().splitlines()]
  assert [r["question"] for r in retrieval] == [q.question for q in questions]
  assert all(len(r["docs"]) == config.precompute.retrieval_topk for r in retrieval)
  assert all(r["docs"][0]["score"] >= r["docs"][-1]["score"] > 0 for r in retrieval)

  kept = read_qa(out / "train_filtered.jsonl")
  expected = [q for q in questions if not set(q.golden_answers) & YES_NO
              and cache.get(q.data_source, q.question)["score"] == 0]
  assert [q.question for q in kept] == [q.question for q in expected]
  correct = sum(cache.get(q.data_source, q.question)["score"] for q in questions)
  assert stats["train"]["questions"] == 6 and stats["train"]["kept"] == len(kept)
  assert stats["train"]["dropped_rag_correct"] == correct
  assert len(kept) == 6 - len({q.question for q in questions if set(q.golden_answers) & YES_NO
                               or cache.get(q.data_source, q.question)["score"]})
  on_disk = json.loads((out / "stats.json").read_text())
  assert on_disk["train"] == stats["train"]

  assert on_disk["reward"]["items"] == 3 and on_disk["reward"]["generator_calls"] == len(resumed.questions)

  again = CountingGenerator(generator)
  run_precompute(config, generator=again, show_progress=False, log=lambda *_: None)
  assert again.questions == []  # everything done: nothing is generated again
  # ... and the record of the generator's work is kept, not overwritten by this run's zeros
  on_disk = json.loads((out / "stats.json").read_text())
  assert [run["items"] for run in on_disk["reward_runs"]] == [3, 0] and on_disk["reward"]["items"] == 3


@pytest.mark.entry
def test_precompute_cli(config, tmp_path):
  import subprocess
  import sys

  done = subprocess.run([sys.executable, "-m", "s3_jax.precompute", "--config", str(REPO / "configs/tiny.py"),
                         "--config.data.train_limit=2", "--config.precompute.splits=train",
                         f"--config.precompute.dir={tmp_path}"], capture_output=True, text=True, cwd=REPO)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "2 questions ->" in done.stderr + done.stdout and (tmp_path / "train_filtered.jsonl").is_file()
  assert json.loads((tmp_path / "stats.json").read_text())["train"]["questions"] == 2
  bad = subprocess.run([sys.executable, "-m", "s3_jax.precompute", "--config", str(REPO / "configs/tiny.py"),
                        "--config.precompute.splits=dev"], capture_output=True, text=True, cwd=REPO)
  assert bad.returncode != 0 and "config.precompute.splits='dev': must be a comma-separated" in bad.stderr


class RecordingGenerator:
  """Records the system message (the context) of every answer request; answers nothing useful."""

  def __init__(self):
    self.systems = []

  def complete(self, chats, **kwargs):
    from s3_jax.services.generator_backends import Completion

    self.systems.extend(chat[0]["content"] for chat in chats)
    return [Completion("I do not know", 10, 4, "stop") for _ in chats]

  def generate(self, chats, **kwargs):  # the judge
    return ["no"] * len(chats)


def test_precompute_keys_its_results_by_the_rag_context_format(config, tmp_path):
  """s3's RAG cache was answered from e5_retrieval's one-line context (s3_protocol.md §3.3): the default
  format. A folder made under another format (or before the format was recorded) is stale: said so, and
  recomputed; the same settings reuse it."""
  from s3_jax.precompute import precompute_dir

  base = ["data.train_limit=3", "precompute.splits=train", f"precompute.dir={tmp_path}"]
  s3_config = config_lib.load(str(REPO / "configs/tiny.py"), base)
  d_s3_config = config_lib.load(str(REPO / "configs/tiny.py"), [*base, "reward.rag_context_format=d_s3"])
  first = RecordingGenerator()
  run_precompute(s3_config, generator=first, show_progress=False, log=lambda *_: None)
  retrieval = [json.loads(line) for line in (tmp_path / "retrieval_train.jsonl").read_text().splitlines()]
  s3_contexts = ["".join(f'Doc {i} (Title: "{d["title"]}") {d["text"]}\n'
                         for i, d in enumerate(r["docs"], 1)).split("Doc 4")[0] for r in retrieval]
  assert first.systems == [f"Use the following contexts (some might be irrelevant) on demand:\nContexts:\n"
                           f"{c}\n\nImportant: You MUST directly answer the question without any other text "
                           "and thinking." for c in s3_contexts]

  again, logs = RecordingGenerator(), []
  run_precompute(s3_config, generator=again, show_progress=False, log=logs.append)
  assert again.systems == [] and not any("stale" in line for line in logs)  # reused

  other, logs = RecordingGenerator(), []
  run_precompute(d_s3_config, generator=other, show_progress=False, log=logs.append)
  stale = f'precompute in {tmp_path} is stale (rag_context_format: "s3" -> "d_s3")'
  assert any(stale in line for line in logs)
  d_s3_contexts = ["".join(f"Doc {i} (Title: {d['title']})\n{d['text']}\n\n" for i, d in
                           enumerate(r["docs"][:3], 1)) for r in retrieval]
  assert [s.split("Contexts:\n")[1].split("\n\nImportant:")[0] for s in other.systems] == d_s3_contexts
  assert json.loads((tmp_path / "settings.json").read_text())["rag_context_format"] == "d_s3"

  (tmp_path / "settings.json").unlink()  # a folder from before settings.json was written
  logs = []
  run_precompute(d_s3_config, generator=RecordingGenerator(), show_progress=False, log=logs.append)
  assert any("has no settings.json" in line for line in logs)
  # Without precompute.dir, each format has a folder of its own.
  unset = ["data.train_limit=3", "precompute.splits=train"]
  assert precompute_dir(config_lib.load(str(REPO / "configs/tiny.py"), unset)) != precompute_dir(
      config_lib.load(str(REPO / "configs/tiny.py"), [*unset, "reward.rag_context_format=d_s3"]))
