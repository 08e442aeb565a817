"""The retrieval-free and single-retrieval baselines of the s3 paper (Table 1 "Direct", "RAG-BM25/E5")."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from s3_jax.data.eval_sets import retrieval_query
from s3_jax.data.qa import QAExample
from s3_jax.methods.base import MethodOutput
from s3_jax.search.formats import rag_context


class ClosedBook:
  """`none`: the generator answers from its own knowledge with s3's zero-shot prompt (system: "Important:
  You MUST directly answer the question without any other text and thinking.", user: the question)."""

  name = "none"

  def __init__(self, config: Any, retriever: Any = None, agent: Any = None):
    self.label = "Direct (no retrieval)"

  def run(self, examples: Sequence[QAExample], seed: int = 0) -> list[MethodOutput]:
    return [MethodOutput(docs=[], closed_book=True) for _ in examples]


class NaiveRAG:
  """`rag`: the top `evaluate.rag_topk` (paper: 3) documents the retriever returns for the question
  (multiple-choice options removed), in the retriever's order, in the context format of
  `reward.rag_context_format` ("s3": s3's RAG rows were answered from e5_retrieval's one-line format, cut
  from its top `precompute.retrieval_topk`, as the training baseline is); the generator answers with s3's
  prompt."""

  name = "rag"

  def __init__(self, config: Any, retriever: Any, agent: Any = None):
    self.retriever, self.k = retriever, config.evaluate.rag_topk
    self.format = config.reward.rag_context_format
    # s3 cuts its top-12 string before "Doc {k+1}"; retrieving that many keeps the cut exact.
    self.retrieve = max(self.k, config.precompute.retrieval_topk) if self.format == "s3" else self.k
    self.label = f"RAG-{config.retriever.kind} (top-{self.k})"

  def run(self, examples: Sequence[QAExample], seed: int = 0) -> list[MethodOutput]:
    results = self.retriever.search([retrieval_query(ex.question) for ex in examples], self.retrieve)
    return [MethodOutput(docs=list(docs[:self.k]), context=rag_context(docs, self.k, self.format),
                         trace={"queries": [retrieval_query(ex.question)]})
            for ex, docs in zip(examples, results, strict=True)]
