"""The JSON-over-HTTP layer shared by the s3-compatible endpoints (`/retrieve`, `/v1/chat/completions`).

Python's `http.server` with the limits a public endpoint needs, in one place (no new dependency; the
endpoints are small and their request handling is this file):

- a body cap, the gRPC services' (64 MB): a larger `Content-Length` gets 413 before a byte of the body is
  read; a missing one 411, a negative or non-integer one 400, a chunked body 400 (send Content-Length);
- a read timeout: a client that pauses for `read_timeout` seconds while sending gets 408, and a whole request
  (headers and body) must arrive within `request_deadline` seconds (a slow-loris trickle gets 408 and the
  socket closed);
- a bounded worker pool: at most `max_workers` requests in flight; one more gets 503 at once;
- every failure answered: malformed JSON, JSON nested past Python's recursion limit and bad field types get
  400 with the reason, an unexpected error in a handler 500 with its type and message, never a dropped
  connection.

Subclasses implement `post(path) -> (status, payload)` and may override `error_payload(message)` (the
error shape of the API they imitate).
"""

from __future__ import annotations

import hmac
import json
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_BODY = 64 << 20  # bytes: the gRPC services' max_receive_message_length
READ_TIMEOUT = 10.0  # seconds a client may pause while sending
REQUEST_DEADLINE = 30.0  # seconds for a whole request to arrive
MAX_WORKERS = 32  # requests in flight


class HttpError(Exception):
  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status, self.message = status, message


def _json_response(status: int, reason: str, payload: Any) -> bytes:
  data = json.dumps(payload).encode()
  head = (f"HTTP/1.0 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
          "Connection: close\r\n\r\n")
  return head.encode() + data


class JsonHandler(BaseHTTPRequestHandler):
  """Answers JSON, checks an optional bearer token (`token` on the subclass), enforces the limits above."""

  token: str | None = None
  max_body = MAX_BODY
  timeout = READ_TIMEOUT  # StreamRequestHandler sets it on the socket: each read waits at most this long
  request_deadline = REQUEST_DEADLINE

  def log_message(self, *args):  # quiet: the services log nothing per request
    pass

  def error_payload(self, message: str) -> Any:
    return {"error": message}

  def post(self, path: str) -> tuple[int, Any]:
    raise NotImplementedError

  # -- the request's lifetime ----------------------------------------------------------------------------
  def setup(self):
    super().setup()
    self._answered = False
    self._unread = False  # an answer went out before the body was read
    self._body_read = False
    self._lock = threading.Lock()
    self._watchdog = threading.Timer(self.request_deadline, self._expire)
    self._watchdog.daemon = True
    self._watchdog.start()

  def finish(self):
    self._watchdog.cancel()
    try:
      super().finish()
      if self._unread:
        self._linger()
    except OSError:  # the client went away (or the watchdog closed the socket): nothing left to tell it
      pass

  def _linger(self) -> None:
    """After an early answer (413, 400, ...) with the body unread: closing at once would reset the
    connection and could drop the answer before the client reads it; so stop writing, then read and discard
    what the client still sends, for a second and 4 MB at most."""
    self.connection.shutdown(socket.SHUT_WR)
    self.connection.settimeout(1.0)
    deadline, drained = time.monotonic() + 1.0, 0
    while time.monotonic() < deadline and drained < 4 << 20:
      try:
        chunk = self.connection.recv(1 << 16)
      except (TimeoutError, OSError):
        return
      if not chunk:
        return
      drained += len(chunk)

  def _expire(self) -> None:
    """The whole request did not arrive in time: 408, then the socket closed under the reading thread (not
    when the handler already answers: its reply is not cut off)."""
    if not self._claim():
      return
    try:
      self.connection.sendall(_json_response(408, "Request Timeout", self.error_payload(
          f"the request did not arrive within {self.request_deadline:g} s")))
    except OSError:
      pass  # the client is gone: nobody to answer
    try:
      self.connection.shutdown(socket.SHUT_RDWR)
    except OSError:
      pass  # already closed

  def _claim(self) -> bool:
    """True once: whoever answers the request (the handler or the watchdog)."""
    with self._lock:
      if self._answered:
        return False
      self._answered = True
      return True

  def reply(self, status: int, payload: Any) -> None:
    if not self._claim():
      return
    self._watchdog.cancel()
    self._unread = not self._body_read and self._announces_body()
    data = json.dumps(payload).encode()
    try:
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)
    except OSError:
      self.close_connection = True  # the client went away before the answer: nothing to tell it

  def _announces_body(self) -> bool:
    headers = getattr(self, "headers", None)  # none when the request line itself was bad
    if headers is None:
      return False
    length = headers.get("Content-Length", "").strip()
    return (length.isdigit() and int(length) > 0) or "chunked" in headers.get("Transfer-Encoding", "").lower()

  def fail(self, status: int, message: str) -> None:
    self.close_connection = True  # the body may be unread: this connection is done
    self.reply(status, self.error_payload(message))

  def send_error(self, code, message=None, explain=None):  # http.server's own errors, as JSON too
    from http import HTTPStatus

    self.fail(code, message or explain or HTTPStatus(code).phrase)

  def do_GET(self):  # http.server's method names
    self.fail(405, f"{self.command} {self.path}: use POST")

  do_PUT = do_DELETE = do_PATCH = do_GET

  def parse_request(self) -> bool:
    try:
      return super().parse_request()
    except TimeoutError:
      self.fail(408, f"no request header bytes for {self.timeout:g} s")
      return False

  def do_POST(self):  # http.server's method name
    try:
      status, payload = self.post(self.path)
    except HttpError as e:
      return self.fail(e.status, e.message)
    except Exception as e:  # an answer for every request: the reason, and the trace on the server's stderr
      print(f"{type(self).__name__}: {self.command} {self.path} failed: {type(e).__name__}: {e}",
            file=sys.stderr, flush=True)
      return self.fail(500, f"internal error: {type(e).__name__}: {e}")
    return self.reply(status, payload)

  # -- what handlers call --------------------------------------------------------------------------------
  def authorized(self) -> bool:
    return not self.token or hmac.compare_digest(self.headers.get("Authorization", "").encode(),
                                                 f"Bearer {self.token}".encode())

  def body(self) -> bytes:
    if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
      raise HttpError(400, "chunked request bodies are not supported: send Content-Length")
    raw = self.headers.get("Content-Length")
    if raw is None:
      raise HttpError(411, "Content-Length is required")
    try:
      size = int(raw)
    except ValueError:
      raise HttpError(400, f"Content-Length {raw!r} is not an integer") from None
    if size < 0:
      raise HttpError(400, f"Content-Length {size} is negative")
    if size > self.max_body:
      raise HttpError(413, f"a body of {size} bytes exceeds the limit of {self.max_body} bytes")
    chunks, left = [], size
    while left:
      try:
        chunk = self.rfile.read1(min(left, 1 << 20))
      except TimeoutError:
        raise HttpError(408, f"no body bytes for {self.timeout:g} s ({size - left} of {size} read)") from None
      if not chunk:
        raise HttpError(400, f"the body ended after {size - left} of its {size} bytes")
      chunks.append(chunk)
      left -= len(chunk)
    self._watchdog.cancel()  # all of it arrived: the handler's own work is not under the request deadline
    self._body_read = True
    return b"".join(chunks)

  def json_body(self) -> Any:
    body = self.body()
    try:
      return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise HttpError(400, f"body is not UTF-8 JSON ({e})") from None
    except RecursionError:
      raise HttpError(400, "body JSON is nested too deeply") from None


class BoundedHTTPServer(ThreadingHTTPServer):
  """A thread per request, at most `max_workers` at once; the next one gets 503 without a thread."""

  daemon_threads = True

  def __init__(self, address, handler, max_workers: int):
    super().__init__(address, handler)
    self.max_workers = max_workers
    self._slots = threading.BoundedSemaphore(max_workers)
    self.busy_replies = 0

  def process_request(self, request, client_address):
    if not self._slots.acquire(blocking=False):
      self.busy_replies += 1
      try:
        request.sendall(_json_response(503, "Service Unavailable", {
            "error": f"busy: {self.max_workers} requests in flight; retry later"}))
      except OSError:
        pass  # the client is gone: nobody to answer
      self.shutdown_request(request)
      return
    try:
      super().process_request(request, client_address)
    except BaseException:
      self._slots.release()
      raise

  def process_request_thread(self, request, client_address):
    try:
      super().process_request_thread(request, client_address)
    finally:
      self._slots.release()


def start_http(handler: type[JsonHandler], host: str, port: int,
               max_workers: int | None = None) -> tuple[BoundedHTTPServer, int]:
  """Serves `handler` in a background thread; returns the server and its bound port (0 = a free one)."""
  server = BoundedHTTPServer((host, port), handler, max_workers or MAX_WORKERS)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server, server.server_address[1]
