"""The generator gRPC server: validates every request (INVALID_ARGUMENT with the reason) and answers a
whole batch of chats with one backend call."""

from __future__ import annotations

import dataclasses
from typing import Any

import grpc

from s3_jax.services import auth
from s3_jax.services.generator_backends import GenerationParams
from s3_jax.services.grpc_server import start_grpc_server
from s3_jax.services.protos import generation_pb2, generation_pb2_grpc

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Limits:
  max_chats: int = 1024
  max_messages: int = 64
  max_chars: int = 200_000  # per chat
  max_tokens: int = 8192
  max_stops: int = 8


class GeneratorService(generation_pb2_grpc.GeneratorServicer):
  def __init__(self, backend: Any, default_max_tokens: int = 64, token: str | None = None,
               limits: Limits = Limits()):
    self.backend, self.default_max_tokens = backend, default_max_tokens
    self.token, self.limits = token, limits

  def validate(self, request) -> tuple[list[list[dict[str, str]]], GenerationParams]:
    limits = self.limits
    if not request.chats:
      raise ValueError("no chats")
    if len(request.chats) > limits.max_chats:
      raise ValueError(f"{len(request.chats)} chats exceed the limit of {limits.max_chats} per call")
    chats = []
    for i, chat in enumerate(request.chats):
      if not chat.messages:
        raise ValueError(f"chat {i} has no messages")
      if len(chat.messages) > limits.max_messages:
        raise ValueError(f"chat {i} has {len(chat.messages)} messages, over the limit of "
                         f"{limits.max_messages}")
      for j, m in enumerate(chat.messages):
        if m.role not in ROLES:
          raise ValueError(f"chat {i} message {j}: role {m.role!r} must be one of {ROLES}")
      chars = sum(len(m.content) for m in chat.messages)
      if chars > limits.max_chars:
        raise ValueError(f"chat {i} has {chars} characters, over the limit of {limits.max_chars}")
      chats.append([{"role": m.role, "content": m.content} for m in chat.messages])
    if not 0 <= request.temperature <= 2:
      raise ValueError(f"temperature={request.temperature} must be in [0, 2]")
    top_p = request.top_p if request.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
      raise ValueError(f"top_p={top_p} must be in (0, 1]")
    max_tokens = request.max_tokens or self.default_max_tokens
    if not 1 <= max_tokens <= limits.max_tokens:
      raise ValueError(f"max_tokens={request.max_tokens} must be in [1, {limits.max_tokens}]")
    if len(request.stop) > limits.max_stops or any(not s for s in request.stop):
      raise ValueError(f"stop: at most {limits.max_stops} non-empty strings")
    return chats, GenerationParams(temperature=request.temperature, top_p=top_p, max_tokens=max_tokens,
                                   stop=tuple(request.stop), seed=request.seed)

  def Generate(self, request, context):  # gRPC's method name
    auth.check(context, self.token)
    try:
      chats, params = self.validate(request)
    except ValueError as e:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    completions = self.backend.generate(chats, params)
    return generation_pb2.GenerateResponse(completions=[
        generation_pb2.Completion(text=c.text, prompt_tokens=c.prompt_tokens,
                                  completion_tokens=c.completion_tokens, finish_reason=c.finish_reason)
        for c in completions])

  def Health(self, request, context):
    auth.check(context, self.token)
    return generation_pb2.HealthResponse(status="SERVING", backend=self.backend.name,
                                         model=self.backend.model_name)


def start_server(service: GeneratorService, host: str = "127.0.0.1", port: int = 0,
                 max_workers: int = 8) -> tuple[grpc.Server, int]:
  def register(server):
    generation_pb2_grpc.add_GeneratorServicer_to_server(service, server)

  return start_grpc_server(register, host, port, max_workers, "generator")
