"""conftest gives JAX 8 CPU devices, so sharding tests can build real multi-axis meshes."""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec


def test_eight_fake_devices_shard_an_array():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((2, 4), ("data", "tensor"))
  x = np.arange(32.0).reshape(8, 4)
  sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data", "tensor")))
  assert len(sharded.addressable_shards) == 8
  assert sharded.addressable_shards[0].data.shape == (4, 1)
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda a: a * 2)(sharded)), x * 2)
