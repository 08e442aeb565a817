"""Mesh construction and logical-axis sharding rules.

Parameters carry logical axis names (`logical_axes` metadata, e.g. `("embed", "mlp")`); a short rule table
maps each logical name to mesh axes (`config.sharding_rules`). Names without a rule are replicated.
`Placement` puts a learner's parameters, batches and activations on a mesh; the `host_*` helpers are the
multi-process side (gather, broadcast, barriers).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, Any]]

# Training: fsdp shards the embed dimension of weights, tensor the heads/mlp/vocab dimensions.
DEFAULT_RULES: Rules = (("batch", ("data", "fsdp")), ("vocab", "tensor"), ("embed", "fsdp"),
                        ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"))
# Sampling: no fsdp on weights (every decode step would all-gather them).
SAMPLING_RULES: Rules = (("batch", ("data", "fsdp")), ("vocab", "tensor"), ("embed", None),
                         ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"))


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `MESH_AXES`; one size may be -1 to take the remaining devices. On one host, explicit sizes
  whose product is smaller than the device count use the first devices.

  Axes are `Auto` so `with_sharding_constraint` works (jax 0.10's `make_mesh` defaults to Explicit).
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = [shape.get(axis, 1) for axis in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(shape)}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(shape)}: {len(devices)} devices are not divisible by {known}")
    sizes[sizes.index(-1)] = len(devices) // known
  if -1 not in sizes and math.prod(sizes) < len(devices) and jax.process_count() == 1:
    devices = devices[:math.prod(sizes)]  # an explicit smaller mesh uses the first devices (one host only)
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, "
                     f"{len(devices)} available")
  return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def rollout_mesh(shape: Mapping[str, int]) -> Mesh:
  """The mesh rollouts sample on: `shape` (the training mesh) on one process; on several, every process
  samples its own questions on its own devices (no cross-host traffic): the training mesh's tensor axis
  (which shards the sampler's weights) over the local devices, the rest of them sharding the batch."""
  if jax.process_count() == 1:
    return make_mesh(shape)
  local = jax.local_devices()
  tensor = shape.get("tensor", 1)
  if tensor < 1 or len(local) % tensor:
    raise ValueError(f"mesh.tensor={tensor} must divide this host's {len(local)} devices (each host samples "
                     f"its own rollouts on its own devices)")
  return make_mesh({"data": 1, "fsdp": -1, "tensor": tensor}, devices=local)


def unroll_loops(mesh: Mesh | None) -> bool:
  """Whether programs on `mesh` must unroll their loops (`lax.scan(..., unroll=True)`) so that all their
  collectives sit in one flat sequence: true for a CPU mesh of several devices.

  XLA:CPU (jaxlib 0.10) orders a program's collectives within one sequence of operations, but not a loop
  holding collectives against the collectives beside it: each device may run them in a different order.
  Across processes gloo then aborts ("Received data size doesn't match expected size"); in one process the
  in-process communicator can deadlock once every worker thread waits in a different rendezvous. GPUs and
  TPUs order collectives themselves (loops stay loops there), and one device has no collectives."""
  return mesh is not None and mesh.size > 1 and mesh.devices.flat[0].platform == "cpu"


def logical_to_spec(logical_axes: Sequence[str | None], rules: Rules,
                    mesh: Mesh | None = None) -> PartitionSpec:
  """Maps logical names to a `PartitionSpec`. A mesh axis is used at most once per array; mesh axes of
  size 1 are dropped (they change nothing and would block divisibility checks)."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name in logical_axes:
    target = table.get(name) if name is not None else None
    targets = target if isinstance(target, (tuple, list)) else (target,)
    kept = tuple(t for t in targets if t is not None and t not in used
                 and (mesh is None or mesh.shape[t] > 1))
    used.update(kept)
    spec.append(kept[0] if len(kept) == 1 else (kept or None))
  return PartitionSpec(*spec)


def param_sharding(shape: Sequence[int], logical_axes: Sequence[str | None], mesh: Mesh,
                   rules: Rules) -> NamedSharding:
  """The sharding of one parameter; a dimension that the mesh axes do not divide is replicated."""
  spec = list(logical_to_spec(logical_axes, rules, mesh))
  for i, axes in enumerate(spec):
    if axes is None:
      continue
    size = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
    if shape[i] % size:
      spec[i] = None
  return NamedSharding(mesh, PartitionSpec(*spec))


def check_sharded(params: Any, mesh: Mesh, min_size: int = 1 << 20) -> None:
  """Raises `ValueError` naming every weight of at least `min_size` elements that the mesh's model axes
  (fsdp, tensor) leave fully replicated: such a weight costs a full copy per chip, usually because a rule is
  missing or its dimension is not divisible by the axis size."""
  if mesh.shape["fsdp"] * mesh.shape["tensor"] == 1:
    return
  replicated = [f"{jax.tree_util.keystr(path)} {tuple(x.shape)}"
                for path, x in jax.tree_util.tree_leaves_with_path(params)
                if x.size >= min_size and x.sharding.is_fully_replicated]
  if replicated:
    raise ValueError(f"weights replicated on a mesh with fsdp={mesh.shape['fsdp']}, "
                     f"tensor={mesh.shape['tensor']}: {', '.join(replicated)} — check the sharding rules and "
                     f"that those dimensions divide by the axis sizes")


def place_local_batch(local: Any, sharding: NamedSharding) -> jax.Array:
  """A global array from this process's rows (multi-host safe: each host passes only its share; on one
  host this is the whole batch)."""
  return jax.make_array_from_process_local_data(sharding, local)


def maybe_initialize_distributed() -> bool:
  """`jax.distributed.initialize()` when launched multi-host (`S3_JAX_DIST=1`, or `JAX_COORDINATOR_ADDRESS`
  set); must run before any other JAX call. Returns whether it initialised. On TPU VMs, Slurm and MPI, JAX
  finds the processes itself; elsewhere (GPU VMs, `launch/gpu_vm.sh`) `JAX_COORDINATOR_ADDRESS`,
  `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` say where the coordinator is, how many processes there are and
  which one this is (JAX reads only the first; the other two are passed here)."""
  if os.environ.get("S3_JAX_DIST") == "1" or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    # CPU processes (tests, CPU clusters) need a cross-process collectives library; accelerators ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    count, index = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(num_processes=None if count is None else int(count),
                               process_id=None if index is None else int(index))
    return True
  return False


def host_max(value: int) -> int:
  """The largest `value` over all processes (the same answer on each; `value` itself on one process)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils

  return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int64))))


def host_gather(array: np.ndarray) -> np.ndarray:
  """Every process's rows of `array` concatenated in process order (the array itself on one process)."""
  if jax.process_count() == 1:
    return np.asarray(array)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(np.asarray(array), tiled=True))


def host_fetch(tree: Any) -> Any:
  """A tree of global arrays as full host arrays on every process (`jax.device_get` on one process)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  return multihost_utils.process_allgather(tree, tiled=True)


def host_barrier(name: str) -> None:
  """Waits until every process reaches this point (no-op on one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def host_gather_objects(obj: Any) -> list[Any]:
  """Every process's JSON-serialisable `obj`, in process order (`[obj]` on one process): how hosts share
  rows of results (questions, documents, answers) that are not arrays."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils

  data = np.frombuffer(json.dumps(obj, ensure_ascii=False).encode(), np.uint8)
  lengths = host_gather(np.asarray([len(data)], np.int64))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = data
  rows = np.asarray(multihost_utils.process_allgather(padded))  # (processes, longest)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths.tolist(), strict=True)]


def host_broadcast_object(obj: Any) -> Any:
  """Process 0's JSON-serialisable `obj` on every process (what the others pass is ignored)."""
  if jax.process_count() == 1:
    return obj
  return host_gather_objects(obj if jax.process_index() == 0 else None)[0]


def shared_folder(folder: str | os.PathLike) -> bool:
  """Whether every process sees the same `folder` (a shared filesystem such as NFS or GCS FUSE) rather than
  a folder of the same name on its own disk. With one: process 0 alone writes shared files; without: every
  process writes its own copy. True on one process."""
  if jax.process_count() == 1:
    return True
  import uuid

  marker = Path(folder) / ".s3_jax_host0"
  token = host_broadcast_object(uuid.uuid4().hex)
  if jax.process_index() == 0:
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(token)
  host_barrier(f"shared-folder-{token}")
  seen = marker.read_text() if marker.is_file() else ""
  return all(host_gather_objects(seen == token))


def per_process_name(path: str | Path) -> str | Path:
  """`answers.sqlite` on one process, `answers.{process index}.sqlite` on several (the file's name; its folder
  and the argument's type stay): files each process writes for itself (hosts never contend for one SQLite
  file, even on a shared filesystem)."""
  if jax.process_count() == 1:
    return path
  stem, dot, suffix = Path(path).name.partition(".")
  named = Path(path).with_name(f"{stem}.{jax.process_index()}{dot}{suffix}")
  return named if isinstance(path, Path) else str(named)


def is_axes(x: Any) -> bool:
  """A leaf of a logical-axes tree: a tuple of axis names (None: not sharded)."""
  return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


class Placement:
  """Where a learner's arrays live: parameters sharded by their logical axes and `rules`, batches and
  activations sharded on their rows over the mesh's batch axes (data × fsdp). `mesh=None`: one device,
  nothing sharded (every method then returns None shardings and leaves arrays as they are)."""

  def __init__(self, mesh: Mesh | None, rules: Rules = DEFAULT_RULES):
    self.mesh, self.rules = mesh, rules
    batch_axes = tuple(a for a in ("data", "fsdp") if mesh is not None and mesh.shape[a] > 1)
    self.batch_shards = math.prod(mesh.shape[a] for a in batch_axes) if mesh is not None else 1
    self._batch_axes = batch_axes or None

  def params(self, shapes: Any, axes: Any) -> Any:
    """The shardings of a parameter tree (`shapes`: arrays or shape structs) from its logical axes."""
    if self.mesh is None:
      return None
    return jax.tree.map(lambda ax, s: param_sharding(s.shape, ax, self.mesh, self.rules), axes, shapes,
                        is_leaf=is_axes)

  def replicated(self) -> NamedSharding | None:
    return None if self.mesh is None else NamedSharding(self.mesh, PartitionSpec())

  def rows(self, ndim: int = 2, dim: int = 0) -> NamedSharding | None:
    """An `ndim`-dimensional array sharded on dimension `dim` over the batch axes."""
    if self.mesh is None:
      return None
    spec = [None] * ndim
    spec[dim] = self._batch_axes
    return NamedSharding(self.mesh, PartitionSpec(*spec))

  def copy(self, tree: Any, shardings: Any) -> Any:
    """Fresh device copies of `tree` placed with `shardings` (never aliases of the caller's arrays, which a
    donating jit would free)."""
    # A jitted copy: jax 0.10's device_put(..., may_alias=False) still reuses the source buffer as device 0's
    # shard of a replicated array, so two placements of one tree would share (and donate) it.
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(tree)

  def put_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Host arrays -> device arrays sharded on their rows (each process gives its own rows)."""
    if self.mesh is None:
      return {k: jnp.asarray(v) for k, v in batch.items()}
    return {k: place_local_batch(np.asarray(v), self.rows(np.ndim(v))) for k, v in batch.items()}

  def constrain_rows(self, x: jax.Array, dim: int = 0) -> jax.Array:
    """Inside a jitted function: `x` sharded on dimension `dim` over the batch axes (activations between
    layers; micro-batches `[n, micro, t]` on dimension 1)."""
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, self.rows(x.ndim, dim))
