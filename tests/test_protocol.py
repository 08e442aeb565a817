"""The s3 protocol strings and action parsing against the spec's verbatim text and examples (§2.1, §2.3)."""

import pytest

from s3_jax.data.corpus import Doc
from s3_jax.search import protocol
from s3_jax.search.protocol import ANCHOR, NUDGE, Action, build_prompt, cut_response, parse_action

DOCS = [Doc("1", "Carmen", "An opera by Bizet."), Doc("2", "Georges Bizet", "A French composer.")]


def test_prompt_matches_the_spec():
  prompt = build_prompt("who composed carmen ", DOCS)
  assert prompt.startswith("You are a search copilot for the generation model. Based on a user's query and "
                           "initial searched results, you will first determine if the searched results are "
                           "enough to produce an answer.\nIf the searched results are enough, you will use "
                           "<search_complete>True</search_complete> to indicate")
  assert prompt.endswith(f"{ANCHOR}\n\n<question>\nwho composed carmen?\n</question>\n<information>\n"
                         'Doc 1 (Title: "Carmen") An opera by Bizet.\n'
                         'Doc 2 (Title: "Georges Bizet") A French composer.\n</information>')
  assert prompt.count(ANCHOR) == 1  # the D_s3 parser splits on it
  assert '<query>\n{\n    "query": "[search query]"\n} \n</query>\n<information>\n' in prompt  # s3's space
  assert ("(e.g., <important_info>[1, 4]</important_info>).\nA search query MUST be followed by a "
          "<search_complete> tag if the search is not complete.\n") in prompt
  assert "Boolean operators" not in prompt
  bm25 = build_prompt("who composed carmen", DOCS, bm25=True)
  assert ("Note: Only the important information would be used for the generation model to produce an "
          "answer.\nNote: The search query should use Boolean operators (AND, OR) and parentheses for "
          "grouping terms appropriately.\nFor a question and initial searched results:\n") in bm25
  assert ("...... (can be several turns until <search_complete> is True)\n\n<search_complete>\nTrue\n"
          in prompt)


@pytest.mark.parametrize("text, action", [
    ("<search_complete>True</search_complete>", Action("complete")),
    ('<query>{"query": "Bizet operas"}</query>\n<search_complete>False</search_complete>',
     Action("search", "Bizet operas")),
    ('<search_complete> yes </search_complete><query>{"query": "x"}</query>', Action("complete")),
    ("<search_complete>\n1\n</search_complete>", Action("complete")),
    ('<query>\n{\n    "query": ["first", "second"]\n}\n</query>', Action("search", "first")),
    ("<query> Bizet AND Carmen </query>", Action("search", "Bizet AND Carmen")),  # not JSON: the raw text
    ('<query>{"q": "x"}</query>', Action("search", '{"q": "x"}')),  # no "query" key: the raw text
    ("<query></query>", Action("search", "")),  # an empty query still searches
    ("<think>maybe <query>x</query></think>", Action("search", "x")),  # <think> is not special
    ("<search_complete>False</search_complete> <search_complete>True</search_complete>", Action("invalid")),
    ("I think the answer is Bizet.", Action("invalid")),
])
def test_parse_action(text, action):
  assert parse_action(text) == action


def test_cut_response_and_environment_strings():
  assert cut_response('<query>{"query": "a"}</query>\n<information>fake</information>') == \
      '<query>{"query": "a"}</query>'
  assert cut_response('{"query": "a"}\n</query> more') == '<query>\n{"query": "a"}\n</query>'  # after NUDGE
  assert cut_response("<search_complete>True</search_complete>") == "<search_complete>True</search_complete>"
  assert protocol.observation_text('Doc 1(Title: "A") x\n') == \
      '\n\n<information>Doc 1(Title: "A") x</information>\n\n'
  assert NUDGE == ("\n\nThe information is not enough to answer the question. Let me dive deeper by "
                   "generating a brand new search query between <query> and </query> tags in JSON "
                   "format:\n<query>\n")
