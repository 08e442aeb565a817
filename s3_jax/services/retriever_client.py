"""Client of the retriever gRPC service: deadlines, bounded retries with backoff, batch splitting."""

from __future__ import annotations

import time
from collections.abc import Sequence

import grpc

from s3_jax.data.corpus import Doc
from s3_jax.services import auth
from s3_jax.services.protos import retrieval_pb2, retrieval_pb2_grpc

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.RESOURCE_EXHAUSTED)


class ServiceUnavailableError(ConnectionError):
  """The service did not answer after every retry; the message names the address."""


class RetrieverClient:
  """`RetrieverClient("127.0.0.1:P").search(queries, k) -> list[list[Doc]]`.

  Batches larger than `max_batch` queries are split into several calls; each call has a `timeout`
  deadline and is retried up to `retries` times (exponential backoff from `backoff` seconds) when the
  server is unavailable or slow. Bad requests raise `ValueError` with the server's reason, at once.
  """

  def __init__(self, address: str, *, timeout: float = 60.0, retries: int = 5, backoff: float = 0.2,
               max_batch: int = 512, auth_token: str | None = None):
    self.address, self.timeout, self.retries, self.backoff = address, timeout, retries, backoff
    self.max_batch = max_batch
    self._metadata = auth.metadata(auth_token)
    self._channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 256 << 20)])
    self._stub = retrieval_pb2_grpc.RetrieverStub(self._channel)

  def _call(self, method, request):
    for attempt in range(self.retries + 1):
      try:
        return method(request, timeout=self.timeout, metadata=self._metadata, wait_for_ready=False)
      except grpc.RpcError as e:
        code = e.code()
        if code == grpc.StatusCode.INVALID_ARGUMENT:
          raise ValueError(f"retriever at {self.address} rejected the request: {e.details()}") from None
        if code == grpc.StatusCode.UNAUTHENTICATED:
          raise PermissionError(f"retriever at {self.address}: {e.details()}") from None
        if code not in _RETRYABLE or attempt == self.retries:
          raise ServiceUnavailableError(
              f"retriever at {self.address} did not answer after {attempt + 1} attempt(s): "
              f"{code.name}: {e.details()}") from None
        time.sleep(self.backoff * 2**attempt)
    raise AssertionError("unreachable")

  def search(self, queries: Sequence[str], k: int) -> list[list[Doc]]:
    results: list[list[Doc]] = []
    for start in range(0, len(queries), self.max_batch):
      batch = [q.encode("utf-8") for q in queries[start:start + self.max_batch]]
      response = self._call(self._stub.Search, retrieval_pb2.SearchRequest(queries=batch, k=k))
      results.extend([Doc(d.id, d.title, d.text, d.score) for d in docs.docs] for docs in response.results)
    return results

  def health(self) -> retrieval_pb2.HealthResponse:
    return self._call(self._stub.Health, retrieval_pb2.HealthRequest())

  def close(self) -> None:
    self._channel.close()
