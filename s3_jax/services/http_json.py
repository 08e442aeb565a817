"""The JSON-over-HTTP layer shared by the s3-compatible endpoints (`/retrieve`, `/v1/chat/completions`)."""

from __future__ import annotations

import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class JsonHandler(BaseHTTPRequestHandler):
  """A request handler that answers JSON and checks an optional bearer token (`token` on the subclass)."""

  token: str | None = None

  def log_message(self, *args):  # quiet: the services log nothing per request
    pass

  def reply(self, status: int, payload: Any) -> None:
    data = json.dumps(payload).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def authorized(self) -> bool:
    return not self.token or hmac.compare_digest(self.headers.get("Authorization", "").encode(),
                                                 f"Bearer {self.token}".encode())

  def body(self) -> bytes:
    return self.rfile.read(int(self.headers.get("Content-Length", 0)))


def start_http(handler: type[JsonHandler], host: str, port: int) -> tuple[ThreadingHTTPServer, int]:
  """Serves `handler` in a background thread; returns the server and its bound port (0 = a free one)."""
  server = ThreadingHTTPServer((host, port), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server, server.server_address[1]
