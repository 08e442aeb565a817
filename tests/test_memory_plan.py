"""`python -m s3_jax.memory_plan`: the exact parts of its per-chip estimate equal the bytes the trainer's
own placement puts on a device (a real PPOLearner state, reference and sampler on 8 CPU devices, with a
dimension the mesh does not divide), the Qwen presets have their released parameter counts, and sizes the
trainer refuses are refused."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from conftest import REPO
from flax import nnx

from s3_jax import config_lib
from s3_jax import sharding as sharding_lib
from s3_jax.memory_plan import PRESETS, parameter_count, plan
from s3_jax.models import heads
from s3_jax.models.config import DecoderConfig
from s3_jax.models.decoder import Decoder, ValueModel
from s3_jax.models.sampler import Sampler
from s3_jax.rl import learner as learner_lib
from s3_jax.rl.settings import PPOSettings

# vocab 98 is not divisible by the 4-way tensor axis of the second mesh: the plan must replicate it as the
# trainer does.
MODEL = DecoderConfig(vocab_size=98, hidden_size=32, intermediate_size=52, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, tie_embeddings=False, qkv_bias=True,
                      max_position_embeddings=64)


def _device0_bytes(tree):
  """Bytes of the floating-point arrays (not integer step counts) that device 0 holds."""
  return sum(next(s for s in x.addressable_shards if s.device == jax.devices()[0]).data.nbytes
             for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating))


@pytest.mark.parametrize("mesh_shape,param_dtype", [({"fsdp": 4, "tensor": 2}, "float32"),
                                                    ({"fsdp": 2, "tensor": 4}, "bfloat16")])
def test_exact_parts_equal_the_trainers_placement(mesh_shape, param_dtype):
  config = config_lib.load(str(REPO / "configs/tiny.py"), [
      f"mesh.fsdp={mesh_shape['fsdp']}", f"mesh.tensor={mesh_shape['tensor']}", "ppo.batch_size=8",
      "ppo.mini_batch_size=8", "ppo.actor_micro_batch_size=8", "ppo.critic_micro_batch_size=8",
      "ppo.score_micro_batch_size=8", f"searcher.param_dtype={param_dtype}", "rollout.param_dtype=bfloat16"])
  result = plan(config, MODEL, devices=8)["parts"]

  mesh = sharding_lib.make_mesh(dict(config.mesh))
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[param_dtype]
  settings = PPOSettings.from_config(config)
  rules = [tuple(r) for r in config.sharding_rules]
  learner = learner_lib.PPOLearner(settings, MODEL, mesh=mesh, rules=rules)
  decoder = Decoder(MODEL, rngs=nnx.Rngs(0), param_dtype=dtype)
  critic = heads.critic_params(ValueModel(MODEL, rngs=nnx.Rngs(1)))
  state = learner.init_state(decoder.arrays(), critic)
  assert result["actor weights"] == _device0_bytes(state["actor"]["params"])
  assert result["actor AdamW moments"] == _device0_bytes(state["actor"]["opt"])
  assert result["critic weights"] == _device0_bytes(state["critic"]["params"])
  assert result["critic AdamW moments"] == _device0_bytes(state["critic"]["opt"])
  assert result["reference weights"] == _device0_bytes(learner.place_ref(decoder.arrays()))
  sampler = Sampler(decoder, mesh=mesh, rules=[tuple(r) for r in config.sampling_sharding_rules])
  sampler.set_params(heads.cast_floats(heads.policy_params(state["actor"]["params"]), jnp.bfloat16))
  assert result["sampler weights"] == _device0_bytes(sampler.params)
  # The test means something: the weights are sharded (device 0 holds far less than all of them).
  whole = sum(x.nbytes for x in jax.tree.leaves(state["actor"]["params"]))
  assert result["actor weights"] < whole / 2


def test_qwen_presets_have_their_published_sizes():
  """The parameter counts of the released checkpoints (their model cards: 3.09B, 7.61B, 14.7B)."""
  assert parameter_count(PRESETS["qwen2.5-3b"]) == 3_085_938_688
  assert parameter_count(PRESETS["qwen2.5-7b"]) == 7_615_616_512
  assert parameter_count(PRESETS["qwen2.5-14b"]) == 14_770_033_664


def test_cli_reports_fit_and_refuses_sizes_the_trainer_refuses():
  base = [sys.executable, "-m", "s3_jax.memory_plan", "--config", "configs/s3_qwen7b.py",
          "--model", "qwen2.5-7b"]
  fits = subprocess.run([*base, "--config.mesh.fsdp=2", "--config.mesh.tensor=4", "--devices", "8",
                         "--config.ppo.actor_micro_batch_size=10", "--config.searcher.remat=full",
                         "--hbm", "80"], capture_output=True, text=True, cwd=REPO)
  assert fits.returncode == 0, fits.stderr
  assert "7.62B parameters; 8 chips" in fits.stdout and "fits in 80 GB" in fits.stdout
  bad = subprocess.run([*base, "--devices", "8"], capture_output=True, text=True, cwd=REPO)
  assert bad.returncode != 0 and "actor_micro_batch_size=15 must be a multiple" in bad.stderr
