"""The batch reward scorer: batched generator and judge calls, the content-addressed cache, GBR against the
RAG cache (with a scripted generator here; test_generator_service.py runs the real model over gRPC)."""

import pytest

from s3_jax.data.corpus import Doc
from s3_jax.reward.cache import AnswerCache
from s3_jax.reward.gbr import AnswerScores, RagCache
from s3_jax.reward.scorer import RewardItem, RewardScorer
from s3_jax.services.generator_backends import Completion

BIZET = (Doc("1", "Carmen", "Carmen is an opera by Georges Bizet."),)
OTHER = (Doc("2", "Paris", "Paris is the capital of France."),)


class ScriptedGenerator:
  """Answers "Georges Bizet" when the context names him, otherwise "I do not know"; the judge says yes
  to replies that mention "composer"."""

  def __init__(self):
    self.answer_batches, self.judge_batches = [], []

  def complete(self, chats, *, temperature=0.0, top_p=1.0, max_tokens=None, **_):
    self.answer_batches.append(chats)
    texts = ["Georges Bizet" if "Bizet" in chat[0]["content"] else
             "the composer of Carmen" if "composer" in chat[1]["content"] else "I do not know"
             for chat in chats]
    return [Completion(t, 10, 3, "stop") for t in texts]

  def generate(self, chats, *, temperature=0.0, top_p=1.0, max_tokens=None):
    self.judge_batches.append(chats)
    return ["yes" if "composer" in chat[0]["content"] else "no" for chat in chats]


def _rag_cache():
  cache = RagCache()
  no = AnswerScores(span=False, em=False, f1=0.0, judge=False, genacc=False)
  yes = AnswerScores(span=True, em=True, f1=1.0, judge=None, genacc=True)
  cache.put("nq", "Who composed Carmen?", "?", no)
  cache.put("nq", "Name the composer of Carmen?", "?", no)
  cache.put("hotpotqa", "Who wrote Carmen?", "Bizet", yes)
  return cache


def test_batch_scoring_judges_only_failed_spans_and_computes_gbr():
  generator = ScriptedGenerator()
  scorer = RewardScorer(generator, generator_id="scripted", kind="code", rag_cache=_rag_cache())
  items = [RewardItem("nq", "Who composed Carmen", ("Georges Bizet",), BIZET),
           RewardItem("nq", "Who composed Carmen?", ("Georges Bizet",), OTHER),
           RewardItem("nq", "Name the composer of Carmen", ("Bizet",), OTHER),
           RewardItem("hotpotqa", "Who wrote Carmen?", ("Bizet",), BIZET)]
  results = scorer.rewards(items)
  assert [r.answer for r in results] == ["Georges Bizet", "I do not know", "the composer of Carmen",
                                         "Georges Bizet"]
  assert [r.scores.span for r in results] == [True, False, False, True]
  assert [r.scores.judge for r in results] == [None, False, True, None]
  assert [r.reward for r in results] == [2.0, 0.0, 2.0, 1.0]  # code: (acc - rag) + acc
  assert len(generator.answer_batches) == 1 and len(generator.answer_batches[0]) == 4  # one batched call
  assert len(generator.judge_batches) == 1 and len(generator.judge_batches[0]) == 2  # only failed spans
  system = generator.answer_batches[0][0][0]["content"]
  assert system.startswith("Use the following contexts") and "Doc 1 (Title: Carmen)\n" in system
  assert generator.answer_batches[0][0][1] == {"role": "user", "content": "Who composed Carmen?"}


def test_cache_answers_repeated_contexts_without_calls(tmp_path):
  generator = ScriptedGenerator()
  items = [RewardItem("nq", "Who composed Carmen?", ("Georges Bizet",), BIZET)] * 3
  scorer = RewardScorer(generator, generator_id="scripted", kind="genacc",
                        cache=AnswerCache(tmp_path / "answers.sqlite"))
  first = scorer.rewards(items)
  assert len(generator.answer_batches[0]) == 1  # a context repeated in one batch is generated once
  assert [r.cached for r in first] == [False] * 3 and scorer.stats.take()["cache_hit_rate"] == 0.0
  again = RewardScorer(generator, generator_id="scripted", kind="genacc",
                       cache=AnswerCache(tmp_path / "answers.sqlite"))  # a new process, same file
  second = again.rewards(items)
  assert len(generator.answer_batches) == 1 and all(r.cached for r in second)
  assert [r.reward for r in second] == [r.reward for r in first] == [1.0] * 3
  assert again.stats.take()["cache_hit_rate"] == 1.0
  other_model = RewardScorer(generator, generator_id="another", kind="genacc",
                             cache=AnswerCache(tmp_path / "answers.sqlite"))
  other_model.rewards(items[:1])
  assert len(generator.answer_batches) == 2  # the generator id is part of the key


def test_missing_rag_entries_and_settings_are_errors():
  with pytest.raises(ValueError, match="needs a RAG cache"):
    RewardScorer(ScriptedGenerator(), generator_id="x", kind="paper")
  scorer = RewardScorer(ScriptedGenerator(), generator_id="x", kind="paper", rag_cache=_rag_cache())
  with pytest.raises(KeyError, match=r"question 'Who is Bizet\?' of data source 'nq' is not in the RAG"):
    scorer.rewards([RewardItem("nq", "Who is Bizet", ("x",), BIZET)])


def test_without_judge_genacc_is_the_span_check():
  generator = ScriptedGenerator()
  scorer = RewardScorer(generator, generator_id="x", kind="genacc", use_judge=False)
  [result] = scorer.rewards([RewardItem("nq", "Name the composer of Carmen", ("Bizet",), OTHER)])
  assert result.scores.judge is None and result.reward == 0.0 and generator.judge_batches == []


class ScriptedJudge:
  """A judge that replies from a script, one reply per request, recording what it was asked."""

  def __init__(self, reply):
    self.reply, self.asked = reply, []

  def generate(self, chats, *, temperature=0.0, top_p=1.0, max_tokens=None):
    self.asked.extend(chats)
    return [self.reply(chat[0]["content"]) for chat in chats]


def test_a_separate_judge_and_s3s_retry_rule(tmp_path):
  """The judge is its own model; an unclear verdict is asked again of the answer generator (s3 retries on its
  default Qwen whichever judge asked first); the judge's name is part of the cache key."""
  generator = ScriptedGenerator()
  haiku = ScriptedJudge(lambda text: "hmm" if "composer" in text else "No.")
  items = [RewardItem("nq", "Name the composer of Carmen", ("Bizet",), OTHER),  # "the composer of Carmen"
           RewardItem("nq", "Who composed Carmen?", ("Bizet",), OTHER)]  # "I do not know"
  scorer = RewardScorer(generator, generator_id="scripted", kind="genacc", judge_generator=haiku,
                        judge_id="claude-3-haiku", cache=AnswerCache(tmp_path / "answers.sqlite"))
  results = scorer.rewards(items)
  assert len(haiku.asked) == 2  # both spans failed: the separate judge was asked
  assert [len(batch) for batch in generator.judge_batches] == [1]  # the unclear verdict, retried once
  assert "the composer of Carmen" in generator.judge_batches[0][0][0]["content"]
  assert [r.scores.judge for r in results] == [True, False]  # the generator's retry said yes
  same_judge_retry = RewardScorer(generator, generator_id="scripted", kind="genacc", judge_generator=haiku,
                                  judge_id="claude-3-haiku (retry: judge)", judge_retry=haiku)
  # still unclear: incorrect
  assert [r.scores.judge for r in same_judge_retry.rewards(items)] == [False, False]
  answers = len(generator.answer_batches)
  RewardScorer(generator, generator_id="scripted", kind="genacc",
               cache=AnswerCache(tmp_path / "answers.sqlite")).rewards(items)
  assert len(generator.answer_batches) == answers + 1  # another judge: nothing reused from the cache
  with pytest.raises(ValueError, match="judge_id"):
    RewardScorer(generator, generator_id="scripted", kind="genacc", judge_generator=haiku)


def test_judge_sections_of_the_config():
  from s3_jax import config_lib
  from s3_jax.models import precision
  from s3_jax.reward.scorer import generator_id, judge_from_config, scorer_from_config

  c = config_lib.default_config()
  assert judge_from_config(c.reward.judge, "gen", "jax:m") == {}  # "same": the generator judges
  c.evaluate.judge.update({"backend": "openai", "model": "claude-3-haiku", "base_url": "http://h:1/v1"})
  made = judge_from_config(c.evaluate.judge, "gen", "jax:m")
  assert made["judge_id"] == "openai:claude-3-haiku at http://h:1/v1; unclear verdicts asked again of jax:m"
  assert made["judge_retry"] == "gen"
  scorer = scorer_from_config(c, ScriptedGenerator(), kind="genacc", cache=AnswerCache(), judge="evaluate")
  generator = generator_id(c)  # the default generator: SmolLM2 in `generator.compute_dtype=auto`
  assert generator == "jax:asset:smollm2-135m-instruct" + (
      "@bfloat16" if precision.resolve("auto") == "bfloat16" else "")
  assert scorer.judge_id == made["judge_id"].replace("jax:m", generator)
  assert scorer.judge_retry is not scorer.judge_generator
  assert scorer_from_config(c, ScriptedGenerator(), kind="genacc", cache=AnswerCache()).judge_id == \
      f"{generator} (the generator)"
  c.evaluate.judge.base_url = ""
  with pytest.raises(ValueError, match=r"config\.evaluate\.judge\.base_url"):
    config_lib.validate(c)
  c.evaluate.judge.update({"backend": "vllm", "model": ""})
  with pytest.raises(ValueError, match=r"config\.evaluate\.judge\.model=''"):
    config_lib.validate(c)
