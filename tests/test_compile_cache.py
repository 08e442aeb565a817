"""The persistent compilation cache: a second process loads what the first compiled (subprocesses, since this
process's cache folder is the suite's own, fixed at its first compilation)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from s3_jax import compile_cache

REPO = Path(__file__).resolve().parent.parent

_JOB = """
import json, sys
import jax, jax.numpy as jnp
from s3_jax import compile_cache
path = compile_cache.enable(sys.argv[1])
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * 3.0)
value = float(f(jnp.arange(64.0).reshape(8, 8) / 64))
print(json.dumps({"path": None if path is None else str(path), "value": value, **compile_cache.counts()}))
"""


def _run(setting, env_extra=None, cache_root=None):
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE")
         and k != compile_cache.ENV}
  env.update(env_extra or {})
  if cache_root is not None:
    env["S3_JAX_CACHE"] = str(cache_root)
  done = subprocess.run([sys.executable, "-c", _JOB, setting], env=env, capture_output=True, text=True,
                        cwd=REPO, timeout=300)
  assert done.returncode == 0, done.stderr
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_programs_the_first_compiled(tmp_path):
  first = _run(str(tmp_path / "xla"))
  assert first["path"] == str(tmp_path / "xla")
  assert first["hits"] == 0 and first["misses"] >= 1
  assert any((tmp_path / "xla").iterdir())
  second = _run(str(tmp_path / "xla"))
  assert second["hits"] >= 1 and second["misses"] == 0
  assert second["value"] == first["value"]


def test_auto_is_next_to_the_assets_and_off_writes_nothing(tmp_path):
  auto = _run("auto", cache_root=tmp_path / "assets")
  assert auto["path"] == str(tmp_path / "assets" / "xla") and auto["misses"] >= 1
  off = _run("", cache_root=tmp_path / "other")
  assert off["path"] is None and off["hits"] == off["misses"] == 0
  assert not (tmp_path / "other" / "xla").exists()


def test_the_environment_variable_wins(tmp_path):
  got = _run(str(tmp_path / "config"), env_extra={compile_cache.ENV: str(tmp_path / "env")})
  assert got["path"] == str(tmp_path / "env")
  assert not (tmp_path / "config").exists()


def test_bad_settings_name_the_key(tmp_path, monkeypatch):
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  with pytest.raises(ValueError, match=r"config\.compile_cache"):
    compile_cache.resolve(0)
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="not a folder"):
    compile_cache.enable(str(tmp_path / "file"))
