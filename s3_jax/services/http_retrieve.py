"""s3 / Search-R1 compatible HTTP retrieval (s3_protocol.md §5), both ways, so either side can be swapped into
the other's pipeline:

  POST /retrieve  {"queries": [...], "topk": k | null, "return_scores": true}
               -> {"result": [[{"document": {"id", "contents"}, "score": s}, ...], ...]}

`serve_http` exposes any retriever that way; `HttpRetrieverClient` reads such an endpoint (ours, or
s3's FastAPI `retrieval_server.py`) and returns `list[list[Doc]]` like `RetrieverClient`.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from s3_jax.data.corpus import Doc, doc_from_row
from s3_jax.services.http_json import BoundedHTTPServer, JsonHandler, start_http
from s3_jax.services.retriever_client import ServiceUnavailableError
from s3_jax.services.retriever_server import Limits


def _parse(request: Any, default_k: int, limits: Limits) -> tuple[list[str], int, bool]:
  if not isinstance(request, dict) or not isinstance(request.get("queries"), list):
    raise ValueError('expected {"queries": [...], "topk": k, "return_scores": true}')
  queries = request["queries"]
  if not queries or len(queries) > limits.max_queries:
    raise ValueError(f"{len(queries)} queries: need 1 to {limits.max_queries}")
  for i, q in enumerate(queries):
    if not isinstance(q, str) or len(q) > limits.max_query_chars:
      raise ValueError(f"query {i} must be a string of at most {limits.max_query_chars} characters")
  k = request.get("topk") or default_k  # s3: a null/0 topk means the server default
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limits.max_k:
    raise ValueError(f"topk={k!r} must be an integer in [1, {limits.max_k}]")
  scores = request.get("return_scores", False)
  if not isinstance(scores, bool):
    raise ValueError(f"return_scores={scores!r} must be true or false")
  return queries, k, scores


def serve_http(retriever: Any, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
               default_k: int = 3, limits: Limits | None = None) -> tuple[BoundedHTTPServer, int]:
  """Serves `POST /retrieve` in a background thread (http_json.py's limits); returns the server and its
  port."""
  limits = limits or Limits()

  class Handler(JsonHandler):
    def post(self, path: str) -> tuple[int, Any]:
      if path.rstrip("/") != "/retrieve":
        return 404, {"error": f"no endpoint {path}; use POST /retrieve"}
      if not self.authorized():
        return 401, {"error": "missing or wrong bearer token"}
      try:
        queries, k, with_scores = _parse(self.json_body(), default_k, limits)
      except ValueError as e:
        return 400, {"error": str(e)}
      results = retriever.search(queries, k)
      if with_scores:
        payload = [[{"document": d.to_row(), "score": d.score} for d in docs] for docs in results]
      else:
        payload = [[d.to_row() for d in docs] for docs in results]
      return 200, {"result": payload}

  Handler.token = token
  return start_http(Handler, host, port)


class HttpRetrieverClient:
  """`HttpRetrieverClient("http://127.0.0.1:3000/retrieve").search(queries, k) -> list[list[Doc]]`."""

  def __init__(self, url: str, *, timeout: float = 60.0, retries: int = 5, backoff: float = 0.2,
               max_batch: int = 512, auth_token: str | None = None):
    self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
    self.max_batch = max_batch
    self.headers = {"Content-Type": "application/json"}
    if auth_token:
      self.headers["Authorization"] = f"Bearer {auth_token}"

  def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
    data = json.dumps(payload).encode()
    for attempt in range(self.retries + 1):
      try:
        request = urllib.request.Request(self.url, data=data, headers=self.headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
          return json.loads(response.read())
      except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")
        if e.code in (400, 422):
          raise ValueError(f"retriever at {self.url} rejected the request: {detail}") from None
        if e.code in (401, 403):
          raise PermissionError(f"retriever at {self.url}: {detail}") from None
        error = f"HTTP {e.code}: {detail}"
      except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        error = str(e)
      if attempt == self.retries:
        raise ServiceUnavailableError(
            f"retriever at {self.url} did not answer after {attempt + 1} attempt(s): {error}")
      time.sleep(self.backoff * 2**attempt)
    raise AssertionError("unreachable")

  def search(self, queries: Sequence[str], k: int) -> list[list[Doc]]:
    results: list[list[Doc]] = []
    for start in range(0, len(queries), self.max_batch):
      batch = list(queries[start:start + self.max_batch])
      response = self._post({"queries": batch, "topk": k, "return_scores": True})
      for hits in response["result"]:
        docs = []
        for hit in hits:
          doc = doc_from_row(hit["document"])
          docs.append(Doc(doc.id, doc.title, doc.text, float(hit["score"])))
        results.append(docs)
    return results
