"""Hugging Face safetensors import/export for the decoder and its value-head variant.

`load_hf` reads `config.json` and `model.safetensors` (or a sharded `model.safetensors.index.json`),
checks every shape against the config, and, given a mesh, places each tensor directly with its sharding
(each device reads only its slice). `save_hf` writes a folder that `transformers` and vLLM load as is.
A value model is exported as `*ForTokenClassification` with `num_labels=1` (verl's critic format).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from s3_jax import sharding as sharding_lib
from s3_jax.models.config import DecoderConfig
from s3_jax.models.decoder import Decoder, ValueModel

# Our stacked name -> (HF per-layer name, kind of transform). HF linear weights are [out, in].
_LAYER_NAMES = {
    "attn_norm": ("input_layernorm.weight", "copy"),
    "mlp_norm": ("post_attention_layernorm.weight", "copy"),
    "q": ("self_attn.q_proj.weight", "in_heads"),
    "k": ("self_attn.k_proj.weight", "in_heads"),
    "v": ("self_attn.v_proj.weight", "in_heads"),
    "o": ("self_attn.o_proj.weight", "heads_out"),
    "q_bias": ("self_attn.q_proj.bias", "heads"),
    "k_bias": ("self_attn.k_proj.bias", "heads"),
    "v_bias": ("self_attn.v_proj.bias", "heads"),
    "q_norm": ("self_attn.q_norm.weight", "copy"),
    "k_norm": ("self_attn.k_norm.weight", "copy"),
    "gate": ("mlp.gate_proj.weight", "transpose"),
    "up": ("mlp.up_proj.weight", "transpose"),
    "down": ("mlp.down_proj.weight", "transpose"),
}
_TOP_NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
              "lm_head": "lm_head.weight", "value_head.kernel": "score.weight",
              "value_head.bias": "score.bias"}
# Buffers some checkpoints carry that are recomputed here.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


def _hf_shape(kind: str, ours: tuple[int, ...]) -> tuple[int, ...]:
  """The HF tensor shape that holds a parameter of our shape `ours` (one layer)."""
  if kind == "transpose":
    return ours[::-1]
  if kind == "in_heads":  # ours [d, heads, e] <- hf [heads*e, d]
    return (ours[1] * ours[2], ours[0])
  if kind == "heads_out":  # ours [heads, e, d] <- hf [d, heads*e]
    return (ours[2], ours[0] * ours[1])
  if kind == "heads":  # ours [heads, e] <- hf [heads*e]
    return (ours[0] * ours[1],)
  if kind == "score_weight":  # ours [d] <- hf [1, d]
    return (1, *ours)
  if kind == "score_bias":  # ours [] <- hf [1]
    return (1,)
  return ours


def _to_ours(hf: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
  if kind in ("transpose", "in_heads", "heads_out"):
    return hf.T.reshape(shape)
  return hf.reshape(shape)


def _to_hf(ours: np.ndarray, kind: str) -> np.ndarray:
  if kind == "in_heads":  # [d, heads, e] -> [heads*e, d]
    return ours.reshape(ours.shape[0], -1).T
  if kind == "heads_out":  # [heads, e, d] -> [d, heads*e]
    return ours.reshape(-1, ours.shape[-1]).T
  if kind == "transpose":
    return ours.T
  return ours.reshape(_hf_shape(kind, ours.shape))


class _Checkpoint:
  """Lazy access to the tensors of a single or sharded safetensors checkpoint."""

  def __init__(self, folder: Path):
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = sorted(set(weight_map.values()))
    elif single.is_file():
      files = ["model.safetensors"]
      weight_map = None
    else:
      raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")
    self.folder = folder
    self._handles = {f: safe_open(str(folder / f), framework="numpy") for f in files}
    self.location = weight_map or {name: files[0] for name in self._handles[files[0]].keys()}

  def get(self, name: str) -> np.ndarray:
    if name not in self.location:
      raise KeyError(name)
    return self._handles[self.location[name]].get_tensor(name)


def _hf_names(name: str, config: DecoderConfig) -> Iterator[tuple[str, str]]:
  """HF tensor names (and transform kinds) that make up our parameter `name`, in layer order."""
  if name.startswith("layers."):
    hf_name, kind = _LAYER_NAMES[name[len("layers."):]]
    for i in range(config.num_layers):
      yield f"model.layers.{i}.{hf_name}", kind
  elif name == "lm_head":
    yield _TOP_NAMES[name], "transpose"
  elif name in ("value_head.kernel", "value_head.bias"):
    yield _TOP_NAMES[name], "score_weight" if name == "value_head.kernel" else "score_bias"
  else:
    yield _TOP_NAMES[name], "copy"


def _read_param(checkpoint: _Checkpoint, name: str, shape: tuple[int, ...], config: DecoderConfig,
                dtype: Any) -> np.ndarray:
  per_layer = shape[1:] if name.startswith("layers.") else shape
  parts = []
  for hf_name, kind in _hf_names(name, config):
    try:
      tensor = checkpoint.get(hf_name)
    except KeyError:
      raise ValueError(f"{checkpoint.folder}: missing tensor {hf_name!r} (needed for {name})") from None
    expected = _hf_shape(kind, per_layer)
    if tuple(tensor.shape) != expected:
      raise ValueError(f"{checkpoint.folder}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, but "
                       f"config.json implies {expected}")
    parts.append(_to_ours(tensor, kind, per_layer))
  array = np.stack(parts) if name.startswith("layers.") else parts[0]
  return np.asarray(array, dtype=dtype)


def read_config(path: str | Path) -> tuple[DecoderConfig, bool]:
  """`(DecoderConfig, is_value_model)` from a folder's `config.json`."""
  config_path = Path(path) / "config.json"
  if not config_path.is_file():
    raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model folder)")
  raw = json.loads(config_path.read_text())
  architectures = list(raw.get("architectures") or [])
  is_value = bool(architectures) and architectures[0].endswith("ForTokenClassification")
  if is_value:
    raw = {**raw, "architectures": [architectures[0].replace("ForTokenClassification", "ForCausalLM")]}
  return DecoderConfig.from_hf(raw, source=str(config_path)), is_value


def load_hf(path: str | Path, dtype: Any = jnp.float32, mesh: Mesh | None = None, *,
            compute_dtype: Any = None, value_head: bool = False,
            rules: sharding_lib.Rules = sharding_lib.DEFAULT_RULES, seed: int = 0) -> Decoder | ValueModel:
  """Loads a Hugging Face folder as a `Decoder` (or, with `value_head=True`, a `ValueModel` whose
  backbone comes from the checkpoint and whose head is freshly initialised unless the folder is a
  `*ForTokenClassification` critic). `dtype` is the parameter dtype; `compute_dtype` defaults to it.

  With `mesh`, every parameter is created directly with its sharding from `rules`.
  """
  folder = Path(path)
  config, is_value_checkpoint = read_config(folder)
  compute_dtype = compute_dtype or dtype
  model_cls = ValueModel if value_head else Decoder
  model = nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(seed), param_dtype=dtype,
                                           compute_dtype=compute_dtype))
  checkpoint = _Checkpoint(folder)
  np_dtype = jnp.dtype(dtype)
  used: set[str] = set()
  fresh = jax.random.split(jax.random.key(seed), 2)
  for name, param in model.named_params().items():
    shape = tuple(param.get_value().shape)
    if name.startswith("value_head.") and not is_value_checkpoint:
      # A new critic head: normal(initializer_range) kernel, zero bias, as HF initialises `score`.
      if name == "value_head.kernel":
        array = np.asarray(jax.random.normal(fresh[0], shape) * config.initializer_range, np_dtype)
      else:
        array = np.zeros(shape, np_dtype)
    else:
      array = _read_param(checkpoint, name, shape, config, np_dtype)
      used.update(n for n, _ in _hf_names(name, config))
    if mesh is None:
      param.set_value(jnp.asarray(array))
    else:
      sharding = sharding_lib.param_sharding(shape, param.get_metadata()["logical_axes"], mesh, rules)
      param.set_value(jax.make_array_from_callback(shape, sharding, lambda index, a=array: a[index]))
  unexpected = sorted(n for n in checkpoint.location if n not in used and not _IGNORED.match(n)
                      and not (n == "lm_head.weight" and config.tie_embeddings)
                      and not (value_head and n == "lm_head.weight")
                      and not (not value_head and n.startswith("score.")))
  if unexpected:
    raise ValueError(f"{folder}: tensors this {config.architecture} config does not use: "
                     f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
  return model


def _hf_tensors(model: Decoder | ValueModel, dtype: Any) -> Iterator[tuple[str, np.ndarray]]:
  config = model.config
  for name, param in model.named_params().items():
    array = np.asarray(jax.device_get(param.get_value()))
    if dtype is not None:
      array = array.astype(jnp.dtype(dtype))
    per_layer = list(array) if name.startswith("layers.") else [array]
    for (hf_name, kind), part in zip(_hf_names(name, config), per_layer, strict=True):
      yield hf_name, np.ascontiguousarray(_to_hf(part, kind))


def save_hf(model: Decoder | ValueModel, path: str | Path, tokenizer: Any = None, *,
            dtype: Any = None, max_shard_bytes: int = 5 * 1024**3) -> Path:
  """Writes `config.json`, `generation_config.json`, safetensors (sharded with an index above
  `max_shard_bytes`) and, when given, the tokenizer (a folder to copy from or an object with
  `save_pretrained`). `dtype` converts the weights (default: as stored)."""
  from safetensors.numpy import save_file

  folder = Path(path)
  folder.mkdir(parents=True, exist_ok=True)
  config = model.config
  tensors = dict(_hf_tensors(model, dtype))
  stored_dtype = str(next(iter(tensors.values())).dtype)
  hf_config = config.to_hf(dtype=stored_dtype)
  if isinstance(model, ValueModel):
    hf_config["architectures"] = [config.architecture.replace("ForCausalLM", "ForTokenClassification")]
    hf_config["num_labels"] = 1
    hf_config["id2label"], hf_config["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
  (folder / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
  generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if hf_config.get(k) is not None}
  (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

  for old in list(folder.glob("model*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
    old.unlink()
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, tensor in tensors.items():
    if shards[-1] and size + tensor.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensor
    size += tensor.nbytes
  metadata = {"format": "pt"}
  if len(shards) == 1:
    save_file(shards[0], str(folder / "model.safetensors"), metadata=metadata)
  else:
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
      file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, str(folder / file), metadata=metadata)
      weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

  if tokenizer is not None:
    if isinstance(tokenizer, (str, Path)):
      copied = [f for f in TOKENIZER_FILES if (Path(tokenizer) / f).is_file()]
      if not copied:
        raise FileNotFoundError(f"{tokenizer}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
      for f in copied:
        shutil.copyfile(Path(tokenizer) / f, folder / f)
    else:
      tokenizer.save_pretrained(folder)
  return folder


def save_hf_params(params: dict[str, Any], config: DecoderConfig, path: str | Path, tokenizer: Any = None, *,
                   dtype: Any = None) -> Path:
  """`save_hf` for a decoder given as the nested arrays `forward` takes (e.g. the trainer's actor)."""
  model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
  for name, param in model.named_params().items():
    value = params["layers"][name[len("layers."):]] if name.startswith("layers.") else params[name]
    param.set_value(value)
  return save_hf(model, path, tokenizer, dtype=dtype)
