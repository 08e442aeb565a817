"""Training checkpoints: orbax `CheckpointManager` over `WORKDIR/checkpoints`, each step with a manifest.

Each checkpoint holds the state pytree (actor and critic parameters, optimizer states, the base RNG key) and
a JSON record (PPO step, data-iterator position, config hash). Saves are collective (every process calls
`save`; orbax writes each host's shards). Restoring reads into the shapes, dtypes and shardings of a
template state, so a resumed run continues on the same mesh layout.

Integrity. orbax keeps no checksum of what it wrote (a flipped byte in a data file restores silently), so
after each save process 0 writes `STEP/s3_jax_manifest.json`: the size and SHA-256 of every file of the step.
`restore` checks the newest step against it and, when a file is missing, cut short or changed (or the
manifest itself is missing: the save did not finish), says which file of which step, moves that step aside
to `WORKDIR/checkpoints_corrupt/` and tries the previous one; with no good step left it raises
`CheckpointError`, one sentence. Checkpoints written before manifests existed (no step has one) restore
unchecked, and the log says so. The manifest is hashed from one process's view of the directory, so on a
multi-host run it covers a shared filesystem (GCS, NFS), not per-host local disks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from s3_jax import sharding as sharding_lib

MANIFEST = "s3_jax_manifest.json"


class CheckpointError(RuntimeError):
  """A checkpoint could not be saved, or no saved one is intact."""


def _stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _files(folder: Path) -> dict[str, dict[str, Any]]:
  out = {}
  for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
    with open(path, "rb") as f:
      digest = hashlib.file_digest(f, "sha256").hexdigest()
    out[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": digest}
  return out


def write_manifest(folder: Path) -> Path:
  """Records every file under `folder` (size, SHA-256) in `folder/MANIFEST`, written atomically."""
  path = folder / MANIFEST
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps({"files": _files(folder)}, indent=1) + "\n")
  os.replace(tmp, path)
  return path


def check_manifest(folder: Path) -> str | None:
  """What is wrong with `folder` against its manifest (the first few problems, in words), or None."""
  path = folder / MANIFEST
  if not path.is_file():
    return f"{path} is missing (the save did not finish)"
  try:
    expected = json.loads(path.read_text())["files"]
  except (ValueError, KeyError, TypeError) as e:
    return f"{path} is unreadable ({type(e).__name__}: {e})"
  actual = _files(folder)
  problems = []
  for name, want in expected.items():
    got = actual.get(name)
    if got is None:
      problems.append(f"{folder / name} is missing")
    elif got["bytes"] != want["bytes"]:
      problems.append(f"{folder / name} has {got['bytes']} bytes, {want['bytes']} were written")
    elif got["sha256"] != want["sha256"]:
      problems.append(f"{folder / name} differs from what was written (SHA-256)")
  problems += [f"{folder / name} was not written by the save" for name in sorted(actual.keys() - expected)]
  if not problems:
    return None
  more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
  return "; ".join(problems[:3]) + more


def _check_writable(directory: Path) -> None:
  """Fails at once, with the path and the OS error, where orbax would wait out its directory timeout."""
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write_probe.{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()
  except OSError as e:
    raise CheckpointError(f"cannot write checkpoints to {directory}: {e.strerror or e}") from e


class Checkpointer:
  def __init__(self, directory: str | Path, *, keep: int = 3, log: Callable[[str], None] = _stderr):
    self.directory = Path(directory).absolute()
    self.log = log
    self.keep = keep
    if jax.process_index() == 0:
      _check_writable(self.directory)
    sharding_lib.host_barrier("checkpoint-directory")
    self.manager = self._manager()

  def _manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves, waits until the checkpoint is complete on disk (a kill right after returns loses nothing), then
    writes its manifest. A failed save raises `CheckpointError` with the path and the OS error."""
    folder = self.directory / str(step)
    if jax.process_index() == 0:
      _check_writable(self.directory)
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
      self.manager.wait_until_finished()
      sharding_lib.host_barrier(f"checkpoint-saved-{step}")
      if jax.process_index() == 0:
        write_manifest(folder)
    except OSError as e:
      raise CheckpointError(f"saving the checkpoint of step {step} to {folder} failed: "
                            f"{e.strerror or e}") from e
    sharding_lib.host_barrier(f"checkpoint-manifest-{step}")

  def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
    """`(state, meta, step)` of `step`, or by default of the newest intact step (older ones are tried when
    the newest fails its manifest or orbax cannot read it; each such step is reported and moved aside), laid
    out like `template`. Raises `CheckpointError` when none is intact, FileNotFoundError when none exists."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f"{self.directory}: no checkpoint of step {step} (have {sorted(steps)})")
      steps = [step]
    unchecked = not any((self.directory / str(s) / MANIFEST).exists() for s in steps)
    if unchecked:
      self.log(f"checkpoints in {self.directory} have no manifests (written before s3_jax checked them): "
               "restoring unchecked")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    bad = []
    for s in steps:
      problem = None if unchecked else check_manifest(self.directory / str(s))
      if problem is None:
        try:
          restored = self.manager.restore(s, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:  # reported, the step moved aside, and the previous one tried
          problem = f"orbax could not read it ({type(e).__name__}: {str(e).splitlines()[0][:300]})"
        else:
          if bad:
            self.log(f"restored the checkpoint of step {s} instead (the previous intact one)")
          return restored["state"], dict(restored["meta"]), s
      bad.append(s)
      self.log(f"checkpoint of step {s} is corrupt or incomplete: {problem}")
      self._set_aside(s)
    raise CheckpointError(f"no intact checkpoint in {self.directory} (steps {', '.join(map(str, bad))} are "
                          f"corrupt or incomplete, moved to {self._aside_dir()}): delete the workdir's "
                          "checkpoints to start over")

  def _aside_dir(self) -> Path:
    return self.directory.parent / f"{self.directory.name}_corrupt"

  def _set_aside(self, step: int) -> None:
    """Moves a bad step out of orbax's directory (the run can save that step again), kept for a look."""
    if jax.process_index() == 0:
      target = self._aside_dir() / f"{step}.{time.strftime('%Y%m%dT%H%M%S')}"
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.directory / str(step)), str(target))
      self.log(f"moved it to {target}")
    sharding_lib.host_barrier(f"checkpoint-aside-{step}")
    self.manager.close()
    self.manager = self._manager()

  def close(self) -> None:
    self.manager.close()
