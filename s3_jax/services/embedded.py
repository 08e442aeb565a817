"""The retriever and generator a job talks to: the configured service addresses, or — for embedded configs
(empty `retriever.address` / `generator.address`) — real gRPC servers started in this process on free
loopback ports, stopped when the context exits. Either way the job sees the same clients over the same wire.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ml_collections


@dataclasses.dataclass
class Services:
  retriever: Any  # RetrieverClient
  generator: Any  # GeneratorClient
  retriever_address: str
  generator_address: str


def _start_retriever(config: ml_collections.ConfigDict, stack: contextlib.ExitStack,
                     show_progress: bool) -> str:
  from s3_jax.retrieval.index_dir import ensure_config_index, load_retriever
  from s3_jax.services.retriever_server import RetrieverService, start_server

  index = ensure_config_index(config, show_progress)
  manifest = json.loads((Path(index) / "manifest.json").read_text())
  service = RetrieverService(load_retriever(index), manifest["kind"], manifest["count"],
                             corpus_sha256=manifest["corpus"]["sha256"], index_dir=str(Path(index).resolve()))
  server, port = start_server(service, "127.0.0.1", 0)
  stack.callback(server.stop, None)
  return f"127.0.0.1:{port}"


def _start_generator(config: ml_collections.ConfigDict, stack: contextlib.ExitStack) -> str:
  from s3_jax.services.generator_backends import backend_from_config
  from s3_jax.services.generator_server import GeneratorService, start_server

  backend = backend_from_config(config.generator)
  service = GeneratorService(backend, default_max_tokens=config.generator.max_tokens)
  server, port = start_server(service, "127.0.0.1", 0)
  stack.callback(server.stop, None)
  return f"127.0.0.1:{port}"


@contextlib.contextmanager
def open_services(config: ml_collections.ConfigDict, *, show_progress: bool = True,
                  log: Callable[[str], None] = print) -> Iterator[Services]:
  """Clients for the configured services, starting embedded ones where no address is configured."""
  from s3_jax.services.replicas import connect_generator, connect_retriever

  with contextlib.ExitStack() as stack:
    retriever_address = config.retriever.address
    if not retriever_address:
      retriever_address = _start_retriever(config, stack, show_progress)
      log(f"embedded retriever ({config.retriever.kind}) serving on {retriever_address}")
    generator_address = config.generator.address
    if not generator_address:
      generator_address = _start_generator(config, stack)
      log(f"embedded generator ({config.generator.backend}, {config.generator.model}) serving on "
          f"{generator_address}")
    retriever = connect_retriever(retriever_address)
    stack.callback(retriever.close)
    generator = connect_generator(generator_address)
    stack.callback(generator.close)
    yield Services(retriever, generator, retriever_address, generator_address)
