"""Start a service.

  python -m s3_jax.serve retriever --index DIR [--host 127.0.0.1] --port P [--auth-token T]
      [--http-port H]   # also serve s3/Search-R1's HTTP POST /retrieve

Binds loopback unless told otherwise; a non-loopback host needs --auth-token or $S3_JAX_AUTH_TOKEN, which
every call must then carry (`authorization: Bearer T`).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from s3_jax.services import auth


def serve_retriever(index: str, host: str, port: int, auth_token: str | None, http_port: int | None = None,
                    ready=print) -> None:
  from s3_jax.retrieval import load_retriever
  from s3_jax.services.retriever_server import RetrieverService, start_server

  token = auth.resolve_token(host, auth_token)
  retriever = load_retriever(index)  # raises with the build command when `index` is not an index
  manifest = json.loads((Path(index) / "manifest.json").read_text())
  service = RetrieverService(retriever, manifest["kind"], manifest["count"], token,
                             corpus_sha256=manifest["corpus"]["sha256"])
  server, bound = start_server(service, host, port)
  stop = threading.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: stop.set())
  ready(f"retriever ({manifest['kind']}, {manifest['count']} docs) serving on {host}:{bound}", flush=True)
  http_server = None
  if http_port is not None:
    from s3_jax.services.http_retrieve import serve_http

    http_server, http_bound = serve_http(retriever, host, http_port, token)
    ready(f"retriever HTTP endpoint on http://{host}:{http_bound}/retrieve", flush=True)
  stop.wait()
  if http_server is not None:
    http_server.shutdown()
  server.stop(grace=2).wait()


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m s3_jax.serve", description=__doc__.split("\n")[0])
  services = parser.add_subparsers(dest="service", required=True)
  retriever = services.add_parser("retriever", help="serve a BM25 or dense index over gRPC")
  retriever.add_argument("--index", required=True, help="index folder (python -m s3_jax.index build)")
  retriever.add_argument("--host", default="127.0.0.1")
  retriever.add_argument("--port", type=int, required=True, help="0 picks a free port")
  retriever.add_argument("--auth-token", default=None)
  retriever.add_argument("--http-port", type=int, default=None,
                         help="also serve s3/Search-R1's POST /retrieve on this port")
  args = parser.parse_args(argv)
  try:
    serve_retriever(args.index, args.host, args.port, args.auth_token, args.http_port)
  except (ValueError, FileNotFoundError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
