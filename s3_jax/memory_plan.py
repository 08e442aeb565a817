"""Accelerator memory per chip that a training config needs, from the shapes alone (nothing is allocated, no
accelerator needed): what to check before renting a TPU slice or a GPU host.

  python -m s3_jax.memory_plan --config configs/s3_qwen7b.py[:arg] [--config.key=value ...]
      [--model qwen2.5-7b|qwen2.5-3b|qwen2.5-14b] [--hbm GB]

The searcher's shape comes from `searcher.init_from`'s config.json when that folder is here, else from
`--model` (a preset) or `searcher.model` (random init). The mesh is the config's `mesh` with -1 resolved by
`--devices` (default: the product of the explicit sizes, or 8).

Exact (the same sharding rules the trainer applies, a dimension the mesh does not divide replicated): the
actor's master weights, its AdamW moments and gradients (param dtype), the separate critic's (float32), the
frozen reference (KL), the sampler's copy (sampling rules, `rollout.param_dtype`). Estimated: the sampler's
KV cache (every row of the rollout batch at `max_prompt_length + max_response_length`, buckets ignored) and
the update's activations (one actor micro-batch at the same length under `searcher.remat`, plus the
response-window logits in float32); XLA's own buffers and fragmentation come on top.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from s3_jax import sharding as sharding_lib
from s3_jax.models import precision
from s3_jax.models.config import DecoderConfig
from s3_jax.models.decoder import param_specs

# Shapes of common searchers (their config.json), for planning on a machine without the weights.
PRESETS = {
    "qwen2.5-3b": DecoderConfig(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_layers=36,
                                num_heads=16, num_kv_heads=2, head_dim=128, tie_embeddings=True,
                                qkv_bias=True, architecture="Qwen2ForCausalLM"),
    "qwen2.5-7b": DecoderConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                                num_heads=28, num_kv_heads=4, head_dim=128, tie_embeddings=False,
                                qkv_bias=True, architecture="Qwen2ForCausalLM"),
    "qwen2.5-14b": DecoderConfig(vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_layers=48,
                                 num_heads=40, num_kv_heads=8, head_dim=128, tie_embeddings=False,
                                 qkv_bias=True, architecture="Qwen2ForCausalLM"),
}
_BYTES = {"float32": 4, "bfloat16": 2}
GB = 1e9


@dataclasses.dataclass(frozen=True)
class _MeshShape:
  """What `sharding.logical_to_spec` reads of a mesh (its axis sizes), without devices."""

  shape: Mapping[str, int]


def resolve_mesh(shape: Mapping[str, int], devices: int) -> dict[str, int]:
  """The mesh's axis sizes with a -1 resolved over `devices`."""
  sizes = {axis: int(shape.get(axis, 1)) for axis in sharding_lib.MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh {dict(shape)}: at most one axis may be -1")
  if free:
    known = math.prod(s for s in sizes.values() if s != -1)
    if devices % known:
      raise ValueError(f"mesh {dict(shape)}: {devices} devices are not divisible by {known}")
    sizes[free[0]] = devices // known
  return sizes


def shard_bytes(shape: Sequence[int], axes: Sequence[str | None], mesh: Mapping[str, int], rules: Any,
                itemsize: int) -> int:
  """Bytes of one device's shard of an array (`sharding.param_sharding`'s placement)."""
  spec = sharding_lib.logical_to_spec(axes, rules, _MeshShape(mesh))
  elements = 1
  for size, names in zip(shape, spec, strict=True):
    names = () if names is None else names if isinstance(names, tuple) else (names,)
    split = math.prod(mesh[a] for a in names)
    elements *= size // split if size % split == 0 else size  # not divisible: replicated
  return elements * itemsize


def _tree_bytes(specs: Mapping[str, tuple[tuple[int, ...], tuple]], mesh, rules, itemsize: int) -> int:
  return sum(shard_bytes(shape, axes, mesh, rules, itemsize) for shape, axes in specs.values())


def actor_specs(model: DecoderConfig, shared_head: bool) -> dict[str, tuple[tuple[int, ...], tuple]]:
  specs = dict(param_specs(model))
  if shared_head:
    specs["value_head.kernel"] = ((model.hidden_size,), ("embed",))
    specs["value_head.bias"] = ((), ())
  return specs


def critic_specs(model: DecoderConfig) -> dict[str, tuple[tuple[int, ...], tuple]]:
  specs = {f"backbone.{k}": v for k, v in param_specs(model, lm_head=False).items()}
  specs["head.kernel"] = ((model.hidden_size,), ("embed",))
  specs["head.bias"] = ((), ())
  return specs


def plan(config: ml_collections.ConfigDict, model: DecoderConfig, devices: int,
         processes: int = 1) -> dict[str, Any]:
  """Bytes per chip of each part (see the module docstring), their total, and the meshes used."""
  mesh = resolve_mesh(config.mesh, devices)
  train_rules = [tuple(r) for r in config.sharding_rules]
  sample_rules = [tuple(r) for r in config.sampling_sharding_rules]
  # Rollouts: the training mesh on one host; on several, each host's devices (sharding.rollout_mesh).
  local = devices // processes
  sample_mesh = mesh if processes == 1 else {"data": 1, "fsdp": local // mesh["tensor"],
                                             "tensor": mesh["tensor"]}
  param_bytes = _BYTES[config.searcher.param_dtype]
  compute_bytes = _BYTES[precision.resolve(config.searcher.compute_dtype)]
  sample_bytes = _BYTES[config.rollout.param_dtype or config.searcher.param_dtype]
  from s3_jax.rl.settings import PPOSettings

  settings = PPOSettings.from_config(config)
  settings.check(batch_shards=mesh["data"] * mesh["fsdp"])  # the sizes the trainer would refuse
  separate = bool(config.critic.separate_model)
  uses_critic = settings.uses_critic
  actor = _tree_bytes(actor_specs(model, shared_head=uses_critic and not separate), mesh, train_rules,
                      param_bytes)
  parts = {"actor weights": actor, "actor AdamW moments": 2 * actor, "actor gradients": actor}
  if uses_critic and separate:
    critic = _tree_bytes(critic_specs(model), mesh, train_rules, 4)
    parts.update({"critic weights": critic, "critic AdamW moments": 2 * critic, "critic gradients": critic})
  if config.ppo.kl_coef > 0:
    parts["reference weights"] = _tree_bytes(actor_specs(model, False), mesh, train_rules, param_bytes)
  parts["sampler weights"] = _tree_bytes(actor_specs(model, False), sample_mesh, sample_rules, sample_bytes)

  length = config.rollout.max_prompt_length + config.rollout.max_response_length
  rows = config.ppo.batch_size * config.rollout.samples_per_question
  sample_shards = sample_mesh["data"] * sample_mesh["fsdp"] * processes
  tensor_kv = sample_mesh["tensor"] if model.num_kv_heads % sample_mesh["tensor"] == 0 else 1
  parts["KV cache (est.)"] = (math.ceil(rows / sample_shards) * length * model.num_layers * 2
                              * (model.num_kv_heads // tensor_kv) * model.head_dim * compute_bytes)
  micro = math.ceil(config.ppo.actor_micro_batch_size / (mesh["data"] * mesh["fsdp"]))
  tensor = mesh["tensor"]
  per_token = model.hidden_size  # each layer's input (every remat mode keeps it)
  if config.searcher.remat in ("dots", "none"):  # the weight matmuls' outputs too
    per_token += (model.num_heads * model.head_dim * 2 + model.num_kv_heads * model.head_dim * 2
                  + 3 * model.intermediate_size) // tensor + model.hidden_size
  window = config.rollout.max_response_length * (config.rollout.max_turns + 1)
  activations = (micro * length * model.num_layers * per_token * compute_bytes
                 + micro * min(window, length) * (model.vocab_size // tensor) * 4)
  if config.searcher.remat == "none":  # every layer's attention probabilities too
    activations += micro * model.num_layers * (model.num_heads // tensor) * length * length * compute_bytes
  parts["update activations (est.)"] = activations
  return {"parts": parts, "total": sum(parts.values()), "mesh": mesh, "sample_mesh": sample_mesh,
          "devices": devices, "processes": processes, "model": model}


def parameter_count(model: DecoderConfig) -> int:
  return sum(math.prod(shape) for shape, _ in param_specs(model).values())


def render(result: Mapping[str, Any], hbm_gb: float | None = None) -> str:
  mesh = ", ".join(f"{a}={s}" for a, s in result["mesh"].items())
  lines = [f"searcher: {parameter_count(result['model']) / 1e9:.2f}B parameters; {result['devices']} chips, "
           f"mesh {mesh}" + (f", {result['processes']} hosts" if result["processes"] > 1 else ""),
           "", "| part | GB per chip |", "|---|---:|"]
  lines += [f"| {name} | {value / GB:.1f} |" for name, value in result["parts"].items()]
  lines.append(f"| **total** | **{result['total'] / GB:.1f}** |")
  if hbm_gb:
    verdict = "fits" if result["total"] / GB <= 0.9 * hbm_gb else "does NOT fit"
    lines.append(f"\n{verdict} in {hbm_gb:g} GB per chip (with 10% kept for XLA's own buffers)")
  return "\n".join(lines)


def searcher_shape(config: ml_collections.ConfigDict, preset: str | None) -> DecoderConfig:
  """`--model` preset, else `searcher.init_from`'s config.json when the folder is here, else
  `searcher.model`."""
  if preset:
    if preset not in PRESETS:
      raise ValueError(f"--model {preset!r} must be one of {', '.join(PRESETS)}")
    return PRESETS[preset]
  if config.searcher.init_from:
    from s3_jax import assets
    from s3_jax.models.hf import read_config

    try:
      folder = assets.resolve(config.searcher.init_from)
    except (FileNotFoundError, assets.AssetError) as e:
      raise ValueError(f"searcher.init_from {config.searcher.init_from!r} is not here ({e}); pass --model "
                       f"({', '.join(PRESETS)})") from None
    if not (Path(folder) / "config.json").is_file():
      raise ValueError(f"searcher.init_from {folder} has no config.json here; pass --model "
                       f"({', '.join(PRESETS)})")
    return read_config(folder)[0]
  return DecoderConfig.from_fields(config.searcher.model)


def cli(argv: Sequence[str] | None = None) -> None:
  from absl import flags

  from s3_jax import cli as cli_lib

  config_flag = cli_lib.config_flag()
  model_flag = flags.DEFINE_string("model", None, f"searcher shape preset: {', '.join(PRESETS)}")
  devices_flag = flags.DEFINE_integer("devices", None, "chips in the mesh (default: the mesh's explicit "
                                                       "sizes, or 8 when one is -1)")
  hosts_flag = flags.DEFINE_integer("hosts", 1, "processes the chips are spread over (rollouts per host)")
  hbm_flag = flags.DEFINE_float("hbm", None, "memory per chip in GB, to say whether it fits (v5e 16, v5p 95, "
                                             "H100 80)")

  def body(config) -> None:
    sizes = [int(config.mesh.get(a, 1)) for a in sharding_lib.MESH_AXES]
    devices = devices_flag.value or (math.prod(sizes) if -1 not in sizes else 8)
    if devices % hosts_flag.value:
      raise ValueError(f"--devices {devices} do not split over --hosts {hosts_flag.value}")
    result = plan(config, searcher_shape(config, model_flag.value), devices, hosts_flag.value)
    print(render(result, hbm_flag.value))

  cli_lib.run(body, config_flag, argv=argv, errors=(ValueError, KeyError))


if __name__ == "__main__":
  cli()
