"""An OpenAI-compatible `POST /v1/chat/completions` in front of any generator backend, so s3's own scripts
(which post to a vLLM server on port 8000, s3_protocol.md §4) can use this project's generator, and this
project's `openai` backend can be tested against a real HTTP endpoint.

One chat per request, as the OpenAI API has it (`n` choices of it); requests are validated by the gRPC
service's rules, and what the endpoint cannot honour (`stream`, unknown fields, bad types, a prompt over the
context) gets 400 with the reason. Transport limits: `http_json.py`.
"""

from __future__ import annotations

import json
import time

from s3_jax.services.generator_server import GeneratorService
from s3_jax.services.http_json import BoundedHTTPServer, JsonHandler, start_http
from s3_jax.services.protos import generation_pb2

# Fields this endpoint reads; any other field set to something other than null / false / 0 / "" is refused
# with 400 (`model` and `user` are accepted and not used: one model is served).
FIELDS = {"model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "seed", "stop",
          "stream", "n", "user",
          # vLLM's chat extras, which this project's `openai` backend sends to continue an assistant message:
          # the backends here continue a chat that ends with an assistant message already
          "continue_final_message", "add_generation_prompt"}
MAX_N = 16


def _number(payload: dict, key: str, kind: type, default):
  value = payload.get(key)
  if value is None:
    return default
  if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
    raise ValueError(f"{key}={json.dumps(value)} must be {'a number' if kind is float else 'an integer'}")
  return kind(value)


def _request(payload) -> generation_pb2.GenerateRequest:
  """The gRPC request of an OpenAI chat request (its chat `n` times); ValueError with the reason for what it
  cannot honour (OpenAI answers those with 400 too)."""
  if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
    raise ValueError('expected {"model", "messages": [{"role", "content"}, ...], ...}')
  unsupported = sorted(k for k, v in payload.items() if k not in FIELDS and v not in (None, False, 0, ""))
  if unsupported:
    raise ValueError(f"not supported by this endpoint: {', '.join(unsupported)}")
  if payload.get("stream") not in (None, False):
    raise ValueError("stream=true is not supported: this endpoint answers with whole completions")
  request = generation_pb2.GenerateRequest()
  chat = request.chats.add()
  for i, m in enumerate(payload["messages"]):
    if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
      raise ValueError(f"messages[{i}] must be {{\"role\": str, \"content\": str}}")
    chat.messages.add(role=m["role"], content=m["content"])
  request.temperature = _number(payload, "temperature", float, 1.0)
  top_p = _number(payload, "top_p", float, None)
  if top_p is not None:
    request.top_p = top_p
  max_tokens = _number(payload, "max_tokens", int, None)
  max_tokens = _number(payload, "max_completion_tokens", int, None) if max_tokens is None else max_tokens
  if max_tokens is not None and max_tokens < 1:
    raise ValueError(f"max_tokens={max_tokens} must be at least 1")
  request.max_tokens = max_tokens or 0
  request.seed = _number(payload, "seed", int, 0)
  stop = payload.get("stop")
  stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
    raise ValueError(f"stop={json.dumps(payload['stop'])} must be a non-empty string or a list of them")
  request.stop.extend(stop)
  n = _number(payload, "n", int, 1)
  if not 1 <= n <= MAX_N:
    raise ValueError(f"n={n} must be in [1, {MAX_N}]")
  for _ in range(n - 1):  # n choices: the same chat n times in one batch (each row samples on its own)
    request.chats.add().CopyFrom(chat)
  return request


def serve_openai_http(service: GeneratorService, host: str = "127.0.0.1", port: int = 0,
                      token: str | None = None) -> tuple[BoundedHTTPServer, int]:
  """Serves `POST /v1/chat/completions` in a background thread (http_json.py's limits); returns the server
  and its port."""

  class Handler(JsonHandler):
    def error_payload(self, message: str):
      return {"error": {"message": message, "type": "invalid_request_error"}}

    def post(self, path: str):
      if path.rstrip("/") != "/v1/chat/completions":
        return 404, self.error_payload(f"no endpoint {path}; use /v1/chat/completions")
      if not self.authorized():
        return 401, self.error_payload("missing or wrong bearer token")
      try:
        request = _request(self.json_body())
        chats, params = service.validate(request)
      except ValueError as e:
        return 400, self.error_payload(str(e))
      completions = service.backend.generate(chats, params)
      if completions[0].finish_reason == "prompt_too_long":
        return 400, self.error_payload(
            f"the prompt is {completions[0].prompt_tokens} tokens: with max_tokens={params.max_tokens} it "
            f"does not fit the model's context ({service.backend.model_name})")
      return 200, {
          "id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
          "model": service.backend.model_name,
          "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                       "finish_reason": "length" if c.finish_reason == "length" else "stop"}
                      for i, c in enumerate(completions)],
          "usage": {"prompt_tokens": completions[0].prompt_tokens,
                    "completion_tokens": sum(c.completion_tokens for c in completions),
                    "total_tokens": completions[0].prompt_tokens + sum(c.completion_tokens
                                                                       for c in completions)}}

  Handler.token = token
  return start_http(Handler, host, port)
