"""The pre-training probe (`python -m s3_jax.probe`): with scripted turns whose searches, selections and
queries are known, its counts are those of the scripts, its rewards are the training reward's, and the
questions it leaves out are the ones asked for."""

import json

import numpy as np
import pytest
from conftest import REPO

from s3_jax import config_lib, probe, sft


def _config():
  return config_lib.load(str(REPO / "configs/tiny.py"), ["rollout.max_response_length=128"])


@pytest.mark.late(seconds=240)  # 231 s on an AVX2 Zen 1
def test_counts_follow_the_scripts_and_skip_leaves_questions_out():
  from s3_jax import assets
  from s3_jax.data.qa import read_qa

  config = _config()
  seen = {}

  def policy_for(examples, tokenizer):
    scripts = []
    for i, ex in enumerate(examples):
      if i % 3 == 0:  # no search
        scripts.append(sft.turn_texts(sft.Plan((), ())))
      elif i % 3 == 1:  # one search with the template's placeholder as the query, two documents selected
        scripts.append(sft.turn_texts(sft.Plan((probe.PLACEHOLDER,), (2,))))
      else:  # one real search, one document
        scripts.append(sft.turn_texts(sft.Plan((sft.keywords(ex.question),), (1,))))
    seen["examples"] = list(examples)
    return sft.ScriptedPolicy(tokenizer, scripts)

  record = probe.probe(config, init=None, questions=6, skip=5, seed=0, policy_for=policy_for,
                       log=lambda _: None)
  m, rows = record["metrics"], record["episodes"]
  first = {(e.data_source, e.question) for e in read_qa(assets.resolve(config.data.train))[:5]}
  assert len(rows) == 6 and not first & {(e.data_source, e.question) for e in seen["examples"]}
  assert [r["question"] for r in rows] == [e.question for e in seen["examples"]]
  assert m["probe/episodes_with_a_search"] == 4 and m["probe/queries"] == 4
  assert m["probe/placeholder_queries"] == 2
  assert m["rollout/searches"] == pytest.approx(4 / 6)
  # a selection counts the ids that exist in its block (a search's block holds only documents not shown yet)
  assert [r["docs_selected"] for r in rows] == [
      0 if i % 3 == 0 else min(2 if i % 3 == 1 else 1, r["block_sizes"][1]) for i, r in enumerate(rows)]
  assert sum(r["docs_selected"] for r in rows) > 0
  assert all(r["ended"] == "complete" for r in rows) and m["rollout/ended_by_completion"] == 1.0
  rewards = np.array([r["reward"] for r in rows])
  assert m["probe/nonzero_reward"] == np.sum(rewards != 0)
  assert m["reward/mean"] == pytest.approx(rewards.mean())
  # s3's filter kept only questions naive RAG got wrong, so GBR = the searcher's GenAcc minus 0 here
  np.testing.assert_allclose(rewards, [1.0 if r > 0 else 0.0 for r in rewards])
  # the generator's ceiling: only questions with an answer-bearing document among their top 12 are scored
  oracle = [r["oracle"] for r in rows]
  assert m["probe/answer_in_top12"] == sum(o["found"] for o in oracle)
  assert all(o["genacc"] == 0.0 and o["docs"] == 0 for o in oracle if not o["found"])
  assert all(1 <= o["docs"] <= config.precompute.context_docs for o in oracle if o["found"])
  assert m["probe/oracle_genacc"] == pytest.approx(np.mean([o["genacc"] for o in oracle]))
  json.dumps(record)  # what --out writes


def test_too_few_questions_is_an_error_naming_the_flags():
  with pytest.raises(ValueError, match="--questions 1000"):
    probe.probe(_config(), init=None, questions=1000, skip=0, seed=0, policy_for=lambda e, t: None,
                log=lambda _: None)
  with pytest.raises(ValueError, match="no searcher"):
    probe.probe(_config(), init=None, questions=2, skip=0, seed=0, log=lambda _: None)


def test_the_ceiling_gives_the_generator_the_first_answer_bearing_documents():
  from types import SimpleNamespace

  from s3_jax.data.corpus import Doc
  from s3_jax.data.qa import QAExample

  asked = []

  class Scorer:  # records what the generator is given; right when a document names Vienna
    def rewards(self, items):
      asked.extend(items)
      return [SimpleNamespace(scores=SimpleNamespace(genacc=any("Vienna" in d.text for d in i.docs)))
              for i in items]

  docs = [Doc("1", "Danube", "A river in Europe."), Doc("2", "Austria", "Its capital is Vienna."),
          Doc("3", "Wien", "VIENNA, city on the Danube."), Doc("4", "Vienna", "The capital of Austria."),
          Doc("5", "Prague", "Capital of Czechia.")]
  examples = [QAExample("a", "Capital of Austria?", ("Vienna",), "t"),
              QAExample("b", "Capital of Czechia?", ("Prague",), "t"),
              QAExample("c", "Capital of Mars?", ("Olympus",), "t")]
  retrieved = {("t", e.question): docs for e in examples}
  out = probe._ceiling(Scorer(), examples, retrieved, 2)
  assert [[d.id for d in i.docs] for i in asked] == [["2", "3"], ["5"]]  # the first 2 that name the answer
  assert out == [{"found": True, "docs": 2, "genacc": 1.0}, {"found": True, "docs": 1, "genacc": 0.0},
                 {"found": False, "docs": 0, "genacc": 0.0}]
