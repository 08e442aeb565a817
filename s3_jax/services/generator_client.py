"""Client of the generator gRPC service: deadlines, bounded retries with backoff, concurrent chunks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent import futures

import grpc

from s3_jax.services import auth
from s3_jax.services.generator_backends import Completion
from s3_jax.services.protos import generation_pb2, generation_pb2_grpc
from s3_jax.services.retriever_client import (
  RETRY_SECONDS,
  ServiceUnavailableError,
  call_with_retries,
  log_to_stderr,
)

Messages = list[dict[str, str]]


class GeneratorClient:
  """`GeneratorClient("127.0.0.1:P").generate(list_of_message_lists, temperature=0.0, max_tokens=N)
  -> list[str]`.

  A batch is sent in chunks of `max_batch` chats, `concurrency` chunks in flight (servers with a batching
  engine such as vLLM overlap them). Each call has a `timeout` deadline and is retried for up to
  `retry_seconds` with exponential backoff (each retry passed to `log`) when the server is unavailable; bad
  requests raise `ValueError` with the reason.
  """

  def __init__(self, address: str, *, timeout: float = 600.0, retry_seconds: float = RETRY_SECONDS,
               backoff: float = 0.2, max_batch: int = 64, concurrency: int = 4, auth_token: str | None = None,
               log: Callable[[str], None] = log_to_stderr):
    self.address, self.timeout, self.retry_seconds, self.backoff = address, timeout, retry_seconds, backoff
    self.log = log
    self.max_batch, self.concurrency = max_batch, concurrency
    self._metadata = auth.metadata(auth_token)
    self._channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 256 << 20),
                                                            ("grpc.max_send_message_length", 64 << 20)])
    self._stub = generation_pb2_grpc.GeneratorStub(self._channel)

  def _call(self, method, request):
    return call_with_retries(method, request, what=f"generator at {self.address}", timeout=self.timeout,
                             retry_seconds=self.retry_seconds, backoff=self.backoff, metadata=self._metadata,
                             log=self.log)

  def complete(self, chats: Sequence[Messages], *, temperature: float = 0.0, top_p: float = 1.0,
               max_tokens: int | None = None, stop: Sequence[str] = (), seed: int = 0) -> list[Completion]:
    """Completions (text, token counts, finish reason), one per chat, in order."""
    requests = []
    for start in range(0, len(chats), self.max_batch):
      request = generation_pb2.GenerateRequest(temperature=temperature, top_p=top_p,
                                               max_tokens=max_tokens or 0, stop=list(stop), seed=seed + start)
      for chat in chats[start:start + self.max_batch]:
        request.chats.add(messages=[generation_pb2.ChatMessage(role=m["role"], content=m["content"])
                                    for m in chat])
      requests.append(request)
    with futures.ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(requests)))) as pool:
      responses = list(pool.map(lambda r: self._call(self._stub.Generate, r), requests))
    out = [Completion(c.text, c.prompt_tokens, c.completion_tokens, c.finish_reason)
           for response in responses for c in response.completions]
    if len(out) != len(chats):
      raise ServiceUnavailableError(f"generator at {self.address} returned {len(out)} completions for "
                                    f"{len(chats)} chats")
    return out

  def generate(self, chats: Sequence[Messages], *, temperature: float = 0.0, top_p: float = 1.0,
               max_tokens: int | None = None, stop: Sequence[str] = (), seed: int = 0) -> list[str]:
    return [c.text for c in self.complete(chats, temperature=temperature, top_p=top_p,
                                          max_tokens=max_tokens, stop=stop, seed=seed)]

  def health(self) -> generation_pb2.HealthResponse:
    return self._call(self._stub.Health, generation_pb2.HealthRequest())

  def close(self) -> None:
    self._channel.close()
