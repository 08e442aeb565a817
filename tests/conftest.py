"""Test setup: 8 fake CPU devices for JAX, the `gpu` marker, and asset fixtures."""

import os

# Must happen before anything imports jax: XLA reads the flag once, at backend start.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
# The suite runs on CPU (8 fake devices) even on a GPU host; S3_JAX_TEST_GPU=1 lets JAX see the GPU so the
# `gpu`-marked tests run.
if os.environ.get("S3_JAX_TEST_GPU") != "1":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compilation dominates the suite's time: one persistent compilation cache for the whole session, fresh each
# session (so a test never loads a program compiled by an earlier checkout), shared with the subprocesses the
# entry-point tests start (they inherit the environment). Tests that compare traces count tracing, which the
# cache does not skip. A dir set by the caller wins.
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  import atexit
  import shutil
  import tempfile

  _compile_cache = tempfile.mkdtemp(prefix="s3_jax_test_xla_")
  atexit.register(shutil.rmtree, _compile_cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _compile_cache
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


# A `late` test's expected duration where its marker gives none. The markers give each test's time on the
# slowest host seen (an AVX2 Zen 1, 2026-12-08), so a test that starts finishes before the deadline.
LATE_TEST_SECONDS = 180


@pytest.hookimpl(tryfirst=True)  # before any fixture is set up
def pytest_runtest_setup(item):
  """With S3_JAX_TEST_DEADLINE (a Unix time; .ci/run sets it for CI's 45-minute limit), a `late` test that
  would not finish before it is skipped, and the summary says so and how to run it. The suite took 29
  minutes on the AVX-512 hosts and 49 on an AVX2 Zen 1 (2026-12-08): how many late tests fit depends on the
  host."""
  marker = item.get_closest_marker("late")
  deadline = os.environ.get("S3_JAX_TEST_DEADLINE", "")
  if marker is None or not deadline:
    return
  try:
    left = float(deadline) - time.time()
  except ValueError:
    raise ValueError(f"S3_JAX_TEST_DEADLINE={deadline!r} must be a Unix time in seconds") from None
  need = float(marker.kwargs.get("seconds", LATE_TEST_SECONDS))
  if left < need:
    pytest.skip(f"a late test (~{need:.0f} s) with {left:.0f} s left before S3_JAX_TEST_DEADLINE; run it "
                f"with: python -m pytest -m late {item.nodeid}")


def pytest_collection_modifyitems(config, items):
  gpu_items = [item for item in items if "gpu" in item.keywords]
  if not gpu_items:
    return
  import jax

  if jax.default_backend() == "gpu":
    return
  skip = pytest.mark.skip(reason=f"needs a GPU (JAX backend is {jax.default_backend()}); on a GPU host run "
                                 "with S3_JAX_TEST_GPU=1")
  for item in gpu_items:
    item.add_marker(skip)


@pytest.fixture(scope="session")
def asset():
  """`asset(name)` -> the prepared asset folder (built into the cache on first use)."""
  from s3_jax import assets

  return lambda name: assets.prepare(name, log=lambda message: None)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
  """An empty asset cache for tests of missing or freshly built assets."""
  cache = tmp_path / "cache"
  monkeypatch.setenv("S3_JAX_CACHE", str(cache))
  return cache
