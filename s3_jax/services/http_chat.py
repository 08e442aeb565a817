"""An OpenAI-compatible `POST /v1/chat/completions` in front of any generator backend, so s3's own scripts
(which post to a vLLM server on port 8000, spec §4) can use this project's generator, and this project's
`openai` backend can be tested against a real HTTP endpoint.

One chat per request, as the OpenAI API has it; requests are validated by the gRPC service's rules.
"""

from __future__ import annotations

import json
import time
from http.server import ThreadingHTTPServer

from s3_jax.services.generator_server import GeneratorService
from s3_jax.services.http_json import JsonHandler, start_http
from s3_jax.services.protos import generation_pb2


def _request(body: bytes) -> generation_pb2.GenerateRequest:
  try:
    payload = json.loads(body.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"body is not UTF-8 JSON ({e})") from None
  if not isinstance(payload, dict) or not isinstance(payload.get("messages"), list):
    raise ValueError('expected {"model", "messages": [{"role", "content"}, ...], ...}')
  request = generation_pb2.GenerateRequest()
  chat = request.chats.add()
  for i, m in enumerate(payload["messages"]):
    if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not isinstance(m.get("role"), str):
      raise ValueError(f"messages[{i}] must be {{\"role\": str, \"content\": str}}")
    chat.messages.add(role=m["role"], content=m["content"])
  try:
    request.temperature = float(payload.get("temperature", 1.0))
    if payload.get("top_p") is not None:
      request.top_p = float(payload["top_p"])
    request.max_tokens = int(payload.get("max_tokens") or payload.get("max_completion_tokens") or 0)
    request.seed = int(payload.get("seed") or 0)
  except (TypeError, ValueError) as e:
    raise ValueError(f"bad sampling parameter ({e})") from None
  stop = payload.get("stop") or []
  request.stop.extend([stop] if isinstance(stop, str) else [str(s) for s in stop])
  return request


def serve_openai_http(service: GeneratorService, host: str = "127.0.0.1", port: int = 0,
                      token: str | None = None) -> tuple[ThreadingHTTPServer, int]:
  """Serves `POST /v1/chat/completions` in a background thread; returns the server and its port."""

  class Handler(JsonHandler):
    def do_POST(self):  # http.server's method name
      if self.path.rstrip("/") != "/v1/chat/completions":
        return self.reply(404, {"error": {"message": f"no endpoint {self.path}; use /v1/chat/completions"}})
      if not self.authorized():
        return self.reply(401, {"error": {"message": "missing or wrong bearer token"}})
      try:
        chats, params = service.validate(_request(self.body()))
      except ValueError as e:
        return self.reply(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
      [completion] = service.backend.generate(chats, params)
      return self.reply(200, {
          "id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
          "model": service.backend.model_name,
          "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                       "finish_reason": "length" if completion.finish_reason == "length" else "stop"}],
          "usage": {"prompt_tokens": completion.prompt_tokens,
                    "completion_tokens": completion.completion_tokens,
                    "total_tokens": completion.prompt_tokens + completion.completion_tokens}})

  Handler.token = token
  return start_http(Handler, host, port)
