"""Builds and loads the CPU kernels' C++ sources (`cpu_attention.cc`, `cpu_matmul.cc`) as shared libraries.

Each source is compiled with the host's C++ compiler (`$CXX`, else `g++`/`c++`) for this machine's instruction
set (`-march=native`), into `$S3_JAX_CACHE/kernels/`, keyed by the source, the headers next to it, the flags,
the jaxlib headers and the CPU's feature flags (a `-march=native` build is only good for its instruction set).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

from s3_jax import assets

FOLDER = Path(__file__).parent
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-std=c++17", "-ffp-contract=fast",
         "-fno-math-errno", "-shared", "-fPIC")


def compiler() -> str | None:
  for name in (os.environ.get("CXX"), "g++", "c++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def cpu_flags() -> str:
  """The CPU's feature flags (`/proc/cpuinfo`'s first `flags` line; "" where there is none)."""
  path = Path("/proc/cpuinfo")
  if path.exists():
    for line in path.read_text(errors="replace").splitlines():
      if line.startswith("flags"):
        return line
  return ""


def library_path(source: Path, compiler_path: str) -> Path:
  key = hashlib.sha256()
  key.update(source.read_bytes())
  for header in sorted(FOLDER.glob("*.h")):
    key.update(header.name.encode() + header.read_bytes())
  key.update(" ".join((compiler_path, *FLAGS, jax.ffi.include_dir(), jax.__version__)).encode())
  key.update(cpu_flags().encode())
  return assets.cache_dir() / "kernels" / f"{source.stem}-{key.hexdigest()[:16]}.so"


def _build(compiler_path: str, source: Path, out: Path) -> None:
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
    partial = Path(tmp) / out.name
    command = [compiler_path, *FLAGS, "-I", jax.ffi.include_dir(), "-I", str(FOLDER), str(source), "-o",
               str(partial)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
      raise RuntimeError(f"building {source.name} failed ({' '.join(command)}):\n{done.stderr[-4000:]}")
    os.replace(partial, out)  # atomic: a concurrent process sees the whole library or none


def load(source: Path) -> tuple[ctypes.CDLL | None, str]:
  """(the built library, "") or (None, why it cannot be built here). A compiler that is present but fails
  raises: a bug to see, not a fallback."""
  if jax.default_backend() != "cpu":
    return None, f"the default backend is {jax.default_backend()}, not cpu"
  compiler_path = compiler()
  if compiler_path is None:
    return None, "no C++ compiler ($CXX, g++ or c++) on PATH"
  path = library_path(source, compiler_path)
  if not path.exists():
    _build(compiler_path, source, path)
  return ctypes.cdll.LoadLibrary(str(path)), ""
