"""The evaluation methods' own logic with scripted LLMs (every branch: searches, invalid turns, limits,
answers), the eval-set readers on fixtures in each format, chat continuation against `transformers`, and the
scorer's closed-book and MIRAGE paths. The same methods run end to end with real services in
tests/test_evaluate.py."""

import json

import ml_collections
import pytest
from conftest import FIXTURES, REPO

from s3_jax import config_lib
from s3_jax.data.corpus import Doc
from s3_jax.data.eval_sets import (
  is_medical,
  load_set,
  load_sets,
  read_mirage,
  retrieval_query,
  sample_per_source,
)
from s3_jax.data.qa import QAExample
from s3_jax.methods import deepretrieval, ircot, search_o1, search_r1
from s3_jax.methods.base import AgentLM, close_open_tag, strip_tags
from s3_jax.methods.static import ClosedBook, NaiveRAG
from s3_jax.metrics import Stopwatch
from s3_jax.services.generator_backends import Completion


def _config(**evaluate):
  c = config_lib.default_config()
  c.evaluate.flashrag_dir = str(FIXTURES / "flashrag")
  c.evaluate.mirage_file = str(FIXTURES / "mirage" / "benchmark.json")
  c.evaluate.update(evaluate)
  return c


class Retriever:
  """Two documents per query, named after it; records every call."""

  def __init__(self):
    self.calls = []

  def search(self, queries, k):
    self.calls.append((list(queries), k))
    return [[Doc(f"{q}-{j}", f"T {q} {j}", f"text about {q} {j}") for j in range(k)] for q in queries]


class ScriptedLM:
  """Answers each chat with `script(chat) -> text`; records the chats and stop strings."""

  def __init__(self, script):
    self.script, self.chats, self.stops = script, [], []

  def complete(self, chats, *, temperature, top_p, max_tokens, stop, seed):
    self.chats.extend(chats)
    self.stops.append(tuple(stop))
    return [Completion(self.script(chat), 10, 5, "stop") for chat in chats]


def _agent(script):
  lm = ScriptedLM(script)
  return AgentLM(lm, "scripted", Stopwatch()), lm


EXAMPLES = [QAExample("a", "Who composed Carmen?", ("Bizet",), "nq"),
            QAExample("b", "Capital of France?", ("Paris",), "nq")]


def test_static_methods():
  retriever = Retriever()
  medical = [QAExample("m", "Which one?\nOptions:\nA: x\nB: y\n?", ("A: x",), "medqa")]
  [out] = NaiveRAG(_config(rag_topk=3), retriever).run(medical)
  # s3's format (the default) cuts its top-12 one-line string before "Doc 4" (s3_protocol.md §3.3).
  assert retriever.calls == [(["Which one?"], 12)]  # the options are not searched for
  assert [d.id for d in out.docs] == ["Which one?-0", "Which one?-1", "Which one?-2"]
  assert out.context == ''.join(f'Doc {j + 1} (Title: "T Which one? {j}") text about Which one? {j}\n'
                                for j in range(3))
  c = _config(rag_topk=3)
  c.reward.rag_context_format = "d_s3"
  [out] = NaiveRAG(c, retriever).run(medical)
  assert retriever.calls[-1] == (["Which one?"], 3) and len(out.docs) == 3
  assert out.context.startswith("Doc 1 (Title: T Which one? 0)\ntext about Which one? 0\n\nDoc 2 ")
  assert all(o.closed_book and not o.docs for o in ClosedBook(_config()).run(EXAMPLES))


# Search-R1's template as its released code writes it (`scripts/data_process/nq_search.py`, `infer.py`), which
# its checkpoints were trained on, and its paper's wording.
SEARCH_R1_CODE_PROMPT = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you "
    "get new information. After reasoning, if you find you lack some knowledge, you can call a search engine "
    "by <search> query </search> and it will return the top searched results between <information> and "
    "</information>. You can search as many times as your want. If you find no further external knowledge "
    "needed, you can directly provide the answer inside <answer> and </answer>, without detailed "
    "illustrations. For example, <answer> Beijing </answer>. Question: {question}\n")
SEARCH_R1_PAPER_PROMPT = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you "
    "get new information. After reasoning, if you find you lack some knowledge, you can call a search engine "
    "by <search> query </search>, and it will return the top searched results between <information> and "
    "</information>. You can search as many times as you want. If you find no further external knowledge "
    "needed, you can directly provide the answer inside <answer> and </answer> without detailed "
    "illustrations. For example, <answer> xxx </answer>. Question: {question}\n")


def test_search_r1_loop():
  def script(chat):
    text = chat[-1]["content"] if chat[-1]["role"] == "assistant" else ""
    if "Carmen" in chat[0]["content"]:
      if not text:
        return "<think>I need the composer.</think> <search> carmen composer"  # stopped at </search>
      if text.count("<information>") == 1:
        return "<think>Found it.</think> <answer> Georges Bizet"  # stopped at </answer>
      raise AssertionError("no third turn after an answer")
    return "I am not sure what to do."  # never a valid action

  agent, lm = _agent(script)
  retriever = Retriever()
  method = search_r1.SearchR1(_config(max_searches=2, search_topk=2), retriever, agent)
  carmen, france = method.run(EXAMPLES)
  assert carmen.trace["queries"] == ["carmen composer"] and carmen.trace["agent_answer"] == "Georges Bizet"
  assert [d.id for d in carmen.docs] == ["carmen composer-0", "carmen composer-1"]
  traj = carmen.trace["trajectory"]
  assert traj.startswith("<think>I need the composer.</think> <search> carmen composer</search>"
                         "\n\n<information>")
  assert 'Doc 1(Title: "T carmen composer 0") text about carmen composer 0' in traj
  assert traj.endswith("<answer> Georges Bizet</answer>")
  # the invalid policy gets the reminder after each searching turn, and a final turn without search
  assert france.docs == [] and france.trace["agent_answer"] is None
  assert france.trace["trajectory"].count(search_r1.INVALID) == 2
  assert all(stop == ("</search>", "</answer>") for stop in lm.stops)
  assert len(lm.stops) == 3 and retriever.calls == [(["carmen composer"], 2)]
  first = lm.chats[0]
  assert first == [{"role": "user", "content": SEARCH_R1_CODE_PROMPT.format(question="Who composed Carmen?")}]
  assert search_r1.INVALID == ("\nMy previous action is invalid. If I want to search, I should put the query "
                               "between <search> and </search>. If I want to give the final answer, I should "
                               "put the answer between <answer> and </answer>. Let me try again.\n")
  paper = search_r1.SearchR1(_config(search_r1_prompt="paper"), retriever, agent)
  assert paper.prompt == SEARCH_R1_PAPER_PROMPT
  assert search_r1.parse_action("<search> a </search><answer>b</answer>") == ("search", "a")
  assert search_r1.parse_action("<answer>b") == ("invalid", "")


def test_ircot_loop():
  replies = {("Who composed Carmen?", 0): "Carmen is an opera. <search_complete>No</search_complete>",
             ("Who composed Carmen?", 1):
                 "2. It was written by Bizet.\n<search_complete>Yes</search_complete>",
             ("Capital of France?", 0): "<search_complete>yes</search_complete> Paris is the capital."}

  def script(chat):
    prompt = chat[0]["content"]
    question = prompt.split("Question: ")[1].split("\n")[0]
    return replies[(question, prompt.count("\n1. ") + prompt.count("\n2. "))]

  agent, lm = _agent(script)
  retriever = Retriever()
  carmen, france = ircot.IRCoT(_config(max_searches=4, search_topk=1), retriever, agent).run(EXAMPLES)
  assert carmen.trace["reasoning"] == ["Carmen is an opera.", "It was written by Bizet."]
  assert carmen.trace["queries"] == ["Who composed Carmen?", "Carmen is an opera."]
  assert [d.id for d in carmen.docs] == ["Who composed Carmen?-0", "Carmen is an opera.-0"]
  assert france.trace["queries"] == ["Capital of France?"] and len(france.docs) == 1  # complete at once
  assert retriever.calls == [(["Who composed Carmen?", "Capital of France?"], 1),
                             (["Carmen is an opera."], 1)]
  second = next(c for c in lm.chats if "1. Carmen is an opera." in c[0]["content"])[0]["content"]
  assert "Doc 2 (Title: T Carmen is an opera. 0)\ntext about Carmen is an opera. 0" in second
  assert strip_tags("a <x>b</x> <search_complete>No</search_complete> c") == "a b c"


def test_search_o1_loop():
  def script(chat):
    prompt = chat[0]["content"]
    if prompt.startswith("**Task:** Read the searched documents"):
      query = prompt.split("**Current search query:**\n")[1].split("\n")[0]
      return f"Analysis.\n**Final Information**\nfacts about {query}"
    text = chat[-1]["content"] if chat[-1]["role"] == "assistant" else ""
    n = text.count(search_o1.BEGIN_RESULT)
    if "Carmen" in prompt:
      return f"Step {n}. {search_o1.BEGIN_QUERY} carmen {n}" if n < 3 else "So \\boxed{Bizet}."
    return "Paris. \\boxed{Paris}"

  agent, _ = _agent(script)
  retriever = Retriever()
  carmen, france = search_o1.SearchO1(_config(max_searches=2, search_topk=1), retriever, agent).run(EXAMPLES)
  assert carmen.trace["queries"] == ["carmen 0", "carmen 1"]  # the third query is refused (limit 2)
  traj = carmen.trace["trajectory"]
  assert f"{search_o1.BEGIN_RESULT}\nfacts about carmen 0\n{search_o1.END_RESULT}" in traj
  assert search_o1.LIMIT_REACHED in traj and traj.endswith("So \\boxed{Bizet}.")
  assert carmen.trace["agent_answer"] == "Bizet"
  assert [d.id for d in carmen.docs] == ["carmen 0-0", "carmen 1-0"]
  assert france.docs == [] and france.trace["agent_answer"] == "Paris"
  assert search_o1.boxed_answer("x \\boxed{\\frac{1}{2}} y") == "\\frac{1}{2}"
  assert search_o1.final_information("no marker") == "no marker"
  assert retriever.calls == [(["carmen 0"], 1), (["carmen 1"], 1)]


def test_deepretrieval():
  assert deepretrieval.parse_query('<answer>{"query": "(bizet OR carmen) AND opera"}</answer>') == \
      "(bizet OR carmen) AND opera"
  assert deepretrieval.parse_query('<answer>{"query": ["first", "second"]}</answer>') == "first"
  assert deepretrieval.parse_query("<answer> carmen composer </answer>") == "carmen composer"
  assert deepretrieval.parse_query("<think>hmm</think> no answer") is None
  assert deepretrieval.parse_query('<answer>a</answer> then <answer>{"query": "b"}') == "b"

  agent, lm = _agent(lambda chat: ' the opera </think>\n<answer>{"query": "carmen AND opera"}</answer>'
                     if "Carmen" in chat[1]["content"] else "I cannot.")
  retriever = Retriever()
  carmen, france = deepretrieval.DeepRetrieval(_config(search_topk=3), retriever, agent).run(EXAMPLES)
  assert retriever.calls == [(["carmen AND opera", "Capital of France?"], 3)]
  assert not carmen.trace["fallback"] and france.trace["fallback"]
  assert lm.chats[0][-1] == {"role": "assistant", "content": deepretrieval.ASSISTANT_START}


def test_close_open_tag():
  assert close_open_tag("<think>x</think><search> q", ("search", "answer")) == \
      "<think>x</think><search> q</search>"
  assert close_open_tag("<search>a</search> done", ("search", "answer")) == "<search>a</search> done"
  assert close_open_tag("plain", ("search", "answer")) == "plain"


def test_flashrag_sets():
  config = _config()
  nq = load_set("nq", config)
  assert nq.path.endswith("flashrag/nq/test.jsonl")  # test is preferred over train
  assert [ex.question for ex in nq.examples][:2] == ["who composed the opera carmen?",
                                                     "what is the capital of france?"]
  assert {ex.data_source for ex in nq.examples} == {"nq"}
  hotpot = load_set("hotpotqa", config)
  assert hotpot.path.endswith("flashrag/hotpotqa/dev.jsonl") and len(hotpot.examples) == 2
  with pytest.raises(FileNotFoundError, match=r"FlashRAG set 'musique'.*musique/test\.jsonl"):
    load_set("musique", config)
  mine = load_set(f"mine={FIXTURES / 'qa_small.jsonl'}", config)
  assert mine.name == "mine" and {ex.data_source for ex in mine.examples} == {"fixture"}
  with pytest.raises(ValueError, match="not a known set"):
    load_set("nosuchset", config)


def test_duplicate_ids_rejected(tmp_path):
  path = tmp_path / "dup.jsonl"
  row = {"id": "1", "question": "q?", "golden_answers": ["a"]}
  path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
  with pytest.raises(ValueError, match="the id '1' twice"):
    load_set(str(path), _config())


def test_mirage_formatting():
  examples = read_mirage(FIXTURES / "mirage" / "benchmark.json", "medqa")
  first = examples[0]
  # s3_protocol.md §2.1: options in the question, gold "{key}: {text}"; the question is normalised (strip,
  # "?")
  assert first.question == ("Which vitamin deficiency causes scurvy\nOptions:\nA: Vitamin A\nB: Vitamin B12\n"
                            "C: Vitamin C\nD: Vitamin D?")
  assert first.golden_answers == ("C: Vitamin C",)
  assert first.data_source == "medqa" and first.id == "medqa_0000"
  assert retrieval_query(first.question) == "Which vitamin deficiency causes scurvy"
  assert is_medical(first) and not is_medical(EXAMPLES[0])
  [pubmed] = read_mirage(FIXTURES / "mirage" / "benchmark.json", "pubmedqa")
  assert pubmed.golden_answers == ("A: yes",)
  with pytest.raises(ValueError, match="no MIRAGE set 'bioasq'"):
    read_mirage(FIXTURES / "mirage" / "benchmark.json", "bioasq")
  sets = load_sets("medqa,pubmedqa", _config())
  assert [len(s.examples) for s in sets] == [2, 1]


def test_sample_per_source():
  examples = [QAExample(str(i), f"q{i}?", ("a",), "x" if i < 10 else "y") for i in range(13)]
  picked = sample_per_source(examples, 4, seed=42)
  # at most 4 per source, the rows s3's `df.sample(n=4, random_state=42)` picks, in its order: pandas 3.1.1
  # on a 10-row frame gives rows [8, 1, 5, 0] (checked once; pandas is not a dependency); a smaller source
  # is kept whole
  assert [int(ex.id) for ex in picked[:4]] == [8, 1, 5, 0]
  assert [ex.id for ex in picked[4:]] == ["10", "11", "12"]
  assert sample_per_source(examples, 0, seed=1) == examples


def test_chat_continuation_matches_transformers(asset):
  from s3_jax.models.tokenizer import chat_ids, load_tokenizer

  tokenizer = load_tokenizer(asset("smollm2-135m-instruct"))
  chat = [{"role": "user", "content": "Who composed Carmen?"},
          {"role": "assistant",
           "content": "<think>An opera.</think> <search> carmen</search>\n\n<information>Doc"}]
  ids = chat_ids(tokenizer, chat)
  reference = tokenizer.apply_chat_template(chat, continue_final_message=True, tokenize=False)
  assert tokenizer.decode(ids) == reference
  plain = chat_ids(tokenizer, chat[:1])
  assert ids[:len(plain)] == plain  # the continued message follows the generation prompt
  with pytest.raises(ValueError, match="assistant message alone"):
    chat_ids(tokenizer, chat[1:])


def test_scorer_closed_book_and_mirage():
  from s3_jax.reward.judge import MIRAGE_PROMPT
  from s3_jax.reward.prompts import closed_book_messages
  from s3_jax.reward.scorer import RewardItem, RewardScorer

  class Generator:
    def __init__(self):
      self.chats = []

    def complete(self, chats, **kwargs):
      self.chats.extend(chats)
      return [Completion("C: Vitamin C", 5, 3, "stop") for _ in chats]

    def generate(self, chats, **kwargs):  # the judge: says no to everything
      self.chats.extend(chats)
      return ["no" for _ in chats]

  generator = Generator()
  scorer = RewardScorer(generator, generator_id="g", kind="genacc", use_judge=True)
  medical = RewardItem("medqa", "Which vitamin?\nOptions:\nC: Vitamin C\n", ("C: Vitamin C",), (),
                       prompt="closed_book", scoring="mirage")
  general = RewardItem("nq", "Which vitamin?", ("Vitamin C",), (), prompt="closed_book")
  med, gen = scorer.rewards([medical, general])
  assert generator.chats[0] == closed_book_messages("Which vitamin?\nOptions:\nC: Vitamin C?")
  # MIRAGE: the span matches, but the judge alone decides; general QA: the span match decides, no judge
  assert med.scores.span and med.scores.judge is False and not med.scores.genacc
  assert gen.scores.span and gen.scores.judge is None and gen.scores.genacc
  judged = [c for c in generator.chats if c[0]["content"].startswith(MIRAGE_PROMPT[:40])]
  assert len(judged) == 1 and "Golden Answers (reference): C: Vitamin C" in judged[0][0]["content"]
  with pytest.raises(ValueError, match="judge alone"):
    RewardScorer(generator, generator_id="g", kind="genacc", use_judge=False).rewards([medical])
  with pytest.raises(ValueError, match="closed-book item has no documents"):
    RewardItem("nq", "q?", ("a",), (Doc("1", "t", "x"),), prompt="closed_book")


def test_evaluate_config_keys_validated():
  with pytest.raises(ValueError, match=r"evaluate\.agent_backend"):
    config_lib.load(str(REPO / "configs/tiny.py"), ["evaluate.agent_backend=openai"])
  with pytest.raises(ValueError, match=r"evaluate\.runs"):
    config_lib.load(str(REPO / "configs/tiny.py"), ["evaluate.runs=0"])
  assert isinstance(config_lib.default_config().evaluate, ml_collections.ConfigDict)
