"""Answer checks, the judge and the reward variants on hand-worked cases (s3_protocol.md §3)."""

import numpy as np
import pytest

from s3_jax.data.corpus import Doc
from s3_jax.reward.answers import exact_match, f1, span_match
from s3_jax.reward.gbr import AnswerScores, RagCache, reward
from s3_jax.reward.judge import (
  judge,
  judge_messages,
  mirage_judge,
  mirage_messages,
  parse_judge_reply,
  parse_mirage_reply,
)
from s3_jax.reward.scorer import RewardItem
from s3_jax.search.formats import generator_context, initial_block, observation, rag_context


@pytest.mark.parametrize("prediction, golds, expected", [
    ("The answer is Barack Obama.", ["Barack Obama"], True),
    ("Obama", ["Barack Obama"], False),  # the whole gold sequence must occur
    ("barack obamas", ["Barack Obama"], False),  # tokens, not substrings
    ("It is the United States of America, I think", ["USA", "United States of America"], True),
    ("Café de Flore", ["café de flore"], True),
    ("Cafe\u0301 de Flore", ["Café"], True),  # NFD on both sides: composed and decomposed accents agree
    ("Cafe de Flore", ["Café"], False),  # accents are not stripped
    ("\u201cCarmen\u201d by Bizet", ["Carmen"], True),  # curly quotes survive normalisation as own tokens
    ("Jay Z", ["Jay-Z"], False),  # "-" is deleted, so the gold is the one token "jayz"
    ("About 1000 people", ["1,000"], True),
    ("anything at all", ["The"], True),  # a gold answer that normalises to empty always matches
    ("", ["Paris"], False),
    ("PARIS, FRANCE", ["paris"], True),  # case-insensitive
    ("東京 is big", ["東京"], True),
])
def test_span_match(prediction, golds, expected):
  assert span_match(prediction, golds) is expected


@pytest.mark.parametrize("prediction, golds, expected", [
    ("The Beatles", ["beatles"], True),
    ("Beatles!", ["The Beatles"], True),
    ("Beatles band", ["Beatles"], False),
    ("an apple", ["A  apple"], True),
    ("", ["the"], True),  # both normalise to ""
])
def test_exact_match(prediction, golds, expected):
  assert exact_match(prediction, golds) is expected


def test_f1():
  assert f1("the cat sat", ["cat sat down"]) == pytest.approx(0.8)  # P 1, R 2/3
  assert f1("b b", ["b b c", "x"]) == pytest.approx(0.8)  # the best gold counts; tokens as a multiset
  assert f1("b b b", ["b"]) == pytest.approx(0.5)  # P 1/3, R 1
  assert f1("Paris", ["London"]) == 0.0 and f1("", ["London"]) == 0.0
  assert f1("Paris.", ["paris"]) == 1.0


def test_judge_prompt_and_parsing():
  [message] = judge_messages("Obama was president", ["Barack Obama"])
  assert message == {"role": "user", "content": (
      "Please check if any of the golden answers is contained in the following response: Obama was "
      "president\n\nGolden answers: ['Barack Obama']\n\nPlease directly answer with 'yes' or 'no'.")}
  assert parse_judge_reply("Yes.") is True and parse_judge_reply("NO") is False
  assert parse_judge_reply("I cannot tell") is False  # s3's substring rule: "cannot" contains "no"
  assert parse_judge_reply("Noted, yes") is True  # "yes" is checked first
  assert parse_judge_reply("Maybe") is None


class ScriptedGenerator:
  def __init__(self, *batches):
    self.batches, self.calls = list(batches), []

  def generate(self, requests, *, temperature=0.0, top_p=1.0, max_tokens=None):
    self.calls.append((requests, temperature, top_p, max_tokens))
    return self.batches.pop(0)


def test_judge_retries_only_unclear_replies_once():
  generator = ScriptedGenerator(["yes", "maybe", "No", "hmm"], ["YES", "still unsure"])
  verdicts = judge(generator, ["a", "b", "c", "d"], [["x"], ["y"], ["z"], ["w"]])
  assert verdicts == [True, True, False, False]
  (first, t, p, n), (retry, *_) = generator.calls
  assert (t, p, n) == (0.0, 1.0, 10) and len(first) == 4
  assert retry == [first[1], first[3]]
  other = ScriptedGenerator(["yes"])
  assert judge(ScriptedGenerator(["?"]), ["a"], [["x"]], retry_generator=other) == [True]


def test_mirage_judge_needs_an_exact_yes_or_no():
  assert parse_mirage_reply(" Yes. ") is True and parse_mirage_reply("no") is False
  assert parse_mirage_reply("Yes, because the answer matches") is None
  generator = ScriptedGenerator(["Yes, it is", "no"], ["yes"])
  assert mirage_judge(generator, ["q1", "q2"], ["a1", "a2"], [["A: x"], ["B: y"]]) == [True, False]
  never = ScriptedGenerator(*[["unclear"]] * 4)
  assert mirage_judge(never, ["q"], ["a"], [["A: x"]], retries=3) == [False] and len(never.calls) == 4
  assert "Golden Answers (reference): A: x" in generator.calls[0][0][0][0]["content"]


def _scores(genacc, em=False, f1_score=0.0):
  return AnswerScores(span=genacc, em=em, f1=f1_score, judge=None, genacc=genacc)


@pytest.mark.parametrize("kind, genacc, rag, expected", [
    ("paper", True, False, 1.0), ("paper", True, True, 0.0), ("paper", False, True, -1.0),
    ("paper", False, False, 0.0),
    ("code", True, False, 2.0), ("code", True, True, 1.0), ("code", False, True, -1.0),
    ("code", False, False, 0.0),
    ("genacc", True, True, 1.0), ("genacc", False, None, 0.0),
])
def test_reward_variants(kind, genacc, rag, expected):
  assert reward(kind, _scores(genacc), rag) == expected


def test_reward_metric_variants_and_errors():
  assert reward("em", _scores(True, em=False), None) == 0.0
  assert reward("f1", _scores(False, f1_score=0.4), None) == 0.4
  with pytest.raises(ValueError, match="needs the question's naive-RAG score"):
    reward("paper", _scores(True), None)
  with pytest.raises(ValueError, match=r"reward\.kind='bleu'"):
    reward("bleu", _scores(True), True)


def test_rag_cache_missing_entries_are_errors(tmp_path):
  cache = RagCache()
  cache.put("nq", "who wrote carmen", "Bizet", _scores(True, em=True))
  path = cache.save(tmp_path / "rag_cache.json")
  loaded = RagCache.load(path)
  assert loaded.get("nq", "who wrote carmen?") == {"answer": "Bizet", "score": 1, "em_score": 1}
  assert ("nq", "  who wrote carmen ") in loaded and len(loaded) == 1
  with pytest.raises(KeyError, match=r"question 'who is bizet\?' of data source 'nq' is not in the RAG "
                                     r"cache \(.*rag_cache.json\)"):
    loaded.get("nq", "who is bizet")
  with pytest.raises(KeyError, match=r"data source 'hotpotqa' is not in the RAG cache .*\['nq'\]"):
    loaded.get("hotpotqa", "who wrote carmen?")
  with pytest.raises(FileNotFoundError, match=r"python -m s3_jax\.precompute"):
    RagCache.load(tmp_path / "missing.json")


def test_doc_formats():
  docs = [Doc("1", "Carmen", "An opera."), Doc("2", "Bizet", "A composer."), Doc("3", "Carmen", "An opera.")]
  assert initial_block(docs[:2]) == 'Doc 1 (Title: "Carmen") An opera.\nDoc 2 (Title: "Bizet") A composer.\n'
  assert observation(docs[:1]) == 'Doc 1(Title: "Carmen") An opera.\n'
  assert generator_context(docs) == ("Doc 1 (Title: Carmen)\nAn opera.\n\n"
                                     "Doc 2 (Title: Bizet)\nA composer.\n\n")


@pytest.mark.parametrize("golds", ["Paris", ["Paris"], ("Paris",), np.array(["Paris"]), np.array("Paris")])
def test_gold_answers_as_s3_takes_them(golds):
  """A bare string is one answer (s3 wraps it in a list), as is a list, tuple or numpy array of one; every
  scoring entry point agrees."""
  assert exact_match("paris", golds) and span_match("It is Paris.", golds) and f1("paris", golds) == 1.0
  assert not exact_match("a", golds.replace("Paris", "abc") if isinstance(golds, str) else ["abc"])
  [message] = judge_messages("It is Paris", golds)
  assert "Golden answers: ['Paris']\n" in message["content"]  # str(list) of plain strings, not np.str_
  assert "Golden Answers (reference): Paris\n" in mirage_messages("q?", "Paris", golds)[0]["content"]
  assert RewardItem("nq", "q?", golds, ()).golden_answers == ("Paris",)


def test_bare_string_is_not_iterated_character_by_character():
  assert not exact_match("a", "abc") and exact_match("abc", "abc")
  assert not span_match("a b c", "abc")


@pytest.mark.parametrize("golds", [5, None, {"a": 1}, ["Paris", 5], b"Paris"])
def test_gold_answers_of_another_type_are_a_type_error(golds):
  for check in (exact_match, span_match, f1):
    with pytest.raises(TypeError, match=r"gold answer"):
      check("Paris", golds)
  with pytest.raises(TypeError, match=r"gold answer"):
    judge_messages("Paris", golds)
  with pytest.raises(TypeError, match=r"gold answer"):
    RewardItem("nq", "q?", golds, ())


def test_rag_context_formats():
  """s3's RAG cache answered from e5_retrieval's one-line format of its top 12, cut at "Doc 4" (s3_protocol.md
  §3.3); "d_s3" is the D_s3 context format of the top 3."""
  docs = [Doc(str(i), f"T{i}", f"text {i}.") for i in range(1, 6)]
  assert rag_context(docs, 3) == ('Doc 1 (Title: "T1") text 1.\nDoc 2 (Title: "T2") text 2.\n'
                                  'Doc 3 (Title: "T3") text 3.\n')
  assert rag_context(docs, 3, "d_s3") == "Doc 1 (Title: T1)\ntext 1.\n\nDoc 2 (Title: T2)\ntext 2.\n\n" \
                                         "Doc 3 (Title: T3)\ntext 3.\n\n"
  # s3 splits the string at the first "Doc 4", wherever it is.
  tricky = [Doc("1", "A", "see Doc 4 of the list"), *docs[1:]]
  assert rag_context(tricky, 3) == 'Doc 1 (Title: "A") see '
  with pytest.raises(ValueError, match="rag_context_format"):
    rag_context(docs, 3, "other")
