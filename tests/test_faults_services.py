"""Service addresses are checked at start-up: a malformed `retriever.address` or one where
nothing answers stops the job at once, naming the config key and the address, before any model or index is
loaded — where a run with the tiny searcher (which never searches) used to train a whole step against it."""

import socket
import time

import pytest
from conftest import REPO

from s3_jax import config_lib
from s3_jax.services.connect import open_services
from s3_jax.services.retriever_client import ServiceUnavailableError

pytestmark = pytest.mark.faults


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _open(*overrides):
  config = config_lib.load(str(REPO / "configs" / "tiny.py"), list(overrides))
  with open_services(config, show_progress=False, log=lambda *_: None):
    pass


@pytest.mark.parametrize("address", ["127.0.0.1:notaport", "127.0.0.1", "127.0.0.1:0", "h:1,127.0.0.1:99999"])
def test_a_malformed_address_is_refused_with_its_key(address):
  start = time.perf_counter()
  with pytest.raises(ValueError, match=rf"config.retriever.address='{address}': service address '[^']+' is "
                     "not host:port with a port in 1..65535"):
    _open(f"retriever.address={address}")
  assert time.perf_counter() - start < 2


@pytest.mark.parametrize("key", ["retriever", "generator"])
def test_an_address_where_nothing_answers_stops_at_start_up(key):
  address = f"127.0.0.1:{_free_port()}"
  start = time.perf_counter()
  with pytest.raises(ServiceUnavailableError, match=rf"config.{key}.address='{address}': no answer at "
                     rf"start-up: {key} at {address} did not answer after \d+ attempt"):
    _open(f"{key}.address={address}", "services.retry_seconds=0.5")
  assert time.perf_counter() - start < 3  # nothing was loaded first
