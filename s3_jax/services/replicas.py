"""Several replicas of one service behind one client: each batch is split into contiguous shares over the
healthy replicas (sent concurrently), and a replica that stops answering is dropped and its share resent to
the others, so a run survives losing all but one replica. A dropped replica is tried again after `retry_after`
seconds (60), so one that was restarted rejoins. Results come back in request order, so a
deterministic service (retrieval, greedy generation) gives the same answers whichever replica served them.

  connect_retriever("10.0.0.5:50051,10.0.0.6:50051")  # one address: a RetrieverClient; several: replicas
  connect_generator(["h1:50052", "h2:50052"])
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

from s3_jax.services.generator_client import GeneratorClient
from s3_jax.services.retriever_client import RetrieverClient, ServiceUnavailableError

REPLICA_RETRY_SECONDS = 1.0


def parse_addresses(spec: str | Sequence[str]) -> list[str]:
  """`"a:1,b:2"` or `["a:1", "b:2"]` -> the addresses (blank entries and surrounding space dropped)."""
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  addresses = [a.strip() for a in items if a and a.strip()]
  if not addresses:
    raise ValueError(f"no service address in {spec!r}")
  for a in addresses:  # host:port (gRPC's own schemes, unix: and dns:///..., pass as they are)
    if ":" in a and a.split(":", 1)[0] in ("unix", "unix-abstract", "dns", "ipv4", "ipv6"):
      continue
    host, _, port = a.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(f"service address {a!r} is not host:port with a port in 1..65535")
  if len(set(addresses)) != len(addresses):
    raise ValueError(f"service address list {spec!r} names an address twice")
  return addresses


class ReplicaSet:
  """`map(items, call)`: `call(client, share, offset) -> list` over contiguous shares (`offset`: where the
  share starts in `items`) of `items`, one per healthy
  replica, concurrently; the results concatenated in order. A replica raising `ServiceUnavailableError` (its
  client's own retries exhausted) is marked down and its share redone on the others; with none left the
  error names every address. A replica down for `retry_after` seconds is given another chance."""

  def __init__(self, clients: Sequence[Any], what: str, retry_after: float = 60.0,
               clock: Callable[[], float] = time.monotonic):
    if not clients:
      raise ValueError("a replica set needs at least one client")
    self.clients, self.what, self.retry_after, self.clock = list(clients), what, retry_after, clock
    self.down: dict[str, str] = {}  # address -> why it was dropped
    self._down_since: dict[str, float] = {}

  @property
  def healthy(self) -> list[Any]:
    now = self.clock()
    for address, since in list(self._down_since.items()):
      if now - since >= self.retry_after:  # back in the rotation; dropped again if it still does not answer
        del self._down_since[address], self.down[address]
    return [c for c in self.clients if c.address not in self.down]

  def _drop(self, address: str, why: str) -> None:
    self.down[address] = why
    self._down_since[address] = self.clock()

  def map(self, items: Sequence[Any], call: Callable[[Any, list[Any], int], list[Any]]) -> list[Any]:
    items = list(items)
    if not items:
      return []
    while True:
      clients = self.healthy
      if not clients:
        raise ServiceUnavailableError(f"every {self.what} replica is down: "
                                      + "; ".join(f"{a}: {why}" for a, why in self.down.items()))
      n = len(clients)
      bounds = [len(items) * i // n for i in range(n + 1)]
      shares = [(c, bounds[i], items[bounds[i]:bounds[i + 1]]) for i, c in enumerate(clients)
                if bounds[i + 1] > bounds[i]]
      with futures.ThreadPoolExecutor(max_workers=len(shares)) as pool:
        pending = [pool.submit(call, client, share, offset) for client, offset, share in shares]
      results, failed = [], False
      for (client, _, share), future in zip(shares, pending, strict=True):
        try:
          out = future.result()
        except ServiceUnavailableError as e:
          self._drop(client.address, str(e))
          failed = True
          continue
        if len(out) != len(share):
          raise RuntimeError(f"{self.what} at {client.address} returned {len(out)} results for {len(share)}")
        results.extend(out)
      if not failed:
        return results
      # A replica went down: redo the whole batch on the rest (shares are cheap to recompute, and the order
      # of results must not depend on which replica failed).

  def first_healthy(self) -> Any:
    clients = self.healthy
    if not clients:
      raise ServiceUnavailableError(f"every {self.what} replica is down: {sorted(self.down)}")
    return clients[0]

  def health(self) -> Any:
    """The first replica's `Health` that answers; a replica that does not is dropped (as in `map`)."""
    while True:
      client = self.first_healthy()
      try:
        return client.health()
      except ServiceUnavailableError as e:
        self._drop(client.address, str(e))

  def close(self) -> None:
    for client in self.clients:
      client.close()


class ReplicatedRetriever:
  """`search(queries, k)` over several retriever replicas (`ReplicaSet`)."""

  def __init__(self, addresses: Sequence[str], **client_options: Any):
    self.replicas = ReplicaSet([RetrieverClient(a, **client_options) for a in addresses], "retriever")
    self.address = ",".join(addresses)

  def search(self, queries: Sequence[str], k: int) -> list[list[Any]]:
    return self.replicas.map(queries, lambda client, share, offset: client.search(share, k))

  def health(self) -> Any:
    return self.replicas.health()

  def close(self) -> None:
    self.replicas.close()


class ReplicatedGenerator:
  """`complete` / `generate` over several generator replicas (`ReplicaSet`). A share's sampling seed is the
  request's seed plus the share's position in the batch, so shares never sample with the same seed."""

  def __init__(self, addresses: Sequence[str], **client_options: Any):
    self.replicas = ReplicaSet([GeneratorClient(a, **client_options) for a in addresses], "generator")
    self.address = ",".join(addresses)

  def complete(self, chats: Sequence[list[dict[str, str]]], *, seed: int = 0, **kwargs: Any) -> list[Any]:
    return self.replicas.map(chats, lambda client, share, offset: client.complete(share, seed=seed + offset,
                                                                                  **kwargs))

  def generate(self, chats: Sequence[list[dict[str, str]]], **kwargs: Any) -> list[str]:
    return [c.text for c in self.complete(chats, **kwargs)]

  def health(self) -> Any:
    return self.replicas.health()

  def close(self) -> None:
    self.replicas.close()


def connect_retriever(spec: str | Sequence[str], **client_options: Any) -> Any:
  """A `RetrieverClient` for one address, a `ReplicatedRetriever` for several (comma-separated or a list).
  Replicas retry for REPLICA_RETRY_SECONDS each (whatever `retry_seconds` says: that budget is for a lone
  service), so a dead one is dropped within about a second and its share goes to the others."""
  addresses = parse_addresses(spec)
  if len(addresses) == 1:
    return RetrieverClient(addresses[0], **client_options)
  return ReplicatedRetriever(addresses, **{**client_options, "retry_seconds": REPLICA_RETRY_SECONDS})


def connect_generator(spec: str | Sequence[str], **client_options: Any) -> Any:
  """A `GeneratorClient` for one address, a `ReplicatedGenerator` for several."""
  addresses = parse_addresses(spec)
  if len(addresses) == 1:
    return GeneratorClient(addresses[0], **client_options)
  return ReplicatedGenerator(addresses, **{**client_options, "retry_seconds": REPLICA_RETRY_SECONDS})
