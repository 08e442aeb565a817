"""Training checkpoints: orbax `CheckpointManager` over `WORKDIR/checkpoints`.

Each checkpoint holds the state pytree (actor and critic parameters, optimizer states, the base RNG key) and
a JSON record (PPO step, data-iterator position, config hash). Saves are collective (every process calls
`save`; orbax writes each host's shards). Restoring reads into the shapes, dtypes and shardings of a
template state, so a resumed run continues on the same mesh layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, directory: str | Path, *, keep: int = 3):
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Saves and waits until the checkpoint is complete on disk (a kill right after returns loses nothing)."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)
    self.manager.wait_until_finished()

  def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """`(state, meta)` of `step` (default: the latest), laid out like `template`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                  meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])

  def close(self) -> None:
    self.manager.close()
