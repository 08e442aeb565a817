"""The retriever gRPC server: validates every request, answers INVALID_ARGUMENT with the reason, and
keeps serving whatever a request contains."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc
import numpy as np

from s3_jax.services import auth
from s3_jax.services.grpc_server import start_grpc_server
from s3_jax.services.protos import retrieval_pb2, retrieval_pb2_grpc


@dataclasses.dataclass(frozen=True)
class Limits:
  max_k: int = 100
  max_queries: int = 4096
  max_query_chars: int = 8192


class RetrieverService(retrieval_pb2_grpc.RetrieverServicer):
  def __init__(self, retriever: Any, kind: str, count: int, token: str | None = None,
               limits: Limits = Limits(), corpus_sha256: str = "", index_dir: str = ""):
    self.retriever, self.kind, self.count, self.token, self.limits = retriever, kind, count, token, limits
    self.corpus_sha256, self.index_dir = corpus_sha256, index_dir

  def _validate(self, request) -> list[str]:
    if not 1 <= request.k <= self.limits.max_k:
      raise ValueError(f"k={request.k} must be in [1, {self.limits.max_k}]")
    if not request.queries:
      raise ValueError("no queries")
    if len(request.queries) > self.limits.max_queries:
      raise ValueError(f"{len(request.queries)} queries exceed the limit of {self.limits.max_queries} "
                       "per call")
    queries = []
    for i, raw in enumerate(request.queries):
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(f"query {i} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
      if len(text) > self.limits.max_query_chars:
        raise ValueError(f"query {i} has {len(text)} characters, over the limit of "
                         f"{self.limits.max_query_chars}")
      queries.append(text)
    return queries

  def Search(self, request, context):  # gRPC's method name
    auth.check(context, self.token)
    try:
      queries = self._validate(request)
    except ValueError as e:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if request.packed:
      return retrieval_pb2.SearchResponse(packed=self._packed(queries, request.k, request.rows_only))
    results = self.retriever.search(queries, request.k)
    return retrieval_pb2.SearchResponse(results=[
        retrieval_pb2.DocList(docs=[retrieval_pb2.ScoredDoc(id=d.id, title=d.title, text=d.text,
                                                            score=d.score or 0.0) for d in docs])
        for docs in results])

  def _packed(self, queries: list[str], k: int, rows_only: bool) -> retrieval_pb2.PackedResults:
    """The corpus rows are sent as stored (the server never parses or re-encodes a document), or only
    their row numbers."""
    hits = self.retriever.hits(queries, k)
    rows = np.concatenate([np.asarray(r, "<i8") for r, _ in hits])
    packed = retrieval_pb2.PackedResults(
        counts=np.asarray([len(r) for r, _ in hits], "<i4").tobytes(),
        scores=np.concatenate([np.asarray(s, "<f4") for _, s in hits]).tobytes())
    if rows_only:
      packed.row_ids = rows.tobytes()
    elif len(rows):
      packed.rows = b"\n".join(self.retriever.store.raw(rows)) + b"\n"
    return packed

  def Health(self, request, context):
    auth.check(context, self.token)
    return retrieval_pb2.HealthResponse(status="SERVING", kind=self.kind, count=self.count,
                                        corpus_sha256=self.corpus_sha256, index_dir=self.index_dir)


def start_server(service: RetrieverService, host: str = "127.0.0.1", port: int = 0,
                 max_workers: int = 4) -> tuple[grpc.Server, int]:
  """Starts a gRPC server for `service`; returns it and the bound port (0 picks a free one)."""
  return start_grpc_server(lambda server: retrieval_pb2_grpc.add_RetrieverServicer_to_server(service, server),
                           host, port, max_workers, "retriever")
