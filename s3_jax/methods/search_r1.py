"""`search_r1`: a Search-R1 policy (Jin et al. 2025) searching in its own format; the generator answers from
every document it retrieved ("Search-R1 (Ret)" in the s3 paper; its own answer is kept in the trace, the
"(self)" rows).

As s3 runs it (s3_protocol.md §8, `scripts/baselines/search_r1.sh`): Search-R1's prompt (by default its
released code's template, `evaluate.search_r1_prompt=paper` its paper's; one user message under the chat
template), reasoning in `<think>`, searches as `<search> query </search>` answered with `<information>` blocks
of the top `evaluate.search_topk` (3) documents, the answer in `<answer>`; at most `evaluate.max_searches` (4)
search rounds and then one final turn without search; temperature 1. Each turn stops at `</search>` or
`</answer>`; a turn with neither gets Search-R1's "invalid action" reminder. The generator sees all retrieved
documents, de-duplicated, in retrieval order (s3's `extract.py::output_sequence`). Released policies:
`PeterJinGo/SearchR1-nq_hotpotqa_train-qwen2.5-{3b,7b}-em-ppo` (`--checkpoint`); without one the configured
generator plays the policy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from s3_jax.data.qa import QAExample
from s3_jax.methods.base import AgentLM, MethodOutput, agent_sampling, close_open_tag, user_chat
from s3_jax.search.formats import observation

# The template as Search-R1's released code writes it (`scripts/data_process/nq_search.py`, `infer.py` at
# a14dc3a), which its released checkpoints were trained on; its paper's wording differs ("as you want", "xxx"
# and two commas). `evaluate.search_r1_prompt` picks one.
PROMPTS = {
    "code": ("Answer the given question. You must conduct reasoning inside <think> and </think> first every "
             "time you get new information. After reasoning, if you find you lack some knowledge, you can "
             "call a search engine by <search> query </search> and it will return the top searched results "
             "between <information> and </information>. You can search as many times as your want. If you "
             "find no further external knowledge needed, you can directly provide the answer inside <answer> "
             "and </answer>, without detailed illustrations. For example, <answer> Beijing </answer>. "
             "Question: {question}\n"),
    "paper": ("Answer the given question. You must conduct reasoning inside <think> and </think> first every "
              "time you get new information. After reasoning, if you find you lack some knowledge, you can "
              "call a search engine by <search> query </search>, and it will return the top searched results "
              "between <information> and </information>. You can search as many times as you want. If you "
              "find no further external knowledge needed, you can directly provide the answer inside "
              "<answer> and </answer> without detailed illustrations. For example, <answer> xxx </answer>. "
              "Question: {question}\n"),
}
# The released code's reminder after a turn with neither tag (`search_r1/llm_agent/generation.py`).
INVALID = ("\nMy previous action is invalid. If I want to search, I should put the query between <search> "
           "and </search>. If I want to give the final answer, I should put the answer between <answer> and "
           "</answer>. Let me try again.\n")
_ACTION = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)


def parse_action(text: str) -> tuple[str, str]:
  """`("search", query)`, `("answer", text)` or `("invalid", "")` from the first complete tag."""
  match = _ACTION.search(text)
  return (match.group(1), match.group(2).strip()) if match else ("invalid", "")


class SearchR1:
  name = "search_r1"

  def __init__(self, config: Any, retriever: Any, agent: AgentLM):
    self.retriever, self.agent = retriever, agent
    self.k, self.max_searches = config.evaluate.search_topk, config.evaluate.max_searches
    self.sampling = agent_sampling(config, temperature=1.0, top_p=1.0, max_tokens=500)
    self.prompt = PROMPTS[config.evaluate.search_r1_prompt]
    self.label = f"Search-R1 (Ret; {agent.name})"

  def run(self, examples: Sequence[QAExample], seed: int = 0) -> list[MethodOutput]:
    prompts = [self.prompt.format(question=ex.question) for ex in examples]
    texts = [""] * len(examples)
    docs: list[list] = [[] for _ in examples]
    queries: list[list[str]] = [[] for _ in examples]
    answers: list[str | None] = [None] * len(examples)
    active = list(range(len(examples)))
    for turn in range(self.max_searches + 1):
      if not active:
        break
      final = turn == self.max_searches
      replies = self.agent.complete([user_chat(prompts[i], texts[i]) for i in active], self.sampling,
                                    stop=("</search>", "</answer>"), seed=seed + turn)
      searching, still = [], []
      for i, reply in zip(active, replies, strict=True):
        out = close_open_tag(reply.text, ("search", "answer"))
        kind, content = parse_action(out)
        texts[i] += out
        if kind == "answer":
          answers[i] = content
        elif final:
          pass
        elif kind == "search":
          searching.append((i, content))
        else:
          texts[i] += INVALID
          still.append(i)
      results = self.retriever.search([q for _, q in searching], self.k) if searching else []
      for (i, query), found in zip(searching, results, strict=True):
        queries[i].append(query)
        docs[i].extend(found)
        texts[i] += f"\n\n<information>{observation(found).strip()}</information>\n\n"
        still.append(i)
      active = sorted(still)
    return [MethodOutput(docs=d, trace={"queries": q, "agent_answer": a, "trajectory": t})
            for d, q, a, t in zip(docs, queries, answers, texts, strict=True)]
