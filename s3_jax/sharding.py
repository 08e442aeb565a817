"""Mesh construction and logical-axis sharding rules.

Parameters carry logical axis names (`logical_axes` metadata, e.g. `("embed", "mlp")`); a short rule table
maps each logical name to mesh axes (`config.sharding_rules`). Names without a rule are replicated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
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
  """A mesh over `MESH_AXES`; one size may be -1 to take the remaining devices.

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
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, "
                     f"{len(devices)} available")
  return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


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
