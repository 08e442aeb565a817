"""Cold vs warm `prepare all`: the first build of every asset into an empty cache, then the
idempotent re-run that `make test` pays every time (the target: under 5 s).

  python benchmarks/assets_prepare.py
"""

import os
import subprocess
import sys
import tempfile
import time


def _timed_prepare(cache: str) -> float:
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "s3_jax.assets", "prepare", "all"], check=True,
                 env={**os.environ, "S3_JAX_CACHE": cache}, stderr=subprocess.DEVNULL)
  return time.perf_counter() - start


def main() -> None:
  with tempfile.TemporaryDirectory() as cache:
    cold = _timed_prepare(cache)
    warm = min(_timed_prepare(cache) for _ in range(3))
  print(f"prepare all, empty cache : {cold:7.2f} s")
  print(f"prepare all, prepared    : {warm:7.2f} s   (cold/warm = {cold / warm:.0f}x; limit 5 s)")


if __name__ == "__main__":
  main()
