"""JAX's persistent compilation cache for the product's jobs (`config.compile_cache`).

Compiling the searcher's sampler, its update and the critic takes minutes on a laptop CPU and is repeated by
every run: a resumed run, the next seed of a sweep, an evaluation of the checkpoint. With the cache on, XLA
keeps each compiled executable on disk, keyed by the program, the XLA flags, the devices and the jax version,
and the next process loads it instead of compiling (measured: `benchmarks/README.md`, "Compilation cache").

  "auto"  `$S3_JAX_CACHE/xla` (next to the assets; default `~/.cache/s3_jax/xla`)
  ""      off
  a path  that folder

`JAX_COMPILATION_CACHE_DIR`, when set, wins over the config (JAX reads it itself). The cache is trusted
code: keep it in a folder only you can write to.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import jax

from s3_jax import assets

ENV = "JAX_COMPILATION_CACHE_DIR"
# JAX caches only compilations slower than 1 s by default; a laptop step has dozens of 0.1-1 s ones (the
# sampler's buckets, the bf16 casts) that add up, so every compilation is kept (entries are ~10-100 kB).
_MIN_COMPILE_SECS_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def resolve(setting: str) -> Path | None:
  """The folder `setting` names (see the module docstring); None when off. `JAX_COMPILATION_CACHE_DIR`
  wins."""
  if not isinstance(setting, str):
    raise ValueError(f"config.compile_cache={setting!r}: must be a string: 'auto', '' (off) or a folder")
  if os.environ.get(ENV):
    return Path(os.environ[ENV])
  if setting == "":
    return None
  return assets.cache_dir() / "xla" if setting == "auto" else Path(setting).expanduser()


_counts = {"hits": 0, "misses": 0}
_EVENTS = {"/jax/compilation_cache/cache_hits": "hits", "/jax/compilation_cache/cache_misses": "misses"}
_listening = False


def _count(event: str, **_) -> None:
  if event in _EVENTS:
    _counts[_EVENTS[event]] += 1


def counts() -> dict[str, int]:
  """Programs this process loaded from the cache ("hits") and compiled and stored ("misses") since
  `enable`."""
  return dict(_counts)


def enable(setting: str, log: Callable[[str], None] | None = None) -> Path | None:
  """Turns the persistent cache on at the folder `setting` names; returns it (None when off).

  Call before the job's first compilation: JAX opens the cache at the first compilation that finds a folder
  set, and keeps that folder for the life of the process."""
  path = resolve(setting)
  if path is None:
    return None
  if path.exists() and not path.is_dir():
    raise ValueError(f"config.compile_cache={setting!r}: {path} exists and is not a folder")
  path.mkdir(parents=True, exist_ok=True)
  global _listening
  if not _listening:
    jax.monitoring.register_event_listener(_count)
    _listening = True
  jax.config.update("jax_compilation_cache_dir", str(path))
  if not os.environ.get(_MIN_COMPILE_SECS_ENV):
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if log is not None:
    log(f"compilation cache {path}")
  return path
