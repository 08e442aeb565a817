"""Client of the retriever gRPC service: deadlines, bounded retries with backoff, batch splitting."""

from __future__ import annotations

import collections
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import numpy as np

from s3_jax.data.corpus import Doc
from s3_jax.retrieval.doc_store import DocStore, docs_from_lines
from s3_jax.services import auth
from s3_jax.services.protos import retrieval_pb2, retrieval_pb2_grpc

_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
              grpc.StatusCode.RESOURCE_EXHAUSTED)


def _unpack(packed: retrieval_pb2.PackedResults, n_queries: int, store: DocStore | None) -> list[list[Doc]]:
  counts = np.frombuffer(packed.counts, "<i4")
  scores = np.frombuffer(packed.scores, "<f4").tolist()
  lines = packed.rows.split(b"\n")[:-1] if store is None else store.raw(np.frombuffer(packed.row_ids, "<i8"))
  if len(counts) != n_queries or int(counts.sum()) != len(scores) or len(scores) != len(lines):
    raise ValueError(f"malformed packed response: {len(counts)} counts for {n_queries} queries, "
                     f"{len(scores)} scores, {len(lines)} rows")
  docs = docs_from_lines(lines, scores)
  ends = np.cumsum(counts).tolist()
  return [docs[end - n:end] for n, end in zip(counts.tolist(), ends, strict=True)]


class ServiceUnavailableError(ConnectionError):
  """The service did not answer after every retry; the message names the address."""


# How long a client keeps retrying a service that does not answer, by default (services.retry_seconds): long
# enough for `python -m s3_jax.serve` to come back after a restart (benchmarks/README.md).
RETRY_SECONDS = 120.0
MAX_BACKOFF = 10.0  # seconds between two tries at most


def log_to_stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def call_with_retries(method, request, *, what: str, timeout: float, retry_seconds: float, backoff: float,
                      metadata, log: Callable[[str], None] = log_to_stderr) -> object:
  """One unary call with a deadline, retried while the service is unavailable or slow — with exponential
  backoff from `backoff` seconds (at most MAX_BACKOFF), each retry logged — until `retry_seconds` have passed
  since the first try (one retry at least when the budget is positive: a call that hit its deadline may have
  used all of it). A message too large for the server is not retried. INVALID_ARGUMENT -> ValueError,
  UNAUTHENTICATED -> PermissionError, at once; `what` names the service and its address in every error."""
  start, delay, attempt = time.monotonic(), backoff, 0
  while True:
    attempt += 1
    try:
      return method(request, timeout=timeout, metadata=metadata, wait_for_ready=False)
    except grpc.RpcError as e:
      code = e.code()
      if code == grpc.StatusCode.INVALID_ARGUMENT:
        raise ValueError(f"{what} rejected the request: {e.details()}") from None
      if code == grpc.StatusCode.UNAUTHENTICATED:
        raise PermissionError(f"{what}: {e.details()}") from None
      elapsed = time.monotonic() - start
      if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than" in (e.details() or ""):
        raise ValueError(f"{what} rejected the request: {e.details()}") from None  # too big: never passes
      # Past the budget no retry, except a first one (a call that timed out may have used the whole budget)
      out_of_budget = elapsed + delay > retry_seconds and (attempt > 1 or retry_seconds <= 0)
      if code not in _RETRYABLE or out_of_budget:
        raise ServiceUnavailableError(
            f"{what} did not answer after {attempt} attempt(s) in {elapsed:.1f} s (retry budget "
            f"{retry_seconds:g} s): {code.name}: {e.details()}") from None
      log(f"{what}: {code.name} ({e.details()}); retry {attempt} in {delay:.1f} s "
          f"({elapsed:.0f} of {retry_seconds:g} s used)")
      time.sleep(delay)
      delay = min(delay * 2, MAX_BACKOFF)


class RetrieverClient:
  """`RetrieverClient("127.0.0.1:P").search(queries, k) -> list[list[Doc]]`.

  Batches larger than `max_batch` queries are split into several calls (by default 40 for a BM25 server,
  whose cost is mostly decoding documents, which then overlaps with the server's search; 256 for a dense
  server, whose cost is encoding the queries, which larger batches do faster); each call has a `timeout`
  deadline and is retried for up to `retry_seconds` (exponential backoff from `backoff` seconds, each retry
  passed to `log`) when the server is unavailable or slow. Bad requests raise `ValueError` with the server's
  reason, at once.

  `local_index`: a copy of the server's index folder (same host or a shared filesystem). The server then
  sends only row numbers and scores, and the documents are read here; the first search checks that the
  server's corpus has the same sha256 as this copy's manifest. `"auto"` (the default) uses the folder the
  server reports when it exists here with the same corpus, and documents over the wire otherwise.
  """

  def __init__(self, address: str, *, timeout: float = 60.0, retry_seconds: float = RETRY_SECONDS,
               backoff: float = 0.2, max_batch: int | None = None, concurrency: int = 2,
               auth_token: str | None = None, local_index: str | Path | None = "auto",
               log: Callable[[str], None] = log_to_stderr):
    self.address, self.timeout, self.retry_seconds, self.backoff = address, timeout, retry_seconds, backoff
    self.log = log
    self.max_batch, self.concurrency = max_batch, concurrency
    self._metadata = auth.metadata(auth_token)
    self._channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 256 << 20)])
    self._stub = retrieval_pb2_grpc.RetrieverStub(self._channel)
    self._auto = local_index == "auto"
    self._local_index = None if local_index in (None, "auto") else Path(local_index)
    self._local_store: DocStore | None = None

  def _open_local(self, folder: Path, served_sha256: str) -> DocStore:
    """The DocStore of an index folder on this host, checked against the corpus the server serves; raises
    with the reason when it is not the same corpus."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
      raise FileNotFoundError(f"local_index {folder}: no manifest.json (not an index folder)")
    corpus = json.loads(manifest_path.read_text())["corpus"]
    if served_sha256 != corpus["sha256"]:
      served = served_sha256[:12] or "an unnamed corpus"
      raise ValueError(f"local_index {folder} was built from a corpus with sha256 {corpus['sha256'][:12]}…, "
                       f"but the retriever at {self.address} serves {served}…; use the server's index folder "
                       "or no local_index")
    path = Path(corpus["path"])
    if not path.is_file() or path.stat().st_size != corpus["bytes"]:
      raise FileNotFoundError(f"local_index {folder}: its corpus {path} is missing or changed")
    return DocStore(path, folder / "offsets.npy")

  def _store(self) -> DocStore | None:
    """The local copy's DocStore, opened and checked against the server on first use. With "auto", the
    server's own folder when this host sees it with the same corpus, else none (documents on the wire)."""
    if self._auto:
      self._auto = False
      health = self.health()
      if health.index_dir:
        try:
          self._local_store = self._open_local(Path(health.index_dir), health.corpus_sha256)
        except (FileNotFoundError, ValueError):  # another host's folder: documents come over the wire
          pass
    elif self._local_index is not None and self._local_store is None:
      self._local_store = self._open_local(self._local_index, self.health().corpus_sha256)
    return self._local_store

  def _call(self, method, request):
    return call_with_retries(method, request, what=f"retriever at {self.address}", timeout=self.timeout,
                             retry_seconds=self.retry_seconds, backoff=self.backoff, metadata=self._metadata,
                             log=self.log)

  def search(self, queries: Sequence[str], k: int) -> list[list[Doc]]:
    """Sends the batch in chunks of at most `max_batch` queries with up to `concurrency` calls in flight,
    so that the server searches the next chunks while this process decodes one."""
    if self.max_batch is None:
      self.max_batch = 256 if self.health().kind == "dense" else 40
    chunks = [[q.encode("utf-8") for q in queries[start:start + self.max_batch]]
              for start in range(0, len(queries), self.max_batch)]
    store = self._store()
    requests = [retrieval_pb2.SearchRequest(queries=chunk, k=k, packed=True, rows_only=store is not None)
                for chunk in chunks]
    send = lambda r: self._stub.Search.future(r, timeout=self.timeout, metadata=self._metadata)  # noqa: E731
    in_flight = collections.deque(send(r) for r in requests[:self.concurrency])
    results: list[list[Doc]] = []
    for i, request in enumerate(requests):
      future = in_flight.popleft()
      try:
        response = future.result()
      except grpc.RpcError:  # retried one call at a time, with backoff
        response = self._call(self._stub.Search, request)
      if i + self.concurrency < len(requests):  # keep the server busy while this chunk is decoded
        in_flight.append(send(requests[i + self.concurrency]))
      results.extend(_unpack(response.packed, len(request.queries), store))
    return results

  def health(self) -> retrieval_pb2.HealthResponse:
    return self._call(self._stub.Health, retrieval_pb2.HealthRequest())

  def close(self) -> None:
    self._channel.close()
