"""Training checkpoints: orbax `CheckpointManager` over `WORKDIR/checkpoints`, each step with a manifest.

Each checkpoint holds the state pytree (actor and critic parameters, optimizer states, the base RNG key) and
a JSON record (PPO step, data-iterator position, total steps). Saves are collective (every process calls
`save`; orbax writes each host's shards). Restoring reads into the shapes, dtypes and shardings of a
template state, so a resumed run continues on the same mesh layout.

Integrity. orbax keeps no checksum of what it wrote (a flipped byte in a data file restores silently), so
after each save process 0 writes `STEP/s3_jax_manifest.json`: the size and SHA-256 of every file of the step.
`restore` checks the newest step against it and, when a file is missing, cut short or changed (or the
manifest itself is missing: the save did not finish), says which file of which step, moves that step aside
to `WORKDIR/checkpoints_corrupt/` and tries the previous one; with no good step left it raises
`CheckpointError`, one sentence. Steps written before manifests existed (older than the newest step with
one) restore unchecked, and the log says so. Every process checks, and all act on one verdict; failures
on process 0 (an unwritable folder, a manifest that cannot be written) are raised on every process. An
orbax error on an intact step is raised as it is. The manifest is hashed from one process's view of the
directory, so on a multi-host run it covers a shared filesystem (GCS, NFS), not per-host local disks.
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


class CheckpointMismatchError(ValueError):
  """An intact checkpoint that does not fit this run's state (another config or an older layout): the
  request is wrong, not the checkpoint, so nothing is moved aside."""


def _paths(tree: Any) -> dict[str, tuple[int, ...] | None]:
  """`{"a.b.0": shape}` of a state tree or of orbax's metadata tree (dict keys, sequence indices and
  attribute names alike, so a NamedTuple and its saved dict read the same)."""
  def name(entry: Any) -> str:
    for attr in ("key", "idx", "name"):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)

  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
  return {".".join(name(e) for e in path): getattr(x, "shape", None) for path, x in leaves}


def _mismatch(directory: Path, step: int, saved: Any, wanted: Any,
              error: Exception) -> CheckpointMismatchError:
  """The error for a restore of `wanted` (this run's state) from step `step`, whose saved state has the
  metadata tree `saved` (None: unreadable): the paths only one side has, or the shapes that differ."""
  what = ""
  if saved is not None:
    on_disk, here = _paths(saved), _paths(wanted)

    def some(paths: list[str]) -> str:
      if not paths:
        return "-"
      return ", ".join(paths[:4]) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")
    only_saved, only_here = sorted(set(on_disk) - set(here)), sorted(set(here) - set(on_disk))
    shapes = [f"{p} {tuple(on_disk[p])} saved, {tuple(here[p])} here"
              for p in sorted(set(on_disk) & set(here))
              if on_disk[p] is not None and here[p] is not None and tuple(on_disk[p]) != tuple(here[p])]
    if only_saved or only_here:
      what = f"only in the checkpoint: {some(only_saved)}; only in this run: {some(only_here)}"
    elif shapes:
      what = "shapes differ: " + some(shapes)
  if not what:
    lines = str(error).strip().splitlines()
    what = lines[0][:300] if lines else type(error).__name__
  return CheckpointMismatchError(
      f"the checkpoint of step {step} in {directory} does not fit this run's state ({what}): it was written "
      "with another config (the searcher, critic.separate_model, the optimizer) or by an older s3_jax. "
      "Resume it with the config it was written with, or train in a new --workdir")


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
    actual = _files(folder)
  except (ValueError, KeyError, TypeError) as e:
    return f"{path} is unreadable ({type(e).__name__}: {e})"
  except OSError as e:
    return f"{folder} could not be read ({e})"
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


def _on_process_0(what: Callable[[], None]) -> None:
  """Runs `what` on process 0; a `CheckpointError` it raises is raised on every process (the others would
  otherwise wait for process 0 at the next collective)."""
  error = None
  if jax.process_index() == 0:
    try:
      what()
    except CheckpointError as e:
      error = str(e)
  errors = [e for e in sharding_lib.host_gather_objects(error) if e]
  if errors:
    raise CheckpointError(errors[0])


def check_writable(directory: str | Path) -> None:
  """Raises `CheckpointError` (path and OS error) on every process when process 0 cannot write `directory`:
  what the trainer checks before anything slow."""
  _on_process_0(lambda: _check_writable(Path(directory).absolute()))


class Checkpointer:
  def __init__(self, directory: str | Path, *, keep: int = 3, log: Callable[[str], None] = _stderr):
    self.directory = Path(directory).absolute()
    self.log = log
    self.keep = keep
    check_writable(self.directory)
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
    check_writable(self.directory)
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      meta=ocp.args.JsonSave(meta)), force=True)
      self.manager.wait_until_finished()
    except OSError as e:
      raise CheckpointError(f"saving the checkpoint of step {step} to {folder} failed: "
                            f"{e.strerror or e}") from e
    sharding_lib.host_barrier(f"checkpoint-saved-{step}")

    def manifest() -> None:
      try:
        write_manifest(folder)
      except OSError as e:
        raise CheckpointError(f"writing the manifest of {folder} failed: {e.strerror or e}") from e
    _on_process_0(manifest)

  def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any], int]:
    """`(state, meta, step)` of `step`, or by default of the newest intact step, laid out like `template`.
    A step that fails its manifest (every process checks; one process's verdict counts for all) is reported,
    moved aside, and the previous one tried; `CheckpointError` when none is intact, FileNotFoundError when
    none exists. A template that does not fit an intact step raises `CheckpointMismatchError` naming the
    paths that differ (from orbax's error, chained): the checkpoint is fine, the request is not."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f"{self.directory}: no checkpoint of step {step} (have {sorted(steps)})")
      steps = [step]
    # Steps older than the newest one with a manifest were written before manifests existed: unchecked.
    with_manifest = [s for s in steps if (self.directory / str(s) / MANIFEST).exists()]
    newest_checked = max(with_manifest, default=None)
    bad = []
    for s in steps:
      if newest_checked is None or (s < newest_checked and s not in with_manifest):
        self.log(f"checkpoint of step {s} in {self.directory} has no manifest (written before s3_jax checked "
                 "them): restoring it unchecked")
        problem = None
      else:
        problem = check_manifest(self.directory / str(s))
      problems = [p for p in sharding_lib.host_gather_objects(problem) if p]
      if not problems:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
        try:
          restored = self.manager.restore(s, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except ValueError as e:
          raise _mismatch(self.directory, s, self._saved_state(s), template, e) from e
        if _paths(restored["state"]) != _paths(template):  # orbax restores the saved shapes as they are
          raise _mismatch(self.directory, s, restored["state"], template, ValueError("shapes differ"))
        if bad:
          self.log(f"restored the checkpoint of step {s} instead (the previous intact one)")
        return restored["state"], dict(restored["meta"]), s
      bad.append(s)
      self.log(f"checkpoint of step {s} is corrupt or incomplete: {problems[0]}")
      self._set_aside(s)
    raise CheckpointError(f"no intact checkpoint in {self.directory} (steps {', '.join(map(str, bad))} are "
                          f"corrupt or incomplete, moved to {self._aside_dir()}): delete the workdir's "
                          "checkpoints to start over")

  def _saved_state(self, step: int) -> Any:
    """The metadata tree (paths, shapes) of step `step`'s saved state, or None when orbax cannot read it."""
    try:
      return self.manager.item_metadata(step)["state"]
    except (KeyError, ValueError, OSError, TypeError):
      return None

  def _aside_dir(self) -> Path:
    return self.directory.parent / f"{self.directory.name}_corrupt"

  def _set_aside(self, step: int) -> None:
    """Moves a bad step out of orbax's directory (the run can save that step again), kept for a look."""
    sharding_lib.host_barrier(f"checkpoint-checked-{step}")  # every process has finished reading it
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
