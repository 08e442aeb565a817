"""Decoder hyper-parameters and their mapping from/to Hugging Face `config.json`."""

from __future__ import annotations

import dataclasses
from typing import Any

# HF architecture name -> (qkv_bias, qk_norm). One implementation covers all of them.
ARCHITECTURES = {
    "LlamaForCausalLM": (False, False),
    "Qwen2ForCausalLM": (True, False),
    "Qwen3ForCausalLM": (False, True),
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 frequency scaling (`rope_type: llama3`)."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Shapes and options of a Llama / Qwen2 / Qwen3 decoder. `hf_config` keeps the source dict so an
  export writes back every key this project does not interpret."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  tie_embeddings: bool = False
  qkv_bias: bool = False
  qk_norm: bool = False
  architecture: str = "LlamaForCausalLM"
  max_position_embeddings: int = 8192
  initializer_range: float = 0.02
  bos_token_id: int | None = None
  eos_token_id: int | list[int] | None = None
  pad_token_id: int | None = None
  hf_config: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")

  @classmethod
  def from_fields(cls, fields: Any, **extra: Any) -> DecoderConfig:
    """From a config section whose keys are this class's field names (`searcher.model`, a randomly
    initialised searcher), plus `extra` fields; an unknown key raises naming it."""
    fields = {**dict(fields), **extra}
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"searcher.model: unknown decoder field(s) {', '.join(unknown)}; expected "
                       f"{', '.join(f.name for f in dataclasses.fields(cls) if f.name != 'hf_config')}")
    return cls(**fields)

  @classmethod
  def from_hf(cls, config: dict[str, Any], source: str = "config.json") -> DecoderConfig:
    """Reads a HF `config.json` dict; raises `ValueError` naming an unsupported architecture or option."""
    architectures = config.get("architectures") or [_MODEL_TYPES.get(config.get("model_type"), "")]
    architecture = architectures[0]
    if architecture not in ARCHITECTURES:
      raise ValueError(f"{source}: unsupported architecture {architecture!r} (model_type "
                       f"{config.get('model_type')!r}); supported: {', '.join(ARCHITECTURES)}")
    qkv_bias, qk_norm = ARCHITECTURES[architecture]
    if architecture == "LlamaForCausalLM":
      qkv_bias = bool(config.get("attention_bias", False))
      if config.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias=true is not supported")
    if config.get("use_sliding_window"):
      raise ValueError(f"{source}: use_sliding_window=true is not supported")
    if config.get("hidden_act", "silu") != "silu":
      raise ValueError(f"{source}: hidden_act={config['hidden_act']!r} is not supported (only silu)")
    rope = dict(config.get("rope_scaling") or {})
    rope.update({k: v for k, v in (config.get("rope_parameters") or {}).items() if k != "rope_theta"})
    rope_theta = config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
      scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                            float(rope["high_freq_factor"]), int(rope["original_max_position_embeddings"]))
    elif rope_type == "default":
      scaling = None
    else:
      raise ValueError(f"{source}: rope type {rope_type!r} is not supported (default, llama3)")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads", "rms_norm_eps") if k not in config]
    if missing:
      raise ValueError(f"{source}: missing key {missing[0]!r}")
    num_heads = config["num_attention_heads"]
    return cls(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"],
        num_heads=num_heads, num_kv_heads=config.get("num_key_value_heads", num_heads),
        head_dim=config.get("head_dim") or config["hidden_size"] // num_heads,
        rope_theta=float(rope_theta), rope_scaling=scaling, rms_norm_eps=float(config["rms_norm_eps"]),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), qkv_bias=qkv_bias, qk_norm=qk_norm,
        architecture=architecture,
        max_position_embeddings=config.get("max_position_embeddings", 8192),
        initializer_range=config.get("initializer_range", 0.02),
        bos_token_id=config.get("bos_token_id"), eos_token_id=config.get("eos_token_id"),
        pad_token_id=config.get("pad_token_id"), hf_config=dict(config))

  def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
    """A `config.json` dict that `transformers` and vLLM load as this architecture."""
    model_type = {v: k for k, v in _MODEL_TYPES.items()}[self.architecture]
    config = dict(self.hf_config)
    config.update({
        "architectures": [self.architecture], "model_type": model_type, "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
        "rope_theta": self.rope_theta, "rms_norm_eps": self.rms_norm_eps,
        "tie_word_embeddings": self.tie_embeddings, "hidden_act": "silu",
        "max_position_embeddings": self.max_position_embeddings,
        "initializer_range": self.initializer_range, "dtype": dtype,
        "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
        "pad_token_id": self.pad_token_id,
    })
    config.pop("torch_dtype", None)
    if self.architecture == "LlamaForCausalLM":
      config["attention_bias"] = self.qkv_bias
    # Both spellings: transformers 5.x reads `rope_parameters`; 4.x and other tools read
    # `rope_theta`/`rope_scaling`.
    rope = {"rope_type": "default"}
    config.pop("rope_scaling", None)
    if self.rope_scaling is not None:
      rope = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
      config["rope_scaling"] = dict(rope)
    config["rope_parameters"] = {"rope_theta": self.rope_theta, **rope}
    return config
