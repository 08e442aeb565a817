"""The HTTP endpoints (`/retrieve`, `/v1/chat/completions`) under abuse, on 127.0.0.1 with raw sockets:
every case the adversarial probe found gets a JSON answer with the reason — 413 for an oversized
body before it is read, 400 for a bad Content-Length, nested JSON or a bad field type, 408 for a
slow-loris, 503 past the worker bound — and the server's threads go back to where they were. The transport
is the same for both endpoints (`http_json.py`); the backends here are small stand-ins (the real ones:
test_generator_service.py, test_retriever_service.py). Every loop is bounded in count and time."""

import json
import socket
import threading
import time

import pytest

from s3_jax.data.corpus import Doc
from s3_jax.services import http_json
from s3_jax.services.generator_backends import Completion
from s3_jax.services.generator_server import GeneratorService
from s3_jax.services.http_chat import serve_openai_http
from s3_jax.services.http_retrieve import serve_http

pytestmark = pytest.mark.faults


class Retriever:
  def search(self, queries, k):
    if any(q == "boom" for q in queries):
      raise RuntimeError("index file vanished")
    return [[Doc(str(i), f"title {i}", f"text of {q}", 1.0 / (i + 1)) for i in range(k)] for q in queries]


class Backend:
  """Echoes the last message; a prompt over 50 characters does not fit (as the real backends report it)."""

  name, model_name = "stand-in", "stand-in-model"

  def generate(self, chats, params):
    out = []
    for i, chat in enumerate(chats):
      text = chat[-1]["content"]
      if len(text) > 50:
        out.append(Completion("", len(text), 0, "prompt_too_long"))
      else:
        out.append(Completion(f"{text} #{i}", len(text), 2, "stop"))
    return out


@pytest.fixture
def retrieve():
  server, port = serve_http(Retriever())
  yield port
  server.shutdown()


@pytest.fixture
def chat():
  server, port = serve_openai_http(GeneratorService(Backend(), default_max_tokens=8))
  yield port
  server.shutdown()


def _raw(port, data: bytes, *, read_timeout=10.0, shut_write=False) -> tuple[int, dict, float]:
  """Sends `data` as is; returns the status, the JSON body and the seconds until the answer."""
  start = time.perf_counter()
  with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
    s.sendall(data)
    if shut_write:
      s.shutdown(socket.SHUT_WR)
    response = b""
    while chunk := s.recv(65536):
      response += chunk
  head, _, body = response.partition(b"\r\n\r\n")
  return int(head.split()[1]), json.loads(body), time.perf_counter() - start


def _post(path, body: bytes, headers: dict[str, str]) -> bytes:
  lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *[f"{k}: {v}" for k, v in headers.items()]]
  return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _json_post(path, payload) -> bytes:
  body = json.dumps(payload).encode()
  return _post(path, body, {"Content-Length": str(len(body)), "Content-Type": "application/json"})


def test_oversized_body_gets_413_before_it_is_read(retrieve):
  # 200 MB announced, none sent: the answer must come without waiting for (or reading) the body
  status, body, seconds = _raw(retrieve, _post("/retrieve", b"", {"Content-Length": str(200 << 20)}))
  assert status == 413 and "exceeds the limit of 67108864 bytes" in body["error"] and seconds < 2


@pytest.mark.parametrize("length, status, reason", [
    ("-1", 400, "Content-Length -1 is negative"), ("abc", 400, "Content-Length 'abc' is not an integer"),
    (None, 411, "Content-Length is required")])
def test_bad_content_length_is_answered(retrieve, length, status, reason):
  headers = {} if length is None else {"Content-Length": length}
  got, body, seconds = _raw(retrieve, _post("/retrieve", b'{"queries": ["q"]}', headers))
  assert (got, body["error"]) == (status, reason) and seconds < 2


def test_chunked_and_cut_short_bodies_are_answered(retrieve):
  status, body, _ = _raw(retrieve, _post("/retrieve", b"5\r\nhello\r\n0\r\n\r\n",
                                         {"Transfer-Encoding": "chunked"}))
  assert status == 400 and "chunked request bodies are not supported" in body["error"]
  status, body, _ = _raw(retrieve, _post("/retrieve", b'{"queries"', {"Content-Length": "100"}),
                         shut_write=True)
  assert status == 400 and body["error"] == "the body ended after 10 of its 100 bytes"


def test_nested_json_and_bad_types_get_400(retrieve, chat):
  deep = b"[" * 100_000 + b"]" * 100_000
  for port, path in ((retrieve, "/retrieve"), (chat, "/v1/chat/completions")):
    status, body, _ = _raw(port, _post(path, deep, {"Content-Length": str(len(deep))}))
    assert status == 400 and "nested too deeply" in json.dumps(body), body
  status, body, _ = _raw(retrieve, _json_post("/retrieve", {"queries": ["q"], "return_scores": "yes"}))
  assert status == 400 and body["error"] == "return_scores='yes' must be true or false"
  status, body, _ = _raw(retrieve, b"GET /retrieve HTTP/1.1\r\nHost: x\r\n\r\n")
  assert status == 405 and body["error"] == "GET /retrieve: use POST"


def test_an_error_inside_the_handler_is_a_500_with_the_reason(retrieve):
  status, body, _ = _raw(retrieve, _json_post("/retrieve", {"queries": ["boom"]}))
  assert status == 500 and body["error"] == "internal error: RuntimeError: index file vanished"
  status, _, _ = _raw(retrieve, _json_post("/retrieve", {"queries": ["fine"]}))  # the server lives on
  assert status == 200


@pytest.mark.parametrize("fields, reason", [
    ({"stop": 5}, "stop=5 must be a non-empty string or a list of them"),
    ({"stop": [None]}, "stop=[null] must be a non-empty string or a list of them"),
    ({"max_tokens": 2.7}, "max_tokens=2.7 must be an integer"),
    ({"max_tokens": 0}, "max_tokens=0 must be at least 1"),
    ({"temperature": "hot"}, 'temperature="hot" must be a number'),
    ({"stream": True}, "stream=true is not supported"),
    ({"tools": [{"type": "function"}]}, "not supported by this endpoint: tools"),
    ({"n": 0}, "n=0 must be in [1, 16]"),
    ({"messages": [{"role": "user", "content": "x" * 60}]}, "the prompt is 60 tokens: with max_tokens=8")])
def test_openai_requests_it_cannot_honour_get_400_with_the_reason(chat, fields, reason):
  payload = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], **fields}
  status, body, _ = _raw(chat, _json_post("/v1/chat/completions", payload))
  assert status == 400 and body["error"]["type"] == "invalid_request_error"
  assert body["error"]["message"].startswith(reason), body


def test_openai_n_gives_n_choices(chat):
  payload = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "n": 3, "stop": None,
             "user": "someone"}
  status, body, _ = _raw(chat, _json_post("/v1/chat/completions", payload))
  assert status == 200
  assert [c["message"]["content"] for c in body["choices"]] == ["Hi #0", "Hi #1", "Hi #2"]
  assert [c["index"] for c in body["choices"]] == [0, 1, 2]
  assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}


def test_slow_loris_is_bounded_in_threads_and_time(monkeypatch):
  """12 sockets that trickle headers a byte every 0.3 s (under the per-read timeout) at a server of 4
  workers: 8 get 503 at once, 4 get 408 at the 1.5 s request deadline; then a normal request is served and
  the server's threads are back to where they were."""
  monkeypatch.setattr(http_json, "MAX_WORKERS", 4)
  monkeypatch.setattr(http_json.JsonHandler, "request_deadline", 1.5)
  before = threading.active_count()
  server, port = serve_http(Retriever())
  try:
    sockets = []
    for _ in range(12):
      s = socket.create_connection(("127.0.0.1", port), timeout=5)
      s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\n")
      sockets.append(s)
    time.sleep(0.2)
    answers, start = {}, time.perf_counter()
    while len(answers) < len(sockets) and time.perf_counter() - start < 6:  # bounded: 6 s at most
      for i, s in enumerate(sockets):
        if i in answers:
          continue
        s.setblocking(False)
        try:
          data = s.recv(65536)
        except BlockingIOError:
          try:
            s.sendall(b"X")  # one more header byte
          except OSError:
            pass  # closed by the server between the recv and this send: the next recv sees its answer
          continue
        finally:
          s.setblocking(True)
        answers[i] = (int(data.split()[1]) if data else None, time.perf_counter() - start)
      time.sleep(0.3)
    statuses = sorted(code for code, _ in answers.values())
    assert statuses == [408] * 4 + [503] * 8, answers
    assert all(seconds < 3.5 for code, seconds in answers.values() if code == 408)
    for s in sockets:
      s.close()
    status, _, _ = _raw(port, _json_post("/retrieve", {"queries": ["q"]}))
    assert status == 200 and server.busy_replies == 8
  finally:
    server.shutdown()
    server.server_close()
  deadline = time.perf_counter() + 5
  while threading.active_count() > before and time.perf_counter() < deadline:
    time.sleep(0.05)
  assert threading.active_count() <= before
