"""The one way this project starts a gRPC server."""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures

import grpc


def start_grpc_server(register: Callable[[grpc.Server], None], host: str = "127.0.0.1", port: int = 0,
                      max_workers: int = 4, what: str = "service") -> tuple[grpc.Server, int]:
  """Starts a server with `register(server)`'s servicer; returns it and the bound port (0 = a free one)."""
  server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                       options=[("grpc.max_receive_message_length", 64 << 20),
                                ("grpc.max_send_message_length", 256 << 20),
                                ("grpc.so_reuseport", 0)])
  register(server)
  bound = server.add_insecure_port(f"{host}:{port}")
  if bound == 0:
    raise OSError(f"cannot bind the {what} to {host}:{port}")
  server.start()
  return server, bound
