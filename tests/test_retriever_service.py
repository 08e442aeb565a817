"""The retriever over real gRPC on 127.0.0.1: round trip, restart, bad requests, auth, CLI."""

import re
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import REPO

from s3_jax.retrieval import build_index, load_retriever
from s3_jax.services import RetrieverClient, ServiceUnavailableError
from s3_jax.services.protos import retrieval_pb2, retrieval_pb2_grpc
from s3_jax.services.retriever_server import Limits, RetrieverService, start_server

QUERIES = ["Who composed the opera Carmen?", "capital of France", "largest ocean", "the of and",
           "theory of relativity"]


@pytest.fixture(scope="module")
def bm25_index(asset, tmp_path_factory):
  out = tmp_path_factory.mktemp("bm25")
  build_index(asset("wiki-vital") / "corpus.jsonl", out, "bm25")
  return out


@pytest.fixture(scope="module")
def retriever(bm25_index):
  return load_retriever(bm25_index)


def _corpus_sha256(index):
  import json

  return json.loads((index / "manifest.json").read_text())["corpus"]["sha256"]


@pytest.fixture
def server(retriever, bm25_index):
  server, port = start_server(RetrieverService(retriever, "bm25", 10_033, limits=Limits(max_queries=64),
                                               corpus_sha256=_corpus_sha256(bm25_index)))
  yield port
  server.stop(grace=0).wait()


def test_round_trip_equals_in_process(server, retriever):
  client = RetrieverClient(f"127.0.0.1:{server}")
  assert client.health().status == "SERVING" and client.health().count == 10_033
  got = client.search(QUERIES, 5)
  expected = retriever.search(QUERIES, 5)
  assert [[d.id for d in r] for r in got] == [[d.id for d in r] for r in expected]
  assert [[d.title for d in r] for r in got] == [[d.title for d in r] for r in expected]
  for r, e in zip(got, expected, strict=True):
    assert [d.score for d in r] == pytest.approx([d.score for d in e], rel=1e-6)  # float32 on the wire
  assert got[0][0].title == "Carmen" and got[3] == []


def test_plain_results_for_simple_clients(server, retriever):
  stub = retrieval_pb2_grpc.RetrieverStub(grpc.insecure_channel(f"127.0.0.1:{server}"))
  response = stub.Search(retrieval_pb2.SearchRequest(queries=[q.encode() for q in QUERIES], k=4), timeout=10)
  assert not response.HasField("packed")
  expected = retriever.search(QUERIES, 4)
  assert [[(d.id, d.title, d.text) for d in r.docs] for r in response.results] == \
         [[(d.id, d.title, d.text) for d in r] for r in expected]


def test_local_index_gets_row_numbers_only(server, retriever, bm25_index):
  stub = retrieval_pb2_grpc.RetrieverStub(grpc.insecure_channel(f"127.0.0.1:{server}"))
  request = retrieval_pb2.SearchRequest(queries=[b"Carmen opera"], k=3, packed=True, rows_only=True)
  packed = stub.Search(request, timeout=10).packed
  assert packed.rows == b"" and np.frombuffer(packed.counts, "<i4").tolist() == [3]
  rows = np.frombuffer(packed.row_ids, "<i8")
  assert [d.id for d in retriever.store.get(rows)] == [d.id for d in retriever.search(["Carmen opera"], 3)[0]]
  queries = [f"{q} {i}" for i in range(20) for q in QUERIES]  # 100 queries: 4 chunks, pipelined
  client = RetrieverClient(f"127.0.0.1:{server}", local_index=bm25_index)
  assert client.search(queries, 5) == retriever.search(queries, 5)


def test_local_index_of_another_corpus_is_refused(retriever, bm25_index):
  server, port = start_server(RetrieverService(retriever, "bm25", 10_033, corpus_sha256="ab" * 32))
  try:
    with pytest.raises(ValueError, match=f"the retriever at 127.0.0.1:{port} serves abababababab"):
      RetrieverClient(f"127.0.0.1:{port}", local_index=bm25_index).search(["q"], 1)
  finally:
    server.stop(grace=0).wait()


def test_large_batches_are_split(server, retriever):
  queries = [f"{q} {i}" for i in range(30) for q in QUERIES]  # 150 queries, server limit 64 per call
  client = RetrieverClient(f"127.0.0.1:{server}", max_batch=64)
  got = client.search(queries, 3)
  assert [[d.id for d in r] for r in got] == [[d.id for d in r] for r in retriever.search(queries, 3)]


@pytest.mark.parametrize("request_kwargs, reason", [
    ({"queries": [b"q"], "k": 0}, r"k=0 must be in \[1, 100\]"),
    ({"queries": [b"q"], "k": 101}, r"k=101 must be in \[1, 100\]"),
    ({"queries": [], "k": 3}, "no queries"),
    ({"queries": [b"q"] * 65, "k": 3}, "65 queries exceed the limit of 64"),
    ({"queries": [b"ok", b"x" * 9000], "k": 3}, "query 1 has 9000 characters"),
    ({"queries": [b"ok", b"\xff\xfe bad"], "k": 3}, "query 1 is not valid UTF-8"),
])
def test_bad_requests_get_invalid_argument_and_the_server_keeps_serving(server, request_kwargs, reason):
  stub = retrieval_pb2_grpc.RetrieverStub(grpc.insecure_channel(f"127.0.0.1:{server}"))
  with pytest.raises(grpc.RpcError) as info:
    stub.Search(retrieval_pb2.SearchRequest(**request_kwargs), timeout=10)
  assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
  assert re.search(reason, info.value.details())
  assert stub.Search(retrieval_pb2.SearchRequest(queries=[b"Carmen opera"], k=1), timeout=10).results
  with pytest.raises(ValueError, match=f"retriever at 127.0.0.1:{server} rejected the request: k=0"):
    RetrieverClient(f"127.0.0.1:{server}").search(["q"], 0)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.faults
def test_client_reaches_a_restarted_server(retriever):
  """Down for 7 s (the old fixed retry count gave up after ~6 s): the client retries within its time budget,
  logging each retry, and gets the same results."""
  port = _free_port()
  service = RetrieverService(retriever, "bm25", 10_033)
  first, _ = start_server(service, port=port)
  logs = []
  client = RetrieverClient(f"127.0.0.1:{port}", retry_seconds=30, backoff=0.1, timeout=5, log=logs.append)
  before = client.search(QUERIES[:2], 3)
  first.stop(grace=0).wait()
  holder = {}

  def restart():
    time.sleep(7.0)
    holder["server"], _ = start_server(service, port=port)

  thread = threading.Thread(target=restart)
  thread.start()
  after = client.search(QUERIES[:2], 3)  # fails while the server is down, then retries succeed
  thread.join()
  holder["server"].stop(grace=0).wait()
  assert [[d.id for d in r] for r in after] == [[d.id for d in r] for r in before]
  assert len(logs) >= 3 and all(f"retriever at 127.0.0.1:{port}: UNAVAILABLE" in line for line in logs)
  assert "retry 1 in 0.1 s" in logs[0]


@pytest.mark.faults
def test_unreachable_server_names_the_address():
  port = _free_port()
  client = RetrieverClient(f"127.0.0.1:{port}", retry_seconds=0.5, backoff=0.1, timeout=1, log=lambda _: None)
  with pytest.raises(ServiceUnavailableError, match=rf"retriever at 127.0.0.1:{port} did not answer after "
                     r"\d+ attempt\(s\) in [\d.]+ s \(retry budget 0.5 s\)"):
    client.search(["q"], 1)


def test_auth_token_is_checked_on_every_call(retriever):
  server, port = start_server(RetrieverService(retriever, "bm25", 10_033, token="s3cret"))
  try:
    with pytest.raises(PermissionError, match="missing or wrong bearer token"):
      RetrieverClient(f"127.0.0.1:{port}").search(["q"], 1)
    with pytest.raises(PermissionError):
      RetrieverClient(f"127.0.0.1:{port}", auth_token="wrong").health()
    assert RetrieverClient(f"127.0.0.1:{port}", auth_token="s3cret").search(["Carmen"], 1)[0]
  finally:
    server.stop(grace=0).wait()


@pytest.mark.entry
def test_serve_cli(bm25_index, monkeypatch):
  monkeypatch.delenv("S3_JAX_AUTH_TOKEN", raising=False)
  refused = subprocess.run([sys.executable, "-m", "s3_jax.serve", "retriever", "--index", str(bm25_index),
                            "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True, cwd=REPO)
  assert refused.returncode == 1 and "pass --auth-token or set S3_JAX_AUTH_TOKEN" in refused.stderr
  process = subprocess.Popen([sys.executable, "-m", "s3_jax.serve", "retriever", "--index", str(bm25_index),
                              "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=REPO)
  try:
    line = process.stdout.readline()
    port = int(re.search(r"serving on 127\.0\.0\.1:(\d+)", line).group(1))
    client = RetrieverClient(f"127.0.0.1:{port}")  # local_index="auto": this host sees the server's index
    assert client.search(["Carmen opera Bizet"], 1)[0][0].title == "Carmen"
    assert client._local_store is not None and client.health().index_dir == str(bm25_index.resolve())
    over_wire = RetrieverClient(f"127.0.0.1:{port}", local_index=None)
    assert over_wire.search(QUERIES, 4) == client.search(QUERIES, 4) and over_wire._local_store is None
  finally:
    process.terminate()
    assert process.wait(timeout=20) == 0


def test_http_retrieve_interop(retriever):
  import json
  import urllib.request

  from s3_jax.services.http_retrieve import HttpRetrieverClient, serve_http

  server, port = serve_http(retriever, default_k=3)
  url = f"http://127.0.0.1:{port}/retrieve"
  try:
    # The raw s3 request/response shape (s3_protocol.md §5).
    body = json.dumps({"queries": ["Carmen opera"], "topk": None, "return_scores": True}).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST")) as response:
      raw = json.loads(response.read())
    hit = raw["result"][0][0]
    assert len(raw["result"][0]) == 3  # null topk -> the server default
    assert hit["document"]["contents"].startswith('"Carmen"\n') and isinstance(hit["score"], float)
    got = HttpRetrieverClient(url).search(QUERIES, 4)
    expected = retriever.search(QUERIES, 4)
    assert [[(d.id, d.title, d.text) for d in r] for r in got] == \
           [[(d.id, d.title, d.text) for d in r] for r in expected]
    with pytest.raises(ValueError, match=r"rejected the request: .*topk=500 must be an integer"):
      HttpRetrieverClient(url).search(["q"], 500)
  finally:
    server.shutdown()
  with pytest.raises(ServiceUnavailableError, match=f"retriever at {url} did not answer after 2"):
    HttpRetrieverClient(url, retries=1, backoff=0.01, timeout=1).search(["q"], 1)
