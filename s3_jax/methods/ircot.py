"""`ircot`: interleaving retrieval with chain-of-thought (Trivedi et al. 2023), as the s3 paper runs it
(s3_protocol.md §8, `scripts/baselines/ircot.py`).

The question's top `evaluate.search_topk` (3) documents start the context. Then, for at most
`evaluate.max_searches` (4) steps, the model sees the question, every document retrieved so far and its
numbered reasoning so far, writes the next reasoning step and says whether it can answer now
(`<search_complete>Yes/No</search_complete>`); unless it can, that step (tags removed) is the next query and
its top documents join the context. The generator sees every retrieved document, de-duplicated, in retrieval
order. Sampling as s3's: temperature 0.7, top-p 0.95, at most 2,048 tokens (`evaluate.agent_*` override).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from s3_jax.data.eval_sets import retrieval_query
from s3_jax.data.qa import QAExample
from s3_jax.methods.base import AgentLM, MethodOutput, agent_sampling, strip_tags, user_chat
from s3_jax.search.formats import generator_context

PROMPT = """Answer the question by reasoning step by step over the documents below (some may be irrelevant).

Documents:
{context}
Question: {question}

Reasoning so far:
{steps}

Write only the next reasoning step, in one or two sentences. Then say whether the reasoning so far is enough \
to answer the question: end with <search_complete>Yes</search_complete> or \
<search_complete>No</search_complete>."""
_COMPLETE = re.compile(r"<search_complete>\s*(.*?)\s*</search_complete>", re.DOTALL | re.IGNORECASE)


def is_complete(text: str) -> bool:
  match = _COMPLETE.search(text)
  return bool(match) and match.group(1).strip().lower() in ("yes", "true")


def format_steps(steps: Sequence[str]) -> str:
  return "\n".join(f"{n}. {s}" for n, s in enumerate(steps, start=1)) or "(none yet)"


class IRCoT:
  name = "ircot"

  def __init__(self, config: Any, retriever: Any, agent: AgentLM):
    self.retriever, self.agent = retriever, agent
    self.k, self.max_steps = config.evaluate.search_topk, config.evaluate.max_searches
    self.sampling = agent_sampling(config, temperature=0.7, top_p=0.95, max_tokens=2048)
    self.label = f"IRCoT ({agent.name})"

  def run(self, examples: Sequence[QAExample], seed: int = 0) -> list[MethodOutput]:
    first = [retrieval_query(ex.question) for ex in examples]
    docs = [list(d) for d in self.retriever.search(first, self.k)]
    queries = [[q] for q in first]
    steps: list[list[str]] = [[] for _ in examples]
    active = list(range(len(examples)))
    for step in range(self.max_steps):
      if not active:
        break
      replies = self.agent.complete(
          [user_chat(PROMPT.format(context=generator_context(docs[i]), question=examples[i].question,
                                   steps=format_steps(steps[i]))) for i in active],
          self.sampling, seed=seed + step)
      searching = []
      for i, reply in zip(active, replies, strict=True):
        thought = re.sub(r"^\d+\.\s*", "", strip_tags(reply.text))  # the model may number its step
        steps[i].append(thought)
        if thought and not is_complete(reply.text):
          searching.append((i, thought))
      results = self.retriever.search([q for _, q in searching], self.k) if searching else []
      for (i, query), found in zip(searching, results, strict=True):
        queries[i].append(query)
        docs[i].extend(found)
      active = [i for i, _ in searching]
    return [MethodOutput(docs=d, trace={"queries": q, "reasoning": s})
            for d, q, s in zip(docs, queries, steps, strict=True)]
