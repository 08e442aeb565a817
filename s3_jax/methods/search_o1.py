"""`search_o1`: agentic search with Reason-in-Documents (Search-o1, Li et al. 2025), as the s3 paper runs it
(s3_protocol.md §8, `scripts/baselines/search_o1.py`).

The model reasons and searches by writing `<|begin_search_query|> query <|end_search_query|>` (generation
stops there); the top `evaluate.search_topk` (3) documents go through a separate Reason-in-Documents call
that extracts what helps the current reasoning, and that extract is injected back as
`<|begin_search_result|> ... <|end_search_result|>` before the model continues. At most
`evaluate.max_searches` (4) searches; a further query is told the limit is reached. Temperature 0.7, at most
2,048 tokens per call. As in s3's evaluation, the generator gets the raw retrieved documents (all of them,
de-duplicated, in retrieval order), not the extracts; the model's own final answer (`\\boxed{...}`) is kept
in the trace.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from s3_jax.data.qa import QAExample
from s3_jax.methods.base import AgentLM, MethodOutput, agent_sampling, user_chat
from s3_jax.search.formats import generator_context

BEGIN_QUERY, END_QUERY = "<|begin_search_query|>", "<|end_search_query|>"
BEGIN_RESULT, END_RESULT = "<|begin_search_result|>", "<|end_search_result|>"

INSTRUCTION = f"""You are a reasoning assistant who can search to answer the user's question accurately.
To search, write {BEGIN_QUERY} your query {END_QUERY}. The system will then search, analyse the relevant \
documents and give you the helpful information as {BEGIN_RESULT} ...information... {END_RESULT}.
You may search several times if needed; at most {{limit}} searches are allowed.
Once you have the information you need, continue reasoning.

Example:
Question: "Who directed the film that won Best Picture in 1998?"
Assistant thinking steps:
- I need the film that won Best Picture in 1998.
Assistant:
{BEGIN_QUERY}Best Picture winner 1998{END_QUERY}

(The system returns the information.)

Assistant continues reasoning with the new information...

Remember:
- Search with {BEGIN_QUERY} query {END_QUERY}.
- When done searching, continue your reasoning.

"""
QUESTION = ("Please answer the following question. Think step by step to solve it.\n"
            "Give your final answer as \\boxed{{YOUR_ANSWER}}.\n\nQuestion:\n{question}\n\n")
REASON_IN_DOCUMENTS = """**Task:** Read the searched documents in the light of the previous reasoning steps \
and the current search query, and extract the information that helps answer the query and continue the \
reasoning.

**Previous reasoning steps:**
{reasoning}

**Current search query:**
{query}

**Searched documents:**
{documents}

Analyse the documents, then finish with a line "**Final Information**" followed by the helpful information \
(or "No helpful information found.")."""
LIMIT_REACHED = "\nThe maximum search limit is reached. You are not allowed to search.\n"


def pending_query(text: str) -> str | None:
  """The query of a turn that stopped inside `<|begin_search_query|>` (the stop string is not part of the
  text), else None."""
  start = text.rfind(BEGIN_QUERY)
  if start < 0 or END_QUERY in text[start:]:
    return None
  return text[start + len(BEGIN_QUERY):].strip() or None


def final_information(text: str) -> str:
  """What follows the last "Final Information" marker, else the whole analysis."""
  marker = text.rfind("Final Information")
  return (text[marker + len("Final Information"):] if marker >= 0 else text).strip(" *:\n") or text.strip()


def boxed_answer(text: str) -> str | None:
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  depth, out = 1, []
  for ch in text[start + len("\\boxed{"):]:
    depth += {"{": 1, "}": -1}.get(ch, 0)
    if depth == 0:
      return "".join(out).strip()
    out.append(ch)
  return None


class SearchO1:
  name = "search_o1"

  def __init__(self, config: Any, retriever: Any, agent: AgentLM):
    self.retriever, self.agent = retriever, agent
    self.k, self.limit = config.evaluate.search_topk, config.evaluate.max_searches
    self.sampling = agent_sampling(config, temperature=0.7, top_p=1.0, max_tokens=2048)
    self.label = f"Search-o1 ({agent.name})"

  def run(self, examples: Sequence[QAExample], seed: int = 0) -> list[MethodOutput]:
    instruction = INSTRUCTION.format(limit=self.limit)
    prompts = [instruction + QUESTION.format(question=ex.question) for ex in examples]
    texts = [""] * len(examples)
    docs: list[list] = [[] for _ in examples]
    queries: list[list[str]] = [[] for _ in examples]
    active = list(range(len(examples)))
    for turn in range(self.limit + 2):  # every search, one refused search, and the final reasoning
      if not active:
        break
      replies = self.agent.complete([user_chat(prompts[i], texts[i]) for i in active], self.sampling,
                                    stop=(END_QUERY,), seed=seed + turn)
      searching, still = [], []
      for i, reply in zip(active, replies, strict=True):
        query = pending_query(reply.text)
        texts[i] += reply.text
        if query is None:
          continue
        texts[i] += END_QUERY
        if len(queries[i]) >= self.limit:
          texts[i] += f"\n\n{BEGIN_RESULT}{LIMIT_REACHED}{END_RESULT}\n\n"
          still.append(i)
        else:
          searching.append((i, query))
      found = self.retriever.search([q for _, q in searching], self.k) if searching else []
      analyses = self.agent.complete(
          [user_chat(REASON_IN_DOCUMENTS.format(reasoning=texts[i], query=q, documents=generator_context(d)))
           for (i, q), d in zip(searching, found, strict=True)], self.sampling, seed=seed + 1000 + turn)
      for (i, query), d, analysis in zip(searching, found, analyses, strict=True):
        queries[i].append(query)
        docs[i].extend(d)
        texts[i] += f"\n\n{BEGIN_RESULT}\n{final_information(analysis.text)}\n{END_RESULT}\n\n"
        still.append(i)
      active = sorted(still)
    return [MethodOutput(docs=d, trace={"queries": q, "agent_answer": boxed_answer(t), "trajectory": t})
            for d, q, t in zip(docs, queries, texts, strict=True)]
