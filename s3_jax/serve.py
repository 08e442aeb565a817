"""Start a service.

  python -m s3_jax.serve retriever --index DIR [--host 127.0.0.1] --port P [--auth-token T]
      [--http-port H]   # also serve s3/Search-R1's HTTP POST /retrieve
  python -m s3_jax.serve generator --backend jax|vllm|openai --model DIR|asset:NAME|NAME --port P
      [--host 127.0.0.1] [--auth-token T] [--max-tokens 64] [--dtype float32|bfloat16]
      [--compute-dtype auto|float32|bfloat16 (jax)]
      [--base-url URL --key-env OPENAI_API_KEY]   # openai: any OpenAI-compatible endpoint
      [--http-port H]   # also serve OpenAI-style POST /v1/chat/completions (what s3's scripts call)
      [--tensor-parallel N --gpu-memory-utilization F --max-model-len L]   # vllm engine settings
  python -m s3_jax.serve wait [--retriever ADDR[,ADDR]] [--generator ADDR[,ADDR]] [--timeout 900]
      # until every named service's Health answers (exit 1 naming those that never did)

Binds loopback unless told otherwise; a non-loopback host needs --auth-token or $S3_JAX_AUTH_TOKEN, which
every call must then carry (`authorization: Bearer T`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from s3_jax.services import auth


def _stop_on_signals() -> threading.Event:
  """An event SIGTERM / SIGINT set, so a service shuts down cleanly (exit status 0)."""
  stop = threading.Event()
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda *_: stop.set())
  return stop


def _wait_then_stop(stop: threading.Event, server, http_server) -> None:
  stop.wait()
  if http_server is not None:
    http_server.shutdown()
  server.stop(grace=2).wait()


def serve_retriever(index: str, host: str, port: int, auth_token: str | None, http_port: int | None = None,
                    ready=print) -> None:
  from s3_jax.retrieval import load_retriever
  from s3_jax.services.retriever_server import RetrieverService, start_server

  token = auth.resolve_token(host, auth_token)
  retriever = load_retriever(index)  # raises with the build command when `index` is not an index
  manifest = json.loads((Path(index) / "manifest.json").read_text())
  service = RetrieverService(retriever, manifest["kind"], manifest["count"], token,
                             corpus_sha256=manifest["corpus"]["sha256"], index_dir=str(Path(index).resolve()))

  def http():
    from s3_jax.services.http_retrieve import serve_http

    return serve_http(retriever, host, http_port, token)

  _serve(f"retriever ({manifest['kind']}, {manifest['count']} docs)", service, start_server, host, port,
         None if http_port is None else http, "/retrieve", ready)


def serve_generator(backend: str, model: str, host: str, port: int, auth_token: str | None, *,
                    max_tokens: int = 64, dtype: str = "float32", base_url: str | None = None,
                    key_env: str = "OPENAI_API_KEY", http_port: int | None = None,
                    engine_args: dict | None = None, compute_dtype: str | None = None,
                    ready=print) -> None:
  from s3_jax.services.generator_backends import make_backend
  from s3_jax.services.generator_server import GeneratorService, start_server

  token = auth.resolve_token(host, auth_token)
  if backend == "openai":
    if not base_url:
      raise ValueError("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
    engine = make_backend("openai", model, base_url=base_url, key_env=key_env)
  else:
    if engine_args and backend != "vllm":
      raise ValueError(f"--tensor-parallel, --gpu-memory-utilization and --max-model-len are vLLM engine "
                       f"settings: they need --backend vllm, not {backend}")
    if compute_dtype is not None and backend != "jax":
      raise ValueError(f"--compute-dtype is the jax backend's setting, not {backend}'s (vllm: --dtype)")
    extra = {"compute_dtype": compute_dtype} if compute_dtype is not None else {}
    engine = make_backend(backend, model, dtype=dtype, **(engine_args or {}), **extra)
  service = GeneratorService(engine, default_max_tokens=max_tokens, token=token)

  def http():
    from s3_jax.services.http_chat import serve_openai_http

    return serve_openai_http(service, host, http_port, token)

  _serve(f"generator ({backend}, {model})", service, start_server, host, port,
         None if http_port is None else http, "/v1/chat/completions", ready)


def _serve(label: str, service: Any, start_server: Callable, host: str, port: int,
           http: Callable[[], tuple[Any, int]] | None, http_path: str, ready: Callable) -> None:
  """Starts the gRPC server of `service` (and, with `http`, its HTTP front-end), says where each listens,
  and serves until SIGINT/SIGTERM."""
  stop = _stop_on_signals()
  server, bound = start_server(service, host, port)
  ready(f"{label} serving on {host}:{bound}", flush=True)
  http_server = None
  if http is not None:
    http_server, http_bound = http()
    ready(f"{label.split(' ')[0]} HTTP endpoint on http://{host}:{http_bound}{http_path}", flush=True)
  _wait_then_stop(stop, server, http_server)


def wait_for(retrievers: list[str], generators: list[str], timeout: float, auth_token: str | None = None,
             poll: float = 2.0, ready=print) -> list[str]:
  """Polls each service's `Health` until it answers or `timeout` seconds pass; returns the addresses that
  never answered (empty: all ready). A wrong or missing token raises `PermissionError` at once."""
  from s3_jax.services.generator_client import GeneratorClient
  from s3_jax.services.retriever_client import RetrieverClient, ServiceUnavailableError

  token = auth_token or os.environ.get(auth.TOKEN_ENV) or None
  pending = [("retriever", a) for a in retrievers] + [("generator", a) for a in generators]
  deadline = time.monotonic() + timeout
  while pending:
    waiting = []
    for kind, address in pending:
      client_type = RetrieverClient if kind == "retriever" else GeneratorClient
      client = client_type(address, timeout=5.0, retry_seconds=0.0, auth_token=token)
      try:
        health = client.health()
      except ServiceUnavailableError:
        waiting.append((kind, address))
        continue
      finally:
        client.close()
      what = (f"{health.kind}, {health.count} docs" if kind == "retriever"
              else f"{health.backend}, {health.model}")
      ready(f"{kind} at {address} is {health.status} ({what})", flush=True)
    pending = waiting
    if pending and time.monotonic() + poll > deadline:
      break
    if pending:
      time.sleep(poll)
  return [f"{kind} at {address}" for kind, address in pending]


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
  generator = services.add_parser("generator", help="serve a frozen LLM for answers and judging over gRPC")
  generator.add_argument("--backend", choices=("jax", "vllm", "openai"), required=True)
  generator.add_argument("--model", required=True,
                         help="HF folder or asset:NAME (jax, vllm); the model name (openai)")
  generator.add_argument("--host", default="127.0.0.1")
  generator.add_argument("--port", type=int, required=True, help="0 picks a free port")
  generator.add_argument("--auth-token", default=None)
  generator.add_argument("--max-tokens", type=int, default=64, help="default when a request sets none")
  generator.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  generator.add_argument("--compute-dtype", choices=("auto", "float32", "bfloat16"), default=None,
                         help="jax: compute dtype over --dtype weights (auto: bf16 where the CPU has it)")
  generator.add_argument("--base-url", default=None, help="openai: the endpoint, e.g. http://HOST:8000/v1")
  generator.add_argument("--key-env", default="OPENAI_API_KEY", help="openai: env variable holding the key")
  generator.add_argument("--http-port", type=int, default=None,
                         help="also serve OpenAI-style POST /v1/chat/completions on this port")
  generator.add_argument("--tensor-parallel", type=int, default=None,
                         help="vllm: GPUs the model is split over (tensor_parallel_size)")
  generator.add_argument("--gpu-memory-utilization", type=float, default=None,
                         help="vllm: fraction of each GPU's memory the engine may take")
  generator.add_argument("--max-model-len", type=int, default=None, help="vllm: context length (8192)")
  wait = services.add_parser("wait", help="wait until services answer Health")
  wait.add_argument("--retriever", default="", help="address(es), comma-separated")
  wait.add_argument("--generator", default="", help="address(es), comma-separated")
  wait.add_argument("--timeout", type=float, default=900.0, help="seconds to wait in all")
  wait.add_argument("--auth-token", default=None)
  args = parser.parse_args(argv)
  try:
    if args.service == "wait":
      from s3_jax.services.replicas import parse_addresses

      named = [parse_addresses(x) if x else [] for x in (args.retriever, args.generator)]
      if not any(named):
        parser.error("wait: name at least one --retriever or --generator address")
      missing = wait_for(*named, timeout=args.timeout, auth_token=args.auth_token)
      if missing:
        print(f"error: no Health answer within {args.timeout:.0f} s from {', '.join(missing)}",
              file=sys.stderr)
        return 1
    elif args.service == "retriever":
      serve_retriever(args.index, args.host, args.port, args.auth_token, args.http_port)
    else:
      serve_generator(args.backend, args.model, args.host, args.port, args.auth_token,
                      max_tokens=args.max_tokens, dtype=args.dtype, compute_dtype=args.compute_dtype,
                      base_url=args.base_url,
                      key_env=args.key_env, http_port=args.http_port, engine_args={
                          k: v for k, v in (("tensor_parallel_size", args.tensor_parallel),
                                            ("gpu_memory_utilization", args.gpu_memory_utilization),
                                            ("max_model_len", args.max_model_len)) if v is not None})
  except (ValueError, FileNotFoundError, OSError, ImportError, PermissionError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
