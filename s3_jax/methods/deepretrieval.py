"""`deepretrieval`: a query-rewriting model (DeepRetrieval, Jiang et al. 2025, trained with RL to write BM25
queries) turns the question into one search query; its top documents go to the generator.

As s3 runs it (s3_protocol.md §8: `generator_llms/query_rewrite.py`, `bm25_retrieval.py --rewriter nq`): the
model is asked, as a query-rewriting expert for a BM25 engine, to reason in `<think>` and give the query as
JSON `{"query": ...}` inside `<answer>`; temperature 0.7, at most 512 tokens; the query goes to the retriever
(BM25 in the paper) for the top `evaluate.search_topk` (3) documents. A reply without a usable query falls
back to the question itself, and the trace says so. The released model is
`DeepRetrieval/DeepRetrieval-NQ-BM25-3B` (`--checkpoint` it; without one the configured generator rewrites).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from s3_jax.data.eval_sets import retrieval_query
from s3_jax.data.qa import QAExample
from s3_jax.methods.base import AgentLM, MethodOutput, agent_sampling

SYSTEM = ("You are a helpful assistant. You first think about the reasoning process in your mind and then "
          "give the user the answer.")
INSTRUCTION = """You are a query rewriting expert. Rewrite the user's question into a search query for a \
BM25 search engine that finds the documents answering it. Use Boolean operators (AND, OR) and parentheses \
to group terms where that helps. Show your reasoning inside <think> </think> tags, then give the final \
query in JSON format inside <answer> </answer> tags, for example \
<answer>{{"query": "(term1 OR synonym) AND term2"}}</answer>.

The user's question: {question}"""
ASSISTANT_START = "Let me rewrite the query with reasoning. <think>"
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)


def parse_query(text: str) -> str | None:
  """The query of the last `<answer>`: its JSON `"query"` (a list's first element), else the raw answer
  text; None when there is no non-empty answer."""
  answers = _ANSWER.findall(text)
  if not answers or not answers[-1].strip():
    return None
  raw = answers[-1].strip()
  try:
    value = json.loads(raw)["query"]
    if isinstance(value, list):
      value = value[0]
    value = str(value).strip()
    return value or None
  except Exception:  # not JSON, or no "query": the model's text is the query
    return raw


class DeepRetrieval:
  name = "deepretrieval"

  def __init__(self, config: Any, retriever: Any, agent: AgentLM):
    self.retriever, self.agent, self.k = retriever, agent, config.evaluate.search_topk
    self.sampling = agent_sampling(config, temperature=0.7, top_p=1.0, max_tokens=512)
    self.label = f"DeepRetrieval-{config.retriever.kind} ({agent.name})"

  def run(self, examples: Sequence[QAExample], seed: int = 0) -> list[MethodOutput]:
    chats = [[{"role": "system", "content": SYSTEM},
              {"role": "user", "content": INSTRUCTION.format(question=retrieval_query(ex.question))},
              {"role": "assistant", "content": ASSISTANT_START}] for ex in examples]
    replies = self.agent.complete(chats, self.sampling, seed=seed)
    queries = [parse_query(r.text) for r in replies]
    final = [q if q is not None else retrieval_query(ex.question)
             for q, ex in zip(queries, examples, strict=True)]
    results = self.retriever.search(final, self.k)
    return [MethodOutput(docs=list(docs), trace={"queries": [q], "fallback": raw is None,
                                                 "rewrite": ASSISTANT_START + r.text})
            for q, raw, r, docs in zip(final, queries, replies, results, strict=True)]
