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
    budget = config.services.retry_seconds
    # The configured services first: a wrong address fails before anything is loaded.
    clients = {}
    for key, connect in (("retriever", connect_retriever), ("generator", connect_generator)):
      address = config[key].address
      if address:
        clients[key] = _connected(connect, f"{key}.address", address, budget)
        stack.callback(clients[key].close)
        log(f"{key} at {address} answers")
    addresses = {"retriever": config.retriever.address, "generator": config.generator.address}
    if not addresses["retriever"]:
      addresses["retriever"] = _start_retriever(config, stack, show_progress)
      log(f"embedded retriever ({config.retriever.kind}) serving on {addresses['retriever']}")
    if not addresses["generator"]:
      addresses["generator"] = _start_generator(config, stack)
      log(f"embedded generator ({config.generator.backend}, {config.generator.model}) serving on "
          f"{addresses['generator']}")
    for key, connect in (("retriever", connect_retriever), ("generator", connect_generator)):
      if key not in clients:
        clients[key] = connect(addresses[key], retry_seconds=budget)
        stack.callback(clients[key].close)
    yield Services(clients["retriever"], clients["generator"], addresses["retriever"], addresses["generator"])


def _connected(connect: Callable[..., Any], key: str, address: str, budget: float) -> Any:
  """A client of `address` whose service answered `Health` (within the retry budget); the config key and the
  address in the error otherwise. A job that would only call a service late (the tiny searcher never
  searches) still finds out at start-up that its address is wrong."""
  from s3_jax.services.retriever_client import ServiceUnavailableError

  try:
    client = connect(address, retry_seconds=budget)
  except ValueError as e:
    raise ValueError(f"config.{key}={address!r}: {e}") from None
  try:
    client.health()
  except ServiceUnavailableError as e:
    client.close()
    raise ServiceUnavailableError(f"config.{key}={address!r}: no answer at start-up: {e}") from None
  except BaseException:  # a wrong token (PermissionError) or an interrupt: the channel closed all the same
    client.close()
    raise
  return client
